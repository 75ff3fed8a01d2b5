//! The `celeriac` command line.

use crate::config::{Config, Overrides, TaskSettings};
use crate::kv::KvStore;
use crate::registry::Registry;
use crate::runtime::{Invocation, Outcome, RunEnv, RunReport};
use crate::units::{ByteSize, HumanDuration};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use std::collections::VecDeque;
use std::path::PathBuf;
use tokio::sync::mpsc;

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
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one task locally under its limits and grants, without a broker.
    Run(RunArgs),
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
    let mut overrides = Overrides { modules: cli.modules.clone(), ..Overrides::default() };
    match cli.command {
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
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
        let env = RunEnv { kv: Some(kv.clone()), progress: Some(progress_tx), ..RunEnv::default() };
        let report = registry.run(&invocation, env).await?;
        while let Ok(p) = progress_rx.try_recv() {
            eprintln!("progress: {} {}", p.state, p.meta);
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
        let from = match module.compiled {
            crate::runtime::Compiled::FromCache => "cached",
            crate::runtime::Compiled::Fresh => "compiled",
        };
        println!("{} ({from})", module.path.display());
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
