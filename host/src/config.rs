//! The configuration file (`celeriac.toml`) and how each task's settings are resolved.
//!
//! Settings for a task come, from weakest to strongest, from: celeriac's built-in defaults, the
//! file's `[defaults]` table, the component's own `describe` (the task author knows the task),
//! the file's `[tasks."name"]` table (the operator has the last word on a deployment), and
//! finally command-line flags. The whole file is parsed and checked before anything runs; every
//! problem is reported at once, naming the file, the key and what is wrong.

use crate::endpoint::{Endpoint, TransportOptions};
use crate::runtime::{Grants, Limits, Outcome, Preopen, TaskInfo};
use crate::units::{ByteSize, HumanDuration};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file `celeriac` looks for in the working folder when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "celeriac.toml";

/// The broker and result backend when neither file nor environment names one (Celery's default).
pub const DEFAULT_REDIS_URL: &str = "redis://localhost:6379/0";

/// Outcome kinds a retry policy may name in `retry_on`.
pub const RETRYABLE_KINDS: &[&str] = &[
    "retry",
    "failure",
    "soft_time_limit",
    "hard_time_limit",
    "out_of_fuel",
    "memory_limit",
    "trap",
    "host_error",
];

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Folder of task components (`*.wasm`).
    pub modules: Option<PathBuf>,
    /// Folder for compiled components.
    pub cache: Option<PathBuf>,
    /// Broker URL, e.g. `redis://localhost:6379/0` or `memory://`, or a `[broker]` table with
    /// `url` and `transport_options`.
    pub broker: Option<EndpointSpec>,
    /// Result backend URL, or a table as for the broker.
    pub result_backend: Option<EndpointSpec>,
    /// Settings for every task.
    #[serde(default)]
    pub defaults: TaskSettings,
    /// Settings for single tasks, by name.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskSettings>,
    /// Routing rules: the first whose glob matches a task name sets its queue (below a queue
    /// set in the task's own table).
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Periodic tasks, by entry name (`[beat."cleanup-hourly"]`).
    #[serde(default)]
    pub beat: BTreeMap<String, crate::beat::EntrySpec>,
}

/// A broker or result backend as the file gives it: a URL, or a table with kombu's transport
/// options beside it (`[broker] url = "sentinel://..."` + `[broker.transport_options]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EndpointSpec {
    /// Just the URL.
    Url(String),
    /// The URL (or none, when the environment gives it) and transport options.
    Table(EndpointTable),
}

/// The table form of [`EndpointSpec`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointTable {
    /// The URL.
    pub url: Option<String>,
    /// kombu's `broker_transport_options` / `result_backend_transport_options`.
    #[serde(default)]
    pub transport_options: TransportOptions,
    /// Results in PostgreSQL: how the `result` column is encoded (`pickle`, the default, or
    /// `json`).
    pub serializer: Option<crate::results::Serializer>,
    /// Results in PostgreSQL: add and fill Celery's extended columns (`result_extended`).
    pub extended: Option<bool>,
}

impl EndpointSpec {
    fn split(self) -> (Option<String>, Option<TransportOptions>, DatabaseOptions) {
        match self {
            EndpointSpec::Url(url) => (Some(url), None, DatabaseOptions::default()),
            EndpointSpec::Table(t) => (
                t.url,
                Some(t.transport_options),
                DatabaseOptions { serializer: t.serializer, extended: t.extended },
            ),
        }
    }
}

/// The settings of a `db+postgresql://` result backend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatabaseOptions {
    /// How the `result` column is encoded.
    pub serializer: Option<crate::results::Serializer>,
    /// Celery's extended columns.
    pub extended: Option<bool>,
}

/// The queue the first rule of `routes` that matches `name` gives it.
pub fn route<'a>(routes: &'a [Route], name: &str) -> Option<&'a str> {
    routes.iter().find(|r| crate::runtime::glob_match(&r.task, name)).map(|r| r.queue.as_str())
}

/// A routing rule, e.g. `{ task = "indexing.*", queue = "indexing" }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Task-name glob (`*` matches any run of characters).
    pub task: String,
    /// The queue.
    pub queue: String,
}

