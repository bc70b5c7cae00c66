//! The in-memory store: one process, nothing to install. Used by `--dev` when no Redis is
//! configured and by single-node deployments that choose `store.backend = "memory"`.
//!
//! One `std` mutex guards everything: every operation is short and never awaits while
//! holding it, and events are published under it, which keeps bus order equal to history
//! order exactly as the Redis scripts do.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::{
    Appended, Deleted, NewEntry, PresenceEntry, PresenceMember, Store, StoreResult, StoreSettings,
};
use crate::bus::memory::MemoryBus;
use crate::chat::model::{ChannelName, MessageId, Username};

pub struct MemoryStore {
    settings: StoreSettings,
    bus: Arc<MemoryBus>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Channel → its history.
    history: HashMap<String, Log>,
    /// Channel → user → connection key → deadline (ms since the epoch).
    presence: HashMap<String, BTreeMap<String, HashMap<String, u64>>>,
    /// (channel, user) pairs currently typing, with their deadline.
    typing: HashMap<(String, String), u64>,
}

/// One channel's history, indexed by id like the Redis layout.
#[derive(Default)]
struct Log {
    /// Sequence number → entry; the highest is the newest.
    entries: BTreeMap<u64, Stored>,
    /// Message id → sequence number.
    ids: HashMap<String, u64>,
    next: u64,
    /// Sum of the entries' lengths.
    bytes: usize,
    /// Time of the last append (ms), for the TTL.
    touched: u64,
}

struct Stored {
    id: String,
    owner: String,
    json: String,
}

impl Log {
    fn push(&mut self, entry: NewEntry<'_>, now: u64) {
        if let Some(seq) = self.ids.remove(entry.id) {
            self.remove(seq);
        }
        self.next += 1;
        self.ids.insert(entry.id.to_string(), self.next);
        self.bytes += entry.json.len();
        self.entries.insert(
            self.next,
            Stored {
                id: entry.id.to_string(),
                owner: entry.owner.to_string(),
                json: entry.json.to_string(),
            },
        );
        self.touched = now;
    }

