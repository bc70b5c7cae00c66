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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Deliver;
use crate::chat::event::{Echo, Envelope, ServerFrame, with_client_id};
use crate::chat::model::Username;

/// The sending side of a session's queue, bounded twice: by frames (the channel) and by
/// bytes (so a burst of large media frames cannot hold more than the byte budget).
#[derive(Clone, Debug)]
pub struct Outlet {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The receiving side, owned by the session.
#[derive(Debug)]
pub struct Outbox {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// A queue for one session: at most `frames` frames and `max_bytes` bytes (a single frame
/// larger than the budget still passes when nothing else is queued).
pub fn outbox(frames: usize, max_bytes: usize) -> (Outlet, Outbox) {
    let (tx, rx) = mpsc::channel(frames);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outlet {
            tx,
            queued: queued.clone(),
            max_bytes,
        },
        Outbox { rx, queued },
    )
}

impl Outbox {
    pub async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }

    pub fn try_recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }
}

/// What happened to an offered frame.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    Queued,
    /// An ephemeral frame dropped because the queue is at least half full.
    Dropped,
    /// The queue is full: the reader is too slow.
    Full,
    /// The session is gone.
    Closed,
}

impl Outlet {
    fn offer(&self, frame: Bytes, ephemeral: bool) -> Offer {
        let len = frame.len();
        let queued = self.queued.load(Ordering::Relaxed);
        let half_full =
            queued * 2 >= self.max_bytes || self.tx.capacity() * 2 <= self.tx.max_capacity();
        if ephemeral && half_full {
            return Offer::Dropped;
        }
        if queued > 0 && queued + len > self.max_bytes {
            return if ephemeral {
                Offer::Dropped
            } else {
                Offer::Full
            };
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        match self.tx.try_send(frame) {
            Ok(()) => Offer::Queued,
            Err(e) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) if ephemeral => Offer::Dropped,
                    mpsc::error::TrySendError::Full(_) => Offer::Full,
                    mpsc::error::TrySendError::Closed(_) => Offer::Closed,
                }
            }
        }
    }
}

/// One local session in one channel.
#[derive(Clone, Debug)]
pub struct Member {
    /// Connection number, unique within this process.
    pub conn: u64,
    pub username: Username,
    /// Presence key of the connection, unique across replicas.
    pub conn_key: String,
    /// The session's outbound queue of serialized frames.
    pub outlet: Outlet,
    /// Cancelled when the session must close because it reads too slowly.
    pub kick: CancellationToken,
    /// Set when the member's join marker comes through the bus; events before it are
    /// not delivered to this member (they were published before it joined).
    pub live: Arc<AtomicBool>,
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