/// Settings one task may have; every field is optional so tables can be layered.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSettings {
    /// The module (file stem) that must serve this task, when several could.
    pub module: Option<String>,
    /// The queue the task is routed to.
    pub queue: Option<String>,
    /// After this `cancelled()` turns true and host calls fail.
    pub soft_time_limit: Option<HumanDuration>,
    /// After this the instance is stopped.
    pub hard_time_limit: Option<HumanDuration>,
    /// Cap on linear memory.
    pub memory: Option<ByteSize>,
    /// Fuel budget per run.
    pub fuel: Option<u64>,
    /// Largest result.
    pub max_result: Option<ByteSize>,
    /// Retries before a task is dead-lettered.
    pub max_retries: Option<u32>,
    /// Delay before the first retry.
    pub retry_backoff: Option<HumanDuration>,
    /// Cap on the retry delay.
    pub retry_backoff_max: Option<HumanDuration>,
    /// Randomise retry delays (full jitter) so failed tasks do not return in lockstep.
    pub retry_jitter: Option<bool>,
    /// Outcome kinds that are retried (see [`RETRYABLE_KINDS`]).
    pub retry_on: Option<Vec<String>>,
    /// Global rate limit such as `10/s`.
    pub rate_limit: Option<RateLimit>,
    /// Grant: guest log lines reach the host log.
    pub log: Option<bool>,
    /// Grant: progress reports.
    pub progress: Option<bool>,
    /// Grant: real clocks.
    pub clocks: Option<bool>,
    /// Grant: real randomness.
    pub random: Option<bool>,
    /// Grant: this key-value namespace.
    pub kv: Option<String>,
    /// Grant: these task names (globs) may be enqueued.
    pub enqueue: Option<Vec<String>>,
    /// Grant: children may also be sent to these queues (globs), beyond the task's own queue
    /// and those of the tasks it may enqueue.
    pub enqueue_queues: Option<Vec<String>>,
    /// Grant: these host folders.
    pub preopens: Option<Vec<PreopenSetting>>,
}

/// A preopened folder as written in the file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreopenSetting {
    /// Host folder; relative paths are relative to the config file.
    pub host: PathBuf,
    /// Where the task sees it.
    pub guest: String,
    /// Whether the task may write there.
    #[serde(default)]
    pub writable: bool,
    /// Create the host folder at startup when it is missing (for scratch folders).
    #[serde(default)]
    pub create: bool,
}

macro_rules! overlay_fields {
    ($base:ident, $top:ident, $($field:ident),*) => {
        TaskSettings { $( $field: $top.$field.clone().or_else(|| $base.$field.clone()), )* }
    };
}

impl TaskSettings {
    /// `self` with every field that `top` sets replaced by `top`'s.
    pub fn overlay(&self, top: &TaskSettings) -> TaskSettings {
        overlay_fields!(
            self,
            top,
            module,
            queue,
            soft_time_limit,
            hard_time_limit,
            memory,
            fuel,
            max_result,
            max_retries,
            retry_backoff,
            retry_backoff_max,
            retry_jitter,
            retry_on,
            rate_limit,
            log,
            progress,
            clocks,
            random,
            kv,
            enqueue,
            enqueue_queues,
            preopens
        )
    }

    /// The settings a component declared for one of its tasks.
    pub fn from_describe(info: &TaskInfo) -> TaskSettings {
        let ms = |v: Option<u64>| v.map(|ms| HumanDuration(Duration::from_millis(ms)));
        TaskSettings {
            queue: info.queue.clone(),
            soft_time_limit: ms(info.soft_time_limit_ms),
            hard_time_limit: ms(info.hard_time_limit_ms),
            memory: info.memory_limit_bytes.map(ByteSize),
            fuel: info.fuel,
            max_retries: info.max_retries,
            retry_backoff: ms(info.retry_backoff_ms),
            retry_backoff_max: ms(info.retry_backoff_max_ms),
            rate_limit: info.rate_limit.as_deref().and_then(|r| r.parse().ok()),
            ..TaskSettings::default()
        }
    }

