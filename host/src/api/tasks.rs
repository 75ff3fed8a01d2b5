//! celeriac's own routes: send a task, read it, revoke it; the queues, the live workers and the
//! dead letters. Reads go to Celery's result keys, so the API and a Python `AsyncResult` always
//! agree; waits listen on the channel `AsyncResult.get()` listens to.

use super::{ApiError, Body, Params, Shared, queue_name, task_id};
use crate::broker::Broker;
use crate::client;
use crate::protocol::{self, NewTask, states};
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The longest `?wait=` or `?timeout=` a request may ask for: a held connection is a cost.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// How long an `Idempotency-Key` keeps mapping to its task id.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

pub(super) fn routes() -> axum::Router<Arc<super::Api>> {
    axum::Router::new()
        // POST names a task, GET an id: one route, as the router allows one name per segment.
        .route("/tasks/{task}", post(send).get(read))
        .route("/tasks/{id}/revoke", post(revoke))
        .route("/queues", get(queues))
        .route("/workers", get(workers))
        .route("/dlq", get(dlq_queues))
        .route("/dlq/{queue}", get(dlq_list))
        .route("/dlq/{queue}/replay", post(dlq_replay))
}

/// A task to send, as a request body gives it.
pub(super) struct Submission {
    pub args: Value,
    pub kwargs: Value,
    pub queue: Option<String>,
    pub opts: NewTask,
}

/// The members a submission may have; `task_id` only where Flower's API takes it.
const SUBMISSION_FIELDS: [&str; 8] =
    ["args", "kwargs", "queue", "priority", "countdown", "eta", "expires", "task_id"];

impl Submission {
    /// Reads `{"args", "kwargs", "queue", "priority", "countdown", "eta", "expires"}`.
    /// `strict` refuses members it does not know (a typo must not be ignored silently);
    /// Flower's API passes any `apply_async` option, so it is not strict. `invalid` is the
    /// status for a member with a wrong value.
    pub(super) fn parse(
        body: Value,
        strict: bool,
        invalid: StatusCode,
    ) -> Result<Submission, ApiError> {
        let bad = |m: String| ApiError::new(invalid, m);
        let Value::Object(mut body) = body else {
            return Err(bad("the body must be a JSON object".into()));
        };
        if strict {
            let unknown: Vec<&String> =
                body.keys().filter(|k| !SUBMISSION_FIELDS[..7].contains(&k.as_str())).collect();
            if !unknown.is_empty() {
                return Err(bad(format!(
                    "unknown member(s) {unknown:?}; a task takes {:?}",
                    &SUBMISSION_FIELDS[..7]
                )));
            }
        }
        let args = match body.remove("args") {
            None | Some(Value::Null) => json!([]),
            Some(a @ Value::Array(_)) => a,
            Some(_) => return Err(bad("args must be an array".into())),
        };
        let kwargs = match body.remove("kwargs") {
            None | Some(Value::Null) => json!({}),
            Some(k @ Value::Object(_)) => k,
            Some(_) => return Err(bad("kwargs must be an object".into())),
        };
        let queue = match body.remove("queue") {
            None | Some(Value::Null) => None,
            Some(Value::String(q)) => Some(queue_name(&q).map_err(|e| bad(e.message))?.to_string()),
            Some(_) => return Err(bad("queue must be a string".into())),
        };
        let priority = match body.remove("priority") {
            None | Some(Value::Null) => None,
            Some(p) => match p.as_u64() {
                Some(p @ 0..=9) => Some(p as u8),
                _ => return Err(bad("priority must be an integer from 0 to 9".into())),
            },
        };
        let countdown = seconds(&body, "countdown").map_err(bad)?;
        let eta = match (body.get("eta").filter(|v| !v.is_null()), countdown) {
            (Some(_), Some(_)) => return Err(bad("give eta or countdown, not both".into())),
            (Some(t), None) => {
                Some(time(t).ok_or_else(|| bad("eta must be an ISO-8601 time".into()))?)
            }
            (None, Some(c)) => Some(protocol::eta_after(c)),
            (None, None) => None,
        };
        let expires = match body.get("expires").filter(|v| !v.is_null()) {
            None => None,
            Some(e) if e.is_number() => Some(protocol::eta_after(
                seconds(&body, "expires").map_err(bad)?.unwrap_or_default(),
            )),
            Some(e) => Some(time(e).ok_or_else(|| {
                bad("expires must be seconds from now or an ISO-8601 time".into())
            })?),
        };
        let id = match body.remove("task_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(task_id(&id).map_err(|e| bad(e.message))?.to_string()),
            Some(_) => return Err(bad("task_id must be a string".into())),
        };
        let opts = NewTask { id, priority, eta, expires, ..NewTask::default() };
        Ok(Submission { args, kwargs, queue, opts })
    }

