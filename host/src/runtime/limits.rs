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

/// The resident region for a pool whose largest module starts from an `image`-byte memory.
///
/// With Linux's PAGEMAP_SCAN (6.7 and later; [`PAGEMAP_SCAN`] turns it on) wasmtime resets only
/// the pages a run wrote, and leaves the pages it only read mapped. So the region can cover an
/// interpreter's pre-initialised heap (12.4 MiB for componentize-py's CPython, 9.1 MiB for
/// componentize-js's SpiderMonkey) at the price of resident memory, not time. Without it,
/// wasmtime copies the whole region back from the image on every reuse, so the region stays at
/// [`KEEP_RESIDENT`]: copying a 12 MiB image per run cost more than the page faults it saves.
///
/// Measured with `cargo bench --bench sandbox` (no-op tasks, per run) on a 2-core machine:
///
/// | | Python | JavaScript |
/// |---|---|---|
/// | no scan, 1 MiB | 2.14 ms | |
/// | no scan, 16 MiB | 4.05 ms | |
/// | no scan, 2 × image (24 MiB) | 3.1 to 3.9 ms | 0.75 to 1.43 ms |
/// | scan, 1 MiB | 1.69 ms | 527 µs |
/// | scan, 4 MiB | 1.72 ms | 514 µs |
/// | scan, 16 MiB | 1.64 ms | 523 µs |
/// | scan, 32 MiB | 1.86 ms | 566 µs |
/// | scan, 64 MiB | 2.22 ms | 551 µs |
///
/// With the scan the size matters little up to 16 MiB: wasmtime resets at most 32 runs of
/// written pages in place and hands the rest of the memory back to the kernel, and an
/// interpreter writes to more places than that. The image's size, capped at
/// [`MAX_KEEP_RESIDENT`], keeps the whole heap resident when a run writes to few places.
pub fn keep_resident(image: u64) -> usize {
    // Follows the engine's setting, so turning the scan off also shrinks the region.
    let scan = PAGEMAP_SCAN != wasmtime::Enabled::No
        && wasmtime::PoolingAllocationConfig::is_pagemap_scan_available();
    keep_resident_for(image, scan)
}

/// [`keep_resident`], given whether the kernel has PAGEMAP_SCAN.
fn keep_resident_for(image: u64, scan: bool) -> usize {
    if !scan {
        return KEEP_RESIDENT;
    }
    let image = usize::try_from(image).unwrap_or(usize::MAX);
    KEEP_RESIDENT.max(image.min(MAX_KEEP_RESIDENT).next_multiple_of(64 << 10))
}

/// Reset only the pages a run wrote where the kernel can say which (Linux 6.7, PAGEMAP_SCAN).
/// wasmtime 48 leaves this off by default; with it off, a Python run cost about twice as much.
pub const PAGEMAP_SCAN: wasmtime::Enabled = wasmtime::Enabled::Auto;

/// The largest resident region, per pool slot.
pub const MAX_KEEP_RESIDENT: usize = 16 << 20;

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
    fn the_resident_region_covers_an_interpreter_heap_within_bounds() {
        assert_eq!(keep_resident_for(0, true), KEEP_RESIDENT);
        assert_eq!(keep_resident_for(12_451_840, true), 12_451_840_usize.next_multiple_of(65_536));
        assert_eq!(keep_resident_for(1 << 40, true), MAX_KEEP_RESIDENT);
        assert_eq!(keep_resident_for(12_451_840, false), KEEP_RESIDENT);
    }
}
