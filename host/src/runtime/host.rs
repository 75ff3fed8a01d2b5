//! The per-task host state and the imports a task component calls: `log`, `control`
//! (progress, cancelled), `kv` and `enqueue`. Each import checks the task's grants first; a call
//! the configuration does not allow returns `denied` and does nothing.

use super::bindings::celeriac::task::{control, enqueue, kv, log, types};
use super::limits::MemoryLimiter;
use super::outcome::{ChildTask, ChildWorkflow, Progress, ProgressSender};
use super::{Grants, Signals};
use crate::kv::{KvError, KvStore};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use types::HostError;

/// Most child tasks one run may ask for: a runaway loop must not flood the broker.
pub const MAX_CHILDREN: usize = 10_000;
/// Largest args + kwargs of one child, in bytes.
pub const MAX_CHILD_PAYLOAD: usize = 1 << 20;
/// Largest args + kwargs of all of one run's children together: they are held in memory and
/// sent in one step with the parent's ack.
pub const MAX_CHILDREN_BYTES: usize = 16 << 20;
/// Longest task name a child may have.
pub const MAX_TASK_NAME: usize = 256;
/// Guest log lines a run may write at once, and per second after that; the rest are counted
/// and reported as dropped when the run ends.
pub const LOG_BURST: u32 = 200;
/// See [`LOG_BURST`].
pub const LOG_PER_SECOND: u32 = 50;
/// Largest progress metadata, in bytes; it is published on every call.
pub const MAX_PROGRESS_META: usize = 64 << 10;

/// Everything one `Store` holds: WASI's context, the resource table, the memory limiter and
/// celeriac's own view of the running task.
pub struct TaskState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) task: TaskContext,
}

/// celeriac's side of a running task.
pub struct TaskContext {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) grants: Arc<Grants>,
    pub(crate) kv: Option<KvStore>,
    pub(crate) signals: Signals,
    pub(crate) soft_deadline: Option<Instant>,
    pub(crate) hard_deadline: Instant,
    pub(crate) children: Vec<ChildTask>,
    /// Workflows of children (chains, groups, chords).
    pub(crate) workflows: Vec<ChildWorkflow>,
    /// Steps in `workflows`, which count as children.
    pub(crate) workflow_steps: usize,
    /// Bytes of args and kwargs of `children` and `workflows`.
    pub(crate) children_bytes: usize,
    pub(crate) progress: Option<ProgressSender>,
    pub(crate) log_budget: LogBudget,
}

/// A token bucket for one run's guest log lines.
#[derive(Debug)]
pub(crate) struct LogBudget {
    tokens: f64,
    at: Instant,
    /// Lines dropped for being over budget.
    pub(crate) dropped: u64,
}

impl LogBudget {
    pub(crate) fn new() -> Self {
        LogBudget { tokens: f64::from(LOG_BURST), at: Instant::now(), dropped: 0 }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * f64::from(LOG_PER_SECOND);
        self.tokens = (self.tokens + refill).min(f64::from(LOG_BURST));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// `text` with control characters (newlines among them) escaped, so text from a task or a
/// producer cannot forge log lines.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
            .collect(),
    )
}

impl TaskContext {
    /// True once the soft limit passed or the task was revoked.
    pub(crate) fn cancelled(&self) -> bool {
        self.signals.is_cancelled() || self.soft_deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Host calls other than `log` and `cancelled` fail once the task is cancelled, so that a task
    /// which ignores `cancelled()` still cannot keep doing work through the host.
    fn live(&self) -> Result<(), HostError> {
        if self.cancelled() { Err(HostError::Cancelled) } else { Ok(()) }
    }

    fn kv(&self) -> Result<(&KvStore, &str), HostError> {
        self.live()?;
        match (&self.kv, &self.grants.kv) {
            (Some(store), Some(ns)) => Ok((store, ns.as_str())),
            _ => Err(HostError::Denied(format!("task {} is not granted kv", self.name))),
        }
    }
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for TaskState {}

impl log::Host for TaskState {
    async fn log(&mut self, level: log::Level, message: String) {
        if !self.task.grants.log || !self.task.log_budget.take() {
            return;
        }
        // Cap a line so a guest cannot flood the host log with one giant message.
        let message: String = message.chars().take(4096).collect();
        let message = printable(&message);
        let (id, name) = (printable(&self.task.id), &self.task.name);
        match level {
            log::Level::Trace => tracing::trace!(task.id = %id, task.name = %name, "{message}"),
            log::Level::Debug => tracing::debug!(task.id = %id, task.name = %name, "{message}"),
            log::Level::Info => tracing::info!(task.id = %id, task.name = %name, "{message}"),
            log::Level::Warn => tracing::warn!(task.id = %id, task.name = %name, "{message}"),
            log::Level::Error => tracing::error!(task.id = %id, task.name = %name, "{message}"),
        }
    }
}

impl control::Host for TaskState {
    async fn progress(&mut self, state: String, meta: String) -> Result<(), HostError> {
        let t = &self.task;
        if !t.grants.progress {
            return Err(HostError::Denied(format!("task {} is not granted progress", t.name)));
        }
        t.live()?;
        if state.is_empty() || state.len() > 64 {
            return Err(HostError::Invalid("state must be 1 to 64 bytes".into()));
        }
        if meta.len() > MAX_PROGRESS_META {
            return Err(HostError::Invalid(format!(
                "progress meta of {} bytes exceeds {MAX_PROGRESS_META}",
                meta.len()
            )));
        }
        let meta = serde_json::from_str(&meta)
            .map_err(|e| HostError::Invalid(format!("progress meta is not JSON: {e}")))?;
        if let Some(tx) = &t.progress {
            // Replaces the previous report if the reader has not taken it yet: a task reporting
            // in a tight loop costs one report of memory, and the store sees the latest.
            let report = Progress { task_id: t.id.clone(), state, meta };
            tx.send_modify(|(seq, latest)| {
                *seq += 1;
                *latest = Some(report);
            });
        }
        Ok(())
    }

    async fn cancelled(&mut self) -> bool {
        self.task.cancelled()
    }
}

fn kv_error(e: KvError) -> HostError {
    match e {
        KvError::Invalid(m) => HostError::Invalid(m),
        KvError::Unavailable(m) => HostError::Unavailable(m),
    }
}

impl kv::Host for TaskState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let (store, ns) = self.task.kv()?;
        store.get(ns, &key).await.map_err(kv_error)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let (store, ns) = self.task.kv()?;
        store.set(ns, &key, &value).await.map_err(kv_error)
    }

