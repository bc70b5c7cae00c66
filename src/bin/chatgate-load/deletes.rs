//! `deletes`: what a message delete costs Redis in a channel full of large media, and
//! what it costs everyone else who waits on the same Redis meanwhile.
//!
//! Needs a private `redis-server` that chatgate uses and nothing else does, given with
//! `--redis-url`, and a chatgate whose limits are off (`CHATGATE_LIMITS__ENABLED=false`)
//! so the fill and the deletes are not refused, and whose channels keep the whole fill
//! (a server with a per-channel byte cap needs it raised, e.g.
//! `CHATGATE_STORE__CHANNEL_MAX_BYTES=1073741824`). The run:
//!
//! 1. fills one channel over REST with `--messages` messages, `--audio` of them WebM
//!    audio of `--audio-bytes` spread evenly over the history, and keeps their ids;
//! 2. sets the slow log to record every command (`slowlog-log-slower-than 0`, a long
//!    `slowlog-max-len`);
//! 3. deletes over REST, `--rounds` times, an id that is not there and one that is (the
//!    oldest first: a newest-first scan reaches them last), one at a time, while another
//!    connection PINGs Redis in a loop and times each answer. Around each delete the slow
//!    log is reset before and read after (`--pause-ms` later), so each delete is credited
//!    with the Redis time of every command Redis ran meanwhile, PINGs and the tool's own
//!    slow log commands aside;
//! 4. restores both settings.
//!
//! Bars: every delete under `--max-delete-ms` of Redis time; no PING waits more than
//! `--max-ping-ms`; and, as a precondition, every present id still stored when deleted. Nothing is flushed: the filled channel stays in that Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use clap::Args;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, Value};
use serde_json::json;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::hostile::{DEFAULT_MAX_AUDIO_BYTES, webm_data_url};
use crate::{
    Histogram, HttpRequest, Report, Target, Verdict, http_post_json, http_request,
    resolve_loopback, username,
};

/// `slowlog-max-len` for the run: every PING and delete of the run must fit.
const SLOWLOG_LEN: u64 = 1_000_000;
/// Longest any Redis reply may take before the call fails (a delete that scans a
/// history of large entries can hold Redis for long).
const REDIS_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags of `deletes`.
#[derive(Debug, Args)]
pub struct DeletesArgs {
    /// The private Redis chatgate uses (loopback only), for the slow log and the PINGs.
    /// Its `slowlog-log-slower-than` and `slowlog-max-len` are changed for the run and
    /// restored; nothing is written to it otherwise.
    #[arg(long, value_name = "URL")]
    redis_url: String,
    /// Messages the channel is filled with.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    messages: usize,
    /// How many of them are audio.
    #[arg(long, default_value_t = 20, value_name = "N")]
    audio: usize,
    /// Decoded bytes of each audio message (at most the server's chat.max_audio_bytes).
    #[arg(long, default_value_t = DEFAULT_MAX_AUDIO_BYTES, value_name = "BYTES")]
    audio_bytes: usize,
    /// Rounds of deletes: each deletes one absent id and one present id.
    #[arg(long, default_value_t = 10, value_name = "N")]
    rounds: usize,
    /// Milliseconds between two deletes.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pause_ms: u64,
    /// Milliseconds between the end of one PING and the next.
    #[arg(long, default_value_t = 1, value_name = "MS")]
    ping_every_ms: u64,
    /// Bar: Redis time of each delete, in milliseconds.
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    max_delete_ms: f64,
    /// Bar: the longest a PING may wait, in milliseconds.
    #[arg(long, default_value_t = 10.0, value_name = "MS")]
    max_ping_ms: f64,
}

/// One stored message of the fill.
struct Stored {
    id: String,
    audio: bool,
}

/// One delete and what it cost.
struct Delete {
    /// `absent`, or where the message was (`#index of N`, audio or text).
    what: String,
    present: bool,
    answer: String,
    http_ms: f64,
    /// Slow log entries of its window (PINGs, ours and those inside scripts aside), and
    /// their microseconds.
    commands: u64,
    redis_us: u64,
    /// Whether one of them named the id: chatgate used this Redis for it.
    named: bool,
}

/// Every command credited to the deletes, by name: (count, longest µs).
type ByCommand = BTreeMap<String, (u64, u64)>;

/// The PING loop's figures.
struct Pings {
    waits: Histogram,
    errors: BTreeMap<String, u64>,
}

/// Opens a connection to a loopback (or Unix socket) Redis.
async fn redis_connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("--redis-url: {e}"))?;
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) => {
            resolve_loopback(host, *port).await?;
        }
        ConnectionAddr::Unix(_) => {}
        _ => return Err("--redis-url: only redis:// on loopback or a Unix socket".into()),
    }
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))
}

