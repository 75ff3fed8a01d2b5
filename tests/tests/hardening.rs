//! Hostile tasks and producers against a real worker on a Redis of its own: each test is a way a
//! task (with no grant, or only its own) or a message tried to wedge the worker, stall the
//! broker, escape its grants or lose a message. The tasks are in `tests/fixtures/hostile`.

use crate::worker::{broker, config, results, send, settings, start, start_with, wait_state};
use celeriac::client;
use celeriac::config::Config;
use celeriac::protocol::{self, NewTask};
use celeriac_tests::RedisServer;
use redis::Commands;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(30);

/// The example tasks and the hostile fixture in one modules folder, with `tweak` applied.
fn hostile_config(modules: &Path, tweak: impl FnOnce(&mut Config)) -> Config {
    link_hostile_modules(modules);
    config(|c| {
        c.modules = modules.to_path_buf();
        tweak(c);
    })
}

/// Fills `modules` with links to the example tasks and the hostile fixture.
pub(crate) fn link_hostile_modules(modules: &Path) {
    for dir in [celeriac::BUILT_TASKS_DIR, celeriac::BUILT_FIXTURES_DIR] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "wasm") {
                std::os::unix::fs::symlink(&path, modules.join(path.file_name().unwrap())).unwrap();
            }
        }
    }
}

/// Grants `hostile.child_to` its child task, and `queues` (globs) beyond the default ones.
fn grant_child_to(c: &mut Config, queues: &[&str]) {
    let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
    c.tasks.insert(
        "hostile.child_to".into(),
        settings(|s| {
            s.enqueue = Some(vec!["hostile.count".into()]);
            s.enqueue_queues = Some(queues);
        }),
    );
}

/// A Celery message for `task` with `patch` merged into its headers, pushed raw onto `default`.
fn push_raw(c: &mut redis::Connection, task: &str, args: Value, patch: Value) -> String {
    let (id, envelope) = protocol::encode(task, &args, &json!({}), "default", &NewTask::default());
    let mut env: Value = serde_json::from_str(&envelope).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        env["headers"][k] = v.clone();
    }
    let _: () = c.lpush("default", env.to_string()).unwrap();
    id
}

