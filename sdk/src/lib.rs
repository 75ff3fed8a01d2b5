//! Write celeriac tasks as plain Rust functions.
//!
//! A task is a function whose first parameter is a [`Context`] and whose other parameters are
//! any serde types. Celery's positional `args` fill the parameters in order, `kwargs` fill them by
//! name, and a missing `Option<_>` parameter is `None`, so a Python producer can call
//! `send_task("demo.add", args=[2], kwargs={"y": 3})` as it would call a Python task. The return
//! value is serialised to JSON and becomes the task result.
//!
//! ```
//! use celeriac_sdk::{task, Context, TaskResult};
//!
//! task! {
//!     /// Adds two numbers.
//!     #[task(name = "demo.add", queue = "default", hard_time_limit_ms = 5_000)]
//!     pub fn add(_cx: &Context, x: i64, y: i64) -> TaskResult<i64> {
//!         Ok(x + y)
//!     }
//! }
//!
//! // In a component crate (`crate-type = ["cdylib"]`, built for `wasm32-wasip2`):
//! // celeriac_sdk::export_tasks!(add);
//!
//! fn main() {
//!     assert_eq!(add::NAME, "demo.add");
//!     assert_eq!(add::info().queue.as_deref(), Some("default"));
//!     assert_eq!(add(&celeriac_sdk::Context::detached("id", 0), 2, 3), Ok(5));
//! }
//! ```
//!
//! A component built this way serves every task listed in [`export_tasks!`]; the host asks it for
//! their names and defaults through `describe` and calls `run` once per message, each time in a
//! fresh instance. Host capabilities ([`kv`], [`enqueue`](Context::enqueue),
//! [`progress`](Context::progress)) work only when the task's configuration grants them; a denied
//! call returns [`HostError::Denied`].
#![warn(missing_docs)]

pub mod kv;
mod macros;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;
use std::time::Duration;

/// Bindings generated from `wit/task.wit`. Task authors rarely need them directly.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "task",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_celeriac_task",
        default_bindings_module: "celeriac_sdk::bindings",
    });
    pub use celeriac::task::types::{
        Failure, HostError as WitHostError, RetryRequest, TaskError as WitTaskError,
    };
}

pub use bindings::TaskInfo;
pub use serde_json;

/// What a task function returns.
pub type TaskResult<T> = Result<T, TaskError>;

/// Why a task did not succeed, and whether the host should try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// A transient failure: retried under the task's retry policy.
    Retry {
        /// Why, in words.
        reason: String,
        /// Delay before the retry; `None` lets the backoff policy decide.
        countdown: Option<Duration>,
    },
    /// A permanent failure, not retried.
    Fail {
        /// The error class a Python client sees, e.g. `ValueError`.
        exc_type: String,
        /// The message.
        message: String,
    },
}

impl TaskError {
    /// A transient failure retried under the task's backoff policy.
    pub fn retry(reason: impl Into<String>) -> Self {
        TaskError::Retry { reason: reason.into(), countdown: None }
    }

    /// A transient failure retried after `countdown`.
    pub fn retry_after(reason: impl Into<String>, countdown: Duration) -> Self {
        TaskError::Retry { reason: reason.into(), countdown: Some(countdown) }
    }

    /// A permanent failure of class `exc_type` (e.g. `ValueError`, `KeyError`).
    pub fn fail(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError::Fail { exc_type: exc_type.into(), message: message.into() }
    }

    /// A permanent `ValueError`: the input was wrong and retrying will not help.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::fail("ValueError", message)
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Retry { reason, .. } => write!(f, "retry: {reason}"),
            TaskError::Fail { exc_type, message } => write!(f, "{exc_type}: {message}"),
        }
    }
}

impl std::error::Error for TaskError {}

impl From<serde_json::Error> for TaskError {
    fn from(e: serde_json::Error) -> Self {
        TaskError::invalid(e.to_string())
    }
}

impl From<TaskError> for bindings::WitTaskError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Retry { reason, countdown } => {
                bindings::WitTaskError::Retry(bindings::RetryRequest {
                    reason,
                    countdown_ms: countdown.map(|d| d.as_millis() as u64),
                })
            }
            TaskError::Fail { exc_type, message } => {
                bindings::WitTaskError::Fail(bindings::Failure { exc_type, message })
            }
        }
    }
}

