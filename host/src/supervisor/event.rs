//! Lifecycle events of a supervision tree.
//!
//! Every supervisor of a tree sends to the same broadcast channel. An event
//! says when it happened, which node it is about (by path, `root/team/echo`)
//! and what happened; a restart also says why: which child's exit caused it,
//! and whether the restarted child is that child or a bystander restarted
//! with it (`one_for_all`, `rest_for_one`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::runtime::CrashReport;
use crate::{AgentPid, ExitReason, SupervisorId};

/// One lifecycle event of a supervision tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorEvent {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// The supervisor that reports it.
    pub supervisor: SupervisorId,
    /// The node it is about: the child's path for child events, the
    /// supervisor's own path for [`EventKind::Escalated`] and
    /// [`EventKind::SupervisorStopped`].
    pub path: String,
    /// What happened to the node.
    pub kind: EventKind,
}

impl SupervisorEvent {
    /// The path of the node the event is about.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What happened to the node.
    pub fn kind(&self) -> &EventKind {
        &self.kind
    }

    /// The child the event is about, if it is about a child.
    pub fn agent(&self) -> Option<&AgentPid> {
        match &self.kind {
            EventKind::ChildStarted { agent, .. }
            | EventKind::ChildExited { agent, .. }
            | EventKind::ChildRestarted { agent, .. }
            | EventKind::ChildStopped { agent, .. }
            | EventKind::ChildRemoved { agent }
            | EventKind::CircuitOpened { agent, .. }
            | EventKind::CircuitHalfOpen { agent }
            | EventKind::CircuitClosed { agent }
            | EventKind::MessageQuarantined { agent, .. } => Some(agent),
            EventKind::Escalated | EventKind::SupervisorStopped => None,
        }
    }
}

/// What happened to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// A child was added and started.
    ChildStarted {
        /// The child it is about.
        agent: AgentPid,
        /// Its name, if it has one.
        name: Option<String>,
    },
    /// A child exited on its own, or was reported exited.
    ChildExited {
        /// The child it is about.
        agent: AgentPid,
        /// Why it exited.
        reason: ExitReason,
        /// What is known about the crash, for an abnormal exit of an agent.
        crash: Option<Box<CrashReport>>,
    },
    /// A child was restarted.
    ChildRestarted {
        /// The child it is about.
        agent: AgentPid,
        /// Its restart count now.
        restart_count: u32,
        /// The exit that caused the restart.
        cause: ExitCause,
        /// Whether the child was restarted because a sibling exited (it is
        /// not `cause.agent`).
        bystander: bool,
    },
    /// A child was stopped by its supervisor.
    ChildStopped {
        /// The child it is about.
        agent: AgentPid,
        /// Whether it was killed (brutal kill, or it did not stop within its
        /// shutdown timeout) rather than stopping on request.
        killed: bool,
    },
    /// A child's spec was removed.
    ChildRemoved {
        /// The child it is about.
        agent: AgentPid,
    },
    /// The child's circuit breaker opened: it is parked, not restarted,
    /// until its trial start at `until`.
    CircuitOpened {
        /// The child it is about.
        agent: AgentPid,
        /// When the trial start is due.
        until: DateTime<Utc>,
    },
    /// The child's circuit breaker is half-open: its trial start began.
    CircuitHalfOpen {
        /// The child it is about.
        agent: AgentPid,
    },
    /// The child's trial ran through its probation: its circuit closed.
    CircuitClosed {
        /// The child it is about.
        agent: AgentPid,
    },
    /// A message crashed the child `poison_threshold` times in a row: it
    /// is quarantined (a dead letter).
    MessageQuarantined {
        /// The child it is about.
        agent: AgentPid,
        /// The message's content hash (FNV-1a, hex).
        hash: String,
    },
    /// The supervisor exceeded its restart intensity and gave up.
    Escalated,
    /// The supervisor stopped.
    SupervisorStopped,
}

/// The exit of a child that caused restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitCause {
    /// The child that exited (or failed to start).
    pub agent: AgentPid,
    /// Its path in the tree.
    pub path: String,
    /// Why it exited.
    pub reason: ExitReason,
}
