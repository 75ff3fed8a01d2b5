//! The HTTP API, served by a worker and by the standalone `celeriac api`, checked against its own
//! OpenAPI document and Celery's client by `tests/interop/http_api.py`.

use crate::faults::worker_command;
use crate::interop::venv_python;
use celeriac_tests::{RedisServer, celeriac_binary, free_port, http, repo_root, test_cache_dir};
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Waits until the server on `port` answers its liveness probe.
fn until_serving(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http(port, "GET", "/healthz", None), Ok((200, _))) {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "the HTTP server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every route the OpenAPI document lists, on a worker, with its token: sends, reads, waits,
/// progress, revoke, idempotency, queues, workers, dead letters and Flower's API subset.
#[test]
fn the_http_api_answers_as_its_openapi_document_says() {
    let redis = RedisServer::start();
    let port = free_port();
    let node = "celeriac@api";
    let addr = format!("127.0.0.1:{port}");
    let mut worker =
        worker_command(&redis, &["-n", node, "-Q", "default", "-c", "2", "--http", &addr])
            .env("CELERIAC_API_TOKEN", "t0ken")
            .spawn()
            .unwrap();
    until_serving(port, &mut worker);
    let out = Command::new(venv_python())
        .arg(repo_root().join("tests/interop/http_api.py"))
        .args([&port.to_string(), "t0ken", node])
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .output()
        .unwrap();
    let _ = worker.kill();
    let _ = worker.wait();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.trim() == "ok", "{stdout}\n{stderr}");
}

/// `celeriac api` serves without a worker: a task sent through it is PENDING until a worker
/// starts, and then its result reads through the same API.
#[test]
fn the_standalone_api_sends_tasks_that_a_worker_runs_later() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut api = Command::new(celeriac_binary())
        .args(["api", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(repo_root())
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .env("CELERIAC_CACHE", test_cache_dir())
        .env_remove("CELERIAC_API_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until_serving(port, &mut api);
    let (status, body) =
        http(port, "POST", "/tasks/diagnostics.noop", Some(r#"{"args": ["later"]}"#)).unwrap();
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["task_id"].as_str().unwrap().to_string();
    let read = |path: &str| {
        let (status, body) = http(port, "GET", path, None).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    assert_eq!(read(&format!("/tasks/{id}"))["state"], "PENDING");
    assert_eq!(read("/workers")["workers"], Value::Array(vec![]));
    let default = read("/queues")["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "default")
        .cloned()
        .unwrap();
    assert_eq!(default["messages"], 1);
    // Its metrics are the queues'; no worker runs here to be up or busy.
    let (_, metrics) = http(port, "GET", "/metrics", None).unwrap();
    assert!(metrics.contains("celeriac_queue_length{queue_name=\"default\"} 1"), "{metrics}");
    assert!(!metrics.contains("celeriac_worker_up"), "{metrics}");

    let mut worker = worker_command(&redis, &["-Q", "default", "-c", "1"]).spawn().unwrap();
    let task = read(&format!("/tasks/{id}?wait=60"));
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = api.kill();
    let _ = api.wait();
    assert_eq!(task["state"], "SUCCESS", "{task}");
    assert_eq!(task["result"], "later");
}
