//! The cell that holds a running agent, shared by its worker task and its
//! callers.
//!
//! A call runs in the caller's own task: it locks the cell, runs the
//! agent's `handle_message` and unlocks, with no hop to another task. (Two
//! task wake-ups per call, one there and one back, cost more than the call
//! itself on a multi-threaded runtime, where each one can wake a parked
//! thread.) The worker task keeps what needs a task of its own: timers,
//! health checks, system messages, casts, the graceful stop, and reporting
//! the agent's end to its supervisor.
//!
//! Invariants:
//! - Only the holder of the lock runs the agent's code. The lock is fair
//!   (first come, first served), so one caller's calls reach the agent in
//!   the order it made them.
//! - While messages wait in the worker's mailbox (casts), calls queue
//!   behind them in the mailbox, so that a cast and a later call from the
//!   same caller keep their order.
//! - Whoever ends the agent (a call it crashed in, or its worker) does so
//!   under the lock: it takes the agent out, hands it to the reaper and
//!   reports the end to the supervisor at once ([`AgentCell::end`]), with
//!   no hop through the worker; nobody runs the agent again, and the worker
//!   then ends without a report of its own.
//! - Once the cell is killed ([`AgentCell::kill`], or its worker's task
//!   dropped), whoever holds the lock drops the agent, and a call under way
//!   drops its guest call at its next poll. `kill` returns once no code of
//!   the agent runs any more: a killed child never overlaps its successor.
//! - A call whose caller stops waiting is finished in a task of its own, as
//!   if the caller had waited ([`Detached`]): a message taken is handled
//!   whole, as it was when calls went through a mailbox.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use tokio::sync::{Mutex, MutexGuard, Notify};
use tokio_util::sync::CancellationToken;

use futures_util::FutureExt;

use tokio::sync::mpsc;

use super::child::{
    ChildExit, Ending, Lineage, Reaper, bounded_reply, crashed, died, panic_message,
};
use super::meter::AgentMeter;
use crate::{
    AgentPid, ExitReason, SupervisedAgent, SupervisionError, SupervisionResult, TerminateReason,
};

/// One incarnation's agent, as its worker and its callers share it.
pub(crate) struct AgentCell {
    pid: AgentPid,
    incarnation: u64,
    slot: Mutex<Slot>,
    /// Wakes the worker: the agent's timers changed.
    wake: Notify,
    /// Cancelled once the agent ended or was killed.
    killed: CancellationToken,
    /// Where the agent's end is reported.
    exits: mpsc::UnboundedSender<ChildExit>,
    /// The worker task's lineage, for the reaper of what is left of an
    /// ended agent. Weak: a cell outlives its worker in the routes handles
    /// read, and must not keep the worker's subtree counted after it.
    lineage: Weak<Lineage>,
    /// Messages in the worker's mailbox not handled yet.
    queued: AtomicUsize,
    /// Largest reply passed on to a caller, in bytes.
    max_reply_bytes: usize,
    meter: Arc<AgentMeter>,
}

/// What the lock guards.
#[derive(Default)]
pub(crate) struct Slot {
    /// The live agent; `None` before it started and after it ended.
    pub agent: Option<Box<dyn SupervisedAgent>>,
    /// Messages this incarnation was given, for crash reports.
    pub sequence: u64,
}

