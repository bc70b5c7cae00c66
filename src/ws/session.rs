//! One WebSocket session: a single `select!` loop that owns the socket.
//!
//! It waits on, in priority order: the hub's "too slow" kick, shutdown (then a staggered
//! close), the outbound queue (frames written in batches, one flush per batch), inbound
//! frames, and the heartbeat. Every inbound problem gets an error frame and the loop goes
//! on reading; only an oversized message (1009), a slow reader (1013), a silent peer
//! (4000), shutdown (1001) or a broken socket end it. The loop is generic over the socket,
//! so it does not depend on how the connection was upgraded.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::gate::{GateHandle, GateRefusal};
use super::protocol::{ClientFrame, FrameCaps};
use crate::chat::event::ServerFrame;
use crate::chat::model::MessageId;
use crate::chat::{ChatError, Connection};
use crate::limits::Limits;
use crate::limits::payload::{PayloadBudget, PayloadPermit};

/// Close codes sent by the server (documented in docs/protocol.md).
pub mod close_code {
    /// Server shutting down: reconnect (with backoff and jitter).
    pub const GOING_AWAY: u16 = 1001;
    /// A message over `ws.max_message_bytes`, or a frame other than an image or audio
    /// message over `ws.max_frame_bytes` (after an error frame `frame_too_large`).
    pub const TOO_BIG: u16 = 1009;
    /// The client did not read its frames fast enough (its queue filled up).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Policy violation: the bearer token expired (an error frame `token_expired` comes
    /// first). Reconnect with a fresh token.
    pub const POLICY: u16 = 1008;
    /// Close reason used with [`POLICY`] for a client that keeps sending past its rate
    /// limit (`limits.ws_close_after_refused` refusals in a row).
    pub const RATE_LIMIT_REASON: &str = "rate limit exceeded";
    /// Close reason used with [`POLICY`] for a client whose last
    /// `limits.ws_close_after_refused` frames in a row were all refused, the last one as
    /// invalid.
    pub const INVALID_FRAMES_REASON: &str = "too many refused frames";
    /// Nothing heard from the client (not even a pong) within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
}

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 64;

/// Per-session timing, from `[ws]` and `[server]` config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub write_timeout: Duration,
    /// Longest time a frame waits in the write buffer for others to share its write.
    pub write_delay: Duration,
    /// Sessions close at a random moment within this window after shutdown starts.
    pub drain_window: Duration,
    /// Message and typing limits; `None` when limits are off.
    pub limits: Option<Arc<Limits>>,
    /// The session's client address (set per session), penalized when the session is
    /// closed for refused frames.
    pub client_ip: Option<std::net::IpAddr>,
    /// The process's budget of large payloads: large frames hold it while they are
    /// written.
    pub payloads: Arc<PayloadBudget>,
    /// Size caps by frame kind.
    pub caps: FrameCaps,
    /// The session's read gate (set per session): the permits of large inbound messages,
    /// and why reading stopped when the gate stopped it.
    pub gate: GateHandle,
}

