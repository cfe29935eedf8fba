//! Pure restart decisions for a supervisor, following Erlang/OTP's `supervisor.erl`.
//!
//! Nothing here performs effects, takes locks or reads a clock: the caller passes the
//! current time in and carries out the returned [`Decision`]. This keeps the whole
//! policy synchronously testable.
//!
//! Invariants every caller must uphold:
//! * a `&[ChildRef<Id>]` slice is in **start order** (index 0 started first) and its ids
//!   are unique;
//! * the `now` values given to one [`RestartWindow`] never go backwards (a monotonic
//!   clock); an earlier `now` makes stored restarts count as "just happened".

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// OTP restart strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub enum RestartStrategy {
    /// Restart only the child that exited.
    #[default]
    OneForOne,
    /// Stop every other child, then restart all of them.
    OneForAll,
    /// Stop the children started after the failed one, then restart it and them.
    RestForOne,
}

/// OTP's `restart` per child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub enum RestartType {
    /// Always restarted, whatever the exit.
    #[default]
    Permanent,
    /// Restarted only after an [`ExitKind::Abnormal`] exit.
    Transient,
    /// Never restarted; its spec is removed once it exits.
    Temporary,
}

/// How an exit is judged by restart types (the caller classifies its richer exit
/// reasons into this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// OTP `normal`: the child finished its work.
    Normal,
    /// OTP `shutdown` or `{shutdown, _}`.
    Shutdown,
    /// Any other reason (crash, kill, ...).
    Abnormal,
}

/// One child as the decision sees it: its id and restart type. Slices of these are
/// always in START ORDER (index 0 started first).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChildRef<Id> {
    /// The child's unique id.
    pub id: Id,
    /// The child's restart type.
    pub restart_type: RestartType,
}

/// Sliding-window restart intensity tracker of one supervisor (OTP's intensity/period).
///
/// Boundary (same as OTP): a restart recorded at `t` is still in the window at `now`
/// iff `now - t <= period`, so two restarts exactly `period` apart both count.
///
/// Invariants: at most `max_restarts` instants are stored, oldest first, and a restart
/// that would exceed the intensity is never stored.
#[derive(Debug, Clone)]
pub struct RestartWindow {
    max_restarts: u32,
    period: Duration,
    restarts: VecDeque<Instant>,
}

impl RestartWindow {
    /// A window allowing `max_restarts` restarts within any `period`.
    /// `max_restarts = 0` forbids every restart.
    pub fn new(max_restarts: u32, period: Duration) -> Self {
        Self {
            max_restarts,
            period,
            restarts: VecDeque::new(),
        }
    }

    /// Try to record a restart at `now`. First forgets restarts older than `period`
    /// (those with `now - t > period`); then, if one more restart would exceed
    /// `max_restarts`, returns `false` without recording it (intensity exceeded),
    /// otherwise records `now` and returns `true`. O(1) amortised.
    pub fn try_record(&mut self, now: Instant) -> bool {
        let expired = |t: &Instant| now.saturating_duration_since(*t) > self.period;
        while self.restarts.front().is_some_and(expired) {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u64 + 1 > u64::from(self.max_restarts) {
            return false;
        }
        self.restarts.push_back(now);
        true
    }

    /// Restarts currently in the window, as of the last [`try_record`](Self::try_record).
    pub fn len(&self) -> usize {
        self.restarts.len()
    }

    /// Whether no restart is currently in the window.
    pub fn is_empty(&self) -> bool {
        self.restarts.is_empty()
    }

    /// Forget every recorded restart.
    pub fn reset(&mut self) {
        self.restarts.clear();
    }

    /// The intensity: restarts allowed within one period.
    pub fn max_restarts(&self) -> u32 {
        self.max_restarts
    }

    /// The period of the window.
    pub fn period(&self) -> Duration {
        self.period
    }
}

/// What the supervisor must do about one child's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<Id> {
    /// Nothing to restart. `remove` tells whether the child's spec is removed
    /// (temporary) or kept (transient exiting normally).
    NoRestart {
        /// Remove the exited child's spec.
        remove: bool,
    },
    /// Restart the children.
    Restart {
        /// The other children to stop first, in REVERSE start order; never contains
        /// the failed child, which is already dead.
        stop: Vec<Id>,
        /// The stopped bystanders that are Temporary: their specs are removed and they
        /// are not restarted. Same (reverse start) order as `stop`.
        remove: Vec<Id>,
        /// The children to start again, in START order: includes the failed child,
        /// excludes the removed temporaries.
        start: Vec<Id>,
    },
    /// Restart intensity exceeded: stop ALL remaining children (everyone except the
    /// failed child) in reverse start order, then the supervisor exits with reason
    /// Shutdown.
    Escalate {
        /// Children to stop, in reverse start order.
        stop: Vec<Id>,
    },
}

