//! The WebSocket protocol, frame by frame against the seed document and DESIGN's
//! deliberate differences (echo with message_id and client_id, error frames, `Z` times).

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{RedisServer, TestApp, WsClient, keys};

#[tokio::test]
async fn upgrade_needs_a_valid_username_and_gives_no_101_otherwise() {
    let app = TestApp::spawn(None, &[]).await;
    for query in [
        "",
        "?channel=general",
        "?username=a:b",
        "?username=ok&channel=a*b",
    ] {
        let url = format!("ws://127.0.0.1:{}/ws/chat{query}", app.port);
        let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
        match err {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                assert_eq!(response.status().as_u16(), 400, "{query}");
            }
            other => panic!("{query}: expected an HTTP 400, got {other:?}"),
        }
    }
}

async fn chat_round_trip(app: &TestApp) {
    let mut bob = app.ws("bob", "general").await;
    let mut alice = app.ws("alice", "general").await;
    let joined = bob.next().await;
    assert_eq!(keys(&joined), ["channel", "timestamp", "type", "username"]);
    assert_eq!(joined["type"], "user_joined");
    assert_eq!(joined["username"], "alice");

    // The original's frame, sender and channel included (both ignored).
    alice
        .send_json(
            json!({"type": "message", "sender": "mallory", "content": "Hello world!",
            "channel": "elsewhere", "message_type": "text", "client_id": "c-1"}),
        )
        .await;
    // On Redis, alice may first see bob's own user_joined: it was published before she
    // joined but reached this replica's subscriber after (see docs/protocol.md).
    let echo = alice.next_of("message").await;
    assert_eq!(echo["type"], "message");
    assert_eq!(echo["client_id"], "c-1", "echo carries the client id");
    assert_eq!(
        echo["sender"], "alice",
        "identity is the connection's, not the frame's"
    );
    let seen = bob.next().await;
    assert_eq!(
        keys(&seen),
        [
            "channel",
            "content",
            "message_id",
            "message_type",
            "sender",
            "timestamp",
            "type"
        ]
    );
    assert_eq!(seen["content"], "Hello world!");
    assert_eq!(seen["channel"], "general");
    assert_eq!(seen["message_id"], echo["message_id"]);
    assert!(seen["timestamp"].as_str().unwrap().ends_with('Z'));

    // No type at all still means a message (as in the original's documented client).
    bob.send_json(json!({"sender": "bob", "content": "typeless"}))
        .await;
    assert_eq!(alice.next_of("message").await["content"], "typeless");
    let bob_echo = bob.next_of("message").await;
    assert!(bob_echo.get("client_id").is_none());

    let history = app.history("general").await;
    let ids: Vec<&str> = history
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            echo["message_id"].as_str().unwrap(),
            bob_echo["message_id"].as_str().unwrap()
        ]
    );

    // REST sends and deletes reach sockets.
    let data = app.send("carol", "general", "from rest").await;
    assert_eq!(
        alice.next_of("message").await["message_id"],
        data["message_id"]
    );
    assert_eq!(bob.next().await["message_id"], data["message_id"]);
    let id = data["message_id"].as_str().unwrap();
    let (status, _) = app
        .delete(&format!("/api/chat/message/{id}?channel=general"))
        .await;
    assert_eq!(status, 200);
    let deleted = bob.next().await;
    assert_eq!(
        keys(&deleted),
        ["channel", "message_id", "timestamp", "type"]
    );
    assert_eq!(deleted["type"], "message_deleted");
    assert_eq!(deleted["message_id"], id);
    assert_eq!(
        alice.next_of("message_deleted").await["type"],
        "message_deleted"
    );
}

#[tokio::test]
async fn chat_round_trip_in_memory() {
    chat_round_trip(&TestApp::spawn(None, &[]).await).await;
}

#[tokio::test]
async fn chat_round_trip_on_redis() {
    let redis = RedisServer::start().await;
    chat_round_trip(&TestApp::spawn(Some(&redis), &[]).await).await;
}

#[tokio::test]
async fn channels_are_isolated() {
    let app = TestApp::spawn(None, &[]).await;
    let mut here = app.ws("bob", "here").await;
    let mut there = app.ws("amy", "there").await;
    there.say("only there", "1").await;
    assert_eq!(there.next().await["content"], "only there");
    here.say("only here", "2").await;
    let frame = here.next().await;
    assert_eq!(
        frame["content"], "only here",
        "nothing from the other channel came first"
    );
}

