//! celeriac beat: periodic tasks with any number of beats running and exactly one fire per tick.
//!
//! - **Entries** live in `celeriac.toml` under `[beat."name"]` ([`EntrySpec`]): a task, its
//!   args, a schedule ([`schedule`]), a missed-run policy and a starting deadline.
//! - **One leader.** Beats share a lease in Redis (`celeriac:beat:leader`), taken with a fresh
//!   fencing epoch (`INCR celeriac:beat:epoch`) and renewed at every tick, well inside its TTL.
//!   Only the leader fires; a standby takes over when the lease runs out.
//! - **One fire per tick.** A fire is one Lua script that re-checks the leader's token, claims
//!   `celeriac:beat:fired:<entry>:<tick>` (SET NX), pushes the message and records the entry's
//!   last tick and count. A leader that lost its lease, a failover mid-tick and clock skew
//!   between beats therefore never fire a tick twice; and the message's task id is derived from
//!   (entry, tick), so even a copy would land on the same result.
//! - **State in Redis** (`celeriac:beat:last`, `celeriac:beat:count`): a restart neither skips
//!   nor repeats; after downtime the entry's policy decides what the missed ticks become.

pub mod schedule;

use crate::broker::{RedisBroker, priority_list};
use crate::endpoint::Conn;
use crate::protocol::{self, NewTask};
use crate::units::HumanDuration;
use chrono::{DateTime, TimeZone as _, Utc};
pub use schedule::{Schedule, ScheduleError};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long the leader's lease lasts without a renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a beat looks at its entries (and the leader renews its lease).
pub const TICK_EVERY: Duration = Duration::from_secs(1);
/// How late a tick may be and still count as on time for the `skip` policy.
pub const ON_TIME: Duration = Duration::from_secs(5);
/// Most missed ticks `catch_up` sends when an entry names no cap.
pub const DEFAULT_MAX_CATCH_UP: u32 = 10;

/// What becomes of ticks missed while no beat ran (or the leader changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Missed ticks are dropped; only a tick caught on time fires.
    Skip,
    /// Missed ticks fire once, as the newest of them (Celery beat's behaviour).
    #[default]
    Coalesce,
    /// Every missed tick fires, oldest first, at most `max_catch_up` of the newest.
    CatchUp,
}

/// An entry as written in `[beat."name"]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// The task name.
    pub task: String,
    /// Positional args.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword args.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Queue; else the task's routed queue.
    pub queue: Option<String>,
    /// Priority 0-9.
    pub priority: Option<u8>,
    /// How long after its tick a fire may still run; it is revoked after that.
    pub expires: Option<HumanDuration>,
    /// A 5-field crontab, Celery's meaning.
    pub cron: Option<String>,
    /// A fixed period.
    pub every: Option<HumanDuration>,
    /// The crontab's zone (`Europe/Berlin`); UTC when unset.
    pub timezone: Option<String>,
    /// Missed-run policy.
    #[serde(default)]
    pub missed: Missed,
    /// For `catch_up`: most missed ticks sent.
    pub max_catch_up: Option<u32>,
    /// A tick later than this is not fired at all, whatever the policy.
    pub starting_deadline: Option<HumanDuration>,
}

/// A checked entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name, the key of its state.
    pub name: String,
    /// The task.
    pub task: String,
    /// Positional args.
    pub args: Value,
    /// Keyword args.
    pub kwargs: Value,
    /// The queue it is sent to.
    pub queue: String,
    /// Priority 0-9.
    pub priority: u8,
    /// Expiry after its tick.
    pub expires: Option<Duration>,
    /// When it is due.
    pub schedule: Schedule,
    /// Missed-run policy.
    pub missed: Missed,
    /// Cap for `catch_up`.
    pub max_catch_up: u32,
    /// Latest a tick may fire.
    pub starting_deadline: Option<Duration>,
}