/// The `failed` id passed to [`decide`] is not among the supervisor's children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnknownChild;

impl fmt::Display for UnknownChild {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("exited child is not among the supervisor's children")
    }
}

impl std::error::Error for UnknownChild {}

/// Decide what to do about `failed` exiting with `exit` (OTP `restart_child/3` and
/// `restart/3`).
///
/// `children` are all current children in start order, including `failed`. The
/// restart type of `failed` and `exit` decide whether a restart is wanted at all;
/// only then is `window` consulted, once per exit whatever the strategy restarts.
/// If the intensity is exceeded the result is [`Decision::Escalate`].
///
/// A restart attempt that itself fails to start a child is handled by calling
/// `decide` again with that child as `failed` and [`ExitKind::Abnormal`] (see
/// [`decide_failed_start`]); as in OTP it counts again, so a child that can never
/// start brings the supervisor down instead of looping forever.
pub fn decide<Id: Clone + PartialEq>(
    strategy: RestartStrategy,
    children: &[ChildRef<Id>],
    failed: &Id,
    exit: ExitKind,
    window: &mut RestartWindow,
    now: Instant,
) -> Result<Decision<Id>, UnknownChild> {
    let pos = children
        .iter()
        .position(|c| c.id == *failed)
        .ok_or(UnknownChild)?;
    match (children[pos].restart_type, exit) {
        (RestartType::Temporary, _) => return Ok(Decision::NoRestart { remove: true }),
        (RestartType::Transient, ExitKind::Normal | ExitKind::Shutdown) => {
            return Ok(Decision::NoRestart { remove: false });
        }
        (RestartType::Transient, ExitKind::Abnormal) | (RestartType::Permanent, _) => {}
    }
    if !window.try_record(now) {
        let others = children[..pos].iter().chain(&children[pos + 1..]);
        let stop = ids_of(others.rev());
        return Ok(Decision::Escalate { stop });
    }
    // The children affected besides the failed one, in start order.
    let (before, after): (&[ChildRef<Id>], &[ChildRef<Id>]) = match strategy {
        RestartStrategy::OneForOne => (&[], &[]),
        RestartStrategy::OneForAll => (&children[..pos], &children[pos + 1..]),
        RestartStrategy::RestForOne => (&[], &children[pos + 1..]),
    };
    let bystanders = || before.iter().chain(after).rev();
    let affected = before.iter().chain([&children[pos]]).chain(after);
    Ok(Decision::Restart {
        stop: ids_of(bystanders()),
        remove: ids_of(bystanders().filter(|c| is_temporary(c))),
        // `failed` is never temporary here (a temporary exit is `NoRestart` above).
        start: ids_of(affected.filter(|c| !is_temporary(c))),
    })
}

fn is_temporary<Id>(child: &ChildRef<Id>) -> bool {
    child.restart_type == RestartType::Temporary
}

fn ids_of<'a, Id: Clone + 'a>(children: impl Iterator<Item = &'a ChildRef<Id>>) -> Vec<Id> {
    children.map(|c| c.id.clone()).collect()
}

