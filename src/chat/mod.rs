//! The chat core: validated types, events, and the service that validates, persists and
//! publishes. It knows nothing of HTTP or WebSocket framing, nor of Redis commands.

pub mod event;
pub mod model;
pub mod service;

pub use service::{ChatError, ChatLimits, ChatService, Connection, Draft, OnlineUser};

/// Payloads from this size up are parsed, checked and serialized on the blocking pool.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// Runs `work` on the blocking thread pool when `large`, inline otherwise. Parsing,
/// validating and serializing a media message is milliseconds of CPU per megabyte: on an
/// async worker it would hold up every session scheduled there (healthy clients saw
/// their p99 grow by tens of milliseconds per concurrent upload).
pub async fn offload<T: Send + 'static>(
    large: bool,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    if !large {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
