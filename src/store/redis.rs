//! The Redis store. The key layout lives here and nowhere else (see docs/redis.md):
//!
//! | key | type | what |
//! |---|---|---|
//! | `chat:<ch>:ids` | sorted set | message id → sequence number: the history's order |
//! | `chat:<ch>:entries` | hash | message id → the stored message (JSON) |
//! | `chat:<ch>:owners` | hash | message id → who may delete it (besides an admin) |
//! | `chat:<ch>:meta` | hash | `seq` (last sequence number), `low` (last one given to a migrated entry), `bytes` (sum of the entries' lengths) |
//! | `chat:<ch>:messages` | list | the original's history (newest first), moved into the keys above on first use |
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
//!
//! No script's work grows with what a channel holds: history is indexed by id, so a
//! delete looks its message up instead of scanning, and trimming pops the oldest by
//! sequence number. The history count and byte caps bound what one append may trim. A
//! channel still holding the original's list (`chat:<ch>:messages`) is moved into the
//! indexed layout in small steps (at most [`MIGRATE_ENTRIES`] entries or
//! [`MIGRATE_BYTES`] per script call) before anything else touches its history: each
//! history script first checks that the list is gone and otherwise answers `-1`, and the
//! caller migrates and retries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::connection::Conn;
use super::{
    Appended, Deleted, NewEntry, PresenceEntry, PresenceMember, RateOutcome, RateStore, Store,
    StoreError, StoreResult, StoreSettings,
};
use crate::chat::model::{ChannelName, MessageId, Username};

/// A message's bus event as one command argument, written from its pieces (see
/// `message_event_parts`) without joining them first.
struct EventArg<'a>([&'a [u8]; 3]);

