//! The supervisor task: owns one level of the tree and carries out the
//! decisions of [`decision`](super::decision).
//!
//! Invariants:
//! - `children` is in start order and is the only place a child's state
//!   lives; handles see a snapshot of it ([`View`]), republished by the task
//!   after every change.
//! - A child is running iff its `running` is `Some`; the incarnation number
//!   in it is the only one whose exit report is acted on. Reports from
//!   incarnations the supervisor stopped itself are ignored.
//! - The task never holds a lock across an `.await`.
//! - Requests are served one at a time, as in OTP: a restart in progress
//!   finishes before the next request is looked at. A restart attempt that
//!   fails is not retried in place: the retry is queued behind the requests
//!   already waiting (OTP's `try_again_restart`), so that they, and a stop,
//!   are served between attempts.
//! - Nothing waits inside the task: a restart delayed by a child's backoff,
//!   the trial start of a child whose circuit is open and the end of its
//!   probation are timers in the task's own queue, served like requests.
//! - The supervisor owns its children's tasks: dropping it aborts them, and
//!   every task of its subtree holds a token of its [`TaskTracker`], so that
//!   killing it can be awaited until nothing of the subtree runs. A child is
//!   restarted only after its previous incarnation (and its whole subtree)
//!   has ended: never are two incarnations of one child alive. Its next
//!   agent may be *created* meanwhile (instantiated, see [`Prepared`]): no
//!   code of its lifecycle runs before its `init`, which waits for the end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use super::backoff::{self, Backoff};
use super::breaker::{Breaker, Circuit, Verdict};
use super::cell::AgentCell;
use super::child::{self, ChildExit, Ending as ChildEnding, HealthReport, Lineage, Started};
use super::decision::{
    ChildRef, Decision, ExitKind, RestartWindow, decide, decide_failed_start, shutdown_order,
};
use super::view::{ChildView, Route, Shared, WorkerLink};
use super::{
    ChildCount, ChildSpec, CircuitStatus, EventKind, ExitCause, HealthPolicy, HealthStatus,
    RestartAction, RestartEntry, SupervisorConfig, SupervisorEvent, SupervisorHandle,
    SupervisorStatus,
};
use crate::dead_letters::{DeadLetter, DeadLetters};
use crate::runtime::{CrashReport, MAX_GUEST_TEXT};
use crate::text::{bound, fnv1a};
use crate::{
    AgentFactory, AgentFault, AgentPid, AgentStatus, ExitReason, InitArgs, ShutdownPolicy,
    SupervisedAgent, SupervisedAgentInfo, SupervisionError, SupervisionResult, SupervisorId,
};

/// Requests from handles to the supervisor task.
pub(crate) enum Command {
    /// Add a child; for an agent, the agent the handle created for it
    /// already (see [`Prepared`]).
    AddChild(Box<ChildSpec>, Option<Prepared>, Reply<AgentPid>),
    ReportExit(AgentPid, ExitReason, Reply<()>),
    Count(oneshot::Sender<ChildCount>),
    Terminate(AgentPid, Reply<()>),
    Restart(AgentPid, Reply<()>),
    Delete(AgentPid, Reply<()>),
    /// Take a quarantined message out of quarantine; the message.
    Release(AgentPid, String, Reply<String>),
}

pub(crate) type Reply<T> = oneshot::Sender<SupervisionResult<T>>;

/// What creating an agent gave.
pub(crate) type Created = SupervisionResult<Box<dyn SupervisedAgent>>;

/// An agent created ahead of its start. Creating an agent (instantiating
/// its component) runs none of its lifecycle: nothing it does is observable
/// before `init`. So it is done where it costs the supervisor nothing: by
/// the caller of `add_child`, or, for a group restart, by a task that works
/// while the bystanders are being stopped. Its `init` still runs only when
/// its start's turn comes, after its previous incarnation has ended.
pub(crate) enum Prepared {
    /// Created by the caller.
    Ready(Created),
    /// Being created by the task of a group restart. If that failed (it
    /// ran while the stopped members still held their resources), the
    /// start creates it once more.
    Later(oneshot::Receiver<Created>),
}

/// The agents of a group restart being created ahead, in start order, by
/// one task (so that the factory sees them created in that order).
#[derive(Default)]
struct Preparing {
    _task: Option<AbortOnDropHandle<()>>,
    agents: HashMap<AgentPid, oneshot::Receiver<Created>>,
}

/// The supervisor is giving up: its restart intensity was exceeded.
pub(crate) struct Escalated;

/// One running incarnation of a child.
struct Running {
    incarnation: u64,
    /// Aborted if the supervisor is dropped.
    task: AbortOnDropHandle<()>,
    /// Asks a nested supervisor for a graceful stop (an agent is stopped
    /// through its `cell`). Dropping it, without sending, tells the child
    /// that its supervisor is gone: it dies at once.
    stop: oneshot::Sender<()>,
    /// For a nested supervisor: the tracker of its subtree's tasks.
    subtree: Option<TaskTracker>,
    /// For an agent: the cell its callers run it in.
    cell: Option<Arc<AgentCell>>,
}

impl Running {
    /// Kill the incarnation and wait until it, and every task of its
    /// subtree, has ended.
    async fn kill(self) {
        self.task.abort();
        match self.cell {
            // The abort releases the cell's lock if the worker held it.
            Some(cell) => cell.kill().await,
            None => {
                let _ = self.task.await;
                settle(self.subtree).await;
            }
        }
    }
}

/// Once a child's task has ended: wait until no code of its agent runs any
/// more (a call from a caller's task may still run it), or until every task
/// of its subtree has ended.
async fn end(cell: Option<Arc<AgentCell>>, subtree: Option<TaskTracker>) {
    if let Some(cell) = cell {
        cell.kill().await;
    }
    settle(subtree).await;
}

/// Wait until every task of a subtree has ended.
async fn settle(subtree: Option<TaskTracker>) {
    if let Some(subtree) = subtree {
        subtree.close();
        subtree.wait().await;
    }
}

/// One child: its spec, its incarnation if it runs, and what handles see of
/// it.
struct Child {
    spec: ChildSpec,
    running: Option<Running>,
    /// A restart of this child is under way or queued (OTP's
    /// `{restarting, _}`): it is not running, and the next attempt will
    /// start it unless it is terminated meanwhile.
    restarting: bool,
    /// Parked by its open circuit until its trial start at this time.
    parked: Option<Instant>,
    breaker: Option<Breaker>,
    /// Restarts in a row that its backoff counts.
    streak: u32,
    /// When its current (or last) incarnation started.
    started_at: Option<Instant>,
    poison: Poison,
    info: SupervisedAgentInfo,
    route: Route,
}

