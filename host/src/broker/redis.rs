//! The Redis broker, in kombu's layout so Python Celery workers and celeriac workers share
//! queues and recover each other's messages.
//!
//! kombu's keys (the protocol): a queue is a list; priorities live in sub-lists
//! `<queue>\x06\x16<step>`; `_kombu.binding.<exchange>` holds bindings; a delivered message sits
//! in the `unacked` hash (`tag -> [envelope, exchange, routing_key]`) with its delivery time in
//! `unacked_index` until it is acked.
//!
//! celeriac's own keys, under `celeriac:`: `scheduled` (ETA messages, by due time),
//! `dlq:<queue>`, `leases` (our fetches, by last renewal), `revoked` (task id -> expiry),
//! `terminate`, `rate:<task>` (token buckets), `kv:<namespace>:<key>`.
//!
//! A delivery of ours is recorded in kombu's `unacked` and `unacked_index`; our delivery tags
//! start with [`OWN_TAG`]. Each fetch also takes one lease in `leases`, named by the prefix its
//! tags share (`celeriac.<worker>.<fetch>.<max>.`, tags end in `1..=max`): one entry per
//! fetch, not per message, keeps the per-task cost of leasing off the hot path. Each renewal
//! re-scores every running tag in `unacked_index` and the lease of every fetch with a task still
//! running; the lease leaves the set when the fetch's last delivery is settled. Restoring looks
//! for ours in `leases`, which holds nothing else, so no number of other workers' entries can
//! hide an abandoned message of ours; a Python worker's entries (never renewed) are restored
//! only after kombu's visibility timeout, and a Python worker's own sweep never takes a live
//! task of ours.
//!
//! Every step that moves a message is one Lua script or one MULTI, so a crash at any point
//! leaves each message in exactly one place.

use super::leases::{OpenLeases, leases_of};
use super::{
    Broker, BrokerOptions, BrokerResult, Delivery, FollowUp, PRIORITY_SEP, PRIORITY_STEPS, now_ms,
    now_secs, priority_list,
};
use crate::endpoint::{Conn, Endpoint, TransportOptions, masked_url};
use anyhow::Context as _;
use redis::{AsyncCommands, Script};
use std::time::Duration;

/// A dead-letter record built inside a script, in the shape of `worker::dead_letter_record`,
/// for messages a script cannot deliver and must not drop. `dead_letter(queue, reason, error,
/// message)` pushes it onto `<ARGV dlq prefix><queue>` and returns whether that worked.
/// The first line of every script that reaches keys it cannot name in KEYS (queue lists found
/// through kombu's bindings, dead-letter lists): a Lua comment to Redis and Valkey, and to
/// Dragonfly the flag that lets the script run, which it otherwise refuses.
const UNDECLARED_KEYS: &str = "--!df flags=allow-undeclared-keys\n";

/// Scripts put it between their header, which sets the locals `DLQ_PREFIX` and `NOW_ISO`
/// (Redis forbids globals), and their body.
const LUA_DEAD_LETTER: &str = r#"
local function dead_letter(queue, reason, err, message)
  local ok, record = pcall(cjson.encode, {
    reason = reason, error = err, attempts = 0, time = NOW_ISO, queue = queue,
    task = cjson.null, id = cjson.null, worker = cjson.null,
    message = message, message_encoding = 'utf-8'})
  if not ok then return false end
  return (pcall(redis.call, 'LPUSH', DLQ_PREFIX .. queue, record))
end
local function error_text(e)
  if type(e) == 'table' and e.err then return e.err end
  return tostring(e)
end
"#;

/// Pops up to ARGV[1] messages from KEYS[4..] in order and records each in `unacked` and
/// `unacked_index`, and the fetch's lease, in the same step. kombu stores `[envelope, exchange,
/// routing_key]`; the envelope is spliced in as text so Redis does not parse it. Tags are ARGV[3]
/// (which ends in ARGV[1] and a dot, and is the lease's name) followed by a counter; the
/// recording is one variadic command per key per chunk of messages.
///
/// Nothing popped can be lost: if recording fails (a bookkeeping key of the wrong type), what
/// was recorded is undone and every message goes back where it was, and the call fails with the
/// key named; a queue key that is not a list is skipped and named in the reply. (Checking the
/// keys' types before popping would cost every fetch three more calls for a case that never
/// happens unless someone else writes our keys.) A message over ARGV[4] bytes is dead-lettered here, never shipped to the worker.
/// KEYS: unacked, unacked_index, leases, lists. ARGV: max, now, tag prefix, max bytes, now (ISO),
/// dead-letter key prefix, then for each list its queue name as JSON and as text.
/// Returns {tag, list index, message, ...} and the skipped keys.
const FETCH: &str = r#"
local max = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[4])
local NOW_ISO = ARGV[5]
local DLQ_PREFIX = ARGV[6]
"#;

