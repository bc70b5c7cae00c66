//! The hub: chat channel → the local sessions in it.
//!
//! Each session has a bounded queue of serialized frames. Delivery never waits: it offers
//! the frame to every member's queue with `try_send`. When a queue is at least half full,
//! ephemeral events (typing) for that member are dropped; when it is full, the member reads
//! too slowly and is told to close, so one slow reader never delays the others and never
//! grows memory. (A `broadcast` channel per room, as in mini-redis, cannot drop by kind
//! and only reports a lagging reader after it has lost messages.)
//!
//! Membership lists are copy-on-write `Arc<[Member]>`: delivery clones one `Arc` under a
//! read lock and walks the list without holding any lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Deliver;
use crate::chat::event::{Echo, Envelope, with_client_id};
use crate::chat::model::Username;

/// One local session in one channel.
#[derive(Clone, Debug)]
pub struct Member {
    /// Connection number, unique within this process.
    pub conn: u64,
    pub username: Username,
    /// Presence key of the connection, unique across replicas.
    pub conn_key: String,
    /// The session's outbound queue of serialized frames.
    pub tx: mpsc::Sender<Bytes>,
    /// Cancelled when the session must close because it reads too slowly.
    pub kick: CancellationToken,
}

/// Counters of what the hub did, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Frames queued for a session.
    pub delivered: AtomicU64,
    /// Ephemeral frames dropped because a session's queue was half full.
    pub dropped_ephemeral: AtomicU64,
    /// Sessions told to close because their queue was full.
    pub slow_consumers: AtomicU64,
    /// Payloads that were not envelopes.
    pub malformed: AtomicU64,
}

pub struct Hub {
    replica: String,
    channels: RwLock<HashMap<String, Arc<[Member]>>>,
    pub stats: HubStats,
}

impl Hub {
    pub fn new(replica: impl Into<String>) -> Self {
        Self {
            replica: replica.into(),
            channels: RwLock::new(HashMap::new()),
            stats: HubStats::default(),
        }
    }

