//! The Redis store. The key layout lives here and nowhere else (see docs/redis.md):
//!
//! | key | type | what |
//! |---|---|---|
//! | `chat:<ch>:messages` | list | history, newest first, capped, TTL refreshed per message (the original's key) |
//! | `chat:<ch>:events` | pub/sub channel | bus events of the channel |
//! | `chat:<ch>:presence` | sorted set | user → deadline (ms) of their freshest connection |
//! | `chat:<ch>:presence:<user>` | sorted set | connection key → deadline (ms) |
//! | `typing:<ch>:<user>` | string | `typing`, with the typing TTL (the original's key) |
//! | `chat:channels` | sorted set | channel → time of its last message (s), replaces `KEYS chat:*` |
//!
//! All keys carry `redis.key_prefix`. Every multi-step write is one Lua script that also
//! publishes the matching event, and scripts take time from Redis (`TIME`), never from a
//! replica's clock, so replicas with skewed clocks agree on presence deadlines.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{
    Deleted, PresenceEntry, PresenceMember, RateOutcome, RateStore, Store, StoreError, StoreResult,
    StoreSettings,
};
use crate::chat::model::{ChannelName, MessageId, Username};
use crate::config::RedisConfig;

/// Names of every key and pub/sub channel, with the configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn history(&self, ch: &ChannelName) -> String {
        format!("{}chat:{ch}:messages", self.prefix)
    }

    pub fn events(&self, ch: &str) -> String {
        format!("{}chat:{ch}:events", self.prefix)
    }

    /// The chat channel a bus channel name belongs to, if it is one of ours.
    pub fn channel_of_events<'a>(&self, bus_channel: &'a str) -> Option<&'a str> {
        bus_channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("chat:")?
            .strip_suffix(":events")
    }

    pub fn presence_users(&self, ch: &ChannelName) -> String {
        format!("{}chat:{ch}:presence", self.prefix)
    }

    pub fn presence_conns(&self, ch: &ChannelName, user: &str) -> String {
        format!("{}chat:{ch}:presence:{user}", self.prefix)
    }

    pub fn typing(&self, ch: &ChannelName, user: &Username) -> String {
        format!("{}typing:{ch}:{user}", self.prefix)
    }

    pub fn channels(&self) -> String {
        format!("{}chat:channels", self.prefix)
    }

    /// A shared rate budget (`msg:<user>` for messages).
    pub fn rate(&self, key: &str) -> String {
        format!("{}ratelimit:{key}", self.prefix)
    }
}

/// Milliseconds now, from Redis's clock. Shared prelude of the presence scripts.
const NOW_MS: &str = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// KEYS: history. ARGV: limit, byte budget. The newest entries, newest first, read a page
/// at a time so that a channel of large media never has to come back whole; stops at
/// `limit` entries or before the budget would be exceeded (the newest entry always comes
/// back). Atomic, so concurrent appends cannot shift a page under it. Returns
/// {truncated (0/1), entries}.
const HISTORY: &str = r"
local limit = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local out = {}
local used = 0
local start = 0
while #out < limit do
  local stop = math.min(start + 15, limit - 1)
  local items = redis.call('LRANGE', KEYS[1], start, stop)
  if #items == 0 then break end
  for _, item in ipairs(items) do
    if #out > 0 and used + #item > budget then
      return {1, out}
    end
    used = used + #item
    out[#out + 1] = item
  end
  start = stop + 1
end
return {0, out}
";

/// KEYS: the budget. ARGV: emission interval in ms, burst. GCRA: the key holds the
/// theoretical arrival time (TAT) in ms of Redis's clock, so replicas with skewed clocks
/// still share one budget. Returns allowed (0/1), remaining, retry-after ms, reset ms.
const RATE: &str = r"
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - emission * burst
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((now - allow_at) / emission), 0, new_tat - now}
";

