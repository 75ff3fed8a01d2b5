//! What a worker tells about itself and does when asked over the remote control channel
//! (`celery inspect`, Flower, `celeriac inspect`): its stats, running tasks, queues and task
//! names, and its switches. The wire side is in [`crate::control`].

use super::{Worker, WorkerOptions};
use crate::broker::{Broker, ResultStore};
use crate::config::RateLimit;
use crate::control::Node;
use crate::events::Load;
use crate::lifecycle::{Stage, Subscriber, TaskEvent};
use crate::registry::Registry;
use crate::runtime::Limits;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Tasks taken per name since start: Celery's `stats.total`, which Flower shows per worker.
#[derive(Default)]
pub(super) struct Totals(Mutex<BTreeMap<String, u64>>);

impl Subscriber for Totals {
    fn on_task(&self, e: &TaskEvent<'_>) {
        if let (Stage::Received, Some(task)) = (e.stage, e.task) {
            let mut totals = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match totals.get_mut(task.task.as_str()) {
                Some(n) => *n += 1,
                None => {
                    totals.insert(task.task.clone(), 1);
                }
            }
        }
    }
}

/// Whether the fetch loops move: what the systemd watchdog checks besides Redis.
#[derive(Default)]
pub(super) struct Pulse {
    /// When a fetch loop last turned, in ms since the worker started.
    turned_ms: AtomicU64,
    /// Fetches waiting for Redis's reply.
    pub(super) fetching: AtomicUsize,
    /// Cancelled once the queues are declared and the fetch loops run.
    pub(super) ready: CancellationToken,
}

impl Pulse {
    pub(super) fn turned(&self, started: Instant) {
        self.turned_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<B: Broker, R: ResultStore> Worker<B, R> {
    /// Resolves once the worker consumes: queues declared, revocations read, fetch loops
    /// running. The modules were loaded before the worker was made.
    pub async fn ready(&self) {
        self.pulse.ready.cancelled().await
    }

    /// Why the worker is wedged, if it is: no fetch loop turned for `limit` although a slot was
    /// free or a fetch was waiting for Redis. Loops waiting for busy slots are not wedged (the
    /// tasks' hard limits free them), and neither is a worker that is shutting down.
    pub fn stalled(&self, limit: Duration) -> Option<String> {
        if self.is_shutting_down() || !self.pulse.ready.is_cancelled() {
            return None;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let idle =
            Duration::from_millis(now.saturating_sub(self.pulse.turned_ms.load(Ordering::Relaxed)));
        let fetching = self.pulse.fetching.load(Ordering::Relaxed);
        let free = self.slots.available_permits();
        (idle > limit && (fetching > 0 || free > 0)).then(|| {
            format!(
                "no fetch loop moved for {:.1}s ({fetching} fetches waiting for Redis, {free} \
                 free slots)",
                idle.as_secs_f64()
            )
        })
    }

    /// The tasks and modules new tasks run on.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `registry` in place for the tasks that start from now on; tasks already running
    /// finish on the one they started with. Returns the one it replaced.
    pub fn swap_registry(&self, registry: Arc<Registry>) -> Arc<Registry> {
        std::mem::replace(&mut *self.registry.write().unwrap_or_else(|p| p.into_inner()), registry)
    }

    /// Starts consuming `queue`, declared first as kombu declares it; returns whether it was
    /// not consumed before.
    pub async fn consume(&self, queue: &str) -> crate::broker::BrokerResult<bool> {
        self.broker.declare(&[queue.to_string()]).await?;
        Ok(self.add_queue(queue))
    }

    /// Whether a shutdown began (signal or the `shutdown` control command).
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| s.is_cancelled())
    }

    /// How busy the worker is, for heartbeats and metrics.
    pub fn load(&self) -> Load {
        Load { active: self.running().len(), processed: self.stats.fetched.load(Ordering::Relaxed) }
    }
}

/// Routes as the modules of this moment do.
impl<B: Broker, R: ResultStore> crate::canvas::Router for Worker<B, R> {
    fn queue_for(&self, name: &str) -> String {
        self.registry().queue_for(name)
    }
}

impl<B: Broker, R: ResultStore> Node for Worker<B, R> {
    fn revoke(&self, ids: &[String], terminate: bool) {
        // The listener stored the revocation in Redis before this: batches are checked from
        // now on rather than from the next maintenance tick, and running copies stop now.
        self.revocations.store(true, Ordering::Relaxed);
        if terminate {
            for running in self.running().values().filter(|t| ids.iter().any(|i| i == t.id())) {
                running.signals.terminate();
            }
        }
    }

