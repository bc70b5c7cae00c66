//! The public listener's accept loop: what `axum::serve` did (TCP_NODELAY, the peer
//! address as `ConnectInfo`, upgrades, graceful shutdown), plus connection hygiene:
//!
//! - caps on concurrent TCP connections, per peer address and per process
//!   (`server.max_connections_per_ip`, `server.max_connections`): a connection over one is
//!   answered at once with the app's JSON error (429 `too_many_connections` or 503
//!   `server_full`, `Retry-After`, `Connection: close`) and closed, and counted in
//!   `chatgate_http_connections_refused_total`;
//! - a deadline for each phase of a connection (silence, headers), enforced on the socket
//!   by [`Deadlines`](super::deadline::Deadlines);
//! - hyper's own header timer as an outer bound (silence plus headers).
//!
//! Connections speak HTTP/1.1 (with upgrades), as under `axum::serve` with the features
//! this build has: no HTTP/2 server is compiled in.
//!
//! A connection's place under the caps belongs to its socket: an upgraded connection keeps
//! it for as long as its WebSocket session runs, so the caps count every open socket.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::client_ip::ClientIpResolver;
use super::deadline::{Deadlines, Phase, Timeouts};
use crate::config::Config;
use crate::error::ApiError;
use crate::limits::{Caps, Refusal};

/// How long a refused connection gets to receive its answer: it is written, our side is
/// closed, and what the client sends meanwhile is read and discarded. Closing a socket
/// with unread bytes makes the kernel reset it, and a reset can destroy the answer before
/// the client reads it.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Bytes read and discarded from a refused connection before it is closed anyway.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// Refused connections being answered at once. Beyond it, refused connections are
/// closed without an answer, so a flood of them holds at most this many sockets (for at
/// most [`REFUSAL_LINGER`]) on top of the caps.
const MAX_REFUSING: usize = 512;

/// After an accept error other than a failed connection (out of file descriptors), the
/// pause before accepting again, as `axum::serve` and hyper 0.14 did: the error would
/// repeat at once, and the pause lets connections close.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The connection rules of the public listener, from `[server]` (and `limits.enabled`).
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    pub timeouts: Timeouts,
    /// `server.max_connections`.
    pub max_connections: u32,
    /// `server.max_connections_per_ip`, or `u32::MAX` with limits off.
    pub max_connections_per_ip: u32,
    /// Peers not capped per address: their connections carry many clients' requests.
    pub proxies: ClientIpResolver,
}

