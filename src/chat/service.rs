//! The chat service: every way in (WebSocket frames, REST calls) goes through here.
//!
//! Order of work for a message: validate (types from [`super::model`]) → build the stored
//! entry and the bus event → one atomic store call that appends and publishes. The event
//! then reaches every replica's hub, the sender's included: the sender's echo (with its
//! `message_id`) is its acknowledgement, and it arrives in history order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::event::{Echo, Envelope, Origin, ServerFrame};
use super::model::{
    ChannelName, ChatMessage, MessageId, MessageType, Timestamp, Username, ValidationError,
};
use crate::bus::Bus;
use crate::bus::hub::{Hub, Member, Outbox, outbox};
use crate::content::{MediaKind, MediaLimits};
use crate::limits::{Limits, Verdict};
use crate::store::{Appended, Capacity, Deleted, NewEntry, PresenceMember, Store, StoreError};

/// Why a chat operation failed. Maps to a REST status and a WebSocket error code.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The input breaks a documented rule; safe to show.
    #[error("{0}")]
    Invalid(ValidationError),
    /// The message or resource does not exist.
    #[error("{0}")]
    NotFound(&'static str),
    /// The message belongs to someone else.
    #[error("you can delete only your own messages")]
    NotOwner,
    /// Redis (store or bus) failed; the cause is for logs only.
    #[error("chat store unavailable: {0}")]
    Unavailable(String),
    /// Over a budget of the sender's (messages, media bytes, new channels, deletes); the
    /// verdict's policy names which.
    #[error("over the {} budget", .0.policy.name)]
    Limited(Verdict),
    /// The store is nearly full: new media is refused until it has room again.
    #[error("the chat store is nearly full: media is refused for now")]
    StorageFull,
}

impl ChatError {
    /// The stable code a client sees (REST `code`, WebSocket error frame `code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(e) => e.code,
            Self::NotFound(_) => "not_found",
            Self::NotOwner => "not_owner",
            Self::Unavailable(_) => "store_unavailable",
            Self::Limited(verdict) => limited_code(verdict),
            Self::StorageFull => "storage_full",
        }
    }
}

/// The code of a refusal by a budget, from the budget's policy.
pub fn limited_code(verdict: &Verdict) -> &'static str {
    match verdict.policy.name {
        "media" => "media_quota_exceeded",
        _ => "rate_limited",
    }
}

impl From<ValidationError> for ChatError {
    fn from(e: ValidationError) -> Self {
        Self::Invalid(e)
    }
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(e.0)
    }
}

/// Content and size rules, from `[chat]` and `[ws]` config.
#[derive(Debug, Clone)]
pub struct ChatLimits {
    pub history_default_limit: usize,
    pub history_max_limit: usize,
    /// Byte budget of one history answer (the newest messages that fit).
    pub history_max_bytes: usize,
    pub max_text_bytes: usize,
    pub media: MediaLimits,
    /// Frames that may wait for one session.
    pub outbound_queue: usize,
    /// Bytes of frames that may wait for one session.
    pub outbound_queue_bytes: usize,
    /// How often this replica refreshes its connections' presence.
    pub presence_refresh: Duration,
}

/// Validated message content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    content: String,
    message_type: MessageType,
}

impl Draft {
    /// The validated type (`text`, `image` or `audio`).
    pub fn message_type(&self) -> &'static str {
        self.message_type.as_str()
    }

    /// Image or audio: counted against the sender's media bytes.
    pub fn is_media(&self) -> bool {
        self.message_type != MessageType::Text
    }
}

/// A message accepted by [`ChatService::post`], with the sender's message budget after it
/// (for RateLimit headers).
#[derive(Debug)]
pub struct Posted {
    pub message: Stored,
    pub budget: Option<Verdict>,
}

/// A stored message as history holds it: its id, and the JSON of the original's
/// `Message` shape (`sender, content, channel, message_type, timestamp, message_id`).
#[derive(Debug, Clone)]
pub struct Stored {
    pub message_id: String,
    pub entry: String,
}

