//! What one task costs in the sandbox: a fresh instance of the `diagnostics` component from its
//! `InstancePre`, a new `Store` with limits and WASI context, the call of `noop`, and the outcome
//! classification. Run with `cargo bench -p celeriac --bench sandbox`. When
//! `scripts/build-lang-tasks` has built them, the Python and JavaScript no-ops (`py.noop`,
//! `js.noop` in `target/lang-tasks`) are measured the same way, each in a pool sized for it.

use celeriac::runtime::{Grants, Invocation, Limits, Module, RunEnv, Runtime, RuntimeConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn invocation(task: &str) -> Invocation {
    Invocation {
        id: "bench".into(),
        task: task.into(),
        args: "[1]".into(),
        kwargs: "{}".into(),
        retries: 0,
    }
}

/// Times `iters` runs inside one `block_on`, as tasks run in the worker, so the figure is the
/// sandbox's cost (store, instantiate, call, classify, drop) and not the executor's.
fn time_runs(
    rt: &tokio::runtime::Runtime,
    runtime: &Runtime,
    module: &Module,
    invocation: &Invocation,
    limits: &Limits,
    grants: &Grants,
    iters: u64,
) -> std::time::Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let report =
                runtime.run(module, invocation, limits, grants.clone(), RunEnv::default()).await;
            assert!(report.outcome.is_success(), "{:?}", report.outcome);
        }
        start.elapsed()
    })
}

fn instantiate_and_call(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let runtime =
        Runtime::new(RuntimeConfig { max_instances: 16, ..RuntimeConfig::default() }).unwrap();
    let path = Path::new(celeriac::BUILT_TASKS_DIR).join("diagnostics.wasm");
    let module = rt.block_on(runtime.load_module(&path)).unwrap();
    let limits = Limits::default();
    let noop = invocation("diagnostics.noop");
    let mut group = c.benchmark_group("sandbox");
    for (label, grants) in [
        ("noop/no-grants", Grants::default()),
        ("noop/clocks+random", Grants { clocks: true, random: true, ..Grants::default() }),
    ] {
        group.bench_function(label, |b| {
            b.iter_custom(|iters| time_runs(&rt, &runtime, &module, &noop, &limits, &grants, iters))
        });
    }
    // Interpreted components, with the limits they get by default (256 MiB, no fuel).
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lang-tasks");
    for (file, task) in [("py_checks.wasm", "py.noop"), ("js_checks.wasm", "js.noop")] {
        let path: PathBuf = built.join(file);
        let Ok(wasm) = std::fs::read(&path) else { continue };
        let footprint = celeriac::runtime::footprint(&wasm).unwrap();
        let runtime = Runtime::new(RuntimeConfig {
            max_instances: 16,
            max_memory: 256 << 20,
            footprint,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let module = rt.block_on(runtime.load_module(&path)).unwrap();
        let limits = Limits { memory: 256 << 20, ..Limits::default() };
        let call = invocation(task);
        let grants = Grants::default();
        group.bench_function(task, |b| {
            b.iter_custom(|iters| time_runs(&rt, &runtime, &module, &call, &limits, &grants, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, instantiate_and_call);
criterion_main!(benches);
