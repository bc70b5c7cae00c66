//! Connection hygiene over real sockets: slow headers, silent and idle keep-alive
//! connections are closed; connections over the per-address and per-process caps get a
//! clear refusal, and places come back when connections close; WebSockets still upgrade
//! and are not cut by the HTTP idle timeout.
//!
//! Each closing is awaited as an event (end of stream) under a generous outer bound
//! ([`WAIT`], ten times the timeouts configured here), never timed.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, WAIT, metric};

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: chatgate\r\n\r\n";

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(("127.0.0.1", app.port)).await.unwrap()
}

/// Reads until the server closes the connection (end of stream or a reset) or `enough`
/// holds for what came; returns what came. Panics if neither happens within [`WAIT`].
async fn read_until(
    stream: &mut (impl AsyncRead + Unpin),
    enough: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !enough(&received) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server answers or closes within the wait");
    received
}

/// Everything the server sends until it closes the connection.
async fn until_closed(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    read_until(stream, |_| false).await
}

/// The start of the server's answer: a whole response head, or what came before it
/// closed.
async fn until_answered(stream: &mut TcpStream) -> Vec<u8> {
    read_until(stream, |received| {
        received.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await
}

/// One response on a keep-alive connection: its status and body (by Content-Length).
async fn response(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if received.len() >= end + 4 + length {
                    let status = head[9..12].parse().unwrap();
                    return (status, received[end + 4..end + 4 + length].to_vec());
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before a whole response");
            received.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a response within the wait")
}

/// The app with these header-read and idle timeouts, in seconds.
async fn with_timeouts(header_read_secs: u64, idle_secs: u64) -> TestApp {
    let (header_read, idle) = (header_read_secs.to_string(), idle_secs.to_string());
    TestApp::spawn(
        None,
        &[
            ("CHATGATE_SERVER__HEADER_READ_TIMEOUT_SECS", &header_read),
            ("CHATGATE_SERVER__IDLE_TIMEOUT_SECS", &idle),
        ],
    )
    .await
}

/// A keep-alive connection that has been served once (so it is known to be admitted).
async fn served(app: &TestApp) -> TcpStream {
    let mut stream = connect(app).await;
    stream.write_all(HEALTHZ).await.unwrap();
    assert_eq!(response(&mut stream).await.0, 200);
    stream
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_closed_at_the_header_timeout() {
    // Silence alone would be allowed for a minute: only the header timeout can close it.
    let app = with_timeouts(1, 60).await;
    let stream = connect(&app).await;
    let (mut reader, mut writer) = stream.into_split();
    let trickle = async move {
        writer
            .write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        // One byte every 200 ms, as a slowloris client sends, until the server is gone.
        while writer.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::future::pending::<()>().await;
    };
    let received = tokio::select! {
        received = until_closed(&mut reader) => received,
        () = trickle => unreachable!("the trickle never ends"),
    };
    assert!(
        received.is_empty(),
        "no request was served: {}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed_at_the_idle_timeout() {
    let app = with_timeouts(30, 1).await;
    let mut silent = connect(&app).await;
    assert!(until_closed(&mut silent).await.is_empty());
}

#[tokio::test]
async fn a_keep_alive_connection_idle_after_a_request_is_closed() {
    let app = with_timeouts(30, 1).await;
    let mut stream = served(&app).await;
    assert!(until_closed(&mut stream).await.is_empty());
}

/// The open connections `app` was configured to refuse above get `status` with `code`,
/// `Retry-After` and `Connection: close`; once one closes, a new one is served again.
async fn refuses_over_the_cap(app: &TestApp, cap: usize, status: u16, code: &str) {
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(served(app).await);
    }
    let mut over = connect(app).await;
    // The answer comes at once; the request may be sent or not.
    let _ = over.write_all(HEALTHZ).await;
    let answer = String::from_utf8(until_closed(&mut over).await).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole response");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with(&format!("http/1.1 {status} ")), "{answer}");
    assert!(head.contains("\r\nconnection: close"), "{answer}");
    assert!(head.contains("\r\nretry-after: "), "{answer}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["code"], code, "{answer}");
    assert!(body["detail"].is_string(), "{answer}");

    // Closing a connection gives its place back once the server has seen the close
    // (there is no event to await for that, so new connections are tried until served).
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = connect(app).await;
        let _ = stream.write_all(HEALTHZ).await;
        let received = until_answered(&mut stream).await;
        if received.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was not given back: {}",
            String::from_utf8_lossy(&received)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = app.metrics().await;
    let limit = if status == 503 { "process" } else { "per_ip" };
    let series = format!("chatgate_http_connections_refused_total{{limit=\"{limit}\"}}");
    assert!(
        metric(&metrics, &series) >= 1.0,
        "the refusal is counted: {metrics}"
    );
}

#[tokio::test]
async fn connections_over_the_per_address_cap_get_429_until_one_closes() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_LIMITS__ENABLED", "true"),
            ("CHATGATE_LIMITS__MAX_CONNECTIONS_PER_IP", "2"),
            ("CHATGATE_SERVER__MAX_CONNECTIONS_PER_IP", "3"),
        ],
    )
    .await;
    refuses_over_the_cap(&app, 3, 429, "too_many_connections").await;
}

#[tokio::test]
async fn connections_over_the_process_cap_get_503_until_one_closes() {
    let app = TestApp::spawn(None, &[("CHATGATE_SERVER__MAX_CONNECTIONS", "3")]).await;
    refuses_over_the_cap(&app, 3, 503, "server_full").await;
}

#[tokio::test]
async fn a_websocket_upgrades_and_outlives_the_http_idle_timeout() {
    let app = with_timeouts(1, 1).await;
    let mut ws = app.ws("wendy", "general").await;
    // A silent connection opened after the socket is closed at the idle timeout: by then
    // the socket, silent as long, would have been too.
    let mut witness = connect(&app).await;
    assert!(until_closed(&mut witness).await.is_empty());
    ws.say("still here", "c1").await;
    let echo = ws.next_of("message").await;
    assert_eq!(echo["content"], "still here");
}
