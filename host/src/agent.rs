//! The agent side of supervision: the [`SupervisedAgent`] trait every child
//! implements (natively or through a WASM component), the [`AgentFactory`]
//! that creates them, and the [`AgentSpec`] that describes one child.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::runtime::{AgentLimits, CallPattern, CrashReport, HttpGrants, WasiGrants};
use crate::supervisor::{
    Backoff, BreakerPolicy, CircuitStatus, HealthPolicy, HealthStatus, RestartType,
};
use crate::{
    AgentPid, AgentStatus, ExitReason, InitArgs, SupervisionError, SupervisionResult, SupervisorId,
    SystemMessage, TerminateReason,
};

/// An agent that a supervisor can start, stop, message and restart.
///
/// An agent is owned by one task and called one request at a time, so it
/// must be `Send` but need not be `Sync`.
///
/// Only the lifecycle (`init`, `start`, `stop`) is required. An `Err` from
/// `handle_message` is an application error returned to the caller; the agent
/// keeps running. An agent *dies* when a call panics or when
/// [`exit_reason`](Self::exit_reason) reports an exit after a call: its
/// supervisor then applies its restart strategy.
#[async_trait]
pub trait SupervisedAgent: Send {
    /// Initialise with the given arguments (once per instance).
    async fn init(&mut self, args: InitArgs) -> SupervisionResult<()>;

    /// Start the agent's work.
    async fn start(&mut self) -> SupervisionResult<()>;

    /// Stop gracefully: release what the agent holds before it is dropped.
    async fn stop(&mut self) -> SupervisionResult<()>;

    /// Handle one application message and reply.
    async fn handle_message(&mut self, message: String) -> SupervisionResult<String> {
        let _ = message;
        Err(SupervisionError::System(
            "this agent does not handle messages".into(),
        ))
    }

    /// Handle a control message from the supervisor.
    async fn handle_system_message(&mut self, message: SystemMessage) -> SupervisionResult<()> {
        let _ = message;
        Ok(())
    }

    /// Whether the agent is healthy. Takes `&mut self` because a WASM agent
    /// answers it by running guest code.
    async fn health_check(&mut self) -> SupervisionResult<bool> {
        Ok(true)
    }

    /// Last call before the agent is dropped.
    async fn terminate(&mut self, reason: TerminateReason) -> SupervisionResult<()> {
        let _ = reason;
        Ok(())
    }

    /// `Some` once the agent has exited on its own (crashed, or finished);
    /// checked by the supervisor after every call. The default never exits.
    fn exit_reason(&self) -> Option<ExitReason> {
        None
    }

    /// What the agent can tell about its crash once it has exited
    /// abnormally (a WASM agent: its backtrace, its last output, fuel and
    /// memory). The supervisor adds the message it was handling. The default
    /// tells nothing more than the exit reason.
    fn crash_report(&self) -> Option<CrashReport> {
        None
    }

    /// When the agent's earliest timer is due (a message the agent sends
    /// itself later; see the WIT `timers` interface), if it has one. Its
    /// worker sleeps until then, takes the message with
    /// [`take_due_timer`](Self::take_due_timer) and delivers it through
    /// [`handle_message`](Self::handle_message) like any other message,
    /// dropping the reply. Read after every call: must be cheap and must not
    /// block. The default has no timers.
    fn next_timer_due(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// Remove and return the message of the earliest timer if it is due at
    /// `now` (each timer's message is taken once). The default has none.
    fn take_due_timer(&mut self, now: tokio::time::Instant) -> Option<String> {
        let _ = now;
        None
    }

    /// What the agent consumes now, if it can tell cheaply (a WASM agent
    /// can: fuel, linear memory, durable state). Read by its worker after
    /// its start, after each call (a timer's delivery is one) and after each
    /// health check, for the observer ([`crate::observe`]); must not block.
    /// The default: `None`.
    fn stats(&self) -> Option<AgentStats> {
        None
    }
}

/// What an agent instance consumes, as [`SupervisedAgent::stats`] reports
/// it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Fuel this instance consumed since it was created.
    pub fuel_used: u64,
    /// Bytes of linear memory it holds, summed over its memories.
    pub memory_bytes: u64,
    /// Bytes of durable state the agent holds (as its quota counts them).
    pub state_bytes: u64,
}

