//! `hostile`: the largest payloads a client can send, from many addresses at once, next
//! to healthy clients in another channel (it replaces the stopgap `tests/load/hostile.py`).
//!
//! Hostile sockets share a channel of their own and loop over three frames: a
//! `typing_start` padded to just under the server's largest WebSocket message, a message
//! padded to 2 MiB, and an audio message carrying the largest valid WebM data URL; the
//! first `--media-sockets` of them send only the audio message, over and over (valid
//! media, stored and fanned out until a quota or budget refuses it). They connect again
//! at once when the server closes them (1 s after a refused connect).
//! Hostile REST clients post bodies padded to just under the largest request body. Every
//! hostile client sends its own `X-Forwarded-For` (10.1.x.y for sockets, 10.2.x.y for
//! REST), so a server that trusts 127.0.0.1 as a proxy applies its per-IP limits per
//! client. The healthy clients are `send`'s members in one channel (10.0.x.y); their
//! latency and loss are measured as in `send`. The server's RSS is sampled from /proc.
//!
//! Bars: peak RSS growth under `--max-rss-growth-mib`; every hostile connection that sent
//! something refused (an error frame, or closed by the server other than with 1000/1001:
//! another close code, or none) and closed by the server; no hostile REST body accepted; the healthy clients lose nothing and their
//! delivery p99 stays under `--max-p99-ms`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::{
    Common, ConnSpec, ConnectOpts, PacingArgs, Report, Role, Shared, Target, Totals, Verdict, Ws,
    account, check_rate, client_address, connect_every, connect_once, http_post_json,
    planned_messages, read_mem, secs, send_and_close, traffic_report, username,
};

/// The server's `ws.max_message_bytes` and `server.max_body_bytes` with the default
/// config: the longest valid data URL (10 MiB of audio, base64, behind its longest media
/// type) plus 16 KiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 13_997_424;
/// The server's default `chat.max_audio_bytes`.
pub const DEFAULT_MAX_AUDIO_BYTES: usize = 10 << 20;
/// How far under the server's limit the padded frames and bodies stay: "just under", so
/// the server has to take each one in before it can refuse it.
const UNDER_LIMIT: usize = 1024;
/// Size of the padded text message.
const TEXT_FRAME_BYTES: usize = 2 << 20;
/// The start of a WebM file (EBML magic, then the DocType `webm`), as the stopgap sent
/// it; the server's sniffing accepts it, so the audio is stored and fanned out.
const WEBM_HEADER: &[u8] = b"\x1a\x45\xdf\xa3\x42\x82\x84webm";
/// Largest message a hostile socket reads: the audio its peers get stored comes back.
const HOSTILE_MAX_MESSAGE: usize = 64 << 20;
/// Longest one hostile frame may take to send.
const HOSTILE_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a hostile connection waits, once it stops sending, for the server to close it.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pause after a refused or failed connect (as the stopgap did).
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Flags of `hostile`.
#[derive(Debug, Args)]
pub struct HostileArgs {
    /// Hostile WebSocket clients (one channel of their own), each with its own address.
    #[arg(long, default_value_t = 50, value_name = "N")]
    sockets: usize,
    /// Of the hostile sockets, how many send only the audio message (the largest valid
    /// media, stored and fanned out) instead of the three frames in turn.
    #[arg(long, default_value_t = 0, value_name = "N")]
    media_sockets: usize,
    /// Hostile REST clients, each with its own address.
    #[arg(long, default_value_t = 10, value_name = "N")]
    rest: usize,
    /// Healthy clients in another channel; every one of them sends.
    #[arg(long, default_value_t = 20, value_name = "N")]
    healthy: usize,
    /// Messages per second sent by all healthy clients together.
    #[arg(long, short = 'r', default_value_t = 20.0)]
    rate: f64,
    /// The server's largest WebSocket message and request body (ws.max_message_bytes,
    /// server.max_body_bytes): the padded frames and bodies stay 1 KiB under it.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_name = "BYTES")]
    max_message_bytes: usize,
    /// The server's largest audio clip (chat.max_audio_bytes): the size of the WebM sent.
    #[arg(long, default_value_t = DEFAULT_MAX_AUDIO_BYTES, value_name = "BYTES")]
    max_audio_bytes: usize,
    /// Bar: the server's peak RSS growth over its baseline, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    max_rss_growth_mib: u64,
    /// Bar: the healthy clients' delivery latency p99, in milliseconds.
    #[arg(long, default_value_t = 100.0, value_name = "MS")]
    max_p99_ms: f64,
    /// Milliseconds between two samples of the server's RSS.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    sample_ms: u64,
    #[command(flatten)]
    pacing: PacingArgs,
}

