//! The `celeriac` command line.

use crate::broker::{Broker, BrokerOptions, MemoryBroker, RedisBroker};
use crate::canvas::Router as _;
use crate::client;
use crate::config::{Config, Overrides, TaskSettings};
use crate::kv::KvStore;
use crate::protocol::{self, NewTask};
use crate::registry::Registry;
use crate::results::ResultBackend;
use crate::runtime::{Invocation, Outcome, RunEnv, RunReport};
use crate::units::{ByteSize, HumanDuration};
use crate::worker::{Monitoring, Worker, WorkerOptions};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A Celery-compatible task worker that runs every task in a WebAssembly sandbox.
#[derive(Debug, Parser)]
#[command(name = "celeriac", version, about)]
pub struct Cli {
    /// Configuration file [default: ./celeriac.toml when present].
    #[arg(long, global = true, env = "CELERIAC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Folder of task components, overriding the file.
    #[arg(long, global = true)]
    pub modules: Option<PathBuf>,
    /// Broker URL [env: CELERY_BROKER_URL, REDIS_URL; default: redis://localhost:6379/0].
    #[arg(long, global = true)]
    pub broker: Option<String>,
    /// Result backend URL [env: CELERY_RESULT_BACKEND; default: the broker].
    #[arg(long, global = true)]
    pub result_backend: Option<String>,
    /// kombu's global key prefix, put before every Redis key (result keys get a `_` after it
    /// unless it ends in one of `:_-.`, as Celery's result backend does).
    #[arg(long, global = true, default_value = "")]
    pub global_prefix: String,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the example tasks end to end in one process (in-memory broker unless --broker).
    Demo,
    /// Run one task locally under its limits and grants, without a broker.
    Run(RunArgs),
    /// Consume queues and run tasks.
    Worker(WorkerArgs),
    /// Send a task; prints its id.
    Enqueue(EnqueueArgs),
    /// Fire the periodic tasks of `[beat."name"]`. Run as many as you like: one leads, the
    /// others stand by, and every tick fires once.
    Beat(BeatArgs),
    /// Serve the HTTP API without running tasks: send, read and revoke tasks, look at queues,
    /// workers and dead letters, and scrape queue metrics.
    Api(ApiArgs),
    /// Print a task's state and result; without an id, the queues (per priority, the oldest
    /// message's age, dead letters) and the live workers.
    Status {
        /// Task id.
        id: Option<String>,
        /// Wait up to this long for the task to finish.
        #[arg(long)]
        wait: Option<HumanDuration>,
        /// Without an id: how long to wait for workers to answer.
        #[arg(long, default_value = "1s")]
        timeout: HumanDuration,
    },
    /// Print the Celery events of every worker on the broker as they happen, as
    /// `celery events --dump` does.
    Events {
        /// One JSON object a line instead.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Revoke tasks: queued copies never run; with --terminate a running one is stopped.
    Revoke {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Also stop the task if it is running.
        #[arg(long)]
        terminate: bool,
        /// How long the revocation is remembered.
        #[arg(long, default_value = "3h")]
        ttl: HumanDuration,
    },
    /// Ask the running workers (celeriac and Python) over Celery's remote control, as
    /// `celery inspect` does; prints `{node: reply}` as JSON.
    Inspect {
        /// What to ask: active, reserved, scheduled, registered, stats, queues, revoked, conf
        /// or ping.
        what: InspectWhat,
        /// Only these workers (node names such as celeriac@host); repeat or comma-separate.
        #[arg(short, long, value_delimiter = ',')]
        destination: Vec<String>,
        /// How long to wait for replies.
        #[arg(long, default_value = "1s")]
        timeout: HumanDuration,
    },
    /// Inspect, replay or purge dead letters.
    Dlq {
        /// The dlq subcommand.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Inspect task modules.
    Modules {
        /// The modules subcommand.
        #[command(subcommand)]
        command: ModulesCommand,
    },
}

/// `celeriac modules ...`
#[derive(Debug, Subcommand)]
pub enum ModulesCommand {
    /// Load every module, check it implements the celeriac world and list the tasks it serves.
    Check {
        /// Folder to check [default: the configured modules folder].
        dir: Option<PathBuf>,
    },
}

/// `celeriac dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (of one queue, or the queues that have some).
    List {
        /// Queue.
        queue: Option<String>,
        /// Most records to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show one dead letter in full, by task id.
    Show {
        /// Queue.
        queue: String,
        /// Task id.
        id: String,
    },
    /// Put dead letters back on their queue with their retry count reset.
    Replay {
        /// Queue.
        queue: String,
        /// Only this task id [default: all].
        #[arg(long)]
        id: Option<String>,
    },
    /// Delete a queue's dead letters.
    Purge {
        /// Queue.
        queue: String,
    },
}

/// What `celeriac inspect` asks.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum InspectWhat {
    /// Running tasks.
    Active,
    /// Tasks taken but not started.
    Reserved,
    /// Tasks held for their ETA.
    Scheduled,
    /// Task names.
    Registered,
    /// Counters, pool, broker.
    Stats,
    /// Queues consumed.
    Queues,
    /// Revoked ids.
    Revoked,
    /// Settings.
    Conf,
    /// Whether each worker answers.
    Ping,
}

impl InspectWhat {
    /// The pidbox method and its arguments, as Celery's `inspect` sends them.
    fn request(self) -> (&'static str, Value) {
        match self {
            InspectWhat::Active => ("active", json!({"safe": true})),
            InspectWhat::Reserved => ("reserved", json!({})),
            InspectWhat::Scheduled => ("scheduled", json!({})),
            InspectWhat::Registered => ("registered", json!({"taskinfoitems": []})),
            InspectWhat::Stats => ("stats", json!({})),
            InspectWhat::Queues => ("active_queues", json!({})),
            InspectWhat::Revoked => ("revoked", json!({})),
            InspectWhat::Conf => ("conf", json!({"with_defaults": false})),
            InspectWhat::Ping => ("ping", json!({})),
        }
    }
}

/// `celeriac beat ...`
#[derive(Debug, Args)]
pub struct BeatArgs {
    /// `status`: the entries, their last tick and next due time, the leader and its epoch.
    #[command(subcommand)]
    pub command: Option<BeatCommand>,
    /// How long the leader's lease lasts without renewal: a standby takes over this long after
    /// the leader dies (it is renewed every second).
    #[arg(long, default_value = "10s")]
    pub lease_ttl: HumanDuration,
    /// This beat's name in the lease.
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
}

/// `celeriac beat <command>`
#[derive(Debug, Subcommand)]
pub enum BeatCommand {
    /// Print the entries, last ticks, next due times, the leader and its epoch, as JSON.
    Status,
}

/// `celeriac worker ...`
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Also run a beat in this process (`celeriac beat`), leading or standing by.
    #[arg(long)]
    pub beat: bool,
    /// Check everything the worker would start with and run nothing: the configuration, every
    /// module, the queue names, the beat entries with --beat, and that the broker and result
    /// backend answer (and run Redis 6.2 or newer). Exits 0 when all is well.
    #[arg(long)]
    pub check: bool,
    /// Queues to consume, in priority order [default: the queues of the loaded tasks]. Give
    /// weights (`-Q high:6,default:3,low:1`) to consume them weighted instead of strictly.
    #[arg(short = 'Q', long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Task slots.
    #[arg(short = 'c', long, default_value_t = 8)]
    pub concurrency: usize,
    /// Worker name.
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
    /// How long running tasks may finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "30s")]
    pub grace: HumanDuration,
    /// How long a running task's lease lasts without renewal (a dead worker's tasks come back
    /// after this).
    #[arg(long, default_value = "30s")]
    pub lease: HumanDuration,
    /// kombu's visibility timeout for other workers' unacked messages.
    #[arg(long, default_value = "1h")]
    pub visibility_timeout: HumanDuration,
    /// How long results are kept (Celery's result_expires; 0 keeps them).
    #[arg(long, default_value = "1d")]
    pub result_expires: HumanDuration,
    /// Do not store STARTED when a task starts (Celery's default; STARTED is otherwise written
    /// in the next settle batch, before the final state).
    #[arg(long)]
    pub no_track_started: bool,
    /// Store each state with the task's name, args, kwargs, worker, retries and queue
    /// (Celery's `result_extended`; the `extended` columns with results in PostgreSQL).
    #[arg(long)]
    pub result_extended: bool,
    /// Start with Celery task events off (worker heartbeats are always sent; Flower's
    /// `enable_events` or `celery control enable_events` turns task events on).
    #[arg(long)]
    pub no_task_events: bool,
    /// Serve the HTTP API (tasks, queues, workers, dead letters, Flower's API subset), the
    /// probes and Prometheus /metrics on this address (e.g. 127.0.0.1:9808).
    #[arg(long)]
    pub http: Option<std::net::SocketAddr>,
    /// HTTP auth.
    #[command(flatten)]
    pub auth: HttpAuthArgs,
}