    /// Sends the task `name` (to its configured queue unless the request named one); returns
    /// its id. The id is remembered first, so a read right after the send finds it.
    pub(super) async fn send(mut self, api: &super::Api, name: &str) -> Result<String, ApiError> {
        let queue = self.queue.take().unwrap_or_else(|| api.catalog.queue_for(name));
        let id = self.opts.id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        api.results.remember(&id).await?;
        client::enqueue(&api.broker, name, &self.args, &self.kwargs, &queue, &self.opts).await?;
        Ok(id)
    }
}

/// A number of seconds, not negative.
fn seconds(body: &Map<String, Value>, member: &str) -> Result<Option<Duration>, String> {
    match body.get(member) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(s) if s.is_finite() && s >= 0.0 => {
                Ok(Some(Duration::from_secs_f64(s.min(protocol::MAX_DELAY.as_secs_f64()))))
            }
            _ => Err(format!("{member} must be a number of seconds, 0 or more")),
        },
    }
}

/// An ISO-8601 time; also Flower's `%Y-%m-%d %H:%M:%S.%f`, with a space for the `T`.
fn time(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = v.as_str()?;
    protocol::parse_time(text).or_else(|| protocol::parse_time(&text.replacen(' ', "T", 1)))
}

/// A `?name=seconds` parameter, at most [`MAX_WAIT`].
pub(super) fn wait_param(q: &BTreeMap<String, String>, name: &str) -> Result<Duration, ApiError> {
    let Some(text) = q.get(name) else { return Ok(Duration::ZERO) };
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 && s <= MAX_WAIT.as_secs_f64() => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{name} must be seconds from 0 to {}", MAX_WAIT.as_secs()),
        )),
    }
}

/// A `?name=true` flag.
pub(super) fn flag(q: &BTreeMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| matches!(v.as_str(), "true" | "1" | "yes" | "on" | "True"))
}

async fn send(
    api: Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    if !api.catalog.has(&name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown task {name:?}: no module registers it"),
        ));
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(k) => match k.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_string()),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                ));
            }
        },
    };
    // The request as a fingerprint: serde_json's maps are sorted, so member order does not
    // make two equal requests differ.
    let fingerprint = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(format!("{name}\n{body}").as_bytes()))
    };
    let mut submission = Submission::parse(body, true, StatusCode::UNPROCESSABLE_ENTITY)?;
    if let Some(key) = &key {
        let id = uuid::Uuid::new_v4().to_string();
        let record = json!({"task_id": id, "fingerprint": fingerprint}).to_string();
        match api.results.claim(key, &record, IDEMPOTENCY_TTL).await? {
            None => submission.opts.id = Some(id),
            Some(held) => {
                let held: Value = serde_json::from_str(&held).unwrap_or(Value::Null);
                return match (held["task_id"].as_str(), held["fingerprint"].as_str()) {
                    (Some(id), Some(f)) if f == fingerprint => Ok(accepted(id, true)),
                    (Some(_), Some(_)) => Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "this Idempotency-Key was used for a different request",
                    )),
                    _ => Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "a request with this Idempotency-Key is being handled; try again",
                    )),
                };
            }
        }
    }
    match submission.send(&api, &name).await {
        Ok(id) => Ok(accepted(&id, false)),
        Err(e) => {
            if let Some(key) = &key
                && let Err(r) = api.results.release(key).await
            {
                tracing::warn!("could not release Idempotency-Key after a failed send: {r}");
            }
            Err(e)
        }
    }
}

