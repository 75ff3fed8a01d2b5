//! The sandbox: one wasmtime engine, the linker with every import, compiled components cached on
//! disk and pre-instantiated once, and [`Runtime::run`], which runs one task in a fresh `Store`
//! under its limits and classifies how it ended.

mod cache;
mod footprint;
mod host;
mod limits;
mod outcome;
mod output;

pub use cache::{Compiled, cache_key};
pub use footprint::{Footprint, Language, footprint};
pub use host::{
    LOG_BURST, LOG_PER_SECOND, MAX_CHILD_PAYLOAD, MAX_CHILDREN, MAX_CHILDREN_BYTES, MAX_TASK_NAME,
    TaskState, glob_match, printable,
};
pub use limits::{EPOCH_TICK, Limits, MemoryLimiter};
pub use outcome::{
    ChildTask, ChildWorkflow, MAX_ERROR_TEXT, MAX_EXC_TYPE, Outcome, Progress, ProgressReceiver,
    ProgressSender, RunReport, cap_text, progress_channel,
};
pub use output::OutputTail;

use anyhow::Context as _;
use host::TaskContext;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

/// Host bindings for `wit/task.wit`; the only `bindgen!` on the host side.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        world: "task",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::celeriac::task::types::TaskInfo;
use bindings::celeriac::task::types::{Call, TaskError};
use bindings::{Task, TaskPre};

/// What a task may touch beyond its own memory. Everything is off unless configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    /// Guest log lines reach the host log.
    pub log: bool,
    /// `progress` publishes custom states.
    pub progress: bool,
    /// Real WASI clocks; otherwise the wall clock reads the Unix epoch and the monotonic clock
    /// stands still.
    pub clocks: bool,
    /// Real WASI randomness; otherwise a fixed-seed generator (Rust's std still works, but
    /// gets no entropy).
    pub random: bool,
    /// The key-value namespace, if any.
    pub kv: Option<String>,
    /// Task names (globs such as `indexing.*`) the task may enqueue.
    pub enqueue: Vec<String>,
    /// Queues a child may be sent to by name (globs): the registry fills in the task's own
    /// queue and those of the tasks it may enqueue; the config's `enqueue_queues` adds more.
    /// A child sent without a queue goes to its own task's queue.
    pub child_queues: Vec<String>,
    /// Host folders the task sees, and nothing else of the filesystem.
    pub preopens: Vec<Preopen>,
}

/// A host folder made visible to a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Preopen {
    /// The folder on the host.
    pub host: PathBuf,
    /// Where the guest sees it, e.g. `/data`.
    pub guest: String,
    /// Whether the task may create, change and delete files there.
    pub writable: bool,
}

/// Cancellation signals for one run, shared with whoever may revoke it.
#[derive(Debug, Clone, Default)]
pub struct Signals(Arc<SignalFlags>);

#[derive(Debug, Default)]
struct SignalFlags {
    cancel: AtomicBool,
    /// Read at every epoch check while the guest computes, and raced against the whole call, so
    /// a guest waiting in a host call (a sleep, a slow store) is stopped too.
    terminate: tokio_util::sync::CancellationToken,
}

impl Signals {
    /// Makes `cancelled()` true for the task, as the soft limit does.
    pub fn cancel(&self) {
        self.0.cancel.store(true, Ordering::Relaxed);
    }
    /// Stops the instance now: at its next epoch check if it is computing, at once if it is
    /// waiting in a host call.
    pub fn terminate(&self) {
        self.cancel();
        self.0.terminate.cancel();
    }
    fn is_cancelled(&self) -> bool {
        self.0.cancel.load(Ordering::Relaxed)
    }
    fn is_terminated(&self) -> bool {
        self.0.terminate.is_cancelled()
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Most instances alive at once (the worker's slots plus headroom); sizes the pool.
    pub max_instances: u32,
    /// The largest memory cap of any task; sizes each pool slot.
    pub max_memory: u64,
    /// Compile fuel metering in. Off unless some task has a fuel budget, since metering slows
    /// every instruction.
    pub fuel: bool,
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// The most any one loaded component takes from the pool per instance (see
    /// [`footprint()`]); every total is this times `max_instances`.
    pub footprint: Footprint,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 64,
            max_memory: Limits::default().memory,
            fuel: false,
            cache_dir: default_cache_dir(),
            footprint: Footprint::RUST,
        }
    }
}

/// `$XDG_CACHE_HOME/celeriac/modules`, else `~/.cache/celeriac/modules`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("celeriac").join("modules"))
}

