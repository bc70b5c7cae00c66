//! Prometheus metrics, served at `GET /metrics` on the admin listener.
//!
//! Every metric chatgate records goes through a function here, so names, labels and
//! their value sets are in one place (docs/operations.md lists them). Labels take only
//! fixed strings (route templates, reason codes), never user input: the number of series
//! is bounded.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Seconds: 0.5 ms to 10 s, for HTTP and Redis latencies and pub/sub lag.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!("chatgate_connections", "Open WebSocket sessions.");
    describe_gauge!(
        "chatgate_store_full",
        "1 while Redis is past redis.storage_full_ratio of its maxmemory: new media is refused."
    );
    describe_gauge!(
        "chatgate_runtime_tasks",
        "Tasks alive in the async runtime."
    );
    describe_counter!(
        "chatgate_connections_opened_total",
        "WebSocket sessions opened."
    );
    describe_counter!(
        "chatgate_connections_closed_total",
        "WebSocket sessions closed, by reason."
    );
    describe_counter!(
        "chatgate_messages_received_total",
        "Messages accepted (stored and published), by transport."
    );
    describe_counter!(
        "chatgate_messages_refused_total",
        "Messages refused (validation, rate limit, store unavailable), by reason."
    );
    describe_counter!(
        "chatgate_frames_delivered_total",
        "Frames queued for local WebSocket sessions."
    );
    describe_counter!(
        "chatgate_frames_dropped_total",
        "Frames dropped for slow sessions, by reason."
    );
    describe_counter!(
        "chatgate_rate_limited_total",
        "Requests, messages and connections refused by a limit, by limit."
    );
    describe_counter!(
        "chatgate_auth_rejections_total",
        "Requests and upgrades refused by authentication or the Origin check, by code."
    );
    describe_histogram!(
        "chatgate_redis_command_duration_seconds",
        Unit::Seconds,
        "Redis command (script) latency, by operation."
    );
    describe_counter!(
        "chatgate_redis_errors_total",
        "Failed Redis commands, by operation."
    );
    describe_counter!(
        "chatgate_pubsub_reconnects_total",
        "Times the pub/sub subscriber reconnected to Redis."
    );
    describe_histogram!(
        "chatgate_pubsub_lag_seconds",
        Unit::Seconds,
        "Time from a message's publication to its arrival at this replica."
    );
    describe_gauge!(
        "chatgate_http_connections",
        "Open TCP connections on the public listener (REST and WebSocket)."
    );
    describe_counter!(
        "chatgate_http_connections_refused_total",
        "TCP connections refused by a connection cap of the public listener, by limit."
    );
    describe_counter!(
        "chatgate_http_timeouts_total",
        "Connections closed for sending nothing (idle) or their headers too slowly (header), \
         and WebSocket handshakes cut off (handshake), by phase."
    );
    describe_histogram!(
        "chatgate_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request duration, by method, route template and status."
    );
    // Every labelled counter exists from the start at 0, so dashboards and rate() see a
    // series before the first event.
    for reason in CLOSE_REASONS {
        counter!("chatgate_connections_closed_total", "reason" => *reason).absolute(0);
    }
    for transport in ["ws", "rest"] {
        counter!("chatgate_messages_received_total", "transport" => transport).absolute(0);
    }
    for limit in ["messages", "typing", "connects", "rest", "connection_cap"] {
        counter!("chatgate_rate_limited_total", "limit" => limit).absolute(0);
    }
    for code in [
        "missing_token",
        "invalid_token",
        "invalid_request",
        "auth_unavailable",
        "origin_not_allowed",
    ] {
        counter!("chatgate_auth_rejections_total", "code" => code).absolute(0);
    }
    counter!("chatgate_pubsub_reconnects_total").absolute(0);
    gauge!("chatgate_connections").set(0.0);
    for limit in ["per_ip", "process"] {
        counter!("chatgate_http_connections_refused_total", "limit" => limit).absolute(0);
    }
    for phase in ["idle", "header", "handshake"] {
        counter!("chatgate_http_timeouts_total", "phase" => phase).absolute(0);
    }
}

/// The `reason` values of `chatgate_connections_closed_total`.
pub const CLOSE_REASONS: &[&str] = &[
    "client_closed",
    "going_away",
    "too_slow",
    "heartbeat_timeout",
    "token_expired",
    "policy",
    "too_big",
    "frame_too_large",
    "error",
];