/// How the HTTP server authenticates.
#[derive(Debug, Args)]
pub struct HttpAuthArgs {
    /// The bearer token every request but the probes needs.
    #[arg(long, env = "CELERIAC_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Serve without a token on an address that is not loopback.
    #[arg(long)]
    pub http_insecure: bool,
}

impl HttpAuthArgs {
    fn options(self, addr: std::net::SocketAddr) -> crate::api::HttpOptions {
        crate::api::HttpOptions {
            addr,
            token: self.api_token.filter(|t| !t.is_empty()),
            insecure: self.http_insecure,
        }
    }
}

/// `celeriac api ...`
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The address to serve on.
    #[arg(long, default_value = "127.0.0.1:9808")]
    pub listen: std::net::SocketAddr,
    /// HTTP auth.
    #[command(flatten)]
    pub auth: HttpAuthArgs,
    /// How long results of tasks sent through the API are kept, as the workers keep them.
    #[arg(long, default_value = "1d")]
    pub result_expires: HumanDuration,
}

/// `celeriac enqueue ...`
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Task name.
    pub task: String,
    /// Positional arguments as a JSON array, or @FILE.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object, or @FILE.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Queue [default: the task's configured queue, else `celery`].
    #[arg(long)]
    pub queue: Option<String>,
    /// Priority 0-9 (0 is served first).
    #[arg(long)]
    pub priority: Option<u8>,
    /// Run no earlier than this long from now.
    #[arg(long)]
    pub countdown: Option<HumanDuration>,
    /// Run no earlier than this time (ISO-8601).
    #[arg(long)]
    pub eta: Option<String>,
    /// Do not run after this long from now.
    #[arg(long)]
    pub expires: Option<HumanDuration>,
    /// Task id [default: a new UUID].
    #[arg(long)]
    pub id: Option<String>,
    /// Send this many copies (each with its own id), pipelined; for load tests. Prints the count.
    #[arg(long, default_value_t = 1)]
    pub repeat: u64,
}

