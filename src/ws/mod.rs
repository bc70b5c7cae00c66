//! WebSocket: the upgrade handler (every check happens before the 101) and the session loop.

pub mod protocol;
pub mod session;

use std::collections::HashMap;

use axum::extract::{Query, State, WebSocketUpgrade};
use axum::response::Response;

use crate::chat::model::{ChannelName, Username};
use crate::error::{ApiError, AppResult};
use crate::state::AppState;

/// `GET /ws/chat?username=&channel=`: validates, joins the channel (bus subscription and
/// presence confirmed), then upgrades. Any failure is an HTTP error and no 101: a client
/// that sees the socket open is already receiving the channel's events.
pub async fn connect_chat(
    State(state): State<AppState>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ws: WebSocketUpgrade,
) -> AppResult<Response> {
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let username = params
        .get("username")
        .ok_or_else(|| ApiError::bad_request("missing_username", "username is required"))?;
    let username = Username::parse(username).map_err(ApiError::bad_param)?;
    let channel = match params.get("channel") {
        Some(channel) => ChannelName::parse(channel).map_err(ApiError::bad_param)?,
        None => ChannelName::general(),
    };
    if state.shutdown.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    // The join runs as its own task: if the client gives up (or the request times out)
    // while it waits on Redis, this handler is dropped but the join still completes, and
    // dropping the unused connection then undoes it. Cancelling the join half-way could
    // leave a member and presence behind.
    let chat = state.chat.clone();
    let connection = state
        .sessions
        .spawn(async move { chat.connect(username, channel).await })
        .await
        .map_err(|e| ApiError::Internal(format!("join task failed: {e}")))??;
    let ws_config = &state.config.ws;
    let settings = state.session.clone();
    let shutdown = state.shutdown.clone();
    let alive = state.sessions.token();
    Ok(ws
        .read_buffer_size(ws_config.read_buffer_bytes)
        .write_buffer_size(ws_config.write_buffer_bytes)
        .max_write_buffer_size(ws_config.max_write_buffer_bytes)
        .max_message_size(ws_config.max_message_bytes)
        .max_frame_size(ws_config.max_message_bytes)
        .on_upgrade(move |socket| async move {
            session::run(socket, connection, settings, shutdown).await;
            drop(alive);
        }))
}
