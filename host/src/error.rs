//! Errors of the supervision system, each with a category for monitoring.

use crate::runtime::{AgentFault, LoadError};
use crate::{AgentPid, SupervisorId};

/// Errors that can occur in the supervision system.
#[derive(Debug, thiserror::Error)]
pub enum SupervisionError {
    /// No child with this id.
    #[error("agent {0} not found")]
    AgentNotFound(AgentPid),
    /// No node of the tree has this path or name.
    #[error("{0}")]
    NodeNotFound(String),
    /// The agent could not be created, initialised or started. Through a
    /// supervisor the message starts with the child's path
    /// (`root/echo failed to start: ...`).
    #[error("{1}")]
    AgentStartFailed(AgentPid, String),
    /// The agent failed while handling a request.
    #[error("agent {0} failed during execution: {1}")]
    AgentExecutionFailed(AgentPid, String),
    /// The agent crashed (its instance died) while handling a request.
    #[error("agent {0} crashed: {1}")]
    AgentCrashed(AgentPid, AgentFault),
    /// The supervisor's restart intensity was exceeded; it gave up.
    #[error("supervisor {0} exceeded maximum restart attempts")]
    MaxRestartsExceeded(SupervisorId),
    /// Stopping the tree failed (a supervisor task panicked).
    #[error("supervision tree shutdown failed: {0}")]
    ShutdownFailed(String),
    /// The agent spec is invalid (unknown type, bad limits, ...).
    #[error("agent specification invalid: {0}")]
    InvalidAgentSpec(String),
    /// A child with this id already exists (OTP's `already_present`).
    #[error("an agent with id {0} already exists")]
    DuplicateAgent(AgentPid),
    /// A sibling already has this name (names make paths, so they are
    /// unique among siblings); the payload is the path it would have.
    #[error("{0} already exists: names must be unique among siblings")]
    NameTaken(String),
    /// The child is running, so the operation is refused (OTP's `running`).
    #[error("agent {0} is running")]
    AgentRunning(AgentPid),
    /// The child is being restarted (OTP's `restarting`).
    #[error("agent {0} is being restarted")]
    AgentRestarting(AgentPid),
    /// The supervisor already has `max_children` children.
    #[error("maximum number of children ({0}) reached")]
    MaxChildrenReached(usize),
    /// A component could not be loaded.
    #[error(transparent)]
    Component(#[from] LoadError),
    /// JSON (de)serialisation failed.
    #[error("serialization error: {0}")]
    Serialization(#[from] serde_json::Error),
    /// A message is larger than allowed.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// The message's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An agent's reply is larger than allowed (the agent keeps running).
    #[error("reply of {len} bytes exceeds the limit of {max}")]
    ReplyTooLarge {
        /// The reply's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The agent's circuit breaker is open: it is parked until its trial
    /// start at `until`, and calls to it fail at once.
    #[error("agent {agent}'s circuit is open: it is parked until its trial start at {until}")]
    CircuitOpen {
        /// The agent.
        agent: AgentPid,
        /// When the trial start is due.
        until: chrono::DateTime<chrono::Utc>,
    },
    /// The message crashed its agent `poison_threshold` times in a row: it
    /// is quarantined (a dead letter) and not delivered.
    #[error(
        "the message (hash {hash}) is quarantined: it crashed agent {agent} too often; replay or discard it from its dead letters"
    )]
    Quarantined {
        /// The agent.
        agent: AgentPid,
        /// The message's content hash (FNV-1a, hex).
        hash: String,
    },
    /// The agent did not answer in time.
    #[error("timeout waiting for agent response")]
    Timeout,
    /// The agent could not be reached (e.g. it is restarting).
    #[error("agent communication failed: {0}")]
    CommunicationFailed(String),
    /// Anything else, with its description.
    #[error("system error: {0}")]
    System(String),
}

impl SupervisionError {
    /// Whether retrying (possibly after a restart) can succeed.
    pub fn is_recoverable(&self) -> bool {
        use SupervisionError as E;
        match self {
            E::AgentExecutionFailed(..)
            | E::AgentCrashed(..)
            | E::AgentStartFailed(..)
            | E::AgentRestarting(..)
            | E::CircuitOpen { .. }
            | E::CommunicationFailed(_)
            | E::Timeout => true,
            E::AgentNotFound(_)
            | E::NodeNotFound(_)
            | E::MaxRestartsExceeded(_)
            | E::ShutdownFailed(_)
            | E::InvalidAgentSpec(_)
            | E::DuplicateAgent(_)
            | E::NameTaken(_)
            | E::AgentRunning(_)
            | E::MaxChildrenReached(_)
            | E::Component(_)
            | E::Serialization(_)
            | E::MessageTooLarge { .. }
            | E::ReplyTooLarge { .. }
            | E::Quarantined { .. }
            | E::System(_) => false,
        }
    }

    /// The category, for monitoring and alerting.
    pub fn category(&self) -> ErrorCategory {
        use SupervisionError as E;
        match self {
            E::AgentNotFound(_) | E::NodeNotFound(_) => ErrorCategory::NotFound,
            E::AgentStartFailed(..) => ErrorCategory::Startup,
            E::AgentExecutionFailed(..) | E::AgentCrashed(..) => ErrorCategory::Runtime,
            E::MaxRestartsExceeded(_)
            | E::MaxChildrenReached(_)
            | E::MessageTooLarge { .. }
            | E::ReplyTooLarge { .. }
            | E::Quarantined { .. } => ErrorCategory::Policy,
            E::AgentRestarting(_) | E::CircuitOpen { .. } => ErrorCategory::Recovery,
            E::ShutdownFailed(_) => ErrorCategory::Shutdown,
            E::InvalidAgentSpec(_)
            | E::DuplicateAgent(_)
            | E::NameTaken(_)
            | E::AgentRunning(_)
            | E::Component(_) => ErrorCategory::Configuration,
            E::Serialization(_) => ErrorCategory::Serialization,
            E::Timeout | E::CommunicationFailed(_) => ErrorCategory::Communication,
            E::System(_) => ErrorCategory::System,
        }
    }
}

/// Error categories for monitoring and alerting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ErrorCategory {
    /// Something named does not exist.
    NotFound,
    /// Starting an agent failed.
    Startup,
    /// An agent failed while running.
    Runtime,
    /// A policy (restart intensity, limits) refused the operation.
    Policy,
    /// Recovery (restart) failed or is in progress.
    Recovery,
    /// Shutting down failed.
    Shutdown,
    /// The input (spec, config, component) is wrong.
    Configuration,
    /// Durable storage failed.
    Storage,
    /// (De)serialisation of JSON or TOML failed.
    Serialization,
    /// An agent could not be reached or did not answer.
    Communication,
    /// Anything that fits no other category.
    System,
}

/// Result type of supervision operations.
pub type SupervisionResult<T> = Result<T, SupervisionError>;
