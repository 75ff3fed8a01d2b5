//! Prometheus metrics: a subscriber to the lifecycle stream for what happens to tasks, and
//! gauges read at scrape time for what sits in Redis (queue and dead-letter lengths) and what the
//! worker holds (active tasks).
//!
//! Names follow celery-exporter's with the prefix `celeriac_` instead of `celery_`, so its
//! dashboards carry over: `celeriac_task_{received,started,succeeded,failed,retried,revoked,
//! rejected}_total{name,hostname,queue_name}` (`failed` adds `exception`),
//! `celeriac_task_runtime_seconds`, `celeriac_worker_up`, `celeriac_worker_tasks_active` and
//! `celeriac_queue_length{queue_name}`. Unlike celery-exporter, a queue's length counts all of
//! its priority lists. The sandbox adds `celeriac_task_memory_peak_bytes`,
//! `celeriac_task_fuel_consumed_total` and `celeriac_task_limits_hit_total{name,kind}`, and
//! `celeriac_dlq_length{queue_name}` counts dead letters. Messages celeriac's producers send carry
//! their send time, which gives `celeriac_task_queue_wait_seconds` (send or ETA to start) and
//! `celeriac_oldest_message_age_seconds{queue_name}`; Celery's own producers do not record it.
//! Also: `celeriac_task_instantiate_seconds{name}` (making the fresh instance),
//! `celeriac_task_rate_limit_wait_seconds{name}` (one sample per deferral by a global rate
//! limit) and `celeriac_broker_reconnects_total`.
//!
//! Labels stay bounded: `hostname` is the part of the node name after `@`, as celery-exporter
//! has it; `name` is a task this worker registered, or `unregistered` (a producer cannot add a
//! series per made-up name); never an id or args.
//!
//! The `prometheus` crate is used without its default `protobuf` feature (0.14 cleared the
//! protobuf advisory RUSTSEC-2024-0437, and the text format needs no protobuf at all). Its
//! maintenance is slow; `prometheus-client` is the fallback, and only this module would change.

use crate::lifecycle::{Stage, Subscriber, TaskEvent};
use prometheus::{
    Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// The stages counted by name, hostname and queue alone.
const STAGES: [&str; 6] = ["received", "started", "succeeded", "retried", "revoked", "rejected"];

/// The label for a task name this worker does not serve.
const UNREGISTERED: &str = "unregistered";

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    hostname: String,
    /// The task names that get their own series (a deploy changes them).
    known: RwLock<HashSet<String>>,
    /// `celeriac_module_info`: 1 for each loaded module and version.
    modules: IntGaugeVec,
    /// `celeriac_task_<stage>_total` for each stage but `failed`, in `STAGES` order.
    stages: Vec<IntCounterVec>,
    failed: IntCounterVec,
    runtime: HistogramVec,
    queue_wait: HistogramVec,
    instantiate: HistogramVec,
    rate_limit_wait: HistogramVec,
    memory_peak: HistogramVec,
    reconnects: prometheus::IntCounter,
    fuel: IntCounterVec,
    limits_hit: IntCounterVec,
    worker_up: IntGaugeVec,
    active: IntGaugeVec,
    queue_length: IntGaugeVec,
    dlq_length: IntGaugeVec,
    oldest_age: GaugeVec,
    /// The series of each (task name, queue), looked up in the families once: a task's
    /// lifecycle writes six of them, and a family lookup hashes every label each time.
    series: RwLock<HashMap<String, HashMap<String, Arc<Series>>>>,
}

/// What the scrape reads from Redis and the worker.
#[derive(Debug, Default)]
pub struct Sample {
    /// Tasks running now; `None` when no worker runs in this process (`celeriac api`).
    pub active: Option<usize>,
    /// Per queue: what waits in it.
    pub queues: Vec<QueueSample>,
    /// Times the worker's fetching resumed after Redis did not answer, since it started.
    pub reconnects: Option<u64>,
}

/// One queue at scrape time.
#[derive(Debug)]
pub struct QueueSample {
    /// The queue.
    pub name: String,
    /// Messages waiting, all priorities.
    pub waiting: u64,
    /// Dead letters.
    pub dead: u64,
    /// Seconds the oldest waiting message has waited, when a celeriac producer sent it.
    pub oldest_age: Option<f64>,
}

