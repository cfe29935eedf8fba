//! Child tasks: the tokio task that owns one running child (a worker agent or
//! a nested supervisor) and reports how it ended.
//!
//! Protocol with the supervisor, for a nested supervisor:
//! - the task first starts the child and answers on `started` (`Ok` or the
//!   reason it could not start); a task that fails to start sends nothing
//!   else;
//! - afterwards, when the child ends on its own (escalation, panic), the
//!   task sends one [`ChildExit`] with its incarnation number;
//! - the supervisor asks for a graceful stop through the `stop` signal (or
//!   aborts the task for a brutal kill). A stopped child's exit report is
//!   still sent, but the supervisor has already forgotten that incarnation
//!   and ignores it. A `stop` signal dropped unsent means the supervisor is
//!   gone: the child dies at once, without a graceful stop;
//! - a task sends its exit report only once everything it ran has ended
//!   (its whole subtree), so that the supervisor never restarts a child
//!   while an earlier incarnation still runs.
//!
//! For an agent, the supervisor creates, initialises and starts it itself
//! and puts it in an [`AgentCell`], which callers lock to call it from
//! their own tasks and through which the supervisor stops or kills it.
//! Whoever ends the agent (a call it crashed in, or its worker) reports the
//! end through the cell; what is left of it (its store) is released by a
//! [`Reaper`] task in the worker's lineage, so whoever waits for the
//! subtree waits for the release. Its worker task ([`run_worker`]) serves
//! the rest: casts, system messages, health checks and timers. The worker
//! kills the cell when its task ends, however it ends, and reports nothing
//! itself but its own panic. Also:
//! - a worker delivers its agent's due timers ([`deliver_timer`]): each as
//!   an ordinary message whose reply goes nowhere. Timers belong to the
//!   agent (its instance), so they end with it;
//! - a worker reports what its agent consumes to the agent's meter (after
//!   each health check), as calls do after each call, and counts each
//!   timer's delivery there as a call of the agent.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Interval, MissedTickBehavior, timeout};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::HealthPolicy;
use super::cell::AgentCell;
use super::meter::AgentMeter;
use crate::runtime::{CrashReport, MAX_REPORT_MESSAGE};
use crate::text::{bound, fnv1a};
use crate::{
    AgentPid, ExitReason, InitArgs, SupervisedAgent, SupervisionError, SupervisionResult,
    SystemMessage,
};

/// A request to a running worker.
pub(crate) enum WorkerCommand {
    /// Handle a message and reply: a cast (nobody waits for the reply), or a
    /// call queued behind casts.
    Call(String, oneshot::Sender<SupervisionResult<String>>),
    /// Deliver a system message.
    System(SystemMessage, oneshot::Sender<SupervisionResult<()>>),
    /// Run a health check.
    Health(oneshot::Sender<SupervisionResult<bool>>),
}

/// How one incarnation of a child ended on its own.
#[derive(Debug)]
pub(crate) struct ChildExit {
    pub pid: AgentPid,
    pub incarnation: u64,
    pub ending: Ending,
}

/// Why a child's task ended, and what is known about it.
#[derive(Debug)]
pub(crate) struct Ending {
    pub reason: ExitReason,
    /// For an abnormal exit of an agent: what it was doing and what it left.
    pub crash: Option<Box<CrashReport>>,
    /// The whole message it crashed on, if it crashed on one (for the
    /// poison-message quarantine).
    pub message: Option<String>,
}

impl From<ExitReason> for Ending {
    fn from(reason: ExitReason) -> Self {
        Self {
            reason,
            crash: None,
            message: None,
        }
    }
}

/// Start-up outcome of a child task.
pub(crate) type Started = oneshot::Sender<SupervisionResult<()>>;

/// A task's membership in every subtree above it. A child task holds its
/// lineage until it ends; the lineage holds a token of its supervisor's
/// tracker and, through its parent, of every ancestor's. So an ancestor's
/// tracker counts every task below it, at any depth, and waiting on it
/// waits for the whole subtree.
pub(crate) struct Lineage {
    _token: TaskTrackerToken,
    _parent: Option<Arc<Lineage>>,
}

impl Lineage {
    /// The lineage of a task started by the supervisor tracked by `tracker`,
    /// whose own task has `parent` as its lineage.
    pub fn new(tracker: &TaskTracker, parent: Option<Arc<Lineage>>) -> Self {
        Self {
            _token: tracker.token(),
            _parent: parent,
        }
    }
}

