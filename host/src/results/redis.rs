//! Results on Redis: `celery-task-meta-<id>` written with SETEX and announced
//! with PUBLISH on the same key, which is what `AsyncResult.get()` waits for.

use super::{StoredResult, is_ready};
use crate::broker::BrokerResult;
use crate::endpoint::{Conn, Endpoint};
use redis::AsyncCommands;
use std::time::Duration;

/// SET (with expiry when ARGV[1] > 0) and PUBLISH each KEYS[i] to ARGV[i + 1], unless the key
/// already holds a meta whose `status` is SUCCESS. The status member itself is read (decoded only
/// when the text mentions SUCCESS at all, so the common case costs no parse): a progress meta
/// such as `{"status": "PROGRESS", "result": {"status": "SUCCESS"}}` must not freeze the task's
/// state. A key of the wrong type (not a string) is simply overwritten, as SET does.
const STORE: &str = r#"
local ttl = tonumber(ARGV[1])
local function succeeded(key)
  local ok, cur = pcall(redis.call, 'GET', key)
  if not ok or type(cur) ~= 'string' or not string.find(cur, 'SUCCESS', 1, true) then
    return false
  end
  local decoded, meta = pcall(cjson.decode, cur)
  return decoded and type(meta) == 'table' and meta.status == 'SUCCESS'
end
for i, key in ipairs(KEYS) do
  if not succeeded(key) then
    if ttl > 0 then redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
    else redis.call('SET', key, ARGV[i + 1]) end
    redis.call('PUBLISH', key, ARGV[i + 1])
  end
end
return 0
"#;

/// A chord's join, Celery 5.7's algorithm, so Python 5.6 and 5.7 workers and celeriac can share
/// one chord. KEYS: `.j` (ZSET of entries scored by `group_index`), `.t` (extra parts from
/// `add_to_chord`), `.s` (the size the client set), `.d` (parts already recorded, `id:score`),
/// `.c` (who sends the body; then `done`). ARGV: part id, score, entry, expiry seconds.
/// Returns `{-1}` when the chord is done, `{0}` while it waits or another part claimed it, and
/// `{1, entries}` to the part that completes and claims it.
const CHORD_JOIN: &str = r#"
local claim = redis.call('GET', KEYS[5])
if claim == 'done' then return {-1} end
local seen = ARGV[1] .. ':' .. ARGV[2]
if redis.call('SISMEMBER', KEYS[4], seen) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[4], seen)
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
local count = redis.call('ZCOUNT', KEYS[1], '-inf', '+inf')
local size = tonumber(redis.call('GET', KEYS[3]) or '')
local extra = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if not size or count < size + extra then return {0} end
if claim and claim ~= ARGV[1] then return {0} end
redis.call('SET', KEYS[5], ARGV[1], 'EX', math.max(ttl, 86400))
return {1, redis.call('ZRANGE', KEYS[1], 0, -1)}
"#;

/// Ends a chord claimed by ARGV[1]: deletes its join, marks it done for ARGV[2] seconds.
const CHORD_DONE: &str = r#"
if redis.call('GET', KEYS[5]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('SET', KEYS[5], 'done', 'EX', math.max(tonumber(ARGV[2]), 300))
return 1
"#;

/// Celery's result backend puts its `global_keyprefix` before every key with a `_` in between,
/// unless the prefix already ends in one of `:_-.`.
pub fn key_prefix(prefix: &str) -> String {
    match prefix.chars().last() {
        None => String::new(),
        Some(':' | '_' | '-' | '.') => prefix.to_string(),
        Some(_) => format!("{prefix}_"),
    }
}

/// The result backend on Redis.
#[derive(Clone)]
pub struct RedisResults {
    conn: Conn,
    prefix: String,
    expires: Duration,
    store_script: redis::Script,
    chord_join: redis::Script,
    chord_done: redis::Script,
}

impl std::fmt::Debug for RedisResults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisResults").field("prefix", &self.prefix).finish()
    }
}