async fn presence_and_typing(app: &TestApp) {
    let mut watcher = app.ws("watcher", "room").await;
    let mut tab1 = app.ws("bob", "room").await;
    assert_eq!(watcher.next().await["type"], "user_joined");
    let tab2 = app.ws("bob", "room").await;
    assert_eq!(app.online("room").await, ["bob", "watcher"]);

    // Typing goes to the others, not the typist.
    tab1.send_json(json!({"type": "typing_start", "sender": "bob", "channel": "room"}))
        .await;
    let typing = watcher.next().await;
    assert_eq!(
        keys(&typing),
        ["channel", "is_typing", "timestamp", "type", "username"]
    );
    assert_eq!(
        (typing["type"].as_str(), typing["is_typing"].as_bool()),
        (Some("typing_status"), Some(true))
    );
    assert_eq!(typing["username"], "bob");

    // A second tab joined without a second user_joined; closing it keeps bob online.
    tab2.close().await;
    assert_eq!(app.online("room").await, ["bob", "watcher"]);

    // The typist disconnects while typing: peers see typing stop, then bob leave.
    tab1.close().await;
    let stop = watcher.next().await;
    assert_eq!(
        (stop["type"].as_str(), stop["is_typing"].as_bool()),
        (Some("typing_status"), Some(false))
    );
    let left = watcher.next().await;
    assert_eq!(keys(&left), ["channel", "timestamp", "type", "username"]);
    assert_eq!(
        (left["type"].as_str(), left["username"].as_str()),
        (Some("user_left"), Some("bob"))
    );
    assert_eq!(app.online("room").await, ["watcher"]);

    let (_, body) = app.get("/api/users/online/room").await;
    assert_eq!(keys(&body), ["channel", "count", "online_users"]);
    let user = &body["online_users"][0];
    assert_eq!(keys(user), ["last_seen", "status", "username"]);
    assert_eq!(user["status"], "online");
    assert!(user["last_seen"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn presence_and_typing_in_memory() {
    presence_and_typing(&TestApp::spawn(None, &[]).await).await;
}

#[tokio::test]
async fn presence_and_typing_on_redis() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    presence_and_typing(&app).await;
    let mut conn = redis.connection().await;
    let typing: Option<String> = redis::cmd("GET")
        .arg("typing:room:bob")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(typing, None, "typing key cleared on disconnect");
}

#[tokio::test]
async fn presence_survives_past_its_ttl_while_connected() {
    // TTL 2 s, refreshed every second: a connection kept for several TTLs stays online.
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(
        Some(&redis),
        &[
            ("CHATGATE_STORE__PRESENCE_TTL_SECS", "2"),
            ("CHATGATE_STORE__PRESENCE_REFRESH_SECS", "1"),
        ],
    )
    .await;
    let _bob = app.ws("bob", "long").await;
    // Wait until refreshes have moved bob's deadline three TTLs past the first one.
    let mut conn = redis.connection().await;
    let first: f64 = redis::cmd("ZSCORE")
        .arg("chat:long:presence")
        .arg("bob")
        .query_async(&mut conn)
        .await
        .unwrap();
    loop {
        let now: f64 = redis::cmd("ZSCORE")
            .arg("chat:long:presence")
            .arg("bob")
            .query_async(&mut conn)
            .await
            .unwrap();
        if now >= first + 6000.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(app.online("long").await, ["bob"]);
}

#[tokio::test]
async fn no_half_dead_sockets() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_WS__MAX_MESSAGE_BYTES", "1100000"),
            ("CHATGATE_CHAT__MAX_IMAGE_BYTES", "500000"),
            ("CHATGATE_CHAT__MAX_AUDIO_BYTES", "500000"),
        ],
    )
    .await;
    let mut peer = app.ws("peer", "general").await;
    let mut client = app.ws("client", "general").await;
    assert_eq!(peer.next().await["type"], "user_joined");

    let cases: [(&str, &str); 6] = [
        ("this is not json", "invalid_json"),
        ("[1,2]", "invalid_frame"),
        ("123", "invalid_frame"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"message","content":123}"#, "invalid_frame"),
        (
            r#"{"type":"message","content":"x","message_type":"weird"}"#,
            "invalid_message_type",
        ),
    ];
    for (text, code) in cases {
        client.send_text(text).await;
        let error = client.next_of("error").await;
        assert_eq!(keys(&error), ["code", "detail", "type"], "{text}");
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some(code)),
            "{text}"
        );
    }
    // Errors about a message carry its client_id.
    client
        .send_json(json!({"content": "x", "message_type": "video", "client_id": "c-9"}))
        .await;
    let error = client.next_of("error").await;
    assert_eq!(
        (error["code"].as_str(), error["client_id"].as_str()),
        (Some("invalid_message_type"), Some("c-9"))
    );
    client
        .socket
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(client.next_of("error").await["code"], "unsupported_binary");

    // Still fully alive: a message goes through, and nobody was told the client left.
    client.say("still alive", "after-errors").await;
    assert_eq!(client.next_of("message").await["client_id"], "after-errors");
    assert_eq!(peer.next().await["content"], "still alive");

    // Oversize closes with 1009.
    let big = format!(r#"{{"content":"{}"}}"#, "a".repeat(1_200_000));
    client.send_text(&big).await;
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
    assert_eq!(peer.next().await["type"], "user_left");
}

