//! What a worker tells about itself and does when asked over the remote control channel
//! (`celery inspect`, Flower, `celeriac inspect`): its stats, running tasks, queues and task
//! names, and its switches. The wire side is in [`crate::control`].

use super::{Worker, WorkerOptions};
use crate::broker::{Broker, ResultStore};
use crate::control::Node;
use crate::events::Load;
use crate::lifecycle::{Stage, Subscriber, TaskEvent};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

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

impl<B: Broker, R: ResultStore> Worker<B, R> {
    /// How busy the worker is, for heartbeats.
    pub(super) fn load(&self) -> Load {
        Load { active: self.running().len(), processed: self.stats.fetched.load(Ordering::Relaxed) }
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
        let opts: &WorkerOptions = &self.opts;
        let total = self.totals.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rusage = rusage();
        json!({
            "pid": std::process::id(),
            "clock": 0,
            "uptime": self.started.elapsed().as_secs(),
            "prefetch_count": opts.concurrency,
            "total": total,
            "broker": self.broker.describe(),
            "pool": {
                "implementation": "celeriac:wasm",
                "max-concurrency": opts.concurrency,
                // One entry per slot, as a prefork pool lists its processes: celery-exporter
                // reads the concurrency as the length of this list. Every slot lives in this
                // one process.
                "processes": vec![std::process::id(); opts.concurrency],
                "max-tasks-per-child": null,
                "put-guarded-by-semaphore": false,
                "timeouts": [0, 0],
                "writes": {"total": 0, "avg": "0.00%", "all": "", "raw": "", "strategy": null, "inqueues": {"total": 0, "active": 0}},
            },
            "rusage": rusage,
            "celeriac": {
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

    fn registered(&self) -> Vec<String> {
        let mut names: Vec<String> = self.registry.tasks().map(|e| e.info.name.clone()).collect();
        names.sort();
        names
    }

    fn queues(&self) -> Vec<String> {
        self.opts.queues.clone()
    }

    fn conf(&self) -> Value {
        let o = &self.opts;
        json!({
            "worker_concurrency": o.concurrency,
            "task_track_started": o.track_started,
            "task_default_queue": o.queues.first(),
            "worker_send_task_events": self.events.as_ref().map(|e| e.task_events_on()),
            "broker_url": self.broker.describe()["url"],
            "worker_hostname": o.hostname,
            "celeriac_queues": o.queues,
            "celeriac_queue_weights": o.weights,
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
