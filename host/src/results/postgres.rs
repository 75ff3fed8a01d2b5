//! Results in PostgreSQL, as Celery's database backend keeps them: `db+postgresql://...`.
//!
//! The tables and columns are Celery's (`celery_taskmeta`, `celery_tasksetmeta`, the extended
//! columns when asked), created as SQLAlchemy creates them when they are missing, so a Python
//! `AsyncResult(id).get()` on the same URL reads celeriac's results and raises its failures. The
//! `result` column holds a pickle by default: every Celery version reads it (5.7 falls back to
//! pickle for a row that starts with pickle's marker). `serializer = "json"` writes the JSON that
//! Celery 5.7 writes with its default `result_serializer`.
//!
//! A batch of results is one statement (`INSERT ... SELECT FROM UNNEST ... ON CONFLICT`) on a
//! pooled connection. A stored SUCCESS is never overwritten, as in Celery. Results expire by a
//! `DELETE` on `date_done`, as `celery.backend_cleanup` does, which the worker runs on a schedule.

use super::{StoredResult, is_ready};
use crate::broker::{BrokerError, BrokerResult};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::NoTls;

/// Connections in the pool: the settler stores in batches, so a few serve a busy worker.
const POOL_SIZE: usize = 8;
/// How often a waiting reader looks again (Celery's database backend looks every 0.5 s).
const POLL_EVERY: Duration = Duration::from_millis(100);
/// A lock id for the table setup, so workers starting together do not race to create them.
const SETUP_LOCK: i64 = 0x6365_6c65_7269_6163; // "celeriac"

/// How the `result` and `children` columns are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Serializer {
    /// Python pickle (protocol 3): what every Celery version reads.
    #[default]
    Pickle,
    /// JSON bytes, as Celery 5.7 writes with `result_serializer = "json"`.
    Json,
}

/// A parsed `db+postgresql://` URL with its settings.
#[derive(Debug, Clone)]
pub struct PgSpec {
    config: tokio_postgres::Config,
    /// How the result column is encoded.
    pub serializer: Serializer,
    /// Whether to add and fill Celery's extended columns (`result_extended`).
    pub extended: bool,
}

impl PgSpec {
    /// Reads `db+postgresql://user:password@host:port/database` (a SQLAlchemy driver suffix such
    /// as `+psycopg2` is accepted and ignored).
    pub fn parse(url: &str, serializer: Serializer, extended: bool) -> Result<PgSpec, String> {
        let rest =
            url.strip_prefix("db+").ok_or("a database result backend URL starts with db+")?;
        let (scheme, tail) = rest.split_once("://").ok_or("not a URL")?;
        let dialect = scheme.split('+').next().unwrap_or_default();
        if !matches!(dialect, "postgresql" | "postgres") {
            return Err(format!(
                "db+{scheme}:// is not supported; celeriac keeps database results in PostgreSQL \
                 (db+postgresql://user:password@host/database)"
            ));
        }
        let config: tokio_postgres::Config =
            format!("postgresql://{tail}").parse().map_err(|e| format!("{e}"))?;
        Ok(PgSpec { config, serializer, extended })
    }
}

