//! Per-instance resource caps and the engine-wide constants they rest on.

use std::time::Duration;

/// How often the engine's epoch advances. Every running instance checks its deadlines and yields
/// to the scheduler once per tick, so this bounds how late a hard limit can fire while a guest is
/// computing, and how long one guest can hold a thread before the others get a turn. 2 ms keeps
/// a round over 64 busy slots on 2 cores near 64 ms, well below any sensible time limit, while
/// the cost of one check per tick stays invisible next to the task's work.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Wasm stack a guest may use before it traps with a stack overflow (deep recursion).
pub const MAX_WASM_STACK: usize = 1 << 20;

/// Native stack of each async fiber; must exceed `MAX_WASM_STACK` with room for host frames.
pub const ASYNC_STACK: usize = 2 << 20;

/// Longest the host waits past the hard limit for a guest that is blocked in a host call
/// before it abandons the call. A computing guest is stopped at the next epoch tick instead.
pub const HARD_LIMIT_GRACE: Duration = Duration::from_millis(100);

/// Bytes of each pooled memory (and table) kept mapped and reset in place between instances,
/// rather than handed back to the kernel and faulted in again by the next task. The example
/// tasks are linked with a 128 KiB shadow stack (`.cargo/config.toml`), so their stack, data and
/// a typical heap fit in 1 MiB. Measured with `cargo bench --bench sandbox` (`diagnostics.noop`,
/// whole run including teardown): about 28 µs per task without this, 11 µs with it. The price
/// is up to this much resident memory per pool slot.
pub const KEEP_RESIDENT: usize = 1 << 20;

/// The resident region for a pool whose largest module starts from an `image`-byte memory: at
/// least [`KEEP_RESIDENT`], and twice the image for an interpreter, whose pre-initialised heap
/// (12.4 MiB for componentize-py's CPython, 9.1 MiB for componentize-js's SpiderMonkey) every run
/// reads and writes, and which grows past it in a run. Only the pages a run dirtied are reset
/// (Linux's PAGEMAP_SCAN), so the region costs resident memory, not time. Measured with
/// `cargo bench --bench sandbox` (no-op tasks): Python 1.92 ms a task with 1 MiB, 1.24 ms with
/// the image, 1.11 ms with 24 MiB, 1.07 ms with 64 MiB; JavaScript 738, 367, 283 and 327 µs.
///
/// Without PAGEMAP_SCAN (Linux before 6.7) wasmtime resets the whole region on every reuse, so
/// there the region stays at [`KEEP_RESIDENT`].
pub fn keep_resident(image: u64) -> usize {
    if !dirty_pages_tracked() {
        return KEEP_RESIDENT;
    }
    let wanted = usize::try_from(image).unwrap_or(usize::MAX).saturating_mul(2);
    KEEP_RESIDENT.max(wanted.min(MAX_KEEP_RESIDENT).next_multiple_of(64 << 10))
}

/// Whether the kernel can tell wasmtime which pages a run dirtied (PAGEMAP_SCAN, Linux 6.7).
fn dirty_pages_tracked() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    kernel_at_least(&release, (6, 7))
}

/// Whether a kernel release such as `6.18.44-fc` is `min` or newer.
fn kernel_at_least(release: &str, min: (u32, u32)) -> bool {
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        _ => false,
    }
}

/// The most memory per pool slot kept resident, whatever the image: 32 MiB.
pub const MAX_KEEP_RESIDENT: usize = 32 << 20;

/// Longest a run waits for room in the instance pool before its task is handed back to the
/// queue. The pool holds every slot's instance, so it is full only for a moment (a reload's
/// `describe`, an instance still being torn down); waiting that out is cheaper than a requeue.
pub const POOL_WAIT: Duration = Duration::from_secs(5);

/// How often a run waiting for room in the pool tries again.
pub const POOL_RETRY: Duration = Duration::from_millis(10);

/// Guest stdout/stderr kept per run: the last bytes, shown after a trap.
pub const OUTPUT_CAPTURE_BYTES: usize = 16 << 10;

/// The caps of one run, resolved from the task's `describe`, the config file and flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// After this `cancelled()` is true and host calls fail.
    pub soft_time_limit: Option<Duration>,
    /// After this the instance is stopped.
    pub hard_time_limit: Duration,
    /// Cap on linear memory, in bytes.
    pub memory: u64,
    /// Fuel budget; `None` means unmetered.
    pub fuel: Option<u64>,
    /// Largest result, in bytes of JSON.
    pub max_result: usize,
    /// Cap on elements of any wasm table (function tables).
    pub max_table_elements: usize,
    /// Cap on entries in the WASI resource table (open files, streams, pollables).
    pub max_resources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            soft_time_limit: None,
            hard_time_limit: Duration::from_secs(300),
            memory: 128 << 20,
            fuel: None,
            max_result: 1 << 20,
            max_table_elements: 100_000,
            max_resources: 1_000,
        }
    }
}

/// Caps one instance's memories and tables, and records whether the memory cap was hit so that
/// the trap which usually follows (a Rust guest aborts when an allocation fails) is reported as
/// "memory limit" rather than a bare trap.
#[derive(Debug)]
pub struct MemoryLimiter {
    memory_cap: u64,
    table_cap: usize,
    /// Set when a grow request was refused for exceeding the memory cap.
    pub hit: bool,
    /// Largest memory size requested (granted or not), in bytes.
    pub peak: u64,
}

impl MemoryLimiter {
    /// A limiter for the given caps.
    pub fn new(memory_cap: u64, table_cap: usize) -> Self {
        MemoryLimiter { memory_cap, table_cap, hit: false, peak: 0 }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.memory_cap || maximum.is_some_and(|m| desired > m as u64) {
            self.hit = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_then_minor() {
        assert!(kernel_at_least("6.18.44-fc-v669\n", (6, 7)));
        assert!(kernel_at_least("7.0.1", (6, 7)));
        assert!(!kernel_at_least("6.1.0-28-amd64", (6, 7)));
        assert!(!kernel_at_least("5.15.0", (6, 7)));
        assert!(!kernel_at_least("", (6, 7)));
    }

    #[test]
    fn the_resident_region_covers_an_interpreter_heap_within_bounds() {
        assert_eq!(keep_resident(0), KEEP_RESIDENT);
        assert_eq!(keep_resident(1 << 40), MAX_KEEP_RESIDENT.max(KEEP_RESIDENT));
        if dirty_pages_tracked() {
            assert_eq!(keep_resident(12_451_840), 24_903_680);
        } else {
            assert_eq!(keep_resident(12_451_840), KEEP_RESIDENT);
        }
    }
}
