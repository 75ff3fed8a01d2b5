//! Celery's wire format on Redis: the kombu envelope around a protocol-v2 task message, and the
//! result metadata the Redis result backend stores. Decoding never panics and never guesses: a
//! message that is not a well-formed v2 task is a [`Poison`] with the reason, so the worker can
//! dead-letter it untouched.

use crate::canvas::Workflow;
use crate::repr;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::borrow::Cow;

/// Largest envelope the worker accepts; bigger ones are dead-lettered as oversized.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Why a message cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("oversized message: {0} bytes (limit {MAX_MESSAGE_BYTES})")]
    Oversized(usize),
    /// The envelope is not JSON.
    #[error("envelope is not valid JSON: {0}")]
    BadJson(String),
    /// Only `application/json` bodies are accepted, as Celery's default.
    #[error("unsupported content type {0:?} (only application/json)")]
    ContentType(String),
    /// The body is not valid base64.
    #[error("body is not valid base64: {0}")]
    BadBase64(String),
    /// No `headers.task`: protocol 1 or not a Celery task at all.
    #[error("not a Celery protocol 2 task message: {0}")]
    UnknownProtocol(String),
    /// The body is not `[args, kwargs, embed]`.
    #[error("body is not [args, kwargs, embed]: {0}")]
    BadBody(String),
    /// The body's third element (`callbacks`, `errbacks`, `chain`, `chord`) is not a workflow.
    #[error("bad workflow in the body's third element: {0}")]
    BadWorkflow(String),
    /// A header has the wrong type or format.
    #[error("bad header {0}: {1}")]
    BadHeader(&'static str, String),
}

impl Poison {
    /// A stable short name for the dead-letter record and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Poison::Oversized(_) => "oversized",
            Poison::BadJson(_) => "bad_json",
            Poison::ContentType(_) => "content_type",
            Poison::BadBase64(_) => "bad_base64",
            Poison::UnknownProtocol(_) => "unknown_protocol",
            Poison::BadBody(_) => "bad_body",
            Poison::BadWorkflow(_) => "bad_workflow",
            Poison::BadHeader(..) => "bad_header",
        }
    }
}

/// A decoded task message, with the parsed envelope kept so a retry can republish it with only
/// the headers Celery changes.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Positional args: a JSON array, as text.
    pub args: String,
    /// Keyword args: a JSON object, as text.
    pub kwargs: String,
    /// Retries so far.
    pub retries: u32,
    /// Not to run before this.
    pub eta: Option<DateTime<Utc>>,
    /// Not to run after this.
    pub expires: Option<DateTime<Utc>>,
    /// 0-9; on Redis 0 is the most urgent.
    pub priority: u8,
    /// The root of the task's workflow.
    pub root_id: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    /// The group, if any.
    pub group: Option<String>,
    /// Its place in the group (a chord's results come back in this order).
    pub group_index: Option<u64>,
    /// `[hard, soft]` time limits in seconds from the producer.
    pub time_limits: (Option<f64>, Option<f64>),
    /// Whether the producer asked not to store the result.
    pub ignore_result: bool,
    /// What follows the task (`link`, `link_error`, the rest of a chain, a chord), from the
    /// body's third element; `None` when nothing does.
    pub workflow: Option<Box<Workflow>>,
    /// When a celeriac producer sent it (Unix seconds, the `sent_at` property); Celery's own
    /// producers do not record it.
    pub sent_at: Option<f64>,
    /// The whole envelope as received.
    pub raw: String,
}

/// Options for a new message.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    /// Task id; a new UUID when `None`.
    pub id: Option<String>,
    /// Priority 0-9.
    pub priority: Option<u8>,
    /// Not before.
    pub eta: Option<DateTime<Utc>>,
    /// Not after.
    pub expires: Option<DateTime<Utc>>,
    /// The sending task, for children.
    pub parent_id: Option<String>,
    /// The workflow root, for children.
    pub root_id: Option<String>,
    /// The group it belongs to.
    pub group: Option<String>,
    /// Its place in that group.
    pub group_index: Option<u64>,
    /// What follows it.
    pub workflow: Option<Workflow>,
}