impl Draft {
    /// Checks content against its type and puts it in its stored form (see
    /// [`crate::content`]): text is sanitized into an HTML-safe fragment within
    /// `max_text_bytes`; image and audio content must be a strict base64 data URL of an
    /// allowed type whose bytes match it, within the size and dimension limits.
    ///
    /// # Errors
    /// `invalid_message_type`, `empty_content`, or a content code (`invalid_content`,
    /// `content_too_large`, `invalid_media`, `media_type_not_allowed`,
    /// `media_type_mismatch`, `media_too_large`, `media_dimensions_too_large`).
    pub fn parse(
        content: String,
        message_type: &str,
        limits: &ChatLimits,
    ) -> Result<Self, ValidationError> {
        let message_type = MessageType::parse(message_type)?;
        if content.is_empty() {
            return Err(ValidationError::new(
                "empty_content",
                "content must not be empty",
            ));
        }
        let refused = |e: crate::content::ContentError| ValidationError::new(e.code(), e.detail());
        let content = match message_type {
            MessageType::Text => {
                crate::content::check_text(&content, limits.max_text_bytes).map_err(refused)?
            }
            MessageType::Image | MessageType::Audio => {
                let kind = if message_type == MessageType::Image {
                    MediaKind::Image
                } else {
                    MediaKind::Audio
                };
                crate::content::check_media(kind, &content, &limits.media).map_err(refused)?;
                content
            }
        };
        Ok(Self {
            content,
            message_type,
        })
    }
}

/// One entry of `GET /api/users/online/{channel}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OnlineUser {
    pub username: String,
    pub status: &'static str,
    pub last_seen: Timestamp,
}

/// Messages read first when a client resumes (`since=`); the whole history window is
/// read only when its last seen message is older.
const RESUME_FIRST_PAGE: usize = 50;

/// How long a client should wait before sending media again after `storage_full`.
pub const STORAGE_FULL_RETRY: Duration = Duration::from_secs(30);

/// Channels whose presence is refreshed at the same time (one Redis call each).
const REFRESH_CONCURRENCY: usize = 16;

pub struct ChatService {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    hub: Arc<Hub>,
    limits: ChatLimits,
    /// The sender budgets (messages, media bytes, new channels, deletes); `None` when
    /// `limits.enabled` is false.
    budgets: Option<Arc<Limits>>,
    /// Whether the store has room for new media.
    capacity: Arc<Capacity>,
    /// Spawns the cleanup of connections dropped without [`Connection::close`].
    tracker: TaskTracker,
    next_conn: AtomicU64,
}

/// A live membership of one session in one channel. Close it with [`Connection::close`];
/// if it is dropped instead (panic, failed upgrade), the cleanup runs in the background.
pub struct Connection {
    service: Arc<ChatService>,
    pub conn: u64,
    pub username: Username,
    pub channel: ChannelName,
    conn_key: String,
    /// Frames for this session, filled by the hub.
    pub outbound: Outbox,
    /// Cancelled when the hub finds this session too slow.
    pub kick: CancellationToken,
    typing: bool,
    closed: bool,
}

impl ChatService {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        hub: Arc<Hub>,
        limits: ChatLimits,
        budgets: Option<Arc<Limits>>,
        capacity: Arc<Capacity>,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            store,
            bus,
            hub,
            limits,
            budgets,
            capacity,
            tracker,
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn limits(&self) -> &ChatLimits {
        &self.limits
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    fn origin(&self, conn: u64) -> Origin<'_> {
        Origin {
            replica: self.hub.replica().into(),
            conn,
        }
    }