    /// Drops the oldest entries beyond `max` entries or `max_bytes` (the newest stays).
    fn trim(&mut self, max: usize, max_bytes: usize) {
        while self.entries.len() > max || (self.bytes > max_bytes && self.entries.len() > 1) {
            let Some((_, oldest)) = self.entries.pop_first() else {
                break;
            };
            self.ids.remove(&oldest.id);
            self.bytes -= oldest.json.len();
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Stored> {
        let stored = self.entries.remove(&seq)?;
        self.bytes -= stored.json.len();
        Some(stored)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

impl MemoryStore {
    pub fn new(settings: StoreSettings, bus: Arc<MemoryBus>) -> Self {
        Self {
            settings,
            bus,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn history_ttl_ms(&self) -> u64 {
        self.settings.history_ttl_secs.saturating_mul(1000)
    }

    /// Drops a channel's history once its TTL has passed, as Redis would expire the key.
    fn expire_history(&self, inner: &mut Inner, now: u64) {
        let ttl = self.history_ttl_ms();
        inner
            .history
            .retain(|_, log| now < log.touched.saturating_add(ttl));
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(
        &self,
        channel: &ChannelName,
        entry: NewEntry<'_>,
        event_head: &[u8],
        create: bool,
    ) -> StoreResult<Appended> {
        let now = now_ms();
        let mut inner = self.lock();
        self.expire_history(&mut inner, now);
        if !create && !inner.history.contains_key(channel.as_str()) {
            return Ok(Appended::WouldCreate);
        }
        let log = inner.history.entry(channel.to_string()).or_default();
        log.push(entry, now);
        log.trim(self.settings.history_max, self.settings.history_max_bytes);
        let event = crate::chat::event::message_event(event_head, entry.json);
        self.bus.publish(channel.as_str(), &event);
        Ok(Appended::Stored)
    }

    async fn history(
        &self,
        channel: &ChannelName,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<(Vec<String>, bool)> {
        let mut inner = self.lock();
        self.expire_history(&mut inner, now_ms());
        let Some(log) = inner.history.get(channel.as_str()) else {
            return Ok((Vec::new(), false));
        };
        let mut out: Vec<String> = Vec::new();
        let mut used = 0;
        let mut truncated = false;
        for stored in log.entries.values().rev().take(limit) {
            if !out.is_empty() && used + stored.json.len() > max_bytes {
                truncated = true;
                break;
            }
            used += stored.json.len();
            out.push(stored.json.clone());
        }
        out.reverse();
        Ok((out, truncated))
    }

    async fn delete(
        &self,
        channel: &ChannelName,
        id: &MessageId,
        owner: Option<&str>,
        event: &[u8],
    ) -> StoreResult<Deleted> {
        let mut inner = self.lock();
        self.expire_history(&mut inner, now_ms());
        let Some(log) = inner.history.get_mut(channel.as_str()) else {
            return Ok(Deleted::NotFound);
        };
        let Some(&seq) = log.ids.get(id.as_str()) else {
            return Ok(Deleted::NotFound);
        };
        if owner.is_some_and(|owner| log.entries.get(&seq).is_some_and(|s| s.owner != owner)) {
            return Ok(Deleted::NotOwner);
        }
        log.ids.remove(id.as_str());
        log.remove(seq);
        if log.entries.is_empty() {
            inner.history.remove(channel.as_str());
        }
        self.bus.publish(channel.as_str(), event);
        Ok(Deleted::Done)
    }

    async fn channels(&self) -> StoreResult<Vec<String>> {
        let mut inner = self.lock();
        self.expire_history(&mut inner, now_ms());
        let mut names: Vec<String> = inner.history.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    async fn join(
        &self,
        channel: &ChannelName,
        user: &Username,
        conn_key: &str,
        joined: &[u8],
        marker: &[u8],
    ) -> StoreResult<bool> {
        let now = now_ms();
        let deadline = now + self.settings.presence_ttl_ms;
        let mut inner = self.lock();
        let conns = inner
            .presence
            .entry(channel.to_string())
            .or_default()
            .entry(user.to_string())
            .or_default();
        conns.retain(|_, d| *d > now);
        let first = conns.is_empty();
        conns.insert(conn_key.to_string(), deadline);
        let event = if first { joined } else { marker };
        self.bus.publish(channel.as_str(), event);
        Ok(first)
    }

    async fn leave(
        &self,
        channel: &ChannelName,
        user: &Username,
        conn_key: &str,
        event: &[u8],
    ) -> StoreResult<bool> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(users) = inner.presence.get_mut(channel.as_str()) else {
            return Ok(false);
        };
        let Some(conns) = users.get_mut(user.as_str()) else {
            return Ok(false);
        };
        conns.remove(conn_key);
        conns.retain(|_, d| *d > now);
        if !conns.is_empty() {
            return Ok(false);
        }
        users.remove(user.as_str());
        if users.is_empty() {
            inner.presence.remove(channel.as_str());
        }
        self.bus.publish(channel.as_str(), event);
        Ok(true)
    }

    async fn refresh(
        &self,
        channel: &ChannelName,
        members: &[PresenceMember],
    ) -> StoreResult<Vec<usize>> {
        let deadline = now_ms() + self.settings.presence_ttl_ms;
        let mut inner = self.lock();
        let mut missing = Vec::new();
        let mut users = inner.presence.get_mut(channel.as_str());
        for (i, member) in members.iter().enumerate() {
            let slot = users
                .as_mut()
                .and_then(|u| u.get_mut(member.username.as_str()))
                .and_then(|conns| conns.get_mut(&member.conn_key));
            match slot {
                Some(d) => *d = deadline,
                None => missing.push(i),
            }
        }
        Ok(missing)
    }

    async fn online(&self, channel: &ChannelName) -> StoreResult<Vec<PresenceEntry>> {
        let now = now_ms();
        let ttl = self.settings.presence_ttl_ms as i64;
        let inner = self.lock();
        let Some(users) = inner.presence.get(channel.as_str()) else {
            return Ok(Vec::new());
        };
        Ok(users
            .iter()
            .filter_map(|(user, conns)| {
                let latest = conns.values().copied().filter(|d| *d > now).max()?;
                Some(PresenceEntry {
                    username: user.clone(),
                    last_seen_ms: latest as i64 - ttl,
                })
            })
            .collect())
    }

    async fn typing(
        &self,
        channel: &ChannelName,
        user: &Username,
        on: bool,
        event: &[u8],
    ) -> StoreResult<()> {
        let now = now_ms();
        let mut inner = self.lock();
        inner.typing.retain(|_, deadline| *deadline > now);
        let key = (channel.to_string(), user.to_string());
        if on {
            inner
                .typing
                .insert(key, now + self.settings.typing_ttl_secs * 1000);
        } else {
            inner.typing.remove(&key);
        }
        self.bus.publish(channel.as_str(), event);
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}