    fn stats(&self) -> Value {
        let total = self.totals.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rusage = rusage();
        json!({
            "pid": std::process::id(),
            "clock": 0,
            "uptime": self.started.elapsed().as_secs(),
            "prefetch_count": self.live.concurrency(),
            "total": total,
            "broker": self.broker.describe(),
            "pool": {
                "implementation": "celeriac:wasm",
                "max-concurrency": self.live.concurrency(),
                // One entry per slot, as a prefork pool lists its processes: celery-exporter
                // reads the concurrency as the length of this list. Every slot lives in this
                // one process.
                "processes": vec![std::process::id(); self.live.concurrency()],
                "max-tasks-per-child": null,
                "put-guarded-by-semaphore": false,
                "timeouts": [0, 0],
                "writes": {"total": 0, "avg": "0.00%", "all": "", "raw": "", "strategy": null, "inqueues": {"total": 0, "active": 0}},
            },
            "rusage": rusage,
            "celeriac": {
                "modules": self.registry().modules().iter().map(|m| module_label(m)).collect::<Vec<_>>(),
                "succeeded": self.stats.succeeded.load(Ordering::Relaxed),
                "failed": self.stats.failed.load(Ordering::Relaxed),
                "retried": self.stats.retried.load(Ordering::Relaxed),
                "revoked": self.stats.revoked.load(Ordering::Relaxed),
                "dead_lettered_unrun": self.stats.poisoned.load(Ordering::Relaxed),
                "fetched": self.stats.fetched.load(Ordering::Relaxed),
                "fetches": self.stats.fetches.load(Ordering::Relaxed),
            },
        })
    }

    fn active(&self) -> Value {
        let hostname = &self.opts.hostname;
        let mut active: Vec<(f64, Value)> = self
            .running()
            .values()
            .filter_map(|r| {
                let t = r.task.as_ref()?;
                let request = json!({
                    "id": t.id,
                    "name": t.task,
                    "args": serde_json::from_str::<Value>(&t.args).unwrap_or(Value::Null),
                    "kwargs": serde_json::from_str::<Value>(&t.kwargs).unwrap_or(Value::Null),
                    "type": t.task,
                    "hostname": hostname,
                    "time_start": r.since,
                    "acknowledged": false,
                    "delivery_info": {"exchange": "", "routing_key": null, "priority": t.priority, "redelivered": false},
                    "worker_pid": std::process::id(),
                });
                Some((r.since, request))
            })
            .collect();
        active.sort_by(|a, b| a.0.total_cmp(&b.0));
        Value::Array(active.into_iter().map(|(_, v)| v).collect())
    }

    fn registered(&self, items: &[String]) -> Vec<String> {
        let registry = self.registry();
        registry
            .tasks()
            .map(|e| {
                let shown: Vec<String> = items
                    .iter()
                    .filter_map(|item| {
                        let value = match item.as_str() {
                            "module" => module_label(&e.module),
                            "queue" => e.spec.queue.clone(),
                            "rate_limit" => e.spec.rate_limit.map(|r| r.to_string())?,
                            "time_limit" => {
                                format!("{}", e.spec.limits.hard_time_limit.as_secs_f64())
                            }
                            "soft_time_limit" => {
                                format!("{}", e.spec.limits.soft_time_limit?.as_secs_f64())
                            }
                            _ => return None,
                        };
                        Some(format!("{item}={value}"))
                    })
                    .collect();
                match shown.is_empty() {
                    true => e.info.name.clone(),
                    false => format!("{} [{}]", e.info.name, shown.join(" ")),
                }
            })
            .collect()
    }

    fn queues(&self) -> Vec<String> {
        self.live.queues()
    }

    fn add_queue(&self, queue: &str) -> bool {
        Worker::add_queue(self, queue)
    }

    fn cancel_queue(&self, queue: &str) -> bool {
        Worker::cancel_queue(self, queue)
    }

    fn adjust(&self, method: &str, arguments: &Value) -> Option<Value> {
        Worker::adjust(self, method, arguments)
    }

    fn conf(&self) -> Value {
        let o = &self.opts;
        json!({
            "worker_concurrency": self.live.concurrency(),
            "task_track_started": o.track_started,
            "task_default_queue": self.live.queues().first(),
            "worker_send_task_events": self.events.as_ref().map(|e| e.task_events_on()),
            "broker_url": self.broker.describe()["url"],
            "worker_hostname": o.hostname,
            "celeriac_queues": self.live.queues(),
            "celeriac_grace_seconds": o.grace.as_secs_f64(),
            "celeriac_revoke_ttl_seconds": o.revoke_ttl.as_secs_f64(),
        })
    }

    fn task_events(&self, on: bool) -> Option<bool> {
        self.events.as_ref().map(|e| e.set_task_events(on))
    }