/// How a child is stopped (OTP's `shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownPolicy {
    /// Killed at once, without a `stop` call.
    BrutalKill,
    /// Asked to stop; killed if it has not stopped within the duration.
    Timeout(Duration),
    /// Asked to stop; waited for as long as it takes (for supervisors).
    Infinity,
}

impl Default for ShutdownPolicy {
    fn default() -> Self {
        ShutdownPolicy::Timeout(Duration::from_secs(5))
    }
}

/// The description of one supervised agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSpec {
    /// Unique id of the agent; kept across restarts.
    pub agent_id: AgentPid,
    /// Agent type: which factory recipe creates it.
    pub agent_type: String,
    /// Configuration, passed to `init`.
    pub config: serde_json::Value,
    /// Name for humans and logs.
    pub name: Option<String>,
    /// When to restart it (OTP's `restart`).
    #[serde(default)]
    pub restart_type: RestartType,
    /// How to stop it (OTP's `shutdown`).
    #[serde(default)]
    pub shutdown: ShutdownPolicy,
    /// Resource limits of a WASM agent (ignored by native agents).
    #[serde(default)]
    pub limits: Option<AgentLimits>,
    /// WASI capabilities of a WASM agent (ignored by native agents).
    #[serde(default)]
    pub wasi: WasiGrants,
    /// Outbound HTTP a WASM agent may make (none by default).
    #[serde(default)]
    pub http: HttpGrants,
    /// The agents a WASM agent may call and cast to, by path pattern (none
    /// by default). See [`CallPattern`].
    #[serde(default)]
    pub calls: Vec<CallPattern>,
    /// How its health is checked; `None`: as its supervisor's
    /// configuration says.
    #[serde(default)]
    pub health: Option<HealthPolicy>,
    /// How long its supervisor waits before restarting it.
    #[serde(default)]
    pub backoff: Backoff,
    /// Its circuit breaker, if it has one.
    #[serde(default)]
    pub breaker: Option<BreakerPolicy>,
    /// Crashes in a row on the same message after which that message is
    /// quarantined (never delivered again, kept as a dead letter); 0 turns
    /// the quarantine off.
    #[serde(default = "default_poison_threshold")]
    pub poison_threshold: u32,
}

/// The default [`AgentSpec::poison_threshold`]: a message that crashed its
/// agent three times in a row is all but surely what kills it.
pub const DEFAULT_POISON_THRESHOLD: u32 = 3;

fn default_poison_threshold() -> u32 {
    DEFAULT_POISON_THRESHOLD
}

impl AgentSpec {
    /// A spec with a fresh id, permanent restart and the default shutdown.
    pub fn new(agent_type: String, config: serde_json::Value) -> Self {
        Self {
            agent_id: AgentPid::new(),
            agent_type,
            config,
            name: None,
            restart_type: RestartType::default(),
            shutdown: ShutdownPolicy::default(),
            limits: None,
            wasi: WasiGrants::default(),
            http: HttpGrants::default(),
            calls: Vec::new(),
            health: None,
            backoff: Backoff::Immediate,
            breaker: None,
            poison_threshold: DEFAULT_POISON_THRESHOLD,
        }
    }

    /// Set after how many crashes in a row on one message that message is
    /// quarantined (0: never).
    pub fn with_poison_threshold(mut self, threshold: u32) -> Self {
        self.poison_threshold = threshold;
        self
    }

    /// Set how its health is checked.
    pub fn with_health(mut self, health: HealthPolicy) -> Self {
        self.health = Some(health);
        self
    }

