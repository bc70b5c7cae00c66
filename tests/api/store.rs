//! One conformance suite for both stores: what the chat service relies on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatgate::bus::memory::MemoryBus;
use chatgate::bus::redis::{BusTimeouts, RedisBus};
use chatgate::bus::{Bus, Deliver};
use chatgate::chat::model::{ChannelName, MessageId, Username};
use chatgate::store::memory::MemoryStore;
use chatgate::store::redis::{Keys, RedisStore};
use chatgate::store::{Appended, Deleted, NewEntry, PresenceMember, Store, StoreSettings};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::helpers::{RedisServer, WAIT};

/// Records what the store published, per channel, and lets the test await it.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, String)>>,
    arrived: Notify,
}

impl Deliver for Recorder {
    fn deliver(&self, channel: &str, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload).to_string();
        self.events
            .lock()
            .unwrap()
            .push((channel.to_string(), text));
        self.arrived.notify_waiters();
    }

    fn has_members(&self, _channel: &str) -> bool {
        true
    }

    fn channels(&self) -> Vec<String> {
        Vec::new()
    }

    fn resync(&self) {}
}

impl Recorder {
    /// Waits until `n` events have arrived and returns them (channel, frame type).
    async fn take(&self, n: usize) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.arrived.notified();
            {
                let mut events = self.events.lock().unwrap();
                if events.len() >= n {
                    return events
                        .drain(..n)
                        .map(|(channel, payload)| {
                            let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
                            (
                                channel,
                                v["frame"]["type"].as_str().unwrap_or("?").to_string(),
                            )
                        })
                        .collect();
                }
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .expect("events arrive");
        }
    }

    fn pending(&self) -> usize {
        self.events.lock().unwrap().len()
    }
}

fn settings() -> StoreSettings {
    StoreSettings {
        history_max: 5,
        history_max_bytes: 2000,
        history_ttl_secs: 3600,
        presence_ttl_ms: 400,
        typing_ttl_secs: 10,
    }
}

