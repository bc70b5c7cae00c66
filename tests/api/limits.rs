//! Abuse limits against the real app: per-user message budgets (shared across replicas
//! through Redis, local when Redis is down), typing, per-IP connection rates and caps,
//! per-user and per-process caps, the REST budget, and the 429 / RateLimit headers.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::helpers::{RedisServer, TestApp, WAIT, WsClient};

/// Limits on, with small numbers, plus `extra`.
fn limited<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut vars = vec![
        ("CHATGATE_LIMITS__ENABLED", "true"),
        ("CHATGATE_LIMITS__MESSAGES_PER_MINUTE", "6"),
        ("CHATGATE_LIMITS__MESSAGE_BURST", "3"),
        ("CHATGATE_LIMITS__WS_CLOSE_AFTER_REFUSED", "4"),
    ];
    vars.extend_from_slice(extra);
    vars
}

async fn post(app: &TestApp, sender: &str, content: &str) -> reqwest::Response {
    app.http
        .post(app.url("/api/chat/message"))
        .json(&json!({"sender": sender, "content": content, "channel": "general"}))
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// A WebSocket upgrade's refusal status, or the open socket.
async fn try_ws(port: u16, query: &str) -> Result<WsClient, (u16, Option<String>)> {
    let request = format!("ws://127.0.0.1:{port}/ws/chat?{query}")
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(WsClient { socket }),
        Err(WsError::Http(response)) => Err((
            response.status().as_u16(),
            response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string()),
        )),
        Err(e) => panic!("unexpected upgrade failure: {e}"),
    }
}

#[tokio::test]
async fn a_socket_over_its_message_budget_gets_error_frames_then_1008() {
    let app = TestApp::spawn(None, &limited(&[])).await;
    let mut ws = app.ws("alice", "general").await;
    for i in 0..3 {
        ws.say(&format!("m{i}"), &format!("c{i}")).await;
        let echo = ws.next_of("message").await;
        assert_eq!(echo["client_id"], format!("c{i}"));
    }
    // Over the burst: an error frame with a retry hint, and the socket stays open.
    ws.say("over", "c-over").await;
    let refused = ws.next_of("error").await;
    assert_eq!(refused["code"], "rate_limited");
    assert_eq!(refused["client_id"], "c-over");
    let retry = refused["retry_after_ms"].as_u64().unwrap();
    assert!((1..=10_000).contains(&retry), "{retry}");
    // Typing still works meanwhile (its own budget).
    ws.send_json(json!({"type": "typing_start"})).await;
    // Sending on regardless: the fourth refusal in a row closes the socket with 1008.
    for i in 0..3 {
        ws.say("spam", &format!("s{i}")).await;
    }
    let mut codes = Vec::new();
    let close = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws.socket))
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "error" {
                    codes.push(frame["code"].as_str().unwrap().to_string());
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(codes, ["rate_limited", "rate_limited"]);
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "rate limit exceeded");
    // Nothing over the budget was stored.
    assert_eq!(app.history("general").await.len(), 3);
}

#[tokio::test]
async fn rest_and_websocket_share_one_budget_with_429_and_headers() {
    let app = TestApp::spawn(None, &limited(&[])).await;
    let mut ws = app.ws("bob", "general").await;
    ws.say("one", "c1").await;
    ws.next_of("message").await;
    ws.say("two", "c2").await;
    ws.next_of("message").await;
    let third = post(&app, "bob", "three").await;
    assert_eq!(third.status(), 200);
    assert_eq!(
        header(&third, "ratelimit-policy").as_deref(),
        Some("\"rest\";q=120;w=12, \"messages\";q=3;w=30")
    );
    let limit = header(&third, "ratelimit").unwrap();
    assert!(limit.starts_with("\"rest\";r=119;t="), "{limit}");
    assert!(limit.contains("\"messages\";r=0;t="), "{limit}");
    let fourth = post(&app, "bob", "four").await;
    assert_eq!(fourth.status(), 429);
    let retry: u64 = header(&fourth, "retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=10).contains(&retry),
        "whole seconds, rounded up, at least 1: {retry}"
    );
    assert!(
        header(&fourth, "ratelimit")
            .unwrap()
            .contains("\"messages\";r=0;t=")
    );
    let body: Value = fourth.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // Another user has a budget of its own.
    assert_eq!(post(&app, "carol", "hi").await.status(), 200);
}