const FETCH_BODY: &str = r#"
local unpack = unpack or table.unpack -- Lua 5.1 (Redis, Valkey) or 5.4 (Dragonfly)
local out, skipped, fields, scores = {}, {}, {}, {}
local n = 0
local function write(key, ...)
  local ok, err = pcall(redis.call, ...)
  if not ok then error({err = 'key ' .. key .. ': ' .. error_text(err)}) end
end
local function record()
  if #fields > 0 then
    write(KEYS[1], 'HSET', KEYS[1], unpack(fields))
    write(KEYS[2], 'ZADD', KEYS[2], unpack(scores))
    fields = {}
    scores = {}
  end
end
local function take()
  for i = 4, #KEYS do
    if n >= max then break end
    local ok, got = pcall(redis.call, 'RPOP', KEYS[i], max - n)
    if not ok and string.find(error_text(got), 'READONLY', 1, true) then
      -- A replica (the primary moved): say so, so the caller looks for the new primary,
      -- rather than report every queue as skipped.
      error({readonly = error_text(got)})
    elseif not ok then
      table.insert(skipped, KEYS[i])
    elseif got then
      local j = i - 3
      local queue_json, queue = ARGV[5 + 2 * j], ARGV[6 + 2 * j]
      for _, m in ipairs(got) do
        if not (#m > max_bytes and dead_letter(queue, 'oversized',
            'oversized message: ' .. #m .. ' bytes (limit ' .. max_bytes .. ')', m)) then
          n = n + 1
          local tag = ARGV[3] .. n
          table.insert(fields, tag)
          table.insert(fields, '[' .. m .. ',"",' .. queue_json .. ']')
          table.insert(scores, ARGV[2])
          table.insert(scores, tag)
          table.insert(out, tag)
          table.insert(out, j)
          table.insert(out, m)
          if #fields >= 1000 then record() end
        end
      end
    end
  end
  record()
  if n > 0 then write(KEYS[3], 'ZADD', KEYS[3], ARGV[2], ARGV[3]) end
end
local ok, err = pcall(take)
if not ok and type(err) == 'table' and err.readonly then
  return redis.error_reply(err.readonly)
end
if not ok then
  -- A bookkeeping key has the wrong type: undo what was recorded and put every message back
  -- where it was (pushed back last-popped first, so each list is in its old order).
  for k = 1, #out, 3 do
    pcall(redis.call, 'HDEL', KEYS[1], out[k])
    pcall(redis.call, 'ZREM', KEYS[2], out[k])
  end
  pcall(redis.call, 'ZREM', KEYS[3], ARGV[3])
  for k = #out - 2, 1, -3 do
    redis.call('RPUSH', KEYS[out[k + 1] + 3], out[k + 2])
  end
  return redis.error_reply('celeriac: ' .. error_text(err) .. '; no message was taken')
end
return {out, skipped}
"#;

/// Restores, under kombu's `unacked_mutex`, deliveries of celeriac workers whose lease ran out
/// (found in celeriac's own lease set, so any number of other entries cannot hide them) and
/// anyone's that stayed unacked past the visibility timeout, as kombu does. Each goes back with
/// RPUSH (served next) to its priority list, marked redelivered. An entry that cannot be put back
/// (not JSON, not encodable, its queue not a list) goes to a dead-letter list instead; one that
/// cannot even be dead-lettered stays and is looked at again a lease later. The mutex is released
/// on every path, errors included, so one bad entry cannot stop every later restore.
/// KEYS: unacked, unacked_index, unacked_mutex, leases.
/// ARGV: lease cutoff, visibility cutoff, mutex token, global prefix, limit, now (ISO),
/// dead-letter key prefix, now.
const RESTORE: &str = r#"
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', 300000) then return -1 end
local NOW_ISO = ARGV[6]
local DLQ_PREFIX = ARGV[7]
"#;

const RESTORE_BODY: &str = r#"
local prefix = ARGV[4]
local limit = tonumber(ARGV[5])
local function step_of(p)
  p = tonumber(p) or 0
  if p >= 9 then return 9 elseif p >= 6 then return 6 elseif p >= 3 then return 3 end
  return 0
end
local function queues_for(ex, rk)
  if ex == nil or ex == '' then return {rk} end
  local out = {}
  local ok, bindings = pcall(redis.call, 'SMEMBERS', prefix .. '_kombu.binding.' .. ex)
  if not ok then return out end
  for _, b in ipairs(bindings) do
    local key, pattern, queue = string.match(b, '^(.-)\6\22(.-)\6\22(.*)$')
    if key == rk or key == '' then table.insert(out, queue) end
  end
  return out
end
local function put_back(entry)
  local ok, v = pcall(cjson.decode, entry)
  if not (ok and type(v) == 'table' and type(v[1]) == 'table' and type(v[3]) == 'string') then
    local queue = string.match(entry, ',%s*"[^"]*",%s*"([^"]*)"%]$') or 'unknown'
    return dead_letter(queue, 'unrestorable', 'unacked entry is not [envelope, exchange, routing_key]', entry), false
  end
  local env = v[1]
  if type(env.headers) == 'table' then env.headers.redelivered = true end
  local props = env.properties
  local step = 0
  if type(props) == 'table' then
    step = step_of(props.priority)
    if type(props.delivery_info) == 'table' then props.delivery_info.redelivered = true end
  end
  local encoded, body = pcall(cjson.encode, env)
  if not encoded then
    return dead_letter(v[3], 'unrestorable', 'cannot re-encode the envelope: ' .. error_text(body), entry), false
  end
  local queues = queues_for(v[2], v[3])
  if #queues == 0 then
    return dead_letter(v[3], 'unrestorable', 'no queue is bound to routing key ' .. v[3], body), false
  end
  for _, q in ipairs(queues) do
    local key = prefix .. q
    if step > 0 then key = key .. '\6\22' .. step end
    local pushed, err = pcall(redis.call, 'RPUSH', key, body)
    if not pushed and not dead_letter(q, 'unrestorable', key .. ': ' .. error_text(err), body) then
      return false, false
    end
  end
  return true, true
end
local restored = 0
-- Returns false when the entry stays (nowhere to put it), to be looked at again a lease later.
local function restore(tag)
  local entry = redis.call('HGET', KEYS[1], tag)
  if entry then
    local handled, back = put_back(entry)
    if not handled then
      redis.call('ZADD', KEYS[2], ARGV[8], tag)
      return false
    end
    if back then restored = restored + 1 end
  end
  redis.call('HDEL', KEYS[1], tag)
  redis.call('ZREM', KEYS[2], tag)
  return true
end
-- A lease names a fetch: the prefix of its tags, ending in the most it could take. (One that
-- does not is a single tag's lease, as earlier celeriac versions took them.) Returns how many
-- tags it covered.
local function restore_lease(lease)
  local count = tonumber(string.match(lease, '%.(%d+)%.$'))
  if count and count > 100000 then count = nil end
  local kept = false
  if count then
    -- Last taken first: each RPUSH goes in front of the one before, so the first is served first.
    for k = count, 1, -1 do
      if not restore(lease .. k) then kept = true end
    end
  else
    kept = not restore(lease)
  end
  if kept then
    redis.call('ZADD', KEYS[4], ARGV[8], lease)
  else
    redis.call('ZREM', KEYS[4], lease)
  end
  return count or 1
end
local function main()
  local budget = limit
  for _, lease in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, limit)) do
    budget = budget - restore_lease(lease)
    if budget <= 0 then break end
  end
  for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, limit)) do
    restore(tag)
  end