impl redis::ToRedisArgs for EventArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        for part in self.0 {
            arg.write_all(part)
                .expect("writing to memory does not fail");
        }
    }
}

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

    /// The original's history list; only read to migrate it.
    pub fn legacy_history(&self, ch: &ChannelName) -> String {
        self.scoped("chat", ch.as_str()) + "messages"
    }

    /// The history's keys in the order the history scripts take them: ids, entries,
    /// owners, meta, and the original's list.
    pub fn history(&self, ch: &ChannelName) -> [String; 5] {
        let scope = self.scoped("chat", ch.as_str());
        [
            scope.clone() + "ids",
            scope.clone() + "entries",
            scope.clone() + "owners",
            scope + "meta",
            self.legacy_history(ch),
        ]
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

/// Answers `-1` (and does nothing) while the channel still holds the original's list.
/// Prelude of every script that takes the history's keys.
const NOT_MIGRATED: &str = "if redis.call('EXISTS', KEYS[5]) == 1 then return -1 end\n";

/// KEYS: history. ARGV: limit, byte budget. The ids of the newest entries, newest first,
/// a page at a time; stops at `limit` entries or before the budget would be exceeded
/// (sizes are read with `HSTRLEN`; the newest entry always counts). Returns {truncated
/// (0/1), ids}: the caller reads the entries with a plain `HMGET`, so megabytes of media
/// never pass through Lua (each megabyte costs Redis several milliseconds there).
const HISTORY: &str = r"
local limit = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local out = {}
local used = 0
local start = 0
while #out < limit do
  local stop = math.min(start + 15, limit - 1)
  local ids = redis.call('ZREVRANGE', KEYS[1], start, stop)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local size = redis.call('HSTRLEN', KEYS[2], id)
    if #out > 0 and used + size > budget then
      return {1, out}
    end
    used = used + size
    out[#out + 1] = id
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

/// KEYS: history. ARGV: create. Whether an append may go ahead: -1 while the original's
/// list exists (the caller migrates it first), 2 when the channel has no history and the
/// append may not create it, 0 otherwise.
const PREPARE: &str = r"
if redis.call('ZCARD', KEYS[1]) == 0 and ARGV[1] ~= '1' then return 2 end
return 0
";

/// KEYS: ids, entries, owners, meta. ARGV: id, owner, count cap, byte cap, ttl secs,
/// touch. Indexes an entry that the same transaction has just written with `HSET` (the
/// entry itself never passes through Lua: each megabyte costs Redis several milliseconds
/// there): next sequence number, `ZADD` the id, `HSET` the owner, then the oldest go
/// while the history is over either cap (the newest always stays). `touch` is `1` when
/// this replica has not refreshed the channel's TTL and registry entry for a while; a new
/// channel always gets its TTL, so no history key is ever left without one. Returns 1
/// when the caller should (re-)register the channel.
const INDEX: &str = r"
local count = redis.call('ZCARD', KEYS[1])
if count == 0 then
  redis.call('DEL', KEYS[3], KEYS[4])
end
local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local bytes = tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0')
  + redis.call('HSTRLEN', KEYS[2], ARGV[1])
count = count + 1
local cap = tonumber(ARGV[3])
local byte_cap = tonumber(ARGV[4])
while count > cap or (bytes > byte_cap and count > 1) do
  local oldest = redis.call('ZPOPMIN', KEYS[1])[1]
  bytes = bytes - redis.call('HSTRLEN', KEYS[2], oldest)
  redis.call('HDEL', KEYS[2], oldest)
  redis.call('HDEL', KEYS[3], oldest)
  count = count - 1
end
redis.call('HSET', KEYS[4], 'bytes', bytes)
local touch = ARGV[6] == '1' or seq == 1
if touch then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
  return 1
end
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
/// else. Looks the id up in the owners hash: no entry is read.
const DELETE: &str = r"
local owner = redis.call('HGET', KEYS[3], ARGV[1])
if not owner then return 0 end
if ARGV[4] ~= '' and owner ~= ARGV[4] then return 2 end
local size = redis.call('HSTRLEN', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  return 3
end
redis.call('HINCRBY', KEYS[4], 'bytes', -size)
return 1
";

/// What a history script answers while the channel still holds the original's list.
const NOT_MIGRATED_ANSWER: i64 = -1;
/// Migrations a history call runs before giving up (another writer of the original's
/// layout keeps adding to the list).
const MIGRATE_RETRIES: usize = 3;

/// Most migration steps one call runs: the original kept at most 1,000 entries, each
/// moved in a step of its own at worst (a step moves one entry over 1 MiB alone); more
/// means a writer of the old layout keeps adding to the list (not supported), and the
/// call gives up instead of spinning.
const MIGRATE_MAX_STEPS: usize = 1_100;

/// Most entries and bytes one migration step moves (at least one entry).
const MIGRATE_ENTRIES: usize = 32;
const MIGRATE_BYTES: usize = 1 << 20;

/// KEYS: history. ARGV: most entries, most bytes, ttl secs. Moves the newest entries of
/// the original's list into the indexed layout, below everything already there (so a
/// channel that was written to in the new layout during a rolling upgrade keeps those
/// newer messages on top). The id and sender are found in the entry's text without
/// decoding it (entries can be megabytes of media); entries without an id, or with one
/// already taken, get `legacy-<n>`. Returns how many entries are left to move.
const MIGRATE: &str = r#"
local function field(entry, name)
  local key = '"' .. name .. '"'
  local from = 1
  while true do
    local s, e = string.find(entry, key, from, true)
    if not s then return nil end
    local colon = string.match(entry, '^%s*:%s*"', e + 1)
    if colon then
      local start = e + 1 + #colon
      local i = start
      local escaped = false
      while true do
        local q = string.find(entry, '["\\]', i)
        if not q then return nil end
        if string.sub(entry, q, q) == '"' then
          local raw = string.sub(entry, start, q - 1)
          if not escaped then return raw end
          local ok, value = pcall(cjson.decode, '"' .. raw .. '"')
          if ok and type(value) == 'string' then return value end
          return nil
        end
        escaped = true
        i = q + 2
      end
    end
    from = e + 1
  end
end
local most = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local bytes = tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0')
local moved = 0
local moved_bytes = 0
while moved < most and moved_bytes < budget do
  local item = redis.call('LPOP', KEYS[5])
  if not item then break end
  local seq = redis.call('HINCRBY', KEYS[4], 'low', -1)
  local id = field(item, 'message_id')
  if not id or id == '' or redis.call('ZSCORE', KEYS[1], id) then
    id = 'legacy' .. seq
  end
  redis.call('ZADD', KEYS[1], seq, id)
  redis.call('HSET', KEYS[2], id, item)
  redis.call('HSET', KEYS[3], id, field(item, 'sender') or '')
  bytes = bytes + #item
  moved = moved + 1
  moved_bytes = moved_bytes + #item
end
redis.call('HSET', KEYS[4], 'bytes', bytes)
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return redis.call('LLEN', KEYS[5])
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
    prepare: Script,
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
    migrate: Script,
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
        let migrated = |body: &str| Script::new(&format!("{NOT_MIGRATED}{}", publish(body)));
        Self {
            prepare: migrated(PREPARE),
            register: plain(REGISTER),
            delete: migrated(DELETE),
            channels: plain(CHANNELS),
            join: timed(JOIN),
            leave: timed(LEAVE),
            refresh: timed(REFRESH),
            rate: timed(RATE),
            history: migrated(HISTORY),
            migrate: plain(MIGRATE),
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
    /// Cluster mode: events go out with `SPUBLISH` (sharded pub/sub).
    sharded: bool,
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
            sharded,
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

    /// Stores an entry, indexes it and publishes its event as one transaction
    /// (`MULTI`: `HSET` the entry, `EVAL` the index script, `PUBLISH` the event, `EXEC`), so
    /// the order of events is the order of history and the megabytes of a media message go
    /// through plain commands, never through Lua. When replicas must confirm, `WAIT`
    /// follows in the same pipeline on the dedicated connection: one connection object,
    /// so the `WAIT` counts exactly this write, even across a reconnect or a Sentinel
    /// failover. Returns the index script's answer (1: register the channel).
    async fn run_append(
        &self,
        keys: &[String; 5],
        entry: NewEntry<'_>,
        event_head: &[u8],
        touch: bool,
        events: &str,
    ) -> redis::RedisResult<i64> {
        let (mut conn, wait) = match &self.durable {
            Some((conn, wait)) => (conn.clone(), Some(*wait)),
            None => (self.conn.clone(), None),
        };
        // The two commands that carry the content are sized up front and the event is
        // written straight into its command: the megabytes of a media message are copied
        // once into each command, never grown by doubling, never joined on the side.
        let mut store = redis::Cmd::with_capacity(4, 64 + keys[1].len() + entry.json.len());
        store
            .arg("HSET")
            .arg(&keys[1])
            .arg(entry.id)
            .arg(entry.json);
        let event = EventArg(crate::chat::event::message_event_parts(
            event_head, entry.json,
        ));
        let size: usize = event.0.iter().map(|part| part.len()).sum();
        let mut publish = redis::Cmd::with_capacity(3, 64 + events.len() + size);
        publish
            .arg(if self.sharded { "SPUBLISH" } else { "PUBLISH" })
            .arg(events)
            .arg(event);
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI")
            .add_command(store)
            .cmd("EVAL")
            .arg(INDEX)
            .arg(4)
            .arg(&keys[..4])
            .arg(entry.id)
            .arg(entry.owner)
            .arg(self.settings.history_max)
            .arg(self.settings.history_max_bytes)
            .arg(self.settings.history_ttl_secs)
            .arg(if touch { "1" } else { "0" })
            .add_command(publish)
            .cmd("EXEC");
        if let Some(wait) = wait {
            pipe.cmd("WAIT").arg(wait.replicas).arg(wait.timeout_ms);
        }
        let answers: Vec<redis::Value> = match pipe.query_async(&mut conn).await {
            Ok(answers) => answers,
            Err(e) => {
                conn.recheck();
                return Err(e);
            }
        };
        if let Some(redis::Value::ServerError(e)) = answers
            .iter()
            .find(|a| matches!(a, redis::Value::ServerError(_)))
        {
            conn.recheck();
            return Err(redis::RedisError::from(e.clone()));
        }
        // MULTI, three QUEUED, EXEC's answers (HSET, EVAL, PUBLISH), then WAIT's.
        let executed = match answers.get(4) {
            Some(redis::Value::Array(executed)) => executed,
            other => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "the append transaction was not executed",
                    format!("{other:?}"),
                )));
            }
        };
        for answer in executed {
            if let redis::Value::ServerError(e) = answer {
                conn.recheck();
                return Err(redis::RedisError::from(e.clone()));
            }
        }
        let register: i64 = match executed.get(1) {
            Some(value) => redis::from_redis_value(value.clone())?,
            None => 0,
        };
        if let Some(wait) = wait {
            let acked: i64 = match answers.get(5) {
                Some(value) => redis::from_redis_value(value.clone())?,
                None => 0,
            };
            if acked < i64::from(wait.replicas) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "too few replicas confirmed the write",
                    format!("{acked} of {} within {} ms", wait.replicas, wait.timeout_ms),
                )));
            }
        }
        Ok(register)
    }

    /// Moves the original's history list of `channel` into the indexed layout, one
    /// bounded step per call, until it is gone.
    async fn migrate(&self, channel: &ChannelName) -> redis::RedisResult<()> {
        let keys = self.keys.history(channel);
        let mut conn = self.conn.clone();
        let mut steps = 0usize;
        loop {
            if steps == MIGRATE_MAX_STEPS {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the original's history list keeps growing while it is migrated",
                )));
            }
            let left: i64 = self
                .scripts
                .migrate
                .key(&keys[..])
                .arg(MIGRATE_ENTRIES)
                .arg(MIGRATE_BYTES)
                .arg(self.settings.history_ttl_secs)
                .invoke_async(&mut conn)
                .await?;
            steps += 1;
            if left == 0 {
                tracing::info!(channel = %channel, steps, "moved the original's history into the indexed layout");
                return Ok(());
            }
        }
    }

    /// Runs a history script (`run` builds and sends it), migrating the channel first
    /// when the script answers that it still holds the original's list.
    async fn migrated<T, F, Fut>(&self, channel: &ChannelName, run: F) -> redis::RedisResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<(i64, T)>>,
    {
        for attempt in 0..=MIGRATE_RETRIES {
            let (answer, value) = run().await?;
            if answer != NOT_MIGRATED_ANSWER {
                return Ok(value);
            }
            if attempt < MIGRATE_RETRIES {
                self.migrate(channel).await?;
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "history kept reappearing in the original's layout",
        )))
    }
}