enum Step {
    Continue,
    /// End the session, for this reason (the `reason` label of
    /// `chatgate_connections_closed_total`).
    Stop(&'static str),
}

/// Runs the session until it ends, then leaves the channel. Returns why it ended.
pub async fn run<S>(
    socket: S,
    mut conn: Connection,
    settings: SessionSettings,
    shutdown: CancellationToken,
    expires_in: Option<Duration>,
    since: Option<MessageId>,
) -> &'static str
where
    S: Stream<Item = Result<Message, Error>> + Sink<Message, Error = Error> + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    // What the client missed comes first; live events wait in the outbox meanwhile (a
    // message published between the join and this read can come twice: once here, once
    // live; clients de-duplicate by message_id).
    if let Some(since) = since
        && let Step::Stop(why) = replay(&mut sink, &conn, &since, &settings).await
    {
        conn.close().await;
        return why;
    }
    let mut ping = tokio::time::interval_at(
        Instant::now() + settings.ping_interval,
        settings.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let drain = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(drain);
    let mut draining = false;
    // The first frame of a batch waits here at most `write_delay`, so frames arriving close
    // together leave in one write.
    let flush = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(flush);
    let mut held: Option<bytes::Bytes> = None;
    // Messages refused by the rate limit in a row.
    let mut refused = 0u32;
    // The token's expiry ends the session: a session must not outlive its credential.
    let expiry = tokio::time::sleep(expires_in.unwrap_or(Duration::MAX / 4));
    tokio::pin!(expiry);

    let reason = loop {
        // Not biased: inbound frames, outbound frames and timers get fair turns, so a
        // busy channel cannot starve a client's own sends (or the other way round).
        let step = tokio::select! {
            () = conn.kick.cancelled() => {
                close(&mut sink, close_code::TRY_AGAIN_LATER, "too slow: read your messages faster", &settings).await;
                Step::Stop("too_slow")
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                let delay = settings.drain_window.mul_f64(fastrand::f64());
                drain.as_mut().reset(Instant::now() + delay);
                Step::Continue
            }
            () = &mut drain, if draining => {
                // Frames already queued (acks among them) leave before the close.
                let pending = held.take().or_else(|| conn.outbound.try_recv());
                if let Some(first) = pending {
                    write_batch(&mut sink, &mut conn, first, &settings).await;
                }
                close(&mut sink, close_code::GOING_AWAY, "server shutting down, reconnect", &settings).await;
                Step::Stop("going_away")
            }
            () = &mut expiry => {
                let frame = ServerFrame::error(
                    "token_expired",
                    "your token expired: reconnect with a fresh token",
                );
                let _ = send_frame(&mut sink, &frame, &settings).await;
                close(&mut sink, close_code::POLICY, "token expired", &settings).await;
                Step::Stop("token_expired")
            }
            () = &mut flush, if held.is_some() => {
                match held.take() {
                    Some(first) => write_batch(&mut sink, &mut conn, first, &settings).await,
                    None => Step::Continue,
                }
            }
            // While a frame is held, the queue is not polled: frames arriving meanwhile do
            // not wake this task, and all leave together when the delay ends.
            frame = conn.outbound.recv(), if held.is_none() => match frame {
                Some(first) if settings.write_delay.is_zero() => {
                    write_batch(&mut sink, &mut conn, first, &settings).await
                }
                Some(first) => {
                    held = Some(first);
                    flush.as_mut().reset(Instant::now() + settings.write_delay);
                    Step::Continue
                }
                None => Step::Stop("error"),
            },
            inbound = stream.next() => {
                last_heard = Instant::now();
                // A large message's budget permits: held until it is handled.
                let permit = settings.gate.take_permit();
                match inbound {
                    None => Step::Stop("client_closed"),
                    Some(Ok(message)) => handle(&mut sink, &mut conn, message, permit, &settings, &mut refused).await,
                    Some(Err(e)) => {
                        if let Some(why) = settings.gate.refusal() {
                            refused_by_gate(&mut sink, why, &settings).await
                        } else if is_too_big(&e) {
                            close(&mut sink, close_code::TOO_BIG, "message too big", &settings).await;
                            Step::Stop("too_big")
                        } else {
                            Step::Stop("error")
                        }
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > settings.ping_interval + settings.pong_timeout {
                    close(&mut sink, close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout", &settings).await;
                    Step::Stop("heartbeat_timeout")
                } else {
                    send(&mut sink, Message::Ping(Default::default()), &settings).await
                }
            }
        };
        if let Step::Stop(why) = step {
            break why;
        }
    };
    conn.close().await;
    reason
}

fn is_too_big(error: &Error) -> bool {
    matches!(error, Error::Capacity(_))
}

/// The read gate stopped reading: say why, then close with 1013 (the message in progress
/// is lost; the client sends it again later).
async fn refused_by_gate<S>(sink: &mut S, why: GateRefusal, settings: &SessionSettings) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    let (frame, reason, stop) = match why {
        GateRefusal::Busy(retry_after) => (
            ServerFrame::Error {
                code: "server_busy",
                detail: "too many large messages in flight on this server: send it again after retry_after_ms".into(),
                retry_after_ms: Some(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)),
                client_id: None,
            },
            "server busy",
            "server_busy",
        ),
        GateRefusal::TooSlow => (
            ServerFrame::error(
                "message_too_slow",
                "a large message took too long to arrive",
            ),
            "message too slow",
            "message_too_slow",
        ),
    };
    let _ = send_frame(sink, &frame, settings).await;
    close(sink, close_code::TRY_AGAIN_LATER, reason, settings).await;
    Step::Stop(stop)
}

async fn handle<S>(
    sink: &mut S,
    conn: &mut Connection,
    message: Message,
    permit: PayloadPermit,
    settings: &SessionSettings,
    refused: &mut u32,
) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    let text = match message {
        Message::Text(text) => text,
        Message::Binary(_) => {
            let frame = ServerFrame::error(
                "unsupported_binary",
                "binary frames are not supported; send JSON text frames",
            );
            return refuse(sink, frame, Refusal::Invalid, settings, refused).await;
        }
        // Pongs only prove liveness; pings are answered by the protocol layer.
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Step::Continue,
        Message::Close(_) => {
            // The protocol layer queued the close reply; write it before leaving.
            let _ = timeout(settings.write_timeout, sink.close()).await;
            return Step::Stop("client_closed");
        }
    };
    // A large frame is parsed on the blocking pool; the frame's own bytes go with it and
    // are dropped there: only its permits stay until the message is stored (they cover
    // the copies made on the way).
    let caps = settings.caps;
    let parsed = crate::chat::offload(text.len() > caps.small, move || {
        ClientFrame::parse(text.as_str(), caps).map(ClientFrame::into_owned)
    })
    .await;
    let (content, message_type, client_id) = match parsed {
        Ok(ClientFrame::Message {
            content,
            message_type,
            client_id,
        }) => (
            content.into_owned(),
            message_type.into_owned(),
            client_id.map(std::borrow::Cow::into_owned),
        ),
        Ok(typing @ (ClientFrame::TypingStart | ClientFrame::TypingStop)) => {
            let on = matches!(typing, ClientFrame::TypingStart);
            return typing_frame(sink, conn, on, settings, refused).await;
        }
        Err(e) if e.code == "frame_too_large" => {
            // Padding a small frame kind to a media's size is never a mistake a client
            // makes twice: say why, close with 1009, and bar the address like a flood.
            crate::metrics::message_refused(e.code);
            let _ = send_frame(sink, &ServerFrame::error(e.code, e.detail), settings).await;
            if let (Some(limits), Some(ip)) = (&settings.limits, settings.client_ip) {
                limits.penalize(ip);
            }
            close(sink, close_code::TOO_BIG, "frame too large", settings).await;
            return Step::Stop("frame_too_large");
        }
        Err(e) => {
            crate::metrics::message_refused(e.code);
            let frame = ServerFrame::error(e.code, e.detail);
            return refuse(sink, frame, Refusal::Invalid, settings, refused).await;
        }
    };
    // Each message is a trace of its own (a session lives too long to be one).
    let span = tracing::debug_span!(
        parent: None,
        "chat.send",
        transport = "ws",
        channel = %conn.channel,
        message_type = tracing::field::Empty,
        content_bytes = content.len(),
        outcome = tracing::field::Empty,
    );
    let result = conn
        .post(content, &message_type, client_id.as_deref())
        .instrument(span)
        .await;
    drop(permit);
    let error = match result {
        Ok(_) => {
            crate::metrics::message_received("ws");
            *refused = 0;
            return Step::Continue;
        }
        Err(e) => e,
    };
    let why = match &error {
        ChatError::Limited(_) => Some(Refusal::RateLimited),
        ChatError::Invalid(_) => Some(Refusal::Invalid),
        _ => None,
    };
    let frame = error_frame(conn, error).for_client(client_id);
    match why {
        Some(why) => refuse(sink, frame, why, settings, refused).await,
        None => send_frame(sink, &frame, settings).await,
    }
}

/// A typing frame: over the typing rate it is dropped (no frame: typing is best-effort)
/// but counts as refused, so a client flooding typing is closed like any other flood.
async fn typing_frame<S>(
    sink: &mut S,
    conn: &mut Connection,
    on: bool,
    settings: &SessionSettings,
    refused: &mut u32,
) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    if let Some(limits) = &settings.limits
        && !limits.typing(conn.username.as_str())
    {
        crate::metrics::rate_limited("typing");
        return match count_refusal(sink, Refusal::RateLimited, settings, refused).await {
            Some(step) => step,
            None => Step::Continue,
        };
    }
    // An accepted typing event does not reset the count: a socket alternating typing
    // and refused messages is still refusing.
    match conn.typing(on).await {
        Ok(()) => Step::Continue,
        Err(e) => send_frame(sink, &error_frame(conn, e), settings).await,
    }
}

