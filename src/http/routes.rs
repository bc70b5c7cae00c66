//! REST handlers, with the original's paths and response shapes.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::chat::model::{ChannelName, DEFAULT_CHANNEL, MessageId};
use crate::error::{ApiError, AppResult};
use crate::http::body::Budgeted;
use crate::http::caller::Caller;
use crate::http::client_ip::ClientIp;
use crate::limits::RateHeaders;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/chat/history/{channel}", get(list_history))
        .route("/api/users/online/{channel}", get(list_online_users))
        .route("/api/chat/channels", get(list_channels))
        .route("/api/chat/message", post(send_message))
        .route("/api/chat/message/{message_id}", delete(delete_message))
        .route("/api/me", get(me))
}

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn params(query: Params) -> AppResult<HashMap<String, String>> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

fn channel(raw: &str) -> AppResult<ChannelName> {
    ChannelName::parse(raw).map_err(ApiError::bad_param)
}

/// `GET /`: the original's service document, unchanged.
async fn root() -> Json<Value> {
    Json(json!({
        "message": "Real-Time Chat API is running!",
        "version": "1.0.0",
        "endpoints": {
            "websocket": "/ws/chat?username=YourName&channel=general",
            "chat_history": "/api/chat/history/{channel}",
            "online_users": "/api/users/online/{channel}",
            "channels": "/api/chat/channels"
        }
    }))
}

/// Liveness: the process answers.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: Redis answers, the bus subscriber is connected, and not draining.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let verdict = if state.shutdown.is_cancelled() {
        Err("draining".to_string())
    } else if state.auth.as_ref().is_some_and(|a| !a.is_ready()) {
        Err("auth keys".to_string())
    } else {
        state.chat.ready().await
    };
    match verdict {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Err(reason) => {
            tracing::warn!(%reason, "not ready");
            let detail = if reason == "draining" {
                "draining"
            } else if reason == "auth keys" {
                "auth keys not loaded"
            } else if reason.contains("bus") {
                "bus not subscribed"
            } else {
                "store unreachable"
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "not_ready", "detail": detail })),
            )
        }
    }
}

async fn list_history(
    caller: Caller,
    State(state): State<AppState>,
    Path(raw_channel): Path<String>,
    query: Params,
) -> AppResult<Json<Value>> {
    let channel = channel(&raw_channel)?;
    caller.check_channel(&channel)?;
    let limit = match params(query)?.get("limit") {
        None => None,
        Some(raw) => Some(
            raw.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request("invalid_limit", "limit must be an integer"))?,
        ),
    };
    let (messages, truncated) = state.chat.history(&channel, limit).await?;
    let mut body = json!({
        "messages": messages,
        "total_count": messages.len(),
        "channel": channel.as_str(),
    });
    if truncated {
        // Only when it applies, so answers keep the original's shape otherwise.
        body["truncated"] = Value::Bool(true);
    }
    Ok(Json(body))
}

async fn list_online_users(
    caller: Caller,
    State(state): State<AppState>,
    Path(raw_channel): Path<String>,
) -> AppResult<Json<Value>> {
    let channel = channel(&raw_channel)?;
    caller.check_channel(&channel)?;
    let users = state.chat.online(&channel).await?;
    Ok(Json(json!({
        "channel": channel.as_str(),
        "online_users": users,
        "count": users.len(),
    })))
}

/// Channels with history; with a channel-restricted token, only those it allows.
async fn list_channels(caller: Caller, State(state): State<AppState>) -> AppResult<Json<Value>> {
    let mut channels = state.chat.channels().await?;
    if let Some(identity) = caller.identity() {
        channels.retain(|name| {
            ChannelName::parse(name).is_ok_and(|channel| identity.may_use(&channel))
        });
    }
    Ok(Json(
        json!({ "channels": channels, "count": channels.len() }),
    ))
}

/// The body of `POST /api/chat/message`: a JSON object (an array is refused even where
/// its items would fit). `channel` and `message_type` default as in the original, and
/// `null` means the default, as on the WebSocket. With auth on, `sender` may be left out
/// (the token names the sender) and must match the token when given. Other fields are
/// skipped without being built (`IgnoredAny`), whatever their size.
#[derive(Debug, Deserialize)]
pub struct SendMessageBody {
    #[serde(default)]
    sender: Option<String>,
    content: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    message_type: Option<String>,
}

