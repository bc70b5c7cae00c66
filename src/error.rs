//! The one error type at the HTTP boundary.
//!
//! Usage policy:
//! - Handlers return `AppResult<T>`; every failure becomes an [`ApiError`].
//! - The body is always the original's shape, `{"detail": "..."}`, plus a stable `code`.
//! - Client errors (400, 401, 403, 404, 413, 422) carry a detail written for the client;
//!   401s also carry a `WWW-Authenticate: Bearer` challenge (RFC 6750).
//! - Server-side failures (503, 500) carry a generic detail; the cause travels in a response
//!   extension ([`ErrorCause`]) that the logging middleware writes inside the request's
//!   span. Internal error text never reaches a client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::AuthError;
use crate::chat::ChatError;
use crate::chat::model::ValidationError;
use crate::limits::{RateHeaders, Refusal, Verdict};

pub type AppResult<T> = Result<T, ApiError>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: bad JSON, a missing or mistyped field or parameter.
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// Well-formed, but the content breaks a rule.
    #[error("{detail}")]
    Unprocessable { code: &'static str, detail: String },
    /// No acceptable bearer token (401 with a `WWW-Authenticate` challenge), or the
    /// issuer's keys are not loaded yet (503).
    #[error("{0}")]
    Unauthorized(AuthError),
    /// Authenticated, but not allowed to do this.
    #[error("{detail}")]
    Forbidden { code: &'static str, detail: String },
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{detail}")]
    PayloadTooLarge { code: &'static str, detail: String },
    /// Over a rate limit: 429 with `Retry-After`; the verdict also feeds the RateLimit
    /// headers.
    #[error("rate limited")]
    RateLimited(Verdict),
    /// A connection cap: 429 (per IP or per user) or 503 (this process is full).
    #[error("connection refused by a cap")]
    TooManyConnections(Refusal),
    /// Redis (or the bus) failed; the string is the cause, for logs.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The process is draining and takes no new sessions; clients reconnect elsewhere.
    #[error("shutting down")]
    ShuttingDown,
    /// A bug; the string is the cause, for logs.
    #[error("internal error: {0}")]
    Internal(String),
    /// The store is nearly full and takes no new media: 507 with `Retry-After`.
    #[error("storage full")]
    StorageFull,
    /// Too many large payloads in flight in this process: 503 with `Retry-After`.
    #[error("server busy")]
    Busy(crate::limits::payload::Busy),
    /// A protocol-level refusal with its own status (a malformed WebSocket upgrade).
    #[error("{detail}")]
    Status {
        status: StatusCode,
        code: &'static str,
        detail: &'static str,
    },
}

/// The cause of a 5xx, for the logging middleware only.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub String);

impl ApiError {
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Self {
        Self::Forbidden {
            code,
            detail: detail.into(),
        }
    }

    /// A parameter (path or query) that failed validation is a malformed request.
    pub fn bad_param(e: ValidationError) -> Self {
        Self::BadRequest {
            code: e.code,
            detail: e.detail,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized(AuthError::KeysUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited(_) | Self::TooManyConnections(Refusal::PerIp | Refusal::PerUser) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::TooManyConnections(Refusal::Full) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            Self::Status { status, .. } => *status,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. }
            | Self::Unprocessable { code, .. }
            | Self::PayloadTooLarge { code, .. }
            | Self::Forbidden { code, .. } => code,
            Self::Unauthorized(e) => e.code(),
            Self::RateLimited(v) => crate::chat::service::limited_code(v),
            Self::TooManyConnections(Refusal::Full) => "server_full",
            Self::TooManyConnections(_) => "too_many_connections",
            Self::NotFound(_) => "not_found",
            Self::Unavailable(_) => "store_unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::Internal(_) => "internal",
            Self::Busy(_) => "server_busy",
            Self::StorageFull => "storage_full",
            Self::Status { code, .. } => code,
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::NotOwner => Self::forbidden("not_owner", e.to_string()),
            ChatError::Invalid(v) if v.code == "invalid_limit" => Self::bad_param(v),
            // Media over its size limit is a too-large body, not a malformed one.
            ChatError::Invalid(v) if v.code == "media_too_large" => Self::PayloadTooLarge {
                code: v.code,
                detail: v.detail,
            },
            ChatError::Invalid(v) => Self::Unprocessable {
                code: v.code,
                detail: v.detail,
            },
            ChatError::NotFound(what) => Self::NotFound(what),
            ChatError::Unavailable(cause) => Self::Unavailable(cause),
            ChatError::Limited(verdict) => Self::RateLimited(verdict),
            ChatError::StorageFull => Self::StorageFull,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code();
        let challenge = match &self {
            Self::Unauthorized(e) => Some(e.challenge()),
            _ => None,
        };
        let (retry_after, verdict) = match &self {
            Self::RateLimited(v) => (Some(v.retry_after_secs()), Some(v.clone())),
            Self::TooManyConnections(Refusal::PerIp | Refusal::PerUser) => (Some(5), None),
            Self::Busy(busy) => (Some(busy.retry_after.as_secs().max(1)), None),
            Self::StorageFull => (
                Some(crate::chat::service::STORAGE_FULL_RETRY.as_secs()),
                None,
            ),
            _ => (None, None),
        };
        let (detail, cause) = match self {
            Self::BadRequest { detail, .. }
            | Self::Unprocessable { detail, .. }
            | Self::Forbidden { detail, .. } => (detail, None),
            Self::Unauthorized(e) => (e.to_string(), None),
            Self::RateLimited(v) => (
                match v.policy.name {
                    "media" => format!(
                        "Media quota exceeded (bytes of images and audio per user): retry in {} s",
                        v.retry_after_secs()
                    ),
                    name => format!(
                        "Too many requests ({name} limit): retry in {} s",
                        v.retry_after_secs()
                    ),
                },
                None,
            ),
            Self::Busy(_) => (
                "Server busy with large payloads, try again shortly".to_string(),
                None,
            ),
            Self::StorageFull => (
                "Chat storage is nearly full: images and audio are refused for now, text still goes through".to_string(),
                None,
            ),
            Self::Status { detail, .. } => (detail.to_string(), None),
            Self::TooManyConnections(Refusal::PerIp) => {
                ("Too many connections from your address".to_string(), None)
            }
            Self::TooManyConnections(Refusal::PerUser) => {
                ("Too many connections for your user".to_string(), None)
            }
            Self::TooManyConnections(Refusal::Full) => (
                "Server is full, try again (another replica may have room)".to_string(),
                None,
            ),
            Self::NotFound(detail) => (detail.to_string(), None),
            Self::PayloadTooLarge { detail, .. } => (detail, None),
            Self::Unavailable(cause) => (
                "Chat store unavailable, try again later".to_string(),
                Some(cause),
            ),
            Self::ShuttingDown => (
                "Server is shutting down, reconnect with backoff".to_string(),
                None,
            ),
            Self::Internal(cause) => ("Internal server error".to_string(), Some(cause)),
        };
        let mut response =
            (status, Json(json!({ "detail": detail, "code": code }))).into_response();
        if let Some(cause) = cause {
            response.extensions_mut().insert(ErrorCause(cause));
        }
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        if let Some(verdict) = verdict {
            response.extensions_mut().insert(RateHeaders(vec![verdict]));
        }
        if let Some(challenge) = challenge {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, challenge);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE
            && !response.headers().contains_key("retry-after")
        {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}
