//! Reliability: resuming after a reconnect (`since=`), and faults under traffic with an
//! account of what was acknowledged against what history holds.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::helpers::{Process, RedisServer, TestApp, WAIT, WsClient};

/// Sends `content` and waits for its echo (the acknowledgement, with its message id) or
/// an error frame for it.
async fn send_and_wait(ws: &mut WsClient, content: &str, client_id: &str) -> Option<String> {
    ws.say(content, client_id).await;
    loop {
        let frame = ws.next().await;
        if frame["client_id"] == client_id {
            return match frame["type"].as_str() {
                Some("message") => Some(frame["message_id"].as_str().unwrap().to_string()),
                _ => None,
            };
        }
    }
}

/// The next numbered message.
async fn send_next(ws: &mut WsClient, n: &mut u32) -> Option<String> {
    *n += 1;
    send_and_wait(ws, &format!("m{n}"), &format!("c{n}")).await
}

/// Every acknowledged id is in history exactly once.
fn assert_acked_exactly_once(acked: &[String], history: &[Value]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for message in history {
        *counts
            .entry(message["message_id"].as_str().unwrap())
            .or_default() += 1;
    }
    for id in acked {
        assert_eq!(
            counts.get(id.as_str()),
            Some(&1),
            "acknowledged {id} not in history exactly once"
        );
    }
    assert!(
        counts.values().all(|n| *n == 1),
        "a message is in history twice"
    );
}

#[tokio::test]
async fn a_reconnecting_client_gets_what_it_missed_or_a_gap_signal() {
    let app = TestApp::spawn(None, &[]).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                app.send("ann", "resume", &format!("m{i}")).await["message_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        ids
    };
    // Seen up to m1: m2..m4 come back, oldest first, then `resumed`.
    let mut ws = WsClient::connect_query(
        app.port,
        &format!("username=bo&channel=resume&since={}", ids[1]),
    )
    .await;
    let mut replayed = Vec::new();
    let done = loop {
        let frame = ws.next().await;
        match frame["type"].as_str() {
            Some("message") => replayed.push(frame["content"].as_str().unwrap().to_string()),
            Some("resumed") => break frame,
            _ => {}
        }
    };
    assert_eq!(replayed, ["m2", "m3", "m4"]);
    assert_eq!(done["replayed"], 3);
    assert_eq!(done["complete"], true);
    assert_eq!(done["since"], ids[1].as_str());
    // Live events follow.
    let live = app.send("ann", "resume", "live").await["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(ws.next_of("message").await["content"], "live");

    // Up to date: nothing to replay, complete.
    let mut ws = WsClient::connect_query(
        app.port,
        &format!("username=cy&channel=resume&since={live}"),
    )
    .await;
    let done = ws.next_of("resumed").await;
    assert_eq!(
        (done["replayed"].as_u64(), done["complete"].as_bool()),
        (Some(0), Some(true))
    );

    // An id the history no longer has: an explicit gap, never a silent partial replay.
    let mut ws = WsClient::connect_query(
        app.port,
        "username=di&channel=resume&since=0193a1d2-0000-7000-8000-000000000000",
    )
    .await;
    let done = ws.next_of("resumed").await;
    assert_eq!(
        (done["replayed"].as_u64(), done["complete"].as_bool()),
        (Some(0), Some(false))
    );

    // A malformed id is refused before the upgrade.
    let url = format!("ws://127.0.0.1:{}/ws/chat?username=e&since=a%22b", app.port);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 400);
        }
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn redis_restart_under_traffic_loses_no_acknowledged_message() {
    let mut redis = RedisServer::start_persistent().await;
    let vars = [
        ("CHATGATE_REDIS__COMMAND_TIMEOUT_MS", "500"),
        ("CHATGATE_REDIS__CONNECT_TIMEOUT_MS", "300"),
    ];
    let a = TestApp::spawn(Some(&redis), &vars).await;
    let b = TestApp::spawn(Some(&redis), &vars).await;
    let mut receiver = b.ws("rita", "fault").await;
    let mut sender = a.ws("sam", "fault").await;
    receiver.next_of("user_joined").await;

    let mut acked = Vec::new();
    let mut refused = 0;
    let mut n = 0;
    // Before the outage.
    for _ in 0..10 {
        acked.push(
            send_next(&mut sender, &mut n)
                .await
                .expect("acknowledged before the outage"),
        );
    }
    // Redis goes away for ten seconds of traffic: sends get error frames (never a false
    // ack), sockets stay open, and readiness fails.
    let outage = tokio::time::Instant::now();
    redis.stop();
    a.wait_ready(503).await;
    while outage.elapsed() < std::time::Duration::from_secs(10) {
        match send_next(&mut sender, &mut n).await {
            Some(id) => acked.push(id),
            None => refused += 1,
        }
    }
    assert!(refused >= 1, "sends during the outage are refused");
    // Redis is back: readiness recovers, the bus resubscribes by itself, and sending works
    // on the same sockets.
    redis.restart().await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let first_after = loop {
        if let Some(id) = send_next(&mut sender, &mut n).await {
            break id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sending never recovered"
        );
    };
    acked.push(first_after);
    for _ in 0..10 {
        acked.push(
            send_next(&mut sender, &mut n)
                .await
                .expect("acknowledged after the outage"),
        );
    }
    // The receiver on the other replica was told it may have missed events, and gets
    // the messages sent after the restart.
    let mut seen_missed = false;
    let mut received = HashSet::new();
    while received.len() < 10 || !seen_missed {
        let frame = receiver.next().await;
        match frame["type"].as_str() {
            Some("error") if frame["code"] == "events_missed" => seen_missed = true,
            Some("message") => {
                received.insert(frame["message_id"].as_str().unwrap().to_string());
            }
            _ => {}
        }
        if acked[acked.len() - 10..]
            .iter()
            .all(|id| received.contains(id))
            && seen_missed
        {
            break;
        }
    }
    assert_acked_exactly_once(&acked, &a.history("fault").await);
}