/// Stores a batch: one row per task id, a stored SUCCESS kept.
const STORE: &str = "
    INSERT INTO celery_taskmeta (id, task_id, status, result, date_done, traceback, children)
    SELECT nextval('task_id_sequence'), t.task_id, t.status, t.result,
           COALESCE(t.done::timestamptz AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC'),
           t.traceback, t.children
    FROM UNNEST($1::varchar[], $2::varchar[], $3::bytea[], $4::text[], $5::text[], $6::bytea[])
         AS t(task_id, status, result, done, traceback, children)
    ON CONFLICT (task_id) DO UPDATE SET
        status = EXCLUDED.status, result = EXCLUDED.result, date_done = EXCLUDED.date_done,
        traceback = EXCLUDED.traceback, children = EXCLUDED.children
    WHERE celery_taskmeta.status <> 'SUCCESS'";

/// [`STORE`] with Celery's extended columns.
const STORE_EXTENDED: &str = "
    INSERT INTO celery_taskmeta (id, task_id, status, result, date_done, traceback, children,
                                 name, args, kwargs, worker, retries, queue)
    SELECT nextval('task_id_sequence'), t.task_id, t.status, t.result,
           COALESCE(t.done::timestamptz AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC'),
           t.traceback, t.children, t.name, t.args, t.kwargs, t.worker, t.retries, t.queue
    FROM UNNEST($1::varchar[], $2::varchar[], $3::bytea[], $4::text[], $5::text[], $6::bytea[],
                $7::varchar[], $8::bytea[], $9::bytea[], $10::varchar[], $11::int4[],
                $12::varchar[])
         AS t(task_id, status, result, done, traceback, children, name, args, kwargs, worker,
              retries, queue)
    ON CONFLICT (task_id) DO UPDATE SET
        status = EXCLUDED.status, result = EXCLUDED.result, date_done = EXCLUDED.date_done,
        traceback = EXCLUDED.traceback, children = EXCLUDED.children, name = EXCLUDED.name,
        args = EXCLUDED.args, kwargs = EXCLUDED.kwargs, worker = EXCLUDED.worker,
        retries = EXCLUDED.retries, queue = EXCLUDED.queue
    WHERE celery_taskmeta.status <> 'SUCCESS'";

/// The extended columns of a batch.
#[derive(Default)]
struct Extended {
    names: Vec<Option<String>>,
    args: Vec<Option<Vec<u8>>>,
    kwargs: Vec<Option<Vec<u8>>>,
    workers: Vec<Option<String>>,
    retries: Vec<Option<i32>>,
    queues: Vec<Option<String>>,
}

/// The store.
#[derive(Clone)]
pub struct PgResults {
    pool: Pool,
    spec: PgSpec,
    expires: Duration,
}

impl std::fmt::Debug for PgResults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgResults").field("serializer", &self.spec.serializer).finish()
    }
}

fn db_error(e: impl std::fmt::Display, transient: bool) -> BrokerError {
    BrokerError::Database { message: e.to_string(), transient }
}

impl From<tokio_postgres::Error> for BrokerError {
    fn from(e: tokio_postgres::Error) -> Self {
        // An error the server sent (a constraint, a type) will come again; a lost or refused
        // connection may not.
        let transient = e.as_db_error().is_none();
        db_error(e, transient)
    }
}

impl From<deadpool_postgres::PoolError> for BrokerError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        db_error(format!("connection pool: {e}"), true)
    }
}

