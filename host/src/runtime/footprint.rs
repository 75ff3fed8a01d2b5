//! What one instance of a component takes from the instance pool, and what it was written in,
//! read from the component's bytes before anything is compiled.
//!
//! The pooling allocator's totals (core instances, memories, tables) are fixed when the engine
//! is built, and the engine must exist before a component can be compiled. So the totals are
//! sized from this walk over the binary, not from the compiled component: a Rust task makes 3
//! core instances, a componentize-py one 14, and a pool sized for the first runs one of the
//! second at a time.

use anyhow::Context as _;
use wasmparser::{
    ComponentAlias, ComponentExternalKind, ComponentInstance, ComponentOuterAliasKind,
    ComponentTypeRef, Instance, KnownCustom, Parser, Payload,
};

/// The language a component's guest code was written in, as far as its build tool shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Language {
    /// Compiled straight to wasm: Rust, C, Go and the like (the producers' `language` field).
    Compiled(String),
    /// CPython built into the component by componentize-py (the version, e.g. `3.14`).
    Python(String),
    /// SpiderMonkey (StarlingMonkey) built in by componentize-js.
    JavaScript,
    /// No producers information.
    Unknown,
}

impl Language {
    /// Whether an interpreter runs the task: it needs a larger memory and burns fuel fast.
    pub fn is_interpreted(&self) -> bool {
        matches!(self, Language::Python(_) | Language::JavaScript)
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Language::Compiled(l) => f.write_str(l),
            Language::Python(v) => write!(f, "Python {v} (componentize-py)"),
            Language::JavaScript => f.write_str("JavaScript (componentize-js)"),
            Language::Unknown => f.write_str("unknown"),
        }
    }
}

/// One instance's share of the pool, and the component's language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    /// Core module instances made per component instance.
    pub core_instances: u32,
    /// Linear memories defined by those instances.
    pub memories: u32,
    /// Tables defined by those instances.
    pub tables: u32,
    /// The largest initial linear memory of any instantiated module, in bytes: the
    /// pre-initialised heap image an interpreter starts from.
    pub initial_memory: u64,
    /// What it was written in.
    pub language: Language,
}

impl Footprint {
    /// What a Rust task built with celeriac-sdk takes: the floor every engine is sized for.
    pub const RUST: Footprint = Footprint {
        core_instances: 4,
        memories: 2,
        tables: 4,
        initial_memory: 1 << 20,
        language: Language::Unknown,
    };

    /// The larger of each count, for a pool that must hold either.
    pub fn max(&self, other: &Footprint) -> Footprint {
        Footprint {
            core_instances: self.core_instances.max(other.core_instances),
            memories: self.memories.max(other.memories),
            tables: self.tables.max(other.tables),
            initial_memory: self.initial_memory.max(other.initial_memory),
            language: Language::Unknown,
        }
    }

    /// Whether a pool built for `self` fits one built for `other`.
    pub fn covers(&self, other: &Footprint) -> bool {
        self.core_instances >= other.core_instances
            && self.memories >= other.memories
            && self.tables >= other.tables
    }
}

/// What instantiating one module or component adds.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    core_instances: u32,
    memories: u32,
    tables: u32,
    initial_memory: u64,
}

impl Cost {
    fn add(&mut self, other: &Cost) {
        self.core_instances = self.core_instances.saturating_add(other.core_instances);
        self.memories = self.memories.saturating_add(other.memories);
        self.tables = self.tables.saturating_add(other.tables);
        self.initial_memory = self.initial_memory.max(other.initial_memory);
    }
}

/// One component or module being read: its index spaces (what instantiating each entry costs)
/// and, for a component, what instantiating it costs so far.
#[derive(Default)]
struct Frame {
    is_module: bool,
    modules: Vec<Cost>,
    components: Vec<Cost>,
    cost: Cost,
}

