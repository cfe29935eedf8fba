//! The supervisor task: owns one level of the tree and carries out the
//! decisions of [`decision`](super::decision).
//!
//! Invariants:
//! - `children` is in start order; `Shared::table.infos[i]` describes
//!   `children[i]` (both change together, only here).
//! - A child is running iff its `running` is `Some`; the incarnation number
//!   in it is the only one whose exit report is acted on. Reports from
//!   incarnations the supervisor stopped itself are ignored.
//! - The task never holds a lock across an `.await`.
//! - Requests are served one at a time, as in OTP: a restart in progress
//!   finishes before the next request is looked at. A restart attempt that
//!   fails is not retried in place: the retry is queued behind the requests
//!   already waiting (OTP's `try_again_restart`), so that they, and a stop,
//!   are served between attempts.
//! - The supervisor owns its children's tasks: dropping it aborts them, and
//!   every task of its subtree holds a token of its [`TaskTracker`], so that
//!   killing it can be awaited until nothing of the subtree runs. A child is
//!   restarted only after its previous incarnation (and its whole subtree)
//!   has ended: never are two incarnations of one child alive.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use chrono::Utc;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use super::child::{self, ChildExit, Lineage, Started, WorkerCommand};
use super::decision::{ChildRef, Decision, ExitKind, RestartWindow, decide, decide_failed_start};
use super::{
    ChildCount, ChildSpec, RestartAction, RestartEntry, SupervisorConfig, SupervisorEvent,
    SupervisorHandle, SupervisorStatus,
};
use crate::runtime::MAX_GUEST_TEXT;
use crate::text::bound;
use crate::{
    AgentFactory, AgentFault, AgentPid, AgentSpec, AgentStatus, ExitReason, InitArgs,
    ShutdownPolicy, SupervisedAgentInfo, SupervisionError, SupervisionResult, SupervisorId,
};

/// Requests from handles to the supervisor task.
pub(crate) enum Command {
    AddChild(Box<ChildSpec>, Reply<AgentPid>),
    ReportExit(AgentPid, ExitReason, Reply<()>),
    Count(oneshot::Sender<ChildCount>),
    Terminate(AgentPid, Reply<()>),
    Restart(AgentPid, Reply<()>),
    Delete(AgentPid, Reply<()>),
}

pub(crate) type Reply<T> = oneshot::Sender<SupervisionResult<T>>;

/// How to reach a child, for calls that bypass the supervisor task.
#[derive(Clone)]
pub(crate) enum Route {
    Worker(mpsc::Sender<WorkerCommand>),
    Supervisor(SupervisorHandle),
    /// Known child, not running now.
    Down,
}

/// What the handles can read without asking the task.
pub(crate) struct Table {
    pub infos: Vec<SupervisedAgentInfo>,
    pub history: VecDeque<RestartEntry>,
    /// What `history` weighs, as [`entry_weight`] counts it.
    pub history_bytes: usize,
}

/// State shared between the supervisor task and its handles.
pub(crate) struct Shared {
    pub id: SupervisorId,
    pub config: SupervisorConfig,
    pub status: Mutex<SupervisorStatus>,
    pub table: Mutex<Table>,
    pub routes: RwLock<HashMap<AgentPid, Route>>,
    pub events: broadcast::Sender<SupervisorEvent>,
}

/// Lock a mutex whose data stays consistent even if a holder panicked
/// (every critical section here is a single assignment or push).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn status(&self) -> SupervisorStatus {
        lock(&self.status).clone()
    }

    fn set_status(&self, status: SupervisorStatus) {
        *lock(&self.status) = status;
    }

    fn emit(&self, event: SupervisorEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    pub fn route(&self, pid: &AgentPid) -> Option<Route> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(pid)
            .cloned()
    }

    fn set_route(&self, pid: &AgentPid, route: Option<Route>) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        match route {
            Some(route) => routes.insert(pid.clone(), route),
            None => routes.remove(pid),
        };
    }
}