/// 202 with where to read the task.
fn accepted(id: &str, replayed: bool) -> Response {
    let url = format!("/tasks/{id}");
    let body = json!({"task_id": id, "state": states::PENDING, "status_url": url});
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(&url) {
        headers.insert(header::LOCATION, v);
    }
    if replayed {
        headers.insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    response
}

/// A task's stored meta (`None` if nothing is stored), after waiting up to `wait` for it to be
/// ready; 404 when celeriac never heard of the id.
pub(super) async fn meta_of(
    api: &super::Api,
    id: &str,
    wait: Duration,
) -> Result<Option<Value>, ApiError> {
    let (_, meta) = if wait.is_zero() {
        client::status(&api.results, id).await?
    } else {
        client::wait(&api.results, id, wait).await?
    };
    Ok(meta)
}

/// 404 unless celeriac sent `id` or a state is stored for it.
async fn known(api: &super::Api, id: &str) -> Result<(), ApiError> {
    if api.results.known(id).await? {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no task {id:?}: celeriac did not send it and no state is stored for it"),
        ))
    }
}

async fn read(
    api: Shared,
    Path(id): Path<String>,
    Params(q): Params,
) -> Result<Response, ApiError> {
    let id = task_id(&id)?;
    let wait = wait_param(&q, "wait")?;
    // Waited on first: a task another producer sent is unknown here until a worker stores a
    // state for it, which may happen during the wait.
    let meta = meta_of(&api, id, wait).await?;
    if meta.is_none() {
        known(&api, id).await?;
    }
    Ok(axum::Json(view(id, meta.as_ref())).into_response())
}

/// The states Celery itself defines; any other state is a task's own progress state.
const CELERY_STATES: [&str; 8] = [
    states::PENDING,
    "RECEIVED",
    states::STARTED,
    states::SUCCESS,
    states::FAILURE,
    states::RETRY,
    states::REVOKED,
    "REJECTED",
];

/// What `GET /tasks/{id}` answers, from Celery's result meta.
fn view(id: &str, meta: Option<&Value>) -> Value {
    let state = meta.and_then(|m| m["status"].as_str()).unwrap_or(states::PENDING);
    let stored = meta.map_or(&Value::Null, |m| &m["result"]);
    let result = if state == states::SUCCESS { stored.clone() } else { Value::Null };
    let error = match stored.get("exc_type").and_then(Value::as_str) {
        Some(exc_type) if [states::FAILURE, states::RETRY, states::REVOKED].contains(&state) => {
            json!({
                "type": exc_type,
                "message": exc_message(&stored["exc_message"]),
                "traceback": meta.map_or(&Value::Null, |m| &m["traceback"]),
            })
        }
        _ => Value::Null,
    };
    let progress = if CELERY_STATES.contains(&state) { Value::Null } else { stored.clone() };
    let member = |k: &str| meta.and_then(|m| m.get(k)).cloned().unwrap_or(Value::Null);
    json!({
        "task_id": id,
        "state": state,
        "result": result,
        "error": error,
        "progress": progress,
        "retries": member("retries"),
        "date_done": member("date_done"),
        "name": member("name"),
        "worker": member("worker"),
    })
}

/// An exception's message as text: its one string argument, or its arguments' reprs.
pub(super) fn exc_message(m: &Value) -> String {
    match m {
        Value::String(s) => s.clone(),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            items => items.iter().map(crate::repr::repr).collect::<Vec<_>>().join(", "),
        },
        other => crate::repr::repr(other),
    }
}

/// Revokes `id` (and stops it if `terminate` and it runs) unless it already finished. Returns
/// its state after.
pub(super) async fn revoke_task(
    api: &super::Api,
    id: &str,
    terminate: bool,
) -> Result<&'static str, ApiError> {
    let (state, _) = client::status(&api.results, id).await?;
    if state == states::SUCCESS || state == states::FAILURE {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("task {id:?} already finished with {state}; there is nothing to revoke"),
        ));
    }
    let ids = [id.to_string()];
    client::revoke(&api.broker, &api.results, &ids, terminate, api.revoke_ttl).await?;
    // Recorded for good above; the broadcast tells running workers (celeriac and Python
    // alike) now rather than at their next look at the revoked set.
    if let Err(e) = crate::control::broadcast_revoke(&api.broker, &ids, terminate).await {
        tracing::warn!("revoked {id}, but the broadcast to running workers failed: {e:#}");
    }
    Ok(states::REVOKED)
}

