//! What producers and operators do against a broker without running a worker: send a task, read
//! its state, revoke it, inspect and replay dead letters.

use crate::broker::{Broker, BrokerResult, FollowUp, ResultStore};
use crate::protocol::{self, NewTask, states};
use crate::results::StoredResult;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Sends a task the way Celery's `send_task` does; returns its id.
pub async fn enqueue<B: Broker>(
    broker: &B,
    name: &str,
    args: &Value,
    kwargs: &Value,
    queue: &str,
    opts: &NewTask,
) -> BrokerResult<String> {
    let (id, envelope) = protocol::encode(name, args, kwargs, queue, opts);
    broker.declare(&[queue.to_string()]).await?;
    let priority = opts.priority.unwrap_or(0);
    broker.send(&[FollowUp::Publish { queue: queue.to_string(), priority, envelope }]).await?;
    Ok(id)
}

/// Sends `count` copies of a task, each with a new id, in batches; returns the count.
pub async fn enqueue_many<B: Broker>(
    broker: &B,
    name: &str,
    args: &Value,
    kwargs: &Value,
    queue: &str,
    opts: &NewTask,
    count: u64,
) -> BrokerResult<u64> {
    broker.declare(&[queue.to_string()]).await?;
    let priority = opts.priority.unwrap_or(0);
    let mut sent = 0;
    while sent < count {
        let batch: Vec<FollowUp> = (0..(count - sent).min(1000))
            .map(|_| {
                let (_, envelope) = protocol::encode(name, args, kwargs, queue, opts);
                FollowUp::Publish { queue: queue.to_string(), priority, envelope }
            })
            .collect();
        sent += batch.len() as u64;
        broker.send(&batch).await?;
    }
    Ok(sent)
}

/// A task's state and meta; PENDING (and no meta) when nothing is stored.
pub async fn status<R: ResultStore>(
    results: &R,
    id: &str,
) -> anyhow::Result<(String, Option<Value>)> {
    parse_meta(results.get(id).await?)
}

/// Waits until the task is ready (SUCCESS, FAILURE, REVOKED) or `timeout` passes, on the same
/// channel `AsyncResult.get()` listens to.
pub async fn wait<R: ResultStore>(
    results: &R,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<(String, Option<Value>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match results.wait_ready(id, left).await {
            Ok(meta) if left.is_zero() || meta.as_deref().is_some_and(crate::results::is_ready) => {
                return parse_meta(meta);
            }
            // Redis restarting or briefly away: the connection heals itself; keep waiting.
            Ok(_) => {}
            Err(e) if !left.is_zero() => tracing::debug!("waiting for {id}: {e:#}"),
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(100).min(left)).await;
    }
}

fn parse_meta(meta: Option<String>) -> anyhow::Result<(String, Option<Value>)> {
    match meta {
        None => Ok(("PENDING".to_string(), None)),
        Some(text) => {
            let meta: Value = serde_json::from_str(&text)?;
            let state = meta["status"].as_str().unwrap_or("UNKNOWN").to_string();
            Ok((state, Some(meta)))
        }
    }
}

/// Revokes tasks: queued copies are skipped by every worker, now or started later (until `ttl`);
/// with `terminate` a running one is stopped. The state becomes REVOKED at once, unless the task
/// already ended (SUCCESS, FAILURE or REVOKED): a finished task's outcome is not rewritten.
pub async fn revoke<B: Broker, R: ResultStore>(
    broker: &B,
    results: &R,
    ids: &[String],
    terminate: bool,
    ttl: Duration,
) -> BrokerResult<()> {
    broker.revoke(ids, ttl, terminate).await?;
    let exc = json!({"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"});
    let mut stored: Vec<StoredResult> = Vec::with_capacity(ids.len());
    for id in ids {
        let current = results.get(id).await?;
        if !current.as_deref().is_some_and(crate::results::is_ready) {
            let meta = protocol::result_meta(id, states::REVOKED, exc.clone(), None, &[]);
            stored.push(StoredResult { id: id.clone(), meta });
        }
    }
    results.store(&stored.iter().collect::<Vec<_>>()).await
}

/// Dead letters of `queue`, newest first.
pub async fn dlq_list<B: Broker>(
    broker: &B,
    queue: &str,
    limit: usize,
) -> BrokerResult<Vec<Value>> {
    let raw = broker.dlq_records(queue, limit).await?;
    Ok(raw.iter().map(|r| serde_json::from_str(r).unwrap_or(Value::String(r.clone()))).collect())
}

/// Puts dead letters of `queue` back on their queue (all, or those of task id `only`) with their
/// retry count and ETA reset (and an expiry that has passed cleared), each removal and push in one
/// atomic step. Returns how many.
pub async fn dlq_replay<B: Broker>(
    broker: &B,
    queue: &str,
    only: Option<&str>,
) -> BrokerResult<u64> {
    let mut replayed = 0;
    for record_text in broker.dlq_records(queue, usize::MAX).await? {
        let Ok(record) = serde_json::from_str::<Value>(&record_text) else { continue };
        if only.is_some_and(|id| record["id"].as_str() != Some(id)) {
            continue;
        }
        // A message that was not text cannot be a Celery message; leave it for inspection.
        let (Some(message), "utf-8") =
            (record["message"].as_str(), record["message_encoding"].as_str().unwrap_or(""))
        else {
            continue;
        };
        let (envelope, priority) = match serde_json::from_str::<Value>(message) {
            Ok(mut env) => {
                if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
                    h.insert("retries".into(), json!(0));
                    h.insert("eta".into(), Value::Null);
                    // An expiry that has passed would revoke the replayed task at once; one
                    // still ahead is the producer's and stays.
                    // Written as text, or tagged as kombu's JSON writes a datetime.
                    let expired = h
                        .get("expires")
                        .map(|e| e.get("__value__").unwrap_or(e))
                        .and_then(Value::as_str)
                        .and_then(protocol::parse_time)
                        .is_some_and(|e| e <= chrono::Utc::now());
                    if expired {
                        h.insert("expires".into(), Value::Null);
                    }
                }
                let p = env["properties"]["priority"].as_u64().unwrap_or(0).min(9) as u8;
                (env.to_string(), p)
            }
            Err(_) => (message.to_string(), 0),
        };
        let target = record["queue"].as_str().unwrap_or(queue);
        if broker.dlq_replay(queue, &record_text, target, priority, &envelope).await? {
            replayed += 1;
        }
    }
    Ok(replayed)
}
