//! `chatgate-load`: a load generator for chatgate (loopback targets only).
//!
//! Eight scenarios, each bounded in time: the tool connects, runs, closes every connection
//! and exits by itself. The last four (one module each) measure the bars of hostile input;
//! their reports end with a `bars` section, a PASS or FAIL line per bar.
//!
//! - `idle`: opens N WebSocket connections spread over M channels (bounded concurrency,
//!   optional connect rate, retries), holds them for `--duration` seconds and reports the
//!   server's RSS before and after, and the RSS growth per connection in KiB.
//! - `fanout`: one channel, S subscribers and P publishers; the publishers send a total
//!   of R messages/s. Reports deliveries/s, expected deliveries, loss (per message) and
//!   end-to-end latency percentiles. With `--slow N`, N more subscribers join the channel
//!   and stop reading (or read one frame per second): the figures stay those of the
//!   healthy subscribers, and the report adds how many slow ones the server closed.
//!   With `--garbage N`, N hostile clients in the channel send frames that are not JSON
//!   as fast as they can and reconnect whenever the server closes them; the report adds
//!   what they sent and how often the server closed them.
//! - `send`: C channels with K clients each, all sending a total of R messages/s, each
//!   message with its own `client_id`. Counts acks (the sender's echo), deliveries to the
//!   other members, latency and error frames, then fetches each channel's history over
//!   HTTP and checks every acknowledged message is stored exactly once.
//! - `soak`: churn. W workers each loop connect, send a few messages, wait for their
//!   echoes, disconnect, for `--duration` seconds or `--cycles` cycles, next to a standing
//!   set of `--idle` connections. Samples the server's RSS, open file descriptors, and
//!   (with `--admin-url`) its `chatgate_connections` and `chatgate_runtime_tasks` gauges;
//!   at the end, once the server is back to the standing connections, checks each is back
//!   within `--tolerance` of the baseline taken before the churn.
//! - `hostile` ([`hostile`]): hostile sockets and REST clients sending the largest padded
//!   frames, bodies and audio, each from its own `X-Forwarded-For` address, next to
//!   healthy clients in another channel; the server's peak RSS growth, how every hostile
//!   connection was refused and closed, and the healthy clients' latency and loss.
//! - `slowloris` ([`slowloris`]): a request header sent a byte at a time, a silent
//!   connection and an idle keep-alive one; how long until the server closes each.
//! - `deletes` ([`deletes`]): deletes in a channel holding large audio, on a private
//!   Redis; each delete's Redis time from the slow log, and how long PINGs wait meanwhile.
//! - `media-quota` ([`media_quota`]): one user posting large images; when the media
//!   quota refuses, and how much it accepted in a minute.
//!
//! Every message's content is `t=<unix micros>;n=<sequence>` (plus optional padding), so
//! a receiver computes latency and counts the message with two substring searches, with
//! no JSON parsing on the hot path. All clients live in this one process and read the
//! same clock.
//!
//! Usage (start a server first, e.g. `./target/release/chatgate --dev --port 18080 &`):
//!
//! ```text
//! # 10,000 idle connections over 100 channels, 500 new connections/s, held 60 s:
//! ulimit -n 20000
//! chatgate-load --url ws://127.0.0.1:18080 --server-pid "$(pgrep -nx chatgate)" \
//!     idle --connections 10000 --channels 100 --connect-rate 500 --duration 60
//!
//! # 1,000 subscribers, 1 publisher at 200 msgs/s for 30 s after a 2 s warmup:
//! chatgate-load --url ws://127.0.0.1:18080 fanout --subscribers 1000 --rate 200 \
//!     --duration 30 --warmup 2
//!
//! # 10 channels x 5 clients sending 1,000 msgs/s in total, then the history check, and
//! # the figures as one JSON line too:
//! chatgate-load --url ws://127.0.0.1:18080 --json send --channels 10 --clients 5 \
//!     --rate 1000 --duration 10
//!
//! # The same fan-out with 100 more subscribers that never read:
//! chatgate-load --url ws://127.0.0.1:18080 --server-pid "$(pgrep -nx chatgate)" \
//!     --admin-url http://127.0.0.1:9090 fanout -s 1000 -r 300 --duration 30 --slow 100
//!
//! # 100,000 connect/send/disconnect cycles by 32 workers next to 100 standing
//! # connections; fails unless RSS, fds and tasks come back within 10% of the baseline:
//! chatgate-load --url ws://127.0.0.1:18080 --server-pid "$(pgrep -nx chatgate)" \
//!     --admin-url http://127.0.0.1:9090 soak --cycles 100000 --workers 32 --idle 100
//!
//! # 50 hostile sockets and 10 hostile REST clients for 30 s, next to 20 healthy clients
//! # (start the server with CHATGATE_SERVER__TRUSTED_PROXIES=127.0.0.1/32):
//! chatgate-load --url ws://127.0.0.1:18080 --server-pid "$(pgrep -nx chatgate)" \
//!     hostile --duration 30
//!
//! # A slow header, a silent connection and an idle keep-alive one (at most 90 s):
//! chatgate-load --url ws://127.0.0.1:18080 slowloris --keep-alive
//!
//! # Deletes in a channel of 1,000 messages with 20 of 10 MiB audio, on a private Redis
//! # (chatgate started with CHATGATE_LIMITS__ENABLED=false and that Redis):
//! chatgate-load --url ws://127.0.0.1:18080 deletes --redis-url redis://127.0.0.1:16400/0
//!
//! # One user posting 4 MiB images for a minute (its other budgets raised, see its --help):
//! chatgate-load --url ws://127.0.0.1:18080 media-quota --duration 60
//! ```
//!
//! Every process has a file descriptor limit: opening 10,000 connections from this
//! process needs its soft `RLIMIT_NOFILE` raised first (`ulimit -n 20000`, up to the hard
//! limit). A connect that fails with "too many open files" stops the run with a clear
//! error.
//!
//! Exit status: 0 when the run is clean; 1 when loss was detected (a subscriber missed
//! a message, a sent message got neither an ack nor an error, an acknowledged message is
//! missing from or duplicated in the history, or, for `idle`, a connection failed or was
//! dropped; for `soak`, a failed cycle, a message without its echo, or the server's RSS,
//! fds or tasks not back to baseline; for the hostile-input scenarios, a bar not met);
//! 2 when the run could not be carried out (bad flags, target not on loopback,
//! unreachable server, fd limit, failed connections in `fanout`/`send`/`soak`'s standing
//! set, a Redis that cannot be reached or configured for `deletes`).

// A client tool: its tasks end with the run, so the server's TaskTracker rule does not apply.
#![allow(clippy::disallowed_methods)]

mod deletes;
mod hostile;
mod media_quota;
mod slowloris;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// Load generator for chatgate: idle connections, fan-out (with slow readers), send/ack/
/// history checks, connection churn (soak) with resource checks, and hostile input
/// (hostile payloads, slowloris, deletes, media quota).
///
/// Targets must resolve to loopback addresses. Every run is bounded in time and exits by
/// itself. Exit status: 0 clean, 1 loss or missing messages detected (or a bar not met),
/// 2 run not possible.
#[derive(Debug, Parser)]
#[command(name = "chatgate-load", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Flags shared by every scenario (accepted before or after the scenario name).
#[derive(Debug, Args)]
#[command(next_help_heading = "Common options")]
struct Common {
    /// WebSocket base URL of the server (ws:// only; the host must be loopback).
    #[arg(
        long,
        global = true,
        env = "CHATGATE_LOAD_URL",
        default_value = "ws://127.0.0.1:8000"
    )]
    url: String,
    /// HTTP base URL of the REST API [default: derived from --url].
    #[arg(long, global = true, value_name = "URL")]
    http: Option<String>,
    /// Seconds measured (idle: seconds the connections are held).
    #[arg(long, global = true, default_value_t = 10.0, value_name = "SECS")]
    duration: f64,
    /// Seconds of sending before the measured window, excluded from the figures (idle: a
    /// settle pause after the last connect, before the hold).
    #[arg(long, global = true, default_value_t = 1.0, value_name = "SECS")]
    warmup: f64,
    /// After the last send, the run waits for outstanding acks and deliveries: it stops
    /// as soon as everything has arrived, or once nothing new arrived for this many
    /// seconds (and at most 60 s more than that).
    #[arg(long, global = true, default_value_t = 2.0, value_name = "SECS")]
    grace: f64,
    /// Also print the result as one JSON object on one line.
    #[arg(long, global = true)]
    json: bool,
    /// Server process id, to read its RSS (VmRSS) and CPU time from /proc.
    #[arg(long, global = true, value_name = "PID")]
    server_pid: Option<u32>,
    /// File holding the server process id (used when --server-pid is not given).
    #[arg(long, global = true, value_name = "FILE")]
    server_pid_file: Option<PathBuf>,
    /// Connection attempts in flight at once. Keep it below the server's listen backlog
    /// (128 for a tokio `TcpListener::bind`), or SYNs are dropped and retried after 1 s.
    #[arg(long, global = true, default_value_t = 100, value_name = "N")]
    connect_concurrency: usize,
    /// New connections started per second (0: as fast as the concurrency allows).
    #[arg(long, global = true, default_value_t = 0.0, value_name = "PER_SEC")]
    connect_rate: f64,
    /// Retries of a failed connect (with backoff) before giving up on it.
    #[arg(long, global = true, default_value_t = 3, value_name = "N")]
    connect_retries: u32,
    /// Seconds one connect attempt (TCP plus WebSocket handshake) may take.
    #[arg(long, global = true, default_value_t = 10.0, value_name = "SECS")]
    connect_timeout: f64,
    /// Seconds the whole connect phase may take; connections not open by then fail.
    #[arg(long, global = true, default_value_t = 300.0, value_name = "SECS")]
    connect_deadline: f64,
    /// Name part of every username and channel of this run (1-16 of [A-Za-z0-9_-])
    /// [default: random].
    #[arg(long, global = true, value_name = "ID")]
    run_id: Option<String>,
    /// Client runtime worker threads [default: one per CPU].
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Base URL of the server's admin listener (http://host:port on loopback), scraped
    /// at /metrics: `soak` samples chatgate_connections and chatgate_runtime_tasks there,
    /// `fanout --slow` counts the sessions the server closed as too slow.
    #[arg(long, global = true, value_name = "URL")]
    admin_url: Option<String>,
}

/// The scenario to run.
#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open many idle connections, hold them, and measure server memory per connection.
    Idle(IdleArgs),
    /// One channel: S subscribers receive what P publishers send at R msgs/s in total.
    Fanout(FanoutArgs),
    /// C channels x K clients all sending R msgs/s in total; acks checked against history.
    Send(SendArgs),
    /// Connection churn: W workers loop connect, send, check echoes, disconnect; the
    /// server's RSS, fds and tasks must come back to baseline.
    Soak(SoakArgs),
    /// Hostile sockets and REST clients sending the largest payloads, next to healthy
    /// clients in another channel: server memory, refusals and closes, healthy latency.
    Hostile(hostile::HostileArgs),
    /// Slow and silent HTTP connections: how long until the server closes each.
    Slowloris(slowloris::SlowlorisArgs),
    /// Deletes in a channel full of large media: their Redis time, and how long Redis
    /// keeps everyone else waiting meanwhile (needs a private Redis).
    ///
    /// Start chatgate on a private redis-server with its limits off, and with its
    /// per-channel byte cap large enough to keep the whole fill:
    /// CHATGATE_LIMITS__ENABLED=false CHATGATE_STORE__CHANNEL_MAX_BYTES=1073741824
    /// chatgate --dev --redis-url redis://127.0.0.1:<port>/0 (a build without
    /// store.channel_max_bytes refuses that variable: leave it out there). The slow log
    /// settings of that Redis are changed for the run and restored; nothing is flushed.
    Deletes(deletes::DeletesArgs),
    /// One user posting large images as fast as possible: when the media quota refuses.
    ///
    /// Raise the user's other budgets out of the way first, so that only the media quota
    /// can refuse: start chatgate with CHATGATE_LIMITS__MESSAGES_PER_MINUTE=100000
    /// CHATGATE_LIMITS__MESSAGE_BURST=100000 CHATGATE_LIMITS__REST_PER_MINUTE_PER_IP=100000
    /// CHATGATE_LIMITS__REST_BURST_PER_IP=100000 (limits stay on, so the quota applies).
    /// The bar is measured with --duration 60.
    MediaQuota(media_quota::MediaQuotaArgs),
}

/// Flags of `idle`.
#[derive(Debug, Args)]
struct IdleArgs {
    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Channels the connections are spread over (round-robin).
    #[arg(long, short = 'm', default_value_t = 10)]
    channels: usize,
}

/// Flags of `fanout`.
#[derive(Debug, Args)]
struct FanoutArgs {
    /// Subscriber connections (receive only).
    #[arg(long, short = 's', default_value_t = 100)]
    subscribers: usize,
    /// Publisher connections (the rate is split between them).
    #[arg(long, short = 'p', default_value_t = 1)]
    publishers: usize,
    /// Messages per second sent by all publishers together.
    #[arg(long, short = 'r', default_value_t = 200.0)]
    rate: f64,
    /// Extra subscribers on the channel that stop reading once connected (slow readers).
    /// They are read by tasks of their own; latency and loss figures are the healthy
    /// subscribers' only.
    #[arg(long, default_value_t = 0, value_name = "N")]
    slow: usize,
    /// How the slow readers read until the run ends: `never`, or `trickle` (one frame
    /// per second). Either way they send a ping every 10 s, so the server's heartbeat
    /// does not close them.
    #[arg(long, value_enum, default_value_t = SlowMode::Never, value_name = "MODE")]
    slow_mode: SlowMode,
    /// Receive buffer (SO_RCVBUF) of the slow readers' sockets, in bytes; smaller fills
    /// sooner. 0: the system's default (autotuned).
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    slow_rcvbuf: u32,
    /// Hostile clients in the same channel, each sending frames the server must refuse
    /// (not JSON) as fast as it can for the whole run, and connecting again whenever the
    /// server closes it. Latency and loss figures stay the healthy subscribers'.
    #[arg(long, default_value_t = 0, value_name = "N")]
    garbage: usize,
    /// Every connection sends `X-Forwarded-For` with an address of its own (healthy ones
    /// 10.0.x.y, hostile ones 10.1.x.y, one per hostile client, kept across its
    /// reconnects), as clients behind a proxy; start the server with
    /// `server.trusted_proxies = ["127.0.0.1/32"]` so its per-IP limits apply per client.
    #[arg(long)]
    forwarded_for: bool,
    #[command(flatten)]
    pacing: PacingArgs,
}

/// How a slow reader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SlowMode {
    /// Never reads until the run ends.
    Never,
    /// Reads one frame per second.
    Trickle,
}

impl SlowMode {
    fn name(self) -> &'static str {
        match self {
            SlowMode::Never => "never",
            SlowMode::Trickle => "trickle (1 frame/s)",
        }
    }
}

/// Flags of `send`.
#[derive(Debug, Args)]
struct SendArgs {
    /// Channels.
    #[arg(long, short = 'c', default_value_t = 10)]
    channels: usize,
    /// Clients per channel (every one of them sends).
    #[arg(long, short = 'k', default_value_t = 5)]
    clients: usize,
    /// Messages per second sent by all clients together.
    #[arg(long, short = 'r', default_value_t = 1000.0)]
    rate: f64,
    /// History entries fetched per channel for the check (at most the server's
    /// store.history_max, 1000 by default).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    history_limit: usize,
    /// Skip the history check.
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    pacing: PacingArgs,
}

/// Flags of `soak`.
#[derive(Debug, Args)]
struct SoakArgs {
    /// Churn workers running at once; each loops connect, send, check echoes, close.
    #[arg(long, short = 'w', default_value_t = 32)]
    workers: usize,
    /// Channels the churn and standing connections are spread over.
    #[arg(long, short = 'c', default_value_t = 10)]
    channels: usize,
    /// Stop after this many cycles (ignores --duration) [default: churn for --duration].
    #[arg(long, value_name = "N")]
    cycles: Option<u64>,
    /// Messages each cycle sends; each must come back as its echo (1 to 64).
    #[arg(long, short = 'k', default_value_t = 3)]
    messages: u32,
    /// Standing connections held open for the whole run (the baseline includes them).
    #[arg(long, default_value_t = 0, value_name = "N")]
    idle: usize,
    /// Seconds between two samples of the server's figures.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    sample_every: f64,
    /// Percent by which the final RSS, fd count and task count may exceed the baseline.
    #[arg(long, default_value_t = 10.0, value_name = "PCT")]
    tolerance: f64,
    /// Absolute slack added to the fd and task limits (baseline x tolerance + slack).
    #[arg(long, default_value_t = 8, value_name = "N")]
    slack: u64,
    /// Cycles run before the baseline, not counted, so one-time allocations (pools,
    /// allocator pages at full concurrency) are not taken for growth [default: --workers].
    #[arg(long, value_name = "N")]
    warmup_cycles: Option<u64>,
    /// Most seconds to wait, after the churn, for the server to come back to the
    /// standing connections and to the baseline.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    settle_timeout: f64,
    /// Seconds a cycle waits for its echoes.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    echo_timeout: f64,
    /// Percent of cycles that drop the TCP connection without a close handshake.
    #[arg(long, default_value_t = 0.0, value_name = "PCT")]
    abrupt: f64,
    /// Stop the churn after this many failed cycles.
    #[arg(long, default_value_t = 100, value_name = "N")]
    max_errors: u64,
}

/// How messages are paced.
#[derive(Debug, Args)]
struct PacingArgs {
    /// Milliseconds between pacing ticks; each tick sends the messages due by then.
    #[arg(long, default_value_t = 2, value_name = "MS")]
    tick_ms: u64,
    /// Extra bytes of padding in each message's content.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    payload: usize,
    /// Sending tasks (the senders are split between them) [default: one per worker
    /// thread, at most one per sending connection].
    #[arg(long, value_name = "N")]
    pacers: Option<usize>,
}

/// How a run ended.
enum Verdict {
    Pass,
    Fail,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = cli.common.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chatgate-load: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(Verdict::Pass) => ExitCode::SUCCESS,
        Ok(Verdict::Fail) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chatgate-load: {e}");
            ExitCode::from(2)
        }
    }
}

