//! celeriac beat against a real Redis, on a clock the tests drive: beats racing with skewed
//! clocks, a leader that dies mid-run and comes back stale, Redis restarted, and the processes
//! themselves killed with SIGKILL. Every test counts fires: no tick twice, none missed beyond
//! what the entry's policy says.

use crate::faults::worker_command;
use celeriac::beat::{Beat, Entry, EntrySpec};
use celeriac::broker::{BrokerOptions, RedisBroker};
use celeriac::protocol;
use celeriac_tests::{RedisServer, celeriac_binary, repo_root};
use chrono::{DateTime, TimeDelta, Utc};
use redis::Commands as _;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

async fn broker(redis: &RedisServer) -> RedisBroker {
    RedisBroker::connect(&redis.url(0), BrokerOptions::default()).await.unwrap()
}

fn entry(name: &str, toml_text: &str) -> Entry {
    let spec: EntrySpec = toml::from_str(toml_text).unwrap();
    Entry::new(name, &spec, |_| "periodic".to_string()).unwrap()
}

/// The messages the beats pushed so far, oldest first.
fn fired(redis: &RedisServer) -> Vec<protocol::TaskMessage> {
    let mut c = redis.client(0);
    let raw: Vec<String> = c.lrange("periodic", 0, -1).unwrap();
    raw.iter().rev().map(|m| protocol::decode(m.as_bytes()).unwrap()).collect()
}

/// `dir/beat.toml` with the built example tasks and `beat` (`[beat."name"]` sections), written
/// in one step so a running beat that re-reads it never sees half of it.
fn beat_config(dir: &std::path::Path, beat: &str) -> std::path::PathBuf {
    let (config, partial) = (dir.join("beat.toml"), dir.join("beat.toml.partial"));
    std::fs::write(&partial, format!("modules = {:?}\n{beat}", celeriac::BUILT_TASKS_DIR)).unwrap();
    std::fs::rename(&partial, &config).unwrap();
    config
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Expected task ids of `e` for every tick in (from, to].
fn ids(e: &Entry, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<String> {
    e.schedule.ticks(from, to, 100_000).into_iter().map(|t| e.task_id(t)).collect()
}

/// Three beats whose clocks are up to 4 s apart tick together through an hour of minute
/// ticks: every tick fires once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_beats_with_skewed_clocks_fire_every_tick_once() {
    let redis = RedisServer::start();
    let every = entry("every-minute", "task = \"diagnostics.noop\"\nargs = [1]\nevery = \"1m\"");
    let cron = entry("quarter", "task = \"diagnostics.noop\"\nargs = [2]\ncron = \"*/15 * * * *\"");
    let mut beats = Vec::new();
    for i in 0..3 {
        let b = broker(&redis).await;
        beats.push(Beat::new(
            b,
            &format!("beat{i}"),
            vec![every.clone(), cron.clone()],
            Duration::from_secs(30),
        ));
    }
    let start = at("2026-11-23T10:00:30Z");
    let mut now = start;
    let end = at("2026-11-23T11:00:30Z");
    while now <= end {
        // Each beat's clock: 0, 2 and 4 s behind; they race for every tick.
        let ticks = beats.iter_mut().enumerate().map(|(i, b)| {
            let skewed = now - TimeDelta::seconds(2 * i as i64);
            async move { b.tick(skewed).await.unwrap() }
        });
        let reports = futures_util::future::join_all(ticks).await;
        assert_eq!(reports.iter().filter(|r| r.leader).count(), 1, "one leader at {now}");
        now += TimeDelta::seconds(7);
    }
    let got: Vec<String> = fired(&redis).into_iter().map(|m| m.id).collect();
    let mut want = ids(&every, start, end);
    want.extend(ids(&cron, start, end));
    let (mut got_sorted, mut want_sorted) = (got.clone(), want.clone());
    got_sorted.sort();
    want_sorted.sort();
    assert_eq!(got.len(), 60 + 4, "60 minute ticks and 4 quarter hours");
    assert_eq!(got_sorted, want_sorted, "each tick once, none missed");
}

/// The leader stops (as if killed with -9, its lease left behind) for three ticks: a standby
/// takes over when the lease runs out and, under `coalesce`, fires the missed ticks once. The
/// old leader, back with its stale token, fires nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_replaced_and_its_stale_token_fires_nothing() {
    let redis = RedisServer::start();
    let e = entry("minutely", "task = \"diagnostics.noop\"\nevery = \"1m\"");
    let ttl = Duration::from_millis(300);
    let mut a = Beat::new(broker(&redis).await, "a", vec![e.clone()], ttl);
    let mut b = Beat::new(broker(&redis).await, "b", vec![e.clone()], ttl);
    let t0 = at("2026-11-23T10:00:30Z");
    assert!(a.tick(t0).await.unwrap().leader);
    assert!(!b.tick(t0).await.unwrap().leader);
    assert_eq!(a.tick(at("2026-11-23T10:01:01Z")).await.unwrap().fired.len(), 1);
    // a dies. Three minute ticks pass while b waits out the lease.
    assert!(!b.tick(at("2026-11-23T10:02:01Z")).await.unwrap().leader, "the lease still holds");
    tokio::time::sleep(ttl * 2).await;
    let took_over = b.tick(at("2026-11-23T10:04:20Z")).await.unwrap();
    assert!(took_over.leader);
    assert_eq!(took_over.fired, vec![("minutely".to_string(), at("2026-11-23T10:04:00Z"))]);
    // a comes back, believing it leads: its token is stale, it fires nothing.
    let stale = a.tick(at("2026-11-23T10:05:01Z")).await.unwrap();
    assert!(!stale.leader && stale.fired.is_empty());
    assert_eq!(b.tick(at("2026-11-23T10:05:02Z")).await.unwrap().fired.len(), 1);
    let got: Vec<String> = fired(&redis).into_iter().map(|m| m.id).collect();
    let want: Vec<String> = ["10:01:00", "10:04:00", "10:05:00"]
        .iter()
        .map(|t| e.task_id(at(&format!("2026-11-23T{t}Z"))))
        .collect();
    assert_eq!(got, want, "10:02 and 10:03 coalesced into 10:04; nothing twice");
    let epoch: u64 = redis.client(0).get("celeriac:beat:epoch").unwrap();
    assert_eq!(epoch, 2, "each leader took the lease with a new epoch");
}

