//! The read side of an upgraded WebSocket connection, gated by the payload budget.
//!
//! The WebSocket library reserves memory for a whole frame as soon as it has parsed the
//! frame's header. So the gate reads the frame headers first (RFC 6455 section 5.2: 2 to
//! 14 bytes), and holds back the header of any data frame that makes its message larger
//! than the small cap until the process's [`PayloadBudget`] grants permits for it. Only
//! then does the header reach the library, and the payload after it. A frame whose header
//! announces more than the message cap passes at once: the library refuses it from its
//! header (close 1009) without allocating.
//!
//! - The permits of a message are handed to the session with the message
//!   ([`GateHandle::take_permit`]), which keeps them until the message is handled.
//! - No room within the budget's wait: the read fails and [`GateHandle::refusal`] says
//!   [`GateRefusal::Busy`] (the session answers `server_busy` and closes with 1013).
//! - A message that holds permits must arrive whole within its deadline, or the read fails
//!   with [`GateRefusal::TooSlow`]: a client trickling a large frame cannot sit on the
//!   budget.
//!
//! Writes pass through untouched.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::PollSemaphore;

use crate::limits::payload::{PayloadBudget, PayloadPermit};

/// Why the gate stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// No room in the payload budget within its wait; retry after this long.
    Busy(Duration),
    /// A large message did not arrive whole within its deadline.
    TooSlow,
}

#[derive(Debug, Default)]
struct Shared {
    /// Permits of messages the library has (or is about to have) whole.
    admitted: PayloadPermit,
    refusal: Option<GateRefusal>,
}

/// The session's side of a gate.
#[derive(Debug, Clone, Default)]
pub struct GateHandle(Arc<Mutex<Shared>>);

impl GateHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The permits of the messages received so far; call after each inbound message and
    /// keep them until it is handled.
    pub fn take_permit(&self) -> PayloadPermit {
        std::mem::take(&mut self.lock().admitted)
    }

    /// Why reading stopped, when the gate stopped it.
    pub fn refusal(&self) -> Option<GateRefusal> {
        self.lock().refusal
    }
}

/// Where the scan of the byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Between frames: the next bytes are a header.
    Header,
    /// Inside a frame's payload, this many bytes still to come.
    Payload(u64),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    /// Bytes of the header itself.
    len: usize,
    fin: bool,
    /// Text, binary or continuation (not a control frame).
    data: bool,
    payload: u64,
}

/// Parses the header at the start of `bytes`, or `None` if it is not all there yet.
fn parse_header(bytes: &[u8]) -> Option<Header> {
    let (&b0, rest) = bytes.split_first()?;
    let &b1 = rest.first()?;
    let masked = b1 & 0x80 != 0;
    let (ext, payload) = match b1 & 0x7F {
        126 => (
            2,
            u64::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
        ),
        127 => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            (8, u64::from_be_bytes(raw))
        }
        n => (0, u64::from(n)),
    };
    let len = 2 + ext + if masked { 4 } else { 0 };
    if bytes.len() < len {
        return None;
    }
    Some(Header {
        len,
        fin: b0 & 0x80 != 0,
        data: b0 & 0x08 == 0,
        payload,
    })
}

/// Largest frame payload the WebSocket library is handed; larger frames are cut into
/// fragments of this size. The library keeps a read buffer as large as the largest frame
/// it has seen for the rest of the connection, so without this every socket that once
/// sent a 13 MB image would hold 13 MB until it closed. A multiple of 4, so the fragments
/// keep the frame's masking key.
const FRAGMENT: u64 = 16 * 1024;

/// A frame being cut into fragments.
#[derive(Debug, Clone, Copy)]
struct Cutting {
    /// Payload bytes of the frame not yet given a fragment.
    left: u64,
    fin: bool,
    /// The frame's first byte without FIN: RSV bits and opcode (continuation after the
    /// first fragment).
    head: u8,
    mask: Option<[u8; 4]>,
}

