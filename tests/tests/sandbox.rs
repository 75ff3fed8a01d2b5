//! The sandbox holds against hostile guests: time limits, memory, stack, traps, result size,
//! filesystem escapes, capabilities not granted, modules of the wrong shape.

use celeriac::kv::KvStore;
use celeriac::runtime::{Compiled, Grants, Limits, Outcome, Preopen, RunEnv, Signals};
use celeriac_tests::{limits_ms, module, run, runtime};
use serde_json::json;
use std::time::Duration;

/// How late a limit may fire on this 2-core machine under a debug-built host. The guest checks its
/// deadline every epoch tick (2 ms); the rest is scheduling noise.
const SLACK: Duration = Duration::from_millis(250);

#[tokio::test]
async fn infinite_loop_stops_at_the_hard_limit() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let limits = limits_ms(300);
    let r = run(&rt, &m, "hostile.loop", json!([]), &limits, Grants::default(), RunEnv::default())
        .await;
    assert_eq!(r.outcome, Outcome::HardTimeLimit { limit: Duration::from_millis(300) });
    assert!(r.wall >= Duration::from_millis(300), "stopped early: {:?}", r.wall);
    assert!(r.wall < Duration::from_millis(300) + SLACK, "stopped late: {:?}", r.wall);
}

#[tokio::test]
async fn cooperative_task_ends_cleanly_at_the_soft_limit() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let limits = Limits { soft_time_limit: Some(Duration::from_millis(150)), ..limits_ms(5_000) };
    let grants = Grants { kv: Some("ns".into()), ..Grants::default() };
    let env = RunEnv { kv: Some(KvStore::memory()), ..RunEnv::default() };
    let r = run(&rt, &m, "hostile.cooperative", json!([]), &limits, grants, env).await;
    let Outcome::SoftTimeLimit { message } = &r.outcome else {
        panic!("expected soft time limit, got {:?}", r.outcome)
    };
    assert!(message.starts_with("SoftTimeLimitExceeded: stopped after"), "{message}");
    assert!(r.wall >= Duration::from_millis(150));
    assert!(r.wall < Duration::from_millis(150) + SLACK, "ended late: {:?}", r.wall);
}

#[tokio::test]
async fn task_ignoring_cancelled_is_stopped_at_the_hard_limit() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let limits = Limits { soft_time_limit: Some(Duration::from_millis(100)), ..limits_ms(400) };
    let r = run(&rt, &m, "hostile.loop", json!([]), &limits, Grants::default(), RunEnv::default())
        .await;
    assert_eq!(r.outcome, Outcome::HardTimeLimit { limit: Duration::from_millis(400) });
    assert!(r.wall < Duration::from_millis(400) + SLACK, "stopped late: {:?}", r.wall);
}

#[tokio::test]
async fn sleeping_task_is_stopped_at_the_hard_limit() {
    // A guest blocked in a WASI sleep is not at an epoch check: the outer timeout catches it.
    let rt = runtime(false);
    let m = module(&rt, "diagnostics").await;
    let grants = Grants { clocks: true, ..Grants::default() };
    let r = run(
        &rt,
        &m,
        "diagnostics.sleep",
        json!([10_000]),
        &limits_ms(300),
        grants,
        RunEnv::default(),
    )
    .await;
    assert_eq!(r.outcome.kind(), "hard_time_limit");
    assert!(r.wall < Duration::from_millis(300) + SLACK, "stopped late: {:?}", r.wall);
}

#[tokio::test]
async fn memory_bomb_ends_as_memory_limit_and_the_host_is_unharmed() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let limits = Limits { memory: 16 << 20, ..limits_ms(10_000) };
    let r = run(
        &rt,
        &m,
        "hostile.memory_bomb",
        json!([]),
        &limits,
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::MemoryLimit { limit: 16 << 20 });
    assert!(r.peak_memory <= 16 << 20, "peak {} above the cap", r.peak_memory);
    // The same runtime keeps serving.
    let d = module(&rt, "diagnostics").await;
    let ok =
        run(&rt, &d, "diagnostics.noop", json!([7]), &limits, Grants::default(), RunEnv::default())
            .await;
    assert_eq!(ok.outcome, Outcome::Success { result: "7".into() });
}