    /// Whether connection `conn` is still a local member of `channel`.
    pub fn contains(&self, channel: &str, conn: u64) -> bool {
        self.members(channel)
            .is_some_and(|members| members.iter().any(|m| m.conn == conn))
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
        match member.outlet.offer(frame, ephemeral) {
            Offer::Queued => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Offer::Dropped => {
                self.stats.dropped_ephemeral.fetch_add(1, Ordering::Relaxed);
            }
            Offer::Full => {
                if !member.kick.is_cancelled() {
                    self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    member.kick.cancel();
                }
            }
            Offer::Closed => {}
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
        // A traced message: this replica's fan-out joins the sender's trace.
        let span = match &envelope.trace {
            Some(traceparent) => {
                let span = tracing::debug_span!(
                    "chat.deliver",
                    channel,
                    replica = %self.replica,
                    members = members.len(),
                );
                crate::telemetry::set_remote_parent(&span, traceparent);
                span
            }
            None => tracing::Span::none(),
        };
        let _in_span = span.enter();
        if let Some(sent_ms) = envelope.sent_ms {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
            crate::metrics::pubsub_lag(std::time::Duration::from_millis(
                now_ms.saturating_sub(sent_ms),
            ));
        }
        let frame = Bytes::copy_from_slice(envelope.frame.get().as_bytes());
        let origin_conn = envelope
            .origin
            .as_ref()
            .filter(|o| o.replica == self.replica)
            .map(|o| o.conn);
        for member in members.iter() {
            let is_origin = Some(member.conn) == origin_conn;
            if !member.live.load(Ordering::Acquire) {
                // Until its join marker arrives, everything in the stream was published
                // before this member joined: not for it.
                if is_origin && envelope.join {
                    member.live.store(true, Ordering::Release);
                }
                continue;
            }
            if is_origin {
                match (envelope.echo, envelope.client_id.as_deref()) {
                    (Echo::Others | Echo::Nobody, _) => continue,
                    (Echo::All, Some(client_id)) => {
                        let echoed = with_client_id(envelope.frame.get(), client_id);
                        self.offer(member, Bytes::from(echoed), envelope.ephemeral);
                        continue;
                    }
                    (Echo::All, None) => {}
                }
            } else if envelope.echo == Echo::Nobody {
                continue;
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

    fn resync(&self) {
        // Join markers published while the bus was down are lost: every member is live
        // from here on, and told it may have missed events.
        for (_, members) in self.snapshot() {
            for member in members.iter() {
                member.live.store(true, Ordering::Release);
            }
        }
        let frame = Bytes::from(
            ServerFrame::error(
                "events_missed",
                "the server lost its event feed for a moment and may have missed events: \
                 re-read the channel history to catch up",
            )
            .to_json(),
        );
        for (_, members) in self.snapshot() {
            for member in members.iter() {
                self.offer(member, frame.clone(), false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::event::Origin;
    use crate::chat::model::Timestamp;

    fn member(conn: u64, queue: usize) -> (Member, Outbox) {
        member_with_budget(conn, queue, usize::MAX / 4)
    }

    fn member_with_budget(conn: u64, queue: usize, bytes: usize) -> (Member, Outbox) {
        let (outlet, rx) = outbox(queue, bytes);
        let member = Member {
            conn,
            username: Username::parse(&format!("u{conn}")).unwrap(),
            conn_key: format!("r-{conn}"),
            outlet,
            kick: CancellationToken::new(),
            live: Arc::new(AtomicBool::new(true)),
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
        assert!(rx_a.try_recv().is_none(), "origin excluded");
        assert!(rx_b.try_recv().is_some());

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
        assert!(rx_a.try_recv().is_some());
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
        while rx_fast.try_recv().is_some() {}
        // Slow queue half full: typing dropped for it, delivered to the fast one.
        hub.deliver("c", &typ);
        assert_eq!(hub.stats.dropped_ephemeral.load(Ordering::Relaxed), 1);
        assert!(rx_fast.try_recv().is_some());
        assert!(!kick.is_cancelled());
        hub.deliver("c", &msg);
        hub.deliver("c", &msg);
        assert!(!kick.is_cancelled());
        hub.deliver("c", &msg);
        assert!(kick.is_cancelled(), "full queue kicks the slow reader");
        assert_eq!(hub.stats.slow_consumers.load(Ordering::Relaxed), 1);
        let mut got = 0;
        while rx_fast.try_recv().is_some() {
            got += 1;
        }
        assert_eq!(got, 3, "the fast reader got every message");
    }

    #[test]
    fn a_member_gets_nothing_published_before_its_join_marker() {
        let hub = Hub::new("r");
        let (old, mut rx_old) = member(1, 8);
        let (new, mut rx_new) = member(2, 8);
        new.live.store(false, Ordering::Release);
        let live = new.live.clone();
        hub.add("c", old);
        hub.add("c", new);
        let origin = |conn| Origin {
            replica: "r".into(),
            conn,
        };
        // Published before member 2 joined, delivered after it was added locally.
        hub.deliver(
            "c",
            &Envelope::encode(&deleted(), None, Echo::All, None, false),
        );
        assert!(rx_old.try_recv().is_some());
        assert!(
            rx_new.try_recv().is_none(),
            "not for a member that had not joined"
        );
        // Its join marker goes to nobody, and opens its stream.
        hub.deliver("c", &Envelope::join_marker(origin(2)));
        assert!(live.load(Ordering::Acquire));
        assert!(rx_old.try_recv().is_none() && rx_new.try_recv().is_none());
        hub.deliver(
            "c",
            &Envelope::encode(&deleted(), None, Echo::All, None, false),
        );
        assert!(rx_new.try_recv().is_some());
        assert!(rx_old.try_recv().is_some());
        // Another member's marker is never delivered either.
        hub.deliver("c", &Envelope::join_marker(origin(1)));
        assert!(rx_old.try_recv().is_none() && rx_new.try_recv().is_none());
    }

    #[test]
    fn the_byte_budget_bounds_large_frames() {
        let hub = Hub::new("r");
        let msg = Envelope::encode(&deleted(), None, Echo::All, None, false);
        let frame_len = Envelope::decode(&msg).unwrap().frame.get().len();
        // Room for two frames by bytes, though the channel takes a hundred.
        let (slow, mut rx) = member_with_budget(1, 100, frame_len * 2 + 1);
        let kick = slow.kick.clone();
        hub.add("c", slow);
        hub.deliver("c", &msg);
        hub.deliver("c", &msg);
        assert!(!kick.is_cancelled());
        hub.deliver("c", &msg);
        assert!(kick.is_cancelled(), "over the byte budget");
        // Reading frees the budget.
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
        let (big_ok, mut rx2) = member_with_budget(2, 100, 1);
        hub.add("d", big_ok);
        hub.deliver("d", &msg);
        assert!(
            rx2.try_recv().is_some(),
            "one frame over the budget passes an empty queue"
        );
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
