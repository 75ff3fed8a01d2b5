//! Tasks written in Python (componentize-py, `sdk-python/`) and JavaScript (componentize-js,
//! `sdk-js/`), run by the worker under the same limits and grants as Rust tasks and called by
//! the real Python Celery client. `scripts/build-lang-tasks` (run by `scripts/test`) builds the
//! components into `target/lang-tasks/` from the pinned PyPI and npm packages.

use crate::interop::celery_client;
use crate::worker::{broker, config, results, settings, start, wait_state};
use celeriac::client;
use celeriac::config::Config;
use celeriac::protocol::NewTask;
use celeriac::registry::Registry;
use celeriac::units::HumanDuration;
use celeriac_tests::{RedisServer, celeriac_binary, repo_root};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The components `scripts/build-lang-tasks` built.
fn lang_tasks() -> PathBuf {
    let dir = repo_root().join("target/lang-tasks");
    for name in ["py_checks", "js_checks", "summarize_py", "webhook"] {
        let path = dir.join(format!("{name}.wasm"));
        assert!(path.exists(), "{} is missing: run scripts/build-lang-tasks", path.display());
    }
    dir
}

/// A modules folder holding the given language components (linked, not copied: they are large)
/// and, with `rust`, the workspace's Rust tasks too.
fn modules_with(names: &[&str], rust: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let built = lang_tasks();
    for name in names {
        let file = format!("{name}.wasm");
        std::os::unix::fs::symlink(built.join(&file), dir.path().join(&file)).unwrap();
    }
    if rust {
        for entry in std::fs::read_dir(celeriac::BUILT_TASKS_DIR).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "wasm") {
                std::os::unix::fs::symlink(&path, dir.path().join(path.file_name().unwrap()))
                    .unwrap();
            }
        }
    }
    dir
}

/// The test configuration over `modules`, with the notes tasks granted kv, progress, log and
/// enqueue of `*.add`, and the spinning tasks given a 1 s hard limit; with `rust`, the Rust
/// tasks' settings of `celeriac.toml` too.
fn lang_config(modules: &Path, rust: bool) -> Config {
    config(|c| {
        c.modules = modules.to_path_buf();
        if !rust {
            c.tasks.clear();
        }
        for notes in ["py.notes", "js.notes"] {
            let prefix = &notes[..2];
            c.tasks.insert(
                notes.into(),
                settings(|s| {
                    s.kv = Some(format!("{prefix}-notes"));
                    s.progress = Some(true);
                    s.log = Some(true);
                    s.enqueue = Some(vec![format!("{prefix}.add")]);
                }),
            );
        }
        for workflow in ["py.workflow", "js.workflow"] {
            let steps = ["add", "total"].map(|t| format!("{}.{t}", &workflow[..2])).to_vec();
            c.tasks.insert(workflow.into(), settings(|s| s.enqueue = Some(steps)));
        }
        for spin in ["py.spin", "js.spin"] {
            let limit = Some(HumanDuration(Duration::from_secs(1)));
            c.tasks.insert(spin.into(), settings(|s| s.hard_time_limit = limit));
        }
        c.tasks.insert("py.flaky".into(), settings(|s| s.retry_jitter = Some(false)));
        c.tasks.insert("js.flaky".into(), settings(|s| s.retry_jitter = Some(false)));
    })
}

/// Sends `task` with `args` to the `celery` queue, where tasks without a queue of their own go.
async fn send_task(b: &celeriac::broker::RedisBroker, task: &str, args: Value) -> String {
    client::enqueue(b, task, &args, &json!({}), "celery", &NewTask::default()).await.unwrap()
}

fn redis_env(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![("CELERY_BROKER_URL", redis.url(0)), ("CELERY_RESULT_BACKEND", redis.url(1))]
}