#[tokio::test]
async fn deep_recursion_traps_with_a_stack_overflow() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let r = run(
        &rt,
        &m,
        "hostile.recurse",
        json!([1]),
        &limits_ms(10_000),
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    let Outcome::Trap { message, .. } = &r.outcome else { panic!("got {:?}", r.outcome) };
    assert!(message.contains("call stack exhausted"), "{message}");
    let again = run(
        &rt,
        &m,
        "hostile.count",
        json!([10]),
        &limits_ms(10_000),
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert!(again.outcome.is_success(), "{:?}", again.outcome);
}

#[tokio::test]
async fn deep_recursion_with_big_frames_overflows_the_guest_stack_and_traps() {
    // A Rust guest keeps big frames on its shadow stack in linear memory; running off its bottom
    // is an out-of-bounds access inside the sandbox, never outside it.
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let r = run(
        &rt,
        &m,
        "hostile.recurse_with_frames",
        json!([1]),
        &limits_ms(10_000),
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    let Outcome::Trap { message, .. } = &r.outcome else { panic!("got {:?}", r.outcome) };
    assert!(message.contains("out of bounds memory access"), "{message}");
}

#[tokio::test]
async fn panic_is_a_trap_with_its_message_and_a_wasm_backtrace() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let r = run(
        &rt,
        &m,
        "hostile.panic",
        json!(["the disk is on fire"]),
        &limits_ms(10_000),
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    let Outcome::Trap { message, backtrace } = &r.outcome else { panic!("got {:?}", r.outcome) };
    assert!(message.contains("unreachable"), "{message}");
    assert!(message.contains("the disk is on fire"), "{message}");
    let backtrace = backtrace.as_deref().expect("a backtrace");
    assert!(backtrace.contains("hostile"), "{backtrace}");
}

#[tokio::test]
async fn result_over_the_cap_is_refused() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let limits = Limits { max_result: 1 << 20, ..limits_ms(10_000) };
    let r = run(
        &rt,
        &m,
        "hostile.big_result",
        json!([2 << 20]),
        &limits,
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::ResultTooLarge { size: (2 << 20) + 2, limit: 1 << 20 });
    let small = run(
        &rt,
        &m,
        "hostile.big_result",
        json!([10]),
        &limits,
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert_eq!(small.outcome, Outcome::Success { result: "\"xxxxxxxxxx\"".into() });
}

#[tokio::test]
async fn filesystem_is_only_the_preopened_folder() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let outside = tempfile::tempdir().unwrap();
    let data = outside.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("inside.txt"), "inside").unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), data.join("link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", data.join("relative-link")).unwrap();
    let grants = Grants {
        preopens: vec![Preopen { host: data.clone(), guest: "/data".into(), writable: true }],
        ..Grants::default()
    };
    let read = |path: &str| {
        let (rt, m, grants) = (&rt, &m, grants.clone());
        let path = path.to_string();
        async move {
            let r = run(
                rt,
                m,
                "hostile.read_file",
                json!([path]),
                &limits_ms(10_000),
                grants,
                RunEnv::default(),
            )
            .await;
            let Outcome::Success { result } = r.outcome else { panic!("got {:?}", r.outcome) };
            serde_json::from_str::<serde_json::Value>(&result).unwrap()
        }
    };
    assert_eq!(read("/data/inside.txt").await, json!({"Ok": "inside"}));
    for escape in
        ["/data/../secret.txt", "/data/link", "/data/relative-link", "/etc/passwd", "../secret.txt"]
    {
        let got = read(escape).await;
        assert!(got.get("Err").is_some(), "{escape} was readable: {got}");
    }
    let w = run(
        &rt,
        &m,
        "hostile.write_file",
        json!(["/data/../escaped.txt"]),
        &limits_ms(10_000),
        grants.clone(),
        RunEnv::default(),
    )
    .await;
    assert!(
        matches!(&w.outcome, Outcome::Success { result } if result.contains("Err")),
        "{:?}",
        w.outcome
    );
    assert!(!outside.path().join("escaped.txt").exists());
    // Without the grant nothing at all is visible.
    let none = run(
        &rt,
        &m,
        "hostile.read_file",
        json!(["/data/inside.txt"]),
        &limits_ms(10_000),
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert!(
        matches!(&none.outcome, Outcome::Success { result } if result.contains("Err")),
        "{:?}",
        none.outcome
    );
}