fn decode_kombu_types(v: Value) -> Value {
    // kombu's JSON tags datetimes, UUIDs, decimals and bytes as {"__type__", "__value__"}; tasks
    // see the plain value (the ISO string, the UUID string, the decimal string, base64 bytes).
    match v {
        Value::Object(mut m) => {
            if m.len() == 2 && m.contains_key("__type__") && m.contains_key("__value__") {
                return m.remove("__value__").unwrap_or(Value::Null);
            }
            Value::Object(m.into_iter().map(|(k, v)| (k, decode_kombu_types(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(decode_kombu_types).collect()),
        other => other,
    }
}

/// One header or property, kept raw until it is needed: only the few members the worker reads
/// are parsed, and each on its own, so a bad one is named.
type Raw<'a> = Option<&'a RawValue>;

fn field(raw: Raw<'_>) -> Option<Value> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

fn opt_str(raw: Raw<'_>, key: &'static str) -> Result<Option<String>, Poison> {
    match field(raw) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Poison::BadHeader(key, format!("expected a string, got {other}"))),
    }
}

fn opt_time(raw: Raw<'_>, key: &'static str) -> Result<Option<DateTime<Utc>>, Poison> {
    let value = match field(raw) {
        Some(Value::Object(mut o)) if o.contains_key("__value__") => o.remove("__value__"),
        other => other,
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(&s)
            .map(Some)
            .ok_or_else(|| Poison::BadHeader(key, format!("not an ISO-8601 time: {s:?}"))),
        Some(other) => Err(Poison::BadHeader(key, format!("expected a time, got {other}"))),
    }
}

/// The protocol-v2 headers the worker reads; the others stay in the envelope untouched.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct RawHeaders<'a> {
    #[serde(borrow)]
    task: Raw<'a>,
    #[serde(borrow)]
    id: Raw<'a>,
    #[serde(borrow)]
    retries: Raw<'a>,
    #[serde(borrow)]
    timelimit: Raw<'a>,
    #[serde(borrow)]
    eta: Raw<'a>,
    #[serde(borrow)]
    expires: Raw<'a>,
    #[serde(borrow)]
    root_id: Raw<'a>,
    #[serde(borrow)]
    parent_id: Raw<'a>,
    #[serde(borrow)]
    group: Raw<'a>,
    #[serde(borrow)]
    group_index: Raw<'a>,
    #[serde(borrow)]
    ignore_result: Raw<'a>,
}

/// The message properties the worker reads.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct RawProperties<'a> {
    #[serde(borrow)]
    body_encoding: Raw<'a>,
    #[serde(borrow)]
    priority: Raw<'a>,
    #[serde(borrow)]
    sent_at: Raw<'a>,
}

/// The body `[args, kwargs, embed]` as JSON texts. The common case (no kombu-typed values) is
/// checked and cut without building a tree; a body with `__type__` tags is rewritten to plain
/// values first.
fn split_body(body: &[u8]) -> Result<(String, String, Option<Box<Workflow>>), Poison> {
    let bad = |e: serde_json::Error| Poison::BadBody(format!("not JSON: {e}"));
    let shape = || Poison::BadBody("args must be a list and kwargs an object".into());
    if memchr_str(body, b"__type__") {
        let (args, kwargs, embed) =
            match decode_kombu_types(serde_json::from_slice(body).map_err(bad)?) {
                Value::Array(parts) if (2..=3).contains(&parts.len()) => {
                    let mut parts = parts.into_iter();
                    let (args, kwargs) =
                        (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                    (args, kwargs, parts.next())
                }
                other => {
                    return Err(Poison::BadBody(format!("expected a 3-element list, got {other}")));
                }
            };
        if !args.is_array() || !kwargs.is_object() {
            return Err(shape());
        }
        let workflow = workflow(&embed.unwrap_or_default())?;
        return Ok((args.to_string(), kwargs.to_string(), workflow));
    }
    let parts: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            Poison::BadBody(format!("expected a 3-element list: {e}"))
        }
        _ => bad(e),
    })?;
    match parts.as_slice() {
        [args, kwargs, rest @ ..] if rest.len() <= 1 => {
            if !args.get().starts_with('[') || !kwargs.get().starts_with('{') {
                return Err(shape());
            }
            let workflow = match rest.first() {
                Some(embed) if !nothing_follows(embed.get()) => {
                    let embed = serde_json::from_str(embed.get()).map_err(bad)?;
                    workflow(&embed)?
                }
                _ => None,
            };
            Ok((args.get().to_string(), kwargs.get().to_string(), workflow))
        }
        _ => {
            Err(Poison::BadBody(format!("expected a 3-element list, got {} elements", parts.len())))
        }
    }
}