/// One open WebSocket session in the connection metrics. Dropped without
/// [`OpenConnection::closed`] (the session task panicked) it counts as closed by `error`,
/// so the gauge never drifts.
pub struct OpenConnection {
    reason: Option<&'static str>,
}

impl OpenConnection {
    pub fn opened() -> Self {
        counter!("chatgate_connections_opened_total").increment(1);
        gauge!("chatgate_connections").increment(1.0);
        Self { reason: None }
    }

    pub fn closed(mut self, reason: &'static str) {
        self.reason = Some(reason);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or("error");
        counter!("chatgate_connections_closed_total", "reason" => reason).increment(1);
        gauge!("chatgate_connections").decrement(1.0);
    }
}

/// Tasks alive in the async runtime (sessions, joins, background work), set on scrape:
/// flat under steady churn, or something leaks.
pub fn runtime_tasks(count: usize) {
    gauge!("chatgate_runtime_tasks").set(count as f64);
}

pub fn message_received(transport: &'static str) {
    counter!("chatgate_messages_received_total", "transport" => transport).increment(1);
}

pub fn message_refused(reason: &'static str) {
    counter!("chatgate_messages_refused_total", "reason" => reason).increment(1);
}

/// The hub's own counters (kept as plain atomics on the fan-out path), copied into the
/// registry when `/metrics` is scraped.
/// (Sessions closed for reading too slowly are `chatgate_connections_closed_total`
/// with `reason="too_slow"`; the frames they leave queued are not counted.)
pub fn hub_totals(delivered: u64, dropped_typing: u64) {
    counter!("chatgate_frames_delivered_total").absolute(delivered);
    counter!("chatgate_frames_dropped_total", "reason" => "typing_backpressure")
        .absolute(dropped_typing);
}

/// 1 while Redis is past `redis.storage_full_ratio` of its `maxmemory` (media refused).
pub fn store_full(full: bool) {
    gauge!("chatgate_store_full").set(if full { 1.0 } else { 0.0 });
}

pub fn rate_limited(limit: &'static str) {
    counter!("chatgate_rate_limited_total", "limit" => limit).increment(1);
}

pub fn auth_rejected(code: &'static str) {
    counter!("chatgate_auth_rejections_total", "code" => code).increment(1);
}

pub fn redis_command(op: &'static str, elapsed: Duration, ok: bool) {
    histogram!("chatgate_redis_command_duration_seconds", "op" => op).record(elapsed.as_secs_f64());
    if !ok {
        counter!("chatgate_redis_errors_total", "op" => op).increment(1);
    }
}

pub fn pubsub_reconnected() {
    counter!("chatgate_pubsub_reconnects_total").increment(1);
}

pub fn pubsub_lag(lag: Duration) {
    histogram!("chatgate_pubsub_lag_seconds").record(lag.as_secs_f64());
}

pub fn http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    histogram!(
        "chatgate_http_request_duration_seconds",
        "method" => method.to_string(),
        "route" => route.to_string(),
        "status" => status.to_string(),
    )
    .record(elapsed.as_secs_f64());
}

/// A large payload refused because the payload budget stayed full for its whole wait.
pub fn payload_budget_refused() {
    metrics::counter!("chatgate_payload_budget_refused_total").increment(1);
}

/// One open TCP connection on the public listener in `chatgate_http_connections`, until
/// dropped.
pub struct OpenHttpConnection(());

impl OpenHttpConnection {
    pub fn opened() -> Self {
        gauge!("chatgate_http_connections").increment(1.0);
        Self(())
    }
}

impl Drop for OpenHttpConnection {
    fn drop(&mut self) {
        gauge!("chatgate_http_connections").decrement(1.0);
    }
}

/// A TCP connection refused by a cap of the public listener: `per_ip` or `process`.
pub fn http_connection_refused(limit: &'static str) {
    counter!("chatgate_http_connections_refused_total", "limit" => limit).increment(1);
}

/// A connection or handshake cut off by a timeout: `idle`, `header` or `handshake`.
pub fn http_timeout(phase: &'static str) {
    counter!("chatgate_http_timeouts_total", "phase" => phase).increment(1);
}