/// Why a host call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// The task's configuration does not grant this capability.
    Denied(String),
    /// The soft time limit passed or the task was revoked: return soon.
    Cancelled,
    /// The call's arguments were rejected.
    Invalid(String),
    /// The host could not complete the call right now.
    Unavailable(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Denied(m) => write!(f, "denied: {m}"),
            HostError::Cancelled => write!(f, "cancelled: soft time limit passed or task revoked"),
            HostError::Invalid(m) => write!(f, "invalid: {m}"),
            HostError::Unavailable(m) => write!(f, "unavailable: {m}"),
        }
    }
}

impl std::error::Error for HostError {}

impl From<bindings::WitHostError> for HostError {
    fn from(e: bindings::WitHostError) -> Self {
        use bindings::WitHostError as W;
        match e {
            W::Denied(m) => HostError::Denied(m),
            W::Cancelled => HostError::Cancelled,
            W::Invalid(m) => HostError::Invalid(m),
            W::Unavailable(m) => HostError::Unavailable(m),
        }
    }
}

/// A failed host call fails the task the way a Celery task would see it: a denied capability is a
/// permanent `PermissionError`, cancellation is `SoftTimeLimitExceeded`, an unavailable store is
/// worth a retry.
impl From<HostError> for TaskError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Denied(m) => TaskError::fail("PermissionError", m),
            HostError::Cancelled => {
                TaskError::fail("SoftTimeLimitExceeded", "soft time limit exceeded")
            }
            HostError::Invalid(m) => TaskError::invalid(m),
            HostError::Unavailable(m) => TaskError::retry(m),
        }
    }
}

/// Severity of a log line.
pub use bindings::celeriac::task::log::Level;

/// Options for a child task sent with [`Context::enqueue`].
pub use bindings::celeriac::task::enqueue::Options as EnqueueOptions;

/// The running task: its id and attempt, and the host capabilities it was granted.
#[derive(Debug, Clone)]
pub struct Context {
    id: String,
    retries: u32,
    soft_deadline: Option<Duration>,
}

impl Context {
    /// A context for calling a task function outside the host, e.g. in native unit tests.
    /// Host calls made through it are only valid inside a component.
    pub fn detached(id: impl Into<String>, retries: u32) -> Self {
        Context { id: id.into(), retries, soft_deadline: None }
    }

    /// The task id. It stays the same across retries, which makes it a good idempotency key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How many times this task was retried before this run (0 on the first run).
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Time left until the soft limit when the run started, if the task has one.
    pub fn soft_deadline(&self) -> Option<Duration> {
        self.soft_deadline
    }

    /// Writes a line to the host's log within this task's span.
    pub fn log(&self, level: Level, message: &str) {
        bindings::celeriac::task::log::log(level, message);
    }

    /// Shorthand for an info-level [`log`](Self::log).
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }

    /// Reports a custom state with metadata, like Celery's `update_state(state=..., meta=...)`.
    pub fn progress(&self, state: &str, meta: &impl Serialize) -> Result<(), HostError> {
        let meta = serde_json::to_string(meta).map_err(|e| HostError::Invalid(e.to_string()))?;
        bindings::celeriac::task::control::progress(state, &meta).map_err(Into::into)
    }

    /// True once the soft time limit passed or the task was revoked: stop and return.
    pub fn cancelled(&self) -> bool {
        bindings::celeriac::task::control::cancelled()
    }

    /// The key-value namespace the configuration assigned to this task.
    pub fn kv(&self) -> kv::HostKv {
        kv::HostKv
    }

    /// Sends a child task; returns its id. Only task names the configuration allows are accepted.
    pub fn enqueue(
        &self,
        name: &str,
        args: &impl Serialize,
        kwargs: &impl Serialize,
        options: EnqueueOptions,
    ) -> Result<String, HostError> {
        let args = serde_json::to_string(args).map_err(|e| HostError::Invalid(e.to_string()))?;
        let kwargs =
            serde_json::to_string(kwargs).map_err(|e| HostError::Invalid(e.to_string()))?;
        bindings::celeriac::task::enqueue::enqueue(name, &args, &kwargs, &options)
            .map_err(Into::into)
    }
}