/// The workflow in a body's third element; a malformed one makes the message poison, since
/// running the task while dropping what follows it would pass over it silently.
fn workflow(embed: &Value) -> Result<Option<Box<Workflow>>, Poison> {
    Workflow::parse(embed).map(|w| w.map(Box::new)).map_err(|e| Poison::BadWorkflow(e.to_string()))
}

/// Whether a body's third element is the usual all-null one (or empty), checked without
/// building a tree: this runs for every message.
fn nothing_follows(embed: &str) -> bool {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Embed<'a> {
        #[serde(borrow)]
        callbacks: Option<&'a RawValue>,
        #[serde(borrow)]
        errbacks: Option<&'a RawValue>,
        #[serde(borrow)]
        chain: Option<&'a RawValue>,
        #[serde(borrow)]
        chord: Option<&'a RawValue>,
    }
    let Ok(e) = serde_json::from_str::<Embed<'_>>(embed) else { return embed.trim() == "null" };
    let unset = |v: Option<&RawValue>| v.is_none_or(|v| matches!(v.get(), "null" | "[]"));
    unset(e.callbacks) && unset(e.errbacks) && unset(e.chain) && unset(e.chord)
}

fn memchr_str(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The envelope's top level, with everything below kept raw.
#[derive(serde::Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(rename = "content-type", borrow, default)]
    content_type: Option<&'a RawValue>,
    /// Read in the same pass as the envelope: a message is scanned once.
    #[serde(borrow, default)]
    headers: Option<RawHeaders<'a>>,
    #[serde(borrow, default)]
    properties: Option<RawProperties<'a>>,
}

/// Parses Celery's ISO-8601 times; a time without an offset is taken as UTC, as Celery does
/// with `enable_utc`.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").ok().map(|n| n.and_utc())
}

/// The longest delay celeriac schedules anything for (a retry's or a child's countdown). Longer
/// ones, which only a broken or hostile task asks for, are cut to this, so that no time
/// arithmetic can overflow.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// The time `delay` from now, with `delay` capped at [`MAX_DELAY`].
pub fn eta_after(delay: std::time::Duration) -> DateTime<Utc> {
    let now = Utc::now();
    chrono::TimeDelta::from_std(delay.min(MAX_DELAY))
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now)
}

/// Formats a time as Celery does (`isoformat()` with `+00:00`).
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}