impl SendMessageBody {
    /// Parses a body; one over `small` bytes must carry an image or audio message.
    fn parse(bytes: &[u8], small: usize) -> AppResult<Self> {
        let invalid = |detail: String| ApiError::bad_request("invalid_request", detail);
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err(invalid(
                "Invalid request format: the body must be a JSON object".into(),
            ));
        }
        let too_large = || ApiError::PayloadTooLarge {
            code: "payload_too_large",
            detail: format!(
                "request body too large: only image and audio messages may exceed {small} bytes"
            ),
        };
        if bytes.len() > small && crate::ws::protocol::check_large_shape(bytes).is_err() {
            return Err(too_large());
        }
        let body: Self = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("Invalid request format: {e}")))?;
        let media = body
            .message_type
            .as_deref()
            .is_some_and(crate::ws::protocol::is_media_type);
        if bytes.len() > small && !media {
            return Err(too_large());
        }
        Ok(body)
    }
}

/// The answer to a send: the original's `MessageResponse`, with the stored entry (JSON
/// the service serialized) as `data`, written around it once at its final size: a
/// message can be megabytes, so it is neither parsed again nor grown by doubling.
fn sent(entry: &str) -> Response {
    const HEAD: &str = r#"{"success":true,"message":"Message sent successfully","data":"#;
    let mut body = String::with_capacity(HEAD.len() + entry.len() + 1);
    body.push_str(HEAD);
    body.push_str(entry);
    body.push('}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn send_message(
    caller: Caller,
    State(state): State<AppState>,
    body: Budgeted,
) -> AppResult<(Option<Extension<RateHeaders>>, Response)> {
    let Budgeted { bytes, permit } = body;
    // A large body is parsed on the blocking pool and dropped there once parsed: only its
    // permits stay, until the send ends.
    let small = state.payloads.small();
    let body = crate::chat::offload(bytes.len() > small, move || {
        SendMessageBody::parse(&bytes, small)
    })
    .await?;
    let unprocessable = |e: crate::chat::model::ValidationError| ApiError::Unprocessable {
        code: e.code,
        detail: e.detail,
    };
    let sender = caller.sender(body.sender.as_deref())?;
    let channel = ChannelName::parse(body.channel.as_deref().unwrap_or(DEFAULT_CHANNEL))
        .map_err(unprocessable)?;
    caller.check_channel(&channel)?;
    let message_type = body.message_type.as_deref().unwrap_or("text");
    let span = tracing::debug_span!(
        "chat.send",
        transport = "rest",
        channel = %channel,
        message_type = tracing::field::Empty,
        content_bytes = body.content.len(),
        outcome = tracing::field::Empty,
    );
    let posted = state
        .chat
        .post(&sender, &channel, body.content, message_type, None)
        .instrument(span)
        .await?;
    let answer = sent(&posted.message.entry);
    drop(posted.message);
    drop(permit);
    crate::metrics::message_received("rest");
    Ok((
        posted.budget.map(|v| Extension(RateHeaders(vec![v]))),
        answer,
    ))
}

/// Deletes a message: anyone's in dev mode (as the original), otherwise the caller's own,
/// or anyone's for a caller holding an admin role.
async fn delete_message(
    caller: Caller,
    client_ip: Option<Extension<ClientIp>>,
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    query: Params,
) -> AppResult<Json<Value>> {
    let id = MessageId::parse(&raw_id).map_err(ApiError::bad_param)?;
    let params = params(query)?;
    let raw_channel = params.get("channel").ok_or_else(|| {
        ApiError::bad_request("missing_channel", "channel query parameter is required")
    })?;
    let channel = channel(raw_channel)?;
    caller.check_channel(&channel)?;
    let owner = caller
        .identity()
        .filter(|identity| !identity.admin)
        .map(|identity| &identity.username);
    // The delete budget is the caller's: its user, or with auth off its address.
    let by = match caller.identity() {
        Some(identity) => identity.username.to_string(),
        None => client_ip.map_or_else(|| "unknown".to_string(), |ip| ip.0.0.to_string()),
    };
    state.chat.delete(&channel, &id, owner, &by).await?;
    Ok(Json(json!({
        "success": true,
        "message": "Message deleted successfully",
        "data": null,
    })))
}

/// `GET /api/me`: who the token says the caller is (404 with auth off: there is no caller).
async fn me(caller: Caller) -> AppResult<Json<Value>> {
    let identity = caller.identity().ok_or(ApiError::NotFound(
        "authentication is off: there is no caller identity",
    ))?;
    let expires_at =
        chrono::DateTime::from_timestamp(i64::try_from(identity.expires_at).unwrap_or(i64::MAX), 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let channels = match &identity.channels {
        crate::auth::ChannelAccess::All => Value::Null,
        crate::auth::ChannelAccess::Only(set) => {
            let mut list: Vec<&String> = set.iter().collect();
            list.sort();
            json!(list)
        }
    };
    Ok(Json(json!({
        "username": identity.username.as_str(),
        "roles": identity.roles,
        "admin": identity.admin,
        "channels": channels,
        "expires_at": expires_at,
    })))
}
