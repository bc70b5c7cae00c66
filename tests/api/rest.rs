//! The REST API against the seed document, on the in-memory store and on Redis.

use serde_json::json;

use crate::helpers::{RedisServer, TestApp, keys};

async fn memory_app() -> TestApp {
    TestApp::spawn(None, &[]).await
}

#[tokio::test]
async fn root_is_the_seed_document() {
    let app = memory_app().await;
    let (status, body) = app.get("/").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "message": "Real-Time Chat API is running!",
            "version": "1.0.0",
            "endpoints": {
                "websocket": "/ws/chat?username=YourName&channel=general",
                "chat_history": "/api/chat/history/{channel}",
                "online_users": "/api/users/online/{channel}",
                "channels": "/api/chat/channels"
            }
        })
    );
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = app.get("/readyz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
}

async fn send_and_read_back(app: &TestApp) {
    let (status, body) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "bob", "content": "Hello via REST!"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(keys(&body), ["data", "message", "success"]);
    assert_eq!(body["success"], true);
    assert_eq!(body["message"], "Message sent successfully");
    let data = &body["data"];
    assert_eq!(
        keys(data),
        [
            "channel",
            "content",
            "message_id",
            "message_type",
            "sender",
            "timestamp"
        ]
    );
    assert_eq!(data["channel"], "general", "default channel");
    assert_eq!(data["message_type"], "text", "default type");
    assert!(data["timestamp"].as_str().unwrap().ends_with('Z'));

    for i in 0..5 {
        app.send("bob", "ordered", &format!("m{i}")).await;
    }
    let (status, body) = app.get("/api/chat/history/ordered?limit=3").await;
    assert_eq!(status, 200);
    assert_eq!(keys(&body), ["channel", "messages", "total_count"]);
    let contents: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["m2", "m3", "m4"], "newest 3, oldest first");
    assert_eq!(body["total_count"], 3);
    assert_eq!(body["channel"], "ordered");

    let (status, body) = app.get("/api/chat/channels").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"channels": ["general", "ordered"], "count": 2})
    );

    let (status, body) = app.get("/api/chat/history/empty").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"messages": [], "total_count": 0, "channel": "empty"})
    );
}

#[tokio::test]
async fn send_history_and_channels_in_memory() {
    send_and_read_back(&memory_app().await).await;
}

#[tokio::test]
async fn send_history_and_channels_on_redis() {
    let redis = RedisServer::start().await;
    send_and_read_back(&TestApp::spawn(Some(&redis), &[]).await).await;
}

#[tokio::test]
async fn history_default_limit_is_50_and_cap_holds() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(
        Some(&redis),
        &[
            ("CHATGATE_STORE__HISTORY_MAX", "60"),
            ("CHATGATE_CHAT__HISTORY_MAX_LIMIT", "60"),
        ],
    )
    .await;
    for i in 0..70 {
        app.send("bob", "busy", &format!("m{i}")).await;
    }
    let (_, body) = app.get("/api/chat/history/busy").await;
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 50);
    assert_eq!(messages[49]["content"], "m69");
    let (_, body) = app.get("/api/chat/history/busy?limit=60").await;
    assert_eq!(body["total_count"], 60, "capped at history_max");
    let mut conn = redis.connection().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg("chat:busy:entries")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 2_500_000, "30-day TTL on the history, got {ttl}");
}

#[tokio::test]
async fn bad_limits_are_400() {
    let app = memory_app().await;
    for limit in ["0", "-2", "1001", "abc", ""] {
        let (status, body) = app
            .get(&format!("/api/chat/history/general?limit={limit}"))
            .await;
        assert_eq!(status, 400, "limit={limit}: {body}");
        assert!(body["detail"].is_string());
    }
    let (status, _) = app.get("/api/chat/history/general?limit=1000").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn invalid_names_are_rejected() {
    let app = memory_app().await;
    for channel in ["a:b", "a*", "a%20b", "%7Btag%7D"] {
        let (status, body) = app.get(&format!("/api/chat/history/{channel}")).await;
        assert_eq!(status, 400, "{channel}: {body}");
        assert_eq!(body["code"], "invalid_channel");
    }
    let (status, body) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "a:b", "content": "x"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_username"))
    );
}