/// `celery_client.py get`: sends with the Python client and waits for the result or the
/// re-raised exception.
async fn python_get(redis: &RedisServer, task: &str, args: Value, kwargs: Value) -> Value {
    let env = redis_env(redis);
    let (task, args, kwargs) = (task.to_string(), args.to_string(), kwargs.to_string());
    tokio::task::spawn_blocking(move || {
        celery_client(&env, &["get", &task, &args, &kwargs, "default"], None)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_celery_client_calls_python_and_javascript_tasks_as_any_task() {
    let modules = modules_with(&["py_checks", "js_checks", "summarize_py", "webhook"], true);
    let redis = RedisServer::start();
    let cfg = lang_config(modules.path(), true);
    let w = start(&redis, cfg, 2, Duration::from_secs(30)).await;

    // Args and kwargs bind as Python binds them, *args included.
    let got = python_get(&redis, "py.add", json!([1, 2, 3, 4]), json!({"scale": 2})).await;
    assert_eq!(got["result"], 20, "{got}");
    let got = python_get(&redis, "py.add", json!([5]), json!({})).await;
    assert_eq!(got["result"], 15, "the default y=10: {got}");
    let got = python_get(&redis, "py.add", json!([]), json!({"y": 1})).await;
    assert_eq!(got["exc_type"], "TypeError", "{got}");
    assert!(got["message"].as_str().unwrap().contains("'x'"), "{got}");
    let got = python_get(&redis, "py.add", json!([1]), json!({"z": 1})).await;
    assert_eq!(got["exc_type"], "TypeError", "{got}");
    assert!(got["message"].as_str().unwrap().contains("unexpected keyword argument 'z'"), "{got}");

    // Exceptions reach the client by type: a builtin as itself, the task's own class by name.
    let got = python_get(&redis, "py.divide", json!([1, 0]), json!({})).await;
    assert_eq!(got["exc_type"], "ZeroDivisionError", "{got}");
    assert_eq!(got["message"], "division by zero", "{got}");
    let got = python_get(&redis, "py.reject", json!(["unsigned"]), json!({})).await;
    assert_eq!(
        (got["exc_type"].as_str(), got["message"].as_str()),
        (Some("InvoiceRejected"), Some("unsigned")),
        "{got}"
    );
    let got = python_get(&redis, "py.unjsonable", json!([]), json!({})).await;
    assert_eq!(got["exc_type"], "EncodeError", "{got}");

    // The same contract in JavaScript: params bind kwargs, errors by class name.
    let got = python_get(&redis, "js.add", json!([1]), json!({"y": 2, "scale": 3})).await;
    assert_eq!(got["result"], 9, "{got}");
    let got = python_get(&redis, "js.add", json!(["one"]), json!({})).await;
    assert_eq!(got["exc_type"], "TypeError", "{got}");
    let got = python_get(&redis, "js.add", json!([1]), json!({"q": 1})).await;
    assert!(got["message"].as_str().unwrap().contains("unexpected keyword argument 'q'"), "{got}");
    let got = python_get(&redis, "js.reject", json!(["late"]), json!({})).await;
    assert_eq!(
        (got["exc_type"].as_str(), got["message"].as_str()),
        (Some("InvoiceRejected"), Some("late")),
        "{got}"
    );

    // The Python port of the summariser agrees with the Rust task on the same text.
    let text = "The database migration failed during the deploy. I had coffee. The migration \
        locked the orders table and the deploy timed out. Lunch is at noon! We rolled back the \
        migration and will retry the deploy tonight.";
    for budget in [120, 10_000] {
        let kwargs = json!({"text": text, "max_chars": budget});
        let py =
            python_get(&redis, "summarize.summarize_session_py", json!([]), kwargs.clone()).await;
        let rust = python_get(&redis, "summarize.summarize_session", json!([]), kwargs).await;
        assert_eq!(py["result"], rust["result"], "budget {budget}: {py} against {rust}");
        assert!(py["result"]["summary"].as_str().is_some_and(|s| !s.is_empty()), "{py}");
    }
    let got = python_get(&redis, "summarize.summarize_session_py", json!([]), json!({})).await;
    assert_eq!(got["exc_type"], "ValueError", "{got}");

    // The JavaScript webhook validator: a signed valid event, and a bad one with every problem.
    let body =
        r#"{"type":"message.created","id":"e1","created":1700000000,"channel":"ops","text":"hi"}"#;
    let signature = format!("sha256={}", hmac_sha256_hex(b"s3cret", body.as_bytes()));
    let got = python_get(
        &redis,
        "webhooks.validate_payload",
        json!([]),
        json!({"body": body, "signature": signature, "secret": "s3cret"}),
    )
    .await;
    assert_eq!(got["result"]["created"], "2023-11-14T22:13:20.000Z", "{got}");
    assert_eq!(got["result"]["channel"], "ops", "{got}");
    let got = python_get(
        &redis,
        "webhooks.validate_payload",
        json!([]),
        json!({"body": body, "signature": "sha256=00", "secret": "s3cret"}),
    )
    .await;
    assert_eq!(got["exc_type"], "InvalidPayload", "{got}");
    let bad = r#"{"type":"message.created","id":7,"created":1}"#;
    let got = python_get(&redis, "webhooks.validate_payload", json!([bad]), json!({})).await;
    assert_eq!(got["exc_type"], "InvalidPayload", "{got}");
    assert_eq!(
        got["message"],
        "message.created: id must be string, got number; channel is missing; text is missing",
        "{got}"
    );
    w.stop().await;
}

/// HMAC-SHA256 with the `openssl` CLI, to check the JavaScript implementation against.
fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", std::str::from_utf8(key).unwrap(), "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_tasks_hold_to_their_memory_cap_and_hard_limit() {
    let modules = modules_with(&["py_checks", "js_checks"], false);
    let redis = RedisServer::start();
    let w = start(&redis, lang_config(modules.path(), false), 2, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    for hog in ["py.hog", "js.hog"] {
        // Under the 64 MiB the task declares: fine.
        let id = send_task(&b, hog, json!([16])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(16)), "{hog}: {meta}");
        // Over it: the cap, reported as Celery's MemoryError, not a trap.
        let id = send_task(&b, hog, json!([100])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!(state, "FAILURE", "{hog}: {meta}");
        assert_eq!(meta["result"]["exc_type"], "MemoryError", "{hog}: {meta}");
        assert!(
            meta["result"]["exc_message"].to_string().contains("memory limit of 67108864 bytes"),
            "{hog}: {meta}"
        );
    }
    for spin in ["py.spin", "js.spin"] {
        let id = send_task(&b, spin, json!([])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!(state, "FAILURE", "{spin}: {meta}");
        assert_eq!(meta["result"]["exc_type"], "TimeLimitExceeded", "{spin}: {meta}");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_tasks_use_kv_enqueue_progress_and_retry_as_granted() {
    let modules = modules_with(&["py_checks", "js_checks"], false);
    let redis = RedisServer::start();
    let w = start(&redis, lang_config(modules.path(), false), 2, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    // Every state the worker publishes, to see PROGRESS go by.
    let mut pubsub = redis::Client::open(redis.url(1)).unwrap().get_async_pubsub().await.unwrap();
    pubsub.psubscribe("celery-task-meta-*").await.unwrap();
    for lang in ["py", "js"] {
        let notes = format!("{lang}.notes");
        let first = send_task(&b, &notes, json!(["s1", "deploy went fine"])).await;
        let (state, meta) = wait_state(&r, &first, 30).await;
        assert_eq!(state, "SUCCESS", "{lang}: {meta}");
        let id = send_task(&b, &notes, json!(["s1", "rollback at noon"])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!(state, "SUCCESS", "{lang}: {meta}");
        let got = &meta["result"];
        assert_eq!(got["notes"], json!(["deploy went fine", "rollback at noon"]), "{lang}: {got}");
        assert_eq!(got["tags"], json!(["deploy", "rollback"]), "{lang}: {got}");
        assert_eq!((got["new_tag"].clone(), got["cancelled"].clone()), (json!(1), json!(false)));
        // The child it enqueued ran: add(2 notes, 100).
        let child = got["child"].as_str().unwrap();
        let (state, meta) = wait_state(&r, child, 30).await;
        assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(102)), "{lang}: {meta}");
        // Without the kv grant: PermissionError.
        let id = send_task(&b, &format!("{lang}.forbidden"), json!([])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!(
            (state.as_str(), &meta["result"]["exc_type"]),
            ("FAILURE", &json!("PermissionError")),
            "{lang}: {meta}"
        );
        // A chain: add(5, 1), then add(6, 2).
        let id = send_task(&b, &format!("{lang}.workflow"), json!([5])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!(state, "SUCCESS", "{lang}: {meta}");
        let last = meta["result"][1].as_str().unwrap().to_string();
        let (state, meta) = wait_state(&r, &last, 30).await;
        assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(8)), "{lang}: {meta}");
        // A group: add(5, 1) and add(5, 2), each with its own result.
        let id = send_task(&b, &format!("{lang}.workflow"), json!([5, "group"])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!(state, "SUCCESS", "{lang}: {meta}");
        let ids: Vec<String> = serde_json::from_value(meta["result"].clone()).unwrap();
        assert_eq!(ids.len(), 2, "{lang}: {meta}");
        for (id, want) in ids.iter().zip([6, 7]) {
            let (state, meta) = wait_state(&r, id, 30).await;
            assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(want)), "{lang}");
        }
        // A chord: that group, then total([6, 7]) once both are in.
        let id = send_task(&b, &format!("{lang}.workflow"), json!([5, "chord"])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!(state, "SUCCESS", "{lang}: {meta}");
        let ids: Vec<String> = serde_json::from_value(meta["result"].clone()).unwrap();
        assert_eq!(ids.len(), 3, "the header's ids, then the body's: {lang}: {meta}");
        let (state, meta) = wait_state(&r, &ids[2], 30).await;
        assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(13)), "{lang}: {meta}");
        // Retries it asks for are spent and then it succeeds.
        let id = send_task(&b, &format!("{lang}.flaky"), json!([2])).await;
        let (state, meta) = wait_state(&r, &id, 30).await;
        assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(2)), "{lang}: {meta}");
    }
    // PROGRESS went by for both notes tasks.
    use futures_util::StreamExt as _;
    let mut stream = pubsub.on_message();
    let mut progress = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while progress < 4 {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, stream.next()).await else { break };
        let payload: String = msg.get_payload().unwrap();
        if payload.contains("\"PROGRESS\"") {
            progress += 1;
        }
    }
    assert_eq!(progress, 4, "a PROGRESS state for each notes run");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_as_many_python_tasks_at_once_as_it_has_slots() {
    let modules = modules_with(&["py_checks", "js_checks"], false);
    let redis = RedisServer::start();
    let cfg = lang_config(modules.path(), false);
    let registry = Registry::load(&cfg, 4).await.unwrap();
    let entry = registry.get("py.noop").unwrap();
    // Interpreted defaults: 256 MiB and no fuel, whatever [defaults] gives Rust tasks.
    assert_eq!(entry.spec.limits.memory, 256 << 20);
    assert_eq!(entry.module.footprint.language.to_string(), "Python 3.14 (componentize-py)");
    assert!(entry.module.footprint.core_instances >= 10, "{:?}", entry.module.footprint);
    drop(registry);
    let w = start(&redis, cfg, 4, Duration::from_secs(30)).await;
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let opts = NewTask::default();
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(
            client::enqueue(&b, "py.add", &json!([i, 1]), &json!({}), "celery", &opts)
                .await
                .unwrap(),
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let (state, meta) = wait_state(&r, id, 60).await;
        assert_eq!((state.as_str(), &meta["result"]), ("SUCCESS", &json!(i + 1)), "{meta}");
    }
    let worker = w.stop().await;
    assert_eq!(worker.stats.failed.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn celeriac_run_and_modules_check_serve_python_and_javascript_components() {
    let modules = modules_with(&["py_checks", "js_checks"], false);
    let dir = modules.path().to_str().unwrap();
    let celeriac = |args: &[&str]| {
        Command::new(celeriac_binary())
            .args(args)
            // Not the repository's folder: its celeriac.toml configures the Rust tasks.
            .current_dir(modules.path())
            .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
            // Task log lines are at info; the default shows warnings only.
            .env("CELERIAC_LOG", "info")
            .env_remove("CELERIAC_CONFIG")
            .output()
            .unwrap()
    };
    let out = celeriac(&["run", "py.add", "--modules", dir, "--args", "[1, 2]"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("result:  3"), "{stdout}");
    let out = celeriac(&["run", "js.add", "--modules", dir, "--args", "[1, 2]"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A log line of each language reaches celeriac's log when the task is granted log.
    let grants = |l: &str| {
        format!(
            "[tasks.\"{l}.notes\"]\nkv = \"notes\"\nlog = true\nprogress = true\n\
             enqueue = [\"{l}.add\"]\n"
        )
    };
    let toml = ["py", "js"].map(grants);
    std::fs::write(modules.path().join("celeriac.toml"), toml.concat()).unwrap();
    for lang in ["py", "js"] {
        let task = format!("{lang}.notes");
        let out = celeriac(&["run", &task, "--modules", dir, "--args", r#"["s9", "hello there"]"#]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}{stderr}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("session s9 now has 1 notes"), "{lang}: {stderr}");
    }
    let out = celeriac(&["modules", "check", dir]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Python 3.14 (componentize-py)"), "{stdout}");
    assert!(stdout.contains("JavaScript (componentize-js)"), "{stdout}");
    assert!(stdout.contains("memory=256MiB"), "interpreted defaults: {stdout}");
}

#[test]
fn the_sdks_vendor_the_task_wit_byte_for_byte() {
    let wit = std::fs::read(repo_root().join("wit/task.wit")).unwrap();
    for copy in ["sdk-python/celeriac_task/wit/task.wit", "sdk-js/wit/task.wit"] {
        let vendored = std::fs::read(repo_root().join(copy)).unwrap();
        assert!(vendored == wit, "{copy} differs from wit/task.wit: copy it again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_sized_from_the_component_instantiates_a_python_task_in_every_slot_at_once() {
    use celeriac::runtime::{Grants, Outcome, RunEnv, Runtime, RuntimeConfig};
    let path = lang_tasks().join("py_checks.wasm");
    let footprint = celeriac::runtime::footprint(&std::fs::read(&path).unwrap()).unwrap();
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 4,
        footprint,
        cache_dir: Some(celeriac_tests::test_cache_dir()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let module = runtime.load_module(&path).await.unwrap();
    let limits = celeriac_tests::limits_ms(3_000);
    let spin = celeriac_tests::invocation("py.spin", json!([]));
    let runs =
        (0..4).map(|_| runtime.run(&module, &spin, &limits, Grants::default(), RunEnv::default()));
    for report in futures_util::future::join_all(runs).await {
        assert!(matches!(report.outcome, Outcome::HardTimeLimit { .. }), "{:?}", report.outcome);
        // Each got its instance at once; in a pool sized for Rust components (3 core instances
        // each) the others would have waited for the first to end.
        let waited = report.instantiate.unwrap();
        assert!(waited < Duration::from_millis(2_000), "instantiated after {waited:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_a_run_wait_and_then_hands_it_back_never_fails_it() {
    use celeriac::runtime::{Grants, Outcome, RunEnv, Runtime, RuntimeConfig, progress_channel};
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 1,
        cache_dir: Some(celeriac_tests::test_cache_dir()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let module = celeriac_tests::module(&runtime, "diagnostics").await;
    let noop = celeriac_tests::invocation("diagnostics.noop", json!([1]));
    // A sleep holds the only instance for `ms`. The second run starts only once the sleep has
    // reported progress, so it is known to hold the instance: a fixed head start would race
    // with the sleep's instantiation on a busy machine.
    let hold_then_run = |ms: u64| {
        let (runtime, module, noop) = (&runtime, &module, &noop);
        async move {
            let sleep = celeriac_tests::invocation("diagnostics.sleep", json!([ms]));
            let grants = Grants { clocks: true, progress: true, ..Grants::default() };
            let (tx, mut rx) = progress_channel();
            let env = RunEnv { progress: Some(tx), ..RunEnv::default() };
            let limits = celeriac_tests::limits_ms(ms + 5_000);
            let holder = runtime.run(module, &sleep, &limits, grants, env);
            let late = async {
                rx.changed().await.expect("the sleep reports progress while it holds the pool");
                let limits = celeriac_tests::limits_ms(5_000);
                runtime.run(module, noop, &limits, Grants::default(), RunEnv::default()).await
            };
            tokio::join!(holder, late)
        }
    };
    // A slot that frees within the wait: the second run waits for it and succeeds.
    let (first, second) = hold_then_run(1_500).await;
    assert!(first.outcome.is_success(), "{:?}", first.outcome);
    assert!(second.outcome.is_success(), "{:?}", second.outcome);
    assert!(second.instantiate.unwrap() >= Duration::from_millis(1_000), "{second:?}");
    // One that does not: handed back as PoolExhausted, which the worker requeues.
    let (first, second) = hold_then_run(8_000).await;
    assert!(first.outcome.is_success(), "{:?}", first.outcome);
    assert!(matches!(second.outcome, Outcome::PoolExhausted { .. }), "{:?}", second.outcome);
    assert!(second.outcome.exception().unwrap().1.contains("concurrent"), "{:?}", second.outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_module_deployed_beside_rust_ones_gets_a_pool_grown_for_it() {
    let modules = modules_with(&[], true);
    let cfg = config(|c| c.modules = modules.path().to_path_buf());
    let registry = Registry::load(&cfg, 4).await.unwrap();
    assert!(registry.runtime().config().footprint.core_instances < 14);
    let file = "py_checks.wasm";
    std::os::unix::fs::symlink(lang_tasks().join(file), modules.path().join(file)).unwrap();
    let (next, refused) = registry.reload(&cfg, 4).await.unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert!(next.runtime().config().footprint.core_instances >= 14);
    let env = celeriac::runtime::RunEnv::default();
    let report = next.run(&celeriac_tests::invocation("py.add", json!([1, 2])), env).await.unwrap();
    assert_eq!(report.outcome, celeriac::runtime::Outcome::Success { result: "3".into() });
    // The Rust tasks moved to the new engine with it.
    let env = celeriac::runtime::RunEnv::default();
    let noop = celeriac_tests::invocation("diagnostics.noop", json!([7]));
    assert!(next.run(&noop, env).await.unwrap().outcome.is_success());
}
