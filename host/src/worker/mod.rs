//! The worker, and the life of one task from top to bottom ([`Worker::handle`]):
//! fetch → decode → check revoked / expired / ETA → rate limit → run in the sandbox → classify →
//! store the result → ack, retry or dead-letter.
//!
//! Delivery is at least once: a message leaves Redis only after its result is stored, in the same
//! atomic step that publishes its retry, its children or its dead-letter record. While a task
//! runs its lease is renewed; if the worker dies the lease runs out and any worker restores the
//! message. A failed task is logged and the loop goes on; losing Redis makes the loop wait and
//! reconnect, never exit.
//!
//! Each step of a task's life is emitted once on the lifecycle stream ([`crate::lifecycle`]),
//! where the log line, Celery events and metrics pick it up.

mod node;

use crate::broker::{Broker, Delivery, FollowUp, ResultStore, now_ms};
use crate::canvas::{self, Router as _};
use crate::events::CeleryEvents;
use crate::kv::KvStore;
use crate::lifecycle::{Failure, Lifecycle, Revoked, Stage, Subscriber, TaskEvent};
use crate::protocol::{self, NewTask, Poison, TaskMessage, states};
use crate::registry::Registry;
use crate::results::StoredResult;
use crate::runtime::{Invocation, Outcome, RunEnv, RunReport, Signals, printable};
use chrono::{DateTime, Utc};
use futures_util::FutureExt as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

/// Longest the fetch loop sleeps when the queues are empty. After work it polls every
/// `FAST_IDLE_POLL` for `FAST_IDLE_POLLS` empty polls, so a steady stream of tasks is picked up
/// well within a millisecond; then it backs off from 2 ms, doubling to this, so an idle worker
/// costs Redis about 30 cheap calls a second.
const MAX_IDLE_POLL: Duration = Duration::from_millis(32);
/// The pause between empty polls right after work.
const FAST_IDLE_POLL: Duration = Duration::from_micros(250);
/// Empty polls at the fast pace before backing off (about a tenth of a second).
const FAST_IDLE_POLLS: u32 = 300;
/// Fetch loops per worker: while one waits for its reply, another can fill the slots freed
/// meanwhile.
const FETCHERS: usize = 2;
/// How often leases are renewed, due ETA messages moved and revocations of running tasks checked.
const MAINTENANCE_TICK: Duration = Duration::from_millis(250);
/// Shortest time between two stored progress reports of one task.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// How long each last step of a shutdown waits for Redis (an in-flight fetch, the maintenance
/// round under way, the offline event): plenty for a Redis that answers, and short enough that
/// one that is gone does not hold the stop past the service manager's timeout. What these steps
/// leave undone is safe: a fetched message's lease runs out and it is restored.
const SHUTDOWN_REDIS_WAIT: Duration = Duration::from_secs(2);
/// How often expired leases are restored.
const RESTORE_EVERY: Duration = Duration::from_secs(2);

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Queues in priority order (strict: a later queue is served only when earlier ones are
    /// empty).
    pub queues: Vec<String>,
    /// Weights per queue (same order as `queues`) for weighted consumption: each fetch starts
    /// at a queue drawn with these weights, so no queue starves. Empty means strict order.
    pub weights: Vec<u32>,
    /// Task slots.
    pub concurrency: usize,
    /// `celeriac@<host>`.
    pub hostname: String,
    /// How long running tasks may finish after a shutdown signal.
    pub grace: Duration,
    /// How long revocations are remembered.
    pub revoke_ttl: Duration,
    /// Store STARTED when a task starts (Celery's `task_track_started`).
    pub track_started: bool,
    /// Store each state with the task's name, args, kwargs, worker, retries and queue
    /// (Celery's `result_extended`).
    pub result_extended: bool,
}

/// Counters, for the shutdown summary and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Runs that succeeded.
    pub succeeded: AtomicU64,
    /// Runs that failed for good (dead-lettered).
    pub failed: AtomicU64,
    /// Runs rescheduled for a retry.
    pub retried: AtomicU64,
    /// Messages dead-lettered without running (poison, unknown task).
    pub poisoned: AtomicU64,
    /// Messages skipped as revoked or expired.
    pub revoked: AtomicU64,
    /// Fetch round trips that returned messages.
    pub fetches: AtomicU64,
    /// Messages fetched.
    pub fetched: AtomicU64,
    /// Times the broker connection was made again (Redis went away, or a failover moved it).
    pub reconnects: AtomicU64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "{} runs succeeded, {} failed, {} retries, {} revoked, {} dead-lettered unrun \
             ({} messages in {} fetches)",
            n(&self.succeeded),
            n(&self.failed),
            n(&self.retried),
            n(&self.revoked),
            n(&self.poisoned),
            n(&self.fetched),
            n(&self.fetches)
        )
    }
}

struct Running {
    /// The task, once its message decoded (for `inspect active`).
    task: Option<Arc<TaskMessage>>,
    /// When it was taken, in seconds since the epoch.
    since: f64,
    signals: Signals,
}

impl Running {
    fn id(&self) -> &str {
        self.task.as_ref().map_or("", |t| t.id.as_str())
    }
}

/// What watches a worker: subscribers to its lifecycle stream, and the Celery events it sends
/// (which the `enable_events` / `disable_events` control commands switch).
#[derive(Default)]
pub struct Monitoring {
    /// Lifecycle subscribers besides the log line (metrics, ...).
    pub subscribers: Vec<Arc<dyn Subscriber>>,
    /// Celery events for Flower; `None` sends none.
    pub events: Option<Arc<CeleryEvents>>,
}

/// Results to store and, for a handled message, the commands to run atomically with its ack
/// (no delivery: results only, such as STARTED). The delivery travels along so that a message
/// Redis refuses to settle as it ended can still be dead-lettered whole.
struct Settlement {
    delivery: Option<Delivery>,
    results: Vec<StoredResult>,
    then: Vec<FollowUp>,
    /// Chord work around the ack.
    chords: Chords,
}

/// What a settlement does for chords in the result backend, before its ack: the size of each
/// chord it starts (set before any part can end), and its chord header parts among its
/// results (joined after they are stored).
#[derive(Debug, Default)]
struct Chords {
    sizes: Vec<(String, u64)>,
    parts: Vec<canvas::ChordPart>,
}

/// What joining a batch's chord parts adds: per settlement, its follow-ups with what completing
/// a chord sends (`None`: unchanged), and the chords completed, with the part that claimed each.
struct Joined {
    then: Vec<Option<Vec<FollowUp>>>,
    completed: Vec<(String, String)>,
}

/// A chord whose body cannot be sent (a body celeriac cannot follow): the body's id gets a
/// FAILURE that says why, rather than wait for ever.
fn chord_body_failed(part: &canvas::ChordPart, e: &canvas::CanvasError) -> Option<StoredResult> {
    let id = part.body["options"]["task_id"].as_str()?;
    let error = format!("the chord's body cannot be sent: {e}");
    tracing::error!(group = %printable(&part.group_id), "{error}");
    let exception = protocol::exception("WorkflowError", &error);
    Some(StoredResult {
        id: id.to_string(),
        meta: protocol::result_meta(id, states::FAILURE, exception, None, &[]),
    })
}

/// Most messages settled in one round trip pair (results, then acks).
const MAX_SETTLE_BATCH: usize = 256;
/// Most result bytes in one batch: far below what one Redis request may carry (1 GiB), so a
/// batch of large results is split before Redis has to refuse it.
const MAX_SETTLE_BYTES: usize = 32 << 20;
/// Failed attempts at one batch with transient errors (a reset connection) before asking
/// whether Redis answers at all: if it does, the batch itself is the problem and is split.
const TRANSIENT_ATTEMPTS: u32 = 3;