/// `celeriac run ...`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Task name, e.g. `diagnostics.noop`.
    pub task: String,
    /// Positional arguments as a JSON array, or @FILE to read them from a file.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object, or @FILE to read them from a file.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Task id [default: a new UUID].
    #[arg(long)]
    pub id: Option<String>,
    /// Retries so far, as if this were a retry.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Keep the key-value store in this JSON file between runs (otherwise it starts empty).
    #[arg(long)]
    pub kv_file: Option<PathBuf>,
    /// Also run the child tasks the task enqueues, and theirs, locally.
    #[arg(long)]
    pub follow: bool,
    /// Soft time limit, overriding the configuration.
    #[arg(long)]
    pub soft_time_limit: Option<HumanDuration>,
    /// Hard time limit, overriding the configuration.
    #[arg(long)]
    pub hard_time_limit: Option<HumanDuration>,
    /// Memory cap, overriding the configuration.
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// Fuel budget, overriding the configuration.
    #[arg(long)]
    pub fuel: Option<u64>,
}

/// Runs the command line; the result is the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    let mut overrides = Overrides {
        modules: cli.modules.clone(),
        broker: cli.broker.clone(),
        result_backend: cli.result_backend.clone(),
        ..Overrides::default()
    };
    let prefix = cli.global_prefix.clone();
    match cli.command {
        Command::Demo => {
            let explicit = cli.broker.clone();
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            demo(&config, explicit.as_deref(), &prefix).await
        }
        Command::Worker(args) => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            worker(&config, &overrides, &prefix, args).await
        }
        Command::Enqueue(args) => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            enqueue(&config, &prefix, args).await
        }
        Command::Beat(args) => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            beat(&config, &overrides, &prefix, args).await
        }
        Command::Api(args) => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            api(&config, &prefix, args).await
        }
        Command::Status { id: None, timeout, .. } => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            redis_only(&config.broker)?;
            let broker =
                RedisBroker::open(&config.broker_endpoint()?, broker_options(&prefix)).await?;
            print!("{}", crate::overview::render(&broker, &config, timeout.0).await?);
            Ok(0)
        }
        Command::Events { json, count } => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            redis_only(&config.broker)?;
            let broker =
                RedisBroker::open(&config.broker_endpoint()?, broker_options(&prefix)).await?;
            crate::tail::tail(&broker, json, count).await?;
            Ok(0)
        }
        Command::Status { id: Some(id), wait, .. } => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            let results =
                ResultBackend::open(&config.result_target()?, &prefix, Duration::ZERO).await?;
            let (state, meta) = match wait {
                Some(w) => client::wait(&results, &id, w.0).await?,
                None => client::status(&results, &id).await?,
            };
            println!("state:   {state}");
            if let Some(meta) = &meta {
                println!("result:  {}", meta["result"]);
                if let Some(tb) = meta["traceback"].as_str() {
                    println!("traceback:\n{}", tb.trim_end());
                }
            }
            Ok(if state == "FAILURE" || state == "REVOKED" { 1 } else { 0 })
        }
        Command::Revoke { ids, terminate, ttl } => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            let broker =
                RedisBroker::open(&config.broker_endpoint()?, broker_options(&prefix)).await?;
            let results =
                ResultBackend::open(&config.result_target()?, &prefix, Duration::from_secs(86_400))
                    .await?;
            client::revoke(&broker, &results, &ids, terminate, ttl.0).await?;
            // Recorded for good above; the broadcast tells running workers (celeriac and
            // Python alike) now rather than at their next look at the revoked set.
            if let Err(e) = crate::control::broadcast_revoke(&broker, &ids, terminate).await {
                eprintln!("warning: revoked, but the broadcast to running workers failed: {e:#}");
            }
            println!(
                "revoked {} task(s){}",
                ids.len(),
                if terminate { ", terminating running ones" } else { "" }
            );
            Ok(0)
        }
        Command::Inspect { what, destination, timeout } => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            redis_only(&config.broker)?;
            let broker =
                RedisBroker::open(&config.broker_endpoint()?, broker_options(&prefix)).await?;
            let (method, arguments) = what.request();
            let only = (!destination.is_empty()).then_some(destination.as_slice());
            let replies = crate::control::ask(&broker, method, arguments, only, timeout.0).await?;
            println!("{}", serde_json::to_string_pretty(&replies)?);
            if replies.is_empty() {
                eprintln!("no worker replied within {timeout}");
                return Ok(1);
            }
            Ok(0)
        }
        Command::Dlq { command } => {
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            let broker =
                RedisBroker::open(&config.broker_endpoint()?, broker_options(&prefix)).await?;
            dlq(&broker, command).await
        }
        Command::Run(args) => {
            overrides.task = TaskSettings {
                soft_time_limit: args.soft_time_limit,
                hard_time_limit: args.hard_time_limit,
                memory: args.memory,
                fuel: args.fuel,
                ..TaskSettings::default()
            };
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            run(&config, args).await
        }
        Command::Modules { command: ModulesCommand::Check { dir } } => {
            if dir.is_some() {
                overrides.modules = dir;
            }
            let config = Config::load(cli.config.as_deref(), &overrides)?;
            modules_check(&config).await
        }
    }
}