#[tokio::test]
async fn two_replicas_share_one_users_budget_and_redis_down_falls_back_locally() {
    let mut redis = RedisServer::start().await;
    let vars = limited(&[("CHATGATE_LIMITS__MESSAGE_BURST", "4")]);
    let a = TestApp::spawn(Some(&redis), &vars).await;
    let b = TestApp::spawn(Some(&redis), &vars).await;
    for app in [&a, &b, &a, &b] {
        assert_eq!(post(app, "dave", "hi").await.status(), 200);
    }
    assert_eq!(post(&a, "dave", "fifth").await.status(), 429);
    assert_eq!(post(&b, "dave", "fifth").await.status(), 429);

    // Redis goes away: the limiter decides locally (never unlimited). The store fails
    // too, so allowed messages get 503; the local budget still runs out into 429.
    redis.stop();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(post(&a, "erin", "x").await.status().as_u16());
    }
    assert_eq!(statuses, [503, 503, 503, 503, 429, 429]);
}

#[tokio::test]
async fn typing_beyond_its_limit_is_dropped_silently() {
    let app = TestApp::spawn(
        None,
        &limited(&[
            ("CHATGATE_LIMITS__TYPING_BURST", "2"),
            ("CHATGATE_LIMITS__TYPING_PER_MINUTE", "1"),
        ]),
    )
    .await;
    let mut typist = app.ws("frank", "general").await;
    let mut watcher = app.ws("gina", "general").await;
    // Two typing events fit the burst; the next two are dropped (and counted as refused
    // frames, two of the four that close a socket).
    for _ in 0..2 {
        typist.send_json(json!({"type": "typing_start"})).await;
        typist.send_json(json!({"type": "typing_stop"})).await;
    }
    // A message after the typing flood: the socket is still fine, and no error frame
    // came back for the dropped typing events.
    typist.say("done", "c-done").await;
    loop {
        let frame = typist.next().await;
        assert_ne!(
            frame["type"], "error",
            "no error frame for dropped typing: {frame}"
        );
        if frame["type"] == "message" {
            break;
        }
    }
    // The watcher saw exactly the two typing events the burst allowed, then the message.
    let mut typing = Vec::new();
    loop {
        let frame = watcher.next().await;
        match frame["type"].as_str() {
            Some("typing_status") => typing.push(frame["is_typing"].clone()),
            Some("message") => break,
            _ => {}
        }
    }
    assert_eq!(typing, [json!(true), json!(false)]);
}

#[tokio::test]
async fn a_typing_flood_is_closed_like_any_other_flood() {
    let app = TestApp::spawn(
        None,
        &limited(&[
            ("CHATGATE_LIMITS__TYPING_BURST", "2"),
            ("CHATGATE_LIMITS__TYPING_PER_MINUTE", "1"),
        ]),
    )
    .await;
    let mut typist = app.ws("flo", "general").await;
    for _ in 0..4 {
        typist.send_json(json!({"type": "typing_start"})).await;
        typist.send_json(json!({"type": "typing_stop"})).await;
    }
    let close = typist.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "rate limit exceeded");
    // The address serves the abuse penalty: a reconnect is refused with 429.
    let refused = try_ws(app.port, "username=flo&channel=general").await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(429));
}

#[tokio::test]
async fn connections_per_ip_are_rate_limited_and_capped() {
    let app = TestApp::spawn(
        None,
        &limited(&[
            ("CHATGATE_LIMITS__CONNECT_BURST_PER_IP", "3"),
            ("CHATGATE_LIMITS__CONNECTS_PER_MINUTE_PER_IP", "60"),
        ]),
    )
    .await;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(try_ws(app.port, &format!("username=u{i}")).await.unwrap());
    }
    let (status, retry) = try_ws(app.port, "username=u3").await.err().unwrap();
    assert_eq!(status, 429);
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert_eq!(
        retry, 1,
        "one connection per second: the wait rounds up to 1 s"
    );
    // After Retry-After the next attempt succeeds (the server's own promise).
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert!(try_ws(app.port, "username=u3").await.is_ok());

    // A cap on concurrent connections per IP, released when a socket closes.
    let capped = TestApp::spawn(
        None,
        &limited(&[("CHATGATE_LIMITS__MAX_CONNECTIONS_PER_IP", "2")]),
    )
    .await;
    let first = try_ws(capped.port, "username=a").await.unwrap();
    let _second = try_ws(capped.port, "username=b").await.unwrap();
    let (status, _) = try_ws(capped.port, "username=c").await.err().unwrap();
    assert_eq!(status, 429);
    first.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The place is given back when the server has finished the closed session.
        match try_ws(capped.port, "username=c").await {
            Ok(_) => break,
            Err((429, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("the freed place was not given back: {other:?}"),
        }
    }
}

#[tokio::test]
async fn per_user_and_per_process_caps() {
    let app = TestApp::spawn(
        None,
        &limited(&[("CHATGATE_LIMITS__MAX_CONNECTIONS_PER_USER", "1")]),
    )
    .await;
    let _one = try_ws(app.port, "username=hank").await.unwrap();
    let (status, _) = try_ws(app.port, "username=hank").await.err().unwrap();
    assert_eq!(status, 429);
    assert!(try_ws(app.port, "username=ivy").await.is_ok());

    let full = TestApp::spawn(None, &limited(&[("CHATGATE_LIMITS__MAX_CONNECTIONS", "1")])).await;
    let _only = try_ws(full.port, "username=a").await.unwrap();
    let (status, retry) = try_ws(full.port, "username=b").await.err().unwrap();
    assert_eq!(
        status, 503,
        "a full process says so; another replica may have room"
    );
    assert_eq!(retry.as_deref(), Some("1"));
}