/// Three ticks of downtime of every beat under each policy: the restarted beat reads the last
/// tick from Redis and fires what the policy says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downtime_under_each_policy_fires_what_the_policy_says() {
    let redis = RedisServer::start();
    let spec = |missed: &str| format!("task = \"diagnostics.noop\"\nevery = \"1m\"\n{missed}");
    let entries = vec![
        entry("skip", &spec("missed = \"skip\"")),
        entry("coalesce", &spec("")),
        entry("catch-up", &spec("missed = \"catch_up\"")),
    ];
    let ttl = Duration::from_millis(200);
    let mut first = Beat::new(broker(&redis).await, "first", entries.clone(), ttl);
    first.tick(at("2026-11-23T10:00:30Z")).await.unwrap();
    first.tick(at("2026-11-23T10:01:00Z")).await.unwrap();
    drop(first); // down from 10:01 to 10:04:30
    tokio::time::sleep(ttl * 2).await;
    let mut second = Beat::new(broker(&redis).await, "second", entries, ttl);
    second.tick(at("2026-11-23T10:04:30Z")).await.unwrap();
    let by_entry: BTreeMap<String, usize> = redis.client(0).hgetall("celeriac:beat:count").unwrap();
    // 10:01 fired on time for all three; of 10:02, 10:03, 10:04: skip none, coalesce one,
    // catch_up all three.
    assert_eq!(by_entry.get("skip"), Some(&1));
    assert_eq!(by_entry.get("coalesce"), Some(&2));
    assert_eq!(by_entry.get("catch-up"), Some(&4));
    assert_eq!(fired(&redis).len(), 7);
}

