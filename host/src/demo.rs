//! `celeriac demo`: the whole pipeline in one process. A worker with a few slots serves the
//! example tasks from the in-memory broker (or Redis with `--broker`), while a producer sends a
//! realistic batch across queues: a channel to index (which fans out into child tasks), searches,
//! a summary, a deletion, cleanups, a task that needs retries, one that fails for good, one with
//! a priority and one with an ETA. It prints every result and a summary.

use crate::broker::{Broker, ResultStore};
use crate::client;
use crate::kv::KvStore;
use crate::protocol::NewTask;
use crate::registry::Registry;
use crate::worker::{Worker, WorkerOptions};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The example channel the demo indexes.
const CHANNEL: &str = include_str!("../../examples/ops-channel.json");

/// Queues the demo worker consumes, most urgent first.
const QUEUES: &[&str] = &["indexing", "default", "maintenance", "celery"];

/// One task the demo sends, and the state it should end in.
struct Step {
    label: &'static str,
    task: &'static str,
    args: Value,
    kwargs: Value,
    opts: NewTask,
    expect: &'static str,
}

fn step(label: &'static str, task: &'static str, kwargs: Value, expect: &'static str) -> Step {
    Step { label, task, args: json!([]), kwargs, opts: NewTask::default(), expect }
}

/// Runs the demo; returns the exit code (0 when every task ended as expected).
pub async fn run<B: Broker, R: ResultStore>(
    registry: Arc<Registry>,
    broker: B,
    results: R,
    kv: KvStore,
    broker_name: &str,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    println!(
        "celeriac demo on {broker_name}: {} modules, {} tasks, a worker with 4 slots on queues {}",
        registry.modules().len(),
        registry.tasks().count(),
        QUEUES.join(", ")
    );
    let queue_of = |task: &str| {
        registry.get(task).map(|e| e.spec.queue.clone()).unwrap_or_else(|_| "celery".into())
    };
    let opts = WorkerOptions {
        queues: QUEUES.iter().map(|q| q.to_string()).collect(),
        concurrency: 4,
        hostname: "celeriac@demo".into(),
        grace: Duration::from_secs(5),
        revoke_ttl: Duration::from_secs(600),
        track_started: true,
        result_extended: false,
        weights: Vec::new(),
    };
    let worker = Worker::new(registry.clone(), broker.clone(), results.clone(), kv, opts);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.clone().run(stop.clone()));

    // First the channel: one task that splits it into sessions and enqueues one child per session.
    let channel: Value = serde_json::from_str(CHANNEL)?;
    let mut ok = true;
    let batch_id = client::enqueue(
        &broker,
        "indexing.batch_index_channel",
        &json!([]),
        &channel,
        &queue_of("indexing.batch_index_channel"),
        &NewTask::default(),
    )
    .await?;
    let (state, meta) = client::wait(&results, &batch_id, Duration::from_secs(30)).await?;
    ok &= report(
        "index the #ops channel",
        "indexing.batch_index_channel",
        &state,
        meta.as_ref(),
        "SUCCESS",
    );
    let children: Vec<String> = meta
        .as_ref()
        .and_then(|m| m["children"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c[0][0].as_str().map(String::from))
        .collect();
    for child in &children {
        let (state, meta) = client::wait(&results, child, Duration::from_secs(30)).await?;
        ok &= report(
            "  child: index one session",
            "indexing.index_session",
            &state,
            meta.as_ref(),
            "SUCCESS",
        );
    }

    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(800);
    let steps = vec![
        step(
            "search 'deploy migration'",
            "indexing.search",
            json!({"query": "deploy migration", "limit": 2}),
            "SUCCESS",
        ),
        step(
            "summarise session ops:m1",
            "summarize.summarize_session",
            json!({"session_id": "ops:m1", "max_chars": 160}),
            "SUCCESS",
        ),
        step(
            "delete messages m4, m5",
            "deletion.delete_message_vectors",
            json!({"message_ids": ["m4", "m5"]}),
            "SUCCESS",
        ),
        step(
            "search 'pizza' after deletion",
            "indexing.search",
            json!({"query": "pizza"}),
            "SUCCESS",
        ),
        step(
            "expire sessions past retention",
            "cleanup.cleanup_expired",
            json!({"retention_seconds": 3600, "now": 1_700_050_000}),
            "SUCCESS",
        ),
        step(
            "sweep the scratch folder",
            "cleanup.cleanup_temp_files",
            json!({"older_than_seconds": 86_400}),
            "SUCCESS",
        ),
        step("a flaky task (retried twice)", "diagnostics.flaky", json!({"n": 3}), "SUCCESS"),
        step(
            "a task that fails for good",
            "diagnostics.fail",
            json!({"message": "the upstream API rejected the payload"}),
            "FAILURE",
        ),
        Step {
            opts: NewTask { priority: Some(0), ..NewTask::default() },
            ..step(
                "an urgent task (priority 0)",
                "diagnostics.noop",
                json!({"x": "urgent"}),
                "SUCCESS",
            )
        },
        Step {
            opts: NewTask { eta: Some(soon), ..NewTask::default() },
            ..step(
                "a task with an ETA 0.8 s ahead",
                "diagnostics.noop",
                json!({"x": "on time"}),
                "SUCCESS",
            )
        },
    ];
    // Sent one after another, so each sees the index as the previous steps left it.
    for s in &steps {
        let id = client::enqueue(&broker, s.task, &s.args, &s.kwargs, &queue_of(s.task), &s.opts)
            .await?;
        let (state, meta) = client::wait(&results, &id, Duration::from_secs(30)).await?;
        ok &= report(s.label, s.task, &state, meta.as_ref(), s.expect);
    }

    stop.cancel();
    handle.await??;
    println!();
    println!("summary: {}; {:.2} s", worker.stats, started.elapsed().as_secs_f64());
    for queue in broker.dlq_queues().await? {
        for record in client::dlq_list(&broker, &queue, 10).await? {
            println!(
                "dead letter in {queue}: {} after {} attempt(s): {}",
                record["task"].as_str().unwrap_or("?"),
                record["attempts"],
                record["error"].as_str().unwrap_or("")
            );
        }
    }
    if !ok {
        println!("some tasks did not end as expected");
    }
    Ok(if ok { 0 } else { 1 })
}

/// Prints one line; returns whether the state is the expected one.
fn report(label: &str, task: &str, state: &str, meta: Option<&Value>, expect: &str) -> bool {
    let detail = match meta {
        Some(m) if state == "FAILURE" => {
            format!(
                "{}: {}",
                m["result"]["exc_type"].as_str().unwrap_or("?"),
                m["result"]["exc_message"][0].as_str().unwrap_or("")
            )
        }
        Some(m) => m["result"].to_string(),
        None => String::new(),
    };
    let shown: String = detail.chars().take(110).collect();
    let more = if shown.len() < detail.len() { "..." } else { "" };
    let mark = if state == expect { " " } else { "!" };
    println!("{mark} {state:<8} {label:<34} {task:<32} {shown}{more}");
    state == expect
}
