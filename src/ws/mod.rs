//! WebSocket: the upgrade handler (every check happens before the 101) and the session loop.

pub mod gate;
pub mod protocol;
pub mod session;
pub mod upgrade;

use std::collections::HashMap;
use std::net::IpAddr;

use std::time::Duration;

use axum::extract::{Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use crate::auth::{AuthError, Identity, SUBPROTOCOL, Surface};
use crate::chat::model::{ChannelName, MessageId, Username};
use crate::error::{ApiError, AppResult};
use crate::http::caller::{ClaimedUser, claimed_user};
use crate::http::client_ip::ClientIp;
use crate::state::AppState;
use gate::Gate;

/// `GET /ws/chat?channel=[&username=]`: checks the Origin, authenticates, validates and
/// joins the channel (bus subscription and presence confirmed), then upgrades. Any
/// failure is an HTTP error and no 101: a client that sees the socket open is already
/// receiving the channel's events.
pub async fn connect_chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    client_ip: Option<axum::Extension<ClientIp>>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ws: upgrade::Upgrade,
) -> AppResult<Response> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    let client_ip = client_ip.map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.0);
    if let Err(reason) = state.origins.check(&headers) {
        tracing::warn!(reason, %client_ip, "WebSocket refused: origin");
        crate::metrics::auth_rejected("origin_not_allowed");
        return Err(ApiError::forbidden("origin_not_allowed", reason));
    }
    // Per-IP rate and caps before the token is even looked at: verifying costs more than
    // counting.
    let permit = match &state.limits {
        None => None,
        Some(limits) => {
            let verdict = limits.connect(client_ip);
            if !verdict.allowed {
                tracing::warn!(%client_ip, limit = "connects", "WebSocket refused: rate limited");
                crate::metrics::rate_limited("connects");
                return Err(ApiError::RateLimited(verdict));
            }
            Some(limits.admit(client_ip).map_err(|refusal| {
                tracing::warn!(%client_ip, ?refusal, "WebSocket refused: connection cap");
                crate::metrics::rate_limited("connection_cap");
                ApiError::TooManyConnections(refusal)
            })?)
        }
    };
    let identity = match &state.auth {
        None => None,
        Some(auth) => {
            let verified = match auth.token(&headers, raw_query.as_deref(), Surface::WebSocket) {
                Ok(token) => auth.verify(&token).await,
                Err(e) => Err(e),
            };
            match verified {
                // A token inside the leeway verifies, but a session on it would end at once.
                Ok(identity) if identity.remaining().is_zero() => {
                    return Err(ApiError::Unauthorized(AuthError::InvalidToken(
                        "token expired",
                    )));
                }
                Ok(identity) => Some(identity),
                Err(e) => {
                    tracing::warn!(reason = %e, code = e.code(), %client_ip, "WebSocket refused: authentication failed");
                    crate::metrics::auth_rejected(e.code());
                    return Err(ApiError::Unauthorized(e));
                }
            }
        }
    };
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let username = identify(identity.as_ref(), params.get("username"))?;
    let permit = permit
        .map(|p| p.for_user(username.as_str()))
        .transpose()
        .map_err(|refusal| {
            tracing::warn!(%client_ip, ?refusal, "WebSocket refused: connection cap");
            crate::metrics::rate_limited("connection_cap");
            ApiError::TooManyConnections(refusal)
        })?;
    let channel = match params.get("channel") {
        Some(channel) => ChannelName::parse(channel).map_err(ApiError::bad_param)?,
        None => ChannelName::general(),
    };
    let since =
        match params.get("since") {
            Some(id) => Some(MessageId::parse(id).map_err(|e| {
                ApiError::bad_request("invalid_since", format!("since: {}", e.detail))
            })?),
            None => None,
        };
    if identity.as_ref().is_some_and(|i| !i.may_use(&channel)) {
        return Err(ApiError::forbidden(
            "channel_forbidden",
            format!("your token does not allow channel {channel}"),
        ));
    }
    // The join runs as its own task: if the client gives up (or the request times out)
    // while it waits on Redis, this handler is dropped but the join still completes, and
    // dropping the unused connection then undoes it. Cancelling the join half-way could
    // leave a member and presence behind.
    let chat = state.chat.clone();
    let connection = state
        .sessions
        .spawn(async move { chat.connect(username, channel).await }.in_current_span())
        .await
        .map_err(|e| ApiError::Internal(format!("join task failed: {e}")))??;
    let ws_config = &state.config.ws;
    let mut settings = state.session.clone();
    settings.client_ip = Some(client_ip);
    let shutdown = state.shutdown.clone();
    let alive = state.sessions.token();
    let expires_in = identity.as_ref().map(Identity::remaining);
    let session_span = tracing::info_span!(
        parent: None,
        "ws.session",
        channel = %connection.channel,
        user = %connection.username,
        client_ip = %client_ip,
        trace_id = tracing::field::Empty,
    );
    if let Some(trace_id) = crate::telemetry::trace_id(&session_span) {
        session_span.record("trace_id", trace_id);
    }
    // Follows from the upgrade request (whose trace the client may have started).
    session_span.follows_from(tracing::Span::current());
    // Reads go through the payload gate; the library's own caps stay as the hard limit.
    let config = WebSocketConfig::default()
        .read_buffer_size(ws_config.read_buffer_bytes)
        .write_buffer_size(ws_config.write_buffer_bytes)
        .max_write_buffer_size(ws_config.max_write_buffer_bytes)
        .max_message_size(Some(ws_config.max_message_bytes))
        .max_frame_size(Some(ws_config.max_message_bytes));
    let payloads = state.payloads.clone();
    let max_message = ws_config.max_message_bytes;
    let message_timeout = Duration::from_secs(state.config.memory.large_message_timeout_secs);
    let sessions = state.sessions.clone();
    // Only chatgate.v1 can be selected: the token entry is never echoed back.
    Ok(ws.respond(
        &[SUBPROTOCOL],
        |task| {
            sessions.spawn(task);
        },
        move |io| {
            let open = crate::metrics::OpenConnection::opened();
            async move {
                let (io, gate) = Gate::new(io, payloads, max_message, message_timeout);
                let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                let mut settings = settings;
                settings.gate = gate;
                let reason =
                    session::run(socket, connection, settings, shutdown, expires_in, since)
                        .instrument(session_span)
                        .await;
                open.closed(reason);
                drop((alive, permit));
            }
        },
    ))
}

/// The connection's user: the token's (a `username` parameter naming anyone else is
/// refused with 403), or with auth off the required `username` parameter.
fn identify(identity: Option<&Identity>, claimed: Option<&String>) -> AppResult<Username> {
    claimed_user(identity, claimed.map(String::as_str)).map_err(|e| match e {
        ClaimedUser::Mismatch => ApiError::forbidden(
            "username_mismatch",
            "username must be the token's user (or be left out)",
        ),
        ClaimedUser::Invalid(e) => ApiError::bad_param(e),
        ClaimedUser::Missing => ApiError::bad_request("missing_username", "username is required"),
    })
}