/// One task of a workflow sent with [`Context::chain`], [`Context::group`] or
/// [`Context::chord`].
#[derive(Debug, Clone)]
pub struct Step {
    name: String,
    args: String,
    kwargs: String,
    options: EnqueueOptions,
    immutable: bool,
}

impl Step {
    /// Task `name` with positional `args` (a list, e.g. a tuple or a `Vec`).
    pub fn new(name: &str, args: &impl Serialize) -> Result<Step, HostError> {
        Ok(Step {
            name: name.to_string(),
            args: serde_json::to_string(args).map_err(|e| HostError::Invalid(e.to_string()))?,
            kwargs: "{}".to_string(),
            options: EnqueueOptions::default(),
            immutable: false,
        })
    }

    /// With keyword arguments (an object).
    pub fn kwargs(mut self, kwargs: &impl Serialize) -> Result<Step, HostError> {
        self.kwargs =
            serde_json::to_string(kwargs).map_err(|e| HostError::Invalid(e.to_string()))?;
        Ok(self)
    }

    /// With a queue, priority or countdown.
    pub fn options(mut self, options: EnqueueOptions) -> Step {
        self.options = options;
        self
    }

    /// Keeps its own args: as a chain step or a chord body it is not given the result before
    /// it (Celery's `.si()`).
    pub fn immutable(mut self) -> Step {
        self.immutable = true;
        self
    }

    fn wit(&self) -> bindings::celeriac::task::enqueue::Step {
        bindings::celeriac::task::enqueue::Step {
            name: self.name.clone(),
            args: self.args.clone(),
            kwargs: self.kwargs.clone(),
            options: self.options.clone(),
            immutable: self.immutable,
        }
    }
}

impl Context {
    /// Sends a chain: each step runs once the one before it succeeded, given its result as
    /// its first argument (unless [`Step::immutable`]); a failure fails the steps after it.
    /// Returns the steps' ids in order: the last one's result is the chain's. Every name must
    /// be allowed, as for [`enqueue`](Self::enqueue); nothing is sent unless all are, and
    /// nothing is sent before this task succeeds.
    pub fn chain(&self, steps: &[Step]) -> Result<Vec<String>, HostError> {
        let steps: Vec<_> = steps.iter().map(Step::wit).collect();
        bindings::celeriac::task::enqueue::enqueue_chain(&steps).map_err(Into::into)
    }

    /// Sends a group: every step at once. Returns their ids.
    pub fn group(&self, steps: &[Step]) -> Result<Vec<String>, HostError> {
        let steps: Vec<_> = steps.iter().map(Step::wit).collect();
        bindings::celeriac::task::enqueue::enqueue_group(&steps).map_err(Into::into)
    }

    /// Sends a chord: the `header` steps at once, then `body`, given the list of their
    /// results (in header order) as its first argument. If a header step fails, the body
    /// fails with `ChordError`. Returns the header's ids, then the body's.
    pub fn chord(&self, header: &[Step], body: &Step) -> Result<Vec<String>, HostError> {
        let header: Vec<_> = header.iter().map(Step::wit).collect();
        bindings::celeriac::task::enqueue::enqueue_chord(&header, &body.wit()).map_err(Into::into)
    }
}

// The type is generated by wit-bindgen, which cannot be asked to derive for one type alone.
#[allow(clippy::derivable_impls)]
impl Default for EnqueueOptions {
    fn default() -> Self {
        EnqueueOptions { queue: None, priority: None, countdown_ms: None }
    }
}

/// A task's arguments as Celery sends them, handed out parameter by parameter.
#[doc(hidden)]
pub struct Arguments {
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    next: usize,
    names: Vec<&'static str>,
}