/// How a worker runs its agent.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSetup {
    /// Its incarnation, for its reports.
    pub incarnation: u64,
    /// Largest reply passed on to a caller, in bytes.
    pub max_reply_bytes: usize,
    /// How its health is checked.
    pub health: HealthPolicy,
    /// Where the outcome of each health check goes.
    pub reports: mpsc::UnboundedSender<HealthReport>,
    /// Where what the agent consumes goes (after its start, each call and
    /// each health check), and where its timers' deliveries are counted.
    pub meter: Arc<AgentMeter>,
}

/// The outcome of one health check of a worker's agent.
#[derive(Debug)]
pub(crate) struct HealthReport {
    pub pid: AgentPid,
    pub incarnation: u64,
    pub at: DateTime<Utc>,
    /// `None` when healthy.
    pub failure: Option<String>,
    /// Failed checks in a row, this one included.
    pub streak: u32,
}

pub(super) fn panic_message(panic: Box<dyn Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned());
    format!("panicked: {text}")
}

/// Spawn a child task running `body`, which must answer `started` once the
/// child is up. Panics are caught and become the child's exit reason. The
/// task holds `lineage` until it ends; for a nested supervisor, `subtree` is
/// its tracker, waited on before the exit is reported.
pub(crate) fn spawn<F>(
    pid: AgentPid,
    incarnation: u64,
    exits: mpsc::UnboundedSender<ChildExit>,
    lineage: Arc<Lineage>,
    subtree: Option<TaskTracker>,
    body: impl FnOnce(Started) -> F + Send + 'static,
) -> (JoinHandle<()>, oneshot::Receiver<SupervisionResult<()>>)
where
    F: Future<Output = Option<Ending>> + Send + 'static,
{
    let (started_tx, started_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let _lineage = lineage;
        // The body, and with it every handle it held, is dropped at the end
        // of this statement: a panicking supervisor's children are aborted.
        let outcome = AssertUnwindSafe(body(started_tx)).catch_unwind().await;
        if let Some(subtree) = subtree {
            subtree.close();
            subtree.wait().await;
        }
        let ending = match outcome {
            Ok(Some(ending)) => ending,
            // The child never started (its start-up answer said why), or its
            // supervisor is gone.
            Ok(None) => return,
            Err(panic) => ExitReason::Error(panic_message(panic)).into(),
        };
        let _ = exits.send(ChildExit {
            pid,
            incarnation,
            ending,
        });
    });
    (task, started_rx)
}

/// The body of a worker's task, once its supervisor has started the agent
/// and put it in its `cell`: serve its timers, health checks and mailbox
/// until the agent ends or is stopped or killed. Calls reach the agent
/// through the cell from their callers' tasks, and the supervisor stops
/// and kills it through the cell too; see [`super::cell`]. Always `None`:
/// an agent's end is reported through its cell, and a panic of this task
/// by [`spawn`].
pub(crate) async fn run_worker(
    pid: AgentPid,
    setup: WorkerSetup,
    cell: Arc<AgentCell>,
    commands: mpsc::Receiver<WorkerCommand>,
    supervisor: oneshot::Receiver<()>,
) -> Option<Ending> {
    // However the task ends (even aborted), the agent goes with it.
    let _kill = KillOnDrop(&cell);
    serve(&cell, &pid, &setup, commands, supervisor).await;
    None
}

/// Kills its cell when dropped: the worker's task ended or was aborted.
struct KillOnDrop<'a>(&'a AgentCell);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.kill_now();
    }
}

/// What is left of an agent once it has ended (for a WASM agent: its store
/// and instance slot) is released in a task of its own, so that its
/// supervisor hears of the end without waiting for the release. The task
/// holds the worker's lineage: whoever waits for the subtree waits for it.
pub(crate) struct Reaper(pub Arc<Lineage>);

impl Reaper {
    pub(super) fn reap(&self, agent: Box<dyn SupervisedAgent>) {
        let lineage = self.0.clone();
        tokio::spawn(async move {
            let _lineage = lineage;
            drop(agent);
        });
    }

    /// [`reap`](Self::reap), for a supervisor that goes on stopping or
    /// starting other children: the release yields once before it runs.
    /// Spawned from the supervisor's thread, it would otherwise sit in that
    /// thread's next-task slot (which other threads cannot take) and run
    /// there at the supervisor's next pause, ahead of the supervisor; after
    /// the yield it waits in the thread's queue, where an idle thread takes
    /// it. (Measured: a `one_for_all` restart of 10, 170 -> 154 us p50.)
    pub(super) fn reap_beside(&self, agent: Box<dyn SupervisedAgent>) {
        let lineage = self.0.clone();
        tokio::spawn(async move {
            let _lineage = lineage;
            tokio::task::yield_now().await;
            drop(agent);
        });
    }
}

