//! chatgate on Redis Cluster and on Sentinel, with real local topologies: the
//! multi-replica chat scenarios on a 3-primary cluster, a slot moving under a live
//! channel, and a Sentinel failover under traffic.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, WAIT, WsClient, test_config};
use crate::topology::{RedisCluster, SentinelSet};

fn cluster_vars(cluster: &RedisCluster) -> Vec<(String, String)> {
    vec![
        ("CHATGATE_REDIS__MODE".into(), "cluster".into()),
        (
            "CHATGATE_REDIS__NODES".into(),
            cluster.seed_urls().join(","),
        ),
        ("CHATGATE_STORE__BACKEND".into(), "redis".into()),
    ]
}

fn sentinel_vars(sentinels: &SentinelSet) -> Vec<(String, String)> {
    vec![
        ("CHATGATE_REDIS__MODE".into(), "sentinel".into()),
        (
            "CHATGATE_REDIS__SENTINELS".into(),
            sentinels.sentinel_urls().join(","),
        ),
        (
            "CHATGATE_REDIS__SENTINEL_MASTER".into(),
            sentinels.master_name().into(),
        ),
        ("CHATGATE_REDIS__SENTINEL_POLL_MS".into(), "200".into()),
        ("CHATGATE_STORE__BACKEND".into(), "redis".into()),
    ]
}

async fn spawn(vars: &[(String, String)], extra: &[(&str, &str)]) -> TestApp {
    let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    TestApp::spawn_with(test_config(None, &all)).await
}