/// The supervisor is giving up: its restart intensity was exceeded.
pub(crate) struct Escalated;

/// One running incarnation of a child.
struct Running {
    incarnation: u64,
    /// Aborted if the supervisor is dropped.
    task: AbortOnDropHandle<()>,
    /// Asks for a graceful stop. Dropping it, without sending, tells the
    /// child that its supervisor is gone: it dies at once.
    stop: oneshot::Sender<()>,
    /// For a nested supervisor: the tracker of its subtree's tasks.
    subtree: Option<TaskTracker>,
}

impl Running {
    /// Kill the incarnation and wait until it, and every task of its
    /// subtree, has ended.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        settle(self.subtree).await;
    }
}

/// Wait until every task of a subtree has ended.
async fn settle(subtree: Option<TaskTracker>) {
    if let Some(subtree) = subtree {
        subtree.close();
        subtree.wait().await;
    }
}

struct Child {
    spec: ChildSpec,
    running: Option<Running>,
    /// A restart of this child is under way or queued (OTP's
    /// `{restarting, _}`): it is not running, and the next attempt will
    /// start it unless it is terminated meanwhile.
    restarting: bool,
}

/// A restart to attempt again, queued behind the requests already waiting
/// (OTP's `try_again_restart`).
struct Retry {
    cause: AgentPid,
    stop: Vec<AgentPid>,
    remove: Vec<AgentPid>,
    start: Vec<AgentPid>,
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    factory: Arc<dyn AgentFactory>,
    children: Vec<Child>,
    window: RestartWindow,
    exits_tx: mpsc::UnboundedSender<ChildExit>,
    exits_rx: mpsc::UnboundedReceiver<ChildExit>,
    commands: mpsc::Receiver<Command>,
    retries: VecDeque<Retry>,
    next_incarnation: u64,
    /// Every task started for a child holds a token of this tracker
    /// (through its [`Lineage`]), and so does every task below it.
    tracker: TaskTracker,
    /// The lineage of the task this supervisor runs in (`None` for a root).
    lineage: Option<Arc<Lineage>>,
}

/// Create a supervisor: its handle, and the task body to spawn. The tasks of
/// its children are tracked by `tracker`; `lineage` is that of the task the
/// supervisor itself runs in (`None` for a root).
pub(crate) fn new_supervisor(
    config: SupervisorConfig,
    factory: Arc<dyn AgentFactory>,
    events: broadcast::Sender<SupervisorEvent>,
    tracker: TaskTracker,
    lineage: Option<Arc<Lineage>>,
) -> (SupervisorHandle, Actor) {
    let intensity = &config.restart_policy.intensity;
    let window = RestartWindow::new(intensity.max_restarts, intensity.time_window);
    let shared = Arc::new(Shared {
        id: config.supervisor_id.clone(),
        config,
        status: Mutex::new(SupervisorStatus::Starting),
        table: Mutex::new(Table {
            infos: Vec::new(),
            history: VecDeque::new(),
            history_bytes: 0,
        }),
        routes: RwLock::default(),
        events,
    });
    let (commands_tx, commands) = mpsc::channel(64);
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let handle = SupervisorHandle {
        shared: shared.clone(),
        commands: commands_tx,
    };
    let actor = Actor {
        shared,
        factory,
        children: Vec::new(),
        window,
        exits_tx,
        exits_rx,
        commands,
        retries: VecDeque::new(),
        next_incarnation: 0,
        tracker,
        lineage,
    };
    (handle, actor)
}

enum Wake {
    /// `true`: a graceful stop was asked; `false`: the owner is gone.
    Stop(bool),
    Exit(ChildExit),
    Command(Option<Command>),
    Retry,
}

