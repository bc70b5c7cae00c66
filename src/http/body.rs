//! Request bodies read under the payload budget.
//!
//! A body up to the small cap (`ws.max_frame_bytes`) is read as it is. A larger one needs
//! permits from the process's [`PayloadBudget`](crate::limits::payload::PayloadBudget)
//! first: for its `Content-Length` before a byte of it is read, or, for a chunked body,
//! for the body limit once it has passed the small cap. No room within the wait: 503
//! `server_busy` with `Retry-After`. The permits travel with the bytes ([`Budgeted`]) and
//! are given back when the handler drops them.

use axum::extract::{FromRequest, Request};
use axum::http::header;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::limits::payload::PayloadPermit;
use crate::state::AppState;

/// A JSON request body, whole, and the budget permits it holds.
pub struct Budgeted {
    pub bytes: Bytes,
    pub permit: PayloadPermit,
}

fn too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge {
        code: "payload_too_large",
        detail: format!("request body too large (at most {limit} bytes)"),
    }
}

fn is_json(request: &Request) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .is_some_and(|mime| {
            mime.eq_ignore_ascii_case("application/json")
                || (mime.len() > 5
                    && mime[..mime.len() - 5].contains('/')
                    && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"))
        })
}

impl FromRequest<AppState> for Budgeted {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(&request) {
            return Err(ApiError::bad_request(
                "invalid_request",
                "Invalid request format: Expected request with `Content-Type: application/json`",
            ));
        }
        let limit = state.config.server.max_body_bytes;
        let budget = &state.payloads;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large(limit));
        }
        let mut permit = match declared {
            Some(n) => budget.acquire(n).await.map_err(ApiError::Busy)?,
            None => PayloadPermit::default(),
        };
        // A body admitted by its declared length gets its whole buffer at once: grown by
        // doubling, it would hold up to twice its size at its peak, outside the budget.
        let capacity = match declared {
            Some(n) if permit.bytes() > 0 => n,
            other => other.unwrap_or(0).min(budget.small()),
        };
        let mut body = BytesMut::with_capacity(capacity);
        let mut stream = request.into_body().into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request("invalid_request", format!("could not read the body: {e}"))
            })?;
            if body.len() + chunk.len() > limit {
                return Err(too_large(limit));
            }
            if body.len() + chunk.len() > budget.small().max(permit.bytes()) {
                // Past what the permits cover (a chunked body, or one longer than it
                // said, which hyper refuses anyway): room for the largest body.
                permit.merge(budget.acquire(limit).await.map_err(ApiError::Busy)?);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Self {
            bytes: body.freeze(),
            permit,
        })
    }
}

impl std::fmt::Debug for Budgeted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgeted")
            .field("bytes", &self.bytes.len())
            .field("permit", &self.permit.bytes())
            .finish()
    }
}