/// Why the epoch callback stopped an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Interrupt {
    #[error("hard time limit reached")]
    HardLimit,
    #[error("terminated by revoke")]
    Terminated,
}

/// A loaded component: compiled, linked, pre-instantiated, with the tasks it serves.
pub struct Module {
    /// The `.wasm` file.
    pub path: PathBuf,
    /// The file stem, e.g. `indexing`.
    pub name: String,
    /// The tasks it declared in `describe`.
    pub tasks: Vec<TaskInfo>,
    /// Whether it was compiled now or loaded from the disk cache.
    pub compiled: Compiled,
    /// The file's content hash (see [`module_version`]): a changed file is a new version.
    pub version: Arc<str>,
    /// What one instance takes from the pool, and the language it was written in.
    pub footprint: Footprint,
    /// How long compiling (or loading from the cache) took.
    pub compile_time: Duration,
    /// The file's size in bytes.
    pub size: u64,
    pre: TaskPre<TaskState>,
}

/// A module's version: the first 12 hex digits of the SHA-256 of its file, as `modules check`,
/// the `registered` reply, the metrics and the per-task log line show it.
pub fn module_version(wasm: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(wasm)[..6])
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module").field("path", &self.path).field("tasks", &self.tasks).finish()
    }
}

/// One task invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Positional args, a JSON array.
    pub args: String,
    /// Keyword args, a JSON object.
    pub kwargs: String,
    /// Retries so far.
    pub retries: u32,
}

/// What a run may reach outside the sandbox: the stores behind its grants and its signals.
#[derive(Debug, Clone, Default)]
pub struct RunEnv {
    /// The store behind the `kv` grant.
    pub kv: Option<crate::kv::KvStore>,
    /// Where progress reports go (the latest one wins).
    pub progress: Option<ProgressSender>,
    /// Revocation signals.
    pub signals: Signals,
}