/// Redis restarted (and, keeping nothing on disk, emptied): the beat takes the lease again and
/// goes on firing, with no tick twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_goes_on_after_redis_restarts() {
    let mut redis = RedisServer::start();
    let e = entry("minutely", "task = \"diagnostics.noop\"\nevery = \"1m\"");
    let mut beat = Beat::new(broker(&redis).await, "b", vec![e.clone()], Duration::from_secs(10));
    beat.tick(at("2026-11-23T10:00:30Z")).await.unwrap();
    assert_eq!(beat.tick(at("2026-11-23T10:01:01Z")).await.unwrap().fired.len(), 1);
    redis.restart();
    let mut fired_after = Vec::new();
    let mut now = at("2026-11-23T10:02:01Z");
    for _ in 0..20 {
        if let Ok(r) = beat.tick(now).await {
            fired_after.extend(r.fired);
        }
        now += TimeDelta::seconds(30);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got: Vec<String> = fired(&redis).into_iter().map(|m| m.id).collect();
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "no tick twice");
    assert!(fired_after.len() >= 8, "it went on firing: {fired_after:?}");
}

/// Two `celeriac beat` processes on the real clock, an entry every second: the leader is killed
/// with SIGKILL, the standby takes over when the lease runs out, and no second fires twice.
/// Then `celeriac beat status` names the new leader with epoch 2.
#[test]
fn killing_the_leading_beat_process_fires_nothing_twice() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let entry =
        "[beat.\"every-second\"]\ntask = \"diagnostics.noop\"\nargs = [1]\nevery = \"1s\"\n";
    let config = beat_config(dir.path(), &format!("{entry}queue = \"periodic\"\n"));
    let beat = |name: &str| {
        Command::new(celeriac_binary())
            .args(["--config", config.to_str().unwrap(), "beat", "--lease-ttl", "2s", "-n", name])
            .current_dir(repo_root())
            .env("CELERY_BROKER_URL", redis.url(0))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let first = beat("first");
    std::thread::sleep(Duration::from_millis(500));
    let second = beat("second");
    // Each beat loads the modules before it ticks, which takes a while on a busy machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let leader: String = loop {
        let leader: Option<String> = redis.client(0).get("celeriac:beat:leader").unwrap();
        match leader {
            Some(l) if fired(&redis).len() >= 2 => break l,
            _ => assert!(std::time::Instant::now() < deadline, "no beat led within 30 s"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut leading, mut standby) =
        if leader.starts_with("first#") { (first, second) } else { (second, first) };
    leading.kill().unwrap(); // SIGKILL
    leading.wait().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    // Stopped first, so the status and the queue are read at rest.
    let _ = standby.kill();
    let _ = standby.wait();
    let status = Command::new(celeriac_binary())
        .args(["--config", config.to_str().unwrap(), "beat", "status"])
        .env("CELERY_BROKER_URL", redis.url(0))
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    // The standby took the lease with epoch 2 (killed too, its lease is still there).
    assert_eq!(status["epoch"], 2, "{status}");
    assert!(status["leader"].as_str().unwrap().ends_with("#2"), "{status}");
    let got: Vec<String> = fired(&redis).into_iter().map(|m| m.id).collect();
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "no second fired twice: {got:?}");
    // About 8 s of ticks, less the lease's 2 s of failover, coalesced into one fire.
    assert!(got.len() >= 5, "it fired on both sides of the failover: {} fires", got.len());
    assert_eq!(status["entries"][0]["fired"], got.len(), "{status}");
}

