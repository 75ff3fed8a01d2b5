//! What changes under a running worker without a restart: a module dropped into the modules
//! folder, replaced or removed, and the configuration, re-read on SIGHUP.
//!
//! Either way a new registry is built beside the running one, off the fetch path (compiling runs
//! on blocking threads, and an unchanged module is reused, not reloaded), checked whole, and put
//! in place with one pointer swap. Tasks already running finish on the version they started
//! with; the next task of each name gets the new one. A module that does not load is refused
//! and its last good version goes on serving; a configuration or a set of modules that does not
//! make a working registry is refused whole and the running one stays. Every refusal is logged
//! with its reason.
//!
//! The folder is polled rather than watched with inotify: a poll every second costs one
//! `read_dir`, works on every filesystem a container mounts, and a file still being copied
//! is noticed by its size or time changing between two polls, so it is read only once it
//! stood still.

use crate::broker::{Broker, ResultStore};
use crate::config::{Config, Overrides};
use crate::registry::Registry;
use crate::worker::Worker;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the modules folder is looked at.
pub const MODULES_POLL: Duration = Duration::from_secs(1);

/// What the folder held at one look: each `.wasm` with its size and modification time.
type Listing = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

fn listing(dir: &Path) -> Listing {
    let Ok(entries) = std::fs::read_dir(dir) else { return Listing::new() };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), (meta.len(), meta.modified().ok())))
        })
        .collect()
}

/// Told of each registry put in place, with the configuration it was built from.
pub type OnSwap = Box<dyn Fn(&Config, &Registry) + Send + Sync>;

/// Keeps a worker's registry current.
pub struct Reloader<B: Broker, R: ResultStore> {
    worker: Arc<Worker<B, R>>,
    /// Where the configuration is re-read from, and what overrides it.
    source: Option<PathBuf>,
    overrides: Overrides,
    config: Mutex<Config>,
    /// Sizes a new engine, when a reload needs one.
    max_instances: u32,
    /// Whether the worker consumes the queues its tasks are routed to (no `-Q`): a deploy
    /// that adds or removes a queue then changes what it consumes.
    queues_from_tasks: bool,
    /// The folder as the running registry was built from it.
    applied: Mutex<Listing>,
    /// Told of each registry swapped in and the configuration it was built with (the metrics'
    /// module list, a `--beat`'s entries).
    on_swap: OnSwap,
}

impl<B: Broker, R: ResultStore> Reloader<B, R> {
    /// A reloader for `worker`, which runs the registry built from `config` (read from its
    /// source with `overrides`). `on_swap` hears of every registry put in place.
    pub fn new(
        worker: Arc<Worker<B, R>>,
        config: Config,
        overrides: Overrides,
        max_instances: u32,
        queues_from_tasks: bool,
        on_swap: OnSwap,
    ) -> Arc<Self> {
        let applied = listing(&config.modules);
        Arc::new(Reloader {
            worker,
            source: config.source.clone(),
            overrides,
            config: Mutex::new(config),
            max_instances,
            queues_from_tasks,
            applied: Mutex::new(applied),
            on_swap,
        })
    }

