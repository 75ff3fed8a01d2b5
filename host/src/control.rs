//! Celery's remote control (the "pidbox") as far as a worker must answer it: `revoke` (from
//! `celery control revoke`, `app.control.revoke`, Flower and `celeriac revoke`) and `ping`.
//! Requests arrive by PUBLISH on `/<db>.celery.pidbox`; replies are LPUSHed to the caller's
//! reply queue.

use crate::broker::{Broker, RedisBroker};
use base64::Engine as _;
use serde_json::{Value, json};
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

/// A revocation heard on the control channel, for the worker to apply at once: its mirrored
/// revoked set is otherwise refreshed only every maintenance tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Revocation {
    /// The revoked task ids.
    pub ids: Vec<String>,
    /// Whether running copies are to be stopped.
    pub terminate: bool,
}

/// The channel control requests are published on: the fanout topic of `celery.pidbox`.
fn pidbox_channel(broker: &RedisBroker) -> anyhow::Result<String> {
    let db = redis::Client::open(broker.url())?.get_connection_info().redis.db;
    Ok(format!("{}/{db}.celery.pidbox", broker.options().global_prefix))
}

/// A kombu envelope for a control request or reply: JSON `body`, base64-encoded as kombu does.
fn pidbox_envelope(
    body: &Value,
    headers: Value,
    delivery_mode: u8,
    exchange: &str,
    routing_key: &str,
) -> String {
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
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
    let envelope = pidbox_envelope(&body, headers, 2, "celery.pidbox", "");
    let _: i64 =
        redis::AsyncCommands::publish(&mut broker.conn(), pidbox_channel(broker)?, envelope)
            .await?;
    Ok(())
}

/// Listens for control requests until the connection ends; reconnects with backoff.
/// Revocations are recorded in Redis and passed to `revoked` for the worker to apply at once.
pub async fn serve(
    broker: RedisBroker,
    hostname: String,
    revoke_ttl: Duration,
    revoked: tokio::sync::mpsc::UnboundedSender<Revocation>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if let Err(e) = listen(&broker, &hostname, revoke_ttl, &revoked).await {
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
    revoked: &tokio::sync::mpsc::UnboundedSender<Revocation>,
) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    let channel = pidbox_channel(broker)?;
    let mut pubsub = redis::Client::open(broker.url())?.get_async_pubsub().await?;
    pubsub.subscribe(&channel).await?;
    debug!(%channel, "listening for remote control");
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let Some(req) = decode(msg.get_payload_bytes()) else { continue };
        if req.destination.as_ref().is_some_and(|d| !d.iter().any(|n| n == hostname)) {
            continue;
        }
        let reply = match req.method.as_str() {
            "revoke" => {
                let ids = revoke_ids(&req.arguments);
                let terminate = req.arguments["terminate"].as_bool().unwrap_or(false);
                broker.revoke(&ids, revoke_ttl, terminate).await?;
                let _ = revoked.send(Revocation { ids: ids.clone(), terminate });
                json!({"ok": format!("tasks {} flagged as revoked", ids.join(", "))})
            }
            "ping" => json!({"ok": "pong"}),
            other => {
                debug!(method = other, "ignoring unsupported control request");
                continue;
            }
        };
        if let Some(oid) = &req.reply_to {
            send_reply(broker, oid, req.ticket.as_deref(), hostname, reply).await?;
        }
    }
    Ok(())
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
    let envelope =
        pidbox_envelope(&json!({ hostname: reply }), headers, 1, "reply.celery.pidbox", oid);
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
    }
}
