//! The one middleware stack, in request order. Each layer says why it sits where it does.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::config::Config;
use crate::error::{ApiError, ErrorCause};
use crate::http::client_ip::{self, ClientIp, ClientIpResolver};
use crate::limits::{Limits, RateHeaders};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Wraps the router in the stack. Layers listed first see the request first.
pub fn apply(router: Router, config: &Config, limits: Option<Arc<Limits>>) -> Router {
    let resolver = Arc::new(ClientIpResolver::new(&config.server.trusted_proxies));
    let stack = ServiceBuilder::new()
        // Outermost: mark credentials sensitive before anything can log or trace them.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
            header::SEC_WEBSOCKET_PROTOCOL,
        ]))
        // A request id (the client's, or a new UUID) before the span, so the span has it.
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        // The client address, decided once (trusted proxies only), for the span and limits.
        .layer(middleware::from_fn_with_state(
            resolver,
            client_ip::resolve_layer,
        ))
        // The request span, named by route template: never the raw path or query string.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Body>| {
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", |p| p.as_str());
                    let request_id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let client_ip = request
                        .extensions()
                        .get::<ClientIp>()
                        .map(|ip| tracing::field::display(ip.0));
                    let method = method_label(request.method());
                    let span = tracing::info_span!(
                        "http",
                        otel.name = format!("{method} {route}"),
                        otel.kind = "server",
                        method,
                        route,
                        request_id,
                        client_ip,
                        user = tracing::field::Empty,
                        status = tracing::field::Empty,
                        trace_id = tracing::field::Empty,
                    );
                    // An incoming traceparent makes this request part of the caller's trace.
                    crate::telemetry::set_parent_from_headers(&span, request.headers());
                    if let Some(trace_id) = crate::telemetry::trace_id(&span) {
                        span.record("trace_id", trace_id);
                    }
                    span
                })
                // 5xx are expected answers (503 while Redis is down, /readyz while draining);
                // their causes are logged at ERROR by `log_error_cause` below.
                .on_failure(DefaultOnFailure::new().level(Level::WARN)),
        )
        // Return the request id to the client.
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // Duration by route and status, and the status on the span.
        .layer(middleware::from_fn(record_request))
        // Inside the span: write 5xx causes carried by ApiError responses.
        .layer(middleware::from_fn(log_error_cause))
        // Security headers on every response that did not set its own.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        // API answers are per-user and live: never cached by browsers or proxies.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        ))
        // CORS answers preflights before they reach limits or handlers.
        .layer(cors(config))
        // RateLimit headers from the verdicts gathered below (and by handlers).
        .layer(middleware::from_fn_with_state(
            limits.as_ref().is_some_and(|l| l.headers),
            rate_headers,
        ))
        // The per-IP REST budget, before any handler work.
        .layer(middleware::from_fn_with_state(limits, rest_limit))
        // Compressed request bodies would slip past the size limit once inflated; none of
        // the API needs them.
        .layer(middleware::from_fn(refuse_encoded_bodies))
        // Bound the body before any handler buffers it: every body extractor reads through
        // this limit, and our Json wrapper turns its rejection into a JSON 413.
        .layer(DefaultBodyLimit::max(config.server.max_body_bytes))
        // A bound on how long a REST request may take. WebSocket sessions are not affected:
        // the upgrade response returns at once and the session runs on its own task.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(config.server.request_timeout_secs),
        ))
        // Innermost: a panicking handler becomes a generic 500 and the server keeps serving.
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal("handler panicked".into()).into_response()
            },
        ));
    router.layer(stack)
}

/// CORS from the exact allow-list (`Vary: Origin` is always sent; credentials only when
/// configured, and `*` never reaches here: config validation refuses it).
fn cors(config: &Config) -> CorsLayer {
    let methods = [Method::GET, Method::POST, Method::DELETE, Method::OPTIONS];
    if config.dev {
        // Like the original, any origin may call, but never with credentials.
        return CorsLayer::new()
            .allow_origin(Any)
            .allow_methods(methods)
            .allow_headers(Any);
    }
    let origins: Vec<HeaderValue> = config
        .cors
        .allowed_origins
        .iter()
        .filter_map(|o| crate::http::origin::normalize(o))
        .filter_map(|o| HeaderValue::from_str(&o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods(methods)
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, REQUEST_ID])
        .expose_headers([REQUEST_ID, header::WWW_AUTHENTICATE, header::RETRY_AFTER])
        .allow_credentials(config.cors.allow_credentials)
        .max_age(Duration::from_secs(600))
}

async fn log_error_cause(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(ErrorCause(cause)) = response.extensions().get::<ErrorCause>() {
        tracing::error!(status = response.status().as_u16(), cause = %cause, "request failed");
    }
    response
}

/// 415 for a request body with a `Content-Encoding` other than `identity`.
async fn refuse_encoded_bodies(request: Request, next: Next) -> Response {
    let encoded = request
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            axum::Json(serde_json::json!({
                "detail": "compressed request bodies (Content-Encoding) are not accepted",
                "code": "unsupported_content_encoding",
            })),
        )
            .into_response();
    }
    next.run(request).await
}

/// `/api/` requests spend the client IP's REST budget; over it they get 429.
async fn rest_limit(
    axum::extract::State(limits): axum::extract::State<Option<Arc<Limits>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(limits) = limits else {
        return next.run(request).await;
    };
    if !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let ip = request
        .extensions()
        .get::<ClientIp>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0);
    let verdict = limits.rest(ip);
    if !verdict.allowed {
        tracing::warn!(client_ip = %ip, limit = "rest", "rate limited");
        crate::metrics::rate_limited("rest");
        return ApiError::RateLimited(verdict).into_response();
    }
    let mut response = next.run(request).await;
    let extensions = response.extensions_mut();
    match extensions.get_mut::<RateHeaders>() {
        Some(RateHeaders(verdicts)) => verdicts.insert(0, verdict),
        None => {
            extensions.insert(RateHeaders(vec![verdict]));
        }
    }
    response
}

/// Writes `RateLimit` and `RateLimit-Policy` from the verdicts a response carries (when
/// `limits.headers` is on); the verdicts never leave the process otherwise.
async fn rate_headers(
    axum::extract::State(enabled): axum::extract::State<bool>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if let Some(RateHeaders(verdicts)) = response.extensions_mut().remove::<RateHeaders>()
        && enabled
    {
        crate::limits::write_headers(response.headers_mut(), &verdicts);
    }
    response
}

/// The method as a metric label and span name part: the standard ones, or `other` (a
/// client can send any token as a method; labels must stay a small fixed set).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Records `chatgate_http_request_duration_seconds` and the status on the request span.
async fn record_request(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    tracing::Span::current().record("status", status);
    crate::metrics::http_request(method, &route, status, started.elapsed());
    response
}
