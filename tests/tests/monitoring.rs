//! Monitoring a celeriac worker with Celery's own tools: the event receiver and state machine
//! Flower is built on, `celery events --dump`, `inspect` (Python API and CLI) and control
//! commands, all from the real `celery` package in `target/interop-venv`.

use crate::faults::enqueue;
use crate::faults::worker_command;
use crate::interop::venv_python;
use crate::worker::{broker, results};
use celeriac::client;
use celeriac::protocol::NewTask;
use celeriac_tests::{RedisServer, free_port, http, repo_root};
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `tests/interop/monitor.py args` on `redis`.
fn monitor_py(redis: &RedisServer, args: &[&str]) -> Command {
    let mut command = Command::new(venv_python());
    command
        .arg(repo_root().join("tests/interop/monitor.py"))
        .args(args)
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1));
    command
}

/// Runs `monitor.py watch NODE`, starting worker `NODE` once the script listens, and returns
/// what the script saw and how the worker exited.
fn watch(
    redis: &RedisServer,
    node: &str,
    worker_args: &[&str],
) -> (Value, std::process::ExitStatus) {
    let mut script = monitor_py(redis, &["watch", node])
        .env("TZ", "Europe/Berlin")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run monitor.py");
    let mut stdout = BufReader::new(script.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening", "monitor.py did not start: {line}");
    let mut args = vec!["-n", node];
    args.extend_from_slice(worker_args);
    // A zone with DST, so a hard-coded or DST-blind utcoffset shows.
    let mut worker = worker_command(redis, &args).env("TZ", "Europe/Berlin").spawn().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = script.wait().unwrap();
    let mut stderr = String::new();
    script.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "monitor.py failed: {rest}\n{stderr}");
    let seen: Value = serde_json::from_str(rest.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {rest}\n{stderr}"));
    // The script shut the worker down over remote control; it must have exited by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = worker.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the worker did not stop after the shutdown command");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (seen, exit)
}

fn events_of<'a>(seen: &'a Value, kind: &str) -> Vec<&'a Value> {
    seen["events"].as_array().unwrap().iter().filter(|e| e["type"] == kind).collect()
}

