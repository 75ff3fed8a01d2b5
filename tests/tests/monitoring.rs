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
    let noop_here = [("name", "diagnostics.noop"), ("hostname", host.as_str())];
    assert_eq!(got("celeriac_task_succeeded_total", &noop_here), 1.0);
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
    // celeriac's producers stamp the send time: queue wait per task, and the oldest age.
    assert_eq!(got("celeriac_task_queue_wait_seconds_count", &noop), 1.0);
    let oldest = got("celeriac_oldest_message_age_seconds", &[("queue_name", "default")]);
    assert!(oldest > 0.0 && oldest < 60.0, "{oldest}");

    assert!(got("celeriac_task_instantiate_seconds_count", &[("name", "diagnostics.noop")]) >= 1.0);
    assert_eq!(got("celeriac_broker_reconnects_total", &[]), 0.0);

    // The slot back: the sleeper is stopped.
    celeriac::control::broadcast_revoke(&b, std::slice::from_ref(&slow), true).await.unwrap();
    let (state, _) = client::wait(&r, &slow, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state, "REVOKED");

    // A global rate limit of one a minute: the second task waits, and is counted waiting.
    let set = celeriac::control::ask(
        &b,
        "rate_limit",
        json!({"task_name": "diagnostics.fail", "rate_limit": "1/m"}),
        None,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(set.values().all(|r| r.get("ok").is_some()), "{set:?}");
    let first = enqueue(&b, "diagnostics.fail", json!(["one"]), "default").await;
    client::wait(&r, &first, Duration::from_secs(30)).await.unwrap();
    enqueue(&b, "diagnostics.fail", json!(["two"]), "default").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = Instant::now();
    let waits = loop {
        let samples = parse_metrics(&scrape(Some("s3cret")).1);
        let name = [("name", "diagnostics.fail")];
        if let Some(n) = sample(&samples, "celeriac_task_rate_limit_wait_seconds_count", &name) {
            break (n, sample(&samples, "celeriac_task_rate_limit_wait_seconds_sum", &name));
        }
        assert!(Instant::now() < deadline, "no rate-limit wait was counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(waits.0 >= 1.0 && waits.1.is_some_and(|s| s > 1.0), "{waits:?}");
    eprintln!("the rate-limit wait was counted after {:?}", started.elapsed());

    // Redis restarted: the worker's connection is made again and counted, even when the
    // connection's own retries span the outage and no fetch ever fails.
    let mut redis = redis;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = scrape(Some("s3cret"));
        assert_eq!(status, 200, "{text}");
        let samples = parse_metrics(&text);
        if sample(&samples, "celeriac_broker_reconnects_total", &[]).is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no reconnect was counted: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Redis gone: not ready, still alive.
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

/// A line reader over a child's stdout that gives up after a deadline instead of blocking.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads `lines` until one satisfies `check`, for at most 30 s.
fn until_line(lines: &std::sync::mpsc::Receiver<String>, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if check(&line) => return,
            Ok(_) => {}
            Err(_) => panic!("no {what} within 30 s"),
        }
    }
}

/// `celeriac events` tails the workers' events, raw or as `celery events --dump` prints them;
/// `celeriac status` shows each queue per priority with its oldest message's age and dead
/// letters, and the live workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celeriac_events_and_status_show_the_broker_at_a_glance() {
    let redis = RedisServer::start();
    let cli = |args: &[&str]| {
        let mut command = Command::new(celeriac_tests::celeriac_binary());
        command
            .args(args)
            .current_dir(repo_root())
            .env("CELERY_BROKER_URL", redis.url(0))
            .env("CELERY_RESULT_BACKEND", redis.url(1))
            .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
            .stdout(Stdio::piped());
        command
    };
    let node = "celeriac@glance";
    let mut worker =
        worker_command(&redis, &["-n", node, "-Q", "default", "-c", "2"]).spawn().unwrap();
    let mut raw_tail = cli(&["events", "--json"]).spawn().unwrap();
    let mut dump_tail = cli(&["events"]).spawn().unwrap();
    let (raw, dump) = (lines_of(&mut raw_tail), lines_of(&mut dump_tail));
    // A heartbeat seen means the worker knows someone listens, so it sends task events.
    for lines in [&raw, &dump] {
        until_line(lines, "heartbeat", |l| {
            l.contains("worker-heartbeat") || l.contains("worker heartbeat")
        });
    }
    let b = broker(&redis, Duration::from_secs(30)).await;
    let r = results(&redis).await;
    let id = enqueue(&b, "diagnostics.noop", json!([3]), "default").await;
    client::wait(&r, &id, Duration::from_secs(30)).await.unwrap();
    until_line(&raw, "task-succeeded", |l| {
        serde_json::from_str::<Value>(l).is_ok_and(|e| {
            e["type"] == "task-succeeded" && e["uuid"] == id.as_str() && e["hostname"] == node
        })
    });
    let described = format!("{node} ");
    let succeeded = format!("task succeeded: diagnostics.noop({id}) args=(3,) kwargs={{}}");
    until_line(&dump, "a dumped task-succeeded", |l| {
        l.starts_with(&described) && l.contains(&succeeded)
    });
    for tail in [&mut raw_tail, &mut dump_tail] {
        let _ = tail.kill();
        let _ = tail.wait();
    }

    // Nothing consumes `celery` here: two messages wait there, at two priorities.
    for priority in [0, 9] {
        let opts = NewTask { priority: Some(priority), ..NewTask::default() };
        client::enqueue(&b, "diagnostics.noop", &json!([]), &json!({}), "celery", &opts)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = cli(&["status"]).output().unwrap();
    let _ = worker.kill();
    let _ = worker.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = |first: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(first))
            .unwrap_or_else(|| panic!("no {first} row:\n{text}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    // QUEUE WAITING P0 P3 P6 P9 OLDEST DEAD
    let celery = row("celery");
    assert_eq!(&celery[1..6], ["2", "1", "0", "0", "1"], "{text}");
    assert!(celery[6].ends_with('s') && celery[6] != "0s", "{text}");
    assert_eq!(celery[7], "0", "{text}");
    assert_eq!(row("default")[1], "0", "{text}");
    // WORKER ACTIVE SLOTS PROCESSED QUEUES
    assert_eq!(row(node)[1..], ["0", "2", "1", "default"], "{text}");
}

/// Headless Chromium (Debian's `chromium`) on `url`: the DOM once the page's scripts ran, and a
/// screenshot saved to `target/test-artifacts/<shot>`.
fn chromium(url: &str, shot: &str) -> String {
    let artifacts = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: &[String]| {
        // No sandbox (tests may run as root); no background traffic (the network is closed).
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
            ])
            .args([
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .args(["--hide-scrollbars", "--window-size=1280,800", "--virtual-time-budget=5000"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .stderr(Stdio::null())
            .output()
            .expect("run chromium (apt-get install chromium)");
        assert!(out.status.success(), "chromium failed on {url}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let png = artifacts.join(shot);
    let _ = std::fs::remove_file(&png);
    run(&[format!("--screenshot={}", png.display())]);
    let image = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot of {url}: {e}"));
    assert!(image.starts_with(b"\x89PNG") && image.len() > 10_000, "{} is no page", png.display());
    let dom = run(&["--dump-dom".to_string()]);
    std::fs::write(png.with_extension("html"), &dom).unwrap();
    dom
}

/// The words a page shows, tags removed and spaces squeezed.
fn shown(dom: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Flower's dashboard and worker page, rendered by a real browser, show a celeriac worker and
/// what it ran; the screenshots stay in target/test-artifacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowers_pages_in_chromium_show_a_celeriac_worker() {
    let redis = RedisServer::start();
    let flower = Flower::start(&redis);
    let node = "celeriac@dashboard";
    let mut worker =
        worker_command(&redis, &["-n", node, "-Q", "default", "-c", "2"]).spawn().unwrap();
    flower.until("the worker online in Flower", 30, || {
        (flower.get("/api/workers?status=true")[node] == true).then_some(())
    });
    let (b, r) = (broker(&redis, Duration::from_secs(30)).await, results(&redis).await);
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(enqueue(&b, "diagnostics.noop", json!([n]), "default").await);
    }
    ids.push(enqueue(&b, "diagnostics.fail", json!(["boom"]), "default").await);
    for id in &ids {
        client::wait(&r, id, Duration::from_secs(30)).await.unwrap();
    }
    flower.until("the four tasks in Flower", 10, || {
        let t = flower.get("/api/tasks");
        ids.iter()
            .all(|id| t[id]["state"] == "SUCCESS" || t[id]["state"] == "FAILURE")
            .then_some(())
    });
    let base = format!("http://127.0.0.1:{}", flower.port);

    let dom = chromium(&format!("{base}/"), "flower-dashboard.png");
    let text = shown(&dom);
    // The worker's row links to its page.
    let link = format!("href=\"/worker/{}\"", node.replace('@', "%40"));
    assert!(dom.contains(&link), "no {link} in the dashboard: {text}");
    for seen in ["Online workers 1", "Succeeded 3", "Failed 1", "Online 0 4 1 3"] {
        assert!(text.contains(seen), "the dashboard does not show {seen:?}: {text}");
    }

    let dom = chromium(&format!("{base}/worker/{node}"), "flower-worker.png");
    let text = shown(&dom);
    for seen in
        [node, "Celeriac:wasm", "Max concurrency 2", "diagnostics.noop 3", "diagnostics.fail 1"]
    {
        assert!(text.contains(seen), "the worker page does not show {seen:?}: {text}");
    }
    let _ = worker.kill();
    let _ = worker.wait();
}