    fn heartbeat(&self) {
        if let Some(events) = &self.events {
            events.heartbeat_now();
        }
    }

    fn shutdown(&self) {
        tracing::warn!("shutdown asked over remote control");
        if let Some(token) = self.shutdown.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            token.cancel();
        }
    }
}

/// This process's resource use, in the fields Celery's `stats.rusage` has.
#[allow(unsafe_code)]
fn rusage() -> Value {
    // SAFETY: getrusage only fills the struct it is given, which is plain data (zero is valid).
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return json!({});
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    json!({
        "utime": secs(u.ru_utime),
        "stime": secs(u.ru_stime),
        "maxrss": u.ru_maxrss,
        "minflt": u.ru_minflt,
        "majflt": u.ru_majflt,
        "nvcsw": u.ru_nvcsw,
        "nivcsw": u.ru_nivcsw,
    })
}

/// The settings remote control may change while the worker runs: the queues it consumes, its
/// slots, and per-task rate and time limits that replace the configured ones (Celery's
/// `add_consumer`, `cancel_consumer`, `pool_grow`, `pool_shrink`, `autoscale`, `rate_limit` and
/// `time_limit`). They live in this worker's memory, as in a Python worker: a restart goes back
/// to the configuration.
pub(super) struct Live {
    /// Queues in fetch order, with their weights (empty: strict order).
    queues: RwLock<(Vec<String>, Vec<u32>)>,
    /// Slots now; the semaphore holds the free ones.
    concurrency: AtomicUsize,
    /// Per task: `Some(limit)` replaces the configured rate limit, `None` lifts it.
    rate_limits: RwLock<HashMap<String, Option<RateLimit>>>,
    /// Per task: hard and soft time limits replacing the configured ones.
    time_limits: RwLock<HashMap<String, (Duration, Option<Duration>)>>,
    /// Whether any time limit was replaced: while clear, tasks read no lock for it.
    any_time_limit: AtomicBool,
}

impl Live {
    pub(super) fn new(opts: &WorkerOptions) -> Live {
        Live {
            queues: RwLock::new((opts.queues.clone(), opts.weights.clone())),
            concurrency: AtomicUsize::new(opts.concurrency),
            rate_limits: RwLock::default(),
            time_limits: RwLock::default(),
            any_time_limit: AtomicBool::new(false),
        }
    }

    /// The queue order for the next fetch.
    pub(super) fn fetch_order(&self) -> Vec<String> {
        let q = self.queues.read().unwrap_or_else(|p| p.into_inner());
        super::fetch_order(&q.0, &q.1)
    }

