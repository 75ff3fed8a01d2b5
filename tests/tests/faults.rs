//! The ugly cases: a worker killed with -9 in the middle of a run.

use crate::worker::{broker, config, results, start};
use celeriac::broker::Broker;
use celeriac::client;
use celeriac::protocol::NewTask;
use celeriac_tests::{RedisServer, celeriac_binary, repo_root, test_cache_dir};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The next pub/sub message as (channel, payload).
async fn next_message(pubsub: &mut redis::aio::PubSub) -> Option<(String, String)> {
    use futures_util::StreamExt as _;
    let msg = pubsub.on_message().next().await?;
    Some((msg.get_channel_name().to_string(), msg.get_payload().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_no_task() {
    let redis = RedisServer::start();
    let (b, r) = (broker(&redis, Duration::from_secs(1)).await, results(&redis).await);

    // Count every run: each run announces STARTED on the task's result channel.
    let mut pubsub = redis::Client::open(redis.url(1)).unwrap().get_async_pubsub().await.unwrap();
    pubsub.psubscribe("celery-task-meta-*").await.unwrap();
    let (runs_tx, mut runs_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((channel, payload)) = next_message(&mut pubsub).await {
            let meta: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
            if meta["status"] == "STARTED" {
                let _ = runs_tx.send(channel);
            }
        }
    });

    const N: usize = 200;
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(
            client::enqueue(
                &b,
                "diagnostics.sleep",
                &json!([25]),
                &json!({}),
                "default",
                &NewTask::default(),
            )
            .await
            .unwrap(),
        );
    }
    let mut victim = Command::new(celeriac_binary())
        .args(["worker", "-Q", "default", "-c", "4", "--lease", "1s"])
        .current_dir(repo_root())
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .env("CELERIAC_CACHE", test_cache_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it in the middle of the batch.
    let start_wait = Instant::now();
    while b.queue_len("default").await.unwrap() > (N as u64) * 3 / 4 {
        assert!(start_wait.elapsed() < Duration::from_secs(30), "the worker never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let in_flight: u64 = redis::Commands::hlen(&mut redis.client(0), "unacked").unwrap();

    // A second worker finishes the job, including what the dead one had leased.
    let survivor = start(&redis, config(|_| {}), 4, Duration::from_secs(1)).await;
    for id in &ids {
        let (state, _) = client::wait(&r, id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(state, "SUCCESS", "task {id} was lost");
    }
    survivor.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut runs: HashMap<String, u32> = HashMap::new();
    while let Ok(channel) = runs_rx.try_recv() {
        *runs.entry(channel).or_default() += 1;
    }
    let duplicates = runs.values().filter(|n| **n > 1).count() as u64;
    eprintln!(
        "killed worker: {in_flight} messages in flight at the kill, {duplicates} tasks ran twice"
    );
    assert_eq!(runs.len(), N, "every task ran");
    // Only tasks that were in flight when the worker died may run twice.
    assert!(duplicates <= in_flight, "{duplicates} duplicates but only {in_flight} were in flight");
}

/// The worker binary writes one line per task with its id, name, queue, retries, runtime and
/// outcome (at `CELERIAC_LOG=info`; the default level, like Celery's, is warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_logs_one_line_per_task() {
    let redis = RedisServer::start();
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = Command::new(celeriac_binary())
        .args(["worker", "-Q", "default", "-c", "2"])
        .current_dir(repo_root())
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .env("CELERIAC_CACHE", test_cache_dir())
        .env("CELERIAC_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let ok = client::enqueue(
        &b,
        "diagnostics.noop",
        &json!([1]),
        &json!({}),
        "default",
        &NewTask::default(),
    )
    .await
    .unwrap();
    let failed = client::enqueue(
        &b,
        "diagnostics.fail",
        &json!(["no"]),
        &json!({}),
        "default",
        &NewTask::default(),
    )
    .await
    .unwrap();
    for id in [&ok, &failed] {
        client::wait(&r, id, Duration::from_secs(30)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = worker.kill();
    let _ = worker.wait();
    let text = std::fs::read_to_string(log.path()).unwrap();
    for (id, name, outcome) in
        [(&ok, "diagnostics.noop", "success"), (&failed, "diagnostics.fail", "failure")]
    {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(id.as_str()))
            .filter(|l| l.contains("task finished"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        for field in
            [name, "queue=default", "retries=0", "runtime_ms=", &format!("outcome=\"{outcome}\"")]
        {
            assert!(lines[0].contains(field), "{field} missing from {}", lines[0]);
        }
    }
}
