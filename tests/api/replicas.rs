//! Two replicas on one Redis behave as one service.

use serde_json::Value;

use crate::helpers::{RedisServer, TestApp};

#[tokio::test]
async fn two_replicas_are_one_service() {
    let redis = RedisServer::start().await;
    let a = TestApp::spawn(Some(&redis), &[]).await;
    let b = TestApp::spawn(Some(&redis), &[]).await;
    let mut on_a = a.ws("amy", "shared").await;
    let mut on_b = b.ws("bob", "shared").await;
    assert_eq!(
        on_a.next().await["username"],
        "bob",
        "join seen across replicas"
    );

    // Interleaved sends over WS and REST on both replicas.
    let mut sent = 0;
    for i in 0..20 {
        on_a.say(&format!("a{i}"), &format!("a{i}")).await;
        on_b.say(&format!("b{i}"), &format!("b{i}")).await;
        a.send("rest", "shared", &format!("ra{i}")).await;
        b.send("rest", "shared", &format!("rb{i}")).await;
        sent += 4;
    }
    let read = |frames: Vec<Value>| -> Vec<String> {
        frames
            .iter()
            .map(|m| m["message_id"].as_str().unwrap().to_string())
            .collect()
    };
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    for _ in 0..sent {
        seen_a.push(on_a.next_of("message").await);
        seen_b.push(on_b.next_of("message").await);
    }
    let (seen_a, seen_b) = (read(seen_a), read(seen_b));
    let history = read(a.history("shared").await);
    assert_eq!(history.len(), sent);
    assert_eq!(seen_a, history, "replica A delivers in history order");
    assert_eq!(seen_b, history, "replica B delivers in history order");
    assert_eq!(read(b.history("shared").await), history);

    // Presence and channels agree.
    assert_eq!(a.online("shared").await, ["amy", "bob"]);
    assert_eq!(b.online("shared").await, ["amy", "bob"]);
    assert_eq!(
        a.get("/api/chat/channels").await,
        b.get("/api/chat/channels").await
    );

    // A delete on B reaches A; a leave on B reaches A.
    let id = &history[0];
    let (status, _) = b
        .delete(&format!("/api/chat/message/{id}?channel=shared"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        on_a.next_of("message_deleted").await["message_id"],
        id.as_str()
    );
    on_b.close().await;
    assert_eq!(on_a.next_of("user_left").await["username"], "bob");
    assert_eq!(a.online("shared").await, ["amy"]);
}

#[tokio::test]
async fn one_user_on_two_replicas_stays_online_until_the_last_tab_closes() {
    let redis = RedisServer::start().await;
    let a = TestApp::spawn(Some(&redis), &[]).await;
    let b = TestApp::spawn(Some(&redis), &[]).await;
    let mut watcher = a.ws("watcher", "tabs").await;
    let tab_a = a.ws("bob", "tabs").await;
    assert_eq!(watcher.next().await["username"], "bob");
    let tab_b = b.ws("bob", "tabs").await;
    tab_a.close().await;
    assert_eq!(b.online("tabs").await, ["bob", "watcher"]);
    tab_b.close().await;
    let left = watcher.next().await;
    assert_eq!(
        (left["type"].as_str(), left["username"].as_str()),
        (Some("user_left"), Some("bob"))
    );
}