    /// This process's replica id, as carried in envelope origins.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn add(&self, channel: &str, member: Member) {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let list = channels
            .entry(channel.to_string())
            .or_insert_with(|| Arc::from([]));
        let mut next = Vec::with_capacity(list.len() + 1);
        next.extend(list.iter().cloned());
        next.push(member);
        *list = next.into();
    }

    /// Removes a session; returns `true` when the channel has no local member left.
    pub fn remove(&self, channel: &str, conn: u64) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let Some(list) = channels.get_mut(channel) else {
            return true;
        };
        let next: Vec<Member> = list.iter().filter(|m| m.conn != conn).cloned().collect();
        if next.is_empty() {
            channels.remove(channel);
            true
        } else {
            *list = next.into();
            false
        }
    }

    /// Every channel with local members, and those members.
    pub fn snapshot(&self) -> Vec<(String, Arc<[Member]>)> {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels
            .iter()
            .map(|(name, list)| (name.clone(), list.clone()))
            .collect()
    }

    /// Local sessions, all channels together.
    pub fn session_count(&self) -> usize {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels.values().map(|list| list.len()).sum()
    }

    fn members(&self, channel: &str) -> Option<Arc<[Member]>> {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels.get(channel).cloned()
    }

    fn offer(&self, member: &Member, frame: Bytes, ephemeral: bool) {
        if ephemeral && member.tx.capacity() * 2 <= member.tx.max_capacity() {
            self.stats.dropped_ephemeral.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match member.tx.try_send(frame) {
            Ok(()) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                if ephemeral {
                    self.stats.dropped_ephemeral.fetch_add(1, Ordering::Relaxed);
                } else if !member.kick.is_cancelled() {
                    self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    member.kick.cancel();
                }
            }
            // The session is already leaving.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl Deliver for Hub {
    fn deliver(&self, channel: &str, payload: &[u8]) {
        let Some(members) = self.members(channel) else {
            return;
        };
        let envelope = match Envelope::decode(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(channel, error = %e, "dropping a bus payload that is not an envelope");
                return;
            }
        };
        let frame = Bytes::copy_from_slice(envelope.frame.get().as_bytes());
        let origin_conn = envelope
            .origin
            .as_ref()
            .filter(|o| o.replica == self.replica)
            .map(|o| o.conn);
        for member in members.iter() {
            if Some(member.conn) == origin_conn {
                match (envelope.echo, envelope.client_id.as_deref()) {
                    (Echo::Others, _) => continue,
                    (Echo::All, Some(client_id)) => {
                        let echoed = with_client_id(envelope.frame.get(), client_id);
                        self.offer(member, Bytes::from(echoed), envelope.ephemeral);
                        continue;
                    }
                    (Echo::All, None) => {}
                }
            }
            self.offer(member, frame.clone(), envelope.ephemeral);
        }
    }

    fn has_members(&self, channel: &str) -> bool {
        self.members(channel).is_some()
    }

    fn channels(&self) -> Vec<String> {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::event::{Origin, ServerFrame};
    use crate::chat::model::Timestamp;

    fn member(conn: u64, queue: usize) -> (Member, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(queue);
        let member = Member {
            conn,
            username: Username::parse(&format!("u{conn}")).unwrap(),
            conn_key: format!("r-{conn}"),
            tx,
            kick: CancellationToken::new(),
        };
        (member, rx)
    }

    fn typing() -> ServerFrame {
        ServerFrame::TypingStatus {
            username: "u1".into(),
            channel: "c".into(),
            is_typing: true,
            timestamp: Timestamp::now(),
        }
    }

    fn deleted() -> ServerFrame {
        ServerFrame::MessageDeleted {
            message_id: "m".into(),
            channel: "c".into(),
            timestamp: Timestamp::now(),
        }
    }

    #[test]
    fn echo_rules_follow_the_envelope() {
        let hub = Hub::new("r");
        let (a, mut rx_a) = member(1, 8);
        let (b, mut rx_b) = member(2, 8);
        hub.add("c", a);
        hub.add("c", b);
        let origin = || {
            Some(Origin {
                replica: "r".into(),
                conn: 1,
            })
        };

        hub.deliver(
            "c",
            &Envelope::encode(&typing(), origin(), Echo::Others, None, true),
        );
        assert!(rx_a.try_recv().is_err(), "origin excluded");
        assert!(rx_b.try_recv().is_ok());

        hub.deliver(
            "c",
            &Envelope::encode(&deleted(), origin(), Echo::All, Some("cid"), false),
        );
        let echo: serde_json::Value = serde_json::from_slice(&rx_a.try_recv().unwrap()).unwrap();
        assert_eq!(echo["client_id"], "cid");
        let other: serde_json::Value = serde_json::from_slice(&rx_b.try_recv().unwrap()).unwrap();
        assert!(other.get("client_id").is_none());

        // Same conn number on another replica is not the origin.
        let foreign = Some(Origin {
            replica: "other".into(),
            conn: 1,
        });
        hub.deliver(
            "c",
            &Envelope::encode(&typing(), foreign, Echo::Others, None, true),
        );
        assert!(rx_a.try_recv().is_ok());
    }

    #[test]
    fn slow_members_lose_typing_first_then_get_kicked() {
        let hub = Hub::new("r");
        let (slow, _rx_slow) = member(1, 4);
        let (fast, mut rx_fast) = member(2, 4);
        let kick = slow.kick.clone();
        hub.add("c", slow);
        hub.add("c", fast);
        let msg = Envelope::encode(&deleted(), None, Echo::All, None, false);
        let typ = Envelope::encode(&typing(), None, Echo::All, None, true);

        hub.deliver("c", &msg);
        hub.deliver("c", &msg);
        while rx_fast.try_recv().is_ok() {}
        // Slow queue half full: typing dropped for it, delivered to the fast one.
        hub.deliver("c", &typ);
        assert_eq!(hub.stats.dropped_ephemeral.load(Ordering::Relaxed), 1);
        assert!(rx_fast.try_recv().is_ok());
        assert!(!kick.is_cancelled());
        hub.deliver("c", &msg);
        hub.deliver("c", &msg);
        assert!(!kick.is_cancelled());
        hub.deliver("c", &msg);
        assert!(kick.is_cancelled(), "full queue kicks the slow reader");
        assert_eq!(hub.stats.slow_consumers.load(Ordering::Relaxed), 1);
        assert_eq!(rx_fast.len(), 3, "the fast reader got every message");
    }

    #[test]
    fn membership_is_tracked_per_channel() {
        let hub = Hub::new("r");
        let (a, _ra) = member(1, 4);
        let (b, _rb) = member(2, 4);
        hub.add("c", a);
        hub.add("c", b);
        assert!(hub.has_members("c"));
        assert!(!hub.remove("c", 1));
        assert!(hub.remove("c", 2));
        assert!(!hub.has_members("c"));
        assert_eq!(hub.session_count(), 0);
        hub.deliver("nobody", b"not even json");
        assert_eq!(hub.stats.malformed.load(Ordering::Relaxed), 0);
    }
}