/// `reason` with every text in it bounded (it may come from a guest or an
/// agent).
fn bounded_reason(reason: ExitReason) -> ExitReason {
    let b = |text: String| bound(text, MAX_GUEST_TEXT);
    match reason {
        ExitReason::Error(e) => ExitReason::Error(b(e)),
        ExitReason::Fault(fault) => ExitReason::Fault(match fault {
            AgentFault::ResourceLimit(e) => AgentFault::ResourceLimit(b(e)),
            AgentFault::Trap(e) => AgentFault::Trap(b(e)),
            AgentFault::InstantiateFailed(e) => AgentFault::InstantiateFailed(b(e)),
            AgentFault::InitFailed(e) => AgentFault::InitFailed(b(e)),
            AgentFault::Host(e) => AgentFault::Host(b(e)),
            other => other,
        }),
        other => other,
    }
}

/// What one history entry weighs against `max_history_bytes`: its own size
/// and the text it holds.
fn entry_weight(entry: &RestartEntry) -> usize {
    std::mem::size_of::<RestartEntry>() + reason_text_len(&entry.reason)
}

fn reason_text_len(reason: &ExitReason) -> usize {
    match reason {
        ExitReason::Error(e) => e.len(),
        ExitReason::Fault(
            AgentFault::ResourceLimit(e)
            | AgentFault::Trap(e)
            | AgentFault::InstantiateFailed(e)
            | AgentFault::InitFailed(e)
            | AgentFault::Host(e),
        ) => e.len(),
        _ => 0,
    }
}

fn exit_kind(reason: &ExitReason) -> ExitKind {
    match reason {
        ExitReason::Normal => ExitKind::Normal,
        ExitReason::Shutdown | ExitReason::SupervisorShutdown => ExitKind::Shutdown,
        _ => ExitKind::Abnormal,
    }
}

/// Tell the factories that `spec`'s agents are gone for good: a nested
/// supervisor's agents (those of its spec) with it.
fn release(factory: &dyn AgentFactory, spec: &ChildSpec) {
    match spec {
        ChildSpec::Agent(agent) => factory.release_agent(agent),
        ChildSpec::Supervisor(nested) => {
            for child in &nested.children {
                release(&*nested.factory, child);
            }
        }
    }
}

fn info_spec(spec: &ChildSpec) -> AgentSpec {
    match spec {
        ChildSpec::Agent(a) => a.clone(),
        ChildSpec::Supervisor(s) => {
            let mut a = AgentSpec::new("supervisor".into(), serde_json::Value::Null)
                .with_id(s.id.clone())
                .with_restart_type(s.restart_type)
                .with_shutdown(s.shutdown);
            a.name = s.name.clone();
            a
        }
    }
}

impl Actor {
    /// The task body: start `initial` in order, then serve until stopped
    /// (`Some(Shutdown)`) or escalated (`Some(Shutdown)` with status
    /// `Failed`). `None` when the start failed (the error went to
    /// `started`).
    pub async fn run(
        mut self,
        initial: Vec<ChildSpec>,
        started: Started,
        mut stop: oneshot::Receiver<()>,
    ) -> Option<ExitReason> {
        for spec in initial {
            if let Err(e) = self.add_child(spec).await {
                self.shutdown(SupervisorStatus::Stopped).await;
                let _ = started.send(Err(e));
                return None;
            }
        }
        self.shared.set_status(SupervisorStatus::Running);
        if started.send(Ok(())).is_err() {
            self.shutdown(SupervisorStatus::Stopped).await;
            return None;
        }
        loop {
            let wake = tokio::select! {
                biased;
                asked = &mut stop => Wake::Stop(asked.is_ok()),
                Some(exit) = self.exits_rx.recv() => Wake::Exit(exit),
                command = self.commands.recv() => Wake::Command(command),
                () = std::future::ready(()), if !self.retries.is_empty() => Wake::Retry,
            };
            let outcome = match wake {
                Wake::Stop(true) | Wake::Command(None) => break,
                // The owner is gone: die at once. Dropping `self` aborts the
                // children; whoever waits for this subtree waits for them.
                Wake::Stop(false) => return None,
                Wake::Exit(exit) => self.on_exit(exit).await,
                Wake::Command(Some(command)) => self.serve(command).await,
                Wake::Retry => match self.retries.pop_front() {
                    Some(retry) => self.retry(retry).await,
                    None => Ok(()),
                },
            };
            if outcome.is_err() {
                return Some(ExitReason::Shutdown);
            }
        }
        self.shutdown(SupervisorStatus::Stopped).await;
        Some(ExitReason::Shutdown)
    }