impl Entry {
    /// Checks `spec`; `route` gives the queue of a task whose entry names none.
    pub fn new(
        name: &str,
        spec: &EntrySpec,
        route: impl Fn(&str) -> String,
    ) -> Result<Entry, String> {
        let bad = |why: String| format!("beat entry {name:?}: {why}");
        if name.is_empty() || name.chars().any(|c| c.is_control() || c == ':') {
            return Err(bad("a name must be non-empty, without ':' or control characters".into()));
        }
        let tz: chrono_tz::Tz = match &spec.timezone {
            None => chrono_tz::UTC,
            Some(z) => z.parse().map_err(|_| bad(format!("unknown timezone {z:?}")))?,
        };
        let schedule = match (&spec.cron, &spec.every) {
            (Some(cron), None) => Schedule::cron(cron, tz),
            (None, Some(every)) if spec.timezone.is_none() => Schedule::every(every.0),
            (None, Some(_)) => return Err(bad("`timezone` applies to `cron` only".into())),
            _ => return Err(bad("set exactly one of `cron` and `every`".into())),
        }
        .map_err(|e| bad(e.0))?;
        if spec.priority.is_some_and(|p| p > 9) {
            return Err(bad("priority must be 0-9".into()));
        }
        if spec.max_catch_up.is_some() && spec.missed != Missed::CatchUp {
            return Err(bad("`max_catch_up` applies to `missed = \"catch_up\"` only".into()));
        }
        let queue = match &spec.queue {
            Some(q) => {
                crate::broker::check_queue_name(q).map_err(bad)?;
                q.clone()
            }
            None => route(&spec.task),
        };
        Ok(Entry {
            name: name.to_string(),
            task: spec.task.clone(),
            args: Value::Array(spec.args.clone()),
            kwargs: Value::Object(spec.kwargs.clone()),
            queue,
            priority: spec.priority.unwrap_or(0),
            expires: spec.expires.map(|e| e.0),
            schedule,
            missed: spec.missed,
            max_catch_up: spec.max_catch_up.unwrap_or(DEFAULT_MAX_CATCH_UP).max(1),
            starting_deadline: spec.starting_deadline.map(|d| d.0),
        })
    }

    /// What is due at `now` when the entry last ticked at `last`: the ticks to fire (oldest
    /// first) and the tick to record as its last. A new entry starts from `now`, firing nothing
    /// from before it existed.
    pub fn plan(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Plan {
        let Some(last) = last else { return Plan { fire: Vec::new(), last: now } };
        let limit = match self.missed {
            Missed::CatchUp => self.max_catch_up as usize,
            Missed::Skip | Missed::Coalesce => 1,
        };
        let ticks = self.schedule.ticks(last, now, limit);
        let Some(newest) = ticks.last().copied() else { return Plan { fire: Vec::new(), last } };
        let late = |t: &DateTime<Utc>, by: Duration| (now - *t).to_std().unwrap_or_default() > by;
        let fire = ticks
            .into_iter()
            .filter(|t| !self.starting_deadline.is_some_and(|d| late(t, d)))
            .filter(|t| {
                self.missed != Missed::Skip || !late(t, self.starting_deadline.unwrap_or(ON_TIME))
            })
            .collect();
        Plan { fire, last: newest }
    }

    /// The task id of the fire at `tick`: the same for every beat, so a copy of a fire would
    /// land on the same result.
    pub fn task_id(&self, tick: DateTime<Utc>) -> String {
        let name = format!("celeriac-beat\0{}\0{}", self.name, tick.timestamp_millis());
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
    }

    /// The message of the fire at `tick`.
    pub fn message(&self, tick: DateTime<Utc>) -> String {
        let expires = self.expires.and_then(|e| {
            chrono::TimeDelta::from_std(e).ok().and_then(|e| tick.checked_add_signed(e))
        });
        let opts = NewTask {
            id: Some(self.task_id(tick)),
            priority: Some(self.priority),
            expires,
            ..NewTask::default()
        };
        protocol::encode(&self.task, &self.args, &self.kwargs, &self.queue, &opts).1
    }

    /// How long a fire's claim is kept: well past the time another beat could still see the
    /// tick as due (two periods, at least an hour).
    fn claim_ttl(&self, tick: DateTime<Utc>) -> u64 {
        let period = self
            .schedule
            .next_after(tick)
            .and_then(|n| (n - tick).to_std().ok())
            .unwrap_or(Duration::from_secs(3600));
        (period * 2).as_secs().max(3600)
    }
}

/// What one look at an entry decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Ticks to fire, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// The tick recorded as the entry's last.
    pub last: DateTime<Utc>,
}

