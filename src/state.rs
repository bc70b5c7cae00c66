//! Shared application state: one cheap-`Clone` handle, built once by `Application::build`.

use std::ops::Deref;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::ChatService;
use crate::config::Config;
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
