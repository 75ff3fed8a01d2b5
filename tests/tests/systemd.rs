//! The worker under systemd's notify protocol, through a real Unix datagram socket: READY=1 only
//! once it consumes, a status line, a watchdog fed only while Redis answers, STOPPING=1 with the
//! grace period.

use crate::faults::{enqueue, sigterm, worker_command};
use crate::worker::broker;
use celeriac_tests::RedisServer;
use serde_json::json;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

/// The notify socket a test listens on, as systemd's manager would.
struct Manager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    /// Every datagram with when it came.
    seen: Vec<(Instant, String)>,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Manager { socket, path, _dir: dir, seen: Vec::new() }
    }

    /// Reads datagrams until one satisfies `wanted` (and returns it) or `within` passes.
    fn until(&mut self, within: Duration, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = self.socket.recv(&mut buf) else { return None };
            let message = String::from_utf8(buf[..n].to_vec()).unwrap();
            self.seen.push((Instant::now(), message.clone()));
            if wanted(&message) {
                return Some(message);
            }
        }
    }

    /// The WATCHDOG=1 datagrams that came within `window` from now.
    fn watchdogs_for(&mut self, window: Duration) -> Vec<Instant> {
        let from = self.seen.len();
        let _ = self.until(window, |_| false);
        self.seen[from..].iter().filter(|(_, m)| has(m, "WATCHDOG=1")).map(|(t, _)| *t).collect()
    }
}

