//! Read deadlines of one HTTP/1.1 connection, by phase: how long it may stay silent
//! (`server.idle_timeout_secs`: after it opens, and between requests on keep-alive) and
//! how long its headers may take once they have started (`server.header_read_timeout_secs`).
//!
//! hyper's own `header_read_timeout` cannot tell the two apart: its timer starts when the
//! connection begins waiting for a request head (at once on a new connection, and as soon
//! as a response is written on keep-alive), so silence and slow headers would share one
//! bound. [`Deadlines`] wraps the socket instead and learns the phase from [`Phase`], which
//! the connection's service updates:
//!
//! | phase | entered when | read deadline |
//! |---|---|---|
//! | idle | the connection opens; a response has been written | last byte written + idle timeout |
//! | headers | bytes arrive while idle | first byte + header timeout |
//! | busy | the service has the request (headers parsed) | none here: `server.request_timeout_secs` and `handshake_timeout_secs` bound the handler |
//! | upgraded | the response was a 101 | never again: the WebSocket session has its own ping rules |
//!
//! A deadline only ends a connection while hyper waits for bytes from it: the read then
//! fails with `TimedOut` and hyper closes the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The bounds [`Deadlines`] applies.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the first byte of a request to the end of its headers.
    pub header_read: Duration,
    /// Silence before a request (after the connection opens or a response).
    pub idle: Duration,
}

const WAITING: u8 = 0;
const BUSY: u8 = 1;
const UPGRADED: u8 = 2;

/// Where a connection is, as its service sees it. The service and the socket are both
/// driven by the connection's one task (HTTP/1.1 serves one request at a time), so the
/// atomics are never contended; they only make the pair `Send`.
#[derive(Debug, Default)]
pub struct Phase {
    /// `WAITING`, `BUSY` or `UPGRADED` (final).
    state: AtomicU8,
    /// Responses completed: a change tells the socket a new idle period started, even if
    /// it never saw the request in between.
    served: AtomicU64,
}

