//! How one run of a task ended, kept apart all the way to the stored result: the task's own
//! answer (success, retry, failure), a limit the host enforced, a trap in the guest, or a failure
//! of the host itself.

use std::time::Duration;

/// Longest error text a task can make the host keep (a failure's or retry's message): it is
/// stored in the result twice (message and traceback), dead-lettered and logged.
pub const MAX_ERROR_TEXT: usize = 16 << 10;
/// Longest exception class name kept.
pub const MAX_EXC_TYPE: usize = 128;

/// `text` cut to at most `max` bytes on a character boundary, saying how much was cut.
pub fn cap_text(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&format!("... [{} of {total} bytes cut]", total - cut));
    text
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task returned a value (JSON).
    Success {
        /// The result as JSON text, validated.
        result: String,
    },
    /// The task asked to be retried.
    Retry {
        /// Why.
        reason: String,
        /// Delay it asked for; `None` leaves it to the backoff policy.
        countdown: Option<Duration>,
    },
    /// The task failed permanently.
    Failed {
        /// The error class for Celery clients, e.g. `ValueError`.
        exc_type: String,
        /// The message.
        message: String,
    },
    /// The soft time limit passed and the task gave up (returned an error) before the hard limit.
    SoftTimeLimit {
        /// What the task said when it stopped.
        message: String,
    },
    /// The hard time limit stopped the instance.
    HardTimeLimit {
        /// The limit that was exceeded.
        limit: Duration,
    },
    /// The fuel budget ran out.
    OutOfFuel {
        /// The budget.
        budget: u64,
    },
    /// The instance tried to grow its memory past the cap and then trapped.
    MemoryLimit {
        /// The cap in bytes.
        limit: u64,
    },
    /// The instance was stopped because the task was revoked with terminate.
    Terminated,
    /// The guest trapped (a panic, an illegal operation, a stack overflow ...).
    Trap {
        /// The trap and, for a Rust guest, its panic message.
        message: String,
        /// The wasm backtrace, innermost frame first.
        backtrace: Option<String>,
    },
    /// The task returned a result larger than its cap.
    ResultTooLarge {
        /// Size of the result in bytes.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// The instance pool stayed full for [`POOL_WAIT`](super::limits::POOL_WAIT): the task
    /// never started, and goes back to its queue without spending a retry.
    PoolExhausted {
        /// wasmtime's account of what ran out.
        message: String,
    },
    /// The host failed: the module could not be instantiated, a store was unreachable, the guest
    /// returned something that is not JSON. Not the task's fault.
    HostError {
        /// What went wrong.
        message: String,
    },
}

impl Outcome {
    /// A short, stable name for logs, metrics and `celeriac run`'s output.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failure",
            Outcome::SoftTimeLimit { .. } => "soft_time_limit",
            Outcome::HardTimeLimit { .. } => "hard_time_limit",
            Outcome::OutOfFuel { .. } => "out_of_fuel",
            Outcome::MemoryLimit { .. } => "memory_limit",
            Outcome::Terminated => "terminated",
            Outcome::Trap { .. } => "trap",
            Outcome::ResultTooLarge { .. } => "result_too_large",
            Outcome::PoolExhausted { .. } => "pool_exhausted",
            Outcome::HostError { .. } => "host_error",
        }
    }

    /// True for success.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success { .. })
    }

    /// The exception class and message a Celery client sees for a run that did not succeed.
    /// Limits map onto the classes Celery itself raises, so Python code that catches
    /// `SoftTimeLimitExceeded` or `MemoryError` keeps working.
    pub fn exception(&self) -> Option<(String, String)> {
        let (t, m) = match self {
            Outcome::Success { .. } => return None,
            Outcome::Retry { reason, .. } => ("Retry", reason.clone()),
            Outcome::Failed { exc_type, message } => (exc_type.as_str(), message.clone()),
            Outcome::SoftTimeLimit { message } => ("SoftTimeLimitExceeded", message.clone()),
            Outcome::HardTimeLimit { limit } => {
                ("TimeLimitExceeded", format!("hard time limit ({:?}) exceeded", limit))
            }
            Outcome::OutOfFuel { budget } => {
                ("OutOfFuel", format!("fuel budget of {budget} exhausted"))
            }
            Outcome::MemoryLimit { limit } => {
                ("MemoryError", format!("memory limit of {limit} bytes reached"))
            }
            Outcome::Terminated => ("Terminated", "terminated by revoke".to_string()),
            Outcome::Trap { message, .. } => ("WasmTrap", message.clone()),
            Outcome::ResultTooLarge { size, limit } => {
                ("ResultTooLarge", format!("result of {size} bytes exceeds the cap of {limit}"))
            }
            Outcome::PoolExhausted { message } => ("PoolExhausted", message.clone()),
            Outcome::HostError { message } => ("HostError", message.clone()),
        };
        Some((t.to_string(), m))
    }
}

/// A child task the run asked for. Children are handed to the caller when the run ends and are
/// sent only if it succeeded, so a failed or retried attempt sends none and a retry does not
/// duplicate them.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildTask {
    /// The id assigned to the child.
    pub id: String,
    /// The child's task name.
    pub name: String,
    /// Positional arguments (JSON array).
    pub args: serde_json::Value,
    /// Keyword arguments (JSON object).
    pub kwargs: serde_json::Value,
    /// Queue override.
    pub queue: Option<String>,
    /// Priority 0-9.
    pub priority: Option<u8>,
    /// Delay before it may run.
    pub countdown: Option<Duration>,
}

/// A workflow of children a task sent (a chain, group or chord): a Celery signature dict with
/// every id frozen, which the worker sends as it follows a Python client's.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildWorkflow {
    /// The steps' ids, as the task was given them.
    pub ids: Vec<String>,
    /// The signature.
    pub signature: serde_json::Value,
}

/// A progress report made during the run (Celery's `update_state`).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The reporting task's id.
    pub task_id: String,
    /// The custom state name, e.g. `PROGRESS`.
    pub state: String,
    /// Its metadata.
    pub meta: serde_json::Value,
}

/// Where a run's progress reports go: only the latest is kept, numbered, so a task that reports
/// in a tight loop costs memory for one report and the reader writes as often as it chooses.
pub type ProgressSender = tokio::sync::watch::Sender<(u64, Option<Progress>)>;
/// The reading end of a [`ProgressSender`].
pub type ProgressReceiver = tokio::sync::watch::Receiver<(u64, Option<Progress>)>;

/// A channel for one run's progress reports.
pub fn progress_channel() -> (ProgressSender, ProgressReceiver) {
    tokio::sync::watch::channel((0, None))
}

/// Everything a caller learns from one run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time from instantiation to the end of the call.
    pub wall: Duration,
    /// How long making the fresh instance took, when it got that far.
    pub instantiate: Option<Duration>,
    /// Chains, groups and chords of children, sent on success like `children`.
    pub workflows: Vec<ChildWorkflow>,
    /// Fuel consumed, when the task had a fuel budget.
    pub fuel_used: Option<u64>,
    /// Largest linear memory the instance asked for, in bytes.
    pub peak_memory: u64,
    /// Child tasks to send if the run succeeded.
    pub children: Vec<ChildTask>,
    /// What the guest wrote to stdout and stderr (truncated), useful after a trap.
    pub output: String,
    /// The version of the module that ran it (its content hash).
    pub module_version: Option<std::sync::Arc<str>>,
}