    /// [`run`](Self::run) behind a box: a supervisor's task starts nested
    /// supervisors' tasks, and the box breaks that recursion in the type.
    fn run_boxed(
        self,
        initial: Vec<ChildSpec>,
        started: Started,
        stop: oneshot::Receiver<()>,
    ) -> Pin<Box<dyn Future<Output = Option<ExitReason>> + Send>> {
        Box::pin(self.run(initial, started, stop))
    }

    fn index(&self, pid: &AgentPid) -> Option<usize> {
        self.children.iter().position(|c| c.spec.id() == pid)
    }

    fn refs(&self) -> Vec<ChildRef<AgentPid>> {
        self.children
            .iter()
            .map(|c| ChildRef {
                id: c.spec.id().clone(),
                restart_type: c.spec.restart_type(),
            })
            .collect()
    }

    fn update(&self, idx: usize, f: impl FnOnce(&mut SupervisedAgentInfo)) {
        if let Some(info) = lock(&self.shared.table).infos.get_mut(idx) {
            f(info);
        }
    }

    /// Add a history entry, dropping the oldest ones beyond the entry and
    /// byte bounds (the newest entry is always kept).
    fn record(&self, agent_id: &AgentPid, reason: ExitReason, action: RestartAction) {
        let entry = RestartEntry {
            agent_id: agent_id.clone(),
            timestamp: Utc::now(),
            reason: bounded_reason(reason),
            action,
        };
        let config = &self.shared.config;
        let mut table = lock(&self.shared.table);
        table.history_bytes += entry_weight(&entry);
        table.history.push_back(entry);
        while table.history.len() > 1
            && (table.history.len() > config.max_history.max(1)
                || table.history_bytes > config.max_history_bytes)
        {
            if let Some(old) = table.history.pop_front() {
                table.history_bytes -= entry_weight(&old);
            }
        }
    }

    fn emit(&self, event: SupervisorEvent) {
        self.shared.emit(event);
    }

    fn sup(&self) -> SupervisorId {
        self.shared.id.clone()
    }

    /// Add a child and start it (OTP's `start_child`); the spec is not kept
    /// if the start fails.
    async fn add_child(&mut self, spec: ChildSpec) -> SupervisionResult<AgentPid> {
        let pid = spec.id().clone();
        if self.children.len() >= self.shared.config.max_children {
            return Err(SupervisionError::MaxChildrenReached(
                self.shared.config.max_children,
            ));
        }
        if self.index(&pid).is_some() {
            return Err(SupervisionError::DuplicateAgent(pid));
        }
        if let ChildSpec::Agent(agent) = &spec {
            self.factory.validate_spec(agent)?;
        }
        let mut info = SupervisedAgentInfo::new(pid.clone(), self.sup(), info_spec(&spec));
        info.is_supervisor = matches!(spec, ChildSpec::Supervisor(_));
        let name = info.spec.name.clone();
        lock(&self.shared.table).infos.push(info);
        self.children.push(Child {
            spec,
            running: None,
            restarting: false,
        });
        let idx = self.children.len() - 1;
        match self.start_child(idx).await {
            Ok(()) => {
                self.emit(SupervisorEvent::ChildStarted {
                    supervisor: self.sup(),
                    agent: pid.clone(),
                    name,
                });
                Ok(pid)
            }
            Err(e) => {
                self.remove(idx);
                Err(e)
            }
        }
    }

