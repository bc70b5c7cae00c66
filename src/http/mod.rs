//! HTTP: the public listener (connection caps and deadlines), the REST routes of the
//! original API, health endpoints, and the middleware stack.

pub mod body;
pub mod caller;
pub mod client_ip;
pub mod deadline;
pub mod listener;
pub mod middleware;
pub mod origin;
pub mod routes;

use axum::Router;
use axum::routing::get;

use crate::state::AppState;

/// Every route, without middleware.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .merge(routes::router())
        .route("/ws/chat", get(crate::ws::connect_chat));
    if state.config.web.enabled {
        router = router.merge(crate::web::router(state.config.auth.enabled));
    }
    router.with_state(state)
}
