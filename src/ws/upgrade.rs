//! The WebSocket handshake (RFC 6455 section 4.2, HTTP/1.1), done here rather than by
//! axum's `WebSocketUpgrade` so that the upgraded connection's reads can go through the
//! payload [`Gate`](super::gate::Gate) before the WebSocket library sees a byte.
//!
//! The checks and answers are the ones axum's extractor makes: 405 for a method other
//! than GET, 400 for missing or wrong `Connection`, `Upgrade`, `Sec-WebSocket-Version`
//! or `Sec-WebSocket-Key` headers, 426 when the connection cannot be upgraded.
//!
//! The whole handshake, from the request's headers to the 101, is bounded by
//! `server.handshake_timeout_secs` ([`within_deadline`]).

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::error::ApiError;

/// A valid upgrade request, not answered yet.
pub struct Upgrade {
    key: HeaderValue,
    offered: Vec<HeaderValue>,
    on_upgrade: OnUpgrade,
}

fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn bad(code: &'static str, detail: &'static str) -> ApiError {
    ApiError::bad_request(code, detail)
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        if parts.method != Method::GET {
            return Err(ApiError::Status {
                status: StatusCode::METHOD_NOT_ALLOWED,
                code: "method_not_allowed",
                detail: "a WebSocket upgrade must be a GET request",
            });
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(bad(
                "invalid_upgrade",
                "Connection header did not include 'upgrade'",
            ));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(bad(
                "invalid_upgrade",
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(bad(
                "invalid_upgrade",
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or_else(|| bad("invalid_upgrade", "`Sec-WebSocket-Key` header missing"))?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(ApiError::Status {
                status: StatusCode::UPGRADE_REQUIRED,
                code: "not_upgradable",
                detail: "WebSocket request couldn't be upgraded since no upgrade state was present",
            })?;
        let offered = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|p| HeaderValue::from_bytes(p.trim_ascii()).ok())
            .collect();
        Ok(Self {
            key,
            offered,
            on_upgrade,
        })
    }
}

impl Upgrade {
    /// Answers 101, selecting the first of `supported` that the client offered (never an
    /// entry the server does not know, such as a token), and runs `session` on the
    /// upgraded connection with `spawn` (a task tracker's, so shutdown waits for it).
    pub fn respond<F, Fut>(
        self,
        supported: &[&'static str],
        spawn: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
        session: F,
    ) -> Response
    where
        F: FnOnce(TokioIo<Upgraded>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let protocol = supported
            .iter()
            .find(|p| self.offered.iter().any(|o| o.as_bytes() == p.as_bytes()));
        let on_upgrade = self.on_upgrade;
        spawn(Box::pin(async move {
            match on_upgrade.await {
                Ok(upgraded) => session(TokioIo::new(upgraded)).await,
                Err(e) => tracing::debug!(error = %e, "WebSocket upgrade did not complete"),
            }
        }));
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(self.key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if let Some(protocol) = protocol {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// Middleware: the upgrade handler must answer within `limit`, or the client gets 503
/// `handshake_timeout` (with `Retry-After`). Cutting the handler off is safe: the join
/// runs as its own task and is undone when its unused connection is dropped, and the
/// session is only spawned with the 101.
pub async fn within_deadline(
    State(limit): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            crate::metrics::http_timeout("handshake");
            tracing::warn!(
                limit_secs = limit.as_secs(),
                "WebSocket refused: handshake timeout"
            );
            ApiError::Status {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "handshake_timeout",
                detail: "the WebSocket handshake took too long, try again",
            }
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_handshake_past_its_deadline_gets_503_handshake_timeout() {
        let router = Router::new().route(
            "/ws",
            get(std::future::pending::<&'static str>).layer(axum::middleware::from_fn_with_state(
                Duration::from_secs(10),
                within_deadline,
            )),
        );
        let response = router
            .oneshot(Request::get("/ws").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "handshake_timeout");
    }
}