/// The hostile payloads, built once and shared by every client.
struct Payloads {
    typing: Utf8Bytes,
    text: Utf8Bytes,
    audio: Utf8Bytes,
    rest_body: Vec<u8>,
}

impl Payloads {
    fn new(args: &HostileArgs, run_id: &str) -> Self {
        let frame = args.max_message_bytes - UNDER_LIMIT;
        let audio = json!({
            "type": "message",
            "message_type": "audio",
            "content": webm_data_url(args.max_audio_bytes),
        });
        let sender = username(run_id, 'r', 0);
        Self {
            typing: padded(r#""type":"typing_start","content":"x""#, frame).into(),
            text: padded(r#""type":"message","content":"x""#, TEXT_FRAME_BYTES).into(),
            audio: audio.to_string().into(),
            rest_body: padded(&format!(r#""content":"x","sender":"{sender}""#), frame).into_bytes(),
        }
    }

    fn frames(&self, media_only: bool) -> Vec<&Utf8Bytes> {
        if media_only {
            vec![&self.audio]
        } else {
            vec![&self.typing, &self.text, &self.audio]
        }
    }
}

/// A valid WebM audio data URL of `bytes` decoded bytes: [`WEBM_HEADER`], then zeros.
pub fn webm_data_url(bytes: usize) -> String {
    let mut webm = WEBM_HEADER.to_vec();
    webm.resize(bytes.max(WEBM_HEADER.len()), 0);
    format!("data:audio/webm;base64,{}", STANDARD.encode(webm))
}

/// `{<fields>,"pad":[{},{},...]}` of at most `total` bytes (and within 3 of it): valid
/// JSON whose size is nearly all padding.
fn padded(fields: &str, total: usize) -> String {
    let head = format!("{{{fields},\"pad\":[");
    let items = (total.saturating_sub(head.len() + 2) + 1) / 3;
    let mut out = String::with_capacity(total);
    out.push_str(&head);
    for i in 0..items {
        out.push_str(if i == 0 { "{}" } else { ",{}" });
    }
    out.push_str("]}");
    out
}

/// What one hostile socket client saw, over all its connections.
#[derive(Debug, Default)]
struct SocketStats {
    connections: u64,
    /// Refused or failed connects, by reason.
    refused_connects: BTreeMap<String, u64>,
    frames_sent: u64,
    /// Connections that sent at least one frame.
    used: u64,
    /// Used connections that got an error frame, or that the server closed other than
    /// with 1000/1001 (a close frame with another code, or none).
    refused: u64,
    /// Used connections the server closed (a close frame, or the socket ended).
    closed: u64,
    /// Used connections still open once the run stopped and the grace passed.
    open_at_end: u64,
    /// The server's close frames by code (`none (why)`: the socket ended without one).
    close_codes: BTreeMap<String, u64>,
    /// Error frames by code.
    errors: BTreeMap<String, u64>,
    /// Other frames (joins, leaves, peers' stored audio).
    other_frames: u64,
}

impl SocketStats {
    fn add(&mut self, o: &SocketStats) {
        self.connections += o.connections;
        self.frames_sent += o.frames_sent;
        self.used += o.used;
        self.refused += o.refused;
        self.closed += o.closed;
        self.open_at_end += o.open_at_end;
        self.other_frames += o.other_frames;
        for (into, from) in [
            (&mut self.refused_connects, &o.refused_connects),
            (&mut self.close_codes, &o.close_codes),
            (&mut self.errors, &o.errors),
        ] {
            for (k, n) in from {
                *into.entry(k.clone()).or_default() += n;
            }
        }
    }

    /// Every connection that sent something was refused and closed by the server.
    fn met(&self) -> bool {
        self.refused == self.used && self.closed == self.used
    }
}

/// What one hostile connection's reader saw.
#[derive(Debug, Default)]
struct ConnOutcome {
    errors: BTreeMap<String, u64>,
    /// The server's close code, when it sent a close frame.
    close_code: Option<u16>,
    /// Why reading failed, when it ended without a close frame.
    failure: Option<String>,
    other_frames: u64,
}

/// Reads a hostile connection until it ends (then cancels `ended`), or until `quit`.
async fn read_hostile(
    mut stream: SplitStream<Ws>,
    ended: CancellationToken,
    quit: CancellationToken,
) -> ConnOutcome {
    let mut out = ConnOutcome::default();
    loop {
        let next = tokio::select! {
            () = quit.cancelled() => return out,
            next = stream.next() => next,
        };
        let Some(next) = next else {
            break;
        };
        match next {
            Ok(Message::Text(text)) if text.starts_with(crate::ERROR_TYPE) => {
                *out.errors.entry(crate::error_code(&text)).or_default() += 1;
            }
            Ok(Message::Text(_) | Message::Binary(_)) => out.other_frames += 1,
            Ok(Message::Close(frame)) => {
                out.close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                // The library answers it; the stream ends next.
            }
            Ok(_) => {}
            Err(e) => {
                out.failure = Some(e.to_string());
                break;
            }
        }
    }
    ended.cancel();
    out
}

/// A short key for a failed connect: the HTTP status and error code, or the first words.
fn connect_failure(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("handshake refused: HTTP ") {
        let status = rest.split_whitespace().next().unwrap_or("?");
        let code = crate::str_field(rest, "\"code\":\"").unwrap_or("");
        return format!("HTTP {status} {code}").trim_end().to_string();
    }
    message.chars().take(60).collect()
}

/// One hostile socket client: connects, sends the three frames round and round until
/// the server closes it or the run stops, and connects again.
async fn hostile_socket(
    target: Arc<Target>,
    spec: ConnSpec,
    opts: ConnectOpts,
    payloads: Arc<Payloads>,
    media_only: bool,
    stop: CancellationToken,
) -> SocketStats {
    let mut stats = SocketStats::default();
    while !stop.is_cancelled() {
        let ws = tokio::select! {
            () = stop.cancelled() => break,
            ws = connect_once(&target, &spec, &opts) => ws,
        };
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) => {
                *stats
                    .refused_connects
                    .entry(connect_failure(&e.message()))
                    .or_default() += 1;
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = sleep(RECONNECT_PAUSE) => continue,
                }
            }
        };
        stats.connections += 1;
        let (mut sink, stream) = ws.split();
        let ended = CancellationToken::new();
        let quit = CancellationToken::new();
        let reader = tokio::spawn(read_hostile(stream, ended.clone(), quit.clone()));
        let mut sent = 0u64;
        for frame in payloads.frames(media_only).into_iter().cycle() {
            if stop.is_cancelled() || ended.is_cancelled() {
                break;
            }
            let send = timeout(
                HOSTILE_SEND_TIMEOUT,
                sink.send(Message::Text(frame.clone())),
            );
            tokio::select! {
                // The server closed it mid-frame.
                () = ended.cancelled() => break,
                result = send => match result {
                    Ok(Ok(())) => sent += 1,
                    // Closed under us (the reader tells how), or stuck.
                    Ok(Err(_)) | Err(_) => break,
                },
            }
        }
        stats.frames_sent += sent;
        let closed_by_server = timeout(CLOSE_GRACE, ended.cancelled()).await.is_ok();
        if !closed_by_server {
            let _ = timeout(CLOSE_GRACE, sink.send(Message::Close(None))).await;
            let _ = timeout(CLOSE_GRACE, ended.cancelled()).await;
            quit.cancel();
        }
        let outcome = reader.await.unwrap_or_default();
        stats.other_frames += outcome.other_frames;
        for (code, n) in &outcome.errors {
            *stats.errors.entry(code.clone()).or_default() += n;
        }
        if sent == 0 && outcome.errors.is_empty() && !closed_by_server {
            continue; // opened as the run stopped: nothing to judge
        }
        stats.used += 1;
        // Dropped by the server without a close frame (often a reset that discards the
        // error frame and close frame it had sent) is a refusal too.
        let refused_by_close =
            closed_by_server && outcome.close_code.is_none_or(|c| c != 1000 && c != 1001);
        if !outcome.errors.is_empty() || refused_by_close {
            stats.refused += 1;
        }
        if closed_by_server {
            stats.closed += 1;
            let code = match (outcome.close_code, &outcome.failure) {
                (Some(code), _) => code.to_string(),
                (None, Some(failure)) => {
                    let failure = failure.split(" (os error").next().unwrap_or(failure);
                    format!("none ({})", failure.chars().take(50).collect::<String>())
                }
                (None, None) => "none (end of stream)".to_string(),
            };
            *stats.close_codes.entry(code).or_default() += 1;
        } else {
            stats.open_at_end += 1;
        }
    }
    stats
}

/// One hostile REST client: posts the padded body over and over until the run stops.
/// Returns the answers by status and code.
async fn hostile_rest(
    target: Arc<Target>,
    address: String,
    payloads: Arc<Payloads>,
    stop: CancellationToken,
) -> BTreeMap<String, u64> {
    let mut outcomes = BTreeMap::new();
    while !stop.is_cancelled() {
        let answer = http_post_json(
            &target,
            "/api/chat/message",
            &payloads.rest_body,
            Some(&address),
        )
        .await;
        let key = match answer {
            Ok(answer) if answer.cut_off.is_some() => {
                format!("{} (cut off while sending)", answer.outcome())
            }
            Ok(answer) => answer.outcome(),
            Err(e) => {
                sleep(Duration::from_millis(100)).await;
                format!("failed: {}", e.chars().take(60).collect::<String>())
            }
        };
        *outcomes.entry(key).or_default() += 1;
    }
    outcomes
}

/// The server's RSS, sampled until stopped.
#[derive(Debug, Clone, Copy)]
struct RssPeak {
    peak_kib: u64,
    /// Seconds after sampling began.
    peak_at: f64,
    samples: u64,
}

async fn sample_rss(pid: String, every: Duration, stop: CancellationToken) -> RssPeak {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut peak = RssPeak {
        peak_kib: 0,
        peak_at: 0.0,
        samples: 0,
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if let Some(mem) = read_mem(&pid) {
            peak.samples += 1;
            if mem.rss_kib > peak.peak_kib {
                peak.peak_kib = mem.rss_kib;
                peak.peak_at = start.elapsed().as_secs_f64();
            }
        }
    }
    peak
}

/// `hostile`: see the module docs.
pub async fn run(
    common: &Common,
    args: &HostileArgs,
    target: &Target,
    server: Option<u32>,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    let pid = server
        .map(|p| p.to_string())
        .ok_or("hostile measures the server's memory: give --server-pid or --server-pid-file")?;
    if args.healthy < 2 {
        return Err("--healthy must be at least 2 (each message goes to the others)".into());
    }
    if args.media_sockets > args.sockets {
        return Err("--media-sockets must be at most --sockets".into());
    }
    if args.sockets + args.rest + args.healthy > 10_000 {
        return Err("at most 10,000 clients".into());
    }
    if args.max_message_bytes <= TEXT_FRAME_BYTES + UNDER_LIMIT {
        return Err(format!(
            "--max-message-bytes must be more than {}",
            TEXT_FRAME_BYTES + UNDER_LIMIT
        ));
    }
    if !(WEBM_HEADER.len()..=1 << 30).contains(&args.max_audio_bytes) {
        return Err("--max-audio-bytes must be between 11 and 1 GiB".into());
    }
    if !(1..=10_000).contains(&args.sample_ms) {
        return Err("--sample-ms must be between 1 and 10000".into());
    }
    check_rate(args.rate)?;
    let planned = planned_messages(args.rate, common)?;
    let target = Arc::new(target.clone());
    eprintln!("hostile: building the payloads");
    let payloads = Arc::new(Payloads::new(args, run_id));

    let baseline = read_mem(&pid).ok_or_else(|| format!("cannot read /proc/{pid}/status"))?;
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_rss(
        pid.clone(),
        Duration::from_millis(args.sample_ms),
        stop_sampling.clone(),
    ));