    /// Start the child at `idx` (not running) as a new incarnation. On
    /// failure nothing of the attempt runs any more when this returns (a
    /// start that timed out is killed and awaited), so that a retry never
    /// overlaps it.
    async fn start_child(&mut self, idx: usize) -> SupervisionResult<()> {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let pid = self.children[idx].spec.id().clone();
        let (stop_tx, stop_rx) = oneshot::channel();
        let exits = self.exits_tx.clone();
        let lineage = Arc::new(Lineage::new(&self.tracker, self.lineage.clone()));
        let (task, started, route, bound, subtree) = match &self.children[idx].spec {
            ChildSpec::Agent(spec) => {
                let (tx, rx) = mpsc::channel(64);
                let factory = self.factory.clone();
                let spec = spec.clone();
                let args = InitArgs {
                    agent_id: pid.clone(),
                    supervisor_id: self.sup(),
                    config: spec.config.clone(),
                };
                let limits = child::WorkerLimits {
                    max_reply_bytes: self.shared.config.max_message_bytes,
                };
                let (task, started) =
                    child::spawn(pid.clone(), incarnation, exits, lineage, None, move |s| {
                        let create = async move { factory.create_agent(&spec).await };
                        child::run_worker(create, args, limits, s, rx, stop_rx)
                    });
                let bound = Some(self.shared.config.agent_timeout);
                (task, started, Route::Worker(tx), bound, None)
            }
            ChildSpec::Supervisor(spec) => {
                let subtree = TaskTracker::new();
                let (handle, actor) = new_supervisor(
                    spec.config.clone(),
                    spec.factory.clone(),
                    self.shared.events.clone(),
                    subtree.clone(),
                    Some(lineage.clone()),
                );
                let initial = spec.children.clone();
                let (task, started) = child::spawn(
                    pid.clone(),
                    incarnation,
                    exits,
                    lineage,
                    Some(subtree.clone()),
                    move |s| actor.run_boxed(initial, s, stop_rx),
                );
                (
                    task,
                    started,
                    Route::Supervisor(handle),
                    None,
                    Some(subtree),
                )
            }
        };
        let mut task = AbortOnDropHandle::new(task);
        let mut started = started;
        let outcome = match bound {
            Some(bound) => match timeout(bound, &mut started).await {
                Ok(answer) => answer,
                Err(_) => {
                    task.abort();
                    let _ = (&mut task).await;
                    settle(subtree).await;
                    return Err(SupervisionError::AgentStartFailed(
                        pid,
                        format!("did not start within {bound:?}"),
                    ));
                }
            },
            None => started.await,
        };
        let error = match outcome {
            Ok(Ok(())) => {
                self.children[idx].running = Some(Running {
                    incarnation,
                    task,
                    stop: stop_tx,
                    subtree,
                });
                self.children[idx].restarting = false;
                self.shared.set_route(&pid, Some(route));
                self.update(idx, |info| {
                    info.status = AgentStatus::Running;
                    info.start_time = Utc::now();
                });
                return Ok(());
            }
            Ok(Err(e @ SupervisionError::AgentStartFailed(..))) => e,
            Ok(Err(e)) => SupervisionError::AgentStartFailed(pid, e.to_string()),
            Err(_) => SupervisionError::AgentStartFailed(
                pid,
                "the child task ended while starting (panicked)".into(),
            ),
        };
        // The task ends by itself after a failed start; wait for it.
        let _ = task.await;
        settle(subtree).await;
        Err(error)
    }