/// Takes or renews the lease. KEYS: leader, epoch. ARGV: our token (empty when we hold none),
/// node name, TTL ms. Returns `{1, token}` to the leader (a new token, with a new epoch, when
/// it just took the lease) and `{0, holder}` to the others.
const LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder and ARGV[1] ~= '' and holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, holder}
end
if holder then return {0, holder} end
local epoch = redis.call('INCR', KEYS[2])
local token = ARGV[2] .. '#' .. epoch
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
return {1, token}
"#;

/// Fires one tick, or only records one. KEYS: leader, fired claim, last hash, count hash,
/// queue list. ARGV: leader token, entry, last tick ms, message ('' records only), claim TTL s.
/// Returns -1 when the caller no longer leads, 1 when it fired, 0 when the tick had fired.
const FIRE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local fired = 0
if ARGV[4] ~= '' and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[5]) then
  redis.call('LPUSH', KEYS[5], ARGV[4])
  redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
  fired = 1
end
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0') or 0
if tonumber(ARGV[3]) > last then redis.call('HSET', KEYS[3], ARGV[2], ARGV[3]) end
return fired
"#;

/// Gives the lease up if it is still ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// One beat.
pub struct Beat {
    conn: Conn,
    broker: RedisBroker,
    node: String,
    entries: Vec<Entry>,
    lease_ttl: Duration,
    /// Our lease token while we lead.
    token: Option<String>,
    lease: redis::Script,
    fire: redis::Script,
    pulse: std::sync::Arc<Pulse>,
    /// New entries from a configuration reload, taken before the next tick.
    updates: Option<tokio::sync::watch::Receiver<Vec<Entry>>>,
}

/// How a running beat fares, for systemd's status line and watchdog.
#[derive(Debug, Default)]
pub struct Pulse {
    /// When a tick last reached Redis, in ms since the Unix epoch (0: never).
    pub ok_ms: std::sync::atomic::AtomicI64,
    /// Whether that tick led.
    pub leader: std::sync::atomic::AtomicBool,
    /// Entries fired since start.
    pub fired: std::sync::atomic::AtomicU64,
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    /// Whether this beat led during the tick.
    pub leader: bool,
    /// Entries fired, with their ticks.
    pub fired: Vec<(String, DateTime<Utc>)>,
}

impl Beat {
    /// A beat named `node` (`celeriac@host`, with a pid to tell beats apart) over `entries`.
    pub fn new(broker: RedisBroker, node: &str, entries: Vec<Entry>, lease_ttl: Duration) -> Beat {
        Beat {
            conn: broker.conn(),
            broker,
            node: node.to_string(),
            entries,
            lease_ttl,
            token: None,
            lease: redis::Script::new(LEASE),
            fire: redis::Script::new(FIRE),
            pulse: Default::default(),
            updates: None,
        }
    }

    /// Takes the entries `updates` holds whenever they change (a reloaded configuration),
    /// from the next tick on. An entry keeps its last tick under its name, so a changed
    /// schedule goes on from where the old one was.
    pub fn follow(&mut self, updates: tokio::sync::watch::Receiver<Vec<Entry>>) {
        self.updates = Some(updates);
    }

    /// How this beat fares once it runs.
    pub fn pulse(&self) -> std::sync::Arc<Pulse> {
        self.pulse.clone()
    }

    fn key(&self, name: &str) -> String {
        self.broker.own(&format!("beat:{name}"))
    }