fn has(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn status(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_tells_systemd_it_is_ready_alive_and_stopping() {
    let redis = RedisServer::start();
    let mut manager = Manager::new();
    let mut worker = worker_command(&redis, &["-Q", "default", "-c", "2", "--grace", "20s"])
        .env("NOTIFY_SOCKET", &manager.path)
        .env("WATCHDOG_USEC", "2000000")
        .spawn()
        .map(celeriac_tests::Reaped)
        .unwrap();

    // READY=1 comes once the worker consumes: its queue is declared by then.
    let ready = manager
        .until(Duration::from_secs(60), |m| has(m, "READY=1"))
        .expect("no READY=1 within 60 s");
    let mut c = redis.client(0);
    let bindings: Vec<String> = redis::Commands::smembers(&mut c, "_kombu.binding.celery").unwrap();
    assert!(
        bindings.iter().any(|b| b.starts_with("default")),
        "READY=1 before the queue was declared"
    );
    assert_eq!(status(&ready), Some("0 running, 0 queued on default"), "{ready:?}");
    assert!(manager.seen.iter().all(|(_, m)| !has(m, "WATCHDOG=1")), "watchdog before READY");

    // Fed at half the 2 s timeout while all is well.
    let fed = manager.watchdogs_for(Duration::from_millis(3500));
    assert!(fed.len() >= 3, "{:?}", manager.seen);
    assert!(fed.windows(2).all(|w| w[1] - w[0] < Duration::from_millis(1500)), "{fed:?}");

    // The status line follows the work.
    let b = broker(&redis, Duration::from_secs(30)).await;
    let first = enqueue(&b, "diagnostics.sleep", json!([1500]), "default").await;
    manager
        .until(Duration::from_secs(10), |m| status(m) == Some("1 running, 0 queued on default"))
        .expect("no status with the running task");

    // Redis stops answering: the worker is not alive, and the watchdog starves (systemd would
    // restart it) until Redis answers again.
    let redis_pid = redis.pid().unwrap();
    signal(redis_pid, "-STOP");
    let starving = manager
        .until(Duration::from_secs(5), |m| status(m).is_some_and(|s| s.starts_with("not alive")))
        .map(|m| status(&m).unwrap().to_string());
    let starved = manager.watchdogs_for(Duration::from_secs(3));
    signal(redis_pid, "-CONT");
    let starving = starving.expect("no 'not alive' status while Redis was stopped");
    assert!(starving.contains("Redis"), "{starving}");
    assert!(starved.is_empty(), "watchdog fed while Redis did not answer: {:?}", manager.seen);
    manager
        .until(Duration::from_secs(10), |m| has(m, "WATCHDOG=1"))
        .expect("the watchdog was not fed again once Redis answered");

    // SIGTERM with a task running: STOPPING=1, and systemd is asked to wait the grace period
    // (20 s) plus the settling margin; the task finishes and the worker exits cleanly.
    let mut results = redis.client(1);
    let finished = |results: &mut redis::Connection, id: &str| {
        let meta: Option<String> =
            redis::Commands::get(results, format!("celery-task-meta-{id}")).unwrap();
        meta.is_some_and(|m| m.contains("SUCCESS"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !finished(&mut results, &first) {
        assert!(Instant::now() < deadline, "the first task never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = enqueue(&b, "diagnostics.sleep", json!([2000]), "default").await;
    manager
        .until(Duration::from_secs(10), |m| status(m).is_some_and(|s| s.starts_with("1 running")))
        .expect("the last task did not start");
    sigterm(&worker);
    let stopping = manager
        .until(Duration::from_secs(5), |m| has(m, "STOPPING=1"))
        .expect("no STOPPING=1 after SIGTERM");
    assert!(has(&stopping, "EXTEND_TIMEOUT_USEC=30000000"), "{stopping:?}");
    assert_eq!(status(&stopping), Some("stopping: draining 1 running task(s)"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the worker did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
    assert!(finished(&mut results, &last), "the draining task did not finish");
}

/// `NOTIFY_SOCKET` names the socket of a manager that is gone: the worker logs it and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_notify_socket_does_not_stop_the_worker() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut worker = worker_command(&redis, &["-Q", "default", "-c", "1"])
        .env("NOTIFY_SOCKET", dir.path().join("gone.sock"))
        .env("WATCHDOG_USEC", "2000000")
        .spawn()
        .map(celeriac_tests::Reaped)
        .unwrap();
    let b = broker(&redis, Duration::from_secs(30)).await;
    let id = enqueue(&b, "diagnostics.noop", json!([1]), "default").await;
    let mut results = redis.client(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let meta: Option<String> =
            redis::Commands::get(&mut results, format!("celery-task-meta-{id}")).unwrap();
        if meta.is_some_and(|m| m.contains("SUCCESS")) {
            break;
        }
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited");
        assert!(Instant::now() < deadline, "the task did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(&worker);
    assert!(worker.wait().unwrap().success());
}

/// `celeriac beat` under systemd: READY=1, a status saying whether it leads and what it fired,
/// the watchdog fed only while its ticks reach Redis, and STOPPING=1 on SIGTERM.
#[test]
fn a_beat_feeds_its_watchdog_only_while_its_ticks_reach_redis() {
    let redis = RedisServer::start();
    let mut manager = Manager::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("beat.toml");
    let entry = "[beat.\"every-second\"]\ntask = \"diagnostics.noop\"\nevery = \"1s\"\n";
    std::fs::write(&config, format!("modules = {:?}\n{entry}", celeriac::BUILT_TASKS_DIR)).unwrap();
    let mut beat = Command::new(celeriac_tests::celeriac_binary())
        .args(["--config", config.to_str().unwrap(), "beat"])
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
        .env("NOTIFY_SOCKET", &manager.path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(celeriac_tests::Reaped)
        .unwrap();
    let ready = manager.until(Duration::from_secs(60), |m| has(m, "READY=1"));
    assert!(ready.is_some(), "no READY=1: {:?}", manager.seen);
    let leading = manager.until(Duration::from_secs(5), |m| {
        status(m).is_some_and(|s| s.starts_with("1 entries; leading"))
    });
    assert!(leading.is_some(), "{:?}", manager.seen);
    assert!(manager.watchdogs_for(Duration::from_millis(2500)).len() >= 2, "{:?}", manager.seen);

    let redis_pid = redis.pid().unwrap();
    signal(redis_pid, "-STOP");
    let starving = manager
        .until(Duration::from_secs(6), |m| status(m).is_some_and(|s| s.starts_with("not alive")));
    let starved = manager.watchdogs_for(Duration::from_secs(3));
    signal(redis_pid, "-CONT");
    assert!(starving.is_some_and(|m| m.contains("no tick reached Redis")), "{:?}", manager.seen);
    assert!(starved.is_empty(), "watchdog fed while Redis did not answer: {:?}", manager.seen);
    assert!(manager.until(Duration::from_secs(10), |m| has(m, "WATCHDOG=1")).is_some());

    signal(beat.id(), "-TERM");
    assert!(manager.until(Duration::from_secs(5), |m| has(m, "STOPPING=1")).is_some());
    assert!(beat.wait().unwrap().success());
}

/// The units in `deploy/` as systemd reads them, offline: `systemd-analyze verify` (with the
/// binary path pointed at the built celeriac), an exposure of at most 2.0 from `systemd-analyze
/// security`, and the sysusers and tmpfiles snippets applied to an empty root.
#[test]
fn the_deploy_units_pass_systemd_analyze_and_their_snippets_apply() {
    let deploy = celeriac_tests::repo_root().join("deploy");
    let dir = tempfile::tempdir().unwrap();
    let binary = celeriac_tests::celeriac_binary();
    let run = |command: &mut Command| {
        let out = command.output().expect("systemd's tools are needed: apt-get install systemd");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{command:?}: {text}");
        text
    };
    for (unit, instance) in [
        ("celeriac-worker@.service", "celeriac-worker@high.service"),
        ("celeriac-beat.service", "celeriac-beat.service"),
    ] {
        let text = std::fs::read_to_string(deploy.join(unit)).unwrap();
        assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{unit}");
        let mdwe = text.lines().any(|l| l.trim_start().starts_with("MemoryDenyWriteExecute"));
        assert!(!mdwe, "{unit}: wasmtime writes the machine code it compiles");
        let local = dir.path().join(instance);
        std::fs::write(&local, text.replace("/usr/bin/celeriac", binary.to_str().unwrap()))
            .unwrap();
        let verified = run(Command::new("systemd-analyze").arg("verify").arg(&local));
        assert!(verified.trim().is_empty(), "{unit}: {verified}");
        let exposure = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(&local));
        assert!(exposure.contains("Overall exposure level"), "{exposure}");
    }
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let root_flag = format!("--root={}", root.display());
    run(Command::new("systemd-sysusers")
        .arg(&root_flag)
        .arg(deploy.join("celeriac.sysusers.conf")));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains("celeriac:x:"), "{passwd}");
    run(Command::new("systemd-tmpfiles")
        .args([&root_flag, "--create"])
        .arg(deploy.join("celeriac.tmpfiles.conf")));
    assert!(root.join("var/lib/celeriac/modules").is_dir());
    assert!(root.join("var/cache/celeriac").is_dir());
}