impl PgResults {
    /// Connects, creates Celery's tables where they are missing, and checks that they answer.
    pub async fn open(spec: &PgSpec, expires: Duration) -> anyhow::Result<PgResults> {
        let manager = Manager::from_config(
            spec.config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()?;
        let store = PgResults { pool, spec: spec.clone(), expires };
        store.setup().await?;
        Ok(store)
    }

    /// Creates the tables as Celery's models define them, unless they exist.
    async fn setup(&self) -> anyhow::Result<()> {
        let client =
            self.pool.get().await.map_err(|e| anyhow::anyhow!("connect to PostgreSQL: {e}"))?;
        let mut ddl = format!(
            "SELECT pg_advisory_xact_lock({SETUP_LOCK});
             CREATE SEQUENCE IF NOT EXISTS task_id_sequence;
             CREATE TABLE IF NOT EXISTS celery_taskmeta (
                 id INTEGER NOT NULL DEFAULT nextval('task_id_sequence'),
                 task_id VARCHAR(155),
                 status VARCHAR(50),
                 result BYTEA,
                 date_done TIMESTAMP WITHOUT TIME ZONE,
                 traceback TEXT,
                 children BYTEA,
                 PRIMARY KEY (id),
                 UNIQUE (task_id));
             CREATE INDEX IF NOT EXISTS ix_celery_taskmeta_date_done ON celery_taskmeta (date_done);
             CREATE SEQUENCE IF NOT EXISTS taskset_id_sequence;
             CREATE TABLE IF NOT EXISTS celery_tasksetmeta (
                 id INTEGER NOT NULL DEFAULT nextval('taskset_id_sequence'),
                 taskset_id VARCHAR(155),
                 result BYTEA,
                 date_done TIMESTAMP WITHOUT TIME ZONE,
                 PRIMARY KEY (id),
                 UNIQUE (taskset_id));
             CREATE INDEX IF NOT EXISTS ix_celery_tasksetmeta_date_done
                 ON celery_tasksetmeta (date_done);"
        );
        if self.spec.extended {
            ddl.push_str(
                "ALTER TABLE celery_taskmeta
                     ADD COLUMN IF NOT EXISTS name VARCHAR(155),
                     ADD COLUMN IF NOT EXISTS args BYTEA,
                     ADD COLUMN IF NOT EXISTS kwargs BYTEA,
                     ADD COLUMN IF NOT EXISTS worker VARCHAR(155),
                     ADD COLUMN IF NOT EXISTS retries INTEGER,
                     ADD COLUMN IF NOT EXISTS queue VARCHAR(155),
                     ADD COLUMN IF NOT EXISTS stamps BYTEA;",
            );
        }
        // One simple query runs as one transaction, so the advisory lock covers it all.
        client
            .batch_execute(&ddl)
            .await
            .map_err(|e| anyhow::anyhow!("create Celery's result tables: {e}"))?;
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> BrokerResult<()> {
        self.pool.get().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    fn encode(&self, value: &Value) -> BrokerResult<Vec<u8>> {
        match self.spec.serializer {
            Serializer::Pickle => serde_pickle::to_vec(value, serde_pickle::SerOptions::new())
                .map_err(|e| db_error(format!("pickle a result: {e}"), false)),
            Serializer::Json => Ok(serde_json::to_vec(value).expect("a JSON value serialises")),
        }
    }

    /// Stores a batch in one statement; the last meta of an id in the batch wins, and a stored
    /// SUCCESS stays.
    pub async fn store(&self, results: &[&StoredResult]) -> BrokerResult<()> {
        if results.is_empty() {
            return Ok(());
        }
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, r) in results.iter().enumerate() {
            last.insert(&r.id, i);
        }
        let mut order: Vec<usize> = last.into_values().collect();
        order.sort_unstable();
        let (mut ids, mut statuses, mut values, mut dates, mut tracebacks, mut children) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut ext = Extended::default();
        for i in order {
            let r = results[i];
            let meta: Value = serde_json::from_str(&r.meta)
                .map_err(|e| db_error(format!("result meta of {}: {e}", r.id), false))?;
            ids.push(r.id.clone());
            statuses.push(meta["status"].as_str().unwrap_or("PENDING").to_string());
            values.push(self.encode(&meta["result"])?);
            dates.push(meta["date_done"].as_str().map(str::to_string));
            tracebacks.push(meta["traceback"].as_str().map(str::to_string));
            children.push(match &meta["children"] {
                Value::Array(list) if !list.is_empty() => Some(self.encode(&meta["children"])?),
                _ => None,
            });
            if self.spec.extended {
                // Filled when the worker stores extended metas (`--result-extended`).
                let text = |k: &str| meta[k].as_str().map(str::to_string);
                ext.names.push(text("name"));
                ext.args.push(meta.get("args").map(|v| self.encode(v)).transpose()?);
                ext.kwargs.push(meta.get("kwargs").map(|v| self.encode(v)).transpose()?);
                ext.workers.push(text("worker"));
                ext.retries.push(meta["retries"].as_i64().and_then(|n| i32::try_from(n).ok()));
                ext.queues.push(text("queue"));
            }
        }
        let client = self.pool.get().await?;
        if !self.spec.extended {
            let statement = client.prepare_cached(STORE).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&ids, &statuses, &values, &dates, &tracebacks, &children];
            client.execute(&statement, &params).await?;
        } else {
            let statement = client.prepare_cached(STORE_EXTENDED).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
                &ids,
                &statuses,
                &values,
                &dates,
                &tracebacks,
                &children,
                &ext.names,
                &ext.args,
                &ext.kwargs,
                &ext.workers,
                &ext.retries,
                &ext.queues,
            ];
            client.execute(&statement, &params).await?;
        }
        Ok(())
    }