/// What woke a worker.
enum Event {
    /// The earliest timer is due.
    Timer,
    /// A message from the mailbox.
    Command(WorkerCommand),
    /// A health check is due.
    Health,
}

/// Serve timers, health checks and the mailbox until the agent ended (and
/// was reported through its cell), was stopped or killed, or its
/// supervisor is gone (`supervisor` dropped; nothing is ever sent on it).
async fn serve(
    cell: &AgentCell,
    pid: &AgentPid,
    setup: &WorkerSetup,
    mut commands: mpsc::Receiver<WorkerCommand>,
    mut supervisor: oneshot::Receiver<()>,
) -> Option<()> {
    let mut checks = health_checks(&setup.health);
    let mut streak = 0;
    // The mailbox closes when the supervisor drops the agent's route, just
    // before it stops the agent through the cell: it is not a stop signal.
    let mut mailbox_open = true;
    loop {
        let due = {
            // `None`: ended (and reported) or killed.
            cell.lock().await.agent.as_ref()?.next_timer_due()
        };
        let event = tokio::select! {
            biased;
            // The supervisor is gone: die without a graceful stop.
            _ = &mut supervisor => return None,
            () = cell.ended() => return None,
            () = cell.woken() => continue,
            () = until(due) => Event::Timer,
            command = commands.recv(), if mailbox_open => match command {
                Some(command) => Event::Command(command),
                None => {
                    mailbox_open = false;
                    continue;
                }
            },
            () = tick(&mut checks) => Event::Health,
        };
        if let Event::Command(WorkerCommand::Call(message, reply)) = event {
            let result = cell.handle(message).await;
            cell.dequeued();
            let _ = reply.send(result);
            continue;
        }
        let mut slot = cell.lock().await;
        let slot = &mut *slot;
        let Some(agent) = slot.agent.as_deref_mut() else {
            return None; // ended (and reported) or killed
        };
        let ending = match event {
            Event::Timer => match agent.take_due_timer(tokio::time::Instant::now()) {
                Some(message) => {
                    slot.sequence += 1;
                    deliver_timer(agent, pid, &setup.meter, message, slot.sequence).await
                }
                None => None,
            },
            Event::Health => check_health(agent, pid, setup, &mut streak)
                .await
                .map(|reason| crashed(agent, reason, None)),
            Event::Command(WorkerCommand::System(message, reply)) => {
                let result = agent.handle_system_message(message).await;
                answer(agent, pid, result, reply).map(|reason| crashed(agent, reason, None))
            }
            Event::Command(WorkerCommand::Health(reply)) => {
                let result = agent.health_check().await;
                setup.meter.observe(agent.stats());
                answer(agent, pid, result, reply).map(|reason| crashed(agent, reason, None))
            }
            Event::Command(WorkerCommand::Call(..)) => None, // handled above
        };
        if let Some(ending) = ending {
            cell.end(slot, ending);
            return None;
        }
    }
}

/// Resolves at `due`; never without it.
async fn until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// How an agent ended with `reason`, with a crash report if the exit is
/// abnormal: the agent's own (a WASM agent's backtrace, output, fuel and
/// memory) and the message it was handling with its sequence number.
pub(super) fn crashed(
    agent: &dyn SupervisedAgent,
    reason: ExitReason,
    handling: Option<(String, u64)>,
) -> Ending {
    if !reason.is_abnormal() {
        return reason.into();
    }
    let mut report = agent.crash_report().unwrap_or_else(|| CrashReport {
        at: Utc::now(),
        fault: reason.to_string(),
        ..CrashReport::default()
    });
    let message = handling.map(|(message, sequence)| {
        report.message = Some(bound(message.clone(), MAX_REPORT_MESSAGE));
        report.sequence = Some(sequence);
        report.message_hash = Some(format!("{:016x}", fnv1a(message.as_bytes())));
        message
    });
    Ending {
        reason,
        crash: Some(Box::new(report)),
        message,
    }
}

/// The ticks of an agent's health checks, if it has them (the first one an
/// interval after the start).
fn health_checks(policy: &HealthPolicy) -> Option<Interval> {
    policy.is_on().then(|| {
        // Validated to at most a century; saturating all the same.
        let now = tokio::time::Instant::now();
        let start = now.checked_add(policy.interval).unwrap_or(now);
        let mut checks = tokio::time::interval_at(start, policy.interval);
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        checks
    })
}