end
local ok, err = pcall(main)
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
if not ok then return redis.error_reply('celeriac restore: ' .. error_text(err)) end
return restored
"#;

/// Moves due members of the scheduled set (`<list key>\n<envelope>`, scored by due time in ms)
/// onto their lists with RPUSH, so they are served next, in the order they fell due. ZREM and
/// RPUSH happen together, so two workers moving at once cannot duplicate a message. A member
/// whose list key is not a list, or that has no list at all, is dead-lettered rather than left
/// first in line, where it would stop every later ETA, retry and rate-limited message; one that
/// cannot even be dead-lettered is pushed a minute back.
/// KEYS: scheduled. ARGV: now (ms), limit, global prefix, now (ISO), dead-letter key prefix.
const MOVE_DUE: &str = r#"
local NOW_ISO = ARGV[4]
local DLQ_PREFIX = ARGV[5]
"#;

const MOVE_DUE_BODY: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
-- Latest first: each RPUSH goes in front of the one before, so the earliest is served first.
for k = #due, 1, -1 do
  local member = due[k]
  local nl = string.find(member, '\n', 1, true)
  local handled
  if nl then
    local list = string.sub(member, 1, nl - 1)
    local envelope = string.sub(member, nl + 1)
    local ok, err = pcall(redis.call, 'RPUSH', ARGV[3] .. list, envelope)
    if ok then
      moved = moved + 1
      handled = true
    else
      local queue = string.match(list, '^(.-)\6\22%d$') or list
      handled = dead_letter(queue, 'unroutable', 'scheduled for ' .. list .. ': ' .. error_text(err), envelope)
    end
  else
    handled = dead_letter('unknown', 'unroutable', 'scheduled member names no queue', member)
  end
  if handled then
    redis.call('ZREM', KEYS[1], member)
  else
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + 60000, member)
  end
end
return moved
"#;

