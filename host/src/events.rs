//! Celery events, so Flower, `celery events` and anything built on Celery's `EventReceiver` see a
//! celeriac worker and its tasks as they see a Python worker.
//!
//! - Worker events, always: `worker-online` at start, `worker-heartbeat` every two seconds
//!   (`freq: 2.0`) and `worker-offline` at stop. Flower counts a worker online while its last
//!   heartbeat is younger than twice `freq`.
//! - Task events (`task-received`, `-started`, `-succeeded`, `-failed`, `-retried`, `-revoked`),
//!   on by default and switched by the `enable_events` / `disable_events` control commands. They
//!   come from the lifecycle stream ([`crate::lifecycle`]) and are sent in batches as a JSON list
//!   on `task.multi`, as a Python worker buffers them, at most every `FLUSH_EVERY`.
//!
//! Events are at most once: nobody stores them. Every PUBLISH answers how many listeners took
//! it; while the answer is none, task events are not even built. The next heartbeat (or the
//! `heartbeat` command Flower broadcasts when it starts) notices a new listener, so a listener
//! misses at most two seconds of task events, and an unwatched worker pays nothing for them.

use crate::broker::Broker;
use crate::lifecycle::{Revoked, Stage, Subscriber, TaskEvent};
use crate::repr;
use serde_json::{Map, Value, json};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often a heartbeat is sent, and the `freq` it announces (Celery's default).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Longest a task event waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffered task events that trigger a send before `FLUSH_EVERY`.
const FLUSH_AT: usize = 256;
/// Most task events held while Redis does not take them; older ones are dropped.
const MAX_BUFFERED: usize = 10_000;

/// What a heartbeat reports about the worker's load.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Tasks running now.
    pub active: usize,
    /// Tasks taken since the worker started.
    pub processed: u64,
}

/// The Celery events of one worker node.
pub struct CeleryEvents {
    hostname: String,
    pid: u32,
    /// Whether task events are sent (`enable_events` / `disable_events`).
    task_events: AtomicBool,
    /// Whether the last PUBLISH reached anyone.
    listening: AtomicBool,
    /// Celery's logical clock: every event takes the next value.
    clock: AtomicU64,
    /// Hours west of UTC, times 3600 (seconds), refreshed at every heartbeat so it follows DST.
    utcoffset_secs: AtomicI64,
    /// Task events waiting to be sent. Each takes its clock as it goes in, under this lock,
    /// so the buffer is in clock order and a batch never passes an event it should follow.
    buffer: Mutex<Vec<String>>,
    flush_now: Notify,
    beat_now: Notify,
}

impl CeleryEvents {
    /// Events from node `hostname` (`celeriac@host`), task events on.
    pub fn new(hostname: &str) -> Arc<Self> {
        Arc::new(CeleryEvents {
            hostname: hostname.to_string(),
            pid: std::process::id(),
            task_events: AtomicBool::new(true),
            listening: AtomicBool::new(true),
            clock: AtomicU64::new(0),
            utcoffset_secs: AtomicI64::new(west_of_utc_secs()),
            buffer: Mutex::new(Vec::new()),
            flush_now: Notify::new(),
            beat_now: Notify::new(),
        })
    }

