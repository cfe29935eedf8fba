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
//! - What an agent may do besides answering messages, each deny-by-default
//!   and granted per agent: outbound HTTP ([`HttpGrants`]), calls to other
//!   agents ([`CallPattern`], [`CallAccess`]) and timers
//!   ([`AgentLimits::max_timers`]).

mod bindings;
mod cache;
mod calls;
mod component;
mod crash;
mod fault;
mod host;
mod http;
mod instance;
mod limits;
mod stdio;
mod timers;
mod wasi;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use calls::{
    CallAccess, CallHub, CallPattern, MAX_CALL_PATTERNS, MAX_CALL_TIMEOUT, MAX_PATH_BYTES,
    PatternError,
};
pub use component::{
    AGENT_FUNCTIONS, AGENT_INTERFACE, AgentComponent, LoadError, WIT_PACKAGE, WIT_VERSION,
};
pub use crash::{CrashReport, MAX_REPORT_MESSAGE};
pub use fault::{AgentFault, CallError};
pub use host::{DroppedLogs, MAX_LOG_BYTES};
pub use http::{
    HostPattern, HostPatternError, HttpGrants, MAX_ALLOWED_HOSTS, MAX_HTTP_CONCURRENT,
    MAX_HTTP_RESPONSE_BYTES,
};
pub use instance::{AgentInstance, InstanceOptions};
pub use limits::{AgentLimits, MAX_DEADLINE};
pub use timers::{MAX_TIMER_DELAY, MAX_TIMER_MESSAGE_BYTES, MAX_TIMERS_LIMIT};
pub use wasi::{Preopen, WasiGrants};

use host::HostState;

/// Longest text from a guest the host keeps (an application error, the
/// reason a start failed); longer text is cut and marked as cut.
pub const MAX_GUEST_TEXT: usize = 4096;

/// What one linear memory reserves of the address space by default on
/// 64-bit hosts: 4 GiB, so that no access of a 32-bit memory needs a bounds
/// check, and wasmtime's 32 MiB guard.
const WIDE_MEMORY_SLOT: u64 = (4 << 30) + (32 << 20);
/// The address space the pool's memories may reserve in wide slots: 16 TiB
/// of the 128 TiB of a 64-bit Linux process (about 4,000 memories).
const MEMORY_ADDRESS_BUDGET: u64 = 16 << 40;
/// The guard after each memory in narrow slots.
const NARROW_GUARD: u64 = 64 << 10;
/// Memory mappings (VMAs) the pool makes per instance slot up front: a
/// fiber stack and its guard page.
const MAPPINGS_PER_SLOT: u64 = 2;
/// Memory mappings a live agent adds (measured: its memory image, the rest
/// of its memory, its tables).
const MAPPINGS_PER_AGENT: u64 = 4;
/// Memory mappings left for everything else in the process.
const MAPPINGS_SPARE: u64 = 4096;
/// Bytes of a freed memory slot reset by copying rather than given back.
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;
/// Bytes at the top of a freed fiber stack reset by `memset` rather than
/// given back (what a call of a typical agent touches).
const KEEP_RESIDENT_STACK: usize = 16 << 10;
/// Likewise for a freed table slot.
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

/// Engine-wide settings. Per-agent limits are in [`AgentLimits`].
///
/// The pool of instance slots is sized so that `max_instances` agents fit
/// even if every one of them uses its full share (`max_*_per_agent`): a
/// greedy agent is refused by its own ceilings, never by its neighbours'.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// How many agent instances may be alive at once (pooling allocator
    /// slots). Creating one more fails with [`AgentFault::InstantiateFailed`].
    ///
    /// The pool reserves address space for every slot up front (only what
    /// agents touch becomes resident memory). While its memories fit in
    /// 16 TiB in wide slots (4 GiB each: up to about 2,000 agents at the
    /// default two memories per agent), compiled code needs no bounds
    /// checks. Beyond that each memory reserves only
    /// [`max_memory_bytes`](Self::max_memory_bytes) plus a 64 KiB guard,
    /// and the compiled code checks bounds: 100,000 agents with 64 MiB
    /// memories reserve about 13 TiB.
    pub max_instances: u32,
    /// The largest single linear memory any agent may have; agents' own
    /// [`AgentLimits::memory_bytes`] (a total over their memories) apply on
    /// top of it.
    pub max_memory_bytes: usize,
    /// The largest single table any agent may have, in elements; agents' own
    /// [`AgentLimits::table_elements`] (a total over their tables) apply on
    /// top of it.
    pub max_table_elements: usize,
    /// Most linear memories one agent (component) may define. A component
    /// with more is refused when it is loaded ([`LoadError::ExceedsLimits`]).
    pub max_memories_per_agent: u32,
    /// Most tables one agent (component) may define; likewise.
    pub max_tables_per_agent: u32,
    /// Most core module instances one agent (component) may create;
    /// likewise. Agents' own [`AgentLimits::instances`] apply on top of it.
    pub max_core_instances_per_agent: u32,
    /// WebAssembly stack size of every instance. Engine-wide: wasmtime fixes
    /// it per engine.
    pub max_wasm_stack: usize,
    /// Period of the epoch ticker: the resolution of call deadlines, and how
    /// often a busy agent yields to its neighbours.
    pub epoch_tick: Duration,
    /// Where compiled components are kept, so that loading one again skips
    /// compiling it (see [`RuntimeConfig::default_cache_dir`]); `None`: no
    /// cache. The directory is created private to the user (mode 0700); an
    /// entry is used only if it is verified to be one this host wrote for
    /// this engine, and is compiled again otherwise.
    pub compile_cache: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_instances: 1000,
            max_memory_bytes: 256 << 20,
            max_table_elements: 20_000,
            // A Rust wasip2 component has one memory and one or two tables;
            // components linked from several modules have a few of each.
            max_memories_per_agent: 2,
            max_tables_per_agent: 4,
            max_core_instances_per_agent: 64,
            max_wasm_stack: 512 << 10,
            epoch_tick: Duration::from_millis(2),
            compile_cache: None,
        }
    }
}