    /// The one send use case, for every face: the sender's message budget (every attempt
    /// costs one, so invalid and expensive content is paced like valid content), the
    /// content rules, then for media the store's room and the sender's media bytes, then
    /// [`ChatService::send`] (which charges the sender's channel budget when the message
    /// would create its channel). Records `message_type` and `outcome` on the current span.
    ///
    /// # Errors
    /// [`ChatError::Limited`], [`ChatError::Invalid`], [`ChatError::StorageFull`],
    /// [`ChatError::Unavailable`]; nothing is stored on any of them.
    pub async fn post(
        &self,
        sender: &Username,
        channel: &ChannelName,
        content: String,
        message_type: &str,
        from: Option<(u64, Option<&str>)>,
    ) -> Result<Posted, ChatError> {
        let span = tracing::Span::current();
        let budget = match &self.budgets {
            Some(budgets) => {
                let verdict = budgets.message_attempt(sender.as_str()).await;
                if !verdict.allowed {
                    return Err(ChatError::Limited(verdict));
                }
                Some(verdict)
            }
            None => None,
        };
        let refused = |code: &'static str| {
            crate::metrics::message_refused(code);
            span.record("outcome", code);
        };
        let validate = tracing::debug_span!("chat.validate");
        let limits = self.limits.clone();
        let kind = message_type.to_string();
        let draft = super::offload(content.len() >= super::OFFLOAD_BYTES, move || {
            validate.in_scope(|| Draft::parse(content, &kind, &limits))
        })
        .await
        .inspect_err(|e| refused(e.code))?;
        // Only the validated type: the raw field is client input of any size.
        span.record("message_type", draft.message_type());
        if draft.is_media() && self.capacity.is_full() {
            refused("storage_full");
            return Err(ChatError::StorageFull);
        }
        if draft.is_media()
            && let Some(budgets) = &self.budgets
        {
            let verdict = budgets.media(sender.as_str(), draft.content.len()).await;
            if !verdict.allowed {
                refused("media_quota_exceeded");
                return Err(ChatError::Limited(verdict));
            }
        }
        let message = self
            .send(sender, channel, draft, from)
            .await
            .inspect_err(|e| refused(e.code()))?;
        span.record("outcome", "sent");
        Ok(Posted { message, budget })
    }

    /// Stores a message and publishes it to the channel. `from` is the sending connection
    /// and the client's correlation id, for the echo.
    ///
    /// # Errors
    /// [`ChatError::Unavailable`] when the store fails: then nothing was stored or sent.
    pub async fn send(
        &self,
        sender: &Username,
        channel: &ChannelName,
        draft: Draft,
        from: Option<(u64, Option<&str>)>,
    ) -> Result<Stored, ChatError> {
        let message_id = MessageId::generate().to_string();
        // The content is moved into the entry: one copy of it lives from here on.
        let message = ChatMessage {
            sender: sender.to_string(),
            content: draft.content,
            channel: channel.to_string(),
            message_type: draft.message_type.as_str().to_string(),
            timestamp: Timestamp::now(),
            message_id: message_id.clone(),
        };
        let entry = super::offload(message.content.len() >= super::OFFLOAD_BYTES, move || {
            // Sized up front: grown by doubling, a 14 MB entry would need up to 28 MB.
            let mut json = Vec::with_capacity(message.content.len() + 512);
            serde_json::to_writer(&mut json, &message).expect("messages serialize");
            String::from_utf8(json).expect("JSON is UTF-8")
        })
        .await;
        let traceparent = crate::telemetry::current_traceparent();
        let event = Envelope::message_head(
            from.map(|(conn, _)| self.origin(conn)),
            from.and_then(|(_, client_id)| client_id),
            traceparent.as_deref(),
        );
        let new = NewEntry {
            id: &message_id,
            owner: sender.as_str(),
            json: &entry,
        };
        // Only a message that would create its channel pays the sender's channel budget:
        // the store says so without storing, and the second call may create it.
        let create = self.budgets.is_none();
        if self.store.append(channel, new, &event, create).await? == Appended::WouldCreate {
            if let Some(budgets) = &self.budgets {
                let verdict = budgets.channel(sender.as_str()).await;
                if !verdict.allowed {
                    return Err(ChatError::Limited(verdict));
                }
            }
            self.store.append(channel, new, &event, true).await?;
        }
        Ok(Stored { message_id, entry })
    }

    /// Deletes a message by id and tells the channel. With `owner`, only that user's
    /// message may go (checked in the same atomic step as the removal). `caller` (the
    /// user, or the client address with auth off) spends one of its delete budget.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when the channel's history has no such message,
    /// [`ChatError::NotOwner`] when it is someone else's.
    pub async fn delete(
        &self,
        channel: &ChannelName,
        id: &MessageId,
        owner: Option<&Username>,
        caller: &str,
    ) -> Result<(), ChatError> {
        if let Some(budgets) = &self.budgets {
            let verdict = budgets.delete(caller).await;
            if !verdict.allowed {
                return Err(ChatError::Limited(verdict));
            }
        }
        let frame = ServerFrame::MessageDeleted {
            message_id: id.to_string(),
            channel: channel.to_string(),
            timestamp: Timestamp::now(),
        };
        let event = Envelope::encode(&frame, None, Echo::All, None, false);
        match self
            .store
            .delete(channel, id, owner.map(Username::as_str), &event)
            .await?
        {
            Deleted::Done => Ok(()),
            Deleted::NotFound => Err(ChatError::NotFound("Message not found")),
            Deleted::NotOwner => Err(ChatError::NotOwner),
        }
    }

    /// The newest `limit` messages, oldest first. Entries that do not parse (foreign
    /// data) are skipped, as the original does.
    ///
    /// # Errors
    /// `invalid_limit` outside `1..=history_max_limit`; [`ChatError::Unavailable`].
    pub async fn history(
        &self,
        channel: &ChannelName,
        limit: Option<i64>,
    ) -> Result<(Vec<ChatMessage>, bool), ChatError> {
        let max = self.limits.history_max_limit;
        let limit = match limit {
            None => self.limits.history_default_limit,
            Some(n) if n >= 1 && n as u64 <= max as u64 => n as usize,
            Some(_) => {
                return Err(ValidationError::new(
                    "invalid_limit",
                    format!("limit must be between 1 and {max}"),
                )
                .into());
            }
        };
        let (entries, truncated) = self
            .store
            .history(channel, limit, self.limits.history_max_bytes)
            .await?;
        let messages = entries
            .iter()
            .filter_map(|entry| match serde_json::from_str::<ChatMessage>(entry) {
                Ok(message) => Some(message),
                Err(e) => {
                    tracing::debug!(%channel, error = %e, "skipping a history entry that does not parse");
                    None
                }
            })
            .collect();
        Ok((messages, truncated))
    }

    /// # Errors
    /// [`ChatError::Unavailable`].
    pub async fn online(&self, channel: &ChannelName) -> Result<Vec<OnlineUser>, ChatError> {
        Ok(self
            .store
            .online(channel)
            .await?
            .into_iter()
            .map(|entry| OnlineUser {
                username: entry.username,
                status: "online",
                last_seen: Timestamp::from_millis(entry.last_seen_ms),
            })
            .collect())
    }

    /// # Errors
    /// [`ChatError::Unavailable`].
    pub async fn channels(&self) -> Result<Vec<String>, ChatError> {
        Ok(self.store.channels().await?)
    }

    /// Whether this replica can serve: the store answers and the bus is subscribed.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.bus.is_ready() {
            return Err("bus subscriber is not connected".into());
        }
        self.store.ping().await.map_err(|e| e.to_string())
    }

    /// Joins a session to a channel: local fan-out first, then the bus subscription
    /// (confirmed), then presence (announcing `user_joined` to the others when this is the
    /// user's first connection). Once this returns, every later event of the channel
    /// reaches the connection's queue.
    ///
    /// # Errors
    /// [`ChatError::Unavailable`] when the bus or the store cannot confirm; nothing is
    /// left behind.
    pub async fn connect(
        self: &Arc<Self>,
        username: Username,
        channel: ChannelName,
    ) -> Result<Connection, ChatError> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (outlet, outbound) =
            outbox(self.limits.outbound_queue, self.limits.outbound_queue_bytes);
        let kick = CancellationToken::new();
        let conn_key = format!("{}-{conn}", self.hub.replica());
        self.hub.add(
            channel.as_str(),
            Member {
                conn,
                username: username.clone(),
                conn_key: conn_key.clone(),
                outlet,
                kick: kick.clone(),
                live: Arc::new(AtomicBool::new(false)),
            },
        );
        let mut connection = Connection {
            service: self.clone(),
            conn,
            username,
            channel,
            conn_key,
            outbound,
            kick,
            typing: false,
            closed: true,
        };
        if let Err(e) = self.bus.subscribe(connection.channel.as_str()).await {
            self.unregister(&connection);
            return Err(ChatError::Unavailable(e.0));
        }
        let (joined, marker) = self.join_events(conn, &connection.username, &connection.channel);
        if let Err(e) = self
            .store
            .join(
                &connection.channel,
                &connection.username,
                &connection.conn_key,
                &joined,
                &marker,
            )
            .await
        {
            self.unregister(&connection);
            return Err(e.into());
        }
        connection.closed = false;
        Ok(connection)
    }

    /// What a join publishes: `user_joined` for the others when it is the user's first
    /// connection, a marker otherwise; either tells the hub where this connection's stream
    /// begins.
    fn join_events(
        &self,
        conn: u64,
        username: &Username,
        channel: &ChannelName,
    ) -> (Vec<u8>, Vec<u8>) {
        let joined = ServerFrame::UserJoined {
            username: username.to_string(),
            channel: channel.to_string(),
            timestamp: Timestamp::now(),
        };
        (
            Envelope::joined(&joined, self.origin(conn)),
            Envelope::join_marker(self.origin(conn)),
        )
    }

    fn unregister(&self, connection: &Connection) {
        if self
            .hub
            .remove(connection.channel.as_str(), connection.conn)
        {
            self.bus.release(connection.channel.as_str());
        }
    }

    /// Leaves the channel: local fan-out, typing (with `typing_status` false to the
    /// others), then presence (`user_left` when it was the user's last connection).
    async fn leave(
        &self,
        conn: u64,
        username: &Username,
        channel: &ChannelName,
        conn_key: &str,
        typing: bool,
    ) {
        if self.hub.remove(channel.as_str(), conn) {
            self.bus.release(channel.as_str());
        }
        if typing && let Err(e) = self.set_typing(conn, username, channel, false).await {
            tracing::warn!(%channel, error = %e, "could not clear typing state on disconnect");
        }
        let left = ServerFrame::UserLeft {
            username: username.to_string(),
            channel: channel.to_string(),
            timestamp: Timestamp::now(),
        };
        let event = Envelope::encode(&left, Some(self.origin(conn)), Echo::Others, None, false);
        if let Err(e) = self.store.leave(channel, username, conn_key, &event).await {
            tracing::warn!(%channel, error = %e,
                "could not remove presence on disconnect; it expires with the presence TTL");
        }
    }

    async fn set_typing(
        &self,
        conn: u64,
        username: &Username,
        channel: &ChannelName,
        on: bool,
    ) -> Result<(), ChatError> {
        let frame = ServerFrame::TypingStatus {
            username: username.to_string(),
            channel: channel.to_string(),
            is_typing: on,
            timestamp: Timestamp::now(),
        };
        let event = Envelope::encode(&frame, Some(self.origin(conn)), Echo::Others, None, true);
        self.store.typing(channel, username, on, &event).await?;
        Ok(())
    }

    /// Refreshes one channel's local connections, and re-joins those the store no longer
    /// has but that are still connected here (Redis restarted and lost them, or they
    /// expired while Redis was unreachable). Connections that left are not brought back.
    async fn refresh_channel(&self, channel: &str, members: &[Member]) {
        let Ok(channel) = ChannelName::parse(channel) else {
            return;
        };
        let entries: Vec<PresenceMember> = members
            .iter()
            .map(|m| PresenceMember {
                username: m.username.clone(),
                conn_key: m.conn_key.clone(),
            })
            .collect();
        let missing = match self.store.refresh(&channel, &entries).await {
            Ok(missing) => missing,
            Err(e) => {
                tracing::warn!(%channel, error = %e, "presence refresh failed");
                return;
            }
        };
        for member in missing.into_iter().filter_map(|i| members.get(i)) {
            if !self.hub.contains(channel.as_str(), member.conn) {
                continue;
            }
            let (joined, marker) = self.join_events(member.conn, &member.username, &channel);
            if let Err(e) = self
                .store
                .join(
                    &channel,
                    &member.username,
                    &member.conn_key,
                    &joined,
                    &marker,
                )
                .await
            {
                tracing::warn!(%channel, error = %e, "presence re-join failed");
            }
        }
    }

    /// Refreshes the presence of every local connection, channel by channel, until
    /// `shutdown`. A replica that dies stops refreshing, so its users vanish within the
    /// presence TTL.
    pub async fn refresh_presence(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.limits.presence_refresh);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let service = &self;
            futures_util::stream::iter(self.hub.snapshot())
                .for_each_concurrent(REFRESH_CONCURRENCY, |(channel, members)| async move {
                    service.refresh_channel(&channel, &members).await;
                })
                .await;
        }
    }
}