    /// Switches task events; returns the previous setting.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::Relaxed)
    }

    /// `utcoffset` as Celery 5.7 sends it: hours west of UTC as a float, so half-hour zones are
    /// exact (5.6 floored it to an integer; receivers accept both).
    fn utcoffset_hours(&self) -> f64 {
        self.utcoffset_secs.load(Ordering::Relaxed) as f64 / 3600.0
    }

    /// Whether task events are on.
    pub fn task_events_on(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Sends a heartbeat now rather than at the next tick.
    pub fn heartbeat_now(&self) {
        self.beat_now.notify_one();
    }

    /// Sends `worker-online`, heartbeats and task events until `stop`, then what is buffered
    /// and `worker-offline`. `load` tells the heartbeat how busy the worker is.
    pub async fn run<B: Broker>(
        self: Arc<Self>,
        broker: B,
        load: impl Fn() -> Load + Send,
        stop: CancellationToken,
    ) {
        let mut failing = false;
        self.worker_status(&broker, "online", load(), &mut failing).await;
        let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await;
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = beat.tick() => self.worker_status(&broker, "heartbeat", load(), &mut failing).await,
                _ = self.beat_now.notified() => self.worker_status(&broker, "heartbeat", load(), &mut failing).await,
                _ = flush.tick() => self.flush(&broker, &mut failing).await,
                _ = self.flush_now.notified() => self.flush(&broker, &mut failing).await,
            }
        }
        self.flush(&broker, &mut failing).await;
        self.worker_status(&broker, "offline", load(), &mut failing).await;
    }

    /// Sends `worker-<status>` (online, heartbeat, offline), re-reading the UTC offset first
    /// so events follow a DST change.
    async fn worker_status<B: Broker>(
        &self,
        broker: &B,
        status: &str,
        load: Load,
        failing: &mut bool,
    ) {
        self.utcoffset_secs.store(west_of_utc_secs(), Ordering::Relaxed);
        // The task events buffered so far go first: the worker event's clock follows theirs.
        let (pending, event) = {
            let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            let event = self.worker_event(&format!("worker-{status}"), load);
            (std::mem::take(&mut *buffer), event)
        };
        self.send_batch(broker, pending, failing).await;
        self.send(broker, &format!("worker.{status}"), &event, failing).await;
    }

    /// Sends the buffered task events as one `task.multi` list.
    async fn flush<B: Broker>(&self, broker: &B, failing: &mut bool) {
        let events = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|p| p.into_inner()));
        self.send_batch(broker, events, failing).await;
    }

    /// Sends task events, in the order given, as one `task.multi` list.
    async fn send_batch<B: Broker>(&self, broker: &B, events: Vec<String>, failing: &mut bool) {
        if events.is_empty() {
            return;
        }
        let mut body = String::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
        body.push('[');
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(event);
        }
        body.push(']');
        self.send(broker, "task.multi", &body, failing).await;
    }

    /// Publishes one event body and notes whether anyone listens. Redis being away loses the
    /// events (they are at most once) and is logged once, not at every event.
    async fn send<B: Broker>(&self, broker: &B, routing_key: &str, body: &str, failing: &mut bool) {
        match broker.publish_event(&self.hostname, routing_key, body).await {
            Ok(listeners) => {
                self.listening.store(listeners > 0, Ordering::Relaxed);
                if std::mem::take(failing) {
                    debug!("sending Celery events again");
                }
            }
            Err(e) if !*failing => {
                *failing = true;
                warn!("could not send Celery events; dropping them until Redis answers: {e}");
            }
            Err(_) => {}
        }
    }

    /// The fields every event carries, and the event's own clock tick.
    fn common(&self, kind: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("hostname".into(), Value::String(self.hostname.clone()));
        m.insert("utcoffset".into(), json!(self.utcoffset_hours()));
        m.insert("pid".into(), json!(self.pid));
        m.insert("clock".into(), json!(self.clock.fetch_add(1, Ordering::Relaxed) + 1));
        m.insert("timestamp".into(), json!(crate::broker::now_secs()));
        m.insert("type".into(), Value::String(kind.into()));
        m
    }

    fn worker_event(&self, kind: &str, load: Load) -> String {
        let mut m = self.common(kind);
        m.insert("freq".into(), json!(HEARTBEAT_EVERY.as_secs_f64()));
        m.insert("active".into(), json!(load.active));
        m.insert("processed".into(), json!(load.processed));
        m.insert("loadavg".into(), json!(loadavg()));
        m.insert("sw_ident".into(), json!("celeriac"));
        m.insert("sw_ver".into(), json!(env!("CARGO_PKG_VERSION")));
        m.insert("sw_sys".into(), json!(system_name()));
        Value::Object(m).to_string()
    }

    /// The Celery event for one lifecycle step, as JSON, or `None` for a step Celery has no
    /// event for. Built straight from borrowed fields: this runs on the task's path.
    /// The clock is not in it yet: [`Subscriber::on_task`] appends it under the buffer's lock.
    fn task_event(&self, e: &TaskEvent<'_>) -> Option<String> {
        let task = e.task?;
        let kind = match e.stage {
            Stage::Received => "task-received",
            Stage::Started => "task-started",
            Stage::Succeeded { .. } => "task-succeeded",
            Stage::Failed { .. } => "task-failed",
            Stage::Retried { .. } => "task-retried",
            Stage::Revoked { .. } => "task-revoked",
            // Celery's `task-rejected` names a task; a message that is not one has no id.
            // Celery has no event for a rate-limit deferral.
            Stage::Rejected { .. } | Stage::RateLimited { .. } => return None,
        };
        let mut event = TaskEventJson {
            hostname: &self.hostname,
            utcoffset: self.utcoffset_hours(),
            pid: self.pid,
            timestamp: crate::broker::now_secs(),
            kind,
            uuid: &task.id,
            ..TaskEventJson::default()
        };
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(crate::protocol::format_time);
        match e.stage {
            Stage::Received => {
                let args = serde_json::from_str(&task.args).unwrap_or(Value::Null);
                let kwargs = serde_json::from_str(&task.kwargs).unwrap_or(Value::Null);
                event.name = Some(&task.task);
                event.args = Some(repr::truncate(repr::args_repr(&args), repr::MAX_REPR));
                event.kwargs = Some(repr::truncate(repr::repr(&kwargs), repr::MAX_REPR));
                event.root_id = Some(task.root_id.as_deref().unwrap_or(&task.id));
                event.parent_id = Some(task.parent_id.as_deref());
                event.retries = Some(task.retries);
                event.eta = Some(time(task.eta));
                event.expires = Some(time(task.expires));
            }
            Stage::Succeeded { result } => {
                event.result = Some(repr::truncate(repr::repr_of_json(result), repr::MAX_REPR));
                event.runtime = Some(e.report.map_or(0.0, |r| r.wall.as_secs_f64()));
            }
            Stage::Failed { error } | Stage::Retried { error } => {
                let exception = repr::exception_repr(error.exc_type, error.message);
                event.exception = Some(repr::truncate(exception, repr::MAX_REPR));
                event.traceback = Some(error.traceback);
            }
            Stage::Revoked { why } => {
                event.terminated = Some(why == Revoked::Terminated);
                event.signum = Some((why == Revoked::Terminated).then_some(15));
                event.expired = Some(why == Revoked::Expired);
            }
            Stage::Started | Stage::Rejected { .. } | Stage::RateLimited { .. } => {}
        }
        serde_json::to_string(&event).ok()
    }
}

