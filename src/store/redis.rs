//! The Redis store. The key layout lives here and nowhere else (see docs/redis.md):
//!
//! | key | type | what |
//! |---|---|---|
//! | `chat:<ch>:messages` | list | history, newest first, capped, TTL refreshed per message (the original's key) |
//! | `chat:<ch>:events` | pub/sub channel | bus events of the channel (sharded pub/sub in cluster mode) |
//! | `chat:<ch>:presence` | sorted set | user → deadline (ms) of their freshest connection |
//! | `chat:<ch>:presence:<user>` | sorted set | connection key → deadline (ms) |
//! | `typing:<ch>:<user>` | string | `typing`, with the typing TTL (the original's key) |
//! | `chat:channels` | sorted set | channel → time of its last message (s), replaces `KEYS chat:*` |
//! | `ratelimit:<key>` | string | a shared rate budget (GCRA) |
//!
//! All keys carry `redis.key_prefix`. With hash tags (always in cluster mode) `<ch>` is
//! written `{<ch>}`, so every key and the bus channel of one chat channel hash to one
//! cluster slot: each script touches one slot only, and a message is published on that
//! slot's shard (`SPUBLISH`) instead of being broadcast to every node. The registry is the
//! one key that is not per channel; it is written by its own small script, never together
//! with a channel's keys.
//!
//! Every multi-step write of a channel is one Lua script that also publishes the matching
//! event, and scripts take time from Redis (`TIME`), never from a replica's clock, so
//! replicas with skewed clocks agree on presence deadlines.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::connection::Conn;
use super::{
    Deleted, PresenceEntry, PresenceMember, RateOutcome, RateStore, Store, StoreError, StoreResult,
    StoreSettings,
};
use crate::chat::model::{ChannelName, MessageId, Username};

/// Names of every key and pub/sub channel, with the configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Channel names inside `{}`: a Redis Cluster hash tag.
    tagged: bool,
}

impl Keys {
    pub fn new(prefix: &str, tagged: bool) -> Self {
        Self {
            prefix: prefix.to_string(),
            tagged,
        }
    }

    /// `<prefix><kind>:<ch>:` with the channel hash-tagged when configured.
    fn scoped(&self, kind: &str, ch: &str) -> String {
        if self.tagged {
            format!("{}{kind}:{{{ch}}}:", self.prefix)
        } else {
            format!("{}{kind}:{ch}:", self.prefix)
        }
    }

    pub fn history(&self, ch: &ChannelName) -> String {
        self.scoped("chat", ch.as_str()) + "messages"
    }

    pub fn events(&self, ch: &str) -> String {
        self.scoped("chat", ch) + "events"
    }

    /// The chat channel a bus channel name belongs to, if it is one of ours.
    pub fn channel_of_events<'a>(&self, bus_channel: &'a str) -> Option<&'a str> {
        let ch = bus_channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("chat:")?
            .strip_suffix(":events")?;
        if self.tagged {
            ch.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(ch)
        }
    }

    pub fn presence_users(&self, ch: &ChannelName) -> String {
        self.scoped("chat", ch.as_str()) + "presence"
    }

    pub fn presence_conns(&self, ch: &ChannelName, user: &str) -> String {
        self.scoped("chat", ch.as_str()) + "presence:" + user
    }

    pub fn typing(&self, ch: &ChannelName, user: &Username) -> String {
        self.scoped("typing", ch.as_str()) + user.as_str()
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

/// KEYS: the budget. ARGV: emission interval in ms, burst, cost. GCRA: the key holds the
/// theoretical arrival time (TAT) in ms of Redis's clock, so replicas with skewed clocks
/// still share one budget. Returns allowed (0/1), remaining, retry-after ms, reset ms.
const RATE: &str = r"
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if cost > burst then
  return {0, 0, emission * burst, tat - now}
end
local new_tat = tat + emission * cost
local allow_at = new_tat - emission * burst
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((now - allow_at) / emission), 0, new_tat - now}
";

/// KEYS: history. ARGV: entry, cap, ttl secs, bus channel, event, touch. `touch` is `1`
/// when this replica has not refreshed the channel's TTL and registry entry for a while;
/// a new list (length 1) always gets its TTL, so no history key is ever left without one.
/// Returns 1 when the caller should (re-)register the channel.
const APPEND: &str = r"
local len = redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local touch = ARGV[6] == '1' or len == 1
if touch then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
if touch then return 1 end
return 0
";