    /// Checks the settings that can be checked alone; `at` names the table in messages.
    fn check(&self, at: &str, errors: &mut Vec<String>) {
        let mut bad = |key: &str, problem: String| errors.push(format!("{at}.{key}: {problem}"));
        if let (Some(soft), Some(hard)) = (self.soft_time_limit, self.hard_time_limit)
            && soft >= hard
        {
            bad("soft_time_limit", format!("{soft} must be shorter than hard_time_limit {hard}"));
        }
        if self.hard_time_limit.is_some_and(|h| h.0.is_zero()) {
            bad("hard_time_limit", "must be more than 0".into());
        }
        if let Some(m) = self.memory
            && !(1 << 20..=4 << 30).contains(&m.0)
        {
            bad("memory", format!("{m} is outside 1MiB..4GiB (a wasm32 memory tops out at 4GiB)"));
        }
        if self.fuel == Some(0) {
            bad("fuel", "a budget of 0 cannot run anything; leave it out for no metering".into());
        }
        if let Some(kinds) = &self.retry_on {
            for k in kinds.iter().filter(|k| !RETRYABLE_KINDS.contains(&k.as_str())) {
                bad("retry_on", format!("unknown outcome {k:?} (one of {RETRYABLE_KINDS:?})"));
            }
        }
        if let Some(ns) = &self.kv
            && (ns.is_empty()
                || !ns.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)))
        {
            bad("kv", format!("namespace {ns:?} must be letters, digits, '_', '-' or '.'"));
        }
        if let Some(q) = &self.queue
            && let Err(e) = crate::broker::check_queue_name(q)
        {
            bad("queue", e);
        }
        for q in self.enqueue_queues.iter().flatten() {
            if let Err(e) = crate::broker::check_queue_name(&q.replace('*', "x")) {
                bad("enqueue_queues", e);
            }
        }
        for p in self.preopens.iter().flatten() {
            if !p.guest.starts_with('/') {
                bad("preopens", format!("guest path {:?} must be absolute", p.guest));
            }
            if !p.host.is_dir() {
                bad("preopens", format!("host folder {} does not exist", p.host.display()));
            }
        }
    }
}

/// A global rate limit: at most `count` starts per `per`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tasks allowed per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl std::str::FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate limit {s:?} (expected e.g. 10/s, 100/m, 1000/h)");
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!("rate limit {s:?} allows nothing; leave it out for no limit"));
        }
        Ok(RateLimit { count, per })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// When and how a failed task is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries allowed after the first run.
    pub max_retries: u32,
    /// Delay before the first retry; doubles each time.
    pub backoff: Duration,
    /// Cap on the delay.
    pub backoff_max: Duration,
    /// Full jitter: the delay is uniform in [0, computed delay].
    pub jitter: bool,
    /// Outcome kinds that are retried.
    pub retry_on: Vec<String>,
}

impl RetryPolicy {
    /// Whether `outcome` is retried under this policy, given the retries already made.
    pub fn should_retry(&self, outcome: &Outcome, retries: u32) -> bool {
        retries < self.max_retries && self.retry_on.iter().any(|k| k == outcome.kind())
    }

    /// The delay before retry number `retries + 1`, before jitter: `backoff * 2^retries`, capped.
    pub fn delay(&self, retries: u32) -> Duration {
        let factor = 2u32.saturating_pow(retries.min(31));
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }
}

/// Everything resolved for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// The task name.
    pub name: String,
    /// The module (file stem) serving it.
    pub module: String,
    /// Its queue.
    pub queue: String,
    /// Its limits.
    pub limits: Limits,
    /// What it may touch.
    pub grants: Grants,
    /// Its retry policy.
    pub retry: RetryPolicy,
    /// Its global rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// The configuration after the file, environment and flags were applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    /// Folder of task components.
    pub modules: PathBuf,
    /// Folder for compiled components; `None` disables the cache.
    pub cache: Option<PathBuf>,
    /// Broker URL.
    pub broker: String,
    /// The broker's transport options (Sentinel's `master_name`, ...).
    pub broker_options: TransportOptions,
    /// Result backend URL.
    pub result_backend: String,
    /// The result backend's transport options.
    pub result_backend_options: TransportOptions,
    /// The result backend's database settings (with `db+postgresql://`).
    pub result_database: DatabaseOptions,
    /// Settings for every task.
    pub defaults: TaskSettings,
    /// Settings for single tasks.
    pub tasks: BTreeMap<String, TaskSettings>,
    /// Settings from the command line, applied over everything for every task.
    pub overrides: TaskSettings,
    /// Routing rules, first match wins.
    pub routes: Vec<Route>,
    /// Periodic tasks, by entry name; each checked.
    pub beat: BTreeMap<String, crate::beat::EntrySpec>,
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem: `file: key: what is wrong`.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError { problems: vec![problem] }
    }
}