/// An upgraded connection whose reads are gated by the payload budget.
pub struct Gate<IO> {
    io: IO,
    budget: Arc<PayloadBudget>,
    semaphore: PollSemaphore,
    /// The message cap: frames announcing more are the library's to refuse.
    max_message: u64,
    /// How long a message holding permits may take to arrive.
    message_timeout: Duration,
    /// Bytes read from `io` and not handed out yet: a header (possibly incomplete) and
    /// what followed it in the same read.
    held: BytesMut,
    scan: Scan,
    /// Data bytes of the current message so far, headers excluded.
    message_len: u64,
    /// Permits held for the current message.
    current: PayloadPermit,
    /// Permits the header at the front of `held` waits for, and until when.
    waiting: Option<(u32, Pin<Box<Sleep>>)>,
    /// When the current message must be complete (it holds permits).
    deadline: Option<Pin<Box<Sleep>>>,
    /// The frame being cut into fragments, and the header of the next fragment.
    cutting: Option<Cutting>,
    out: BytesMut,
    handle: GateHandle,
}

impl<IO> Gate<IO> {
    pub fn new(
        io: IO,
        budget: Arc<PayloadBudget>,
        max_message: usize,
        message_timeout: Duration,
    ) -> (Self, GateHandle) {
        let handle = GateHandle::default();
        let gate = Self {
            io,
            semaphore: budget.poll_semaphore(),
            budget,
            max_message: max_message as u64,
            message_timeout,
            held: BytesMut::new(),
            scan: Scan::Header,
            message_len: 0,
            current: PayloadPermit::default(),
            waiting: None,
            deadline: None,
            cutting: None,
            out: BytesMut::new(),
            handle: handle.clone(),
        };
        (gate, handle)
    }

    fn refuse(&mut self, why: GateRefusal) -> io::Error {
        self.handle.lock().refusal = Some(why);
        self.waiting = None;
        self.deadline = None;
        io::Error::other(match why {
            GateRefusal::Busy(_) => "payload budget full",
            GateRefusal::TooSlow => "large message too slow",
        })
    }

    /// Permits the frame with this header needs before it may pass (0: none).
    fn units_for(&self, header: &Header) -> u32 {
        if !header.data {
            return 0;
        }
        let total = self.message_len.saturating_add(header.payload);
        if total > self.max_message {
            // The library refuses this frame from its header, before allocating.
            return 0;
        }
        let needed = self
            .budget
            .units(usize::try_from(total).unwrap_or(usize::MAX));
        needed.saturating_sub(u32::try_from(self.current.bytes()).unwrap_or(u32::MAX))
    }

