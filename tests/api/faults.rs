//! Redis failures: honest errors, readiness, and recovery by itself.

use crate::helpers::{RedisServer, TestApp, keys};

#[tokio::test]
async fn redis_down_gives_503_and_error_frames_then_recovers() {
    let mut redis = RedisServer::start().await;
    let fast = [
        ("CHATGATE_STORE__PRESENCE_TTL_SECS", "2"),
        ("CHATGATE_STORE__PRESENCE_REFRESH_SECS", "1"),
    ];
    let a = TestApp::spawn(Some(&redis), &fast).await;
    let b = TestApp::spawn(Some(&redis), &fast).await;
    let mut on_a = a.ws("amy", "general").await;
    let mut on_b = b.ws("bob", "general").await;
    assert_eq!(on_a.next().await["type"], "user_joined");
    on_a.say("before", "before").await;
    assert_eq!(on_a.next_of("message").await["client_id"], "before");
    assert_eq!(on_b.next_of("message").await["content"], "before");

    redis.stop();
    for path in [
        "/api/chat/history/general",
        "/api/users/online/general",
        "/api/chat/channels",
    ] {
        let (status, body) = a.get(path).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(keys(&body), ["code", "detail"]);
        assert_eq!(body["code"], "store_unavailable");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            !detail.contains("127.0.0.1") && !detail.to_lowercase().contains("connection"),
            "no internal error text: {detail}"
        );
    }
    let (status, _) = a
        .post(
            "/api/chat/message",
            &serde_json::json!({"sender": "x", "content": "lost"}),
        )
        .await;
    assert_eq!(status, 503);
    let (status, _) = a.delete("/api/chat/message/abc?channel=general").await;
    assert_eq!(status, 503);
    a.wait_ready(503).await;

    // The socket stays open; a send gets an error frame, not an ack.
    on_a.say("during", "during").await;
    let error = on_a.next_of("error").await;
    assert_eq!(error["code"], "store_unavailable");
    assert!(error["retry_after_ms"].as_u64().is_some());
    // New connections are refused before the upgrade.
    let url = format!("ws://127.0.0.1:{}/ws/chat?username=late", a.port);
    assert!(tokio_tungstenite::connect_async(url).await.is_err());

    redis.restart().await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    // Sessions are told that events may have been missed while the bus was down.
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.next_of("error").await["code"], "events_missed");
    }
    // The restarted Redis lost presence; the replicas put their live users back.
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    while a.online("general").await != ["amy", "bob"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence not restored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Both subscribers are back: a message from A reaches B, and A gets its ack.
    on_a.say("after", "after").await;
    assert_eq!(on_a.next_of("message").await["client_id"], "after");
    assert_eq!(on_b.next_of("message").await["content"], "after");
    let history = a.history("general").await;
    let contents: Vec<&str> = history
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        ["after"],
        "the restarted Redis lost its data; nothing false was acked"
    );
}

#[tokio::test]
async fn unreachable_redis_at_startup_is_an_error_not_a_fallback() {
    let port = crate::helpers::free_port();
    let config = crate::helpers::test_config(
        None,
        &[
            (
                "CHATGATE_REDIS__URL",
                &format!("redis://:hunter2@127.0.0.1:{port}/0"),
            ),
            ("CHATGATE_REDIS__STARTUP_TIMEOUT_SECS", "1"),
        ],
    );
    let err = chatgate::Application::build(config)
        .await
        .err()
        .expect("startup fails");
    let text = err.to_string();
    assert!(text.contains("cannot reach Redis"), "{text}");
    assert!(!text.contains("hunter2"), "password redacted: {text}");
}

#[tokio::test]
async fn a_join_cut_short_by_the_request_timeout_leaves_nothing_behind() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(
        Some(&redis),
        &[
            ("CHATGATE_SERVER__REQUEST_TIMEOUT_SECS", "1"),
            ("CHATGATE_REDIS__COMMAND_TIMEOUT_MS", "6000"),
        ],
    )
    .await;
    let mut watcher = app.ws("watcher", "general").await;
    // Redis holds every write for longer than the request timeout: the upgrade handler
    // is dropped while its join waits on Redis.
    let mut conn = redis.connection().await;
    let paused: String = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2500)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(paused, "OK");
    let url = format!("ws://127.0.0.1:{}/ws/chat?username=ghost", app.port);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 408);
        }
        other => panic!("expected the request timeout, got {other:?}"),
    }
    // The join still completed once Redis answered, and was undone.
    let joined = watcher.next_of("user_joined").await;
    assert_eq!(joined["username"], "ghost");
    let left = watcher.next_of("user_left").await;
    assert_eq!(left["username"], "ghost");
    assert_eq!(app.online("general").await, ["watcher"]);
}