impl RuntimeConfig {
    /// The usual place of the compile cache: `$XDG_CACHE_HOME/agent-host/compiled`,
    /// else `$HOME/.cache/agent-host/compiled`; `None` if neither is set.
    pub fn default_cache_dir() -> Option<PathBuf> {
        let base = match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".cache"),
        };
        Some(base.join("agent-host").join("compiled"))
    }

    /// What the limiter of every store enforces besides the agent's limits.
    pub(crate) fn ceilings(&self) -> limits::Ceilings {
        limits::Ceilings {
            memory_bytes: self.max_memory_bytes,
            table_elements: self.max_table_elements,
            memories: self.max_memories_per_agent as usize,
            tables: self.max_tables_per_agent as usize,
        }
    }
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Option<cache::CompileCache>,
    config: RuntimeConfig,
    /// Agent instances alive now (each holds one slot of the pool).
    live: Arc<AtomicUsize>,
    /// Components loaded so far: compiled, and loaded from the cache.
    compiled: AtomicU64,
    from_cache: AtomicU64,
}

/// One live instance, counted in its runtime's [`Runtime::live_instances`]
/// until it is dropped.
pub(crate) struct LiveSlot(Arc<AtomicUsize>);

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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

/// The memory mappings a pool of `max_instances` slots needs once every
/// slot holds an agent.
fn mappings_needed(max_instances: u32) -> u64 {
    u64::from(max_instances) * (MAPPINGS_PER_SLOT + MAPPINGS_PER_AGENT) + MAPPINGS_SPARE
}

/// Linux's limit on a process's memory mappings (`vm.max_map_count`), if
/// it can be read.
fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Refuse a pool of `max_instances` slots that this machine's limit on
/// memory mappings would cut short (see [`check_map_count`]).
pub(crate) fn check_pool_fits(max_instances: u32) -> Result<(), RuntimeError> {
    check_map_count(max_instances, max_map_count())
}

/// Refuse a pool that the kernel's limit on memory mappings (`limit`, if
/// known) would cut short: without this check the pool fails to be created,
/// or agents fail to start one by one with `ENOMEM` once it is reached.
fn check_map_count(max_instances: u32, limit: Option<u64>) -> Result<(), RuntimeError> {
    let needed = mappings_needed(max_instances);
    match limit {
        Some(limit) if needed > limit => Err(RuntimeError(format!(
            "{max_instances} instances need about {needed} memory mappings but vm.max_map_count \
             is {limit}: raise it (`sysctl -w vm.max_map_count={}`) or lower max_instances",
            needed.next_multiple_of(65536)
        ))),
        _ => Ok(()),
    }
}

/// The runtime could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the WASM runtime: {0}")]
pub struct RuntimeError(String);

impl Runtime {
    /// A runtime with the default configuration.
    ///
    /// # Errors
    ///
    /// [`RuntimeError`] if wasmtime refuses the configuration (for example,
    /// a pool that does not fit in the address space).
    pub fn new() -> Result<Self, RuntimeError> {
        Self::with_config(RuntimeConfig::default())
    }