/// KEYS: history, channels. ARGV: entry, cap, ttl secs, channel name, bus channel, event.
/// ARGV[7] is `1` when this replica has not refreshed the channel's TTL and registry entry
/// for a while; a new list (length 1) is always refreshed, so no history key is ever left
/// without its TTL.
const APPEND: &str = r"
local len = redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
if ARGV[7] == '1' or len == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], t[1], ARGV[4])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
";

/// How often one replica refreshes a busy channel's history TTL and registry entry. Doing
/// it on every message cost about a third of the append script's time in Redis; a TTL of
/// days lags by at most this much.
const TOUCH_EVERY: Duration = Duration::from_secs(30);
/// Channels remembered as recently touched before old entries are pruned.
const TOUCH_MEMORY: usize = 10_000;

/// KEYS: history, channels. ARGV: message id, bus channel, event, channel name, owner
/// (empty: anyone's). Returns 1 deleted, 0 not found, 2 found but owned by someone else.
/// Scans newest first, a page at a time (entries can be large), for entries holding the
/// quoted id (so compact and spaced JSON, ours and the original's, both match); a decode
/// confirms the match. The id is checked by the caller to be letters, digits and `-`.
const DELETE: &str = r#"
local needle = '"' .. ARGV[1] .. '"'
local len = redis.call('LLEN', KEYS[1])
local start = 0
while start < len do
 local items = redis.call('LRANGE', KEYS[1], start, start + 49)
 start = start + 50
 for _, item in ipairs(items) do
  if string.find(item, needle, 1, true) then
    local ok, decoded = pcall(cjson.decode, item)
    if ok and type(decoded) == 'table' and decoded['message_id'] == ARGV[1] then
      if ARGV[5] ~= '' and decoded['sender'] ~= ARGV[5] then
        return 2
      end
      redis.call('LREM', KEYS[1], 1, item)
      if redis.call('EXISTS', KEYS[1]) == 0 then
        redis.call('ZREM', KEYS[2], ARGV[4])
      end
      redis.call('PUBLISH', ARGV[2], ARGV[3])
      return 1
    end
  end
 end
end
return 0
"#;

/// KEYS: channels. ARGV: history ttl secs. Drops entries whose history has expired.
const CHANNELS: &str = r"
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(t[1]) - tonumber(ARGV[1])))
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// KEYS: user's connections, channel's users.
/// ARGV: conn key, user, ttl ms, bus channel, user_joined event, join marker.
const JOIN: &str = r"
local ttl = tonumber(ARGV[3])
local deadline = now + ttl
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local before = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('ZADD', KEYS[2], 'GT', deadline, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl * 2)
if before == 0 then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
end
redis.call('PUBLISH', ARGV[4], ARGV[6])
return 0
";