    async fn delete(&mut self, keys: Vec<String>) -> Result<u32, HostError> {
        let (store, ns) = self.task.kv()?;
        store.delete(ns, &keys).await.map_err(kv_error)
    }

    async fn set_add(&mut self, key: String, members: Vec<String>) -> Result<u32, HostError> {
        let (store, ns) = self.task.kv()?;
        store.set_add(ns, &key, &members).await.map_err(kv_error)
    }

    async fn set_remove(&mut self, key: String, members: Vec<String>) -> Result<u32, HostError> {
        let (store, ns) = self.task.kv()?;
        store.set_remove(ns, &key, &members).await.map_err(kv_error)
    }

    async fn set_members(&mut self, key: String) -> Result<Vec<String>, HostError> {
        let (store, ns) = self.task.kv()?;
        store.set_members(ns, &key).await.map_err(kv_error)
    }
}

impl enqueue::Host for TaskState {
    async fn enqueue(
        &mut self,
        name: String,
        args: String,
        kwargs: String,
        options: enqueue::Options,
    ) -> Result<String, HostError> {
        self.task.live()?;
        let (args, kwargs) = self.task.admit_child(&name, &args, &kwargs, &options)?;
        let id = uuid::Uuid::new_v4().to_string();
        self.task.children.push(ChildTask {
            id: id.clone(),
            name,
            args,
            kwargs,
            queue: options.queue,
            priority: options.priority,
            countdown: options.countdown_ms.map(Duration::from_millis),
        });
        Ok(id)
    }

    async fn enqueue_chain(&mut self, steps: Vec<enqueue::Step>) -> Result<Vec<String>, HostError> {
        self.task.send_workflow(&steps, |steps| Ok(workflow::chain(steps)))
    }

    async fn enqueue_group(&mut self, steps: Vec<enqueue::Step>) -> Result<Vec<String>, HostError> {
        self.task.send_workflow(&steps, |steps| Ok(workflow::group(steps)))
    }

    async fn enqueue_chord(
        &mut self,
        header: Vec<enqueue::Step>,
        body: enqueue::Step,
    ) -> Result<Vec<String>, HostError> {
        let all: Vec<enqueue::Step> = header.into_iter().chain([body]).collect();
        self.task.send_workflow(&all, |mut steps| {
            if steps.len() < 2 {
                return Err(HostError::Invalid("a chord needs at least one header step".into()));
            }
            let body = steps.pop().unwrap_or_default();
            Ok(workflow::chord(steps, body))
        })
    }
}

impl TaskContext {
    /// Admits every step of a workflow of children (all or none), builds its signature from
    /// the admitted steps with `build`, and records it to be sent with the task's ack. Returns
    /// the steps' ids.
    fn send_workflow(
        &mut self,
        steps: &[enqueue::Step],
        build: impl FnOnce(Vec<serde_json::Value>) -> Result<serde_json::Value, HostError>,
    ) -> Result<Vec<String>, HostError> {
        self.live()?;
        let (ids, steps) = self.admit_steps(steps)?;
        let signature = build(steps)?;
        self.workflows.push(ChildWorkflow { ids: ids.clone(), signature });
        Ok(ids)
    }

