//! `memory://`: the broker and result backend inside the process, with the Redis broker's
//! semantics (FIFO lists per priority step, strict queue order, leases, restore, scheduled set,
//! revocations, token buckets, dead letters), for `celeriac demo` and fast tests. Everything is
//! lost when the process exits.

use super::{
    Broker, BrokerResult, Delivery, FollowUp, PRIORITY_STEPS, ResultStore, now_ms, now_secs,
    priority_list,
};
use crate::results::StoredResult;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// List key -> messages; new ones at the front (LPUSH), the oldest taken from the back.
    lists: HashMap<String, VecDeque<String>>,
    /// Tag -> (queue, envelope) of delivered, unacked messages.
    unacked: HashMap<String, (String, String)>,
    /// Tag -> lease deadline (Unix seconds).
    leases: HashMap<String, f64>,
    /// (due ms, sequence) -> (list key, envelope).
    scheduled: BTreeMap<(i64, u64), (String, String)>,
    sequence: u64,
    revoked: HashMap<String, f64>,
    terminate: HashMap<String, f64>,
    dlq: HashMap<String, VecDeque<String>>,
    /// Task -> (tokens, last refill ms).
    buckets: HashMap<String, (f64, i64)>,
    /// Per task: the slot (ms) reserved for each waiting message id.
    rate_slots: HashMap<String, HashMap<String, i64>>,
    results: HashMap<String, String>,
}

/// The in-process broker and result store. Cloning shares it.
#[derive(Clone)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
    lease: Duration,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").field("lease", &self.lease).finish()
    }
}

impl MemoryBroker {
    /// An empty broker whose leases last `lease`.
    pub fn new(lease: Duration) -> Self {
        MemoryBroker { state: Arc::default(), lease }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every operation leaves the state consistent before it can panic, so a poisoned lock
        // is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn apply(&mut self, f: &FollowUp) {
        match f {
            FollowUp::Publish { queue, priority, envelope } => {
                self.lists
                    .entry(priority_list(queue, *priority))
                    .or_default()
                    .push_front(envelope.clone());
            }
            FollowUp::Schedule { queue, priority, envelope, due_ms } => {
                self.sequence += 1;
                self.scheduled.insert(
                    (*due_ms, self.sequence),
                    (priority_list(queue, *priority), envelope.clone()),
                );
            }
            FollowUp::DeadLetter { queue, record } => {
                self.dlq.entry(queue.clone()).or_default().push_front(record.clone());
            }
        }
    }

    fn ack(&mut self, tag: &str) {
        self.unacked.remove(tag);
        self.leases.remove(tag);
    }
}

/// The envelope marked redelivered, and its priority, as the Redis restore script does.
fn redelivered(envelope: &str) -> (String, u8) {
    match serde_json::from_str::<Value>(envelope) {
        Ok(mut env) => {
            if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
                h.insert("redelivered".into(), Value::Bool(true));
            }
            let priority = env["properties"]["priority"].as_u64().unwrap_or(0).min(9) as u8;
            if let Some(info) =
                env.pointer_mut("/properties/delivery_info").and_then(Value::as_object_mut)
            {
                info.insert("redelivered".into(), Value::Bool(true));
            }
            (env.to_string(), priority)
        }
        Err(_) => (envelope.to_string(), 0),
    }
}

