//! Supervision trees with Erlang/OTP semantics.
//!
//! - [`decision`]: the restart decision as plain functions (what to stop,
//!   what to restart, when to give up), with no runtime in it.
//! - `actor`: the supervisor task that owns a tree level's state and carries
//!   out decisions; `child`: the tasks that own running children.
//! - [`AgentSupervisor`] / [`SupervisorHandle`]: the handles users hold.

mod actor;
pub mod backoff;
pub mod breaker;
mod cell;
mod child;
pub mod decision;
mod event;
mod handle;
pub mod health;
pub mod meter;
mod policy;
mod view;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use backoff::Backoff;
pub use breaker::BreakerPolicy;
pub use decision::{RestartStrategy, RestartType};
pub use event::{EventKind, ExitCause, SupervisorEvent};
pub use handle::{AgentSupervisor, DEFAULT_ROOT_NAME, SupervisorHandle};
pub use health::{HealthPolicy, HealthStatus};
pub use meter::{AgentMetrics, CallCounts, CallOutcome, LatencyHistogram};
pub use policy::{RestartIntensity, RestartPolicy};

use crate::runtime::CrashReport;
use crate::{AgentFactory, AgentPid, AgentSpec, ExitReason, ShutdownPolicy, SupervisorId};

/// Configuration of one supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisorConfig {
    /// The supervisor's id.
    pub supervisor_id: SupervisorId,
    /// Strategy and intensity.
    pub restart_policy: RestartPolicy,
    /// Bound on starting a child (create + init + start) and on a call's
    /// reply.
    pub agent_timeout: Duration,
    /// Time between two health checks of an agent whose spec sets no
    /// [`HealthPolicy`] of its own; zero turns them off.
    pub health_check_interval: Duration,
    /// How long a health check may take (agents without a policy of their
    /// own).
    #[serde(
        default = "default_health_check_timeout",
        with = "crate::runtime::duration_ms"
    )]
    pub health_check_timeout: Duration,
    /// Failed health checks in a row that end an agent (agents without a
    /// policy of their own).
    #[serde(default = "default_health_threshold")]
    pub health_threshold: u32,
    /// Most children this supervisor accepts.
    pub max_children: usize,
    /// Largest message [`AgentSupervisor::call`] accepts, and largest reply
    /// it passes back, in bytes.
    pub max_message_bytes: usize,
    /// Most restart-history entries kept (oldest dropped first).
    pub max_history: usize,
    /// Most bytes the restart history may weigh (each entry's size and the
    /// text it holds; oldest dropped first).
    #[serde(default = "default_max_history_bytes")]
    pub max_history_bytes: usize,
}

fn default_max_history_bytes() -> usize {
    1 << 20
}

fn default_health_check_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_health_threshold() -> u32 {
    3
}

impl SupervisorConfig {
    /// The health policy of agents whose spec sets none.
    pub fn health_policy(&self) -> HealthPolicy {
        HealthPolicy {
            interval: self.health_check_interval,
            timeout: self.health_check_timeout,
            threshold: self.health_threshold,
        }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            supervisor_id: SupervisorId::new(),
            restart_policy: RestartPolicy::default(),
            agent_timeout: Duration::from_secs(30),
            health_check_interval: Duration::from_secs(60),
            health_check_timeout: default_health_check_timeout(),
            health_threshold: default_health_threshold(),
            max_children: 100,
            max_message_bytes: 1 << 20,
            max_history: 10_000,
            max_history_bytes: default_max_history_bytes(),
        }
    }
}

/// State of a supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupervisorStatus {
    /// Starting its initial children.
    Starting,
    /// Supervising its children.
    Running,
    /// Stopping its children.
    Stopping,
    /// Not running (never started, or stopped).
    Stopped,
    /// Gave up: its restart intensity was exceeded.
    Failed(String),
}

/// What a supervisor did about one exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartAction {
    /// The exited child was restarted.
    Restarted,
    /// The child was stopped and restarted because a sibling exited
    /// (one-for-all, rest-for-one); the payload is that sibling.
    RestartedWithSibling(AgentPid),
    /// Not restarted; spec kept (transient child exiting normally, or a
    /// child terminated on request).
    NotRestarted,
    /// Not restarted; spec removed (temporary child).
    Removed,
    /// A restart attempt failed to start the child.
    StartFailed,
    /// The restart intensity was exceeded: the supervisor gave up.
    Escalated,
    /// The child's circuit breaker opened: it is parked, not restarted,
    /// until its trial start at `until`.
    CircuitOpened {
        /// When the trial start is due.
        until: DateTime<Utc>,
    },
    /// The child's circuit breaker is half-open: its trial start began.
    CircuitHalfOpen,
    /// The child's trial ran through its probation: its circuit closed.
    CircuitClosed,
    /// A message crashed the child `poison_threshold` times in a row: it is
    /// quarantined (a dead letter) and never delivered again.
    Quarantined {
        /// The message's content hash (FNV-1a, hex).
        hash: String,
    },
}

/// Where a child's circuit breaker is, as its status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CircuitStatus {
    /// Failures are counted; the child is restarted as usual.
    Closed,
    /// The child is parked until its trial start at `until`; calls to it
    /// fail at once with `CircuitOpen`.
    Open {
        /// When the trial start is due.
        until: DateTime<Utc>,
    },
    /// A trial start is under way or on probation.
    HalfOpen,
}