#[tokio::test]
async fn post_validation_uses_the_error_shape() {
    let app = TestApp::spawn(None, &[("CHATGATE_CHAT__MAX_TEXT_BYTES", "10")]).await;
    let cases = [
        (
            json!({"sender": "a", "content": "x", "message_type": "weird"}),
            422,
            "invalid_message_type",
        ),
        (
            json!({"sender": "a", "content": "ééééééé"}),
            422,
            "content_too_large",
        ),
        (json!({"sender": "a", "content": ""}), 422, "empty_content"),
        (
            json!({"sender": "a", "content": "https://x/y.png", "message_type": "image"}),
            422,
            "invalid_media",
        ),
        (json!({"content": "x"}), 400, "invalid_request"),
        (json!({"sender": "a", "content": 5}), 400, "invalid_request"),
        (json!(["a", "positional"]), 400, "invalid_request"),
    ];
    for (body, want_status, want_code) in cases {
        let (status, answer) = app.post("/api/chat/message", &body).await;
        assert_eq!(status, want_status, "{body} -> {answer}");
        assert_eq!(answer["code"], want_code, "{body} -> {answer}");
        assert!(answer["detail"].is_string());
    }
    let response = app
        .http
        .post(app.url("/api/chat/message"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = memory_app().await;
    // Larger than the derived body limit (the longest valid audio data URL and room).
    let huge = "a".repeat(16 * 1024 * 1024);
    let (status, _) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "a", "content": huge}),
        )
        .await;
    assert_eq!(status, 413);
}

async fn delete_by_id(app: &TestApp) {
    let keep = app.send("bob", "general", "keep").await;
    let gone = app.send("bob", "general", "gone").await;
    let id = gone["message_id"].as_str().unwrap();
    let (status, body) = app
        .delete(&format!("/api/chat/message/{id}?channel=general"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"success": true, "message": "Message deleted successfully", "data": null})
    );
    let history = app.history("general").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["message_id"], keep["message_id"]);

    let (status, body) = app
        .delete(&format!("/api/chat/message/{id}?channel=general"))
        .await;
    assert_eq!(
        (status, body),
        (
            404,
            json!({"detail": "Message not found", "code": "not_found"})
        )
    );
    let (status, _) = app.delete(&format!("/api/chat/message/{id}")).await;
    assert_eq!(status, 400, "channel is required");
    let (status, _) = app.delete("/api/chat/message/x%22y?channel=general").await;
    assert_eq!(status, 400, "ids are validated");
}

#[tokio::test]
async fn delete_in_memory() {
    delete_by_id(&memory_app().await).await;
}

#[tokio::test]
async fn delete_on_redis() {
    let redis = RedisServer::start().await;
    delete_by_id(&TestApp::spawn(Some(&redis), &[]).await).await;
}

#[tokio::test]
async fn delete_is_exact_under_concurrent_writes() {
    // The original found an index, then overwrote whatever sat there by then. Here the
    // delete is one script: concurrent appends never make it remove another message.
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let mut targets = Vec::new();
    for i in 0..20 {
        targets.push(app.send("bob", "race", &format!("target{i}")).await);
    }
    let writer = {
        let http = app.http.clone();
        let url = app.url("/api/chat/message");
        tokio::spawn(async move {
            for i in 0..200 {
                http.post(&url)
                    .json(&json!({"sender": "amy", "content": format!("noise{i}"), "channel": "race"}))
                    .send()
                    .await
                    .unwrap();
            }
        })
    };
    for target in &targets {
        let id = target["message_id"].as_str().unwrap();
        let (status, _) = app
            .delete(&format!("/api/chat/message/{id}?channel=race"))
            .await;
        assert_eq!(status, 200);
    }
    writer.await.unwrap();
    let history = app.history("race").await;
    assert_eq!(history.len(), 200, "all noise kept, all targets gone");
    assert!(history.iter().all(|m| m["sender"] == "amy"));
}

#[tokio::test]
async fn original_history_stays_readable() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    // As the original wrote it: LPUSH of pydantic JSON with a naive timestamp.
    let entry = r#"{"sender":"old","content":"from the original","channel":"legacy","message_type":"text","timestamp":"2025-11-23T15:14:18.123456","message_id":"6f1c2d3e-0000-4000-8000-000000000001"}"#;
    let _: () = redis::cmd("LPUSH")
        .arg("chat:legacy:messages")
        .arg(entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("LPUSH")
        .arg("chat:legacy:messages")
        .arg("not json at all")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The same with Python's default json.dumps spacing.
    let spaced = r#"{"sender": "old", "content": "spaced", "channel": "legacy", "message_type": "text", "timestamp": "2025-11-23T15:14:19", "message_id": "6f1c2d3e-0000-4000-8000-000000000002"}"#;
    let _: () = redis::cmd("LPUSH")
        .arg("chat:legacy:messages")
        .arg(spaced)
        .query_async(&mut conn)
        .await
        .unwrap();
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let history = app.history("legacy").await;
    assert_eq!(history.len(), 2, "unparseable entries are skipped");
    let (status, _) = app
        .delete("/api/chat/message/6f1c2d3e-0000-4000-8000-000000000002?channel=legacy")
        .await;
    assert_eq!(status, 200, "spaced entries can be deleted too");
    let history = app.history("legacy").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["timestamp"], "2025-11-23T15:14:18.123456Z");
    let (status, _) = app
        .delete("/api/chat/message/6f1c2d3e-0000-4000-8000-000000000001?channel=legacy")
        .await;
    assert_eq!(status, 200, "the original's messages can be deleted");
}