/// Validates flags, resolves the target, runs the scenario and prints the report.
async fn run(cli: Cli) -> Result<Verdict, String> {
    let common = &cli.common;
    check_secs("--duration", common.duration, false)?;
    check_secs("--warmup", common.warmup, true)?;
    check_secs("--grace", common.grace, true)?;
    check_secs("--connect-timeout", common.connect_timeout, false)?;
    check_secs("--connect-deadline", common.connect_deadline, false)?;
    if !common.connect_rate.is_finite() || common.connect_rate < 0.0 {
        return Err("--connect-rate must be a number >= 0".into());
    }
    let run_id = match &common.run_id {
        Some(id) => {
            let ok = (1..=16).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err("--run-id must be 1-16 letters, digits, '_' or '-'".into());
            }
            id.clone()
        }
        None => format!("{:06x}", fastrand::u32(..0x0100_0000)),
    };
    let target = Target::resolve(&common.url, common.http.as_deref()).await?;
    let server = server_pid(common)?;
    let admin = match &common.admin_url {
        Some(url) => Some(Admin::resolve(url).await?),
        None => None,
    };
    let admin = admin.as_ref();
    let (verdict, mut report) = match &cli.scenario {
        Scenario::Idle(args) => idle(common, args, &target, server, &run_id).await?,
        Scenario::Fanout(args) => fanout(common, args, &target, server, admin, &run_id).await?,
        Scenario::Send(args) => send(common, args, &target, server, &run_id).await?,
        Scenario::Soak(args) => soak(common, args, &target, server, admin, &run_id).await?,
        Scenario::Hostile(args) => hostile::run(common, args, &target, server, &run_id).await?,
        Scenario::Slowloris(args) => slowloris::run(args, &target, &run_id).await?,
        Scenario::Deletes(args) => deletes::run(args, &target, &run_id).await?,
        Scenario::MediaQuota(args) => media_quota::run(common, args, &target, &run_id).await?,
    };
    report.verdict(&verdict);
    report.print(common.json);
    Ok(verdict)
}

fn check_secs(flag: &str, value: f64, zero_ok: bool) -> Result<(), String> {
    let ok = value.is_finite() && value <= 86_400.0 && (value > 0.0 || (zero_ok && value == 0.0));
    if ok {
        Ok(())
    } else if zero_ok {
        Err(format!("{flag} must be between 0 and 86400 seconds"))
    } else {
        Err(format!(
            "{flag} must be more than 0 and at most 86400 seconds"
        ))
    }
}

fn check_rate(rate: f64) -> Result<(), String> {
    if rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0 {
        Ok(())
    } else {
        Err("--rate must be more than 0 and at most 10,000,000 msgs/s".into())
    }
}

fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

// ---------------------------------------------------------------------------------------
// Target, /proc figures, time
// ---------------------------------------------------------------------------------------

/// The server's addresses: the WebSocket endpoint and the REST API (both loopback).
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` as written in `--url`, used in the handshake's URL and Host header.
    ws_authority: String,
    ws_addr: SocketAddr,
    http_authority: String,
    http_addr: SocketAddr,
}

impl Target {
    async fn resolve(url: &str, http: Option<&str>) -> Result<Self, String> {
        let (ws_authority, host, port) = parse_base(url, "ws")?;
        let ws_addr = resolve_loopback(&host, port).await?;
        let (http_authority, http_addr) = match http {
            None => (ws_authority.clone(), ws_addr),
            Some(http) => {
                let (authority, host, port) = parse_base(http, "http")?;
                let addr = resolve_loopback(&host, port).await?;
                (authority, addr)
            }
        };
        Ok(Self {
            ws_authority,
            ws_addr,
            http_authority,
            http_addr,
        })
    }
}

/// Splits `scheme://host[:port][/]` into (authority, host, port).
fn parse_base(url: &str, scheme: &str) -> Result<(String, String, u16), String> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| format!("{url:?}: expected a {scheme}:// URL (TLS is not supported)"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() {
        return Err(format!(
            "{url:?}: give only the base URL ({scheme}://host:port), without a path"
        ));
    }
    let bad_port = || format!("{url:?}: invalid port");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unterminated IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad_port())?,
            None if after.is_empty() => 80,
            None => return Err(bad_port()),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, p)) => (host, p.parse().map_err(|_| bad_port())?),
            None => (authority, 80),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok((authority.to_string(), host.to_string(), port))
}

/// Resolves a host and refuses anything that is not loopback.
async fn resolve_loopback(host: &str, port: u16) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "refusing target {host} ({}): this tool only loads servers on loopback addresses",
            bad.ip()
        ));
    }
    Ok(addrs
        .iter()
        .find(|a| a.is_ipv4())
        .copied()
        .unwrap_or(addrs[0]))
}

/// The server's admin listener, where `/metrics` is scraped.
#[derive(Debug, Clone)]
struct Admin {
    authority: String,
    addr: SocketAddr,
}

impl Admin {
    /// `http://host:port` (a trailing `/metrics` is accepted), on loopback.
    async fn resolve(url: &str) -> Result<Self, String> {
        let base = url.trim_end_matches('/');
        let base = base.strip_suffix("/metrics").unwrap_or(base);
        let (authority, host, port) =
            parse_base(base, "http").map_err(|e| format!("--admin-url: {e}"))?;
        let addr = resolve_loopback(&host, port).await?;
        Ok(Self { authority, addr })
    }

    async fn scrape(&self) -> Result<Metrics, String> {
        match http_get_at(self.addr, &self.authority, "/metrics", "text/plain").await {
            Ok((200, body)) => Ok(Metrics(String::from_utf8_lossy(&body).into_owned())),
            Ok((status, _)) => Err(format!("GET {}/metrics: HTTP {status}", self.authority)),
            Err(e) => Err(format!("GET {}/metrics: {e}", self.authority)),
        }
    }
}

/// A Prometheus text exposition.
struct Metrics(String);

impl Metrics {
    /// The sum of the samples of metric `name` whose label set contains `label` (every
    /// sample of it when `label` is `None`); `None` when there is no such sample.
    fn value(&self, name: &str, label: Option<&str>) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
                match rest.split_once('}') {
                    Some(split) => split,
                    None => continue,
                }
            } else if rest.starts_with(' ') {
                ("", rest)
            } else {
                continue; // another metric whose name starts with `name`
            };
            if label.is_some_and(|l| !labels.contains(l)) {
                continue;
            }
            if let Some(v) = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// A gauge or counter as a whole number.
    fn count(&self, name: &str, label: Option<&str>) -> Option<u64> {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        self.value(name, label).map(|v| v.max(0.0).round() as u64)
    }
}

/// `chatgate_connections_closed_total` with `reason="too_slow"`: sessions closed (1013)
/// because they read too slowly.
const TOO_SLOW: (&str, Option<&str>) = (
    "chatgate_connections_closed_total",
    Some("reason=\"too_slow\""),
);

/// Open file descriptors of a process (entries of `/proc/<pid>/fd`).
fn count_fds(pid: &str) -> Option<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.count() as u64)
}

fn server_pid(common: &Common) -> Result<Option<u32>, String> {
    let pid = match (common.server_pid, &common.server_pid_file) {
        (Some(pid), _) => pid,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read --server-pid-file {}: {e}", file.display()))?;
            text.trim().parse().map_err(|_| {
                format!(
                    "--server-pid-file {}: {:?} is not a process id",
                    file.display(),
                    text.trim()
                )
            })?
        }
        (None, None) => return Ok(None),
    };
    if read_mem(&pid.to_string()).is_none() {
        return Err(format!(
            "cannot read /proc/{pid}/status: is the server (pid {pid}) running?"
        ));
    }
    Ok(Some(pid))
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
}

/// `pid` is a number or `self`.
fn read_mem(pid: &str) -> Option<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Mem {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:").unwrap_or(0),
    })
}

/// User plus system CPU seconds used so far by a process (`pid` a number or `self`).
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux (the unit of /proc/<pid>/stat times).
    #[allow(clippy::cast_precision_loss)]
    Some((utime + stime) as f64 / 100.0)
}

/// This process's (soft, hard) open file limit, from `/proc/self/limits`.
fn fd_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..].split_whitespace();
    let parse = |v: Option<&str>| match v? {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    };
    Some((parse(values.next())?, parse(values.next())?))
}

/// Warns when the soft fd limit is below what the run needs.
fn check_fd_limit(connections: usize) {
    let needed = connections as u64 + 64;
    let Some((soft, hard)) = fd_limits() else {
        return;
    };
    if soft >= needed {
        return;
    }
    if hard >= needed {
        eprintln!(
            "warning: this run needs about {needed} file descriptors but the soft limit \
             (RLIMIT_NOFILE) is {soft}; raise it first: `ulimit -n {}` (hard limit {hard})",
            hard.min(needed.max(20_000))
        );
    } else {
        eprintln!(
            "warning: this run needs about {needed} file descriptors but the limit \
             (RLIMIT_NOFILE) is {soft} and the hard limit only {hard}: open fewer \
             connections, or have the hard limit raised (as root)"
        );
    }
}

/// The system-wide count of accept queue overflows (`TcpExt: ListenOverflows` in
/// `/proc/net/netstat`): SYNs dropped because a listener's backlog was full.
fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Microseconds since the Unix epoch.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------------------

/// Sub-buckets per power of two (about 0.8% resolution).
const SUB_BUCKETS: u64 = 128;
/// Values below this are counted exactly.
const LINEAR_LIMIT: u64 = 2 * SUB_BUCKETS;
/// Largest power of two tracked (values are clamped below 2^40 µs, about 12 days).
const MAX_EXPONENT: u32 = 40;
const BUCKETS: usize = (LINEAR_LIMIT + (MAX_EXPONENT as u64 - 8) * SUB_BUCKETS) as usize;

/// A log-linear histogram of microsecond values with fixed memory (about 35 KB).
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    count: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            max: 0,
        }
    }

    fn index(value: u64) -> usize {
        let v = value.min((1 << MAX_EXPONENT) - 1);
        if v < LINEAR_LIMIT {
            return v as usize;
        }
        let exponent = 63 - v.leading_zeros(); // >= 8
        let mantissa = (v >> (exponent - 7)) - SUB_BUCKETS;
        (LINEAR_LIMIT + u64::from(exponent - 8) * SUB_BUCKETS + mantissa) as usize
    }

    /// The middle of a bucket's range.
    fn value_at(index: usize) -> u64 {
        let i = index as u64;
        if i < LINEAR_LIMIT {
            return i;
        }
        let k = i - LINEAR_LIMIT;
        let exponent = k / SUB_BUCKETS + 8;
        let mantissa = k % SUB_BUCKETS + SUB_BUCKETS;
        let width = 1u64 << (exponent - 7);
        mantissa * width + width / 2
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), in microseconds.
    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value_at(i).min(self.max);
            }
        }
        self.max
    }
}

/// Histograms shared by many tasks: each task records into one shard, in batches.
struct Shards(Box<[Mutex<Histogram>]>);

/// Latency samples a reader buffers before taking a shard's lock.
const LATENCY_BATCH: usize = 256;
const SHARDS: usize = 16;

impl Shards {
    fn new() -> Self {
        Self((0..SHARDS).map(|_| Mutex::new(Histogram::new())).collect())
    }

    fn record(&self, shard: usize, values: &mut Vec<u32>) {
        if values.is_empty() {
            return;
        }
        let mut h = self.0[shard % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for v in values.drain(..) {
            h.record(u64::from(v));
        }
    }

    fn merged(&self) -> Histogram {
        let mut all = Histogram::new();
        for shard in &self.0 {
            let h = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            all.merge(&h);
        }
        all
    }
}

// ---------------------------------------------------------------------------------------
// Shared run state and the per-connection reader
// ---------------------------------------------------------------------------------------

/// `states[seq]` bit: the frame was handed to the socket.
const SENT: u8 = 1;
/// `states[seq]` bit: the sender's echo (the ack) arrived.
const ACKED: u8 = 2;
/// Most messages one run may plan (bounds the per-message counters: 5 bytes each).
const MAX_PLANNED: u64 = 20_000_000;

/// State shared by the connect phase, the pacers and the readers.
struct Shared {
    run_id: String,
    /// Stops readers that did not end after the close handshake.
    cancel: CancellationToken,
    /// Tells slow readers (`fanout --slow`) to read what is left and close.
    drain: CancellationToken,
    /// Set when we start closing: ends seen afterwards are not failures.
    closing: AtomicBool,
    /// Measurement window, in Unix microseconds (0..0 until sending starts).
    window_start: AtomicU64,
    window_end: AtomicU64,
    /// Per message sequence number: [`SENT`] | [`ACKED`].
    states: Box<[AtomicU8]>,
    /// Per message sequence number: deliveries counted by the receivers.
    deliveries: Box<[AtomicU32]>,
    /// Next message sequence number.
    next_seq: AtomicU64,
    delivery_latency: Shards,
    ack_latency: Shards,
    /// Readers still running.
    live: AtomicUsize,
    /// Connections opened so far.
    connected: AtomicUsize,
}

impl Shared {
    fn new(run_id: &str, planned: usize) -> Arc<Self> {
        Arc::new(Self {
            run_id: run_id.to_string(),
            cancel: CancellationToken::new(),
            drain: CancellationToken::new(),
            closing: AtomicBool::new(false),
            window_start: AtomicU64::new(0),
            window_end: AtomicU64::new(0),
            states: (0..planned).map(|_| AtomicU8::new(0)).collect(),
            deliveries: (0..planned).map(|_| AtomicU32::new(0)).collect(),
            next_seq: AtomicU64::new(0),
            delivery_latency: Shards::new(),
            ack_latency: Shards::new(),
            live: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
        })
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window_start.load(Relaxed) && t < self.window_end.load(Relaxed)
    }
}

/// What a connection's reader counts.
#[derive(Debug, Clone, Copy)]
struct Role {
    /// Sends messages, so looks for its acks (publishers, `send` members).
    sends: bool,
    /// Count other members' messages as deliveries (subscribers, `send` members).
    deliveries: bool,
    /// Keep the message id of every ack, for the history check.
    record_ids: bool,
}

const IDLE: Role = Role {
    sends: false,
    deliveries: false,
    record_ids: false,
};

/// Frame counts, per reader and summed over readers.
#[derive(Debug, Default)]
struct FrameCounts {
    frames: u64,
    messages: u64,
    deliveries: u64,
    deliveries_in_window: u64,
    acks: u64,
    joined: u64,
    left: u64,
    typing: u64,
    deleted: u64,
    other: u64,
    /// Frames that are not `{"type":...}` objects.
    malformed: u64,
    /// Message frames without our `t=..;n=..` content, or with an unknown sequence.
    foreign: u64,
    errors: BTreeMap<String, u64>,
}

impl FrameCounts {
    fn add(&mut self, o: &FrameCounts) {
        self.frames += o.frames;
        self.messages += o.messages;
        self.deliveries += o.deliveries;
        self.deliveries_in_window += o.deliveries_in_window;
        self.acks += o.acks;
        self.joined += o.joined;
        self.left += o.left;
        self.typing += o.typing;
        self.deleted += o.deleted;
        self.other += o.other;
        self.malformed += o.malformed;
        self.foreign += o.foreign;
        for (code, n) in &o.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }
}

/// Figures one reader collected.
#[derive(Debug, Default)]
struct ReaderStats {
    channel: usize,
    counts: FrameCounts,
    /// Why the connection ended before we closed it.
    ended: Option<String>,
    /// The code of the server's close frame, when one was read before we closed.
    close_code: Option<u16>,
    /// Message ids of this connection's acks (for the history check).
    acked_ids: Vec<u128>,
}

impl std::ops::Deref for ReaderStats {
    type Target = FrameCounts;
    fn deref(&self) -> &FrameCounts {
        &self.counts
    }
}

impl std::ops::DerefMut for ReaderStats {
    fn deref_mut(&mut self) -> &mut FrameCounts {
        &mut self.counts
    }
}

type Ws = WebSocketStream<TcpStream>;
type Sink = SplitSink<Ws, Message>;

/// Latency samples waiting for their shard.
struct LatencyBuffers {
    shard: usize,
    delivery: Vec<u32>,
    ack: Vec<u32>,
}

impl LatencyBuffers {
    fn flush(&mut self, sh: &Shared) {
        sh.delivery_latency.record(self.shard, &mut self.delivery);
        sh.ack_latency.record(self.shard, &mut self.ack);
    }
}

const TYPE_PREFIX: &str = "{\"type\":\"";
const CONTENT_T: &str = "\"content\":\"t=";
const CLIENT_ID: &str = ",\"client_id\":\"";
/// Longest client_id the server accepts, in bytes.
const MAX_CLIENT_ID_BYTES: usize = 128;
const MESSAGE_ID: &str = "\"message_id\":\"";

/// Reads frames until the connection ends or the run is cancelled.
async fn read_loop(
    mut stream: SplitStream<Ws>,
    sh: Arc<Shared>,
    role: Role,
    channel: usize,
    shard: usize,
) -> ReaderStats {
    let mut stats = ReaderStats {
        channel,
        ..ReaderStats::default()
    };
    let mut lat = LatencyBuffers {
        shard,
        delivery: Vec::with_capacity(LATENCY_BATCH),
        ack: Vec::with_capacity(LATENCY_BATCH),
    };
    loop {
        let next = tokio::select! {
            biased;
            () = sh.cancel.cancelled() => break,
            next = stream.next() => next,
        };
        let closing = sh.closing.load(Relaxed);
        match next {
            Some(Ok(Message::Text(text))) => stats.on_text(text.as_str(), &sh, role, &mut lat),
            Some(Ok(Message::Close(frame))) => {
                if !closing && stats.ended.is_none() {
                    stats.ended = Some(match frame {
                        Some(f) => format!("closed by server: {} {}", u16::from(f.code), f.reason),
                        None => "closed by server".into(),
                    });
                }
            }
            Some(Ok(_)) => {} // pings are answered by tungstenite while we read
            Some(Err(e)) => {
                if !closing && stats.ended.is_none() {
                    stats.ended = Some(format!("error: {e}"));
                }
                break;
            }
            None => {
                if !closing && stats.ended.is_none() {
                    stats.ended = Some("connection ended".into());
                }
                break;
            }
        }
    }
    lat.flush(&sh);
    sh.live.fetch_sub(1, Relaxed);
    stats
}

impl ReaderStats {
    /// A slow reader's frame; returns whether the connection is still open.
    fn on_slow_frame(
        &mut self,
        next: Option<Result<Message, WsError>>,
        sh: &Shared,
        lat: &mut LatencyBuffers,
    ) -> bool {
        match next {
            Some(Ok(Message::Text(text))) => {
                self.on_text(text.as_str(), sh, IDLE, lat);
                true
            }
            Some(Ok(Message::Close(frame))) => {
                self.frames += 1;
                self.close_code = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
                self.ended = Some(match frame {
                    Some(f) => format!("closed by server: {} {}", u16::from(f.code), f.reason),
                    None => "closed by server".into(),
                });
                false
            }
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                self.ended = Some(format!("error: {e}"));
                false
            }
            None => {
                self.ended = Some("connection ended".into());
                false
            }
        }
    }