/// A task event's fields; the ones a type does not carry are left out.
#[derive(serde::Serialize, Default)]
struct TaskEventJson<'a> {
    hostname: &'a str,
    utcoffset: f64,
    pid: u32,
    timestamp: f64,
    #[serde(rename = "type")]
    kind: &'a str,
    uuid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kwargs: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eta: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exception: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceback: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    terminated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signum: Option<Option<u8>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expired: Option<bool>,
}

impl Subscriber for CeleryEvents {
    fn on_task(&self, e: &TaskEvent<'_>) {
        if !self.task_events.load(Ordering::Relaxed) || !self.listening.load(Ordering::Relaxed) {
            return;
        }
        // Built outside the lock; only the clock is taken and written in under it, so events
        // enter the buffer in clock order.
        let Some(mut event) = self.task_event(e) else { return };
        let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buffer.len() >= MAX_BUFFERED {
            // Redis is not taking them: drop this one (events are at most once).
            return;
        }
        let clock = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        event.pop(); // the object's closing brace
        let _ = write!(event, ",\"clock\":{clock}}}");
        buffer.push(event);
        if buffer.len() == FLUSH_AT {
            self.flush_now.notify_one();
        }
    }
}

/// Seconds west of UTC now, as Python's `time.altzone` (in DST) or `time.timezone`: a host in
/// Berlin gives -3600 in winter and -7200 in summer.
fn west_of_utc_secs() -> i64 {
    use chrono::Offset as _;
    -i64::from(chrono::Local::now().offset().fix().local_minus_utc())
}

/// The 1, 5 and 15 minute load averages, rounded to two places as Celery sends them.
fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(0.0));
    let mut next = || (it.next().unwrap_or(0.0) * 100.0).round() / 100.0;
    [next(), next(), next()]
}

/// The system's name as Python's `platform.system()` gives it (`Linux`, `Darwin`).
fn system_name() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utcoffset_is_hours_west_as_a_float() {
        let events = CeleryEvents::new("celeriac@unit");
        for (secs, hours) in [(0, 0.0), (-7200, -2.0), (18000, 5.0), (-19800, -5.5)] {
            events.utcoffset_secs.store(secs, Ordering::Relaxed);
            assert_eq!(events.utcoffset_hours(), hours);
        }
    }
}