/// The engine, its linker and the epoch ticker. Cheap to share behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<TaskState>,
    config: RuntimeConfig,
    ticker: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine (pooling allocator, epoch interruption, async) and the linker.
    pub fn new(mut config: RuntimeConfig) -> anyhow::Result<Self> {
        config.footprint = config.footprint.max(&Footprint::RUST);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(config.fuel)
            .max_wasm_stack(limits::MAX_WASM_STACK)
            .async_stack_size(limits::ASYNC_STACK);
        let memory_slot = config.max_memory.next_multiple_of(64 << 10);
        let mut pool = PoolingAllocationConfig::default();
        // Every total is what the largest loaded component takes per instance, times the
        // slots: a Rust task makes 3 core instances, a componentize-py one 14. A pool sized
        // for the first would run one Python task at a time and fail the rest.
        let per = &config.footprint;
        let slots = config.max_instances;
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(per.core_instances))
            .total_memories(slots.saturating_mul(per.memories))
            .total_tables(slots.saturating_mul(per.tables))
            .total_stacks(slots)
            .max_core_instances_per_component(per.core_instances)
            .max_memory_size(memory_slot as usize)
            .max_memories_per_component(per.memories)
            .max_tables_per_component(per.tables)
            .linear_memory_keep_resident(limits::keep_resident(per.initial_memory))
            .table_keep_resident(limits::KEEP_RESIDENT)
            .pagemap_scan(limits::PAGEMAP_SCAN);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = wt(Engine::new(&wasm)).context("create wasmtime engine")?;

        let mut linker = Linker::new(&engine);
        wt(wasmtime_wasi::p2::add_to_linker_async(&mut linker)).context("link WASI")?;
        wt(Task::add_to_linker::<TaskState, HasSelf<TaskState>>(&mut linker, |s| s))
            .context("link celeriac imports")?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("celeriac-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(limits::EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .context("start epoch ticker thread")?;
        Ok(Runtime { engine, linker, config, ticker: stop })
    }

    /// The settings the engine was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether fuel metering is compiled in.
    pub fn fuel_enabled(&self) -> bool {
        self.config.fuel
    }

    /// Loads every `*.wasm` in `dir`, sorted by name.
    pub async fn load_dir(&self, dir: &Path) -> anyhow::Result<Vec<Module>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("read modules folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        paths.sort();
        let mut modules = Vec::with_capacity(paths.len());
        for path in paths {
            modules.push(self.load_module(&path).await?);
        }
        Ok(modules)
    }

    /// Compiles (or loads from cache) one component, checks it implements the celeriac world,
    /// pre-instantiates it and asks it which tasks it serves.
    pub async fn load_module(&self, path: &Path) -> anyhow::Result<Module> {
        let wasm = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        self.load_bytes(path, &wasm).await
    }

    /// Like [`load_module`](Self::load_module) from bytes already read; `path` names them in
    /// errors.
    pub async fn load_bytes(&self, path: &Path, wasm: &[u8]) -> anyhow::Result<Module> {
        let shown = path.display();
        let footprint = footprint::footprint(wasm)
            .with_context(|| format!("{shown}: not a valid WebAssembly component"))?;
        if !self.config.footprint.covers(&footprint) {
            anyhow::bail!(
                "{shown}: needs {} core instances, {} memories and {} tables per instance; this \
                 engine was sized for {}, {} and {}",
                footprint.core_instances,
                footprint.memories,
                footprint.tables,
                self.config.footprint.core_instances,
                self.config.footprint.memories,
                self.config.footprint.tables
            );
        }
        let engine = self.engine.clone();
        let cache_dir = self.config.cache_dir.clone();
        let bytes = wasm.to_vec();
        let started = Instant::now();
        // Compiling takes long enough to stall other tasks on this thread.
        let (component, compiled) =
            tokio::task::spawn_blocking(move || cache::load(&engine, &bytes, cache_dir.as_deref()))
                .await?
                .with_context(|| format!("{shown}: not a valid WebAssembly component"))?;
        let compile_time = started.elapsed();
        let instance_pre = wt(self.linker.instantiate_pre(&component)).with_context(|| {
            format!("{shown}: imports something celeriac does not provide (is it built with celeriac-sdk for wasm32-wasip2?)")
        })?;
        let pre = wt(TaskPre::new(instance_pre)).with_context(|| {
            format!("{shown}: does not export the celeriac:task@0.1.0 world (`describe` and `run`)")
        })?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let version = module_version(wasm).into();
        let mut module = Module {
            path: path.to_path_buf(),
            name,
            tasks: Vec::new(),
            compiled,
            version,
            footprint,
            compile_time,
            size: wasm.len() as u64,
            pre,
        };
        module.tasks =
            self.describe(&module).await.with_context(|| format!("{shown}: describe"))?;
        if module.tasks.is_empty() {
            anyhow::bail!("{shown}: serves no tasks (describe returned an empty list)");
        }
        Ok(module)
    }

    async fn describe(&self, module: &Module) -> anyhow::Result<Vec<TaskInfo>> {
        let limits = Limits {
            hard_time_limit: Duration::from_secs(5),
            memory: self.config.max_memory.min(64 << 20),
            ..Limits::default()
        };
        let mut store = self.store(
            &limits,
            "describe",
            "describe",
            Arc::new(Grants::default()),
            RunEnv::default(),
            None,
        )?;
        let call = async {
            let task = module.pre.instantiate_async(&mut store).await?;
            task.call_describe(&mut store).await
        };
        match tokio::time::timeout(limits.hard_time_limit, call).await {
            Ok(result) => Ok(result?),
            Err(_) => anyhow::bail!("describe did not return within {:?}", limits.hard_time_limit),
        }
    }

    fn store(
        &self,
        limits: &Limits,
        id: &str,
        name: &str,
        grants: Arc<Grants>,
        env: RunEnv,
        output: Option<&OutputTail>,
    ) -> anyhow::Result<Store<TaskState>> {
        let mut wasi = WasiCtxBuilder::new();
        if let Some(pipe) = output {
            wasi.stdout(pipe.clone()).stderr(pipe.clone());
        }
        if !grants.random {
            let seed = 0x6365_6c65_7269_6163; // "celeriac": the same stream every run
            wasi.secure_random(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed));
            wasi.insecure_random(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed));
            wasi.insecure_random_seed(0);
        }
        if !grants.clocks {
            wasi.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
        }
        for p in &grants.preopens {
            let perms = if p.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            wt(wasi.preopened_dir(&p.host, &p.guest, perms).map(|_| ()))
                .with_context(|| format!("preopen {} as {}", p.host.display(), p.guest))?;
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits.max_resources);
        let now = Instant::now();
        let state = TaskState {
            wasi: wasi.build(),
            table,
            limiter: MemoryLimiter::new(limits.memory, limits.max_table_elements),
            task: TaskContext {
                id: id.to_string(),
                name: name.to_string(),
                grants,
                kv: env.kv,
                signals: env.signals,
                soft_deadline: limits.soft_time_limit.map(|d| deadline(now, d)),
                hard_deadline: deadline(now, limits.hard_time_limit),
                children: Vec::new(),
                workflows: Vec::new(),
                workflow_steps: 0,
                children_bytes: 0,
                progress: env.progress,
                log_budget: host::LogBudget::new(),
            },
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        if self.config.fuel {
            wt(store.set_fuel(limits.fuel.unwrap_or(u64::MAX)))?;
        }
        // Check the deadlines at every epoch tick and yield, so other tasks get the thread.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let task = &ctx.data().task;
            if task.signals.is_terminated() {
                return Err(Interrupt::Terminated.into());
            }
            if Instant::now() >= task.hard_deadline {
                return Err(Interrupt::HardLimit.into());
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }

    /// Runs one task in a fresh instance of `module` under `limits`, with only what `grants`
    /// allow, and reports how it ended. Never panics on guest behaviour; every failure is an
    /// [`Outcome`].
    pub async fn run(
        &self,
        module: &Module,
        invocation: &Invocation,
        limits: &Limits,
        grants: Grants,
        env: RunEnv,
    ) -> RunReport {
        let started = Instant::now();
        let output = OutputTail::new(limits::OUTPUT_CAPTURE_BYTES);
        let mut report = RunReport {
            outcome: Outcome::HostError { message: String::new() },
            wall: Duration::ZERO,
            instantiate: None,
            fuel_used: None,
            peak_memory: 0,
            children: Vec::new(),
            workflows: Vec::new(),
            output: String::new(),
            module_version: Some(module.version.clone()),
        };
        let call = Call {
            id: invocation.id.clone(),
            args: invocation.args.clone(),
            kwargs: invocation.kwargs.clone(),
            retries: invocation.retries,
            soft_deadline_ms: limits.soft_time_limit.map(|d| d.as_millis() as u64),
        };
        // A guest blocked in a host call (a sleep, a slow store; a start function can make one
        // while it is instantiated) is not at an epoch check; this outer timeout catches it.
        let outer = limits.hard_time_limit.saturating_add(limits::HARD_LIMIT_GRACE);
        let terminated = env.signals.0.terminate.clone();
        // A full pool is back-pressure, not the task's failure: wait for an instance to end,
        // each time in a fresh store (a failed instantiation may hold part of the pool until
        // its store is dropped), and hand the task back if none frees up.
        let mut waited = Duration::ZERO;
        // Shared, so a run that waits for the pool builds its next store without a deep copy.
        let grants = Arc::new(grants);
        let (mut store, task) = loop {
            let mut store = match self.store(
                limits,
                &invocation.id,
                &invocation.task,
                grants.clone(),
                env.clone(),
                Some(&output),
            ) {
                Ok(store) => store,
                Err(e) => {
                    report.outcome = Outcome::HostError { message: format!("{e:#}") };
                    return report;
                }
            };
            let instantiated = tokio::select! {
                result = tokio::time::timeout(outer, module.pre.instantiate_async(&mut store)) => result,
                _ = terminated.cancelled() => Ok(Err(Interrupt::Terminated.into())),
            };
            let error = match instantiated {
                Ok(Ok(task)) => break (store, task),
                Ok(Err(e)) => e,
                Err(_elapsed) => Interrupt::HardLimit.into(),
            };
            report.wall = started.elapsed();
            report.outcome = match error.downcast_ref::<Interrupt>() {
                Some(Interrupt::Terminated) => Outcome::Terminated,
                Some(Interrupt::HardLimit) => {
                    Outcome::HardTimeLimit { limit: limits.hard_time_limit }
                }
                None if error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() => {
                    if waited < limits::POOL_WAIT {
                        drop(store);
                        tokio::time::sleep(limits::POOL_RETRY).await;
                        waited += limits::POOL_RETRY;
                        continue;
                    }
                    Outcome::PoolExhausted { message: format!("{error:#}") }
                }
                None => Outcome::HostError { message: format!("instantiate: {error:#}") },
            };
            return report;
        };
        report.instantiate = Some(started.elapsed());
        let result = {
            let run = task.call_run(&mut store, &invocation.task, &call);
            tokio::select! {
                result = tokio::time::timeout(outer, run) => result,
                // Dropping the call abandons the instance wherever it is; the store is thrown
                // away below in any case.
                _ = terminated.cancelled() => Ok(Err(Interrupt::Terminated.into())),
            }
        };
        report.wall = started.elapsed();
        report.peak_memory = store.data().limiter.peak;
        if self.config.fuel && limits.fuel.is_some() {
            let left = store.get_fuel().unwrap_or(0);
            report.fuel_used = Some(limits.fuel.unwrap_or(u64::MAX) - left);
        }
        report.output = output.contents();
        let dropped = store.data().task.log_budget.dropped;
        if dropped > 0 {
            tracing::warn!(
                task.id = %host::printable(&invocation.id),
                task.name = %invocation.task,
                "dropped {dropped} log lines over the limit of {} at once and {} a second",
                host::LOG_BURST,
                host::LOG_PER_SECOND
            );
        }
        let cancelled = store.data().task.cancelled();
        let terminated = store.data().task.signals.is_terminated();
        let memory_hit = store.data().limiter.hit;
        report.outcome = match result {
            // A task stopped by revoke may notice `cancelled()` and return an error before the
            // epoch check stops it; either way it was terminated.
            Ok(Ok(Err(_)) | Err(_)) if terminated => Outcome::Terminated,
            Err(_elapsed) => Outcome::HardTimeLimit { limit: limits.hard_time_limit },
            Ok(Err(trap)) => classify_trap(trap, limits, memory_hit, &report.output),
            // An interpreter that could not grow its heap raises its own MemoryError, which
            // the SDKs report as a failure: the cap is what it hit.
            Ok(Ok(Err(TaskError::Fail(f)))) if memory_hit && f.exc_type == "MemoryError" => {
                Outcome::MemoryLimit { limit: limits.memory }
            }
            Ok(Ok(Ok(json))) => check_result(json, limits.max_result),
            // The task's own error text is capped: it is stored twice in the result, put in the
            // dead letter and logged, and a task could make it as large as its memory.
            Ok(Ok(Err(TaskError::Retry(r)))) => Outcome::Retry {
                reason: cap_text(r.reason, MAX_ERROR_TEXT),
                countdown: r.countdown_ms.map(Duration::from_millis),
            },
            Ok(Ok(Err(TaskError::Fail(f)))) if cancelled => Outcome::SoftTimeLimit {
                message: cap_text(format!("{}: {}", f.exc_type, f.message), MAX_ERROR_TEXT),
            },
            Ok(Ok(Err(TaskError::Fail(f)))) => Outcome::Failed {
                exc_type: cap_text(f.exc_type, MAX_EXC_TYPE),
                message: cap_text(f.message, MAX_ERROR_TEXT),
            },
        };
        if report.outcome.is_success() {
            report.children = std::mem::take(&mut store.data_mut().task.children);
            report.workflows = std::mem::take(&mut store.data_mut().task.workflows);
        }
        report
    }
}

