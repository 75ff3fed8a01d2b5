//! Enqueue-to-start latency at a steady 1,000 tasks per second: a producer sends one
//! `diagnostics.noop` per millisecond, a worker (in this process, 8 slots) runs them, and the
//! STARTED announcement each run publishes on its result channel marks the start. Needs
//! `redis-server` on the PATH; it starts its own on a free port.
//! Run with `cargo bench -p celeriac --bench latency`.

use celeriac::broker::{Broker, BrokerOptions, FollowUp, RedisBroker};
use celeriac::config::{Config, Overrides};
use celeriac::kv::KvStore;
use celeriac::protocol::{self, NewTask};
use celeriac::registry::Registry;
use celeriac::results::ResultBackend;
use celeriac::worker::{Worker, WorkerOptions};
use futures_util::StreamExt as _;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TASKS: usize = 5_000;
const INTERVAL: Duration = Duration::from_millis(1);

fn main() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server on the PATH");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(measure(port));
    let _ = redis.kill();
    let _ = redis.wait();
}

async fn measure(port: u16) {
    let url = |db: u8| format!("redis://127.0.0.1:{port}/{db}");
    let overrides =
        Overrides { modules: Some(celeriac::BUILT_TASKS_DIR.into()), ..Overrides::default() };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../celeriac.toml");
    let config = Config::load(Some(&root), &overrides).unwrap();
    let registry = Arc::new(Registry::load(&config, 8).await.unwrap());
    let broker = RedisBroker::connect(&url(0), BrokerOptions::default()).await.unwrap();
    let results = ResultBackend::connect(&url(1), "", Duration::from_secs(600)).await.unwrap();
    let opts = WorkerOptions {
        queues: vec!["default".into()],
        concurrency: 8,
        hostname: "celeriac@bench".into(),
        grace: Duration::from_secs(5),
        revoke_ttl: Duration::from_secs(60),
        track_started: true,
        result_extended: false,
        weights: Vec::new(),
    };
    let worker = Worker::new(registry, broker.clone(), results, KvStore::memory(), opts);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));

    let mut pubsub = redis::Client::open(url(1)).unwrap().get_async_pubsub().await.unwrap();
    pubsub.psubscribe("celery-task-meta-*").await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(m) = messages.next().await {
            let payload: String = m.get_payload().unwrap_or_default();
            if payload.contains("\"STARTED\"") {
                let id = m.get_channel_name().trim_start_matches("celery-task-meta-").to_string();
                let _ = tx.send((id, Instant::now()));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(TASKS);
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..TASKS {
        ticker.tick().await;
        let (id, envelope) = protocol::encode(
            "diagnostics.noop",
            &json!([i]),
            &json!({}),
            "default",
            &NewTask::default(),
        );
        let at = Instant::now();
        broker
            .send(&[FollowUp::Publish { queue: "default".into(), priority: 0, envelope }])
            .await
            .unwrap();
        sent.insert(id, at);
    }
    let mut latencies = Vec::with_capacity(TASKS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while latencies.len() < TASKS && Instant::now() < deadline {
        if let Ok(Some((id, at))) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
            && let Some(t0) = sent.get(&id)
        {
            latencies.push(at.duration_since(*t0));
        }
    }
    stop.cancel();
    let _ = handle.await;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "latency enqueue->start at {}/s over {} tasks: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} measured)",
        1000 / INTERVAL.as_millis(),
        TASKS,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        latencies.len()
    );
}