/// Decodes a kombu envelope holding a Celery protocol-v2 task.
pub fn decode(raw: &[u8]) -> Result<TaskMessage, Poison> {
    if raw.len() > MAX_MESSAGE_BYTES {
        return Err(Poison::Oversized(raw.len()));
    }
    let text = std::str::from_utf8(raw).map_err(|e| Poison::BadJson(format!("not UTF-8: {e}")))?;
    let env: RawEnvelope<'_> = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            Poison::BadJson(format!("the envelope is not a kombu message: {e}"))
        }
        _ => Poison::BadJson(e.to_string()),
    })?;
    match env.content_type.map(|c| serde_json::from_str::<Value>(c.get())) {
        None | Some(Ok(Value::Null)) => {}
        Some(Ok(Value::String(c))) if c == "application/json" => {}
        Some(Ok(Value::String(other))) => return Err(Poison::ContentType(other)),
        Some(other) => return Err(Poison::ContentType(format!("{other:?}"))),
    }
    let Some(headers) = env.headers else {
        return Err(Poison::UnknownProtocol("no headers".into()));
    };
    let task = match field(headers.task) {
        Some(Value::String(t)) if !t.is_empty() => t,
        _ => return Err(Poison::UnknownProtocol("no headers.task".into())),
    };
    let id = opt_str(headers.id, "id")?
        .filter(|s| !s.is_empty())
        .ok_or(Poison::BadHeader("id", "missing".into()))?;
    let properties = env.properties.unwrap_or_default();
    let body = match env.body.map(|b| serde_json::from_str::<Cow<'_, str>>(b.get())) {
        Some(Ok(body)) => body,
        _ => return Err(Poison::BadBody("no body".into())),
    };
    let base64 = field(properties.body_encoding).is_some_and(|e| e == "base64");
    let body_bytes = if base64 {
        Cow::Owned(
            base64::engine::general_purpose::STANDARD
                .decode(body.trim())
                .map_err(|e| Poison::BadBase64(e.to_string()))?,
        )
    } else {
        Cow::Borrowed(body.as_bytes())
    };
    let (args, kwargs, workflow) = split_body(&body_bytes)?;
    let retries = match field(headers.retries) {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .map(|r| r.min(u32::MAX as u64) as u32)
            .ok_or_else(|| Poison::BadHeader("retries", format!("expected a count, got {v}")))?,
    };
    let time_limits = match field(headers.timelimit) {
        Some(Value::Array(a)) if a.len() == 2 => (a[0].as_f64(), a[1].as_f64()),
        _ => (None, None),
    };
    let priority =
        field(properties.priority).and_then(|p| p.as_u64()).map(|p| p.min(9) as u8).unwrap_or(0);
    Ok(TaskMessage {
        id,
        task,
        args,
        kwargs,
        retries,
        eta: opt_time(headers.eta, "eta")?,
        expires: opt_time(headers.expires, "expires")?,
        priority,
        root_id: opt_str(headers.root_id, "root_id")?,
        parent_id: opt_str(headers.parent_id, "parent_id")?,
        group: opt_str(headers.group, "group")?,
        group_index: field(headers.group_index).and_then(|v| v.as_u64()),
        time_limits,
        ignore_result: field(headers.ignore_result).and_then(|v| v.as_bool()).unwrap_or(false),
        workflow,
        sent_at: field(properties.sent_at).and_then(|v| v.as_f64()).filter(|t| t.is_finite()),
        raw: text.to_string(),
    })
}

/// A kombu envelope for a message that is not a task (a control request or reply, an event):
/// a JSON `body`, base64-encoded as kombu sends it, and the routing kombu records.
pub fn kombu_envelope(
    body: &str,
    headers: Value,
    delivery_mode: u8,
    exchange: &str,
    routing_key: &str,
) -> String {
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": delivery_mode,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// The origin header: `gen<pid>@<host>` as Celery writes it.
pub fn origin() -> String {
    format!("gen{}@{}", std::process::id(), hostname())
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Builds the envelope of a new task message for `queue`, exactly as Celery's `send_task`
/// does with the anonymous exchange. Returns the task id and the envelope JSON.
pub fn encode(
    name: &str,
    args: &Value,
    kwargs: &Value,
    queue: &str,
    opts: &NewTask,
) -> (String, String) {
    let id = opts.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let embed = match &opts.workflow {
        Some(w) => w.embed(),
        None => json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null}),
    };
    let body = json!([args, kwargs, embed]);
    let headers = json!({
        "lang": "py",
        "task": name,
        "id": id,
        "shadow": null,
        "eta": opts.eta.map(format_time),
        "expires": opts.expires.map(format_time),
        "group": opts.group,
        "group_index": opts.group_index,
        "retries": 0,
        "timelimit": [null, null],
        "root_id": opts.root_id.clone().unwrap_or_else(|| id.clone()),
        "parent_id": opts.parent_id,
        "argsrepr": repr::truncate(repr::args_repr(args), repr::MAX_REPR),
        "kwargsrepr": repr::truncate(repr::repr(kwargs), repr::MAX_REPR),
        "origin": origin(),
        "ignore_result": false,
        "replaced_task_nesting": 0,
        "stamped_headers": null,
        "stamps": {},
    });
    let envelope = json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": id,
            "reply_to": uuid::Uuid::new_v4().to_string(),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": opts.priority.unwrap_or(0).min(9),
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
            // Not kombu's: when it was sent, for queue wait and the oldest message's age.
            // Other consumers ignore properties they do not know.
            "sent_at": crate::broker::now_secs(),
        },
    });
    (id, envelope.to_string())
}