/// Acks a batch with its follow-ups, all or nothing: every key it writes is checked for its type
/// first, so a key of the wrong type fails the call before anything changed (a MULTI would
/// apply every other command and fail anyway, and retrying it would apply them again). A batch
/// without follow-ups only deletes, which is safe to repeat, and is acked with a MULTI instead.
/// KEYS: unacked, unacked_index, leases, scheduled, then each list pushed onto.
/// ARGV: the number of tags, the tags, the number of leases that end, the leases, then per
/// follow-up `L, key index, value` (LPUSH) or `Z, due ms, member` (ZADD to scheduled).
const SETTLE: &str = r#"
local unpack = unpack or table.unpack -- Lua 5.1 (Redis, Valkey) or 5.4 (Dragonfly)
for i, key in ipairs(KEYS) do
  local want = 'list'
  if i == 1 then want = 'hash' elseif i <= 4 then want = 'zset' end
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= want then
    return redis.error_reply('WRONGTYPE celeriac: key ' .. key .. ' holds a ' .. t .. ', not a ' .. want .. '; nothing was settled')
  end
end
local ntags = tonumber(ARGV[1])
local nleases = tonumber(ARGV[ntags + 2])
local i = ntags + nleases + 3
while i <= #ARGV do
  if ARGV[i] == 'L' then
    redis.call('LPUSH', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
  else
    redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i + 2])
  end
  i = i + 3
end
if ntags > 0 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 2, ntags + 1))
  redis.call('ZREM', KEYS[2], unpack(ARGV, 2, ntags + 1))
end
if nleases > 0 then
  redis.call('ZREM', KEYS[3], unpack(ARGV, ntags + 3, ntags + nleases + 2))
end
return 0
"#;

/// A token bucket refilled continuously at ARGV[1] tokens per second up to ARGV[2], through which
/// the messages ARGV[4..] pass in order. Each takes a token; with none left, the bucket goes
/// below zero and the message gets the time its token will exist, recorded as its slot (by id,
/// in the slots set). A message back at its slot runs without taking another token; one back
/// before it (restored after a crash) is told to wait for it. Slots never claimed (the message
/// was revoked meanwhile) are dropped an hour after their time.
/// KEYS: the bucket, its slots. ARGV: rate, capacity, now (ms), ids. Returns the wait of each
/// id in milliseconds, 0 to run now.
const TAKE_TOKENS: &str = r#"
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * rate / 1000)
local waits = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local slot = tonumber(redis.call('ZSCORE', KEYS[2], id))
  local wait = 0
  if slot then
    if slot > now then wait = slot - now else redis.call('ZREM', KEYS[2], id) end
  else
    tokens = tokens - 1
    if tokens < 0 then
      wait = math.ceil(-tokens * 1000 / rate)
      redis.call('ZADD', KEYS[2], now + wait, id)
    end
  end
  table.insert(waits, wait)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(math.max(at, now)))
local ttl = math.ceil((cap - tokens) * 1000 / rate) + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 3600000)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl + 3600000) end
return waits
"#;

/// Takes one record off a dead-letter list and, only if it was there, pushes its message onto a
/// queue: two operators replaying at once cannot duplicate it.
/// KEYS: dead-letter list, target list. ARGV: record, envelope.
const DLQ_REPLAY: &str = r#"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

/// How every delivery tag of a celeriac worker starts (kombu's are UUIDs).
pub const OWN_TAG: &str = "celeriac.";

/// The server's version, from `INFO server`, if it is older than 6.2. A version that cannot be
/// read is let through: a fork that reports it differently still gets its chance.
fn too_old(info: &str) -> Option<&str> {
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:"))?.trim();
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    (parts.len() >= 2 && (parts[0], parts[1]) < (6, 2)).then_some(version)
}

/// The time as dead-letter records give it.
fn now_iso() -> String {
    crate::protocol::format_time(chrono::Utc::now())
}

/// Most tags one restore pass looks at through the lease set, and most entries of
/// `unacked_index` it looks at.
const RESTORE_LIMIT: usize = 10_000;

/// The Redis side of the broker.
#[derive(Clone)]
pub struct RedisBroker {
    /// The database number, which kombu puts in every fanout topic (`/0.celeryev/...`).
    db: i64,
    conn: Conn,
    opts: BrokerOptions,
    fetch: Script,
    restore: Script,
    move_due: Script,
    settle: Script,
    take_tokens: Script,
    dlq_replay: Script,
    /// Unsettled deliveries per fetch lease, so the last settlement can end the lease.
    open: OpenLeases,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("opts", &self.opts).finish()
    }
}

impl RedisBroker {
    /// Connects to the broker at `url` (with no transport options).
    pub async fn connect(url: &str, opts: BrokerOptions) -> anyhow::Result<Self> {
        let endpoint = Endpoint::parse(url, &TransportOptions::default())
            .with_context(|| format!("broker URL {}", masked_url(url)))?;
        Self::open(&endpoint, opts).await
    }

    /// Connects to the broker at `endpoint`.
    pub async fn open(endpoint: &Endpoint, opts: BrokerOptions) -> anyhow::Result<Self> {
        Ok(RedisBroker {
            db: endpoint.db(),
            conn: Conn::open(endpoint).await?,
            opts,
            fetch: Script::new(&format!("{UNDECLARED_KEYS}{FETCH}{LUA_DEAD_LETTER}{FETCH_BODY}")),
            restore: Script::new(&format!(
                "{UNDECLARED_KEYS}{RESTORE}{LUA_DEAD_LETTER}{RESTORE_BODY}"
            )),
            move_due: Script::new(&format!(
                "{UNDECLARED_KEYS}{MOVE_DUE}{LUA_DEAD_LETTER}{MOVE_DUE_BODY}"
            )),
            settle: Script::new(SETTLE),
            take_tokens: Script::new(TAKE_TOKENS),
            dlq_replay: Script::new(DLQ_REPLAY),
            open: OpenLeases::default(),
        })
    }

