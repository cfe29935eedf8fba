//! Identifiers, statuses and reasons shared by the supervisor and the agents.
//!
//! These are the types of the original `terraphim_agent_supervisor` API. The
//! WASM-specific detail of *why* an instance died lives in
//! [`AgentFault`](crate::AgentFault), carried by [`ExitReason::Fault`].

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::runtime::AgentFault;

/// Unique identifier of an agent. It stays the same across restarts of the
/// same child, so it also keys the agent's durable state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentPid(pub Uuid);

impl AgentPid {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// The id named `name`: the same for the same name on every run (a
    /// UUID v5), so that an agent that keeps its name keeps its durable
    /// state across restarts of the host. Tree files name each agent by its
    /// path (`root/team/echo`).
    pub fn named(name: &str) -> Self {
        /// The namespace of these ids (a fixed, random UUID).
        const NAMESPACE: Uuid = Uuid::from_u128(0xc494_26ac_fe37_4e01_bb39_8eb7_a687_53e1);
        Self(Uuid::new_v5(&NAMESPACE, name.as_bytes()))
    }

    /// The id as text.
    pub fn as_str(&self) -> String {
        self.0.to_string()
    }
}

impl Default for AgentPid {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for AgentPid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Unique identifier of a supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SupervisorId(pub Uuid);

impl SupervisorId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// The id as text.
    pub fn as_str(&self) -> String {
        self.0.to_string()
    }
}

impl Default for SupervisorId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SupervisorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Lifecycle state of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentStatus {
    /// Being initialised and started.
    Starting,
    /// Started and answering messages.
    Running,
    /// Being stopped by its supervisor.
    Stopping,
    /// Stopped (not running, spec kept).
    Stopped,
    /// Exited abnormally and not (yet) restarted.
    Failed(String),
    /// Being restarted by its supervisor.
    Restarting,
}

/// Why an agent exited. `Normal` and `Shutdown` (and `SupervisorShutdown`)
/// are normal exits for restart types; everything else is abnormal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The agent finished its work (for a WASM agent: WASI exit code 0).
    Normal,
    /// The agent was shut down on request.
    Shutdown,
    /// The agent was killed without a chance to clean up.
    Kill,
    /// The agent failed with an error.
    Error(String),
    /// The agent did not answer in time.
    Timeout,
    /// The agent's supervisor shut down.
    SupervisorShutdown,
    /// A WASM agent's instance died: trap, limit, failed instantiation or a
    /// non-zero WASI exit.
    Fault(AgentFault),
    /// The agent failed its health checks (too many in a row, or one that
    /// trapped or did not answer in time); the reason says which.
    Unhealthy(String),
}

impl ExitReason {
    /// Whether OTP would call this exit abnormal (what a `Transient` child is
    /// restarted for).
    pub fn is_abnormal(&self) -> bool {
        !matches!(
            self,
            ExitReason::Normal | ExitReason::Shutdown | ExitReason::SupervisorShutdown
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("normal"),
            ExitReason::Shutdown => f.write_str("shutdown"),
            ExitReason::Kill => f.write_str("killed"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
            ExitReason::Timeout => f.write_str("timeout"),
            ExitReason::SupervisorShutdown => f.write_str("supervisor shutdown"),
            ExitReason::Fault(fault) => fmt::Display::fmt(fault, f),
            ExitReason::Unhealthy(why) => write!(f, "unhealthy: {why}"),
        }
    }
}

/// Why an agent is being terminated, as told to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TerminateReason {
    /// It finished its work.
    Normal,
    /// Its supervisor is shutting it down.
    Shutdown,
    /// It failed with this error.
    Error(String),
    /// It did not answer in time.
    Timeout,
    /// Its supervisor asked (e.g. terminate child).
    SupervisorRequest,
}

/// Control messages from a supervisor to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SystemMessage {
    /// The agent is about to be stopped.
    Shutdown,
    /// The agent is about to be restarted.
    Restart,
    /// A health-check request.
    HealthCheck,
    /// The agent's status changed.
    StatusUpdate(AgentStatus),
    /// A free-form message.
    SupervisorMessage(String),
}

/// What an agent is given at initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitArgs {
    /// The agent's id (stable across restarts).
    pub agent_id: AgentPid,
    /// The id of its supervisor.
    pub supervisor_id: SupervisorId,
    /// The agent's configuration from its spec.
    pub config: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_id_is_the_same_on_every_run() {
        // Pinned: changing the namespace or the scheme would orphan every
        // agent's durable state.
        assert_eq!(
            AgentPid::named("root/echo").to_string(),
            "9faa254f-3a89-50e1-9998-df16ee016fdc"
        );
        assert_ne!(AgentPid::named("root/echo"), AgentPid::named("root/echo2"));
    }
}