impl TaskMessage {
    /// Whether its `expires` has passed at `now`: it is revoked instead of run.
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// How long it waited in its queue before `now`, not counting an ETA delay: known only
    /// for messages a celeriac producer sent.
    pub fn queue_wait(&self, now: DateTime<Utc>) -> Option<f64> {
        let sent = self.sent_at?;
        let ready = self.eta.map_or(sent, |eta| sent.max(eta.timestamp_micros() as f64 / 1e6));
        Some((now.timestamp_micros() as f64 / 1e6 - ready).max(0.0))
    }

    /// Its ETA, when that is still ahead of `now`.
    pub fn due_later(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.eta.filter(|e| *e > now)
    }

    /// The whole envelope, parsed (for retries and inspection; the hot path never needs it).
    pub fn envelope(&self) -> Value {
        serde_json::from_str(&self.raw).unwrap_or(Value::Null)
    }

    /// The envelope for the retry of this message: the same id, body and queue, `retries` + 1,
    /// the new `eta`, a fresh delivery tag; as Celery's `Task.retry` republishes. Only those
    /// fields are rewritten: every other value is carried over as the producer wrote it, so a
    /// number `serde_json` cannot hold (`1e400`, a 30-digit id) survives the retry unchanged.
    pub fn retry_envelope(&self, eta: DateTime<Utc>) -> String {
        type Object = std::collections::BTreeMap<String, Box<RawValue>>;
        let raw = |v: Value| RawValue::from_string(v.to_string()).expect("a Value is JSON");
        let nested = |map: &mut Object, key: &str, patch: &dyn Fn(&mut Object)| {
            if let Some(mut inner) = map.get(key).and_then(|v| serde_json::from_str(v.get()).ok()) {
                patch(&mut inner);
                let text = serde_json::to_string(&inner).expect("raw values serialize");
                map.insert(key.into(), RawValue::from_string(text).expect("an object is JSON"));
            }
        };
        // `decode` read the envelope as an object, so this parse cannot fail; if it ever did,
        // the message would be republished as it came rather than lost.
        let Ok(mut env) = serde_json::from_str::<Object>(&self.raw) else {
            return self.raw.clone();
        };
        nested(&mut env, "headers", &|h| {
            h.insert("retries".into(), raw(json!(self.retries.saturating_add(1))));
            h.insert("eta".into(), raw(json!(format_time(eta))));
            h.remove("redelivered");
        });
        nested(&mut env, "properties", &|p| {
            p.insert("delivery_tag".into(), raw(json!(uuid::Uuid::new_v4().to_string())));
            nested(p, "delivery_info", &|info| {
                info.remove("redelivered");
            });
        });
        serde_json::to_string(&env).expect("raw values serialize")
    }
}

/// Celery task states.
pub mod states {
    /// Not known to have started: queued, or never sent (Celery cannot tell).
    pub const PENDING: &str = "PENDING";
    /// Running (written when the task starts).
    pub const STARTED: &str = "STARTED";
    /// Done with a result.
    pub const SUCCESS: &str = "SUCCESS";
    /// Failed.
    pub const FAILURE: &str = "FAILURE";
    /// Will be retried.
    pub const RETRY: &str = "RETRY";
    /// Revoked or expired.
    pub const REVOKED: &str = "REVOKED";
}

/// The Python module a client looks the exception class up in. Known builtins resolve to the
/// real class; Celery's own time-limit errors to `celery.exceptions`; anything else to a module
/// the client lacks, so it synthesises a class of that name.
pub fn exception_module(exc_type: &str) -> &'static str {
    const BUILTINS: &[&str] = &[
        "ValueError",
        "TypeError",
        "KeyError",
        "IndexError",
        "RuntimeError",
        "MemoryError",
        "PermissionError",
        "FileNotFoundError",
        "OSError",
        "TimeoutError",
        "AssertionError",
        "NotImplementedError",
        "LookupError",
        "ArithmeticError",
        "ZeroDivisionError",
        "Exception",
    ];
    const CELERY: &[&str] = &[
        "SoftTimeLimitExceeded",
        "TimeLimitExceeded",
        "TaskRevokedError",
        "Retry",
        "MaxRetriesExceededError",
        "Terminated",
    ];
    if BUILTINS.contains(&exc_type) {
        "builtins"
    } else if CELERY.contains(&exc_type) {
        "celery.exceptions"
    } else {
        "celeriac"
    }
}