/// KEYS: user's connections, channel's users. ARGV: conn key, user, bus channel, event.
const LEAVE: &str = r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 and redis.call('ZSCORE', KEYS[2], ARGV[2]) == false then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then
  redis.call('ZADD', KEYS[2], newest[2], ARGV[2])
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// KEYS: channel's users, then one connections key per member.
/// ARGV: ttl ms, then user and conn key per member.
/// Only connections still present are extended (one that left meanwhile must not come
/// back); the 0-based positions of the missing ones are returned.
const REFRESH: &str = r"
local ttl = tonumber(ARGV[1])
local deadline = now + ttl
local missing = {}
for i = 2, #KEYS do
  local user = ARGV[2 * i - 2]
  local conn = ARGV[2 * i - 1]
  if redis.call('ZSCORE', KEYS[i], conn) then
    redis.call('ZADD', KEYS[i], deadline, conn)
    redis.call('PEXPIRE', KEYS[i], ttl * 2)
    redis.call('ZADD', KEYS[1], 'GT', deadline, user)
  else
    missing[#missing + 1] = i - 2
  end
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return missing
";

/// KEYS: channel's users. Returns live users with their deadlines.
const ONLINE: &str = r"
return redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE', 'WITHSCORES')
";

/// KEYS: typing key. ARGV: 1 or 0, ttl secs, bus channel, event.
const TYPING: &str = r"
if ARGV[1] == '1' then
  redis.call('SET', KEYS[1], 'typing', 'EX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// Most members refreshed by one script call, so no single call holds Redis for long.
const REFRESH_BATCH: usize = 500;

struct Scripts {
    append: Script,
    delete: Script,
    channels: Script,
    join: Script,
    leave: Script,
    refresh: Script,
    online: Script,
    typing: Script,
    rate: Script,
    history: Script,
}

impl Scripts {
    fn new() -> Self {
        let timed = |body: &str| Script::new(&format!("{NOW_MS}{body}"));
        Self {
            append: Script::new(APPEND),
            delete: Script::new(DELETE),
            channels: Script::new(CHANNELS),
            join: timed(JOIN),
            leave: timed(LEAVE),
            refresh: timed(REFRESH),
            rate: timed(RATE),
            history: Script::new(HISTORY),
            online: timed(ONLINE),
            typing: Script::new(TYPING),
        }
    }
}

pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    settings: StoreSettings,
    scripts: Scripts,
    /// Channel → when this replica last refreshed its TTL and registry entry.
    touched: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError(e.to_string())
}

/// Times one store operation (one Redis round trip, or a few for the batched refresh)
/// into `chatgate_redis_command_duration_seconds`, and counts its failures. An operation
/// dropped before it finished (its caller gave up, as the rate limiter does after
/// `limits.redis_timeout_ms`) counts as failed too: a slow Redis must show in the errors.
struct Timer {
    op: &'static str,
    started: std::time::Instant,
    failed: std::cell::Cell<bool>,
    succeeded: std::cell::Cell<bool>,
}

impl Timer {
    fn start(op: &'static str) -> Self {
        Self {
            op,
            started: std::time::Instant::now(),
            failed: std::cell::Cell::new(false),
            succeeded: std::cell::Cell::new(false),
        }
    }

    /// Marks a call that answered.
    fn succeeded(&self) {
        self.succeeded.set(true);
    }

    /// Marks the operation failed and converts the error.
    fn failed(&self, e: redis::RedisError) -> StoreError {
        self.failed.set(true);
        unavailable(e)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let ok = self.succeeded.get() && !self.failed.get();
        crate::metrics::redis_command(self.op, self.started.elapsed(), ok);
    }
}

/// Opens the multiplexed command connection (reconnects by itself, pipelines concurrent
/// calls, bounded waits), retrying for `startup_timeout_secs` before giving up.
///
/// # Errors
/// A message naming the (redacted) URL and the last error, when Redis stays unreachable.
pub async fn connect(config: &RedisConfig) -> Result<(redis::Client, ConnectionManager), String> {
    let url = config.redacted_url();
    let client =
        redis::Client::open(config.url.as_str()).map_err(|e| format!("redis.url {url}: {e}"))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(config.command_timeout_ms)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(2000));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.startup_timeout_secs);
    loop {
        match ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await {
            Ok(conn) => return Ok((client, conn)),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "cannot reach Redis at {url} (gave up after {} s): {e}",
                    config.startup_timeout_secs
                ));
            }
            Err(e) => {
                tracing::warn!(redis = %url, error = %e, "Redis not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

impl RedisStore {
    pub fn new(conn: ConnectionManager, keys: Keys, settings: StoreSettings) -> Self {
        Self {
            conn,
            keys,
            settings,
            scripts: Scripts::new(),
            touched: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether this append should refresh the channel's TTL and registry entry.
    fn needs_touch(&self, channel: &ChannelName) -> bool {
        let touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        touched
            .get(channel.as_str())
            .is_none_or(|at| at.elapsed() >= TOUCH_EVERY)
    }

    /// Records a refresh that Redis confirmed.
    fn touched(&self, channel: &ChannelName) {
        let now = std::time::Instant::now();
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched.len() >= TOUCH_MEMORY {
            touched.retain(|_, at| now.duration_since(*at) < TOUCH_EVERY);
        }
        touched.insert(channel.to_string(), now);
    }
}

#[async_trait]
impl Store for RedisStore {
    #[tracing::instrument(level = "debug", name = "redis.append", skip_all, fields(db.system = "redis"))]
    async fn append(&self, channel: &ChannelName, entry: &str, event: &[u8]) -> StoreResult<()> {
        let timer = Timer::start("append");
        let touch = self.needs_touch(channel);
        let mut conn = self.conn.clone();
        self.scripts
            .append
            .key(self.keys.history(channel))
            .key(self.keys.channels())
            .arg(entry)
            .arg(self.settings.history_max)
            .arg(self.settings.history_ttl_secs)
            .arg(channel.as_str())
            .arg(self.keys.events(channel.as_str()))
            .arg(event)
            .arg(if touch { "1" } else { "0" })
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())?;
        if touch {
            self.touched(channel);
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "redis.history", skip_all, fields(db.system = "redis"))]
    async fn history(
        &self,
        channel: &ChannelName,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<(Vec<String>, bool)> {
        let timer = Timer::start("history");
        let mut conn = self.conn.clone();
        let (truncated, mut entries): (i64, Vec<String>) = self
            .scripts
            .history
            .key(self.keys.history(channel))
            .arg(limit.max(1))
            .arg(max_bytes)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())?;
        entries.reverse();
        Ok((entries, truncated == 1))
    }

    #[tracing::instrument(level = "debug", name = "redis.delete", skip_all, fields(db.system = "redis"))]
    async fn delete(
        &self,
        channel: &ChannelName,
        id: &MessageId,
        owner: Option<&str>,
        event: &[u8],
    ) -> StoreResult<Deleted> {
        let timer = Timer::start("delete");
        let mut conn = self.conn.clone();
        self.scripts
            .delete
            .key(self.keys.history(channel))
            .key(self.keys.channels())
            .arg(id.as_str())
            .arg(self.keys.events(channel.as_str()))
            .arg(event)
            .arg(channel.as_str())
            .arg(owner.unwrap_or(""))
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|n| match n {
                1 => Deleted::Done,
                2 => Deleted::NotOwner,
                _ => Deleted::NotFound,
            })
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())
    }

    #[tracing::instrument(level = "debug", name = "redis.channels", skip_all, fields(db.system = "redis"))]
    async fn channels(&self) -> StoreResult<Vec<String>> {
        let timer = Timer::start("channels");
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = self
            .scripts
            .channels
            .key(self.keys.channels())
            .arg(self.settings.history_ttl_secs)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())?;
        names.sort();
        Ok(names)
    }

    #[tracing::instrument(level = "debug", name = "redis.join", skip_all, fields(db.system = "redis"))]
    async fn join(
        &self,
        channel: &ChannelName,
        user: &Username,
        conn_key: &str,
        joined: &[u8],
        marker: &[u8],
    ) -> StoreResult<bool> {
        let timer = Timer::start("join");
        let mut conn = self.conn.clone();
        self.scripts
            .join
            .key(self.keys.presence_conns(channel, user.as_str()))
            .key(self.keys.presence_users(channel))
            .arg(conn_key)
            .arg(user.as_str())
            .arg(self.settings.presence_ttl_ms)
            .arg(self.keys.events(channel.as_str()))
            .arg(joined)
            .arg(marker)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|n| n == 1)
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())
    }

    #[tracing::instrument(level = "debug", name = "redis.leave", skip_all, fields(db.system = "redis"))]
    async fn leave(
        &self,
        channel: &ChannelName,
        user: &Username,
        conn_key: &str,
        event: &[u8],
    ) -> StoreResult<bool> {
        let timer = Timer::start("leave");
        let mut conn = self.conn.clone();
        self.scripts
            .leave
            .key(self.keys.presence_conns(channel, user.as_str()))
            .key(self.keys.presence_users(channel))
            .arg(conn_key)
            .arg(user.as_str())
            .arg(self.keys.events(channel.as_str()))
            .arg(event)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|n| n == 1)
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())
    }

    #[tracing::instrument(level = "debug", name = "redis.refresh", skip_all, fields(db.system = "redis"))]
    async fn refresh(
        &self,
        channel: &ChannelName,
        members: &[PresenceMember],
    ) -> StoreResult<Vec<usize>> {
        let timer = Timer::start("refresh");
        let mut missing = Vec::new();
        for (batch_no, batch) in members.chunks(REFRESH_BATCH).enumerate() {
            let mut invocation = self.scripts.refresh.prepare_invoke();
            invocation.key(self.keys.presence_users(channel));
            invocation.arg(self.settings.presence_ttl_ms);
            for member in batch {
                invocation.key(self.keys.presence_conns(channel, member.username.as_str()));
                invocation.arg(member.username.as_str());
                invocation.arg(member.conn_key.as_str());
            }
            let mut conn = self.conn.clone();
            let lost: Vec<usize> = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| timer.failed(e))
                .inspect(|_| timer.succeeded())?;
            missing.extend(lost.into_iter().map(|i| batch_no * REFRESH_BATCH + i));
        }
        Ok(missing)
    }

    #[tracing::instrument(level = "debug", name = "redis.online", skip_all, fields(db.system = "redis"))]
    async fn online(&self, channel: &ChannelName) -> StoreResult<Vec<PresenceEntry>> {
        let timer = Timer::start("online");
        let mut conn = self.conn.clone();
        let pairs: Vec<(String, f64)> = self
            .scripts
            .online
            .key(self.keys.presence_users(channel))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())?;
        let ttl = self.settings.presence_ttl_ms as i64;
        let mut entries: Vec<PresenceEntry> = pairs
            .into_iter()
            .map(|(username, deadline)| PresenceEntry {
                username,
                last_seen_ms: deadline as i64 - ttl,
            })
            .collect();
        entries.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(entries)
    }

    #[tracing::instrument(level = "debug", name = "redis.typing", skip_all, fields(db.system = "redis"))]
    async fn typing(
        &self,
        channel: &ChannelName,
        user: &Username,
        on: bool,
        event: &[u8],
    ) -> StoreResult<()> {
        let timer = Timer::start("typing");
        let mut conn = self.conn.clone();
        self.scripts
            .typing
            .key(self.keys.typing(channel, user))
            .arg(if on { "1" } else { "0" })
            .arg(self.settings.typing_ttl_secs)
            .arg(self.keys.events(channel.as_str()))
            .arg(event)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())
    }

    #[tracing::instrument(level = "debug", name = "redis.ping", skip_all, fields(db.system = "redis"))]
    async fn ping(&self) -> StoreResult<()> {
        let timer = Timer::start("ping");
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())
    }
}