    /// Stop the child at `idx` if it runs, under its shutdown policy, and
    /// wait until it and its whole subtree have ended.
    async fn stop_child(&mut self, idx: usize) {
        let was_restarting = std::mem::take(&mut self.children[idx].restarting);
        let Some(running) = self.children[idx].running.take() else {
            if was_restarting {
                // Its queued restart will find it no longer restarting.
                self.update(idx, |info| info.status = AgentStatus::Stopped);
            }
            return;
        };
        let pid = self.children[idx].spec.id().clone();
        self.shared.set_route(&pid, Some(Route::Down));
        self.update(idx, |info| info.status = AgentStatus::Stopping);
        let Running {
            mut task,
            stop,
            subtree,
            ..
        } = running;
        // (whether the task has already been awaited to its end, killed)
        let (joined, killed) = match self.children[idx].spec.shutdown() {
            ShutdownPolicy::BrutalKill => {
                task.abort();
                (false, true)
            }
            ShutdownPolicy::Timeout(grace) => {
                let _ = stop.send(());
                if timeout(grace, &mut task).await.is_ok() {
                    (true, false)
                } else {
                    task.abort();
                    (false, true)
                }
            }
            ShutdownPolicy::Infinity => {
                let _ = stop.send(());
                (false, false)
            }
        };
        if !joined {
            // After an abort the task ends at its next await point.
            let _ = task.await;
        }
        settle(subtree).await;
        self.update(idx, |info| info.status = AgentStatus::Stopped);
        self.emit(SupervisorEvent::ChildStopped {
            supervisor: self.sup(),
            agent: pid,
            killed,
        });
    }

    fn remove(&mut self, idx: usize) {
        let child = self.children.remove(idx);
        lock(&self.shared.table).infos.remove(idx);
        self.shared.set_route(child.spec.id(), None);
    }

    /// Remove a child's spec for good (a temporary child that exited,
    /// `delete_child`): what the factories keep for its agents (their state)
    /// is released.
    fn remove_and_report(&mut self, pid: &AgentPid) {
        if let Some(idx) = self.index(pid) {
            release(&*self.factory, &self.children[idx].spec);
            self.remove(idx);
            self.emit(SupervisorEvent::ChildRemoved {
                supervisor: self.sup(),
                agent: pid.clone(),
            });
        }
    }

    async fn stop_ids(&mut self, ids: &[AgentPid]) {
        for id in ids {
            if let Some(idx) = self.index(id) {
                self.stop_child(idx).await;
            }
        }
    }

    /// Stop every child in reverse start order and settle in `status`.
    async fn shutdown(&mut self, status: SupervisorStatus) {
        self.shared.set_status(SupervisorStatus::Stopping);
        for idx in (0..self.children.len()).rev() {
            self.stop_child(idx).await;
        }
        self.shared.set_status(status);
        self.emit(SupervisorEvent::SupervisorStopped {
            supervisor: self.sup(),
        });
    }

    async fn on_exit(&mut self, exit: ChildExit) -> Result<(), Escalated> {
        let Some(idx) = self.index(&exit.pid) else {
            return Ok(());
        };
        let current = self.children[idx].running.as_ref().map(|r| r.incarnation);
        if current != Some(exit.incarnation) {
            return Ok(()); // an incarnation we stopped ourselves
        }
        if let Some(ended) = self.children[idx].running.take() {
            // It sent its exit as its last act: this returns at once.
            let _ = ended.task.await;
        }
        self.shared.set_route(&exit.pid, Some(Route::Down));
        self.child_exited(idx, exit.reason).await
    }

    /// The child at `idx` (no longer running) exited with `reason`: decide
    /// and act.
    async fn child_exited(&mut self, idx: usize, reason: ExitReason) -> Result<(), Escalated> {
        let reason = bounded_reason(reason);
        let pid = self.children[idx].spec.id().clone();
        self.update(idx, |info| {
            info.last_exit = Some(reason.clone());
            info.status = AgentStatus::Failed(reason.to_string());
        });
        self.emit(SupervisorEvent::ChildExited {
            supervisor: self.sup(),
            agent: pid.clone(),
            reason: reason.clone(),
        });
        let refs = self.refs();
        let strategy = self.shared.config.restart_policy.strategy;
        let kind = exit_kind(&reason);
        let Ok(decision) = decide(
            strategy,
            &refs,
            &pid,
            kind,
            &mut self.window,
            Instant::now(),
        ) else {
            return Ok(()); // unreachable: `pid` is a child
        };
        match decision {
            Decision::NoRestart { remove: true } => {
                self.record(&pid, reason, RestartAction::Removed);
                self.remove_and_report(&pid);
                Ok(())
            }
            Decision::NoRestart { remove: false } => {
                self.record(&pid, reason, RestartAction::NotRestarted);
                self.update(idx, |info| info.status = AgentStatus::Stopped);
                Ok(())
            }
            Decision::Restart {
                stop,
                remove,
                start,
            } => {
                self.record(&pid, reason, RestartAction::Restarted);
                self.restart(&pid, stop, remove, start).await
            }
            Decision::Escalate { stop } => {
                self.record(&pid, reason, RestartAction::Escalated);
                self.escalate(&stop).await
            }
        }
    }

