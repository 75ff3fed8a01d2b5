//! What producers and operators do against Redis without running a worker: send a task, read
//! its state, revoke it, inspect and replay dead letters.

use crate::broker::RedisBroker;
use crate::protocol::{self, NewTask, states};
use crate::results::{ResultBackend, StoredResult};
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Sends a task the way Celery's `send_task` does; returns its id.
pub async fn enqueue(
    broker: &RedisBroker,
    name: &str,
    args: &Value,
    kwargs: &Value,
    queue: &str,
    opts: &NewTask,
) -> anyhow::Result<String> {
    let (id, envelope) = protocol::encode(name, args, kwargs, queue, opts);
    broker.declare(&[queue.to_string()]).await?;
    broker.publish(queue, opts.priority.unwrap_or(0), &envelope).await?;
    Ok(id)
}

/// Sends `count` copies of a task, each with a new id, in pipelined batches; returns the count.
pub async fn enqueue_many(
    broker: &RedisBroker,
    name: &str,
    args: &Value,
    kwargs: &Value,
    queue: &str,
    opts: &NewTask,
    count: u64,
) -> anyhow::Result<u64> {
    broker.declare(&[queue.to_string()]).await?;
    let mut sent = 0;
    while sent < count {
        let mut pipe = redis::pipe();
        for _ in 0..(count - sent).min(1000) {
            let (_, envelope) = protocol::encode(name, args, kwargs, queue, opts);
            broker.publish_into(&mut pipe, queue, opts.priority.unwrap_or(0), &envelope);
            sent += 1;
        }
        broker.exec(&pipe).await?;
    }
    Ok(sent)
}

/// A task's state and meta; PENDING (and no meta) when nothing is stored.
pub async fn status(results: &ResultBackend, id: &str) -> anyhow::Result<(String, Option<Value>)> {
    match results.get(id).await? {
        None => Ok((states_pending(), None)),
        Some(text) => {
            let meta: Value = serde_json::from_str(&text)?;
            let state = meta["status"].as_str().unwrap_or("UNKNOWN").to_string();
            Ok((state, Some(meta)))
        }
    }
}

fn states_pending() -> String {
    "PENDING".to_string()
}

/// Waits until the task is ready (SUCCESS, FAILURE, REVOKED) or `timeout` passes.
pub async fn wait(
    results: &ResultBackend,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<(String, Option<Value>)> {
    let start = Instant::now();
    loop {
        let (state, meta) = match status(results, id).await {
            Ok(found) => found,
            // Redis restarting or briefly away: the connection heals itself; keep waiting.
            Err(e) if start.elapsed() < timeout => {
                tracing::debug!("status of {id}: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let ready = matches!(state.as_str(), states::SUCCESS | states::FAILURE | states::REVOKED);
        if ready || start.elapsed() >= timeout {
            return Ok((state, meta));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Revokes tasks: queued copies are skipped by every worker, now or started later (until `ttl`);
/// with `terminate` a running one is stopped. The state becomes REVOKED at once.
pub async fn revoke(
    broker: &RedisBroker,
    results: &ResultBackend,
    ids: &[String],
    terminate: bool,
    ttl: Duration,
) -> anyhow::Result<()> {
    broker.revoke(ids, ttl, terminate).await?;
    let exc = json!({"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"});
    let stored: Vec<StoredResult> = ids
        .iter()
        .map(|id| StoredResult {
            id: id.clone(),
            meta: protocol::result_meta(id, states::REVOKED, exc.clone(), None, &[]),
        })
        .collect();
    results.store(&stored).await?;
    Ok(())
}

/// Queues that have dead letters.
pub async fn dlq_queues(broker: &RedisBroker) -> anyhow::Result<Vec<String>> {
    let prefix = broker.dlq_key("");
    let mut conn = broker.conn();
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

/// Dead letters of `queue`, newest first.
pub async fn dlq_list(
    broker: &RedisBroker,
    queue: &str,
    limit: isize,
) -> anyhow::Result<Vec<Value>> {
    let raw: Vec<String> = broker.conn().lrange(broker.dlq_key(queue), 0, limit - 1).await?;
    Ok(raw.iter().map(|r| serde_json::from_str(r).unwrap_or(Value::String(r.clone()))).collect())
}

/// Puts dead letters of `queue` back on their queue (all, or those of task id `only`), with their
/// retry count reset, each removal and push in one atomic step. Returns how many.
pub async fn dlq_replay(
    broker: &RedisBroker,
    queue: &str,
    only: Option<&str>,
) -> anyhow::Result<u64> {
    let key = broker.dlq_key(queue);
    let raw: Vec<String> = broker.conn().lrange(&key, 0, -1).await?;
    let mut replayed = 0;
    for record_text in raw {
        let Ok(record) = serde_json::from_str::<Value>(&record_text) else { continue };
        if only.is_some_and(|id| record["id"].as_str() != Some(id)) {
            continue;
        }
        let Some(message) = record["message"].as_str() else { continue };
        if record["message_encoding"] != "utf-8" {
            continue; // not text: it cannot be a Celery message; leave it for inspection
        }
        let (envelope, priority) = match serde_json::from_str::<Value>(message) {
            Ok(mut env) => {
                if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
                    h.insert("retries".into(), json!(0));
                    h.insert("eta".into(), Value::Null);
                }
                let p = env["properties"]["priority"].as_u64().unwrap_or(0).min(9) as u8;
                (env.to_string(), p)
            }
            Err(_) => (message.to_string(), 0),
        };
        let target = record["queue"].as_str().unwrap_or(queue);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.lrem(&key, 1, &record_text).ignore();
        broker.publish_into(&mut pipe, target, priority, &envelope);
        broker.exec(&pipe).await?;
        replayed += 1;
    }
    Ok(replayed)
}

/// Deletes the dead letters of `queue`; returns how many there were.
pub async fn dlq_purge(broker: &RedisBroker, queue: &str) -> anyhow::Result<u64> {
    let key = broker.dlq_key(queue);
    let (n,): (u64,) = redis::pipe()
        .atomic()
        .llen(&key)
        .del(&key)
        .ignore()
        .query_async(&mut broker.conn())
        .await?;
    Ok(n)
}
