//! The part of Flower's HTTP API that scripts call to send, read and revoke tasks and to look at
//! queues and workers, answered as Flower 2.2 answers it: hyphenated keys (`task-id`), 200 for
//! a sent task, Flower's unknown-id PENDING. Auth is celeriac's bearer token, as Flower's
//! `--auth` would be; errors are celeriac's JSON errors with Flower's statuses.

use super::tasks::{Submission, ask_workers, exc_message, flag, meta_of, revoke_task, wait_param};
use super::{ApiError, Body, Params, Shared, task_id};
use crate::broker::Broker;
use crate::protocol::states;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

pub(super) fn routes() -> axum::Router<Arc<super::Api>> {
    axum::Router::new()
        .route("/api/task/async-apply/{name}", post(async_apply))
        .route("/api/task/send-task/{name}", post(send_task))
        .route("/api/task/result/{id}", get(result))
        .route("/api/task/revoke/{id}", post(revoke))
        .route("/api/task/types", get(types))
        .route("/api/queues/length", get(queue_lengths))
        .route("/api/workers", get(workers))
}

/// Flower answers a bad body with 400 `invalid options` / `args must be an array`.
async fn submit(api: &super::Api, name: &str, body: Value) -> Result<Response, ApiError> {
    let submission = Submission::parse(body, false, StatusCode::BAD_REQUEST)?;
    let id = submission.send(api, name).await?;
    Ok(axum::Json(json!({"task-id": id, "state": states::PENDING})).into_response())
}

/// Only the tasks a module registers, as Flower only applies tasks its app knows.
async fn async_apply(
    api: Shared,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    if !api.catalog.has(&name) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("Unknown task '{name}'")));
    }
    submit(&api, &name, body).await
}

/// Any name: whoever consumes the queue runs it (a Python worker, say).
async fn send_task(
    api: Shared,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    submit(&api, &name, body).await
}

/// `{"task-id", "state"}`, plus `result` once ready: the value on SUCCESS, the exception's repr
/// otherwise, with `traceback` on FAILURE. An unknown id is PENDING, as in Flower.
async fn result(
    api: Shared,
    Path(id): Path<String>,
    Params(q): Params,
) -> Result<Response, ApiError> {
    let id = task_id(&id)?;
    let wait = wait_param(&q, "timeout")?;
    let meta = meta_of(&api, id, wait).await?;
    let state = meta.as_ref().and_then(|m| m["status"].as_str()).unwrap_or(states::PENDING);
    let mut out = json!({"task-id": id, "state": state});
    if let Some(meta) = meta.as_ref().filter(|_| crate::results::is_ready_state(state)) {
        let stored = &meta["result"];
        out["result"] = match stored.get("exc_type").and_then(Value::as_str) {
            Some(exc_type) if state != states::SUCCESS => {
                json!(format!("{exc_type}({})", exc_args(&stored["exc_message"])))
            }
            _ => stored.clone(),
        };
        if state == states::FAILURE {
            out["traceback"] = meta["traceback"].clone();
        }
    }
    Ok(axum::Json(out).into_response())
}

/// An exception's arguments as Python writes them inside its repr: `'boom', 7`.
fn exc_args(m: &Value) -> String {
    match m {
        Value::Array(items) => items.iter().map(crate::repr::repr).collect::<Vec<_>>().join(", "),
        Value::String(_) => crate::repr::repr(m),
        other => crate::repr::repr(&Value::String(exc_message(other))),
    }
}

/// Flower revokes without looking: so does this, except that a finished task is a 409.
async fn revoke(
    api: Shared,
    Path(id): Path<String>,
    Params(q): Params,
) -> Result<Response, ApiError> {
    let id = task_id(&id)?;
    revoke_task(&api, id, flag(&q, "terminate")).await?;
    Ok(axum::Json(json!({"message": format!("Revoked '{id}'")})).into_response())
}

async fn types(api: Shared) -> Response {
    axum::Json(json!({"task-types": api.catalog.names()})).into_response()
}

/// Each queue's messages, all priority lists summed, as Flower counts them.
async fn queue_lengths(api: Shared) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for name in api.queue_names().await? {
        let messages = api.broker.queue_len(&name).await?;
        out.push(json!({"name": name, "messages": messages}));
    }
    Ok(axum::Json(json!({"active_queues": out})).into_response())
}

/// `{node: {"stats", "active_queues", "registered"}}`; with `?status=1`, `{node: true}` for
/// each node that answered a ping.
async fn workers(api: Shared, Params(q): Params) -> Result<Response, ApiError> {
    let timeout = Duration::from_secs(1);
    if flag(&q, "status") {
        let nodes = ask_workers(&api, &["ping"], timeout).await?;
        let up: Map<String, Value> = nodes.into_keys().map(|n| (n, json!(true))).collect();
        return Ok(axum::Json(up).into_response());
    }
    let nodes = ask_workers(&api, &["stats", "active_queues", "registered"], timeout).await?;
    let out: Map<String, Value> = nodes.into_iter().map(|(n, r)| (n, Value::Object(r))).collect();
    Ok(axum::Json(out).into_response())
}