    fn on_text(&mut self, text: &str, sh: &Shared, role: Role, lat: &mut LatencyBuffers) {
        self.frames += 1;
        let Some(kind) = text
            .strip_prefix(TYPE_PREFIX)
            .and_then(|rest| rest.split_once('"'))
            .map(|(kind, _)| kind)
        else {
            self.malformed += 1;
            return;
        };
        match kind {
            "message" => self.on_message(text, sh, role, lat),
            "user_joined" => self.joined += 1,
            "user_left" => self.left += 1,
            "typing_status" => self.typing += 1,
            "message_deleted" => self.deleted += 1,
            "error" => {
                let code = serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| v.get("code").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| "(no code)".into());
                *self.errors.entry(code).or_default() += 1;
            }
            _ => self.other += 1,
        }
    }

    fn on_message(&mut self, text: &str, sh: &Shared, role: Role, lat: &mut LatencyBuffers) {
        self.messages += 1;
        let now = now_us();
        let Some((sent_at, seq)) = parse_stamp(text) else {
            self.foreign += 1;
            return;
        };
        let Some(index) = usize::try_from(seq).ok().filter(|&i| i < sh.states.len()) else {
            self.foreign += 1;
            return;
        };
        let latency = u32::try_from(now.saturating_sub(sent_at)).unwrap_or(u32::MAX);
        let measured = sh.in_window(sent_at);
        if role.sends && is_echo(text) {
            // Only the sender's own copy carries its client_id: this is our ack.
            sh.states[index].fetch_or(ACKED, Relaxed);
            self.acks += 1;
            if measured {
                lat.ack.push(latency);
                if lat.ack.len() >= LATENCY_BATCH {
                    sh.ack_latency.record(lat.shard, &mut lat.ack);
                }
            }
            if role.record_ids
                && let Some(id) = str_field(text, MESSAGE_ID)
            {
                self.acked_ids.push(id_key(id));
            }
        } else if role.deliveries {
            sh.deliveries[index].fetch_add(1, Relaxed);
            self.deliveries += 1;
            if sh.in_window(now) {
                self.deliveries_in_window += 1;
            }
            if measured {
                lat.delivery.push(latency);
                if lat.delivery.len() >= LATENCY_BATCH {
                    sh.delivery_latency.record(lat.shard, &mut lat.delivery);
                }
            }
        }
    }
}

/// Start of a message frame as the server writes it: the sender comes next.
const MESSAGE_SENDER: &str = "{\"type\":\"message\",\"sender\":\"";
/// What follows the sender's closing quote when the content is ours.
const AFTER_SENDER: &str = "\",\"content\":\"t=";

/// `(t, n)` from a message frame whose content starts `t=<micros>;n=<seq>`.
///
/// Fast path: the server writes `sender` first and usernames hold no quotes, so the
/// content starts right after the sender's closing quote. Otherwise, a substring search.
fn parse_stamp(text: &str) -> Option<(u64, u64)> {
    let fast = text.strip_prefix(MESSAGE_SENDER).and_then(|rest| {
        let end = rest.bytes().position(|b| b == b'"')?;
        rest[end..].strip_prefix(AFTER_SENDER)
    });
    let stamp = match fast {
        Some(stamp) => stamp,
        None => &text[text.find(CONTENT_T)? + CONTENT_T.len()..],
    };
    let (t, rest) = take_digits(stamp)?;
    let (n, _) = take_digits(rest.strip_prefix(";n=")?)?;
    Some((t, n))
}

/// A leading decimal number (at most 19 digits) and the rest of the string.
fn take_digits(s: &str) -> Option<(u64, &str)> {
    let mut value = 0u64;
    let mut len = 0;
    for b in s.bytes().take(20) {
        if !b.is_ascii_digit() {
            break;
        }
        value = value * 10 + u64::from(b - b'0');
        len += 1;
        if len > 19 {
            return None;
        }
    }
    (len > 0).then_some((value, &s[len..]))
}

/// Whether a message frame is the sender's own copy: only that copy carries a
/// `client_id`, appended last (so only the tail is searched).
fn is_echo(text: &str) -> bool {
    let tail = text
        .len()
        // JSON escaping makes a character at most 6 bytes (\u00XX).
        .checked_sub(CLIENT_ID.len() + 2 + 6 * MAX_CLIENT_ID_BYTES)
        .and_then(|start| text.get(start..))
        .unwrap_or(text);
    tail.contains(CLIENT_ID)
}

/// The string value after `prefix` (which ends with the opening quote), unescaped ids only.
fn str_field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let at = text.find(prefix)? + prefix.len();
    let rest = &text[at..];
    Some(&rest[..rest.find('"')?])
}

/// A compact key for a message id: the UUID's bits, or a 128-bit FNV-1a hash.
fn id_key(id: &str) -> u128 {
    uuid::Uuid::parse_str(id).map_or_else(
        |_| {
            id.bytes()
                .fold(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d, |h, b| {
                    (h ^ u128::from(b)).wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B)
                })
        },
        |u| u.as_u128(),
    )
}

// ---------------------------------------------------------------------------------------
// Connecting and closing
// ---------------------------------------------------------------------------------------

/// Connect-phase settings.
#[derive(Debug, Clone, Copy)]
struct ConnectOpts {
    concurrency: usize,
    rate: f64,
    retries: u32,
    timeout: Duration,
    deadline: Duration,
}

impl ConnectOpts {
    fn from(common: &Common) -> Self {
        Self {
            concurrency: common.connect_concurrency.max(1),
            rate: common.connect_rate,
            retries: common.connect_retries,
            timeout: secs(common.connect_timeout),
            deadline: secs(common.connect_deadline),
        }
    }
}

/// Client read buffer of an active connection. Small on purpose: tungstenite zero-fills
/// the free part of the buffer before every socket read, and most reads carry one frame.
const RECEIVER_READ_BUFFER: usize = 4096;
/// Largest message a client reads unless its spec says otherwise: the load's own
/// messages are small.
const RECEIVER_MAX_MESSAGE: usize = 4 << 20;

/// One connection to open.
struct ConnSpec {
    username: String,
    channel: String,
    channel_idx: usize,
    role: Role,
    /// Client read buffer (allocated up front, per connection).
    read_buffer: usize,
    /// A slow reader (`fanout --slow`): its own task holds both halves.
    slow: Option<SlowMode>,
    /// SO_RCVBUF of the socket (0: the system default).
    rcvbuf: u32,
    /// Sent as `X-Forwarded-For`, to stand for a client at that address behind a proxy
    /// the server trusts (`fanout --forwarded-for`).
    forwarded_for: Option<String>,
    /// Largest message (and frame) this client reads.
    max_message: usize,
}

impl ConnSpec {
    fn new(username: String, channel: String, channel_idx: usize, role: Role) -> Self {
        Self {
            username,
            channel,
            channel_idx,
            role,
            read_buffer: RECEIVER_READ_BUFFER,
            slow: None,
            rcvbuf: 0,
            forwarded_for: None,
            max_message: RECEIVER_MAX_MESSAGE,
        }
    }
}

/// A distinct private address for client number `i` of a group (`10.<group>.x.y`).
fn client_address(group: u8, i: usize) -> String {
    format!("10.{group}.{}.{}", (i >> 8) & 255, i & 255)
}

/// An open connection: its write half (none for a slow reader, whose task holds it), and
/// its reader task.
struct Conn {
    role: Role,
    sink: Option<Sink>,
    reader: JoinHandle<ReaderStats>,
    connect_us: u64,
}

/// Why one connect attempt failed.
enum AttemptError {
    /// Stop the whole connect phase (fd limit, rejected request).
    Fatal(String),
    Retry(String),
}

impl AttemptError {
    fn message(self) -> String {
        match self {
            AttemptError::Fatal(msg) | AttemptError::Retry(msg) => msg,
        }
    }
}

/// Result of the connect phase.
struct Connected {
    conns: Vec<Conn>,
    failed: usize,
    retries: u64,
    errors: BTreeMap<String, u64>,
    fatal: Option<String>,
    elapsed: Duration,
    times: Histogram,
    /// Listen queue overflows during the connect phase (system-wide).
    listen_overflows: Option<u64>,
}

const EMFILE: i32 = 24;
const ENFILE: i32 = 23;
const EADDRNOTAVAIL: i32 = 99;

fn io_error(e: &std::io::Error) -> AttemptError {
    match e.raw_os_error() {
        Some(EMFILE) => AttemptError::Fatal(format!(
            "connect failed: too many open files (EMFILE: {e}). This process hit its file \
             descriptor limit: run `ulimit -n 20000` (up to the hard limit) in this shell \
             before starting chatgate-load"
        )),
        Some(ENFILE) => AttemptError::Fatal(format!(
            "connect failed: the system file table is full (ENFILE: {e})"
        )),
        Some(EADDRNOTAVAIL) => AttemptError::Retry(format!(
            "no local port available (EADDRNOTAVAIL): ephemeral ports exhausted? ({e})"
        )),
        _ => AttemptError::Retry(format!("{e}")),
    }
}

async fn connect_once(
    target: &Target,
    spec: &ConnSpec,
    opts: &ConnectOpts,
) -> Result<Ws, AttemptError> {
    let addr = target.ws_addr;
    let connect = async {
        if spec.rcvbuf == 0 {
            return TcpStream::connect(addr).await;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Set before connecting, so the window offered in the handshake fits it.
        socket.set_recv_buffer_size(spec.rcvbuf)?;
        socket.connect(addr).await
    };
    let stream = timeout(opts.timeout, connect)
        .await
        .map_err(|_| AttemptError::Retry("TCP connect timed out".into()))?
        .map_err(|e| io_error(&e))?;
    // Not fatal: only latency would suffer.
    let _ = stream.set_nodelay(true);
    let url = format!(
        "ws://{}/ws/chat?username={}&channel={}",
        target.ws_authority, spec.username, spec.channel
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(spec.read_buffer)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(spec.max_message))
        .max_frame_size(Some(spec.max_message));
    let mut request = url
        .into_client_request()
        .map_err(|e| AttemptError::Fatal(format!("bad request: {e}")))?;
    if let Some(address) = &spec.forwarded_for {
        let value = address
            .parse()
            .map_err(|_| AttemptError::Fatal(format!("bad address {address}")))?;
        request.headers_mut().insert("x-forwarded-for", value);
    }
    let (ws, _response) = timeout(
        opts.timeout,
        client_async_with_config(request, stream, Some(config)),
    )
    .await
    .map_err(|_| AttemptError::Retry("WebSocket handshake timed out".into()))?
    .map_err(|e| match e {
        WsError::Io(e) => io_error(&e),
        WsError::Http(response) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                .unwrap_or_default();
            let msg = format!("handshake refused: HTTP {status} {body}");
            if status.is_client_error() && status.as_u16() != 429 && status.as_u16() != 408 {
                AttemptError::Fatal(msg)
            } else {
                AttemptError::Retry(msg)
            }
        }
        other => AttemptError::Retry(format!("handshake failed: {other}")),
    })?;
    Ok(ws)
}

/// Context of one connect task.
struct ConnectTask {
    target: Arc<Target>,
    spec: ConnSpec,
    sh: Arc<Shared>,
    opts: ConnectOpts,
    fatal: Arc<AtomicBool>,
    retries: Arc<AtomicU64>,
    shard: usize,
}

impl ConnectTask {
    /// Connects (with retries) and starts the reader at once, so frames sent to the
    /// connection (joins of later connections, for one) are read from the start.
    async fn run(self) -> Result<Conn, AttemptError> {
        let (ws, connect_us) = connect_retrying(
            &self.target,
            &self.spec,
            &self.opts,
            &self.retries,
            Some(&self.fatal),
        )
        .await?;
        let (sink, stream) = ws.split();
        self.sh.live.fetch_add(1, Relaxed);
        self.sh.connected.fetch_add(1, Relaxed);
        let (sink, reader) = match self.spec.slow {
            None => (
                Some(sink),
                tokio::spawn(read_loop(
                    stream,
                    self.sh.clone(),
                    self.spec.role,
                    self.spec.channel_idx,
                    self.shard,
                )),
            ),
            Some(mode) => (
                None,
                tokio::spawn(slow_loop(
                    sink,
                    stream,
                    self.sh.clone(),
                    mode,
                    self.spec.channel_idx,
                )),
            ),
        };
        Ok(Conn {
            role: self.spec.role,
            sink,
            reader,
            connect_us,
        })
    }
}

/// One connection, retried with backoff up to `opts.retries` times. Returns the socket
/// and the microseconds its successful attempt took. A fatal error sets `fatal`, and a
/// set `fatal` stops the retries.
async fn connect_retrying(
    target: &Target,
    spec: &ConnSpec,
    opts: &ConnectOpts,
    retries: &AtomicU64,
    fatal: Option<&AtomicBool>,
) -> Result<(Ws, u64), AttemptError> {
    let mut attempt = 0;
    loop {
        if fatal.is_some_and(|f| f.load(Relaxed)) {
            return Err(AttemptError::Retry(
                "not attempted: the connect phase was aborted".into(),
            ));
        }
        let began = Instant::now();
        match connect_once(target, spec, opts).await {
            Ok(ws) => {
                let connect_us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                return Ok((ws, connect_us));
            }
            Err(AttemptError::Fatal(msg)) => {
                if let Some(f) = fatal {
                    f.store(true, Relaxed);
                }
                return Err(AttemptError::Fatal(msg));
            }
            Err(AttemptError::Retry(msg)) => {
                if attempt >= opts.retries {
                    return Err(AttemptError::Retry(msg));
                }
                attempt += 1;
                retries.fetch_add(1, Relaxed);
                let backoff = 100u64 << attempt.min(5);
                sleep(Duration::from_millis(
                    backoff.min(2000) + fastrand::u64(..100),
                ))
                .await;
            }
        }
    }
}

/// Seconds between the pings a slow reader sends (any frame is a sign of life to the
/// server's heartbeat, and sending needs no reading).
const SLOW_KEEPALIVE: Duration = Duration::from_secs(10);
/// When draining, a slow reader that got nothing for this long is still open.
const SLOW_DRAIN_IDLE: Duration = Duration::from_secs(1);
/// Longest a slow reader drains before it closes the connection itself.
const SLOW_DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// A slow reader (`fanout --slow`): reads nothing (or one frame per second) until
/// [`Shared::drain`], so the server's side of the socket and its queue fill up. Then it
/// reads what is left as fast as it can, to learn whether the server closed it (a close
/// frame, usually 1013, or the socket ending when the close frame could not be written),
/// and closes it itself if it is still open. It runs on its own task, holding both
/// halves: nothing else waits on it.
async fn slow_loop(
    mut sink: Sink,
    mut stream: SplitStream<Ws>,
    sh: Arc<Shared>,
    mode: SlowMode,
    channel: usize,
) -> ReaderStats {
    let mut stats = ReaderStats {
        channel,
        ..ReaderStats::default()
    };
    let mut lat = LatencyBuffers {
        shard: 0,
        delivery: Vec::new(),
        ack: Vec::new(),
    };
    let now = Instant::now();
    let mut keepalive = tokio::time::interval_at(now + SLOW_KEEPALIVE, SLOW_KEEPALIVE);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let second = Duration::from_secs(1);
    let mut trickle = tokio::time::interval_at(now + second, second);
    trickle.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut want_frame = false;
    let mut open = true;
    let cancelled = loop {
        tokio::select! {
            biased;
            () = sh.cancel.cancelled() => break true,
            () = sh.drain.cancelled() => break false,
            _ = keepalive.tick(), if open => {
                // A failed ping shows when the rest is read.
                let ping = sink.send(Message::Ping(Default::default()));
                let _ = timeout(second, ping).await;
            }
            _ = trickle.tick(), if mode == SlowMode::Trickle && open => want_frame = true,
            next = stream.next(), if want_frame && open => {
                want_frame = false;
                open = stats.on_slow_frame(next, &sh, &mut lat);
            }
        }
    };
    if !cancelled {
        let limit = Instant::now() + SLOW_DRAIN_LIMIT;
        while open && Instant::now() < limit {
            let next = tokio::select! {
                biased;
                () = sh.cancel.cancelled() => break,
                next = timeout(SLOW_DRAIN_IDLE, stream.next()) => next,
            };
            match next {
                Ok(next) => open = stats.on_slow_frame(next, &sh, &mut lat),
                Err(_) => break, // quiet: the server still has it open
            }
        }
        if open {
            // Still open: close it, and read until the server's reply ends the stream.
            let _ = timeout(Duration::from_secs(2), sink.send(Message::Close(None))).await;
            let rest = async { while let Some(Ok(_)) = stream.next().await {} };
            let _ = timeout(Duration::from_secs(2), rest).await;
        }
    }
    sh.live.fetch_sub(1, Relaxed);
    stats
}

/// Opens every connection with bounded concurrency (and an optional rate), within the
/// connect deadline.
async fn connect_all(
    sh: &Arc<Shared>,
    target: &Arc<Target>,
    specs: Vec<ConnSpec>,
    opts: ConnectOpts,
) -> Connected {
    let total = specs.len();
    let sem = Arc::new(Semaphore::new(opts.concurrency));
    let fatal = Arc::new(AtomicBool::new(false));
    let retries = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let overflows_before = listen_overflows();
    let deadline = start + opts.deadline;
    let mut set = JoinSet::new();
    let mut not_started = 0usize;
    let progress = {
        let sh = sh.clone();
        tokio::spawn(async move {
            loop {
                sleep(Duration::from_secs(2)).await;
                eprintln!("  connecting: {}/{total} open", sh.connected.load(Relaxed));
            }
        })
    };
    for (i, spec) in specs.into_iter().enumerate() {
        if fatal.load(Relaxed) || Instant::now() >= deadline {
            not_started += 1;
            continue;
        }
        if opts.rate > 0.0 {
            #[allow(clippy::cast_precision_loss)]
            let at = start + Duration::from_secs_f64(i as f64 / opts.rate);
            sleep_until(at.min(deadline)).await;
        }
        let permit = tokio::select! {
            permit = sem.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => { not_started += 1; continue; }
            },
            () = sleep_until(deadline) => { not_started += 1; continue; }
        };
        let task = ConnectTask {
            target: target.clone(),
            spec,
            sh: sh.clone(),
            opts,
            fatal: fatal.clone(),
            retries: retries.clone(),
            shard: i,
        };
        set.spawn(async move {
            let result = task.run().await;
            drop(permit);
            result
        });
    }
    let mut out = Connected {
        conns: Vec::with_capacity(total),
        failed: not_started,
        retries: 0,
        errors: BTreeMap::new(),
        fatal: None,
        elapsed: Duration::ZERO,
        times: Histogram::new(),
        listen_overflows: None,
    };
    if not_started > 0 && !fatal.load(Relaxed) {
        out.errors.insert(
            "not started: connect deadline reached".into(),
            not_started as u64,
        );
    }
    let mut aborted = false;
    loop {
        let joined = tokio::select! {
            joined = set.join_next() => joined,
            () = sleep_until(deadline), if !aborted => {
                set.abort_all();
                aborted = true;
                continue;
            }
        };
        match joined {
            None => break,
            Some(Ok(Ok(conn))) => {
                out.times.record(conn.connect_us);
                out.conns.push(conn);
            }
            Some(Ok(Err(AttemptError::Fatal(msg)))) => {
                out.failed += 1;
                out.fatal.get_or_insert(msg);
            }
            Some(Ok(Err(AttemptError::Retry(msg)))) => {
                out.failed += 1;
                *out.errors.entry(msg).or_default() += 1;
            }
            Some(Err(_)) => {
                out.failed += 1;
                *out.errors
                    .entry("aborted: connect deadline reached".into())
                    .or_default() += 1;
            }
        }
    }
    progress.abort();
    out.retries = retries.load(Relaxed);
    out.elapsed = start.elapsed();
    out.listen_overflows = overflows_before
        .zip(listen_overflows())
        .map(|(a, b)| b.saturating_sub(a));
    out
}

