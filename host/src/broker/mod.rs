//! Brokers: where task messages wait, how a worker takes them with a lease, and how it settles
//! them. Two implementations share the same semantics and one conformance suite
//! (`tests/tests/broker.rs`): [`RedisBroker`], in kombu's layout so Python Celery workers and
//! celeriac share queues, and [`MemoryBroker`] (`memory://`), for `celeriac demo` and fast tests.

mod leases;
mod memory;
mod redis;

pub use self::leases::lease_of;
pub use self::memory::MemoryBroker;
pub use self::redis::{OWN_TAG, RedisBroker};

use crate::results::StoredResult;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// kombu's priority separator.
pub const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's priority steps; a priority rounds down to a step; on Redis 0 is served first.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// Longest queue name accepted, in bytes.
pub const MAX_QUEUE_NAME: usize = 200;

/// Checks that `name` can be a queue: non-empty, at most [`MAX_QUEUE_NAME`] bytes, no control
/// characters (kombu's priority separator and the scheduled set's newline among them), and not
/// one of the keys kombu, Celery's result backend or celeriac keep their own state in. A queue
/// name becomes a Redis key that messages are pushed onto, so a task choosing its child's queue
/// must never be able to name `unacked`, a binding, a result or a kv namespace.
pub fn check_queue_name(name: &str) -> Result<(), String> {
    /// Keys and key prefixes that belong to kombu, Celery's result backend or celeriac.
    const RESERVED_PREFIXES: &[&str] =
        &["celeriac:", "_kombu.", "celery-task-meta-", "celery-taskset-meta-", "chord-unlock"];
    const RESERVED: &[&str] = &["unacked", "unacked_index", "unacked_mutex"];
    if name.is_empty() {
        return Err("a queue name cannot be empty".into());
    }
    if name.len() > MAX_QUEUE_NAME {
        return Err(format!("queue name of {} bytes exceeds {MAX_QUEUE_NAME}", name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("queue name {name:?} contains control characters"));
    }
    if RESERVED.contains(&name) || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err(format!("{name:?} is a key of kombu, Celery or celeriac, not a queue"));
    }
    Ok(())
}

/// The list holding messages of `priority` for `queue` (without any key prefix).
pub fn priority_list(queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS.iter().rev().find(|s| **s <= priority.min(9)).copied().unwrap_or(0);
    if step == 0 { queue.to_string() } else { format!("{queue}{PRIORITY_SEP}{step}") }
}

/// Seconds since the Unix epoch, as a float (kombu's `unacked_index` scores).
pub fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    (now_secs() * 1000.0) as i64
}

/// A message taken from a queue, recorded as unacked under `tag`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Key in `unacked`; ack with it.
    pub tag: String,
    /// The queue it came from.
    pub queue: String,
    /// The envelope, untouched.
    pub payload: Vec<u8>,
}

/// What happens to other messages when a delivery is acked; applied in the same atomic step.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowUp {
    /// Put a message on a queue now.
    Publish {
        /// Queue.
        queue: String,
        /// Priority 0-9.
        priority: u8,
        /// Envelope JSON.
        envelope: String,
    },
    /// Park a message until `due_ms` (Unix milliseconds).
    Schedule {
        /// Queue.
        queue: String,
        /// Priority 0-9.
        priority: u8,
        /// Envelope JSON.
        envelope: String,
        /// When it is due.
        due_ms: i64,
    },
    /// Add a record to a queue's dead-letter list.
    DeadLetter {
        /// The queue the message came from.
        queue: String,
        /// The record JSON.
        record: String,
    },
}

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// kombu's `global_keyprefix`, put before every key and channel.
    pub global_prefix: String,
    /// How long a message of ours may go without a lease renewal before it is restored.
    pub lease: Duration,
    /// kombu's `visibility_timeout`: entries of other workers are restored only after this.
    pub visibility_timeout: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            global_prefix: String::new(),
            lease: Duration::from_secs(30),
            visibility_timeout: Duration::from_secs(3600),
        }
    }
}

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Redis refused or could not be reached.
    #[error(transparent)]
    Redis(#[from] ::redis::RedisError),
    /// The PostgreSQL result backend refused or could not be reached.
    #[error("PostgreSQL: {message}")]
    Database {
        /// What went wrong.
        message: String,
        /// Whether it may pass (a lost connection) rather than come again (a refused request).
        transient: bool,
    },
}