/// Celery's exception dict.
pub fn exception(exc_type: &str, message: &str) -> Value {
    json!({"exc_type": exc_type, "exc_message": [message], "exc_module": exception_module(exc_type)})
}

/// The value stored at `celery-task-meta-<id>`.
pub fn result_meta(
    id: &str,
    status: &str,
    result: Value,
    traceback: Option<&str>,
    children: &[String],
) -> String {
    result_meta_json(id, status, &result.to_string(), traceback, children)
}

/// `meta` with Celery's `result_extended` fields: the task's name, args, kwargs, the worker's
/// name, the retries so far and the queue.
pub fn extend_meta(meta: &str, msg: &TaskMessage, queue: &str, worker: &str) -> String {
    let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(meta) else {
        return meta.to_string();
    };
    m.insert("name".into(), msg.task.clone().into());
    m.insert("args".into(), serde_json::from_str(&msg.args).unwrap_or(Value::Null));
    m.insert("kwargs".into(), serde_json::from_str(&msg.kwargs).unwrap_or(Value::Null));
    m.insert("worker".into(), worker.into());
    m.insert("retries".into(), msg.retries.into());
    m.insert("queue".into(), queue.into());
    Value::Object(m).to_string()
}

/// [`result_meta`] for a result that is already JSON text (a task's validated return value),
/// written out directly: this runs once per task, so it builds no tree.
pub fn result_meta_json(
    id: &str,
    status: &str,
    result: &str,
    traceback: Option<&str>,
    children: &[String],
) -> String {
    let ready = matches!(status, states::SUCCESS | states::FAILURE | states::REVOKED);
    let mut out = Vec::with_capacity(160 + result.len() + traceback.map_or(0, str::len));
    let string = |out: &mut Vec<u8>, s: &str| {
        serde_json::to_writer(out, s).expect("writing JSON into memory cannot fail")
    };
    out.extend_from_slice(br#"{"status":"#);
    string(&mut out, status);
    out.extend_from_slice(br#","result":"#);
    out.extend_from_slice(result.as_bytes());
    out.extend_from_slice(br#","traceback":"#);
    match traceback {
        Some(t) => string(&mut out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","children":["#);
    for (i, child) in children.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // A child as Celery serialises an AsyncResult: [[id, parent], None].
        out.extend_from_slice(b"[[");
        string(&mut out, child);
        out.extend_from_slice(b",null],null]");
    }
    out.extend_from_slice(br#"],"date_done":"#);
    match ready {
        true => string(&mut out, &format_time(Utc::now())),
        false => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","task_id":"#);
    string(&mut out, id);
    out.push(b'}');
    String::from_utf8(out).expect("built from UTF-8 pieces")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message Python's `add.apply_async((2, 3))` leaves in Redis (celery 5.7).
    const CAPTURED: &str = include_str!("../../tests/fixtures/celery-5.7-add.json");

    fn json_of(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn decodes_a_captured_celery_message() {
        let m = decode(CAPTURED.as_bytes()).unwrap();
        assert_eq!(m.task, "tasks.add");
        assert_eq!(m.id, "11111111-2222-3333-4444-555555555555");
        assert_eq!(json_of(&m.args), json!([2, 3]));
        assert_eq!(json_of(&m.kwargs), json!({}));
        assert_eq!((m.retries, m.priority, m.eta), (0, 0, None));
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let eta = parse_time("2030-01-02T03:04:05.000006+00:00").unwrap();
        let opts = NewTask { priority: Some(5), eta: Some(eta), ..NewTask::default() };
        let (id, env) = encode("demo.add", &json!([1, {"a": null}]), &json!({"y": 2}), "hi", &opts);
        let m = decode(env.as_bytes()).unwrap();
        assert_eq!((m.id.as_str(), m.task.as_str()), (id.as_str(), "demo.add"));
        assert_eq!(
            (json_of(&m.args), json_of(&m.kwargs)),
            (json!([1, {"a": null}]), json!({"y": 2}))
        );
        assert_eq!((m.priority, m.eta), (5, Some(eta)));
        assert_eq!(m.envelope()["properties"]["delivery_info"]["routing_key"], "hi");
        assert_eq!(m.envelope()["headers"]["argsrepr"], "(1, {'a': None})");
    }

    #[test]
    fn a_retry_carries_values_serde_cannot_hold_as_they_were_written() {
        let text = CAPTURED.replace(
            r#""lang": "py","#,
            r#""lang": "py", "x_custom": 1e400, "x_big": 123456789012345678901234567890,"#,
        );
        let m = decode(text.as_bytes()).unwrap();
        assert_eq!(m.envelope(), Value::Null, "serde_json cannot read this envelope");
        let again = m.retry_envelope(Utc::now());
        assert!(again.contains(r#""x_custom":1e400"#), "{again}");
        assert!(again.contains(r#""x_big":123456789012345678901234567890"#), "{again}");
        let again = decode(again.as_bytes()).unwrap();
        assert_eq!((&again.id, again.retries, &again.args), (&m.id, 1, &m.args));
    }

    #[test]
    fn retry_keeps_the_id_and_bumps_retries() {
        let m = decode(CAPTURED.as_bytes()).unwrap();
        let eta = Utc::now();
        let again = decode(m.retry_envelope(eta).as_bytes()).unwrap();
        assert_eq!((&again.id, again.retries, &again.args), (&m.id, 1, &m.args));
        assert_eq!(again.eta.map(format_time), Some(format_time(eta)));
        assert_ne!(
            again.envelope()["properties"]["delivery_tag"],
            m.envelope()["properties"]["delivery_tag"]
        );
    }

    #[test]
    fn kombu_typed_values_become_plain_values() {
        let body = json!([[{"__type__": "datetime", "__value__": "2024-01-01T00:00:00"}], {}, {}]);
        let env = json!({"headers": {"task": "t", "id": "1"}, "body": body.to_string(), "properties": {}});
        let m = decode(env.to_string().as_bytes()).unwrap();
        assert_eq!(json_of(&m.args), json!(["2024-01-01T00:00:00"]));
    }

    #[test]
    fn poison_messages_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "bad_json"),
            (br#"{"headers": {"id": "1"}, "body": "W10="}"#, "unknown_protocol"),
            (br#"{"content-type": "application/x-python-serialize", "headers": {"task": "t", "id": "1"}, "body": ""}"#, "content_type"),
            (br#"{"headers": {"task": "t", "id": "1"}, "body": "!!!", "properties": {"body_encoding": "base64"}}"#, "bad_base64"),
            (br#"{"headers": {"task": "t", "id": "1"}, "body": "[1, 2, 3]"}"#, "bad_body"),
            (br#"{"headers": {"task": "t", "id": "1", "eta": "tomorrow"}, "body": "[[], {}, {}]"}"#, "bad_header"),
            (br#"{"headers": {"task": "t", "id": "1", "retries": "x"}, "body": "[[], {}, {}]"}"#, "bad_header"),
        ];
        for (raw, kind) in cases {
            let e = decode(raw).unwrap_err();
            assert_eq!(e.kind(), *kind, "{e}");
        }
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(decode(&big).unwrap_err().kind(), "oversized");
    }

    #[test]
    fn result_meta_matches_celery() {
        let meta: Value = serde_json::from_str(&result_meta(
            "id1",
            states::FAILURE,
            exception("ValueError", "bad"),
            Some("tb"),
            &["c1".into()],
        ))
        .unwrap();
        assert_eq!(meta["status"], "FAILURE");
        assert_eq!(
            meta["result"],
            json!({"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"})
        );
        assert_eq!(meta["children"], json!([[["c1", null], null]]));
        assert!(meta["date_done"].as_str().unwrap().ends_with("+00:00"));
        let retry: Value =
            serde_json::from_str(&result_meta("id1", states::RETRY, Value::Null, None, &[]))
                .unwrap();
        assert!(retry["date_done"].is_null());
        let done: Value = serde_json::from_str(&result_meta_json(
            "i\"d",
            states::SUCCESS,
            r#"{"a": [1, "\u00e9"]}"#,
            None,
            &["c1".into(), "c2".into()],
        ))
        .unwrap();
        assert_eq!(done["result"], json!({"a": [1, "é"]}));
        assert_eq!(done["task_id"], "i\"d");
        assert_eq!(done["children"], json!([[["c1", null], null], [["c2", null], null]]));
        assert!(done["traceback"].is_null());
    }
}
