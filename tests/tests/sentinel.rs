//! Sentinel failover, for real: a primary, a replica and three `redis-sentinel` processes, a
//! worker mid-run on the `sentinel://` URL, and `SENTINEL FAILOVER`. The worker must carry on
//! against the new primary, every task must end with its result, and a Python client on the
//! same URL must read them.

use crate::interop::celery_client;
use celeriac_tests::sentinel::{MASTER_NAME, SENTINEL_PASSWORD, SentinelFleet};
use celeriac_tests::{Reaped, celeriac_binary, repo_root, test_cache_dir};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TASKS: usize = 300;

#[test]
fn a_worker_follows_a_sentinel_failover_and_every_task_ends_with_its_result() {
    let mut fleet = SentinelFleet::start();
    // The sentinels have a password of their own, and each watches two others: kombu's
    // sentinel_kwargs and min_other_sentinels, used for real.
    let options = json!({
        "master_name": MASTER_NAME,
        "sentinel_kwargs": {"password": SENTINEL_PASSWORD},
        "min_other_sentinels": 2,
    })
    .to_string();
    let env = [
        ("CELERY_BROKER_URL", fleet.url(0)),
        ("CELERY_RESULT_BACKEND", fleet.url(1)),
        ("CELERY_BROKER_TRANSPORT_OPTIONS", options.clone()),
        ("CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS", options),
    ];
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = Reaped(
        Command::new(celeriac_binary())
            // A short lease: a task whose ack the old primary took but never passed on comes
            // back from the new primary's unacked set within seconds.
            .args(["worker", "-Q", "default", "-c", "4", "--lease", "3s"])
            .current_dir(repo_root())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CELERIAC_CACHE", test_cache_dir())
            .env("CELERIAC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );

    // The Python client queues the work through Sentinel; the test waits until the replica has
    // every message, so the failover itself loses none of what was sent.
    let sent =
        celery_client(&env, &["send_many", "diagnostics.sleep", "[20]", &TASKS.to_string()], None);
    let ids: Vec<String> = serde_json::from_value(sent["ids"].clone()).unwrap();
    assert_eq!(ids.len(), TASKS);
    let first = fleet.primary_port();
    let mut primary = fleet.primary(0);
    let _: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut primary).unwrap();

    // Fail over once the worker is mid-run.
    let mut results = fleet.primary(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: Vec<String> = redis::Commands::keys(&mut results, "celery-task-meta-*").unwrap();
        if done.len() >= TASKS / 5 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker did not start: {}", log_text(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = fleet.failover();
    assert_ne!(first, second);
    let failed_over = chrono::Utc::now();

    // New work reaches the worker on the new primary within seconds: timed from the failover
    // to the worker's own log line for the task (the Python client's start-up is not the
    // worker's doing).
    let got = celery_client(&env, &["get", "diagnostics.noop", "[\"after\"]", "{}"], None);
    assert_eq!(got["result"], "after", "{got}\n{}", log_text(&log));
    let id = got["id"].as_str().unwrap();
    let text = log_text(&log);
    let line = text.lines().find(|l| l.contains(id) && l.contains("task finished")).unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next().unwrap()).unwrap();
    let carried_on = (at.with_timezone(&chrono::Utc) - failed_over).to_std().unwrap_or_default();
    assert!(carried_on < Duration::from_secs(10), "took {carried_on:?}\n{text}");
    // Remote control reaches the worker on the new primary: its pidbox subscription moved too.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = celery_client(&env, &["ping"], None);
        if got["replies"].as_array().is_some_and(|r| r.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "no ping reply after the failover: {got}");
    }

    // Every task of the run ends with its result, read by Python through Sentinel.
    let got = celery_client(&env, &["collect", "60"], Some(serde_json::to_string(&ids).unwrap()));
    let results = got["results"].as_object().unwrap();
    assert_eq!(results.len(), TASKS);
    // The sleep task returns the milliseconds it slept.
    let bad: Vec<&Value> =
        results.values().filter(|v| v.as_u64().is_none_or(|ms| ms < 20)).collect();
    assert!(bad.is_empty(), "{bad:?}");

    let text = log_text(&log);
    assert!(text.contains("reconnected to the primary"), "{text}");
    assert!(worker.try_wait().unwrap().is_none(), "the worker exited: {text}");
    assert!(fleet.sentinels_alive());
    eprintln!("the worker ran new work {carried_on:?} after the failover");
}

fn log_text(log: &tempfile::NamedTempFile) -> String {
    std::fs::read_to_string(log.path()).unwrap_or_default()
}