/// The error frame for a failed chat operation.
fn error_frame(conn: &Connection, error: ChatError) -> ServerFrame {
    let code = error.code();
    match error {
        ChatError::Invalid(e) => ServerFrame::error(e.code, e.detail),
        ChatError::NotFound(what) => ServerFrame::error(code, what),
        e @ ChatError::NotOwner => ServerFrame::error(code, e.to_string()),
        ChatError::Limited(verdict) => ServerFrame::Error {
            code,
            detail: match code {
                "media_quota_exceeded" => {
                    "media quota exceeded: wait retry_after_ms before sending more images or audio"
                }
                _ => "too many messages: wait retry_after_ms before sending again",
            }
            .into(),
            retry_after_ms: Some(
                u64::try_from(verdict.retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
            client_id: None,
        },
        e @ ChatError::StorageFull => ServerFrame::Error {
            code,
            detail: e.to_string(),
            retry_after_ms: Some(
                u64::try_from(crate::chat::service::STORAGE_FULL_RETRY.as_millis())
                    .unwrap_or(u64::MAX),
            ),
            client_id: None,
        },
        ChatError::Unavailable(cause) => {
            tracing::warn!(channel = %conn.channel, error = %cause, "frame failed: store unavailable");
            ServerFrame::Error {
                code,
                detail: "chat store unavailable; not sent, try again".into(),
                retry_after_ms: Some(1000),
                client_id: None,
            }
        }
    }
}

/// Sends the channel's messages newer than `since`, then a `resumed` frame saying
/// whether that was the whole gap.
async fn replay<S>(
    sink: &mut S,
    conn: &Connection,
    since: &MessageId,
    settings: &SessionSettings,
) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    let (messages, complete) = match conn.messages_since(since).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(channel = %conn.channel, error = %e, "replay failed");
            (Vec::new(), false)
        }
    };
    let replayed = messages.len();
    for message in messages {
        if let Step::Stop(why) = send_frame(sink, &ServerFrame::Message(message), settings).await {
            return Step::Stop(why);
        }
    }
    let done = ServerFrame::Resumed {
        since: since.to_string(),
        replayed,
        complete,
    };
    send_frame(sink, &done, settings).await
}

