//! The `celeriac` binary as a user runs it from the repository root, README commands included.

use celeriac::broker::Broker as _;
use celeriac_tests::{celeriac_binary as binary, repo_root};
use serde_json::json;
use std::process::{Command, Output};
use std::time::Duration;

fn celeriac(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(repo_root())
        .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
        .env_remove("CELERIAC_CONFIG")
        .env_remove("CELERIAC_MODULES")
        .output()
        .expect("run celeriac")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_prints_the_result_and_the_measurements() {
    let out = celeriac(&["run", "diagnostics.noop", "--args", "[42]"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("result:  42"), "{stdout}");
    assert!(stdout.contains("outcome: success") && stdout.contains("wall: "), "{stdout}");
    assert!(stdout.contains("peak memory: "), "{stdout}");
}

#[test]
fn every_example_task_runs_from_the_repository_root() {
    let kv = tempfile::tempdir().unwrap();
    let kv_file = kv.path().join("index.json");
    let kv_file = kv_file.to_str().unwrap();
    let runs: &[&[&str]] = &[
        &[
            "run",
            "indexing.batch_index_channel",
            "--follow",
            "--kv-file",
            kv_file,
            "--kwargs",
            "@examples/ops-channel.json",
        ],
        &[
            "run",
            "indexing.index_session",
            "--kv-file",
            kv_file,
            "--kwargs",
            r#"{"session_id":"s1","messages":[{"id":"x1","author":"a","content":"hello search index","timestamp":1}]}"#,
        ],
        &["run", "indexing.search", "--kv-file", kv_file, "--args", r#"["deploy migration"]"#],
        &[
            "run",
            "summarize.summarize_session",
            "--kv-file",
            kv_file,
            "--kwargs",
            r#"{"session_id":"ops:m1","max_chars":120}"#,
        ],
        &[
            "run",
            "deletion.delete_message_vectors",
            "--kv-file",
            kv_file,
            "--args",
            r#"[["m4","m5"]]"#,
        ],
        &["run", "cleanup.cleanup_temp_files", "--kwargs", r#"{"older_than_seconds":86400}"#],
        &["run", "diagnostics.noop", "--args", r#"["hi"]"#],
        &["run", "diagnostics.sleep", "--args", "[10]"],
        &["run", "diagnostics.spin", "--args", "[10]"],
        &["run", "diagnostics.flaky", "--args", "[1]"],
    ];
    for args in runs {
        let out = celeriac(args);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{args:?}\n{stdout}{}", text(&out.stderr));
        assert!(stdout.contains("outcome: success"), "{args:?}\n{stdout}");
    }
    // The index persisted between runs: search finds the session indexed by the first command,
    // and not the one deleted since.
    let search = |q: &str| {
        let args = format!("[{q:?}]");
        text(&celeriac(&["run", "indexing.search", "--kv-file", kv_file, "--args", &args]).stdout)
    };
    assert!(search("rollback").contains("ops:m1"));
    assert!(search("pizza").contains("result:  []"));
    // The example channel is from 2023: a one-day retention expires all of it.
    let kwargs = r#"{"retention_seconds":86400}"#;
    let out =
        celeriac(&["run", "cleanup.cleanup_expired", "--kv-file", kv_file, "--kwargs", kwargs]);
    assert!(text(&out.stdout).contains("ops:m1"), "{}", text(&out.stdout));
    assert!(search("rollback").contains("result:  []"));
}

#[test]
fn a_failing_task_exits_non_zero_with_its_error() {
    let out = celeriac(&["run", "diagnostics.fail", "--args", r#"["boom"]"#]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("error:   ValueError: boom") && stdout.contains("outcome: failure"),
        "{stdout}"
    );
}

#[test]
fn flags_override_the_configured_limits() {
    let out =
        celeriac(&["run", "diagnostics.spin", "--args", "[5000]", "--hard-time-limit", "200ms"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("TimeLimitExceeded") && stdout.contains("hard_time_limit"), "{stdout}");
    let out = celeriac(&["run", "diagnostics.spin", "--args", "[10]", "--fuel", "1000"]);
    assert!(text(&out.stdout).contains("outcome: out_of_fuel"), "{}", text(&out.stdout));
}

#[test]
fn unknown_task_and_bad_input_are_clear_errors() {
    let out = celeriac(&["run", "nope.nothing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown task \"nope.nothing\""), "{}", text(&out.stderr));
    let out = celeriac(&["run", "diagnostics.noop", "--args", "{not json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--args is not valid JSON"), "{}", text(&out.stderr));
}

#[test]
fn a_broken_config_file_names_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[defaults]\nhard_time_limit = \"soon\"\n").unwrap();
    let out =
        celeriac(&["--config", file.to_str().unwrap(), "run", "diagnostics.noop", "--args", "[1]"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.toml")
            && stderr.contains("hard_time_limit")
            && stderr.contains("invalid duration"),
        "{stderr}"
    );
}

#[test]
fn modules_check_lists_tasks_and_rejects_foreign_modules() {
    let out = celeriac(&["modules", "check"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("indexing.index_session") && stdout.contains("5 modules, 15 tasks: ok"),
        "{stdout}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.wasm"), "(component (import \"wasi:http/outgoing-handler@0.2.0\" (instance (export \"handle\" (func)))))").unwrap();
    let out = celeriac(&["modules", "check", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("web.wasm") && stderr.contains("wasi:http/outgoing-handler"),
        "{stderr}"
    );
}

/// `worker --check`, what a compose healthcheck and systemd's ExecStartPre run: every module,
/// the beat entries and both Redis URLs are checked, nothing is consumed, and a bad part is a
/// clear error that never shows the password.
#[test]
fn worker_check_validates_everything_and_runs_nothing() {
    let redis = celeriac_tests::RedisServer::start();
    let (url0, url1) = (redis.url(0), redis.url(1));
    let sent = celeriac(&["--broker", &url0, "enqueue", "diagnostics.noop", "--queue", "default"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let out = celeriac(&[
        "--broker",
        &url0,
        "--result-backend",
        &url1,
        "worker",
        "--check",
        "--beat",
        "-Q",
        "default",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(
        stdout.contains("15 tasks from target/tasks") && stdout.contains("default"),
        "{stdout}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut c = redis.client(0);
    let waiting: u64 = redis::Commands::llen(&mut c, "default").unwrap();
    assert_eq!(waiting, 1, "--check consumed the queue");
    let mut r = redis.client(1);
    let stored: Vec<String> = redis::Commands::keys(&mut r, "celery-task-meta-*").unwrap();
    assert!(stored.is_empty(), "{stored:?}");

    let closed = format!("redis://:s3cret@127.0.0.1:{}/0", celeriac_tests::free_port());
    let out = celeriac(&["--broker", &closed, "worker", "--check"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("connect to Redis at redis://:**@127.0.0.1"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.wasm"), "(component (import \"wasi:http/outgoing-handler@0.2.0\" (instance (export \"handle\" (func)))))").unwrap();
    let modules = dir.path().to_str().unwrap();
    let out = celeriac(&["--broker", &url0, "--modules", modules, "worker", "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("web.wasm"), "{}", text(&out.stderr));
}

#[test]
fn demo_runs_the_example_tasks_end_to_end_in_memory() {
    let out = celeriac(&["demo"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("celeriac demo on memory://"), "{stdout}");
    assert!(
        stdout.contains("summary: 13 runs succeeded, 1 failed, 2 retries, 0 revoked"),
        "{stdout}"
    );
    assert!(stdout.contains("dead letter in default: diagnostics.fail"), "{stdout}");
    assert!(!stdout.contains("did not end as expected"), "{stdout}");
}

#[test]
fn demo_runs_against_redis_too() {
    let redis = celeriac_tests::RedisServer::start();
    let out = Command::new(binary())
        .args(["--broker", &redis.url(0), "--result-backend", &redis.url(1), "demo"])
        .current_dir(repo_root())
        .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&format!("celeriac demo on {}", redis.url(0))), "{stdout}");
    assert!(
        stdout.contains("summary: 13 runs succeeded, 1 failed, 2 retries, 0 revoked"),
        "{stdout}"
    );
    // The results are real Celery results in Redis.
    let mut c = redis.client(1);
    let keys: Vec<String> = redis::Commands::keys(&mut c, "celery-task-meta-*").unwrap();
    assert_eq!(keys.len(), 14);
}

#[test]
fn client_commands_refuse_the_in_process_broker() {
    let out = celeriac(&["--broker", "memory://", "enqueue", "diagnostics.noop"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("celeriac demo"), "{}", text(&out.stderr));
}

#[test]
fn queue_weights_must_be_given_for_all_queues_or_none() {
    let out = celeriac(&["worker", "-Q", "high:6,low"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("give every queue a weight"), "{}", text(&out.stderr));
    let out = celeriac(&["worker", "-Q", "high:0,low:1"]);
    assert!(text(&out.stderr).contains("positive whole number"), "{}", text(&out.stderr));
}

/// `celeriac dlq list | show | replay | purge` on dead letters a worker made: a permanent failure
/// and a message that is not JSON.
#[tokio::test]
async fn dlq_commands_list_show_replay_and_purge() {
    use redis::Commands as _;
    let redis = celeriac_tests::RedisServer::start();
    let (url0, url1) = (redis.url(0), redis.url(1));
    let cli = |args: &[&str]| {
        let mut all = vec!["--broker", url0.as_str(), "--result-backend", url1.as_str()];
        all.extend_from_slice(args);
        let out = celeriac(&all);
        assert!(out.status.success() || args[1] == "show", "{args:?}: {}", text(&out.stderr));
        out
    };
    let enqueued = cli(&["enqueue", "diagnostics.fail", "--args", r#"["no way"]"#]);
    let failed_id = text(&enqueued.stdout).trim().to_string();
    let _: () = redis.client(0).lpush("default", "not json at all").unwrap();
    let w = crate::worker::start(&redis, crate::worker::config(|_| {}), 2, Duration::from_secs(30))
        .await;
    let b = crate::worker::broker(&redis, Duration::from_secs(30)).await;
    let started = std::time::Instant::now();
    while b.dlq_records("default", 10).await.unwrap().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "no dead letters");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.stop().await;

    assert_eq!(text(&cli(&["dlq", "list"]).stdout), "default\t2\n");
    let listed = text(&cli(&["dlq", "list", "default"]).stdout);
    assert!(listed.contains("failed") && listed.contains(&failed_id), "{listed}");
    assert!(listed.contains("bad_json") && listed.contains("ValueError: no way"), "{listed}");

    let shown: serde_json::Value =
        serde_json::from_slice(&cli(&["dlq", "show", "default", &failed_id]).stdout).unwrap();
    assert_eq!((&shown["reason"], &shown["attempts"]), (&json!("failed"), &json!(1)));
    assert_eq!(shown["task"], "diagnostics.fail");
    let missing = cli(&["dlq", "show", "default", "no-such-id"]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("no dead letter for task no-such-id"));

    let replayed = cli(&["dlq", "replay", "default", "--id", &failed_id]);
    assert_eq!(text(&replayed.stdout), "replayed 1\n");
    assert_eq!(b.queue_len("default").await.unwrap(), 1);
    assert_eq!(text(&cli(&["dlq", "purge", "default"]).stdout), "purged 1\n");
    assert_eq!(text(&cli(&["dlq", "list"]).stdout), "");
}