#[tokio::test]
async fn silent_clients_are_closed_by_the_heartbeat() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_WS__PING_INTERVAL_SECS", "1"),
            ("CHATGATE_WS__PONG_TIMEOUT_SECS", "1"),
        ],
    )
    .await;
    let mut watcher = app.ws("watcher", "general").await;
    // A client that never reads never answers pings.
    let silent = WsClient::connect(app.port, "silent", "general").await;
    assert_eq!(watcher.next().await["type"], "user_joined");
    // Only the watcher reads, and it answers pings, so only the silent one is closed.
    let left = watcher.next_of("user_left").await;
    assert_eq!(left["username"], "silent");
    let mut silent = silent;
    let close = silent.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4000);
}

#[tokio::test]
async fn a_slow_reader_is_dropped_without_slowing_the_others() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_WS__OUTBOUND_QUEUE", "8"),
            ("CHATGATE_CHAT__MAX_TEXT_BYTES", "60000"),
        ],
    )
    .await;
    let mut fast = app.ws("fast", "general").await;
    let slow = app.ws("slow", "general").await;
    assert_eq!(fast.next().await["type"], "user_joined");
    // 400 messages of 50 KB: far more than socket buffers and the queue hold.
    let content = "x".repeat(50_000);
    let sender = app.ws("sender", "general").await;
    assert_eq!(fast.next().await["type"], "user_joined");
    let mut sender = sender;
    let total = 400;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut slow_left = false;
        while got < total || !slow_left {
            let frame = fast.next().await;
            match frame["type"].as_str() {
                Some("message") => got += 1,
                Some("user_left") if frame["username"] == "slow" => slow_left = true,
                _ => {}
            }
        }
        got
    });
    for i in 0..total {
        sender.say(&content, &i.to_string()).await;
        if i % 8 == 7 {
            // Keep the sender's own echoes flowing so it is not the slow one.
            for _ in 0..8 {
                sender.next_of("message").await;
            }
        }
    }
    assert_eq!(
        reader.await.unwrap(),
        total,
        "the fast reader got everything"
    );
    drop(slow);
    assert_eq!(app.history("general").await.len(), total.min(1000));
}

#[tokio::test]
async fn a_client_close_is_answered_and_message_type_null_means_text() {
    let app = TestApp::spawn(None, &[]).await;
    let mut client = app.ws("bob", "general").await;
    client
        .send_json(json!({"content": "typed null", "message_type": null, "client_id": "n"}))
        .await;
    assert_eq!(client.next().await["message_type"], "text");
    let (status, body) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "a", "content": "x", "message_type": null, "channel": null}),
        )
        .await;
    assert_eq!(
        (status, body["data"]["channel"].as_str()),
        (200, Some("general"))
    );
    let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 1000.into(),
        reason: "bye".into(),
    };
    client.socket.close(Some(normal)).await.unwrap();
    let reply = client
        .closed()
        .await
        .expect("the server answers a close with a close");
    assert_eq!(u16::from(reply.code), 1000);
}
