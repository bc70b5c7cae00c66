//! Storage quotas: channels a user may create, the per-channel byte cap, the store-wide
//! guard against a full Redis and its eviction policy, and the original's history moved
//! into the indexed layout. Each refusal stores nothing.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{RedisServer, TestApp, WAIT, png, secure_config, test_config};

fn image(channel: &str, bytes: usize) -> Value {
    json!({"sender": "ann", "channel": channel, "message_type": "image", "content": png(bytes)})
}

#[tokio::test]
async fn a_user_creates_channels_within_a_budget() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_LIMITS__ENABLED", "true"),
            ("CHATGATE_LIMITS__MESSAGE_BURST", "1000"),
            ("CHATGATE_LIMITS__CHANNEL_BURST", "2"),
            ("CHATGATE_LIMITS__CHANNELS_PER_MINUTE", "1"),
        ],
    )
    .await;
    let post = |channel: &'static str| {
        let app = &app;
        async move {
            app.post(
                "/api/chat/message",
                &json!({"sender": "ann", "channel": channel, "content": "hi"}),
            )
            .await
        }
    };
    assert_eq!(post("one").await.0, 200);
    assert_eq!(post("two").await.0, 200);
    let (status, body) = post("three").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited");
    assert!(
        body["detail"].as_str().unwrap().contains("channels"),
        "{body}"
    );
    // Channels that exist take messages; someone else may create the refused one.
    assert_eq!(post("one").await.0, 200);
    let (_, listed) = app.get("/api/chat/channels").await;
    assert_eq!(listed["channels"], json!(["one", "two"]), "nothing stored");
    let (status, _) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "bob", "channel": "three", "content": "hi"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(app.history("one").await.len(), 2);
}

#[tokio::test]
async fn channel_creation_budget_is_shared_through_redis() {
    let redis = RedisServer::start().await;
    let vars = [
        ("CHATGATE_LIMITS__ENABLED", "true"),
        ("CHATGATE_LIMITS__MESSAGE_BURST", "1000"),
        ("CHATGATE_LIMITS__CHANNEL_BURST", "1"),
    ];
    let first = TestApp::spawn(Some(&redis), &vars).await;
    let second = TestApp::spawn(Some(&redis), &vars).await;
    let body = |channel: &str| json!({"sender": "ann", "channel": channel, "content": "hi"});
    assert_eq!(first.post("/api/chat/message", &body("a")).await.0, 200);
    let (status, refused) = second.post("/api/chat/message", &body("b")).await;
    assert_eq!(status, 429, "the other replica saw the budget: {refused}");
    assert_eq!(second.post("/api/chat/message", &body("a")).await.0, 200);
}

#[tokio::test]
async fn one_user_posting_4_mib_images_is_stopped_by_the_default_media_quota() {
    // The message budget is out of the way; the media quota keeps its defaults.
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_LIMITS__ENABLED", "true"),
            ("CHATGATE_LIMITS__MESSAGE_BURST", "100000"),
            ("CHATGATE_LIMITS__MESSAGES_PER_MINUTE", "100000"),
        ],
    )
    .await;
    let content = png(4 << 20);
    let body =
        json!({"sender": "ann", "channel": "flood", "message_type": "image", "content": content});
    let started = std::time::Instant::now();
    let mut stored = 0usize;
    let refusal = loop {
        let (status, answer) = app.post("/api/chat/message", &body).await;
        if status != 200 {
            break (status, answer);
        }
        stored += content.len();
        assert!(stored < 200 << 20, "200 MiB stored without a refusal");
    };
    assert_eq!(refusal.0, 429, "{}", refusal.1);
    assert_eq!(refusal.1["code"], "media_quota_exceeded");
    // The quota (in KiB): the 64 MiB burst, plus 8 MiB a minute over the time taken.
    let defaults = &app.config.limits;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let allowed = (defaults.media_burst_bytes as f64
        + defaults.media_bytes_per_minute as f64 * minutes)
        / 1024.0;
    let images = stored / content.len();
    assert!(
        images >= 11,
        "the burst holds 11 images of 5.6 MB, stored {images}"
    );
    assert!(
        (images * content.len().div_ceil(1024)) as f64 <= allowed,
        "{images} images over the quota of {allowed} KiB"
    );
}

#[tokio::test]
async fn a_channel_keeps_at_most_its_byte_cap() {
    let app = TestApp::spawn(None, &[("CHATGATE_STORE__CHANNEL_MAX_BYTES", "3000000")]).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (status, body) = app.post("/api/chat/message", &image("pics", 1 << 20)).await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["data"]["message_id"].as_str().unwrap().to_string());
    }
    // Each entry is ~1.4 MB of base64: two fit under 3 MB, the oldest went.
    let kept: Vec<String> = app
        .history("pics")
        .await
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, ids[3..]);
    let (status, _) = app
        .delete(&format!("/api/chat/message/{}?channel=pics", ids[0]))
        .await;
    assert_eq!(status, 404, "trimmed entries are gone from the index too");
}