/// A child's crashes on one message in a row, and its quarantine.
#[derive(Default)]
struct Poison {
    /// The content hash of the message of the last crash, and the reports
    /// of the crashes on it in a row.
    last: Option<(u64, Vec<CrashReport>)>,
    /// Hashes of its quarantined messages (shown to handles).
    quarantine: Arc<HashSet<u64>>,
}

impl Child {
    fn id(&self) -> &AgentPid {
        self.spec.id()
    }

    fn view(&self) -> Arc<ChildView> {
        Arc::new(ChildView {
            info: self.info.clone(),
            route: self.route.clone(),
            quarantine: self.poison.quarantine.clone(),
        })
    }

    fn poison_threshold(&self) -> u32 {
        match &self.spec {
            ChildSpec::Agent(agent) => agent.poison_threshold,
            ChildSpec::Supervisor(_) => 0,
        }
    }
}

/// A restart to carry out later: after a child's backoff, or after the
/// requests already waiting when an attempt failed (OTP's
/// `try_again_restart`).
struct Retry {
    cause: ExitCause,
    start: Vec<AgentPid>,
}

/// Something the supervisor task does at a given time.
enum Timer {
    /// Start these children (their bystanders were stopped already).
    Restart(Retry),
    /// The trial start of a child whose circuit is open.
    Trial(AgentPid),
    /// The end of the probation of a child's trial incarnation.
    Probation(AgentPid, u64),
}

/// How a child came to be no longer running.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// It exited (or was reported dead).
    Exit,
    /// A restart attempt failed to start it.
    FailedStart,
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    factory: Arc<dyn AgentFactory>,
    children: Vec<Child>,
    /// Each child's index in `children` (kept in step with it).
    positions: HashMap<AgentPid, usize>,
    window: RestartWindow,
    /// What the restart history weighs (see [`entry_weight`]).
    history_bytes: usize,
    exits_tx: mpsc::UnboundedSender<ChildExit>,
    exits_rx: mpsc::UnboundedReceiver<ChildExit>,
    commands: mpsc::Receiver<Command>,
    health_tx: mpsc::UnboundedSender<HealthReport>,
    health_rx: mpsc::UnboundedReceiver<HealthReport>,
    /// Due time (and a sequence number, so that equal times keep their
    /// order) to what to do then.
    timers: BTreeMap<(Instant, u64), Timer>,
    next_timer: u64,
    next_incarnation: u64,
    /// Every task started for a child holds a token of this tracker
    /// (through its [`Lineage`]), and so does every task below it.
    tracker: TaskTracker,
    /// The lineage of the task this supervisor runs in (`None` for a root).
    lineage: Option<Arc<Lineage>>,
}

/// Where a new supervisor sits in its tree.
pub(crate) struct Placement {
    /// Its id (for a nested supervisor: its id as a child).
    pub id: SupervisorId,
    /// Its path (`root`, `root/team`).
    pub path: String,
    /// The tree's event channel.
    pub events: broadcast::Sender<SupervisorEvent>,
    /// Tracks the tasks of its children and of everything below them.
    pub tracker: TaskTracker,
    /// The lineage of the task it runs in (`None` for a root).
    pub lineage: Option<Arc<Lineage>>,
}

/// Create a supervisor: its handle, and the task body to spawn.
pub(crate) fn new_supervisor(
    config: SupervisorConfig,
    factory: Arc<dyn AgentFactory>,
    placement: Placement,
) -> (SupervisorHandle, Actor) {
    let intensity = &config.restart_policy.intensity;
    let window = RestartWindow::new(intensity.max_restarts, intensity.time_window);
    let Placement {
        id,
        path,
        events,
        tracker,
        lineage,
    } = placement;
    let store = factory
        .state_store()
        .unwrap_or_else(|| Arc::new(crate::MemoryStateStore::default()));
    let dead_letters = DeadLetters::new(store);
    let shared = Arc::new(Shared::new(
        id,
        path,
        config,
        events,
        dead_letters,
        Arc::downgrade(&factory),
    ));
    let (commands_tx, commands) = mpsc::channel(64);
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let (health_tx, health_rx) = mpsc::unbounded_channel();
    let handle = SupervisorHandle {
        shared: shared.clone(),
        commands: commands_tx,
    };
    let actor = Actor {
        shared,
        factory,
        children: Vec::new(),
        positions: HashMap::new(),
        window,
        history_bytes: 0,
        exits_tx,
        exits_rx,
        commands,
        health_tx,
        health_rx,
        timers: BTreeMap::new(),
        next_timer: 0,
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
    Health(HealthReport),
    Command(Option<Command>),
    Timer,
}

/// The wall-clock time of `at`.
/// Saturating: a time past chrono's last date is that date (a far-future
/// `at` must not panic the supervisor).
fn wall(at: Instant) -> chrono::DateTime<Utc> {
    let ahead = at.saturating_duration_since(Instant::now());
    chrono::Duration::from_std(ahead)
        .ok()
        .and_then(|ahead| Utc::now().checked_add_signed(ahead))
        .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC)
}

/// Sleep until `due`; never without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