impl BrokerError {
    /// Whether the error says Redis is away or busy for now (connection lost, refused or timed
    /// out, loading, failing over), rather than that it refused this request: only these are
    /// worth retrying unchanged.
    pub fn is_transient(&self) -> bool {
        let e = match self {
            BrokerError::Redis(e) => e,
            BrokerError::Database { transient, .. } => return *transient,
        };
        use ::redis::ErrorKind::*;
        e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || matches!(e.kind(), BusyLoadingError | TryAgain | ClusterDown | MasterDown | ReadOnly)
    }
}

/// What a broker call returns.
pub type BrokerResult<T> = Result<T, BrokerError>;

/// The operations a worker and the client commands need from a broker. Every method that moves
/// a message does so atomically: a crash at any point leaves each message in exactly one place.
pub trait Broker: Clone + Send + Sync + 'static {
    /// Makes `queues` known to producers that route through the default exchange.
    fn declare(&self, queues: &[String]) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Takes up to `max` messages from `queues` (strictly in that order, each queue's priorities
    /// from most urgent), recording each as unacked with a lease. `tag_prefix` is unique per call.
    fn fetch(
        &self,
        queues: &[String],
        max: usize,
        tag_prefix: &str,
    ) -> impl Future<Output = BrokerResult<Vec<Delivery>>> + Send;

    /// Acks deliveries, each together with its follow-ups, in one atomic step: all of it is
    /// applied or, when a key it needs has the wrong type, none of it.
    fn settle(
        &self,
        batch: &[(&str, &[FollowUp])],
    ) -> impl Future<Output = BrokerResult<()>> + Send;

    /// The broker as Celery's `stats` reply describes it (`hostname`, `port`, `transport`, ...),
    /// with a `url` that never shows a password.
    fn describe(&self) -> serde_json::Value;

    /// Checks that the broker answers (a round trip that touches no data).
    fn ping(&self) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Names the connection the broker sends on `name`, and says whether it was a new one: a
    /// connection made again after Redis went away (or moved) has lost the name. One round trip
    /// that touches no data; the worker asks every maintenance round to count reconnects, which
    /// the connection's own retries would otherwise hide.
    fn mark_connection(&self, name: &str) -> impl Future<Output = BrokerResult<bool>> + Send;

    /// Applies follow-ups without an ack (producers: publish, schedule).
    fn send(&self, items: &[FollowUp]) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Extends the leases of running deliveries.
    fn renew(&self, tags: &[String]) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Ends the leases of `tags` now, so the next restore returns them to their queues.
    fn expire_leases(&self, tags: &[String]) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Returns deliveries whose lease ran out to the front of their queue, marked redelivered;
    /// `None` when another worker is restoring right now.
    fn restore_expired(&self) -> impl Future<Output = BrokerResult<Option<u64>>> + Send;

    /// Moves scheduled messages that are due onto their queues; returns how many.
    fn move_due(&self) -> impl Future<Output = BrokerResult<u64>> + Send;

    /// Admits the messages `ids` of `task`, in this order, through its global token bucket:
    /// for each, `None` when it may run now, else how long until its own slot. A message that
    /// must wait is given a slot of its own (the bucket goes below zero), so a backlog comes
    /// back once, spread out in order, and a message back at its slot runs without taking
    /// another token.
    fn take_tokens(
        &self,
        task: &str,
        per_second: f64,
        capacity: f64,
        ids: &[&str],
    ) -> impl Future<Output = BrokerResult<Vec<Option<Duration>>>> + Send;

    /// Revokes task ids for `ttl`; with `terminate` running ones are to be stopped too.
    fn revoke(
        &self,
        ids: &[String],
        ttl: Duration,
        terminate: bool,
    ) -> impl Future<Output = BrokerResult<()>> + Send;

    /// How many revocations are stored, expired ones first pruned: zero means no fetched
    /// message needs checking.
    fn revoked_count(&self) -> impl Future<Output = BrokerResult<u64>> + Send;

    /// Which of `ids` are revoked (and the revocation has not expired).
    fn revoked_among(&self, ids: &[&str]) -> impl Future<Output = BrokerResult<Vec<bool>>> + Send;

    /// Which of `ids` were revoked with terminate.
    fn terminating(&self, ids: &[&str]) -> impl Future<Output = BrokerResult<Vec<bool>>> + Send;

    /// Messages waiting on `queue` (all priorities).
    fn queue_len(&self, queue: &str) -> impl Future<Output = BrokerResult<u64>> + Send;

    /// Messages waiting in the scheduled set.
    fn scheduled_len(&self) -> impl Future<Output = BrokerResult<u64>> + Send;

    /// Dead letters of `queue`.
    fn dlq_len(&self, queue: &str) -> impl Future<Output = BrokerResult<u64>> + Send;

    /// Queues that have dead letters.
    fn dlq_queues(&self) -> impl Future<Output = BrokerResult<Vec<String>>> + Send;

    /// The dead-letter records of `queue`, newest first, at most `limit`.
    fn dlq_records(
        &self,
        queue: &str,
        limit: usize,
    ) -> impl Future<Output = BrokerResult<Vec<String>>> + Send;

    /// Removes one dead-letter record and, only if it was still there, puts `envelope` on
    /// `to_queue`, in one atomic step. Returns whether it moved.
    fn dlq_replay(
        &self,
        queue: &str,
        record: &str,
        to_queue: &str,
        priority: u8,
        envelope: &str,
    ) -> impl Future<Output = BrokerResult<bool>> + Send;

    /// Deletes the dead letters of `queue`; returns how many there were.
    fn dlq_purge(&self, queue: &str) -> impl Future<Output = BrokerResult<u64>> + Send;

    /// Answers Celery's remote control for worker `hostname` until dropped, if this broker
    /// carries it (Redis does; the memory broker has no remote clients), asking `node` what
    /// only the worker knows.
    fn serve_control(
        &self,
        hostname: String,
        revoke_ttl: Duration,
        node: std::sync::Arc<dyn crate::control::Node>,
    ) -> impl Future<Output = ()> + Send;

    /// Publishes a Celery event (`body`: one event object or a JSON list of them) on the
    /// `celeryev` fanout with `routing_key` (`worker.heartbeat`, `task.multi`), as kombu does,
    /// from node `hostname`. Returns how many listeners received it: events are at most once
    /// and nobody stores them. The memory broker has no listeners and returns 0.
    fn publish_event(
        &self,
        hostname: &str,
        routing_key: &str,
        body: &str,
    ) -> impl Future<Output = BrokerResult<u64>> + Send;
}

