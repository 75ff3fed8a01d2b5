//! The loaded task components and which task each one serves, with every task's settings
//! resolved. Built once before the first task runs: a module that does not load, a task served
//! twice or a configured task that nobody serves stops startup with a clear message.

use crate::config::{Config, ConfigError, TaskSpec};
use crate::runtime::{
    Footprint, Invocation, Module, RunEnv, RunReport, Runtime, RuntimeConfig, TaskInfo,
};
use anyhow::Context as _;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One task: the module that serves it, what it declared, and its resolved settings.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The component serving the task.
    pub module: Arc<Module>,
    /// What the component declared.
    pub info: TaskInfo,
    /// Limits, grants, queue and retry policy after every configuration layer.
    pub spec: TaskSpec,
}

/// The runtime and every task it can run.
pub struct Registry {
    runtime: Arc<Runtime>,
    modules: Vec<Arc<Module>>,
    tasks: BTreeMap<String, Entry>,
}

/// A task name no loaded module serves.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown task {0:?}: no loaded module serves it")]
pub struct UnknownTask(pub String);

/// A task's queue is the one its spec gives; a task nobody here serves goes to Celery's default
/// queue, `celery`.
impl crate::canvas::Router for Registry {
    fn queue_for(&self, name: &str) -> String {
        self.get(name).map(|e| e.spec.queue.clone()).unwrap_or_else(|_| "celery".into())
    }
}

impl Registry {
    /// Builds the runtime for `config`, loads every module in its modules folder and resolves each
    /// task. `max_instances` is the most tasks that will run at once.
    pub async fn load(config: &Config, max_instances: u32) -> anyhow::Result<Registry> {
        Self::load_fitting(config, runtime_config(config, max_instances)).await
    }

    /// Loads every module into an engine built for `runtime_config`, or into a bigger one when
    /// the tasks turn out to need it.
    async fn load_fitting(
        config: &Config,
        mut runtime_config: RuntimeConfig,
    ) -> anyhow::Result<Registry> {
        let registry = Self::load_with(config, runtime_config.clone()).await?;
        // A component's own `describe` may ask for fuel or a bigger memory than the engine was
        // built for; that is only known after loading, so build once more to fit.
        if !registry.fits() {
            runtime_config.fuel |= registry.needs_fuel();
            runtime_config.max_memory = runtime_config.max_memory.max(registry.max_memory());
            return Self::load_with(config, runtime_config).await;
        }
        Ok(registry)
    }

    async fn load_with(config: &Config, runtime_config: RuntimeConfig) -> anyhow::Result<Registry> {
        let runtime = Arc::new(Runtime::new(runtime_config)?);
        let modules: Vec<Arc<Module>> =
            runtime.load_dir(&config.modules).await?.into_iter().map(Arc::new).collect();
        Self::resolve(config, runtime, modules)
    }

