//! The Celery result backend on Redis: `celery-task-meta-<id>` written with SETEX and announced
//! with PUBLISH on the same key, which is what `AsyncResult.get()` waits for.

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
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

/// Celery's result backend puts its `global_keyprefix` before every key with a `_` in between,
/// unless the prefix already ends in one of `:_-.`.
pub fn key_prefix(prefix: &str) -> String {
    match prefix.chars().last() {
        None => String::new(),
        Some(':' | '_' | '-' | '.') => prefix.to_string(),
        Some(_) => format!("{prefix}_"),
    }
}

/// The `status` member of a stored meta, if it has one.
pub fn status_of(meta: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Status {
        status: Option<String>,
    }
    serde_json::from_str::<Status>(meta).ok()?.status
}

/// The result backend.
#[derive(Clone)]
pub struct ResultBackend {
    conn: ConnectionManager,
    prefix: String,
    expires: Duration,
    store_script: redis::Script,
}

impl std::fmt::Debug for ResultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultBackend").field("prefix", &self.prefix).finish()
    }
}

/// One result to store.
#[derive(Debug, Clone)]
pub struct StoredResult {
    /// Task id.
    pub id: String,
    /// The meta JSON (see [`crate::protocol::result_meta`]).
    pub meta: String,
}

impl ResultBackend {
    /// Connects to `url`; `expires` is Celery's `result_expires` (0 keeps results forever);
    /// `prefix` is the global key prefix, applied as Celery's result backend does (see
    /// [`key_prefix`]).
    pub async fn connect(url: &str, prefix: &str, expires: Duration) -> anyhow::Result<Self> {
        Ok(ResultBackend {
            conn: crate::broker::connect(url).await?,
            prefix: key_prefix(prefix),
            expires,
            store_script: redis::Script::new(STORE),
        })
    }

    /// The key of a task's result.
    pub fn key(&self, id: &str) -> String {
        format!("{}celery-task-meta-{id}", self.prefix)
    }
}

impl crate::broker::ResultStore for ResultBackend {
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
