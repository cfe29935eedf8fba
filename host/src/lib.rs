//! # terraphim_agent_supervisor
//!
//! Erlang/OTP-style supervision trees for AI agents that run as sandboxed
//! WebAssembly components.

#![warn(missing_docs)]

pub mod runtime;
pub mod state;
mod types;

pub use runtime::{
    AgentComponent, AgentFault, AgentInstance, AgentLimits, CallError, InstanceOptions, LoadError,
    Preopen, Runtime, RuntimeConfig, WasiGrants,
};
pub use state::{MemoryStateStore, StateError, StateQuota, StateStore};
pub use types::{
    AgentPid, AgentStatus, ExitReason, InitArgs, SupervisorId, SystemMessage, TerminateReason,
};
#[cfg(feature = "bundled-examples")]
pub mod examples;
