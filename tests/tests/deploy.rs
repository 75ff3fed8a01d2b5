//! A running worker's modules and configuration change under load: a module replaced while 200
//! tasks run, a broken replacement refused, a removed module no longer fetched, SIGHUP's
//! configuration reload and an invalid one refused. The worker is the real binary; the two
//! versions of `deploy.wasm` come from `tests/fixtures/deploy` (target/fixtures/deploy).

use crate::faults::{enqueue, sigterm, worker_command};
use crate::worker::broker;
use celeriac::broker::RedisBroker;
use celeriac_tests::{Reaped, RedisServer};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `v1.wasm` or `v2.wasm` of the deploy fixture.
fn fixture(name: &str) -> PathBuf {
    Path::new(celeriac::BUILT_FIXTURES_DIR).join("deploy").join(name)
}

/// Puts `bytes` in place as `dir/deploy.wasm` in one rename, as a deploy should.
fn deploy(dir: &Path, bytes: &[u8]) {
    let tmp = dir.join("deploy.wasm.partial");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join("deploy.wasm")).unwrap();
}

/// A modules folder with v1 as `deploy.wasm`, and a configuration for it.
struct Site {
    dir: tempfile::TempDir,
    modules: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Site {
    fn new(extra_config: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("modules");
        std::fs::create_dir(&modules).unwrap();
        deploy(&modules, &std::fs::read(fixture("v1.wasm")).unwrap());
        let config = dir.path().join("celeriac.toml");
        let log = dir.path().join("worker.log");
        let site = Site { dir, modules, config, log };
        site.write_config(extra_config);
        site
    }

    fn write_config(&self, extra: &str) {
        let text = format!("modules = {:?}\n{extra}", self.modules);
        let tmp = self.dir.path().join("celeriac.toml.partial");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// The worker, without -Q: it consumes the queues its tasks are routed to. Its HTTP server
    /// listens on `http`.
    fn worker(&self, redis: &RedisServer, slots: &str, http: u16) -> Reaped {
        let log = std::fs::File::create(&self.log).unwrap();
        let http = format!("127.0.0.1:{http}");
        let config = self.config.to_str().unwrap();
        worker_command(redis, &["--config", config, "-c", slots, "--http", &http])
            .env("CELERIAC_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .map(Reaped)
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The stored meta of `id`, once it is final.
async fn outcome(redis: &RedisServer, id: &str, within: Duration) -> Value {
    let mut c = redis.client(1);
    let deadline = Instant::now() + within;
    loop {
        let meta: Option<String> =
            redis::Commands::get(&mut c, format!("celery-task-meta-{id}")).unwrap();
        if let Some(meta) = meta.map(|m| serde_json::from_str::<Value>(&m).unwrap())
            && ["SUCCESS", "FAILURE"].contains(&meta["status"].as_str().unwrap_or(""))
        {
            return meta;
        }
        assert!(Instant::now() < deadline, "{id} did not finish within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The version `deploy.version` answers with now.
async fn version_now(redis: &RedisServer, b: &RedisBroker) -> String {
    let id = enqueue(b, "deploy.version", json!([]), "deploy").await;
    let meta = outcome(redis, &id, Duration::from_secs(30)).await;
    meta["result"].as_str().unwrap_or_else(|| panic!("{meta}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_replaced_under_load_finishes_every_task_and_refuses_a_broken_one() {
    let redis = RedisServer::start();
    let site = Site::new("");
    let port = celeriac_tests::free_port();
    let mut worker = site.worker(&redis, "8", port);
    let b = broker(&redis, Duration::from_secs(30)).await;
    assert_eq!(version_now(&redis, &b).await, "v1");

    // 200 tasks on 8 slots: 8 of 4 s run first, 192 short ones wait behind them. v2 lands while
    // the 8 run: they finish on v1, and everything that starts after the swap runs v2.
    let mut long = Vec::new();
    for _ in 0..8 {
        long.push(enqueue(&b, "deploy.work", json!([4000]), "deploy").await);
    }
    let mut short = Vec::new();
    for _ in 0..192 {
        short.push(enqueue(&b, "deploy.work", json!([20]), "deploy").await);
    }
    let mut r = redis.client(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &long {
        loop {
            let meta: Option<String> =
                redis::Commands::get(&mut r, format!("celery-task-meta-{id}")).unwrap();
            if meta.is_some_and(|m| m.contains("STARTED")) {
                break;
            }
            assert!(Instant::now() < deadline, "the long tasks did not all start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let v2 = std::fs::read(fixture("v2.wasm")).unwrap();
    deploy(&site.modules, &v2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !site.log().contains("replaced by") {
        assert!(Instant::now() < deadline, "the new version was not swapped in:\n{}", site.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still_running = long.iter().all(|id| {
        let meta: Option<String> =
            redis::Commands::get(&mut r, format!("celery-task-meta-{id}")).unwrap();
        meta.is_some_and(|m| m.contains("STARTED"))
    });
    assert!(still_running, "the swap came after the long tasks ended; it proves nothing");
    for id in &long {
        let meta = outcome(&redis, id, Duration::from_secs(60)).await;
        assert_eq!(
            (meta["status"].as_str(), meta["result"].as_str()),
            (Some("SUCCESS"), Some("v1"))
        );
    }
    for id in &short {
        let meta = outcome(&redis, id, Duration::from_secs(60)).await;
        assert_eq!(
            (meta["status"].as_str(), meta["result"].as_str()),
            (Some("SUCCESS"), Some("v2"))
        );
    }
    assert_eq!(version_now(&redis, &b).await, "v2");
    let log = site.log();
    let v1_hash = celeriac::runtime::module_version(&std::fs::read(fixture("v1.wasm")).unwrap());
    let v2_hash = celeriac::runtime::module_version(&v2);
    assert!(log.contains(&format!("deploy.wasm {v1_hash} replaced by {v2_hash}")), "{log}");
    assert!(
        log.contains(&format!("module_version=\"{v2_hash}\""))
            || log.contains(&format!("module_version={v2_hash}")),
        "{log}"
    );
    let replies = celeriac::control::ask(
        &b,
        "registered",
        json!({"taskinfoitems": ["module"]}),
        None,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let shown = serde_json::to_string(&replies).unwrap();
    assert!(shown.contains(&format!("deploy.version [module=deploy.wasm@{v2_hash}]")), "{shown}");
    let (_, metrics) = celeriac_tests::http(port, "GET", "/metrics", None).unwrap();
    let info = format!("celeriac_module_info{{module=\"deploy.wasm\",version=\"{v2_hash}\"}} 1");
    assert!(metrics.contains(&info), "{metrics}");
    assert!(!metrics.contains(&v1_hash), "{metrics}");
    let (_, types) = celeriac_tests::http(port, "GET", "/api/task/types", None).unwrap();
    assert!(types.contains("deploy.version"), "{types}");

    // A broken replacement while 50 tasks run: refused, logged, and v2 goes on serving them all.
    let mut during = Vec::new();
    for _ in 0..50 {
        during.push(enqueue(&b, "deploy.work", json!([40]), "deploy").await);
    }
    deploy(&site.modules, b"\0asm but not really a component");
    for id in &during {
        let meta = outcome(&redis, id, Duration::from_secs(60)).await;
        assert_eq!(
            (meta["status"].as_str(), meta["result"].as_str()),
            (Some("SUCCESS"), Some("v2"))
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !site.log().contains("module refused") {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", site.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = site.log();
    let refusal = log.lines().find(|l| l.contains("module refused")).unwrap();
    assert!(
        refusal.contains("deploy.wasm")
            && refusal.contains(&format!("version {v2_hash} goes on serving")),
        "{refusal}"
    );
    assert_eq!(version_now(&redis, &b).await, "v2");
    assert!(worker.try_wait().unwrap().is_none(), "the worker stopped");

    // The module removed: its queue is no longer consumed, and what is sent there waits.
    std::fs::remove_file(site.modules.join("deploy.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !site.log().contains("deploy.wasm") || !site.log().contains("removed") {
        assert!(Instant::now() < deadline, "the removal was not noticed:\n{}", site.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, types) = celeriac_tests::http(port, "GET", "/api/task/types", None).unwrap();
    assert!(!types.contains("deploy."), "a removed task is still served: {types}");
    let waiting = enqueue(&b, "deploy.version", json!([]), "deploy").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut c = redis.client(0);
    let queued: u64 = redis::Commands::llen(&mut c, "deploy").unwrap();
    assert_eq!(queued, 1, "a removed module's queue is still consumed:\n{}", site.log());
    let mut r = redis.client(1);
    let stored: Option<String> =
        redis::Commands::get(&mut r, format!("celery-task-meta-{waiting}")).unwrap();
    assert_eq!(stored, None);
    sigterm(&worker);
    assert!(worker.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_configuration_and_keeps_the_running_one_for_an_invalid_one() {
    let redis = RedisServer::start();
    let site = Site::new("");
    let mut worker = site.worker(&redis, "2", celeriac_tests::free_port());
    let b = broker(&redis, Duration::from_secs(30)).await;
    let id = enqueue(&b, "deploy.work", json!([1500]), "deploy").await;
    assert_eq!(outcome(&redis, &id, Duration::from_secs(60)).await["status"], "SUCCESS");

    // A hard time limit of 1 s for deploy.work, applied on SIGHUP.
    site.write_config("[tasks.\"deploy.work\"]\nhard_time_limit = \"1s\"\n");
    let hup = |child: &Child| {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup(&worker);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !site.log().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload logged:\n{}", site.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = enqueue(&b, "deploy.work", json!([1500]), "deploy").await;
    let meta = outcome(&redis, &id, Duration::from_secs(60)).await;
    assert_eq!(meta["status"], "FAILURE", "{meta}");
    assert_eq!(meta["result"]["exc_type"], "TimeLimitExceeded", "{meta}");

    // An invalid configuration: every problem logged, the worker runs on with the last one.
    site.write_config("[tasks.\"deploy.work\"]\nhard_time_limit = \"soon\"\nmemory = \"lots\"\n");
    hup(&worker);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !site.log().contains("the running configuration stays") {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", site.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = site.log();
    let refusal = &log[log.find("configuration reload refused").expect("no refusal")..];
    assert!(
        refusal.contains("celeriac.toml") && refusal.contains("hard_time_limit = \"soon\""),
        "{log}"
    );
    assert!(worker.try_wait().unwrap().is_none(), "the worker stopped");
    let id = enqueue(&b, "deploy.work", json!([1500]), "deploy").await;
    let meta = outcome(&redis, &id, Duration::from_secs(60)).await;
    assert_eq!(meta["result"]["exc_type"], "TimeLimitExceeded", "{meta}");
    sigterm(&worker);
    assert!(worker.wait().unwrap().success());
}