/// One entry of the restart history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestartEntry {
    /// The child concerned.
    pub agent_id: AgentPid,
    /// Its path in the tree.
    #[serde(default)]
    pub path: String,
    /// When the exit was handled.
    pub timestamp: DateTime<Utc>,
    /// Why it exited.
    pub reason: ExitReason,
    /// What the supervisor did.
    pub action: RestartAction,
    /// What is known about the crash, for an abnormal exit of an agent.
    #[serde(default)]
    pub crash: Option<Box<CrashReport>>,
}

/// A nested supervisor, as a child of another supervisor.
#[derive(Clone)]
pub struct SupervisorSpec {
    /// Its id as a child of its parent.
    pub id: AgentPid,
    /// Name for humans.
    pub name: Option<String>,
    /// Its configuration (its id is replaced by its id as a child).
    pub config: SupervisorConfig,
    /// The factory of its agents.
    pub factory: Arc<dyn AgentFactory>,
    /// Its initial children, started in order.
    pub children: Vec<ChildSpec>,
    /// When its parent restarts it.
    pub restart_type: RestartType,
    /// How its parent stops it (OTP's default for supervisors: infinity).
    pub shutdown: ShutdownPolicy,
    /// How long its parent waits before restarting it.
    pub backoff: Backoff,
    /// Its circuit breaker in its parent, if it has one.
    pub breaker: Option<BreakerPolicy>,
}

impl std::fmt::Debug for SupervisorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorSpec")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("config", &self.config)
            .field("children", &self.children)
            .field("restart_type", &self.restart_type)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

impl SupervisorSpec {
    /// A permanent nested supervisor with no children yet.
    pub fn new(config: SupervisorConfig, factory: Arc<dyn AgentFactory>) -> Self {
        Self {
            id: AgentPid::new(),
            name: None,
            config,
            factory,
            children: Vec::new(),
            restart_type: RestartType::Permanent,
            shutdown: ShutdownPolicy::Infinity,
            backoff: Backoff::Immediate,
            breaker: None,
        }
    }

    /// Set how long its parent waits before restarting it.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Give it a circuit breaker in its parent.
    pub fn with_breaker(mut self, breaker: BreakerPolicy) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Set its name.
    pub fn with_name(mut self, name: String) -> Self {
        self.name = Some(name);
        self
    }

    /// Set its id (as a child; also its `SupervisorId`).
    pub fn with_id(mut self, id: AgentPid) -> Self {
        self.id = id;
        self
    }

    /// Add an initial child.
    pub fn with_child(mut self, child: impl Into<ChildSpec>) -> Self {
        self.children.push(child.into());
        self
    }

    /// Set its restart type.
    pub fn with_restart_type(mut self, restart_type: RestartType) -> Self {
        self.restart_type = restart_type;
        self
    }

    /// Set its shutdown policy.
    pub fn with_shutdown(mut self, shutdown: ShutdownPolicy) -> Self {
        self.shutdown = shutdown;
        self
    }
}

/// A child of a supervisor: an agent or a nested supervisor.
#[derive(Debug, Clone)]
pub enum ChildSpec {
    /// A worker agent.
    Agent(AgentSpec),
    /// A nested supervisor.
    Supervisor(SupervisorSpec),
}

impl From<AgentSpec> for ChildSpec {
    fn from(spec: AgentSpec) -> Self {
        ChildSpec::Agent(spec)
    }
}

impl From<SupervisorSpec> for ChildSpec {
    fn from(spec: SupervisorSpec) -> Self {
        ChildSpec::Supervisor(spec)
    }
}

impl ChildSpec {
    /// The child's id.
    pub fn id(&self) -> &AgentPid {
        match self {
            ChildSpec::Agent(a) => &a.agent_id,
            ChildSpec::Supervisor(s) => &s.id,
        }
    }

    /// The child's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        match self {
            ChildSpec::Agent(a) => a.name.as_deref(),
            ChildSpec::Supervisor(s) => s.name.as_deref(),
        }
    }

    /// The child's restart type.
    pub fn restart_type(&self) -> RestartType {
        match self {
            ChildSpec::Agent(a) => a.restart_type,
            ChildSpec::Supervisor(s) => s.restart_type,
        }
    }

    /// The child's shutdown policy.
    pub fn shutdown(&self) -> ShutdownPolicy {
        match self {
            ChildSpec::Agent(a) => a.shutdown,
            ChildSpec::Supervisor(s) => s.shutdown,
        }
    }

    /// How long the child waits before each restart.
    pub fn backoff(&self) -> Backoff {
        match self {
            ChildSpec::Agent(a) => a.backoff,
            ChildSpec::Supervisor(s) => s.backoff,
        }
    }

    /// The child's circuit breaker, if it has one.
    pub fn breaker(&self) -> Option<BreakerPolicy> {
        match self {
            ChildSpec::Agent(a) => a.breaker,
            ChildSpec::Supervisor(s) => s.breaker,
        }
    }
}

/// OTP's `count_children`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChildCount {
    /// All child specs.
    pub specs: usize,
    /// Children running now.
    pub active: usize,
    /// Children that are supervisors.
    pub supervisors: usize,
    /// Children that are workers.
    pub workers: usize,
}
