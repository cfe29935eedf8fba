//! Loading agent components: bytes or a file in, a prepared component out,
//! or a typed error that says what is wrong with the input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use super::bindings::SupervisedAgentPre;
use super::cache::{CompileCache, Lookup};
use super::host::HostState;

/// The fully qualified name of the interface every agent exports.
pub const AGENT_INTERFACE: &str = "terraphim:agent/agent@0.1.0";

/// The functions of [`AGENT_INTERFACE`].
pub const AGENT_FUNCTIONS: &[&str] = &[
    "init",
    "start",
    "stop",
    "handle-message",
    "handle-system-message",
    "health-check",
    "terminate",
];

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The bytes are neither WebAssembly binary nor text.
    #[error("{name} is not WebAssembly: {reason}")]
    NotWasm {
        /// Where the bytes came from.
        name: String,
        /// What the parser said.
        reason: String,
    },
    /// A core module, not a component.
    #[error(
        "{name} is a core WebAssembly module, not a component: build the agent for \
         `wasm32-wasip2` (or wrap the module with `wasm-tools component new`)"
    )]
    CoreModule {
        /// Where the bytes came from.
        name: String,
    },
    /// A component wasmtime rejects (invalid, or uses unsupported features).
    #[error("{name} is not a valid component: {reason}")]
    Invalid {
        /// Where the bytes came from.
        name: String,
        /// What wasmtime said.
        reason: String,
    },
    /// A component that needs more than one agent may have: more memories,
    /// tables or core instances, or larger ones, than the runtime's
    /// per-agent ceilings ([`RuntimeConfig`](super::RuntimeConfig)).
    #[error(
        "{name} needs more than one agent may have: {reason}; raise the runtime's per-agent \
         ceilings (RuntimeConfig::max_memories_per_agent, max_tables_per_agent, \
         max_core_instances_per_agent, max_memory_bytes, max_table_elements) or build a \
         smaller component"
    )]
    ExceedsLimits {
        /// Where the bytes came from.
        name: String,
        /// What wasmtime's pooling allocator said.
        reason: String,
    },
    /// A component that does not implement the `supervised-agent` world.
    #[error(
        "{name} does not implement the world `supervised-agent`: {missing}; build the agent \
         with wit-bindgen against this host's wit/agent.wit (package terraphim:agent@0.1.0) \
         for wasm32-wasip2"
    )]
    WrongWorld {
        /// Where the bytes came from.
        name: String,
        /// What is missing or mistyped.
        missing: String,
    },
    /// A component that imports something the host does not provide.
    #[error("{name} imports something the host does not provide: {reason}")]
    UnsatisfiedImport {
        /// Where the bytes came from.
        name: String,
        /// What wasmtime said.
        reason: String,
    },
}

/// A compiled, linked and type-checked agent component, ready to be
/// instantiated cheaply any number of times. Cloning is cheap.
#[derive(Clone)]
pub struct AgentComponent {
    name: Arc<str>,
    from_cache: bool,
    pub(crate) pre: SupervisedAgentPre<HostState>,
}

impl std::fmt::Debug for AgentComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentComponent")
            .field("name", &self.name)
            .field("from_cache", &self.from_cache)
            .finish_non_exhaustive()
    }
}

impl AgentComponent {
    /// Where the component came from (a path or a given name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether its compiled code came from the runtime's compile cache
    /// rather than from compiling it now.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
}

