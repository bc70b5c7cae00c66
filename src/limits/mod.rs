//! Abuse limits: message, typing, connection and REST rates, and connection caps.
//!
//! | limit | key | where decided |
//! |---|---|---|
//! | messages (WebSocket and REST) | user | Redis (one GCRA script, Redis's clock), so replicas share one budget; locally when Redis does not answer within `limits.redis_timeout_ms` (never unlimited) |
//! | media bytes (images and audio, WebSocket and REST) | user | Redis, like messages; in KiB |
//! | message deletes | user | Redis, like messages |
//! | typing events | user | locally; extra events are dropped (and count as refused frames) |
//! | new WebSocket connections | client IP (IPv6 by /64) | locally |
//! | REST requests to `/api/` | client IP (IPv6 by /64) | locally |
//! | concurrent connections | client IP, user, process | locally, released when the session ends |
//! | concurrent TCP connections (the public listener) | peer IP (not trusted proxies), process | locally, in the accept loop ([`crate::http::listener`]) |
//!
//! Keyed local limiters are pruned every [`PRUNE_EVERY`]: keys whose bucket is full again
//! are dropped, so memory follows the clients active in the last minutes, not every key
//! ever seen. Keys are client IPs decided by [`crate::http::client_ip`], so spoofed
//! `X-Forwarded-For` values from untrusted peers all collapse to the peer's address.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::LimitsConfig;
use crate::store::RateStore;

pub mod payload;

/// Bytes per unit of the media quota: budgets count KiB, so a 10 MiB clip costs 10,240
/// units and a day of uploads fits the limiter's 32-bit counts.
pub const MEDIA_UNIT_BYTES: usize = 1024;

/// How often keyed limiters drop keys that are back to a full bucket.
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// One limiter's answer, with what the RateLimit headers need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Requests left in the burst.
    pub remaining: u32,
    /// When refused: how long until one more is allowed.
    pub retry_after: Duration,
    /// How long until the burst is whole again.
    pub reset: Duration,
    pub policy: Policy,
}

/// A named rate: `quota` requests per `window` seconds (the burst, and the time it takes
/// to refill), as `RateLimit-Policy` states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub name: &'static str,
    pub quota: u32,
    pub window_secs: u64,
    /// Time per request at the sustained rate.
    pub emission: Duration,
}

impl Policy {
    fn new(name: &'static str, per_minute: u32, burst: u32) -> Self {
        let emission = Duration::from_secs(60) / per_minute.max(1);
        Self {
            name,
            quota: burst.max(1),
            window_secs: ceil_secs(emission * burst.max(1)),
            emission,
        }
    }

    fn quota(&self) -> Quota {
        Quota::with_period(self.emission)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(self.quota).unwrap_or(NonZeroU32::MIN))
    }
}

impl Verdict {
    /// `Retry-After` in whole seconds: rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after).max(1)
    }

    /// `"<name>";q=<quota>;w=<window>` (draft-ietf-httpapi-ratelimit-headers-11).
    pub fn policy_item(&self) -> String {
        format!(
            "\"{}\";q={};w={}",
            self.policy.name, self.policy.quota, self.policy.window_secs
        )
    }

    /// `"<name>";r=<remaining>;t=<seconds>`: `t` is the wait before the next request when
    /// refused, else until the burst is whole again.
    pub fn limit_item(&self) -> String {
        let t = if self.allowed {
            ceil_secs(self.reset)
        } else {
            self.retry_after_secs()
        };
        format!("\"{}\";r={};t={}", self.policy.name, self.remaining, t)
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Verdicts gathered while answering one request, turned into `RateLimit` and
/// `RateLimit-Policy` headers by [`write_headers`].
#[derive(Debug, Clone, Default)]
pub struct RateHeaders(pub Vec<Verdict>);

/// Appends one list member per verdict to `RateLimit-Policy` and `RateLimit`.
pub fn write_headers(headers: &mut HeaderMap, verdicts: &[Verdict]) {
    if verdicts.is_empty() {
        return;
    }
    let join = |f: fn(&Verdict) -> String| verdicts.iter().map(f).collect::<Vec<_>>().join(", ");
    if let Ok(v) = HeaderValue::from_str(&join(Verdict::policy_item)) {
        headers.insert("ratelimit-policy", v);
    }
    if let Ok(v) = HeaderValue::from_str(&join(Verdict::limit_item)) {
        headers.insert("ratelimit", v);
    }
}

/// Bytes as media quota units, rounded up (at least 1).
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(MEDIA_UNIT_BYTES as u64).max(1)).unwrap_or(u32::MAX)
}