#[async_trait]
impl Store for RedisStore {
    #[tracing::instrument(level = "debug", name = "redis.append", skip_all, fields(db.system = "redis"))]
    async fn append(
        &self,
        channel: &ChannelName,
        entry: NewEntry<'_>,
        event_head: &[u8],
        create: bool,
    ) -> StoreResult<Appended> {
        let timer = Timer::start("append");
        let touch = self.needs_touch(channel);
        let keys = self.keys.history(channel);
        if touch {
            // Not appended here lately: the channel may still hold the original's list
            // (migrated first), or not exist (the caller may have to pay for creating it).
            let state = self
                .migrated(channel, || async {
                    let mut conn = self.conn.clone();
                    let n: i64 = self
                        .scripts
                        .prepare
                        .key(&keys[..])
                        .arg(if create { "1" } else { "0" })
                        .invoke_async(&mut conn)
                        .await?;
                    Ok((n, n))
                })
                .await
                .map_err(|e| timer.failed(e))?;
            if state == 2 {
                timer.succeeded();
                return Ok(Appended::WouldCreate);
            }
        }
        let events = self.keys.events(channel.as_str());
        let answer = self
            .run_append(&keys, entry, event_head, touch, &events)
            .await
            .map_err(|e| timer.failed(e))?;
        timer.succeeded();
        let mut conn = self.conn.clone();
        if answer == 1 {
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
        Ok(Appended::Stored)
    }

    #[tracing::instrument(level = "debug", name = "redis.history", skip_all, fields(db.system = "redis"))]
    async fn history(
        &self,
        channel: &ChannelName,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<(Vec<String>, bool)> {
        let timer = Timer::start("history");
        let keys = self.keys.history(channel);
        let (truncated, ids): (i64, Vec<String>) = self
            .migrated(channel, || async {
                let mut conn = self.conn.clone();
                let answer: redis::Value = self
                    .scripts
                    .history
                    .key(&keys[..])
                    .arg(limit.max(1))
                    .arg(max_bytes)
                    .invoke_async(&mut conn)
                    .await?;
                if answer == redis::Value::Int(NOT_MIGRATED_ANSWER) {
                    return Ok((NOT_MIGRATED_ANSWER, (0, Vec::new())));
                }
                Ok((0, redis::from_redis_value(answer)?))
            })
            .await
            .map_err(|e| timer.failed(e))?;
        if ids.is_empty() {
            timer.succeeded();
            return Ok((Vec::new(), truncated == 1));
        }
        // A plain read, outside Lua; an entry deleted since the ids were read is skipped.
        let mut conn = self.conn.clone();
        let found: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&keys[1])
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .map_err(|e| timer.failed(e))?;
        timer.succeeded();
        let mut entries: Vec<String> = found.into_iter().flatten().collect();
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
        let keys = self.keys.history(channel);
        let events = self.keys.events(channel.as_str());
        let outcome = self
            .migrated(channel, || async {
                let mut conn = self.conn.clone();
                let n: i64 = self
                    .scripts
                    .delete
                    .key(&keys[..])
                    .arg(id.as_str())
                    .arg(&events)
                    .arg(event)
                    .arg(owner.unwrap_or(""))
                    .invoke_async(&mut conn)
                    .await?;
                Ok((n, n))
            })
            .await
            .map_err(|e| timer.failed(e))
            .inspect(|_| timer.succeeded())?;
        let mut conn = self.conn.clone();
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

/// One Redis primary's memory, from `INFO memory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMemory {
    pub used: u64,
    /// `maxmemory`; 0 when unlimited.
    pub max: u64,
    pub policy: String,
}

impl NodeMemory {
    /// Whether the policy can evict chatgate's keys: every one but `noeviction` can,
    /// since all of them (rate budgets, presence, history) carry a TTL; without a
    /// `maxmemory` nothing is evicted whatever the policy.
    pub fn evicts(&self) -> bool {
        self.max > 0 && self.policy != "noeviction"
    }

    /// Whether used memory has passed `ratio` of `maxmemory`.
    pub fn past(&self, ratio: f64) -> bool {
        self.max > 0 && self.used as f64 >= ratio * self.max as f64
    }

    fn parse(info: &str) -> Option<Self> {
        let field = |name: &str| {
            info.lines().find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(':')
                    .map(|v| v.trim().to_string())
            })
        };
        Some(Self {
            used: field("used_memory")?.parse().ok()?,
            max: field("maxmemory")?.parse().ok()?,
            policy: field("maxmemory_policy")?,
        })
    }
}