    // The healthy clients: `send`'s members, in one channel.
    let sh = Shared::new(run_id, usize::try_from(planned).unwrap_or(usize::MAX));
    let healthy_channel = format!("load-{run_id}-healthy");
    let member = Role {
        sends: true,
        deliveries: true,
        record_ids: false,
    };
    let specs = (0..args.healthy)
        .map(|i| ConnSpec {
            forwarded_for: Some(client_address(0, i)),
            ..ConnSpec::new(username(run_id, 'c', i), healthy_channel.clone(), 0, member)
        })
        .collect();
    eprintln!(
        "  opening {} healthy clients on {healthy_channel}",
        args.healthy
    );
    let mut connected = match connect_every(&sh, &target, specs, common, args.healthy).await {
        Ok(connected) => connected,
        Err(e) => {
            stop_sampling.cancel();
            return Err(e);
        }
    };
    // The hostile clients, stopped when the healthy sending window ends.
    let hostile_channel = format!("load-{run_id}-hostile");
    let stop = CancellationToken::new();
    let sockets: Vec<_> = (0..args.sockets)
        .map(|i| {
            let spec = ConnSpec {
                forwarded_for: Some(client_address(1, i)),
                max_message: HOSTILE_MAX_MESSAGE,
                ..ConnSpec::new(
                    username(run_id, 'h', i),
                    hostile_channel.clone(),
                    0,
                    crate::IDLE,
                )
            };
            tokio::spawn(hostile_socket(
                target.clone(),
                spec,
                ConnectOpts::from(common),
                payloads.clone(),
                i < args.media_sockets,
                stop.clone(),
            ))
        })
        .collect();
    let rest: Vec<_> = (0..args.rest)
        .map(|i| {
            tokio::spawn(hostile_rest(
                target.clone(),
                client_address(2, i),
                payloads.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let stopper = {
        let stop = stop.clone();
        let total = secs(common.warmup + common.duration);
        tokio::spawn(async move {
            sleep(total).await;
            stop.cancel();
        })
    };
    eprintln!(
        "  {} hostile sockets on {hostile_channel}, {} hostile REST clients",
        args.sockets, args.rest
    );
    let expected = u32::try_from(args.healthy - 1).unwrap_or(u32::MAX);
    let (sending, stats, _) = send_and_close(
        &sh,
        common,
        &args.pacing,
        std::mem::take(&mut connected.conns),
        planned,
        expected,
        server,
    )
    .await;
    stop.cancel();
    stopper.abort();
    eprintln!("  stopping the hostile clients");
    let mut per_socket = Vec::with_capacity(sockets.len());
    for task in sockets {
        per_socket.push(task.await.unwrap_or_default());
    }
    let mut rest_outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for task in rest {
        for (k, n) in task.await.unwrap_or_default() {
            *rest_outcomes.entry(k).or_default() += n;
        }
    }
    let settle = (sending.settle_secs, sending.settled);
    sleep(Duration::from_secs(1)).await;
    stop_sampling.cancel();
    let peak = sampler
        .await
        .map_err(|e| format!("the RSS sampler failed: {e}"))?;
    let end = read_mem(&pid);
    let totals = Totals::of(&stats);
    let acc = account(&sh, expected);

    let mut r = Report::new("hostile", run_id, &target);
    r.section("setup", "setup");
    r.int("hostile sockets", "sockets", args.sockets as u64);
    r.int(
        "of them sending only audio",
        "media_sockets",
        args.media_sockets as u64,
    );
    r.int("hostile REST clients", "rest_clients", args.rest as u64);
    r.int("healthy clients", "healthy", args.healthy as u64);
    r.num("healthy rate", "rate", args.rate, " msgs/s");
    r.num("warmup", "warmup_secs", common.warmup, " s");
    r.num("measured window", "window_secs", common.duration, " s");
    for (label, key, bytes) in [
        ("typing_start frame", "typing_bytes", payloads.typing.len()),
        ("padded text frame", "text_bytes", payloads.text.len()),
        ("audio frame (WebM)", "audio_bytes", payloads.audio.len()),
        ("REST body", "rest_body_bytes", payloads.rest_body.len()),
    ] {
        r.int(label, key, bytes as u64);
    }
    r.connect(&connected, args.healthy, args.healthy);
    let loss = traffic_report(
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
    r.frames(&totals);

    let mut all = SocketStats::default();
    for s in &per_socket {
        all.add(s);
    }
    let rows = per_socket
        .iter()
        .enumerate()
        .map(|(i, s)| socket_row(&username(run_id, 'h', i), s))
        .collect();
    r.table("hostile sockets", "hostile_sockets", SOCKET_HEADER, rows);
    r.section("hostile sockets, all", "hostile");
    r.int("connections opened", "connections", all.connections);
    r.int("connections that sent", "used", all.used);
    r.int("  refused", "refused", all.refused);
    r.int("  closed by the server", "closed", all.closed);
    r.int("  still open at the end", "open_at_end", all.open_at_end);
    r.int("frames sent", "frames_sent", all.frames_sent);
    r.counts("close codes", "close_codes", &all.close_codes);
    r.counts("error frames by code", "errors", &all.errors);
    r.counts(
        "connects refused",
        "refused_connects",
        &all.refused_connects,
    );
    r.int("other frames received", "other_frames", all.other_frames);
    r.section("hostile REST", "hostile_rest");
    r.counts("answers", "answers", &rest_outcomes);
    let accepted: u64 = rest_outcomes
        .iter()
        .filter(|(k, _)| k.starts_with("200"))
        .map(|(_, n)| n)
        .sum();
    r.int("bodies accepted (200)", "accepted", accepted);

    r.section("server memory", "server");
    r.mem("RSS before", "rss_before_kib", Some(baseline));
    r.put(
        "peak RSS (sampled)",
        "rss_peak_kib",
        json!(peak.peak_kib),
        format!(
            "{} KiB, {:.1} s after the start ({} samples, every {} ms)",
            peak.peak_kib, peak.peak_at, peak.samples, args.sample_ms
        ),
    );
    r.mem("RSS after", "rss_after_kib", end);
    let hwm = end.map_or(0, |m| m.hwm_kib);
    r.put(
        "VmHWM after",
        "hwm_kib",
        json!(hwm),
        format!("{hwm} KiB ({})", mib(hwm)),
    );
    let growth = peak.peak_kib.saturating_sub(baseline.rss_kib);
    r.put(
        "peak RSS growth",
        "rss_growth_kib",
        json!(growth),
        format!("{growth} KiB ({})", mib(growth)),
    );
    if let Some(cpu) = sending.server_cpu {
        r.num("CPU in the window", "cpu_pct", cpu * 100.0, " %");
    }

    let delivery = sh.delivery_latency.merged();
    #[allow(clippy::cast_precision_loss)]
    let p99_ms = delivery.quantile(0.99) as f64 / 1000.0;
    let rss_met = growth < args.max_rss_growth_mib * 1024;
    let sockets_met = all.met() && all.used > 0;
    let rest_met = accepted == 0;
    // A healthy message refused (an error frame instead of its ack) is lost to its user.
    let healthy_met = matches!(loss, Verdict::Pass)
        && acc.unacked == 0
        && delivery.count > 0
        && p99_ms < args.max_p99_ms;
    r.section("bars", "bars");
    r.bar(
        &format!("peak RSS growth < {} MiB", args.max_rss_growth_mib),
        "rss_growth",
        &mib(growth),
        rss_met,
    );
    r.bar(
        "hostile sockets refused and closed",
        "sockets_refused_closed",
        &format!(
            "{} of {} refused, {} closed, {} open at the end",
            all.refused, all.used, all.closed, all.open_at_end
        ),
        sockets_met,
    );
    r.bar(
        "hostile REST bodies refused",
        "rest_refused",
        &format!("{accepted} accepted"),
        rest_met,
    );
    r.bar(
        &format!("healthy: no loss, p99 < {} ms", args.max_p99_ms),
        "healthy",
        &format!(
            "{} deliveries lost, {} messages unacknowledged, p99 {p99_ms:.1} ms",
            acc.lost_deliveries, acc.unacked
        ),
        healthy_met,
    );
    let met = rss_met && sockets_met && rest_met && healthy_met;
    Ok((if met { Verdict::Pass } else { Verdict::Fail }, r))
}

const SOCKET_HEADER: &str = "  socket                conns   used  refused closed  open  refused connects / close codes / error codes";

fn socket_row(name: &str, s: &SocketStats) -> (String, Value) {
    let list = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "-".to_string()
        } else {
            m.iter()
                .map(|(k, n)| format!("{n} x {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let line = format!(
        "  {name:<20} {:>6} {:>6} {:>7} {:>6} {:>5}  {} / {} / {}{}",
        s.connections,
        s.used,
        s.refused,
        s.closed,
        s.open_at_end,
        list(&s.refused_connects),
        list(&s.close_codes),
        list(&s.errors),
        if s.met() {
            ""
        } else {
            "  <- not refused and closed"
        },
    );
    let value = json!({
        "socket": name,
        "connections": s.connections,
        "used": s.used,
        "refused": s.refused,
        "closed": s.closed,
        "open_at_end": s.open_at_end,
        "frames_sent": s.frames_sent,
        "refused_connects": s.refused_connects,
        "close_codes": s.close_codes,
        "errors": s.errors,
    });
    (line, value)
}

/// KiB as MiB, for reading.
fn mib(kib: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let mib = kib as f64 / 1024.0;
    format!("{mib:.1} MiB")
}

#[cfg(test)]
mod tests {
    use chatgate::content::{MediaKind, MediaLimits, check_media, max_encoded_len};

    use super::*;

    #[test]
    fn padded_frames_are_json_just_under_their_size() {
        for total in [100, 1001, TEXT_FRAME_BYTES] {
            let text = padded(r#""type":"typing_start","content":"x""#, total);
            assert!(text.len() <= total && text.len() + 3 > total, "{total}");
            let frame: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(frame["type"], "typing_start");
        }
    }

    #[test]
    fn the_webm_is_one_the_server_accepts_at_its_largest() {
        let limits = MediaLimits::default();
        let url = webm_data_url(limits.max_audio_bytes);
        let media = check_media(MediaKind::Audio, &url, &limits).unwrap();
        assert_eq!(media.decoded_bytes, DEFAULT_MAX_AUDIO_BYTES);
        // The server's derived ws.max_message_bytes: the longest data URL + 16 KiB.
        assert_eq!(
            DEFAULT_MAX_MESSAGE_BYTES,
            max_encoded_len(&limits) + 16 * 1024
        );
    }
}