impl Broker for MemoryBroker {
    async fn declare(&self, _queues: &[String]) -> BrokerResult<()> {
        Ok(())
    }

    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        tag_prefix: &str,
    ) -> BrokerResult<Vec<Delivery>> {
        let mut st = self.lock();
        let deadline = now_secs() + self.lease.as_secs_f64();
        let mut out = Vec::new();
        'queues: for q in queues {
            for step in PRIORITY_STEPS {
                while out.len() < max {
                    let Some(m) =
                        st.lists.get_mut(&priority_list(q, step)).and_then(VecDeque::pop_back)
                    else {
                        break;
                    };
                    let tag = format!("{tag_prefix}{}", out.len() + 1);
                    st.unacked.insert(tag.clone(), (q.clone(), m.clone()));
                    st.leases.insert(tag.clone(), deadline);
                    out.push(Delivery { tag, queue: q.clone(), payload: m.into_bytes() });
                }
                if out.len() >= max {
                    break 'queues;
                }
            }
        }
        Ok(out)
    }

    async fn settle(&self, batch: &[(&str, &[FollowUp])]) -> BrokerResult<()> {
        let mut st = self.lock();
        for (tag, follow_ups) in batch {
            for f in *follow_ups {
                st.apply(f);
            }
            st.ack(tag);
        }
        Ok(())
    }

    async fn ping(&self) -> BrokerResult<()> {
        Ok(())
    }

    async fn mark_connection(&self, _name: &str) -> BrokerResult<bool> {
        // In memory there is no connection to lose.
        Ok(false)
    }

    async fn send(&self, items: &[FollowUp]) -> BrokerResult<()> {
        let mut st = self.lock();
        items.iter().for_each(|f| st.apply(f));
        Ok(())
    }

    async fn renew(&self, tags: &[String]) -> BrokerResult<()> {
        let mut st = self.lock();
        let deadline = now_secs() + self.lease.as_secs_f64();
        for t in tags {
            if let Some(lease) = st.leases.get_mut(t) {
                *lease = deadline;
            }
        }
        Ok(())
    }

    async fn expire_leases(&self, tags: &[String]) -> BrokerResult<()> {
        let mut st = self.lock();
        for t in tags {
            if let Some(lease) = st.leases.get_mut(t) {
                *lease = 0.0;
            }
        }
        Ok(())
    }

    async fn restore_expired(&self) -> BrokerResult<Option<u64>> {
        let mut st = self.lock();
        let now = now_secs();
        let expired: Vec<String> =
            st.leases.iter().filter(|(_, d)| **d <= now).map(|(t, _)| t.clone()).collect();
        let mut restored = 0;
        for tag in expired {
            st.leases.remove(&tag);
            if let Some((queue, envelope)) = st.unacked.remove(&tag) {
                let (envelope, priority) = redelivered(&envelope);
                // To the back: served next, as kombu's RPUSH.
                st.lists.entry(priority_list(&queue, priority)).or_default().push_back(envelope);
                restored += 1;
            }
        }
        Ok(Some(restored))
    }

    async fn move_due(&self) -> BrokerResult<u64> {
        let mut st = self.lock();
        let now = now_ms();
        let due: Vec<(i64, u64)> =
            st.scheduled.range(..=(now, u64::MAX)).map(|(k, _)| *k).collect();
        for key in &due {
            if let Some((list, envelope)) = st.scheduled.remove(key) {
                st.lists.entry(list).or_default().push_back(envelope);
            }
        }
        Ok(due.len() as u64)
    }

    async fn take_tokens(
        &self,
        task: &str,
        per_second: f64,
        capacity: f64,
        ids: &[&str],
    ) -> BrokerResult<Vec<Option<Duration>>> {
        let mut st = self.lock();
        let now = now_ms();
        let (tokens, at) = st.buckets.get(task).copied().unwrap_or((capacity, now));
        let mut tokens = (tokens + (now - at).max(0) as f64 * per_second / 1000.0).min(capacity);
        let slots = st.rate_slots.entry(task.to_string()).or_default();
        let mut waits = Vec::with_capacity(ids.len());
        for id in ids {
            let wait = match slots.get(*id).copied() {
                Some(slot) if slot > now => Some(slot - now),
                Some(_) => {
                    slots.remove(*id);
                    None
                }
                None => {
                    tokens -= 1.0;
                    (tokens < 0.0).then(|| {
                        let wait = (-tokens * 1000.0 / per_second).ceil() as i64;
                        slots.insert(id.to_string(), now + wait);
                        wait
                    })
                }
            };
            waits.push(wait.map(|w| Duration::from_millis(w as u64)));
        }
        slots.retain(|_, slot| *slot > now - 3_600_000);
        st.buckets.insert(task.to_string(), (tokens, now.max(at)));
        Ok(waits)
    }

    async fn revoke(&self, ids: &[String], ttl: Duration, terminate: bool) -> BrokerResult<()> {
        let mut st = self.lock();
        let expires = now_secs() + ttl.as_secs_f64();
        for id in ids {
            st.revoked.insert(id.clone(), expires);
            if terminate {
                st.terminate.insert(id.clone(), expires);
            }
        }
        let now = now_secs();
        st.revoked.retain(|_, e| *e > now);
        st.terminate.retain(|_, e| *e > now);
        Ok(())
    }

    async fn revoked_count(&self) -> BrokerResult<u64> {
        let now = now_secs();
        let mut st = self.lock();
        st.revoked.retain(|_, e| *e > now);
        Ok(st.revoked.len() as u64)
    }

    async fn revoked_among(&self, ids: &[&str]) -> BrokerResult<Vec<bool>> {
        Ok(flagged(&self.lock().revoked, ids))
    }

    async fn terminating(&self, ids: &[&str]) -> BrokerResult<Vec<bool>> {
        Ok(flagged(&self.lock().terminate, ids))
    }

    async fn queue_len(&self, queue: &str) -> BrokerResult<u64> {
        let st = self.lock();
        Ok(PRIORITY_STEPS
            .iter()
            .map(|s| st.lists.get(&priority_list(queue, *s)).map_or(0, VecDeque::len) as u64)
            .sum())
    }

    async fn scheduled_len(&self) -> BrokerResult<u64> {
        Ok(self.lock().scheduled.len() as u64)
    }

    async fn dlq_len(&self, queue: &str) -> BrokerResult<u64> {
        Ok(self.lock().dlq.get(queue).map_or(0, |l| l.len() as u64))
    }

    async fn dlq_queues(&self) -> BrokerResult<Vec<String>> {
        let mut q: Vec<String> =
            self.lock().dlq.iter().filter(|(_, l)| !l.is_empty()).map(|(q, _)| q.clone()).collect();
        q.sort();
        Ok(q)
    }

    async fn dlq_records(&self, queue: &str, limit: usize) -> BrokerResult<Vec<String>> {
        Ok(self
            .lock()
            .dlq
            .get(queue)
            .map(|l| l.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn dlq_replay(
        &self,
        queue: &str,
        record: &str,
        to_queue: &str,
        priority: u8,
        envelope: &str,
    ) -> BrokerResult<bool> {
        let mut st = self.lock();
        let Some(list) = st.dlq.get_mut(queue) else { return Ok(false) };
        let Some(pos) = list.iter().position(|r| r == record) else { return Ok(false) };
        list.remove(pos);
        st.lists
            .entry(priority_list(to_queue, priority))
            .or_default()
            .push_front(envelope.to_string());
        Ok(true)
    }

    async fn dlq_purge(&self, queue: &str) -> BrokerResult<u64> {
        Ok(self.lock().dlq.remove(queue).map_or(0, |l| l.len() as u64))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"transport": "memory", "hostname": "localhost", "url": "memory://"})
    }

    async fn serve_control(
        &self,
        _hostname: String,
        _revoke_ttl: Duration,
        _node: std::sync::Arc<dyn crate::control::Node>,
    ) {
        // No remote clients can reach an in-process broker; revocations go through `revoke`.
        std::future::pending::<()>().await
    }

    async fn publish_event(&self, _hostname: &str, _key: &str, _body: &str) -> BrokerResult<u64> {
        Ok(0)
    }
}