    /// Checks one child against the task's grants and the run's limits, and counts it: its name
    /// must be allowed, its queue too, its args a JSON list and kwargs an object, within the
    /// size caps. Returns the parsed args and kwargs.
    fn admit_child(
        &mut self,
        name: &str,
        args: &str,
        kwargs: &str,
        options: &enqueue::Options,
    ) -> Result<(serde_json::Value, serde_json::Value), HostError> {
        if name.is_empty() || name.len() > MAX_TASK_NAME || name.chars().any(char::is_control) {
            return Err(HostError::Invalid(format!(
                "a child's task name must be 1 to {MAX_TASK_NAME} bytes without control characters"
            )));
        }
        if !self.grants.enqueue.iter().any(|pattern| glob_match(pattern, name)) {
            return Err(HostError::Denied(format!("task {} may not enqueue {name}", self.name)));
        }
        if self.children.len() + self.workflow_steps >= MAX_CHILDREN {
            return Err(HostError::Invalid(format!("more than {MAX_CHILDREN} child tasks")));
        }
        let payload = args.len() + kwargs.len();
        if payload > MAX_CHILD_PAYLOAD {
            return Err(HostError::Invalid(format!(
                "child arguments exceed {MAX_CHILD_PAYLOAD} bytes"
            )));
        }
        if self.children_bytes + payload > MAX_CHILDREN_BYTES {
            return Err(HostError::Invalid(format!(
                "the children of one run may carry at most {MAX_CHILDREN_BYTES} bytes of arguments"
            )));
        }
        let args: serde_json::Value = serde_json::from_str(args)
            .map_err(|e| HostError::Invalid(format!("child args are not JSON: {e}")))?;
        let kwargs: serde_json::Value = serde_json::from_str(kwargs)
            .map_err(|e| HostError::Invalid(format!("child kwargs are not JSON: {e}")))?;
        if !args.is_array() || !kwargs.is_object() {
            return Err(HostError::Invalid("child args must be a list, kwargs an object".into()));
        }
        if let Some(queue) = &options.queue {
            crate::broker::check_queue_name(queue).map_err(HostError::Denied)?;
            if !self.grants.child_queues.iter().any(|pattern| glob_match(pattern, queue)) {
                return Err(HostError::Denied(format!(
                    "task {} may not send to queue {queue:?} (allowed: {:?})",
                    self.name, self.grants.child_queues
                )));
            }
        }
        if options.priority.is_some_and(|p| p > 9) {
            return Err(HostError::Invalid("priority must be 0-9".into()));
        }
        self.children_bytes += payload;
        Ok((args, kwargs))
    }

    /// Admits every step of a workflow, or none: returns their new ids and signatures. The
    /// steps count as children against the run's limits.
    fn admit_steps(
        &mut self,
        steps: &[enqueue::Step],
    ) -> Result<(Vec<String>, Vec<serde_json::Value>), HostError> {
        if steps.is_empty() {
            return Err(HostError::Invalid("a workflow needs at least one step".into()));
        }
        let (bytes, count) = (self.children_bytes, self.workflow_steps);
        let mut out = (Vec::new(), Vec::new());
        for step in steps {
            let admitted = self.admit_child(&step.name, &step.args, &step.kwargs, &step.options);
            let (args, kwargs) = match admitted {
                Ok(parsed) => parsed,
                Err(e) => {
                    (self.children_bytes, self.workflow_steps) = (bytes, count);
                    return Err(e);
                }
            };
            self.workflow_steps += 1;
            let id = uuid::Uuid::new_v4().to_string();
            out.1.push(workflow::step(&id, step, args, kwargs));
            out.0.push(id);
        }
        Ok(out)
    }
}

/// Celery signature dicts for the workflows a task sends, with every id frozen, so the worker
/// sends them exactly as it follows a Python client's (`crate::canvas`).
mod workflow {
    use super::enqueue;
    use serde_json::{Value, json};

    /// One step as a plain signature.
    pub(super) fn step(id: &str, step: &enqueue::Step, args: Value, kwargs: Value) -> Value {
        let mut options = json!({"task_id": id});
        if let Some(queue) = &step.options.queue {
            options["queue"] = json!(queue);
        }
        if let Some(priority) = step.options.priority {
            options["priority"] = json!(priority);
        }
        if let Some(ms) = step.options.countdown_ms {
            options["countdown"] = json!(ms as f64 / 1000.0);
        }
        json!({"task": step.name, "args": args, "kwargs": kwargs, "options": options,
               "subtask_type": null, "immutable": step.immutable})
    }

    pub(super) fn chain(steps: Vec<Value>) -> Value {
        json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": steps}, "options": {},
               "subtask_type": "chain", "immutable": false})
    }

    pub(super) fn group(steps: Vec<Value>) -> Value {
        let id = uuid::Uuid::new_v4().to_string();
        json!({"task": "celery.group", "args": [], "kwargs": {"tasks": steps},
               "options": {"task_id": id}, "subtask_type": "group", "immutable": false})
    }

    pub(super) fn chord(header: Vec<Value>, body: Value) -> Value {
        let header = group(header);
        json!({"task": "celery.chord", "args": [], "kwargs": {"header": header, "body": body},
               "options": {"task_id": header["options"]["task_id"]}, "subtask_type": "chord",
               "immutable": false})
    }
}

/// Matches a task name against a pattern where `*` stands for any run of characters, as in
/// `indexing.*`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else { return false };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_prefixes_and_infixes() {
        assert!(glob_match("indexing.*", "indexing.index_session"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("indexing.*", "deletion.delete"));
        assert!(!glob_match("exact", "exactly"));
    }
}
