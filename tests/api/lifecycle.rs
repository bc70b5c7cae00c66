//! The real binary: SIGTERM drains, SIGKILL leaves presence that expires, bad config exits.

use std::process::Command;

use crate::helpers::{Process, RedisServer, TestApp, WsClient};

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_cleans_presence_and_exits_0() {
    let redis = RedisServer::start().await;
    let mut process =
        Process::spawn(&redis, &[("CHATGATE_SERVER__SHUTDOWN_GRACE_SECS", "2")]).await;
    let observer = TestApp::spawn(Some(&redis), &[]).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(WsClient::connect(process.port, &format!("user{i}"), "drain").await);
    }
    assert_eq!(observer.online("drain").await.len(), 5);
    process.signal("TERM");
    for client in &mut clients {
        let close = client.closed().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
    let status = process.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        observer.online("drain").await.is_empty(),
        "presence cleaned on the way out"
    );
}

#[tokio::test]
async fn a_killed_replica_stops_showing_its_users_within_the_presence_ttl() {
    let redis = RedisServer::start().await;
    let fast = [
        ("CHATGATE_STORE__PRESENCE_TTL_SECS", "2"),
        ("CHATGATE_STORE__PRESENCE_REFRESH_SECS", "1"),
    ];
    let mut process = Process::spawn(&redis, &fast).await;
    let survivor = TestApp::spawn(Some(&redis), &fast).await;
    let _ghost = WsClient::connect(process.port, "ghost", "crash").await;
    let _alive = survivor.ws("alive", "crash").await;
    assert_eq!(survivor.online("crash").await, ["alive", "ghost"]);
    process.signal("KILL");
    process.wait_exit().await;
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    while survivor.online("crash").await != ["alive"] {
        assert!(tokio::time::Instant::now() < deadline, "ghost still listed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[test]
fn bad_configuration_lists_every_problem_and_exits_non_zero() {
    let output = Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .arg("--check-config")
        .env("CHATGATE_SERVER__PORT", "eighty")
        .env("CHATGATE_STORE__BACKEND", "redis")
        .env("CHATGATE_WS__NOPE", "1")
        .env_remove("REDIS_URL")
        .env_remove("REDIS_HOST")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CHATGATE_SERVER__PORT"), "{stderr}");
    assert!(stderr.contains("unknown key ws.nope"), "{stderr}");
    assert!(stderr.contains("auth.enabled"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .args(["--dev", "--check-config"])
        .env_remove("REDIS_URL")
        .env_remove("REDIS_HOST")
        .env_remove("REDIS_PORT")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("store memory"));
}

#[tokio::test]
async fn in_process_drain_closes_sockets_and_stops() {
    let app = TestApp::spawn(None, &[]).await;
    let mut client = app.ws("bob", "general").await;
    app.stop().await;
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
}

#[tokio::test]
async fn dev_mode_moves_the_admin_listener_off_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let app = TestApp::spawn(None, &[("CHATGATE_ADMIN__PORT", port.as_str())]).await;
    assert_ne!(app.admin_port.to_string(), port);
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", app.admin_port))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    // Outside dev mode the configured port is a promise (Prometheus scrapes it): refused.
    let config = crate::helpers::secure_config(
        None,
        &[
            ("CHATGATE_ADMIN__PORT", port.as_str()),
            ("CHATGATE_AUTH__ALGORITHMS", "HS256"),
            (
                "CHATGATE_AUTH__HMAC_SECRET",
                "an-hmac-secret-of-at-least-32-bytes-for-tests",
            ),
        ],
    );
    let refused = chatgate::app::Application::build(config).await;
    assert!(refused.err().unwrap().to_string().contains("cannot listen"));
}