    pub(super) fn queues(&self) -> Vec<String> {
        self.queues.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    pub(super) fn concurrency(&self) -> usize {
        self.concurrency.load(Ordering::Relaxed)
    }

    /// The rate limit `task` runs under: the one set by `rate_limit`, else the configured one.
    pub(super) fn rate_limit(
        &self,
        task: &str,
        configured: Option<RateLimit>,
    ) -> Option<RateLimit> {
        let set = self.rate_limits.read().unwrap_or_else(|p| p.into_inner());
        if set.is_empty() {
            return configured;
        }
        set.get(task).copied().unwrap_or(configured)
    }

    /// The limits `task` runs under: hard and soft time limits set by `time_limit` replace the
    /// configured ones.
    pub(super) fn limits(&self, task: &str, configured: &Limits) -> Option<Limits> {
        if !self.any_time_limit.load(Ordering::Relaxed) {
            return None;
        }
        let set = self.time_limits.read().unwrap_or_else(|p| p.into_inner());
        let (hard, soft) = *set.get(task)?;
        Some(Limits { hard_time_limit: hard, soft_time_limit: soft, ..configured.clone() })
    }
}

/// A rate as Celery's `rate_limit` command gives it: `10/s`, `100/m`, `1000/h`, a bare number
/// (per second), or `0` / empty / null to lift the limit.
fn parse_rate(v: &Value) -> Result<Option<RateLimit>, String> {
    let text = match v {
        Value::Null => return Ok(None),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        other => return Err(format!("invalid rate limit {other}")),
    };
    if text.is_empty() || text.parse::<f64>().is_ok_and(|n| n == 0.0) {
        return Ok(None);
    }
    let text = if text.contains('/') { text } else { format!("{text}/s") };
    let rate: RateLimit = text.parse()?;
    Ok((rate.count > 0).then_some(rate))
}

/// Seconds given to `time_limit` (a number, or null for none).
fn seconds(v: &Value) -> Result<Option<Duration>, String> {
    match v {
        Value::Null => Ok(None),
        v => v
            .as_f64()
            .filter(|s| *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .map(Some)
            .ok_or_else(|| format!("invalid time limit {v}")),
    }
}

impl<B: Broker, R: ResultStore> Worker<B, R> {
    /// Changes the slots to `target` (at least one). Growing frees slots at once; shrinking
    /// takes slots as running tasks free them, so no running task is stopped.
    fn resize(&self, target: usize) -> usize {
        let target = target.max(1);
        let now = self.live.concurrency.swap(target, Ordering::Relaxed);
        if target > now {
            self.slots.add_permits(target - now);
        } else if target < now {
            let (slots, n) = (self.slots.clone(), (now - target) as u32);
            tokio::spawn(async move {
                if let Ok(taken) = slots.acquire_many_owned(n).await {
                    taken.forget();
                }
            });
        }
        target
    }

    fn is_registered(&self, task: &str) -> bool {
        self.registry().get(task).is_ok()
    }
}

/// `{"ok": text}`.
fn ok(text: impl Into<String>) -> Value {
    json!({"ok": text.into()})
}

/// `{"error": text}`, Celery's `nok`.
fn nok(text: impl Into<String>) -> Value {
    json!({"error": text.into()})
}

impl<B: Broker, R: ResultStore> Worker<B, R> {
    /// Carries out a control command that changes the running settings; `None` when `method`
    /// is not one of them.
    pub(super) fn adjust(&self, method: &str, args: &Value) -> Option<Value> {
        let task = args["task_name"].as_str().unwrap_or("");
        let n = |key: &str, default: u64| args[key].as_u64().unwrap_or(default) as usize;
        Some(match method {
            "rate_limit" if !self.is_registered(task) => nok("unknown task"),
            "rate_limit" => match parse_rate(&args["rate_limit"]) {
                Err(e) => nok(e),
                Ok(rate) => {
                    let mut set = self.live.rate_limits.write().unwrap_or_else(|p| p.into_inner());
                    set.insert(task.to_string(), rate);
                    match rate {
                        Some(_) => ok("new rate limit set successfully"),
                        None => ok("rate limit disabled successfully"),
                    }
                }
            },
            "time_limit" if !self.is_registered(task) => nok("unknown task"),
            "time_limit" => match (seconds(&args["hard"]), seconds(&args["soft"])) {
                (Err(e), _) | (_, Err(e)) => nok(e),
                (Ok(hard), Ok(soft)) => {
                    let configured = self.registry().get(task).map(|e| e.spec.limits.clone());
                    let configured = configured.unwrap_or_default();
                    let hard = hard.unwrap_or(configured.hard_time_limit);
                    let soft = soft.filter(|s| *s < hard);
                    let mut set = self.live.time_limits.write().unwrap_or_else(|p| p.into_inner());
                    set.insert(task.to_string(), (hard, soft));
                    self.live.any_time_limit.store(true, Ordering::Relaxed);
                    ok("time limits set successfully")
                }
            },
            "pool_grow" => ok(format!(
                "pool will grow to {}",
                self.resize(self.live.concurrency() + n("n", 1))
            )),
            "pool_shrink" if self.live.concurrency() <= 1 => {
                nok("the pool has one slot and cannot shrink")
            }
            "pool_shrink" => {
                let target = self.live.concurrency().saturating_sub(n("n", 1));
                ok(format!("pool will shrink to {}", self.resize(target)))
            }
            // No autoscaler: the slots are set to the maximum asked for.
            "autoscale" => {
                let max = n("max", self.live.concurrency() as u64);
                let slots = self.resize(max);
                ok(format!("autoscale now max={slots} min={}", n("min", 0).min(slots)))
            }
            _ => return None,
        })
    }

    /// Starts consuming `queue` (already declared); returns whether it is new.
    pub(super) fn add_queue(&self, queue: &str) -> bool {
        let mut q = self.live.queues.write().unwrap_or_else(|p| p.into_inner());
        if q.0.iter().any(|n| n == queue) {
            return false;
        }
        q.0.push(queue.to_string());
        if !q.1.is_empty() {
            q.1.push(1);
        }
        true
    }

    /// Stops consuming `queue`; returns whether it was consumed.
    pub(super) fn cancel_queue(&self, queue: &str) -> bool {
        let mut q = self.live.queues.write().unwrap_or_else(|p| p.into_inner());
        let Some(i) = q.0.iter().position(|n| n == queue) else { return false };
        q.0.remove(i);
        if i < q.1.len() {
            q.1.remove(i);
        }
        true
    }
}

/// A module as replies show it: its file and version, `deploy.wasm@1f2e3d4c5b6a`.
pub fn module_label(module: &crate::runtime::Module) -> String {
    let file =
        module.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{file}@{}", module.version)
}
