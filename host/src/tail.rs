//! `celeriac events`: a live tail of the Celery events every worker on the broker sends,
//! celeriac and Python alike, as `celery events --dump` prints them (or one JSON object a line).
//!
//! Events arrive as kombu messages on the `celeryev` fanout: a base64 body holding one event,
//! or a list of them on `task.multi`.

use crate::broker::RedisBroker;
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::Write;

/// The events in one kombu message on the `celeryev` fanout; nothing when it is not one.
pub fn decode(envelope: &[u8]) -> Vec<Map<String, Value>> {
    let Ok(envelope) = serde_json::from_slice::<Value>(envelope) else { return Vec::new() };
    let Some(body) = envelope["body"].as_str() else { return Vec::new() };
    let body = if envelope["properties"]["body_encoding"] == "base64" {
        match base64::engine::general_purpose::STANDARD.decode(body) {
            Ok(b) => b,
            Err(_) => return Vec::new(),
        }
    } else {
        body.as_bytes().to_vec()
    };
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(event)) => vec![event],
        Ok(Value::Array(events)) => events
            .into_iter()
            .filter_map(|e| match e {
                Value::Object(e) => Some(e),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Formats events as `celery events --dump` does: `host [time] type: fields`, with a task's name,
/// id and arguments (remembered from its `task-received`) before the fields of later events.
#[derive(Debug, Default)]
pub struct Dump {
    tasks: HashMap<String, String>,
}

/// How many task descriptions [`Dump`] remembers; past this it forgets them all, as a tail
/// that runs for days must not grow without bound.
const REMEMBERED: usize = 100_000;

impl Dump {
    /// One event as a line.
    pub fn line(&mut self, mut event: Map<String, Value>) -> String {
        let text = |v: Option<Value>| match v {
            Some(Value::String(s)) => s,
            Some(v) => v.to_string(),
            None => String::new(),
        };
        let kind = text(event.remove("type")).to_lowercase();
        let host = text(event.remove("hostname"));
        let when = event
            .remove("timestamp")
            .and_then(|t| t.as_f64())
            .and_then(|t| chrono::DateTime::from_timestamp_micros((t * 1e6) as i64))
            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
            .unwrap_or_default();
        let mut head = format!("{host} [{when}] {}", kind.replace('-', " "));
        if kind.starts_with("task-") {
            let id = text(event.remove("uuid"));
            let task = if kind == "task-received" || kind == "task-sent" {
                let described = format!(
                    "{}({id}) args={} kwargs={}",
                    text(event.remove("name")),
                    text(event.remove("args")),
                    text(event.remove("kwargs"))
                );
                if self.tasks.len() >= REMEMBERED {
                    self.tasks.clear();
                }
                self.tasks.insert(id.clone(), described.clone());
                described
            } else if matches!(kind.as_str(), "task-succeeded" | "task-failed" | "task-revoked") {
                self.tasks.remove(&id).unwrap_or(id)
            } else {
                self.tasks.get(&id).cloned().unwrap_or(id)
            };
            head.push(':');
            head.push(' ');
            head.push_str(&task);
        }
        let fields: Vec<String> =
            event.iter().map(|(k, v)| format!("{k}={}", text(Some(v.clone())))).collect();
        if !fields.is_empty() {
            head.push_str(if kind.starts_with("task-") { " " } else { ": " });
            head.push_str(&fields.join(", "));
        }
        head
    }
}

/// Prints every event until `count` were printed (for ever without one) or the subscription
/// ends. `json` prints each event as one JSON object.
pub async fn tail(broker: &RedisBroker, json: bool, count: Option<u64>) -> anyhow::Result<()> {
    let mut pubsub = broker.endpoint().client().await?.get_async_pubsub().await?;
    pubsub.psubscribe(broker.fanout_topic("celeryev", "*")).await?;
    let mut messages = pubsub.on_message();
    let mut dump = Dump::default();
    let mut printed = 0;
    let mut out = std::io::stdout().lock();
    while let Some(msg) = messages.next().await {
        for event in decode(msg.get_payload_bytes()) {
            let line = if json { Value::Object(event).to_string() } else { dump.line(event) };
            // A closed pipe (`| head`) ends the tail quietly.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
    }
    anyhow::bail!("the event subscription to Redis ended")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_task_is_named_in_the_events_after_its_received() {
        let mut dump = Dump::default();
        let received = dump.line(event(json!({
            "type": "task-received", "hostname": "celeriac@h", "timestamp": 0.5,
            "uuid": "u1", "name": "t.add", "args": "(1, 2)", "kwargs": "{}", "retries": 0,
        })));
        assert_eq!(
            received,
            "celeriac@h [1970-01-01 00:00:00.500000] task received: t.add(u1) args=(1, 2) \
             kwargs={} retries=0"
        );
        let done = dump.line(event(json!({
            "type": "task-succeeded", "hostname": "celeriac@h", "timestamp": 1.0,
            "uuid": "u1", "result": "3", "runtime": 0.25,
        })));
        assert_eq!(
            done,
            "celeriac@h [1970-01-01 00:00:01.000000] task succeeded: t.add(u1) args=(1, 2) \
             kwargs={} result=3, runtime=0.25"
        );
        // Forgotten once ended: an unknown id is shown as itself.
        let late =
            dump.line(event(json!({"type": "task-revoked", "uuid": "u1", "timestamp": 1.0})));
        assert!(late.ends_with("task revoked: u1"), "{late}");
    }

    #[test]
    fn a_batch_on_task_multi_is_every_event_in_it() {
        let body = json!([{"type": "task-started", "uuid": "a"}, {"type": "task-started", "uuid": "b"}, 3]);
        let envelope = json!({
            "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
            "properties": {"body_encoding": "base64"},
        });
        let events = decode(envelope.to_string().as_bytes());
        assert_eq!(events.len(), 2);
        assert!(decode(b"not json").is_empty());
    }
}