#[async_trait]
impl RateStore for RedisStore {
    #[tracing::instrument(level = "debug", name = "redis.take", skip_all, fields(db.system = "redis"))]
    async fn take(&self, key: &str, emission: Duration, burst: u32) -> StoreResult<RateOutcome> {
        let timer = Timer::start("take");
        let mut conn = self.conn.clone();
        let emission_ms = u64::try_from(emission.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let (allowed, remaining, retry_ms, reset_ms): (i64, i64, i64, i64) = self
            .scripts
            .rate
            .key(self.keys.rate(key))
            .arg(emission_ms)
            .arg(burst)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())?;
        let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
        Ok(RateOutcome {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after: ms(retry_ms),
            reset_after: ms(reset_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_original_layout_and_parse_back() {
        let keys = Keys::new("");
        let ch = ChannelName::parse("general").unwrap();
        assert_eq!(keys.history(&ch), "chat:general:messages");
        assert_eq!(
            keys.typing(&ch, &Username::parse("bob").unwrap()),
            "typing:general:bob"
        );
        assert_eq!(
            keys.channel_of_events("chat:general:events"),
            Some("general")
        );
        assert_eq!(keys.channel_of_events("other"), None);

        let keys = Keys::new("t1:");
        assert_eq!(keys.history(&ch), "t1:chat:general:messages");
        assert_eq!(keys.channel_of_events("t1:chat:x:events"), Some("x"));
        assert_eq!(keys.channel_of_events("chat:x:events"), None);
    }
}
