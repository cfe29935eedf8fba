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

/// The WIT package of the agent contract (`wit/agent.wit`).
pub const WIT_PACKAGE: &str = "terraphim:agent";

/// The version of [`WIT_PACKAGE`] this host implements. Components built
/// against any semver-compatible version (0.1.x) load: wasmtime resolves
/// imports and exports across compatible versions.
pub const WIT_VERSION: &str = "0.1.1";

/// The fully qualified name of the interface every agent exports.
pub const AGENT_INTERFACE: &str = "terraphim:agent/agent@0.1.1";

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
         with wit-bindgen against this host's wit/agent.wit (package {WIT_PACKAGE}@{WIT_VERSION}) \
         for wasm32-wasip2"
    )]
    WrongWorld {
        /// Where the bytes came from.
        name: String,
        /// What is missing or mistyped.
        missing: String,
    },
    /// A component that imports something the host does not provide (for
    /// an import of the agent package, the message names the version the
    /// host implements).
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
    let instance_pre = linker.instantiate_pre(&component).map_err(|e| {
        let mut reason = format!("{e:#}");
        if reason.contains(&format!("{WIT_PACKAGE}/")) {
            reason.push_str(&format!(
                " (this host implements {WIT_PACKAGE}@{WIT_VERSION}, and links components \
                 built against compatible versions, {})",
                compatible_range()
            ));
        }
        LoadError::UnsatisfiedImport {
            name: name.to_owned(),
            reason,
        }
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

/// A version's numbers (major, minor, patch); `None` for a pre-release or
/// anything that is not `N.N.N`.
fn numbers(version: &str) -> Option<(u64, u64, u64)> {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// Whether a component built against `version` of the package is linked
/// with this host's [`WIT_VERSION`]: the rule wasmtime applies to names
/// (same major; for 0.x the same minor; for 0.0.x the same patch).
pub(crate) fn compatible(version: &str) -> bool {
    match (numbers(version), numbers(WIT_VERSION)) {
        (Some((0, 0, a)), Some((0, 0, b))) => a == b,
        (Some((0, a, _)), Some((0, b, _))) => a == b,
        (Some((a, _, _)), Some((b, _, _))) => a == b,
        _ => version == WIT_VERSION,
    }
}

/// The versions [`compatible`] accepts, in words.
fn compatible_range() -> String {
    match numbers(WIT_VERSION) {
        Some((0, 0, _)) => WIT_VERSION.to_owned(),
        Some((0, minor, _)) => format!("0.{minor}.x"),
        Some((major, _, _)) => format!("{major}.x"),
        None => WIT_VERSION.to_owned(),
    }
}

/// Name what the component lacks of the `agent` interface, if anything.
fn check_world(engine: &Engine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    let mut other_versions = Vec::new();
    let prefix = format!("{WIT_PACKAGE}/agent@");
    for (export, item) in ty.exports(engine) {
        let Some(version) = export.strip_prefix(&prefix) else {
            continue;
        };
        if compatible(version) {
            let ComponentItem::ComponentInstance(instance) = item.ty else {
                return Err(format!("export `{export}` is not an instance"));
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
                    "interface `{export}` lacks function(s) {}",
                    missing.join(", ")
                ))
            };
        }
        other_versions.push(version.to_owned());
    }
    if other_versions.is_empty() {
        Err(format!(
            "it does not export the interface `{AGENT_INTERFACE}`"
        ))
    } else {
        Err(format!(
            "it was built against {WIT_PACKAGE}@{} (it exports {}), but this host implements \
             {WIT_PACKAGE}@{WIT_VERSION} and loads components built against {}",
            other_versions.join(", "),
            other_versions
                .iter()
                .map(|v| format!("`{prefix}{v}`"))
                .collect::<Vec<_>>()
                .join(", "),
            compatible_range()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatible_versions_follow_wasmtimes_semver_rule() {
        assert!(compatible("0.1.0"));
        assert!(compatible(WIT_VERSION));
        assert!(compatible("0.1.7"));
        assert!(!compatible("0.2.0"));
        assert!(!compatible("1.0.0"));
        assert!(!compatible("0.1.1-rc1"));
        assert!(!compatible("0.1"));
        assert_eq!(compatible_range(), "0.1.x");
    }
}
