//! Celery's canvas (chain, link, link_error, group) sent by the real Python client and followed
//! by celeriac workers: `tests/interop/canvas.py` checks every `.get()`.

use crate::faults::worker_command;
use crate::interop::venv_python;
use celeriac_tests::{RedisServer, repo_root};
use redis::Commands as _;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `tests/interop/canvas.py` against two celeriac workers sharing `default`, so steps of one
/// workflow land on either; shows the workers' logs when it fails.
#[test]
fn python_chains_links_and_groups_run_on_celeriac_workers() {
    let redis = RedisServer::start();
    let logs = tempfile::tempdir().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let log = std::fs::File::create(logs.path().join(format!("w{i}.log"))).unwrap();
            worker_command(
                &redis,
                &["-n", &format!("celeriac@canvas{i}"), "-Q", "default", "-c", "4"],
            )
            .env("CELERIAC_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
        })
        .collect();
    let out = Command::new(venv_python())
        .arg(repo_root().join("tests/interop/canvas.py"))
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .output()
        .unwrap();
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !(out.status.success() && stdout.trim() == "ok") {
        let logs: String = (0..2)
            .map(|i| std::fs::read_to_string(logs.path().join(format!("w{i}.log"))).unwrap())
            .collect();
        panic!("{stdout}\n{stderr}\nworker logs:\n{logs}");
    }
}

/// Runs `tests/interop/chord_fleet.py` with `args`; returns its stdout, or fails with its output.
fn fleet(redis: &RedisServer, args: &[&str]) -> String {
    let out = Command::new(venv_python())
        .arg(repo_root().join("tests/interop/chord_fleet.py"))
        .args(args)
        .current_dir(repo_root().join("tests/interop"))
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "chord_fleet.py {args:?}: {stdout}\n{stderr}");
    stdout.into_owned()
}

/// A celeriac worker logging one line per task to `log`.
fn logged_worker(redis: &RedisServer, args: &[&str], log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    worker_command(redis, args)
        .env("CELERIAC_LOG", "info")
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap()
}

/// How many times the chord body (`diagnostics.tsum`) finished, by the workers' task lines.
fn body_runs(logs: &[PathBuf]) -> usize {
    logs.iter()
        .map(|l| std::fs::read_to_string(l).unwrap())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.contains("diagnostics.tsum") && l.contains("task finished"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .count()
}

/// Chords whose parts are split between a Python Celery 5.7 worker and a celeriac worker, each
/// side completing half of them: every body runs once, with every part's result.
#[test]
fn chords_shared_by_python_and_celeriac_workers_run_each_body_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("celeriac.log");
    let mut python = crate::interop::python_worker_on(&redis, "py");
    let mut celeriac = logged_worker(&redis, &["-Q", "default,bodies", "-c", "4"], &log);
    let out = fleet(&redis, &["mixed", "8"]);
    for child in [&mut python, &mut celeriac] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(out.trim(), "ok");
    assert_eq!(body_runs(&[log]), 8, "one body run per chord");
}

/// A celeriac worker killed with SIGKILL while it runs a chord's last part: another worker runs
/// the part again, completes the chord, and the body runs once.
#[test]
fn a_chord_part_redelivered_after_a_kill_runs_the_body_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let args = ["-Q", "default", "-c", "4", "--lease", "1s"];
    let mut a = logged_worker(&redis, &args, &logs[0]);
    let sent: Value = serde_json::from_str(&fleet(&redis, &["send"])).unwrap();
    let slow = sent["slow"].as_str().unwrap();
    let mut results = redis.client(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let meta: Option<String> = results.get(format!("celery-task-meta-{slow}")).unwrap();
        // STARTED, then a PROGRESS report every 100 ms: either says it runs.
        if meta.is_some_and(|m| m.contains("STARTED") || m.contains("PROGRESS")) {
            break;
        }
        assert!(Instant::now() < deadline, "the slow part never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill().unwrap(); // SIGKILL, mid-part
    a.wait().unwrap();
    let mut b = logged_worker(&redis, &args, &logs[1]);
    let got: Value =
        serde_json::from_str(&fleet(&redis, &["wait", sent["body"].as_str().unwrap()])).unwrap();
    let _ = b.kill();
    let _ = b.wait();
    let total = got["result"].as_i64().unwrap();
    assert!((3006..4000).contains(&total), "2 + 4 + the slow part's 3000 ms: {total}");
    assert_eq!(body_runs(&logs), 1, "the body ran once");
}
