//! Celery's canvas (chain, link, link_error, group) sent by the real Python client and followed
//! by celeriac workers: `tests/interop/canvas.py` checks every `.get()`.

use crate::faults::worker_command;
use crate::interop::venv_python;
use celeriac_tests::{RedisServer, repo_root};
use std::process::{Command, Stdio};

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