async fn demo(config: &Config, broker_url: Option<&str>, prefix: &str) -> anyhow::Result<i32> {
    let registry = Arc::new(Registry::load(config, 4).await?);
    match broker_url {
        None | Some("memory://") => {
            let broker = MemoryBroker::new(Duration::from_secs(30));
            crate::demo::run(registry, broker.clone(), broker, KvStore::memory(), "memory://").await
        }
        Some(url) => {
            let broker = RedisBroker::connect(url, broker_options(prefix)).await?;
            let results =
                ResultBackend::open(&config.result_target()?, prefix, Duration::from_secs(3600))
                    .await?;
            let kv = KvStore::redis(broker.conn(), prefix);
            crate::demo::run(registry, broker, results, kv, url).await
        }
    }
}

/// Splits `-Q a:3,b:1` into names and weights; all or none must have a weight.
fn parse_queue_weights(specs: &[String]) -> anyhow::Result<(Vec<String>, Vec<u32>)> {
    let mut names = Vec::new();
    let mut weights = Vec::new();
    for spec in specs {
        match spec.split_once(':') {
            Some((name, w)) => {
                let w: u32 = w.parse().ok().filter(|w| *w > 0).ok_or_else(|| {
                    anyhow::anyhow!("-Q {spec}: the weight must be a positive whole number")
                })?;
                names.push(name.to_string());
                weights.push(w);
            }
            None => names.push(spec.clone()),
        }
    }
    if !weights.is_empty() && weights.len() != names.len() {
        anyhow::bail!("-Q: give every queue a weight (high:6,low:1) or none (strict order)");
    }
    Ok((names, weights))
}

/// `memory://` lives inside one process; only `celeriac demo` can use it.
/// The queue a task goes to when neither its beat entry nor a worker's modules say: its table
/// in the configuration, a routing rule, else Celery's default.
fn configured_queue(config: &Config, name: &str) -> String {
    config
        .tasks
        .get(name)
        .and_then(|t| t.queue.clone())
        .or_else(|| config.route(name).map(String::from))
        .unwrap_or_else(|| "celery".into())
}

/// A beat node's name: `-n`, else `beat@<host>:<pid>`.
fn beat_node(name: Option<String>) -> String {
    name.unwrap_or_else(|| format!("beat@{}:{}", protocol::hostname(), std::process::id()))
}

/// The beat entries of `config`, routed as `registry`'s modules route, else by the
/// configuration alone.
fn beat_schedule(
    config: &Config,
    registry: Option<&Registry>,
) -> Result<Vec<crate::beat::Entry>, crate::config::ConfigError> {
    config.beat_entries(|name| match registry {
        Some(r) if r.get(name).is_ok() => r.queue_for(name),
        _ => configured_queue(config, name),
    })
}

async fn beat(
    config: &Config,
    overrides: &Overrides,
    prefix: &str,
    args: BeatArgs,
) -> anyhow::Result<i32> {
    redis_only(&config.broker)?;
    let broker = RedisBroker::open(&config.broker_endpoint()?, broker_options(prefix)).await?;
    // A task's queue is often declared by its component: read the modules when they load, so
    // the beat routes as the workers do; without them, by the configuration alone.
    let registry = match Registry::load(config, 1).await {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("beat: routing by the configuration alone (the modules did not load: {e})");
            None
        }
    };
    let entries = beat_schedule(config, registry.as_ref())?;
    if let Some(BeatCommand::Status) = args.command {
        let status = crate::beat::status(&broker, &entries).await?;
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(0);
    }
    if entries.is_empty() {
        anyhow::bail!("no [beat.\"name\"] entries in {}", shown_source(config));
    }
    broker.check_version().await?;
    eprintln!("beat: {} entries; leading or standing by", entries.len());
    let count = entries.len();
    let (reloaded, updates) = tokio::sync::watch::channel(entries.clone());
    let mut beat =
        crate::beat::Beat::new(broker, &beat_node(args.hostname), entries, args.lease_ttl.0);
    beat.follow(updates);
    // SIGHUP re-reads the configuration; an invalid one is refused and the entries stay.
    let (source, overrides) = (config.source.clone(), overrides.clone());
    tokio::spawn(async move {
        let hangup = tokio::signal::unix::SignalKind::hangup();
        let Ok(mut hangups) = tokio::signal::unix::signal(hangup) else { return };
        while hangups.recv().await.is_some() {
            let read = Config::load(source.as_deref(), &overrides)
                .and_then(|c| beat_schedule(&c, registry.as_ref()));
            match read {
                Ok(entries) => {
                    let _ = reloaded.send(entries);
                }
                Err(e) => {
                    for problem in &e.problems {
                        tracing::warn!("beat configuration reload refused: {problem}");
                    }
                }
            }
        }
    });
    let stop = CancellationToken::new();
    let notifier = crate::systemd::Notifier::from_env();
    let attendant = crate::systemd::attend_beat(&notifier, beat.pulse(), count, stop.clone());
    let signal = stop.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
    tokio::join!(beat.run(stop), attendant);
    Ok(0)
}

