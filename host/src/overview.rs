//! `celeriac status` without an id: what waits in each queue (per priority, the oldest
//! message's age, dead letters) and which workers are alive, celeriac and Python alike.

use crate::broker::{Broker, RedisBroker};
use crate::config::Config;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// The overview as text, asking workers for `timeout`.
pub async fn render(
    broker: &RedisBroker,
    config: &Config,
    timeout: Duration,
) -> anyhow::Result<String> {
    let ask = |method| crate::control::ask(broker, method, json!({}), None, timeout);
    let (stats, active, consumed) =
        tokio::try_join!(ask("stats"), ask("active"), ask("active_queues"))?;

    // Every queue someone consumes, the configuration routes to, or has dead letters; and
    // Celery's default.
    let mut names: Vec<String> = vec!["celery".into()];
    for queues in consumed.values() {
        names.extend(
            queues
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|q| q["name"].as_str().map(String::from)),
        );
    }
    names.extend(config.routes.iter().map(|r| r.queue.clone()));
    names.extend(config.tasks.values().filter_map(|t| t.queue.clone()));
    names.extend(broker.dlq_queues().await?);
    names.sort();
    names.dedup();

    let mut out = String::new();
    let mut unstamped = false;
    let width = names.iter().map(String::len).max().unwrap_or(0).max(5);
    writeln!(
        out,
        "{:<width$}  {:>8}  {:>6}  {:>6}  {:>6}  {:>6}  {:>8}  {:>6}",
        "QUEUE", "WAITING", "P0", "P3", "P6", "P9", "OLDEST", "DEAD"
    )?;
    for name in &names {
        let depths = broker.queue_depths(name).await?;
        let waiting: u64 = depths.iter().map(|(_, n)| n).sum();
        let oldest = match broker.oldest_age(name).await? {
            Some(age) => age_text(age),
            None if waiting > 0 => {
                unstamped = true;
                "?".into()
            }
            None => "-".into(),
        };
        let dead = broker.dlq_len(name).await?;
        write!(out, "{name:<width$}  {waiting:>8}")?;
        for (_, n) in &depths {
            write!(out, "  {n:>6}")?;
        }
        writeln!(out, "  {oldest:>8}  {dead:>6}")?;
    }
    writeln!(out, "scheduled (ETAs and retry delays): {}", broker.scheduled_len().await?)?;
    if unstamped {
        writeln!(out, "OLDEST ?: the oldest message has no send time (a Celery producer sent it)")?;
    }
    writeln!(out)?;

    let nodes: BTreeMap<&String, &Value> = stats.iter().collect();
    if nodes.is_empty() {
        writeln!(out, "no worker answered within {timeout:?}")?;
        return Ok(out);
    }
    let width = nodes.keys().map(|n| n.len()).max().unwrap_or(0).max(6);
    writeln!(
        out,
        "{:<width$}  {:>6}  {:>5}  {:>9}  QUEUES",
        "WORKER", "ACTIVE", "SLOTS", "PROCESSED"
    )?;
    for (node, stats) in nodes {
        let running = active.get(node).and_then(Value::as_array).map_or(0, Vec::len);
        let slots = stats["pool"]["max-concurrency"].as_u64().unwrap_or(0);
        let processed: u64 =
            stats["total"].as_object().into_iter().flatten().filter_map(|(_, n)| n.as_u64()).sum();
        let queues: Vec<&str> = consumed
            .get(node)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|q| q["name"].as_str())
            .collect();
        writeln!(
            out,
            "{node:<width$}  {running:>6}  {slots:>5}  {processed:>9}  {}",
            queues.join(",")
        )?;
    }
    Ok(out)
}

/// `42s`, `3m05s`, `2h04m`.
fn age_text(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.0}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(super::age_text(4.4), "4s");
        assert_eq!(super::age_text(185.0), "3m05s");
        assert_eq!(super::age_text(7440.0), "2h04m");
    }
}