    /// What the modules folder and `config` make now, built beside this registry for a swap:
    /// a module whose file did not change is reused as it is, a changed or new one is loaded.
    /// One that fails to load is refused (the reason is in the second part of the answer): its
    /// last good version, if this registry has one, goes on serving. An error means the new
    /// registry as a whole would not work (a task served twice, a configured task nobody
    /// serves, a bad setting); this one then stays. `max_instances` sizes a new engine, needed
    /// only when the tasks now ask for fuel or more memory than this engine was built for, or
    /// a new component takes more from the pool per instance.
    pub async fn reload(
        &self,
        config: &Config,
        max_instances: u32,
    ) -> anyhow::Result<(Registry, Vec<String>)> {
        let mut paths = wasm_files(&config.modules)?;
        paths.sort();
        let wanted = runtime_config(config, max_instances);
        let engine = self.runtime.config();
        if !engine.footprint.covers(&wanted.footprint) {
            // Modules belong to the engine that compiled them, so a last good version cannot
            // serve on a new engine: every module must load, or this registry stays whole.
            let mut bigger = wanted;
            bigger.fuel |= engine.fuel;
            bigger.max_memory = bigger.max_memory.max(engine.max_memory);
            let registry = Self::load_fitting(config, bigger).await.context(
                "a new module needs a bigger instance pool; keeping the current modules",
            )?;
            return Ok((registry, Vec::new()));
        }
        let mut modules = Vec::with_capacity(paths.len());
        let mut refused = Vec::new();
        for path in paths {
            let last = self.modules.iter().find(|m| m.path == path);
            let loaded = match std::fs::read(&path) {
                Ok(wasm) => {
                    let version = crate::runtime::module_version(&wasm);
                    match last.filter(|m| *m.version == *version) {
                        Some(same) => Ok(same.clone()),
                        None => self.runtime.load_bytes(&path, &wasm).await.map(Arc::new),
                    }
                }
                Err(e) => Err(anyhow::anyhow!("read {}: {e}", path.display())),
            };
            match (loaded, last) {
                (Ok(module), _) => modules.push(module),
                (Err(e), Some(last)) => {
                    refused.push(format!("{e:#}; version {} goes on serving", last.version));
                    modules.push(last.clone());
                }
                (Err(e), None) => refused.push(format!("{e:#}; not loaded")),
            }
        }
        let registry = Self::resolve(config, self.runtime.clone(), modules)?;
        let grown = (wanted.fuel && !engine.fuel) || wanted.max_memory > engine.max_memory;
        if !grown && registry.fits() {
            return Ok((registry, refused));
        }
        // Modules belong to the engine that compiled them: a bigger engine loads them all again
        // (from the disk cache, mostly).
        let mut bigger = wanted;
        bigger.fuel |= engine.fuel || registry.needs_fuel();
        bigger.max_memory = bigger.max_memory.max(engine.max_memory).max(registry.max_memory());
        bigger.footprint = bigger.footprint.max(&engine.footprint);
        let runtime = Arc::new(Runtime::new(bigger)?);
        let mut modules = Vec::with_capacity(registry.modules.len());
        for module in &registry.modules {
            let wasm = std::fs::read(&module.path)
                .map_err(|e| anyhow::anyhow!("read {}: {e}", module.path.display()))?;
            modules.push(Arc::new(runtime.load_bytes(&module.path, &wasm).await?));
        }
        Ok((Self::resolve(config, runtime, modules)?, refused))
    }

    /// Whether the engine can run every task under its limits.
    fn fits(&self) -> bool {
        let engine = self.runtime.config();
        (engine.fuel || !self.needs_fuel()) && self.max_memory() <= engine.max_memory
    }

    fn needs_fuel(&self) -> bool {
        self.tasks.values().any(|e| e.spec.limits.fuel.is_some())
    }

    fn max_memory(&self) -> u64 {
        self.tasks.values().map(|e| e.spec.limits.memory).max().unwrap_or(0)
    }