    /// A runtime with `config`.
    ///
    /// # Errors
    ///
    /// [`RuntimeError`] if wasmtime refuses the configuration, or the
    /// compile cache's directory cannot be made private to this user.
    pub fn with_config(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let err = |e: wasmtime::Error| RuntimeError(format!("{e:#}"));
        let n = config.max_instances;
        check_pool_fits(n)?;
        let per = |share: u32| n.saturating_mul(share.max(1));
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(per(config.max_core_instances_per_agent))
            .total_memories(per(config.max_memories_per_agent))
            .total_tables(per(config.max_tables_per_agent))
            .max_core_instances_per_component(config.max_core_instances_per_agent)
            .max_memories_per_component(config.max_memories_per_agent)
            .max_tables_per_component(config.max_tables_per_agent)
            // One fiber stack per active call.
            .total_stacks(n)
            .max_memory_size(config.max_memory_bytes)
            .table_elements(config.max_table_elements)
            // Reset a freed slot by finding the pages its instance wrote
            // (Linux's PAGEMAP_SCAN, kernel 6.7 and later) and copying them
            // back, up to these sizes, rather than by `madvise`: no page
            // table updates, no TLB shootdowns across cores, no page faults
            // when the slot is used again. What an instance wrote beyond
            // them is still given back to the kernel.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE)
            // A freed fiber stack (one per store, freed with it, off the
            // critical path by the reaper) keeps its top zeroed by memset
            // and gives the rest back: without this every slot keeps the
            // deepest stack it ever used resident, and a guest that
            // overflows its stack on purpose grows the host by 2 MiB per
            // slot it reaches (found by the chaos run).
            .async_stack_keep_resident(KEEP_RESIDENT_STACK);
        let mut wasm = Config::new();
        if u64::from(per(config.max_memories_per_agent)).saturating_mul(WIDE_MEMORY_SLOT)
            > MEMORY_ADDRESS_BUDGET
        {
            // Too many memories for wide slots: each reserves what it may
            // use, and the compiled code checks its bounds.
            let reservation = (config.max_memory_bytes as u64).next_multiple_of(NARROW_GUARD);
            wasm.memory_reservation(reservation)
                .memory_guard_size(NARROW_GUARD)
                .memory_reservation_for_growth(0);
        }
        wasm.consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .async_stack_zeroing(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(err)?;

        let mut linker = Linker::new(&engine);
        // WASI 0.2's `exit` carries only success or failure, so a non-zero
        // exit is reported as code 1.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(err)?;
        // Every agent links `wasi:http`; its `HttpGate` denies what its
        // grants do not allow (everything, by default).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(err)?;
        bindings::SupervisedAgent::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(err)?;

        let cache = match &config.compile_cache {
            Some(dir) => Some(
                cache::CompileCache::open(dir, &engine).map_err(|e| RuntimeError(e.to_string()))?,
            ),
            None => None,
        };
        spawn_ticker(&engine, config.epoch_tick);
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                cache,
                config,
                live: Arc::default(),
                compiled: AtomicU64::new(0),
                from_cache: AtomicU64::new(0),
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

    /// How many agent instances are alive now: the pool slots in use, of
    /// [`RuntimeConfig::max_instances`].
    pub fn live_instances(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// How many components this runtime compiled so far (its
    /// [compile cache](RuntimeConfig::compile_cache) did not have them, or
    /// it has none).
    pub fn components_compiled(&self) -> u64 {
        self.inner.compiled.load(Ordering::Relaxed)
    }

    /// How many components this runtime loaded from its
    /// [compile cache](RuntimeConfig::compile_cache) so far, instead of
    /// compiling them.
    pub fn components_from_cache(&self) -> u64 {
        self.inner.from_cache.load(Ordering::Relaxed)
    }

    /// Count one more live instance until the slot is dropped.
    pub(crate) fn live_slot(&self) -> LiveSlot {
        self.inner.live.fetch_add(1, Ordering::Relaxed);
        LiveSlot(self.inner.live.clone())
    }

    /// Compile, type-check and link a component given as bytes (binary or
    /// WAT text). `name` appears in errors. With a
    /// [compile cache](RuntimeConfig::compile_cache), a component compiled
    /// before is loaded from it instead.
    ///
    /// # Errors
    ///
    /// [`LoadError`]: not WebAssembly, a core module, an invalid component,
    /// one above the per-agent ceilings, one of another world, or one that
    /// imports what the host does not provide.
    ///
    /// ```
    /// # use terraphim_agent_supervisor::{LoadError, Runtime};
    /// let runtime = Runtime::new().unwrap();
    /// let err = runtime.load_bytes("notes.txt", b"hello").unwrap_err();
    /// assert!(matches!(err, LoadError::NotWasm { .. }));
    /// ```
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<AgentComponent, LoadError> {
        let inner = &*self.inner;
        let component = component::load(
            &inner.engine,
            &inner.linker,
            inner.cache.as_ref(),
            name,
            bytes,
        )?;
        let counted = if component.from_cache() {
            &inner.from_cache
        } else {
            &inner.compiled
        };
        counted.fetch_add(1, Ordering::Relaxed);
        Ok(component)
    }

    /// Compile, type-check and link the component in the file at `path`.
    ///
    /// # Errors
    ///
    /// [`LoadError::Io`] if the file cannot be read, otherwise as
    /// [`load_bytes`](Self::load_bytes).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_the_kernels_mapping_limit_cannot_hold_are_refused_up_front() {
        // Linux's default limit.
        let default = Some(65_530);
        assert!(check_map_count(RuntimeConfig::default().max_instances, default).is_ok());
        assert!(check_map_count(10_000, default).is_ok());
        let refused = check_map_count(100_000, default).expect_err("100,000 slots need more");
        let text = refused.to_string();
        assert!(text.contains("vm.max_map_count"), "{text}");
        assert!(text.contains("sysctl -w vm.max_map_count=655360"), "{text}");
        assert!(check_map_count(100_000, Some(1 << 20)).is_ok());
        // Unknown (no /proc): wasmtime has the last word.
        assert!(check_map_count(u32::MAX, None).is_ok());
    }
}
