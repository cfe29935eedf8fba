//! The handles users hold: [`SupervisorHandle`] (cheap to clone, talks to a
//! running supervisor task) and [`AgentSupervisor`] (the original API: owns
//! a root supervisor's configuration and lifecycle).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use super::actor::{self, Command, Placement, Prepared};
use super::child::WorkerCommand;
use super::view::{Route, Shared, WorkerLink};
use super::{
    ChildCount, ChildSpec, RestartEntry, SupervisorConfig, SupervisorEvent, SupervisorSpec,
    SupervisorStatus,
};
use crate::dead_letters::DeadLetter;
use crate::text::fnv1a;
use crate::{
    AgentFactory, AgentPid, AgentSpec, ExitReason, SupervisedAgentInfo, SupervisionError,
    SupervisionResult, SupervisorId, SystemMessage,
};

/// Capacity of a tree's event channel; slow subscribers miss the oldest.
const EVENT_CAPACITY: usize = 4096;

/// A handle to a running supervisor (root or nested). Cheap to clone.
#[derive(Clone)]
pub struct SupervisorHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for SupervisorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorHandle")
            .field("id", &self.shared.id)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl SupervisorHandle {
    /// The supervisor's id.
    pub fn id(&self) -> &SupervisorId {
        &self.shared.id
    }

    /// The supervisor's status now.
    pub fn status(&self) -> SupervisorStatus {
        self.shared.status()
    }

    /// The supervisor's path in its tree (`root`, `root/team`).
    pub fn path(&self) -> &str {
        &self.shared.path
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &SupervisorConfig {
        &self.shared.config
    }

    /// The children in start order, with their status as of the last change
    /// (OTP's `which_children`), read without asking the supervisor task.
    pub fn children(&self) -> Vec<SupervisedAgentInfo> {
        self.shared.children()
    }

    /// Every exit and what was done about it, oldest first (bounded by
    /// `max_history` entries and `max_history_bytes`).
    pub fn restart_history(&self) -> Vec<RestartEntry> {
        self.shared.history().iter().cloned().collect()
    }

    /// The events of the whole tree this supervisor belongs to.
    pub fn subscribe(&self) -> broadcast::Receiver<SupervisorEvent> {
        self.shared.events.subscribe()
    }

    /// The error for a request the supervisor task can no longer take.
    fn gone(&self) -> SupervisionError {
        match self.status() {
            SupervisorStatus::Failed(_) => SupervisionError::MaxRestartsExceeded(self.id().clone()),
            status => SupervisionError::System(format!(
                "supervisor {} is not running ({status:?})",
                self.id()
            )),
        }
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> SupervisionResult<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }

    /// Add a child (agent or supervisor) and start it; it is kept only if
    /// it starts. Duplicate ids are refused.
    pub async fn add_child(&self, child: impl Into<ChildSpec>) -> SupervisionResult<AgentPid> {
        let child = Box::new(child.into());
        let prepared = match (&*child, self.shared.factory.upgrade()) {
            (ChildSpec::Agent(spec), Some(factory)) => prepare(&*factory, spec).await,
            _ => None,
        };
        self.request(|r| Command::AddChild(child, prepared, r))
            .await?
    }

    /// Add an agent and start it.
    ///
    /// The agent is created (its component instantiated) by the caller, so
    /// that the supervisor task only initialises and starts it.
    pub async fn spawn_agent(&self, spec: AgentSpec) -> SupervisionResult<AgentPid> {
        self.add_child(spec).await
    }

    /// Add a nested supervisor and start it with its children.
    pub async fn spawn_supervisor(&self, spec: SupervisorSpec) -> SupervisionResult<AgentPid> {
        self.add_child(spec).await
    }

    /// Report from outside that a child exited with `reason`: its running
    /// instance is killed and the restart strategy applied. Fails with
    /// `MaxRestartsExceeded` when this makes the supervisor give up.
    pub async fn handle_agent_exit(
        &self,
        agent_id: AgentPid,
        reason: ExitReason,
    ) -> SupervisionResult<()> {
        self.request(|r| Command::ReportExit(agent_id, reason, r))
            .await?
    }

    /// OTP's `count_children`.
    pub async fn count_children(&self) -> SupervisionResult<ChildCount> {
        self.request(Command::Count).await
    }

    /// Stop a child under its shutdown policy without restarting it; its
    /// spec is kept (removed for a temporary child).
    pub async fn terminate_child(&self, agent_id: &AgentPid) -> SupervisionResult<()> {
        let pid = agent_id.clone();
        self.request(|r| Command::Terminate(pid, r)).await?
    }

    /// Start a terminated child again. `AgentRunning` if it runs.
    pub async fn restart_child(&self, agent_id: &AgentPid) -> SupervisionResult<()> {
        let pid = agent_id.clone();
        self.request(|r| Command::Restart(pid, r)).await?
    }

    /// Remove a terminated child's spec. `AgentRunning` if it runs.
    pub async fn delete_child(&self, agent_id: &AgentPid) -> SupervisionResult<()> {
        let pid = agent_id.clone();
        self.request(|r| Command::Delete(pid, r)).await?
    }

    /// The handle of a child that is a supervisor.
    pub fn child_supervisor(&self, agent_id: &AgentPid) -> SupervisionResult<SupervisorHandle> {
        match self.shared.route(agent_id) {
            Some(Route::Supervisor(handle)) => Ok(handle),
            Some(Route::Down | Route::Parked { .. }) => Err(SupervisionError::CommunicationFailed(
                format!("supervisor {agent_id} is not running"),
            )),
            Some(Route::Worker(_)) => Err(SupervisionError::InvalidAgentSpec(format!(
                "child {agent_id} is an agent, not a supervisor"
            ))),
            None => Err(SupervisionError::AgentNotFound(agent_id.clone())),
        }
    }

    fn worker(&self, agent_id: &AgentPid) -> SupervisionResult<WorkerLink> {
        self.worker_for(agent_id, None)
    }

    /// The worker of `agent_id`; with `message`, refused if that message is
    /// quarantined for it.
    fn worker_for(
        &self,
        agent_id: &AgentPid,
        message: Option<&str>,
    ) -> SupervisionResult<WorkerLink> {
        if let SupervisorStatus::Failed(_) = self.status() {
            return Err(self.gone());
        }
        let found = self.shared.route_and_quarantine(agent_id);
        if let (Some((_, quarantine)), Some(message)) = (&found, message)
            && !quarantine.is_empty()
        {
            let hash = fnv1a(message.as_bytes());
            if quarantine.contains(&hash) {
                return Err(SupervisionError::Quarantined {
                    agent: agent_id.clone(),
                    hash: format!("{hash:016x}"),
                });
            }
        }
        match found.map(|(route, _)| route) {
            Some(Route::Worker(link)) => Ok(link),
            Some(Route::Down) => Err(SupervisionError::CommunicationFailed(format!(
                "agent {agent_id} is not running (restarting or stopped)"
            ))),
            Some(Route::Parked { until }) => Err(SupervisionError::CircuitOpen {
                agent: agent_id.clone(),
                until,
            }),
            Some(Route::Supervisor(_)) => Err(SupervisionError::InvalidAgentSpec(format!(
                "child {agent_id} is a supervisor, not an agent"
            ))),
            None => Err(SupervisionError::AgentNotFound(agent_id.clone())),
        }
    }

    /// Send `command` to a worker and wait for its answer, bounded by the
    /// supervisor's `agent_timeout`.
    async fn ask<T>(
        &self,
        agent_id: &AgentPid,
        command: impl FnOnce(oneshot::Sender<SupervisionResult<T>>) -> WorkerCommand,
    ) -> SupervisionResult<T> {
        let worker = self.worker(agent_id)?;
        self.exchange(agent_id, worker.mailbox, command).await
    }

    /// Send `command` to `worker` and wait for its answer, bounded by the
    /// supervisor's `agent_timeout`.
    async fn exchange<T>(
        &self,
        agent_id: &AgentPid,
        worker: mpsc::Sender<WorkerCommand>,
        command: impl FnOnce(oneshot::Sender<SupervisionResult<T>>) -> WorkerCommand,
    ) -> SupervisionResult<T> {
        let (tx, rx) = oneshot::channel();
        let exchange = async {
            worker.send(command(tx)).await.map_err(|_| {
                SupervisionError::CommunicationFailed(format!("agent {agent_id} stopped"))
            })?;
            rx.await.map_err(|_| {
                SupervisionError::CommunicationFailed(format!(
                    "agent {agent_id} stopped before replying"
                ))
            })?
        };
        timeout(self.shared.config.agent_timeout, exchange)
            .await
            .map_err(|_| SupervisionError::Timeout)?
    }

    /// Send a message to an agent and return its reply. The agent runs the
    /// message in the caller's task, under its lock, without going through
    /// the supervisor's task or the agent's worker (behind the agent's
    /// queued casts if there are any, to keep their order). Cancel-safe: a
    /// call dropped once taken is finished in a task of its own.
    ///
    /// # Errors
    ///
    /// `MessageTooLarge` / `ReplyTooLarge` over `max_message_bytes`,
    /// `AgentCrashed` with its fault if the agent died handling it,
    /// `AgentExecutionFailed` for its application error,
    /// `CommunicationFailed` if it does not run now, `Timeout` after
    /// `agent_timeout`, `AgentNotFound` for an unknown id.
    pub async fn call(&self, agent_id: &AgentPid, message: String) -> SupervisionResult<String> {
        // Counted for the observer: one lookup, then a few atomic adds.
        let meter = self.shared.meter(agent_id);
        let started = Instant::now();
        let result = self.call_agent(agent_id, message).await;
        if let Some(meter) = meter {
            meter.record_call(&result, started.elapsed());
        }
        result
    }

    async fn call_agent(&self, agent_id: &AgentPid, message: String) -> SupervisionResult<String> {
        let max = self.shared.config.max_message_bytes;
        if message.len() > max {
            return Err(SupervisionError::MessageTooLarge {
                len: message.len(),
                max,
            });
        }
        let worker = self.worker_for(agent_id, Some(&message))?;
        if worker.cell.has_queued() {
            // Behind the casts in its mailbox, to keep their order.
            // (A mailbox that is closed belongs to a dead cell: its count
            // no longer matters.)
            worker.cell.enqueue();
            return self
                .exchange(agent_id, worker.mailbox, |r| {
                    WorkerCommand::Call(message, r)
                })
                .await;
        }
        timeout(self.shared.config.agent_timeout, worker.cell.call(message))
            .await
            .map_err(|_| SupervisionError::Timeout)?
    }

    /// The dead letters of the agent `agent_id` (its quarantined messages,
    /// with the reports of the crashes that got them there), oldest first.
    ///
    /// # Errors
    ///
    /// `System` if the store that keeps them fails.
    pub async fn dead_letters(&self, agent_id: &AgentPid) -> SupervisionResult<Vec<DeadLetter>> {
        self.shared
            .dead_letters
            .list(agent_id)
            .await
            .map_err(|e| SupervisionError::System(format!("dead letters: {e}")))
    }

    /// Take the dead letter `hash` of `agent_id` out of quarantine and
    /// deliver it once more; the agent's reply. If it crashes the agent
    /// again, it counts from zero towards a new quarantine.
    ///
    /// # Errors
    ///
    /// `NodeNotFound` for an unknown dead letter; otherwise as
    /// [`call`](Self::call).
    pub async fn replay_dead_letter(
        &self,
        agent_id: &AgentPid,
        hash: &str,
    ) -> SupervisionResult<String> {
        let (pid, hash) = (agent_id.clone(), hash.to_owned());
        let message = self.request(|r| Command::Release(pid, hash, r)).await??;
        self.call(agent_id, message).await
    }

    /// Take the dead letter `hash` of `agent_id` out of quarantine and drop
    /// it.
    ///
    /// # Errors
    ///
    /// `NodeNotFound` for an unknown dead letter.
    pub async fn discard_dead_letter(
        &self,
        agent_id: &AgentPid,
        hash: &str,
    ) -> SupervisionResult<()> {
        let (pid, hash) = (agent_id.clone(), hash.to_owned());
        self.request(|r| Command::Release(pid, hash, r)).await??;
        Ok(())
    }

    /// Queue a message for an agent without waiting for it to be handled
    /// (OTP's `cast`); its reply is dropped. Never waits.
    ///
    /// # Errors
    ///
    /// `MessageTooLarge` over `max_message_bytes`, `CommunicationFailed` if
    /// the agent does not run now or its mailbox is full, `CircuitOpen`
    /// while its circuit is open, `Quarantined` for a message quarantined
    /// for it, `AgentNotFound` for an unknown id.
    pub fn cast(&self, agent_id: &AgentPid, message: String) -> SupervisionResult<()> {
        let max = self.shared.config.max_message_bytes;
        if message.len() > max {
            return Err(SupervisionError::MessageTooLarge {
                len: message.len(),
                max,
            });
        }
        let (reply, _dropped) = oneshot::channel();
        let worker = self.worker_for(agent_id, Some(&message))?;
        // Counted before it is queued, so that a call made after this cast
        // queues behind it.
        worker.cell.enqueue();
        worker
            .mailbox
            .try_send(WorkerCommand::Call(message, reply))
            .map_err(|e| {
                worker.cell.dequeued();
                SupervisionError::CommunicationFailed(match e {
                    mpsc::error::TrySendError::Full(_) => {
                        format!("agent {agent_id}'s mailbox is full")
                    }
                    mpsc::error::TrySendError::Closed(_) => format!("agent {agent_id} stopped"),
                })
            })
    }

    /// Deliver a system message to an agent.
    pub async fn send_system_message(
        &self,
        agent_id: &AgentPid,
        message: SystemMessage,
    ) -> SupervisionResult<()> {
        self.ask(agent_id, |r| WorkerCommand::System(message, r))
            .await
    }

    /// Ask an agent whether it is healthy.
    pub async fn health_check(&self, agent_id: &AgentPid) -> SupervisionResult<bool> {
        self.ask(agent_id, WorkerCommand::Health).await
    }
}

/// The name of a root supervisor that was given none: the first segment of
/// every path of its tree.
pub const DEFAULT_ROOT_NAME: &str = "root";

struct Root {
    stop: oneshot::Sender<()>,
    /// The root supervisor's task: aborted (and with it the whole tree) if
    /// the `AgentSupervisor` is dropped without [`AgentSupervisor::stop`].
    task: AbortOnDropHandle<()>,
    /// Tracks every task of the tree.
    tree: TaskTracker,
}

/// A root supervisor: the original `terraphim_agent_supervisor` API.
///
/// `new` only configures; `start` spawns the supervisor task and starts the
/// initial children in order; `stop` stops them in reverse order. Between
/// the two, crashes are detected and handled by the supervisor itself.
///
/// The `AgentSupervisor` owns the tree: dropping it without `stop` kills
/// every agent and nested supervisor of the tree at once (no graceful stop).
pub struct AgentSupervisor {
    name: String,
    config: SupervisorConfig,
    factory: Arc<dyn AgentFactory>,
    initial: Vec<ChildSpec>,
    events: broadcast::Sender<SupervisorEvent>,
    handle: Option<SupervisorHandle>,
    root: Option<Root>,
}

impl std::fmt::Debug for AgentSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSupervisor")
            .field("id", &self.config.supervisor_id)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl AgentSupervisor {
    /// A supervisor with `config` whose agents `factory` creates. Nothing
    /// runs until [`start`](Self::start).
    pub fn new(config: SupervisorConfig, factory: Arc<dyn AgentFactory>) -> Self {
        Self {
            name: DEFAULT_ROOT_NAME.to_owned(),
            config,
            factory,
            initial: Vec::new(),
            events: broadcast::channel(EVENT_CAPACITY).0,
            handle: None,
            root: None,
        }
    }

    /// Name the root supervisor: the first segment of its tree's paths
    /// (default [`DEFAULT_ROOT_NAME`]).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The root supervisor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Add a child started (in order) by [`start`](Self::start).
    pub fn with_child(mut self, child: impl Into<ChildSpec>) -> Self {
        self.initial.push(child.into());
        self
    }

    /// The supervisor's id.
    pub fn id(&self) -> &SupervisorId {
        &self.config.supervisor_id
    }

    /// The supervisor's status.
    pub fn status(&self) -> SupervisorStatus {
        match &self.handle {
            Some(handle) => handle.status(),
            None => SupervisorStatus::Stopped,
        }
    }

    /// The events of the tree (subscribe before `start` to see everything).
    pub fn subscribe(&self) -> broadcast::Receiver<SupervisorEvent> {
        self.events.subscribe()
    }

    /// A cloneable handle to the running supervisor.
    pub fn handle(&self) -> SupervisionResult<SupervisorHandle> {
        match (&self.handle, &self.root) {
            (Some(handle), Some(_)) => Ok(handle.clone()),
            (Some(handle), None) => Err(handle.gone()),
            _ => Err(SupervisionError::System(format!(
                "supervisor {} is not running",
                self.id()
            ))),
        }
    }

    /// Start the supervisor and its initial children, one at a time in
    /// order.
    ///
    /// # Errors
    ///
    /// `AgentStartFailed` (naming the child's path) if a child fails to
    /// start: those already started are stopped in reverse order first.
    /// `System` if it is already running.
    pub async fn start(&mut self) -> SupervisionResult<()> {
        let active = matches!(
            self.status(),
            SupervisorStatus::Starting | SupervisorStatus::Running | SupervisorStatus::Stopping
        );
        if self.root.is_some() && active {
            return Err(SupervisionError::System(format!(
                "supervisor {} is already running",
                self.id()
            )));
        }
        let tree = TaskTracker::new();
        let placement = Placement {
            id: self.config.supervisor_id.clone(),
            path: self.name.clone(),
            events: self.events.clone(),
            tracker: tree.clone(),
            lineage: None,
        };
        let (handle, actor) =
            actor::new_supervisor(self.config.clone(), self.factory.clone(), placement);
        // Before any child starts: agents may call the tree from `init`.
        crate::running::attach_factories(
            &crate::TreeHandle::new(handle.clone()),
            &self.factory,
            &self.initial,
        );
        let (started_tx, started_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let initial = self.initial.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            actor.run(initial, started_tx, stop_rx).await;
        }));
        self.handle = Some(handle);
        match started_rx.await {
            Ok(Ok(())) => {
                self.root = Some(Root {
                    stop: stop_tx,
                    task,
                    tree,
                });
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SupervisionError::System(
                "the supervisor task ended while starting".into(),
            )),
        }
    }

    /// Stop every child in reverse start order, then the supervisor; when
    /// this returns, no task of the tree runs any more.
    ///
    /// # Errors
    ///
    /// `ShutdownFailed` if the supervisor's task panicked (its tree was
    /// killed).
    pub async fn stop(&mut self) -> SupervisionResult<()> {
        let Some(Root { stop, task, tree }) = self.root.take() else {
            return Ok(());
        };
        let _ = stop.send(());
        let ended = task.await;
        tree.close();
        tree.wait().await;
        ended.map_err(|e| SupervisionError::ShutdownFailed(e.to_string()))
    }

    /// Add an agent and start it. See [`SupervisorHandle::spawn_agent`].
    pub async fn spawn_agent(&mut self, spec: AgentSpec) -> SupervisionResult<AgentPid> {
        self.handle()?.spawn_agent(spec).await
    }

    /// Add a nested supervisor. See [`SupervisorHandle::spawn_supervisor`].
    pub async fn spawn_supervisor(&mut self, spec: SupervisorSpec) -> SupervisionResult<AgentPid> {
        self.handle()?.spawn_supervisor(spec).await
    }

    /// Report an exit from outside. See
    /// [`SupervisorHandle::handle_agent_exit`].
    pub async fn handle_agent_exit(
        &mut self,
        agent_id: AgentPid,
        reason: ExitReason,
    ) -> SupervisionResult<()> {
        self.handle()?.handle_agent_exit(agent_id, reason).await
    }

    /// The children in start order (empty before the first start). Async
    /// as in the original API; [`SupervisorHandle::children`] is the same,
    /// synchronously.
    pub async fn get_children(&self) -> Vec<(AgentPid, SupervisedAgentInfo)> {
        match &self.handle {
            Some(handle) => handle
                .children()
                .into_iter()
                .map(|info| (info.pid.clone(), info))
                .collect(),
            None => Vec::new(),
        }
    }

    /// The restart history, oldest first. Async as in the original API;
    /// [`SupervisorHandle::restart_history`] is the same, synchronously.
    pub async fn get_restart_history(&self) -> Vec<RestartEntry> {
        match &self.handle {
            Some(handle) => handle.restart_history(),
            None => Vec::new(),
        }
    }

    /// Send a message to an agent; its reply. See [`SupervisorHandle::call`].
    pub async fn call(&self, agent_id: &AgentPid, message: String) -> SupervisionResult<String> {
        self.handle()?.call(agent_id, message).await
    }

    /// OTP's `count_children`.
    pub async fn count_children(&self) -> SupervisionResult<ChildCount> {
        self.handle()?.count_children().await
    }

    /// OTP's `terminate_child`.
    pub async fn terminate_child(&self, agent_id: &AgentPid) -> SupervisionResult<()> {
        self.handle()?.terminate_child(agent_id).await
    }

    /// OTP's `restart_child`.
    pub async fn restart_child(&self, agent_id: &AgentPid) -> SupervisionResult<()> {
        self.handle()?.restart_child(agent_id).await
    }

    /// OTP's `delete_child`.
    pub async fn delete_child(&self, agent_id: &AgentPid) -> SupervisionResult<()> {
        self.handle()?.delete_child(agent_id).await
    }

    /// The handle of a child that is a supervisor.
    pub fn child_supervisor(&self, agent_id: &AgentPid) -> SupervisionResult<SupervisorHandle> {
        self.handle()?.child_supervisor(agent_id)
    }
}

/// Create the agent of `spec` ahead of its start (see [`Prepared`]). A spec
/// the factory refuses, or a factory that panics, is left to the supervisor
/// task: it says why, or it is the one that fails, as without preparation.
async fn prepare(factory: &dyn AgentFactory, spec: &AgentSpec) -> Option<Prepared> {
    let valid = std::panic::catch_unwind(AssertUnwindSafe(|| factory.validate_spec(spec)));
    if !matches!(valid, Ok(Ok(()))) {
        return None;
    }
    AssertUnwindSafe(factory.create_agent(spec))
        .catch_unwind()
        .await
        .ok()
        .map(Prepared::Ready)
}