/// KEYS: channels. ARGV: channel name. Records the channel's latest activity (Redis time,
/// seconds) in the registry. Separate from the append: the registry is one key for all
/// channels, so in a cluster it lives in another slot than the channel's keys.
const REGISTER: &str = r"
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1], ARGV[1])
return 1
";

/// How often one replica refreshes a busy channel's history TTL and registry entry. Doing
/// it on every message cost about a third of the append script's time in Redis; a TTL of
/// days lags by at most this much.
const TOUCH_EVERY: Duration = Duration::from_secs(30);
/// Channels remembered as recently touched before old entries are pruned.
const TOUCH_MEMORY: usize = 10_000;

/// KEYS: history. ARGV: message id, bus channel, event, owner (empty: anyone's).
/// Returns 1 deleted, 3 deleted the last entry, 0 not found, 2 found but owned by someone
/// else.
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
      if ARGV[4] ~= '' and decoded['sender'] ~= ARGV[4] then
        return 2
      end
      redis.call('LREM', KEYS[1], 1, item)
      redis.call('PUBLISH', ARGV[2], ARGV[3])
      if redis.call('EXISTS', KEYS[1]) == 0 then
        return 3
      end
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
    register: Script,
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
    /// `sharded`: publish with `SPUBLISH` (Redis Cluster's sharded pub/sub, to the shard
    /// that owns the channel's slot) instead of `PUBLISH` (broadcast to every node).
    fn new(sharded: bool) -> Self {
        let publish = |body: &str| {
            if sharded {
                body.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
            } else {
                body.to_string()
            }
        };
        let plain = |body: &str| Script::new(&publish(body));
        let timed = |body: &str| Script::new(&format!("{NOW_MS}{}", publish(body)));
        Self {
            append: plain(APPEND),
            register: plain(REGISTER),
            delete: plain(DELETE),
            channels: plain(CHANNELS),
            join: timed(JOIN),
            leave: timed(LEAVE),
            refresh: timed(REFRESH),
            rate: timed(RATE),
            history: plain(HISTORY),
            online: timed(ONLINE),
            typing: plain(TYPING),
        }
    }
}

/// Replicas that must confirm a write (`WAIT`) before it counts as stored.
#[derive(Debug, Clone, Copy)]
pub struct WaitReplicas {
    pub replicas: u32,
    pub timeout_ms: u64,
}

pub struct RedisStore {
    conn: Conn,
    keys: Keys,
    settings: StoreSettings,
    scripts: Scripts,
    /// The connection for appends that replicas must confirm, and how many.
    durable: Option<(Conn, WaitReplicas)>,
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

impl RedisStore {
    /// `sharded`: publish on sharded pub/sub (cluster mode).
    pub fn new(
        conn: Conn,
        keys: Keys,
        settings: StoreSettings,
        sharded: bool,
        durable: Option<(Conn, WaitReplicas)>,
    ) -> Self {
        Self {
            conn,
            keys,
            settings,
            scripts: Scripts::new(sharded),
            durable,
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

    /// Forgets a refresh, so the channel's next append registers it again.
    fn untouched(&self, channel: &ChannelName) {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        touched.remove(channel.as_str());
    }

    /// Runs the append script, followed, when replicas must confirm, by `WAIT` in the
    /// same pipeline on the dedicated connection: one connection object, so the `WAIT`
    /// counts exactly this write, even across a reconnect or a Sentinel failover.
    /// Returns the script's answer (1: register the channel).
    async fn run_append(&self, script: redis::Cmd) -> redis::RedisResult<i64> {
        let (mut conn, wait) = match &self.durable {
            Some((conn, wait)) => (conn.clone(), Some(*wait)),
            None => (self.conn.clone(), None),
        };
        let mut pipe = redis::pipe();
        pipe.add_command(script);
        if let Some(wait) = wait {
            pipe.cmd("WAIT").arg(wait.replicas).arg(wait.timeout_ms);
        }
        let mut loaded = false;
        let answers: Vec<i64> = loop {
            match pipe.query_async(&mut conn).await {
                Err(e)
                    if !loaded
                        && e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.scripts.append.load_async(&mut conn).await?;
                    loaded = true;
                }
                other => break other?,
            }
        };
        if let (Some(wait), Some(&acked)) = (wait, answers.get(1))
            && acked < i64::from(wait.replicas)
        {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "too few replicas confirmed the write",
                format!("{acked} of {} within {} ms", wait.replicas, wait.timeout_ms),
            )));
        }
        Ok(answers.first().copied().unwrap_or(0))
    }
}