async fn revoke(
    api: Shared,
    Path(id): Path<String>,
    Params(q): Params,
) -> Result<Response, ApiError> {
    let id = task_id(&id)?;
    let terminate = flag(&q, "terminate");
    known(&api, id).await?;
    let state = revoke_task(&api, id, terminate).await?;
    Ok(axum::Json(json!({"task_id": id, "state": state, "terminate": terminate})).into_response())
}

async fn queues(api: Shared) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for name in api.queue_names().await? {
        let depths = api.broker.queue_depths(&name).await?;
        let by_priority: Map<String, Value> =
            depths.iter().map(|(p, n)| (p.to_string(), json!(n))).collect();
        out.push(json!({
            "name": name,
            "messages": depths.iter().map(|(_, n)| n).sum::<u64>(),
            "by_priority": by_priority,
            "dead_letters": api.broker.dlq_len(&name).await?,
            "oldest_age": api.broker.oldest_age(&name).await?,
        }));
    }
    let scheduled = api.broker.scheduled_len().await?;
    Ok(axum::Json(json!({"queues": out, "scheduled": scheduled})).into_response())
}

/// Asks the live workers `methods` at once; returns each node's replies by method.
pub(super) async fn ask_workers(
    api: &super::Api,
    methods: &[&str],
    timeout: Duration,
) -> Result<BTreeMap<String, Map<String, Value>>, ApiError> {
    let asks =
        methods.iter().map(|m| crate::control::ask(&api.broker, m, json!({}), None, timeout));
    let mut nodes: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (method, replies) in methods.iter().zip(futures_util::future::join_all(asks).await) {
        for (node, reply) in replies? {
            nodes.entry(node).or_default().insert(method.to_string(), reply);
        }
    }
    Ok(nodes)
}

async fn workers(api: Shared, Params(q): Params) -> Result<Response, ApiError> {
    let timeout = match wait_param(&q, "timeout")? {
        Duration::ZERO => Duration::from_secs(1),
        t => t,
    };
    let nodes = ask_workers(&api, &["stats", "active_queues"], timeout).await?;
    let list: Vec<Value> = nodes
        .into_iter()
        .map(|(name, mut replies)| {
            let queues: Vec<Value> = replies
                .get("active_queues")
                .and_then(Value::as_array)
                .map(|qs| qs.iter().map(|q| q["name"].clone()).collect())
                .unwrap_or_default();
            let stats = replies.remove("stats").unwrap_or(Value::Null);
            json!({"name": name, "queues": queues, "stats": stats})
        })
        .collect();
    Ok(axum::Json(json!({"workers": list})).into_response())
}

async fn dlq_queues(api: Shared) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for name in api.broker.dlq_queues().await? {
        let n = api.broker.dlq_len(&name).await?;
        out.push(json!({"name": name, "dead_letters": n}));
    }
    Ok(axum::Json(json!({"queues": out})).into_response())
}

async fn dlq_list(
    api: Shared,
    Path(queue): Path<String>,
    Params(q): Params,
) -> Result<Response, ApiError> {
    let queue = queue_name(&queue)?;
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l.parse::<usize>().ok().filter(|l| (1..=1000).contains(l)).ok_or_else(|| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "limit must be from 1 to 1000")
        })?,
    };
    let letters = client::dlq_list(&api.broker, queue, limit).await?;
    Ok(axum::Json(json!({"queue": queue, "dead_letters": letters})).into_response())
}

async fn dlq_replay(
    api: Shared,
    Path(queue): Path<String>,
    Params(q): Params,
) -> Result<Response, ApiError> {
    let queue = queue_name(&queue)?;
    let only = q.get("task_id").map(|id| task_id(id)).transpose()?;
    let replayed = client::dlq_replay(&api.broker, queue, only).await?;
    if replayed == 0
        && let Some(id) = only
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no dead letter of task {id:?} on {queue:?}"),
        ));
    }
    Ok(axum::Json(json!({"queue": queue, "replayed": replayed})).into_response())
}
