//! Interop with the real Python `celery` package: Python producers and celeriac workers, and a
//! celeriac producer with a Python worker, on one Redis. `scripts/test` makes the virtualenv
//! (`target/interop-venv`, celery[redis] from PyPI).

use crate::worker::{config, settings, start};
use celeriac::units::HumanDuration;
use celeriac_tests::{RedisServer, celeriac_binary, repo_root};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub(crate) fn venv_python() -> PathBuf {
    let python = repo_root().join("target/interop-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: scripts/test creates it (pip install celery[redis])",
        python.display()
    );
    python
}

/// Runs the Python Celery client against `redis` (off the async threads: it blocks).
async fn python(redis: &RedisServer, args: Vec<String>) -> Value {
    let (broker, backend) = (redis.url(0), redis.url(1));
    tokio::task::spawn_blocking(move || {
        let out = Command::new(venv_python())
            .arg(repo_root().join("tests/interop/celery_client.py"))
            .args(&args)
            .env("CELERY_BROKER_URL", broker)
            .env("CELERY_RESULT_BACKEND", backend)
            .output()
            .expect("run the Python Celery client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.trim().lines().last().unwrap_or("").to_string();
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    })
    .await
    .unwrap()
}

/// Runs the Python Celery client (`celery_client.py`) with `env` (its broker and backend URLs,
/// transport options) and `stdin`; returns the JSON of its last line. It blocks: call it from
/// a plain test or `spawn_blocking`.
pub(crate) fn celery_client(env: &[(&str, String)], args: &[&str], stdin: Option<String>) -> Value {
    use std::io::Write as _;
    let mut child = Command::new(venv_python())
        .arg(repo_root().join("tests/interop/celery_client.py"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Python Celery client");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.trim().lines().last().unwrap_or("").to_string();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A real Python Celery worker on queue `default`, serving `diagnostics.noop`.
pub(crate) fn python_worker(redis: &RedisServer) -> std::process::Child {
    python_worker_on(redis, "default")
}

/// A Python Celery worker consuming `queues` (comma-separated).
pub(crate) fn python_worker_on(redis: &RedisServer, queues: &str) -> std::process::Child {
    Command::new(repo_root().join("target/interop-venv/bin/celery"))
        .args([
            "-A",
            "celery_client",
            "worker",
            "-Q",
            queues,
            "--pool=solo",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=warning",
        ])
        .current_dir(repo_root().join("tests/interop"))
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a Python Celery worker")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_send_task_gets_results_from_a_celeriac_worker() {
    let redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 4, Duration::from_secs(30)).await;
    // Args and kwargs.
    let got = python(
        &redis,
        strings(&[
            "get",
            "diagnostics.noop",
            "[]",
            r#"{"x": {"nested": [1, 2.5, "three", null]}}"#,
        ]),
    )
    .await;
    assert_eq!(got["result"], json!({"nested": [1, 2.5, "three", null]}), "{got}");
    // Priority: lands in kombu's priority sub-list and is still served.
    let got =
        python(&redis, strings(&["get", "diagnostics.noop", "[7]", "{}", "default", "5"])).await;
    assert_eq!(got["result"], 7, "{got}");
    // Countdown: Celery turns it into an ETA; celeriac holds it back until then.
    let got = python(
        &redis,
        strings(&["get", "diagnostics.noop", r#"["later"]"#, "{}", "default", "-", "1.0"]),
    )
    .await;
    assert_eq!(got["result"], "later", "{got}");
    assert!(got["elapsed"].as_f64().unwrap() >= 1.0, "ran before its countdown: {got}");
    // Positional arguments through a task with several parameters, routed to another queue.
    let got = python(
        &redis,
        strings(&[
            "get",
            "summarize.summarize_session",
            "[]",
            r#"{"text": "One. Two.", "max_chars": 4}"#,
        ]),
    )
    .await;
    assert_eq!(got["result"]["summary"], "One.", "{got}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_raises_in_python_with_its_type_and_message() {
    let redis = RedisServer::start();
    let cfg = config(|c| {
        let limit = Some(HumanDuration(Duration::from_millis(300)));
        c.tasks.insert("diagnostics.spin".into(), settings(|s| s.hard_time_limit = limit));
    });
    let w = start(&redis, cfg, 2, Duration::from_secs(30)).await;
    let got = python(&redis, strings(&["get", "diagnostics.spin", "[5000]", "{}"])).await;
    assert!(
        got["exc_type"] == "TimeLimitExceeded" || got["exc_type"] == "SoftTimeLimitExceeded",
        "{got}"
    );
    // A call with a missing argument raises TypeError, as it would for a Python task.
    let got = python(&redis, strings(&["get", "diagnostics.noop", "[]", "{}"])).await;
    assert_eq!(got["exc_type"], "TypeError", "{got}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sees_started_and_retry_states_along_the_way() {
    let redis = RedisServer::start();
    let cfg = config(|c| {
        c.tasks.insert(
            "diagnostics.flaky".into(),
            settings(|s| {
                s.retry_backoff = Some(HumanDuration(Duration::from_millis(400)));
                s.retry_jitter = Some(false);
            }),
        );
    });
    let w = start(&redis, cfg, 2, Duration::from_secs(30)).await;
    let got =
        python(&redis, strings(&["states", "diagnostics.sleep", "[800]", "default", "20"])).await;
    let states: Vec<&str> =
        got["states"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(states.contains(&"STARTED") && states.last() == Some(&"SUCCESS"), "{states:?}");
    let got =
        python(&redis, strings(&["states", "diagnostics.flaky", "[3]", "default", "20"])).await;
    let states: Vec<&str> =
        got["states"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(states.contains(&"RETRY") && states.last() == Some(&"SUCCESS"), "{states:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_runs_what_celeriac_enqueue_sent() {
    let redis = RedisServer::start();
    let mut worker = python_worker(&redis);
    let celeriac = |args: &[&str]| {
        Command::new(celeriac_binary())
            .args(args)
            .current_dir(repo_root())
            .env("CELERY_BROKER_URL", redis.url(0))
            .env("CELERY_RESULT_BACKEND", redis.url(1))
            .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
            .output()
            .unwrap()
    };
    let sent = celeriac(&[
        "enqueue",
        "diagnostics.noop",
        "--args",
        r#"[{"from": "celeriac"}]"#,
        "--queue",
        "default",
    ]);
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let id = String::from_utf8_lossy(&sent.stdout).trim().to_string();
    let status = celeriac(&["status", &id, "--wait", "60s"]);
    let _ = worker.kill();
    let _ = worker.wait();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains("state:   SUCCESS"),
        "{stdout}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(stdout.contains(r#"result:  {"from":"celeriac"}"#), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_control_revoke_and_ping_reach_a_celeriac_worker() {
    let redis = RedisServer::start();
    let w = start(&redis, config(|_| {}), 2, Duration::from_secs(30)).await;
    let got = python(&redis, strings(&["ping"])).await;
    assert_eq!(got["replies"], json!([{"celeriac@test": {"ok": "pong"}}]), "{got}");
    let started = std::time::Instant::now();
    let got = python(&redis, strings(&["spin_then_revoke"])).await;
    assert_eq!(got["state"], "REVOKED", "{got}");
    assert_eq!(got["exc_type"], "TaskRevokedError", "{got}");
    assert!(started.elapsed() < Duration::from_secs(20), "the 30 s task was terminated");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_restores_what_a_dead_celeriac_worker_left_unacked() {
    use celeriac::broker::{Broker, BrokerOptions, RedisBroker};
    use celeriac::protocol::NewTask;
    use redis::Commands;
    let redis = RedisServer::start();
    let broker = RedisBroker::connect(&redis.url(0), BrokerOptions::default()).await.unwrap();
    let id = celeriac::client::enqueue(
        &broker,
        "diagnostics.noop",
        &json!(["rescued"]),
        &json!({}),
        "default",
        &NewTask::default(),
    )
    .await
    .unwrap();
    // A celeriac worker takes it and dies: the entry stays in kombu's unacked hash. Age it past
    // kombu's visibility timeout (1 h) so a Python worker considers it abandoned.
    let taken = broker.fetch(&["default".to_string()], 1, "dead.").await.unwrap();
    assert_eq!(taken.len(), 1);
    let mut c = redis.client(0);
    let _: () =
        c.zadd("unacked_index", &taken[0].tag, celeriac::broker::now_secs() - 4000.0).unwrap();
    let mut worker = python_worker(&redis);
    let results =
        celeriac::results::ResultBackend::connect(&redis.url(1), "", Duration::from_secs(60))
            .await
            .unwrap();
    let (state, meta) =
        celeriac::client::wait(&results, &id, Duration::from_secs(60)).await.unwrap();
    // Celery stores the result first and acks after it: give the ack its moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.hlen::<_, u64>("unacked").unwrap() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(state, "SUCCESS", "{meta:?}");
    assert_eq!(meta.unwrap()["result"], "rescued");
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0);
}

/// `celeriac revoke` broadcasts on the pidbox as Celery's `control.revoke` does, so running
/// Python workers hear it at once too (they keep revocations in memory only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celeriac_revoke_reaches_a_running_python_worker() {
    let redis = RedisServer::start();
    let mut worker = python_worker(&redis);
    let started = std::time::Instant::now();
    while python(&redis, strings(&["ping"])).await["replies"].as_array().is_none_or(Vec::is_empty) {
        assert!(started.elapsed() < Duration::from_secs(60), "the Python worker never answered");
    }
    let id = uuid::Uuid::new_v4().to_string();
    let out = Command::new(celeriac_binary())
        .args(["revoke", &id])
        .current_dir(repo_root())
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = python(&redis, strings(&["revoked"])).await;
    let _ = worker.kill();
    let _ = worker.wait();
    let ids: Vec<&Value> = got["replies"].as_object().unwrap().values().collect();
    assert_eq!(ids.len(), 1, "{got}");
    assert!(ids[0].as_array().unwrap().contains(&json!(id)), "{got}");
}