/// Every text in an answer: one `INFO` reply, or (in a cluster) one per primary.
fn texts(value: redis::Value, out: &mut Vec<String>) {
    match value {
        redis::Value::BulkString(bytes) => out.push(String::from_utf8_lossy(&bytes).into_owned()),
        redis::Value::VerbatimString { text, .. } | redis::Value::SimpleString(text) => {
            out.push(text);
        }
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.into_iter().for_each(|v| texts(v, out));
        }
        redis::Value::Map(pairs) => pairs.into_iter().for_each(|(_, v)| texts(v, out)),
        _ => {}
    }
}

impl RedisStore {
    /// The memory of every primary (`INFO memory`; in a cluster, every primary answers).
    ///
    /// # Errors
    /// Redis did not answer, or answered something that is not an `INFO` report.
    pub async fn memory(&self) -> StoreResult<Vec<NodeMemory>> {
        let mut conn = self.conn.clone();
        let answer: redis::Value = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut reports = Vec::new();
        texts(answer, &mut reports);
        let nodes: Option<Vec<NodeMemory>> =
            reports.iter().map(|text| NodeMemory::parse(text)).collect();
        match nodes {
            Some(nodes) if !nodes.is_empty() => Ok(nodes),
            _ => Err(StoreError(
                "INFO memory answered without memory fields".into(),
            )),
        }
    }