    /// Carry out a restart decision caused by `cause`. A child that fails to
    /// start counts as a new abnormal exit (OTP), which may escalate; the
    /// next attempt is queued, not made here.
    async fn restart(
        &mut self,
        cause: &AgentPid,
        stop: Vec<AgentPid>,
        remove: Vec<AgentPid>,
        start: Vec<AgentPid>,
    ) -> Result<(), Escalated> {
        self.stop_ids(&stop).await;
        for id in &start {
            if let Some(idx) = self.index(id) {
                self.children[idx].restarting = true;
                self.update(idx, |info| info.status = AgentStatus::Restarting);
            }
        }
        for id in &remove {
            self.record(id, ExitReason::Shutdown, RestartAction::Removed);
            self.remove_and_report(id);
        }
        match self.start_all(cause, &start).await {
            None => Ok(()),
            Some((failed, error)) => self.restart_failed(&failed, &error).await,
        }
    }

    /// A queued restart attempt: the children still waiting for it (those
    /// not terminated meanwhile) are started.
    async fn retry(&mut self, retry: Retry) -> Result<(), Escalated> {
        let Retry {
            cause,
            stop,
            remove,
            start,
        } = retry;
        let start = start
            .into_iter()
            .filter(|id| self.index(id).is_some_and(|i| self.children[i].restarting))
            .collect();
        self.restart(&cause, stop, remove, start).await
    }

    /// A restart attempt failed to start `failed`: decide again, as for an
    /// abnormal exit, and queue the next attempt or escalate.
    async fn restart_failed(
        &mut self,
        failed: &AgentPid,
        error: &SupervisionError,
    ) -> Result<(), Escalated> {
        let reason = bounded_reason(ExitReason::Fault(AgentFault::InitFailed(error.to_string())));
        if let Some(idx) = self.index(failed) {
            self.update(idx, |info| {
                info.last_exit = Some(reason.clone());
                info.status = AgentStatus::Restarting;
            });
        }
        let refs = self.refs();
        let strategy = self.shared.config.restart_policy.strategy;
        let now = Instant::now();
        match decide_failed_start(strategy, &refs, failed, &mut self.window, now) {
            Ok(Decision::Restart {
                stop,
                remove,
                start,
            }) => {
                self.record(failed, reason, RestartAction::StartFailed);
                self.retries.push_back(Retry {
                    cause: failed.clone(),
                    stop,
                    remove,
                    start,
                });
                Ok(())
            }
            Ok(Decision::Escalate { stop }) => {
                self.record(failed, reason, RestartAction::Escalated);
                self.escalate(&stop).await
            }
            Ok(Decision::NoRestart { remove }) => {
                self.record(failed, reason, RestartAction::StartFailed);
                if let Some(idx) = self.index(failed) {
                    self.children[idx].restarting = false;
                    self.update(idx, |info| {
                        info.status = AgentStatus::Failed("could not be restarted".into());
                    });
                }
                if remove {
                    self.remove_and_report(failed);
                }
                Ok(())
            }
            Err(_) => Ok(()), // unreachable: `failed` is a child
        }
    }