/// Reads what one instance of `wasm` takes from the pool.
pub fn footprint(wasm: &[u8]) -> anyhow::Result<Footprint> {
    // wasmtime takes the text format too; read it as the binary it stands for.
    let wasm = &*wat::parse_bytes(wasm).context("read the component's text")?;
    let mut stack: Vec<Frame> = Vec::new();
    let mut done = None;
    let mut languages: Vec<String> = Vec::new();
    let mut python = None;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.context("read the component")?;
        match payload {
            Payload::Version { encoding, .. } => stack.push(Frame {
                is_module: encoding == wasmparser::Encoding::Module,
                ..Frame::default()
            }),
            Payload::End(_) => {
                let frame = stack.pop().context("unbalanced sections")?;
                let Some(parent) = stack.last_mut() else {
                    done = Some(frame);
                    continue;
                };
                if frame.is_module {
                    let mut cost = frame.cost;
                    cost.core_instances = 1;
                    parent.modules.push(cost);
                } else {
                    parent.components.push(frame.cost);
                }
            }
            Payload::MemorySection(memories) => {
                let frame = stack.last_mut().context("memory outside a module")?;
                for memory in memories {
                    let memory = memory?;
                    frame.cost.memories += 1;
                    let bytes =
                        memory.initial.saturating_mul(1 << memory.page_size_log2.unwrap_or(16));
                    frame.cost.initial_memory = frame.cost.initial_memory.max(bytes);
                }
            }
            Payload::TableSection(tables) => {
                let frame = stack.last_mut().context("table outside a module")?;
                frame.cost.tables += tables.count();
            }
            Payload::InstanceSection(instances) => {
                let frame = stack.last_mut().context("instances outside a component")?;
                for instance in instances {
                    match instance? {
                        Instance::Instantiate { module_index, .. } => {
                            let cost = frame.modules.get(module_index as usize).copied();
                            frame.cost.add(
                                &cost.unwrap_or(Cost { core_instances: 1, ..Cost::default() }),
                            );
                        }
                        Instance::FromExports(exports) => {
                            for export in exports {
                                python = python.or_else(|| python_version(export.name));
                            }
                        }
                    }
                }
            }
            // componentize-py links CPython as a shared library: its modules export and
            // import `libpython3.14.so:...` symbols.
            Payload::ExportSection(exports) if python.is_none() => {
                for export in exports {
                    python = python_version(export?.name);
                    if python.is_some() {
                        break;
                    }
                }
            }
            Payload::ComponentInstanceSection(instances) => {
                let frame = stack.last_mut().context("instances outside a component")?;
                for instance in instances {
                    if let ComponentInstance::Instantiate { component_index, .. } = instance? {
                        let cost = frame.components.get(component_index as usize).copied();
                        frame.cost.add(&cost.unwrap_or_default());
                    }
                }
            }
            Payload::ComponentAliasSection(aliases) => {
                for alias in aliases {
                    if let ComponentAlias::Outer { kind, count, index } = alias? {
                        let depth = stack.len().checked_sub(1 + count as usize);
                        let outer = depth.and_then(|d| stack.get(d));
                        let frame_at = stack.len() - 1;
                        match kind {
                            ComponentOuterAliasKind::CoreModule => {
                                let cost =
                                    outer.and_then(|o| o.modules.get(index as usize).copied());
                                stack[frame_at].modules.push(cost.unwrap_or_default());
                            }
                            ComponentOuterAliasKind::Component => {
                                let cost =
                                    outer.and_then(|o| o.components.get(index as usize).copied());
                                stack[frame_at].components.push(cost.unwrap_or_default());
                            }
                            _ => {}
                        }
                    }
                }
            }
            Payload::ComponentImportSection(imports) => {
                let frame = stack.last_mut().context("imports outside a component")?;
                for import in imports {
                    match import?.ty {
                        ComponentTypeRef::Module(_) => frame.modules.push(Cost::default()),
                        ComponentTypeRef::Component(_) => frame.components.push(Cost::default()),
                        _ => {}
                    }
                }
            }
            Payload::ComponentExportSection(exports) => {
                let frame = stack.last_mut().context("exports outside a component")?;
                for export in exports {
                    let export = export?;
                    let i = export.index as usize;
                    match export.kind {
                        ComponentExternalKind::Module => {
                            let cost = frame.modules.get(i).copied().unwrap_or_default();
                            frame.modules.push(cost);
                        }
                        ComponentExternalKind::Component => {
                            let cost = frame.components.get(i).copied().unwrap_or_default();
                            frame.components.push(cost);
                        }
                        _ => {}
                    }
                }
            }
            Payload::CustomSection(section) => {
                if let KnownCustom::Producers(producers) = section.as_known() {
                    for field in producers.into_iter().flatten() {
                        if field.name == "language" {
                            for value in field.values.into_iter().flatten() {
                                languages.push(value.name.to_string());
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let root = done.context("the component ends early")?;
    if root.is_module {
        anyhow::bail!("a core WebAssembly module, not a component (build for wasm32-wasip2)");
    }
    // componentize-js leaves no producers mark of its own (its engine's modules say C++ and
    // Rust); the engine's name in its data does.
    let javascript =
        python.is_none() && contains(wasm, b"StarlingMonkey") && contains(wasm, b"ComponentizeJS");
    languages.sort();
    languages.dedup();
    let language = match (python, javascript) {
        (Some(v), _) => Language::Python(v),
        (None, true) => Language::JavaScript,
        (None, false) if languages.is_empty() => Language::Unknown,
        // A guest's own language comes before its C runtime's.
        (None, false) => Language::Compiled(
            languages.iter().find(|l| !l.starts_with('C')).unwrap_or(&languages[0]).clone(),
        ),
    };
    Ok(Footprint {
        core_instances: root.cost.core_instances,
        memories: root.cost.memories,
        tables: root.cost.tables,
        initial_memory: root.cost.initial_memory,
        language,
    })
}

/// `3.14` from a symbol of `libpython3.14.so`.
fn python_version(name: &str) -> Option<String> {
    let rest = name.strip_prefix("libpython")?;
    let (version, _) = rest.split_once(".so")?;
    Some(version.to_string())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_core_instance_memory_and_table_an_instance_makes() {
        let wat = r#"(component
            (core module $m (memory 2) (table 1 funcref))
            (core module $n (memory 20) (memory 1))
            (core instance (instantiate $m))
            (core instance (instantiate $m))
            (core instance (instantiate $n))
            (component $inner
                (core module $k (table 1 funcref))
                (core instance (instantiate $k))
            )
            (instance (instantiate $inner))
            (instance (instantiate $inner))
        )"#;
        let f = footprint(wat.as_bytes()).unwrap();
        assert_eq!(f.core_instances, 5, "{f:?}");
        assert_eq!(f.memories, 4, "{f:?}");
        assert_eq!(f.tables, 4, "{f:?}");
        assert_eq!(f.initial_memory, 20 * 65536, "{f:?}");
        assert_eq!(f.language, Language::Unknown);
    }

    #[test]
    fn a_module_defined_but_never_instantiated_costs_nothing() {
        let f = footprint(b"(component (core module (memory 1)))").unwrap();
        assert_eq!((f.core_instances, f.memories, f.tables), (0, 0, 0));
    }

    #[test]
    fn a_core_module_is_refused_with_the_reason() {
        let e = footprint(b"(module (memory 1))").unwrap_err();
        assert!(format!("{e:#}").contains("not a component"), "{e:#}");
        assert!(footprint(b"\0asm\x0d\0\x01\0garbage").is_err());
    }

    #[test]
    fn a_pool_covers_a_component_only_when_every_count_fits() {
        let python = Footprint { core_instances: 14, memories: 2, tables: 3, ..Footprint::RUST };
        assert!(!Footprint::RUST.covers(&python));
        let both = Footprint::RUST.max(&python);
        assert!(both.covers(&python) && both.covers(&Footprint::RUST));
        assert_eq!(both.tables, 4);
    }
}
