//! Celery's remote control (the "pidbox"): what `celery inspect`, `celery control`, Flower and
//! `celeriac revoke` ask a worker. Requests arrive by PUBLISH on `/<db>.celery.pidbox`; replies
//! are LPUSHed to the caller's reply queue as `{"<node name>": reply}`.
//!
//! This module owns the wire: decoding requests, matching destinations, the reply envelope and
//! the commands that only touch Redis. What only the worker knows (its running tasks, its
//! counters, its switches) it asks through [`Node`]. A command celeriac does not support is
//! answered with Celery's `{"error": ...}`, never with silence, so a caller does not wait out
//! its timeout.

use crate::broker::{Broker, RedisBroker};
use crate::protocol::kombu_envelope;
use crate::runtime::printable;
use base64::Engine as _;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// What a control request asks.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The method, e.g. `revoke`.
    pub method: String,
    /// Its arguments.
    pub arguments: Value,
    /// Worker names it is for; `None` means every worker.
    pub destination: Option<Vec<String>>,
    /// Where to send the reply: the client's oid.
    pub reply_to: Option<String>,
    /// Matches the reply to the request.
    pub ticket: Option<String>,
}

/// Decodes a pidbox envelope.
pub fn decode(raw: &[u8]) -> Option<Request> {
    let env: Value = serde_json::from_slice(raw).ok()?;
    let body = env["body"].as_str()?;
    let body = if env["properties"]["body_encoding"] == "base64" {
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(body).ok()?).ok()?
    } else {
        body.to_string()
    };
    let body: Value = serde_json::from_str(&body).ok()?;
    Some(Request {
        method: body["method"].as_str()?.to_string(),
        arguments: body["arguments"].clone(),
        destination: body["destination"]
            .as_array()
            .map(|d| d.iter().filter_map(|n| n.as_str().map(String::from)).collect()),
        reply_to: body["reply_to"]["routing_key"].as_str().map(String::from),
        ticket: body["ticket"].as_str().map(String::from),
    })
}

