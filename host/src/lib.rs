//! # terraphim_agent_supervisor
//!
//! Erlang/OTP-style supervision trees for AI agents, native or running as
//! sandboxed WebAssembly components.
//!
//! - [`runtime`]: one shared wasmtime engine; each WASM agent instance in
//!   its own store with its own fuel, memory, deadline and WASI grants;
//!   every way an instance dies classified as an [`AgentFault`].
//! - [`supervisor`]: supervision trees with OTP's strategies, restart types,
//!   sliding-window intensity and escalation. The restart decision is the
//!   plain, synchronously tested [`supervisor::decision`] module.
//! - [`control_protocol`]: the wire format of `agent-host`'s control
//!   socket (JSON lines), without the socket.
//! - [`AgentFactory`] / [`SupervisedAgent`]: how agents are made and driven;
//!   [`WasmAgentFactory`] makes WASM agents, [`TestAgentFactory`] native
//!   test agents.
//! - What WASM agents may do besides answering, each deny-by-default and
//!   granted in their [`AgentSpec`]: outbound HTTP ([`HttpGrants`]), calls
//!   and casts to other agents of their tree ([`CallPattern`]), and timers
//!   ([`AgentLimits::max_timers`]).
//! - `cluster` (feature `cluster`): one tree across several hosts on NATS
//!   JetStream: units placed by leases, fencing, calls by path across hosts.
//! - [`observe`]: an observer of a running tree: Prometheus metrics, JSON
//!   snapshots and (feature `http`) an HTTP server with a live tree view.

#![deny(missing_docs)]

mod agent;
#[cfg(feature = "bundled-examples")]
pub mod bench;
#[cfg(feature = "bundled-examples")]
pub mod chaos;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod control_protocol;
pub mod dead_letters;
mod error;
pub mod observe;
pub mod private_dir;
mod running;
pub mod runtime;
pub mod state;
pub mod supervisor;
pub mod text;
pub mod tree;
mod types;
mod wasm_agent;

#[cfg(feature = "bundled-examples")]
pub mod examples;

pub use agent::{
    AgentFactory, AgentSpec, AgentStats, DEFAULT_POISON_THRESHOLD, ShutdownPolicy, SupervisedAgent,
    SupervisedAgentInfo, TestAgent, TestAgentFactory,
};
pub use dead_letters::{DeadLetter, DeadLetters};
pub use error::{ErrorCategory, SupervisionError, SupervisionResult};
pub use running::{
    Node, NodeError, NodeKind, NodeStatus, ResolveError, RunningTree, TreeCallError, TreeHandle,
};
pub use runtime::{
    AgentComponent, AgentFault, AgentInstance, AgentLimits, CallAccess, CallError, CallHub,
    CallPattern, CrashReport, DroppedLogs, HostPattern, HttpGrants, InstanceOptions, LoadError,
    MAX_GUEST_TEXT, MAX_REPORT_MESSAGE, Preopen, Runtime, RuntimeConfig, RuntimeError, WasiGrants,
};
pub use state::{
    MemoryStateStore, OpenStateError, RedbStateStore, StateError, StateQuota, StateStore,
    entry_cost,
};
pub use supervisor::{
    AgentMetrics, AgentSupervisor, Backoff, BreakerPolicy, CallCounts, CallOutcome, ChildCount,
    ChildSpec, CircuitStatus, EventKind, ExitCause, HealthPolicy, HealthStatus, LatencyHistogram,
    RestartAction, RestartEntry, RestartIntensity, RestartPolicy, RestartStrategy, RestartType,
    SupervisorConfig, SupervisorEvent, SupervisorHandle, SupervisorSpec, SupervisorStatus,
};
pub use types::{
    AgentPid, AgentStatus, ExitReason, InitArgs, SupervisorId, SystemMessage, TerminateReason,
};
pub use wasm_agent::{WasmAgent, WasmAgentFactory};

/// The original `terraphim_agent_supervisor` README's examples, run as
/// doctests so that every one of them keeps compiling and working.
#[doc = include_str!("origin_readme.md")]
#[cfg(doctest)]
pub struct OriginReadmeExamples;

/// The project README's examples, run as doctests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeExamples;