/// Decide after a restart attempt failed to start `failed`: exactly
/// `decide(strategy, children, failed, ExitKind::Abnormal, window, now)`.
///
/// `children` must still contain the spec of the child that failed to start. The
/// failed attempt counts against the window again, like OTP's `try_again_restart`.
pub fn decide_failed_start<Id: Clone + PartialEq>(
    strategy: RestartStrategy,
    children: &[ChildRef<Id>],
    failed: &Id,
    window: &mut RestartWindow,
    now: Instant,
) -> Result<Decision<Id>, UnknownChild> {
    decide(strategy, children, failed, ExitKind::Abnormal, window, now)
}

/// The order in which to stop all children when the supervisor shuts down: reverse
/// start order.
pub fn shutdown_order<Id: Clone>(children: &[ChildRef<Id>]) -> Vec<Id> {
    ids_of(children.iter().rev())
}

#[cfg(test)]
mod tests {
    use super::ExitKind::{Abnormal, Normal, Shutdown};
    use super::RestartStrategy::{OneForAll, OneForOne, RestForOne};
    use super::RestartType::{Permanent, Temporary, Transient};
    use super::*;

    type Id = &'static str;
    const SEC: Duration = Duration::from_secs(1);

    fn ids(list: Id) -> Vec<Id> {
        list.split_whitespace().collect()
    }
    /// Children in start order: `"a b:temp c:trans"`; no suffix means permanent.
    fn kids(spec: Id) -> Vec<ChildRef<Id>> {
        let child = |tok: Id| {
            let (id, kind) = tok.split_once(':').unwrap_or((tok, "perm"));
            let restart_type = match kind {
                "temp" => Temporary,
                "trans" => Transient,
                _ => Permanent,
            };
            ChildRef { id, restart_type }
        };
        spec.split_whitespace().map(child).collect()
    }
    fn restart(stop: Id, remove: Id, start: Id) -> Decision<Id> {
        Decision::Restart {
            stop: ids(stop),
            remove: ids(remove),
            start: ids(start),
        }
    }
    fn escalate(stop: Id) -> Decision<Id> {
        Decision::Escalate { stop: ids(stop) }
    }
    fn roomy() -> RestartWindow {
        RestartWindow::new(100, 10 * SEC)
    }
    /// `decide` with a fresh roomy window at the current time.
    fn fresh(s: RestartStrategy, children: Id, failed: Id, exit: ExitKind) -> Decision<Id> {
        let (mut w, now) = (roomy(), Instant::now());
        decide(s, &kids(children), &failed, exit, &mut w, now).unwrap()
    }

    #[test]
    fn restart_type_by_exit_kind_table_for_every_strategy() {
        // Per restart type, for exits [Normal, Shutdown, Abnormal]:
        // None = restart wanted; Some(remove) = NoRestart { remove }.
        let table = [
            (Permanent, [None, None, None]),
            (Transient, [Some(false), Some(false), None]),
            (Temporary, [Some(true), Some(true), Some(true)]),
        ];
        let restarts = [
            (OneForOne, restart("", "", "f")),
            (OneForAll, restart("c a", "", "a f c")),
            (RestForOne, restart("c", "", "f c")),
        ];
        for (strategy, on_restart) in restarts {
            for (rt, row) in table {
                for (exit, no_restart) in [Normal, Shutdown, Abnormal].into_iter().zip(row) {
                    let mut children = kids("a f c");
                    children[1].restart_type = rt;
                    let mut w = roomy();
                    let got = decide(strategy, &children, &"f", exit, &mut w, Instant::now());
                    let want = no_restart
                        .map_or(on_restart.clone(), |remove| Decision::NoRestart { remove });
                    let cell = format!("{strategy:?} {rt:?} {exit:?}");
                    assert_eq!(got, Ok(want), "{cell}");
                    assert_eq!(w.len(), usize::from(no_restart.is_none()), "{cell}");
                }
            }
        }
    }