/// Sends a hostile task to the `celery` queue, where the fixture's tasks live.
async fn send_hostile(b: &celeriac::broker::RedisBroker, task: &str, args: Value) -> String {
    client::enqueue(b, task, &args, &json!({}), "celery", &NewTask::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_cannot_be_sent_into_bookkeeping_keys_or_queues_it_was_not_granted() {
    let redis = RedisServer::start();
    let modules = tempfile::tempdir().unwrap();
    let config = hostile_config(modules.path(), |c| grant_child_to(c, &["extra-*"]));
    let w = start(&redis, config, 2, LEASE).await;
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let mut c = redis.client(0);
    for (queue, countdown) in [
        ("unacked", None),
        ("_kombu.binding.celery", Some(1)),
        ("celeriac:revoked", None),
        ("celeriac:kv:index:stolen", None),
        ("celery-task-meta-x", None),
        ("line\nbreak", None),
        ("not-granted", None),
    ] {
        let id = send_hostile(&b, "hostile.child_to", json!([queue, countdown])).await;
        let (state, meta) = wait_state(&r, &id, 10).await;
        assert_eq!(state, "FAILURE", "{queue:?}: {meta}");
        assert_eq!(meta["result"]["exc_type"], "PermissionError", "{queue:?}: {meta}");
    }
    for key in ["unacked", "celeriac:revoked", "celeriac:kv:index:stolen", "not-granted"] {
        let kind: String = redis::cmd("TYPE").arg(key).query(&mut c).unwrap();
        assert!(kind == "none" || kind == "hash", "{key} became a {kind}");
    }
    assert_eq!(c.zcard::<_, u64>("celeriac:scheduled").unwrap(), 0);
    // The granted ones: its children's own queue and the enqueue_queues glob.
    let id = send_hostile(&b, "hostile.child_to", json!(["extra-1", null])).await;
    assert_eq!(wait_state(&r, &id, 10).await.0, "SUCCESS");
    // The result is stored first and the child pushed with the ack right after it, so the
    // child may land a moment after the parent's SUCCESS is visible.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.llen::<_, u64>("extra-1").unwrap() == 0 {
        assert!(Instant::now() < deadline, "the granted child never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.llen::<_, u64>("extra-1").unwrap(), 1);
    let id = send_hostile(&b, "hostile.child_to", json!(["celery", null])).await;
    assert_eq!(wait_state(&r, &id, 10).await.0, "SUCCESS");
    // The broker still works for everyone.
    let id = send(&b, "diagnostics.noop", json!([1]), NewTask::default()).await;
    assert_eq!(wait_state(&r, &id, 10).await.0, "SUCCESS");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_numbers_from_producers_and_tasks_never_strand_a_message() {
    let redis = RedisServer::start();
    let modules = tempfile::tempdir().unwrap();
    let config = hostile_config(modules.path(), |c| grant_child_to(c, &[]));
    let mut c = redis.client(0);
    let huge_limit =
        push_raw(&mut c, "diagnostics.noop", json!([1]), json!({"timelimit": [1e300, null]}));
    let near_max =
        push_raw(&mut c, "diagnostics.noop", json!([2]), json!({"timelimit": [1.8e19, 1e19]}));
    let many_retries =
        push_raw(&mut c, "diagnostics.noop", json!([3]), json!({"retries": 1u64 << 40}));
    let unknown = push_raw(&mut c, "nobody.serves", json!([]), json!({"retries": u64::MAX}));
    let w = start(&redis, config, 4, LEASE).await;
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    for id in [&huge_limit, &near_max, &many_retries] {
        assert_eq!(wait_state(&r, id, 10).await.0, "SUCCESS", "{id}");
    }
    assert_eq!(wait_state(&r, &unknown, 10).await.0, "FAILURE");
    // A task asking to be retried in 300,000 years, and one scheduling its child that far out.
    let retry = send_hostile(&b, "hostile.retry_after", json!([1e16 as u64])).await;
    assert_eq!(wait_state(&r, &retry, 10).await.0, "RETRY");
    let parent = send_hostile(&b, "hostile.child_to", json!(["celery", 1e16 as u64])).await;
    assert_eq!(wait_state(&r, &parent, 10).await.0, "SUCCESS");
    // The child is scheduled with the parent's ack, just after its SUCCESS is stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let due = loop {
        let due: Vec<(String, f64)> = c.zrange_withscores("celeriac:scheduled", 0, -1).unwrap();
        if due.len() >= 2 || std::time::Instant::now() > deadline {
            break due;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(due.len(), 2, "both wait in the scheduled set");
    let eleven_years = (chrono::Utc::now().timestamp_millis() + 11 * 365 * 86_400_000) as f64;
    assert!(due.iter().all(|(_, at)| *at < eleven_years), "capped: {due:?}");
    let w = w.stop().await;
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0, "every message was settled");
    let letters = client::dlq_list(&b, "default", 10).await.unwrap();
    assert_eq!(letters[0]["attempts"], u32::MAX, "{letters:?}");
    assert_eq!(w.stats.succeeded.load(std::sync::atomic::Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_time_limit_cannot_raise_the_configured_one() {
    let redis = RedisServer::start();
    let config = config(|c| {
        c.tasks.insert(
            "diagnostics.spin".into(),
            settings(|s| {
                s.soft_time_limit = Some("500ms".parse().unwrap());
                s.hard_time_limit = Some("1s".parse().unwrap());
            }),
        );
    });
    let mut c = redis.client(0);
    let id = push_raw(&mut c, "diagnostics.spin", json!([6000]), json!({"timelimit": [20, 19]}));
    let started = Instant::now();
    let w = start(&redis, config, 2, LEASE).await;
    let (state, meta) = wait_state(&results(&redis).await, &id, 10).await;
    assert_eq!(state, "FAILURE", "{meta}");
    assert!(
        ["SoftTimeLimitExceeded", "TimeLimitExceeded"]
            .contains(&meta["result"]["exc_type"].as_str().unwrap()),
        "{meta}"
    );
    assert!(started.elapsed() < Duration::from_secs(4), "stopped by the configured limit");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_meta_saying_success_does_not_freeze_the_final_state() {
    let redis = RedisServer::start();
    let modules = tempfile::tempdir().unwrap();
    let w = start(&redis, hostile_config(modules.path(), |_| {}), 2, LEASE).await;
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let id = send_hostile(&b, "hostile.progress_then_fail", json!([])).await;
    let (_, meta) = wait_state(&r, &id, 10).await;
    assert_eq!(meta["status"], "FAILURE", "{meta}");
    assert_eq!(meta["result"]["exc_type"], "ValueError");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_failures_and_unsettleable_messages_do_not_hold_up_other_results() {
    let redis = RedisServer::start();
    let modules = tempfile::tempdir().unwrap();
    let config = hostile_config(modules.path(), |c| grant_child_to(c, &["busy"]));
    let mut c = redis.client(0);
    // Another application keeps a hash where a granted queue would be.
    let _: () = c.hset("busy", "f", "v").unwrap();
    let w = start(&redis, config, 4, LEASE).await;
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let big = send_hostile(&b, "hostile.fail_big", json!([5_000_000])).await;
    let stuck = send_hostile(&b, "hostile.child_to", json!(["busy", null])).await;
    let noops: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(send(&b, "diagnostics.noop", json!([i]), NewTask::default()).await);
        }
        ids
    };
    for id in &noops {
        assert_eq!(wait_state(&r, id, 10).await.0, "SUCCESS");
    }
    let (state, meta) = wait_state(&r, &big, 10).await;
    assert_eq!(state, "FAILURE");
    let message = meta["result"]["exc_message"][0].as_str().unwrap();
    assert!(message.len() < 20_000 && message.contains("bytes cut"), "{}", message.len());
    // The task itself succeeded and its result was stored before the ack; what could not be
    // applied (its child) is kept with the whole message in the dead-letter list.
    let deadline = Instant::now() + Duration::from_secs(10);
    let letter = loop {
        let letters = client::dlq_list(&b, "celery", 10).await.unwrap();
        if let Some(l) = letters.into_iter().find(|l| l["id"] == stuck.as_str()) {
            break l;
        }
        assert!(Instant::now() < deadline, "the unsettleable message was not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letter["reason"], "unsettled");
    assert!(letter["error"].as_str().unwrap().contains("busy"), "{letter}");
    assert_eq!(c.llen::<_, u64>("celery").unwrap(), 0, "its child was not half-sent");
    assert_eq!(c.hget::<_, _, String>("busy", "f").unwrap(), "v");
    let stopping = Instant::now();
    w.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(5), "shutdown is not wedged");
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_flood_is_coalesced_and_does_not_delay_other_results() {
    let redis = RedisServer::start();
    let modules = tempfile::tempdir().unwrap();
    let w = start(&redis, hostile_config(modules.path(), |_| {}), 4, LEASE).await;
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let mut c = redis.client(1);
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();
    let flood = send_hostile(&b, "hostile.progress_flood", json!([20_000, 1024])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    let noop = send(&b, "diagnostics.noop", json!([1]), NewTask::default()).await;
    assert_eq!(wait_state(&r, &noop, 10).await.0, "SUCCESS");
    assert!(sent.elapsed() < Duration::from_secs(1), "noop took {:?}", sent.elapsed());
    let (state, meta) = wait_state(&r, &flood, 30).await;
    assert_eq!(state, "SUCCESS", "{meta}");
    assert_eq!(meta["result"], 20_000);
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut c).unwrap();
    let publishes: u64 = info
        .lines()
        .find(|l| l.starts_with("cmdstat_publish:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(publishes < 500, "{publishes} states published for 20,000 reports");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatty_output_and_caps_on_kv_and_children_fail_cleanly() {
    let redis = RedisServer::start();
    let modules = tempfile::tempdir().unwrap();
    let config = hostile_config(modules.path(), |c| {
        c.tasks.insert("hostile.set_add".into(), settings(|s| s.kv = Some("hoard".into())));
        c.tasks.insert(
            "hostile.children".into(),
            settings(|s| s.enqueue = Some(vec!["hostile.count".into()])),
        );
    });
    let w = start(&redis, config, 2, LEASE).await;
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let mut c = redis.client(0);
    // 200 KB of println!: the tail is kept, the task is not trapped.
    let print = send_hostile(&b, "hostile.print", json!([2000])).await;
    assert_eq!(wait_state(&r, &print, 10).await.0, "SUCCESS");
    let log = send_hostile(&b, "hostile.log_flood", json!([5000, "a line\nFORGED ERROR"])).await;
    assert_eq!(wait_state(&r, &log, 10).await.0, "SUCCESS");
    let hoard = send_hostile(&b, "hostile.set_add", json!([200_000, 8])).await;
    let (state, meta) = wait_state(&r, &hoard, 10).await;
    assert_eq!((state.as_str(), &meta["result"]["exc_type"]), ("FAILURE", &json!("ValueError")));
    assert!(!c.exists::<_, bool>("celeriac:kv:hoard:hoard").unwrap());
    // 20 children of 1 MB each: more than one run's children may carry in all.
    let fan = send_hostile(&b, "hostile.children", json!([20, 1_000_000])).await;
    let (state, meta) = wait_state(&r, &fan, 20).await;
    assert_eq!((state.as_str(), &meta["result"]["exc_type"]), ("FAILURE", &json!("ValueError")));
    assert_eq!(c.llen::<_, u64>("celery").unwrap(), 0, "no child was sent");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_and_shutdown_reach_a_task_waiting_in_a_host_call() {
    let redis = RedisServer::start();
    let modules = tempfile::tempdir().unwrap();
    let config = hostile_config(modules.path(), |_| {});
    let w = start_with(&redis, config, 2, LEASE, |o| o.grace = Duration::from_secs(1)).await;
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let revoked = send_hostile(&b, "hostile.sleep_once", json!([20_000])).await;
    let kept = send_hostile(&b, "hostile.sleep_once", json!([20_000])).await;
    for id in [&revoked, &kept] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while client::status(&r, id).await.unwrap().0 != "STARTED" {
            assert!(Instant::now() < deadline, "never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let revoking = Instant::now();
    client::revoke(&b, &r, std::slice::from_ref(&revoked), true, Duration::from_secs(60))
        .await
        .unwrap();
    // The revoke stores REVOKED ("revoked") at once; the worker's own REVOKED ("terminated")
    // follows when the run has actually stopped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (state, meta) = client::status(&r, &revoked).await.unwrap();
        let meta = meta.unwrap_or_default();
        if state == "REVOKED" && meta["result"]["exc_message"][0] == "terminated" {
            break;
        }
        assert!(Instant::now() < deadline, "{state} {meta}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoking.elapsed() < Duration::from_secs(3), "took {:?}", revoking.elapsed());
    // Shutdown with a 1 s grace: the other one is stopped and handed back, not waited for.
    let stopping = Instant::now();
    w.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(4), "took {:?}", stopping.elapsed());
    let mut c = redis.client(0);
    assert_eq!(c.llen::<_, u64>("celery").unwrap(), 1, "handed back to its queue");
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0);
}

/// Redis's count of bytes sent to its clients so far.
fn bytes_sent(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats has total_net_output_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_revocations_cost_a_worker_one_lookup_per_batch() {
    let redis = RedisServer::start();
    let mut c = redis.client(0);
    // A million live revocations, as a steady 100 a second leaves with a 3 h expiry.
    let _: () = redis::Script::new(
        "for i = 1, 1000000, 1000 do
           local args = {}
           for j = i, i + 999 do
             table.insert(args, ARGV[1])
             table.insert(args, 'revoked-' .. j)
           end
           redis.call('ZADD', KEYS[1], unpack(args))
         end",
    )
    .key("celeriac:revoked")
    .arg(celeriac::broker::now_secs() + 3600.0)
    .invoke(&mut c)
    .unwrap();
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let with_id = |id: &str| NewTask { id: Some(id.into()), ..NewTask::default() };
    let revoked = send(&b, "diagnostics.noop", json!([0]), with_id("revoked-777")).await;
    let ids: Vec<String> = futures_util::future::join_all(
        (1..=200).map(|i| send(&b, "diagnostics.noop", json!([i]), NewTask::default())),
    )
    .await;
    let before = bytes_sent(&mut c);
    let w = start(&redis, config(|_| {}), 8, LEASE).await;
    for id in &ids {
        assert_eq!(wait_state(&r, id, 30).await.0, "SUCCESS");
    }
    let (state, meta) = wait_state(&r, &revoked, 10).await;
    assert_eq!((state.as_str(), &meta["result"]["exc_message"]), ("REVOKED", &json!(["revoked"])));
    // Another revocation while the worker runs: it is not a reason to read the set either.
    client::revoke(&b, &r, &["late".to_string()], false, Duration::from_secs(600)).await.unwrap();
    send(&b, "diagnostics.noop", json!([-1]), with_id("late")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.llen::<_, u64>("default").unwrap() + c.hlen::<_, u64>("unacked").unwrap() > 0 {
        assert!(Instant::now() < deadline, "the late message was never taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = w.stop().await;
    let stats = &w.stats;
    assert_eq!(stats.succeeded.load(std::sync::atomic::Ordering::Relaxed), 200);
    // The set itself (about 14 MB of ids) never crosses the wire: what the worker read is its
    // messages, its lookups and its bookkeeping.
    let sent = bytes_sent(&mut c) - before;
    assert!(sent < 2 << 20, "Redis sent {sent} bytes to a worker that took 202 messages");
    assert_eq!(stats.revoked.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_backlog_comes_back_once_each_in_order() {
    let redis = RedisServer::start();
    let (b, r) = (broker(&redis, LEASE).await, results(&redis).await);
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(send(&b, "diagnostics.noop", json!([i]), NewTask::default()).await);
    }
    let cfg = config(|c| {
        let limit = "10/s".parse().unwrap();
        c.tasks.insert("diagnostics.noop".into(), settings(|s| s.rate_limit = Some(limit)));
    });
    let started = Instant::now();
    let w = start(&redis, cfg, 1, LEASE).await;
    let mut done = Vec::new();
    for id in &ids {
        let (state, meta) = wait_state(&r, id, 15).await;
        assert_eq!(state, "SUCCESS");
        done.push(meta["date_done"].as_str().unwrap().to_string());
    }
    // A burst of 10, then 10 a second: the last cannot end before 1 s.
    assert!(started.elapsed() >= Duration::from_millis(950), "{:?}", started.elapsed());
    let w = w.stop().await;
    // Each waiting message was parked once, for its own slot, and fetched once more then.
    let fetched = w.stats.fetched.load(std::sync::atomic::Ordering::Relaxed);
    assert!(fetched <= 30, "{fetched} messages fetched for 20 tasks");
    let mut in_order = done.clone();
    in_order.sort();
    assert_eq!(done, in_order, "run in the order they were queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_result_stores_no_state_whatever_the_task_ends_as() {
    let redis = RedisServer::start();
    let mut c = redis.client(0);
    let flag = json!({"ignore_result": true});
    let ignored = [
        push_raw(&mut c, "diagnostics.noop", json!([1]), flag.clone()),
        push_raw(&mut c, "diagnostics.fail", json!(["boom"]), flag),
    ];
    let kept = push_raw(&mut c, "diagnostics.noop", json!([2]), json!({}));
    let w = start(&redis, config(|_| {}), 2, LEASE).await;
    let r = results(&redis).await;
    assert_eq!(wait_state(&r, &kept, 10).await.0, "SUCCESS");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.llen::<_, u64>("default").unwrap() + c.hlen::<_, u64>("unacked").unwrap() > 0 {
        assert!(Instant::now() < deadline, "messages left unsettled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = w.stop().await;
    let mut backend = redis.client(1);
    for id in &ignored {
        let stored: Option<String> = backend.get(format!("celery-task-meta-{id}")).unwrap();
        assert_eq!(stored, None, "no STARTED, SUCCESS or FAILURE for {id}");
    }
    let ran = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((ran(&w.stats.succeeded), ran(&w.stats.failed)), (2, 1), "all three ran");
}

/// A workflow the worker cannot follow is never passed over: a malformed one makes the message
/// poison before it runs, and a step celeriac cannot send (Celery's `chunks`) leaves the task's
/// own result, a FAILURE that says why at the next step's id, and a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_the_worker_cannot_follow_is_failed_and_dead_lettered_not_dropped() {
    use base64::Engine as _;
    let redis = RedisServer::start();
    let mut c = redis.client(0);
    let encode = |body: Value| base64::engine::general_purpose::STANDARD.encode(body.to_string());
    let malformed = push_raw_body(
        &mut c,
        "diagnostics.noop",
        &encode(json!([[1], {}, {"callbacks": "diagnostics.noop", "chain": null}])),
    );
    let chunks = json!({"task": "celery.chunks", "args": [], "subtask_type": "chunks",
        "kwargs": {"task": {"task": "diagnostics.add"}, "it": [[1, 1]], "n": 1},
        "options": {"task_id": "next-step"}, "immutable": false});
    let unsendable = push_raw_body(
        &mut c,
        "diagnostics.noop",
        &encode(json!([[2], {}, {"callbacks": null, "chain": [chunks], "chord": null}])),
    );
    let w = start(&redis, config(|_| {}), 2, LEASE).await;
    let r = results(&redis).await;
    let (state, meta) = wait_state(&r, &unsendable, 10).await;
    assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(2)), "the task itself ran");
    let (state, meta) = wait_state(&r, "next-step", 10).await;
    let result = &meta["result"];
    assert_eq!(state, "FAILURE");
    assert_eq!(result["exc_type"], "WorkflowError");
    assert!(result["exc_message"][0].as_str().unwrap().contains("\"chunks\""), "{result}");
    let w = w.stop().await;
    assert_eq!(w.stats.poisoned.load(std::sync::atomic::Ordering::Relaxed), 1);
    let b = broker(&redis, LEASE).await;
    let letters = client::dlq_list(&b, "default", 10).await.unwrap();
    let kept = |id: &str| letters.iter().find(|l| l["message"].as_str().unwrap().contains(id));
    let poison = kept(&malformed).unwrap();
    assert_eq!(poison["reason"], "bad_workflow", "{letters:?}");
    assert!(poison["error"].as_str().unwrap().contains("callbacks is not a list"), "{poison}");
    assert_eq!(kept(&unsendable).unwrap()["reason"], "workflow", "{letters:?}");
}

/// A Celery message for `task` whose (base64) body is `body`, pushed raw onto `default`.
fn push_raw_body(c: &mut redis::Connection, task: &str, body: &str) -> String {
    let (id, envelope) =
        protocol::encode(task, &json!([]), &json!({}), "default", &NewTask::default());
    let mut env: Value = serde_json::from_str(&envelope).unwrap();
    env["body"] = json!(body);
    let _: () = c.lpush("default", env.to_string()).unwrap();
    id
}

/// Every poison kind a mutated message can be, so the randomized tests show they reach them.
const POISON_KINDS: &[&str] = &[
    "bad_json",
    "content_type",
    "bad_base64",
    "unknown_protocol",
    "bad_body",
    "bad_workflow",
    "bad_header",
];

/// Thousands of mutations of a real Celery message through the decoder: each one either decodes
/// to a task whose retry decodes again, or is poison with a reason. None panics.
#[test]
fn the_decoder_turns_every_mutated_celery_message_into_a_task_or_a_reason() {
    use celeriac_tests::mutate::{Rng, celery_message, mutate};
    const SEED: u64 = 0x00c3_1e71_ac00_0018;
    let mut rng = Rng::new(SEED);
    let template =
        celery_message("tasks.add", "11111111-2222-3333-4444-555555555555", &json!([2, 3]));
    let mut kinds = std::collections::BTreeMap::<&str, u32>::new();
    let mut tasks = 0;
    for i in 0..10_000 {
        let bytes = mutate(&mut rng, &template);
        let shown = || String::from_utf8_lossy(&bytes[..bytes.len().min(400)]).into_owned();
        let decoded = std::panic::catch_unwind(|| protocol::decode(&bytes)).unwrap_or_else(|_| {
            panic!("decoding mutant {i} of seed {SEED:#x} panicked: {}", shown())
        });
        let m = match decoded {
            Err(poison) => {
                assert!(poison.to_string().len() > poison.kind().len(), "{poison:?}");
                *kinds.entry(poison.kind()).or_default() += 1;
                continue;
            }
            Ok(m) => m,
        };
        tasks += 1;
        assert!(!m.id.is_empty() && !m.task.is_empty(), "mutant {i}: {}", shown());
        assert!(m.args.starts_with('[') && m.kwargs.starts_with('{'), "mutant {i}: {}", shown());
        let now = chrono::Utc::now();
        let retry = protocol::decode(m.retry_envelope(now).as_bytes()).unwrap_or_else(|p| {
            panic!("the retry of mutant {i} does not decode ({p}): {}", shown())
        });
        assert_eq!(
            (&retry.id, &retry.task, &retry.args, &retry.kwargs, retry.retries),
            (&m.id, &m.task, &m.args, &m.kwargs, m.retries.saturating_add(1)),
            "mutant {i}: {}",
            shown()
        );
    }
    // The mutations must reach both sides, and every kind of poison, or this test proves little.
    assert!(tasks > 1_000, "only {tasks} of 10000 mutants decoded: {kinds:?}");
    for kind in POISON_KINDS {
        assert!(kinds.get(kind).is_some_and(|n| *n >= 20), "too few {kind}: {kinds:?}");
    }
}

/// A few hundred mutated messages shuffled among valid ones through a real worker: every valid
/// one succeeds, every mutant that still decodes to a known task runs (or waits for its ETA),
/// and every other one is in the dead-letter list, byte for byte, with a reason. Nothing is left
/// leased or unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_mutated_messages_runs_the_valid_and_dead_letters_the_rest() {
    use celeriac::broker::Broker as _;
    use celeriac_tests::mutate::{Rng, celery_message, mutate};
    use std::sync::atomic::Ordering::Relaxed;
    const SEED: u64 = 0x00c3_1e71_ac00_f100;
    let mut rng = Rng::new(SEED);
    let redis = RedisServer::start();
    let mut c = redis.client(0);
    let fresh_id = || uuid::Uuid::new_v4().to_string();
    let mut valid = Vec::new();
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for i in 0..200 {
        let id = fresh_id();
        messages
            .push(celery_message("diagnostics.noop", &id, &json!([i])).to_string().into_bytes());
        valid.push(id);
    }
    let (mut dead, mut scheduled, mut run) = (Vec::new(), 0u64, 0u64);
    let far = chrono::Utc::now() + chrono::Duration::hours(1);
    for i in 0..300 {
        let bytes = mutate(&mut rng, &celery_message("diagnostics.noop", &fresh_id(), &json!([i])));
        match protocol::decode(&bytes) {
            Ok(m) if m.task == "diagnostics.noop" && m.due_later(far).is_some() => scheduled += 1,
            Ok(m) if m.task == "diagnostics.noop" => run += 1,
            // Poison, or a task nobody serves.
            _ => dead.push(bytes.clone()),
        }
        messages.push(bytes);
    }
    eprintln!("mutants: {} unrunnable, {run} runnable, {scheduled} far in the future", dead.len());
    assert!(dead.len() >= 100 && run >= 30, "the mutations must reach both kinds");
    for i in (1..messages.len()).rev() {
        messages.swap(i, rng.below(i + 1));
    }
    for m in &messages {
        let _: () = c.lpush("default", m.as_slice()).unwrap();
    }

    let cfg = config(|c| {
        c.tasks.insert("diagnostics.noop".into(), settings(|s| s.max_retries = Some(0)));
    });
    let w = start(&redis, cfg, 4, LEASE).await;
    let r = results(&redis).await;
    for id in &valid {
        assert_eq!(wait_state(&r, id, 60).await.0, "SUCCESS", "valid message {id}");
    }
    let settled = |s: &celeriac::worker::Stats| {
        [&s.succeeded, &s.failed, &s.revoked, &s.poisoned]
            .iter()
            .map(|n| n.load(Relaxed))
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while settled(&w.worker().stats) < messages.len() as u64 - scheduled {
        assert!(
            Instant::now() < deadline,
            "only {} settled: {}",
            settled(&w.worker().stats),
            w.worker().stats
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let w = w.stop().await;

    let b = broker(&redis, LEASE).await;
    assert_eq!(b.scheduled_len().await.unwrap(), scheduled, "mutants with a far ETA wait for it");
    assert_eq!(c.llen::<_, u64>("default").unwrap(), 0);
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0, "nothing left unacked");
    assert_eq!(c.zcard::<_, u64>("celeriac:leases").unwrap(), 0, "nothing left leased");
    let s = &w.stats;
    assert_eq!(s.poisoned.load(Relaxed), dead.len() as u64, "{s}");
    assert_eq!(
        s.succeeded.load(Relaxed) + s.failed.load(Relaxed) + s.revoked.load(Relaxed),
        valid.len() as u64 + run,
        "{s}"
    );

    // Unrunnable messages are dead-lettered unrun; runs that failed (no retries here) follow
    // them with the task's error. Nothing else, and no host panic, may be there.
    let (mut letters, mut failed_runs) = (Vec::new(), 0);
    for record in b.dlq_records("default", 10_000).await.unwrap() {
        let record: Value = serde_json::from_str(&record).unwrap();
        assert!(!record["error"].as_str().unwrap().is_empty(), "{record}");
        let message = record["message"].as_str().unwrap();
        let message = match record["message_encoding"].as_str() {
            Some("base64") => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(message).unwrap()
            }
            _ => message.as_bytes().to_vec(),
        };
        match record["reason"].as_str().unwrap() {
            "failed" => {
                assert_eq!(protocol::decode(&message).unwrap().task, "diagnostics.noop");
                failed_runs += 1;
            }
            reason if POISON_KINDS.contains(&reason) || reason == "unknown_task" => {
                letters.push(message)
            }
            other => panic!("dead-lettered as {other}: {record}"),
        }
    }
    assert_eq!(failed_runs, s.failed.load(Relaxed), "{s}");
    letters.sort();
    dead.sort();
    assert!(letters == dead, "{} dead letters for {} bad messages", letters.len(), dead.len());
}