impl AgentCell {
    /// An empty cell for the incarnation `incarnation` of the agent `pid`:
    /// its worker installs the agent once it started. Its end goes to
    /// `exits`; what is left of it is released in the worker's `lineage`.
    pub fn new(
        (pid, incarnation): (AgentPid, u64),
        exits: mpsc::UnboundedSender<ChildExit>,
        lineage: &Arc<Lineage>,
        max_reply_bytes: usize,
        meter: Arc<AgentMeter>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pid,
            incarnation,
            slot: Mutex::new(Slot::default()),
            wake: Notify::new(),
            killed: CancellationToken::new(),
            exits,
            lineage: Arc::downgrade(lineage),
            queued: AtomicUsize::new(0),
            max_reply_bytes,
            meter,
        })
    }

    /// Put the started agent in the cell, before anybody can reach it.
    pub fn install(&self, agent: Box<dyn SupervisedAgent>) {
        match self.slot.try_lock() {
            Ok(mut slot) => slot.agent = Some(agent),
            // Nobody holds a new cell's lock; if somebody did, the agent
            // could not be reached: drop it as a kill would.
            Err(_) => drop(agent),
        }
    }

    /// Lock the cell (fair: in the order of arrival).
    pub async fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().await
    }

    /// Resolves when a call changed the agent's timers. A wake-up given
    /// while nobody waited is kept for the next waiter.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Resolves once the agent ended or was killed.
    pub async fn ended(&self) {
        self.killed.cancelled().await;
    }

    /// End the agent in `slot` with `ending`: hand it to the reaper, and
    /// report the end to the supervisor. Its worker ends without a report.
    pub fn end(&self, slot: &mut Slot, ending: Ending) {
        if let Some(agent) = slot.agent.take() {
            self.release(agent);
        }
        self.killed.cancel();
        let _ = self.exits.send(ChildExit {
            pid: self.pid.clone(),
            incarnation: self.incarnation,
            ending,
        });
    }

    /// Whether a call must queue in the mailbox behind messages there.
    pub fn has_queued(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
    }

    /// A message is about to be put in the mailbox.
    pub fn enqueue(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// A message from the mailbox was handled (or never got there).
    pub fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// The error of a caller that finds the agent gone.
    pub fn gone(&self) -> SupervisionError {
        SupervisionError::CommunicationFailed(format!("agent {} stopped before replying", self.pid))
    }

    /// Call the agent from the caller's task; finished in a task of its own
    /// if the caller stops waiting.
    pub fn call(
        self: &Arc<Self>,
        message: String,
    ) -> Detached<impl Future<Output = SupervisionResult<String>> + Send + 'static> {
        let cell = self.clone();
        Detached::new(async move { cell.handle(message).await })
    }

    /// Hand `message` to the agent and return its reply, once the lock is
    /// free. An agent the message ended is ended ([`end`](Self::end)).
    pub async fn handle(&self, message: String) -> SupervisionResult<String> {
        let mut slot = self.slot.lock().await;
        let slot = &mut *slot;
        let Some(agent) = slot.agent.as_mut() else {
            return Err(self.gone());
        };
        slot.sequence += 1;
        // Kept for its crash report and the quarantine: a crash consumes
        // what the agent was given.
        let kept = message.clone();
        let timers = agent.next_timer_due();
        let outcome = tokio::select! {
            biased;
            () = self.killed.cancelled() => None,
            result = AssertUnwindSafe(agent.handle_message(message)).catch_unwind() => Some(result),
        };
        let result = match outcome {
            Some(Ok(result)) => result,
            // A native agent panicked: it is dead, as if its task had.
            Some(Err(panic)) => {
                let reason = ExitReason::Error(panic_message(panic));
                let error = died(&self.pid, &reason, None);
                let ending = crashed(&**agent, reason, Some((kept, slot.sequence)));
                self.end(slot, ending);
                return Err(error);
            }
            None => {
                slot.agent = None;
                return Err(self.gone());
            }
        };
        let result = result.and_then(|reply| bounded_reply(reply, self.max_reply_bytes));
        self.meter.observe(agent.stats());
        if let Some(reason) = agent.exit_reason() {
            let error = died(&self.pid, &reason, result.err());
            let ending = crashed(&**agent, reason, Some((kept, slot.sequence)));
            self.end(slot, ending);
            return Err(error);
        }
        if agent.next_timer_due() != timers {
            self.wake.notify_one();
        }
        result
    }

    /// Stop the agent gracefully, here: once the call under way (if any)
    /// has ended, its `stop`, then its `terminate`; what is left of it goes
    /// to the reaper. Nothing reaches it afterwards. Dropped midway (its
    /// shutdown timeout), the agent is dropped with it: a kill.
    pub async fn stop(&self) {
        let mut slot = self.slot.lock().await;
        self.killed.cancel();
        let Some(mut agent) = slot.agent.take() else {
            return;
        };
        let _ = agent.stop().await;
        let _ = agent.terminate(TerminateReason::Shutdown).await;
        drop(slot);
        match self.lineage.upgrade() {
            // The supervisor goes on with the next child meanwhile.
            Some(lineage) => Reaper(lineage).reap_beside(agent),
            None => drop(agent),
        }
    }

    /// Release what is left of an ended agent in a task of its worker's
    /// lineage (see [`Reaper`]), or here if its worker is gone.
    fn release(&self, agent: Box<dyn SupervisedAgent>) {
        match self.lineage.upgrade() {
            Some(lineage) => Reaper(lineage).reap(agent),
            // Its worker is gone already: nobody waits for the release.
            None => drop(agent),
        }
    }

    /// Kill the agent: drop it, or have the call under way drop it, and
    /// return once none of its code runs any more.
    pub async fn kill(&self) {
        self.killed.cancel();
        self.slot.lock().await.agent = None;
    }

    /// Kill the agent without waiting: dropped now if the lock is free, else
    /// by the call under way at its next poll.
    pub fn kill_now(&self) {
        self.killed.cancel();
        if let Ok(mut slot) = self.slot.try_lock() {
            slot.agent = None;
        }
    }
}

/// A future that, dropped before it is done, is finished in a task of its
/// own (on the current tokio runtime, if there is one), so that cancelling
/// the caller never cuts a guest call short.
pub(crate) struct Detached<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send + 'static;

impl<F: Future + Send + 'static> Detached<F>
where
    F::Output: Send + 'static,
{
    fn new(future: F) -> Self {
        Self(Some(Box::pin(future)))
    }
}

impl<F: Future + Send + 'static> Future for Detached<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(future) = self.0.as_mut() else {
            // Polled after it completed: like a fused future, never again.
            return Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for Detached<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let (Some(future), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(future);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_detached_future_dropped_midway_still_finishes() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let detached = Detached::new(async move {
            let _ = go_rx.await;
            let _ = tx.send("finished");
        });
        // The caller gives up before it completes.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), detached)
                .await
                .is_err()
        );
        go_tx.send(()).expect("the detached future still waits");
        assert_eq!(rx.await, Ok("finished"));
    }

    #[tokio::test]
    async fn a_completed_detached_future_is_not_run_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let detached = Detached::new(async move {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        detached.await;
        tokio::task::yield_now().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
