//! REST handlers, with the original's paths and response shapes.

use std::collections::HashMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::chat::model::{ChannelName, DEFAULT_CHANNEL, MessageId};
use crate::chat::{ChatError, Draft};
use crate::error::{ApiError, AppResult};
use crate::http::caller::Caller;
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

/// `axum::Json` whose rejections use the app's error format: 413 for an oversized body,
/// 400 for everything else (bad JSON, missing or mistyped fields, wrong content type).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                code: "payload_too_large",
                detail: "request body too large".into(),
            }
        } else {
            ApiError::bad_request(
                "invalid_request",
                format!("Invalid request format: {}", rejection.body_text()),
            )
        }
    }
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
/// (the token names the sender) and must match the token when given.
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

async fn send_message(
    caller: Caller,
    State(state): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> AppResult<(Option<Extension<RateHeaders>>, Json<Value>)> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "Invalid request format: the body must be a JSON object",
        ));
    }
    let body: SendMessageBody = serde_json::from_value(body).map_err(|e| {
        ApiError::bad_request("invalid_request", format!("Invalid request format: {e}"))
    })?;
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
    let (verdict, message) = async {
        // The sender's message budget, shared with its WebSocket sends, before the
        // content is checked: every attempt costs one, so invalid (and expensive) content
        // is paced too.
        let verdict = match &state.limits {
            Some(limits) => {
                let verdict = limits.message_attempt(sender.as_str()).await;
                if !verdict.allowed {
                    return Err(ApiError::RateLimited(verdict));
                }
                Some(Extension(RateHeaders(vec![verdict])))
            }
            None => None,
        };
        let draft = tracing::debug_span!("chat.validate")
            .in_scope(|| Draft::parse(body.content, message_type, state.chat.limits()))
            .map_err(|e| {
                crate::metrics::message_refused(e.code);
                tracing::Span::current().record("outcome", e.code);
                ChatError::from(e)
            })?;
        tracing::Span::current().record("message_type", draft.message_type());
        let message = state
            .chat
            .send(&sender, &channel, draft, None)
            .await
            .inspect_err(|_| {
                crate::metrics::message_refused("store_unavailable");
                tracing::Span::current().record("outcome", "failed");
            })?;
        tracing::Span::current().record("outcome", "sent");
        crate::metrics::message_received("rest");
        Ok((verdict, message))
    }
    .instrument(span)
    .await?;
    Ok((
        verdict,
        Json(json!({
            "success": true,
            "message": "Message sent successfully",
            "data": message,
        })),
    ))
}

/// Deletes a message: anyone's in dev mode (as the original), otherwise the caller's own,
/// or anyone's for a caller holding an admin role.
async fn delete_message(
    caller: Caller,
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
    state.chat.delete(&channel, &id, owner).await?;
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
