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
//!   finishes before the next request is looked at.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use chrono::Utc;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::child::{self, ChildExit, Started, WorkerCommand};
use super::decision::{ChildRef, Decision, ExitKind, RestartWindow, decide, decide_failed_start};
use super::{
    ChildCount, ChildSpec, RestartAction, RestartEntry, SupervisorConfig, SupervisorEvent,
    SupervisorHandle, SupervisorStatus,
};
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

struct Running {
    incarnation: u64,
    task: JoinHandle<()>,
    stop: oneshot::Sender<()>,
}

struct Child {
    spec: ChildSpec,
    running: Option<Running>,
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    factory: Arc<dyn AgentFactory>,
    children: Vec<Child>,
    window: RestartWindow,
    exits_tx: mpsc::UnboundedSender<ChildExit>,
    exits_rx: mpsc::UnboundedReceiver<ChildExit>,
    commands: mpsc::Receiver<Command>,
    next_incarnation: u64,
}

/// Create a supervisor: its handle, and the task body to spawn.
pub(crate) fn new_supervisor(
    config: SupervisorConfig,
    factory: Arc<dyn AgentFactory>,
    events: broadcast::Sender<SupervisorEvent>,
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
        next_incarnation: 0,
    };
    (handle, actor)
}

enum Wake {
    Stop,
    Exit(ChildExit),
    Command(Option<Command>),
}