/// Closes every connection: a close frame on each, a short wait for the readers to see
/// the server's reply, then the readers are stopped and their figures collected.
async fn close_all(
    sh: &Shared,
    sinks: &mut [Sink],
    readers: Vec<JoinHandle<ReaderStats>>,
) -> Vec<ReaderStats> {
    sh.closing.store(true, Relaxed);
    futures_util::stream::iter(sinks.iter_mut())
        .for_each_concurrent(256, |sink| async move {
            let _ = timeout(Duration::from_secs(2), sink.send(Message::Close(None))).await;
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while sh.live.load(Relaxed) > 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    sh.cancel.cancel();
    let mut stats = Vec::with_capacity(readers.len());
    for reader in readers {
        match reader.await {
            Ok(s) => stats.push(s),
            Err(e) => eprintln!("warning: a reader task failed: {e}"),
        }
    }
    stats
}

/// Splits opened connections into their sinks and reader tasks.
fn split_conns(conns: Vec<Conn>) -> (Vec<Sink>, Vec<JoinHandle<ReaderStats>>) {
    let mut sinks = Vec::with_capacity(conns.len());
    let mut readers = Vec::with_capacity(conns.len());
    for conn in conns {
        sinks.extend(conn.sink);
        readers.push(conn.reader);
    }
    (sinks, readers)
}

/// Connects every spec; when any connection fails, closes what opened and returns why.
/// (The `idle` scenario counts failures instead.)
async fn connect_every(
    sh: &Arc<Shared>,
    target: &Arc<Target>,
    specs: Vec<ConnSpec>,
    common: &Common,
    wanted: usize,
) -> Result<Connected, String> {
    let mut connected = connect_all(sh, target, specs, ConnectOpts::from(common)).await;
    if let Some(fatal) = connected.fatal.take() {
        return Err(abandon(sh, connected, fatal).await);
    }
    if connected.failed > 0 {
        let reason = failure_summary(&connected, wanted);
        return Err(abandon(sh, connected, reason).await);
    }
    Ok(connected)
}

/// Closes what a failed connect phase opened and returns the reason as an error.
async fn abandon(sh: &Shared, connected: Connected, reason: String) -> String {
    let (mut sinks, readers) = split_conns(connected.conns);
    close_all(sh, &mut sinks, readers).await;
    reason
}

fn failure_summary(connected: &Connected, wanted: usize) -> String {
    let mut text = format!("{} of {wanted} connections failed", connected.failed);
    for (msg, n) in connected.errors.iter().take(5) {
        text.push_str(&format!("\n  {n} x {msg}"));
    }
    text
}

// ---------------------------------------------------------------------------------------
// Pacing
// ---------------------------------------------------------------------------------------

/// A sending connection.
struct Outlet {
    sink: Sink,
    alive: bool,
}

/// The schedule every pacer follows.
#[derive(Clone)]
struct Plan {
    start: Instant,
    /// Warmup plus measured duration.
    total: Duration,
    tick: Duration,
    send_timeout: Duration,
    padding: Arc<str>,
}

/// Figures one pacer collected.
#[derive(Debug, Default)]
struct PacerStats {
    sent: u64,
    sent_in_window: u64,
    /// Messages due but dropped from the schedule because the pacer fell behind.
    skipped: u64,
    send_errors: u64,
    first_error: Option<String>,
}

/// Sends `quota` messages spread evenly over the plan, round-robin over the outlets.
/// Each tick sends what is due by then (at most 50 ms worth: a pacer that falls behind
/// skips rather than bursts), feeding every frame and flushing each socket once per tick.
async fn pace(
    sh: Arc<Shared>,
    mut outlets: Vec<Outlet>,
    quota: u64,
    plan: Plan,
) -> (Vec<Outlet>, PacerStats) {
    let mut stats = PacerStats::default();
    if outlets.is_empty() || quota == 0 {
        return (outlets, stats);
    }
    let total_secs = plan.total.as_secs_f64();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let burst_cap = ((quota as f64 / total_secs) * 0.05).ceil().max(1.0) as u64;
    let mut ticker = tokio::time::interval_at(plan.start, plan.tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut released = 0u64;
    let mut next = 0usize;
    let mut touched = vec![false; outlets.len()];
    loop {
        ticker.tick().await;
        let elapsed = plan.start.elapsed();
        let done = elapsed >= plan.total;
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let target = if done {
            quota
        } else {
            ((quota as f64 * elapsed.as_secs_f64() / total_secs) as u64).min(quota)
        };
        let due = target.saturating_sub(released);
        released = released.max(target);
        let batch = due.min(burst_cap);
        stats.skipped += due - batch;
        for _ in 0..batch {
            let Some(i) = next_alive(&outlets, &mut next) else {
                stats.skipped += 1;
                continue;
            };
            let seq = sh.next_seq.fetch_add(1, Relaxed);
            let Some(state) = usize::try_from(seq).ok().and_then(|s| sh.states.get(s)) else {
                stats.skipped += 1;
                continue;
            };
            let t = now_us();
            let frame = format!(
                r#"{{"type":"message","content":"t={t};n={seq}{}","message_type":"text","client_id":"{}-{seq}"}}"#,
                plan.padding, sh.run_id
            );
            match timeout(
                plan.send_timeout,
                outlets[i].sink.feed(Message::text(frame)),
            )
            .await
            {
                Ok(Ok(())) => {
                    state.fetch_or(SENT, Relaxed);
                    stats.sent += 1;
                    if sh.in_window(t) {
                        stats.sent_in_window += 1;
                    }
                    touched[i] = true;
                }
                Ok(Err(e)) => kill(&mut outlets[i], &mut stats, format!("send failed: {e}")),
                Err(_) => kill(&mut outlets[i], &mut stats, "send timed out".into()),
            }
        }
        for (i, was_touched) in touched.iter_mut().enumerate() {
            if std::mem::take(was_touched) && outlets[i].alive {
                match timeout(plan.send_timeout, outlets[i].sink.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => kill(&mut outlets[i], &mut stats, format!("flush failed: {e}")),
                    Err(_) => kill(&mut outlets[i], &mut stats, "flush timed out".into()),
                }
            }
        }
        if done || outlets.iter().all(|o| !o.alive) {
            break;
        }
    }
    stats.skipped += quota.saturating_sub(released);
    (outlets, stats)
}

fn next_alive(outlets: &[Outlet], next: &mut usize) -> Option<usize> {
    for _ in 0..outlets.len() {
        let i = *next % outlets.len();
        *next = next.wrapping_add(1);
        if outlets[i].alive {
            return Some(i);
        }
    }
    None
}

fn kill(outlet: &mut Outlet, stats: &mut PacerStats, error: String) {
    outlet.alive = false;
    stats.send_errors += 1;
    stats.first_error.get_or_insert(error);
}

/// What the sending phase produced.
struct Sending {
    outlets: Vec<Outlet>,
    stats: PacerStats,
    planned: u64,
    server_cpu: Option<f64>,
    client_cpu: Option<f64>,
    server_mem_in_window: Option<Mem>,
    /// Seconds waited after the last send.
    settle_secs: f64,
    /// Every sent message was acked and fully delivered within the wait.
    settled: bool,
}

/// Runs the pacers over the outlets for warmup + duration, then waits for outstanding
/// acks and deliveries (see [`settle`]).
async fn run_sending(
    sh: &Arc<Shared>,
    common: &Common,
    pacing: &PacingArgs,
    outlets: Vec<Outlet>,
    planned: u64,
    expected_per_message: u32,
    server: Option<u32>,
) -> Sending {
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let pacers = pacing
        .pacers
        .unwrap_or(common.threads.unwrap_or(workers))
        .clamp(1, outlets.len().max(1));
    let mut groups: Vec<Vec<Outlet>> = (0..pacers).map(|_| Vec::new()).collect();
    for (i, outlet) in outlets.into_iter().enumerate() {
        groups[i % pacers].push(outlet);
    }
    let warmup = secs(common.warmup);
    let duration = secs(common.duration);
    // Start a little in the future so every pacer starts on the same schedule.
    let lead = Duration::from_millis(50);
    let start = Instant::now() + lead;
    let start_us = now_us() + 50_000;
    let window_start = start_us + u64::try_from(warmup.as_micros()).unwrap_or(u64::MAX);
    let window_end = window_start + u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    sh.window_start.store(window_start, Relaxed);
    sh.window_end.store(window_end, Relaxed);
    let plan = Plan {
        start,
        total: warmup + duration,
        tick: Duration::from_millis(pacing.tick_ms.clamp(1, 100)),
        send_timeout: Duration::from_secs(5),
        padding: if pacing.payload == 0 {
            Arc::from("")
        } else {
            Arc::from(format!(";p={}", "x".repeat(pacing.payload)).as_str())
        },
    };
    let mut handles = Vec::with_capacity(pacers);
    for (j, group) in groups.into_iter().enumerate() {
        let j = j as u64;
        let p = pacers as u64;
        let quota = planned * (j + 1) / p - planned * j / p;
        handles.push(tokio::spawn(pace(sh.clone(), group, quota, plan.clone())));
    }
    eprintln!(
        "  sending for {:.1} s ({:.1} s warmup + {:.1} s measured) with {pacers} pacer(s)",
        (warmup + duration).as_secs_f64(),
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    sleep_until(start + warmup).await;
    let pid = server.map(|p| p.to_string());
    let cpu0 = (pid.as_deref().and_then(cpu_secs), cpu_secs("self"));
    sleep_until(start + warmup + duration).await;
    let cpu1 = (pid.as_deref().and_then(cpu_secs), cpu_secs("self"));
    let server_mem_in_window = pid.as_deref().and_then(read_mem);
    let mut stats = PacerStats::default();
    let mut outlets = Vec::new();
    for handle in handles {
        match handle.await {
            Ok((group, s)) => {
                outlets.extend(group);
                stats.sent += s.sent;
                stats.sent_in_window += s.sent_in_window;
                stats.skipped += s.skipped;
                stats.send_errors += s.send_errors;
                if stats.first_error.is_none() {
                    stats.first_error = s.first_error;
                }
            }
            Err(e) => eprintln!("warning: a pacer task failed: {e}"),
        }
    }
    eprintln!("  waiting for outstanding acks and deliveries");
    let (settle_secs, settled) = settle(sh, expected_per_message, secs(common.grace)).await;
    let window = duration.as_secs_f64();
    Sending {
        outlets,
        stats,
        planned,
        server_cpu: cpu0.0.zip(cpu1.0).map(|(a, b)| (b - a) / window),
        client_cpu: cpu0.1.zip(cpu1.1).map(|(a, b)| (b - a) / window),
        server_mem_in_window,
        settle_secs,
        settled,
    }
}

/// Every connection of `conns` sends ([`run_sending`]), then all are closed: the
/// members of `send`, and the healthy clients of `hostile`. Returns the sending figures
/// (their outlets closed and gone), every reader's figures, and this process's memory
/// once the sending ended.
async fn send_and_close(
    sh: &Arc<Shared>,
    common: &Common,
    pacing: &PacingArgs,
    conns: Vec<Conn>,
    planned: u64,
    expected_per_message: u32,
    server: Option<u32>,
) -> (Sending, Vec<ReaderStats>, Option<Mem>) {
    let (sinks, readers) = split_conns(conns);
    let outlets = sinks
        .into_iter()
        .map(|sink| Outlet { sink, alive: true })
        .collect();
    let mut sending = run_sending(
        sh,
        common,
        pacing,
        outlets,
        planned,
        expected_per_message,
        server,
    )
    .await;
    let client_mem = read_mem("self");
    let mut sinks: Vec<Sink> = std::mem::take(&mut sending.outlets)
        .into_iter()
        .map(|o| o.sink)
        .collect();
    let stats = close_all(sh, &mut sinks, readers).await;
    (sending, stats, client_mem)
}

/// Waits until every sent message is acked and delivered `expected` times, or until
/// nothing new arrived for `grace` (at most `grace` + 60 s). Returns the seconds waited
/// and whether everything arrived.
async fn settle(sh: &Shared, expected: u32, grace: Duration) -> (f64, bool) {
    let start = Instant::now();
    let limit = grace + Duration::from_secs(60);
    let mut last_total = None;
    let mut last_progress = start;
    loop {
        let (total, complete) = progress(sh, expected);
        if complete {
            return (start.elapsed().as_secs_f64(), true);
        }
        if last_total != Some(total) {
            last_total = Some(total);
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= grace {
            break;
        }
        if start.elapsed() >= limit {
            break;
        }
        sleep(Duration::from_millis(100)).await;
    }
    (start.elapsed().as_secs_f64(), false)
}

/// (acks + deliveries so far, whether every sent message is acked and fully delivered).
fn progress(sh: &Shared, expected: u32) -> (u64, bool) {
    let used = usize::try_from(sh.next_seq.load(Relaxed))
        .unwrap_or(usize::MAX)
        .min(sh.states.len());
    let mut total = 0u64;
    let mut complete = true;
    for seq in 0..used {
        let state = sh.states[seq].load(Relaxed);
        let delivered = sh.deliveries[seq].load(Relaxed);
        total += u64::from(delivered) + u64::from(state & ACKED != 0);
        if state & SENT != 0 && (state & ACKED == 0 || delivered < expected) {
            complete = false;
        }
    }
    (total, complete)
}

/// Messages planned for a rate over warmup + duration, within [`MAX_PLANNED`].
fn planned_messages(rate: f64, common: &Common) -> Result<u64, String> {
    let total = rate * (common.warmup + common.duration);
    #[allow(clippy::cast_precision_loss)]
    if total > MAX_PLANNED as f64 {
        return Err(format!(
            "rate x (warmup + duration) = {total:.0} messages; at most {MAX_PLANNED} per run \
             (lower --rate or --duration)"
        ));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((total.round() as u64).max(1))
}

// ---------------------------------------------------------------------------------------
// Analysis
// ---------------------------------------------------------------------------------------

/// Reader figures summed over connections.
#[derive(Debug, Default)]
struct Totals {
    counts: FrameCounts,
    ended: BTreeMap<String, u64>,
    ended_early: u64,
}

impl std::ops::Deref for Totals {
    type Target = FrameCounts;
    fn deref(&self) -> &FrameCounts {
        &self.counts
    }
}

impl Totals {
    fn of(stats: &[ReaderStats]) -> Self {
        let mut t = Totals::default();
        for s in stats {
            t.counts.add(&s.counts);
            if let Some(reason) = &s.ended {
                t.ended_early += 1;
                *t.ended.entry(reason.clone()).or_default() += 1;
            }
        }
        t
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Per-message accounting over every sequence number used.
#[derive(Debug, Default)]
struct Accounting {
    sent: u64,
    acked: u64,
    /// Sent, never acknowledged.
    unacked: u64,
    /// Sent, never acknowledged, yet delivered to someone.
    delivered_unacked: u64,
    /// Deliveries missing for acknowledged messages.
    lost_deliveries: u64,
    /// Acknowledged messages with at least one delivery missing.
    messages_with_loss: u64,
    duplicate_deliveries: u64,
}

fn account(sh: &Shared, expected_per_message: u32) -> Accounting {
    let used = usize::try_from(sh.next_seq.load(Relaxed))
        .unwrap_or(usize::MAX)
        .min(sh.states.len());
    let mut a = Accounting::default();
    for seq in 0..used {
        let state = sh.states[seq].load(Relaxed);
        let delivered = sh.deliveries[seq].load(Relaxed);
        if state & SENT != 0 {
            a.sent += 1;
        }
        if state & ACKED != 0 {
            a.acked += 1;
            if delivered < expected_per_message {
                a.messages_with_loss += 1;
                a.lost_deliveries += u64::from(expected_per_message - delivered);
            }
            a.duplicate_deliveries += u64::from(delivered.saturating_sub(expected_per_message));
        } else if state & SENT != 0 {
            a.unacked += 1;
            if delivered > 0 {
                a.delivered_unacked += 1;
            }
        }
    }
    a
}

// ---------------------------------------------------------------------------------------
// HTTP (plain HTTP/1.1 over TcpStream) and the history check
// ---------------------------------------------------------------------------------------

/// Largest HTTP response read.
const MAX_HTTP_BYTES: u64 = 64 << 20;

/// `GET path` on the REST API with `Connection: close`; returns the status and the
/// (de-chunked) body.
async fn http_get(target: &Target, path: &str) -> Result<(u16, Vec<u8>), String> {
    http_get_at(
        target.http_addr,
        &target.http_authority,
        path,
        "application/json",
    )
    .await
}

/// `GET path` from `addr` (`authority` in the Host header) with `Connection: close`.
async fn http_get_at(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    accept: &str,
) -> Result<(u16, Vec<u8>), String> {
    let request = HttpRequest {
        headers: &[("Accept", accept)],
        ..HttpRequest::get(path)
    };
    let answer = http_request(addr, authority, &request).await?;
    Ok((answer.status, answer.body))
}

/// `POST path` on the REST API with a JSON body (and an `X-Forwarded-For`, to stand
/// for a client behind a proxy the server trusts).
async fn http_post_json(
    target: &Target,
    path: &str,
    body: &[u8],
    forwarded_for: Option<&str>,
) -> Result<HttpAnswer, String> {
    let json = ("Content-Type", "application/json");
    let with_address;
    let headers: &[(&str, &str)] = match forwarded_for {
        Some(address) => {
            with_address = [json, ("X-Forwarded-For", address)];
            &with_address
        }
        None => &[json],
    };
    let request = HttpRequest {
        method: "POST",
        path,
        headers,
        body: Some(body),
        limit: Duration::from_secs(60),
    };
    http_request(target.http_addr, &target.http_authority, &request).await
}

/// One HTTP/1.1 request, sent with `Connection: close`.
struct HttpRequest<'a> {
    method: &'a str,
    path: &'a str,
    /// Header lines besides Host, Connection and Content-Length.
    headers: &'a [(&'a str, &'a str)],
    /// Sent with its Content-Length.
    body: Option<&'a [u8]>,
    /// Longest the whole exchange may take.
    limit: Duration,
}

impl<'a> HttpRequest<'a> {
    fn get(path: &'a str) -> Self {
        Self {
            method: "GET",
            path,
            headers: &[],
            body: None,
            limit: Duration::from_secs(15),
        }
    }
}

/// An HTTP answer.
struct HttpAnswer {
    status: u16,
    /// De-chunked, at most [`MAX_HTTP_BYTES`].
    body: Vec<u8>,
    /// Why sending the request failed, when the server answered before taking it all
    /// (a 413 for an oversized body, say) and closed the connection.
    cut_off: Option<String>,
}

impl HttpAnswer {
    /// The `code` of a JSON error body, or `""`.
    fn code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("code").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default()
    }

    /// The status with the error code, if any: `413 payload_too_large`.
    fn outcome(&self) -> String {
        match self.code() {
            code if code.is_empty() => self.status.to_string(),
            code => format!("{} {code}", self.status),
        }
    }
}

/// Sends `request` to `addr` (`authority` in the Host header) and reads the answer to the
/// end of the connection. When writing the request fails, what the server answered
/// before closing is still read (and the failure kept in [`HttpAnswer::cut_off`]).
async fn http_request(
    addr: SocketAddr,
    authority: &str,
    request: &HttpRequest<'_>,
) -> Result<HttpAnswer, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n",
            request.method, request.path
        );
        for (name, value) in request.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = request.body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut cut_off = stream
            .write_all(head.as_bytes())
            .await
            .err()
            .map(|e| format!("write: {e}"));
        if let (None, Some(body)) = (&cut_off, request.body) {
            cut_off = stream
                .write_all(body)
                .await
                .err()
                .map(|e| format!("write: {e}"));
        }
        let mut raw = Vec::new();
        let read = (&mut stream)
            .take(MAX_HTTP_BYTES)
            .read_to_end(&mut raw)
            .await;
        // A reset after the answer (the server closing with our body unread) still
        // leaves the answer to read.
        match read {
            Err(e) if raw.is_empty() => Err(cut_off.unwrap_or_else(|| format!("read: {e}"))),
            _ => Ok::<_, String>((raw, cut_off)),
        }
    };
    let (raw, cut_off) = timeout(request.limit, exchange)
        .await
        .map_err(|_| "timed out".to_string())??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header in the response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpAnswer {
        status,
        body,
        cut_off,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| "bad chunk size")?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[derive(Debug, Deserialize)]
struct HistoryBody {
    messages: Vec<HistoryEntry>,
}

#[derive(Debug, Deserialize)]
struct HistoryEntry {
    message_id: String,
    #[serde(default)]
    content: String,
}

/// Result of checking acknowledged messages against the channels' history.
#[derive(Debug, Default)]
struct HistoryCheck {
    channels: usize,
    fetch_errors: Vec<String>,
    acked: u64,
    checked: u64,
    found: u64,
    missing: u64,
    duplicates: u64,
    stored_unacked: u64,
    unexpected: u64,
    over_cap: Vec<(String, u64)>,
}

/// Fetches each channel's newest `limit` messages and checks every acknowledged message
/// is there exactly once (for a channel with more than `limit` acks, that the window is
/// full of distinct messages of ours).
async fn check_history(
    target: &Target,
    sh: &Shared,
    channels: &[String],
    acked: &[Vec<u128>],
    limit: usize,
) -> HistoryCheck {
    let mut check = HistoryCheck {
        channels: channels.len(),
        ..HistoryCheck::default()
    };
    for (name, ids) in channels.iter().zip(acked) {
        let acked_set: HashSet<u128> = ids.iter().copied().collect();
        check.acked += acked_set.len() as u64;
        let path = format!("/api/chat/history/{name}?limit={limit}");
        let body = match http_get(target, &path).await {
            Ok((200, body)) => body,
            Ok((status, body)) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                check
                    .fetch_errors
                    .push(format!("{name}: HTTP {status} {text}"));
                continue;
            }
            Err(e) => {
                check.fetch_errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        let history: HistoryBody = match serde_json::from_slice(&body) {
            Ok(h) => h,
            Err(e) => {
                check.fetch_errors.push(format!("{name}: bad JSON: {e}"));
                continue;
            }
        };
        let mut seen: HashMap<u128, u32> = HashMap::with_capacity(history.messages.len());
        for entry in &history.messages {
            *seen.entry(id_key(&entry.message_id)).or_default() += 1;
        }
        let mut found = 0u64;
        let mut stored_unacked = 0u64;
        for (key, n) in &seen {
            check.duplicates += u64::from(n - 1);
            if acked_set.contains(key) {
                found += 1;
            }
        }
        let mut counted: HashSet<u128> = HashSet::new();
        for entry in &history.messages {
            let key = id_key(&entry.message_id);
            if acked_set.contains(&key) || !counted.insert(key) {
                continue;
            }
            let ours = entry
                .content
                .strip_prefix("t=")
                .and_then(|c| parse_stamp(&format!("{CONTENT_T}{c}")))
                .and_then(|(_, seq)| usize::try_from(seq).ok())
                .and_then(|seq| sh.states.get(seq))
                .is_some_and(|s| s.load(Relaxed) & SENT != 0);
            if ours {
                stored_unacked += 1;
            } else {
                check.unexpected += 1;
            }
        }
        let acked_here = acked_set.len() as u64;
        let window = limit as u64;
        if acked_here <= window {
            check.checked += acked_here;
            check.missing += acked_here - found;
        } else {
            // Only the newest `limit` messages are kept and returned.
            check.over_cap.push((name.clone(), acked_here));
            check.checked += window;
            check.missing += window.saturating_sub(found + stored_unacked);
        }
        check.found += found;
        check.stored_unacked += stored_unacked;
    }
    check
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

/// Figures as a readable block and as one JSON object, built together.
struct Report {
    lines: Vec<String>,
    json: Map<String, Value>,
    section: Option<String>,
}

impl Report {
    fn new(scenario: &str, run_id: &str, target: &Target) -> Self {
        let mut json = Map::new();
        json.insert("scenario".into(), json!(scenario));
        json.insert("run_id".into(), json!(run_id));
        json.insert("target".into(), json!(target.ws_addr.to_string()));
        Self {
            lines: vec![format!(
                "chatgate-load {scenario}: run {run_id}, target {}",
                target.ws_addr
            )],
            json,
            section: None,
        }
    }

    fn section(&mut self, title: &str, key: &str) {
        self.lines.push(format!("{title}:"));
        self.json.insert(key.into(), Value::Object(Map::new()));
        self.section = Some(key.into());
    }

    fn put(&mut self, label: &str, key: &str, value: Value, shown: impl Display) {
        self.lines.push(format!("  {label:<38} {shown}"));
        let map = match &self.section {
            Some(section) => match self.json.get_mut(section) {
                Some(Value::Object(map)) => map,
                _ => return,
            },
            None => &mut self.json,
        };
        map.insert(key.into(), value);
    }

    fn int(&mut self, label: &str, key: &str, value: u64) {
        self.put(label, key, json!(value), value);
    }

    fn num(&mut self, label: &str, key: &str, value: f64, unit: &str) {
        let rounded = (value * 1000.0).round() / 1000.0;
        self.put(label, key, json!(rounded), format!("{value:.2}{unit}"));
    }

    fn text(&mut self, label: &str, key: &str, value: &str) {
        self.put(label, key, json!(value), value);
    }

    fn counts(&mut self, label: &str, key: &str, counts: &BTreeMap<String, u64>) {
        let map: Map<String, Value> = counts.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let shown = if counts.is_empty() {
            "none".to_string()
        } else {
            counts
                .iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        self.put(label, key, Value::Object(map), shown);
    }

    /// A warning line, also listed under `warnings` in the JSON.
    fn warn(&mut self, text: String) {
        self.lines.push(format!("  ! {text}"));
        let warnings = self
            .json
            .entry("warnings")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = warnings {
            list.push(json!(text));
        }
    }

    fn latency(&mut self, title: &str, key: &str, h: &Histogram) {
        self.section(title, key);
        self.int("samples", "samples", h.count);
        if h.count == 0 {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let ms = |us: u64| us as f64 / 1000.0;
        self.num("p50", "p50_ms", ms(h.quantile(0.50)), " ms");
        self.num("p90", "p90_ms", ms(h.quantile(0.90)), " ms");
        self.num("p99", "p99_ms", ms(h.quantile(0.99)), " ms");
        self.num("p99.9", "p999_ms", ms(h.quantile(0.999)), " ms");
        self.num("max", "max_ms", ms(h.max), " ms");
    }

    fn mem(&mut self, label: &str, key: &str, mem: Option<Mem>) {
        if let Some(m) = mem {
            #[allow(clippy::cast_precision_loss)]
            let mib = m.rss_kib as f64 / 1024.0;
            self.put(
                label,
                key,
                json!(m.rss_kib),
                format!("{} KiB ({mib:.1} MiB)", m.rss_kib),
            );
        }
    }

    fn connect(&mut self, c: &Connected, wanted: usize, opened: usize) {
        self.section("connect", "connect");
        self.int("wanted", "wanted", wanted as u64);
        self.int("opened", "opened", opened as u64);
        self.int("failed", "failed", c.failed as u64);
        self.int("retries", "retries", c.retries);
        self.num("seconds", "seconds", c.elapsed.as_secs_f64(), " s");
        #[allow(clippy::cast_precision_loss)]
        let rate = opened as f64 / c.elapsed.as_secs_f64().max(1e-9);
        self.num("rate", "per_sec", rate, " conns/s");
        #[allow(clippy::cast_precision_loss)]
        let ms = |us: u64| us as f64 / 1000.0;
        if c.times.count > 0 {
            self.num("handshake p50", "p50_ms", ms(c.times.quantile(0.5)), " ms");
            self.num("handshake p99", "p99_ms", ms(c.times.quantile(0.99)), " ms");
            self.num("handshake max", "max_ms", ms(c.times.max), " ms");
        }
        if let Some(n) = c.listen_overflows {
            self.int("listen overflows (system-wide)", "listen_overflows", n);
            if n > 0 {
                self.warn(format!(
                    "a listen queue overflowed {n} time(s) while connecting (SYNs dropped, \
                     retried after 1 s): lower --connect-concurrency or raise the server's \
                     listen backlog"
                ));
            }
        }
        if !c.errors.is_empty() {
            self.counts("errors", "errors", &c.errors);
        }
    }

    fn frames(&mut self, t: &Totals) {
        self.section("frames received", "frames");
        self.int("total", "total", t.frames);
        self.int("message", "message", t.messages);
        self.int("user_joined", "user_joined", t.joined);
        self.int("user_left", "user_left", t.left);
        self.int("typing_status", "typing_status", t.typing);
        self.int("message_deleted", "message_deleted", t.deleted);
        self.int("other type", "other", t.other);
        self.int("malformed", "malformed", t.malformed);
        self.int("foreign messages", "foreign", t.foreign);
        self.counts("error frames by code", "errors", &t.errors);
        self.int("connections ended early", "ended_early", t.ended_early);
        if !t.ended.is_empty() {
            self.counts("early ends", "early_ends", &t.ended);
        }
    }

    /// A table: a title, a header and rows; in the JSON, an array of the rows' objects.
    fn table(&mut self, title: &str, key: &str, header: &str, rows: Vec<(String, Value)>) {
        self.lines.push(format!("{title}:"));
        self.lines.push(header.to_string());
        let mut list = Vec::with_capacity(rows.len());
        for (line, value) in rows {
            self.lines.push(line);
            list.push(value);
        }
        self.json.insert(key.into(), Value::Array(list));
        self.section = None;
    }

    /// One bar of the issue: the figure measured against its target, and whether it held.
    /// Listed under `bars` in the JSON.
    fn bar(&mut self, label: &str, key: &str, measured: &str, met: bool) {
        let verdict = if met { "PASS" } else { "FAIL" };
        self.lines
            .push(format!("  {label:<44} {measured}: {verdict}"));
        let bars = self
            .json
            .entry("bars")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(map) = bars {
            map.insert(key.into(), json!({"measured": measured, "met": met}));
        }
    }

    /// The last line: the run's verdict.
    fn verdict(&mut self, verdict: &Verdict) {
        let text = match verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        };
        self.lines.push(format!("verdict: {text}"));
        self.json.insert("verdict".into(), json!(text));
    }

    fn print(&self, json_line: bool) {
        println!("{}", self.lines.join("\n"));
        if json_line {
            println!("{}", Value::Object(self.json.clone()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Usernames are `<run>-<role><index>` (at most 16 + 1 + 1 + 7 characters).
/// `count` idle connections spread round-robin over `channels`.
fn idle_specs(run_id: &str, channels: &[String], count: usize) -> Vec<ConnSpec> {
    (0..count)
        .map(|i| {
            ConnSpec::new(
                username(run_id, 'i', i),
                channels[i % channels.len()].clone(),
                i % channels.len(),
                IDLE,
            )
        })
        .collect()
}

fn username(run_id: &str, role: char, i: usize) -> String {
    format!("{run_id}-{role}{i}")
}

/// `idle`: open, hold, measure memory, close.
async fn idle(
    common: &Common,
    args: &IdleArgs,
    target: &Target,
    server: Option<u32>,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    if args.connections == 0 || args.channels == 0 {
        return Err("--connections and --channels must be at least 1".into());
    }
    if args.connections > 1_000_000 {
        return Err("--connections must be at most 1,000,000".into());
    }
    check_fd_limit(args.connections);
    let target = Arc::new(target.clone());
    let pid = server.map(|p| p.to_string());
    let sh = Shared::new(run_id, 0);
    let channels: Vec<String> = (0..args.channels)
        .map(|j| format!("load-{run_id}-idle-{j}"))
        .collect();
    let specs = idle_specs(run_id, &channels, args.connections);
    let mem_before = pid.as_deref().and_then(read_mem);
    eprintln!(
        "idle: opening {} connections over {} channels",
        args.connections, args.channels
    );
    let mut connected = connect_all(&sh, &target, specs, ConnectOpts::from(common)).await;
    if let Some(fatal) = connected.fatal.take() {
        return Err(abandon(&sh, connected, fatal).await);
    }
    let (sinks, readers) = split_conns(std::mem::take(&mut connected.conns));
    let opened = readers.len();
    eprintln!(
        "  {opened} open ({} failed) in {:.1} s; settling {:.1} s",
        connected.failed,
        connected.elapsed.as_secs_f64(),
        common.warmup
    );
    sleep(secs(common.warmup)).await;
    let mem_connected = pid.as_deref().and_then(read_mem);
    let cpu0 = (pid.as_deref().and_then(cpu_secs), cpu_secs("self"));
    eprintln!("  holding for {:.1} s", common.duration);
    let hold_start = Instant::now();
    let hold_end = hold_start + secs(common.duration);
    loop {
        let left = hold_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sleep(left.min(Duration::from_secs(5))).await;
        if Instant::now() < hold_end {
            eprintln!("  holding: {}/{opened} open", sh.live.load(Relaxed));
        }
    }
    let held = hold_start.elapsed().as_secs_f64();
    let still_open = sh.live.load(Relaxed);
    let mem_after = pid.as_deref().and_then(read_mem);
    let cpu1 = (pid.as_deref().and_then(cpu_secs), cpu_secs("self"));
    let client_mem = read_mem("self");
    eprintln!("  closing");
    let mut sinks = sinks;
    let stats = close_all(&sh, &mut sinks, readers).await;
    drop(sinks);
    let mem_closed = if pid.is_some() {
        sleep(Duration::from_secs(2)).await;
        pid.as_deref().and_then(read_mem)
    } else {
        None
    };
    let totals = Totals::of(&stats);

    let mut r = Report::new("idle", run_id, &target);
    r.section("setup", "setup");
    r.int("connections", "connections", args.connections as u64);
    r.int("channels", "channels", args.channels as u64);
    r.num("hold", "hold_secs", held, " s");
    r.connect(&connected, args.connections, opened);
    r.section("hold", "hold");
    r.int(
        "open at the end of the hold",
        "open_at_end",
        still_open as u64,
    );
    r.int(
        "dropped during the run",
        "dropped",
        (opened - still_open.min(opened)) as u64,
    );
    r.section("server", "server");
    match pid {
        None => r.text(
            "memory",
            "memory",
            "not measured (give --server-pid or --server-pid-file)",
        ),
        Some(_) => {
            r.mem("RSS before connecting", "rss_before_kib", mem_before);
            r.mem(
                "RSS connected (after settle)",
                "rss_connected_kib",
                mem_connected,
            );
            r.mem("RSS at the end of the hold", "rss_after_kib", mem_after);
            r.mem("RSS 2 s after closing", "rss_closed_kib", mem_closed);
            if let Some(m) = mem_after {
                r.put(
                    "peak RSS (VmHWM)",
                    "hwm_kib",
                    json!(m.hwm_kib),
                    format!("{} KiB", m.hwm_kib),
                );
            }
            if let (Some(before), Some(after)) = (mem_before, mem_after)
                && opened > 0
            {
                #[allow(clippy::cast_precision_loss)]
                let per = (after.rss_kib as f64 - before.rss_kib as f64) / opened as f64;
                r.num("RSS growth per connection", "rss_per_conn_kib", per, " KiB");
            }
            if let (Some(before), Some(connected)) = (mem_before, mem_connected)
                && opened > 0
            {
                #[allow(clippy::cast_precision_loss)]
                let per = (connected.rss_kib as f64 - before.rss_kib as f64) / opened as f64;
                r.num(
                    "  (measured after settle)",
                    "rss_per_conn_settled_kib",
                    per,
                    " KiB",
                );
            }
            if let (Some(a), Some(b)) = (cpu0.0, cpu1.0) {
                r.num(
                    "CPU during the hold",
                    "cpu_pct",
                    100.0 * (b - a) / held,
                    " %",
                );
            }
        }
    }
    r.section("client", "client");
    r.mem("RSS", "rss_kib", client_mem);
    if let (Some(a), Some(b)) = (cpu0.1, cpu1.1) {
        r.num(
            "CPU during the hold",
            "cpu_pct",
            100.0 * (b - a) / held,
            " %",
        );
    }
    r.frames(&totals);
    let failed = connected.failed > 0 || totals.ended_early > 0 || still_open < opened;
    if connected.failed > 0 {
        r.warn(failure_summary(&connected, args.connections));
    }
    if totals.ended_early > 0 || still_open < opened {
        r.warn(format!(
            "{} connection(s) ended before the run closed them",
            totals
                .ended_early
                .max((opened - still_open.min(opened)) as u64)
        ));
    }
    Ok((if failed { Verdict::Fail } else { Verdict::Pass }, r))
}

/// `fanout`: one channel, S subscribers, P publishers at R msgs/s in total (plus
/// `--slow` subscribers that stop reading).
async fn fanout(
    common: &Common,
    args: &FanoutArgs,
    target: &Target,
    server: Option<u32>,
    admin: Option<&Admin>,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    if args.subscribers == 0 || args.publishers == 0 {
        return Err("--subscribers and --publishers must be at least 1".into());
    }
    let wanted = args.subscribers + args.publishers + args.slow;
    if wanted > 1_000_000 {
        return Err("at most 1,000,000 connections".into());
    }
    check_rate(args.rate)?;
    let planned = planned_messages(args.rate, common)?;
    check_fd_limit(wanted);
    let target = Arc::new(target.clone());
    let pid = server.map(|p| p.to_string());
    let sh = Shared::new(run_id, usize::try_from(planned).unwrap_or(usize::MAX));
    let channel = format!("load-{run_id}-fanout");
    let subscriber = Role {
        sends: false,
        deliveries: true,
        record_ids: false,
    };
    let publisher = Role {
        sends: true,
        deliveries: false,
        record_ids: false,
    };
    let slow_specs = (0..args.slow).map(|i| ConnSpec {
        slow: Some(args.slow_mode),
        rcvbuf: args.slow_rcvbuf,
        ..ConnSpec::new(username(run_id, 'z', i), channel.clone(), 0, IDLE)
    });
    let specs = (0..args.subscribers)
        .map(|i| (username(run_id, 's', i), subscriber))
        .chain((0..args.publishers).map(|i| (username(run_id, 'p', i), publisher)))
        .map(|(username, role)| ConnSpec::new(username, channel.clone(), 0, role))
        .chain(slow_specs)
        .enumerate()
        .map(|(i, mut spec)| {
            if args.forwarded_for {
                spec.forwarded_for = Some(client_address(0, i));
            }
            spec
        })
        .collect();
    let slow_closed_before = match admin {
        Some(admin) if args.slow > 0 => Some(scrape_too_slow(admin).await?),
        _ => None,
    };
    let mem_before = pid.as_deref().and_then(read_mem);
    if args.slow > 0 {
        eprintln!(
            "fanout: opening {} subscribers, {} publisher(s) and {} slow reader(s) on {channel}",
            args.subscribers, args.publishers, args.slow
        );
    } else {
        eprintln!(
            "fanout: opening {} subscribers and {} publisher(s) on {channel}",
            args.subscribers, args.publishers
        );
    }
    let mut connected = connect_every(&sh, &target, specs, common, wanted).await?;
    let mem_connected = pid.as_deref().and_then(read_mem);
    let stop_garbage = CancellationToken::new();
    let flooders: Vec<_> = (0..args.garbage)
        .map(|i| {
            let mut spec = ConnSpec::new(username(run_id, 'g', i), channel.clone(), 0, IDLE);
            if args.forwarded_for {
                spec.forwarded_for = Some(client_address(1, i));
            }
            tokio::spawn(garbage_loop(
                target.clone(),
                spec,
                ConnectOpts::from(common),
                stop_garbage.clone(),
            ))
        })
        .collect();
    let mut sinks = Vec::new();
    let mut outlets = Vec::new();
    let mut readers = Vec::new();
    let mut slow_readers = Vec::new();
    for conn in std::mem::take(&mut connected.conns) {
        match conn.sink {
            None => slow_readers.push(conn.reader),
            Some(sink) if conn.role.sends => {
                readers.push(conn.reader);
                outlets.push(Outlet { sink, alive: true });
            }
            Some(sink) => {
                readers.push(conn.reader);
                sinks.push(sink);
            }
        }
    }
    let expected = u32::try_from(args.subscribers).unwrap_or(u32::MAX);
    let sending = run_sending(
        &sh,
        common,
        &args.pacing,
        outlets,
        planned,
        expected,
        server,
    )
    .await;
    let client_mem = read_mem("self");
    stop_garbage.cancel();
    let mut garbage = GarbageStats::default();
    for flooder in flooders {
        if let Ok(stats) = flooder.await {
            garbage.add(&stats);
        }
    }
    let settle = (sending.settle_secs, sending.settled);
    let slow = if args.slow > 0 {
        Some(drain_slow(&sh, slow_readers, admin, args.subscribers + args.publishers).await)
    } else {
        None
    };
    sinks.extend(sending.outlets.into_iter().map(|o| o.sink));
    let stats = close_all(&sh, &mut sinks, readers).await;
    drop(sinks);
    let mem_closed = if pid.is_some() && args.slow > 0 {
        sleep(Duration::from_secs(2)).await;
        pid.as_deref().and_then(read_mem)
    } else {
        None
    };
    let totals = Totals::of(&stats);
    let acc = account(&sh, expected);

    let mut r = Report::new("fanout", run_id, &target);
    r.section("setup", "setup");
    r.text("channel", "channel", &channel);
    r.int("subscribers", "subscribers", args.subscribers as u64);
    r.int("publishers", "publishers", args.publishers as u64);
    if args.slow > 0 {
        r.int("slow readers", "slow", args.slow as u64);
        r.text("slow readers read", "slow_mode", args.slow_mode.name());
        if args.slow_rcvbuf > 0 {
            r.int(
                "slow readers' SO_RCVBUF",
                "slow_rcvbuf",
                u64::from(args.slow_rcvbuf),
            );
        }
    }
    r.num("rate", "rate", args.rate, " msgs/s");
    r.num("warmup", "warmup_secs", common.warmup, " s");
    r.num("measured window", "window_secs", common.duration, " s");
    r.int(
        "payload padding",
        "payload_bytes",
        args.pacing.payload as u64,
    );
    r.connect(&connected, wanted, wanted);
    let verdict = traffic_report(
        &mut r,
        common,
        &sending.stats,
        sending.planned,
        &totals,
        &acc,
        u64::from(expected),
        settle,
        &sh,
    );
    if let Some(slow) = &slow {
        slow.report(&mut r, slow_closed_before);
    }
    if args.garbage > 0 {
        garbage.report(&mut r, args.garbage);
    }
    server_report(
        &mut r,
        pid.is_some(),
        [mem_before, mem_connected, sending.server_mem_in_window],
        mem_closed,
        sending.server_cpu,
        sending.client_cpu,
        client_mem,
    );
    r.frames(&totals);
    Ok((verdict, r))
}

/// What the hostile clients of `fanout --garbage` did and what the server did to them.
#[derive(Debug, Default)]
struct GarbageStats {
    connections: u64,
    refused_connects: u64,
    frames_sent: u64,
    error_frames: u64,
    closed_by_server: u64,
}

impl GarbageStats {
    fn add(&mut self, other: &Self) {
        self.connections += other.connections;
        self.refused_connects += other.refused_connects;
        self.frames_sent += other.frames_sent;
        self.error_frames += other.error_frames;
        self.closed_by_server += other.closed_by_server;
    }

    fn report(&self, r: &mut Report, clients: usize) {
        r.section("hostile clients (garbage frames)", "garbage");
        r.int("clients", "clients", clients as u64);
        r.int("connections opened", "connections", self.connections);
        r.int(
            "connects refused",
            "refused_connects",
            self.refused_connects,
        );
        r.int("garbage frames sent", "frames_sent", self.frames_sent);
        r.int("error frames received", "error_frames", self.error_frames);
        r.int(
            "closed by the server",
            "closed_by_server",
            self.closed_by_server,
        );
    }
}

/// A hostile client (`fanout --garbage`): sends text frames that are not JSON as fast as
/// the socket takes them, reads and counts the server's answers, and connects again
/// (after 100 ms) whenever the server closes it or refuses the connection, until `stop`.
async fn garbage_loop(
    target: Arc<Target>,
    spec: ConnSpec,
    opts: ConnectOpts,
    stop: CancellationToken,
) -> GarbageStats {
    let mut stats = GarbageStats::default();
    while !stop.is_cancelled() {
        let ws = tokio::select! {
            () = stop.cancelled() => break,
            ws = connect_once(&target, &spec, &opts) => ws,
        };
        let Ok(ws) = ws else {
            stats.refused_connects += 1;
            tokio::select! {
                () = stop.cancelled() => break,
                () = sleep(Duration::from_millis(100)) => continue,
            }
        };
        stats.connections += 1;
        let (mut sink, mut stream) = ws.split();
        let closed = loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break false,
                next = stream.next() => match next {
                    Some(Ok(Message::Text(text))) => {
                        if text.contains("\"error\"") {
                            stats.error_frames += 1;
                        }
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break true,
                    Some(Ok(_)) => {}
                },
                sent = sink.send(Message::Text("not json {{{".into())) => match sent {
                    Ok(()) => stats.frames_sent += 1,
                    Err(_) => break true,
                },
            }
        };
        if closed {
            stats.closed_by_server += 1;
            tokio::select! {
                () = stop.cancelled() => {}
                () = sleep(Duration::from_millis(100)) => {}
            }
        } else {
            let _ = timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
        }
    }
    stats
}

/// `chatgate_connections_closed_total{reason="too_slow"}` now.
async fn scrape_too_slow(admin: &Admin) -> Result<u64, String> {
    let metrics = admin.scrape().await?;
    metrics
        .count(TOO_SLOW.0, TOO_SLOW.1)
        .ok_or_else(|| format!("{}: no {} sample in /metrics", admin.authority, TOO_SLOW.0))
}

/// What became of the slow readers.
struct SlowOutcome {
    readers: usize,
    /// Read a close frame with 1013 from the server.
    closed_1013: u64,
    /// Read a close frame with another code.
    closed_other: BTreeMap<u16, u64>,
    /// The socket ended (EOF or reset) with no close frame before it: the server closed
    /// it but could not write the close frame into the full socket.
    ended_no_frame: u64,
    /// Still open once drained: the server never closed it.
    still_open: u64,
    frames: u64,
    /// The server's `chatgate_connections` after the sending, minus the healthy ones. A
    /// session closed as too slow still counts until its close frame is written (which
    /// waits for the reader to make room) or the write times out.
    open_on_server: Option<i64>,
    /// `chatgate_connections_closed_total{reason="too_slow"}` after the drain.
    closed_too_slow_after: Option<u64>,
    scrape_error: Option<String>,
}

/// Scrapes the server's view, tells the slow readers to drain, and collects them.
async fn drain_slow(
    sh: &Shared,
    readers: Vec<JoinHandle<ReaderStats>>,
    admin: Option<&Admin>,
    healthy: usize,
) -> SlowOutcome {
    let mut out = SlowOutcome {
        readers: readers.len(),
        closed_1013: 0,
        closed_other: BTreeMap::new(),
        ended_no_frame: 0,
        still_open: 0,
        frames: 0,
        open_on_server: None,
        closed_too_slow_after: None,
        scrape_error: None,
    };
    if let Some(admin) = admin {
        match admin.scrape().await {
            Ok(m) => {
                out.open_on_server = m
                    .count("chatgate_connections", None)
                    .map(|n| i64::try_from(n).unwrap_or(i64::MAX) - healthy as i64);
            }
            Err(e) => out.scrape_error = Some(e),
        }
    }
    eprintln!("  draining {} slow reader(s)", readers.len());
    sh.drain.cancel();
    for reader in readers {
        match reader.await {
            Ok(s) => {
                out.frames += s.frames;
                match (s.close_code, &s.ended) {
                    (Some(1013), _) => out.closed_1013 += 1,
                    (Some(code), _) => *out.closed_other.entry(code).or_default() += 1,
                    (None, Some(_)) => out.ended_no_frame += 1,
                    (None, None) => out.still_open += 1,
                }
            }
            Err(e) => eprintln!("warning: a slow reader task failed: {e}"),
        }
    }
    if let Some(admin) = admin {
        match scrape_too_slow(admin).await {
            Ok(n) => out.closed_too_slow_after = Some(n),
            Err(e) => {
                out.scrape_error.get_or_insert(e);
            }
        }
    }
    out
}

impl SlowOutcome {
    fn report(&self, r: &mut Report, too_slow_before: Option<u64>) {
        r.section("slow readers", "slow");
        r.int("connected", "connected", self.readers as u64);
        if let Some(open) = self.open_on_server {
            r.put(
                "open on the server after sending",
                "open_after_sending",
                json!(open),
                format!("{open} (chatgate_connections minus the healthy)"),
            );
        }
        if let (Some(before), Some(after)) = (too_slow_before, self.closed_too_slow_after) {
            r.int(
                "closed as too slow (server metric)",
                "closed_too_slow_metric",
                after.saturating_sub(before),
            );
        }
        let closed =
            self.closed_1013 + self.ended_no_frame + self.closed_other.values().sum::<u64>();
        r.int("closed by the server", "closed", closed);
        r.int("  close frame 1013 read", "closed_1013", self.closed_1013);
        r.int(
            "  socket ended, no close frame",
            "ended_without_close_frame",
            self.ended_no_frame,
        );
        if !self.closed_other.is_empty() {
            let other = self
                .closed_other
                .iter()
                .map(|(code, n)| (code.to_string(), *n))
                .collect();
            r.counts("  other close codes", "closed_other", &other);
        }
        r.int("still open at the end", "still_open", self.still_open);
        r.int("frames the slow readers read", "frames", self.frames);
        if let Some(e) = &self.scrape_error {
            r.warn(format!("could not read the server's metrics: {e}"));
        }
    }
}

/// `send`: C channels x K clients, all sending; acks, deliveries and the history check.
async fn send(
    common: &Common,
    args: &SendArgs,
    target: &Target,
    server: Option<u32>,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    if args.channels == 0 || args.clients == 0 {
        return Err("--channels and --clients must be at least 1".into());
    }
    let wanted = args
        .channels
        .checked_mul(args.clients)
        .filter(|&n| n <= 1_000_000)
        .ok_or("at most 1,000,000 connections (--channels x --clients)")?;
    if !(1..=100_000).contains(&args.history_limit) {
        return Err("--history-limit must be between 1 and 100000".into());
    }
    check_rate(args.rate)?;
    let planned = planned_messages(args.rate, common)?;
    check_fd_limit(wanted);
    let target = Arc::new(target.clone());
    let pid = server.map(|p| p.to_string());
    let sh = Shared::new(run_id, usize::try_from(planned).unwrap_or(usize::MAX));
    let channels: Vec<String> = (0..args.channels)
        .map(|j| format!("load-{run_id}-send-{j}"))
        .collect();
    let member = Role {
        sends: true,
        deliveries: true,
        record_ids: !args.no_verify,
    };
    let specs = (0..wanted)
        .map(|i| {
            ConnSpec::new(
                username(run_id, 'c', i),
                channels[i / args.clients].clone(),
                i / args.clients,
                member,
            )
        })
        .collect();
    let mem_before = pid.as_deref().and_then(read_mem);
    eprintln!(
        "send: opening {} channels x {} clients",
        args.channels, args.clients
    );
    let mut connected = connect_every(&sh, &target, specs, common, wanted).await?;
    let mem_connected = pid.as_deref().and_then(read_mem);
    let expected = u32::try_from(args.clients - 1).unwrap_or(u32::MAX);
    let (sending, stats, client_mem) = send_and_close(
        &sh,
        common,
        &args.pacing,
        std::mem::take(&mut connected.conns),
        planned,
        expected,
        server,
    )
    .await;
    let settle = (sending.settle_secs, sending.settled);
    let totals = Totals::of(&stats);
    let acc = account(&sh, expected);
    let history = if args.no_verify {
        None
    } else {
        let mut acked: Vec<Vec<u128>> = vec![Vec::new(); args.channels];
        for s in stats {
            if let Some(list) = acked.get_mut(s.channel) {
                list.extend(s.acked_ids);
            }
        }
        eprintln!("  checking the history of {} channel(s)", channels.len());
        Some(check_history(&target, &sh, &channels, &acked, args.history_limit).await)
    };

    let mut r = Report::new("send", run_id, &target);
    r.section("setup", "setup");
    r.int("channels", "channels", args.channels as u64);
    r.int(
        "clients per channel",
        "clients_per_channel",
        args.clients as u64,
    );
    r.num("rate", "rate", args.rate, " msgs/s");
    r.num("warmup", "warmup_secs", common.warmup, " s");
    r.num("measured window", "window_secs", common.duration, " s");
    r.int(
        "payload padding",
        "payload_bytes",
        args.pacing.payload as u64,
    );
    r.connect(&connected, wanted, wanted);
    let mut verdict = traffic_report(
        &mut r,
        common,
        &sending.stats,
        sending.planned,
        &totals,
        &acc,
        u64::from(expected),
        settle,
        &sh,
    );
    if let Some(h) = &history {
        r.section("history check", "history");
        r.int("channels", "channels", h.channels as u64);
        r.int(
            "history limit per channel",
            "limit",
            args.history_limit as u64,
        );
        r.int("acknowledged ids", "acked", h.acked);
        r.int("acknowledged ids checked", "checked", h.checked);
        r.int("found exactly", "found", h.found);
        r.int("missing", "missing", h.missing);
        r.int("duplicated entries", "duplicates", h.duplicates);
        r.int("stored but never acked", "stored_unacked", h.stored_unacked);
        r.int("entries not from this run", "unexpected", h.unexpected);
        r.int("fetch errors", "fetch_errors", h.fetch_errors.len() as u64);
        for e in h.fetch_errors.iter().take(5) {
            r.warn(format!("history fetch failed: {e}"));
        }
        if !h.over_cap.is_empty() {
            let most = h.over_cap.iter().map(|(_, n)| *n).max().unwrap_or(0);
            r.warn(format!(
                "{} channel(s) got more than {} acknowledged messages (up to {most}); the \
                 history keeps only the newest {}, so only those were checked",
                h.over_cap.len(),
                args.history_limit,
                args.history_limit
            ));
        }
        if h.missing > 0 || h.duplicates > 0 || !h.fetch_errors.is_empty() {
            verdict = Verdict::Fail;
        }
    }
    server_report(
        &mut r,
        pid.is_some(),
        [mem_before, mem_connected, sending.server_mem_in_window],
        None,
        sending.server_cpu,
        sending.client_cpu,
        client_mem,
    );
    r.frames(&totals);
    Ok((verdict, r))
}

/// The sending, ack, delivery and latency sections; returns the verdict on loss.
#[allow(clippy::too_many_arguments)]
fn traffic_report(
    r: &mut Report,
    common: &Common,
    pacer: &PacerStats,
    planned: u64,
    totals: &Totals,
    acc: &Accounting,
    expected_per_message: u64,
    (settle_secs, settled): (f64, bool),
    sh: &Shared,
) -> Verdict {
    let window = common.duration;
    #[allow(clippy::cast_precision_loss)]
    let per_sec = |n: u64| n as f64 / window;
    let errors = totals.error_count();
    let unanswered = acc.unacked.saturating_sub(errors);

    r.section("sending", "sending");
    r.int("planned", "planned", planned);
    r.int("sent", "sent", pacer.sent);
    r.int("sent in the window", "sent_in_window", pacer.sent_in_window);
    r.num(
        "send rate in the window",
        "send_rate",
        per_sec(pacer.sent_in_window),
        " msgs/s",
    );
    r.int("not sent (behind schedule)", "skipped", pacer.skipped);
    r.int("send errors", "send_errors", pacer.send_errors);
    if let Some(e) = &pacer.first_error {
        r.text("first send error", "first_send_error", e);
    }
    r.int("acknowledged (echo)", "acked", acc.acked);
    r.int("unacknowledged", "unacked", acc.unacked);
    r.int("error frames", "error_frames", errors);
    r.int("neither ack nor error", "unanswered", unanswered);
    r.num("wait after the last send", "settle_secs", settle_secs, " s");
    r.put(
        "everything arrived",
        "settled",
        json!(settled),
        if settled { "yes" } else { "no" },
    );

    r.section("deliveries", "deliveries");
    r.int(
        "expected per message",
        "expected_per_message",
        expected_per_message,
    );
    r.int(
        "received in the window",
        "in_window",
        totals.deliveries_in_window,
    );
    r.num(
        "deliveries/s (window)",
        "per_sec",
        per_sec(totals.deliveries_in_window),
        "/s",
    );
    r.int(
        "expected (sent in window x members)",
        "expected_in_window",
        pacer.sent_in_window * expected_per_message,
    );
    r.int("received in total", "total", totals.deliveries);
    r.int(
        "expected in total (acked x members)",
        "expected_total",
        acc.acked * expected_per_message,
    );
    r.int("lost deliveries", "lost", acc.lost_deliveries);
    r.int(
        "messages with a loss",
        "messages_with_loss",
        acc.messages_with_loss,
    );
    r.int(
        "duplicate deliveries",
        "duplicates",
        acc.duplicate_deliveries,
    );
    r.int(
        "delivered but never acked",
        "delivered_unacked",
        acc.delivered_unacked,
    );

    r.latency(
        "delivery latency (sent in the window)",
        "delivery_latency",
        &sh.delivery_latency.merged(),
    );
    r.latency(
        "ack latency (sent in the window)",
        "ack_latency",
        &sh.ack_latency.merged(),
    );
    if acc.lost_deliveries > 0 {
        r.warn(format!(
            "LOSS: {} deliveries missing over {} message(s)",
            acc.lost_deliveries, acc.messages_with_loss
        ));
    }
    if unanswered > 0 {
        r.warn(format!(
            "LOSS: {unanswered} sent message(s) got neither an ack nor an error frame"
        ));
    }
    if pacer.skipped > 0 {
        r.warn(format!(
            "{} planned message(s) were not sent: the client fell behind the schedule",
            pacer.skipped
        ));
    }
    if acc.lost_deliveries > 0 || unanswered > 0 {
        Verdict::Fail
    } else {
        Verdict::Pass
    }
}

/// Server memory and CPU, and the client's own figures.
#[allow(clippy::too_many_arguments)]
fn server_report(
    r: &mut Report,
    measured: bool,
    [before, connected, in_window]: [Option<Mem>; 3],
    closed: Option<Mem>,
    server_cpu: Option<f64>,
    client_cpu: Option<f64>,
    client_mem: Option<Mem>,
) {
    r.section("server", "server");
    if measured {
        r.mem("RSS before connecting", "rss_before_kib", before);
        r.mem("RSS connected", "rss_connected_kib", connected);
        r.mem("RSS at the end of the window", "rss_after_kib", in_window);
        r.mem("RSS 2 s after closing", "rss_closed_kib", closed);
        if let Some(m) = in_window {
            r.put(
                "peak RSS (VmHWM)",
                "hwm_kib",
                json!(m.hwm_kib),
                format!("{} KiB", m.hwm_kib),
            );
        }
        if let Some(cpu) = server_cpu {
            r.num("CPU in the window", "cpu_pct", cpu * 100.0, " %");
        }
    } else {
        r.text(
            "memory and CPU",
            "memory",
            "not measured (give --server-pid or --server-pid-file)",
        );
    }
    r.section("client", "client");
    r.mem("RSS", "rss_kib", client_mem);
    if let Some(cpu) = client_cpu {
        r.num("CPU in the window", "cpu_pct", cpu * 100.0, " %");
    }
}

// ---------------------------------------------------------------------------------------
// Soak: connection churn and the server's resources
// ---------------------------------------------------------------------------------------

/// Settings every churn worker shares.
struct ChurnCfg {
    run_id: String,
    target: Arc<Target>,
    channels: Vec<String>,
    opts: ConnectOpts,
    messages: u32,
    echo_timeout: Duration,
    /// Fraction (0..=1) of cycles that end without a close handshake.
    abrupt: f64,
    max_errors: u64,
    /// Next cycle id: usernames and client ids are unique over the run.
    next_id: AtomicU64,
}

/// Counters of one churn phase (the warm-up, or the measured churn).
#[derive(Default)]
struct ChurnCounters {
    /// Cycles started (bounds the phase to its cycle count).
    claimed: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    abrupt: AtomicU64,
    retries: AtomicU64,
    stop: AtomicBool,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl ChurnCounters {
    fn done(&self) -> u64 {
        self.ok.load(Relaxed) + self.failed.load(Relaxed)
    }

    fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Latencies the churn workers measured, in microseconds.
struct ChurnTimes {
    connect: Histogram,
    echo: Histogram,
    cycle: Histogram,
}

impl ChurnTimes {
    fn new() -> Self {
        Self {
            connect: Histogram::new(),
            echo: Histogram::new(),
            cycle: Histogram::new(),
        }
    }

    fn merge(&mut self, o: &ChurnTimes) {
        self.connect.merge(&o.connect);
        self.echo.merge(&o.echo);
        self.cycle.merge(&o.cycle);
    }
}

/// Seconds one send, flush or close step of a cycle may take.
const CYCLE_IO_TIMEOUT: Duration = Duration::from_secs(5);

fn elapsed_us(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// One cycle: connect, send `messages` messages, wait for every echo, close.
async fn churn_cycle(
    cfg: &ChurnCfg,
    ctr: &ChurnCounters,
    times: &mut ChurnTimes,
) -> Result<(), String> {
    let id = cfg.next_id.fetch_add(1, Relaxed);
    let channel_idx = usize::try_from(id % cfg.channels.len() as u64).unwrap_or(0);
    // At most 16 + 2 + 16 characters; usernames allow 32, so the id is kept short.
    let spec = ConnSpec::new(
        format!("{}-s{:x}", cfg.run_id, id & 0xffff_ffff_ffff),
        cfg.channels[channel_idx].clone(),
        channel_idx,
        IDLE,
    );
    let began = Instant::now();
    let (mut ws, connect_us) = connect_retrying(&cfg.target, &spec, &cfg.opts, &ctr.retries, None)
        .await
        .map_err(|e| format!("connect: {}", e.message()))?;
    times.connect.record(connect_us);

    let prefix = format!("{}-{id:x}-", cfg.run_id);
    let sent_at = Instant::now();
    let t = now_us();
    for k in 0..cfg.messages {
        let frame = format!(
            r#"{{"type":"message","content":"t={t};n={k}","message_type":"text","client_id":"{prefix}{k}"}}"#
        );
        timeout(CYCLE_IO_TIMEOUT, ws.feed(Message::text(frame)))
            .await
            .map_err(|_| "send timed out".to_string())?
            .map_err(|e| format!("send failed: {e}"))?;
    }
    timeout(CYCLE_IO_TIMEOUT, ws.flush())
        .await
        .map_err(|_| "send timed out".to_string())?
        .map_err(|e| format!("send failed: {e}"))?;
    ctr.sent.fetch_add(u64::from(cfg.messages), Relaxed);

    // One bit per message still waiting for its echo.
    let mut missing: u64 = if cfg.messages >= 64 {
        u64::MAX
    } else {
        (1u64 << cfg.messages) - 1
    };
    let deadline = Instant::now() + cfg.echo_timeout;
    while missing != 0 {
        let Ok(next) = tokio::time::timeout_at(deadline, ws.next()).await else {
            return Err(format!(
                "echo timeout: {} of {} echoes missing after {:.1} s",
                missing.count_ones(),
                cfg.messages,
                cfg.echo_timeout.as_secs_f64()
            ));
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                let text = text.as_str();
                if text.starts_with(MESSAGE_TYPE) && is_echo(text) {
                    let k = str_field(text, CLIENT_ID_FIELD)
                        .and_then(|c| c.strip_prefix(prefix.as_str()))
                        .and_then(|k| k.parse::<u32>().ok())
                        .filter(|&k| k < cfg.messages);
                    if let Some(k) = k
                        && missing & (1u64 << k) != 0
                    {
                        missing &= !(1u64 << k);
                        ctr.acked.fetch_add(1, Relaxed);
                        times.echo.record(elapsed_us(sent_at));
                    }
                } else if text.starts_with(ERROR_TYPE) {
                    return Err(format!("error frame: {}", error_code(text)));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(match frame {
                    Some(f) => format!("closed by server: {} {}", u16::from(f.code), f.reason),
                    None => "closed by server".into(),
                });
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read failed: {e}")),
            None => return Err("connection ended before the echoes".into()),
        }
    }

    if cfg.abrupt > 0.0 && fastrand::f64() < cfg.abrupt {
        // The TCP connection ends with no close frame.
        ctr.abrupt.fetch_add(1, Relaxed);
        drop(ws);
    } else {
        timeout(CYCLE_IO_TIMEOUT, ws.close(None))
            .await
            .map_err(|_| "close timed out".to_string())?
            .map_err(|e| format!("close failed: {e}"))?;
        // The server's reply ends the stream.
        let rest = async { while let Some(Ok(_)) = ws.next().await {} };
        timeout(CYCLE_IO_TIMEOUT, rest)
            .await
            .map_err(|_| "close handshake timed out".to_string())?;
    }
    times.cycle.record(elapsed_us(began));
    Ok(())
}

const MESSAGE_TYPE: &str = "{\"type\":\"message\"";
const ERROR_TYPE: &str = "{\"type\":\"error\"";
const CLIENT_ID_FIELD: &str = "\"client_id\":\"";

/// The `code` of an error frame.
fn error_code(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("code").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "(no code)".into())
}

/// One worker: cycles until the phase's cycles are all claimed, its deadline passes, or
/// too many cycles failed.
async fn churn_worker(
    cfg: Arc<ChurnCfg>,
    ctr: Arc<ChurnCounters>,
    limit: Option<u64>,
    deadline: Option<Instant>,
) -> ChurnTimes {
    let mut times = ChurnTimes::new();
    loop {
        if ctr.stop.load(Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(limit) = limit
            && ctr.claimed.fetch_add(1, Relaxed) >= limit
        {
            break;
        }
        match churn_cycle(&cfg, &ctr, &mut times).await {
            Ok(()) => {
                ctr.ok.fetch_add(1, Relaxed);
            }
            Err(e) => {
                let failed = ctr.failed.fetch_add(1, Relaxed) + 1;
                *ctr.errors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(e)
                    .or_default() += 1;
                if failed >= cfg.max_errors {
                    ctr.stop.store(true, Relaxed);
                }
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
    times
}

/// Runs `workers` churn workers to the end of the phase; returns their latencies and the
/// phase's length.
async fn churn(
    cfg: &Arc<ChurnCfg>,
    ctr: &Arc<ChurnCounters>,
    workers: usize,
    limit: Option<u64>,
    deadline: Option<Instant>,
) -> (ChurnTimes, Duration) {
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..workers {
        set.spawn(churn_worker(cfg.clone(), ctr.clone(), limit, deadline));
    }
    let mut times = ChurnTimes::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(t) => times.merge(&t),
            Err(e) => eprintln!("warning: a churn worker failed: {e}"),
        }
    }
    (times, start.elapsed())
}

/// The server's figures at one moment.
#[derive(Debug, Clone, Default)]
struct Figures {
    rss_kib: Option<u64>,
    fds: Option<u64>,
    /// `chatgate_connections`.
    conns: Option<u64>,
    /// `chatgate_runtime_tasks`.
    tasks: Option<u64>,
    scrape_error: Option<String>,
}

impl Figures {
    async fn take(pid: Option<&str>, admin: Option<&Admin>) -> Self {
        let mut f = Figures {
            rss_kib: pid.and_then(read_mem).map(|m| m.rss_kib),
            fds: pid.and_then(count_fds),
            ..Figures::default()
        };
        if let Some(admin) = admin {
            match admin.scrape().await {
                Ok(m) => {
                    f.conns = m.count("chatgate_connections", None);
                    f.tasks = m.count("chatgate_runtime_tasks", None);
                    if f.conns.is_none() || f.tasks.is_none() {
                        f.scrape_error = Some(
                            "/metrics has no chatgate_connections or chatgate_runtime_tasks".into(),
                        );
                    }
                }
                Err(e) => f.scrape_error = Some(e),
            }
        }
        f
    }
}

/// The most each figure may reach at the end: baseline x (1 + tolerance) (+ slack).
#[derive(Debug, Clone, Copy)]
struct Limits {
    tolerance: f64,
    slack: u64,
}

impl Limits {
    fn limit(self, baseline: u64, slack: u64) -> u64 {
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let scaled = (baseline as f64 * (1.0 + self.tolerance / 100.0)).floor() as u64;
        scaled + slack
    }

    /// (name, unit, baseline, final, limit) of each figure the baseline has.
    fn checks(self, base: &Figures, end: &Figures) -> Vec<Check> {
        let mut out = Vec::new();
        let mut add = |name: &'static str,
                       key: &'static str,
                       unit: &'static str,
                       b: Option<u64>,
                       e: Option<u64>,
                       slack: u64| {
            if let Some(b) = b {
                out.push(Check {
                    name,
                    key,
                    unit,
                    baseline: b,
                    end: e,
                    limit: self.limit(b, slack),
                });
            }
        };
        add("RSS", "rss_kib", " KiB", base.rss_kib, end.rss_kib, 0);
        add("open fds", "fds", "", base.fds, end.fds, self.slack);
        add(
            "runtime tasks",
            "tasks",
            "",
            base.tasks,
            end.tasks,
            self.slack,
        );
        out
    }

    fn met(self, base: &Figures, end: &Figures) -> bool {
        self.checks(base, end).iter().all(Check::ok)
    }
}

/// One figure compared with its baseline.
struct Check {
    name: &'static str,
    key: &'static str,
    unit: &'static str,
    baseline: u64,
    end: Option<u64>,
    limit: u64,
}

impl Check {
    fn ok(&self) -> bool {
        self.end.is_some_and(|e| e <= self.limit)
    }

    /// Growth over the baseline, in percent.
    fn growth(&self) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)]
        self.end
            .map(|e| (e as f64 - self.baseline as f64) * 100.0 / (self.baseline as f64).max(1.0))
    }
}

/// Polls the server until it counts exactly `standing` connections (when the admin
/// listener is known) and `done` holds, or until `limit`. Returns the last figures, the
/// seconds waited and whether it settled.
async fn settle_server(
    pid: Option<&str>,
    admin: Option<&Admin>,
    standing: u64,
    limit: Duration,
    done: impl Fn(&Figures) -> bool,
) -> (Figures, f64, bool) {
    let start = Instant::now();
    loop {
        let f = Figures::take(pid, admin).await;
        let conns_ok = admin.is_none() || f.conns == Some(standing);
        if conns_ok && done(&f) {
            return (f, start.elapsed().as_secs_f64(), true);
        }
        if start.elapsed() >= limit {
            return (f, start.elapsed().as_secs_f64(), false);
        }
        sleep(Duration::from_millis(250)).await;
    }
}

/// One row of the samples table.
#[derive(Debug, Clone)]
struct Sample {
    label: String,
    cycles: u64,
    /// Cycles per second since the previous row.
    rate: Option<f64>,
    errors: u64,
    f: Figures,
}

impl Sample {
    const HEADER: &'static str =
        "  time         cycles   cycles/s     RSS KiB     fds   conns   tasks  errors";

    fn row(&self) -> String {
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        format!(
            "  {:<10} {:>8} {:>10} {:>11} {:>7} {:>7} {:>7} {:>7}",
            self.label,
            self.cycles,
            self.rate
                .map_or_else(|| "-".to_string(), |r| format!("{r:.1}")),
            opt(self.f.rss_kib),
            opt(self.f.fds),
            opt(self.f.conns),
            opt(self.f.tasks),
            self.errors,
        )
    }

    fn json(&self) -> Value {
        json!({
            "at": self.label,
            "cycles": self.cycles,
            "cycles_per_sec": self.rate.map(|r| (r * 10.0).round() / 10.0),
            "rss_kib": self.f.rss_kib,
            "fds": self.f.fds,
            "connections": self.f.conns,
            "tasks": self.f.tasks,
            "errors": self.errors,
        })
    }
}

/// Samples the server every `every` until `stop`, printing each row as it is taken.
async fn sample_loop(
    pid: Option<String>,
    admin: Option<Admin>,
    ctr: Arc<ChurnCounters>,
    every: Duration,
    stop: CancellationToken,
) -> Vec<Sample> {
    let start = Instant::now();
    let mut ticker = tokio::time::interval_at(start + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut rows = Vec::new();
    let mut last = (start, 0u64);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let f = Figures::take(pid.as_deref(), admin.as_ref()).await;
        let now = Instant::now();
        let cycles = ctr.done();
        #[allow(clippy::cast_precision_loss)]
        let rate = (cycles - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-9);
        last = (now, cycles);
        let row = Sample {
            label: format!("{:.0} s", (now - start).as_secs_f64()),
            cycles,
            rate: Some(rate),
            errors: ctr.failed.load(Relaxed),
            f,
        };
        eprintln!("{}", row.row());
        rows.push(row);
    }
    rows
}

/// `soak`: standing connections, then connection churn; the server's RSS, fds and tasks
/// must come back to the baseline.
async fn soak(
    common: &Common,
    args: &SoakArgs,
    target: &Target,
    server: Option<u32>,
    admin: Option<&Admin>,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    if !(1..=10_000).contains(&args.workers) {
        return Err("--workers must be between 1 and 10000".into());
    }
    if args.channels == 0 || args.channels > 100_000 {
        return Err("--channels must be between 1 and 100000".into());
    }
    if !(1..=64).contains(&args.messages) {
        return Err("--messages must be between 1 and 64".into());
    }
    if args.cycles == Some(0) {
        return Err("--cycles must be at least 1".into());
    }
    if args.idle > 1_000_000 {
        return Err("--idle must be at most 1,000,000".into());
    }
    check_secs("--sample-every", args.sample_every, false)?;
    check_secs("--settle-timeout", args.settle_timeout, false)?;
    check_secs("--echo-timeout", args.echo_timeout, false)?;
    if !(args.tolerance.is_finite() && (0.0..=1000.0).contains(&args.tolerance)) {
        return Err("--tolerance must be between 0 and 1000 (percent)".into());
    }
    if !(args.abrupt.is_finite() && (0.0..=100.0).contains(&args.abrupt)) {
        return Err("--abrupt must be between 0 and 100 (percent)".into());
    }
    if args.max_errors == 0 {
        return Err("--max-errors must be at least 1".into());
    }
    check_fd_limit(args.idle + args.workers);
    let target = Arc::new(target.clone());
    let pid = server.map(|p| p.to_string());
    let pid = pid.as_deref();
    let sh = Shared::new(run_id, 0);
    let channels: Vec<String> = (0..args.channels)
        .map(|j| format!("load-{run_id}-soak-{j}"))
        .collect();
    let standing = args.idle as u64;
    let limits = Limits {
        tolerance: args.tolerance,
        slack: args.slack,
    };

    let before = Figures::take(pid, admin).await;
    if let Some(e) = &before.scrape_error {
        return Err(format!("--admin-url: {e}"));
    }
    if let Some(n) = before.conns
        && n > 0
    {
        eprintln!(
            "warning: the server already counts {n} connection(s) before this run; the \
             settle waits for them to be back to that count plus the standing ones"
        );
    }
    let others = before.conns.unwrap_or(0);

    // Standing connections, held for the whole run.
    let mut standing_set = None;
    if args.idle > 0 {
        eprintln!(
            "soak: opening {} standing connection(s) over {} channel(s)",
            args.idle, args.channels
        );
        let specs = idle_specs(run_id, &channels, args.idle);
        let mut connected = connect_every(&sh, &target, specs, common, args.idle).await?;
        let (sinks, readers) = split_conns(std::mem::take(&mut connected.conns));
        standing_set = Some((connected, sinks, readers));
    }

    let cfg = Arc::new(ChurnCfg {
        run_id: run_id.to_string(),
        target: target.clone(),
        channels,
        opts: ConnectOpts::from(common),
        messages: args.messages,
        echo_timeout: secs(args.echo_timeout),
        abrupt: args.abrupt / 100.0,
        max_errors: args.max_errors,
        next_id: AtomicU64::new(0),
    });
    let warmup_cycles = args.warmup_cycles.unwrap_or(args.workers as u64);
    let warm = Arc::new(ChurnCounters::default());
    if warmup_cycles > 0 {
        eprintln!(
            "  warm-up: {warmup_cycles} cycle(s) by {} worker(s)",
            args.workers
        );
        churn(&cfg, &warm, args.workers, Some(warmup_cycles), None).await;
    }
    sleep(secs(common.warmup)).await;
    let (baseline, _, ready) = settle_server(
        pid,
        admin,
        others + standing,
        secs(args.settle_timeout),
        |_| true,
    )
    .await;
    if !ready {
        let msg = format!(
            "the server counts {} connection(s), not the {} expected before the churn, \
             after waiting {:.0} s: is another client connected to it?",
            baseline.conns.map_or_else(|| "?".into(), |n| n.to_string()),
            others + standing,
            args.settle_timeout
        );
        if let Some((_, mut sinks, readers)) = standing_set {
            close_all(&sh, &mut sinks, readers).await;
        }
        return Err(msg);
    }

    // The churn, sampled.
    match args.cycles {
        Some(n) => eprintln!("  churn: {n} cycles by {} worker(s)", args.workers),
        None => eprintln!(
            "  churn: {:.0} s by {} worker(s)",
            common.duration, args.workers
        ),
    }
    eprintln!("{}", Sample::HEADER);
    let mut samples = vec![Sample {
        label: "baseline".into(),
        cycles: 0,
        rate: None,
        errors: 0,
        f: baseline.clone(),
    }];
    eprintln!("{}", samples[0].row());
    let ctr = Arc::new(ChurnCounters::default());
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_loop(
        pid.map(str::to_string),
        admin.cloned(),
        ctr.clone(),
        secs(args.sample_every),
        stop_sampling.clone(),
    ));
    let deadline = match args.cycles {
        Some(_) => None,
        None => Some(Instant::now() + secs(common.duration)),
    };
    let (times, elapsed) = churn(&cfg, &ctr, args.workers, args.cycles, deadline).await;
    stop_sampling.cancel();
    match sampler.await {
        Ok(rows) => samples.extend(rows),
        Err(e) => eprintln!("warning: the sampler failed: {e}"),
    }

    // Settle: back to the standing connections, and (waiting at most the settle time for
    // the server to release what it holds) to the baseline.
    eprintln!("  churn over; waiting for the server to settle");
    let (end, settle_secs, settled) = settle_server(
        pid,
        admin,
        others + standing,
        secs(args.settle_timeout),
        |f| limits.met(&baseline, f),
    )
    .await;
    let end_row = Sample {
        label: "settled".into(),
        cycles: ctr.done(),
        rate: None,
        errors: ctr.failed.load(Relaxed),
        f: end.clone(),
    };
    eprintln!("{}", end_row.row());
    samples.push(end_row);
    let client_mem = read_mem("self");

    // The standing connections must have lasted the whole run.
    let still_open = sh.live.load(Relaxed);
    let (standing_connected, totals) = match standing_set {
        Some((connected, mut sinks, readers)) => {
            let stats = close_all(&sh, &mut sinks, readers).await;
            drop(sinks);
            (Some(connected), Totals::of(&stats))
        }
        None => (None, Totals::default()),
    };

    let mut r = Report::new("soak", run_id, &target);
    r.section("setup", "setup");
    r.int("workers", "workers", args.workers as u64);
    r.int("channels", "channels", args.channels as u64);
    r.int(
        "messages per cycle",
        "messages_per_cycle",
        u64::from(args.messages),
    );
    r.int("standing connections", "standing", standing);
    match args.cycles {
        Some(n) => r.int("cycles wanted", "cycles_wanted", n),
        None => r.num("churn duration", "duration_secs", common.duration, " s"),
    }
    r.int(
        "warm-up cycles (before the baseline)",
        "warmup_cycles",
        warmup_cycles,
    );
    if args.abrupt > 0.0 {
        r.num(
            "cycles without close handshake",
            "abrupt_pct",
            args.abrupt,
            " %",
        );
    }
    r.num("tolerance", "tolerance_pct", args.tolerance, " %");
    r.int("slack (fds, tasks)", "slack", args.slack);
    if let Some(c) = &standing_connected {
        r.connect(c, args.idle, args.idle);
    }

    let done = ctr.done();
    let failed = ctr.failed.load(Relaxed);
    let sent = ctr.sent.load(Relaxed);
    let acked = ctr.acked.load(Relaxed);
    let errors = ctr.errors();
    let secs_taken = elapsed.as_secs_f64();
    r.section("churn", "churn");
    r.int("cycles completed", "cycles", done);
    r.int("cycles ok", "ok", ctr.ok.load(Relaxed));
    r.int("cycles failed", "failed", failed);
    r.num("seconds", "seconds", secs_taken, " s");
    #[allow(clippy::cast_precision_loss)]
    let rate = done as f64 / secs_taken.max(1e-9);
    r.num("cycles/s", "cycles_per_sec", rate, "/s");
    r.int(
        "connect retries",
        "connect_retries",
        ctr.retries.load(Relaxed),
    );
    if args.abrupt > 0.0 {
        r.int(
            "ended without close handshake",
            "abrupt",
            ctr.abrupt.load(Relaxed),
        );
    }
    r.int("messages sent", "sent", sent);
    r.int("acknowledged (echo)", "acked", acked);
    r.int("unacknowledged", "unacked", sent.saturating_sub(acked));
    r.counts("errors", "errors", &errors);
    if warmup_cycles > 0 {
        r.int(
            "warm-up cycles failed",
            "warmup_failed",
            warm.failed.load(Relaxed),
        );
    }
    #[allow(clippy::cast_precision_loss)]
    let ms = |us: u64| us as f64 / 1000.0;
    r.section("cycle latency", "cycle_latency");
    for (label, key, h) in [
        ("connect", "connect", &times.connect),
        ("echo (send to last echo)", "echo", &times.echo),
        ("whole cycle", "cycle", &times.cycle),
    ] {
        if h.count > 0 {
            r.put(
                label,
                key,
                json!({
                    "p50_ms": ms(h.quantile(0.5)),
                    "p99_ms": ms(h.quantile(0.99)),
                    "max_ms": ms(h.max),
                }),
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    ms(h.quantile(0.5)),
                    ms(h.quantile(0.99)),
                    ms(h.max)
                ),
            );
        }
    }

    r.table(
        "samples",
        "samples",
        Sample::HEADER,
        samples.iter().map(|s| (s.row(), s.json())).collect(),
    );

    let mut verdict = Verdict::Pass;
    r.section("server after the churn", "server");
    r.mem(
        "RSS before the standing connections",
        "rss_before_kib",
        before.rss_kib.map(|rss_kib| Mem {
            rss_kib,
            hwm_kib: 0,
        }),
    );
    if let Some(n) = end.conns {
        r.put(
            "connections (chatgate_connections)",
            "connections",
            json!({"expected": others + standing, "final": n}),
            format!("{n} (expected {})", others + standing),
        );
    }
    r.num(
        "waited for the server to settle",
        "settle_secs",
        settle_secs,
        " s",
    );
    r.put(
        "settled (connections and limits met)",
        "settled",
        json!(settled),
        if settled { "yes" } else { "no" },
    );
    let checks = limits.checks(&baseline, &end);
    for c in &checks {
        let shown = match (c.end, c.growth()) {
            (Some(e), Some(g)) => format!(
                "{}{u} -> {e}{u} ({g:+.1}%), limit {}{u}: {}",
                c.baseline,
                c.limit,
                if c.ok() { "ok" } else { "TOO HIGH" },
                u = c.unit
            ),
            _ => format!("{}{} at baseline, not read at the end", c.baseline, c.unit),
        };
        r.put(
            c.name,
            c.key,
            json!({"baseline": c.baseline, "final": c.end, "limit": c.limit, "ok": c.ok()}),
            shown,
        );
    }
    for c in checks.iter().filter(|c| !c.ok()) {
        verdict = Verdict::Fail;
        r.warn(match (c.end, c.growth()) {
            (Some(e), Some(g)) => format!(
                "NOT BACK TO BASELINE: {} is {e}{u} after the churn, {} at baseline \
                 ({g:+.1}%), over the limit of {}{u} ({}% tolerance{})",
                c.name,
                c.baseline,
                c.limit,
                args.tolerance,
                if c.key == "rss_kib" {
                    String::new()
                } else {
                    format!(" + {}", args.slack)
                },
                u = c.unit
            ),
            _ => format!("{} could not be read after the churn", c.name),
        });
    }
    if admin.is_some() && end.conns != Some(others + standing) {
        verdict = Verdict::Fail;
        r.warn(format!(
            "the server still counts {} connection(s) {settle_secs:.0} s after the churn, \
             expected {}",
            end.conns.map_or_else(|| "?".into(), |n| n.to_string()),
            others + standing
        ));
    }
    if let Some(e) = &end.scrape_error {
        verdict = Verdict::Fail;
        r.warn(format!("could not read the server's metrics: {e}"));
    }
    if pid.is_none() && admin.is_none() {
        r.warn(
            "resources not checked: give --server-pid (RSS, fds) and --admin-url \
             (connections, tasks)"
                .into(),
        );
    } else if pid.is_none() {
        r.warn("RSS and fds not checked: give --server-pid".into());
    } else if admin.is_none() {
        r.warn("connections and tasks not checked: give --admin-url".into());
    }
    if failed > 0 {
        verdict = Verdict::Fail;
        r.warn(format!("{failed} cycle(s) failed"));
    }
    if ctr.stop.load(Relaxed) {
        r.warn(format!(
            "the churn stopped early after {} failed cycles (--max-errors)",
            args.max_errors
        ));
    }
    if let Some(wanted) = args.cycles
        && done < wanted
    {
        verdict = Verdict::Fail;
        r.warn(format!("{done} of {wanted} cycles ran"));
    }
    if acked < sent {
        verdict = Verdict::Fail;
        r.warn(format!(
            "LOSS: {} sent message(s) never came back as an echo",
            sent - acked
        ));
    }
    let warm_failed = warm.failed.load(Relaxed);
    if warm_failed > 0 {
        verdict = Verdict::Fail;
        r.warn(format!("{warm_failed} warm-up cycle(s) failed"));
    }

    r.section("standing connections", "standing");
    r.int(
        "open at the end of the churn",
        "open_at_end",
        still_open as u64,
    );
    r.int("ended early", "ended_early", totals.ended_early);
    r.int("frames received", "frames", totals.frames);
    if !totals.ended.is_empty() {
        r.counts("early ends", "early_ends", &totals.ended);
    }
    if totals.ended_early > 0 || (still_open as u64) < standing {
        verdict = Verdict::Fail;
        r.warn(format!(
            "{} standing connection(s) ended before the run closed them",
            totals
                .ended_early
                .max(standing.saturating_sub(still_open as u64))
        ));
    }
    r.section("client", "client");
    r.mem("RSS", "rss_kib", client_mem);
    Ok((verdict, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &str = r#"{"type":"message","sender":"ab12cd-c3","content":"t=1700000000123456;n=42","channel":"load-ab12cd-send-0","message_type":"text","timestamp":"2024-01-01T12:00:00.000000Z","message_id":"0190a4e2-7b1c-7def-8a00-1234567890ab"}"#;

    #[test]
    fn stamps_are_read_from_message_frames() {
        assert_eq!(parse_stamp(FRAME), Some((1_700_000_000_123_456, 42)));
        // Another field order still parses (slow path).
        let reordered = r#"{"type":"message","content":"t=5;n=6;p=xx","sender":"a"}"#;
        assert_eq!(parse_stamp(reordered), Some((5, 6)));
        assert_eq!(
            parse_stamp(r#"{"type":"message","sender":"a","content":"hello"}"#),
            None
        );
        assert_eq!(
            parse_stamp(r#"{"type":"message","sender":"a","content":"t=1;x"}"#),
            None
        );
        assert_eq!(take_digits("12345678901234567890"), None);
        assert_eq!(take_digits("007;"), Some((7, ";")));
    }

    #[test]
    fn only_the_senders_copy_is_an_echo() {
        assert!(!is_echo(FRAME));
        let echo = format!(
            "{},\"client_id\":\"ab12cd-42\"}}",
            &FRAME[..FRAME.len() - 1]
        );
        assert!(is_echo(&echo));
        assert_eq!(
            str_field(&echo, MESSAGE_ID),
            Some("0190a4e2-7b1c-7def-8a00-1234567890ab")
        );
        assert_eq!(
            id_key("0190a4e2-7b1c-7def-8a00-1234567890ab"),
            0x0190_a4e2_7b1c_7def_8a00_1234_5678_90ab
        );
        assert_ne!(id_key("m1"), id_key("m2"));
    }

    #[test]
    fn histogram_quantiles_are_within_one_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            #[allow(clippy::cast_precision_loss)]
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.01, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 100_000);
        assert_eq!(h.max, 100_000);
        for v in [0, 1, 255, 256, 257, 1 << 20, u64::MAX] {
            let i = Histogram::index(v);
            assert!(i < BUCKETS, "{v}");
        }
        let mut small = Histogram::new();
        small.record(3);
        assert_eq!(small.quantile(0.5), 3);
    }

    #[test]
    fn base_urls_parse() {
        assert_eq!(
            parse_base("ws://127.0.0.1:18080", "ws").unwrap(),
            ("127.0.0.1:18080".into(), "127.0.0.1".into(), 18080)
        );
        assert_eq!(
            parse_base("ws://[::1]:9000/", "ws").unwrap(),
            ("[::1]:9000".into(), "::1".into(), 9000)
        );
        assert_eq!(parse_base("http://localhost", "http").unwrap().2, 80);
        assert!(parse_base("wss://127.0.0.1", "ws").is_err());
        assert!(parse_base("ws://127.0.0.1:8000/ws/chat", "ws").is_err());
        assert!(parse_base("ws://127.0.0.1:x", "ws").is_err());
    }

    #[test]
    fn metrics_are_read_from_the_exposition() {
        let m = Metrics(
            "# HELP chatgate_connections Open WebSocket sessions.\n\
             # TYPE chatgate_connections gauge\n\
             chatgate_connections 104\n\
             chatgate_connections_closed_total{reason=\"too_slow\"} 7\n\
             chatgate_connections_closed_total{reason=\"client_closed\"} 90\n\
             chatgate_runtime_tasks{replica=\"a\"} 211\n"
                .into(),
        );
        assert_eq!(m.count("chatgate_connections", None), Some(104));
        assert_eq!(m.count(TOO_SLOW.0, TOO_SLOW.1), Some(7));
        assert_eq!(m.count("chatgate_connections_closed_total", None), Some(97));
        assert_eq!(m.count("chatgate_runtime_tasks", None), Some(211));
        assert_eq!(m.count("chatgate_runtime", None), None);
    }

    #[test]
    fn soak_limits_allow_tolerance_and_slack() {
        let limits = Limits {
            tolerance: 10.0,
            slack: 8,
        };
        let base = Figures {
            rss_kib: Some(10_000),
            fds: Some(120),
            tasks: Some(200),
            ..Figures::default()
        };
        let mut end = Figures {
            rss_kib: Some(11_000),
            fds: Some(140),
            tasks: Some(228),
            ..Figures::default()
        };
        assert!(limits.met(&base, &end));
        end.rss_kib = Some(11_001);
        assert!(!limits.met(&base, &end));
        end.rss_kib = Some(9_000);
        end.tasks = Some(229);
        assert!(!limits.met(&base, &end));
        end.tasks = None;
        assert!(!limits.met(&base, &end), "a figure not read is not a pass");
        // Figures missing at baseline are not checked.
        assert_eq!(limits.checks(&Figures::default(), &end).len(), 0);
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).unwrap(), b"hello world");
        assert!(dechunk(b"5\r\nhel").is_err());
    }
}