#[async_trait]
impl Store for RedisStore {
    #[tracing::instrument(level = "debug", name = "redis.append", skip_all, fields(db.system = "redis"))]
    async fn append(&self, channel: &ChannelName, entry: &str, event: &[u8]) -> StoreResult<()> {
        let timer = Timer::start("append");
        let touch = self.needs_touch(channel);
        let mut script = redis::cmd("EVALSHA");
        script
            .arg(self.scripts.append.get_hash())
            .arg(1)
            .arg(self.keys.history(channel))
            .arg(entry)
            .arg(self.settings.history_max)
            .arg(self.settings.history_ttl_secs)
            .arg(self.keys.events(channel.as_str()))
            .arg(event)
            .arg(if touch { "1" } else { "0" });
        let register = self.run_append(script).await.map_err(|e| timer.failed(e))?;
        timer.succeeded();
        let mut conn = self.conn.clone();
        if register == 1 {
            // The message is stored; a registry that is briefly behind only delays the
            // channel's listing, and the next append retries.
            let registered = self
                .scripts
                .register
                .key(self.keys.channels())
                .arg(channel.as_str())
                .invoke_async::<i64>(&mut conn)
                .await;
            match registered {
                Ok(_) => self.touched(channel),
                Err(e) => {
                    tracing::warn!(channel = %channel, error = %e, "channel registry not updated");
                }
            }
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
        let outcome = self
            .scripts
            .delete
            .key(self.keys.history(channel))
            .arg(id.as_str())
            .arg(self.keys.events(channel.as_str()))
            .arg(event)
            .arg(owner.unwrap_or(""))
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())?;
        if outcome == 3 {
            // The history is gone: drop the channel from the listing (an append racing
            // with this registers it again on this replica's next touch).
            self.untouched(channel);
            let removed: redis::RedisResult<i64> = redis::cmd("ZREM")
                .arg(self.keys.channels())
                .arg(channel.as_str())
                .query_async(&mut conn)
                .await;
            if let Err(e) = removed {
                tracing::warn!(channel = %channel, error = %e, "channel registry not updated");
            }
        }
        Ok(match outcome {
            1 | 3 => Deleted::Done,
            2 => Deleted::NotOwner,
            _ => Deleted::NotFound,
        })
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
    async fn take(
        &self,
        key: &str,
        emission: Duration,
        burst: u32,
        cost: u32,
    ) -> StoreResult<RateOutcome> {
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
            .arg(cost)
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
        let keys = Keys::new("", false);
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

        let keys = Keys::new("t1:", false);
        assert_eq!(keys.history(&ch), "t1:chat:general:messages");
        assert_eq!(keys.channel_of_events("t1:chat:x:events"), Some("x"));
        assert_eq!(keys.channel_of_events("chat:x:events"), None);
    }

    #[test]
    fn tagged_keys_put_every_key_of_a_channel_in_one_slot() {
        let keys = Keys::new("t1:", true);
        let ch = ChannelName::parse("general").unwrap();
        let user = Username::parse("bob").unwrap();
        let all = [
            keys.history(&ch),
            keys.events(ch.as_str()),
            keys.presence_users(&ch),
            keys.presence_conns(&ch, "bob"),
            keys.typing(&ch, &user),
        ];
        assert_eq!(all[0], "t1:chat:{general}:messages");
        assert_eq!(all[3], "t1:chat:{general}:presence:bob");
        assert_eq!(all[4], "t1:typing:{general}:bob");
        for key in &all {
            // The hash tag is the first {...}: the channel name, for every key.
            let tag = &key[key.find('{').unwrap() + 1..key.find('}').unwrap()];
            assert_eq!(tag, "general", "{key}");
        }
        assert_eq!(
            keys.channel_of_events("t1:chat:{general}:events"),
            Some("general")
        );
        assert_eq!(keys.channel_of_events("t1:chat:general:events"), None);
    }

    #[test]
    fn cluster_scripts_publish_on_the_shard() {
        let sharded = Scripts::new(true);
        let plain = Scripts::new(false);
        for (s, p) in [
            (&sharded.append, &plain.append),
            (&sharded.delete, &plain.delete),
            (&sharded.join, &plain.join),
            (&sharded.leave, &plain.leave),
            (&sharded.typing, &plain.typing),
        ] {
            assert_ne!(s.get_hash(), p.get_hash());
        }
        for body in [APPEND, DELETE, JOIN, LEAVE, TYPING] {
            assert!(body.contains("redis.call('PUBLISH',"), "{body}");
        }
    }
}