/// Why a frame was refused, for the close reason when refusals pile up.
enum Refusal {
    RateLimited,
    Invalid,
}

/// Answers a refused frame with `frame`; with limits on, `limits.ws_close_after_refused`
/// refusals in a row (rate-limited or invalid frames alike) close the socket with 1008.
async fn refuse<S>(
    sink: &mut S,
    frame: ServerFrame,
    why: Refusal,
    settings: &SessionSettings,
    refused: &mut u32,
) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    match count_refusal(sink, why, settings, refused).await {
        Some(step) => step,
        None => send_frame(sink, &frame, settings).await,
    }
}

/// Counts one refused frame; `Some` when that closed the socket (with 1008, after the
/// client address was penalized).
async fn count_refusal<S>(
    sink: &mut S,
    why: Refusal,
    settings: &SessionSettings,
    refused: &mut u32,
) -> Option<Step>
where
    S: Sink<Message, Error = Error> + Unpin,
{
    let limits = settings.limits.as_ref()?;
    *refused += 1;
    if *refused < limits.refusals_before_close {
        return None;
    }
    let reason = match why {
        Refusal::RateLimited => close_code::RATE_LIMIT_REASON,
        Refusal::Invalid => close_code::INVALID_FRAMES_REASON,
    };
    // Before the close frame, so a reconnect right after it is already refused.
    if let Some(ip) = settings.client_ip {
        limits.penalize(ip);
    }
    close(sink, close_code::POLICY, reason, settings).await;
    Some(Step::Stop("policy"))
}