/// Values from the environment and command line that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--modules` / `CELERIAC_MODULES`.
    pub modules: Option<PathBuf>,
    /// `--broker` / `CELERY_BROKER_URL` / `REDIS_URL`.
    pub broker: Option<String>,
    /// `--result-backend` / `CELERY_RESULT_BACKEND`.
    pub result_backend: Option<String>,
    /// Settings applied to every task, over everything else (e.g. `--memory` on `celeriac run`).
    pub task: TaskSettings,
}

impl Config {
    /// Loads `path`, or `celeriac.toml` in the working folder when it exists, or the built-in
    /// defaults; then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (file, source) = match path {
            Some(p) => (read_file(p)?, Some(p.to_path_buf())),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                let p = Path::new(DEFAULT_CONFIG_FILE);
                (read_file(p)?, Some(p.to_path_buf()))
            }
            None => (ConfigFile::default(), None),
        };
        Self::from_file(file, source, overrides)
    }

    /// Parses TOML text as if read from `name` (used by tests and `load`).
    pub fn parse(text: &str, name: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = toml::from_str::<ConfigFile>(text).map_err(|e| {
            ConfigError::one(format!("{}: {}", name.display(), e.to_string().trim_end()))
        })?;
        Self::from_file(file, Some(name.to_path_buf()), overrides)
    }

    fn from_file(
        file: ConfigFile,
        source: Option<PathBuf>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let base =
            source.as_deref().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let shown = source.as_deref().unwrap_or(Path::new("(defaults)")).display().to_string();

        let mut defaults = file.defaults;
        let mut tasks = file.tasks;
        for settings in std::iter::once(&mut defaults).chain(tasks.values_mut()) {
            for p in settings.preopens.iter_mut().flatten() {
                p.host = resolve(std::mem::take(&mut p.host));
                if p.create && !p.host.exists() {
                    // A failure shows up below as "host folder does not exist".
                    let _ = std::fs::create_dir_all(&p.host);
                }
            }
        }
        let mut problems = Vec::new();
        defaults.check(&format!("{shown}: defaults"), &mut problems);
        for (name, settings) in &tasks {
            settings.check(&format!("{shown}: tasks.\"{name}\""), &mut problems);
        }
        overrides.task.check("command line", &mut problems);
        for (i, r) in file.routes.iter().enumerate() {
            if r.task.is_empty() {
                problems.push(format!("{shown}: routes[{i}]: task must be a non-empty glob"));
            }
            if let Err(e) = crate::broker::check_queue_name(&r.queue) {
                problems.push(format!("{shown}: routes[{i}].queue: {e}"));
            }
        }
        for (name, spec) in &file.beat {
            if let Err(e) = crate::beat::Entry::new(name, spec, |_| "celery".into()) {
                problems.push(format!("{shown}: {e}"));
            }
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (file_broker, file_broker_options, broker_database) =
            file.broker.map(EndpointSpec::split).unwrap_or_default();
        if broker_database != DatabaseOptions::default() {
            problems
                .push(format!("{shown}: broker: serializer and extended belong to result_backend"));
        }
        let (file_results, file_results_options, result_database) =
            file.result_backend.map(EndpointSpec::split).unwrap_or_default();
        let mut env_options = |var: &str| {
            let text = env(var)?;
            TransportOptions::from_json(var, &text).map_err(|e| problems.push(e)).ok()
        };
        let broker_env_options = env_options("CELERY_BROKER_TRANSPORT_OPTIONS");
        let results_env_options = env_options("CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS");
        let broker = overrides
            .broker
            .clone()
            .or_else(|| env("CELERY_BROKER_URL"))
            .or_else(|| env("REDIS_URL"))
            .or(file_broker)
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_string());
        let broker_options = broker_env_options.or(file_broker_options).unwrap_or_default();
        let explicit_results = overrides
            .result_backend
            .clone()
            .or_else(|| env("CELERY_RESULT_BACKEND"))
            .or(file_results);
        // Results kept on the broker's server follow the broker's options (its Sentinel master).
        let result_backend_options = match &explicit_results {
            Some(_) => results_env_options.or(file_results_options).unwrap_or_default(),
            None => results_env_options
                .or(file_results_options)
                .unwrap_or_else(|| broker_options.clone()),
        };
        let result_backend = explicit_results.unwrap_or_else(|| broker.clone());
        for (key, url, options) in [
            ("broker", &broker, &broker_options),
            ("result_backend", &result_backend, &result_backend_options),
        ] {
            if url.starts_with("memory://") {
                continue;
            }
            if url.starts_with("db+") {
                if key == "broker" {
                    problems.push(format!(
                        "{shown}: broker {}: a database is a result backend; the broker is Redis",
                        crate::endpoint::masked_url(url)
                    ));
                } else if let Err(e) = crate::results::PgSpec::parse(url, Default::default(), false)
                {
                    problems
                        .push(format!("{shown}: {key} {}: {e}", crate::endpoint::masked_url(url)));
                }
                continue;
            }
            if result_database != DatabaseOptions::default() && key == "result_backend" {
                problems.push(format!(
                    "{shown}: result_backend: serializer and extended apply to a db+postgresql:// \
                     result backend only"
                ));
            }
            if let Err(e) = Endpoint::parse(url, options) {
                problems.push(format!("{shown}: {key} {}: {e}", crate::endpoint::masked_url(url)));
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let modules = overrides
            .modules
            .clone()
            .or_else(|| env("CELERIAC_MODULES").map(PathBuf::from))
            .or(file.modules.map(resolve))
            .unwrap_or_else(|| PathBuf::from("modules"));
        let cache = env("CELERIAC_CACHE")
            .map(PathBuf::from)
            .or(file.cache.map(resolve))
            .or_else(crate::runtime::default_cache_dir);
        Ok(Config {
            source,
            modules,
            cache,
            broker,
            broker_options,
            result_backend,
            result_backend_options,
            result_database,
            defaults,
            tasks,
            overrides: overrides.task.clone(),
            routes: file.routes,
            beat: file.beat,
        })
    }

    /// The broker's address with its transport options (checked when the file was loaded).
    pub fn broker_endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::parse(&self.broker, &self.broker_options)?)
    }

    /// Where results go: a Redis endpoint, or PostgreSQL beside the broker's Redis.
    pub fn result_target(&self) -> anyhow::Result<crate::results::ResultTarget> {
        use crate::results::{PgSpec, ResultTarget};
        if self.result_backend.starts_with("db+") {
            let db = &self.result_database;
            let spec = PgSpec::parse(
                &self.result_backend,
                db.serializer.unwrap_or_default(),
                db.extended.unwrap_or(false),
            )
            .map_err(anyhow::Error::msg)?;
            return Ok(ResultTarget::Postgres {
                spec: Box::new(spec),
                broker: self.broker_endpoint()?,
            });
        }
        Ok(ResultTarget::Redis(Endpoint::parse(
            &self.result_backend,
            &self.result_backend_options,
        )?))
    }

    /// The beat entries, each sent to its own queue, else the one `route` gives its task.
    pub fn beat_entries(
        &self,
        route: impl Fn(&str) -> String,
    ) -> Result<Vec<crate::beat::Entry>, ConfigError> {
        self.beat
            .iter()
            .map(|(name, spec)| crate::beat::Entry::new(name, spec, &route))
            .collect::<Result<_, _>>()
            .map_err(ConfigError::one)
    }

    /// The queue the first matching routing rule gives `name`.
    pub fn route(&self, name: &str) -> Option<&str> {
        route(&self.routes, name)
    }

    /// The settings for `name` served by `module`, resolved through every layer.
    ///
    /// A task of an interpreted component (Python, JavaScript) has defaults of its own, above
    /// `[defaults]` (which are tuned for Rust tasks) and below everything said about the task
    /// itself: a memory cap of [`INTERPRETED_MEMORY`], and no fuel, since an interpreter burns
    /// through a budget tuned for Rust tasks. Such a task is metered only when its own settings
    /// or `describe` ask for fuel; `[overrides]` still caps it like any task.
    pub fn resolve(
        &self,
        name: &str,
        module: &str,
        info: &TaskInfo,
        interpreted: bool,
    ) -> Result<TaskSpec, ConfigError> {
        let described = TaskSettings::from_describe(info);
        let empty = TaskSettings::default();
        let task = self.tasks.get(name).unwrap_or(&empty);
        let routed =
            TaskSettings { queue: self.route(name).map(String::from), ..TaskSettings::default() };
        let mut defaults = self.defaults.clone();
        let mut component = TaskSettings::default();
        if interpreted {
            component.memory = Some(ByteSize(INTERPRETED_MEMORY));
            defaults.fuel = None;
        }
        let layers = [
            &builtin_settings(),
            &defaults,
            &component,
            &described,
            &routed,
            task,
            &self.overrides,
        ];
        let mut s = layers.iter().fold(TaskSettings::default(), |acc, layer| acc.overlay(layer));
        // A soft limit at or past the hard limit can never fire. When a stronger layer shortened
        // the hard limit (`celeriac run --hard-time-limit 1s` under a file's 50s soft limit), the
        // soft limit is dropped; when the soft limit is the stronger setting, it is an error.
        let last = |f: fn(&TaskSettings) -> bool| layers.iter().rposition(|l| f(l));
        if let (Some(soft), Some(hard)) = (s.soft_time_limit, s.hard_time_limit)
            && soft >= hard
            && last(|l| l.hard_time_limit.is_some()) > last(|l| l.soft_time_limit.is_some())
        {
            s.soft_time_limit = None;
        }
        let at = match &self.source {
            Some(p) => format!("{}: tasks.\"{name}\"", p.display()),
            None => format!("task {name}"),
        };
        let mut problems = Vec::new();
        s.check(&at, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let hard = s.hard_time_limit.map(|d| d.0).unwrap_or(Duration::from_secs(300));
        Ok(TaskSpec {
            name: name.to_string(),
            module: module.to_string(),
            queue: s.queue.unwrap_or_else(|| "celery".to_string()),
            limits: Limits {
                soft_time_limit: s.soft_time_limit.map(|d| d.0),
                hard_time_limit: hard,
                memory: s.memory.map(|m| m.0).unwrap_or(Limits::default().memory),
                fuel: s.fuel,
                max_result: s
                    .max_result
                    .map(|m| m.0 as usize)
                    .unwrap_or(Limits::default().max_result),
                ..Limits::default()
            },
            grants: Grants {
                log: s.log.unwrap_or(false),
                progress: s.progress.unwrap_or(false),
                clocks: s.clocks.unwrap_or(false),
                random: s.random.unwrap_or(false),
                kv: s.kv,
                enqueue: s.enqueue.unwrap_or_default(),
                // The registry adds the queues of this task and of the tasks it may enqueue.
                child_queues: s.enqueue_queues.unwrap_or_default(),
                preopens: s
                    .preopens
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| Preopen { host: p.host, guest: p.guest, writable: p.writable })
                    .collect(),
            },
            retry: RetryPolicy {
                max_retries: s.max_retries.unwrap_or(3),
                backoff: s.retry_backoff.map(|d| d.0).unwrap_or(Duration::from_secs(1)),
                backoff_max: s.retry_backoff_max.map(|d| d.0).unwrap_or(Duration::from_secs(600)),
                jitter: s.retry_jitter.unwrap_or(true),
                retry_on: s.retry_on.unwrap_or_else(|| vec!["retry".into(), "host_error".into()]),
            },
            rate_limit: s.rate_limit,
        })
    }
}

/// The memory cap an interpreted component's task gets when nothing else sets one: CPython
/// starts from a 12 MiB heap image and SpiderMonkey from 9 MiB, so the built-in 128 MiB would
/// leave a Python task less room than a Rust one.
pub const INTERPRETED_MEMORY: u64 = 256 << 20;

/// celeriac's own defaults, the weakest layer. Grants are all off: a task gets nothing it was
/// not given.
fn builtin_settings() -> TaskSettings {
    TaskSettings {
        queue: Some("celery".into()),
        hard_time_limit: Some(HumanDuration(Duration::from_secs(300))),
        memory: Some(ByteSize(128 << 20)),
        ..TaskSettings::default()
    }
}

fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| ConfigError::one(format!("{}: {}", path.display(), e.to_string().trim_end())))
}