#[tokio::test]
async fn read_only_preopen_refuses_writes() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let dir = tempfile::tempdir().unwrap();
    let grants = Grants {
        preopens: vec![Preopen { host: dir.path().into(), guest: "/ro".into(), writable: false }],
        ..Grants::default()
    };
    let r = run(
        &rt,
        &m,
        "hostile.write_file",
        json!(["/ro/new.txt"]),
        &limits_ms(10_000),
        grants,
        RunEnv::default(),
    )
    .await;
    assert!(
        matches!(&r.outcome, Outcome::Success { result } if result.contains("Err")),
        "{:?}",
        r.outcome
    );
    assert!(!dir.path().join("new.txt").exists());
}

#[tokio::test]
async fn kv_works_only_when_granted() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let kv = KvStore::memory();
    let env = RunEnv { kv: Some(kv.clone()), ..RunEnv::default() };
    let denied = run(
        &rt,
        &m,
        "hostile.kv_roundtrip",
        json!(["k", "v"]),
        &limits_ms(10_000),
        Grants::default(),
        env.clone(),
    )
    .await;
    assert!(
        matches!(&denied.outcome, Outcome::Failed { exc_type, message } if exc_type == "PermissionError" && message.contains("not granted kv")),
        "{:?}",
        denied.outcome
    );
    assert_eq!(kv.len("ns"), 0);
    let grants = Grants { kv: Some("ns".into()), ..Grants::default() };
    let ok =
        run(&rt, &m, "hostile.kv_roundtrip", json!(["k", "v"]), &limits_ms(10_000), grants, env)
            .await;
    assert_eq!(ok.outcome, Outcome::Success { result: "\"v\"".into() });
    assert_eq!(kv.get("ns", "k").await.unwrap(), Some(b"v".to_vec()));
}

#[tokio::test]
async fn enqueue_accepts_only_allowed_names_and_defers_children_to_success() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let grants = Grants { enqueue: vec!["diagnostics.*".into()], ..Grants::default() };
    let denied = run(
        &rt,
        &m,
        "hostile.enqueue",
        json!(["hostile.loop"]),
        &limits_ms(10_000),
        grants.clone(),
        RunEnv::default(),
    )
    .await;
    assert_eq!(denied.outcome.kind(), "failure", "{:?}", denied.outcome);
    assert!(denied.children.is_empty());
    let ok = run(
        &rt,
        &m,
        "hostile.enqueue",
        json!(["diagnostics.noop"]),
        &limits_ms(10_000),
        grants,
        RunEnv::default(),
    )
    .await;
    let Outcome::Success { result } = &ok.outcome else { panic!("got {:?}", ok.outcome) };
    assert_eq!(ok.children.len(), 1);
    assert_eq!(ok.children[0].name, "diagnostics.noop");
    assert_eq!(ok.children[0].args, json!([1]));
    assert_eq!(result, &format!("\"{}\"", ok.children[0].id));
}