impl Connection {
    /// The content rules this connection's messages are checked against.
    pub fn limits(&self) -> &ChatLimits {
        &self.service.limits
    }

    /// Posts a chat message from this connection (see [`ChatService::post`]); the echo
    /// carries `client_id`.
    ///
    /// # Errors
    /// See [`ChatService::post`].
    pub async fn post(
        &mut self,
        content: String,
        message_type: &str,
        client_id: Option<&str>,
    ) -> Result<Stored, ChatError> {
        let service = self.service.clone();
        let posted = service
            .post(
                &self.username,
                &self.channel,
                content,
                message_type,
                Some((self.conn, client_id)),
            )
            .await?;
        if self.typing {
            // Sending ends typing, as the original client assumes. The message is stored
            // whatever happens here, so a failure is only logged.
            if let Err(e) = self.typing(false).await {
                tracing::warn!(channel = %self.channel, error = %e, "could not clear typing after a send");
            }
        }
        Ok(posted.message)
    }

    /// Starts or stops this user's typing indicator for the others.
    ///
    /// # Errors
    /// [`ChatError::Unavailable`].
    pub async fn typing(&mut self, on: bool) -> Result<(), ChatError> {
        self.service
            .set_typing(self.conn, &self.username, &self.channel, on)
            .await?;
        self.typing = on;
        Ok(())
    }

