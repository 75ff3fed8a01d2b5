//! The Redis broker, in kombu's layout so Python Celery workers and celeriac workers share
//! queues and recover each other's messages.
//!
//! kombu's keys (the protocol): a queue is a list; priorities live in sub-lists
//! `<queue>\x06\x16<step>`; `_kombu.binding.<exchange>` holds bindings; a delivered message sits
//! in the `unacked` hash (`tag -> [envelope, exchange, routing_key]`) with its delivery time in
//! `unacked_index` until it is acked.
//!
//! celeriac's own keys, under `celeriac:`: `leases` (tag -> lease deadline of our in-flight
//! messages, renewed while they run), `scheduled` (ETA messages, by due time), `dlq:<queue>`,
//! `revoked` (task id -> expiry), `rate:<task>` (token buckets), `kv:<namespace>:<key>`.
//!
//! Every step that moves a message is one Lua script or one MULTI, so a crash at any point
//! leaves each message in exactly one place.

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// kombu's priority separator.
pub const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's priority steps; a priority rounds down to a step; on Redis 0 is served first.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The list holding messages of `priority` for `queue` (without the global prefix).
pub fn priority_list(queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS.iter().rev().find(|s| **s <= priority.min(9)).copied().unwrap_or(0);
    if step == 0 { queue.to_string() } else { format!("{queue}{PRIORITY_SEP}{step}") }
}

/// A message taken from a queue, recorded as unacked under `tag`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Key in `unacked`; ack with it.
    pub tag: String,
    /// The queue it came from.
    pub queue: String,
    /// The envelope, untouched.
    pub payload: Vec<u8>,
}

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// kombu's `global_keyprefix`, put before every key and channel.
    pub global_prefix: String,
    /// How long a message of ours may go without a lease renewal before it is restored.
    pub lease: Duration,
    /// kombu's `visibility_timeout`: entries of other workers are restored only after this.
    pub visibility_timeout: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            global_prefix: String::new(),
            lease: Duration::from_secs(30),
            visibility_timeout: Duration::from_secs(3600),
        }
    }
}

/// Seconds since the Unix epoch, as a float (kombu's unacked_index scores).
pub fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Pops up to ARGV[1] messages from KEYS[4..] in order and records each in `unacked`,
/// `unacked_index` and our `leases` in the same step. kombu stores `[envelope, exchange,
/// routing_key]`; the envelope is spliced in as text so Redis does not parse it.
const FETCH: &str = r#"
local max = tonumber(ARGV[1])
local out = {}
local n = 0
for i = 4, #KEYS do
  if n >= max then break end
  local got = redis.call('RPOP', KEYS[i], max - n)
  if got then
    local queue_json = ARGV[4 + (i - 3)]
    for _, m in ipairs(got) do
      n = n + 1
      local tag = ARGV[4] .. n
      redis.call('HSET', KEYS[1], tag, '[' .. m .. ',"",' .. queue_json .. ']')
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
      redis.call('ZADD', KEYS[3], ARGV[3], tag)
      table.insert(out, tag)
      table.insert(out, i - 3)
      table.insert(out, m)
    end
  end
end
return out
"#;

/// Restores messages whose lease ran out (ours) or that stayed unacked past the visibility
/// timeout (anyone's, as kombu does), under kombu's `unacked_mutex`. Each goes back with RPUSH
/// (served next) to its priority list, marked redelivered.
/// KEYS: unacked, unacked_index, leases, unacked_mutex.
/// ARGV: now, lease cutoff (now), visibility cutoff, mutex token, global prefix, limit.
const RESTORE: &str = r#"
if not redis.call('SET', KEYS[4], ARGV[4], 'NX', 'PX', 300000) then return -1 end
local prefix = ARGV[5]
local limit = tonumber(ARGV[6])
local function step_of(p)
  p = tonumber(p) or 0
  if p >= 9 then return 9 elseif p >= 6 then return 6 elseif p >= 3 then return 3 end
  return 0
end
local function queues_for(ex, rk)
  if ex == nil or ex == '' then return {rk} end
  local out = {}
  for _, b in ipairs(redis.call('SMEMBERS', prefix .. '_kombu.binding.' .. ex)) do
    local key, pattern, queue = string.match(b, '^(.-)\6\22(.-)\6\22(.*)$')
    if key == rk or key == '' then table.insert(out, queue) end
  end
  return out
