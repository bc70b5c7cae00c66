//! Hostile input: padded frames and bodies, large payloads at once, byte quotas. Every
//! refusal is explicit and leaves nothing stored; memory bounds are asserted loosely
//! (exact figures belong to the benchmark).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{TestApp, WAIT, WsClient, png};

/// `{"type":<kind>,"content":"x","pad":[{},{},...]}` of about `bytes` bytes.
fn padded(kind: &str, bytes: usize) -> String {
    let pad = "{},".repeat(bytes / 3);
    format!(
        r#"{{"type":"{kind}","content":"x","pad":[{}]}}"#,
        pad.trim_end_matches(',')
    )
}

/// This process's resident set, in bytes (the app runs in the test process).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `POST /api/chat/message` with `body`, answered whatever its status.
async fn send_message(app: &TestApp, body: &Value) -> reqwest::Response {
    app.http
        .post(app.url("/api/chat/message"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads `watcher` until the sentinel message `marker` arrives; returns what came before.
async fn frames_until(watcher: &mut WsClient, marker: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let frame = watcher.next().await;
        if frame["type"] == "message" && frame["content"] == marker {
            return seen;
        }
        seen.push(frame);
    }
}

#[tokio::test]
async fn padded_frames_get_frame_too_large_close_1009_and_peers_receive_nothing() {
    let app = TestApp::spawn(None, &[]).await;
    let mut peer = app.ws("peer", "general").await;
    for kind in ["typing_start", "message"] {
        let mut attacker = app.ws("mallory", "general").await;
        while peer.next_of("user_joined").await["username"] != "mallory" {}
        attacker.send_text(&padded(kind, 2 << 20)).await;
        let refused = attacker.next_of("error").await;
        assert_eq!(refused["code"], "frame_too_large", "{kind}: {refused}");
        let close = attacker.closed().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1009, "{kind}: {close:?}");
        while peer.next_of("user_left").await["username"] != "mallory" {}
    }
    let mut sender = app.ws("sender", "general").await;
    sender.say("sentinel", "c1").await;
    let before = frames_until(&mut peer, "sentinel").await;
    assert!(
        before
            .iter()
            .all(|f| f["type"] != "typing_status" && f["type"] != "message"),
        "the peer got something from the padded frames: {before:?}"
    );
    // Nothing but the sentinel was stored.
    let history = app.history("general").await;
    assert_eq!(history.len(), 1, "{history:?}");
}

#[tokio::test]
async fn padded_rest_bodies_are_413_and_nothing_is_stored() {
    let app = TestApp::spawn(None, &[]).await;
    let body = padded("message", 2 << 20).replacen(
        r#""type":"message""#,
        r#""sender":"amp","channel":"general""#,
        1,
    );
    let response = app
        .http
        .post(app.url("/api/chat/message"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "payload_too_large");
    assert!(app.history("general").await.is_empty());
}

/// The review's case: maximum-size padded bodies at once once cost ~800 MB each. Now a
/// body is read under the payload budget and parsed without building its padding.
#[tokio::test]
async fn concurrent_maximum_size_padded_bodies_do_not_amplify_memory() {
    let app = TestApp::spawn(None, &[]).await;
    let max = app.config.server.max_body_bytes;
    let body = bytes::Bytes::from(padded("message", max - 200).replacen(
        r#""type":"message""#,
        r#""sender":"amp""#,
        1,
    ));
    assert!(body.len() <= max);
    let baseline = rss();
    let sends = (0..6).map(|_| {
        app.http
            .post(app.url("/api/chat/message"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    });
    for response in futures_util::future::join_all(sends).await {
        let status = response.unwrap().status().as_u16();
        // Refused by its kind's cap, or by the budget while others are read.
        assert!(matches!(status, 413 | 503), "{status}");
    }
    let grown = rss().saturating_sub(baseline);
    assert!(
        grown < 512 << 20,
        "RSS grew by {} MiB for 6 padded bodies",
        grown >> 20
    );
    assert!(app.history("general").await.is_empty());
}

/// One REST upload that declared a large body and trickles it holds the whole budget:
/// other large payloads wait, then get `server_busy` with when to retry; small ones pass.
#[tokio::test]
async fn large_payloads_over_the_budget_are_refused_with_retry_hints() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_CHAT__MAX_IMAGE_BYTES", "200000"),
            ("CHATGATE_CHAT__MAX_AUDIO_BYTES", "200000"),
            ("CHATGATE_MEMORY__LARGE_PAYLOAD_BUDGET_BYTES", "300000"),
            ("CHATGATE_MEMORY__LARGE_PAYLOAD_WAIT_MS", "300"),
        ],
    )
    .await;
    // Declares 280,000 bytes and sends only the start: its permits stay held.
    let mut hog = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    hog.write_all(
        b"POST /api/chat/message HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 280000\r\n\r\n{\"sender\":",
    )
    .await
    .unwrap();
    let image = png(100_000);
    let big = json!({"sender": "ann", "content": image, "message_type": "image"});
    // Wait until the hog holds the budget (the server reads its headers first).
    let refused = loop {
        let response = send_message(&app, &big).await;
        if response.status() == 503 {
            break response;
        }
        assert_eq!(response.status(), 200);
        tokio::task::yield_now().await;
    };
    assert!(refused.headers().contains_key("retry-after"));
    let answer: Value = refused.json().await.unwrap();
    assert_eq!(answer["code"], "server_busy");
    // On the socket: an error frame with retry_after_ms, then 1013.
    let mut ws = app.ws("bob", "general").await;
    let frame = json!({"type": "message", "content": image, "message_type": "image"});
    ws.socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let error = ws.next_of("error").await;
    assert_eq!(error["code"], "server_busy");
    assert!(error["retry_after_ms"].as_u64().unwrap() >= 1);
    let close = ws.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    // Small messages are not affected.
    let (status, _) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "cy", "content": "still here"}),
        )
        .await;
    assert_eq!(status, 200);
    // Once the hog is gone, large payloads pass again.
    drop(hog);
    let stored = loop {
        let response = send_message(&app, &big).await;
        if response.status() == 200 {
            break true;
        }
        assert_eq!(response.status(), 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(stored);
}

#[tokio::test]
async fn the_media_quota_holds_on_its_own_and_refusals_store_nothing() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_LIMITS__ENABLED", "true"),
            ("CHATGATE_LIMITS__MESSAGES_PER_MINUTE", "100000"),
            ("CHATGATE_LIMITS__MESSAGE_BURST", "100000"),
            ("CHATGATE_CHAT__MAX_IMAGE_BYTES", "200000"),
            ("CHATGATE_CHAT__MAX_AUDIO_BYTES", "200000"),
            ("CHATGATE_LIMITS__MEDIA_BURST_BYTES", "700000"),
            ("CHATGATE_LIMITS__MEDIA_BYTES_PER_MINUTE", "1024"),
        ],
    )
    .await;
    let image = png(150_000);
    let body = json!({"sender": "ann", "content": image, "message_type": "image"});
    let mut accepted = 0;
    let refused = loop {
        let response = send_message(&app, &body).await;
        if response.status() != 200 {
            break response;
        }
        accepted += 1;
        assert!(accepted < 10, "the quota never refused");
    };
    // 700,000 bytes hold three data URLs of ~200,000 characters, not four.
    assert_eq!(accepted, 3);
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let answer: Value = refused.json().await.unwrap();
    assert_eq!(answer["code"], "media_quota_exceeded");
    assert_eq!(app.history("general").await.len(), 3);
    // Text is not media: it still passes, and another user has a quota of their own.
    let (status, _) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "ann", "content": "hi"}),
        )
        .await;
    assert_eq!(status, 200);
    let other = json!({"sender": "bo", "content": image, "message_type": "image"});
    let (status, _) = app.post("/api/chat/message", &other).await;
    assert_eq!(status, 200);
    // On the socket the refusal is an error frame with retry_after_ms.
    let mut ws = app.ws("ann", "general").await;
    let frame =
        json!({"type": "message", "content": image, "message_type": "image", "client_id": "q1"});
    ws.socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let error = ws.next_of("error").await;
    assert_eq!(error["code"], "media_quota_exceeded");
    assert_eq!(error["client_id"], "q1");
    assert!(error["retry_after_ms"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn deletes_have_a_budget_per_caller() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_LIMITS__ENABLED", "true"),
            ("CHATGATE_LIMITS__DELETE_BURST", "2"),
        ],
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let id = uuid::Uuid::new_v4();
        let (status, answer) = app
            .delete(&format!("/api/chat/message/{id}?channel=general"))
            .await;
        statuses.push((status, answer["code"].as_str().unwrap_or("").to_string()));
    }
    assert_eq!(statuses[0].0, 404);
    assert_eq!(statuses[1].0, 404);
    assert_eq!(statuses[2], (429, "rate_limited".to_string()));
}

/// A WebSocket frame announced as larger than the message cap is refused from its header
/// (1009), before anything is read or reserved for it.
#[tokio::test]
async fn a_frame_announced_over_the_cap_closes_with_1009() {
    let app = TestApp::spawn(None, &[]).await;
    let mut ws = app.ws("zed", "general").await;
    let huge = "x".repeat(app.config.ws.max_message_bytes + 1);
    let _ = ws.socket.send(Message::Text(huge.into())).await;
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match ws.socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1009));
}