/// The layer field of a WebAssembly binary header: 0 for core modules, 1 for
/// components.
fn binary_layer(bytes: &[u8]) -> Option<u16> {
    if bytes.len() >= 8 && bytes[..4] == *b"\0asm" {
        Some(u16::from_le_bytes([bytes[6], bytes[7]]))
    } else {
        None
    }
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Compile (or find in `cache`) and link `bytes` (binary or WAT text) as an
/// agent component.
pub(crate) fn load(
    engine: &Engine,
    linker: &wasmtime::component::Linker<HostState>,
    cache: Option<&CompileCache>,
    name: &str,
    bytes: &[u8],
) -> Result<AgentComponent, LoadError> {
    let binary = match binary_layer(bytes) {
        Some(_) => std::borrow::Cow::Borrowed(bytes),
        None if std::str::from_utf8(bytes).is_err() => {
            return Err(LoadError::NotWasm {
                name: name.to_owned(),
                reason: "neither a WebAssembly binary (no `\\0asm` header) nor WAT text".into(),
            });
        }
        None => wat::parse_bytes(bytes).map_err(|e| LoadError::NotWasm {
            name: name.to_owned(),
            reason: format!(
                "not valid WAT text: {}",
                e.to_string().lines().next().unwrap_or("")
            ),
        })?,
    };
    match binary_layer(&binary) {
        Some(1) => {}
        Some(0) => {
            return Err(LoadError::CoreModule {
                name: name.to_owned(),
            });
        }
        _ => {
            return Err(LoadError::NotWasm {
                name: name.to_owned(),
                reason: "unknown WebAssembly binary layer".into(),
            });
        }
    }
    let (component, from_cache) = compile(engine, cache, name, &binary)?;
    check_world(engine, &component).map_err(|missing| LoadError::WrongWorld {
        name: name.to_owned(),
        missing,
    })?;
    let instance_pre =
        linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::UnsatisfiedImport {
                name: name.to_owned(),
                reason: format!("{e:#}"),
            })?;
    let pre = SupervisedAgentPre::new(instance_pre).map_err(|e| LoadError::WrongWorld {
        name: name.to_owned(),
        missing: format!("{e:#}"),
    })?;
    Ok(AgentComponent {
        name: name.into(),
        from_cache,
        pre,
    })
}

/// The compiled `binary`: from `cache` if it holds a verified entry, else
/// compiled now (and kept in `cache`); whether it came from the cache.
fn compile(
    engine: &Engine,
    cache: Option<&CompileCache>,
    name: &str,
    binary: &[u8],
) -> Result<(Component, bool), LoadError> {
    let entry = cache.map(|cache| (cache, cache.entry(binary)));
    if let Some((cache, path)) = &entry {
        match cache.lookup(engine, path) {
            Lookup::Hit(component) => return Ok((component, true)),
            Lookup::Miss(None) => {}
            Lookup::Miss(Some(why)) => tracing::warn!(
                "compile cache: not using {} ({why}); compiling {name} again",
                path.display()
            ),
        }
    }
    let component = Component::new(engine, binary).map_err(|e| {
        let reason = format!("{e:#}");
        let name = name.to_owned();
        // The pooling allocator checks every component against its
        // per-component limits when it is compiled; its messages all name it.
        if reason.contains("pooling allocator") {
            LoadError::ExceedsLimits { name, reason }
        } else {
            LoadError::Invalid { name, reason }
        }
    })?;
    if let Some((cache, path)) = &entry
        && let Err(why) = cache.store(&component, path)
    {
        tracing::warn!("compile cache: {why}; {name} is compiled again next time");
    }
    Ok((component, false))
}

/// Name what the component lacks of the `agent` interface, if anything.
fn check_world(engine: &Engine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    let mut other_versions = Vec::new();
    for (export, item) in ty.exports(engine) {
        if export == AGENT_INTERFACE {
            let ComponentItem::ComponentInstance(instance) = item.ty else {
                return Err(format!("export `{AGENT_INTERFACE}` is not an instance"));
            };
            let have: Vec<&str> = instance.exports(engine).map(|(n, _)| n).collect();
            let missing: Vec<&str> = AGENT_FUNCTIONS
                .iter()
                .copied()
                .filter(|f| !have.contains(f))
                .collect();
            return if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "interface `{AGENT_INTERFACE}` lacks function(s) {}",
                    missing.join(", ")
                ))
            };
        }
        if export.starts_with("terraphim:agent/agent@") {
            other_versions.push(export.to_owned());
        }
    }
    if other_versions.is_empty() {
        Err(format!(
            "it does not export the interface `{AGENT_INTERFACE}`"
        ))
    } else {
        Err(format!(
            "it exports {} but this host implements `{AGENT_INTERFACE}`",
            other_versions.join(", ")
        ))
    }
}