/// Deletes expired results from PostgreSQL on a schedule, as `celery.backend_cleanup` does from
/// Celery's beat. Every worker runs it; the deletes are idempotent.
async fn expire_results(rows: crate::results::PgResults) {
    let Some(every) = rows.expire_every() else { return };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match rows.expire().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("deleted {n} expired results from PostgreSQL"),
            Err(e) => tracing::warn!("deleting expired results from PostgreSQL failed: {e}"),
        }
    }
}

fn shown_source(config: &Config) -> String {
    config.source.as_deref().map_or("the configuration".into(), |p| p.display().to_string())
}

fn redis_only(url: &str) -> anyhow::Result<()> {
    if url.starts_with("memory://") {
        anyhow::bail!(
            "memory:// lives inside one process; use `celeriac demo`, or a redis:// broker"
        );
    }
    Ok(())
}

fn broker_options(prefix: &str) -> BrokerOptions {
    BrokerOptions { global_prefix: prefix.to_string(), ..BrokerOptions::default() }
}

async fn worker(
    config: &Config,
    overrides: &Overrides,
    prefix: &str,
    args: WorkerArgs,
) -> anyhow::Result<i32> {
    redis_only(&config.broker)?;
    let (named, weights) = parse_queue_weights(&args.queues)?;
    let registry = Arc::new(Registry::load(config, args.concurrency as u32).await?);
    let opts = BrokerOptions {
        global_prefix: prefix.to_string(),
        lease: args.lease.0,
        visibility_timeout: args.visibility_timeout.0,
    };
    for (what, options) in
        [("broker", &config.broker_options), ("result_backend", &config.result_backend_options)]
    {
        let ignored = options.ignored();
        if !ignored.is_empty() {
            tracing::warn!(
                "{what} transport options not used by celeriac: {} (they tune kombu's own transport)",
                ignored.join(", ")
            );
        }
    }
    let broker = RedisBroker::open(&config.broker_endpoint()?, opts).await?;
    broker.check_version().await?;
    let results =
        ResultBackend::open(&config.result_target()?, prefix, args.result_expires.0).await?;
    let kv = KvStore::redis(broker.conn(), prefix);
    for q in &named {
        crate::broker::check_queue_name(q).map_err(|e| anyhow::anyhow!("-Q: {e}"))?;
    }
    // Without -Q: every queue the tasks are routed to, plus Celery's default, taking equal
    // turns. Strict order would let a busy queue early in the list starve the later ones.
    let queues_from_tasks = named.is_empty();
    let (queues, weights) = if named.is_empty() {
        let mut q: Vec<String> = registry.tasks().map(|e| e.spec.queue.clone()).collect();
        q.push("celery".into());
        q.sort();
        q.dedup();
        let equal = vec![1; q.len()];
        eprintln!("consuming {} in equal turns (-Q to choose)", q.join(", "));
        (q, equal)
    } else {
        (named, weights)
    };
    if args.check {
        if args.beat {
            config.beat_entries(|name| registry.queue_for(name))?;
        }
        results.ping().await.context("the result backend does not answer")?;
        println!(
            "ok: {}; {} tasks from {}; broker {} and result backend {} answer; would consume {}",
            shown_source(config),
            registry.tasks().count(),
            config.modules.display(),
            crate::endpoint::masked_url(&config.broker),
            crate::endpoint::masked_url(&config.result_backend),
            queues.join(", ")
        );
        return Ok(0);
    }
    let hostname = args.hostname.unwrap_or_else(|| format!("celeriac@{}", protocol::hostname()));
    let options = WorkerOptions {
        queues,
        concurrency: args.concurrency.max(1),
        hostname,
        grace: args.grace.0,
        revoke_ttl: Duration::from_secs(3 * 3600),
        track_started: !args.no_track_started,
        result_extended: args.result_extended || config.result_database.extended == Some(true),
        weights,
    };
    let events = crate::events::CeleryEvents::new(&options.hostname);
    events.set_task_events(!args.no_task_events);
    let task_names: Vec<String> = registry.tasks().map(|e| e.info.name.clone()).collect();
    let metrics = Arc::new(crate::metrics::Metrics::new(&options.hostname, task_names)?);
    let modules_to_metrics = {
        let metrics = metrics.clone();
        move |r: &Registry| {
            let modules = r.modules().iter().map(|m| {
                let file = m.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
                (file, m.version.to_string())
            });
            metrics.set_modules(modules, r.tasks().map(|e| e.info.name.clone()));
        }
    };
    modules_to_metrics(&registry);
    let monitoring = Monitoring { events: Some(events), subscribers: vec![metrics.clone()] };
    let (http_broker, http_results) = (broker.clone(), results.clone());
    let (beat_broker, beat_router) = (broker.clone(), registry.clone());
    let systemd_broker = broker.clone();
    let catalog = crate::api::Catalog::new(&registry, config);
    let served = catalog.clone();
    if let Some(rows) = results.postgres().cloned() {
        tokio::spawn(expire_results(rows));
    }
    let w = Worker::monitored(registry, broker, results, kv, options, monitoring);
    let stop_http = CancellationToken::new();
    let http = match args.http {
        Some(addr) => {
            let node = w.clone();
            let api = crate::api::Api {
                broker: http_broker,
                results: http_results,
                catalog,
                metrics: metrics.clone(),
                view: Arc::new(move || {
                    Some(crate::api::Local {
                        active: node.load().active,
                        queues: crate::control::Node::queues(&*node),
                        reconnects: node
                            .stats
                            .reconnects
                            .load(std::sync::atomic::Ordering::Relaxed),
                    })
                }),
                revoke_ttl: Duration::from_secs(3 * 3600),
            };
            let server = crate::api::bind(&args.auth.options(addr), api, stop_http.clone()).await?;
            metrics.set_up(true);
            Some(tokio::spawn(server))
        }
        None => None,
    };
    let (shutdown, force) = (CancellationToken::new(), CancellationToken::new());
    let (signal, forced) = (shutdown.clone(), force.clone());
    // The first SIGTERM or SIGINT stops fetching and lets running tasks finish within --grace;
    // a second one stops them now and hands them back to their queues.
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        for token in [signal, forced] {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            token.cancel();
        }
    });
    // `--beat`: a beat beside the worker, routing as the worker's modules do; it stops (and
    // gives up its lease) when the worker starts to shut down.
    // A reload hands it the new entries.
    let mut beat_entries = None;
    let beat = if args.beat {
        let entries = config.beat_entries(|name| beat_router.queue_for(name))?;
        let (reloaded, updates) = tokio::sync::watch::channel(entries.clone());
        beat_entries = Some(reloaded);
        let mut beat =
            crate::beat::Beat::new(beat_broker, &beat_node(None), entries, crate::beat::LEASE_TTL);
        beat.follow(updates);
        Some(tokio::spawn(beat.run(shutdown.clone())))
    } else {
        None
    };
    let on_swap = move |config: &Config, registry: &Registry| {
        modules_to_metrics(registry);
        served.replace(registry, config);
        if let Some(reloaded) = &beat_entries {
            match config.beat_entries(|name| registry.queue_for(name)) {
                Ok(entries) => {
                    let _ = reloaded.send(entries);
                }
                Err(e) => tracing::warn!("beat entries not reloaded: {e}"),
            }
        }
    };
    // Under systemd: READY=1 once consuming, the status line and a watchdog fed only while the
    // worker is alive, STOPPING=1 when the shutdown begins.
    let attended = CancellationToken::new();
    let attendant = tokio::spawn(crate::systemd::attend_worker(
        Arc::new(crate::systemd::Notifier::from_env()),
        w.clone(),
        systemd_broker,
        args.grace.0,
        shutdown.clone(),
        attended.clone(),
    ));
    // A module dropped into the folder, replaced or removed, and SIGHUP's re-read
    // configuration, each swapped in while the worker runs.
    let reloader = crate::reload::Reloader::new(
        w.clone(),
        config.clone(),
        overrides.clone(),
        args.concurrency as u32,
        queues_from_tasks,
        Box::new(on_swap),
    );
    let stop_reload = CancellationToken::new();
    let reloading = tokio::spawn(reloader.run(stop_reload.clone()));
    let ran = w.clone().run_until(shutdown, force).await;
    stop_reload.cancel();
    let _ = reloading.await;
    attended.cancel();
    let _ = attendant.await;
    if let Some(beat) = beat {
        let _ = beat.await;
    }
    stop_http.cancel();
    if let Some(http) = http {
        let _ = http.await;
    }
    ran?;
    eprintln!("stopped: {}", w.stats);
    Ok(0)
}

