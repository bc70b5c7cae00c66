//! A short soak: the real binary on a private Redis, churned by `chatgate-load soak`
//! (connect, send, check the echoes, disconnect, over and over next to standing
//! connections), must come back to its baseline RSS, open fds and runtime tasks, with
//! every message acknowledged.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{Process, RedisServer, free_port};

/// Cycles of the soak (each: connect, 3 messages and their echoes, close).
const CYCLES: u64 = 2_000;
/// Standing connections held through the churn.
const STANDING: u64 = 20;
/// Longest the load generator may run: a guard against hangs (the run takes about 15 s
/// in a debug build on two cores).
const SOAK_LIMIT: Duration = Duration::from_secs(240);

#[tokio::test]
async fn connection_churn_returns_the_server_to_its_baseline() {
    let redis = RedisServer::start().await;
    // `Process::start` asks for a random admin port it cannot report; ours wins, as the
    // test's variables are applied after its defaults.
    let admin_port = free_port();
    let vars = [
        ("CHATGATE_REDIS__URL".to_string(), redis.url()),
        ("CHATGATE_LIMITS__ENABLED".to_string(), "false".to_string()),
        ("CHATGATE_ADMIN__PORT".to_string(), admin_port.to_string()),
    ];
    let server = Process::start(true, &vars, None).await;

    let load = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate-load"))
        .args(["--url", &format!("ws://127.0.0.1:{}", server.port)])
        .args(["--server-pid", &server.child.id().to_string()])
        .args(["--admin-url", &format!("http://127.0.0.1:{admin_port}")])
        .args(["--warmup", "0.5", "--json", "soak"])
        .args(["--cycles", &CYCLES.to_string()])
        .args(["--idle", &STANDING.to_string()])
        .args(["--workers", "8", "--channels", "4", "--sample-every", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Killed if the run outlives its limit (the future below is dropped).
        .kill_on_drop(true)
        .spawn()
        .expect("chatgate-load runs");
    let output = tokio::time::timeout(SOAK_LIMIT, load.wait_with_output())
        .await
        .expect("the soak ends within its limit")
        .expect("chatgate-load's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "chatgate-load soak failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    // The figures as JSON (the last line): the checks really ran, on every figure.
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON report:\n{stdout}"));
    let churn = &report["churn"];
    assert_eq!(churn["cycles"], CYCLES, "{stdout}");
    assert_eq!(churn["failed"], 0, "{stdout}");
    assert_eq!(churn["sent"], CYCLES * 3, "{stdout}");
    assert_eq!(churn["acked"], churn["sent"], "{stdout}");
    let after = &report["server"];
    assert_eq!(after["connections"]["final"], STANDING, "{stdout}");
    for figure in ["rss_kib", "fds", "tasks"] {
        assert_eq!(after[figure]["ok"], true, "{figure}: {stdout}");
    }
    assert_eq!(report["standing"]["ended_early"], 0, "{stdout}");
}