fn exit_kind(reason: &ExitReason) -> ExitKind {
    match reason {
        ExitReason::Normal => ExitKind::Normal,
        ExitReason::Shutdown | ExitReason::SupervisorShutdown => ExitKind::Shutdown,
        _ => ExitKind::Abnormal,
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
                _ = &mut stop => Wake::Stop,
                Some(exit) = self.exits_rx.recv() => Wake::Exit(exit),
                command = self.commands.recv() => Wake::Command(command),
            };
            let outcome = match wake {
                Wake::Stop | Wake::Command(None) => break,
                Wake::Exit(exit) => self.on_exit(exit).await,
                Wake::Command(Some(command)) => self.serve(command).await,
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

    fn record(&self, agent_id: &AgentPid, reason: ExitReason, action: RestartAction) {
        let mut table = lock(&self.shared.table);
        if table.history.len() >= self.shared.config.max_history.max(1) {
            table.history.pop_front();
        }
        table.history.push_back(RestartEntry {
            agent_id: agent_id.clone(),
            timestamp: Utc::now(),
            reason,
            action,
        });
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

    /// Start the child at `idx` (not running) as a new incarnation.
    async fn start_child(&mut self, idx: usize) -> SupervisionResult<()> {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let pid = self.children[idx].spec.id().clone();
        let (stop_tx, stop_rx) = oneshot::channel();
        let exits = self.exits_tx.clone();
        let (task, started, route, bound) = match &self.children[idx].spec {
            ChildSpec::Agent(spec) => {
                let (tx, rx) = mpsc::channel(64);
                let factory = self.factory.clone();
                let spec = spec.clone();
                let args = InitArgs {
                    agent_id: pid.clone(),
                    supervisor_id: self.sup(),
                    config: spec.config.clone(),
                };
                let (task, started) = child::spawn(pid.clone(), incarnation, exits, move |s| {
                    let create = async move { factory.create_agent(&spec).await };
                    child::run_worker(create, args, s, rx, stop_rx)
                });
                let bound = Some(self.shared.config.agent_timeout);
                (task, started, Route::Worker(tx), bound)
            }
            ChildSpec::Supervisor(spec) => {
                let (handle, actor) = new_supervisor(
                    spec.config.clone(),
                    spec.factory.clone(),
                    self.shared.events.clone(),
                );
                let initial = spec.children.clone();
                let (task, started) = child::spawn(pid.clone(), incarnation, exits, move |s| {
                    actor.run_boxed(initial, s, stop_rx)
                });
                (task, started, Route::Supervisor(handle), None)
            }
        };
        let outcome = match bound {
            Some(bound) => timeout(bound, started).await.map_err(|_| {
                task.abort();
                SupervisionError::AgentStartFailed(
                    pid.clone(),
                    format!("did not start within {bound:?}"),
                )
            }),
            None => Ok(started.await),
        };
        match outcome {
            Ok(Ok(Ok(()))) => {
                self.children[idx].running = Some(Running {
                    incarnation,
                    task,
                    stop: stop_tx,
                });
                self.shared.set_route(&pid, Some(route));
                self.update(idx, |info| {
                    info.status = AgentStatus::Running;
                    info.start_time = Utc::now();
                });
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(match e {
                e @ SupervisionError::AgentStartFailed(..) => e,
                e => SupervisionError::AgentStartFailed(pid, e.to_string()),
            }),
            Ok(Err(_)) => Err(SupervisionError::AgentStartFailed(
                pid,
                "the child task ended while starting (panicked)".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// Stop the child at `idx` if it runs, under its shutdown policy.
    async fn stop_child(&mut self, idx: usize) {
        let Some(Running { mut task, stop, .. }) = self.children[idx].running.take() else {
            return;
        };
        let pid = self.children[idx].spec.id().clone();
        self.shared.set_route(&pid, Some(Route::Down));
        self.update(idx, |info| info.status = AgentStatus::Stopping);
        // (the task has ended, it was killed)
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

    fn remove_and_report(&mut self, pid: &AgentPid) {
        if let Some(idx) = self.index(pid) {
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
        self.children[idx].running = None;
        self.shared.set_route(&exit.pid, Some(Route::Down));
        self.child_exited(idx, exit.reason).await
    }

    /// The child at `idx` (no longer running) exited with `reason`: decide
    /// and act.
    async fn child_exited(&mut self, idx: usize, reason: ExitReason) -> Result<(), Escalated> {
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

    /// Carry out a restart decision caused by `cause`; a child that fails to
    /// start counts as a new abnormal exit (OTP), which may escalate.
    async fn restart(
        &mut self,
        cause: &AgentPid,
        mut stop: Vec<AgentPid>,
        mut remove: Vec<AgentPid>,
        mut start: Vec<AgentPid>,
    ) -> Result<(), Escalated> {
        loop {
            self.stop_ids(&stop).await;
            for id in &start {
                if let Some(idx) = self.index(id) {
                    self.update(idx, |info| info.status = AgentStatus::Restarting);
                }
            }
            for id in &remove {
                self.record(id, ExitReason::Shutdown, RestartAction::Removed);
                self.remove_and_report(id);
            }
            let Some((failed, error)) = self.start_all(cause, &start).await else {
                return Ok(());
            };
            let reason = ExitReason::Fault(AgentFault::InitFailed(error.to_string()));
            if let Some(idx) = self.index(&failed) {
                self.update(idx, |info| {
                    info.last_exit = Some(reason.clone());
                    info.status = AgentStatus::Failed(reason.to_string());
                });
            }
            let refs = self.refs();
            let strategy = self.shared.config.restart_policy.strategy;
            let now = Instant::now();
            let decision = decide_failed_start(strategy, &refs, &failed, &mut self.window, now);
            match decision {
                Ok(Decision::Restart {
                    stop: s,
                    remove: r,
                    start: st,
                }) => {
                    self.record(&failed, reason, RestartAction::StartFailed);
                    (stop, remove, start) = (s, r, st);
                }
                Ok(Decision::Escalate { stop }) => {
                    self.record(&failed, reason, RestartAction::Escalated);
                    return self.escalate(&stop).await;
                }
                Ok(Decision::NoRestart { .. }) | Err(_) => {
                    self.record(&failed, reason, RestartAction::StartFailed);
                    return Ok(());
                }
            }
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
                running.task.abort();
                let _ = running.task.await;
                self.shared.set_route(&pid, Some(Route::Down));
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