/// A celeriac worker bound to a broker, a result backend and a set of loaded tasks.
pub struct Worker<B: Broker, R: ResultStore> {
    /// The tasks and their modules. A deploy or a reload swaps in a new registry; a task keeps
    /// the one it started with.
    registry: std::sync::RwLock<Arc<Registry>>,
    broker: B,
    results: R,
    kv: KvStore,
    opts: WorkerOptions,
    id: String,
    /// Numbers each fetch, so every delivery tag is unique.
    fetch_seq: AtomicU64,
    running: Mutex<HashMap<String, Running>>,
    /// Whether any revocation is in force: set from the revoked set's size every maintenance
    /// tick and at once for revocations heard on the control channel. While it is clear (the
    /// common case) a fetched batch is not checked at all; while it is set, each batch's ids are
    /// looked up in Redis in one round trip. Nothing of the set is copied here, so a million
    /// revocations cost a worker no memory.
    revocations: AtomicBool,
    settle_tx: Mutex<Option<mpsc::UnboundedSender<Settlement>>>,
    /// Where each step of a task's life is reported.
    lifecycle: Lifecycle,
    events: Option<Arc<CeleryEvents>>,
    /// Tasks taken per name since start (Celery's `stats.total`).
    totals: Arc<node::Totals>,
    /// Free task slots.
    slots: Arc<Semaphore>,
    /// The settings remote control changes while the worker runs.
    live: node::Live,
    /// Cancelled by the `shutdown` control command; set while the worker runs.
    shutdown: Mutex<Option<CancellationToken>>,
    /// When the fetch loops last moved, and whether they are ready (the systemd watchdog's
    /// view).
    pulse: node::Pulse,
    started: Instant,
    /// Counters since start.
    pub stats: Stats,
}

/// A fetched message as the fetch loop read it: a task, a message that is not one (dead-lettered
/// untouched), or one the decoder itself failed on (celeriac's bug, settled like a host panic).
enum Decoded {
    /// Shared: the running-task table shows it to `inspect active`.
    Task(Arc<TaskMessage>),
    Poison(Poison),
    Panicked(String),
}

impl Decoded {
    fn of(payload: &[u8]) -> Decoded {
        match std::panic::catch_unwind(|| protocol::decode(payload)) {
            Ok(Ok(msg)) => Decoded::Task(Arc::new(msg)),
            Ok(Err(poison)) => Decoded::Poison(poison),
            Err(panic) => Decoded::Panicked(panic_message(panic.as_ref())),
        }
    }
}

/// What the batch's round trip decided for a message before it is handled.
#[derive(Debug, Clone, Copy, Default)]
struct Admission {
    /// Revoked by id: never run.
    revoked: bool,
    /// Rate limited: its slot is this far off.
    rate_wait: Option<Duration>,
}

/// What became of one message.
enum Disposition {
    /// Store these results, join these chord parts, then ack together with these broker
    /// commands (and what completing a chord sends).
    Finish { results: Vec<StoredResult>, then: Vec<FollowUp>, chords: Chords },
    /// Leave the message unacked: the worker is shutting down and it goes back to its queue.
    Requeue,
}

impl<B: Broker, R: ResultStore> Worker<B, R> {
    /// A worker; call [`run`](Self::run) to start it.
    pub fn new(
        registry: Arc<Registry>,
        broker: B,
        results: R,
        kv: KvStore,
        opts: WorkerOptions,
    ) -> Arc<Self> {
        Self::monitored(registry, broker, results, kv, opts, Monitoring::default())
    }

