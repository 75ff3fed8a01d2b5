//! Celery's result backend: where each task's state and result go, for `AsyncResult(id).get()`.
//!
//! Results live in Redis (`redis.rs`, `celery-task-meta-<id>`, the default) or in PostgreSQL
//! (`postgres.rs`, Celery's database backend tables). [`ResultBackend`] is what the rest of
//! celeriac holds: it sends results to the chosen store. What is not a result stays in Redis,
//! on the broker's server when results are in PostgreSQL: chord joins (atomic in one script,
//! shared with Celery's Redis join), the "sent" marks that tell PENDING from unknown, and the
//! HTTP API's idempotency keys.

mod postgres;
mod redis;

pub use self::postgres::{PgResults, PgSpec, Serializer};
pub use self::redis::{RedisResults, key_prefix};

use crate::broker::{BrokerResult, ResultStore};
use crate::endpoint::{Endpoint, TransportOptions};
use anyhow::Context as _;
use std::time::Duration;

/// Where results go, parsed from the configuration.
#[derive(Debug, Clone)]
pub enum ResultTarget {
    /// A Redis endpoint.
    Redis(Endpoint),
    /// PostgreSQL, with the broker's Redis for what is not a result.
    Postgres {
        /// The database.
        spec: Box<PgSpec>,
        /// The broker.
        broker: Endpoint,
    },
}

/// The `status` member of a stored meta, if it has one.
pub fn status_of(meta: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Status {
        status: Option<String>,
    }
    serde_json::from_str::<Status>(meta).ok()?.status
}

/// One result to store.
#[derive(Debug, Clone)]
pub struct StoredResult {
    /// Task id.
    pub id: String,
    /// The meta JSON (see [`crate::protocol::result_meta`]).
    pub meta: String,
}

/// Whether a stored meta is in a state that no longer changes (SUCCESS, FAILURE, REVOKED).
pub fn is_ready(meta: &str) -> bool {
    status_of(meta).is_some_and(|s| is_ready_state(&s))
}

/// Whether `state` no longer changes: SUCCESS, FAILURE or REVOKED.
pub fn is_ready_state(state: &str) -> bool {
    use crate::protocol::states;
    [states::SUCCESS, states::FAILURE, states::REVOKED].contains(&state)
}

/// The result backend.
#[derive(Clone, Debug)]
pub struct ResultBackend {
    /// Results when they live in Redis; otherwise chords, marks and keys on the broker's Redis.
    redis: RedisResults,
    /// Results when they live in PostgreSQL.
    rows: Option<PgResults>,
}

impl ResultBackend {
    /// Connects to the Redis result backend at `url` (no transport options).
    pub async fn connect(url: &str, prefix: &str, expires: Duration) -> anyhow::Result<Self> {
        let endpoint = Endpoint::parse(url, &TransportOptions::default())
            .with_context(|| format!("result backend URL {}", crate::endpoint::masked_url(url)))?;
        Self::open(&ResultTarget::Redis(endpoint), prefix, expires).await
    }

    /// Connects to `target`; `expires` is Celery's `result_expires` (0 keeps results forever),
    /// `prefix` the global key prefix.
    pub async fn open(
        target: &ResultTarget,
        prefix: &str,
        expires: Duration,
    ) -> anyhow::Result<Self> {
        match target {
            ResultTarget::Redis(endpoint) => Ok(ResultBackend {
                redis: RedisResults::open(endpoint, prefix, expires).await?,
                rows: None,
            }),
            ResultTarget::Postgres { spec, broker } => Ok(ResultBackend {
                redis: RedisResults::open(broker, prefix, expires).await?,
                rows: Some(
                    PgResults::open(spec, expires)
                        .await
                        .context("the PostgreSQL result backend")?,
                ),
            }),
        }
    }

    /// The PostgreSQL store, when results live there.
    pub fn postgres(&self) -> Option<&PgResults> {
        self.rows.as_ref()
    }

    /// Whether the backend answers.
    pub async fn ping(&self) -> BrokerResult<()> {
        self.redis.ping().await?;
        match &self.rows {
            Some(rows) => rows.ping().await,
            None => Ok(()),
        }
    }

    /// Notes that a celeriac producer sent task `id`, so a read can tell "queued" (PENDING)
    /// from "never heard of" (see [`Self::known`]).
    pub async fn remember(&self, id: &str) -> BrokerResult<()> {
        self.redis.remember(id).await
    }

    /// Whether task `id` was sent by a celeriac producer or has a stored state.
    pub async fn known(&self, id: &str) -> BrokerResult<bool> {
        if self.redis.known(id).await? {
            return Ok(true);
        }
        match &self.rows {
            Some(rows) => rows.exists(id).await,
            None => Ok(false),
        }
    }

    /// Claims an idempotency key for `record` during `ttl` (see [`RedisResults::claim`]).
    pub async fn claim(
        &self,
        key: &str,
        record: &str,
        ttl: Duration,
    ) -> BrokerResult<Option<String>> {
        self.redis.claim(key, record, ttl).await
    }

    /// Gives back a claim whose request failed.
    pub async fn release(&self, key: &str) -> BrokerResult<()> {
        self.redis.release(key).await
    }
}

impl ResultStore for ResultBackend {
    async fn store(&self, results: &[&StoredResult]) -> BrokerResult<()> {
        match &self.rows {
            Some(rows) => rows.store(results).await,
            None => self.redis.store(results).await,
        }
    }

    async fn get(&self, id: &str) -> BrokerResult<Option<String>> {
        match &self.rows {
            Some(rows) => rows.get(id).await,
            None => self.redis.get(id).await,
        }
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> BrokerResult<Option<String>> {
        match &self.rows {
            Some(rows) => rows.wait_ready(id, timeout).await,
            None => self.redis.wait_ready(id, timeout).await,
        }
    }

    async fn chord_join(
        &self,
        part: &crate::canvas::ChordPart,
    ) -> BrokerResult<Option<Vec<serde_json::Value>>> {
        self.redis.chord_join(part).await
    }

    async fn chord_size(&self, group_id: &str, size: u64) -> BrokerResult<()> {
        self.redis.chord_size(group_id, size).await
    }

    async fn chord_done(&self, group_id: &str, claimer: &str) -> BrokerResult<()> {
        self.redis.chord_done(group_id, claimer).await
    }
}