    #[test]
    fn one_for_all_and_rest_for_one_use_start_order() {
        const FIVE: Id = "c1 c2 c3 c4 c5";
        let cases = [
            (OneForAll, FIVE, "c1", "c5 c4 c3 c2", FIVE),
            (OneForAll, FIVE, "c3", "c5 c4 c2 c1", FIVE),
            (OneForAll, FIVE, "c5", "c4 c3 c2 c1", FIVE),
            (RestForOne, FIVE, "c1", "c5 c4 c3 c2", FIVE),
            (RestForOne, FIVE, "c3", "c5 c4", "c3 c4 c5"),
            (RestForOne, FIVE, "c5", "", "c5"),
            // Ids whose natural order differs from start order: position decides.
            (RestForOne, "z a m b", "z", "b m a", "z a m b"),
            (RestForOne, "z a m b", "a", "b m", "a m b"),
            (RestForOne, "z a m b", "m", "b", "m b"),
            (OneForAll, "z a m b", "m", "b a z", "z a m b"),
        ];
        for (strategy, children, failed, stop, start) in cases {
            let got = fresh(strategy, children, failed, Abnormal);
            assert_eq!(got, restart(stop, "", start), "{strategy:?} {failed}");
        }
    }

    #[test]
    fn temporary_bystanders_are_removed_not_restarted() {
        let children = "p1 t1:temp f t2:temp tr:trans";
        let got = fresh(OneForAll, children, "f", Abnormal);
        assert_eq!(got, restart("tr t2 t1 p1", "t2 t1", "p1 f tr"));
        let got = fresh(RestForOne, children, "f", Shutdown);
        assert_eq!(got, restart("tr t2", "t2", "f tr"));
        // A permanent child restarts even on a normal exit; temporaries after it are dropped.
        let got = fresh(RestForOne, children, "p1", Normal);
        assert_eq!(got, restart("tr t2 f t1", "t2 t1", "p1 f tr"));
        let got = fresh(RestForOne, children, "tr", Abnormal);
        assert_eq!(got, restart("", "", "tr"));
    }

    #[test]
    fn intensity_allows_max_restarts_then_escalates() {
        let children = kids("a b c");
        let mut w = RestartWindow::new(3, 10 * SEC);
        let t0 = Instant::now();
        for s in 0..3 {
            let d = decide(OneForOne, &children, &"b", Abnormal, &mut w, t0 + s * SEC);
            assert_eq!(d, Ok(restart("", "", "b")), "restart {s}");
        }
        let d = decide(OneForOne, &children, &"b", Abnormal, &mut w, t0 + 3 * SEC);
        assert_eq!(d, Ok(escalate("c a")));
        assert_eq!(w.len(), 3, "the escalating restart is not recorded");
    }

    #[test]
    fn restarts_spaced_beyond_period_never_escalate() {
        let children = kids("a b");
        let mut w = RestartWindow::new(3, 10 * SEC);
        let t0 = Instant::now();
        for i in 0..100 {
            let at = t0 + 11 * i * SEC;
            let d = decide(OneForAll, &children, &"a", Normal, &mut w, at);
            assert_eq!(d, Ok(restart("b", "", "a b")), "restart {i}");
            assert_eq!(w.len(), 1);
        }
    }

