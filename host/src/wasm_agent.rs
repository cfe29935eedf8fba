//! WASM agents under supervision: [`WasmAgentFactory`] maps agent types to
//! components, and each agent it creates drives one [`AgentInstance`].
//!
//! Calls between agents: the factory is created before its tree exists, so
//! it holds a [`CallHub`] (shared by its clones) that the tree attaches
//! itself to when it starts (`AgentFactory::attach_tree`, before any child
//! starts). Each agent gets the hub with its id and its spec's `calls`, and
//! finds its tree and path on its first call.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::runtime::{
    AgentComponent, AgentFault, AgentInstance, AgentLimits, CallAccess, CallError, CallHub,
    InstanceOptions, LoadError, MAX_CALL_PATTERNS, Runtime,
};
use crate::state::{MemoryStateStore, StateStore};
use crate::{
    AgentFactory, AgentPid, AgentSpec, AgentStats, ExitReason, InitArgs, SupervisedAgent,
    SupervisionError, SupervisionResult, SystemMessage, TerminateReason, TreeHandle,
};

/// Creates WASM agents: each agent type names a component; each agent gets
/// a fresh instance (its own store and limits) of that component.
///
/// All agents of a factory share one state store, namespaced by agent id,
/// so a restarted agent finds the state its previous instance stored.
#[derive(Clone)]
pub struct WasmAgentFactory {
    runtime: Runtime,
    components: BTreeMap<String, AgentComponent>,
    default_limits: AgentLimits,
    state: Arc<dyn StateStore>,
    calls: CallHub,
}

impl std::fmt::Debug for WasmAgentFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmAgentFactory")
            .field("types", &self.components.keys().collect::<Vec<_>>())
            .field("default_limits", &self.default_limits)
            .finish_non_exhaustive()
    }
}

impl WasmAgentFactory {
    /// A factory with no agent types, default limits and an in-memory state
    /// store.
    pub fn new(runtime: Runtime) -> Self {
        Self {
            runtime,
            components: BTreeMap::new(),
            default_limits: AgentLimits::default(),
            state: Arc::new(MemoryStateStore::default()),
            calls: CallHub::new(),
        }
    }

    /// Register `component` as `agent_type`.
    pub fn with_component(
        mut self,
        agent_type: impl Into<String>,
        component: AgentComponent,
    ) -> Self {
        self.components.insert(agent_type.into(), component);
        self
    }

    /// Load the component at `path` and register it as `agent_type`.
    pub fn with_component_file(
        self,
        agent_type: impl Into<String>,
        path: impl AsRef<Path>,
    ) -> Result<Self, LoadError> {
        let component = self.runtime.load_file(path)?;
        Ok(self.with_component(agent_type, component))
    }

    /// Limits for specs that set none.
    pub fn with_default_limits(mut self, limits: AgentLimits) -> Self {
        self.default_limits = limits;
        self
    }

    /// Use `state` as the agents' durable state.
    pub fn with_state_store(mut self, state: Arc<dyn StateStore>) -> Self {
        self.state = state;
        self
    }