/// The status of `GET /api/chat/channels` sent with this `X-Forwarded-For`.
async fn channels_via(app: &TestApp, xff: &str) -> u16 {
    app.http
        .get(app.url("/api/chat/channels"))
        .header("x-forwarded-for", xff)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_rest_budget_is_per_client_ip_and_spoofing_changes_nothing() {
    let vars = limited(&[("CHATGATE_LIMITS__REST_BURST_PER_IP", "3")]);
    let app = TestApp::spawn(None, &vars).await;
    // The test client is not a trusted proxy: rotating X-Forwarded-For is one bucket.
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(channels_via(&app, &format!("203.0.113.{i}")).await);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Health endpoints are not budgeted.
    assert_eq!(app.get("/healthz").await.0, 200);

    // Behind a trusted proxy, the rightmost untrusted address is the client: a rotating
    // spoofed prefix still lands in one bucket, another real client in its own.
    let trusted = limited(&[
        ("CHATGATE_LIMITS__REST_BURST_PER_IP", "3"),
        ("CHATGATE_SERVER__TRUSTED_PROXIES", "127.0.0.1"),
    ]);
    let app = TestApp::spawn(None, &trusted).await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let xff = format!("10.9.8.{i}, 198.51.100.7");
        statuses.push(channels_via(&app, &xff).await);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(channels_via(&app, "198.51.100.8").await, 200);
    // IPv6 clients are counted by /64: a new address in the same /64 is the same client.
    for i in 1..=3 {
        assert_eq!(channels_via(&app, &format!("2001:db8:1:2::{i}")).await, 200);
    }
    assert_eq!(channels_via(&app, "2001:db8:1:2:ffff::9").await, 429);
    assert_eq!(channels_via(&app, "2001:db8:1:3::1").await, 200);
    assert_eq!(
        channels_via(&app, "not-an-ip").await,
        200,
        "garbage falls back to the proxy's own bucket"
    );
}

#[tokio::test]
async fn ratelimit_headers_can_be_turned_off() {
    let app = TestApp::spawn(
        None,
        &limited(&[
            ("CHATGATE_LIMITS__HEADERS", "false"),
            ("CHATGATE_LIMITS__REST_BURST_PER_IP", "1"),
        ]),
    )
    .await;
    let ok = app
        .http
        .get(app.url("/api/chat/channels"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(header(&ok, "ratelimit").is_none());
    assert!(header(&ok, "ratelimit-policy").is_none());
    let refused = app
        .http
        .get(app.url("/api/chat/channels"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(header(&refused, "ratelimit").is_none());
    assert!(
        header(&refused, "retry-after").is_some(),
        "Retry-After is always sent"
    );
}

#[tokio::test]
async fn a_socket_sending_only_garbage_is_closed_too() {
    let app = TestApp::spawn(None, &limited(&[])).await;
    let mut ws = app.ws("zed", "general").await;
    for _ in 0..3 {
        ws.send_text("not json").await;
        assert_eq!(ws.next_of("error").await["code"], "invalid_json");
    }
    // A valid message resets the count...
    ws.say("fine", "c-fine").await;
    ws.next_of("message").await;
    for _ in 0..3 {
        ws.send_text("not json").await;
        assert_eq!(ws.next_of("error").await["code"], "invalid_json");
    }
    // ...and the fourth refusal in a row closes the socket.
    ws.send_text("not json").await;
    let close = ws.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "too many refused frames");
    // Its address may not come straight back (every member would see it join and
    // leave again): 429 with the rest of the penalty as Retry-After.
    match try_ws(app.port, "username=zed&channel=general").await {
        Err((429, Some(retry))) => {
            let retry: u64 = retry.parse().unwrap();
            assert!((1..=10).contains(&retry), "{retry}");
        }
        other => panic!("expected 429, got {:?}", other.map(|_| "an open socket")),
    }
}

#[tokio::test]
async fn the_abuse_penalty_can_be_turned_off() {
    let app = TestApp::spawn(
        None,
        &limited(&[("CHATGATE_LIMITS__ABUSE_PENALTY_SECS", "0")]),
    )
    .await;
    let mut ws = app.ws("zed", "general").await;
    for _ in 0..4 {
        ws.send_text("not json").await;
    }
    assert_eq!(
        u16::from(ws.closed().await.expect("a close frame").code),
        1008
    );
    assert!(
        try_ws(app.port, "username=zed&channel=general")
            .await
            .is_ok()
    );
}
