//! The chat store: history, presence, typing and the channel registry.
//!
//! Two implementations pass one conformance suite (`tests/api/store.rs`): [`redis::RedisStore`]
//! for production and [`memory::MemoryStore`] for `--dev` and single-process use.
//!
//! Every write that clients must see is paired with its bus event and done as one atomic
//! step: the event is published inside the same Lua script (Redis) or under the same lock
//! (memory). So the order in which replicas receive events is the order of history, and an
//! event is published if and only if its write happened.

use std::time::Duration;

use async_trait::async_trait;

use crate::chat::model::{ChannelName, MessageId, Username};

pub mod connection;
pub mod memory;
pub mod redis;

/// Retention and expiry settings shared by both stores.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Messages kept per channel.
    pub history_max: usize,
    /// Bytes of entries kept per channel (the oldest go first; the newest always stays).
    pub history_max_bytes: usize,
    /// Seconds a channel's history lives after its last message.
    pub history_ttl_secs: u64,
    /// Milliseconds a connection stays online without a refresh.
    pub presence_ttl_ms: u64,
    /// Seconds a typing indicator lives.
    pub typing_ttl_secs: u64,
}

/// A store call failed; the store is unreachable, timing out or answering errors.
/// The cause is for logs only and never reaches a client.
#[derive(Debug, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreError(pub String);

/// One user listed as online in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEntry {
    pub username: String,
    /// When the user was last confirmed online (the latest refresh of any of their
    /// connections), in milliseconds since the Unix epoch.
    pub last_seen_ms: i64,
}

/// One local connection, as presence knows it: the user and a key unique across replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMember {
    pub username: Username,
    pub conn_key: String,
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One decision of the shared rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateOutcome {
    pub allowed: bool,
    pub remaining: u32,
    /// When refused: how long until one more is allowed.
    pub retry_after: Duration,
    /// How long until the burst is whole again.
    pub reset_after: Duration,
}

/// Rate budgets shared by every replica: a generic cell rate algorithm (GCRA) over one
/// key, decided atomically with the store's own clock.
#[async_trait]
pub trait RateStore: Send + Sync + 'static {
    /// Takes `cost` units from `key`'s budget of `burst` units refilled one per `emission`.
    /// A cost above the burst is never allowed.
    async fn take(
        &self,
        key: &str,
        emission: Duration,
        burst: u32,
        cost: u32,
    ) -> StoreResult<RateOutcome>;
}

/// One message to append: its id and owner (indexed, so a delete never reads the
/// history) and its serialized form.
#[derive(Debug, Clone, Copy)]
pub struct NewEntry<'a> {
    pub id: &'a str,
    /// Who may delete it besides an admin.
    pub owner: &'a str,
    pub json: &'a str,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// The channel has no history and the append was not allowed to create it: nothing
    /// was stored or published.
    WouldCreate,
}

/// Whether the store has room for new media, as last measured (see
/// `redis.storage_full_ratio`). Shared by the store's watcher and the send path.
#[derive(Debug, Default)]
pub struct Capacity {
    full: std::sync::atomic::AtomicBool,
}

impl Capacity {
    pub fn is_full(&self) -> bool {
        self.full.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_full(&self, full: bool) {
        self.full.store(full, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Done,
    /// No message with this id in the channel's history.
    NotFound,
    /// The message exists but belongs to someone else (nothing was removed).
    NotOwner,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends a message to the channel's history, records the channel as active, and
    /// publishes its event: [`crate::chat::event::message_event`]`(event_head, entry.json)`,
    /// joined where it is published so the caller holds one copy of the content. The history keeps the newest `history_max` entries whose sizes
    /// add up to at most `history_max_bytes` (the newest always stays) and its TTL is
    /// refreshed. With `create` false, a channel without history is left alone
    /// ([`Appended::WouldCreate`]), so the caller can charge a creation budget first.
    async fn append(
        &self,
        channel: &ChannelName,
        entry: NewEntry<'_>,
        event_head: &[u8],
        create: bool,
    ) -> StoreResult<Appended>;

    /// The newest `limit` entries, oldest first (the original's order), cut to the newest
    /// ones whose sizes add up to at most `max_bytes` (the newest entry always comes
    /// back). The flag says whether the budget cut the answer short.
    async fn history(
        &self,
        channel: &ChannelName,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<(Vec<String>, bool)>;

    /// Removes the message with this id and publishes `event`, in one atomic step. With
    /// `owner`, only a message stored with that owner is removed. Finds the message
    /// through an index: the cost does not grow with the channel's history.
    async fn delete(
        &self,
        channel: &ChannelName,
        id: &MessageId,
        owner: Option<&str>,
        event: &[u8],
    ) -> StoreResult<Deleted>;

    /// Channels with history, sorted by name.
    async fn channels(&self) -> StoreResult<Vec<String>>;

    /// Marks one connection of `user` online and returns `true` when it is the user's
    /// first live connection in the channel. Publishes, in the same atomic step, `joined`
    /// in that case and `marker` otherwise, so the bus always carries the point where the
    /// connection's stream begins.
    async fn join(
        &self,
        channel: &ChannelName,
        user: &Username,
        conn_key: &str,
        joined: &[u8],
        marker: &[u8],
    ) -> StoreResult<bool>;

    /// Removes one connection; publishes `event` and returns `true` when it was the user's
    /// last live connection in the channel.
    async fn leave(
        &self,
        channel: &ChannelName,
        user: &Username,
        conn_key: &str,
        event: &[u8],
    ) -> StoreResult<bool>;

    /// Extends the deadline of these connections where they are still present, and returns
    /// the positions (in `members`) of those that are not: left meanwhile, expired and
    /// purged, or lost with a Redis restart. A connection that left is never brought back.
    async fn refresh(
        &self,
        channel: &ChannelName,
        members: &[PresenceMember],
    ) -> StoreResult<Vec<usize>>;

    /// Users with at least one live connection, sorted by name.
    async fn online(&self, channel: &ChannelName) -> StoreResult<Vec<PresenceEntry>>;

    /// Sets or clears the user's typing indicator and publishes `event`.
    async fn typing(
        &self,
        channel: &ChannelName,
        user: &Username,
        on: bool,
        event: &[u8],
    ) -> StoreResult<()>;

    /// Cheap reachability check for readiness.
    async fn ping(&self) -> StoreResult<()>;
}