async fn config_get(conn: &mut MultiplexedConnection, name: &str) -> Result<String, String> {
    let pairs: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await
        .map_err(|e| format!("CONFIG GET {name}: {e}"))?;
    pairs
        .get(name)
        .cloned()
        .ok_or_else(|| format!("CONFIG GET {name}: no such setting"))
}

async fn config_set(
    conn: &mut MultiplexedConnection,
    name: &str,
    value: &str,
) -> Result<(), String> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async::<()>(conn)
        .await
        .map_err(|e| format!("CONFIG SET {name} {value}: {e}"))
}

/// PINGs until `stop`, timing each answer.
async fn ping_loop(
    mut conn: MultiplexedConnection,
    every: Duration,
    stop: CancellationToken,
) -> Pings {
    let mut pings = Pings {
        waits: Histogram::new(),
        errors: BTreeMap::new(),
    };
    while !stop.is_cancelled() {
        let began = Instant::now();
        match redis::cmd("PING").query_async::<String>(&mut conn).await {
            Ok(_) => pings
                .waits
                .record(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX)),
            Err(e) => *pings.errors.entry(e.to_string()).or_default() += 1,
        }
        sleep(every).await;
    }
    pings
}

/// Fills the channel over REST; returns the stored messages, oldest first.
async fn fill(
    target: &Target,
    args: &DeletesArgs,
    channel: &str,
    sender: &str,
) -> Result<Vec<Stored>, String> {
    let audio_at: std::collections::HashSet<usize> = (0..args.audio)
        .map(|k| k * args.messages / args.audio + args.messages / (2 * args.audio))
        .collect();
    let audio_body = json!({
        "sender": sender,
        "channel": channel,
        "message_type": "audio",
        "content": webm_data_url(args.audio_bytes),
    })
    .to_string();
    let posted = Arc::new(AtomicU64::new(0));
    let progress = {
        let posted = posted.clone();
        let total = args.messages;
        tokio::spawn(async move {
            loop {
                sleep(Duration::from_secs(2)).await;
                eprintln!("  filling: {}/{total} stored", posted.load(Relaxed));
            }
        })
    };
    let mut stored = Vec::with_capacity(args.messages);
    for i in 0..args.messages {
        let audio = audio_at.contains(&i);
        let text_body;
        let body = if audio {
            audio_body.as_bytes()
        } else {
            text_body = json!({
                "sender": sender,
                "channel": channel,
                "message_type": "text",
                "content": format!("t={};n={i}", crate::now_us()),
            })
            .to_string();
            text_body.as_bytes()
        };
        let answer = match http_post_json(target, "/api/chat/message", body, None).await {
            Ok(answer) => answer,
            Err(e) => {
                progress.abort();
                return Err(format!("filling, message {i}: {e}"));
            }
        };
        let id = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["data"]["message_id"].as_str().map(str::to_string));
        match (answer.status, id) {
            (200, Some(id)) => stored.push(Stored { id, audio }),
            _ => {
                progress.abort();
                return Err(format!(
                    "filling, message {i}: HTTP {} {} (start chatgate with \
                     CHATGATE_LIMITS__ENABLED=false, and --audio-bytes within its \
                     chat.max_audio_bytes)",
                    answer.status,
                    String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
                ));
            }
        }
        posted.fetch_add(1, Relaxed);
    }
    progress.abort();
    Ok(stored)
}

/// The deletes, in order: per round one absent id, then one present id, the present
/// ones spread over the history from the oldest. Each is credited with the slow log of
/// its window.
async fn deletes(
    target: &Target,
    args: &DeletesArgs,
    channel: &str,
    stored: &[Stored],
    admin: &mut MultiplexedConnection,
    by_command: &mut ByCommand,
) -> Result<Vec<Delete>, String> {
    let mut out = Vec::with_capacity(2 * args.rounds);
    for round in 0..args.rounds {
        let index = round * stored.len() / args.rounds;
        let present = &stored[index];
        let absent = uuid::Uuid::now_v7().to_string();
        let kind = if present.audio { "audio" } else { "text" };
        for (id, what, is_present) in [
            (absent.as_str(), "absent".to_string(), false),
            (
                present.id.as_str(),
                format!("#{index} of {} ({kind}, oldest first)", stored.len()),
                true,
            ),
        ] {
            slowlog(admin, "RESET").await?;
            let path = format!("/api/chat/message/{id}?channel={channel}");
            let request = HttpRequest {
                method: "DELETE",
                ..HttpRequest::get(&path)
            };
            let began = Instant::now();
            let answer =
                match http_request(target.http_addr, &target.http_authority, &request).await {
                    Ok(answer) => answer.outcome(),
                    Err(e) => format!("failed: {e}"),
                };
            let http_ms = began.elapsed().as_secs_f64() * 1000.0;
            // Whatever chatgate still does for this delete lands in the window too.
            sleep(Duration::from_millis(args.pause_ms)).await;
            let log = slowlog(admin, "GET").await?;
            let mut delete = Delete {
                what,
                present: is_present,
                answer,
                http_ms,
                commands: 0,
                redis_us: 0,
                named: false,
            };
            credit(&log, id, &mut delete, by_command);
            out.push(delete);
        }
    }
    Ok(out)
}

