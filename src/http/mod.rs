//! HTTP: the REST routes of the original API, health endpoints, and the middleware stack.

pub mod middleware;
pub mod routes;

use axum::Router;
use axum::routing::get;

use crate::state::AppState;

/// Every route, without middleware.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(routes::router())
        .route("/ws/chat", get(crate::ws::connect_chat))
        .with_state(state)
}
