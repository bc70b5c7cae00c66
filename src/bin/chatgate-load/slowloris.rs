//! `slowloris`: connections that hold a server's sockets without ever finishing a
//! request. Each probe is one TCP connection to the REST listener, timed from its connect
//! until the server closes it (end of stream or reset), or until `--max-wait`:
//!
//! - (a) `slow header`: a request header sent one byte every `--byte-every` seconds,
//!   never finished; bar: closed within `--header-timeout`;
//! - (b) `silent`: sends nothing; bar: closed within `--idle-timeout`;
//! - (c) `idle keep-alive` (with `--keep-alive`): one complete request, its answer read,
//!   then nothing (timed from the answer); bar: closed within `--idle-timeout`.
//!
//! The probes run at once, so the whole run takes at most `--max-wait` plus a moment.

use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout};

use crate::{Report, Target, Verdict, check_secs};

/// A server that closes at its timeout is seen closing a few milliseconds later (its FIN
/// has to arrive and be read): a close up to this long after a bound counts as at it.
const CLOSE_SLACK_SECS: f64 = 0.5;

/// Flags of `slowloris`.
#[derive(Debug, Args)]
pub struct SlowlorisArgs {
    /// Seconds between two bytes of the slow header (probe a).
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    byte_every: f64,
    /// Bar for (a): the server's request header timeout, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    header_timeout: f64,
    /// Bar for (b) and (c): the server's idle connection timeout, in seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    idle_timeout: f64,
    /// Longest wait for the server to close a probe's connection, in seconds.
    #[arg(long, default_value_t = 90.0, value_name = "SECS")]
    max_wait: f64,
    /// Also probe (c): an idle keep-alive connection after one complete request.
    #[arg(long)]
    keep_alive: bool,
}

/// How a probe's connection ended.
struct Probe {
    /// Seconds from the start of the timing until the server closed the connection;
    /// `None`: still open at `--max-wait`.
    closed_after: Option<f64>,
    /// How it ended (`end of stream`, a reset, ...).
    how: String,
    /// The first line of what the server wrote, if anything (a 408, say).
    answer: Option<String>,
    /// Bytes the probe wrote.
    sent: u64,
}

impl Probe {
    fn open() -> Self {
        Self {
            closed_after: None,
            how: String::new(),
            answer: None,
            sent: 0,
        }
    }
}

/// What a read on a probe's socket means.
enum Read {
    /// The server closed the connection.
    Closed(String),
    /// It wrote these bytes.
    Data(Vec<u8>),
}

async fn read_some(stream: &mut TcpStream) -> Read {
    let mut buf = vec![0u8; 4096];
    match stream.read(&mut buf).await {
        Ok(0) => Read::Closed("end of stream".into()),
        Ok(n) => {
            buf.truncate(n);
            Read::Data(buf)
        }
        Err(e) => Read::Closed(format!("read failed: {e}")),
    }
}

fn first_line(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    text.lines().next().unwrap_or("").chars().take(80).collect()
}

/// Reads until the server closes the connection or `deadline`; times from `since`.
async fn wait_closed(stream: &mut TcpStream, since: Instant, deadline: Instant, probe: &mut Probe) {
    loop {
        match tokio::time::timeout_at(deadline, read_some(stream)).await {
            Err(_) => return,
            Ok(Read::Data(data)) => {
                probe.answer.get_or_insert_with(|| first_line(&data));
            }
            Ok(Read::Closed(how)) => {
                probe.closed_after = Some(since.elapsed().as_secs_f64());
                probe.how = how;
                return;
            }
        }
    }
}

/// (a): a request header one byte at a time, never finished.
async fn slow_header(
    target: &Target,
    every: Duration,
    max_wait: Duration,
) -> Result<Probe, String> {
    let mut stream = connect(target).await?;
    let start = Instant::now();
    let deadline = start + max_wait;
    // Long enough never to end within the wait: the header is never complete.
    let bytes = usize::try_from(max_wait.as_millis() / every.as_millis().max(1))
        .unwrap_or(usize::MAX)
        .saturating_add(64);
    let header = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Slow: {}",
        target.http_authority,
        "a".repeat(bytes)
    );
    let mut probe = Probe::open();
    let mut next_byte = start;
    for byte in header.bytes() {
        tokio::select! {
            () = sleep_until(next_byte.min(deadline)) => {
                if Instant::now() >= deadline {
                    return Ok(probe);
                }
                if let Err(e) = stream.write_all(&[byte]).await {
                    // Closed: a reset shows on the write first.
                    probe.closed_after = Some(start.elapsed().as_secs_f64());
                    probe.how = format!("write failed: {e}");
                    return Ok(probe);
                }
                probe.sent += 1;
                next_byte += every;
            }
            read = read_some(&mut stream) => match read {
                Read::Data(data) => {
                    probe.answer.get_or_insert_with(|| first_line(&data));
                }
                Read::Closed(how) => {
                    probe.closed_after = Some(start.elapsed().as_secs_f64());
                    probe.how = how;
                    return Ok(probe);
                }
            },
        }
    }
    wait_closed(&mut stream, start, deadline, &mut probe).await;
    Ok(probe)
}