    /// Resolves every task the modules serve under `config`.
    fn resolve(
        config: &Config,
        runtime: Arc<Runtime>,
        modules: Vec<Arc<Module>>,
    ) -> anyhow::Result<Registry> {
        let mut tasks: BTreeMap<String, Entry> = BTreeMap::new();
        let mut problems = Vec::new();
        // Tasks some module serves, whether or not their settings were valid.
        let mut served = std::collections::BTreeSet::new();
        for module in &modules {
            for info in &module.tasks {
                let wanted = config.tasks.get(&info.name).and_then(|t| t.module.as_deref());
                if wanted.is_some_and(|w| w != module.name) {
                    continue;
                }
                served.insert(info.name.clone());
                if let Some(existing) = tasks.get(&info.name) {
                    problems.push(format!(
                        "task {:?} is served by both {} and {}; set tasks.\"{}\".module to choose",
                        info.name,
                        existing.module.path.display(),
                        module.path.display(),
                        info.name
                    ));
                    continue;
                }
                let interpreted = module.footprint.language.is_interpreted();
                match config.resolve(&info.name, &module.name, info, interpreted) {
                    Ok(spec) => {
                        let entry = Entry { module: module.clone(), info: info.clone(), spec };
                        tasks.insert(info.name.clone(), entry);
                    }
                    Err(e) => problems.extend(e.problems),
                }
            }
        }
        let at = config.source.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        for name in config.tasks.keys().filter(|n| !served.contains(*n)) {
            problems.push(format!(
                "{at}: tasks.\"{name}\": no module in {} serves this task",
                config.modules.display()
            ));
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems }.into());
        }
        grant_child_queues(&mut tasks);
        Ok(Registry { runtime, modules, tasks })
    }

    /// The runtime the modules were loaded into.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The loaded modules, sorted by file name.
    pub fn modules(&self) -> &[Arc<Module>] {
        &self.modules
    }

    /// Every task, by name.
    pub fn tasks(&self) -> impl Iterator<Item = &Entry> {
        self.tasks.values()
    }

    /// One task.
    pub fn get(&self, name: &str) -> Result<&Entry, UnknownTask> {
        self.tasks.get(name).ok_or_else(|| UnknownTask(name.to_string()))
    }

    /// Runs one task under its resolved limits and grants.
    pub async fn run(
        &self,
        invocation: &Invocation,
        env: RunEnv,
    ) -> Result<RunReport, UnknownTask> {
        let entry = self.get(&invocation.task)?;
        let spec = &entry.spec;
        Ok(self
            .runtime
            .run(&entry.module, invocation, &spec.limits, spec.grants.clone(), env)
            .await)
    }
}

/// The `*.wasm` files of the modules folder.
fn wasm_files(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("read modules folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect())
}

/// The most any component in `dir` takes from the pool per instance. A file that cannot be read
/// or parsed counts for nothing here: loading it reports why.
fn folder_footprint(dir: &std::path::Path) -> Footprint {
    let files = wasm_files(dir).unwrap_or_default();
    files
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|wasm| crate::runtime::footprint(&wasm).ok())
        .fold(Footprint::RUST, |all, one| all.max(&one))
}

/// The engine `config` asks for, with room for `max_instances` tasks at once of the largest
/// component in its modules folder.
fn runtime_config(config: &Config, max_instances: u32) -> RuntimeConfig {
    let layers = std::iter::once(&config.defaults)
        .chain(config.tasks.values())
        .chain(std::iter::once(&config.overrides));
    let mut runtime_config = RuntimeConfig {
        max_instances: max_instances.max(1) + 2,
        cache_dir: config.cache.clone(),
        footprint: folder_footprint(&config.modules),
        ..RuntimeConfig::default()
    };
    for layer in layers {
        runtime_config.fuel |= layer.fuel.is_some();
        if let Some(m) = layer.memory {
            runtime_config.max_memory = runtime_config.max_memory.max(m.0);
        }
    }
    runtime_config
}

/// A task may send a child to its own queue and to the queue of any task it may enqueue (what
/// a child would get anyway without naming one), besides the globs its config grants.
fn grant_child_queues(tasks: &mut BTreeMap<String, Entry>) {
    let queues: Vec<(String, String)> =
        tasks.values().map(|e| (e.spec.name.clone(), e.spec.queue.clone())).collect();
    for entry in tasks.values_mut() {
        let grants = &mut entry.spec.grants;
        let mut allowed = vec![entry.spec.queue.clone()];
        for (name, queue) in &queues {
            if grants.enqueue.iter().any(|g| crate::runtime::glob_match(g, name)) {
                allowed.push(queue.clone());
            }
        }
        allowed.retain(|q| !grants.child_queues.contains(q));
        allowed.sort();
        allowed.dedup();
        grants.child_queues.extend(allowed);
    }
}
