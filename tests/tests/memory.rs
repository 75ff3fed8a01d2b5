//! Host memory over thousands of sandboxed runs. A test binary of its own: resident memory is
//! per process, and the other integration tests would allocate beside it.

use celeriac::runtime::{Grants, RunEnv};
use celeriac_tests::{limits_ms, module, resident_bytes, run, runtime};
use serde_json::json;

#[tokio::test]
async fn thousands_of_runs_do_not_grow_host_memory() {
    let rt = runtime(false);
    let m = module(&rt, "diagnostics").await;
    let limits = limits_ms(5_000);
    let once = || {
        run(
            &rt,
            &m,
            "diagnostics.noop",
            json!([{"payload": "x".repeat(1000)}]),
            &limits,
            Grants::default(),
            RunEnv::default(),
        )
    };
    for _ in 0..500 {
        assert!(once().await.outcome.is_success());
    }
    let warm = resident_bytes();
    for _ in 0..3_000 {
        assert!(once().await.outcome.is_success());
    }
    let grown = resident_bytes().saturating_sub(warm);
    assert!(grown < 8 << 20, "resident memory grew by {grown} bytes over 3000 runs");
}