impl RedisResults {
    /// Connects to `endpoint`; `expires` is Celery's `result_expires` (0 keeps results
    /// forever); `prefix` is the global key prefix, applied as Celery's result backend does (see
    /// [`key_prefix`]).
    pub async fn open(
        endpoint: &Endpoint,
        prefix: &str,
        expires: Duration,
    ) -> anyhow::Result<Self> {
        Ok(RedisResults {
            conn: Conn::open(endpoint).await?,
            prefix: key_prefix(prefix),
            expires,
            store_script: redis::Script::new(STORE),
            chord_join: redis::Script::new(CHORD_JOIN),
            chord_done: redis::Script::new(CHORD_DONE),
        })
    }

    /// Whether the backend answers.
    pub async fn ping(&self) -> crate::broker::BrokerResult<()> {
        Ok(redis::cmd("PING").query_async(&mut self.conn.clone()).await?)
    }

    /// The key of a task's result.
    pub fn key(&self, id: &str) -> String {
        format!("{}celery-task-meta-{id}", self.prefix)
    }

    /// The five keys of a chord's join, in the order the chord scripts take them.
    fn chord_keys(&self, group_id: &str) -> [String; 5] {
        let group = format!("{}celery-taskset-meta-{group_id}", self.prefix);
        [".j", ".t", ".s", ".d", ".c"].map(|suffix| format!("{group}{suffix}"))
    }

    fn sent_key(&self, id: &str) -> String {
        format!("{}celeriac-task-sent-{id}", self.prefix)
    }

    /// Notes that a celeriac producer sent task `id`, for as long as its result would be kept,
    /// so that a read can tell "queued" (PENDING) from "never heard of" (see [`Self::known`]).
    pub async fn remember(&self, id: &str) -> BrokerResult<()> {
        let mut set = redis::cmd("SET");
        set.arg(self.sent_key(id)).arg(1);
        if !self.expires.is_zero() {
            set.arg("EX").arg(self.expires.as_secs().max(1));
        }
        Ok(set.query_async(&mut self.conn.clone()).await?)
    }

    /// Whether task `id` was sent by a celeriac producer or has a stored state. Celery reads an
    /// id it knows nothing of as PENDING for ever; this tells the two apart.
    pub async fn known(&self, id: &str) -> BrokerResult<bool> {
        let found: u32 = redis::cmd("EXISTS")
            .arg(self.key(id))
            .arg(self.sent_key(id))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(found > 0)
    }

    fn idempotency_key(&self, key: &str) -> String {
        use sha2::Digest as _;
        // Hashed: the client's key may be long or hold anything.
        let digest = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        format!("{}celeriac-idempotency-{digest}", self.prefix)
    }

    /// Claims an idempotency key for `record` during `ttl`. Returns `None` when this call
    /// claimed it, or the record stored by the call that did.
    pub async fn claim(
        &self,
        key: &str,
        record: &str,
        ttl: Duration,
    ) -> BrokerResult<Option<String>> {
        let key = self.idempotency_key(key);
        let mut conn = self.conn.clone();
        // Twice at most: the claim can expire between the SET and the GET.
        for _ in 0..2 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(record)
                .arg("NX")
                .arg("EX")
                .arg(ttl.as_secs().max(1))
                .query_async(&mut conn)
                .await?;
            if set.is_some() {
                return Ok(None);
            }
            if let Some(held) = conn.get::<_, Option<String>>(&key).await? {
                return Ok(Some(held));
            }
        }
        Ok(Some(String::new()))
    }

    /// Gives back a claim whose request failed, so that the client's retry is not answered with
    /// an id that was never sent.
    pub async fn release(&self, key: &str) -> BrokerResult<()> {
        Ok(self.conn.clone().del(self.idempotency_key(key)).await?)
    }
}

impl crate::broker::ResultStore for RedisResults {
    /// Stores results in one round trip. A stored SUCCESS is never overwritten: a redelivered
    /// message that ran again must not replace the first result with a later state.
    async fn store(&self, results: &[&StoredResult]) -> crate::broker::BrokerResult<()> {
        if results.is_empty() {
            return Ok(());
        }
        let mut inv = self.store_script.prepare_invoke();
        inv.arg(self.expires.as_secs());
        for r in results {
            inv.key(self.key(&r.id)).arg(&r.meta);
        }
        Ok(inv.invoke_async(&mut self.conn.clone()).await?)
    }