    /// The channel's messages newer than `since`, oldest first, and whether that is the
    /// whole gap: `false` when `since` is not in the newest `history_max_limit` messages
    /// (trimmed, deleted, or older than one history answer holds).
    ///
    /// # Errors
    /// [`ChatError::Unavailable`].
    pub async fn messages_since(
        &self,
        since: &MessageId,
    ) -> Result<(Vec<ChatMessage>, bool), ChatError> {
        // A reconnect usually missed little: look in a short page first, and read the
        // whole window only when `since` is not in it.
        let max = self.service.limits.history_max_limit;
        for limit in [RESUME_FIRST_PAGE.min(max), max] {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let (messages, _) = self.service.history(&self.channel, Some(limit)).await?;
            if let Some(at) = messages.iter().position(|m| m.message_id == since.as_str()) {
                return Ok((messages[at + 1..].to_vec(), true));
            }
        }
        Ok((Vec::new(), false))
    }

    /// Leaves the channel in order (see [`ChatService::leave`]).
    pub async fn close(mut self) {
        self.closed = true;
        self.service
            .leave(
                self.conn,
                &self.username,
                &self.channel,
                &self.conn_key,
                self.typing,
            )
            .await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let service = self.service.clone();
        let (conn, username, channel, conn_key, typing) = (
            self.conn,
            self.username.clone(),
            self.channel.clone(),
            std::mem::take(&mut self.conn_key),
            self.typing,
        );
        let tracker = service.tracker.clone();
        tracker.spawn(async move {
            service
                .leave(conn, &username, &channel, &conn_key, typing)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ChatLimits {
        ChatLimits {
            history_default_limit: 50,
            history_max_limit: 1000,
            history_max_bytes: 1 << 20,
            max_text_bytes: 8,
            media: MediaLimits {
                max_image_bytes: 64,
                ..MediaLimits::default()
            },
            outbound_queue: 16,
            outbound_queue_bytes: 1 << 20,
            presence_refresh: Duration::from_secs(20),
        }
    }

    #[test]
    fn drafts_follow_the_content_rules() {
        let l = limits();
        assert!(Draft::parse("hi".into(), "text", &l).is_ok());
        assert_eq!(
            Draft::parse("".into(), "text", &l).unwrap_err().code,
            "empty_content"
        );
        // 8 bytes allowed; "ééééé" is 5 characters but 10 bytes.
        assert!(Draft::parse("12345678".into(), "text", &l).is_ok());
        assert_eq!(
            Draft::parse("ééééé".into(), "text", &l).unwrap_err().code,
            "content_too_large"
        );
        assert_eq!(
            Draft::parse("hi".into(), "video", &l).unwrap_err().code,
            "invalid_message_type"
        );
        // Text is stored sanitized.
        let draft = Draft::parse("a<b>c".into(), "text", &l).unwrap();
        assert_eq!(draft.content, "ac");
        // A real 1x1 GIF passes; its bytes under another type do not; other shapes are
        // refused with the content module's codes.
        let gif = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";
        assert!(Draft::parse(gif.into(), "image", &l).is_ok());
        for (bad, code) in [
            ("https://evil.example/x.png", "invalid_media"),
            ("data:text/html;base64,AAAA", "media_type_not_allowed"),
            ("data:image/png,AAAA", "invalid_media"),
            ("data:audio/webm;base64,AAAA", "media_type_not_allowed"),
            (
                &gif.replace("image/gif", "image/png"),
                "media_type_mismatch",
            ),
            (
                &format!("data:image/gif;base64,{}", "A".repeat(200)),
                "media_too_large",
            ),
        ] {
            assert_eq!(
                Draft::parse(bad.to_string(), "image", &l).unwrap_err().code,
                code,
                "{bad}"
            );
        }
    }
}