/// The next tick of `checks`; never, without checks.
async fn tick(checks: &mut Option<Interval>) {
    match checks {
        Some(checks) => {
            checks.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Check the agent's health once and report it; the exit reason if this
/// ends the agent: the `threshold`-th failure in a row, or a check that
/// killed the agent or did not answer in time.
async fn check_health(
    agent: &mut dyn SupervisedAgent,
    pid: &AgentPid,
    setup: &WorkerSetup,
    streak: &mut u32,
) -> Option<ExitReason> {
    let policy = &setup.health;
    let (failure, fatal) = match timeout(policy.timeout, agent.health_check()).await {
        Ok(Ok(true)) => (None, false),
        Ok(Ok(false)) => (Some("it reported itself unhealthy".to_owned()), false),
        Ok(Err(e)) => match agent.exit_reason() {
            Some(reason) => (Some(format!("its health check ended it: {reason}")), true),
            None => (
                Some(match e {
                    SupervisionError::AgentExecutionFailed(_, why) => why,
                    other => other.to_string(),
                }),
                false,
            ),
        },
        Err(_) => (
            Some(format!(
                "its health check did not answer within {:?}",
                policy.timeout
            )),
            true,
        ),
    };
    setup.meter.observe(agent.stats());
    *streak = if failure.is_some() { *streak + 1 } else { 0 };
    let _ = setup.reports.send(HealthReport {
        pid: pid.clone(),
        incarnation: setup.incarnation,
        at: Utc::now(),
        failure: failure.clone(),
        streak: *streak,
    });
    match failure {
        Some(why) if fatal => Some(ExitReason::Unhealthy(why)),
        Some(why) if *streak >= policy.threshold => Some(ExitReason::Unhealthy(format!(
            "{streak} health checks failed in a row; the last: {why}"
        ))),
        _ => None,
    }
}

/// Deliver a due timer's `message` to the agent, as any message (the
/// `sequence`-th this incarnation handles). Nobody asked for the reply, so
/// it goes nowhere; an application error is logged (at debug level). For
/// the observer the delivery counts as a call of the agent in its `meter`
/// (its outcome and how long the agent took), followed by a report of what
/// the agent consumes. How the agent ended if the delivery killed it: a
/// crash while handling a timer is a crash like any other, with its crash
/// report (the message and its sequence number) and the message for the
/// poison-message quarantine.
async fn deliver_timer(
    agent: &mut dyn SupervisedAgent,
    pid: &AgentPid,
    meter: &AgentMeter,
    message: String,
    sequence: u64,
) -> Option<Ending> {
    let kept = message.clone();
    let started = Instant::now();
    let result = agent.handle_message(message).await;
    if let Err(e) = &result {
        tracing::debug!("a timer's message was answered with an error: {e}");
    }
    let exit = agent.exit_reason();
    let outcome = match &exit {
        Some(reason) => Err(died(pid, reason, result.err())),
        None => result,
    };
    meter.record_call(&outcome, started.elapsed());
    meter.observe(agent.stats());
    let reason = exit?;
    Some(crashed(&*agent, reason, Some((kept, sequence))))
}

/// `reply`, if it is within `max` bytes; the agent lives either way.
pub(super) fn bounded_reply(reply: String, max: usize) -> SupervisionResult<String> {
    if reply.len() > max {
        return Err(SupervisionError::ReplyTooLarge {
            len: reply.len(),
            max,
        });
    }
    Ok(reply)
}

/// Reply to a request; the agent's exit reason if the request killed it.
fn answer<T>(
    agent: &dyn SupervisedAgent,
    pid: &AgentPid,
    result: SupervisionResult<T>,
    reply: oneshot::Sender<SupervisionResult<T>>,
) -> Option<ExitReason> {
    match agent.exit_reason() {
        Some(reason) => {
            let _ = reply.send(Err(died(pid, &reason, result.err())));
            Some(reason)
        }
        None => {
            let _ = reply.send(result);
            None
        }
    }
}

/// Create, initialise and start an agent.
pub(super) async fn start_agent(
    create: impl Future<Output = SupervisionResult<Box<dyn SupervisedAgent>>>,
    args: InitArgs,
) -> SupervisionResult<Box<dyn SupervisedAgent>> {
    let mut agent = create.await?;
    agent.init(args).await?;
    agent.start().await?;
    Ok(agent)
}

/// The error a caller sees when the agent died handling its request.
pub(super) fn died(
    pid: &AgentPid,
    reason: &ExitReason,
    error: Option<SupervisionError>,
) -> SupervisionError {
    match (reason, error) {
        (ExitReason::Fault(fault), _) => SupervisionError::AgentCrashed(pid.clone(), fault.clone()),
        (_, Some(error)) => error,
        (reason, None) => {
            SupervisionError::AgentExecutionFailed(pid.clone(), format!("agent exited: {reason}"))
        }
    }
}
