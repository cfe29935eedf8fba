//! How a WASM agent dies, and how a wasmtime error is classified into that.
//!
//! Invariant: any [`CallError`] other than [`CallError::Application`] means
//! the instance is dead. Its store may be poisoned (wasmtime refuses to
//! re-enter a component after a failed call), so the next use of the agent
//! needs a fresh instance.

use std::fmt;

use serde::{Deserialize, Serialize};
use wasmtime::Trap;

/// Why a WASM agent's instance died. Each variant is a distinct exit reason
/// that the restart history, the status API and the error category show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentFault {
    /// Ran out of fuel: its per-message or lifetime budget.
    OutOfFuel,
    /// Tried to grow its linear memory past its limit.
    MemoryLimit,
    /// Tried to grow a table past its limit, or exceeded its instance count.
    ResourceLimit(String),
    /// A call ran past its wall-clock deadline (epoch interruption, or a
    /// host call that blocked too long).
    DeadlineExceeded,
    /// Overflowed its WebAssembly stack.
    StackOverflow,
    /// Panicked, or executed `unreachable`.
    Panic,
    /// Any other trap; the payload is wasmtime's trap code (e.g.
    /// `MemoryOutOfBounds`).
    Trap(String),
    /// Could not be instantiated.
    InstantiateFailed(String),
    /// `init` or `start` failed (returned an error or died).
    InitFailed(String),
    /// Exited through WASI with a non-zero code. (Code 0 is a normal exit.)
    Exit(i32),
    /// The host failed while serving the agent.
    Host(String),
}

impl fmt::Display for AgentFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentFault::OutOfFuel => f.write_str("out of fuel"),
            AgentFault::MemoryLimit => f.write_str("memory limit exceeded"),
            AgentFault::ResourceLimit(what) => write!(f, "resource limit exceeded: {what}"),
            AgentFault::DeadlineExceeded => f.write_str("deadline exceeded"),
            AgentFault::StackOverflow => f.write_str("stack overflow"),
            AgentFault::Panic => f.write_str("guest panic (unreachable)"),
            AgentFault::Trap(code) => write!(f, "trap: {code}"),
            AgentFault::InstantiateFailed(e) => write!(f, "failed to instantiate: {e}"),
            AgentFault::InitFailed(e) => write!(f, "failed to initialise: {e}"),
            AgentFault::Exit(code) => write!(f, "exited with code {code}"),
            AgentFault::Host(e) => write!(f, "host error: {e}"),
        }
    }
}

/// The failure of one call into an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The agent returned an application error. The instance is still alive.
    #[error("application error: {0}")]
    Application(String),
    /// The agent exited through WASI with code 0. The instance is gone.
    #[error("agent exited normally")]
    Exited,
    /// The instance died.
    #[error("agent crashed: {0}")]
    Fault(AgentFault),
}

impl CallError {
    /// Whether the instance survived this error (only application errors).
    pub fn instance_alive(&self) -> bool {
        matches!(self, CallError::Application(_))
    }
}

/// What the store observed during the failed call, beyond the error itself.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FaultHints {
    /// The resource limiter refused a memory growth.
    pub memory_refused: bool,
    /// The resource limiter refused a table growth.
    pub table_refused: bool,
}

/// Classify a wasmtime error from a call into an agent.
///
/// A Rust guest whose allocation is refused aborts with `unreachable`, the
/// same trap as a panic, so the limiter's record decides between
/// [`AgentFault::MemoryLimit`] and [`AgentFault::Panic`].
pub(crate) fn classify(err: &wasmtime::Error, hints: FaultHints) -> CallError {
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return match exit.0 {
            0 => CallError::Exited,
            code => CallError::Fault(AgentFault::Exit(code)),
        };
    }
    let fault = match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => AgentFault::OutOfFuel,
        Some(Trap::Interrupt) => AgentFault::DeadlineExceeded,
        Some(Trap::StackOverflow) => AgentFault::StackOverflow,
        Some(_) if hints.memory_refused => AgentFault::MemoryLimit,
        Some(_) if hints.table_refused => AgentFault::ResourceLimit("table elements".into()),
        Some(Trap::UnreachableCodeReached) => AgentFault::Panic,
        Some(trap) => AgentFault::Trap(format!("{trap:?}")),
        None if hints.memory_refused => AgentFault::MemoryLimit,
        None if hints.table_refused => AgentFault::ResourceLimit("table elements".into()),
        None => match count_limit(err) {
            Some(what) => AgentFault::ResourceLimit(what),
            None => AgentFault::Host(format!("{err:#}")),
        },
    };
    CallError::Fault(fault)
}

/// The resource whose per-store count a failed instantiation exceeded, if
/// that is why it failed. wasmtime reports it only as text ("resource limit
/// exceeded: memory count too high at 3"); a test pins the wording.
fn count_limit(err: &wasmtime::Error) -> Option<String> {
    err.chain().find_map(|cause| {
        let text = cause.to_string();
        let what = text
            .strip_prefix("resource limit exceeded: ")?
            .split(" count too high")
            .next()?
            .to_owned();
        Some(format!("{what} count"))
    })
}