/// A chain, group or chord of children goes through the same grant as one child: a workflow
/// with one name the task may not send is refused whole, and nothing of it is sent.
#[tokio::test]
async fn workflows_of_children_need_every_name_granted_and_go_whole_or_not_at_all() {
    let rt = runtime(false);
    let m = module(&rt, "diagnostics").await;
    let limits = limits_ms(10_000);
    let fanout = |grants: Vec<&str>, args: serde_json::Value| {
        let grants = Grants {
            enqueue: grants.into_iter().map(str::to_string).collect(),
            ..Grants::default()
        };
        run(&rt, &m, "diagnostics.fanout", args, &limits, grants, RunEnv::default())
    };
    // The body's name is not granted: the whole chord is refused.
    let denied = fanout(vec!["diagnostics.add"], json!(["chord", 3])).await;
    assert_eq!(denied.outcome.kind(), "failure", "{:?}", denied.outcome);
    assert!(format!("{:?}", denied.outcome).contains("may not enqueue diagnostics.tsum"));
    assert!(denied.workflows.is_empty() && denied.children.is_empty());
    let ok = fanout(vec!["diagnostics.add", "diagnostics.tsum"], json!(["chord", 3])).await;
    let Outcome::Success { result } = &ok.outcome else { panic!("got {:?}", ok.outcome) };
    let ids: Vec<String> = serde_json::from_str(result.as_str()).unwrap();
    assert_eq!(ok.workflows.len(), 1);
    assert_eq!(ok.workflows[0].ids, ids, "four ids: three parts, then the body");
    assert_eq!(ok.workflows[0].signature["subtask_type"], "chord");
}

#[tokio::test]
async fn fuel_is_reported_and_enforced() {
    let rt = runtime(true);
    let m = module(&rt, "hostile").await;
    let limits = Limits { fuel: Some(10_000_000), ..limits_ms(10_000) };
    let small = run(
        &rt,
        &m,
        "hostile.count",
        json!([1_000]),
        &limits,
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert!(small.outcome.is_success(), "{:?}", small.outcome);
    let used_small = small.fuel_used.expect("fuel reported");
    let bigger = run(
        &rt,
        &m,
        "hostile.count",
        json!([100_000]),
        &limits,
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert!(bigger.fuel_used.unwrap() > used_small * 10, "{:?} vs {used_small}", bigger.fuel_used);
    let starved = run(
        &rt,
        &m,
        "hostile.count",
        json!([1u64 << 40]),
        &limits,
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert_eq!(starved.outcome, Outcome::OutOfFuel { budget: 10_000_000 });
}

#[tokio::test]
async fn clocks_are_frozen_unless_granted() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let frozen = run(
        &rt,
        &m,
        "hostile.wall_clock",
        json!([]),
        &limits_ms(10_000),
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert_eq!(frozen.outcome, Outcome::Success { result: "0".into() });
    let grants = Grants { clocks: true, ..Grants::default() };
    let real = run(
        &rt,
        &m,
        "hostile.wall_clock",
        json!([]),
        &limits_ms(10_000),
        grants,
        RunEnv::default(),
    )
    .await;
    let Outcome::Success { result } = real.outcome else { panic!() };
    assert!(result.parse::<u64>().unwrap() > 1_700_000_000);
}

#[tokio::test]
async fn terminate_stops_a_running_task() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let signals = Signals::default();
    let env = RunEnv { signals: signals.clone(), ..RunEnv::default() };
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        signals.terminate();
    });
    let r =
        run(&rt, &m, "hostile.loop", json!([]), &limits_ms(10_000), Grants::default(), env).await;
    stopper.await.unwrap();
    assert_eq!(r.outcome, Outcome::Terminated);
    assert!(r.wall < Duration::from_secs(2));
}

#[tokio::test]
async fn component_of_the_wrong_world_is_rejected_at_load() {
    let rt = runtime(false);
    let dir = tempfile::tempdir().unwrap();
    // Imports an interface celeriac does not provide.
    let foreign = dir.path().join("foreign.wasm");
    std::fs::write(
        &foreign,
        r#"(component (import "evil:net/socket" (instance (export "connect" (func)))))"#,
    )
    .unwrap();
    let e = rt.load_module(&foreign).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("foreign.wasm") && msg.contains("evil:net/socket"), "{msg}");
    // Imports nothing and exports nothing: `describe` and `run` are missing.
    let empty = dir.path().join("empty.wasm");
    std::fs::write(&empty, "(component)").unwrap();
    let msg = format!("{:#}", rt.load_module(&empty).await.unwrap_err());
    assert!(msg.contains("empty.wasm") && msg.contains("describe"), "{msg}");
    // Not wasm at all.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\x00asm\x0d\x00\x01\x00garbage").unwrap();
    let msg = format!("{:#}", rt.load_module(&junk).await.unwrap_err());
    assert!(
        msg.contains("junk.wasm") && msg.contains("not a valid WebAssembly component"),
        "{msg}"
    );
}