impl Phase {
    /// The service has a request (its headers are parsed).
    pub fn request_started(&self) {
        let _ = self
            .state
            .compare_exchange(WAITING, BUSY, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The response is complete (its body ended or was dropped).
    pub fn response_finished(&self) {
        if self
            .state
            .compare_exchange(BUSY, WAITING, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.served.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The response was a 101: the connection is no longer HTTP.
    pub fn upgraded(&self) {
        self.state.store(UPGRADED, Ordering::Relaxed);
    }
}

/// The deadline the socket is under, as it last saw its phase.
#[derive(Debug, Clone, Copy)]
enum Clock {
    /// Silent since `since` (the connection opened or the last byte was written).
    Idle { since: Instant },
    /// Headers started at `since`.
    Headers { since: Instant },
    /// A request is in flight, or the connection was upgraded.
    Off,
}

/// A socket whose reads fail with `TimedOut` past the deadline of its [`Phase`].
pub struct Deadlines<T> {
    inner: T,
    phase: std::sync::Arc<Phase>,
    timeouts: Timeouts,
    clock: Clock,
    /// `Phase::served` when the clock last restarted.
    seen: u64,
    /// Set once upgraded: from then on every call goes straight to `inner`.
    passthrough: bool,
    /// Created on the first wait (a connection answered at once never needs one).
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether a deadline already ended the connection (counted once).
    expired: bool,
    /// What must live exactly as long as the socket: its place under the connection caps
    /// (after an upgrade the socket outlives the HTTP connection, in the WebSocket session).
    _held: Box<dyn Send>,
}

impl<T> Deadlines<T> {
    /// A new connection, idle from now, keeping `held` until it is dropped.
    pub fn new(
        inner: T,
        phase: std::sync::Arc<Phase>,
        timeouts: Timeouts,
        held: Box<dyn Send>,
    ) -> Self {
        Self {
            inner,
            phase,
            timeouts,
            clock: Clock::Idle {
                since: Instant::now(),
            },
            seen: 0,
            passthrough: false,
            sleep: None,
            expired: false,
            _held: held,
        }
    }

    /// Catches up with the service's view of the connection.
    fn observe(&mut self) {
        match self.phase.state.load(Ordering::Relaxed) {
            UPGRADED => {
                self.passthrough = true;
                self.clock = Clock::Off;
                self.sleep = None;
            }
            BUSY => self.clock = Clock::Off,
            _ => {
                let served = self.phase.served.load(Ordering::Relaxed);
                if served != self.seen {
                    self.seen = served;
                    self.clock = Clock::Idle {
                        since: Instant::now(),
                    };
                }
            }
        }
    }

    /// The deadline now in force, with its phase's metric label.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        let (since, limit, phase) = match self.clock {
            Clock::Idle { since } => (since, self.timeouts.idle, "idle"),
            Clock::Headers { since } => (since, self.timeouts.header_read, "header"),
            Clock::Off => return None,
        };
        Some((since.checked_add(limit)?, phase))
    }

    /// Whether `deadline` has passed; if not, the task is woken when it does.
    fn poll_expired(&mut self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx).is_ready()
    }

    /// A write while idle: the silence starts again after it (a slow reader of a long
    /// response is not idle).
    fn wrote(&mut self, bytes: usize) {
        if bytes > 0
            && let Clock::Idle { since } = &mut self.clock
        {
            *since = Instant::now();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Deadlines<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.passthrough {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.expired {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        this.observe();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && matches!(this.clock, Clock::Idle { .. }) {
                    this.clock = Clock::Headers {
                        since: Instant::now(),
                    };
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline() {
                Some((deadline, phase)) if this.poll_expired(cx, deadline) => {
                    this.expired = true;
                    crate::metrics::http_timeout(phase);
                    tracing::debug!(phase, "connection timed out");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{phase} timeout"),
                    )))
                }
                _ => Poll::Pending,
            },
        }
    }
}

impl<T> Deadlines<T> {
    /// Counts a write that went through (both write paths).
    fn after_write(&mut self, written: &Poll<io::Result<usize>>) {
        if !self.passthrough
            && let Poll::Ready(Ok(n)) = written
        {
            self.observe();
            self.wrote(*n);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Deadlines<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    fn pair() -> (Deadlines<DuplexStream>, DuplexStream, Arc<Phase>) {
        let (server, client) = duplex(1024);
        let phase = Arc::new(Phase::default());
        let io = Deadlines::new(server, phase.clone(), TIMEOUTS, Box::new(()));
        (io, client, phase)
    }

    async fn read(io: &mut Deadlines<DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 64];
        io.read(&mut buf).await
    }

    /// Paused time jumps to the timer's tick, at most a millisecond after the deadline.
    fn assert_near(elapsed: Duration, expected: Duration) {
        assert!(
            elapsed >= expected && elapsed <= expected + Duration::from_millis(2),
            "{elapsed:?}, expected {expected:?}"
        );
    }

    fn timed_out(result: io::Result<usize>) -> bool {
        result.is_err_and(|e| e.kind() == io::ErrorKind::TimedOut)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_cut_at_the_idle_timeout() {
        let (mut io, _client, _) = pair();
        let started = Instant::now();
        assert!(timed_out(read(&mut io).await));
        assert_near(started.elapsed(), TIMEOUTS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_started_have_the_header_timeout() {
        let (mut io, mut client, _) = pair();
        tokio::time::advance(Duration::from_secs(30)).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(read(&mut io).await.unwrap(), 16);
        let started = Instant::now();
        assert!(timed_out(read(&mut io).await));
        assert_near(started.elapsed(), TIMEOUTS.header_read);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_has_no_deadline_and_its_end_restarts_the_idle_clock() {
        let (mut io, mut client, phase) = pair();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read(&mut io).await.unwrap();
        phase.request_started();
        let waiting = tokio::time::timeout(Duration::from_secs(3600), read(&mut io)).await;
        assert!(waiting.is_err(), "no read deadline while busy");
        phase.response_finished();
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let started = Instant::now();
        assert!(timed_out(read(&mut io).await));
        assert_near(started.elapsed(), TIMEOUTS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_has_no_deadline() {
        let (mut io, mut client, phase) = pair();
        phase.request_started();
        phase.upgraded();
        phase.response_finished();
        let waiting = tokio::time::timeout(Duration::from_secs(3600), read(&mut io)).await;
        assert!(waiting.is_err(), "no read deadline once upgraded");
        client.write_all(b"frame").await.unwrap();
        assert_eq!(read(&mut io).await.unwrap(), 5);
    }
}
