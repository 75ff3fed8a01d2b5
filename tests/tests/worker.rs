//! The worker against a real Redis of its own: delivery, results, ETA, expiry, revocation,
//! retries, dead letters, priorities, rate limits, leases, shutdown and Redis going away.

use celeriac::broker::{Broker, BrokerOptions, FollowUp, RedisBroker};
use celeriac::client;
use celeriac::config::{Config, Overrides, TaskSettings};
use celeriac::kv::KvStore;
use celeriac::protocol::{self, NewTask};
use celeriac::registry::Registry;
use celeriac::results::ResultBackend;
use celeriac::units::HumanDuration;
use celeriac::worker::{Worker, WorkerOptions};
use celeriac_tests::{RedisServer, repo_root, test_cache_dir};
use redis::Commands;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub(crate) const QUEUES: &[&str] = &["default", "indexing", "maintenance", "celery"];

/// A worker running in this process until dropped.
pub(crate) struct TestWorker {
    worker: Arc<Worker<RedisBroker, ResultBackend>>,
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestWorker {
    /// The running worker, for its counters.
    pub(crate) fn worker(&self) -> &Worker<RedisBroker, ResultBackend> {
        &self.worker
    }

    pub(crate) async fn stop(mut self) -> Arc<Worker<RedisBroker, ResultBackend>> {
        self.stop.cancel();
        self.handle.take().unwrap().await.unwrap().unwrap();
        self.worker.clone()
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) fn config(tweak: impl FnOnce(&mut Config)) -> Config {
    let overrides =
        Overrides { modules: Some(celeriac::BUILT_TASKS_DIR.into()), ..Overrides::default() };
    let mut config = Config::load(Some(&repo_root().join("celeriac.toml")), &overrides).unwrap();
    config.cache = Some(test_cache_dir());
    tweak(&mut config);
    config
}

pub(crate) fn settings(f: impl FnOnce(&mut TaskSettings)) -> TaskSettings {
    let mut s = TaskSettings::default();
    f(&mut s);
    s
}

pub(crate) async fn broker(redis: &RedisServer, lease: Duration) -> RedisBroker {
    let opts = BrokerOptions { lease, ..BrokerOptions::default() };
    RedisBroker::connect(&redis.url(0), opts).await.unwrap()
}

pub(crate) async fn results(redis: &RedisServer) -> ResultBackend {
    ResultBackend::connect(&redis.url(1), "", Duration::from_secs(3600)).await.unwrap()
}

pub(crate) async fn start(
    redis: &RedisServer,
    config: Config,
    concurrency: usize,
    lease: Duration,
) -> TestWorker {
    start_tracking(redis, config, concurrency, lease, true).await
}

async fn start_tracking(
    redis: &RedisServer,
    config: Config,
    concurrency: usize,
    lease: Duration,
    track_started: bool,
) -> TestWorker {
    start_with(redis, config, concurrency, lease, |o| o.track_started = track_started).await
}

pub(crate) async fn start_with(
    redis: &RedisServer,
    config: Config,
    concurrency: usize,
    lease: Duration,
    tweak: impl FnOnce(&mut WorkerOptions),
) -> TestWorker {
    let registry = Arc::new(Registry::load(&config, concurrency as u32).await.unwrap());
    let broker = broker(redis, lease).await;
    let kv = KvStore::redis(broker.conn(), "");
    let opts = WorkerOptions {
        queues: QUEUES.iter().map(|q| q.to_string()).collect(),
        concurrency,
        hostname: "celeriac@test".into(),
        grace: Duration::from_secs(5),
        revoke_ttl: Duration::from_secs(600),
        track_started: true,
        result_extended: false,
        weights: Vec::new(),
    };
    let mut opts = opts;
    tweak(&mut opts);
    let worker = Worker::new(registry, broker, results(redis).await, kv, opts);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.clone().run(stop.clone()));
    TestWorker { worker, stop, handle: Some(handle) }
}

pub(crate) async fn send(b: &RedisBroker, task: &str, args: Value, opts: NewTask) -> String {
    let queue = if task.starts_with("indexing") { "indexing" } else { "default" };
    client::enqueue(b, task, &args, &json!({}), queue, &opts).await.unwrap()
}

pub(crate) async fn wait_state(r: &ResultBackend, id: &str, secs: u64) -> (String, Value) {
    let (state, meta) = client::wait(r, id, Duration::from_secs(secs)).await.unwrap();
    (state, meta.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_runs_and_its_result_is_stored_in_celery_format() {
    let redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 4, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let id = send(&b, "diagnostics.noop", json!([{"k": [1, 2]}]), NewTask::default()).await;
    let (state, meta) = wait_state(&r, &id, 10).await;
    assert_eq!(state, "SUCCESS");
    assert_eq!(meta["result"], json!({"k": [1, 2]}));
    assert_eq!(meta["task_id"], id.as_str());
    assert!(meta["date_done"].as_str().unwrap().ends_with("+00:00"));
    // The result is stored just before the ack: stopping waits for the ack to land.
    let w = w.stop().await;
    assert_eq!(w.stats.succeeded.load(Relaxed), 1);
    // Acked: nothing left unacked, nothing leased.
    let mut c = redis.client(0);
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0);
    assert_eq!(c.zcard::<_, u64>("unacked_index").unwrap(), 0);
    // The worker declared its queues as a Python worker does.
    assert!(
        c.sismember::<_, _, bool>("_kombu.binding.celery", "default\x06\x16\x06\x16default")
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_valid_tasks_are_unaffected() {
    let redis = RedisServer::start();
    let mut c = redis.client(0);
    let b = broker(&redis, Duration::from_secs(30)).await;
    let r = results(&redis).await;
    let valid_before = send(&b, "diagnostics.noop", json!([1]), NewTask::default()).await;
    let poison: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "bad_json"),
        (vec![0xff, 0xfe, 0x00, 0x80], "bad_json"),
        (br#"{"headers": {"id": "p1"}, "body": "W10="}"#.to_vec(), "unknown_protocol"),
        (br#"{"content-type": "application/x-python-serialize", "headers": {"task": "t", "id": "p2"}, "body": ""}"#.to_vec(), "content_type"),
        (br#"{"headers": {"task": "diagnostics.noop", "id": "p3"}, "body": "%%%", "properties": {"body_encoding": "base64"}}"#.to_vec(), "bad_base64"),
        (br#"{"headers": {"task": "diagnostics.noop", "id": "p4"}, "body": "[1]"}"#.to_vec(), "bad_body"),
        (vec![b' '; protocol::MAX_MESSAGE_BYTES + 10], "oversized"),
    ];
    for (p, _) in &poison {
        let _: () = c.lpush("default", p.as_slice()).unwrap();
    }
    let (_, unknown) = protocol::encode(
        "nobody.serves_this",
        &json!([]),
        &json!({}),
        "default",
        &NewTask::default(),
    );
    let _: () = c.lpush("default", &unknown).unwrap();
    let (bad_args_id, bad_args) = protocol::encode(
        "diagnostics.sleep",
        &json!(["not a number"]),
        &json!({}),
        "default",
        &NewTask::default(),
    );
    let _: () = c.lpush("default", &bad_args).unwrap();
    let valid_after = send(&b, "diagnostics.noop", json!([2]), NewTask::default()).await;

    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    assert_eq!(wait_state(&r, &valid_before, 10).await.0, "SUCCESS");
    assert_eq!(wait_state(&r, &valid_after, 10).await.0, "SUCCESS");
    let (state, meta) = wait_state(&r, &bad_args_id, 10).await;
    assert_eq!((state.as_str(), &meta["result"]["exc_type"]), ("FAILURE", &json!("TypeError")));
    let w = w.stop().await;

    let letters = client::dlq_list(&b, "default", 100).await.unwrap();
    assert_eq!(letters.len(), poison.len() + 2, "{letters:#?}");
    let reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    for (payload, kind) in &poison {
        assert!(reasons.contains(kind), "no {kind} in {reasons:?}");
        // The original message is kept untouched.
        let kept = letters.iter().any(|l| match l["message_encoding"].as_str() {
            Some("utf-8") => l["message"].as_str().unwrap().as_bytes() == payload.as_slice(),
            _ => true,
        });
        assert!(kept);
    }
    assert!(reasons.contains(&"unknown_task") && reasons.contains(&"failed"));
    // The oversized one never reached the worker: the fetch script dead-lettered it.
    assert_eq!(w.stats.poisoned.load(Relaxed), poison.len() as u64);
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0, "every message was settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_tasks_wait_in_redis_not_in_the_worker_and_run_when_due() {
    let redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let id = send(
        &b,
        "diagnostics.noop",
        json!(["later"]),
        NewTask { eta: Some(eta), ..NewTask::default() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client::status(&r, &id).await.unwrap().0, "PENDING");
    assert_eq!(b.scheduled_len().await.unwrap(), 1, "parked in the scheduled set");
    assert_eq!(redis.client(0).hlen::<_, u64>("unacked").unwrap(), 0, "not held unacked");
    let (state, meta) = wait_state(&r, &id, 10).await;
    assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!("later")));
    let done = protocol::parse_time(meta["date_done"].as_str().unwrap()).unwrap();
    assert!(done >= eta, "ran before its ETA: {done} < {eta}");
    w.stop().await;
}

/// `celeriac revoke` of a task that already ended leaves its outcome as it was: a FAILURE stays
/// a FAILURE (with its exception) and a SUCCESS a SUCCESS; a task not yet run becomes REVOKED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_finished_task_keeps_its_outcome() {
    let redis = RedisServer::start();
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let failed = send(&b, "diagnostics.fail", json!(["boom"]), NewTask::default()).await;
    let succeeded = send(&b, "diagnostics.noop", json!([1]), NewTask::default()).await;
    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    assert_eq!(wait_state(&r, &failed, 10).await.0, "FAILURE");
    assert_eq!(wait_state(&r, &succeeded, 10).await.0, "SUCCESS");
    w.stop().await;
    let pending = "never-sent".to_string();
    let ids = [failed.clone(), succeeded.clone(), pending.clone()];
    client::revoke(&b, &r, &ids, false, Duration::from_secs(60)).await.unwrap();
    let (state, meta) = wait_state(&r, &failed, 1).await;
    assert_eq!((state.as_str(), &meta["result"]["exc_type"]), ("FAILURE", &json!("ValueError")));
    assert_eq!(wait_state(&r, &succeeded, 1).await.0, "SUCCESS");
    assert_eq!(wait_state(&r, &pending, 1).await.0, "REVOKED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_tasks_do_not_run() {
    let redis = RedisServer::start();
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    let expired = send(
        &b,
        "diagnostics.noop",
        json!([1]),
        NewTask { expires: Some(past), ..NewTask::default() },
    )
    .await;
    let revoked = send(&b, "diagnostics.noop", json!([2]), NewTask::default()).await;
    client::revoke(&b, &r, std::slice::from_ref(&revoked), false, Duration::from_secs(60))
        .await
        .unwrap();
    let fine = send(&b, "diagnostics.noop", json!([3]), NewTask::default()).await;
    // The worker starts after the revoke: the revocation is durable in Redis.
    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    assert_eq!(wait_state(&r, &fine, 10).await.0, "SUCCESS");
    let (state, meta) = wait_state(&r, &expired, 10).await;
    assert_eq!((state.as_str(), &meta["result"]["exc_message"]), ("REVOKED", &json!(["expired"])));
    let (state, meta) = wait_state(&r, &revoked, 10).await;
    assert_eq!(
        (state.as_str(), &meta["result"]["exc_type"]),
        ("REVOKED", &json!("TaskRevokedError"))
    );
    let w = w.stop().await;
    assert_eq!(w.stats.succeeded.load(Relaxed), 1);
    assert_eq!(w.stats.revoked.load(Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_with_terminate_stops_a_running_task() {
    let redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let id = send(&b, "diagnostics.spin", json!([20_000]), NewTask::default()).await;
    let start = Instant::now();
    while client::status(&r, &id).await.unwrap().0 != "STARTED" {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client::revoke(&b, &r, std::slice::from_ref(&id), true, Duration::from_secs(60)).await.unwrap();
    let (state, meta) = wait_state(&r, &id, 10).await;
    assert_eq!(state, "REVOKED");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client::status(&r, &id).await.unwrap().0, "REVOKED", "{meta}");
    assert!(start.elapsed() < Duration::from_secs(10), "the 20 s task was stopped");
    let w = w.stop().await;
    assert_eq!(w.stats.succeeded.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_dead_letter_when_exhausted() {
    let redis = RedisServer::start();
    let cfg = config(|c| {
        c.tasks.insert(
            "diagnostics.flaky".into(),
            settings(|s| {
                s.max_retries = Some(3);
                s.retry_backoff = Some(HumanDuration(Duration::from_millis(50)));
                s.retry_jitter = Some(false);
            }),
        );
    });
    let w = start(&redis, cfg, 2, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let ok = send(&b, "diagnostics.flaky", json!([3]), NewTask::default()).await;
    let (state, meta) = wait_state(&r, &ok, 15).await;
    assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(3)), "third attempt succeeds");
    let doomed = send(&b, "diagnostics.flaky", json!([10]), NewTask::default()).await;
    let (state, meta) = wait_state(&r, &doomed, 15).await;
    assert_eq!(state, "FAILURE");
    // As Celery past max_retries: the client raises MaxRetriesExceededError, not Retry.
    assert_eq!(meta["result"]["exc_type"], "MaxRetriesExceededError");
    assert_eq!(meta["result"]["exc_module"], "celery.exceptions");
    let text = meta["result"]["exc_message"][0].as_str().unwrap();
    assert!(
        text.starts_with(&format!("Can't retry diagnostics.flaky[{doomed}] args:[10]")),
        "{text}"
    );
    // Stopped first: the dead letter goes with the ack, just after the FAILURE is stored.
    let w = w.stop().await;
    let letters = client::dlq_list(&b, "default", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "retries_exhausted");
    assert_eq!(letters[0]["attempts"], 4, "first run plus three retries");
    assert_eq!(letters[0]["id"], doomed.as_str());
    // The dead letter holds the message as it was last delivered: same id, retries = 3.
    let original = protocol::decode(letters[0]["message"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!((original.id.as_str(), original.retries), (doomed.as_str(), 3));
    assert_eq!(w.stats.retried.load(Relaxed), 2 + 3);

    // Replay puts it back with its retries reset; purge empties the list.
    assert_eq!(client::dlq_replay(&b, "default", Some(&doomed)).await.unwrap(), 1);
    assert_eq!(b.queue_len("default").await.unwrap(), 1);
    assert!(client::dlq_list(&b, "default", 10).await.unwrap().is_empty());
    let _: () = redis.client(0).lpush("celeriac:dlq:default", "{}").unwrap();
    assert_eq!(b.dlq_purge("default").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_loses_an_expiry_that_has_passed_and_keeps_one_ahead() {
    let redis = RedisServer::start();
    let b = broker(&redis, Duration::from_secs(30)).await;
    let now = chrono::Utc::now();
    let (past, ahead) = (now - chrono::Duration::hours(1), now + chrono::Duration::hours(1));
    for (id, expires, tagged) in
        [("past", past, false), ("ahead", ahead, false), ("past-tagged", past, true)]
    {
        let opts = NewTask { id: Some(id.into()), expires: Some(expires), ..NewTask::default() };
        let (_, mut envelope) =
            protocol::encode("diagnostics.noop", &json!([1]), &json!({}), "default", &opts);
        if tagged {
            // As kombu's JSON writes a datetime it was handed.
            let mut env: Value = serde_json::from_str(&envelope).unwrap();
            let iso = env["headers"]["expires"].take();
            env["headers"]["expires"] = json!({"__type__": "datetime", "__value__": iso});
            envelope = env.to_string();
        }
        let record = json!({"reason": "failed", "id": id, "queue": "default", "message": envelope, "message_encoding": "utf-8"});
        b.send(&[FollowUp::DeadLetter { queue: "default".into(), record: record.to_string() }])
            .await
            .unwrap();
    }
    assert_eq!(client::dlq_replay(&b, "default", None).await.unwrap(), 3);
    let queued: Vec<String> = redis.client(0).lrange("default", 0, -1).unwrap();
    let mut expiries: Vec<(String, bool)> = queued
        .iter()
        .map(|m| protocol::decode(m.as_bytes()).unwrap())
        .map(|m| (m.id, m.expires.is_some()))
        .collect();
    expiries.sort();
    assert_eq!(
        expiries,
        [("ahead".to_string(), true), ("past".to_string(), false), ("past-tagged".into(), false)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_tasks_are_spread_out() {
    let redis = RedisServer::start();
    let cfg = config(|c| {
        c.tasks.insert(
            "diagnostics.noop".into(),
            settings(|s| s.rate_limit = Some("4/s".parse().unwrap())),
        );
    });
    let w = start(&redis, cfg, 4, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(send(&b, "diagnostics.noop", json!([i]), NewTask::default()).await);
    }
    for id in &ids {
        assert_eq!(wait_state(&r, id, 15).await.0, "SUCCESS");
    }
    // A burst of 4, then 4 per second: the last of 10 cannot finish before 1.5 s.
    assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_keeps_its_lease_and_runs_once() {
    let redis = RedisServer::start();
    // Leases of one second, a task of three: without renewal a second worker would restore and
    // run it again.
    let lease = Duration::from_secs(1);
    let w1 = start(&redis, config(|_| {}), 1, lease).await;
    let (b, r) = (broker(&redis, lease).await, results(&redis).await);
    let id = send(&b, "diagnostics.sleep", json!([3000]), NewTask::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w2 = start(&redis, config(|_| {}), 1, lease).await;
    assert_eq!(wait_state(&r, &id, 15).await.0, "SUCCESS");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (w1, w2) = (w1.stop().await, w2.stop().await);
    assert_eq!(w1.stats.succeeded.load(Relaxed) + w2.stats.succeeded.load(Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_unfinished_tasks_back_to_their_queue() {
    let redis = RedisServer::start();
    let registry_config = config(|_| {});
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let registry = Arc::new(Registry::load(&registry_config, 1).await.unwrap());
    let opts = WorkerOptions {
        queues: vec!["default".into()],
        concurrency: 1,
        hostname: "celeriac@grace".into(),
        grace: Duration::from_millis(300),
        revoke_ttl: Duration::from_secs(60),
        track_started: true,
        result_extended: false,
        weights: Vec::new(),
    };
    let kv = KvStore::redis(b.conn(), "");
    let worker = Worker::new(registry, b.clone(), r.clone(), kv, opts);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.clone().run(stop.clone()));
    let id = send(&b, "diagnostics.spin", json!([10_000]), NewTask::default()).await;
    let start = Instant::now();
    while client::status(&r, &id).await.unwrap().0 != "STARTED" {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5), "stopped after the grace period");
    assert_eq!(b.queue_len("default").await.unwrap(), 1, "back on its queue");
    assert_eq!(redis.client(0).hlen::<_, u64>("unacked").unwrap(), 0);
    let back = redis.client(0).lrange::<_, Vec<String>>("default", 0, -1).unwrap();
    let m = protocol::decode(back[0].as_bytes()).unwrap();
    assert_eq!(m.id, id);
    assert_eq!(m.envelope()["headers"]["redelivered"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_recovers_when_redis_restarts() {
    let mut redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let first = send(&b, "diagnostics.noop", json!(["before"]), NewTask::default()).await;
    assert_eq!(wait_state(&r, &first, 10).await.0, "SUCCESS");
    redis.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.restart();
    // The worker reconnects by itself and serves new work.
    let start = Instant::now();
    let second = loop {
        match client::enqueue(
            &b,
            "diagnostics.noop",
            &json!(["after"]),
            &json!({}),
            "default",
            &NewTask::default(),
        )
        .await
        {
            Ok(id) => break id,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("producer could not reconnect: {e}"),
        }
    };
    let (state, meta) = wait_state(&r, &second, 20).await;
    assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!("after")));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_share_a_kv_namespace_in_redis_and_children_are_sent() {
    let redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 4, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let channel: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("examples/ops-channel.json")).unwrap(),
    )
    .unwrap();
    let opts = NewTask::default();
    let batch = client::enqueue(
        &b,
        "indexing.batch_index_channel",
        &json!([]),
        &channel,
        "indexing",
        &opts,
    )
    .await
    .unwrap();
    let (state, meta) = wait_state(&r, &batch, 10).await;
    assert_eq!(state, "SUCCESS", "{meta}");
    let children: Vec<String> = meta["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0][0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(children.len(), 3);
    for child in &children {
        assert_eq!(wait_state(&r, child, 10).await.0, "SUCCESS");
    }
    let search = client::enqueue(
        &b,
        "indexing.search",
        &json!(["pizza lunch"]),
        &json!({}),
        "indexing",
        &opts,
    )
    .await
    .unwrap();
    let (_, meta) = wait_state(&r, &search, 10).await;
    assert_eq!(meta["result"][0]["session_id"], "ops:m4");
    let sessions: Vec<String> = redis.client(0).smembers("celeriac:kv:index:sessions").unwrap();
    assert_eq!(sessions.len(), 3);
    w.stop().await;
}

#[tokio::test]
async fn global_key_prefix_applies_to_every_key() {
    let redis = RedisServer::start();
    let opts = BrokerOptions { global_prefix: "app1:".into(), ..BrokerOptions::default() };
    let b = RedisBroker::connect(&redis.url(0), opts).await.unwrap();
    client::enqueue(&b, "diagnostics.noop", &json!([]), &json!({}), "default", &NewTask::default())
        .await
        .unwrap();
    let got = b.fetch(&["default".to_string()], 10, "p.").await.unwrap();
    assert_eq!(got.len(), 1);
    let mut c = redis.client(0);
    // kombu's unacked entry: [envelope, exchange, routing_key], so a Python worker can restore it.
    let entry: String = c.hget("app1:unacked", &got[0].tag).unwrap();
    let parsed: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!((&parsed[1], &parsed[2]), (&json!(""), &json!("default")));
    assert_eq!(parsed[0]["headers"]["task"], "diagnostics.noop");
    let mut keys: Vec<String> = c.keys("*").unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "app1:_kombu.binding.celery",
            "app1:_kombu.binding_permanent.celery",
            "app1:celeriac:leases",
            "app1:unacked",
            "app1:unacked_index"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_show_up_as_the_task_state() {
    let redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let id = send(&b, "diagnostics.sleep", json!([800]), NewTask::default()).await;
    let started = Instant::now();
    let meta = loop {
        let (state, meta) = client::status(&r, &id).await.unwrap();
        if state == "PROGRESS" {
            break meta.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never saw PROGRESS, last {state}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(meta["result"]["total_ms"], 800);
    assert!(meta["result"]["elapsed_ms"].as_u64().unwrap() >= 100);
    assert_eq!(wait_state(&r, &id, 10).await.0, "SUCCESS");
    w.stop().await;
}

/// The states a task's result channel announced, in order, until a ready state.
async fn announced_states(redis: &RedisServer, track_started: bool) -> Vec<String> {
    use futures_util::StreamExt as _;
    let mut pubsub = redis::Client::open(redis.url(1)).unwrap().get_async_pubsub().await.unwrap();
    pubsub.psubscribe("celery-task-meta-*").await.unwrap();
    let w = start_tracking(redis, config(|_| {}), 2, Duration::from_secs(30), track_started).await;
    let b = broker(redis, Duration::from_secs(30)).await;
    send(&b, "diagnostics.sleep", json!([200]), NewTask::default()).await;
    let mut states = Vec::new();
    let mut messages = pubsub.on_message();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(20), messages.next()).await {
        let meta: Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        let state = meta["status"].as_str().unwrap().to_string();
        let done = state == "SUCCESS";
        states.push(state);
        if done {
            break;
        }
    }
    drop(messages);
    w.stop().await;
    states
}

#[tokio::test]
async fn started_is_stored_only_when_tracked() {
    let redis = RedisServer::start();
    let tracked = announced_states(&redis, true).await;
    assert_eq!(tracked.first().map(String::as_str), Some("STARTED"), "{tracked:?}");
    assert_eq!(tracked.last().map(String::as_str), Some("SUCCESS"), "{tracked:?}");
    let untracked = announced_states(&redis, false).await;
    assert!(!untracked.iter().any(|s| s == "STARTED"), "{untracked:?}");
    assert_eq!(untracked.last().map(String::as_str), Some("SUCCESS"), "{untracked:?}");
}