    /// Start `ids` in order (skipping running ones); the first that fails.
    async fn start_all(
        &mut self,
        cause: &AgentPid,
        ids: &[AgentPid],
    ) -> Option<(AgentPid, SupervisionError)> {
        for id in ids {
            let Some(idx) = self.index(id) else { continue };
            if self.children[idx].running.is_some() {
                continue;
            }
            if let Err(e) = self.start_child(idx).await {
                return Some((id.clone(), e));
            }
            let mut restart_count = 0;
            self.update(idx, |info| {
                info.restart_count += 1;
                info.last_restart = Some(Utc::now());
                restart_count = info.restart_count;
            });
            if id != cause {
                self.record(
                    id,
                    ExitReason::Shutdown,
                    RestartAction::RestartedWithSibling(cause.clone()),
                );
            }
            self.emit(SupervisorEvent::ChildRestarted {
                supervisor: self.sup(),
                agent: id.clone(),
                restart_count,
            });
        }
        None
    }

    /// Give up: stop `stop` (every remaining child, reverse start order) and
    /// end in `Failed`.
    async fn escalate(&mut self, stop: &[AgentPid]) -> Result<(), Escalated> {
        self.shared.set_status(SupervisorStatus::Stopping);
        self.stop_ids(stop).await;
        self.shared.set_status(SupervisorStatus::Failed(
            "maximum restart intensity exceeded".into(),
        ));
        self.emit(SupervisorEvent::Escalated {
            supervisor: self.sup(),
        });
        self.emit(SupervisorEvent::SupervisorStopped {
            supervisor: self.sup(),
        });
        Err(Escalated)
    }

    fn known(&self, pid: &AgentPid) -> SupervisionResult<usize> {
        self.index(pid)
            .ok_or_else(|| SupervisionError::AgentNotFound(pid.clone()))
    }

    async fn serve(&mut self, command: Command) -> Result<(), Escalated> {
        match command {
            Command::AddChild(spec, reply) => {
                let result = self.add_child(*spec).await;
                let _ = reply.send(result);
            }
            Command::ReportExit(pid, reason, reply) => {
                let idx = match self.known(&pid) {
                    Ok(idx) => idx,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                };
                let Some(running) = self.children[idx].running.take() else {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                };
                // The reporter says it is dead: make it so, without a stop.
                self.shared.set_route(&pid, Some(Route::Down));
                running.kill().await;
                let outcome = self.child_exited(idx, reason).await;
                let _ = reply.send(match outcome {
                    Ok(()) => Ok(()),
                    Err(Escalated) => Err(SupervisionError::MaxRestartsExceeded(self.sup())),
                });
                return outcome;
            }
            Command::Count(reply) => {
                let mut count = ChildCount {
                    specs: self.children.len(),
                    ..ChildCount::default()
                };
                for child in &self.children {
                    count.active += usize::from(child.running.is_some());
                    match child.spec {
                        ChildSpec::Agent(_) => count.workers += 1,
                        ChildSpec::Supervisor(_) => count.supervisors += 1,
                    }
                }
                let _ = reply.send(count);
            }
            Command::Terminate(pid, reply) => {
                let result = match self.known(&pid) {
                    Ok(idx) => {
                        self.stop_child(idx).await;
                        // OTP deletes a temporary child's spec once it stops.
                        if self.children[idx].spec.restart_type() == super::RestartType::Temporary {
                            self.remove_and_report(&pid);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::Restart(pid, reply) => {
                let result = match self.known(&pid) {
                    Ok(idx) if self.children[idx].running.is_some() => {
                        Err(SupervisionError::AgentRunning(pid))
                    }
                    Ok(idx) if self.children[idx].restarting => {
                        Err(SupervisionError::AgentRestarting(pid))
                    }
                    Ok(_) => match self.start_all(&pid, std::slice::from_ref(&pid)).await {
                        None => Ok(()),
                        Some((_, e)) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::Delete(pid, reply) => {
                let result = match self.known(&pid) {
                    Ok(idx) if self.children[idx].running.is_some() => {
                        Err(SupervisionError::AgentRunning(pid))
                    }
                    Ok(idx) if self.children[idx].restarting => {
                        Err(SupervisionError::AgentRestarting(pid))
                    }
                    Ok(_) => {
                        self.remove_and_report(&pid);
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}