    /// Lets the header at the front of `held` pass (its permits, if any, are held).
    fn admit(&mut self, header: Header) {
        if header.data {
            self.message_len = self.message_len.saturating_add(header.payload);
            if header.fin {
                // The library will have the whole message once this payload is read: its
                // permits go to the session with it.
                let permit = std::mem::take(&mut self.current);
                self.handle.lock().admitted.merge(permit);
                self.message_len = 0;
                self.deadline = None;
            }
        }
        self.scan = if header.payload == 0 {
            Scan::Header
        } else {
            Scan::Payload(header.payload)
        };
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Gate<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(deadline) = &mut this.deadline
                && deadline.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Err(this.refuse(GateRefusal::TooSlow)));
            }
            if let Some((units, wait)) = &mut this.waiting {
                match this.semaphore.poll_acquire_many(cx, *units) {
                    Poll::Ready(Some(permit)) => {
                        this.current.merge(permit.into());
                        this.waiting = None;
                        if this.deadline.is_none() {
                            let at = Instant::now() + this.message_timeout;
                            this.deadline = Some(Box::pin(tokio::time::sleep_until(at)));
                        }
                        let header = parse_header(&this.held).expect("a held header is whole");
                        this.release_header(header, buf);
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(
                            this.refuse(GateRefusal::Busy(this.budget.busy().retry_after))
                        ));
                    }
                    Poll::Pending => {
                        if wait.as_mut().poll(cx).is_ready() {
                            crate::metrics::payload_budget_refused();
                            return Poll::Ready(Err(
                                this.refuse(GateRefusal::Busy(this.budget.busy().retry_after))
                            ));
                        }
                        return Poll::Pending;
                    }
                }
            }
            match this.scan {
                Scan::Payload(left) => {
                    if !this.held.is_empty() {
                        let n = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(this.held.len())
                            .min(buf.remaining());
                        buf.put_slice(&this.held[..n]);
                        this.held.advance(n);
                        this.after_payload(n as u64);
                        return Poll::Ready(Ok(()));
                    }
                    // Straight into the caller's buffer; whatever follows the payload in
                    // the same read is a header, kept back for the scan.
                    let start = buf.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                    let read = buf.filled().len() - start;
                    let payload = usize::try_from(left).unwrap_or(usize::MAX).min(read);
                    if payload < read {
                        this.held
                            .extend_from_slice(&buf.filled()[start + payload..start + read]);
                        buf.set_filled(start + payload);
                    }
                    this.after_payload(payload as u64);
                    return Poll::Ready(Ok(()));
                }
                Scan::Header => {
                    if let Some(header) = parse_header(&this.held) {
                        let units = this.units_for(&header);
                        if units > 0 {
                            let wait = Box::pin(tokio::time::sleep(this.budget.wait()));
                            this.waiting = Some((units, wait));
                            continue;
                        }
                        this.release_header(header, buf);
                        return Poll::Ready(Ok(()));
                    }
                    // An incomplete header: read more of it (never more than a header
                    // plus a little, so nothing large sits here).
                    if this.held.capacity() - this.held.len() < 64 {
                        this.held.reserve(64);
                    }
                    let read = ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut this.io),
                        cx,
                        &mut this.held
                    ))?;
                    if read == 0 {
                        // End of stream: what is held is a truncated header.
                        let n = this.held.len().min(buf.remaining());
                        buf.put_slice(&this.held[..n]);
                        this.held.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl<IO> Gate<IO> {
    /// Admits the header at the front of `held` and hands it out. Should the caller's
    /// buffer be shorter than the header, the rest of it leaves with the payload, unscanned
    /// (it is the same frame).
    fn release_header(&mut self, header: Header, buf: &mut ReadBuf<'_>) {
        self.admit(header);
        if header.data && header.payload > FRAGMENT {
            // Cut: the original header is replaced by one per fragment.
            let mask = (self.held[1] & 0x80 != 0).then(|| {
                let at = header.len - 4;
                [
                    self.held[at],
                    self.held[at + 1],
                    self.held[at + 2],
                    self.held[at + 3],
                ]
            });
            self.cutting = Some(Cutting {
                left: header.payload,
                fin: header.fin,
                head: self.held[0] & 0x7F,
                mask,
            });
            self.held.advance(header.len);
            self.next_fragment();
            let n = self.out.len().min(buf.remaining());
            buf.put_slice(&self.out[..n]);
            self.out.advance(n);
            return;
        }
        let n = header.len.min(buf.remaining());
        buf.put_slice(&self.held[..n]);
        self.held.advance(n);
        let rest = (header.len - n) as u64;
        if rest > 0 {
            self.scan = match self.scan {
                Scan::Payload(left) => Scan::Payload(left + rest),
                Scan::Header => Scan::Payload(rest),
            };
        }
    }

    /// Writes the next fragment's header to `out` and expects its payload; back to
    /// headers once the frame is all cut.
    fn next_fragment(&mut self) {
        let Some(cut) = &mut self.cutting else {
            self.scan = Scan::Header;
            return;
        };
        if cut.left == 0 {
            self.cutting = None;
            self.scan = Scan::Header;
            return;
        }
        let n = cut.left.min(FRAGMENT);
        cut.left -= n;
        let fin = if cut.left == 0 && cut.fin { 0x80 } else { 0 };
        let masked = if cut.mask.is_some() { 0x80 } else { 0 };
        // The shortest length encoding, as RFC 6455 asks.
        if n < 126 {
            self.out
                .extend_from_slice(&[fin | cut.head, masked | n as u8]);
        } else {
            self.out.extend_from_slice(&[fin | cut.head, masked | 126]);
            self.out
                .extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
        }
        // Continuations after the first fragment: opcode 0, RSV bits kept.
        cut.head &= 0x70;
        if let Some(mask) = cut.mask {
            self.out.extend_from_slice(&mask);
        }
        self.scan = Scan::Payload(n);
    }

    fn after_payload(&mut self, n: u64) {
        if let Scan::Payload(left) = self.scan {
            let left = left.saturating_sub(n);
            if left == 0 {
                self.next_fragment();
            } else {
                self.scan = Scan::Payload(left);
            }
        }
        if self.held.is_empty() && self.held.capacity() > 1024 {
            // Idle connections hold no buffer.
            self.held = BytesMut::new();
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Gate<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
// The client side of these tests runs on a task of its own; the TaskTracker rule is for
// the server.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    #[test]
    fn headers_parse_with_every_length_encoding() {
        assert_eq!(parse_header(&[0x81]), None);
        let short = parse_header(&[0x81, 0x85, 1, 2, 3, 4]).unwrap();
        assert_eq!(
            (short.len, short.fin, short.data, short.payload),
            (6, true, true, 5)
        );
        let mid = parse_header(&[0x01, 0xFE, 0x01, 0x00, 1, 2, 3, 4]).unwrap();
        assert_eq!((mid.len, mid.fin, mid.payload), (8, false, 256));
        let mut long = vec![0x82, 0xFF];
        long.extend_from_slice(&(1u64 << 33).to_be_bytes());
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_header(&long), None, "mask key incomplete");
        long.push(4);
        assert_eq!(parse_header(&long).unwrap().payload, 1 << 33);
        let ping = parse_header(&[0x89, 0x80, 1, 2, 3, 4]).unwrap();
        assert!(!ping.data);
    }

    /// A server socket over a gate, and a client socket, joined by an in-memory pipe.
    async fn pair(
        budget: Arc<PayloadBudget>,
    ) -> (
        WebSocketStream<Gate<tokio::io::DuplexStream>>,
        GateHandle,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let (gate, handle) = Gate::new(server, budget, 8 << 20, Duration::from_secs(30));
        let config = WebSocketConfig::default().read_buffer_size(2048);
        let server = WebSocketStream::from_raw_socket(gate, Role::Server, Some(config)).await;
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (server, handle, client)
    }

    #[tokio::test]
    async fn large_messages_arrive_whole_with_their_permits() {
        let budget = Arc::new(PayloadBudget::new(4 << 20, 1024, Duration::from_secs(5)));
        let (mut server, handle, mut client) = pair(budget.clone()).await;
        let big: String = (0..1_000_003)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let sent = big.clone();
        let send = tokio::spawn(async move {
            client.send(Message::text("small")).await.unwrap();
            client.send(Message::text(sent)).await.unwrap();
            client.send(Message::Ping(vec![1].into())).await.unwrap();
            client.send(Message::text("after")).await.unwrap();
            client
        });
        let first = server.next().await.unwrap().unwrap();
        assert_eq!(first.to_text().unwrap(), "small");
        assert_eq!(handle.take_permit().bytes(), 0);
        let second = server.next().await.unwrap().unwrap();
        assert_eq!(
            second.to_text().unwrap(),
            big,
            "cut into fragments and put back whole"
        );
        let permit = handle.take_permit();
        assert_eq!(permit.bytes(), big.len());
        assert_eq!(budget.in_use(), big.len());
        drop(permit);
        assert_eq!(budget.in_use(), 0);
        assert!(matches!(
            server.next().await.unwrap().unwrap(),
            Message::Ping(_)
        ));
        assert_eq!(
            server.next().await.unwrap().unwrap().to_text().unwrap(),
            "after"
        );
        drop(send.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn no_room_in_the_budget_is_a_busy_refusal() {
        let budget = Arc::new(PayloadBudget::new(2 << 20, 1024, Duration::from_secs(1)));
        let held = budget.acquire(2 << 20).await.unwrap();
        let (mut server, handle, mut client) = pair(budget.clone()).await;
        let send = tokio::spawn(async move {
            let _ = client.send(Message::text("x".repeat(100_000))).await;
            client
        });
        let read = server.next().await.unwrap();
        assert!(read.is_err());
        assert!(matches!(handle.refusal(), Some(GateRefusal::Busy(_))));
        drop(held);
        drop(send);
    }
}