#[tokio::test]
async fn a_slow_redis_means_bounded_waits_and_error_frames_not_pile_ups() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(
        Some(&redis),
        &[("CHATGATE_REDIS__COMMAND_TIMEOUT_MS", "300")],
    )
    .await;
    let mut ws = app.ws("sam", "slow").await;
    assert!(send_and_wait(&mut ws, "before", "c0").await.is_some());
    // Redis stops answering for five seconds (it is busy, not gone).
    let mut admin = redis.connection().await;
    let mut probe = redis.connection().await;
    let stall = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(5)
            .query_async(&mut admin)
            .await;
    });
    // Wait until Redis is really stalled: a PING on another connection goes unanswered.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut probe);
        // Unanswered within a second, or failed by the client's own response timeout.
        if !matches!(
            tokio::time::timeout(std::time::Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        ) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never stalled"
        );
    }
    // Sends during the stall are refused after the bounded wait, not queued forever, and
    // the socket stays open.
    let mut refused = 0;
    for i in 1..=3 {
        if send_and_wait(&mut ws, "during", &format!("c{i}"))
            .await
            .is_none()
        {
            refused += 1;
        }
    }
    assert!(refused >= 1, "a send during the stall got an error frame");
    stall.await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 10;
    loop {
        n += 1;
        if send_and_wait(&mut ws, "after", &format!("c{n}"))
            .await
            .is_some()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sending never recovered"
        );
    }
}

#[tokio::test]
async fn a_killed_replica_loses_no_acknowledged_message() {
    let redis = RedisServer::start().await;
    let mut a = Process::spawn(&redis, &[("CHATGATE_LIMITS__ENABLED", "false")]).await;
    let b = Process::spawn(&redis, &[("CHATGATE_LIMITS__ENABLED", "false")]).await;
    let mut receiver = WsClient::connect(b.port, "rita", "kill").await;
    let mut sender = WsClient::connect(a.port, "sam", "kill").await;
    receiver.next_of("user_joined").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(
            send_and_wait(&mut sender, &format!("m{i}"), &format!("c{i}"))
                .await
                .expect("acknowledged"),
        );
    }
    // One more in flight while the replica dies: it may or may not be stored, but it
    // was never acknowledged, so it does not count.
    sender.say("in flight", "c-last").await;
    a.signal("KILL");
    a.wait_exit().await;
    // The other replica still serves; every acknowledged message is in its history once.
    let mut received = HashSet::new();
    while !acked.iter().all(|id| received.contains(id)) {
        let frame = receiver.next_of("message").await;
        received.insert(frame["message_id"].as_str().unwrap().to_string());
    }
    let history: Vec<Value> = crate::helpers::http_client()
        .get(format!(
            "http://127.0.0.1:{}/api/chat/history/kill?limit=1000",
            b.port
        ))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["messages"]
        .as_array()
        .unwrap()
        .clone();
    assert_acked_exactly_once(&acked, &history);
}
