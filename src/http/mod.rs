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

use std::time::Duration;

use axum::Router;
use axum::routing::get;

use crate::state::AppState;

/// Every route, without middleware.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new().merge(routes::router()).route(
        "/ws/chat",
        get(crate::ws::connect_chat).layer(axum::middleware::from_fn_with_state(
            // The request timeout would answer first: the shorter one is the handshake's.
            Duration::from_secs(
                state
                    .config
                    .server
                    .handshake_timeout_secs
                    .min(state.config.server.request_timeout_secs),
            ),
            crate::ws::upgrade::within_deadline,
        )),
    );
    if state.config.web.enabled {
        router = router.merge(crate::web::router(state.config.auth.enabled));
    }
    router.with_state(state)
}
