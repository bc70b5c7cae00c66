//! Test harness: a private `redis-server` per test, the real app on port 0, and small
//! HTTP and WebSocket clients. Waits are bounded guards on awaited events, never sleeps
//! standing in for an event.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chatgate::config::Overrides;
use chatgate::{Application, Config};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Longest wait for any single expected event; a guard against hangs, not a timing claim.
pub const WAIT: Duration = Duration::from_secs(10);

/// An HTTP client (with the process's TLS provider installed first, as chatgate does).
pub fn http_client() -> reqwest::Client {
    chatgate::install_tls_provider();
    reqwest::Client::new()
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` owned by one test: on a free port, nothing on disk, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// With persistence: every write is in an append-only file here (fsynced), so a
    /// killed and restarted server keeps its data, as a production Redis would.
    dir: Option<PathBuf>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            dir: None,
        };
        server.restart().await;
        server
    }

    /// A server whose data survives a kill and restart (AOF, fsync on every write).
    pub async fn start_persistent() -> Self {
        let dir = std::env::temp_dir().join(format!("chatgate-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port: free_port(),
            child: None,
            dir: Some(dir),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            // DEBUG SLEEP stands in for a Redis that stops answering for a while.
            .args(["--enable-debug-command", "yes"]);
        match &self.dir {
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--dir", dir.to_str().unwrap()]),
            None => command
                .args(["--appendonly", "no"])
                .args(["--dir", std::env::temp_dir().to_str().unwrap()]),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: like a crash, everything in it is lost).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// The configuration every test app starts from: dev mode (auth off), the `test`
/// environment, port 0, plus the test's own variables.
pub fn test_config(redis: Option<&RedisServer>, vars: &[(&str, &str)]) -> Config {
    load_config(true, redis, vars)
}

/// The production posture (auth on unless `vars` say otherwise), in the `test`
/// environment, on the in-memory store unless `redis` is given.
pub fn secure_config(redis: Option<&RedisServer>, vars: &[(&str, &str)]) -> Config {
    let mut all = vec![(
        "CHATGATE_STORE__BACKEND",
        if redis.is_some() { "redis" } else { "memory" },
    )];
    all.extend_from_slice(vars);
    load_config(false, redis, &all)
}

fn load_config(dev: bool, redis: Option<&RedisServer>, vars: &[(&str, &str)]) -> Config {
    // Limits are off unless a test turns them on: most tests send faster than a person.
    let mut all: Vec<(String, String)> = vec![
        ("CHATGATE_SERVER__HOST".into(), "127.0.0.1".into()),
        ("CHATGATE_SERVER__PORT".into(), "0".into()),
        ("CHATGATE_LIMITS__ENABLED".into(), "false".into()),
        ("CHATGATE_ADMIN__HOST".into(), "127.0.0.1".into()),
        ("CHATGATE_ADMIN__PORT".into(), "0".into()),
    ];
    if let Some(redis) = redis {
        all.push(("CHATGATE_REDIS__URL".into(), redis.url()));
        all.push(("CHATGATE_REDIS__STARTUP_TIMEOUT_SECS".into(), "2".into()));
        all.push(("CHATGATE_REDIS__COMMAND_TIMEOUT_MS".into(), "1000".into()));
        all.push(("CHATGATE_REDIS__CONNECT_TIMEOUT_MS".into(), "500".into()));
    }
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load(&Overrides {
        dev,
        environment: Some("test".into()),
        config_dir: Some(config_dir()),
        vars: all,
        ..Overrides::default()
    })
    .expect("test config is valid")
}

/// The real application, serving on 127.0.0.1 and a free port, in this test's runtime.
pub struct TestApp {
    pub port: u16,
    /// The admin listener's port (`/metrics`).
    pub admin_port: u16,
    pub http: reqwest::Client,
    /// The configuration it runs with (sizes derived).
    pub config: std::sync::Arc<Config>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn(redis: Option<&RedisServer>, vars: &[(&str, &str)]) -> Self {
        Self::spawn_with(test_config(redis, vars)).await
    }

    pub async fn spawn_with(config: Config) -> Self {
        let app = Application::build(config).await.expect("app builds");
        let port = app.port();
        let admin_port = app.admin_port().unwrap_or(0);
        let shutdown = app.shutdown_token();
        let config = app.state().config.clone();
        let task = tokio::spawn(async move {
            app.run_until_stopped().await.expect("app runs");
        });
        Self {
            port,
            admin_port,
            http: crate::helpers::http_client(),
            config,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self.http.delete(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Sends a text message over REST and returns its `data`.
    pub async fn send(&self, sender: &str, channel: &str, content: &str) -> Value {
        let (status, body) = self
            .post(
                "/api/chat/message",
                &serde_json::json!({"sender": sender, "content": content, "channel": channel}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }

    pub async fn history(&self, channel: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/api/chat/history/{channel}?limit=1000"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["messages"].as_array().unwrap().clone()
    }

    pub async fn online(&self, channel: &str) -> Vec<String> {
        let (status, body) = self.get(&format!("/api/users/online/{channel}")).await;
        assert_eq!(status, 200, "{body}");
        body["online_users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["username"].as_str().unwrap().to_string())
            .collect()
    }

    /// Polls `/readyz` until it answers `want` (a state reached after an outside event
    /// such as a Redis restart, with no other signal to await).
    pub async fn wait_ready(&self, want: u16) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = self
                .http
                .get(self.url("/readyz"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            if status == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz stayed {status}, wanted {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn ws(&self, username: &str, channel: &str) -> WsClient {
        WsClient::connect(self.port, username, channel).await
    }

    /// Starts the drain and waits for the app to stop.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("app stops within the grace period")
                .unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the chat protocol.
pub struct WsClient {
    pub socket: Socket,
}

impl WsClient {
    pub async fn connect(port: u16, username: &str, channel: &str) -> Self {
        Self::connect_query(port, &format!("username={username}&channel={channel}")).await
    }

    /// Connects with this query string (as a client that resumes with `since=`).
    pub async fn connect_query(port: u16, query: &str) -> Self {
        let url = format!("ws://127.0.0.1:{port}/ws/chat?{query}");
        let (socket, response) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connects");
        assert_eq!(response.status().as_u16(), 101);
        Self { socket }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::Text(text.into())).await.unwrap();
    }

    /// Sends a chat message with a client id.
    pub async fn say(&mut self, content: &str, client_id: &str) {
        self.send_json(serde_json::json!({
            "type": "message", "content": content, "message_type": "text", "client_id": client_id
        }))
        .await;
    }

    /// The next text frame as JSON; panics on close or after [`WAIT`].
    pub async fn next(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a frame within the wait")
                .expect("socket open")
                .expect("no socket error");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Close(frame) => panic!("socket closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame of type `kind`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Reads until the server closes; returns the close frame (skipping any data frames).
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("close within the wait")
            {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
        // Drain until the server's close arrives, so the server has seen ours.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.socket.next()).await {}
    }
}

/// The value of `series` (name and labels, as rendered) in a `/metrics` text; 0 when the
/// series is absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The keys of a JSON object, sorted.
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

/// Runs the chatgate binary with environment variables; killed on drop.
pub struct Process {
    pub child: Child,
    pub port: u16,
}

impl Process {
    /// The binary in `--dev` mode on `redis`.
    pub async fn spawn(redis: &RedisServer, vars: &[(&str, &str)]) -> Self {
        let mut all = vec![("CHATGATE_REDIS__URL".to_string(), redis.url())];
        all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::start(true, &all, None).await
    }

    /// The binary with `--dev` or not, its stdout and stderr appended to `log` (or
    /// discarded), ready when this returns.
    pub async fn start(
        dev: bool,
        vars: &[(String, String)],
        log: Option<&std::path::Path>,
    ) -> Self {
        let port = free_port();
        let output = || match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatgate"));
        if dev {
            command.arg("--dev");
        }
        let child = command
            .args(["--environment", "test", "--config-dir"])
            .arg(config_dir())
            .env("CHATGATE_SERVER__HOST", "127.0.0.1")
            .env("CHATGATE_SERVER__PORT", port.to_string())
            .env("CHATGATE_ADMIN__HOST", "127.0.0.1")
            .env("CHATGATE_ADMIN__PORT", "0")
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(output())
            .stderr(output())
            .spawn()
            .expect("chatgate binary runs");
        let process = Self { child, port };
        let http = crate::helpers::http_client();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ready = http
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false);
            if ready {
                return process;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chatgate did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A valid PNG data URL of about `bytes` decoded bytes (a 1x1 header, then padding).
pub fn png(bytes: usize) -> String {
    let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
    data.extend_from_slice(&13u32.to_be_bytes());
    data.extend_from_slice(b"IHDR");
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    data.resize(bytes, 0);
    use base64::Engine;
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(data)
    )
}