/// (b): a connection that sends nothing.
async fn silent(target: &Target, max_wait: Duration) -> Result<Probe, String> {
    let mut stream = connect(target).await?;
    let start = Instant::now();
    let mut probe = Probe::open();
    wait_closed(&mut stream, start, start + max_wait, &mut probe).await;
    Ok(probe)
}

/// (c): one complete request, its answer read, then nothing; timed from the answer.
async fn idle_keep_alive(target: &Target, max_wait: Duration) -> Result<Probe, String> {
    let mut stream = connect(target).await?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n",
        target.http_authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("keep-alive probe: write: {e}"))?;
    let mut probe = Probe {
        sent: request.len() as u64,
        ..Probe::open()
    };
    // Header and body of the small /healthz answer.
    let mut answer = Vec::new();
    let complete = |data: &[u8]| {
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        data.len() >= end + 4 + length
    };
    while !complete(&answer) {
        match timeout(Duration::from_secs(10), read_some(&mut stream)).await {
            Ok(Read::Data(data)) => answer.extend_from_slice(&data),
            Ok(Read::Closed(how)) => {
                return Err(format!("keep-alive probe: closed before the answer: {how}"));
            }
            Err(_) => return Err("keep-alive probe: no answer within 10 s".into()),
        }
    }
    probe.answer = Some(first_line(&answer));
    let start = Instant::now();
    wait_closed(&mut stream, start, start + max_wait, &mut probe).await;
    Ok(probe)
}

async fn connect(target: &Target) -> Result<TcpStream, String> {
    timeout(
        Duration::from_secs(10),
        TcpStream::connect(target.http_addr),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect to {}: {e}", target.http_addr))
}

/// `slowloris`: see the module docs.
pub async fn run(
    args: &SlowlorisArgs,
    target: &Target,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    check_secs("--byte-every", args.byte_every, false)?;
    check_secs("--header-timeout", args.header_timeout, false)?;
    check_secs("--idle-timeout", args.idle_timeout, false)?;
    check_secs("--max-wait", args.max_wait, false)?;
    if args.max_wait > 600.0 {
        return Err("--max-wait must be at most 600 seconds".into());
    }
    if args.max_wait < args.header_timeout.max(args.idle_timeout) {
        return Err("--max-wait must be at least --header-timeout and --idle-timeout".into());
    }
    let max_wait = Duration::from_secs_f64(args.max_wait);
    let every = Duration::from_secs_f64(args.byte_every);
    eprintln!(
        "slowloris: probing {} (at most {:.0} s)",
        target.http_addr, args.max_wait
    );
    let keep_alive = async {
        if args.keep_alive {
            Some(idle_keep_alive(target, max_wait).await)
        } else {
            None
        }
    };
    let (slow, silent, keep_alive) = tokio::join!(
        slow_header(target, every, max_wait),
        silent(target, max_wait),
        keep_alive,
    );
    let slow = slow?;
    let silent = silent?;
    let keep_alive = keep_alive.transpose()?;

    let mut r = Report::new("slowloris", run_id, target);
    r.section("setup", "setup");
    r.num(
        "slow header: one byte every",
        "byte_every_secs",
        args.byte_every,
        " s",
    );
    r.num("longest wait", "max_wait_secs", args.max_wait, " s");
    let mut probes = vec![
        ("(a) slow header", "slow_header", &slow, args.header_timeout),
        ("(b) silent", "silent", &silent, args.idle_timeout),
    ];
    if let Some(probe) = &keep_alive {
        probes.push((
            "(c) idle keep-alive",
            "keep_alive",
            probe,
            args.idle_timeout,
        ));
    }
    for (title, key, probe, _) in &probes {
        r.section(title, key);
        match probe.closed_after {
            Some(secs) => {
                r.num(
                    "closed by the server after",
                    "closed_after_secs",
                    secs,
                    " s",
                );
                r.text("how", "how", &probe.how);
            }
            None => r.put(
                "closed by the server",
                "closed_after_secs",
                json!(null),
                format!("not closed within {:.0} s", args.max_wait),
            ),
        }
        r.text(
            "server wrote",
            "answer",
            probe.answer.as_deref().unwrap_or("nothing"),
        );
        r.int("bytes sent", "sent", probe.sent);
    }
    r.section("bars", "bars");
    let mut met = true;
    for (title, key, probe, bound) in &probes {
        let ok = probe
            .closed_after
            .is_some_and(|s| s <= *bound + CLOSE_SLACK_SECS);
        met &= ok;
        let measured = match probe.closed_after {
            Some(s) => format!("closed after {s:.2} s"),
            None => format!("not closed within {:.0} s", args.max_wait),
        };
        r.bar(
            &format!("{title} closed within {bound:.0} s"),
            key,
            &measured,
            ok,
        );
    }
    Ok((if met { Verdict::Pass } else { Verdict::Fail }, r))
}