    /// Reads a result: the meta JSON, or `None` while PENDING.
    async fn get(&self, id: &str) -> crate::broker::BrokerResult<Option<String>> {
        Ok(self.conn.clone().get(self.key(id)).await?)
    }

    /// Waits on the channel `AsyncResult.get()` listens to. Subscribes before it reads, so a
    /// result stored between the two is seen by one or the other. A lost subscription ends the
    /// wait early with a fresh read; the caller decides whether to wait again.
    async fn wait_ready(
        &self,
        id: &str,
        timeout: Duration,
    ) -> crate::broker::BrokerResult<Option<String>> {
        use futures_util::StreamExt as _;
        let key = self.key(id);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pubsub = self.conn.endpoint().client().await?.get_async_pubsub().await?;
        pubsub.subscribe(&key).await?;
        let current = self.get(id).await?;
        if current.as_deref().is_some_and(is_ready) || timeout.is_zero() {
            return Ok(current);
        }
        let mut messages = pubsub.on_message();
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, messages.next()).await {
            if let Ok(text) = msg.get_payload::<String>()
                && is_ready(&text)
            {
                return Ok(Some(text));
            }
        }
        drop(messages);
        self.get(id).await
    }

    async fn chord_join(
        &self,
        part: &crate::canvas::ChordPart,
    ) -> crate::broker::BrokerResult<Option<Vec<serde_json::Value>>> {
        let mut inv = self.chord_join.prepare_invoke();
        for key in self.chord_keys(&part.group_id) {
            inv.key(key);
        }
        let score = part.index.map_or_else(|| "+inf".to_string(), |i| i.to_string());
        inv.arg(&part.task_id).arg(score).arg(part.entry()).arg(self.expires.as_secs());
        let reply: redis::Value = inv.invoke_async(&mut self.conn.clone()).await?;
        let redis::Value::Array(reply) = reply else { return Ok(None) };
        if !matches!(reply.first(), Some(redis::Value::Int(1))) {
            return Ok(None);
        }
        let entries: Vec<String> = match reply.get(1) {
            Some(entries) => redis::from_redis_value(entries)?,
            None => Vec::new(),
        };
        // An entry that is not JSON (written by something else) reads as a failed part, so the
        // chord errs rather than runs its body on a result it cannot see.
        Ok(Some(
            entries
                .iter()
                .map(|e| {
                    serde_json::from_str(e).unwrap_or_else(|_| {
                        serde_json::json!([1, "?", "FAILURE", {"exc_type": "DecodeError",
                            "exc_message": [format!("unreadable chord entry {e:?}")]}])
                    })
                })
                .collect(),
        ))
    }

    /// As Celery 5.7: the claim of an earlier chord under this id is cleared, then the size set.
    async fn chord_size(&self, group_id: &str, size: u64) -> crate::broker::BrokerResult<()> {
        let [.., s, _, c] = self.chord_keys(group_id);
        let mut pipe = redis::pipe();
        pipe.atomic().del(c).ignore();
        match self.expires.as_secs() {
            0 => pipe.set(s, size).ignore(),
            ttl => pipe.set_ex(s, size, ttl).ignore(),
        };
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    async fn chord_done(&self, group_id: &str, claimer: &str) -> crate::broker::BrokerResult<()> {
        let mut inv = self.chord_done.prepare_invoke();
        for key in self.chord_keys(group_id) {
            inv.key(key);
        }
        inv.arg(claimer).arg(self.expires.as_secs());
        let _: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_prefix_gets_a_separator_as_in_celery() {
        assert_eq!(super::key_prefix(""), "");
        assert_eq!(super::key_prefix("app1"), "app1_");
        for done in ["app1:", "app1_", "app1-", "app1."] {
            assert_eq!(super::key_prefix(done), done);
        }
    }
}