/// The ids a `revoke` names (`task_id` is one id or a list).
pub fn revoke_ids(arguments: &Value) -> Vec<String> {
    match &arguments["task_id"] {
        Value::String(id) => vec![id.clone()],
        Value::Array(ids) => ids.iter().filter_map(|i| i.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

/// Python's truth of a JSON value: callers send flags as `true`, but also as `1` (Flower's
/// `terminate`, from `strtobool`) or a string.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// What a worker answers about itself and does when asked. The worker implements it; the
/// listener here calls it from the control channel.
pub trait Node: Send + Sync {
    /// Applies a revocation at once (it is already stored in Redis): running copies stop when
    /// `terminate` is set.
    fn revoke(&self, ids: &[String], terminate: bool);
    /// Celery's `stats` reply (`broker`, `total`, `pool.processes`, ...).
    fn stats(&self) -> Value;
    /// The running tasks, as Celery's `active` lists them.
    fn active(&self) -> Value;
    /// The task names this worker runs. With Celery's `taskinfoitems` (`celery inspect
    /// registered module queue`), each name is followed by those attributes, as Celery shows
    /// them: `name [module=deploy.wasm@1f2e3d4c5b6a queue=default]`.
    fn registered(&self, items: &[String]) -> Vec<String>;
    /// The queues it consumes, in its order.
    fn queues(&self) -> Vec<String>;
    /// The settings worth showing for `conf`.
    fn conf(&self) -> Value;
    /// Switches task events on or off; returns the previous setting, or `None` when this worker
    /// sends no events at all.
    fn task_events(&self, on: bool) -> Option<bool>;
    /// Sends a heartbeat event now.
    fn heartbeat(&self);
    /// Starts a warm shutdown, as SIGTERM does.
    fn shutdown(&self);
    /// Starts consuming `queue` (its binding is declared); returns whether it is new.
    fn add_queue(&self, queue: &str) -> bool;
    /// Stops consuming `queue`; returns whether it was consumed.
    fn cancel_queue(&self, queue: &str) -> bool;
    /// Carries out a command that changes a running setting (`rate_limit`, `time_limit`,
    /// `pool_grow`, `pool_shrink`, `autoscale`) and returns its reply; `None` for any other
    /// method.
    fn adjust(&self, method: &str, arguments: &Value) -> Option<Value>;
}

/// Broadcasts a `revoke` as Celery's `app.control.revoke` does (no reply wanted), so every
/// worker on the broker, celeriac or Python, hears it at once.
pub async fn broadcast_revoke(
    broker: &RedisBroker,
    ids: &[String],
    terminate: bool,
) -> anyhow::Result<()> {
    let body = json!({
        "method": "revoke",
        "arguments": {"task_id": ids, "terminate": terminate, "signal": "SIGTERM"},
        "destination": null,
        "pattern": null,
        "matcher": null,
    });
    let headers = json!({"clock": 1, "expires": crate::broker::now_secs() + 60.0});
    let envelope = kombu_envelope(&body.to_string(), headers, 2, "celery.pidbox", "");
    let _: i64 = redis::AsyncCommands::publish(
        &mut broker.conn(),
        broker.fanout_topic("celery.pidbox", ""),
        envelope,
    )
    .await?;
    Ok(())
}

/// Asks workers over the pidbox as `celery inspect` does, celeriac and Python workers alike:
/// publishes `method` with a reply queue of its own and collects `{node: reply}` answers for
/// `timeout`, or until every node in `destination` has answered. Returns them by node name.
pub async fn ask(
    broker: &RedisBroker,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    timeout: Duration,
) -> anyhow::Result<std::collections::BTreeMap<String, Value>> {
    let oid = uuid::Uuid::new_v4().to_string();
    let ticket = uuid::Uuid::new_v4().to_string();
    let queue = format!("{oid}.reply.celery.pidbox");
    let sep = crate::broker::PRIORITY_SEP;
    let binding = format!("{oid}{sep}{sep}{queue}");
    let bindings = broker.key("_kombu.binding.reply.celery.pidbox");
    let mut conn = broker.conn();
    let _: () = redis::AsyncCommands::sadd(&mut conn, &bindings, &binding).await?;
    let body = json!({
        "method": method,
        "arguments": arguments,
        "destination": destination,
        "pattern": null,
        "matcher": null,
        "ticket": ticket,
        "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": oid},
    });
    let expires = crate::broker::now_secs() + timeout.as_secs_f64();
    let headers = json!({"clock": 1, "expires": expires});
    let envelope = kombu_envelope(&body.to_string(), headers, 2, "celery.pidbox", "");
    let topic = broker.fanout_topic("celery.pidbox", "");
    let _: i64 = redis::AsyncCommands::publish(&mut conn, topic, envelope).await?;
    let mut replies = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let wanted = destination.map_or(usize::MAX, <[String]>::len);
    let key = broker.key(&queue);
    // BRPOP holds the connection it runs on: on the broker's shared one it would stall every
    // other command of this process, the worker's own pidbox replies among them.
    let mut waiting = broker.endpoint().client().await?.get_multiplexed_async_connection().await?;
    while replies.len() < wanted {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        // BRPOP takes seconds as a float; at least a millisecond, as 0 would block for ever.
        let wait = left.as_secs_f64().max(0.001);
        let popped: Option<(String, Vec<u8>)> =
            redis::cmd("BRPOP").arg(&key).arg(wait).query_async(&mut waiting).await?;
        let Some((_, raw)) = popped else { break };
        let Ok(env) = serde_json::from_slice::<Value>(&raw) else { continue };
        if env["headers"]["ticket"] != ticket.as_str() {
            continue;
        }
        let text = env["body"].as_str().unwrap_or_default();
        let Ok(body) = base64::engine::general_purpose::STANDARD.decode(text) else { continue };
        if let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(&body) {
            replies.extend(answer);
        }
    }
    let _: () = redis::AsyncCommands::del(&mut conn, &key).await?;
    let _: () = redis::AsyncCommands::srem(&mut conn, &bindings, &binding).await?;
    Ok(replies)
}

/// Listens for control requests for worker `hostname` until dropped; reconnects with backoff.
pub async fn serve(
    broker: RedisBroker,
    hostname: String,
    revoke_ttl: Duration,
    node: Arc<dyn Node>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if let Err(e) = listen(&broker, &hostname, revoke_ttl, node.as_ref()).await {
            warn!("remote control listener failed, reconnecting in {delay:?}: {e}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn listen(
    broker: &RedisBroker,
    hostname: &str,
    revoke_ttl: Duration,
    node: &dyn Node,
) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    let channel = broker.fanout_topic("celery.pidbox", "");
    let mut pubsub = broker.endpoint().client().await?.get_async_pubsub().await?;
    pubsub.subscribe(&channel).await?;
    debug!(%channel, "listening for remote control");
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let Some(req) = decode(msg.get_payload_bytes()) else { continue };
        if req.destination.as_ref().is_some_and(|d| !d.iter().any(|n| n == hostname)) {
            continue;
        }
        let reply = answer(broker, revoke_ttl, node, &req).await?;
        if let Some(oid) = &req.reply_to {
            send_reply(broker, oid, req.ticket.as_deref(), hostname, reply).await?;
        }
    }
    Ok(())
}

/// Most revoked ids a `revoked` reply lists (Celery keeps at most 50,000 in memory).
const MAX_REVOKED_LISTED: isize = 50_000;

/// Carries out one request and returns its reply (sent only when the caller asked for one).
async fn answer(
    broker: &RedisBroker,
    revoke_ttl: Duration,
    node: &dyn Node,
    req: &Request,
) -> anyhow::Result<Value> {
    let args = &req.arguments;
    Ok(match req.method.as_str() {
        "revoke" => {
            let ids = revoke_ids(args);
            let terminate = truthy(&args["terminate"]);
            broker.revoke(&ids, revoke_ttl, terminate).await?;
            node.revoke(&ids, terminate);
            json!({"ok": format!("tasks {} flagged as revoked", ids.join(", "))})
        }
        "ping" => json!({"ok": "pong"}),
        // A Python worker's mingle at start: celeriac keeps no revocations in memory to share
        // (they are in Redis, where the Python worker does not look), and no logical clock.
        "hello" => json!({"revoked": {}, "clock": 0}),
        "stats" => node.stats(),
        "active" => node.active(),
        "registered" => {
            let items: Vec<String> = match &args["taskinfoitems"] {
                Value::Array(a) => {
                    a.iter().filter_map(|i| i.as_str().map(str::to_string)).collect()
                }
                _ => Vec::new(),
            };
            json!(node.registered(&items))
        }
        "active_queues" => Value::Array(node.queues().iter().map(|q| queue_info(q)).collect()),
        "conf" => node.conf(),
        // Nothing is held unstarted: a worker takes only messages for its free slots, and ETA
        // and rate-limited messages wait in Redis, not in a worker (`celeriac status` lists them).
        "reserved" | "scheduled" => json!([]),
        "revoked" => {
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(broker.own("revoked"))
                .arg(crate::broker::now_secs())
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(MAX_REVOKED_LISTED)
                .query_async(&mut broker.conn())
                .await?;
            json!(ids)
        }
        "heartbeat" => {
            node.heartbeat();
            Value::Null
        }
        "enable_events" | "disable_events" => {
            let on = req.method == "enable_events";
            let word = if on { "enabled" } else { "disabled" };
            match node.task_events(on) {
                Some(was) if was == on => json!({"ok": format!("task events already {word}")}),
                Some(_) => json!({"ok": format!("task events {word}")}),
                None => json!({"error": "this worker sends no events"}),
            }
        }
        "shutdown" => {
            node.shutdown();
            json!({"ok": "shutting down"})
        }
        "add_consumer" | "cancel_consumer" => {
            let queue = args["queue"].as_str().unwrap_or("");
            if let Err(e) = crate::broker::check_queue_name(queue) {
                return Ok(json!({"error": e}));
            }
            if req.method == "cancel_consumer" {
                return Ok(match node.cancel_queue(queue) {
                    true => json!({"ok": format!("no longer consuming from {queue}")}),
                    false => json!({"error": format!("not consuming from {queue}")}),
                });
            }
            broker.declare(&[queue.to_string()]).await?;
            match node.add_queue(queue) {
                true => json!({"ok": format!("add consumer {queue}")}),
                false => json!({"ok": format!("already consuming from {queue}")}),
            }
        }
        other => node.adjust(other, args).unwrap_or_else(|| {
            debug!(method = %printable(other), "unsupported control request");
            json!({"error": format!("celeriac does not support the control command {other:?}")})
        }),
    })
}

/// One entry of an `active_queues` reply, as kombu describes a queue bound to the direct
/// exchange of its own name.
fn queue_info(name: &str) -> Value {
    json!({
        "name": name,
        "exchange": {"name": name, "type": "direct", "arguments": null, "durable": true,
                     "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": name,
        "queue_arguments": null,
        "binding_arguments": null,
        "consumer_arguments": null,
        "durable": true,
        "exclusive": false,
        "auto_delete": false,
        "no_ack": false,
        "alias": null,
        "bindings": [],
        "no_declare": null,
        "expires": null,
        "message_ttl": null,
        "max_length": null,
        "max_length_bytes": null,
        "max_priority": null,
    })
}

/// Replies as kombu's pidbox does: to every queue bound to the caller's oid on
/// `reply.celery.pidbox`.
async fn send_reply(
    broker: &RedisBroker,
    oid: &str,
    ticket: Option<&str>,
    hostname: &str,
    reply: Value,
) -> anyhow::Result<()> {
    let mut conn = broker.conn();
    let members: Vec<String> =
        redis::AsyncCommands::smembers(&mut conn, broker.key("_kombu.binding.reply.celery.pidbox"))
            .await?;
    let headers = json!({"ticket": ticket, "clock": 1});
    let envelope = kombu_envelope(
        &json!({ hostname: reply }).to_string(),
        headers,
        1,
        "reply.celery.pidbox",
        oid,
    );
    for member in members {
        let mut parts = member.split(crate::broker::PRIORITY_SEP);
        let (Some(key), Some(_pattern), Some(queue)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if key == oid {
            let _: () =
                redis::AsyncCommands::lpush(&mut conn, broker.key(queue), &envelope).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_celery_revoke_broadcast() {
        let body = json!({"method": "revoke", "arguments": {"task_id": ["a", "b"], "terminate": true, "signal": "SIGTERM"}, "destination": null, "pattern": null, "matcher": null});
        let env = json!({"body": base64::engine::general_purpose::STANDARD.encode(body.to_string()), "properties": {"body_encoding": "base64"}, "headers": {"clock": 3}});
        let req = decode(env.to_string().as_bytes()).unwrap();
        assert_eq!(req.method, "revoke");
        assert_eq!(req.destination, None);
        assert_eq!(revoke_ids(&req.arguments), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(revoke_ids(&json!({"task_id": "one"})), vec!["one".to_string()]);
        assert!(decode(b"junk").is_none());
        // Flower sends `terminate` as 1.
        for (flag, on) in
            [(json!(true), true), (json!(1), true), (json!(0), false), (json!(null), false)]
        {
            assert_eq!(truthy(&flag), on, "{flag}");
        }
    }
}