/// `celeriac api`: the HTTP server alone, until SIGTERM or SIGINT.
async fn api(config: &Config, prefix: &str, args: ApiArgs) -> anyhow::Result<i32> {
    redis_only(&config.broker)?;
    let broker = RedisBroker::open(&config.broker_endpoint()?, broker_options(prefix)).await?;
    let results =
        ResultBackend::open(&config.result_target()?, prefix, args.result_expires.0).await?;
    // Loaded for the task names and their queues (compiled modules come from the cache).
    let registry = Registry::load(config, 1).await?;
    let catalog = crate::api::Catalog::new(&registry, config);
    let node = format!("celeriac-api@{}", protocol::hostname());
    let metrics = Arc::new(crate::metrics::Metrics::new(&node, catalog.names())?);
    let api = crate::api::Api {
        broker,
        results,
        catalog,
        metrics,
        view: Arc::new(|| None),
        revoke_ttl: Duration::from_secs(3 * 3600),
    };
    let stop = CancellationToken::new();
    let server = crate::api::bind(&args.auth.options(args.listen), api, stop.clone()).await?;
    eprintln!("serving the HTTP API on http://{}", args.listen);
    let serving = tokio::spawn(server);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
    let _ = serving.await;
    Ok(0)
}

async fn enqueue(config: &Config, prefix: &str, args: EnqueueArgs) -> anyhow::Result<i32> {
    redis_only(&config.broker)?;
    let positional = json_flag("args", &args.args)?;
    let keywords = json_flag("kwargs", &args.kwargs)?;
    if !positional.is_array() || !keywords.is_object() {
        anyhow::bail!("--args must be a JSON array and --kwargs a JSON object");
    }
    if args.priority.is_some_and(|p| p > 9) {
        anyhow::bail!("--priority must be 0-9");
    }
    let queue = match args.queue {
        Some(q) => q,
        None => match config
            .tasks
            .get(&args.task)
            .and_then(|t| t.queue.clone())
            .or_else(|| config.route(&args.task).map(String::from))
        {
            Some(q) => q,
            // The task's own default queue is declared by its module.
            None => match Registry::load(config, 1).await {
                Ok(reg) => reg
                    .get(&args.task)
                    .map(|e| e.spec.queue.clone())
                    .unwrap_or_else(|_| "celery".into()),
                Err(_) => "celery".into(),
            },
        },
    };
    let eta = match (&args.eta, args.countdown) {
        (Some(_), Some(_)) => anyhow::bail!("give --eta or --countdown, not both"),
        (Some(t), None) => Some(
            protocol::parse_time(t)
                .ok_or_else(|| anyhow::anyhow!("--eta {t:?} is not an ISO-8601 time"))?,
        ),
        (None, Some(c)) => Some(chrono::Utc::now() + chrono::Duration::from_std(c.0)?),
        (None, None) => None,
    };
    let expires = match args.expires {
        Some(e) => Some(chrono::Utc::now() + chrono::Duration::from_std(e.0)?),
        None => None,
    };
    let broker = RedisBroker::open(&config.broker_endpoint()?, broker_options(prefix)).await?;
    if args.repeat > 1 {
        if args.id.is_some() {
            anyhow::bail!("--repeat sends new ids; it cannot be used with --id");
        }
        let opts = NewTask { priority: args.priority, eta, expires, ..NewTask::default() };
        let sent = client::enqueue_many(
            &broker,
            &args.task,
            &positional,
            &keywords,
            &queue,
            &opts,
            args.repeat,
        )
        .await?;
        println!("{sent}");
        return Ok(0);
    }
    let id = args.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    // Remembered, so the HTTP API reads it as PENDING rather than unknown until it runs.
    let results =
        ResultBackend::open(&config.result_target()?, prefix, Duration::from_secs(86_400)).await?;
    results.remember(&id).await?;
    let opts =
        NewTask { id: Some(id), priority: args.priority, eta, expires, ..NewTask::default() };
    let id = client::enqueue(&broker, &args.task, &positional, &keywords, &queue, &opts).await?;
    println!("{id}");
    Ok(0)
}