/// `SLOWLOG RESET`, or `SLOWLOG GET` of every entry.
async fn slowlog(admin: &mut MultiplexedConnection, what: &str) -> Result<Value, String> {
    let mut cmd = redis::cmd("SLOWLOG");
    cmd.arg(what);
    if what == "GET" {
        cmd.arg(SLOWLOG_LEN);
    }
    cmd.query_async(admin)
        .await
        .map_err(|e| format!("SLOWLOG {what}: {e}"))
}

/// Text of a slow log argument.
fn arg_text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

/// Credits `delete` with the slow log entries of its window, PINGs, the tool's own
/// `SLOWLOG`/`CONFIG` commands and the commands run inside scripts aside.
fn credit(log: &Value, id: &str, delete: &mut Delete, by_command: &mut ByCommand) {
    let Value::Array(entries) = log else {
        return;
    };
    for entry in entries {
        let Value::Array(fields) = entry else {
            continue;
        };
        let (Some(Value::Int(us)), Some(Value::Array(argv))) = (fields.get(2), fields.get(3))
        else {
            continue;
        };
        let us = u64::try_from(*us).unwrap_or(0);
        let argv: Vec<String> = argv.iter().map(arg_text).collect();
        let command = argv
            .first()
            .map(|c| c.to_ascii_uppercase())
            .unwrap_or_default();
        if matches!(command.as_str(), "PING" | "SLOWLOG" | "CONFIG") {
            continue;
        }
        delete.named |= argv.iter().skip(1).any(|a| a.contains(id));
        // A command a script ran is logged too, from a client without an address
        // (`?:0`); its time is already in the script's own entry.
        let in_script = fields
            .get(4)
            .map(arg_text)
            .is_some_and(|a| a.starts_with('?'));
        let command = if in_script {
            format!("{command} (in a script)")
        } else {
            delete.commands += 1;
            delete.redis_us += us;
            command
        };
        let slot = by_command.entry(command).or_default();
        slot.0 += 1;
        slot.1 = slot.1.max(us);
    }
}

