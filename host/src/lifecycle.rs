//! The one stream of what happens to a task. The worker emits a [`TaskEvent`] at each step of a
//! task's life (received, started, succeeded, failed, retried, revoked, rejected); each consumer
//! (the per-task log line here, Celery events for Flower in [`crate::events`], Prometheus
//! metrics in [`crate::metrics`], and the worker's own per-name totals) is a [`Subscriber`] in
//! its own module. The worker does not call any of
//! them by name.
//!
//! The stream is a synchronous fan-out, not a broadcast channel, on purpose:
//! - an event borrows the task's message and run report, so emitting copies nothing; a
//!   subscriber copies only what it keeps;
//! - counters and the log line never lag or drop, where a broadcast channel drops the oldest
//!   events once a receiver falls behind;
//! - subscribers see every task's events in order, and the log line stays inside the task's span.
//!
//! A subscriber must return quickly and never block: one that does I/O (Celery events) buffers
//! and sends from its own loop.

use crate::protocol::TaskMessage;
use crate::runtime::{RunReport, printable};
use std::sync::Arc;
use tracing::info;

/// Why a task ended as REVOKED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Revoked by id before it ran.
    ById,
    /// Its `expires` passed before it ran.
    Expired,
    /// Stopped while it ran (`revoke(terminate=True)`).
    Terminated,
}

/// A step in a task's life.
#[derive(Debug, Clone, Copy)]
pub enum Stage<'a> {
    /// Taken from its queue by this worker.
    Received,
    /// About to run in its sandbox.
    Started,
    /// Ran and returned `result` (JSON text).
    Succeeded {
        /// The result as JSON text.
        result: &'a str,
    },
    /// Failed and will run again later.
    Retried {
        /// What it failed with.
        error: Failure<'a>,
    },
    /// Failed for good (it is dead-lettered), or could not be run at all.
    Failed {
        /// What it failed with.
        error: Failure<'a>,
    },
    /// Ended as REVOKED.
    Revoked {
        /// Why.
        why: Revoked,
    },
    /// Put back for later: its task's global rate limit has no token now.
    RateLimited {
        /// How long until its turn.
        wait: std::time::Duration,
    },
    /// A message that is not a task, dead-lettered without running.
    Rejected {
        /// The kind of defect (`Poison::kind`).
        reason: &'a str,
    },
}

impl Stage<'_> {
    /// The stage's name, as Celery's event types end (`task-<name>`).
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Received => "received",
            Stage::Started => "started",
            Stage::Succeeded { .. } => "succeeded",
            Stage::Retried { .. } => "retried",
            Stage::Failed { .. } => "failed",
            Stage::Revoked { .. } => "revoked",
            Stage::Rejected { .. } => "rejected",
            Stage::RateLimited { .. } => "rate_limited",
        }
    }
}

/// An exception as Celery stores it: its type name, message and traceback text.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The exception's type, e.g. `ValueError`.
    pub exc_type: &'a str,
    /// Its message.
    pub message: &'a str,
    /// The traceback text stored with the result.
    pub traceback: &'a str,
}

/// One step of one task.
#[derive(Debug, Clone, Copy)]
pub struct TaskEvent<'a> {
    /// The queue the message came from.
    pub queue: &'a str,
    /// The task; `None` only for a message that did not decode as one.
    pub task: Option<&'a TaskMessage>,
    /// What happened.
    pub stage: Stage<'a>,
    /// How the run went, for the stages that end a run.
    pub report: Option<&'a RunReport>,
}

/// A consumer of the lifecycle stream.
pub trait Subscriber: Send + Sync {
    /// Called for every event, on the task's own path: return quickly, never block.
    fn on_task(&self, event: &TaskEvent<'_>);
}

/// The subscribers of one worker.
#[derive(Clone)]
pub struct Lifecycle {
    subscribers: Arc<[Arc<dyn Subscriber>]>,
}

impl Default for Lifecycle {
    /// Just the per-task log line.
    fn default() -> Self {
        Lifecycle::new(Vec::new())
    }
}

impl Lifecycle {
    /// The log line and then `subscribers`, in that order.
    pub fn new(subscribers: Vec<Arc<dyn Subscriber>>) -> Self {
        let mut all: Vec<Arc<dyn Subscriber>> = vec![Arc::new(LogLine)];
        all.extend(subscribers);
        Lifecycle { subscribers: all.into() }
    }

    /// Hands `event` to every subscriber.
    pub fn emit(&self, event: TaskEvent<'_>) {
        for s in self.subscribers.iter() {
            s.on_task(&event);
        }
    }
}

/// One log line per task that ran (`task finished`, with its queue, retries, runtime and
/// outcome), and one for a task revoked or expired before it ran. Logged inside the task's span,
/// so its id and name are on the line.
struct LogLine;

impl Subscriber for LogLine {
    fn on_task(&self, e: &TaskEvent<'_>) {
        let queue = printable(e.queue);
        let retries = e.task.map_or(0, |t| t.retries);
        match (e.stage, e.report) {
            (
                Stage::Received
                | Stage::Started
                | Stage::Rejected { .. }
                | Stage::RateLimited { .. },
                _,
            ) => {}
            (Stage::Revoked { why: Revoked::ById }, None) => {
                info!(%queue, outcome = "revoked", "task revoked before it ran")
            }
            (Stage::Revoked { why: Revoked::Expired }, None) => {
                info!(%queue, outcome = "expired", "task expired before it ran")
            }
            (_, Some(report)) => info!(
                %queue,
                retries,
                runtime_ms = report.wall.as_secs_f64() * 1000.0,
                outcome = report.outcome.kind(),
                module_version = report.module_version.as_deref().unwrap_or("-"),
                "task finished"
            ),
            (_, None) => {}
        }
    }
}
