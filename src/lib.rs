//! chatgate: a hardened real-time chat gateway on Redis.
//!
//! Module map (request order):
//! - [`config`]: layered, validated configuration.
//! - [`app`]: `Application::build` wires everything and owns the listener.
//! - [`http`]: the listener (connection caps, per-phase deadlines), the middleware stack
//!   and the REST routes of the original API.
//! - [`ws`]: the WebSocket upgrade (checks before the 101) and the session loop.
//! - [`chat`]: validated types, events, and the service (validate → persist → publish).
//! - [`store`]: history, presence, typing, channels (Redis or memory).
//! - [`bus`]: one subscriber per process and the hub that fans events out to sessions.
//! - [`error`]: the HTTP error type. [`telemetry`]: logs. [`shutdown`]: signals.

pub mod app;
pub mod auth;
pub mod bus;
pub mod chat;
pub mod config;
pub mod content;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod web;
pub mod ws;

pub use app::Application;
pub use config::Config;

/// Installs the process-wide TLS crypto provider (ring) that HTTPS clients (the JWKS
/// fetcher) use. Idempotent: later calls are no-ops.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