    /// Set how long its supervisor waits before restarting it.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Give it a circuit breaker.
    pub fn with_breaker(mut self, breaker: BreakerPolicy) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Set the name.
    pub fn with_name(mut self, name: String) -> Self {
        self.name = Some(name);
        self
    }

    /// Set the id.
    pub fn with_id(mut self, agent_id: AgentPid) -> Self {
        self.agent_id = agent_id;
        self
    }

    /// Set the restart type.
    pub fn with_restart_type(mut self, restart_type: RestartType) -> Self {
        self.restart_type = restart_type;
        self
    }

    /// Set the shutdown policy.
    pub fn with_shutdown(mut self, shutdown: ShutdownPolicy) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Set the resource limits (WASM agents).
    pub fn with_limits(mut self, limits: AgentLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Set the WASI grants (WASM agents).
    pub fn with_wasi(mut self, wasi: WasiGrants) -> Self {
        self.wasi = wasi;
        self
    }

    /// Set the outbound HTTP grants (WASM agents).
    pub fn with_http(mut self, http: HttpGrants) -> Self {
        self.http = http;
        self
    }

    /// Set the paths the agent may call and cast to (WASM agents).
    pub fn with_calls(mut self, calls: Vec<CallPattern>) -> Self {
        self.calls = calls;
        self
    }
}

/// What a supervisor knows about one child (an agent or a nested
/// supervisor), as of the last change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisedAgentInfo {
    /// The child's id. A nested supervisor's [`SupervisorId`] is the same id.
    pub pid: AgentPid,
    /// The supervisor it is a child of.
    pub supervisor_id: SupervisorId,
    /// Its name, if it has one (unique among its siblings).
    pub name: Option<String>,
    /// Its path in the tree: its supervisor's path, `/`, and its name (or
    /// its id if it has no name), e.g. `root/team/echo`.
    pub path: String,
    /// Its spec if it is an agent; `None` for a nested supervisor.
    pub spec: Option<AgentSpec>,
    /// Its status now.
    pub status: AgentStatus,
    /// When its current instance started.
    pub start_time: DateTime<Utc>,
    /// How many times it was restarted (bystander restarts included).
    pub restart_count: u32,
    /// When it was last restarted.
    pub last_restart: Option<DateTime<Utc>>,
    /// When it was last health-checked.
    pub last_health_check: Option<DateTime<Utc>>,
    /// Why it last exited, if it ever did.
    pub last_exit: Option<ExitReason>,
    /// Its last health check, if it had one.
    pub health: Option<HealthStatus>,
    /// Its circuit breaker, if it has one.
    pub circuit: Option<CircuitStatus>,
    /// The report of its last crash, if it crashed.
    pub last_crash: Option<Box<CrashReport>>,
}

impl SupervisedAgentInfo {
    /// Info for a child about to start for the first time.
    pub(crate) fn new(
        pid: AgentPid,
        supervisor_id: SupervisorId,
        name: Option<String>,
        path: String,
        spec: Option<AgentSpec>,
    ) -> Self {
        Self {
            pid,
            supervisor_id,
            name,
            path,
            spec,
            status: AgentStatus::Starting,
            start_time: Utc::now(),
            restart_count: 0,
            last_restart: None,
            last_health_check: None,
            last_exit: None,
            health: None,
            circuit: None,
            last_crash: None,
        }
    }

    /// Whether the child is a nested supervisor.
    pub fn is_supervisor(&self) -> bool {
        self.spec.is_none()
    }

    /// Whether the child is running.
    pub fn is_running(&self) -> bool {
        matches!(self.status, AgentStatus::Running)
    }

    /// Whether the child has failed.
    pub fn is_failed(&self) -> bool {
        matches!(self.status, AgentStatus::Failed(_))
    }

    /// Time since its current instance started.
    pub fn uptime(&self) -> chrono::Duration {
        Utc::now() - self.start_time
    }
}