fn exit_kind(reason: &ExitReason) -> ExitKind {
    match reason {
        ExitReason::Normal => ExitKind::Normal,
        ExitReason::Shutdown | ExitReason::SupervisorShutdown => ExitKind::Shutdown,
        _ => ExitKind::Abnormal,
    }
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
    std::mem::size_of::<RestartEntry>()
        + entry.path.len()
        + reason_text_len(&entry.reason)
        + entry.crash.as_ref().map_or(0, |c| c.weight())
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

impl Actor {
    /// The task body: start `initial` in order, then serve until stopped
    /// (`Some(Shutdown)`) or escalated (`Some(Shutdown)` with status
    /// `Failed`). `None` when the start failed (the error went to
    /// `started`), or when the owner is gone.
    pub async fn run(
        mut self,
        initial: Vec<ChildSpec>,
        started: Started,
        mut stop: oneshot::Receiver<()>,
    ) -> Option<ExitReason> {
        for spec in initial {
            if let Err(e) = self.add_child(spec, None).await {
                self.shutdown(SupervisorStatus::Stopped).await;
                let _ = started.send(Err(e));
                return None;
            }
        }
        self.set_status(SupervisorStatus::Running);
        if started.send(Ok(())).is_err() {
            self.shutdown(SupervisorStatus::Stopped).await;
            return None;
        }
        loop {
            let due = self.timers.keys().next().map(|(at, _)| *at);
            let wake = tokio::select! {
                biased;
                asked = &mut stop => Wake::Stop(asked.is_ok()),
                Some(exit) = self.exits_rx.recv() => Wake::Exit(exit),
                Some(report) = self.health_rx.recv() => Wake::Health(report),
                command = self.commands.recv() => Wake::Command(command),
                () = sleep_until(due) => Wake::Timer,
            };
            let outcome = match wake {
                Wake::Stop(true) | Wake::Command(None) => break,
                // The owner is gone: die at once. Dropping `self` aborts the
                // children; whoever waits for this subtree waits for them.
                Wake::Stop(false) => return None,
                Wake::Exit(exit) => self.on_exit(exit).await,
                Wake::Health(report) => {
                    self.on_health(report);
                    Ok(())
                }
                Wake::Command(Some(command)) => self.serve(command).await,
                Wake::Timer => match self.timers.pop_first() {
                    Some((_, timer)) => self.on_timer(timer).await,
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
    ) -> Pin<Box<dyn Future<Output = Option<ChildEnding>> + Send>> {
        Box::pin(async move { self.run(initial, started, stop).await.map(Into::into) })
    }

    // --- the snapshot handles read ------------------------------------

    fn set_status(&self, status: SupervisorStatus) {
        self.shared.view.send_modify(|view| view.status = status);
    }

    /// Republish every child and reindex them (after one was removed).
    fn publish_children(&mut self) {
        self.positions = self
            .children
            .iter()
            .enumerate()
            .map(|(idx, child)| (child.id().clone(), idx))
            .collect();
        let children: Vec<_> = self.children.iter().map(Child::view).collect();
        self.shared
            .view
            .send_modify(|view| view.set_children(children));
    }

    /// Index and publish the child just pushed.
    fn publish_pushed(&mut self) {
        let idx = self.children.len() - 1;
        let child = &self.children[idx];
        self.positions.insert(child.id().clone(), idx);
        let view = child.view();
        self.shared.view.send_modify(|v| v.push_child(view));
    }

    /// Change the child at `idx` and republish it.
    fn update(&mut self, idx: usize, f: impl FnOnce(&mut SupervisedAgentInfo)) {
        let Some(child) = self.children.get_mut(idx) else {
            return;
        };
        f(&mut child.info);
        self.publish(idx);
    }

    fn set_route(&mut self, idx: usize, route: Route) {
        if let Some(child) = self.children.get_mut(idx) {
            child.route = route;
            self.publish(idx);
        }
    }

    fn publish(&self, idx: usize) {
        let view = self.children[idx].view();
        self.shared.view.send_modify(|v| {
            if let Some(slot) = v.children.get_mut(idx) {
                *slot = view;
            }
        });
    }

    /// Add a history entry, dropping the oldest ones beyond the entry and
    /// byte bounds (the newest entry is always kept).
    fn record(&mut self, idx: usize, reason: ExitReason, action: RestartAction) {
        self.record_crash(idx, reason, action, None);
    }

    /// [`record`](Self::record) with the crash's report.
    fn record_crash(
        &mut self,
        idx: usize,
        reason: ExitReason,
        action: RestartAction,
        crash: Option<Box<CrashReport>>,
    ) {
        let child = &self.children[idx];
        let entry = RestartEntry {
            agent_id: child.id().clone(),
            path: child.info.path.clone(),
            timestamp: Utc::now(),
            reason: bounded_reason(reason),
            action,
            crash,
        };
        let config = &self.shared.config;
        let (max_entries, max_bytes) = (config.max_history.max(1), config.max_history_bytes);
        let mut bytes = self.history_bytes + entry_weight(&entry);
        self.shared.view.send_modify(|view| {
            let history = Arc::make_mut(&mut view.history);
            history.push_back(entry);
            while history.len() > 1 && (history.len() > max_entries || bytes > max_bytes) {
                if let Some(old) = history.pop_front() {
                    bytes -= entry_weight(&old);
                }
            }
        });
        self.history_bytes = bytes;
    }

    fn emit(&self, path: &str, kind: EventKind) {
        // No subscriber is fine.
        let _ = self.shared.events.send(SupervisorEvent {
            at: Utc::now(),
            supervisor: self.shared.id.clone(),
            path: path.to_owned(),
            kind,
        });
    }

    fn emit_child(&self, idx: usize, kind: EventKind) {
        self.emit(&self.children[idx].info.path, kind);
    }

    // --- children -------------------------------------------------------

    fn index(&self, pid: &AgentPid) -> Option<usize> {
        self.positions.get(pid).copied()
    }

    fn known(&self, pid: &AgentPid) -> SupervisionResult<usize> {
        self.index(pid)
            .ok_or_else(|| SupervisionError::AgentNotFound(pid.clone()))
    }

    fn refs(&self) -> Vec<ChildRef<AgentPid>> {
        self.children
            .iter()
            .map(|c| ChildRef {
                id: c.id().clone(),
                restart_type: c.spec.restart_type(),
            })
            .collect()
    }

    /// Add a child and start it (OTP's `start_child`), with the agent
    /// `prepared` for it if there is one; the spec is not kept if the start
    /// fails.
    async fn add_child(
        &mut self,
        spec: ChildSpec,
        prepared: Option<Prepared>,
    ) -> SupervisionResult<AgentPid> {
        let pid = spec.id().clone();
        let max = self.shared.config.max_children;
        if self.children.len() >= max {
            return Err(SupervisionError::MaxChildrenReached(max));
        }
        if self.index(&pid).is_some() {
            return Err(SupervisionError::DuplicateAgent(pid));
        }
        let name = spec.name().map(str::to_owned);
        let path = format!(
            "{}/{}",
            self.shared.path,
            name.clone().unwrap_or_else(|| pid.to_string())
        );
        if let Some(name) = &name {
            if name.is_empty() || name.contains('/') {
                return Err(SupervisionError::InvalidAgentSpec(format!(
                    "`{name}` cannot name a child: use a non-empty name without `/`"
                )));
            }
            if self
                .children
                .iter()
                .any(|c| c.info.name.as_ref() == Some(name))
            {
                return Err(SupervisionError::NameTaken(path));
            }
        }
        let agent_spec = match &spec {
            ChildSpec::Agent(agent) => {
                self.factory.validate_spec(agent)?;
                Some(agent.clone())
            }
            ChildSpec::Supervisor(_) => None,
        };
        let health = match &spec {
            ChildSpec::Agent(agent) => agent
                .health
                .unwrap_or_else(|| self.shared.config.health_policy()),
            ChildSpec::Supervisor(_) => HealthPolicy::OFF,
        };
        if let Err(why) = spec
            .backoff()
            .validate()
            .and_then(|()| spec.breaker().map_or(Ok(()), |breaker| breaker.validate()))
            .and_then(|()| health.validate())
        {
            return Err(SupervisionError::InvalidAgentSpec(format!("{path}: {why}")));
        }
        let mut info =
            SupervisedAgentInfo::new(pid.clone(), self.shared.id.clone(), name, path, agent_spec);
        let breaker = spec.breaker().map(Breaker::new);
        info.circuit = breaker.as_ref().map(|_| CircuitStatus::Closed);
        self.children.push(Child {
            spec,
            running: None,
            restarting: false,
            parked: None,
            breaker,
            streak: 0,
            started_at: None,
            poison: Poison::default(),
            info,
            route: Route::Down,
        });
        let idx = self.children.len() - 1;
        if self.children[idx].poison_threshold() > 0 {
            // Quarantined before a restart of the host (a durable store).
            match self.shared.dead_letters.hashes(&pid).await {
                Ok(hashes) => self.children[idx].poison.quarantine = Arc::new(hashes),
                Err(e) => tracing::warn!("{}: dead letters unreadable: {e}", self.shared.path),
            }
        }
        self.publish_pushed();
        match self.start_child(idx, prepared).await {
            Ok(()) => {
                let name = self.children[idx].info.name.clone();
                self.emit_child(
                    idx,
                    EventKind::ChildStarted {
                        agent: pid.clone(),
                        name,
                    },
                );
                Ok(pid)
            }
            Err(e) => {
                let child = self.children.remove(idx);
                self.shared.forget_meter(child.id());
                self.publish_children();
                Err(e)
            }
        }
    }

    /// Start the child at `idx` (not running) as a new incarnation, with the
    /// agent `prepared` for it if there is one. On failure nothing of the
    /// attempt runs any more when this returns (a start that timed out is
    /// killed and awaited), so that a retry never overlaps it.
    async fn start_child(
        &mut self,
        idx: usize,
        prepared: Option<Prepared>,
    ) -> SupervisionResult<()> {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let pid = self.children[idx].id().clone();
        let (stop_tx, stop_rx) = oneshot::channel();
        let exits = self.exits_tx.clone();
        let lineage = Arc::new(Lineage::new(&self.tracker, self.lineage.clone()));
        let (task, started, route, subtree, cell) = match &self.children[idx].spec {
            ChildSpec::Agent(spec) => {
                let (tx, rx) = mpsc::channel(64);
                let factory = self.factory.clone();
                let spec = spec.clone();
                let args = InitArgs {
                    agent_id: pid.clone(),
                    supervisor_id: self.shared.id.clone(),
                    config: spec.config.clone(),
                };
                let config = &self.shared.config;
                let setup = child::WorkerSetup {
                    incarnation,
                    max_reply_bytes: config.max_message_bytes,
                    health: spec.health.unwrap_or_else(|| config.health_policy()),
                    reports: self.health_tx.clone(),
                    meter: self.shared.meter_of(&pid),
                };
                // Created, initialised and started here, bounded by the
                // agent timeout, without a hop to a task and back; a start
                // that fails leaves nothing running (the agent is dropped).
                let create = async move {
                    match prepared {
                        Some(Prepared::Ready(created)) => created,
                        Some(Prepared::Later(created)) => match created.await {
                            Ok(Ok(agent)) => Ok(agent),
                            _ => factory.create_agent(&spec).await,
                        },
                        None => factory.create_agent(&spec).await,
                    }
                };
                let bound = self.shared.config.agent_timeout;
                let starting = AssertUnwindSafe(child::start_agent(create, args)).catch_unwind();
                let agent = match timeout(bound, starting).await {
                    Ok(Ok(Ok(agent))) => agent,
                    Ok(Ok(Err(SupervisionError::AgentStartFailed(_, why)))) => {
                        return Err(self.start_failed_error(idx, why));
                    }
                    Ok(Ok(Err(e))) => return Err(self.start_failed_error(idx, e.to_string())),
                    Ok(Err(_)) => {
                        let why = "it panicked while starting".to_owned();
                        return Err(self.start_failed_error(idx, why));
                    }
                    Err(_) => {
                        let why = format!("it did not start within {bound:?}");
                        return Err(self.start_failed_error(idx, why));
                    }
                };
                setup.meter.started(agent.stats());
                let cell = AgentCell::new(
                    (pid.clone(), incarnation),
                    exits.clone(),
                    &lineage,
                    setup.max_reply_bytes,
                    setup.meter.clone(),
                );
                cell.install(agent);
                let worker_cell = cell.clone();
                let worker_pid = pid.clone();
                let (task, _started) =
                    child::spawn(pid.clone(), incarnation, exits, lineage, None, move |s| {
                        let _ = s.send(Ok(()));
                        child::run_worker(worker_pid, setup, worker_cell, rx, stop_rx)
                    });
                let route = Route::Worker(WorkerLink {
                    cell: cell.clone(),
                    mailbox: tx,
                });
                (task, None, route, None, Some(cell))
            }
            ChildSpec::Supervisor(spec) => {
                let subtree = TaskTracker::new();
                let placement = Placement {
                    // One identity: the nested supervisor's id is its id as
                    // a child.
                    id: SupervisorId(pid.0),
                    path: self.children[idx].info.path.clone(),
                    events: self.shared.events.clone(),
                    tracker: subtree.clone(),
                    lineage: Some(lineage.clone()),
                };
                let (handle, actor) =
                    new_supervisor(spec.config.clone(), spec.factory.clone(), placement);
                let initial = spec.children.clone();
                let (task, started) = child::spawn(
                    pid.clone(),
                    incarnation,
                    exits,
                    lineage,
                    Some(subtree.clone()),
                    move |s| actor.run_boxed(initial, s, stop_rx),
                );
                let route = Route::Supervisor(handle);
                (task, Some(started), route, Some(subtree), None)
            }
        };
        let task = AbortOnDropHandle::new(task);
        let outcome = match started {
            // An agent: started above.
            None => Ok(Ok(())),
            // A nested supervisor: its task started it (its children's own
            // starts are bounded by its agent timeout).
            Some(started) => started.await,
        };
        let error = match outcome {
            Ok(Ok(())) => {
                let child = &mut self.children[idx];
                child.running = Some(Running {
                    incarnation,
                    task,
                    stop: stop_tx,
                    subtree,
                    cell,
                });
                child.restarting = false;
                child.started_at = Some(Instant::now());
                child.route = route;
                self.update(idx, |info| {
                    info.status = AgentStatus::Running;
                    info.start_time = Utc::now();
                    info.health = None;
                });
                return Ok(());
            }
            Ok(Err(SupervisionError::AgentStartFailed(_, why))) => {
                self.start_failed_error(idx, why)
            }
            Ok(Err(e)) => self.start_failed_error(idx, e.to_string()),
            Err(_) => {
                self.start_failed_error(idx, "its task ended while starting (it panicked)".into())
            }
        };
        // The task ends by itself after a failed start; wait for it.
        let _ = task.await;
        end(cell, subtree).await;
        Err(error)
    }

    /// The error of the child at `idx` that failed to start for `why`.
    fn start_failed_error(&self, idx: usize, why: String) -> SupervisionError {
        let child = &self.children[idx];
        SupervisionError::AgentStartFailed(
            child.id().clone(),
            format!("{} failed to start: {why}", child.info.path),
        )
    }

    /// Stop the child at `idx` if it runs, under its shutdown policy, and
    /// wait until it and its whole subtree have ended.
    async fn stop_child(&mut self, idx: usize) {
        let was_restarting = std::mem::take(&mut self.children[idx].restarting);
        if self.children[idx].parked.take().is_some() {
            // Stopped by hand: its circuit starts over, closed.
            let child = &mut self.children[idx];
            child.breaker = child.spec.breaker().map(Breaker::new);
            child.route = Route::Down;
            self.update(idx, |info| {
                info.status = AgentStatus::Stopped;
                info.circuit = Some(CircuitStatus::Closed);
            });
            return;
        }
        let Some(running) = self.children[idx].running.take() else {
            if was_restarting {
                // Its queued restart will find it no longer restarting.
                self.update(idx, |info| info.status = AgentStatus::Stopped);
            }
            return;
        };
        let pid = self.children[idx].id().clone();
        self.children[idx].route = Route::Down;
        self.update(idx, |info| info.status = AgentStatus::Stopping);
        let Running {
            mut task,
            stop,
            subtree,
            cell,
            ..
        } = running;
        let shutdown = self.children[idx].spec.shutdown();
        let killed = match cell {
            // An agent is stopped here, through its cell: no hop to its
            // worker and back. Its worker, holding nothing of it once the
            // cell is stopped or killed, is aborted with `task`.
            Some(cell) => {
                let stopped = match shutdown {
                    ShutdownPolicy::BrutalKill => false,
                    ShutdownPolicy::Timeout(grace) => timeout(grace, cell.stop()).await.is_ok(),
                    ShutdownPolicy::Infinity => {
                        cell.stop().await;
                        true
                    }
                };
                task.abort();
                // Returns once no code of the agent runs any more (the
                // worker may have held the lock: its abort releases it).
                cell.kill().await;
                !stopped
            }
            None => {
                // (whether the task has already been awaited to its end, killed)
                let (joined, killed) = match shutdown {
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
                killed
            }
        };
        self.update(idx, |info| info.status = AgentStatus::Stopped);
        self.emit_child(idx, EventKind::ChildStopped { agent: pid, killed });
    }

    async fn stop_ids(&mut self, ids: &[AgentPid]) {
        for id in ids {
            if let Some(idx) = self.index(id) {
                self.stop_child(idx).await;
            }
        }
    }

    /// Remove a child's spec for good (a temporary child that exited,
    /// `delete_child`): what the factories keep for its agents (their state)
    /// is released.
    fn remove(&mut self, idx: usize) {
        let child = self.children.remove(idx);
        self.shared.forget_meter(child.id());
        release(&*self.factory, &child.spec);
        if !child.poison.quarantine.is_empty() {
            let (letters, pid) = (self.shared.dead_letters.clone(), child.id().clone());
            tokio::spawn(async move {
                if let Err(e) = letters.clear(&pid).await {
                    tracing::warn!("dead letters of {pid} not cleared: {e}");
                }
            });
        }
        self.publish_children();
        self.emit(
            &child.info.path,
            EventKind::ChildRemoved {
                agent: child.id().clone(),
            },
        );
    }

    /// Stop every child in reverse start order and settle in `status`.
    async fn shutdown(&mut self, status: SupervisorStatus) {
        self.set_status(SupervisorStatus::Stopping);
        let order = shutdown_order(&self.refs());
        self.stop_ids(&order).await;
        self.set_status(status);
        self.emit(&self.shared.path, EventKind::SupervisorStopped);
    }

    /// Give up: stop `stop` (every remaining child, reverse start order) and
    /// end in `Failed`.
    async fn escalate(&mut self, stop: &[AgentPid]) -> Result<(), Escalated> {
        self.set_status(SupervisorStatus::Stopping);
        self.stop_ids(stop).await;
        self.set_status(SupervisorStatus::Failed(
            "maximum restart intensity exceeded".into(),
        ));
        self.emit(&self.shared.path, EventKind::Escalated);
        self.emit(&self.shared.path, EventKind::SupervisorStopped);
        Err(Escalated)
    }

    // --- exits and restarts ---------------------------------------------

    async fn on_exit(&mut self, exit: ChildExit) -> Result<(), Escalated> {
        let Some(idx) = self.index(&exit.pid) else {
            return Ok(());
        };
        let current = self.children[idx].running.as_ref().map(|r| r.incarnation);
        if current != Some(exit.incarnation) {
            return Ok(()); // an incarnation we stopped ourselves
        }
        // An agent's end is reported by whoever ended it, under its cell's
        // lock, once the agent was taken out of the cell: none of its code
        // runs any more, and its worker (dropped and so aborted here) holds
        // nothing of it. A supervisor's task sent its exit as its last act:
        // awaiting it returns at once.
        if let Some(ended) = self.children[idx].running.take()
            && ended.cell.is_none()
        {
            let _ = ended.task.await;
        }
        self.set_route(idx, Route::Down);
        let ChildEnding {
            reason,
            crash,
            message,
        } = exit.ending;
        if let (Some(crash), Some(message)) = (&crash, message) {
            self.track_poison(idx, crash, message).await;
        }
        self.handle_exit(idx, reason, crash).await
    }

    /// The child at `idx` crashed on `message`: count it against that
    /// message, and quarantine the message once it crashed the child
    /// `poison_threshold` times in a row.
    async fn track_poison(&mut self, idx: usize, crash: &CrashReport, message: String) {
        let threshold = self.children[idx].poison_threshold();
        if threshold == 0 {
            return;
        }
        let hash = fnv1a(message.as_bytes());
        let poison = &mut self.children[idx].poison;
        let reports = match &mut poison.last {
            Some((last, reports)) if *last == hash => reports,
            last => &mut last.insert((hash, Vec::new())).1,
        };
        reports.push(crash.clone());
        if reports.len() < threshold as usize {
            return;
        }
        let crashes = std::mem::take(reports);
        poison.last = None;
        let mut quarantine = (*poison.quarantine).clone();
        quarantine.insert(hash);
        poison.quarantine = Arc::new(quarantine);
        let agent = self.children[idx].id().clone();
        let hex = format!("{hash:016x}");
        let letter = DeadLetter {
            hash: hex.clone(),
            agent: agent.clone(),
            at: Utc::now(),
            message,
            crashes,
        };
        if let Err(e) = self.shared.dead_letters.put(letter).await {
            // Still quarantined in memory; only the dead letter is lost.
            tracing::warn!(
                "{}: dead letter {hex} not kept: {e}",
                self.children[idx].info.path
            );
        }
        self.publish(idx);
        self.record(
            idx,
            ExitReason::Shutdown,
            RestartAction::Quarantined { hash: hex.clone() },
        );
        self.emit_child(idx, EventKind::MessageQuarantined { agent, hash: hex });
    }

    /// The child at `idx` (no longer running) exited with `reason`: its
    /// circuit breaker first (an open circuit parks it, outside the
    /// strategy and the intensity), then decide and act.
    async fn handle_exit(
        &mut self,
        idx: usize,
        reason: ExitReason,
        crash: Option<Box<CrashReport>>,
    ) -> Result<(), Escalated> {
        if crash.is_some() {
            let crash = crash.clone();
            self.update(idx, |info| info.last_crash = crash);
        }
        let failure = exit_kind(&reason) == ExitKind::Abnormal;
        if failure && let Some(until) = self.breaker_verdict(idx) {
            self.park(idx, reason, until, Ending::Exit, crash);
            return Ok(());
        }
        match self.decide_exit(idx, reason, Ending::Exit, crash) {
            (
                cause,
                Decision::Restart {
                    stop,
                    remove,
                    start,
                },
            ) => {
                let delay = self.backoff_delay(&cause.agent);
                // Started now: create the agents while the bystanders stop.
                let preparing = if delay.is_zero() && !stop.is_empty() {
                    self.prepare(&start)
                } else {
                    Preparing::default()
                };
                self.stop_and_remove(&stop, &remove).await;
                self.start_after(cause, start, delay, preparing).await
            }
            (_, other) => self.conclude(idx, other).await,
        }
    }

    /// Create the agents of `start` ahead of their starts, in order, in a
    /// task of this supervisor's subtree (see [`Prepared`]).
    fn prepare(&self, start: &[AgentPid]) -> Preparing {
        let mut agents = HashMap::new();
        let mut jobs = Vec::new();
        for id in start {
            let Some(ChildSpec::Agent(spec)) = self.index(id).map(|i| &self.children[i].spec)
            else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            agents.insert(id.clone(), rx);
            jobs.push((spec.clone(), tx));
        }
        if jobs.is_empty() {
            return Preparing::default();
        }
        let factory = self.factory.clone();
        let lineage = Lineage::new(&self.tracker, self.lineage.clone());
        let task = tokio::spawn(async move {
            let _lineage = lineage;
            for (spec, tx) in jobs {
                let created = factory.create_agent(&spec).await;
                // A start that no longer waits drops the agent here.
                let _ = tx.send(created);
            }
        });
        Preparing {
            _task: Some(AbortOnDropHandle::new(task)),
            agents,
        }
    }

    /// What the child's circuit breaker says about a failure now: `Some`
    /// time of its trial if the circuit (re)opened.
    fn breaker_verdict(&mut self, idx: usize) -> Option<Instant> {
        let child = &mut self.children[idx];
        if child.spec.restart_type() == super::RestartType::Temporary {
            return None; // never restarted anyway
        }
        match child.breaker.as_mut()?.on_failure(Instant::now()) {
            Verdict::Pass => None,
            Verdict::Park { until } => Some(until),
        }
    }

    /// Park the child at `idx` until `until`: shown and recorded, not
    /// restarted, not counted against the intensity; its trial start is a
    /// timer.
    fn park(
        &mut self,
        idx: usize,
        reason: ExitReason,
        until: Instant,
        ending: Ending,
        crash: Option<Box<CrashReport>>,
    ) {
        let reason = bounded_reason(reason);
        let agent = self.children[idx].id().clone();
        let at = wall(until);
        let child = &mut self.children[idx];
        child.parked = Some(until);
        child.restarting = false;
        child.route = Route::Parked { until: at };
        self.update(idx, |info| {
            info.last_exit = Some(reason.clone());
            info.status = AgentStatus::Restarting;
            info.circuit = Some(CircuitStatus::Open { until: at });
        });
        if ending == Ending::Exit {
            self.emit_child(
                idx,
                EventKind::ChildExited {
                    agent: agent.clone(),
                    reason: reason.clone(),
                    crash: crash.clone(),
                },
            );
        }
        self.record_crash(
            idx,
            reason,
            RestartAction::CircuitOpened { until: at },
            crash,
        );
        self.emit_child(
            idx,
            EventKind::CircuitOpened {
                agent: agent.clone(),
                until: at,
            },
        );
        self.schedule(until, Timer::Trial(agent));
    }

    /// The delay before restarting `pid`, by its backoff: its streak grows
    /// with each restart and starts over after a long run. (An index would
    /// not do: removing a temporary bystander shifts them.)
    fn backoff_delay(&mut self, pid: &AgentPid) -> Duration {
        let Some(idx) = self.index(pid) else {
            return Duration::ZERO;
        };
        let child = &mut self.children[idx];
        let backoff: Backoff = child.spec.backoff();
        let ran = child.started_at.map_or(Duration::ZERO, |at| at.elapsed());
        if backoff.resets_after(ran) {
            child.streak = 0;
        }
        child.streak = child.streak.saturating_add(1);
        backoff.delay(child.streak, backoff::jitter())
    }

    fn schedule(&mut self, at: Instant, timer: Timer) {
        self.next_timer += 1;
        self.timers.insert((at, self.next_timer), timer);
    }

    /// The one place where an exit or a failed start is shown, decided and
    /// recorded: OTP's `restart/3` for both (a failed start is an abnormal
    /// exit that counts against the intensity again).
    fn decide_exit(
        &mut self,
        idx: usize,
        reason: ExitReason,
        ending: Ending,
        crash: Option<Box<CrashReport>>,
    ) -> (ExitCause, Decision<AgentPid>) {
        let reason = bounded_reason(reason);
        let pid = self.children[idx].id().clone();
        self.update(idx, |info| {
            info.last_exit = Some(reason.clone());
            info.status = match ending {
                Ending::Exit => AgentStatus::Failed(reason.to_string()),
                Ending::FailedStart => AgentStatus::Restarting,
            };
        });
        let refs = self.refs();
        let strategy = self.shared.config.restart_policy.strategy;
        let now = Instant::now();
        let decided = match ending {
            Ending::Exit => {
                self.emit_child(
                    idx,
                    EventKind::ChildExited {
                        agent: pid.clone(),
                        reason: reason.clone(),
                        crash: crash.clone(),
                    },
                );
                decide(
                    strategy,
                    &refs,
                    &pid,
                    exit_kind(&reason),
                    &mut self.window,
                    now,
                )
            }
            Ending::FailedStart => {
                decide_failed_start(strategy, &refs, &pid, &mut self.window, now)
            }
        };
        // `pid` is a child: `decide` cannot fail.
        let decision = decided.unwrap_or(Decision::NoRestart { remove: false });
        let action = match (&decision, ending) {
            (Decision::Escalate { .. }, _) => RestartAction::Escalated,
            (Decision::NoRestart { remove: true }, _) => RestartAction::Removed,
            (_, Ending::FailedStart) => RestartAction::StartFailed,
            (Decision::NoRestart { .. }, Ending::Exit) => RestartAction::NotRestarted,
            (Decision::Restart { .. }, Ending::Exit) => RestartAction::Restarted,
        };
        self.record_crash(idx, reason.clone(), action, crash);
        let cause = ExitCause {
            agent: pid,
            path: self.children[idx].info.path.clone(),
            reason,
        };
        (cause, decision)
    }

    /// Carry out a decision other than a restart about the child at `idx`.
    async fn conclude(
        &mut self,
        idx: usize,
        decision: Decision<AgentPid>,
    ) -> Result<(), Escalated> {
        match decision {
            Decision::NoRestart { remove: true } => {
                self.remove(idx);
                Ok(())
            }
            Decision::NoRestart { remove: false } | Decision::Restart { .. } => {
                self.children[idx].restarting = false;
                self.update(idx, |info| info.status = AgentStatus::Stopped);
                Ok(())
            }
            Decision::Escalate { stop } => self.escalate(&stop).await,
        }
    }

    /// The first half of a restart: stop the bystanders (reverse start
    /// order) and remove the temporary ones.
    async fn stop_and_remove(&mut self, stop: &[AgentPid], remove: &[AgentPid]) {
        self.stop_ids(stop).await;
        for id in remove {
            if let Some(idx) = self.index(id) {
                self.record(idx, ExitReason::Shutdown, RestartAction::Removed);
                self.remove(idx);
            }
        }
    }

    /// The second half of a restart: mark `start` restarting, and start
    /// them in order now, or after `delay` (a timer).
    async fn start_after(
        &mut self,
        cause: ExitCause,
        start: Vec<AgentPid>,
        delay: Duration,
        preparing: Preparing,
    ) -> Result<(), Escalated> {
        for id in &start {
            if let Some(idx) = self.index(id) {
                self.children[idx].restarting = true;
                self.update(idx, |info| info.status = AgentStatus::Restarting);
            }
        }
        if delay.is_zero() {
            return self.start_group(cause, &start, preparing).await;
        }
        self.schedule(
            Instant::now() + delay,
            Timer::Restart(Retry { cause, start }),
        );
        Ok(())
    }

    /// Start `start` in order (those still waiting for it). A child that
    /// fails to start is, in turn, a failure for its breaker or a new
    /// abnormal exit, which may escalate; its next attempt is a timer, not
    /// made here.
    async fn start_group(
        &mut self,
        cause: ExitCause,
        start: &[AgentPid],
        mut preparing: Preparing,
    ) -> Result<(), Escalated> {
        for id in start {
            let Some(idx) = self.index(id) else { continue };
            let child = &self.children[idx];
            if child.running.is_some() || !child.restarting {
                continue;
            }
            let prepared = preparing.agents.remove(id).map(Prepared::Later);
            if let Err(error) = self.start_child(idx, prepared).await {
                let reason = ExitReason::Fault(AgentFault::InitFailed(error.to_string()));
                return self.start_failed(idx, reason).await;
            }
            let bystander = *id != cause.agent;
            if bystander {
                let sibling = cause.agent.clone();
                self.record(
                    idx,
                    ExitReason::Shutdown,
                    RestartAction::RestartedWithSibling(sibling),
                );
            }
            self.restarted(idx, cause.clone(), bystander);
        }
        Ok(())
    }

    /// A restart attempt failed to start the child at `idx`.
    async fn start_failed(&mut self, idx: usize, reason: ExitReason) -> Result<(), Escalated> {
        if let Some(until) = self.breaker_verdict(idx) {
            self.park(idx, reason, until, Ending::FailedStart, None);
            return Ok(());
        }
        match self.decide_exit(idx, reason, Ending::FailedStart, None) {
            (
                cause,
                Decision::Restart {
                    stop,
                    remove,
                    start,
                },
            ) => {
                self.stop_and_remove(&stop, &remove).await;
                let delay = self.backoff_delay(&cause.agent);
                for id in &start {
                    if let Some(i) = self.index(id) {
                        self.children[i].restarting = true;
                        self.update(i, |info| info.status = AgentStatus::Restarting);
                    }
                }
                // Even without a delay, behind the requests waiting now.
                self.schedule(
                    Instant::now() + delay,
                    Timer::Restart(Retry { cause, start }),
                );
                Ok(())
            }
            (_, other) => self.conclude(idx, other).await,
        }
    }

    /// The child at `idx` was started again: count it and say so.
    fn restarted(&mut self, idx: usize, cause: ExitCause, bystander: bool) {
        let mut restart_count = 0;
        self.update(idx, |info| {
            info.restart_count += 1;
            info.last_restart = Some(Utc::now());
            restart_count = info.restart_count;
        });
        let agent = self.children[idx].id().clone();
        self.emit_child(
            idx,
            EventKind::ChildRestarted {
                agent,
                restart_count,
                cause,
                bystander,
            },
        );
    }

    /// A timer is due.
    async fn on_timer(&mut self, timer: Timer) -> Result<(), Escalated> {
        match timer {
            Timer::Restart(Retry { cause, start }) => {
                self.start_group(cause, &start, Preparing::default()).await
            }
            Timer::Trial(pid) => self.trial(&pid).await,
            Timer::Probation(pid, incarnation) => {
                self.probation_passed(&pid, incarnation);
                Ok(())
            }
        }
    }

    /// The trial start of a parked child: half-open, then started; a start
    /// that fails re-opens its circuit.
    async fn trial(&mut self, pid: &AgentPid) -> Result<(), Escalated> {
        let Some(idx) = self.index(pid) else {
            return Ok(());
        };
        let child = &mut self.children[idx];
        let due = child.parked.is_some()
            && child
                .breaker
                .as_mut()
                .is_some_and(|b| b.trial_due(Instant::now()));
        if !due {
            return Ok(()); // terminated meanwhile
        }
        child.parked = None;
        child.route = Route::Down;
        self.update(idx, |info| info.circuit = Some(CircuitStatus::HalfOpen));
        self.record(idx, ExitReason::Shutdown, RestartAction::CircuitHalfOpen);
        self.emit_child(idx, EventKind::CircuitHalfOpen { agent: pid.clone() });
        if let Err(error) = self.start_child(idx, None).await {
            let reason = ExitReason::Fault(AgentFault::InitFailed(error.to_string()));
            return self.start_failed(idx, reason).await;
        }
        let cause = ExitCause {
            agent: pid.clone(),
            path: self.children[idx].info.path.clone(),
            reason: self.children[idx]
                .info
                .last_exit
                .clone()
                .unwrap_or(ExitReason::Shutdown),
        };
        self.restarted(idx, cause, false);
        let child = &self.children[idx];
        if let (Some(running), Some(breaker)) = (&child.running, &child.breaker) {
            let at = Instant::now() + breaker.probation();
            let timer = Timer::Probation(pid.clone(), running.incarnation);
            self.schedule(at, timer);
        }
        Ok(())
    }

    /// The trial incarnation `incarnation` of `pid` ran through its
    /// probation: its circuit closes (if that incarnation still runs).
    fn probation_passed(&mut self, pid: &AgentPid, incarnation: u64) {
        let Some(idx) = self.index(pid) else { return };
        let child = &mut self.children[idx];
        let current = child.running.as_ref().map(|r| r.incarnation) == Some(incarnation);
        let Some(breaker) = child.breaker.as_mut() else {
            return;
        };
        if !current || breaker.circuit() != Circuit::HalfOpen {
            return;
        }
        breaker.on_probation_passed();
        self.update(idx, |info| info.circuit = Some(CircuitStatus::Closed));
        self.record(idx, ExitReason::Normal, RestartAction::CircuitClosed);
        self.emit_child(idx, EventKind::CircuitClosed { agent: pid.clone() });
    }

    /// A health check's outcome, shown if it is about the running
    /// incarnation.
    fn on_health(&mut self, report: HealthReport) {
        let Some(idx) = self.index(&report.pid) else {
            return;
        };
        let current = self.children[idx].running.as_ref().map(|r| r.incarnation);
        if current != Some(report.incarnation) {
            return;
        }
        let failure = report.failure.map(|why| bound(why, MAX_GUEST_TEXT));
        self.update(idx, |info| {
            info.last_health_check = Some(report.at);
            info.health = Some(HealthStatus {
                at: report.at,
                failure,
                streak: report.streak,
            });
        });
    }

    /// Take the message `hash` of `pid` out of quarantine and out of its
    /// dead letters; the message.
    async fn release_letter(&mut self, pid: &AgentPid, hash: &str) -> SupervisionResult<String> {
        let idx = self.known(pid)?;
        let not_found =
            || SupervisionError::NodeNotFound(format!("no dead letter {hash} of agent {pid}"));
        let value = u64::from_str_radix(hash, 16).map_err(|_| not_found())?;
        let letter = self
            .shared
            .dead_letters
            .take(pid, hash)
            .await
            .map_err(|e| SupervisionError::System(format!("dead letters: {e}")))?;
        let poison = &mut self.children[idx].poison;
        let was_quarantined = poison.quarantine.contains(&value);
        if was_quarantined {
            let mut quarantine = (*poison.quarantine).clone();
            quarantine.remove(&value);
            poison.quarantine = Arc::new(quarantine);
            self.publish(idx);
        }
        letter.map(|l| l.message).ok_or_else(not_found)
    }

    // --- requests ---------------------------------------------------------

    async fn serve(&mut self, command: Command) -> Result<(), Escalated> {
        match command {
            Command::AddChild(spec, prepared, reply) => {
                let result = self.add_child(*spec, prepared).await;
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
                self.set_route(idx, Route::Down);
                running.kill().await;
                let outcome = self.handle_exit(idx, reason, None).await;
                let _ = reply.send(match outcome {
                    Ok(()) => Ok(()),
                    Err(Escalated) => Err(SupervisionError::MaxRestartsExceeded(
                        self.shared.id.clone(),
                    )),
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
                let known = self.known(&pid);
                if let Ok(idx) = known {
                    self.stop_child(idx).await;
                    // OTP deletes a temporary child's spec once it stops.
                    if self.children[idx].spec.restart_type() == super::RestartType::Temporary {
                        self.remove(idx);
                    }
                }
                let _ = reply.send(known.map(|_| ()));
            }
            Command::Restart(pid, reply) => {
                let result = match self.known(&pid) {
                    Ok(idx) if self.children[idx].running.is_some() => {
                        Err(SupervisionError::AgentRunning(pid))
                    }
                    Ok(idx)
                        if self.children[idx].restarting || self.children[idx].parked.is_some() =>
                    {
                        Err(SupervisionError::AgentRestarting(pid))
                    }
                    Ok(idx) => match self.start_child(idx, None).await {
                        Ok(()) => {
                            // Restarted on request: its own last exit is the
                            // cause.
                            let cause = ExitCause {
                                agent: pid,
                                path: self.children[idx].info.path.clone(),
                                reason: self.children[idx]
                                    .info
                                    .last_exit
                                    .clone()
                                    .unwrap_or(ExitReason::Shutdown),
                            };
                            self.restarted(idx, cause, false);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::Release(pid, hash, reply) => {
                let result = self.release_letter(&pid, &hash).await;
                let _ = reply.send(result);
            }
            Command::Delete(pid, reply) => {
                let result = match self.known(&pid) {
                    Ok(idx) if self.children[idx].running.is_some() => {
                        Err(SupervisionError::AgentRunning(pid))
                    }
                    Ok(idx)
                        if self.children[idx].restarting || self.children[idx].parked.is_some() =>
                    {
                        Err(SupervisionError::AgentRestarting(pid))
                    }
                    Ok(idx) => {
                        self.remove(idx);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `wall` of an instant further ahead than chrono's last date used to
    /// overflow `Utc::now() + TimeDelta::MAX` and panic the supervisor.
    #[test]
    fn wall_saturates_far_in_the_future() {
        let now = Instant::now();
        let far = [u64::MAX / 2, u64::MAX / 1024, 1 << 40]
            .into_iter()
            .find_map(|secs| now.checked_add(Duration::from_secs(secs)))
            .expect("some far instant is representable");
        assert_eq!(wall(far), chrono::DateTime::<Utc>::MAX_UTC);
        let soon = wall(now + Duration::from_secs(60));
        assert!(soon > Utc::now() && soon < chrono::DateTime::<Utc>::MAX_UTC);
        assert!(wall(now) <= Utc::now());
    }
}