fn event(kind: &str) -> Vec<u8> {
    format!(r#"{{"v":1,"echo":"all","frame":{{"type":"{kind}"}}}}"#).into_bytes()
}

/// The bus event of a message, up to its entry.
fn message_head() -> Vec<u8> {
    chatgate::chat::event::Envelope::message_head(None, None, None)
}

fn entry(id: &str) -> String {
    format!(
        r#"{{"sender":"s","content":"{id}","channel":"c","message_type":"text","timestamp":"2024-01-01T00:00:00Z","message_id":"{id}"}}"#
    )
}

/// Appends `json` as message `id` of owner `s`, creating the channel if need be.
async fn append(store: &dyn Store, channel: &ChannelName, id: &str, json: &str) {
    let new = NewEntry {
        id,
        owner: "s",
        json,
    };
    assert_eq!(
        store
            .append(channel, new, &message_head(), true)
            .await
            .unwrap(),
        Appended::Stored
    );
}

fn ch(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

fn user(name: &str) -> Username {
    Username::parse(name).unwrap()
}

async fn conformance(store: Arc<dyn Store>, recorder: Arc<Recorder>) {
    store.ping().await.unwrap();
    let c = ch("conf");

    // History: newest `history_max` kept, returned oldest first; one event per append.
    for i in 0..7 {
        let id = format!("id{i}");
        append(&*store, &c, &id, &entry(&id)).await;
    }
    let all = 1 << 20;
    let history = store.history(&c, 10, all).await.unwrap();
    assert_eq!(
        history,
        (
            (2..7).map(|i| entry(&format!("id{i}"))).collect::<Vec<_>>(),
            false
        )
    );
    assert_eq!(
        store.history(&c, 2, all).await.unwrap(),
        (vec![entry("id5"), entry("id6")], false)
    );
    // A byte budget keeps the newest entries that fit, and says it cut.
    let two = entry("id5").len() + entry("id6").len();
    assert_eq!(
        store.history(&c, 10, two).await.unwrap(),
        (vec![entry("id5"), entry("id6")], true)
    );
    // The newest entry comes back even when it alone is over the budget.
    assert_eq!(
        store.history(&c, 10, 1).await.unwrap(),
        (vec![entry("id6")], true)
    );
    assert!(
        store
            .history(&ch("none"), 10, all)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let events = recorder.take(7).await;
    assert!(
        events
            .iter()
            .all(|(channel, kind)| channel == "conf" && kind == "message")
    );

    // Without `create`, a channel with no history is left alone; one with history takes
    // the message.
    let fresh = NewEntry {
        id: "a",
        owner: "s",
        json: &entry("a"),
    };
    assert_eq!(
        store
            .append(&ch("alpha"), fresh, &message_head(), false)
            .await
            .unwrap(),
        Appended::WouldCreate
    );
    assert_eq!(store.channels().await.unwrap(), ["conf"], "nothing stored");
    assert_eq!(recorder.pending(), 0, "nothing published");
    assert_eq!(
        store
            .append(&ch("alpha"), fresh, &message_head(), true)
            .await
            .unwrap(),
        Appended::Stored
    );
    recorder.take(1).await;

    // Channels: those with history, sorted.
    assert_eq!(store.channels().await.unwrap(), ["alpha", "conf"]);

    // Delete by id: exact, evented, NotFound when absent, NotOwner (and nothing removed,
    // nothing published) for someone else's message; the last delete empties the channel.
    let id = |s: &str| MessageId::parse(s).unwrap();
    let deleted = event("message_deleted");
    assert_eq!(
        store
            .delete(&c, &id("id4"), Some("mallory"), &deleted)
            .await
            .unwrap(),
        Deleted::NotOwner
    );
    assert_eq!(
        store
            .delete(&c, &id("id4"), Some("s"), &deleted)
            .await
            .unwrap(),
        Deleted::Done
    );
    assert_eq!(
        recorder.take(1).await,
        [("conf".to_string(), "message_deleted".to_string())]
    );
    for absent in ["id4", "id0"] {
        assert_eq!(
            store.delete(&c, &id(absent), None, &deleted).await.unwrap(),
            Deleted::NotFound
        );
    }
    assert_eq!(store.history(&c, 10, 1 << 20).await.unwrap().0.len(), 4);
    assert_eq!(
        store
            .delete(&ch("alpha"), &id("a"), None, &deleted)
            .await
            .unwrap(),
        Deleted::Done
    );
    recorder.take(1).await;
    assert_eq!(store.channels().await.unwrap(), ["conf"]);

    // The byte cap (2000) trims the oldest entries as well; the newest always stays.
    let b = ch("bytes");
    for i in 0..5 {
        let id = format!("b{i}");
        append(&*store, &b, &id, &entry(&id)).await;
    }
    let big = entry(&"x".repeat(750));
    append(&*store, &b, "big", &big).await;
    let (kept, _) = store.history(&b, 10, all).await.unwrap();
    assert!(kept.iter().map(String::len).sum::<usize>() <= 2000);
    assert_eq!(kept.last(), Some(&big));
    assert_eq!(kept[0], entry("b2"), "the two oldest went: {kept:?}");
    let huge = entry(&"y".repeat(3000));
    append(&*store, &b, "huge", &huge).await;
    assert_eq!(store.history(&b, 10, all).await.unwrap().0, [huge]);
    // Deleting what is left frees its bytes: a new entry is not trimmed for them.
    assert_eq!(
        store.delete(&b, &id("huge"), None, &deleted).await.unwrap(),
        Deleted::Done
    );
    append(&*store, &b, "b9", &entry("b9")).await;
    append(&*store, &b, "big", &big).await;
    assert_eq!(store.history(&b, 10, all).await.unwrap().0.len(), 2);
    recorder.take(10).await;

    // Presence: first join and last leave announce; other tabs publish only a marker.
    let p = ch("presence");
    assert!(
        store
            .join(
                &p,
                &user("bob"),
                "r-1",
                &event("user_joined"),
                &event("marker")
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .join(
                &p,
                &user("bob"),
                "r-2",
                &event("user_joined"),
                &event("marker")
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .join(
                &p,
                &user("amy"),
                "r-3",
                &event("user_joined"),
                &event("marker")
            )
            .await
            .unwrap()
    );
    let kinds: Vec<String> = recorder.take(3).await.into_iter().map(|(_, k)| k).collect();
    assert_eq!(kinds, ["user_joined", "marker", "user_joined"]);
    let names = |entries: Vec<chatgate::store::PresenceEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.username).collect()
    };
    assert_eq!(names(store.online(&p).await.unwrap()), ["amy", "bob"]);
    assert!(
        !store
            .leave(&p, &user("bob"), "r-1", &event("user_left"))
            .await
            .unwrap()
    );
    assert_eq!(names(store.online(&p).await.unwrap()), ["amy", "bob"]);
    assert!(
        store
            .leave(&p, &user("bob"), "r-2", &event("user_left"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .leave(&p, &user("bob"), "r-2", &event("user_left"))
            .await
            .unwrap(),
        "idempotent"
    );
    assert_eq!(
        recorder.take(1).await,
        [("presence".to_string(), "user_left".to_string())]
    );
    assert_eq!(names(store.online(&p).await.unwrap()), ["amy"]);

    // A refresh racing a leave never brings the connection back; it reports it missing.
    let bob2 = PresenceMember {
        username: user("bob"),
        conn_key: "r-2".into(),
    };
    let amy3 = PresenceMember {
        username: user("amy"),
        conn_key: "r-3".into(),
    };
    assert_eq!(store.refresh(&p, &[amy3, bob2]).await.unwrap(), [1]);
    assert_eq!(names(store.online(&p).await.unwrap()), ["amy"]);

    // Unrefreshed connections expire (a dead replica); refreshed ones stay.
    let amy = PresenceMember {
        username: user("amy"),
        conn_key: "r-3".into(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::Instant::now() < deadline {
        assert!(
            store
                .refresh(&p, std::slice::from_ref(&amy))
                .await
                .unwrap()
                .is_empty()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        names(store.online(&p).await.unwrap()),
        ["amy"],
        "refreshed past 3 TTLs"
    );
    assert!(
        store
            .join(
                &p,
                &user("ghost"),
                "dead-1",
                &event("user_joined"),
                &event("marker")
            )
            .await
            .unwrap()
    );
    recorder.take(1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.refresh(&p, std::slice::from_ref(&amy)).await.unwrap();
    assert_eq!(
        names(store.online(&p).await.unwrap()),
        ["amy"],
        "ghost expired"
    );
    let last_seen = store.online(&p).await.unwrap()[0].last_seen_ms;
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        (now - last_seen).abs() < 5_000,
        "last_seen is recent: {last_seen} vs {now}"
    );

    // Typing publishes both ways.
    store
        .typing(&p, &user("amy"), true, &event("typing_status"))
        .await
        .unwrap();
    store
        .typing(&p, &user("amy"), false, &event("typing_status"))
        .await
        .unwrap();
    assert_eq!(recorder.take(2).await.len(), 2);
    assert_eq!(recorder.pending(), 0, "nothing else was published");
}

#[tokio::test]
async fn memory_store_conforms() {
    let recorder = Arc::new(Recorder::default());
    let bus = Arc::new(MemoryBus::new(recorder.clone()));
    conformance(Arc::new(MemoryStore::new(settings(), bus)), recorder).await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let redis = RedisServer::start().await;
    redis_conformance(&crate::helpers::test_config(Some(&redis), &[])).await;
}

#[tokio::test]
async fn redis_store_with_hash_tags_conforms() {
    let redis = RedisServer::start().await;
    let config =
        crate::helpers::test_config(Some(&redis), &[("CHATGATE_REDIS__HASH_TAGS", "true")]);
    redis_conformance(&config).await;
}

#[tokio::test]
async fn redis_cluster_store_conforms() {
    let cluster = crate::topology::RedisCluster::start(3).await;
    let nodes = cluster.seed_urls().join(",");
    let config = crate::helpers::test_config(
        None,
        &[
            ("CHATGATE_REDIS__MODE", "cluster"),
            ("CHATGATE_REDIS__NODES", &nodes),
            ("CHATGATE_STORE__BACKEND", "redis"),
        ],
    );
    redis_conformance(&config).await;
}

#[tokio::test]
async fn redis_sentinel_store_conforms() {
    let sentinels = crate::topology::SentinelSet::start().await;
    let urls = sentinels.sentinel_urls().join(",");
    let config = crate::helpers::test_config(
        None,
        &[
            ("CHATGATE_REDIS__MODE", "sentinel"),
            ("CHATGATE_REDIS__SENTINELS", &urls),
            ("CHATGATE_REDIS__SENTINEL_MASTER", sentinels.master_name()),
            ("CHATGATE_STORE__BACKEND", "redis"),
        ],
    );
    redis_conformance(&config).await;
}

/// The conformance suite on the Redis store and bus as `config` connects them.
async fn redis_conformance(config: &chatgate::config::Config) {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let upstream = chatgate::store::connection::connect(&config.redis, shutdown.clone(), &tracker)
        .await
        .unwrap();
    let keys = Keys::new("conformance:", config.redis.tagged_keys());
    let recorder = Arc::new(Recorder::default());
    let timeouts = BusTimeouts {
        connect: Duration::from_secs(1),
        command: Duration::from_secs(1),
    };
    let bus = RedisBus::start(
        upstream.bus,
        keys.clone(),
        recorder.clone(),
        timeouts,
        shutdown.clone(),
        &tracker,
    );
    for channel in ["conf", "alpha", "presence", "bytes"] {
        bus.subscribe(channel).await.unwrap();
    }
    assert!(bus.is_ready());
    let sharded = config.redis.mode == chatgate::config::RedisMode::Cluster;
    let store = RedisStore::new(upstream.conn, keys, settings(), sharded, None);
    conformance(Arc::new(store), recorder).await;
    shutdown.cancel();
}