/// Creates agents from specs.
#[async_trait]
pub trait AgentFactory: Send + Sync {
    /// Create a new (not yet initialised) agent for `spec`.
    async fn create_agent(&self, spec: &AgentSpec) -> SupervisionResult<Box<dyn SupervisedAgent>>;

    /// Check a spec before anything is started.
    fn validate_spec(&self, spec: &AgentSpec) -> SupervisionResult<()>;

    /// The agent types this factory creates.
    fn supported_types(&self) -> Vec<String>;

    /// Where this factory's agents keep their state, if anywhere: their
    /// supervisor keeps their dead letters there too (durable when the state
    /// is). The default: none (dead letters are kept in memory).
    fn state_store(&self) -> Option<Arc<dyn crate::StateStore>> {
        None
    }

    /// The child described by `spec` left its supervision tree for good (a
    /// temporary child that exited, `delete_child`): release what the
    /// factory keeps for it, such as its durable state. Not called on
    /// restarts, nor when a tree stops. The default keeps nothing.
    fn release_agent(&self, spec: &AgentSpec) {
        let _ = spec;
    }

    /// A tree whose agents this factory creates is starting: `tree` is its
    /// handle, valid from now on (its children start after this returns).
    /// A factory whose agents call other agents keeps it (see
    /// [`CallHub`](crate::CallHub)). Called by [`AgentSupervisor::start`](crate::AgentSupervisor::start)
    /// for the root's factory and every nested supervisor's among the
    /// initial children, and by [`TreeHandle::add_child`](crate::TreeHandle::add_child)
    /// for the supervisors it adds. The default keeps nothing.
    fn attach_tree(&self, tree: &crate::TreeHandle) {
        let _ = tree;
    }
}

/// A minimal native agent, for tests and examples: it runs, echoes
/// messages, and exits when told `exit:<reason>` (`exit:normal`,
/// `exit:shutdown`, anything else is an error exit) or panics on `panic`.
#[derive(Debug, Default)]
pub struct TestAgent {
    status: Option<AgentStatus>,
    exit: Option<ExitReason>,
}

#[async_trait]
impl SupervisedAgent for TestAgent {
    async fn init(&mut self, _args: InitArgs) -> SupervisionResult<()> {
        self.status = Some(AgentStatus::Starting);
        Ok(())
    }

    async fn start(&mut self) -> SupervisionResult<()> {
        self.status = Some(AgentStatus::Running);
        Ok(())
    }

    async fn stop(&mut self) -> SupervisionResult<()> {
        self.status = Some(AgentStatus::Stopped);
        Ok(())
    }

    async fn handle_message(&mut self, message: String) -> SupervisionResult<String> {
        match message.as_str() {
            "panic" => panic!("test agent asked to panic"),
            "exit:normal" => self.exit = Some(ExitReason::Normal),
            "exit:shutdown" => self.exit = Some(ExitReason::Shutdown),
            m if m.starts_with("exit:") => self.exit = Some(ExitReason::Error(m[5..].into())),
            _ => {}
        }
        Ok(message)
    }

    async fn health_check(&mut self) -> SupervisionResult<bool> {
        Ok(matches!(self.status, Some(AgentStatus::Running)))
    }

    fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.clone()
    }
}

/// Factory of [`TestAgent`]s, for agent type `"test"`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TestAgentFactory;

#[async_trait]
impl AgentFactory for TestAgentFactory {
    async fn create_agent(&self, spec: &AgentSpec) -> SupervisionResult<Box<dyn SupervisedAgent>> {
        self.validate_spec(spec)?;
        Ok(Box::new(TestAgent::default()))
    }

    fn validate_spec(&self, spec: &AgentSpec) -> SupervisionResult<()> {
        if spec.agent_type != "test" {
            return Err(SupervisionError::InvalidAgentSpec(format!(
                "unsupported agent type `{}` (this factory supports: test)",
                spec.agent_type
            )));
        }
        Ok(())
    }

    fn supported_types(&self) -> Vec<String> {
        vec!["test".to_string()]
    }
}
