//! The chat core: validated types, events, and the service that validates, persists and
//! publishes. It knows nothing of HTTP or WebSocket framing, nor of Redis commands.

pub mod event;
pub mod model;
pub mod service;

pub use service::{ChatError, ChatLimits, ChatService, Connection, Draft, OnlineUser};