fn contents(history: &[Value]) -> Vec<String> {
    history
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `check` holds, polling (bounded by `WAIT`).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_replicas_on_a_cluster_chat_across_shards() {
    let cluster = RedisCluster::start(3).await;
    let vars = cluster_vars(&cluster);
    let limits = [
        ("CHATGATE_LIMITS__ENABLED", "true"),
        ("CHATGATE_LIMITS__MESSAGES_PER_MINUTE", "6"),
        ("CHATGATE_LIMITS__MESSAGE_BURST", "4"),
    ];
    let a = spawn(&vars, &limits).await;
    let b = spawn(&vars, &limits).await;

    // Channels whose slots live on three different primaries.
    let mut owners = HashSet::new();
    let mut channels = Vec::new();
    for i in 0.. {
        let name = format!("room{i}");
        let slot = RedisCluster::key_slot(&format!("chat:{{{name}}}:messages"));
        if owners.insert(cluster.node_port_for_slot(slot).await) {
            channels.push(name);
        }
        if channels.len() == 3 {
            break;
        }
    }

    for channel in &channels {
        let mut amy = a.ws("amy", channel).await;
        let mut bob = b.ws("bob", channel).await;
        assert_eq!(amy.next_of("user_joined").await["username"], "bob");
        eventually("presence on both replicas", || async {
            a.online(channel).await == ["amy", "bob"] && b.online(channel).await == ["amy", "bob"]
        })
        .await;

        amy.say(&format!("hello {channel}"), "c1").await;
        assert_eq!(amy.next_of("message").await["client_id"], "c1");
        let seen = bob.next_of("message").await;
        assert_eq!(seen["content"], format!("hello {channel}"));
        bob.send_json(json!({"type": "typing_start"})).await;
        assert_eq!(amy.next_of("typing_status").await["username"], "bob");

        // REST send on A, delete on B, both seen by the other side.
        let (status, sent) = a
            .post(
                "/api/chat/message",
                &json!({"sender": "carl", "content": "via rest", "channel": channel}),
            )
            .await;
        assert_eq!(status, 200, "{sent}");
        assert_eq!(bob.next_of("message").await["content"], "via rest");
        let id = sent["data"]["message_id"].as_str().unwrap().to_string();
        let (status, _) = b
            .delete(&format!("/api/chat/message/{id}?channel={channel}"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(amy.next_of("message_deleted").await["message_id"], id);
        assert_eq!(
            contents(&a.history(channel).await),
            [format!("hello {channel}")]
        );

        bob.close().await;
        assert_eq!(amy.next_of("user_left").await["username"], "bob");
        assert_eq!(a.online(channel).await, ["amy"]);
    }
    let (status, listed) = b.get("/api/chat/channels").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = listed["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for channel in &channels {
        assert!(listed.contains(&channel.as_str()), "{listed:?}");
    }

    // One user's budget is shared by both replicas (4 in a burst).
    let mut dan_a = a.ws("dan", &channels[0]).await;
    let mut dan_b = b.ws("dan", &channels[0]).await;
    for i in 0..4 {
        let socket = if i % 2 == 0 { &mut dan_a } else { &mut dan_b };
        assert_eq!(send(socket, &format!("d{i}")).await, Outcome::Acked);
    }
    assert_eq!(
        send(&mut dan_b, "d4").await,
        Outcome::Refused("rate_limited".into())
    );
}

#[tokio::test]
async fn delivery_follows_a_channel_whose_slot_moves() {
    let cluster = RedisCluster::start(3).await;
    let vars = cluster_vars(&cluster);
    let a = spawn(&vars, &[]).await;
    let b = spawn(&vars, &[]).await;
    let mut amy = a.ws("amy", "moving").await;
    let mut bob = b.ws("bob", "moving").await;
    amy.next_of("user_joined").await;
    amy.say("before", "c0").await;
    assert_eq!(bob.next_of("message").await["content"], "before");

    let slot = RedisCluster::key_slot("chat:{moving}:messages");
    let from = cluster.node_port_for_slot(slot).await;
    let to = *cluster.ports().iter().find(|p| **p != from).unwrap();
    // Messages keep coming while the slot (with the channel's history) moves.
    let mut acked = vec!["before".to_string()];
    let mut unknown = Vec::new();
    let sending = async {
        for i in 0..40 {
            let id = format!("during {i}");
            match send(&mut amy, &id).await {
                Outcome::Acked => acked.push(id),
                Outcome::Unknown => unknown.push(id),
                Outcome::Refused(code) => assert_eq!(code, "store_unavailable"),
            }
        }
    };
    tokio::join!(cluster.migrate_slot(slot, to), sending);
    assert_eq!(cluster.node_port_for_slot(slot).await, to);
    assert!(acked.len() > 1, "sends went on during the move: {acked:?}");

    // Both subscribers were unsubscribed by the old owner; they resubscribe on the new
    // one and tell their sessions that events may have been missed meanwhile.
    while bob.next().await["code"] != "events_missed" {}
    if unknown.is_empty() {
        while amy.next().await["code"] != "events_missed" {}
    }
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    for i in 1..=3 {
        let id = format!("after {i}");
        assert_eq!(send(&mut amy, &id).await, Outcome::Acked);
        acked.push(id.clone());
        while bob.next_of("message").await["content"] != id {}
    }
    assert_history(&contents(&b.history("moving").await), &acked, &unknown);
}

#[tokio::test]
async fn a_cluster_node_that_crashes_and_returns_gets_its_subscribers_back() {
    let mut cluster = RedisCluster::start(3).await;
    let vars = cluster_vars(&cluster);
    let a = spawn(&vars, &[]).await;
    let b = spawn(&vars, &[]).await;
    let mut amy = a.ws("amy", "general").await;
    let mut bob = b.ws("bob", "general").await;
    amy.next_of("user_joined").await;
    assert_eq!(send(&mut amy, "before").await, Outcome::Acked);
    assert_eq!(bob.next_of("message").await["content"], "before");

    // The node that owns the channel crashes: sends fail with error frames, never acks,
    // and neither replica claims to be ready.
    let owner = cluster
        .node_port_for_slot(RedisCluster::key_slot("chat:{general}:events"))
        .await;
    cluster.kill(owner);
    assert_eq!(
        send(&mut amy, "during").await,
        Outcome::Refused("store_unavailable".into())
    );
    a.wait_ready(503).await;
    b.wait_ready(503).await;

    // It comes back (empty: nothing persists in this cluster). Both buses reconnect and
    // subscribe again by themselves, tell their sessions, and delivery resumes.
    cluster.restart(owner).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    while bob.next().await["code"] != "events_missed" {}
    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..3 {
        let id = format!("after {i}");
        match send(&mut amy, &id).await {
            Outcome::Acked => {
                while bob.next_of("message").await["content"] != id {}
                acked.push(id);
            }
            Outcome::Unknown => unknown.push(id),
            Outcome::Refused(code) => panic!("{id} refused after recovery: {code}"),
        }
    }
    assert!(!acked.is_empty(), "delivery resumed");
    assert_history(&contents(&a.history("general").await), &acked, &unknown);
}

#[tokio::test]
async fn sentinel_failover_loses_no_acknowledged_message_and_delivery_resumes() {
    let mut sentinels = SentinelSet::start().await;
    let vars = sentinel_vars(&sentinels);
    // Each message is confirmed by the replica before it is acknowledged.
    let durable = [("CHATGATE_REDIS__WAIT_REPLICAS", "1")];
    let a = spawn(&vars, &durable).await;
    let b = spawn(&vars, &durable).await;
    let mut amy = a.ws("amy", "general").await;
    let mut bob = b.ws("bob", "general").await;
    amy.next_of("user_joined").await;

    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    let mut refused = 0;
    let mut sent = 0;
    // Under traffic: the primary dies after the 5th message; keep sending until the
    // replica has been promoted and messages are acknowledged again.
    let killed_at = 5;
    let mut failed_over = false;
    // Detection and election take seconds; a split vote retries after the failover
    // timeout. Generous, for a loaded machine.
    let deadline = tokio::time::Instant::now() + 4 * WAIT;
    while acked.len() < killed_at + 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery did not resume"
        );
        if sent == killed_at {
            sentinels.kill_primary();
            // No primary: neither replica claims to be ready.
            a.wait_ready(503).await;
            b.wait_ready(503).await;
        }
        let id = format!("m{sent}");
        sent += 1;
        match send(&mut amy, &id).await {
            Outcome::Acked => acked.push(id),
            Outcome::Unknown => unknown.push(id),
            Outcome::Refused(code) => {
                assert_eq!(code, "store_unavailable");
                refused += 1;
                if !failed_over {
                    sentinels.wait_failover().await;
                    failed_over = true;
                }
                a.wait_ready(200).await;
            }
        }
    }
    assert!(refused >= 1, "the outage was seen");
    assert!(failed_over);
    assert_history(&contents(&b.history("general").await), &acked, &unknown);

    // Delivery between the replicas resumed on the new primary without a restart.
    b.wait_ready(200).await;
    assert_eq!(send(&mut amy, "from a").await, Outcome::Acked);
    while bob.next_of("message").await["content"] != "from a" {}
    assert_eq!(send(&mut bob, "from b").await, Outcome::Acked);
    assert_eq!(amy.next_of("message").await["content"], "from b");
}

/// What became of a sent message, as its sender sees it.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Its echo (with the client id) came back.
    Acked,
    /// An error frame refused it, with this code.
    Refused(String),
    /// `events_missed` came first: the bus lost events, the echo may be among them, and
    /// the message may or may not be stored (a client re-reads history).
    Unknown,
}

/// Sends a text message with `id` as content and client id, and waits for its fate.
async fn send(client: &mut WsClient, id: &str) -> Outcome {
    client.say(id, id).await;
    loop {
        let frame = client.next().await;
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("message"), _) if frame["client_id"] == id => return Outcome::Acked,
            (Some("error"), Some("events_missed")) => return Outcome::Unknown,
            (Some("error"), Some(code)) => return Outcome::Refused(code.to_string()),
            _ => {}
        }
    }
}

/// History holds every acknowledged message exactly once and in order, and besides them
/// only messages whose fate was unknown, each at most once.
fn assert_history(history: &[String], acked: &[String], unknown: &[String]) {
    let in_history: Vec<&String> = history.iter().filter(|c| acked.contains(c)).collect();
    assert_eq!(
        in_history,
        acked.iter().collect::<Vec<_>>(),
        "acked {acked:?}, history {history:?}"
    );
    for entry in history {
        assert!(
            acked.contains(entry)
                || (unknown.contains(entry) && history.iter().filter(|h| *h == entry).count() == 1),
            "{entry} in history was neither acknowledged nor pending: {history:?}"
        );
    }
}