async fn dlq(broker: &RedisBroker, command: DlqCommand) -> anyhow::Result<i32> {
    match command {
        DlqCommand::List { queue: None, .. } => {
            for q in broker.dlq_queues().await? {
                let n = client::dlq_list(broker, &q, usize::MAX).await?.len();
                println!("{q}\t{n}");
            }
        }
        DlqCommand::List { queue: Some(q), limit } => {
            for r in client::dlq_list(broker, &q, limit).await? {
                println!(
                    "{}  {:<20} {:<32} attempts={} {}",
                    r["time"].as_str().unwrap_or("-"),
                    r["reason"].as_str().unwrap_or("-"),
                    r["task"].as_str().unwrap_or("-"),
                    r["attempts"],
                    r["id"].as_str().unwrap_or("-"),
                );
                println!("    {}", r["error"].as_str().unwrap_or(""));
            }
        }
        DlqCommand::Show { queue, id } => {
            let found = client::dlq_list(broker, &queue, usize::MAX)
                .await?
                .into_iter()
                .find(|r| r["id"].as_str() == Some(id.as_str()));
            match found {
                Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
                None => anyhow::bail!("no dead letter for task {id} in queue {queue}"),
            }
        }
        DlqCommand::Replay { queue, id } => {
            let n = client::dlq_replay(broker, &queue, id.as_deref()).await?;
            println!("replayed {n}");
        }
        DlqCommand::Purge { queue } => {
            let n = broker.dlq_purge(&queue).await?;
            println!("purged {n}");
        }
    }
    Ok(0)
}