impl ResultStore for MemoryBroker {
    async fn store(&self, results: &[&StoredResult]) -> BrokerResult<()> {
        let mut st = self.lock();
        for r in results {
            let done = st.results.get(&r.id).is_some_and(|m| {
                crate::results::status_of(m).as_deref() == Some(crate::protocol::states::SUCCESS)
            });
            if !done {
                st.results.insert(r.id.clone(), r.meta.clone());
            }
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> BrokerResult<Option<String>> {
        Ok(self.lock().results.get(id).cloned())
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> BrokerResult<Option<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.get(id).await?;
            if current.as_deref().is_some_and(crate::results::is_ready)
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(current);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Chords are joined in the Redis result backend, where Celery's client sets their size;
    /// nothing can set it in an in-process broker, so a chord part here says so.
    async fn chord_join(
        &self,
        part: &crate::canvas::ChordPart,
    ) -> BrokerResult<Option<Vec<serde_json::Value>>> {
        tracing::warn!(
            group = %crate::runtime::printable(&part.group_id),
            "the in-memory broker does not join chords: this chord's body will not run"
        );
        Ok(None)
    }

    async fn chord_size(&self, _group_id: &str, _size: u64) -> BrokerResult<()> {
        Ok(())
    }

    async fn chord_done(&self, _group_id: &str, _claimer: &str) -> BrokerResult<()> {
        Ok(())
    }
}

/// Which of `ids` are in `set` with an expiry still ahead.
fn flagged(set: &HashMap<String, f64>, ids: &[&str]) -> Vec<bool> {
    let now = now_secs();
    ids.iter().map(|id| set.get(*id).is_some_and(|e| *e > now)).collect()
}