#[doc(hidden)]
impl Arguments {
    pub fn parse(call: &bindings::Call) -> Result<(Context, Self), TaskError> {
        let args = match serde_json::from_str::<Value>(&call.args) {
            Ok(Value::Array(a)) => a,
            Ok(Value::Null) => Vec::new(),
            Ok(other) => return Err(type_error(format!("args must be a list, got {other}"))),
            Err(e) => return Err(type_error(format!("args are not valid JSON: {e}"))),
        };
        let kwargs = match serde_json::from_str::<Value>(&call.kwargs) {
            Ok(Value::Object(m)) => m,
            Ok(Value::Null) => Map::new(),
            Ok(other) => return Err(type_error(format!("kwargs must be an object, got {other}"))),
            Err(e) => return Err(type_error(format!("kwargs are not valid JSON: {e}"))),
        };
        let cx = Context {
            id: call.id.clone(),
            retries: call.retries,
            soft_deadline: call.soft_deadline_ms.map(Duration::from_millis),
        };
        Ok((cx, Arguments { args, kwargs, next: 0, names: Vec::new() }))
    }

    /// The next parameter: positional if there is one left, else by name; when neither was
    /// passed an `Option` parameter is `None` and any other type reports it missing.
    pub fn take<T: DeserializeOwned>(&mut self, name: &'static str) -> Result<T, TaskError> {
        self.names.push(name);
        let position = self.next;
        self.next += 1;
        let positional = position < self.args.len();
        if positional {
            if self.kwargs.contains_key(name) {
                return Err(type_error(format!("got multiple values for argument '{name}'")));
            }
            let value = std::mem::take(&mut self.args[position]);
            return serde_json::from_value(value)
                .map_err(|e| type_error(format!("argument '{name}': {e}")));
        }
        match self.kwargs.remove(name) {
            Some(value) => serde_json::from_value(value)
                .map_err(|e| type_error(format!("argument '{name}': {e}"))),
            // Only an `Option` parameter may be left out, as a Python default of None.
            None => T::deserialize(Missing)
                .map_err(|_| type_error(format!("missing required argument '{name}'"))),
        }
    }

    /// Rejects arguments that no parameter took, as Python does.
    pub fn finish(self) -> Result<(), TaskError> {
        if self.args.len() > self.next {
            return Err(type_error(format!(
                "takes {} positional arguments but {} were given",
                self.next,
                self.args.len()
            )));
        }
        if let Some(extra) = self.kwargs.keys().next() {
            return Err(type_error(format!("got an unexpected keyword argument '{extra}'")));
        }
        Ok(())
    }
}

/// Stands for an argument that was not passed: an `Option` reads it as `None`, anything else
/// (including `serde_json::Value`, which would happily take `null`) fails.
struct Missing;

impl<'de> serde::Deserializer<'de> for Missing {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("missing"))
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_none()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

fn type_error(message: String) -> TaskError {
    TaskError::fail("TypeError", message)
}

/// Serialises a task's return value, or converts its error for the host.
#[doc(hidden)]
pub fn finish_run<T: Serialize>(result: TaskResult<T>) -> Result<String, bindings::WitTaskError> {
    match result {
        Ok(value) => serde_json::to_string(&value)
            .map_err(|e| TaskError::fail("EncodeError", e.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}

/// The defaults every task starts from before its `#[task(...)]` settings apply.
#[doc(hidden)]
pub fn base_info(name: &str, description: &str) -> TaskInfo {
    TaskInfo {
        name: name.to_string(),
        description: description.trim().to_string(),
        queue: None,
        soft_time_limit_ms: None,
        hard_time_limit_ms: None,
        memory_limit_bytes: None,
        fuel: None,
        max_retries: None,
        retry_backoff_ms: None,
        retry_backoff_max_ms: None,
        rate_limit: None,
    }
}

/// Lets `#[task(queue = "x", max_retries = 3)]` fill `Option<String>` and `Option<u32>` fields
/// from plain literals.
#[doc(hidden)]
pub trait IntoSetting<T> {
    fn into_setting(self) -> Option<T>;
}

impl IntoSetting<String> for &str {
    fn into_setting(self) -> Option<String> {
        Some(self.to_string())
    }
}

macro_rules! numeric_setting {
    ($($t:ty),*) => {$(
        impl IntoSetting<$t> for $t {
            fn into_setting(self) -> Option<$t> { Some(self) }
        }
    )*};
}
numeric_setting!(u32, u64);