/// Posts an image until the answer is `want`, within the wait.
async fn image_until(app: &TestApp, want: u16) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = app.post("/api/chat/message", &image("full", 1000)).await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status} {body}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn media_is_refused_while_redis_is_nearly_full() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let config = |key: &str, value: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(key)
            .arg(value)
            .to_owned()
    };
    let _: () = config("maxmemory", "64mb")
        .query_async(&mut conn)
        .await
        .unwrap();
    // An empty Redis uses about 1 MB: past 1% of 64 MB.
    let app = TestApp::spawn(
        Some(&redis),
        &[
            ("CHATGATE_REDIS__STORAGE_FULL_RATIO", "0.01"),
            ("CHATGATE_REDIS__MEMORY_CHECK_MS", "100"),
        ],
    )
    .await;
    let body = image_until(&app, 507).await;
    assert_eq!(body["code"], "storage_full", "{body}");
    // Media stored before the first reading stays; nothing more is.
    let before = app.history("full").await.len();
    let (status, _) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "ann", "channel": "full", "content": "text still goes"}),
        )
        .await;
    assert_eq!(status, 200);
    let mut ws = app.ws("ann", "full").await;
    ws.send_json(json!({"type": "message", "message_type": "image", "content": png(1000), "client_id": "i1"}))
        .await;
    let refused = ws.next_of("error").await;
    assert_eq!(refused["code"], "storage_full");
    assert!(refused["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        app.history("full").await.len(),
        before + 1,
        "no media stored"
    );

    let _: () = config("maxmemory", "0")
        .query_async(&mut conn)
        .await
        .unwrap();
    image_until(&app, 200).await;
}

#[tokio::test]
async fn an_evicting_maxmemory_policy_is_refused_outside_dev_mode() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .arg("maxmemory")
        .arg("1gb")
        .query_async(&mut conn)
        .await
        .unwrap();
    let auth = [
        ("CHATGATE_AUTH__ALGORITHMS", "HS256"),
        (
            "CHATGATE_AUTH__HMAC_SECRET",
            "an-hmac-secret-of-at-least-32-bytes-for-tests",
        ),
    ];
    let refused = chatgate::app::Application::build(secure_config(Some(&redis), &auth)).await;
    let error = refused.err().expect("refused to start").to_string();
    assert!(error.contains("maxmemory-policy is allkeys-lru"), "{error}");

    let mut acknowledged = auth.to_vec();
    acknowledged.push(("CHATGATE_REDIS__ALLOW_EVICTING_POLICY", "true"));
    let app = TestApp::spawn_with(secure_config(Some(&redis), &acknowledged)).await;
    app.wait_ready(200).await;
    // Dev mode only warns.
    TestApp::spawn_with(test_config(Some(&redis), &[]))
        .await
        .wait_ready(200)
        .await;
}

#[tokio::test]
async fn the_originals_history_moves_into_the_index_in_order() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    // 300 entries as the original wrote them (LPUSH: newest first), some of them large
    // enough that one migration step cannot take many, and one without an id.
    let mut pushed = vec![r#"{"sender": "ann", "content": "no id", "channel": "old"}"#.to_string()];
    for i in 0..300 {
        let content = if i % 50 == 7 {
            "z".repeat(600_000)
        } else {
            format!("old {i}")
        };
        let entry = json!({
            "sender": if i % 2 == 0 { "ann" } else { "b\"ob" },
            "content": content,
            "channel": "old",
            "message_type": "text",
            "timestamp": "2025-11-23T15:14:18.123456",
            "message_id": format!("00000000-0000-4000-8000-{i:012}"),
        });
        pushed.push(entry.to_string());
    }
    for entry in &pushed {
        let _: () = redis::cmd("LPUSH")
            .arg("chat:old:messages")
            .arg(entry)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let (_, body) = app.get("/api/chat/history/old?limit=1000").await;
    let contents: Vec<String> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().chars().take(8).collect())
        .collect();
    assert_eq!(
        contents.len(),
        300,
        "the entry without an id does not parse"
    );
    assert_eq!(contents[0], "old 0");
    assert_eq!(contents[299], "old 299");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("chat:old:messages")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the original's list is gone");

    // New messages go on top; ownership came along (an escaped sender too).
    app.send("carol", "old", "new").await;
    let (_, body) = app.get("/api/chat/history/old?limit=2").await;
    assert_eq!(body["messages"][1]["content"], "new");
    assert_eq!(body["messages"][0]["content"], "old 299");
    let owners: Vec<Option<String>> = redis::cmd("HMGET")
        .arg("chat:old:owners")
        .arg("00000000-0000-4000-8000-000000000001")
        .arg("00000000-0000-4000-8000-000000000002")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(owners, [Some("b\"ob".to_string()), Some("ann".to_string())]);
    let (status, _) = app
        .delete("/api/chat/message/00000000-0000-4000-8000-000000000057?channel=old")
        .await;
    assert_eq!(status, 200, "a large migrated entry can be deleted");
    let (_, body) = app.get("/api/chat/history/old?limit=1000").await;
    assert_eq!(body["total_count"], 300);
}