impl Metrics {
    /// Metrics for node `node` (`celeriac@host`), with a series per name in `tasks`.
    pub fn new(node: &str, tasks: impl IntoIterator<Item = String>) -> anyhow::Result<Metrics> {
        let registry = Registry::new_custom(Some("celeriac".into()), None)?;
        let labels = ["name", "hostname", "queue_name"];
        let mut stages = Vec::new();
        for stage in STAGES {
            let family = IntCounterVec::new(
                Opts::new(format!("task_{stage}_total"), format!("Tasks {stage}")),
                &labels,
            )?;
            registry.register(Box::new(family.clone()))?;
            stages.push(family);
        }
        let failed = IntCounterVec::new(
            Opts::new("task_failed_total", "Tasks that failed for good, by exception type"),
            &["name", "hostname", "exception", "queue_name"],
        )?;
        let runtime = HistogramVec::new(
            HistogramOpts::new(
                "task_runtime_seconds",
                "Time from instantiation to the end of a run",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0,
            ]),
            &labels,
        )?;
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "task_queue_wait_seconds",
                "Time from send (or ETA) to start, for tasks a celeriac producer sent",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                3600.0,
            ]),
            &labels,
        )?;
        let instantiate = HistogramVec::new(
            HistogramOpts::new("task_instantiate_seconds", "Time to make a task's fresh instance")
                .buckets(vec![
                    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                    0.01, 0.025, 0.1,
                ]),
            &["name"],
        )?;
        let rate_limit_wait = HistogramVec::new(
            HistogramOpts::new(
                "task_rate_limit_wait_seconds",
                "Delays put on tasks by their global rate limit (one per deferral)",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0]),
            &["name"],
        )?;
        let reconnects = prometheus::IntCounter::new(
            "broker_reconnects_total",
            "Times the worker's broker connection was made again after Redis went away or moved",
        )?;
        let memory_peak = HistogramVec::new(
            HistogramOpts::new("task_memory_peak_bytes", "Largest linear memory a run asked for")
                .buckets(prometheus::exponential_buckets(65536.0, 4.0, 9)?),
            &["name"],
        )?;
        let fuel = IntCounterVec::new(
            Opts::new("task_fuel_consumed_total", "Fuel consumed by runs with a fuel budget"),
            &["name"],
        )?;
        let limits_hit = IntCounterVec::new(
            Opts::new(
                "task_limits_hit_total",
                "Runs stopped by the sandbox: time limits, fuel, memory, traps, host errors",
            ),
            &["name", "kind"],
        )?;
        let worker_up =
            IntGaugeVec::new(Opts::new("worker_up", "1 while the worker runs"), &["hostname"])?;
        let active =
            IntGaugeVec::new(Opts::new("worker_tasks_active", "Tasks running now"), &["hostname"])?;
        let queue_length = IntGaugeVec::new(
            Opts::new("queue_length", "Messages waiting in a consumed queue, all priorities"),
            &["queue_name"],
        )?;
        let dlq_length = IntGaugeVec::new(
            Opts::new("dlq_length", "Dead letters of a consumed queue"),
            &["queue_name"],
        )?;
        let oldest_age = GaugeVec::new(
            Opts::new(
                "oldest_message_age_seconds",
                "Age of the oldest message waiting in a queue, when a celeriac producer sent it",
            ),
            &["queue_name"],
        )?;
        for c in [&failed, &fuel, &limits_hit] {
            registry.register(Box::new(c.clone()))?;
        }
        for h in [&runtime, &queue_wait, &instantiate, &rate_limit_wait, &memory_peak] {
            registry.register(Box::new(h.clone()))?;
        }
        registry.register(Box::new(reconnects.clone()))?;
        registry.register(Box::new(oldest_age.clone()))?;
        let modules = IntGaugeVec::new(
            Opts::new("module_info", "1 for each loaded module file and its version"),
            &["module", "version"],
        )?;
        for g in [&worker_up, &active, &queue_length, &dlq_length, &modules] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Metrics {
            registry,
            hostname: node.split_once('@').map_or(node, |(_, host)| host).to_string(),
            known: RwLock::new(tasks.into_iter().collect()),
            modules,
            stages,
            failed,
            runtime,
            queue_wait,
            instantiate,
            rate_limit_wait,
            memory_peak,
            reconnects,
            fuel,
            limits_hit,
            worker_up,
            active,
            queue_length,
            dlq_length,
            oldest_age,
            series: RwLock::default(),
        })
    }

    /// The series of task `name` on `queue`.
    fn series(&self, name: &str, queue: &str) -> Arc<Series> {
        let cached = self.series.read().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cached.get(name).and_then(|q| q.get(queue)) {
            return s.clone();
        }
        drop(cached);
        let labels = [name, self.hostname.as_str(), queue];
        let series = Arc::new(Series {
            stages: std::array::from_fn(|i| self.stages[i].with_label_values(&labels)),
            runtime: self.runtime.with_label_values(&labels),
            queue_wait: self.queue_wait.with_label_values(&labels),
            memory_peak: self.memory_peak.with_label_values(&[name]),
            instantiate: self.instantiate.with_label_values(&[name]),
        });
        let mut cached = self.series.write().unwrap_or_else(|p| p.into_inner());
        cached.entry(name.to_string()).or_default().insert(queue.to_string(), series.clone());
        series
    }

    /// The loaded modules (file and version) and the tasks they serve, after a start or a
    /// deploy: the tasks get their own series, and `module_info` shows exactly these modules.
    pub fn set_modules(
        &self,
        modules: impl IntoIterator<Item = (String, String)>,
        tasks: impl IntoIterator<Item = String>,
    ) {
        self.modules.reset();
        for (module, version) in modules {
            self.modules.with_label_values(&[&module, &version]).set(1);
        }
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        known.extend(tasks);
    }

    /// Marks the worker up or down.
    pub fn set_up(&self, up: bool) {
        self.worker_up.with_label_values(&[&self.hostname]).set(i64::from(up));
    }

    /// The text exposition format, with the gauges read now from `sample`.
    pub fn render(&self, sample: &Sample) -> String {
        if let Some(total) = sample.reconnects {
            // A counter only goes up: add what it has not counted yet.
            self.reconnects.inc_by(total.saturating_sub(self.reconnects.get()));
        }
        if let Some(active) = sample.active {
            self.active.with_label_values(&[&self.hostname]).set(active as i64);
        }
        for q in &sample.queues {
            self.queue_length.with_label_values(&[&q.name]).set(q.waiting as i64);
            self.dlq_length.with_label_values(&[&q.name]).set(q.dead as i64);
            match q.oldest_age {
                Some(age) => self.oldest_age.with_label_values(&[&q.name]).set(age),
                // Empty, or its oldest message has no send time: no sample rather than a 0
                // that reads as "nothing waits".
                None => {
                    let _ = self.oldest_age.remove_label_values(&[&q.name]);
                }
            }
        }
        let families = self.registry.gather();
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    fn name<'a>(&self, task: &'a str) -> &'a str {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner()).contains(task);
        if known { task } else { UNREGISTERED }
    }
}