/// `deletes`: see the module docs.
pub async fn run(
    args: &DeletesArgs,
    target: &Target,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    if !(1..=100_000).contains(&args.messages) {
        return Err("--messages must be between 1 and 100000".into());
    }
    if args.audio > args.messages {
        return Err("--audio must be at most --messages".into());
    }
    if !(1..=args.messages).contains(&args.rounds) {
        return Err("--rounds must be between 1 and --messages".into());
    }
    if args.audio_bytes > 1 << 30 {
        return Err("--audio-bytes must be at most 1 GiB".into());
    }
    let mut admin = redis_connect(&args.redis_url).await?;
    let pinger = redis_connect(&args.redis_url).await?;
    let channel = format!("load-{run_id}-deletes");
    let sender = username(run_id, 'd', 0);
    eprintln!(
        "deletes: filling {channel} with {} messages ({} audio of {} bytes)",
        args.messages, args.audio, args.audio_bytes
    );
    let fill_began = Instant::now();
    let stored = fill(target, args, &channel, &sender).await?;
    let fill_secs = fill_began.elapsed().as_secs_f64();

    let slower_than = config_get(&mut admin, "slowlog-log-slower-than").await?;
    let max_len = config_get(&mut admin, "slowlog-max-len").await?;
    let mut by_command = ByCommand::new();
    let measured = async {
        config_set(&mut admin, "slowlog-max-len", &SLOWLOG_LEN.to_string()).await?;
        config_set(&mut admin, "slowlog-log-slower-than", "0").await?;
        let stop = CancellationToken::new();
        let pings = tokio::spawn(ping_loop(
            pinger,
            Duration::from_millis(args.ping_every_ms),
            stop.clone(),
        ));
        eprintln!("  deleting: {} rounds (absent id, present id)", args.rounds);
        let done = deletes(target, args, &channel, &stored, &mut admin, &mut by_command).await;
        stop.cancel();
        let pings = pings
            .await
            .map_err(|e| format!("the PING loop failed: {e}"))?;
        Ok::<_, String>((done?, pings))
    };
    let result = measured.await;
    // Restore the settings whatever happened.
    let restored = async {
        config_set(&mut admin, "slowlog-log-slower-than", &slower_than).await?;
        config_set(&mut admin, "slowlog-max-len", &max_len).await
    }
    .await;
    let (done, pings) = result?;
    restored?;

    let mut r = Report::new("deletes", run_id, target);
    r.section("setup", "setup");
    r.text("channel", "channel", &channel);
    r.int("messages stored", "messages", stored.len() as u64);
    r.int(
        "audio messages",
        "audio",
        stored.iter().filter(|s| s.audio).count() as u64,
    );
    r.int(
        "audio bytes each (decoded)",
        "audio_bytes",
        args.audio_bytes as u64,
    );
    r.num("fill took", "fill_secs", fill_secs, " s");
    r.text(
        "slow log restored to",
        "slowlog_restored",
        &format!("slowlog-log-slower-than {slower_than}, slowlog-max-len {max_len}"),
    );
    #[allow(clippy::cast_precision_loss)]
    let ms = |us: u64| us as f64 / 1000.0;
    let rows = done
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let line = format!(
                "  {:>3}  {:<34} {:<16} {:>9.2} {:>9.3} {:>5}",
                i + 1,
                d.what,
                d.answer,
                d.http_ms,
                ms(d.redis_us),
                d.commands
            );
            let value = json!({
                "what": d.what,
                "answer": d.answer,
                "http_ms": (d.http_ms * 1000.0).round() / 1000.0,
                "redis_ms": ms(d.redis_us),
                "commands": d.commands,
                "named_the_id": d.named,
            });
            (line, value)
        })
        .collect();
    r.table(
        "deletes",
        "deletes",
        "    #  message                            answer             HTTP ms  Redis ms  cmds",
        rows,
    );
    let worst = |present: bool| {
        done.iter()
            .filter(|d| d.present == present)
            .map(|d| d.redis_us)
            .max()
            .unwrap_or(0)
    };
    r.section("Redis time per delete (slow log)", "redis");
    r.num(
        "absent id, longest",
        "absent_max_ms",
        ms(worst(false)),
        " ms",
    );
    r.num(
        "present id, longest",
        "present_max_ms",
        ms(worst(true)),
        " ms",
    );
    r.section("commands during the deletes (slow log)", "commands");
    for (command, (count, max_us)) in &by_command {
        r.put(
            command,
            &command.to_ascii_lowercase(),
            json!({"count": count, "max_ms": ms(*max_us)}),
            format!("{count}, longest {:.3} ms", ms(*max_us)),
        );
    }
    r.latency("PING waits", "ping", &pings.waits);
    r.counts("PING errors", "ping_errors", &pings.errors);
    let uncredited = done.iter().filter(|d| !d.named).count();
    if uncredited > 0 {
        r.warn(format!(
            "{uncredited} delete(s) ran no Redis command naming their id: is chatgate \
             using the Redis given with --redis-url?"
        ));
    }
    // A present id answered 404 was trimmed after the fill: the channel did not keep it.
    let trimmed = done
        .iter()
        .filter(|d| d.present && d.answer.starts_with("404"))
        .count();
    let unexpected = done
        .iter()
        .filter(|d| !d.answer.starts_with(if d.present { "200" } else { "404" }))
        .count()
        - trimmed;
    if trimmed > 0 {
        r.warn(format!(
            "{trimmed} of the {} present ids were no longer stored: the server trimmed the \
             channel after the fill (a per-channel byte cap such as store.channel_max_bytes; \
             raise it, e.g. CHATGATE_STORE__CHANNEL_MAX_BYTES=1073741824)",
            args.rounds
        ));
    }
    if unexpected > 0 {
        r.warn(format!(
            "{unexpected} delete(s) answered other than 200 (present) or 404 (absent)"
        ));
    }

    r.section("bars", "bars");
    let longest = worst(false).max(worst(true));
    let deletes_met = uncredited == 0 && unexpected == 0 && ms(longest) < args.max_delete_ms;
    r.bar(
        &format!("each delete < {} ms of Redis time", args.max_delete_ms),
        "delete_redis_time",
        &format!("longest {:.3} ms", ms(longest)),
        deletes_met,
    );
    let ping_max = ms(pings.waits.max);
    let pings_met =
        pings.waits.count > 0 && pings.errors.is_empty() && ping_max <= args.max_ping_ms;
    r.bar(
        &format!("PING waits at most {} ms", args.max_ping_ms),
        "ping_wait",
        &format!(
            "longest {ping_max:.3} ms, p99 {:.3} ms over {} PINGs",
            ms(pings.waits.quantile(0.99)),
            pings.waits.count
        ),
        pings_met,
    );
    r.bar(
        "channel kept the whole fill (precondition)",
        "fill_kept",
        &format!("{trimmed} of {} present ids trimmed", args.rounds),
        trimmed == 0,
    );
    let met = deletes_met && pings_met && trimmed == 0;
    Ok((if met { Verdict::Pass } else { Verdict::Fail }, r))
}