/// IPv4 addresses as they are; IPv6 by /64 (one subscriber's network, RFC 6177).
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// A local keyed limiter that reports what is left.
pub struct Keyed<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: RateLimiter<K, DashMapStateStore<K>, C, StateInformationMiddleware>,
    policy: Policy,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    pub fn new(policy: Policy) -> Self {
        Self::with_clock(policy, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock> Keyed<K, C> {
    pub fn with_clock(policy: Policy, clock: C) -> Self {
        Self {
            limiter: RateLimiter::dashmap_with_clock(policy.quota(), clock)
                .with_middleware::<StateInformationMiddleware>(),
            policy,
        }
    }

    pub fn check(&self, key: &K) -> Verdict {
        self.check_n(key, 1)
    }

    /// Takes `cost` units at once; a cost above the burst is never allowed (it waits for
    /// the whole burst, the longest any answer can say).
    pub fn check_n(&self, key: &K, cost: u32) -> Verdict {
        let Some(n) = NonZeroU32::new(cost) else {
            return Verdict {
                allowed: true,
                remaining: self.policy.quota,
                retry_after: Duration::ZERO,
                reset: Duration::ZERO,
                policy: self.policy,
            };
        };
        let decided = match self.limiter.check_key_n(key, n) {
            Ok(decided) => decided,
            Err(_) => {
                let whole = self.policy.emission * self.policy.quota;
                return Verdict {
                    allowed: false,
                    remaining: 0,
                    retry_after: whole,
                    reset: whole,
                    policy: self.policy,
                };
            }
        };
        match decided {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                Verdict {
                    allowed: true,
                    remaining,
                    retry_after: Duration::ZERO,
                    reset: self.policy.emission
                        * (self.policy.quota - remaining.min(self.policy.quota)),
                    policy: self.policy,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Verdict {
                    allowed: false,
                    remaining: 0,
                    retry_after: wait,
                    reset: wait + self.policy.emission * (self.policy.quota - 1),
                    policy: self.policy,
                }
            }
        }
    }

    /// Drops keys whose bucket is whole again, and the memory they held.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a connection was refused by a cap (a WebSocket session's, or a TCP connection's
/// on the public listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many connections from this client IP.
    PerIp,
    /// Too many connections of this user.
    PerUser,
    /// This process holds its maximum (`limits.max_connections` for WebSocket sessions,
    /// `server.max_connections` for TCP connections) already.
    Full,
}

#[derive(Default)]
struct Counts {
    total: u32,
    per_ip: HashMap<IpAddr, u32>,
    per_user: HashMap<String, u32>,
}

/// Concurrent connection counts. Entries exist only for live connections.
pub struct Caps {
    counts: Mutex<Counts>,
    max_total: u32,
    max_per_ip: u32,
    max_per_user: u32,
}

impl Caps {
    /// Caps of `max_total` connections, `max_per_ip` per address (IPv6 by /64) and
    /// `max_per_user` per user (`u32::MAX`: no cap of that kind).
    pub fn new(max_total: u32, max_per_ip: u32, max_per_user: u32) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(Counts::default()),
            max_total,
            max_per_ip,
            max_per_user,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new connection from `ip` under the process and per-IP caps; `None`
    /// counts it under the process cap only (a peer whose clients are not known yet).
    ///
    /// # Errors
    /// [`Refusal::Full`] or [`Refusal::PerIp`].
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Permit, Refusal> {
        let ip = ip.map(ip_key);
        let mut counts = self.lock();
        if counts.total >= self.max_total {
            return Err(Refusal::Full);
        }
        if let Some(ip) = ip {
            let n = counts.per_ip.get(&ip).copied().unwrap_or(0);
            if n >= self.max_per_ip {
                return Err(Refusal::PerIp);
            }
            counts.per_ip.insert(ip, n + 1);
        }
        counts.total += 1;
        drop(counts);
        Ok(Permit {
            caps: self.clone(),
            ip,
            user: None,
        })
    }

    /// Connections holding a place.
    pub fn open(&self) -> u32 {
        self.lock().total
    }
}

fn decrement<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// A connection's place under the caps; dropping it gives the place back.
pub struct Permit {
    caps: Arc<Caps>,
    ip: Option<IpAddr>,
    user: Option<String>,
}

impl Permit {
    /// Counts the connection against its user too.
    ///
    /// # Errors
    /// [`Refusal::PerUser`] (the permit is dropped, releasing the IP's place).
    pub fn for_user(mut self, user: &str) -> Result<Self, Refusal> {
        let mut counts = self.caps.lock();
        let n = counts.per_user.get(user).copied().unwrap_or(0);
        if n >= self.caps.max_per_user {
            drop(counts);
            return Err(Refusal::PerUser);
        }
        counts.per_user.insert(user.to_string(), n + 1);
        drop(counts);
        self.user = Some(user.to_string());
        Ok(self)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.caps.lock();
        counts.total -= 1;
        if let Some(ip) = &self.ip {
            decrement(&mut counts.per_ip, ip);
        }
        if let Some(user) = &self.user {
            decrement(&mut counts.per_user, user);
        }
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("tracked_keys", &self.tracked_keys())
            .field("open_connections", &self.open_connections())
            .finish_non_exhaustive()
    }
}

/// Every limit of one process.
pub struct Limits {
    shared: Option<Arc<dyn RateStore>>,
    redis_timeout: Duration,
    messages: Keyed<String>,
    media: Keyed<String>,
    deletes: Keyed<String>,
    channels: Keyed<String>,
    typing: Keyed<String>,
    connects: Keyed<IpAddr>,
    rest: Keyed<IpAddr>,
    caps: Arc<Caps>,
    /// Client address → until when it may not open WebSockets (closed for abuse).
    penalties: Mutex<HashMap<IpAddr, Instant>>,
    penalty: Duration,
    pub refusals_before_close: u32,
    pub headers: bool,
}

impl Limits {
    /// `None` when `limits.enabled` is false. `shared` is where message budgets live
    /// across replicas (Redis); without it they are per process.
    pub fn new(config: &LimitsConfig, shared: Option<Arc<dyn RateStore>>) -> Option<Self> {
        if !config.enabled {
            return None;
        }
        Some(Self {
            shared,
            redis_timeout: Duration::from_millis(config.redis_timeout_ms),
            messages: Keyed::new(Policy::new(
                "messages",
                config.messages_per_minute,
                config.message_burst,
            )),
            media: Keyed::new(Policy::new(
                "media",
                kib(config.media_bytes_per_minute),
                kib(config.media_burst_bytes),
            )),
            deletes: Keyed::new(Policy::new(
                "deletes",
                config.deletes_per_minute,
                config.delete_burst,
            )),
            channels: Keyed::new(Policy::new(
                "channels",
                config.channels_per_minute,
                config.channel_burst,
            )),
            typing: Keyed::new(Policy::new(
                "typing",
                config.typing_per_minute,
                config.typing_burst,
            )),
            connects: Keyed::new(Policy::new(
                "connects",
                config.connects_per_minute_per_ip,
                config.connect_burst_per_ip,
            )),
            rest: Keyed::new(Policy::new(
                "rest",
                config.rest_per_minute_per_ip,
                config.rest_burst_per_ip,
            )),
            caps: Caps::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.max_connections_per_user,
            ),
            penalties: Mutex::new(HashMap::new()),
            penalty: Duration::from_secs(config.abuse_penalty_secs),
            refusals_before_close: config.ws_close_after_refused,
            headers: config.headers,
        })
    }

    fn penalties(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        self.penalties
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One of `ip`'s sockets was closed for refused frames: it may not open WebSockets
    /// for `limits.abuse_penalty_secs`.
    pub fn penalize(&self, ip: IpAddr) {
        self.penalize_at(ip, Instant::now());
    }

    fn penalize_at(&self, ip: IpAddr, now: Instant) {
        if !self.penalty.is_zero() {
            self.penalties().insert(ip_key(ip), now + self.penalty);
        }
    }

    /// How long `ip` still serves its penalty, if it does.
    fn penalty_left(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let until = *self.penalties().get(&ip_key(ip))?;
        (until > now).then(|| until - now)
    }

    /// `cost` units of `key` from `local`'s policy: from the shared budget, or the local
    /// one when Redis does not answer in time (never unlimited).
    async fn take(&self, local: &Keyed<String>, key: String, cost: u32) -> Verdict {
        let policy = local.policy;
        if let Some(shared) = &self.shared {
            let take = shared.take(&key, policy.emission, policy.quota, cost);
            match tokio::time::timeout(self.redis_timeout, take).await {
                Ok(Ok(outcome)) => {
                    let span = tracing::Span::current();
                    span.record("allowed", outcome.allowed);
                    span.record("decided", "shared");
                    return Verdict {
                        allowed: outcome.allowed,
                        remaining: outcome.remaining,
                        retry_after: outcome.retry_after,
                        reset: outcome.reset_after,
                        policy,
                    };
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e.0, limit = policy.name, "shared rate limit unavailable; deciding locally");
                }
                Err(_) => {
                    tracing::warn!(
                        limit = policy.name,
                        "shared rate limit timed out; deciding locally"
                    );
                }
            }
        }
        let verdict = local.check_n(&key, cost);
        let span = tracing::Span::current();
        span.record("allowed", verdict.allowed);
        span.record("decided", "local");
        verdict
    }

    /// One message of `user`.
    pub async fn message(&self, user: &str) -> Verdict {
        self.take(&self.messages, format!("msg:{user}"), 1).await
    }

    /// `bytes` of media from `user` (charged in [`MEDIA_UNIT_BYTES`] units, rounded up).
    pub async fn media(&self, user: &str, bytes: usize) -> Verdict {
        let units = u32::try_from(bytes.div_ceil(MEDIA_UNIT_BYTES)).unwrap_or(u32::MAX);
        let verdict = self.take(&self.media, format!("media:{user}"), units).await;
        if !verdict.allowed {
            crate::metrics::rate_limited("media");
        }
        verdict
    }

    /// One message delete by `user`.
    pub async fn delete(&self, user: &str) -> Verdict {
        let verdict = self.take(&self.deletes, format!("del:{user}"), 1).await;
        if !verdict.allowed {
            crate::metrics::rate_limited("deletes");
        }
        verdict
    }

    /// One channel created by `user` (the first message stored in it).
    pub async fn channel(&self, user: &str) -> Verdict {
        let verdict = self.take(&self.channels, format!("chan:{user}"), 1).await;
        if !verdict.allowed {
            crate::metrics::rate_limited("channels");
        }
        verdict
    }

    /// One message attempt of `user` (WebSocket or REST): [`Limits::message`] in its own
    /// `ratelimit.check` span; a refusal is counted and recorded as the current span's
    /// `outcome`.
    pub async fn message_attempt(&self, user: &str) -> Verdict {
        let verdict = self
            .message(user)
            .instrument(tracing::debug_span!(
                "ratelimit.check",
                limit = "messages",
                allowed = tracing::field::Empty,
                decided = tracing::field::Empty,
            ))
            .await;
        if !verdict.allowed {
            crate::metrics::rate_limited("messages");
            crate::metrics::message_refused("rate_limited");
            tracing::Span::current().record("outcome", "rate_limited");
        }
        verdict
    }

    /// Whether a typing event of `user` may go out (extra ones are dropped silently).
    pub fn typing(&self, user: &str) -> bool {
        self.typing.check(&user.to_string()).allowed
    }

    /// A new WebSocket connection from `ip`: refused while the address serves an abuse
    /// penalty, otherwise counted against its connection rate.
    pub fn connect(&self, ip: IpAddr) -> Verdict {
        self.connect_at(ip, Instant::now())
    }

    fn connect_at(&self, ip: IpAddr, now: Instant) -> Verdict {
        if let Some(left) = self.penalty_left(ip, now) {
            return Verdict {
                allowed: false,
                remaining: 0,
                retry_after: left,
                reset: left,
                policy: self.connects.policy,
            };
        }
        self.connects.check(&ip_key(ip))
    }

    /// A REST request to `/api/` from `ip`.
    pub fn rest(&self, ip: IpAddr) -> Verdict {
        self.rest.check(&ip_key(ip))
    }

    /// A place for a new connection from `ip` under the process and per-IP caps.
    ///
    /// # Errors
    /// [`Refusal::Full`] or [`Refusal::PerIp`].
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        self.caps.admit(Some(ip))
    }

    /// Keys held by the local keyed limiters (messages, typing, connects, REST).
    pub fn tracked_keys(&self) -> usize {
        self.messages.len()
            + self.media.len()
            + self.deletes.len()
            + self.channels.len()
            + self.typing.len()
            + self.connects.len()
            + self.rest.len()
    }

    /// Open connections counted under the caps.
    pub fn open_connections(&self) -> u32 {
        self.caps.open()
    }

    pub fn prune(&self) {
        let now = Instant::now();
        self.penalties().retain(|_, until| *until > now);
        self.messages.prune();
        self.media.prune();
        self.deletes.prune();
        self.channels.prune();
        self.typing.prune();
        self.connects.prune();
        self.rest.prune();
    }

    /// Prunes every [`PRUNE_EVERY`] until `stop`.
    pub async fn keep_pruned(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => self.prune(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn policy(per_minute: u32, burst: u32) -> Policy {
        Policy::new("test", per_minute, burst)
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let clock = FakeRelativeClock::default();
        let keyed: Keyed<&str, _> = Keyed::with_clock(policy(60, 3), clock.clone());
        let remaining: Vec<u32> = (0..3).map(|_| keyed.check(&"k").remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let refused = keyed.check(&"k");
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(refused.retry_after_secs(), 1);
        assert!(keyed.check(&"other").allowed, "keys are separate");
        clock.advance(Duration::from_secs(1));
        assert!(keyed.check(&"k").allowed);
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        let v = |ms| Verdict {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_millis(ms),
            reset: Duration::ZERO,
            policy: policy(60, 1),
        };
        assert_eq!(v(1).retry_after_secs(), 1);
        assert_eq!(v(0).retry_after_secs(), 1);
        assert_eq!(v(1000).retry_after_secs(), 1);
        assert_eq!(v(1001).retry_after_secs(), 2);
    }

    #[test]
    fn headers_use_the_draft_11_syntax() {
        let clock = FakeRelativeClock::default();
        let keyed: Keyed<u8, _> = Keyed::with_clock(Policy::new("rest", 600, 100), clock);
        let first = keyed.check(&1);
        let mut headers = HeaderMap::new();
        write_headers(&mut headers, &[first]);
        assert_eq!(headers["ratelimit-policy"], "\"rest\";q=100;w=10");
        assert_eq!(headers["ratelimit"], "\"rest\";r=99;t=1");
        let two = [
            keyed.check(&1),
            Verdict {
                policy: Policy::new("messages", 60, 20),
                ..keyed.check(&2)
            },
        ];
        write_headers(&mut headers, &two);
        assert_eq!(
            headers["ratelimit-policy"],
            "\"rest\";q=100;w=10, \"messages\";q=20;w=20"
        );
    }

    #[test]
    fn pruning_forgets_keys_whose_bucket_refilled() {
        let clock = FakeRelativeClock::default();
        let keyed: Keyed<u32, _> = Keyed::with_clock(policy(600, 2), clock.clone());
        for key in 0..100_000 {
            keyed.check(&key);
        }
        assert_eq!(keyed.len(), 100_000);
        clock.advance(Duration::from_secs(1));
        keyed.prune();
        assert_eq!(keyed.len(), 0, "100,000 idle keys are all dropped");
    }

    #[test]
    fn ipv6_clients_share_a_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(ip_key(v4), v4);
    }

    fn config() -> LimitsConfig {
        LimitsConfig {
            enabled: true,
            messages_per_minute: 60,
            message_burst: 10,
            typing_per_minute: 60,
            typing_burst: 10,
            connects_per_minute_per_ip: 60,
            connect_burst_per_ip: 10,
            max_connections_per_ip: 2,
            max_connections_per_user: 1,
            max_connections: 3,
            rest_per_minute_per_ip: 60,
            rest_burst_per_ip: 10,
            ws_close_after_refused: 5,
            abuse_penalty_secs: 10,
            redis_timeout_ms: 100,
            headers: true,
            media_bytes_per_minute: 60 * 1024,
            media_burst_bytes: 10 * 1024,
            deletes_per_minute: 60,
            delete_burst: 3,
            channels_per_minute: 1,
            channel_burst: 2,
        }
    }

    #[tokio::test]
    async fn media_is_charged_by_bytes_and_a_clip_over_the_burst_never_fits() {
        let limits = Limits::new(&config(), None).unwrap();
        // The burst is 10 KiB: 4 KiB, 4 KiB, then 4 KiB is over it.
        assert!(limits.media("ann", 4096).await.allowed);
        assert!(limits.media("ann", 4000).await.allowed);
        let refused = limits.media("ann", 4096).await;
        assert!(!refused.allowed);
        assert!(refused.retry_after > Duration::ZERO);
        assert_eq!(refused.policy.name, "media");
        // Another user has a budget of their own; more than a whole burst never passes.
        assert!(limits.media("bob", 1).await.allowed);
        assert!(!limits.media("bob", 11 * 1024).await.allowed);
        // Deletes are a budget of their own too.
        for _ in 0..3 {
            assert!(limits.delete("ann").await.allowed);
        }
        assert!(!limits.delete("ann").await.allowed);
    }

    #[test]
    fn a_penalized_address_is_refused_until_its_penalty_ends() {
        let limits = Limits::new(&config(), None).unwrap();
        let ip: IpAddr = "2001:db8:7::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:7::2".parse().unwrap();
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        assert!(limits.connect_at(ip, t0).allowed);
        limits.penalize_at(ip, t0);
        let refused = limits.connect_at(same_64, t0 + Duration::from_secs(4));
        assert!(!refused.allowed, "the /64 serves the penalty");
        assert_eq!(refused.retry_after, Duration::from_secs(6));
        assert_eq!(refused.retry_after_secs(), 6);
        assert!(
            limits.connect_at(other, t0).allowed,
            "other addresses are not"
        );
        assert!(limits.connect_at(ip, t0 + Duration::from_secs(10)).allowed);
        // Expired penalties are pruned.
        limits.penalize_at(other, t0 - Duration::from_secs(60));
        limits.prune();
        assert_eq!(limits.penalties().len(), 1);
    }

    #[test]
    fn no_penalty_when_it_is_off() {
        let mut off = config();
        off.abuse_penalty_secs = 0;
        let limits = Limits::new(&off, None).unwrap();
        let ip: IpAddr = "192.0.2.8".parse().unwrap();
        limits.penalize(ip);
        assert!(limits.connect(ip).allowed);
    }

    #[test]
    fn spoofed_forwarded_for_values_collapse_to_one_key() {
        let resolver = crate::http::client_ip::ClientIpResolver::new(&[]);
        let limits = Limits::new(&config(), None).unwrap();
        let peer: IpAddr = "198.51.100.9".parse().unwrap();
        for i in 0..100_000u32 {
            let mut headers = HeaderMap::new();
            let [a, b, c, d] = i.to_be_bytes();
            let spoofed = format!("{a}.{b}.{c}.{d}, 2001:db8::{i:x}");
            headers.insert("x-forwarded-for", HeaderValue::from_str(&spoofed).unwrap());
            limits.rest(resolver.resolve(peer, &headers));
        }
        assert_eq!(limits.tracked_keys(), 1, "100,000 spoofed values, one key");
    }

    #[test]
    fn caps_count_live_connections_only() {
        let limits = Limits::new(&config(), None).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let a = limits.admit(ip).unwrap().for_user("alice").unwrap();
        assert_eq!(
            limits.admit(ip).unwrap().for_user("alice").err(),
            Some(Refusal::PerUser)
        );
        let b = limits.admit(ip).unwrap();
        assert_eq!(limits.admit(ip).err(), Some(Refusal::PerIp));
        let c = limits.admit(other).unwrap();
        assert_eq!(limits.admit(other).err(), Some(Refusal::Full));
        drop((a, b, c));
        assert_eq!(limits.open_connections(), 0);
        assert!(limits.caps.lock().per_ip.is_empty());
        assert!(limits.caps.lock().per_user.is_empty());
        assert!(limits.admit(ip).unwrap().for_user("alice").is_ok());
    }

    #[test]
    fn unkeyed_connections_count_under_the_process_cap_only() {
        let caps = Caps::new(3, 1, u32::MAX);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = caps.admit(None).unwrap();
        let b = caps.admit(None).unwrap();
        let c = caps.admit(Some(ip)).unwrap();
        assert_eq!(caps.admit(None).err(), Some(Refusal::Full));
        drop(a);
        assert_eq!(caps.admit(Some(ip)).err(), Some(Refusal::PerIp));
        drop((b, c));
        assert_eq!(caps.open(), 0);
        assert!(caps.lock().per_ip.is_empty());
    }
}