/// Names what stopped a guest: our own interrupts first, then fuel, then the memory cap (whose
/// refusal a Rust guest turns into an abort), then any other trap.
fn classify_trap(e: wasmtime::Error, limits: &Limits, memory_hit: bool, output: &str) -> Outcome {
    if let Some(interrupt) = e.downcast_ref::<Interrupt>() {
        return match interrupt {
            Interrupt::HardLimit => Outcome::HardTimeLimit { limit: limits.hard_time_limit },
            Interrupt::Terminated => Outcome::Terminated,
        };
    }
    let trap = e.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::OutOfFuel) {
        return Outcome::OutOfFuel { budget: limits.fuel.unwrap_or(0) };
    }
    if memory_hit {
        return Outcome::MemoryLimit { limit: limits.memory };
    }
    let backtrace = e.downcast_ref::<WasmBacktrace>().map(|bt| bt.to_string());
    // The backtrace is reported on its own; the message is the cause (a host call the guest
    // drove into an error, such as a full resource table, has no trap code).
    let mut message = match trap {
        Some(t) => t.to_string(),
        None => e.root_cause().to_string(),
    };
    // A Rust guest prints its panic message to stderr just before the trap: it is the most
    // useful line the user can get.
    if let Some(panic) = output.lines().rev().find(|l| l.contains("panicked at")) {
        let detail = output.split_once(panic).map(|(_, rest)| rest.trim()).unwrap_or("");
        message = format!("{message}: {} {}", panic.trim(), detail).trim_end().to_string();
    }
    Outcome::Trap { message, backtrace }
}

/// A result must be valid JSON within the size cap: the guest is untrusted.
fn check_result(json: String, max: usize) -> Outcome {
    if json.len() > max {
        return Outcome::ResultTooLarge { size: json.len(), limit: max };
    }
    match serde_json::from_str::<serde::de::IgnoredAny>(&json) {
        Ok(_) => Outcome::Success { result: json },
        Err(e) => Outcome::HostError { message: format!("task returned invalid JSON: {e}") },
    }
}

/// `now + limit`, or a century from now for a limit too long to add.
fn deadline(now: Instant, limit: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(limit.min(CENTURY)).unwrap_or(now)
}

/// The clock a task sees when it is not granted clocks.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// wasmtime has its own error type; glue code here speaks `anyhow`.
fn wt<T>(result: wasmtime::Result<T>) -> anyhow::Result<T> {
    result.map_err(anyhow::Error::from)
}