    /// Fails with a clear message unless the server is Redis 6.2 or newer: the scripts pop with
    /// `RPOP key count` and revocation checks use `ZMSCORE`, both new in 6.2.
    /// A Redis Cluster node is refused too: see [`crate::endpoint::cluster_refused`].
    pub async fn check_version(&self) -> anyhow::Result<()> {
        let cluster: String =
            redis::cmd("INFO").arg("cluster").query_async(&mut self.conn.clone()).await?;
        if cluster.lines().any(|l| l.trim() == "cluster_enabled:1") {
            anyhow::bail!(
                "the broker at {} is a Redis Cluster node: {}",
                self.endpoint().shown(),
                crate::endpoint::cluster_refused()
            );
        }
        let info: String =
            redis::cmd("INFO").arg("server").query_async(&mut self.conn.clone()).await?;
        too_old(&info).map_or(Ok(()), |version| {
            anyhow::bail!(
                "the broker at {} runs Redis {version}; celeriac needs Redis 6.2 or newer \
                 (RPOP with a count, ZMSCORE)",
                self.endpoint().shown()
            )
        })
    }

    /// A key with the global prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.opts.global_prefix)
    }

    /// A celeriac key with the global prefix.
    pub fn own(&self, name: &str) -> String {
        format!("{}celeriac:{name}", self.opts.global_prefix)
    }

    /// The channel kombu publishes a fanout exchange's messages on: `/<db>.<exchange>`, then
    /// `/<routing key>` when there is one (`/0.celeryev/worker.heartbeat`, `/0.celery.pidbox`).
    pub fn fanout_topic(&self, exchange: &str, routing_key: &str) -> String {
        let prefix = &self.opts.global_prefix;
        match routing_key {
            "" => format!("{prefix}/{}.{exchange}", self.db),
            key => format!("{prefix}/{}.{exchange}/{key}", self.db),
        }
    }

    /// Messages waiting on `queue` per priority step (0, 3, 6, 9), in one round trip.
    pub async fn queue_depths(&self, queue: &str) -> BrokerResult<Vec<(u8, u64)>> {
        let mut pipe = redis::pipe();
        for step in PRIORITY_STEPS {
            pipe.llen(self.key(&priority_list(queue, step)));
        }
        let lens: Vec<u64> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(PRIORITY_STEPS.into_iter().zip(lens).collect())
    }

    /// Seconds the oldest message waiting on `queue` has waited: the longest of each priority
    /// list's next message (kombu pushes on the left and takes from the right). `None` when the
    /// queue is empty or that message has no `sent_at` (Celery's producers do not stamp one).
    pub async fn oldest_age(&self, queue: &str) -> BrokerResult<Option<f64>> {
        #[derive(serde::Deserialize)]
        struct Envelope {
            properties: Properties,
        }
        #[derive(serde::Deserialize)]
        struct Properties {
            sent_at: Option<f64>,
        }
        let mut pipe = redis::pipe();
        for step in PRIORITY_STEPS {
            pipe.lindex(self.key(&priority_list(queue, step)), -1);
        }
        let heads: Vec<Option<Vec<u8>>> = pipe.query_async(&mut self.conn.clone()).await?;
        let now = now_secs();
        Ok(heads
            .iter()
            .flatten()
            .filter_map(|raw| serde_json::from_slice::<Envelope>(raw).ok()?.properties.sent_at)
            .map(|sent| (now - sent).max(0.0))
            .reduce(f64::max))
    }

    /// Where it connects; [`Endpoint::client`] gives the stand-alone connections (pub/sub).
    pub fn endpoint(&self) -> &Endpoint {
        self.conn.endpoint()
    }

    /// The connection, for callers that need plain commands.
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// The options.
    pub fn options(&self) -> &BrokerOptions {
        &self.opts
    }

    /// The dead-letter list of `queue`.
    pub fn dlq_key(&self, queue: &str) -> String {
        self.own(&format!("dlq:{queue}"))
    }

    /// Adds the commands of `f` to `pipe`.
    fn follow_up_into(&self, pipe: &mut redis::Pipeline, f: &FollowUp) {
        match f {
            FollowUp::Publish { queue, priority, envelope } => {
                pipe.lpush(self.key(&priority_list(queue, *priority)), envelope).ignore();
            }
            FollowUp::Schedule { queue, priority, envelope, due_ms } => {
                let member = format!("{}\n{envelope}", priority_list(queue, *priority));
                pipe.zadd(self.own("scheduled"), member, *due_ms).ignore();
            }
            FollowUp::DeadLetter { queue, record } => {
                pipe.lpush(self.dlq_key(queue), record).ignore();
            }
        }
    }

    async fn flagged(&self, set: &str, ids: &[&str]) -> redis::RedisResult<Vec<bool>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
            .arg(self.own(set))
            .arg(ids)
            .query_async(&mut self.conn.clone())
            .await?;
        let now = now_secs();
        Ok(scores.into_iter().map(|s| s.is_some_and(|e| e > now)).collect())
    }

    /// Sets the `unacked_index` time of the tags still there, and of their fetches' leases.
    async fn rescore(&self, tags: &[String], time: f64) -> BrokerResult<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let leases = leases_of(tags.iter().map(String::as_str));
        for (key, members) in [
            (self.key("unacked_index"), tags.iter().map(String::as_str).collect()),
            (self.own("leases"), leases),
        ] {
            if members.is_empty() {
                continue;
            }
            let cmd = pipe.cmd("ZADD").arg(key).arg("XX");
            for m in members {
                cmd.arg(time).arg(m);
            }
            cmd.ignore();
        }
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    /// Acks `batch` with its follow-ups and removes `ending` leases. Plain acks (the common
    /// case) are a MULTI: they only delete, so a repeat after an error changes nothing. Anything
    /// that writes goes through the SETTLE script, which checks every key first.
    async fn settle_with(
        &self,
        batch: &[(&str, &[FollowUp])],
        ending: &[String],
    ) -> BrokerResult<()> {
        let tags: Vec<&str> = batch.iter().map(|(tag, _)| *tag).collect();
        if batch.iter().all(|(_, follow_ups)| follow_ups.is_empty()) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            pipe.hdel(self.key("unacked"), &tags).ignore();
            pipe.zrem(self.key("unacked_index"), &tags).ignore();
            if !ending.is_empty() {
                pipe.zrem(self.own("leases"), ending).ignore();
            }
            return Ok(pipe.query_async(&mut self.conn.clone()).await?);
        }
        let mut inv = self.settle.prepare_invoke();
        inv.key(self.key("unacked"))
            .key(self.key("unacked_index"))
            .key(self.own("leases"))
            .key(self.own("scheduled"));
        inv.arg(tags.len()).arg(&tags).arg(ending.len()).arg(ending);
        // Each list the batch pushes onto is passed as a key, so the script can check its type
        // before it writes anything; a follow-up names it by its position.
        let mut lists: Vec<String> = Vec::new();
        let mut slot = |inv: &mut redis::ScriptInvocation<'_>, key: String| {
            let at = lists.iter().position(|k| *k == key).unwrap_or_else(|| {
                inv.key(&key);
                lists.push(key);
                lists.len() - 1
            });
            at + 5
        };
        for f in batch.iter().flat_map(|(_, follow_ups)| follow_ups.iter()) {
            match f {
                FollowUp::Publish { queue, priority, envelope } => {
                    let at = slot(&mut inv, self.key(&priority_list(queue, *priority)));
                    inv.arg("L").arg(at).arg(envelope);
                }
                FollowUp::DeadLetter { queue, record } => {
                    let at = slot(&mut inv, self.dlq_key(queue));
                    inv.arg("L").arg(at).arg(record);
                }
                FollowUp::Schedule { queue, priority, envelope, due_ms } => {
                    let member = format!("{}\n{envelope}", priority_list(queue, *priority));
                    inv.arg("Z").arg(*due_ms).arg(member);
                }
            }
        }
        Ok(inv.invoke_async(&mut self.conn.clone()).await?)
    }

    /// The lists of `queues` in fetch order: each queue's priority steps before the next queue
    /// (strict queue order).
    fn fetch_keys(&self, queues: &[String]) -> (Vec<String>, Vec<String>) {
        let mut keys = Vec::new();
        let mut queue_of = Vec::new();
        for q in queues {
            for step in PRIORITY_STEPS {
                keys.push(self.key(&priority_list(q, step)));
                queue_of.push(q.clone());
            }
        }
        (keys, queue_of)
    }
}