    /// Reads Redis's memory every `every` until `stop` and marks `capacity` full while
    /// any primary is past `ratio` of its `maxmemory`. A failed reading keeps the last
    /// state (the store's own errors show elsewhere).
    pub async fn watch_capacity(
        self: Arc<Self>,
        capacity: Arc<super::Capacity>,
        ratio: f64,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let nodes = match self.memory().await {
                Ok(nodes) => nodes,
                Err(e) => {
                    tracing::debug!(error = %e.0, "Redis memory not read");
                    continue;
                }
            };
            let full = nodes.iter().any(|n| n.past(ratio));
            if full != capacity.is_full() {
                if full {
                    tracing::warn!(
                        ratio,
                        ?nodes,
                        "Redis is nearly full: refusing new media (storage_full)"
                    );
                } else {
                    tracing::info!(?nodes, "Redis has room again: media accepted");
                }
            }
            capacity.set_full(full);
            crate::metrics::store_full(full);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_memory_parses_and_judges_policies() {
        let info = "# Memory\r\nused_memory:900\r\nused_memory_human:900B\r\nmaxmemory:1000\r\nmaxmemory_human:1000B\r\nmaxmemory_policy:allkeys-lru\r\n";
        let node = NodeMemory::parse(info).unwrap();
        assert_eq!(node.used, 900);
        assert_eq!(node.max, 1000);
        assert!(node.evicts());
        assert!(node.past(0.9));
        assert!(!node.past(0.95));
        let unlimited = NodeMemory {
            used: 10,
            max: 0,
            policy: "noeviction".into(),
        };
        assert!(!unlimited.evicts());
        assert!(!unlimited.past(0.01), "no maxmemory, no guard");
        let lru_without_limit = NodeMemory {
            policy: "allkeys-lru".into(),
            ..unlimited
        };
        assert!(
            !lru_without_limit.evicts(),
            "nothing is evicted without a maxmemory"
        );
        assert_eq!(NodeMemory::parse("used_memory:1\r\n"), None);

        let mut found = Vec::new();
        let cluster = redis::Value::Map(vec![
            (
                redis::Value::SimpleString("a:1".into()),
                redis::Value::BulkString(info.as_bytes().to_vec()),
            ),
            (
                redis::Value::SimpleString("b:2".into()),
                redis::Value::VerbatimString {
                    format: redis::VerbatimFormat::Text,
                    text: info.into(),
                },
            ),
        ]);
        texts(cluster, &mut found);
        assert_eq!(found.len(), 2);
    }

    #[test]
    fn keys_follow_the_original_layout_and_parse_back() {
        let keys = Keys::new("", false);
        let ch = ChannelName::parse("general").unwrap();
        assert_eq!(
            keys.history(&ch),
            [
                "chat:general:ids",
                "chat:general:entries",
                "chat:general:owners",
                "chat:general:meta",
                "chat:general:messages"
            ]
        );
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
        assert_eq!(keys.legacy_history(&ch), "t1:chat:general:messages");
        assert_eq!(keys.channel_of_events("t1:chat:x:events"), Some("x"));
        assert_eq!(keys.channel_of_events("chat:x:events"), None);
    }

    #[test]
    fn tagged_keys_put_every_key_of_a_channel_in_one_slot() {
        let keys = Keys::new("t1:", true);
        let ch = ChannelName::parse("general").unwrap();
        let user = Username::parse("bob").unwrap();
        let mut all = vec![
            keys.events(ch.as_str()),
            keys.presence_users(&ch),
            keys.presence_conns(&ch, "bob"),
            keys.typing(&ch, &user),
        ];
        all.extend(keys.history(&ch));
        assert_eq!(all[2], "t1:chat:{general}:presence:bob");
        assert_eq!(all[3], "t1:typing:{general}:bob");
        assert_eq!(all[8], "t1:chat:{general}:messages");
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
            (&sharded.delete, &plain.delete),
            (&sharded.join, &plain.join),
            (&sharded.leave, &plain.leave),
            (&sharded.typing, &plain.typing),
        ] {
            assert_ne!(s.get_hash(), p.get_hash());
        }
        for body in [DELETE, JOIN, LEAVE, TYPING] {
            assert!(body.contains("redis.call('PUBLISH',"), "{body}");
        }
    }
}
