//! Shared helpers for celeriac's integration tests (in `tests/`).

use celeriac::runtime::{
    Grants, Invocation, Limits, Module, RunEnv, RunReport, Runtime, RuntimeConfig,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The compiled-module cache the tests share, so each component is compiled once per checkout.
pub fn test_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-module-cache")
}

/// A runtime sized for tests, with fuel metering compiled in when `fuel` is set.
pub fn runtime(fuel: bool) -> Arc<Runtime> {
    Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: 16,
            max_memory: 256 << 20,
            fuel,
            cache_dir: Some(test_cache_dir()),
        })
        .expect("build runtime"),
    )
}

/// Loads a component built by the workspace: `tasks/<name>.wasm` or `fixtures/<name>.wasm`.
pub async fn module(runtime: &Runtime, name: &str) -> Module {
    let tasks = Path::new(celeriac::BUILT_TASKS_DIR).join(format!("{name}.wasm"));
    let path = if tasks.exists() {
        tasks
    } else {
        Path::new(celeriac::BUILT_FIXTURES_DIR).join(format!("{name}.wasm"))
    };
    runtime.load_module(&path).await.unwrap_or_else(|e| panic!("load {}: {e:#}", path.display()))
}

/// An invocation of `task` with JSON `args`.
pub fn invocation(task: &str, args: serde_json::Value) -> Invocation {
    Invocation {
        id: format!("test-{task}"),
        task: task.to_string(),
        args: args.to_string(),
        kwargs: "{}".to_string(),
        retries: 0,
    }
}

/// Limits with a hard limit in milliseconds and everything else default.
pub fn limits_ms(hard: u64) -> Limits {
    Limits { hard_time_limit: Duration::from_millis(hard), ..Limits::default() }
}

/// Runs `task` with `args` under `limits` and `grants`.
pub async fn run(
    runtime: &Runtime,
    module: &Module,
    task: &str,
    args: serde_json::Value,
    limits: &Limits,
    grants: Grants,
    env: RunEnv,
) -> RunReport {
    runtime.run(module, &invocation(task, args), limits, grants, env).await
}

/// Resident memory of this process in bytes (Linux).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