/// The series one task name on one queue writes as it goes through the worker.
struct Series {
    /// In `STAGES` order.
    stages: [prometheus::IntCounter; 6],
    runtime: prometheus::Histogram,
    queue_wait: prometheus::Histogram,
    memory_peak: prometheus::Histogram,
    instantiate: prometheus::Histogram,
}

impl Subscriber for Metrics {
    fn on_task(&self, e: &TaskEvent<'_>) {
        let name = e.task.map_or(UNREGISTERED, |t| self.name(&t.task));
        let series = self.series(name, e.queue);
        match e.stage {
            Stage::RateLimited { wait } => {
                self.rate_limit_wait.with_label_values(&[name]).observe(wait.as_secs_f64());
            }
            Stage::Failed { error } => {
                self.failed
                    .with_label_values(&[
                        name,
                        &self.hostname,
                        self.name_of_exception(error.exc_type),
                        e.queue,
                    ])
                    .inc();
            }
            stage => {
                if let Some(i) = STAGES.iter().position(|s| *s == stage.name()) {
                    series.stages[i].inc();
                }
                if let (Stage::Started, Some(wait)) =
                    (stage, e.task.and_then(|t| t.queue_wait(chrono::Utc::now())))
                {
                    series.queue_wait.observe(wait);
                }
            }
        }
        if let Some(report) = e.report {
            series.runtime.observe(report.wall.as_secs_f64());
            series.memory_peak.observe(report.peak_memory as f64);
            if let Some(took) = report.instantiate {
                series.instantiate.observe(took.as_secs_f64());
            }
            if let Some(fuel) = report.fuel_used {
                self.fuel.with_label_values(&[name]).inc_by(fuel);
            }
            let kind = report.outcome.kind();
            if !matches!(kind, "success" | "retry" | "failure") {
                self.limits_hit.with_label_values(&[name, kind]).inc();
            }
        }
    }
}

impl Metrics {
    /// An exception type as a label: the task's own type names are bounded by its code, but a
    /// name that is not a plain identifier is not passed through.
    fn name_of_exception<'a>(&self, exc_type: &'a str) -> &'a str {
        let plain = !exc_type.is_empty()
            && exc_type.len() <= 64
            && exc_type.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if plain { exc_type } else { "other" }
    }
}