    /// Looks at every entry at `now` (the beat's clock, which tests drive) and fires what is
    /// due, if this beat leads.
    pub async fn tick(&mut self, now: DateTime<Utc>) -> crate::broker::BrokerResult<TickReport> {
        let mut report = TickReport::default();
        let (leads, token): (i64, String) = self
            .lease
            .key(self.key("leader"))
            .key(self.key("epoch"))
            .arg(self.token.as_deref().unwrap_or(""))
            .arg(&self.node)
            .arg(self.lease_ttl.as_millis() as u64)
            .invoke_async(&mut self.conn)
            .await?;
        if leads != 1 {
            if self.token.take().is_some() {
                warn!(holder = %token, "beat lost its lease; standing by");
            }
            return Ok(report);
        }
        if self.token.as_deref() != Some(&token) {
            info!(token = %token, "beat leads");
            self.token = Some(token.clone());
        }
        report.leader = true;
        let last: HashMap<String, i64> =
            redis::cmd("HGETALL").arg(self.key("last")).query_async(&mut self.conn).await?;
        for entry in &self.entries {
            let last = last.get(&entry.name).and_then(|ms| Utc.timestamp_millis_opt(*ms).single());
            let plan = entry.plan(last, now);
            let mut steps: Vec<(DateTime<Utc>, String)> =
                plan.fire.iter().map(|t| (*t, entry.message(*t))).collect();
            if steps.is_empty() && Some(plan.last) != last {
                steps.push((plan.last, String::new()));
            }
            for (tick, message) in steps {
                let fired: i64 = self
                    .fire
                    .key(self.key("leader"))
                    .key(self.key(&format!("fired:{}:{}", entry.name, tick.timestamp_millis())))
                    .key(self.key("last"))
                    .key(self.key("count"))
                    .key(self.broker.key(&priority_list(&entry.queue, entry.priority)))
                    .arg(&token)
                    .arg(&entry.name)
                    .arg(tick.max(plan.last).timestamp_millis())
                    .arg(&message)
                    .arg(entry.claim_ttl(tick))
                    .invoke_async(&mut self.conn)
                    .await?;
                match fired {
                    -1 => {
                        warn!("beat lost its lease mid-tick; standing by");
                        self.token = None;
                        report.leader = false;
                        return Ok(report);
                    }
                    1 => {
                        info!(entry = %entry.name, task = %entry.task, %tick, "beat fired");
                        report.fired.push((entry.name.clone(), tick));
                    }
                    _ => {}
                }
            }
        }
        Ok(report)
    }

    /// Ticks every [`TICK_EVERY`] on the system clock until `stop`, then gives up the lease so
    /// a standby takes over at once.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut every = tokio::time::interval(TICK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => {}
            }
            if let Some(updates) = &mut self.updates
                && updates.has_changed().unwrap_or(false)
            {
                self.entries = updates.borrow_and_update().clone();
                info!(entries = self.entries.len(), "beat entries reloaded");
            }
            match self.tick(Utc::now()).await {
                Ok(report) => {
                    use std::sync::atomic::Ordering::Relaxed;
                    failing = false;
                    self.pulse.ok_ms.store(Utc::now().timestamp_millis(), Relaxed);
                    self.pulse.leader.store(report.leader, Relaxed);
                    self.pulse.fired.fetch_add(report.fired.len() as u64, Relaxed);
                }
                Err(e) if !failing => {
                    failing = true;
                    warn!("beat cannot reach Redis; retrying every second: {e}");
                }
                Err(_) => {}
            }
        }
        if let Some(token) = self.token.take() {
            let released: redis::RedisResult<i64> = redis::Script::new(RELEASE)
                .key(self.key("leader"))
                .arg(token)
                .invoke_async(&mut self.conn)
                .await;
            if let Err(e) = released {
                warn!(
                    "beat could not give up its lease (it runs out in {:?}): {e}",
                    self.lease_ttl
                );
            }
        }
    }
}