    /// A task's meta as the Redis backend stores it, rebuilt from its row; `None` without one.
    pub async fn get(&self, id: &str) -> BrokerResult<Option<String>> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT status, result, traceback, children,
                        to_char(date_done, 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'
                 FROM celery_taskmeta WHERE task_id = $1",
            )
            .await?;
        let Some(row) = client.query_opt(&statement, &[&id]).await? else { return Ok(None) };
        let status: Option<String> = row.get(0);
        let result: Option<Vec<u8>> = row.get(1);
        let traceback: Option<String> = row.get(2);
        let children: Option<Vec<u8>> = row.get(3);
        let date_done: Option<String> = row.get(4);
        let status = status.unwrap_or_else(|| "PENDING".into());
        let ready = super::is_ready_state(&status);
        let meta = json!({
            "status": status,
            "result": result.map_or(Value::Null, |b| decode(&b)),
            "traceback": traceback,
            "children": children.map_or(json!([]), |b| decode(&b)),
            "date_done": if ready { date_done.map_or(Value::Null, Value::from) } else { Value::Null },
            "task_id": id,
        });
        Ok(Some(meta.to_string()))
    }

    /// Whether a row exists for `id`.
    pub async fn exists(&self, id: &str) -> BrokerResult<bool> {
        let client = self.pool.get().await?;
        let row =
            client.query_opt("SELECT 1 FROM celery_taskmeta WHERE task_id = $1", &[&id]).await?;
        Ok(row.is_some())
    }

    /// Waits for a ready state by reading again every [`POLL_EVERY`], as Celery's database
    /// backend does.
    pub async fn wait_ready(&self, id: &str, timeout: Duration) -> BrokerResult<Option<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let meta = self.get(id).await?;
            if meta.as_deref().is_some_and(is_ready) || tokio::time::Instant::now() >= deadline {
                return Ok(meta);
            }
            tokio::time::sleep_until((tokio::time::Instant::now() + POLL_EVERY).min(deadline))
                .await;
        }
    }

    /// Deletes results older than `result_expires`, as `celery.backend_cleanup` does. Returns
    /// how many rows went.
    pub async fn expire(&self) -> BrokerResult<u64> {
        if self.expires.is_zero() {
            return Ok(0);
        }
        let seconds = self.expires.as_secs_f64();
        let client = self.pool.get().await?;
        let mut gone = 0;
        for table in ["celery_taskmeta", "celery_tasksetmeta"] {
            gone += client
                .execute(
                    &format!(
                        "DELETE FROM {table}
                         WHERE date_done < (now() AT TIME ZONE 'UTC') - make_interval(secs => $1)"
                    ),
                    &[&seconds],
                )
                .await?;
        }
        Ok(gone)
    }

    /// How often [`PgResults::expire`] should run: a quarter of `result_expires`, between a
    /// second and an hour.
    pub fn expire_every(&self) -> Option<Duration> {
        (!self.expires.is_zero())
            .then(|| (self.expires / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600)))
    }
}

/// A stored column's value: JSON when it parses as JSON, else a pickle; anything else reads as
/// a description of what could not be read, rather than failing the whole read.
fn decode(bytes: &[u8]) -> Value {
    if bytes.first() == Some(&0x80) {
        let options = serde_pickle::DeOptions::new().replace_unresolved_globals();
        if let Ok(v) = serde_pickle::from_slice::<Value>(bytes, options) {
            return v;
        }
    }
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        json!({"exc_type": "DecodeError", "exc_message": [format!("unreadable result column: {e}")]})
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_celerys_database_urls_for_postgresql_only() {
        let spec = PgSpec::parse(
            "db+postgresql://app:pw@db.internal:5433/results",
            Serializer::Pickle,
            false,
        )
        .unwrap();
        assert_eq!(spec.config.get_user(), Some("app"));
        assert_eq!(spec.config.get_dbname(), Some("results"));
        assert_eq!(spec.config.get_ports(), [5433]);
        assert!(PgSpec::parse("db+postgresql+psycopg2://u@h/d", Serializer::Json, false).is_ok());
        let e = PgSpec::parse("db+mysql://u@h/d", Serializer::Pickle, false).unwrap_err();
        assert!(e.contains("PostgreSQL"), "{e}");
    }

    #[test]
    fn results_round_trip_through_pickle_and_json() {
        let value =
            json!({"exc_type": "ValueError", "exc_message": ["no"], "n": 3, "f": 1.5, "x": null});
        for (bytes, first) in [
            (serde_pickle::to_vec(&value, serde_pickle::SerOptions::new()).unwrap(), 0x80),
            (serde_json::to_vec(&value).unwrap(), b'{'),
        ] {
            assert_eq!(bytes[0], first);
            assert_eq!(decode(&bytes), value);
        }
        assert_eq!(decode(b"\x80garbage")["exc_type"], "DecodeError");
    }
}