    /// Watches the modules folder and SIGHUP until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut hangups =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!("cannot listen for SIGHUP, so the configuration is not reloaded: {e}");
                    None
                }
            };
        let hangup = async |h: &mut Option<tokio::signal::unix::Signal>| match h {
            Some(h) => h.recv().await,
            None => std::future::pending().await,
        };
        let mut polls = tokio::time::interval(MODULES_POLL);
        polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the last poll saw: a change is acted on once two polls agree.
        let mut seen = self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = hangup(&mut hangups) => self.reload_config().await,
                _ = polls.tick() => {
                    let dir = self.config.lock().unwrap_or_else(|p| p.into_inner()).modules.clone();
                    let now = listing(&dir);
                    let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if now != applied && now == seen {
                        self.redeploy().await;
                    }
                    seen = now;
                }
            }
        }
    }

    /// Rebuilds the registry from the folder as it is, under the running configuration.
    pub async fn redeploy(&self) {
        let config = self.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.apply(&config, "modules folder changed").await;
    }

    /// Re-reads the configuration and applies it with the folder as it is. An invalid
    /// configuration is refused whole, each problem logged; the running one stays.
    pub async fn reload_config(&self) {
        info!("SIGHUP: reloading the configuration");
        let config = match Config::load(self.source.as_deref(), &self.overrides) {
            Ok(c) => c,
            Err(e) => {
                for problem in &e.problems {
                    warn!("configuration reload refused: {problem}");
                }
                warn!("the running configuration stays");
                return;
            }
        };
        let running = self.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (what, before, after) in [
            ("broker", &running.broker, &config.broker),
            ("result_backend", &running.result_backend, &config.result_backend),
        ] {
            if before != after {
                warn!("{what} changed; a restart applies it (the worker stays on the old one)");
            }
        }
        if self.apply(&config, "configuration reloaded").await {
            *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
        }
    }

    /// Builds a registry for `config` and swaps it in; returns whether it did.
    async fn apply(&self, config: &Config, why: &str) -> bool {
        let folder = listing(&config.modules);
        let current = self.worker.registry();
        let (next, refused) = match current.reload(config, self.max_instances).await {
            Ok(r) => r,
            Err(e) => {
                warn!("{why}, but refused: {e:#}; the running modules and configuration stay");
                // Not retried until the folder changes again (or the next SIGHUP).
                *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = folder;
                return false;
            }
        };
        for r in &refused {
            warn!("module refused: {r}");
        }
        let changes = changes(&current, &next);
        let next = Arc::new(next);
        self.worker.swap_registry(next.clone());
        (self.on_swap)(config, &next);
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = folder;
        if changes.is_empty() {
            info!("{why}: no module changed");
        } else {
            info!("{why}: {}", changes.join("; "));
        }
        if self.queues_from_tasks {
            self.follow_queues(&current, &next).await;
        }
        true
    }

    /// Consumes the queues the new tasks are routed to, and stops consuming those only the
    /// old ones were. Celery's default queue is always consumed.
    async fn follow_queues(&self, before: &Registry, after: &Registry) {
        let queues = |r: &Registry| {
            let mut q: Vec<String> = r.tasks().map(|e| e.spec.queue.clone()).collect();
            q.push("celery".into());
            q.sort();
            q.dedup();
            q
        };
        let (old, new) = (queues(before), queues(after));
        for q in new.iter().filter(|q| !old.contains(q)) {
            match self.worker.consume(q).await {
                Ok(true) => info!(queue = %q, "consuming a queue the deployed tasks are routed to"),
                Ok(false) => {}
                Err(e) => {
                    warn!(queue = %q, "cannot consume a queue the deployed tasks are routed to: {e}")
                }
            }
        }
        for q in old.iter().filter(|q| !new.contains(q)) {
            if crate::control::Node::cancel_queue(&*self.worker, q) {
                info!(queue = %q, "no task routed to this queue is served any more: not consuming it");
            }
        }
    }
}

/// What differs between two registries, one line per module: added, replaced (old and new
/// version), removed.
pub fn changes(before: &Registry, after: &Registry) -> Vec<String> {
    let by_path = |r: &Registry| -> BTreeMap<PathBuf, String> {
        r.modules().iter().map(|m| (m.path.clone(), m.version.to_string())).collect()
    };
    let (old, new) = (by_path(before), by_path(after));
    let name =
        |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut lines = Vec::new();
    for (path, version) in &new {
        match old.get(path) {
            None => lines.push(format!("{} {version} added", name(path))),
            Some(was) if was != version => {
                lines.push(format!("{} {was} replaced by {version}", name(path)))
            }
            Some(_) => {}
        }
    }
    for (path, version) in &old {
        if !new.contains_key(path) {
            lines.push(format!("{} {version} removed", name(path)));
        }
    }
    lines
}