    #[test]
    fn boundary_exactly_period_apart_is_still_in_window() {
        let t0 = Instant::now();
        let mut w = RestartWindow::new(1, 10 * SEC);
        assert!(w.try_record(t0));
        assert!(!w.try_record(t0 + 10 * SEC), "exactly period apart: kept");
        assert!(w.try_record(t0 + 10 * SEC + Duration::from_nanos(1)));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn zero_intensity_escalates_only_restart_worthy_exits() {
        let children = kids("a t:trans c");
        let mut w = RestartWindow::new(0, 10 * SEC);
        let t = Instant::now();
        let d = decide(OneForOne, &children, &"t", Normal, &mut w, t);
        assert_eq!(d, Ok(Decision::NoRestart { remove: false }));
        let d = decide(OneForOne, &children, &"t", Abnormal, &mut w, t);
        assert_eq!(d, Ok(escalate("c a")));
        let d = decide(RestForOne, &children, &"a", Shutdown, &mut w, t);
        assert_eq!(d, Ok(escalate("c t")));
        assert!(w.is_empty());
    }

    #[test]
    fn escalation_stops_everyone_else_in_reverse_start_order() {
        let (children, now) = (kids("z a:temp m:trans b y"), Instant::now());
        for strategy in [OneForOne, OneForAll, RestForOne] {
            for (failed, stop) in [("z", "y b m a"), ("m", "y b a z"), ("y", "b m a z")] {
                let mut w = RestartWindow::new(0, SEC);
                let d = decide(strategy, &children, &failed, Abnormal, &mut w, now);
                assert_eq!(d, Ok(escalate(stop)), "{strategy:?} {failed}");
            }
        }
    }

    #[test]
    fn no_restart_does_not_consume_window_capacity() {
        let children = kids("p tr:trans tmp:temp");
        let mut w = RestartWindow::new(1, 10 * SEC);
        let t = Instant::now();
        for exit in [Normal, Shutdown, Normal, Shutdown] {
            let d = decide(OneForAll, &children, &"tr", exit, &mut w, t);
            assert_eq!(d, Ok(Decision::NoRestart { remove: false }));
        }
        for exit in [Normal, Shutdown, Abnormal] {
            let d = decide(OneForAll, &children, &"tmp", exit, &mut w, t);
            assert_eq!(d, Ok(Decision::NoRestart { remove: true }));
        }
        assert!(w.is_empty());
        let d = decide(OneForOne, &children, &"p", Abnormal, &mut w, t);
        assert_eq!(d, Ok(restart("", "", "p")));
    }

    #[test]
    fn window_stores_at_most_max_restarts() {
        let mut w = RestartWindow::new(5, 10 * SEC);
        let t0 = Instant::now();
        let mut accepted = 0;
        for i in 0..1000 {
            accepted += u32::from(w.try_record(t0 + Duration::from_millis(i)));
            assert!(w.len() <= 5 && w.restarts.len() <= 5);
        }
        assert_eq!(accepted, 5);
        w.reset();
        assert!(w.is_empty() && w.try_record(t0));
        assert_eq!((w.max_restarts(), w.period()), (5, 10 * SEC));
    }

    #[test]
    fn failed_start_counts_again_until_escalation() {
        let children = kids("a never c");
        let mut w = RestartWindow::new(3, 10 * SEC);
        let t = Instant::now();
        let first = decide(RestForOne, &children, &"never", Abnormal, &mut w, t);
        assert_eq!(first, Ok(restart("c", "", "never c")));
        let mut attempts = 1;
        loop {
            match decide_failed_start(RestForOne, &children, &"never", &mut w, t) {
                Ok(Decision::Restart { .. }) => attempts += 1,
                other => break assert_eq!(other, Ok(escalate("c a"))),
            }
        }
        assert_eq!(attempts, 3);
    }

    #[test]
    fn unknown_child_is_an_error_and_shutdown_is_reverse() {
        let children = kids("a b");
        let mut w = RestartWindow::new(0, SEC);
        for strategy in [OneForOne, OneForAll, RestForOne] {
            let got = decide(strategy, &children, &"x", Abnormal, &mut w, Instant::now());
            assert_eq!(got, Err(UnknownChild));
        }
        assert!(!UnknownChild.to_string().is_empty());
        assert_eq!(shutdown_order(&kids("z a:temp m:trans")), ids("m a z"));
        assert!(shutdown_order::<u8>(&[]).is_empty());
    }
}