end
local restored = 0
local function restore(tag)
  local p = redis.call('HGET', KEYS[1], tag)
  if p then
    local ok, v = pcall(cjson.decode, p)
    if ok and type(v) == 'table' and type(v[1]) == 'table' then
      local env = v[1]
      if type(env.headers) == 'table' then env.headers.redelivered = true end
      local props = env.properties
      local step = 0
      if type(props) == 'table' then
        step = step_of(props.priority)
        if type(props.delivery_info) == 'table' then props.delivery_info.redelivered = true end
      end
      local body = cjson.encode(env)
      for _, q in ipairs(queues_for(v[2], v[3])) do
        local key = prefix .. q
        if step > 0 then key = key .. '\6\22' .. step end
        redis.call('RPUSH', key, body)
      end
      restored = restored + 1
    end
  end
  redis.call('HDEL', KEYS[1], tag)
  redis.call('ZREM', KEYS[2], tag)
  redis.call('ZREM', KEYS[3], tag)
end
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[2], 'LIMIT', 0, limit)) do
  restore(tag)
end
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, limit)) do
  restore(tag)
end
if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end
return restored
"#;

/// Moves due members of the scheduled set (`<list key>\n<envelope>`, scored by due time in ms)
/// onto their lists with RPUSH, so they are served next. ZREM and RPUSH happen together, so two
/// workers moving at once cannot duplicate a message.
/// KEYS: scheduled. ARGV: now (ms), limit, global prefix.
const MOVE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local nl = string.find(member, '\n', 1, true)
  if nl then
    redis.call('RPUSH', ARGV[3] .. string.sub(member, 1, nl - 1), string.sub(member, nl + 1))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"#;

/// A token bucket refilled continuously at ARGV[1] tokens per second up to ARGV[2]; takes one
/// token or says how many milliseconds until one is available. KEYS: the bucket. ARGV: rate,
/// capacity, now (ms).
const TAKE_TOKEN: &str = r#"
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
tokens = math.min(cap, tokens + (now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap * 1000 / rate) + 1000)
return wait
"#;

/// The Redis side of the broker.
#[derive(Clone)]
pub struct RedisBroker {
    url: String,
    conn: ConnectionManager,
    opts: BrokerOptions,
    fetch: Script,
    restore: Script,
    move_due: Script,
    take_token: Script,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("opts", &self.opts).finish()
    }
}

/// Connects with automatic reconnection; the first connection must succeed.
pub async fn connect(url: &str) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url).with_context(|| format!("invalid Redis URL {url}"))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_max_delay(2_000)
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(Duration::from_secs(30));
    ConnectionManager::new_with_config(client, config)
        .await
        .with_context(|| format!("connect to Redis at {url}"))
}