/// `celeriac worker --beat` fires its entries into its own queues and runs them.
#[test]
fn a_worker_with_beat_runs_what_its_beat_fires() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = beat_config(
        dir.path(),
        "[beat.\"tick\"]\ntask = \"diagnostics.noop\"\nargs = [\"beat\"]\nevery = \"1s\"\n",
    );
    let mut worker = worker_command(&redis, &["-Q", "default", "--beat"])
        .env("CELERIAC_CONFIG", &config)
        .spawn()
        .unwrap();
    let mut results = redis.client(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ran = loop {
        let keys: Vec<String> = results.keys("celery-task-meta-*").unwrap();
        if keys.len() >= 2 {
            break keys;
        }
        assert!(std::time::Instant::now() < deadline, "the beat's tasks did not run");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = worker.kill();
    let _ = worker.wait();
    let meta: String = results.get(&ran[0]).unwrap();
    assert!(meta.contains("\"SUCCESS\"") && meta.contains("\"beat\""), "{meta}");
}

/// Two beats tick every minute through the night clocks go back in Berlin, one 3 s behind:
/// an entry at 02:30 fires once that night, a quarter-hourly one once per wall-clock quarter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dst_change_in_berlin_fires_each_wall_clock_time_once() {
    let redis = RedisServer::start();
    let berlin = "timezone = \"Europe/Berlin\"";
    let daily = entry("daily", &format!("task = \"t\"\ncron = \"30 2 * * *\"\n{berlin}"));
    let quarter = entry("quarter", &format!("task = \"t\"\ncron = \"*/15 2 * * *\"\n{berlin}"));
    let ttl = Duration::from_secs(30);
    let entries = vec![daily, quarter];
    let mut a = Beat::new(broker(&redis).await, "a", entries.clone(), ttl);
    let mut b = Beat::new(broker(&redis).await, "b", entries, ttl);
    // 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:00-02:59 happens twice.
    let mut now = at("2026-10-24T23:00:00Z");
    while now <= at("2026-10-25T03:00:00Z") {
        a.tick(now).await.unwrap();
        b.tick(now - TimeDelta::seconds(3)).await.unwrap();
        now += TimeDelta::minutes(1);
    }
    let count: BTreeMap<String, usize> = redis.client(0).hgetall("celeriac:beat:count").unwrap();
    assert_eq!(count.get("daily"), Some(&1), "02:30 once");
    assert_eq!(count.get("quarter"), Some(&4), "02:00, 02:15, 02:30, 02:45 once each");
    let ids: Vec<String> = fired(&redis).into_iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 5);
}

/// SIGHUP makes a running `celeriac beat` re-read its configuration: a changed entry fires
/// from the next tick on, and an invalid file is refused (logged) while the entries stay.
#[test]
fn sighup_reloads_the_beat_entries_and_refuses_an_invalid_file() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let write = |queue: &str| {
        let entry = "[beat.\"tick\"]\ntask = \"diagnostics.noop\"\nevery = \"1s\"\n";
        beat_config(dir.path(), &format!("{entry}queue = \"{queue}\"\n"))
    };
    let config = write("first");
    let log = dir.path().join("beat.log");
    let mut beat = Command::new(celeriac_binary())
        .args(["--config", config.to_str().unwrap(), "beat"])
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERIAC_CACHE", celeriac_tests::test_cache_dir())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut c = redis.client(0);
    let waiting = |c: &mut redis::Connection, queue: &str| -> u64 { c.llen(queue).unwrap() };
    let until =
        |c: &mut redis::Connection, what: &str, done: &dyn Fn(&mut redis::Connection) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !done(c) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: {}",
                    std::fs::read_to_string(&log).unwrap()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
    until(&mut c, "no fire on the first queue", &|c| waiting(c, "first") >= 1);

    write("second");
    let hup = |pid: u32| {
        assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    };
    hup(beat.id());
    until(&mut c, "the reloaded entry did not fire", &|c| waiting(c, "second") >= 2);
    let first = waiting(&mut c, "first");

    std::fs::write(&config, "[beat.\"tick\"]\ntask = \"diagnostics.noop\"\nevery = \"often\"\n")
        .unwrap();
    hup(beat.id());
    let before = waiting(&mut c, "second");
    until(&mut c, "the entries did not stay", &|c| waiting(c, "second") >= before + 2);
    assert_eq!(waiting(&mut c, "first"), first, "the old entry fired after the reload");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("beat configuration reload refused") && text.contains("often"), "{text}");
    assert!(beat.try_wait().unwrap().is_none(), "the beat stopped: {text}");
    let _ = beat.kill();
    let _ = beat.wait();
}