impl Broker for RedisBroker {
    async fn declare(&self, queues: &[String]) -> BrokerResult<()> {
        let mut pipe = redis::pipe();
        for q in queues {
            let member = format!("{q}{PRIORITY_SEP}{PRIORITY_SEP}{q}");
            pipe.sadd(self.key("_kombu.binding.celery"), &member).ignore();
            pipe.sadd(self.key("_kombu.binding_permanent.celery"), &member).ignore();
        }
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        tag_prefix: &str,
    ) -> BrokerResult<Vec<Delivery>> {
        let (lists, queue_of) = self.fetch_keys(queues);
        let mut inv = self.fetch.prepare_invoke();
        inv.key(self.key("unacked")).key(self.key("unacked_index")).key(self.own("leases"));
        for k in &lists {
            inv.key(k);
        }
        inv.arg(max)
            .arg(now_secs())
            .arg(format!("{OWN_TAG}{tag_prefix}{max}."))
            .arg(crate::protocol::MAX_MESSAGE_BYTES)
            .arg(now_iso())
            .arg(self.dlq_key(""));
        for q in &queue_of {
            inv.arg(serde_json::Value::String(q.clone()).to_string()).arg(q);
        }
        let (flat, skipped): (Vec<redis::Value>, Vec<String>) =
            inv.invoke_async(&mut self.conn.clone()).await?;
        for key in skipped {
            tracing::warn!("key {key:?} is not a list, so it cannot be a queue: skipped it");
        }
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(tag), Some(index), Some(payload)) = (it.next(), it.next(), it.next()) {
            let tag: String = redis::from_redis_value(&tag)?;
            let index: usize = redis::from_redis_value(&index)?;
            let payload: Vec<u8> = redis::from_redis_value(&payload)?;
            let queue = queue_of.get(index.wrapping_sub(1)).cloned().unwrap_or_default();
            out.push(Delivery { tag, queue, payload });
        }
        if let Some(lease) = out.first().and_then(|d| super::lease_of(&d.tag)) {
            self.open.opened(lease, out.len());
        }
        Ok(out)
    }

    async fn settle(&self, batch: &[(&str, &[FollowUp])]) -> BrokerResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let taken = self.open.settling(batch.iter().map(|(tag, _)| *tag));
        let settled = self.settle_with(batch, &taken.ending).await;
        if settled.is_err() {
            self.open.failed(taken);
        }
        settled
    }

    async fn ping(&self) -> BrokerResult<()> {
        Ok(redis::cmd("PING").query_async(&mut self.conn.clone()).await?)
    }

    async fn mark_connection(&self, name: &str) -> BrokerResult<bool> {
        // Pipelined, so both go down the same connection: the name read is the one this
        // connection had, and a new one gets the name at once. Names may not hold spaces.
        let name: String =
            name.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("GETNAME").cmd("CLIENT").arg("SETNAME").arg(&name).ignore();
        let (previous,): (Option<String>,) = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(previous.as_deref() != Some(name.as_str()))
    }

    async fn send(&self, items: &[FollowUp]) -> BrokerResult<()> {
        let mut pipe = redis::pipe();
        for f in items {
            self.follow_up_into(&mut pipe, f);
        }
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    async fn renew(&self, tags: &[String]) -> BrokerResult<()> {
        // XX: only tags still present, so an acked message is not resurrected. The new time
        // keeps a lease of ours alive and kombu's visibility-timeout sweep away from it.
        self.open.forget_all_but(&leases_of(tags.iter().map(String::as_str)));
        self.rescore(tags, now_secs()).await
    }

    async fn expire_leases(&self, tags: &[String]) -> BrokerResult<()> {
        // Time zero: past every lease and visibility timeout.
        self.rescore(tags, 0.0).await
    }

    async fn restore_expired(&self) -> BrokerResult<Option<u64>> {
        let now = now_secs();
        let n: i64 = self
            .restore
            .key(self.key("unacked"))
            .key(self.key("unacked_index"))
            .key(self.key("unacked_mutex"))
            .key(self.own("leases"))
            .arg(now - self.opts.lease.as_secs_f64())
            .arg(now - self.opts.visibility_timeout.as_secs_f64())
            .arg(uuid::Uuid::new_v4().to_string())
            .arg(&self.opts.global_prefix)
            .arg(RESTORE_LIMIT)
            .arg(now_iso())
            .arg(self.dlq_key(""))
            .arg(now)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((n >= 0).then_some(n as u64))
    }

    async fn move_due(&self) -> BrokerResult<u64> {
        Ok(self
            .move_due
            .key(self.own("scheduled"))
            .arg(now_ms())
            .arg(1000)
            .arg(&self.opts.global_prefix)
            .arg(now_iso())
            .arg(self.dlq_key(""))
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    async fn take_tokens(
        &self,
        task: &str,
        per_second: f64,
        capacity: f64,
        ids: &[&str],
    ) -> BrokerResult<Vec<Option<Duration>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let waits: Vec<i64> = self
            .take_tokens
            .key(self.own(&format!("rate:{task}")))
            .key(self.own(&format!("rate-slots:{task}")))
            .arg(per_second)
            .arg(capacity)
            .arg(now_ms())
            .arg(ids)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(waits.into_iter().map(|w| (w > 0).then(|| Duration::from_millis(w as u64))).collect())
    }

    async fn revoke(&self, ids: &[String], ttl: Duration, terminate: bool) -> BrokerResult<()> {
        let expires = now_secs() + ttl.as_secs_f64();
        let mut pipe = redis::pipe();
        for set in std::iter::once("revoked").chain(terminate.then_some("terminate")) {
            for id in ids {
                pipe.zadd(self.own(set), id, expires).ignore();
            }
            pipe.cmd("ZREMRANGEBYSCORE").arg(self.own(set)).arg("-inf").arg(now_secs()).ignore();
        }
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    async fn revoked_count(&self) -> BrokerResult<u64> {
        let key = self.own("revoked");
        let (count,): (u64,) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_secs())
            .ignore()
            .zcard(&key)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(count)
    }

    async fn revoked_among(&self, ids: &[&str]) -> BrokerResult<Vec<bool>> {
        Ok(self.flagged("revoked", ids).await?)
    }

    async fn terminating(&self, ids: &[&str]) -> BrokerResult<Vec<bool>> {
        Ok(self.flagged("terminate", ids).await?)
    }

    async fn queue_len(&self, queue: &str) -> BrokerResult<u64> {
        Ok(self.queue_depths(queue).await?.iter().map(|(_, n)| n).sum())
    }

    async fn scheduled_len(&self) -> BrokerResult<u64> {
        Ok(self.conn.clone().zcard(self.own("scheduled")).await?)
    }

    async fn dlq_len(&self, queue: &str) -> BrokerResult<u64> {
        Ok(self.conn.clone().llen(self.dlq_key(queue)).await?)
    }

    async fn dlq_queues(&self) -> BrokerResult<Vec<String>> {
        let prefix = self.dlq_key("");
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        Ok(keys.into_iter().map(|k| k[prefix.len()..].to_string()).collect())
    }

    async fn dlq_records(&self, queue: &str, limit: usize) -> BrokerResult<Vec<String>> {
        let end = if limit == 0 { 0 } else { (limit.min(isize::MAX as usize) as isize) - 1 };
        Ok(self.conn.clone().lrange(self.dlq_key(queue), 0, end).await?)
    }

    async fn dlq_replay(
        &self,
        queue: &str,
        record: &str,
        to_queue: &str,
        priority: u8,
        envelope: &str,
    ) -> BrokerResult<bool> {
        let moved: i64 = self
            .dlq_replay
            .key(self.dlq_key(queue))
            .key(self.key(&priority_list(to_queue, priority)))
            .arg(record)
            .arg(envelope)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(moved > 0)
    }

    async fn dlq_purge(&self, queue: &str) -> BrokerResult<u64> {
        let key = self.dlq_key(queue);
        let (n,): (u64,) = redis::pipe()
            .atomic()
            .llen(&key)
            .del(&key)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n)
    }

    fn describe(&self) -> serde_json::Value {
        use crate::endpoint::Target;
        let endpoint = self.endpoint();
        let (first, transport, mut options) = match endpoint.target() {
            Target::Direct(nodes) => (&nodes[0].info, "redis", serde_json::json!({})),
            Target::Sentinel(spec) => (
                &spec.sentinels[0].info,
                "sentinel",
                serde_json::json!({"master_name": spec.master_name}),
            ),
        };
        options["global_keyprefix"] = self.opts.global_prefix.clone().into();
        let (host, port) = match &first.addr {
            redis::ConnectionAddr::Tcp(h, p) => (h.clone(), Some(*p)),
            redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), Some(*port)),
            redis::ConnectionAddr::Unix(_) => ("localhost".to_string(), None),
        };
        let alternates: Vec<String> =
            endpoint.shown().split(';').skip(1).map(str::to_string).collect();
        serde_json::json!({
            "hostname": host,
            "userid": first.redis.username,
            "virtual_host": self.db.to_string(),
            "port": port,
            "insist": false,
            "ssl": matches!(first.addr, redis::ConnectionAddr::TcpTls { .. }),
            "transport": transport,
            "connect_timeout": 4,
            "transport_options": options,
            "login_method": null,
            "uri_prefix": null,
            "heartbeat": 120.0,
            "failover_strategy": "round-robin",
            "alternates": alternates,
            "url": endpoint.shown().split(';').next().unwrap_or_default(),
        })
    }

    async fn serve_control(
        &self,
        hostname: String,
        revoke_ttl: Duration,
        node: std::sync::Arc<dyn crate::control::Node>,
    ) {
        crate::control::serve(self.clone(), hostname, revoke_ttl, node).await
    }

    async fn publish_event(
        &self,
        hostname: &str,
        routing_key: &str,
        body: &str,
    ) -> BrokerResult<u64> {
        let headers = serde_json::json!({ "hostname": hostname });
        let envelope = crate::protocol::kombu_envelope(body, headers, 1, "celeryev", routing_key);
        Ok(self.conn.clone().publish(self.fanout_topic("celeryev", routing_key), envelope).await?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_older_than_6_2_is_refused_by_its_version() {
        let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        assert_eq!(super::too_old(&info("6.0.16")), Some("6.0.16"));
        assert_eq!(super::too_old(&info("5.0.7")), Some("5.0.7"));
        assert_eq!(super::too_old(&info("6.2.0")), None);
        assert_eq!(super::too_old(&info("7.0.15")), None);
        assert_eq!(super::too_old("# Server\r\n"), None);
    }
}