/// Where results go: Celery's result backend.
pub trait ResultStore: Clone + Send + Sync + 'static {
    /// Stores results (never overwriting a stored SUCCESS) and announces them.
    fn store(&self, results: &[&StoredResult]) -> impl Future<Output = BrokerResult<()>> + Send;
    /// A task's stored meta JSON; `None` while PENDING.
    fn get(&self, id: &str) -> impl Future<Output = BrokerResult<Option<String>>> + Send;
    /// Waits up to `timeout` for the task to be ready (SUCCESS, FAILURE or REVOKED); returns
    /// the meta stored then, which may still be unready when the time ran out. It may return
    /// early with an unready meta (a lost connection); callers loop.
    fn wait_ready(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = BrokerResult<Option<String>>> + Send;

    /// Records a chord header part in its chord's join, once per part however often it is
    /// recorded. When this part completes the chord, claims sending the body for it and returns
    /// the join's entries (`[1, id, state, result]`) in `group_index` order; otherwise (the
    /// chord still waits, another part claimed it, it is done) `None`. The claim is held in the
    /// part's own id, so the same part, run again after a crash before its ack, claims again.
    fn chord_join(
        &self,
        part: &crate::canvas::ChordPart,
    ) -> impl Future<Output = BrokerResult<Option<Vec<serde_json::Value>>>> + Send;

    /// Sets a chord's size before its header parts are sent (Celery's `set_chord_size`).
    fn chord_size(
        &self,
        group_id: &str,
        size: u64,
    ) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Marks a chord done after what completing it sent was acked with the part that claimed
    /// it: its join is deleted, and a late duplicate of a part finds it done.
    fn chord_done(
        &self,
        group_id: &str,
        claimer: &str,
    ) -> impl Future<Output = BrokerResult<()>> + Send;
}

#[cfg(test)]
mod tests {
    use super::{check_queue_name, priority_list};

    #[test]
    fn bookkeeping_keys_and_odd_names_are_not_queues() {
        for ok in ["celery", "default", "high-priority", "reports.daily", "a:b"] {
            assert_eq!(check_queue_name(ok), Ok(()), "{ok}");
        }
        let too_long = "q".repeat(super::MAX_QUEUE_NAME + 1);
        for bad in [
            "",
            "unacked",
            "unacked_index",
            "unacked_mutex",
            "_kombu.binding.celery",
            "celeriac:revoked",
            "celeriac:kv:index:k",
            "celery-task-meta-1234",
            "a\nb",
            "a\x06\x163",
            too_long.as_str(),
        ] {
            assert!(check_queue_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn priorities_round_down_to_kombu_steps() {
        assert_eq!(priority_list("celery", 0), "celery");
        assert_eq!(priority_list("celery", 2), "celery");
        assert_eq!(priority_list("celery", 5), "celery\x06\x163");
        assert_eq!(priority_list("celery", 6), "celery\x06\x166");
        assert_eq!(priority_list("celery", 42), "celery\x06\x169");
    }
}