    /// A worker whose lifecycle `monitoring` watches.
    pub fn monitored(
        registry: Arc<Registry>,
        broker: B,
        results: R,
        kv: KvStore,
        opts: WorkerOptions,
        monitoring: Monitoring,
    ) -> Arc<Self> {
        let totals = Arc::new(node::Totals::default());
        let mut subscribers = monitoring.subscribers;
        subscribers.push(totals.clone());
        if let Some(events) = &monitoring.events {
            subscribers.push(events.clone());
        }
        let (live, slots) = (node::Live::new(&opts), Arc::new(Semaphore::new(opts.concurrency)));
        Arc::new(Worker {
            registry: std::sync::RwLock::new(registry),
            broker,
            results,
            kv,
            opts,
            id: uuid::Uuid::new_v4().simple().to_string(),
            fetch_seq: AtomicU64::new(0),
            running: Mutex::new(HashMap::new()),
            revocations: AtomicBool::new(false),
            settle_tx: Mutex::new(None),
            lifecycle: Lifecycle::new(subscribers),
            events: monitoring.events,
            totals,
            slots,
            live,
            shutdown: Mutex::new(None),
            pulse: node::Pulse::default(),
            started: Instant::now(),
            stats: Stats::default(),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `shutdown` is cancelled, then lets running tasks finish within the grace
    /// period and hands the rest back to their queues.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.run_until(shutdown, CancellationToken::new()).await
    }

    /// [`run`](Self::run), where cancelling `force` during the shutdown cuts the grace period
    /// short: running tasks are stopped and handed back at once, and results still waiting for
    /// an unreachable Redis are given up (their messages return after their leases).
    pub async fn run_until(
        self: Arc<Self>,
        shutdown: CancellationToken,
        force: CancellationToken,
    ) -> anyhow::Result<()> {
        self.broker.declare(&self.opts.queues).await?;
        self.refresh_revoked().await;
        *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = Some(shutdown.clone());
        let stop_events = CancellationToken::new();
        let events = self.events.clone().map(|events| {
            let me = self.clone();
            let load = move || me.load();
            tokio::spawn(events.run(self.broker.clone(), load, stop_events.clone()))
        });
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        *self.settle_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(settle_tx);
        let settler = tokio::spawn(self.clone().settler(settle_rx));
        info!(worker = %self.opts.hostname, queues = ?self.opts.queues, concurrency = self.opts.concurrency, "worker ready");
        let stop_maintenance = CancellationToken::new();
        let maintenance = tokio::spawn(self.clone().maintain(stop_maintenance.clone()));
        let control = {
            let (broker, node) = (self.broker.clone(), self.clone());
            let (hostname, ttl) = (self.opts.hostname.clone(), self.opts.revoke_ttl);
            tokio::spawn(async move { broker.serve_control(hostname, ttl, node).await })
        };
        let slots = self.slots.clone();
        let tasks = TaskTracker::new();
        let fetchers: Vec<_> = (0..FETCHERS.min(self.opts.concurrency))
            .map(|_| {
                tokio::spawn(self.clone().fetch_loop(
                    slots.clone(),
                    tasks.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        self.pulse.ready.cancel();
        for f in fetchers {
            if let Err(e) = f.await {
                warn!("a fetch loop ended abnormally: {e}");
            }
        }
        tasks.close();
        info!(
            "shutting down: waiting up to {:?} for {} running tasks",
            self.opts.grace,
            tasks.len()
        );
        let finished = tokio::select! {
            done = tokio::time::timeout(self.opts.grace, tasks.wait()) => done.is_ok(),
            _ = force.cancelled() => false,
        };
        if !finished {
            for r in self.running().values() {
                r.signals.terminate();
            }
            tasks.wait().await;
        }
        // Every handled message is settled before the worker stops, unless told to go now.
        self.settle_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        tokio::select! {
            _ = settler => {}
            _ = force.cancelled() => warn!("stopping without waiting for Redis to take the last results"),
        }
        stop_maintenance.cancel();
        control.abort();
        let maintenance_abort = maintenance.abort_handle();
        if tokio::time::timeout(SHUTDOWN_REDIS_WAIT, maintenance).await.is_err() {
            maintenance_abort.abort();
        }
        // Last, so the offline event follows every task event.
        stop_events.cancel();
        if let Some(events) = events {
            let events_abort = events.abort_handle();
            if tokio::time::timeout(SHUTDOWN_REDIS_WAIT, events).await.is_err() {
                events_abort.abort();
                warn!(
                    "Redis did not take the offline event; Flower will mark the worker offline after its heartbeats stop"
                );
            }
        }
        // Whatever is still unacked (stopped at shutdown) goes back to its queue now rather than
        // after its lease: its tags are ours and nobody runs them any more.
        let leftovers: Vec<String> = self.running().keys().cloned().collect();
        if !leftovers.is_empty() {
            self.requeue_now(&leftovers).await;
        }
        Ok(())
    }

    /// Takes messages for free slots and starts a task for each, until shutdown. Several of
    /// these run side by side, so a fetch is on its way while another one's reply is being
    /// handed out: slots freed during a round trip do not wait for it to end. Each fetch asks
    /// only for the slots it holds: no prefetching that hoards messages.
    async fn fetch_loop(
        self: Arc<Self>,
        slots: Arc<Semaphore>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let mut empty_polls: u32 = 0;
        let mut redis_down = Duration::ZERO;
        while !shutdown.is_cancelled() {
            self.pulse.turned(self.started);
            let mut permits = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break, // closed: the worker is going away
                },
            };
            // Every other free slot too: one round trip fills them all.
            let more = slots.available_permits() as u32;
            if more > 0
                && let Ok(extra) = slots.clone().try_acquire_many_owned(more)
            {
                permits.merge(extra);
            }
            let n = self.fetch_seq.fetch_add(1, Ordering::Relaxed);
            let prefix = format!("{}.{n}.", self.id);
            let order = self.live.fetch_order();
            self.pulse.fetching.fetch_add(1, Ordering::Relaxed);
            let fetch = self.broker.fetch(&order, permits.num_permits(), &prefix);
            tokio::pin!(fetch);
            // A shutdown lets a fetch under way finish (its messages are then run), but does
            // not wait on a Redis that is gone.
            let fetched = tokio::select! {
                biased;
                fetched = &mut fetch => Some(fetched),
                _ = shutdown.cancelled() => {
                    tokio::time::timeout(SHUTDOWN_REDIS_WAIT, &mut fetch).await.ok()
                }
            };
            self.pulse.fetching.fetch_sub(1, Ordering::Relaxed);
            let Some(fetched) = fetched else { break };
            self.pulse.turned(self.started);
            let deliveries = match fetched {
                Ok(d) => {
                    redis_down = Duration::ZERO;
                    d
                }
                Err(e) => {
                    drop(permits);
                    redis_down =
                        (redis_down * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                    warn!("fetch failed, retrying in {redis_down:?}: {e}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(redis_down) => continue,
                    }
                }
            };
            if deliveries.is_empty() {
                drop(permits);
                empty_polls = empty_polls.saturating_add(1);
                if empty_polls <= FAST_IDLE_POLLS {
                    // tokio's timer rounds sleeps up to whole milliseconds (1.5 ms on average
                    // for a 1 ms sleep); a short sleep on a blocking thread is precise.
                    let _ =
                        tokio::task::spawn_blocking(|| std::thread::sleep(FAST_IDLE_POLL)).await;
                    continue;
                }
                let backoff = (empty_polls - FAST_IDLE_POLLS).min(6);
                let idle = (Duration::from_millis(1) * 2u32.pow(backoff)).min(MAX_IDLE_POLL);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(idle) => continue,
                }
            }
            empty_polls = 0;
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            self.stats.fetched.fetch_add(deliveries.len() as u64, Ordering::Relaxed);
            let batch: Vec<(Delivery, Decoded)> = deliveries
                .into_iter()
                .map(|d| {
                    let decoded = Decoded::of(&d.payload);
                    (d, decoded)
                })
                .collect();
            let admissions = self.admit(&batch).await;
            for ((d, decoded), admission) in batch.into_iter().zip(admissions) {
                let Some(permit) = permits.split(1) else { break };
                let signals = Signals::default();
                let running = Running {
                    task: match &decoded {
                        Decoded::Task(msg) => Some(msg.clone()),
                        _ => None,
                    },
                    since: crate::broker::now_secs(),
                    signals: signals.clone(),
                };
                self.running().insert(d.tag.clone(), running);
                let me = self.clone();
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    // Boxed: the life of a task is a large future, and tokio moves a spawned
                    // future by value when it starts and ends.
                    Box::pin(me.process(d, decoded, admission, signals, stop)).await;
                    drop(permit);
                });
            }
        }
    }

    /// Handles one delivery and settles it with the broker. Whatever goes wrong in handling it,
    /// a panic included, ends with the delivery settled: a message that stayed in `running`
    /// would have its lease renewed for ever and never be run, restored or dead-lettered.
    async fn process(
        &self,
        d: Delivery,
        decoded: Decoded,
        admission: Admission,
        signals: Signals,
        shutdown: CancellationToken,
    ) {
        let handling = async {
            match decoded {
                // A message that is not a Celery v2 task goes to the dead-letter list untouched.
                Decoded::Poison(poison) => self.poison(&d, &poison),
                Decoded::Panicked(panic) => self.host_panic(&d, panic),
                Decoded::Task(msg) => self.handle(&d, msg, admission, signals, &shutdown).await,
            }
        };
        let handled = AssertUnwindSafe(handling).catch_unwind().await;
        let disposition = match handled {
            Ok(disposition) => disposition,
            Err(panic) => self.host_panic(&d, panic_message(panic.as_ref())),
        };
        match disposition {
            Disposition::Requeue => {}
            Disposition::Finish { results, then, chords } => {
                self.to_settler(Settlement { delivery: Some(d), results, then, chords }).await
            }
        }
    }

    /// Hands a settlement to the batching settler (or settles it here once the settler is gone).
    async fn to_settler(&self, settlement: Settlement) {
        let tx = self.settle_tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tx {
            Some(tx) => {
                let _ = tx.send(settlement);
            }
            None => self.settle(vec![settlement]).await,
        }
    }

    /// The life of one task. Returns what to store and how to settle the message; never fails:
    /// every problem becomes a result or a dead letter.
    async fn handle(
        &self,
        d: &Delivery,
        msg: Arc<TaskMessage>,
        admission: Admission,
        signals: Signals,
        shutdown: &CancellationToken,
    ) -> Disposition {
        // Ids and names come from the producer: escaped, so they cannot forge log lines.
        let span = info_span!(
            "task",
            task.id = %printable(&msg.id),
            task.name = %printable(&msg.task)
        );
        let ignored = msg.ignore_result.then(|| msg.id.clone());
        let task = msg.clone();
        let disposition = async move {
            self.emit(d, &msg, Stage::Received, None);
            // The task runs on the modules of this moment to its end, whatever is deployed
            // meanwhile.
            let registry = self.registry();
            // Unknown task: nobody here can run it. Fail it visibly rather than drop it.
            let Ok(entry) = registry.get(&msg.task) else {
                self.stats.poisoned.fetch_add(1, Ordering::Relaxed);
                let reason = format!("task {:?} is not registered with this worker", msg.task);
                let error = Failure { exc_type: "NotRegistered", message: &reason, traceback: "" };
                self.emit(d, &msg, Stage::Failed { error }, None);
                let exception = protocol::exception("NotRegistered", &reason);
                let (results, errbacks) = self.failed(&msg, &exception, None);
                return match errbacks {
                    Ok(then) => self.finish_dead(d, &msg, "unknown_task", &reason, results, then),
                    Err(e) => self.workflow_failed(d, &msg, &e, results, Vec::new()),
                };
            };

            // Revoked (by id, checked for the whole fetched batch) or expired: never run.
            if admission.revoked {
                self.stats.revoked.fetch_add(1, Ordering::Relaxed);
                return self.finish_revoked(d, &msg, Revoked::ById, None);
            }
            let now = Utc::now();
            if msg.expired(now) {
                self.stats.revoked.fetch_add(1, Ordering::Relaxed);
                return self.finish_revoked(d, &msg, Revoked::Expired, None);
            }

            // Not due yet: park it in the scheduled set, not in worker memory.
            if let Some(eta) = msg.due_later(now) {
                let then = vec![self.park(d, &msg, eta.timestamp_millis())];
                return Disposition::Finish { results: vec![], then, chords: Chords::default() };
            }

            // Global rate limit: its slot is later, come back then.
            if let Some(wait) = admission.rate_wait {
                self.emit(d, &msg, Stage::RateLimited { wait }, None);
                let then = vec![self.park(d, &msg, now_ms() + wait.as_millis() as i64)];
                return Disposition::Finish { results: vec![], then, chords: Chords::default() };
            }

            // Run it. STARTED goes through the settler like every result, so it is stored in
            // order before the final state and costs no round trip of its own.
            if self.opts.track_started && !msg.ignore_result {
                let mut started = self.result(
                    &msg,
                    states::STARTED,
                    json!({"pid": std::process::id(), "hostname": self.opts.hostname}),
                    &[],
                );
                self.extend(&mut started, d, &msg);
                self.to_settler(Settlement {
                    delivery: None,
                    results: vec![started],
                    then: vec![],
                    chords: Chords::default(),
                })
                .await;
            }
            self.emit(d, &msg, Stage::Started, None);
            let set = self.live.limits(&msg.task, &entry.spec.limits);
            let limits = producer_limits(set.as_ref().unwrap_or(&entry.spec.limits), msg.time_limits);
            let invocation = Invocation {
                id: msg.id.clone(),
                task: msg.task.clone(),
                args: msg.args.clone(),
                kwargs: msg.kwargs.clone(),
                retries: msg.retries,
            };
            // Progress reports become the task's custom state, as Celery's update_state does.
            // They are forwarded as they come, beside the run in this same task; the run drops
            // its sender when it ends, so every report is queued before the final state and a
            // late PROGRESS cannot overwrite a FAILURE or RETRY.
            let (progress, reports) = match entry.spec.grants.progress && !msg.ignore_result {
                true => {
                    let (tx, rx) = crate::runtime::progress_channel();
                    (Some(tx), Some(rx))
                }
                false => (None, None),
            };
            let env = RunEnv { kv: Some(self.kv.clone()), progress, signals };
            let run = registry.runtime().run(
                &entry.module,
                &invocation,
                &limits,
                entry.spec.grants.clone(),
                env,
            );
            let report = match reports {
                Some(reports) => {
                    let done = CancellationToken::new();
                    let run = async {
                        let report = run.await;
                        done.cancel();
                        report
                    };
                    tokio::join!(run, self.store_progress(reports, &done)).0
                }
                None => run.await,
            };
            if let Outcome::PoolExhausted { message } = &report.outcome {
                // The task never started: it goes back to its queue with its retries intact.
                warn!(queue = %printable(&d.queue), "no room in the instance pool ({message}); task handed back to its queue");
                return Disposition::Requeue;
            }
            if report.outcome == Outcome::Terminated && shutdown.is_cancelled() {
                // Stopped because the worker is going away: hand it back, do not fail it.
                info!(queue = %printable(&d.queue), "task stopped by the shutdown; handed back to its queue");
                return Disposition::Requeue;
            }
            self.classify(d, &msg, &entry.spec, report)
        }
        .instrument(span)
        .await;
        // `ignore_result` (Celery's `apply_async(ignore_result=True)`): no state of this task is
        // stored, whatever it ended as. Its children and dead letters are sent all the same.
        // A chord header part reports to its chord with its final state, stored or not.
        match disposition {
            Disposition::Finish { mut results, then, mut chords } => {
                chords.parts = canvas::chord_parts(&task, &results);
                results.retain(|r| Some(&r.id) != ignored.as_ref());
                for r in results.iter_mut().filter(|r| r.id == task.id) {
                    self.extend(r, d, &task);
                }
                Disposition::Finish { results, then, chords }
            }
            other => other,
        }
    }

    /// Turns a run's outcome into the results to store and the broker commands to run with the
    /// ack: children on success, a rescheduled copy on retry, a dead letter when retries are
    /// exhausted or the failure is permanent.
    fn classify(
        &self,
        d: &Delivery,
        msg: &TaskMessage,
        spec: &crate::config::TaskSpec,
        report: RunReport,
    ) -> Disposition {
        let outcome = &report.outcome;
        if let Outcome::Success { result } = outcome {
            self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            self.emit(d, msg, Stage::Succeeded { result }, Some(&report));
            let mut then = Vec::with_capacity(report.children.len());
            let mut children: Vec<String> =
                report.children.iter().map(|c| self.publish_child(&mut then, msg, c)).collect();
            // The chains, groups and chords it sent, then its callbacks and the next step of
            // its own chain: all sent with the ack, listed as children.
            let from = self.origin(msg);
            let followed = report
                .workflows
                .iter()
                .map(|w| canvas::send(&w.signature, &from))
                .chain(msg.workflow.as_deref().map(|wf| {
                    let result = serde_json::from_str(result).unwrap_or(Value::Null);
                    canvas::on_success(wf, &from, &result)
                }))
                .try_fold(canvas::Followed::default(), |mut all, f| {
                    let f = f?;
                    all.sent.extend(f.sent);
                    all.chord_sizes.extend(f.chord_sizes);
                    Ok::<_, canvas::CanvasError>(all)
                });
            let mut chords = Chords::default();
            let followed = match followed {
                Ok(followed) => followed,
                Err(e) => {
                    let meta = protocol::result_meta_json(
                        &msg.id,
                        states::SUCCESS,
                        result,
                        None,
                        &children,
                    );
                    let stored = StoredResult { id: msg.id.clone(), meta };
                    return self.workflow_failed(d, msg, &e, vec![stored], then);
                }
            };
            for s in followed.sent {
                children.push(s.id);
                then.push(s.follow_up);
            }
            chords.sizes = followed.chord_sizes;
            // The runtime validated the result as JSON: it goes into the meta as it is.
            let meta =
                protocol::result_meta_json(&msg.id, states::SUCCESS, result, None, &children);
            let stored = StoredResult { id: msg.id.clone(), meta };
            return Disposition::Finish { results: vec![stored], then, chords };
        }
        if outcome == &Outcome::Terminated {
            self.stats.revoked.fetch_add(1, Ordering::Relaxed);
            return self.finish_revoked(d, msg, Revoked::Terminated, Some(&report));
        }
        let (mut exc_type, mut message) = outcome.exception().unwrap_or_default();
        let retry = spec.retry.should_retry(outcome, msg.retries);
        if !retry && let Outcome::Retry { reason, .. } = outcome {
            // As Celery's `Task.retry` past `max_retries`: the client raises this, not `Retry`.
            exc_type = "MaxRetriesExceededError".into();
            let text = format!(
                "Can't retry {}[{}] args:{} kwargs:{} ({reason})",
                msg.task, msg.id, msg.args, msg.kwargs
            );
            message = crate::runtime::cap_text(text, crate::runtime::MAX_ERROR_TEXT);
        }
        let exception = protocol::exception(&exc_type, &message);
        let traceback = match outcome {
            Outcome::Trap { backtrace: Some(bt), .. } => format!("{exc_type}: {message}\n{bt}"),
            _ => format!("{exc_type}: {message}"),
        };
        let error = Failure { exc_type: &exc_type, message: &message, traceback: &traceback };
        if retry {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            self.emit(d, msg, Stage::Retried { error }, Some(&report));
            let delay = match outcome {
                Outcome::Retry { countdown: Some(c), .. } => *c,
                _ => jitter(spec.retry.delay(msg.retries), spec.retry.jitter),
            };
            let eta = protocol::eta_after(delay);
            let then = vec![FollowUp::Schedule {
                queue: d.queue.clone(),
                priority: msg.priority,
                envelope: msg.retry_envelope(eta),
                due_ms: eta.timestamp_millis(),
            }];
            let stored = StoredResult {
                id: msg.id.clone(),
                meta: protocol::result_meta(
                    &msg.id,
                    states::RETRY,
                    exception,
                    Some(&traceback),
                    &[],
                ),
            };
            return Disposition::Finish { results: vec![stored], then, chords: Chords::default() };
        }
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.emit(d, msg, Stage::Failed { error }, Some(&report));
        let reason = if matches!(outcome, Outcome::Failed { .. })
            || !spec.retry.retry_on.iter().any(|k| k == outcome.kind())
        {
            "failed"
        } else {
            "retries_exhausted"
        };
        let (results, errbacks) = self.failed(msg, &exception, Some(&traceback));
        let error = format!("{exc_type}: {message}");
        match errbacks {
            Ok(then) => self.finish_dead(d, msg, reason, &error, results, then),
            Err(e) => self.workflow_failed(d, msg, &e, results, Vec::new()),
        }
    }

    /// What a task that failed for good stores and sends: FAILURE at its own id and, as
    /// Celery does, at every frozen id of the rest of its chain (so the chain's result raises
    /// rather than waits for ever), and its errbacks, given its id.
    fn failed(
        &self,
        msg: &TaskMessage,
        exception: &Value,
        traceback: Option<&str>,
    ) -> (Vec<StoredResult>, Result<Vec<FollowUp>, canvas::CanvasError>) {
        let failure = |id: &str| StoredResult {
            id: id.to_string(),
            meta: protocol::result_meta(id, states::FAILURE, exception.clone(), traceback, &[]),
        };
        let mut results = vec![failure(&msg.id)];
        let Some(wf) = msg.workflow.as_deref() else { return (results, Ok(Vec::new())) };
        results.extend(wf.chain_ids().iter().map(|id| failure(id)));
        // An errback is a task or a group of tasks; one that starts a chord is not followed.
        let errbacks = canvas::on_failure(wf, &self.origin(msg)).and_then(|f| match f {
            f if f.chord_sizes.is_empty() => Ok(f.sent.into_iter().map(|s| s.follow_up).collect()),
            _ => Err(canvas::CanvasError("an errback that is a chord".into())),
        });
        (results, errbacks)
    }

    /// Where a workflow's messages come from: `msg`, routed as children are.
    fn origin<'a>(&'a self, msg: &'a TaskMessage) -> canvas::Origin<'a> {
        canvas::Origin::of(msg, self)
    }

    /// A workflow that cannot be followed: the task's own outcome is stored, every frozen id
    /// of the rest of its chain gets a FAILURE that says why, and the message is dead-lettered
    /// with the reason, so nothing that should have followed is dropped without a word.
    fn workflow_failed(
        &self,
        d: &Delivery,
        msg: &TaskMessage,
        e: &canvas::CanvasError,
        mut results: Vec<StoredResult>,
        then: Vec<FollowUp>,
    ) -> Disposition {
        let error = format!("its workflow cannot be followed: {e}");
        let exception = protocol::exception("WorkflowError", &error);
        let chain = msg.workflow.as_deref().map(canvas::Workflow::chain_ids).unwrap_or_default();
        let stored: Vec<String> = results.iter().map(|r| r.id.clone()).collect();
        for id in chain.iter().filter(|id| !stored.contains(id)) {
            let meta = protocol::result_meta(id, states::FAILURE, exception.clone(), None, &[]);
            results.push(StoredResult { id: id.clone(), meta });
        }
        self.finish_dead(d, msg, "workflow", &error, results, then)
    }

    /// The envelope of a child task, published with the parent's ack.
    fn publish_child(
        &self,
        then: &mut Vec<FollowUp>,
        parent: &TaskMessage,
        child: &crate::runtime::ChildTask,
    ) -> String {
        let queue = child.queue.clone().unwrap_or_else(|| self.registry().queue_for(&child.name));
        let opts = NewTask {
            id: Some(child.id.clone()),
            priority: child.priority,
            parent_id: Some(parent.id.clone()),
            root_id: Some(parent.root_id.clone().unwrap_or_else(|| parent.id.clone())),
            eta: child.countdown.map(protocol::eta_after),
            ..NewTask::default()
        };
        let (id, envelope) =
            protocol::encode(&child.name, &child.args, &child.kwargs, &queue, &opts);
        let priority = child.priority.unwrap_or(0);
        then.push(match opts.eta {
            Some(eta) => {
                FollowUp::Schedule { queue, priority, envelope, due_ms: eta.timestamp_millis() }
            }
            None => FollowUp::Publish { queue, priority, envelope },
        });
        id
    }

    /// Stores the task's latest progress report as its state (a custom state name with its meta
    /// as the result, like Celery's `update_state`), at most every `PROGRESS_INTERVAL`, until
    /// the run is `done`; the last report is stored then. The reports go through the settler, in
    /// order after STARTED and before the final state. A task reporting in a tight loop costs
    /// one Redis write per interval, not one per report.
    async fn store_progress(
        &self,
        mut reports: crate::runtime::ProgressReceiver,
        done: &CancellationToken,
    ) {
        let mut stored = 0;
        loop {
            let finished = tokio::select! {
                changed = reports.changed() => changed.is_err(),
                _ = done.cancelled() => true,
            };
            let latest = {
                let report = reports.borrow_and_update();
                (report.0 > stored).then(|| report.clone())
            };
            if let Some((seq, Some(p))) = latest {
                stored = seq;
                let meta = protocol::result_meta(&p.task_id, &p.state, p.meta, None, &[]);
                let results = vec![StoredResult { id: p.task_id, meta }];
                let progress =
                    Settlement { delivery: None, results, then: vec![], chords: Chords::default() };
                self.to_settler(progress).await;
            }
            if finished {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
                _ = done.cancelled() => {}
            }
        }
    }

    /// Puts the message, as received, into the scheduled set until `due_ms`.
    fn park(&self, d: &Delivery, msg: &TaskMessage, due_ms: i64) -> FollowUp {
        FollowUp::Schedule {
            queue: d.queue.clone(),
            priority: msg.priority,
            envelope: String::from_utf8_lossy(&d.payload).into_owned(),
            due_ms,
        }
    }

    /// Adds Celery's `result_extended` fields to `stored`, when the worker was asked to.
    fn extend(&self, stored: &mut StoredResult, d: &Delivery, msg: &TaskMessage) {
        if self.opts.result_extended {
            stored.meta = protocol::extend_meta(&stored.meta, msg, &d.queue, &self.opts.hostname);
        }
    }

    fn result(
        &self,
        msg: &TaskMessage,
        status: &str,
        result: Value,
        children: &[String],
    ) -> StoredResult {
        StoredResult {
            id: msg.id.clone(),
            meta: protocol::result_meta(&msg.id, status, result, None, children),
        }
    }

    /// Tells the lifecycle stream about a step of `msg`'s life.
    fn emit(&self, d: &Delivery, msg: &TaskMessage, stage: Stage<'_>, report: Option<&RunReport>) {
        self.lifecycle.emit(TaskEvent { queue: &d.queue, task: Some(msg), stage, report });
    }

    fn finish_revoked(
        &self,
        d: &Delivery,
        msg: &TaskMessage,
        why: Revoked,
        report: Option<&RunReport>,
    ) -> Disposition {
        self.emit(d, msg, Stage::Revoked { why }, report);
        let why = match why {
            Revoked::ById => "revoked",
            Revoked::Expired => "expired",
            Revoked::Terminated => "terminated",
        };
        let exc = json!({"exc_type": "TaskRevokedError", "exc_message": [why], "exc_module": "celery.exceptions"});
        Disposition::Finish {
            results: vec![self.result(msg, states::REVOKED, exc, &[])],
            then: Vec::new(),
            chords: Chords::default(),
        }
    }

    /// Settles a delivery whose handling panicked: FAILURE (`HostError`) when its id is known,
    /// and a dead letter with the panic, so the message is neither lost nor run again blindly.
    fn host_panic(&self, d: &Delivery, panic: String) -> Disposition {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let error = format!("celeriac failed while handling this message: {panic}");
        let (results, then) = self.host_failure(d, "host_error", &error);
        Disposition::Finish { results, then, chords: Chords::default() }
    }

    /// What celeriac's own failure with a delivery stores and sends: FAILURE (`HostError`) when
    /// the message decodes to a task, and the message, untouched, in its queue's dead-letter
    /// list with `reason`.
    fn host_failure(
        &self,
        d: &Delivery,
        reason: &str,
        error: &str,
    ) -> (Vec<StoredResult>, Vec<FollowUp>) {
        let msg = protocol::decode(&d.payload).ok();
        tracing::error!(
            queue = %printable(&d.queue),
            task.id = %printable(msg.as_ref().map_or("?", |m| m.id.as_str())),
            "dead-lettering ({reason}): {error}"
        );
        if let Some(m) = &msg {
            let error = Failure { exc_type: "HostError", message: error, traceback: "" };
            self.emit(d, m, Stage::Failed { error }, None);
        }
        let results = msg
            .iter()
            .map(|m| self.result(m, states::FAILURE, protocol::exception("HostError", error), &[]))
            .collect();
        let attempts = msg.as_ref().map_or(1, |m| m.retries.saturating_add(1));
        let record =
            dead_letter_record(d, msg.as_ref(), reason, error, attempts, &self.opts.hostname);
        (results, vec![FollowUp::DeadLetter { queue: d.queue.clone(), record }])
    }

    fn poison(&self, d: &Delivery, poison: &Poison) -> Disposition {
        self.stats.poisoned.fetch_add(1, Ordering::Relaxed);
        warn!(queue = %d.queue, reason = poison.kind(), "dead-lettering an undecodable message: {poison}");
        let stage = Stage::Rejected { reason: poison.kind() };
        self.lifecycle.emit(TaskEvent { queue: &d.queue, task: None, stage, report: None });
        let record =
            dead_letter_record(d, None, poison.kind(), &poison.to_string(), 0, &self.opts.hostname);
        let then = vec![FollowUp::DeadLetter { queue: d.queue.clone(), record }];
        Disposition::Finish { results: vec![], then, chords: Chords::default() }
    }

    fn finish_dead(
        &self,
        d: &Delivery,
        msg: &TaskMessage,
        reason: &str,
        error: &str,
        results: Vec<StoredResult>,
        mut then: Vec<FollowUp>,
    ) -> Disposition {
        let attempts = msg.retries.saturating_add(1);
        let shown = printable(error);
        warn!(queue = %printable(&d.queue), reason, "dead-lettering after {attempts} attempts: {shown}");
        let record = dead_letter_record(d, Some(msg), reason, error, attempts, &self.opts.hostname);
        then.push(FollowUp::DeadLetter { queue: d.queue.clone(), record });
        Disposition::Finish { results, then, chords: Chords::default() }
    }

    /// Settles handled messages in batches: whatever has piled up while the previous batch was
    /// in flight goes in the next, so under load two round trips settle hundreds of tasks.
    async fn settler(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Settlement>) {
        while let Some(first) = rx.recv().await {
            let mut bytes = settlement_bytes(&first);
            let mut batch = vec![first];
            while batch.len() < MAX_SETTLE_BATCH && bytes < MAX_SETTLE_BYTES {
                match rx.try_recv() {
                    Ok(s) => {
                        bytes += settlement_bytes(&s);
                        batch.push(s);
                    }
                    Err(_) => break,
                }
            }
            self.settle(batch).await;
        }
    }

    /// Stores the batch's results, then acks every message atomically with its follow-up
    /// commands (children, retry, dead letter). While Redis is away it keeps trying: the leases
    /// keep the messages safe meanwhile, and giving up would run them twice. When Redis answers
    /// but refuses the batch, the batch is split until the item it refuses is alone, and that
    /// item is dead-lettered: one bad message never holds up the others.
    async fn settle(&self, batch: Vec<Settlement>) {
        let mut pending = vec![batch];
        while let Some(mut batch) = pending.pop() {
            match self.try_settle(&batch).await {
                Ok(()) => self.settled(&batch),
                Err(e) if batch.len() > 1 => {
                    warn!(
                        "Redis refused a batch of {} settlements, splitting it: {e}",
                        batch.len()
                    );
                    let second = batch.split_off(batch.len() / 2);
                    pending.push(second);
                    pending.push(batch);
                }
                Err(e) => {
                    if let Some(one) = batch.pop() {
                        self.settle_refused(one, e).await;
                    }
                }
            }
        }
    }

    /// One attempt at a batch, repeated while the errors are transient and Redis does not
    /// answer. Returns the error once Redis answers but still refuses the batch.
    async fn try_settle(&self, batch: &[Settlement]) -> crate::broker::BrokerResult<()> {
        let results: Vec<&StoredResult> = batch.iter().flat_map(|s| &s.results).collect();
        let mut delay = Duration::from_millis(50);
        let mut transient = 0;
        loop {
            let attempt = async {
                self.results.store(&results).await?;
                let joined = self.join_chords(batch).await?;
                let acks: Vec<(&str, &[FollowUp])> = batch
                    .iter()
                    .zip(&joined.then)
                    .filter_map(|(s, then)| {
                        let then = then.as_deref().unwrap_or(&s.then);
                        s.delivery.as_ref().map(|d| (d.tag.as_str(), then))
                    })
                    .collect();
                self.broker.settle(&acks).await?;
                // The body went out with the ack: the chord is done. Failing to mark it only
                // leaves its join to expire (its claim keeps other parts from sending again), so
                // it is not a reason to settle again, which would send the body twice.
                for (group, claimer) in &joined.completed {
                    if let Err(e) = self.results.chord_done(group, claimer).await {
                        warn!(group = %printable(group), "could not mark a finished chord done: {e}");
                    }
                }
                Ok::<_, crate::broker::BrokerError>(acks.len())
            };
            match attempt.await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_transient() => {
                    transient += 1;
                    if transient >= TRANSIENT_ATTEMPTS && self.broker.ping().await.is_ok() {
                        return Err(e);
                    }
                    warn!("settling {} messages failed, retrying in {delay:?}: {e}", batch.len());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Joins the batch's chord parts, whose results are stored: for a part that completes its
    /// chord, the body (or its `ChordError` and errbacks) is added to that part's follow-ups,
    /// so it is sent with the part's ack. Joining again (a retried settlement) records nothing
    /// twice and lets the same part claim again.
    async fn join_chords(&self, batch: &[Settlement]) -> crate::broker::BrokerResult<Joined> {
        let mut joined = Joined { then: vec![None; batch.len()], completed: Vec::new() };
        if batch.iter().all(|s| s.chords.sizes.is_empty() && s.chords.parts.is_empty()) {
            return Ok(joined);
        }
        // Chords this batch starts: their sizes are set before their parts are sent.
        for (group, size) in batch.iter().flat_map(|s| &s.chords.sizes) {
            self.results.chord_size(group, *size).await?;
        }
        let mut stored = Vec::new();
        for (i, settlement) in batch.iter().enumerate() {
            for part in &settlement.chords.parts {
                let Some(entries) = self.results.chord_join(part).await? else { continue };
                let followed = match canvas::chord_complete(part, &entries, self) {
                    Ok((results, followed)) => {
                        stored.extend(results);
                        followed
                    }
                    Err(e) => {
                        stored.extend(chord_body_failed(part, &e));
                        canvas::Followed::default()
                    }
                };
                // A body that is itself a chord starts it: its size first.
                for (group, size) in &followed.chord_sizes {
                    self.results.chord_size(group, *size).await?;
                }
                let then = joined.then[i].get_or_insert_with(|| settlement.then.clone());
                then.extend(followed.sent.into_iter().map(|s| s.follow_up));
                joined.completed.push((part.group_id.clone(), part.task_id.clone()));
            }
        }
        self.results.store(&stored.iter().collect::<Vec<_>>()).await?;
        Ok(joined)
    }

    /// Forgets settled deliveries: their leases are no longer renewed.
    fn settled(&self, batch: &[Settlement]) {
        let mut running = self.running();
        for d in batch.iter().filter_map(|s| s.delivery.as_ref()) {
            running.remove(&d.tag);
        }
    }

    /// Settles, as a dead letter, a message Redis refused to settle as it ended (its result too
    /// large to store, a key its follow-ups needed of the wrong type): FAILURE with the reason
    /// (unless a SUCCESS was already stored: the task did run, and stays succeeded), and the
    /// message, untouched, in its queue's dead-letter list, from where it can be replayed.
    /// Progress states Redis refused are dropped with a warning; the final state follows them.
    async fn settle_refused(&self, refused: Settlement, error: crate::broker::BrokerError) {
        let Some(d) = refused.delivery else {
            return warn!(
                "dropped {} progress states Redis refused: {error}",
                refused.results.len()
            );
        };
        let why = format!("celeriac could not settle this message as it ended: {error}");
        let (results, then) = self.host_failure(&d, "unsettled", &why);
        let fallback = [Settlement { delivery: Some(d), results, then, chords: Chords::default() }];
        if let Err(e) = self.try_settle(&fallback).await {
            // Not even its dead-letter list takes it. It stays unacked; without renewals its lease
            // runs out and it is restored, so it is not lost.
            tracing::error!("could not dead-letter it either; it returns after its lease: {e}");
        }
        self.settled(&fallback);
    }

    /// Notes whether any revocation is in force (expired ones are pruned first).
    async fn refresh_revoked(&self) {
        match self.broker.revoked_count().await {
            Ok(count) => self.revocations.store(count > 0, Ordering::Relaxed),
            Err(e) => warn!("reading revocations failed: {e}"),
        }
    }

    /// Decides, for a whole fetched batch at once, which messages are revoked and when each
    /// rate-limited one may run: a round trip per batch for each (and none at all while no
    /// revocation is in force and no task is rate limited), never one per message. Rate-limited
    /// messages take their slots in fetch order, so a backlog runs in the order it was queued.
    /// If Redis does not answer here, the batch runs unchecked: the fetch just succeeded, so
    /// this is rare, and holding the messages back would gain nothing.
    async fn admit(&self, batch: &[(Delivery, Decoded)]) -> Vec<Admission> {
        let mut admissions = vec![Admission::default(); batch.len()];
        let tasks: Vec<(usize, &TaskMessage)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, (_, decoded))| match decoded {
                Decoded::Task(msg) => Some((i, &**msg)),
                _ => None,
            })
            .collect();
        if self.revocations.load(Ordering::Relaxed) && !tasks.is_empty() {
            let ids: Vec<&str> = tasks.iter().map(|(_, m)| m.id.as_str()).collect();
            match self.broker.revoked_among(&ids).await {
                Ok(flags) => {
                    for ((i, _), revoked) in tasks.iter().zip(flags) {
                        admissions[*i].revoked = revoked;
                    }
                }
                Err(e) => {
                    warn!("checking {} fetched messages for revocation failed: {e}", ids.len())
                }
            }
        }
        // Messages that will not run now (revoked, expired, not due) take no token.
        let now = Utc::now();
        let mut limited: Vec<(&str, crate::config::RateLimit, Vec<usize>)> = Vec::new();
        let registry = self.registry();
        for (i, msg) in &tasks {
            if admissions[*i].revoked || msg.expired(now) || msg.due_later(now).is_some() {
                continue;
            }
            let configured = registry.get(&msg.task).ok().and_then(|e| e.spec.rate_limit);
            let Some(rate) = self.live.rate_limit(&msg.task, configured) else {
                continue;
            };
            match limited.iter_mut().find(|(task, ..)| *task == msg.task) {
                Some((.., members)) => members.push(*i),
                None => limited.push((&msg.task, rate, vec![*i])),
            }
        }
        for (task, rate, members) in limited {
            let per_second = f64::from(rate.count) / rate.per.as_secs_f64();
            let ids: Vec<&str> = members
                .iter()
                .filter_map(|i| match &batch[*i].1 {
                    Decoded::Task(m) => Some(m.id.as_str()),
                    _ => None,
                })
                .collect();
            let capacity = f64::from(rate.count).max(1.0);
            match self.broker.take_tokens(task, per_second, capacity, &ids).await {
                Ok(waits) => {
                    for (i, wait) in members.iter().zip(waits) {
                        admissions[*i].rate_wait = wait;
                    }
                }
                Err(e) => warn!("rate limiter unavailable, running {} anyway: {e}", ids.len()),
            }
        }
        admissions
    }

    /// Renews leases, moves due messages, notices revocations of running tasks, restores expired
    /// leases of dead workers.
    async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let mut last_restore = Instant::now() - RESTORE_EVERY;
        // The first connection is not a reconnect.
        let (mut connected, mut refused) = (false, false);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(MAINTENANCE_TICK) => {}
            }
            match self.broker.mark_connection(&self.opts.hostname).await {
                Ok(new) => {
                    if new && connected {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected = true;
                }
                // Redis away is the fetch loop's to report; a refusal (an ACL without
                // @connection) is said once.
                Err(crate::broker::BrokerError::Redis(e)) if e.code().is_some() => {
                    if !std::mem::replace(&mut refused, true) {
                        warn!("reconnects cannot be counted: Redis refused CLIENT SETNAME: {e}");
                    }
                }
                Err(_) => {}
            }
            let (tags, ids): (Vec<String>, Vec<String>) =
                self.running().iter().map(|(t, r)| (t.clone(), r.id().to_string())).unzip();
            if let Err(e) = self.broker.renew(&tags).await {
                warn!("lease renewal failed: {e}");
            }
            self.refresh_revoked().await;
            let live: Vec<&str> =
                ids.iter().map(String::as_str).filter(|i| !i.is_empty()).collect();
            if let Ok(flags) = self.broker.terminating(&live).await {
                let running = self.running();
                for (id, terminate) in live.iter().zip(flags) {
                    if terminate {
                        running
                            .values()
                            .filter(|r| r.id() == *id)
                            .for_each(|r| r.signals.terminate());
                    }
                }
            }
            if let Err(e) = self.broker.move_due().await {
                warn!("moving due messages failed: {e}");
            }
            if last_restore.elapsed() >= RESTORE_EVERY {
                last_restore = Instant::now();
                match self.broker.restore_expired().await {
                    Ok(Some(n)) if n > 0 => info!("restored {n} messages whose lease expired"),
                    Ok(_) => {}
                    Err(e) => warn!("restoring expired leases failed: {e}"),
                }
            }
        }
    }

    /// Returns our unacked messages to their queues at once (shutdown).
    async fn requeue_now(&self, tags: &[String]) {
        if let Err(e) = self
            .broker
            .expire_leases(tags)
            .await
            .and(self.broker.restore_expired().await.map(|_| ()))
        {
            warn!(
                "could not requeue {} messages now; they return when their lease expires: {e}",
                tags.len()
            );
        }
    }
}

/// The queue order for one fetch. Strict mode is the configured order. Weighted mode draws the
/// queues one after another without replacement, each with probability proportional to its
/// weight: a queue of weight 6 next to one of weight 1 is served first six times in seven, and
/// the other still gets its turn instead of starving.
pub fn fetch_order(queues: &[String], weights: &[u32]) -> Vec<String> {
    if weights.len() != queues.len() || queues.len() < 2 {
        return queues.to_vec();
    }
    let mut pool: Vec<(&String, u32)> = queues.iter().zip(weights.iter().copied()).collect();
    let mut order = Vec::with_capacity(pool.len());
    while !pool.is_empty() {
        let total: u32 = pool.iter().map(|(_, w)| *w).sum();
        let mut pick = if total == 0 { 0 } else { rand::random_range(0..total) };
        let index = pool
            .iter()
            .position(|(_, w)| {
                if pick < *w {
                    return true;
                }
                pick -= *w;
                false
            })
            .unwrap_or(0);
        order.push(pool.remove(index).0.clone());
    }
    order
}

/// The result bytes a settlement sends to Redis.
fn settlement_bytes(s: &Settlement) -> usize {
    s.results.iter().map(|r| r.meta.len()).sum()
}

/// The limits of one run: the task's own, lowered (never raised) by a producer's per-call
/// `timelimit` header `[hard, soft]` in seconds. The operator's configured limit is the ceiling
/// of the sandbox; a message may only ask for less, and absurd numbers are ignored.
fn producer_limits(
    configured: &crate::runtime::Limits,
    (hard, soft): (Option<f64>, Option<f64>),
) -> crate::runtime::Limits {
    let seconds =
        |v: Option<f64>| v.filter(|s| *s > 0.0).and_then(|s| Duration::try_from_secs_f64(s).ok());
    let mut limits = configured.clone();
    if let Some(hard) = seconds(hard) {
        limits.hard_time_limit = limits.hard_time_limit.min(hard);
    }
    if let Some(soft) = seconds(soft) {
        limits.soft_time_limit = Some(limits.soft_time_limit.map_or(soft, |s| s.min(soft)));
    }
    limits.soft_time_limit = limits.soft_time_limit.filter(|s| *s < limits.hard_time_limit);
    limits
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// Full jitter: uniform in [0, delay] so retries of many failed tasks spread out.
fn jitter(delay: Duration, enabled: bool) -> Duration {
    if !enabled || delay.is_zero() {
        return delay;
    }
    let r: f64 = rand::random();
    delay.mul_f64(r)
}

/// A dead-letter record: why, how often, the last error, when, and the original message
/// untouched (as text, or base64 when it is not UTF-8).
pub fn dead_letter_record(
    d: &Delivery,
    msg: Option<&TaskMessage>,
    reason: &str,
    error: &str,
    attempts: u32,
    worker: &str,
) -> String {
    let (message, encoding) = match std::str::from_utf8(&d.payload) {
        Ok(text) => (Value::String(text.to_string()), "utf-8"),
        Err(_) => {
            use base64::Engine as _;
            (Value::String(base64::engine::general_purpose::STANDARD.encode(&d.payload)), "base64")
        }
    };
    json!({
        "reason": reason,
        "error": error,
        "attempts": attempts,
        "time": protocol::format_time(Utc::now()),
        "queue": d.queue,
        "task": msg.map(|m| m.task.clone()),
        "id": msg.map(|m| m.id.clone()),
        "worker": worker,
        "message": message,
        "message_encoding": encoding,
    })
    .to_string()
}

/// Parses a time given on the command line: ISO-8601, or `now`.
pub fn parse_cli_time(s: &str) -> Option<DateTime<Utc>> {
    if s == "now" { Some(Utc::now()) } else { protocol::parse_time(s) }
}

#[cfg(test)]
mod tests {
    use super::{fetch_order, producer_limits};
    use crate::runtime::Limits;
    use std::time::Duration;

    #[test]
    fn a_producer_time_limit_lowers_the_configured_one_and_never_raises_it() {
        let configured = Limits {
            soft_time_limit: Some(Duration::from_millis(500)),
            hard_time_limit: Duration::from_secs(1),
            ..Limits::default()
        };
        let lowered = producer_limits(&configured, (Some(0.2), Some(0.1)));
        assert_eq!(lowered.hard_time_limit, Duration::from_millis(200));
        assert_eq!(lowered.soft_time_limit, Some(Duration::from_millis(100)));
        for absurd in [(Some(20.0), Some(19.0)), (Some(1e300), None), (Some(1.8e19), None)] {
            let kept = producer_limits(&configured, absurd);
            assert_eq!(kept.hard_time_limit, Duration::from_secs(1), "{absurd:?}");
            assert_eq!(kept.soft_time_limit, Some(Duration::from_millis(500)), "{absurd:?}");
        }
        let none = producer_limits(&configured, (Some(-1.0), Some(0.0)));
        assert_eq!(none, configured);
    }

    #[test]
    fn strict_order_is_kept_and_weights_share_the_first_place() {
        let queues: Vec<String> = ["high", "low"].iter().map(|s| s.to_string()).collect();
        assert_eq!(fetch_order(&queues, &[]), queues);
        let mut high_first = 0;
        for _ in 0..7000 {
            let order = fetch_order(&queues, &[6, 1]);
            assert_eq!(order.len(), 2);
            if order[0] == "high" {
                high_first += 1;
            }
        }
        // Expected 6000 of 7000; allow for chance.
        assert!((5700..6300).contains(&high_first), "{high_first}");
    }

    /// The structural half of "a panic never strands a message": whatever panicked (here the
    /// decoder, reported as the fetch loop reports it) the delivery is settled: FAILURE stored,
    /// the message dead-lettered with the panic, nothing left unacked, and the worker goes on.
    #[tokio::test]
    async fn a_panic_while_handling_a_delivery_settles_it_as_celeriacs_own_failure() {
        use super::{Admission, Decoded, Worker, WorkerOptions};
        use crate::broker::{Broker as _, MemoryBroker};
        use crate::config::{Config, Overrides};
        use crate::protocol::NewTask;
        use crate::runtime::Signals;
        use serde_json::{Value, json};
        use std::sync::Arc;
        use tokio_util::sync::CancellationToken;

        let modules = tempfile::tempdir().unwrap();
        let overrides = Overrides { modules: Some(modules.path().into()), ..Overrides::default() };
        let config = Config::load(None, &overrides).unwrap();
        let registry = Arc::new(crate::registry::Registry::load(&config, 1).await.unwrap());
        let broker = MemoryBroker::new(Duration::from_secs(30));
        let opts = WorkerOptions {
            queues: vec!["default".into()],
            concurrency: 1,
            hostname: "celeriac@unit".into(),
            grace: Duration::from_secs(1),
            revoke_ttl: Duration::from_secs(60),
            track_started: true,
            result_extended: false,
            weights: Vec::new(),
        };
        let kv = crate::kv::KvStore::memory();
        let worker = Worker::new(registry, broker.clone(), broker.clone(), kv, opts);
        let stop = CancellationToken::new();
        let running = tokio::spawn(worker.clone().run(stop.clone()));

        // On a queue the worker does not consume, taken here as its fetch loop takes messages.
        let args = (&json!([1]), &json!({}));
        let id =
            crate::client::enqueue(&broker, "t.x", args.0, args.1, "side", &NewTask::default())
                .await
                .unwrap();
        let d = broker.fetch(&["side".into()], 1, "unit.").await.unwrap().remove(0);
        let (tag, panic) = (d.tag.clone(), Decoded::Panicked("index out of bounds".into()));
        worker.process(d, panic, Admission::default(), Signals::default(), stop.clone()).await;
        stop.cancel();
        running.await.unwrap().unwrap();

        let (state, meta) = crate::client::status(&broker, &id).await.unwrap();
        assert_eq!(state, "FAILURE");
        assert_eq!(meta.unwrap()["result"]["exc_type"], "HostError");
        let letters = broker.dlq_records("side", 10).await.unwrap();
        assert_eq!(letters.len(), 1);
        let letter: Value = serde_json::from_str(&letters[0]).unwrap();
        assert_eq!(letter["reason"], "host_error");
        assert!(letter["error"].as_str().unwrap().contains("index out of bounds"), "{letter}");
        // Acked: an expired lease brings nothing back.
        broker.expire_leases(&[tag]).await.unwrap();
        broker.restore_expired().await.unwrap();
        assert_eq!(broker.queue_len("side").await.unwrap(), 0);
        assert_eq!(worker.stats.failed.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