#[test]
fn celerys_own_tools_see_a_celeriac_worker_and_its_tasks() {
    let redis = RedisServer::start();
    let node = "celeriac@monitored";
    let (seen, exit) = watch(&redis, node, &["-Q", "default", "-c", "2"]);
    assert!(exit.success(), "worker exit: {exit:?}");
    let (ok, bad, slow) = (&seen["ids"]["ok"], &seen["ids"]["bad"], &seen["ids"]["slow"]);

    // Worker events: online, heartbeats every two seconds with Celery's fields, offline.
    let online = &seen["online"];
    assert_eq!(online["hostname"], node, "{seen}");
    for field in ["pid", "clock", "timestamp", "freq", "active", "processed", "loadavg", "sw_ver"] {
        assert!(!online[field].is_null(), "worker-online lacks {field}: {online}");
    }
    assert_eq!(online["sw_ident"], "celeriac");
    assert_eq!(online["sw_sys"], "Linux");
    assert_eq!(online["freq"], 2.0);
    // Hours west of UTC, as Celery computes it for the same zone (-1 or -2 in Berlin).
    let offset = online["utcoffset"].as_f64().unwrap();
    assert_eq!(Some(offset), seen["celery_utcoffset"].as_f64(), "{online}");
    assert!(offset == -1.0 || offset == -2.0, "{online}");
    let beats = events_of(&seen, "worker-heartbeat");
    assert!(beats.len() >= 2, "{} heartbeats", beats.len());
    let times: Vec<f64> = beats.iter().map(|b| b["local_received"].as_f64().unwrap()).collect();
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g < 3.0), "heartbeat gaps {gaps:?}");
    assert!(beats.iter().any(|b| b["active"] == 1), "no heartbeat saw the slow task running");
    let offline_after = seen["offline_after"].as_f64().expect("no worker-offline event");
    assert!(offline_after < 10.0, "offline {offline_after} s after shutdown");
    assert_eq!(seen["alive_after_offline"], false);

    // Task events, through Celery's State as Flower reads them.
    let tasks = &seen["state_tasks"];
    let t = &tasks[ok.as_str().unwrap()];
    assert_eq!(t["name"], "diagnostics.noop", "{t}");
    assert_eq!(t["state"], "SUCCESS");
    assert_eq!(t["args"], "({'n': 1, 's': \"it's\"},)");
    assert_eq!(t["kwargs"], "{}");
    assert_eq!(t["result"], "{'n': 1, 's': \"it's\"}");
    assert!(t["runtime"].as_f64().is_some_and(|r| r > 0.0 && r < 5.0), "{t}");
    assert_eq!(t["worker"], node);
    assert_eq!(t["root_id"], *ok);
    let f = &tasks[bad.as_str().unwrap()];
    assert_eq!(f["state"], "FAILURE", "{f}");
    assert_eq!(f["exception"], "ValueError('boom')");
    assert_eq!(seen["bad_error"][0], "ValueError");
    assert_eq!(tasks[slow.as_str().unwrap()]["state"], "REVOKED");
    let revoked = events_of(&seen, "task-revoked");
    assert_eq!(revoked.len(), 1);
    assert_eq!((&revoked[0]["terminated"], &revoked[0]["expired"]), (&json!(true), &json!(false)));
    // Every event carries a clock that only goes forward.
    let clocks: Vec<u64> = seen["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["hostname"] == node)
        .map(|e| e["clock"].as_u64().unwrap())
        .collect();
    assert!(clocks.windows(2).all(|w| w[0] < w[1]), "clocks {clocks:?}");
    for kind in ["task-received", "task-started", "task-succeeded", "task-failed"] {
        assert!(!events_of(&seen, kind).is_empty(), "no {kind}");
    }
    let worker = &seen["state_worker"];
    assert_eq!(worker["alive"], true, "{worker}");
    assert_eq!(worker["sw_ident"], "celeriac");

    // `celery events --dump` printed the worker and its tasks.
    let dump = seen["dump"].as_str().unwrap();
    assert!(dump.contains(node), "{dump}");
    assert!(dump.contains("diagnostics.noop") && dump.contains(ok.as_str().unwrap()), "{dump}");

    // inspect: every answer well inside Flower's one second.
    for (method, secs) in seen["inspect_seconds"].as_object().unwrap() {
        assert!(secs.as_f64().unwrap() < 1.0, "{method} took {secs} s");
        assert!(!seen["inspect"][method].is_null(), "no {method} reply: {seen}");
    }
    let inspect = &seen["inspect"];
    let stats = &inspect["stats"];
    assert!(stats["broker"]["hostname"].is_string(), "{stats}");
    assert_eq!(stats["broker"]["transport"], "redis");
    assert_eq!(stats["pool"]["processes"].as_array().unwrap().len(), 2, "{stats}");
    assert_eq!(stats["total"]["diagnostics.noop"], 1, "{stats}");
    assert_eq!(stats["total"]["diagnostics.fail"], 1, "{stats}");
    let queues = inspect["active_queues"].as_array().unwrap();
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0]["name"], "default");
    let registered: Vec<&str> =
        inspect["registered"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(registered.contains(&"diagnostics.noop") && registered.contains(&"indexing.search"));
    assert_eq!(inspect["conf"]["worker_concurrency"], 2);
    let active = inspect["active"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(active[0]["id"], *slow);
    assert_eq!(active[0]["name"], "diagnostics.sleep");
    assert_eq!(active[0]["args"], serde_json::json!([60000]));
    assert_eq!(inspect["reserved"], serde_json::json!([]));
    assert_eq!(inspect["scheduled"], serde_json::json!([]));
    assert!(inspect["revoked"].is_array());
    assert!(seen["broadcast_stats"].as_array().unwrap().iter().any(|n| n == node));

    // The `celery inspect` command line.
    for (method, needle) in [
        ("stats", "\"broker\""),
        ("active", "diagnostics.sleep"),
        ("registered", "diagnostics.fail"),
    ] {
        let run = &seen["cli_inspect"][method];
        assert_eq!(run["code"], 0, "celery inspect {method}: {run}");
        let out = run["stdout"].as_str().unwrap();
        assert!(out.contains(node) && out.contains(needle), "celery inspect {method}: {out}");
    }

    // Control commands answer, including the unsupported one.
    let control = &seen["control"];
    let reply = |method: &str, i: usize| control[method][i][0][node].clone();
    assert_eq!(reply("disable_events", 0)["ok"], "task events disabled");
    assert_eq!(reply("enable_events", 0)["ok"], "task events enabled");
    assert_eq!(reply("enable_events", 1)["ok"], "task events already enabled");
    assert!(reply("pool_restart", 0)["error"].is_string(), "{control}");
}

/// Flower from PyPI on the test's Redis, stopped when dropped.
struct Flower {
    port: u16,
    child: std::process::Child,
}

impl Flower {
    fn start(redis: &RedisServer) -> Flower {
        let port = free_port();
        let child = Command::new(repo_root().join("target/interop-venv/bin/celery"))
            .args(["-A", "celery_client", "flower", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .current_dir(repo_root().join("tests/interop"))
            .env("CELERY_BROKER_URL", redis.url(0))
            .env("CELERY_RESULT_BACKEND", redis.url(1))
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Flower (scripts/test installs it in target/interop-venv)");
        let flower = Flower { port, child };
        flower.until("Flower to answer", 30, || {
            matches!(http(port, "GET", "/healthcheck", None), Ok((200, body)) if body == "OK")
                .then_some(())
        });
        flower
    }

    /// GET `path` as JSON.
    fn get(&self, path: &str) -> Value {
        let (status, body) = http(self.port, "GET", path, None).unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// Polls `check` every 100 ms until it gives a value, for at most `secs`.
    fn until<T>(&self, what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_lists_a_celeriac_worker_its_tasks_and_queues_and_revokes_through_it() {
    let redis = RedisServer::start();
    let flower = Flower::start(&redis);
    let node = "celeriac@flower";
    let mut worker =
        worker_command(&redis, &["-n", node, "-Q", "default", "-c", "1"]).spawn().unwrap();
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);

    // Listed online (from its events: Flower may subscribe after the worker-online, and then
    // sees the next heartbeat), with the stats Flower's worker page needs.
    flower.until("the worker online in Flower", 30, || {
        (flower.get("/api/workers?status=true")[node] == true).then_some(())
    });
    let workers = flower.until("the worker in /api/workers", 30, || {
        let w = flower.get("/api/workers?refresh=1");
        w[node]["stats"]["broker"].is_object().then_some(w)
    });
    let info = &workers[node];
    assert!(info["stats"]["total"].is_object(), "{info}");
    assert_eq!(info["active_queues"][0]["name"], "default", "{info}");
    assert!(info["registered"].as_array().unwrap().iter().any(|n| n == "diagnostics.fail"));

    // Tasks with their names, states, args, results and runtimes; a failure with its exception.
    let ok = enqueue(&b, "diagnostics.noop", json!([7]), "default").await;
    let bad = enqueue(&b, "diagnostics.fail", json!(["broken"]), "default").await;
    for id in [&ok, &bad] {
        client::wait(&r, id, Duration::from_secs(30)).await.unwrap();
    }
    let tasks = flower.until("both tasks in /api/tasks", 10, || {
        let t = flower.get("/api/tasks");
        (t[&ok]["state"] == "SUCCESS" && t[&bad]["state"] == "FAILURE").then_some(t)
    });
    let t = &tasks[&ok];
    assert_eq!(t["name"], "diagnostics.noop", "{t}");
    assert_eq!(t["args"], "(7,)");
    assert_eq!(t["result"], "7");
    assert!(t["runtime"].as_f64().is_some_and(|s| s > 0.0), "{t}");
    assert_eq!(t["worker"], node);
    assert_eq!(tasks[&bad]["exception"], "ValueError('broken')", "{}", tasks[&bad]);

    // Queue lengths count every priority list: one slot, busy, and three waiting at 0, 5, 9.
    let slow = enqueue(&b, "diagnostics.spin", json!([60_000]), "default").await;
    flower.until("the slow task to start", 30, || {
        (flower.get("/api/tasks")[&slow]["state"] == "STARTED").then_some(())
    });
    let mut waiting = Vec::new();
    for priority in [0, 5, 9] {
        let opts = NewTask { priority: Some(priority), ..NewTask::default() };
        let args = (json!([1]), json!({}));
        waiting.push(
            client::enqueue(&b, "diagnostics.noop", &args.0, &args.1, "default", &opts)
                .await
                .unwrap(),
        );
    }
    let lengths = flower.get("/api/queues/length");
    assert_eq!(lengths["active_queues"], json!([{"name": "default", "messages": 3}]), "{lengths}");

    // A revoke with terminate, sent through Flower's API, stops the running task.
    let (status, body) =
        http(flower.port, "POST", &format!("/api/task/revoke/{slow}?terminate=true"), None)
            .unwrap();
    assert_eq!(status, 200, "{body}");
    let (state, _) = client::wait(&r, &slow, Duration::from_secs(10)).await.unwrap();
    assert_eq!(state, "REVOKED");
    for id in &waiting {
        client::wait(&r, id, Duration::from_secs(30)).await.unwrap();
    }

    // Offline within a few seconds of stopping.
    crate::faults::sigterm(&worker);
    let stopped = Instant::now();
    flower.until("the worker to go offline", 10, || {
        (flower.get("/api/workers?status=true")[node] == false).then_some(())
    });
    eprintln!("Flower showed the worker offline {:?} after SIGTERM", stopped.elapsed());
    assert!(worker.wait().unwrap().success());
}

/// The control commands that change a running worker, sent by the real Celery client: each
/// reply is Celery's, and each change takes effect.
#[test]
fn control_commands_change_the_running_worker() {
    let redis = RedisServer::start();
    let node = "celeriac@controlled";
    let mut worker =
        worker_command(&redis, &["-n", node, "-Q", "default", "-c", "1"]).spawn().unwrap();
    let out = monitor_py(&redis, &["control", node]).output().expect("run monitor.py");
    let _ = worker.kill();
    let _ = worker.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    eprintln!("{seen:#}");

    // rate_limit: 6 tasks at 2/s (a burst of 2, then one every half second) take 2 s; lifted,
    // they run at once.
    assert_eq!(seen["rate_unknown"]["error"], "unknown task");
    assert_eq!(seen["rate_set"]["ok"], "new rate limit set successfully");
    let limited = seen["rate_limited"]["seconds"].as_f64().unwrap();
    assert!(limited >= 1.5, "6 tasks at 2/s took {limited} s");
    assert_eq!(seen["rate_off"]["ok"], "rate limit disabled successfully");
    let unlimited = seen["rate_unlimited"]["seconds"].as_f64().unwrap();
    assert!(unlimited < limited, "lifted {unlimited} s, limited {limited} s");

    // time_limit: a 5 s sleep is stopped at the new 0.5 s hard limit.
    assert_eq!(seen["time_set"]["ok"], "time limits set successfully");
    assert_eq!(seen["time_limited"]["states"], json!(["TimeLimitExceeded"]));
    assert!(seen["time_limited"]["seconds"].as_f64().unwrap() < 4.0);
    assert_eq!(seen["time_unknown"]["error"], "unknown task");

    // pool_grow / pool_shrink / autoscale change the slots; three sleeps then run at once.
    assert_eq!(seen["grow"]["ok"], "pool will grow to 3");
    assert_eq!(seen["grown_active"], 3);
    assert_eq!(seen["grown_stats"], 3);
    assert_eq!(seen["shrink"]["ok"], "pool will shrink to 2");
    assert_eq!(seen["autoscale"]["ok"], "autoscale now max=4 min=1");
    assert_eq!(seen["autoscaled_stats"], 4);
    assert_eq!(seen["shrink_more"][2]["ok"], "pool will shrink to 1");
    assert!(seen["shrink_last"]["error"].is_string(), "{}", seen["shrink_last"]);

    // add_consumer / cancel_consumer start and stop consuming a queue.
    assert_eq!(seen["add"]["ok"], "add consumer extra");
    assert_eq!(seen["add_again"]["ok"], "already consuming from extra");
    assert_eq!(seen["queues_added"], json!(["default", "extra"]));
    assert_eq!(seen["extra_run"]["states"], json!(["SUCCESS"]));
    assert_eq!(seen["cancel"]["ok"], "no longer consuming from extra");
    assert_eq!(seen["queues_cancelled"], json!(["default"]));
    assert_eq!(seen["extra_waiting"], 1);
}

/// Parses Prometheus' text format with the reference parser (`prometheus_client`, in the venv
/// with Flower) into (name, labels, value) samples.
fn parse_metrics(text: &str) -> Vec<(String, Value, f64)> {
    use std::io::Write as _;
    let mut parser = Command::new(venv_python())
        .args([
            "-c",
            "import sys, json\n\
             from prometheus_client.parser import text_string_to_metric_families as parse\n\
             print(json.dumps([[s.name, s.labels, s.value] for f in parse(sys.stdin.read()) \
             for s in f.samples]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    parser.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = parser.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    let samples: Vec<(String, Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    samples
}

/// The value of sample `name` whose labels include `labels`.
fn sample(samples: &[(String, Value, f64)], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, _, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_workers_metrics_with_its_token() {
    let redis = RedisServer::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = worker_command(&redis, &["-Q", "default", "-c", "1", "--http", &addr])
        .env("CELERIAC_API_TOKEN", "s3cret")
        .spawn()
        .unwrap();
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http(port, "GET", "/healthz", None), Ok((200, _))) {
        assert!(Instant::now() < deadline, "the HTTP server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http(port, "GET", "/readyz", None).unwrap().0, 200);

    let ok = enqueue(&b, "diagnostics.noop", json!([1]), "default").await;
    let bad = enqueue(&b, "diagnostics.fail", json!(["no"]), "default").await;
    let stranger = enqueue(&b, "made.up.name", json!([]), "default").await;
    for id in [&ok, &bad, &stranger] {
        client::wait(&r, id, Duration::from_secs(30)).await.unwrap();
    }
    // One task running and two waiting, at two priorities.
    let slow = enqueue(&b, "diagnostics.sleep", json!([60_000]), "default").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client::status(&r, &slow).await.unwrap().0 != "STARTED" {
        assert!(Instant::now() < deadline, "the slow task did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for priority in [0, 9] {
        let opts = NewTask { priority: Some(priority), ..NewTask::default() };
        client::enqueue(&b, "diagnostics.noop", &json!([2]), &json!({}), "default", &opts)
            .await
            .unwrap();
    }

    let scrape = |auth: Option<&str>| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        use std::io::{Read as _, Write as _};
        let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.split_whitespace().nth(1).unwrap().parse::<u16>().unwrap(), body.to_string())
    };
    assert_eq!(scrape(None).0, 401);
    assert_eq!(scrape(Some("wrong")).0, 403);
    let (status, text) = scrape(Some("s3cret"));
    assert_eq!(status, 200, "{text}");
    let samples = parse_metrics(&text);
    let got = |name: &str, labels: &[(&str, &str)]| {
        sample(&samples, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}:\n{text}"))
    };
    let noop = [("name", "diagnostics.noop"), ("queue_name", "default")];
    assert_eq!(got("celeriac_task_received_total", &noop), 1.0);
    assert_eq!(got("celeriac_task_started_total", &noop), 1.0);
    assert_eq!(got("celeriac_task_succeeded_total", &noop), 1.0);
    assert_eq!(got("celeriac_task_runtime_seconds_count", &noop), 1.0);
    let host = celeriac::protocol::hostname();
    assert_eq!(got("celeriac_task_succeeded_total", &[("hostname", host.as_str())]), 1.0);
    let failed = [("name", "diagnostics.fail"), ("exception", "ValueError")];
    assert_eq!(got("celeriac_task_failed_total", &failed), 1.0);
    // A name no task serves does not become a series of its own.
    let unregistered = [("name", "unregistered"), ("exception", "NotRegistered")];
    assert_eq!(got("celeriac_task_failed_total", &unregistered), 1.0);
    assert!(!text.contains("made.up.name"), "{text}");
    assert_eq!(got("celeriac_worker_up", &[]), 1.0);
    assert_eq!(got("celeriac_worker_tasks_active", &[]), 1.0);
    assert_eq!(got("celeriac_queue_length", &[("queue_name", "default")]), 2.0);
    assert_eq!(got("celeriac_dlq_length", &[("queue_name", "default")]), 2.0);
    assert!(got("celeriac_task_memory_peak_bytes_count", &[("name", "diagnostics.noop")]) >= 1.0);

    // Redis gone: not ready, still alive.
    let mut redis = redis;
    redis.kill();
    assert_eq!(http(port, "GET", "/readyz", None).unwrap().0, 503);
    assert_eq!(http(port, "GET", "/healthz", None).unwrap().0, 200);
    let _ = worker.kill();
    let _ = worker.wait();
}

/// Without a token the HTTP server refuses an address other machines can reach.
#[test]
fn the_http_server_will_not_serve_a_network_without_a_token() {
    let redis = RedisServer::start();
    let out = worker_command(&redis, &["--http", "0.0.0.0:0"])
        .env_remove("CELERIAC_API_TOKEN")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to serve without a token"), "{stderr}");
}

/// `celeriac inspect` asks celeriac and Python workers alike, as `celery inspect` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celeriac_inspect_asks_celeriac_and_python_workers_alike() {
    let redis = RedisServer::start();
    let node = "celeriac@inspected";
    let mut ours =
        worker_command(&redis, &["-n", node, "-Q", "default,solo", "-c", "2"]).spawn().unwrap();
    let mut python = crate::interop::python_worker(&redis);
    let inspect = |args: &[&str]| {
        let out = Command::new(celeriac_tests::celeriac_binary())
            .arg("inspect")
            .args(args)
            .current_dir(repo_root())
            .env("CELERY_BROKER_URL", redis.url(0))
            .env("CELERY_RESULT_BACKEND", redis.url(1))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let pong = loop {
        let pong = inspect(&["ping"]);
        if pong.as_object().unwrap().len() == 2 {
            break pong;
        }
        assert!(Instant::now() < deadline, "both workers never answered: {pong}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let python_node = pong.as_object().unwrap().keys().find(|n| *n != node).unwrap().clone();
    assert!(python_node.starts_with("celery@"), "{pong}");
    assert_eq!(pong[node]["ok"], "pong");

    let b = broker(&redis, Duration::from_secs(30)).await;
    let spin = enqueue(&b, "diagnostics.spin", json!([60_000]), "solo").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let active = loop {
        let active = inspect(&["active", "-d", node]);
        if active[node].as_array().is_some_and(|a| !a.is_empty()) {
            break active;
        }
        assert!(Instant::now() < deadline, "the task never showed as active: {active}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(active.as_object().unwrap().len(), 1, "-d asks one worker: {active}");
    assert_eq!(active[node][0]["id"], spin);
    assert_eq!(active[node][0]["name"], "diagnostics.spin");

    let stats = inspect(&["stats"]);
    for n in [node, python_node.as_str()] {
        assert!(stats[n]["broker"].is_object() && stats[n]["total"].is_object(), "{stats}");
    }
    let registered = inspect(&["registered"]);
    assert!(registered[&python_node].as_array().unwrap().iter().any(|t| t == "diagnostics.noop"));
    assert!(registered[node].as_array().unwrap().iter().any(|t| t == "diagnostics.spin"));
    let queues = inspect(&["queues", "-d", node]);
    let names: Vec<&str> =
        queues[node].as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "solo"]);

    for child in [&mut ours, &mut python] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