/// What `celeriac beat status` shows.
pub async fn status(broker: &RedisBroker, entries: &[Entry]) -> crate::broker::BrokerResult<Value> {
    let mut conn = broker.conn();
    let key = |name: &str| broker.own(&format!("beat:{name}"));
    let leader: Option<String> =
        redis::cmd("GET").arg(key("leader")).query_async(&mut conn).await?;
    let epoch: Option<u64> = redis::cmd("GET").arg(key("epoch")).query_async(&mut conn).await?;
    let last: HashMap<String, i64> =
        redis::cmd("HGETALL").arg(key("last")).query_async(&mut conn).await?;
    let count: HashMap<String, u64> =
        redis::cmd("HGETALL").arg(key("count")).query_async(&mut conn).await?;
    let now = Utc::now();
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let last = last.get(&e.name).and_then(|ms| Utc.timestamp_millis_opt(*ms).single());
            serde_json::json!({
                "name": e.name,
                "task": e.task,
                "queue": e.queue,
                "schedule": e.schedule.describe(),
                "missed": e.missed,
                "last_tick": last.map(protocol::format_time),
                "next_due": e.schedule.next_after(last.unwrap_or(now).max(now)).map(protocol::format_time),
                "fired": count.get(&e.name).copied().unwrap_or(0),
            })
        })
        .collect();
    Ok(serde_json::json!({"leader": leader, "epoch": epoch, "entries": list}))
}

impl serde::Serialize for Missed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Missed::Skip => "skip",
            Missed::Coalesce => "coalesce",
            Missed::CatchUp => "catch_up",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(toml_text: &str) -> Result<Entry, String> {
        let spec: EntrySpec = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Entry::new("e", &spec, |_| "celery".to_string())
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn three_ticks_of_downtime_become_what_the_policy_says() {
        let last = Some(at("2026-11-23T10:00:00Z"));
        // Down from 10:00 to 10:03:30: ticks 10:01, 10:02 and 10:03 were missed.
        let now = at("2026-11-23T10:03:30Z");
        let plan = |missed: &str| {
            entry(&format!("task = \"t\"\nevery = \"1m\"\n{missed}")).unwrap().plan(last, now)
        };
        let coalesce = plan("");
        assert_eq!(coalesce.fire, [at("2026-11-23T10:03:00Z")]);
        assert_eq!(coalesce.last, at("2026-11-23T10:03:00Z"));
        let skip = plan("missed = \"skip\"");
        assert!(skip.fire.is_empty(), "30 s late is not on time");
        assert_eq!(skip.last, at("2026-11-23T10:03:00Z"), "the missed ticks are passed over");
        let catch_up = plan("missed = \"catch_up\"");
        assert_eq!(catch_up.fire.len(), 3);
        let capped = plan("missed = \"catch_up\"\nmax_catch_up = 2");
        assert_eq!(capped.fire, [at("2026-11-23T10:02:00Z"), at("2026-11-23T10:03:00Z")]);
        let deadline = plan("missed = \"catch_up\"\nstarting_deadline = \"100s\"");
        assert_eq!(deadline.fire, [at("2026-11-23T10:02:00Z"), at("2026-11-23T10:03:00Z")]);
        // On time, skip fires too; a new entry fires nothing from before it existed.
        let on_time = entry("task = \"t\"\nevery = \"1m\"\nmissed = \"skip\"").unwrap();
        assert_eq!(on_time.plan(last, at("2026-11-23T10:01:01Z")).fire.len(), 1);
        assert!(on_time.plan(None, now).fire.is_empty());
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let err = |t: &str| entry(t).unwrap_err();
        assert!(err("task = \"t\"").contains("exactly one of `cron` and `every`"));
        assert!(err("task = \"t\"\ncron = \"* * * * *\"\nevery = \"1m\"").contains("exactly one"));
        assert!(
            err("task = \"t\"\ncron = \"* * * * *\"\ntimezone = \"Mars/Base\"")
                .contains("Mars/Base")
        );
        assert!(err("task = \"t\"\nevery = \"1m\"\nmax_catch_up = 3").contains("catch_up"));
        assert!(err("task = \"t\"\nevery = \"1m\"\nbogus = 1").contains("bogus"));
    }

    #[test]
    fn a_fire_has_the_same_id_on_every_beat() {
        let e = entry("task = \"t\"\nevery = \"1m\"").unwrap();
        let tick = at("2026-11-23T10:03:00Z");
        assert_eq!(e.task_id(tick), e.task_id(tick));
        assert_ne!(e.task_id(tick), e.task_id(at("2026-11-23T10:04:00Z")));
        let msg = protocol::decode(e.message(tick).as_bytes()).unwrap();
        assert_eq!(msg.id, e.task_id(tick));
    }
}