/// Reads a JSON flag: inline text, or `@path` for a file.
fn json_flag(what: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("--{what}: read {path}"))?
        }
        None => text.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("--{what} is not valid JSON: {text}"))
}

async fn run(config: &Config, mut args: RunArgs) -> anyhow::Result<i32> {
    let positional = json_flag("args", &args.args)?;
    if !positional.is_array() {
        anyhow::bail!("--args must be a JSON array, e.g. --args '[1, 2]'");
    }
    let keywords = json_flag("kwargs", &args.kwargs)?;
    if !keywords.is_object() {
        anyhow::bail!("--kwargs must be a JSON object, e.g. --kwargs '{{\"x\": 1}}'");
    }
    args.args = positional.to_string();
    args.kwargs = keywords.to_string();
    let registry = Registry::load(config, 1).await?;
    let kv = match &args.kv_file {
        Some(path) => KvStore::file(path)?,
        None => KvStore::memory(),
    };
    let mut pending = VecDeque::from([Invocation {
        id: args.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        task: args.task,
        args: args.args,
        kwargs: args.kwargs,
        retries: args.retries,
    }]);
    let mut first = true;
    let mut exit = 0;
    while let Some(invocation) = pending.pop_front() {
        let (progress_tx, progress_rx) = crate::runtime::progress_channel();
        let env = RunEnv { kv: Some(kv.clone()), progress: Some(progress_tx), ..RunEnv::default() };
        let report = registry.run(&invocation, env).await?;
        if let (_, Some(p)) = &*progress_rx.borrow() {
            eprintln!("last progress: {} {}", p.state, p.meta);
        }
        if !first {
            println!();
        }
        first = false;
        print_report(&invocation, &report);
        if !report.outcome.is_success() {
            exit = 1;
        }
        if args.follow {
            pending.extend(report.children.iter().map(|c| Invocation {
                id: c.id.clone(),
                task: c.name.clone(),
                args: c.args.to_string(),
                kwargs: c.kwargs.to_string(),
                retries: 0,
            }));
        }
    }
    kv.save()?;
    Ok(exit)
}

fn print_report(invocation: &Invocation, report: &RunReport) {
    println!("task:    {} [{}]", invocation.task, invocation.id);
    match &report.outcome {
        Outcome::Success { result } => println!("result:  {result}"),
        other => {
            let (exc_type, message) = other.exception().unwrap_or_default();
            println!("error:   {exc_type}: {message}");
            if let Outcome::Trap { backtrace: Some(bt), .. } = other {
                println!("backtrace:\n{}", bt.trim_end());
            }
        }
    }
    let fuel = report.fuel_used.map(|f| f.to_string()).unwrap_or_else(|| "unmetered".into());
    println!(
        "outcome: {}  wall: {:.3}ms  fuel: {fuel}  peak memory: {}",
        report.outcome.kind(),
        report.wall.as_secs_f64() * 1000.0,
        ByteSize(report.peak_memory)
    );
    for child in &report.children {
        println!(
            "child:   {} [{}] args={} kwargs={}",
            child.name, child.id, child.args, child.kwargs
        );
    }
}

async fn modules_check(config: &Config) -> anyhow::Result<i32> {
    let registry = Registry::load(config, 1).await?;
    for module in registry.modules() {
        let from = match &module.compiled {
            crate::runtime::Compiled::FromCache => "cached".to_string(),
            crate::runtime::Compiled::Fresh => "compiled".to_string(),
            crate::runtime::Compiled::CacheRefused(why) => {
                format!("compiled; cache refused: {why}")
            }
        };
        // What a deploy needs to know before the first task: the language (so the interpreted
        // defaults are expected), the file's size, and how long this host took to compile it
        // (run `modules check` at deploy time and the workers load it from the cache).
        let f = &module.footprint;
        println!(
            "{} version {} ({from} in {:.1?}) {}, {:.1} MB, {} core instances",
            module.path.display(),
            module.version,
            module.compile_time,
            f.language,
            module.size as f64 / 1e6,
            f.core_instances
        );
        for entry in registry.tasks().filter(|e| e.module.path == module.path) {
            let s = &entry.spec;
            let soft = s.limits.soft_time_limit.map(|d| format!("{d:?}")).unwrap_or("-".into());
            println!(
                "  {:<36} queue={} soft={} hard={:?} memory={} retries={}{}",
                s.name,
                s.queue,
                soft,
                s.limits.hard_time_limit,
                ByteSize(s.limits.memory),
                s.retry.max_retries,
                s.rate_limit.map(|r| format!(" rate={r}")).unwrap_or_default()
            );
            if !entry.info.description.is_empty() {
                println!("  {:<36} {}", "", entry.info.description.lines().next().unwrap_or(""));
            }
        }
    }
    println!("{} modules, {} tasks: ok", registry.modules().len(), registry.tasks().count());
    Ok(0)
}