/// Writes `first` and whatever else is queued (up to [`WRITE_BATCH`] frames), then
/// flushes: the frames leave in as few writes as the write buffer allows.
async fn write_batch<S>(
    sink: &mut S,
    conn: &mut Connection,
    first: bytes::Bytes,
    settings: &SessionSettings,
) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    let write = async {
        feed_frame(sink, first, settings).await?;
        for _ in 1..WRITE_BATCH {
            match conn.outbound.try_recv() {
                Some(frame) => feed_frame(sink, frame, settings).await?,
                None => break,
            }
        }
        sink.flush().await
    };
    match timeout(settings.write_timeout, write).await {
        Ok(Ok(())) => Step::Continue,
        _ => Step::Stop("error"),
    }
}

/// Queues one frame for writing. A large one holds the payload budget while it sits in
/// the write buffer (the library copies each frame there, once per connection), so a big
/// image fanned out to many members cannot hold more than the budget at once; it leaves
/// in a write of its own.
async fn feed_frame<S>(
    sink: &mut S,
    frame: bytes::Bytes,
    settings: &SessionSettings,
) -> Result<(), Error>
where
    S: Sink<Message, Error = Error> + Unpin,
{
    if frame.len() <= settings.payloads.small() {
        return sink.feed(text_message(frame)).await;
    }
    sink.flush().await?;
    // Bounded by the caller's write timeout.
    let permit = settings.payloads.acquire_queued(frame.len()).await;
    sink.feed(text_message(frame)).await?;
    let flushed = sink.flush().await;
    drop(permit);
    flushed
}

fn text_message(frame: bytes::Bytes) -> Message {
    // Frames come from serde_json, so they are UTF-8; a failure would be a bug upstream.
    match Utf8Bytes::try_from(frame) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Text(Utf8Bytes::from_static(
            r#"{"type":"error","code":"internal","detail":"frame encoding error"}"#,
        )),
    }
}

async fn send_frame<S>(sink: &mut S, frame: &ServerFrame, settings: &SessionSettings) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    send(sink, Message::Text(frame.to_json().into()), settings).await
}

async fn send<S>(sink: &mut S, message: Message, settings: &SessionSettings) -> Step
where
    S: Sink<Message, Error = Error> + Unpin,
{
    match timeout(settings.write_timeout, sink.send(message)).await {
        Ok(Ok(())) => Step::Continue,
        _ => Step::Stop("error"),
    }
}

async fn close<S>(sink: &mut S, code: u16, reason: &'static str, settings: &SessionSettings)
where
    S: Sink<Message, Error = Error> + Unpin,
{
    let frame = CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = timeout(
        settings.write_timeout.min(Duration::from_secs(2)),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
}
