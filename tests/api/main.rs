//! Integration tests: the real app on port 0, over real sockets, with a private
//! `redis-server` per test where Redis is involved.

// Tests spawn helper tasks freely; the TaskTracker rule is for the server.
#![allow(clippy::disallowed_methods)]

mod auth;
mod content;
mod faults;
mod helpers;
mod hostile;
mod hygiene;
mod lifecycle;
mod limits;
mod quotas;
mod reliability;
mod replicas;
mod rest;
mod scaleout;
mod soak;
mod store;
mod telemetry;
mod topology;
mod ws;
