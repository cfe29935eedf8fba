//! The WASM runtime: one shared wasmtime [`Engine`] for many short-lived,
//! isolated agent instances.
//!
//! - [`Runtime`] owns the engine (pooling allocator, copy-on-write memory
//!   images, fuel, epoch interruption) and the linker with WASI and the
//!   agent-facing host interfaces, plus the epoch ticker thread.
//! - [`AgentComponent`] is a compiled, type-checked component with its
//!   `InstancePre`: the per-restart path only creates a store and
//!   instantiates.
//! - [`AgentInstance`] is one live agent: one `Store` with its own limits.
//! - [`AgentFault`] says how an instance died.

mod bindings;
mod component;
mod fault;
mod host;
mod instance;
mod limits;
mod wasi;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use component::{AGENT_FUNCTIONS, AGENT_INTERFACE, AgentComponent, LoadError};
pub use fault::{AgentFault, CallError};
pub use instance::{AgentInstance, InstanceOptions};
pub use limits::AgentLimits;
pub use wasi::{Preopen, WasiGrants};

use host::HostState;

/// Engine-wide settings. Per-agent limits are in [`AgentLimits`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// How many agent instances may be alive at once (pooling allocator
    /// slots). Creating one more fails with [`AgentFault::InstantiateFailed`].
    pub max_instances: u32,
    /// The largest linear memory any agent may have; agents' own
    /// [`AgentLimits::memory_bytes`] are capped by it.
    pub max_memory_bytes: usize,
    /// WebAssembly stack size of every instance. Engine-wide: wasmtime fixes
    /// it per engine.
    pub max_wasm_stack: usize,
    /// Period of the epoch ticker: the resolution of call deadlines, and how
    /// often a busy agent yields to its neighbours.
    pub epoch_tick: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_instances: 1000,
            max_memory_bytes: 256 << 20,
            max_wasm_stack: 512 << 10,
            epoch_tick: Duration::from_millis(2),
        }
    }
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
}

/// The shared WASM runtime. Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The runtime could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the WASM runtime: {0}")]
pub struct RuntimeError(String);

impl Runtime {
    /// A runtime with the default configuration.
    pub fn new() -> Result<Self, RuntimeError> {
        Self::with_config(RuntimeConfig::default())
    }

    /// A runtime with `config`.
    pub fn with_config(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let err = |e: wasmtime::Error| RuntimeError(format!("{e:#}"));
        let n = config.max_instances;
        let mut pool = PoolingAllocationConfig::new();
        // A Rust wasip2 component holds a few core instances, one or two
        // memories and tables, and needs one fiber stack per active call.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(config.max_memory_bytes);
        let mut wasm = Config::new();
        wasm.consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(err)?;

        let mut linker = Linker::new(&engine);
        // WASI 0.2's `exit` carries only success or failure, so a non-zero
        // exit is reported as code 1.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(err)?;
        bindings::SupervisedAgent::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(err)?;

        spawn_ticker(&engine, config.epoch_tick);
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                config,
            }),
        })
    }

    /// The engine-wide configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The underlying engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Compile, type-check and link a component given as bytes (binary or
    /// WAT text). `name` appears in errors.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<AgentComponent, LoadError> {
        component::load(&self.inner.engine, &self.inner.linker, name, bytes)
    }

    /// Compile, type-check and link the component in the file at `path`.
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<AgentComponent, LoadError> {
        let path = path.as_ref();
        let bytes = component::read_file(path)?;
        self.load_bytes(&path.display().to_string(), &bytes)
    }
}

/// Advance the engine's epoch every `tick` on a plain thread, until the
/// engine is dropped.
fn spawn_ticker(engine: &Engine, tick: Duration) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("wasm-epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(tick);
            }
        });
    if let Err(e) = spawned {
        // Without a ticker, deadlines still hold through the async timeout
        // around every call; only busy loops lose their periodic yield.
        tracing::error!("cannot start the epoch ticker thread: {e}");
    }
}

/// Serde support for durations written as whole milliseconds.
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