/// A small runtime caching compiled modules in `dir`, and the diagnostics component.
fn with_disk_cache(
    dir: &std::path::Path,
) -> (celeriac::runtime::RuntimeConfig, std::path::PathBuf) {
    let config = celeriac::runtime::RuntimeConfig {
        max_instances: 4,
        cache_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    (config, std::path::Path::new(celeriac::BUILT_TASKS_DIR).join("diagnostics.wasm"))
}

#[tokio::test]
async fn compiled_modules_are_reused_from_the_disk_cache() {
    let cache = tempfile::tempdir().unwrap();
    let (config, path) = with_disk_cache(cache.path());
    let first = celeriac::runtime::Runtime::new(config.clone()).unwrap();
    assert_eq!(first.load_module(&path).await.unwrap().compiled, Compiled::Fresh);
    drop(first);
    let second = celeriac::runtime::Runtime::new(config).unwrap();
    let m = second.load_module(&path).await.unwrap();
    assert_eq!(m.compiled, Compiled::FromCache);
    let r = run(
        &second,
        &m,
        "diagnostics.noop",
        json!(["cached"]),
        &limits_ms(5_000),
        Grants::default(),
        RunEnv::default(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Success { result: "\"cached\"".into() });
}

/// Cached native code is loaded without further checks, so a cache another user could have
/// written is neither read nor written: the module is compiled afresh and the reason given.
#[tokio::test]
async fn a_module_cache_other_users_could_write_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let cache = tempfile::tempdir().unwrap();
    let (config, path) = with_disk_cache(cache.path());
    let load = || async {
        let rt = celeriac::runtime::Runtime::new(config.clone()).unwrap();
        rt.load_module(&path).await.unwrap().compiled
    };
    assert_eq!(load().await, Compiled::Fresh);
    let entry = std::fs::read_dir(cache.path()).unwrap().next().unwrap().unwrap().path();
    let chmod = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };

    // A world-writable folder: anyone could have swapped the file.
    chmod(cache.path(), 0o777);
    let Compiled::CacheRefused(why) = load().await else { panic!("a 0777 cache was used") };
    assert!(why.contains("mode 777") && why.contains("chmod go-w"), "{why}");

    // A group-writable file in a sound folder.
    chmod(cache.path(), 0o700);
    chmod(&entry, 0o664);
    let Compiled::CacheRefused(why) = load().await else { panic!("a 0664 entry was used") };
    assert!(why.contains(&entry.display().to_string()) && why.contains("mode 664"), "{why}");

    // Put right, it is used again.
    chmod(&entry, 0o644);
    assert_eq!(load().await, Compiled::FromCache);

    // Owned by another user (only root can give a file away, as it can on a shared volume).
    if std::os::unix::fs::chown(&entry, Some(65534), None).is_ok() {
        let Compiled::CacheRefused(why) = load().await else { panic!("a foreign entry was used") };
        assert!(why.contains("owned by uid 65534"), "{why}");
    }
}

#[tokio::test]
async fn the_resource_table_cap_bounds_open_handles() {
    let rt = runtime(false);
    let m = module(&rt, "hostile").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    let grants = Grants {
        preopens: vec![Preopen { host: dir.path().into(), guest: "/d".into(), writable: false }],
        ..Grants::default()
    };
    let open = |cap: usize| {
        let (rt, m, grants) = (&rt, &m, grants.clone());
        async move {
            let limits = Limits { max_resources: cap, ..limits_ms(10_000) };
            run(
                rt,
                m,
                "hostile.open_many",
                json!(["/d/f", 200]),
                &limits,
                grants,
                RunEnv::default(),
            )
            .await
        }
    };
    let generous = open(1_000).await;
    assert_eq!(generous.outcome, Outcome::Success { result: "[200,null]".into() });
    // Past the cap wasmtime-wasi refuses the new handle by stopping the guest.
    let capped = open(50).await;
    let Outcome::Trap { message, .. } = &capped.outcome else { panic!("got {:?}", capped.outcome) };
    assert_eq!(message, "resource table has no free keys");
}