impl ConnectionPolicy {
    pub fn new(config: &Config) -> Self {
        let server = &config.server;
        Self {
            timeouts: Timeouts {
                header_read: Duration::from_secs(server.header_read_timeout_secs),
                idle: Duration::from_secs(server.idle_timeout_secs),
            },
            max_connections: server.max_connections,
            max_connections_per_ip: if config.limits.enabled {
                server.max_connections_per_ip
            } else {
                u32::MAX
            },
            proxies: ClientIpResolver::new(&server.trusted_proxies),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting, lets every
/// connection finish its request in flight (idle ones close at once) and returns when they
/// have. Upgraded connections are not waited for: their sessions run on their own tasks.
/// Accept errors are logged and retried, as `axum::serve` does.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    policy: ConnectionPolicy,
    shutdown: CancellationToken,
) {
    let caps = Caps::new(
        policy.max_connections,
        policy.max_connections_per_ip,
        u32::MAX,
    );
    let answers = Answers::render().await;
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut http = http1::Builder::new();
    // hyper's header timer starts as soon as a connection waits for a request head, so it
    // bounds silence and headers together; `Deadlines` bounds each.
    http.timer(TokioTimer::new())
        .header_read_timeout(policy.timeouts.idle + policy.timeouts.header_read);
    let http = Arc::new(http);
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e, &shutdown).await;
                    continue;
                }
            },
        };
        // No Nagle: chat frames are small and latency-bound (Nagle with delayed ACKs
        // added ~40 ms to deliveries).
        let _ = stream.set_nodelay(true);
        // IPv4 peers of a dual-stack listener arrive as `::ffff:a.b.c.d`: keyed as such,
        // they would all fall into one IPv6 /64 and share one cap.
        let ip = super::client_ip::canonical(peer.ip());
        let key = (!policy.proxies.is_trusted(ip)).then_some(ip);
        let permit = match caps.admit(key) {
            Ok(permit) => permit,
            Err(refusal) => {
                let limit = match refusal {
                    Refusal::Full => "process",
                    Refusal::PerIp | Refusal::PerUser => "per_ip",
                };
                crate::metrics::http_connection_refused(limit);
                tracing::debug!(%peer, limit, "connection refused: connection cap");
                if let Ok(slot) = refusing.clone().try_acquire_owned() {
                    connections.spawn(refuse(stream, answers.get(refusal), slot));
                }
                continue;
            }
        };
        let held = Box::new((permit, crate::metrics::OpenHttpConnection::opened()));
        let phase = Arc::new(Phase::default());
        let io = TokioIo::new(Deadlines::new(stream, phase.clone(), policy.timeouts, held));
        let service = ConnectionService {
            router: router.clone(),
            peer,
            phase,
        };
        connections.spawn(serve_connection(
            http.clone(),
            io,
            service,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// One connection, until it closes, is upgraded, or finishes its request in flight after
/// `shutdown`.
async fn serve_connection(
    http: Arc<http1::Builder>,
    io: TokioIo<Deadlines<TcpStream>>,
    service: ConnectionService,
    shutdown: CancellationToken,
) {
    let peer = service.peer;
    let connection = http.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        if e.is_timeout() {
            crate::metrics::http_timeout("header");
        }
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// What `axum::serve` does with accept errors: a failed connection is the client's
/// problem; anything else (out of file descriptors) is logged and accepting pauses.
async fn accept_failed(e: std::io::Error, shutdown: &CancellationToken) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
    }
}

/// The whole HTTP/1.1 answers to refused connections, rendered once from [`ApiError`]
/// (so status, code, detail and `Retry-After` are those of the WebSocket caps).
struct Answers {
    per_ip: Bytes,
    full: Bytes,
}

impl Answers {
    async fn render() -> Self {
        Self {
            per_ip: render(Refusal::PerIp).await,
            full: render(Refusal::Full).await,
        }
    }

    fn get(&self, refusal: Refusal) -> Bytes {
        match refusal {
            Refusal::Full => self.full.clone(),
            Refusal::PerIp | Refusal::PerUser => self.per_ip.clone(),
        }
    }
}

async fn render(refusal: Refusal) -> Bytes {
    let (parts, body) = ApiError::TooManyConnections(refusal)
        .into_response()
        .into_parts();
    let body = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if let Ok(value) = value.to_str() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str(&format!(
        "content-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut answer = head.into_bytes();
    answer.extend_from_slice(&body);
    Bytes::from(answer)
}

/// Answers a refused connection and closes it (see [`REFUSAL_LINGER`]).
async fn refuse(mut stream: TcpStream, answer: Bytes, _slot: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut scratch).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The router as one connection's service: the peer address as `ConnectInfo` (what
/// `into_make_service_with_connect_info` did), and the connection's [`Phase`] kept up
/// to date for its deadlines.
struct ConnectionService {
    router: Router,
    peer: SocketAddr,
    phase: Arc<Phase>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        self.phase.request_started();
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let response = self.router.clone().oneshot(request.map(Body::new));
        let phase = self.phase.clone();
        Box::pin(async move {
            let response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                phase.upgraded();
            }
            Ok(response.map(|body| TrackedBody {
                body,
                finished: Some(Finished(phase)),
            }))
        })
    }
}

/// Marks the response finished when dropped.
struct Finished(Arc<Phase>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.response_finished();
    }
}

/// A response body that tells the connection's [`Phase`] when it has ended (or been
/// dropped, as hyper does with bodies it does not need to poll).
struct TrackedBody {
    body: Body,
    finished: Option<Finished>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.finished = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
