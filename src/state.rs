//! Shared application state: one cheap-`Clone` handle, built once by `Application::build`.

use std::ops::Deref;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::chat::ChatService;
use crate::config::Config;
use crate::http::origin::OriginPolicy;
use crate::limits::Limits;
use crate::limits::payload::PayloadBudget;
use crate::ws::session::SessionSettings;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Arc<Config>,
    pub chat: Arc<ChatService>,
    /// Cancelled when the process starts draining: no new sessions, existing ones close.
    pub shutdown: CancellationToken,
    /// Tracks live WebSocket sessions, so shutdown can wait for them.
    pub sessions: TaskTracker,
    pub session: SessionSettings,
    /// The token verifier; `None` when auth is off.
    pub auth: Option<Arc<Authenticator>>,
    /// The WebSocket Origin rule.
    pub origins: OriginPolicy,
    /// Rate and connection limits; `None` when `limits.enabled` is false.
    pub limits: Option<Arc<Limits>>,
    /// Bytes of large payloads in flight (always on, whatever `limits.enabled` says).
    pub payloads: Arc<PayloadBudget>,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