    /// The runtime the agents run in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    fn component(&self, spec: &AgentSpec) -> SupervisionResult<&AgentComponent> {
        self.components.get(&spec.agent_type).ok_or_else(|| {
            let known: Vec<&str> = self.components.keys().map(String::as_str).collect();
            SupervisionError::InvalidAgentSpec(format!(
                "unknown agent type `{}` (known types: {})",
                spec.agent_type,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
    }
}

#[async_trait]
impl AgentFactory for WasmAgentFactory {
    async fn create_agent(&self, spec: &AgentSpec) -> SupervisionResult<Box<dyn SupervisedAgent>> {
        let component = self.component(spec)?;
        let options = InstanceOptions {
            agent_id: spec.agent_id.to_string(),
            limits: spec
                .limits
                .clone()
                .unwrap_or_else(|| self.default_limits.clone()),
            grants: spec.wasi.clone(),
            state: self.state.clone(),
            http: spec.http.clone(),
            calls: CallAccess::new(
                spec.agent_id.clone(),
                spec.calls.clone(),
                self.calls.clone(),
            ),
        };
        let instance = AgentInstance::instantiate(&self.runtime, component, options)
            .await
            .map_err(|fault| {
                SupervisionError::AgentStartFailed(spec.agent_id.clone(), fault.to_string())
            })?;
        Ok(Box::new(WasmAgent {
            pid: spec.agent_id.clone(),
            instance,
            exit: None,
        }))
    }

    fn validate_spec(&self, spec: &AgentSpec) -> SupervisionResult<()> {
        self.component(spec)?;
        let invalid =
            |e: String| SupervisionError::InvalidAgentSpec(format!("agent {}: {e}", spec.agent_id));
        if let Some(limits) = &spec.limits {
            limits.validate().map_err(invalid)?;
        }
        spec.http.validate().map_err(invalid)?;
        if spec.calls.len() > MAX_CALL_PATTERNS {
            return Err(invalid(format!(
                "calls has {} patterns, more than {MAX_CALL_PATTERNS}",
                spec.calls.len()
            )));
        }
        Ok(())
    }

    fn attach_tree(&self, tree: &TreeHandle) {
        self.calls.attach(tree);
    }

    fn supported_types(&self) -> Vec<String> {
        self.components.keys().cloned().collect()
    }

    fn state_store(&self) -> Option<Arc<dyn StateStore>> {
        Some(self.state.clone())
    }

    /// The agent's durable state goes with its spec. A store that blocks
    /// (a disk sync) is cleared under `block_in_place` on a multi-threaded
    /// runtime, so that the supervisor's worker hands its other tasks over
    /// meanwhile; a failure leaves the state behind and is logged.
    fn release_agent(&self, spec: &AgentSpec) {
        let agent = spec.agent_id.to_string();
        let clear = || {
            if let Err(e) = self.state.clear(&agent) {
                tracing::warn!(agent, "the state of a removed agent was not cleared: {e}");
            }
        };
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if self.state.blocks() && multi_threaded {
            tokio::task::block_in_place(clear);
        } else {
            clear();
        }
    }
}

/// One supervised WASM agent: an [`AgentInstance`] behind the
/// [`SupervisedAgent`] trait. Once the instance dies, `exit_reason` says
/// why and the supervisor replaces the whole agent.
pub struct WasmAgent {
    pid: AgentPid,
    instance: AgentInstance,
    exit: Option<ExitReason>,
}

impl WasmAgent {
    /// Turn a call error into ours, remembering a death.
    fn fail(&mut self, error: CallError, start: bool) -> SupervisionError {
        let pid = self.pid.clone();
        match error {
            CallError::Application(e) if start => SupervisionError::AgentStartFailed(pid, e),
            CallError::Application(e) => SupervisionError::AgentExecutionFailed(pid, e),
            CallError::Exited => {
                self.exit = Some(ExitReason::Normal);
                SupervisionError::AgentExecutionFailed(pid, "agent exited".into())
            }
            CallError::Fault(fault) if start => {
                self.exit = Some(ExitReason::Fault(fault.clone()));
                SupervisionError::AgentStartFailed(pid, fault.to_string())
            }
            CallError::Fault(fault) => {
                self.exit = Some(ExitReason::Fault(fault.clone()));
                SupervisionError::AgentCrashed(pid, fault)
            }
        }
    }
}

#[async_trait]
impl SupervisedAgent for WasmAgent {
    async fn init(&mut self, args: InitArgs) -> SupervisionResult<()> {
        let result = self.instance.init(&args).await;
        result.map_err(|e| self.fail(e, true))
    }

    async fn start(&mut self) -> SupervisionResult<()> {
        let result = self.instance.start().await;
        result.map_err(|e| self.fail(e, true))
    }

    async fn stop(&mut self) -> SupervisionResult<()> {
        let result = self.instance.stop().await;
        result.map_err(|e| self.fail(e, false))
    }

    async fn handle_message(&mut self, message: String) -> SupervisionResult<String> {
        let result = self.instance.handle_message(&message).await;
        result.map_err(|e| self.fail(e, false))
    }

    async fn handle_system_message(&mut self, message: SystemMessage) -> SupervisionResult<()> {
        let result = self.instance.handle_system_message(&message).await;
        result.map_err(|e| self.fail(e, false))
    }

    /// `Ok(true)` when the guest answers `ok`; its `err` is an
    /// `AgentExecutionFailed` with the guest's reason (the agent lives).
    async fn health_check(&mut self) -> SupervisionResult<bool> {
        match self.instance.health_check().await {
            Ok(()) => Ok(true),
            Err(e) => Err(self.fail(e, false)),
        }
    }

    async fn terminate(&mut self, reason: TerminateReason) -> SupervisionResult<()> {
        let result = self.instance.terminate(&reason).await;
        result.map_err(|e| self.fail(e, false))
    }

    fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.clone()
    }

    fn crash_report(&self) -> Option<crate::runtime::CrashReport> {
        self.instance.crash_report()
    }

    fn next_timer_due(&self) -> Option<tokio::time::Instant> {
        self.instance.next_timer_due()
    }

    fn take_due_timer(&mut self, now: tokio::time::Instant) -> Option<String> {
        self.instance.take_due_timer(now)
    }

    fn stats(&self) -> Option<AgentStats> {
        Some(AgentStats {
            fuel_used: self.instance.fuel_used(),
            memory_bytes: self.instance.memory_bytes() as u64,
            state_bytes: self.instance.state_bytes() as u64,
        })
    }
}

impl From<AgentFault> for ExitReason {
    fn from(fault: AgentFault) -> Self {
        ExitReason::Fault(fault)
    }
}
