//! What one task costs in the sandbox: a fresh instance of the `diagnostics` component from its
//! `InstancePre`, a new `Store` with limits and WASI context, the call of `noop`, and the outcome
//! classification. Run with `cargo bench -p celeriac --bench sandbox`.

use celeriac::runtime::{Grants, Invocation, Limits, RunEnv, Runtime, RuntimeConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use std::path::Path;
use std::time::Instant;

fn instantiate_and_call(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let runtime =
        Runtime::new(RuntimeConfig { max_instances: 16, ..RuntimeConfig::default() }).unwrap();
    let path = Path::new(celeriac::BUILT_TASKS_DIR).join("diagnostics.wasm");
    let module = rt.block_on(runtime.load_module(&path)).unwrap();
    let limits = Limits::default();
    let invocation = Invocation {
        id: "bench".into(),
        task: "diagnostics.noop".into(),
        args: "[1]".into(),
        kwargs: "{}".into(),
        retries: 0,
    };
    let mut group = c.benchmark_group("sandbox");
    for (label, grants) in [
        ("noop/no-grants", Grants::default()),
        ("noop/clocks+random", Grants { clocks: true, random: true, ..Grants::default() }),
    ] {
        // All iterations run inside one `block_on`, as tasks do in the worker, so the figure is
        // the sandbox's cost (store, instantiate, call, classify, drop) and not the executor's.
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let report = runtime
                            .run(&module, &invocation, &limits, grants.clone(), RunEnv::default())
                            .await;
                        assert!(report.outcome.is_success());
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, instantiate_and_call);
criterion_main!(benches);