impl RedisBroker {
    /// Connects to the broker at `url`.
    pub async fn connect(url: &str, opts: BrokerOptions) -> anyhow::Result<Self> {
        Ok(RedisBroker {
            url: url.to_string(),
            conn: connect(url).await?,
            opts,
            fetch: Script::new(FETCH),
            restore: Script::new(RESTORE),
            move_due: Script::new(MOVE_DUE),
            take_token: Script::new(TAKE_TOKEN),
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

    /// The URL it was connected with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection, for callers that need plain commands.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The options.
    pub fn options(&self) -> &BrokerOptions {
        &self.opts
    }

    /// Declares `queues` on the default direct exchange `celery`, as a Python worker does, so a
    /// producer that routes through the exchange reaches them.
    pub async fn declare(&self, queues: &[String]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for q in queues {
            let member = format!("{q}{PRIORITY_SEP}{PRIORITY_SEP}{q}");
            pipe.sadd(self.key("_kombu.binding.celery"), &member).ignore();
            pipe.sadd(self.key("_kombu.binding_permanent.celery"), &member).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// The lists of `queues` in fetch order: each queue's priority steps before the next queue
    /// (strict queue order).
    fn fetch_keys(&self, queues: &[String]) -> (Vec<String>, Vec<(usize, String)>) {
        let mut keys = Vec::new();
        let mut queue_of = Vec::new();
        for (qi, q) in queues.iter().enumerate() {
            for step in PRIORITY_STEPS {
                keys.push(self.key(&priority_list(q, step)));
                queue_of.push((qi, q.clone()));
            }
        }
        (keys, queue_of)
    }

    /// Takes up to `max` messages, recording each as unacked with a lease, in one atomic step.
    /// `tag_prefix` must be unique per call (the worker's id and a counter).
    pub async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        tag_prefix: &str,
    ) -> redis::RedisResult<Vec<Delivery>> {
        let (lists, queue_of) = self.fetch_keys(queues);
        let now = now_secs();
        let mut inv = self.fetch.prepare_invoke();
        inv.key(self.key("unacked")).key(self.key("unacked_index")).key(self.own("leases"));
        for k in &lists {
            inv.key(k);
        }
        inv.arg(max).arg(now).arg(now + self.opts.lease.as_secs_f64()).arg(tag_prefix);
        for (_, q) in &queue_of {
            inv.arg(serde_json::Value::String(q.clone()).to_string());
        }
        let flat: Vec<redis::Value> = inv.invoke_async(&mut self.conn.clone()).await?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(tag), Some(index), Some(payload)) = (it.next(), it.next(), it.next()) {
            let tag: String = redis::from_redis_value(&tag)?;
            let index: usize = redis::from_redis_value(&index)?;
            let payload: Vec<u8> = redis::from_redis_value(&payload)?;
            let queue = queue_of.get(index - 1).map(|(_, q)| q.clone()).unwrap_or_default();
            out.push(Delivery { tag, queue, payload });
        }
        Ok(out)
    }

    /// Adds the commands that ack `tag` to `pipe`.
    pub fn ack_into(&self, pipe: &mut redis::Pipeline, tag: &str) {
        pipe.hdel(self.key("unacked"), tag).ignore();
        pipe.zrem(self.key("unacked_index"), tag).ignore();
        pipe.zrem(self.own("leases"), tag).ignore();
    }

    /// Acks delivered messages: they leave the broker for good.
    pub async fn ack(&self, tags: &[String]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for t in tags {
            self.ack_into(&mut pipe, t);
        }
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// Renews the leases of running messages, and their `unacked_index` time so that kombu's own
    /// visibility-timeout sweep leaves a long task alone too.
    pub async fn renew(&self, tags: &[String]) -> redis::RedisResult<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let deadline = now + self.opts.lease.as_secs_f64();
        let mut pipe = redis::pipe();
        for t in tags {
            // XX: only tags still present; an acked message is not resurrected.
            pipe.cmd("ZADD").arg(self.key("unacked_index")).arg("XX").arg(now).arg(t).ignore();
            pipe.cmd("ZADD").arg(self.own("leases")).arg("XX").arg(deadline).arg(t).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// Restores expired leases and stale foreign entries; returns how many messages went back,
    /// or `None` when another worker holds kombu's restore mutex.
    pub async fn restore_expired(&self) -> redis::RedisResult<Option<u64>> {
        let now = now_secs();
        let n: i64 = self
            .restore
            .key(self.key("unacked"))
            .key(self.key("unacked_index"))
            .key(self.own("leases"))
            .key(self.key("unacked_mutex"))
            .arg(now)
            .arg(now)
            .arg(now - self.opts.visibility_timeout.as_secs_f64())
            .arg(uuid::Uuid::new_v4().to_string())
            .arg(&self.opts.global_prefix)
            .arg(1000)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((n >= 0).then_some(n as u64))
    }

    /// Adds an LPUSH of `envelope` onto `queue` at `priority` to `pipe`.
    pub fn publish_into(
        &self,
        pipe: &mut redis::Pipeline,
        queue: &str,
        priority: u8,
        envelope: &str,
    ) {
        pipe.lpush(self.key(&priority_list(queue, priority)), envelope).ignore();
    }

    /// Adds the scheduling of `envelope` for `queue` at `eta_ms` to `pipe`.
    pub fn schedule_into(
        &self,
        pipe: &mut redis::Pipeline,
        queue: &str,
        priority: u8,
        envelope: &str,
        eta_ms: i64,
    ) {
        let member = format!("{}\n{envelope}", priority_list(queue, priority));
        pipe.zadd(self.own("scheduled"), member, eta_ms).ignore();
    }

    /// Publishes one message now.
    pub async fn publish(
        &self,
        queue: &str,
        priority: u8,
        envelope: &str,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        self.publish_into(&mut pipe, queue, priority, envelope);
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// Moves due scheduled messages to their queues; returns how many.
    pub async fn move_due(&self) -> redis::RedisResult<u64> {
        let now_ms = (now_secs() * 1000.0) as i64;
        self.move_due
            .key(self.own("scheduled"))
            .arg(now_ms)
            .arg(1000)
            .arg(&self.opts.global_prefix)
            .invoke_async(&mut self.conn.clone())
            .await
    }

    /// Takes a token from the global bucket of `task`: `None` when allowed now, else the wait.
    pub async fn take_token(
        &self,
        task: &str,
        per_second: f64,
        capacity: f64,
    ) -> redis::RedisResult<Option<Duration>> {
        let now_ms = (now_secs() * 1000.0) as i64;
        let wait: i64 = self
            .take_token
            .key(self.own(&format!("rate:{task}")))
            .arg(per_second)
            .arg(capacity)
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait as u64)))
    }

    /// Marks task ids revoked for `ttl`: queued copies are skipped wherever they are; with
    /// `terminate`, running ones are stopped too.
    pub async fn revoke(
        &self,
        ids: &[String],
        ttl: Duration,
        terminate: bool,
    ) -> redis::RedisResult<()> {
        let expires = now_secs() + ttl.as_secs_f64();
        let mut pipe = redis::pipe();
        for set in std::iter::once("revoked").chain(terminate.then_some("terminate")) {
            for id in ids {
                pipe.zadd(self.own(set), id, expires).ignore();
            }
            pipe.cmd("ZREMRANGEBYSCORE").arg(self.own(set)).arg("-inf").arg(now_secs()).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
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

    /// Which of `ids` are revoked (and the revocation has not expired).
    pub async fn revoked(&self, ids: &[&str]) -> redis::RedisResult<Vec<bool>> {
        self.flagged("revoked", ids).await
    }

    /// How many revocations are stored (expired ones included until the next revoke prunes them).
    pub async fn revoked_count(&self) -> redis::RedisResult<u64> {
        self.conn.clone().zcard(self.own("revoked")).await
    }

    /// Every task id whose revocation has not expired.
    pub async fn revoked_ids(&self) -> redis::RedisResult<Vec<String>> {
        self.conn.clone().zrangebyscore(self.own("revoked"), now_secs(), "+inf").await
    }

    /// Which of `ids` were revoked with terminate.
    pub async fn terminating(&self, ids: &[&str]) -> redis::RedisResult<Vec<bool>> {
        self.flagged("terminate", ids).await
    }

    /// Ends the leases of `tags` now, so the next restore hands them back to their queues.
    pub async fn expire_leases(&self, tags: &[String]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for t in tags {
            pipe.cmd("ZADD").arg(self.own("leases")).arg("XX").arg(0).arg(t).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// The dead-letter list of `queue`.
    pub fn dlq_key(&self, queue: &str) -> String {
        self.own(&format!("dlq:{queue}"))
    }

    /// Lengths of the lists of `queue` (all priorities).
    pub async fn queue_len(&self, queue: &str) -> redis::RedisResult<u64> {
        let mut pipe = redis::pipe();
        for step in PRIORITY_STEPS {
            pipe.llen(self.key(&priority_list(queue, step)));
        }
        let lens: Vec<u64> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(lens.iter().sum())
    }

    /// Runs `pipe` on the broker connection.
    pub async fn exec(&self, pipe: &redis::Pipeline) -> redis::RedisResult<()> {
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// Counts messages in the scheduled set.
    pub async fn scheduled_len(&self) -> redis::RedisResult<u64> {
        self.conn.clone().zcard(self.own("scheduled")).await
    }
}

#[cfg(test)]
mod tests {
    use super::priority_list;

    #[test]
    fn priorities_round_down_to_kombu_steps() {
        assert_eq!(priority_list("celery", 0), "celery");
        assert_eq!(priority_list("celery", 2), "celery");
        assert_eq!(priority_list("celery", 5), "celery\x06\x163");
        assert_eq!(priority_list("celery", 6), "celery\x06\x166");
        assert_eq!(priority_list("celery", 42), "celery\x06\x169");
    }
}
