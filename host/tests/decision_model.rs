//! Property tests of the restart decision (`supervisor::decision`) against a
//! small reference model of OTP's rules, written here from SPEC section 4
//! and deliberately not from `decision.rs`:
//!
//! - the restart type and the exit say whether a restart is wanted at all
//!   (the table of section 4);
//! - the intensity is "more than `max_restarts` restarts within
//!   `time_window`", kept as the full list of the times of every restart
//!   ever accepted, counted afresh at each exit (no pruning, no queue);
//! - a strategy names the children an exit affects (the failed one, all,
//!   or the failed one and those started after it); the affected ones other
//!   than the failed one are stopped last-started first, the temporaries
//!   among them are dropped, and the rest are started first-started first.
//!
//! Each case is a random child list (unique ids, mixed restart types), a
//! strategy, an intensity and a sequence of steps (a child exits, a restart
//! attempt fails to start a child, a child is added or restarted by hand,
//! time passes), and the decision is compared with the model's at every
//! step, the window's size too. The child list evolves as the supervisor
//! evolves it: temporaries removed, transients that exited normally kept
//! but not running, an escalation followed by the parent restarting the
//! supervisor from its initial specs with a fresh window.
//!
//! `PROPTEST_CASES=10000 cargo test --test decision_model` runs more cases
//! (the defaults here are a few hundred to a thousand, for CI: well under a
//! second in a debug build).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use terraphim_agent_supervisor::supervisor::backoff::{Backoff, MAX_DELAY};
use terraphim_agent_supervisor::supervisor::breaker::{
    Breaker, BreakerPolicy, Circuit, MAX_PARK, Verdict,
};
use terraphim_agent_supervisor::supervisor::decision::{
    ChildRef, Decision, ExitKind, RestartStrategy, RestartType, RestartWindow, UnknownChild,
    decide, decide_failed_start, shutdown_order,
};

type Id = u16;

// --- the reference model ------------------------------------------------

/// The whole of OTP's rules for one supervisor, as the model sees them.
#[derive(Debug, Clone)]
struct Model {
    strategy: RestartStrategy,
    max_restarts: u32,
    period_ms: u64,
    /// The specs in start order, with whether each child is running.
    specs: Vec<(Id, RestartType, bool)>,
    /// The time of every restart accepted since the supervisor started.
    restarts: Vec<u64>,
    /// When the intensity was last looked at (the window's `len` is as of then).
    last_check: Option<u64>,
}

/// What the model says about one exit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    NoRestart {
        remove: bool,
    },
    Restart {
        stop: Vec<Id>,
        remove: Vec<Id>,
        start: Vec<Id>,
    },
    Escalate {
        stop: Vec<Id>,
    },
}

impl Model {
    /// Section 4's table: is a restart wanted?
    fn wants_restart(restart_type: RestartType, exit: ExitKind) -> bool {
        match restart_type {
            RestartType::Permanent => true,
            RestartType::Transient => exit == ExitKind::Abnormal,
            RestartType::Temporary => false,
        }
    }

    /// Restarts within the window at `at`: those with `at - t <= period`.
    fn restarts_in_window(&self, at: u64) -> usize {
        self.restarts
            .iter()
            .filter(|&&t| at - t <= self.period_ms)
            .count()
    }

    /// The window's size as `RestartWindow::len` reports it.
    fn window_len(&self) -> usize {
        self.last_check.map_or(0, |at| self.restarts_in_window(at))
    }

    /// Is the child at position `i` affected by the exit of the child at
    /// position `failed`?
    fn affected(&self, i: usize, failed: usize) -> bool {
        match self.strategy {
            RestartStrategy::OneForOne => i == failed,
            RestartStrategy::OneForAll => true,
            RestartStrategy::RestForOne => i >= failed,
        }
    }

    fn decide(&mut self, failed: Id, exit: ExitKind, now: u64) -> Expected {
        let failed_at = self
            .specs
            .iter()
            .position(|s| s.0 == failed)
            .expect("the model only exits its own children");
        let restart_type = self.specs[failed_at].1;
        if !Self::wants_restart(restart_type, exit) {
            return Expected::NoRestart {
                remove: restart_type == RestartType::Temporary,
            };
        }
        self.last_check = Some(now);
        // One more restart: more than `max_restarts` within the window?
        if self.restarts_in_window(now) + 1 > self.max_restarts as usize {
            let mut stop = Vec::new();
            for i in (0..self.specs.len()).rev() {
                if i != failed_at {
                    stop.push(self.specs[i].0);
                }
            }
            return Expected::Escalate { stop };
        }
        self.restarts.push(now);
        let (mut stop, mut remove, mut start) = (Vec::new(), Vec::new(), Vec::new());
        for i in (0..self.specs.len()).rev() {
            let (id, rt, _) = self.specs[i];
            if i != failed_at && self.affected(i, failed_at) {
                stop.push(id);
                if rt == RestartType::Temporary {
                    remove.push(id);
                }
            }
        }
        for i in 0..self.specs.len() {
            let (id, rt, _) = self.specs[i];
            if self.affected(i, failed_at) && rt != RestartType::Temporary {
                start.push(id);
            }
        }
        Expected::Restart {
            stop,
            remove,
            start,
        }
    }
}

fn as_model(decision: &Decision<Id>) -> Expected {
    match decision.clone() {
        Decision::NoRestart { remove } => Expected::NoRestart { remove },
        Decision::Restart {
            stop,
            remove,
            start,
        } => Expected::Restart {
            stop,
            remove,
            start,
        },
        Decision::Escalate { stop } => Expected::Escalate { stop },
    }
}

// --- generators ---------------------------------------------------------

fn restart_type() -> impl Strategy<Value = RestartType> {
    prop_oneof![
        Just(RestartType::Permanent),
        Just(RestartType::Transient),
        Just(RestartType::Temporary),
    ]
}

fn strategy() -> impl Strategy<Value = RestartStrategy> {
    prop_oneof![
        Just(RestartStrategy::OneForOne),
        Just(RestartStrategy::OneForAll),
        Just(RestartStrategy::RestForOne),
    ]
}

fn exit_kind() -> impl Strategy<Value = ExitKind> {
    prop_oneof![
        Just(ExitKind::Normal),
        Just(ExitKind::Shutdown),
        Just(ExitKind::Abnormal),
    ]
}

/// Children in start order: unique ids in random (not sorted) order, so
/// that start order and id order differ.
fn children(max: usize) -> impl Strategy<Value = Vec<(Id, RestartType)>> {
    prop::collection::btree_set(0..1000u16, 0..=max)
        .prop_flat_map(|ids| {
            let n = ids.len();
            (
                Just(ids.into_iter().collect::<Vec<_>>()).prop_shuffle(),
                prop::collection::vec(restart_type(), n),
            )
        })
        .prop_map(|(ids, types)| ids.into_iter().zip(types).collect())
}

#[derive(Debug, Clone)]
enum Step {
    /// A running child (picked by `who`) exits `exit` after `advance_ms`;
    /// if a restart follows, the attempts to start the children fail at
    /// the picks of `failed_starts`, one per attempt, while there are picks.
    Exit {
        who: Index,
        exit: ExitKind,
        advance_ms: u64,
        failed_starts: Vec<Index>,
    },
    /// A child is added at run time (OTP's start_child: last in start order).
    Add { restart_type: RestartType },
    /// A child that is not running is restarted by hand (restart_child).
    RestartByHand { who: Index },
}

fn step(period_ms: u64) -> impl Strategy<Value = Step> {
    // Time advances: often none (bursts), often within the window, sometimes
    // exactly the window (the boundary), sometimes far beyond it.
    let advance = prop_oneof![
        3 => Just(0u64),
        4 => 0..=period_ms,
        1 => Just(period_ms),
        1 => Just(period_ms + 1),
        1 => 0..=period_ms * 5,
    ];
    prop_oneof![
        10 => (any::<Index>(), exit_kind(), advance, prop::collection::vec(any::<Index>(), 0..3))
            .prop_map(|(who, exit, advance_ms, failed_starts)| Step::Exit {
                who,
                exit,
                advance_ms,
                failed_starts,
            }),
        1 => restart_type().prop_map(|restart_type| Step::Add { restart_type }),
        1 => any::<Index>().prop_map(|who| Step::RestartByHand { who }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    strategy: RestartStrategy,
    max_restarts: u32,
    period_ms: u64,
    children: Vec<(Id, RestartType)>,
    steps: Vec<Step>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        strategy(),
        prop_oneof![1 => Just(0u32), 6 => 1..6u32, 1 => 6..50u32],
        prop_oneof![Just(1u64), 1..100u64, Just(1000u64)],
        children(8),
    )
        .prop_flat_map(|(strategy, max_restarts, period_ms, children)| {
            prop::collection::vec(step(period_ms), 0..60).prop_map(move |steps| Case {
                strategy,
                max_restarts,
                period_ms,
                children: children.clone(),
                steps,
            })
        })
}

// --- the supervisor's side: carry decisions out -------------------------

/// The child list as the supervisor keeps it, driven by `decide`.
struct Sup {
    strategy: RestartStrategy,
    initial: Vec<(Id, RestartType)>,
    specs: Vec<(Id, RestartType, bool)>,
    window: RestartWindow,
}

impl Sup {
    fn refs(&self) -> Vec<ChildRef<Id>> {
        self.specs
            .iter()
            .map(|&(id, restart_type, _)| ChildRef { id, restart_type })
            .collect()
    }

    fn set_running(&mut self, id: Id, running: bool) {
        let spec = self.specs.iter_mut().find(|s| s.0 == id).expect("a child");
        spec.2 = running;
    }

    fn remove(&mut self, id: Id) {
        let before = self.specs.len();
        self.specs.retain(|s| s.0 != id);
        assert_eq!(self.specs.len() + 1, before, "{id} removed once");
    }
}

/// Properties every decision has, whatever the model says.
fn check_shape(children: &[ChildRef<Id>], failed: Id, decision: &Decision<Id>, window: usize) {
    let pos = |id: &Id| children.iter().position(|c| c.id == *id).expect("a child");
    let temporary = |id: &Id| children[pos(id)].restart_type == RestartType::Temporary;
    let decreasing = |ids: &[Id]| ids.windows(2).all(|w| pos(&w[0]) > pos(&w[1]));
    let increasing = |ids: &[Id]| ids.windows(2).all(|w| pos(&w[0]) < pos(&w[1]));
    match decision {
        Decision::NoRestart { .. } => {}
        Decision::Restart {
            stop,
            remove,
            start,
        } => {
            assert!(!stop.contains(&failed), "the failed child is dead already");
            assert!(decreasing(stop) && decreasing(remove) && increasing(start));
            assert!(start.contains(&failed), "the failed child is restarted");
            assert!(remove.iter().all(|id| stop.contains(id) && temporary(id)));
            // Nothing is lost: every stopped child is restarted or removed.
            for id in stop {
                assert!(start.contains(id) != remove.contains(id), "{id} lost");
            }
            assert!(start.iter().all(|id| !temporary(id)));
            assert!(window >= 1);
        }
        Decision::Escalate { stop } => {
            assert!(decreasing(stop));
            assert_eq!(stop.len() + 1, children.len(), "everyone else is stopped");
        }
    }
}

fn run_case(case: &Case) {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let period = Duration::from_millis(case.period_ms);
    let initial_specs = || {
        case.children
            .iter()
            .map(|&(id, rt)| (id, rt, true))
            .collect::<Vec<_>>()
    };
    let mut sup = Sup {
        strategy: case.strategy,
        initial: case.children.clone(),
        specs: initial_specs(),
        window: RestartWindow::new(case.max_restarts, period),
    };
    let fresh_model = || Model {
        strategy: case.strategy,
        max_restarts: case.max_restarts,
        period_ms: case.period_ms,
        specs: initial_specs(),
        restarts: Vec::new(),
        last_check: None,
    };
    let mut model = fresh_model();
    let mut now = 0u64;
    let mut next_id: Id = 1000;
    for (n, step) in case.steps.iter().enumerate() {
        match step {
            Step::Add { restart_type } => {
                next_id += 1;
                sup.specs.push((next_id, *restart_type, true));
                model.specs.push((next_id, *restart_type, true));
            }
            Step::RestartByHand { who } => {
                let stopped: Vec<Id> = sup.specs.iter().filter(|s| !s.2).map(|s| s.0).collect();
                if !stopped.is_empty() {
                    let id = stopped[who.index(stopped.len())];
                    sup.set_running(id, true);
                    model.specs.iter_mut().find(|s| s.0 == id).unwrap().2 = true;
                }
            }
            Step::Exit {
                who,
                exit,
                advance_ms,
                failed_starts,
            } => {
                now += advance_ms;
                let running: Vec<Id> = sup.specs.iter().filter(|s| s.2).map(|s| s.0).collect();
                if running.is_empty() {
                    continue;
                }
                let mut failed = running[who.index(running.len())];
                let mut exit = *exit;
                let mut failed_starts = failed_starts.iter();
                let mut first = true;
                // One exit, then each failed start attempt, until a restart
                // goes through or the supervisor gives up.
                loop {
                    sup.set_running(failed, false);
                    let children = sup.refs();
                    let got = if first {
                        decide(
                            sup.strategy,
                            &children,
                            &failed,
                            exit,
                            &mut sup.window,
                            at(now),
                        )
                    } else {
                        decide_failed_start(
                            sup.strategy,
                            &children,
                            &failed,
                            &mut sup.window,
                            at(now),
                        )
                    }
                    .expect("a known child");
                    first = false;
                    let want = model.decide(failed, exit, now);
                    let ctx =
                        format!("step {n}: {failed} {exit:?} at {now} ms, children {children:?}");
                    assert_eq!(as_model(&got), want, "{ctx}");
                    assert_eq!(sup.window.len(), model.window_len(), "window, {ctx}");
                    assert!(sup.window.len() <= case.max_restarts as usize, "{ctx}");
                    check_shape(&children, failed, &got, sup.window.len());
                    // Carry the decision out, in both.
                    match got {
                        Decision::NoRestart { remove: true } => {
                            sup.remove(failed);
                            model.specs.retain(|s| s.0 != failed);
                        }
                        Decision::NoRestart { remove: false } => {
                            model.specs.iter_mut().find(|s| s.0 == failed).unwrap().2 = false;
                        }
                        Decision::Escalate { .. } => {
                            // The parent restarts the supervisor: its initial
                            // children, a fresh window.
                            sup.specs =
                                sup.initial.iter().map(|&(id, rt)| (id, rt, true)).collect();
                            sup.window = RestartWindow::new(case.max_restarts, period);
                            model = fresh_model();
                        }
                        Decision::Restart {
                            stop,
                            remove,
                            start,
                        } => {
                            for id in &stop {
                                sup.set_running(*id, false);
                            }
                            for id in &remove {
                                sup.remove(*id);
                                model.specs.retain(|s| s.0 != *id);
                            }
                            // Start in order; an attempt may fail.
                            let fails_at = failed_starts.next().map(|i| i.index(start.len()));
                            for (i, id) in start.iter().enumerate() {
                                if Some(i) == fails_at {
                                    break;
                                }
                                sup.set_running(*id, true);
                            }
                            for s in &mut model.specs {
                                s.2 = sup.specs.iter().find(|t| t.0 == s.0).unwrap().2;
                            }
                            if let Some(i) = fails_at {
                                failed = start[i];
                                exit = ExitKind::Abnormal;
                                continue;
                            }
                        }
                    }
                    break;
                }
            }
        }
        let ids: Vec<Id> = sup.specs.iter().map(|s| s.0).collect();
        let model_ids: Vec<Id> = model.specs.iter().map(|s| s.0).collect();
        assert_eq!(ids, model_ids, "the child lists after step {n}");
        let unique: BTreeSet<Id> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "ids stay unique");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
    ))]

    /// `decide` and `decide_failed_start` agree with the model at every
    /// step of a random supervisor's life.
    #[test]
    fn decisions_follow_the_model(case in case()) {
        run_case(&case);
    }

    /// Stopping everything is reverse start order; an id that is not a
    /// child is an error that leaves the window alone.
    #[test]
    fn shutdown_is_reverse_and_strangers_are_refused(
        children in children(12),
        strategy in strategy(),
        exit in exit_kind(),
    ) {
        let refs: Vec<ChildRef<Id>> = children
            .iter()
            .map(|&(id, restart_type)| ChildRef { id, restart_type })
            .collect();
        let mut reversed: Vec<Id> = children.iter().map(|c| c.0).collect();
        reversed.reverse();
        prop_assert_eq!(shutdown_order(&refs), reversed);
        let mut window = RestartWindow::new(3, Duration::from_secs(1));
        let stranger = 5000;
        prop_assert_eq!(
            decide(strategy, &refs, &stranger, exit, &mut window, Instant::now()),
            Err(UnknownChild)
        );
        prop_assert!(window.is_empty());
    }

    /// Restarts spaced further apart than the window never escalate, with
    /// any intensity of at least one.
    #[test]
    fn restarts_spaced_beyond_the_window_never_escalate(
        max_restarts in 1..10u32,
        period_ms in 1..10_000u64,
        gaps in prop::collection::vec(1..1000u64, 1..50),
    ) {
        let mut window = RestartWindow::new(max_restarts, Duration::from_millis(period_ms));
        let t0 = Instant::now();
        let mut now = t0;
        for gap in gaps {
            now += Duration::from_millis(period_ms + gap);
            prop_assert!(window.try_record(now));
            prop_assert_eq!(window.len(), 1);
        }
    }
}

// --- the circuit breaker ------------------------------------------------

#[derive(Debug, Clone)]
enum BreakerStep {
    Failure { advance_ms: u64 },
    TrialDue { advance_ms: u64 },
    ProbationPassed,
}

fn breaker_policy() -> impl Strategy<Value = BreakerPolicy> {
    (1..6u32, 1..1000u64, 1..1000u64, 0..5000u64).prop_map(|(failures, window, cooldown, extra)| {
        BreakerPolicy {
            failures,
            window: Duration::from_millis(window),
            cooldown: Duration::from_millis(cooldown),
            max_cooldown: Duration::from_millis(cooldown + extra),
        }
    })
}

fn breaker_steps(max_advance: u64) -> impl Strategy<Value = Vec<BreakerStep>> {
    let advance = prop_oneof![Just(0u64), 0..max_advance, Just(max_advance)];
    let step = prop_oneof![
        6 => advance.clone().prop_map(|advance_ms| BreakerStep::Failure { advance_ms }),
        3 => advance.prop_map(|advance_ms| BreakerStep::TrialDue { advance_ms }),
        1 => Just(BreakerStep::ProbationPassed),
    ];
    prop::collection::vec(step, 0..80)
}

/// A policy whose durations may be huge, up to `Duration::MAX`: the
/// breaker must not panic on any policy that `validate` accepts.
fn huge_breaker_policy() -> impl Strategy<Value = BreakerPolicy> {
    let big = prop_oneof![
        Just(Duration::MAX),
        Just(Duration::from_secs(u64::MAX / 2)),
        (1..u64::MAX).prop_map(Duration::from_secs),
        (1..u64::MAX).prop_map(Duration::from_millis),
    ];
    // The longest window `validate` takes is MAX_PARK (a longer one is
    // refused: a unit test of breaker.rs).
    let window = prop_oneof![
        Just(MAX_PARK),
        (1..=MAX_PARK.as_secs()).prop_map(Duration::from_secs),
        (1..=MAX_PARK.as_nanos() as u64).prop_map(Duration::from_nanos),
    ];
    (1..4u32, window, big.clone(), big).prop_map(|(failures, window, a, b)| BreakerPolicy {
        failures,
        window,
        cooldown: a.min(b),
        max_cooldown: a.max(b),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300),
    ))]

    /// The breaker never opens with fewer than `failures` failures within
    /// its window since it last closed or opened; a cool-down is the
    /// policy's, doubled per failed trial, never above the cap; a circuit
    /// closed after its probation forgets its failures and its cool-down.
    #[test]
    fn the_breaker_opens_and_cools_down_by_its_policy(
        (policy, steps) in breaker_policy().prop_flat_map(|p| {
            let max = (p.window.max(p.max_cooldown).as_millis() as u64) * 2;
            (Just(p), breaker_steps(max))
        })
    ) {
        prop_assert!(policy.validate().is_ok());
        let t0 = Instant::now();
        let mut now = t0;
        let mut breaker = Breaker::new(policy);
        // The model: failures counted since the circuit last closed or
        // opened; failed trials since it last closed.
        let mut failures: Vec<Instant> = Vec::new();
        let mut failed_trials = 0u32;
        for step in steps {
            let before = breaker.circuit();
            match step {
                BreakerStep::Failure { advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    let verdict = breaker.on_failure(now);
                    match before {
                        Circuit::Closed => {
                            failures.push(now);
                            let in_window = failures
                                .iter()
                                .filter(|&&t| now - t <= policy.window)
                                .count();
                            let want_open = in_window >= policy.failures as usize;
                            match verdict {
                                Verdict::Pass => prop_assert!(!want_open),
                                Verdict::Park { until } => {
                                    prop_assert!(want_open, "opened with {} failures in the window", in_window);
                                    prop_assert_eq!(until - now, policy.cooldown, "the first opening");
                                    failures.clear();
                                }
                            }
                        }
                        Circuit::HalfOpen => {
                            failed_trials += 1;
                            let Verdict::Park { until } = verdict else {
                                return Err(TestCaseError::fail("a failed trial passed"));
                            };
                            let doubled = policy.cooldown.saturating_mul(1u32 << failed_trials.min(31));
                            prop_assert_eq!(until - now, doubled.min(policy.max_cooldown));
                        }
                        Circuit::Open { until } => {
                            prop_assert_eq!(verdict, Verdict::Park { until }, "parked already");
                        }
                    }
                    if let Verdict::Park { until } = verdict {
                        prop_assert!(until - now <= policy.max_cooldown, "above the cap");
                        prop_assert_eq!(breaker.circuit(), Circuit::Open { until });
                    }
                }
                BreakerStep::TrialDue { advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    let due = breaker.trial_due(now);
                    let want = matches!(before, Circuit::Open { until } if now >= until);
                    prop_assert_eq!(due, want);
                    if due {
                        prop_assert_eq!(breaker.circuit(), Circuit::HalfOpen);
                    } else {
                        prop_assert_eq!(breaker.circuit(), before);
                    }
                }
                BreakerStep::ProbationPassed => {
                    breaker.on_probation_passed();
                    if before == Circuit::HalfOpen {
                        prop_assert_eq!(breaker.circuit(), Circuit::Closed);
                        failed_trials = 0;
                        failures.clear();
                    } else {
                        prop_assert_eq!(breaker.circuit(), before);
                    }
                }
            }
        }
    }

    /// No policy that `validate` accepts makes the breaker panic, however
    /// large its durations, and a circuit never opens for longer than
    /// [`MAX_PARK`], a time the status can still show as a date.
    #[test]
    fn the_breaker_survives_huge_policies(
        policy in huge_breaker_policy(),
        steps in breaker_steps(1_000_000),
    ) {
        prop_assume!(policy.validate().is_ok());
        let mut now = Instant::now();
        // The supervisor ends a trial's probation at `now + window`.
        prop_assert!(now.checked_add(policy.window).is_some());
        let mut breaker = Breaker::new(policy);
        for step in steps {
            match step {
                BreakerStep::Failure { advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    if let Verdict::Park { until } = breaker.on_failure(now) {
                        prop_assert!(until >= now);
                        prop_assert!(until - now <= policy.max_cooldown.min(MAX_PARK));
                    }
                }
                BreakerStep::TrialDue { advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    breaker.trial_due(now);
                }
                BreakerStep::ProbationPassed => breaker.on_probation_passed(),
            }
        }
    }
}

/// The regression of the case above: a cool-down of `Duration::MAX` (or
/// of `i64::MAX` ms, the most a tree file takes) overflowed `Instant` (and
/// the wall-clock date of the status) when the circuit opened.
#[test]
fn a_circuit_opened_for_ever_is_parked_for_max_park() {
    let now = Instant::now();
    for cooldown in [Duration::MAX, Duration::from_millis(i64::MAX as u64)] {
        let mut breaker = Breaker::new(BreakerPolicy {
            failures: 1,
            window: cooldown,
            cooldown,
            max_cooldown: cooldown,
        });
        assert_eq!(
            breaker.on_failure(now),
            Verdict::Park {
                until: now + MAX_PARK
            }
        );
        assert!(breaker.trial_due(now + MAX_PARK));
        // A failed trial doubles the cool-down without overflowing.
        assert_eq!(
            breaker.on_failure(now),
            Verdict::Park {
                until: now + MAX_PARK
            }
        );
    }
    let date =
        chrono::Utc::now().checked_add_signed(chrono::TimeDelta::from_std(MAX_PARK).unwrap());
    assert!(date.is_some(), "the status can show it");
}

// --- restart backoff ----------------------------------------------------

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => (1..100_000u64).prop_map(Duration::from_millis),
        1 => (1..u64::MAX).prop_map(Duration::from_nanos),
        1 => (1..u64::MAX).prop_map(Duration::from_secs),
        1 => Just(Duration::MAX),
    ]
}

fn exponential(jitter: bool) -> impl Strategy<Value = Backoff> {
    (duration(), duration()).prop_map(move |(a, b)| Backoff::Exponential {
        base: a.min(b),
        cap: a.max(b),
        jitter,
    })
}

/// The model: `base * 2^(streak - 1)` (`base` for streaks 0 and 1), at most
/// `cap` and at most `MAX_DELAY`, computed in exact integers.
fn model_delay(base: Duration, cap: Duration, streak: u32) -> Duration {
    let limit = cap.min(MAX_DELAY).as_nanos();
    let doublings = streak.saturating_sub(1);
    let full = if doublings >= 128 {
        limit
    } else {
        base.as_nanos()
            .checked_shl(doublings)
            .filter(|n| n >> doublings == base.as_nanos())
            .unwrap_or(limit)
    };
    let nanos = full.min(limit);
    Duration::new(
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500),
    ))]

    /// Without jitter the delay is the model's exactly: it grows with the
    /// streak (never shrinks), starts at `base` and ends at `cap`.
    #[test]
    fn backoff_without_jitter_doubles_up_to_the_cap(
        backoff in exponential(false),
        streaks in prop::collection::vec(prop_oneof![0..200u32, any::<u32>()], 1..20),
        jitter in any::<f64>(),
    ) {
        let Backoff::Exponential { base, cap, .. } = backoff else { unreachable!() };
        prop_assert!(backoff.validate().is_ok());
        prop_assert_eq!(backoff.delay(1, jitter), base.min(MAX_DELAY));
        let mut streaks = streaks;
        streaks.sort_unstable();
        let mut last = Duration::ZERO;
        for streak in streaks {
            let delay = backoff.delay(streak, jitter);
            prop_assert_eq!(delay, model_delay(base, cap, streak), "streak {}", streak);
            prop_assert!(delay >= last, "streak {}: {:?} < {:?}", streak, delay, last);
            prop_assert!(delay <= cap);
            last = delay;
        }
        prop_assert_eq!(backoff.delay(u32::MAX, jitter), cap.min(MAX_DELAY));
    }

    /// With jitter the delay is a part of the delay without: within
    /// `[0, full]`, whatever the jitter (out of `[0, 1)` too: NaN and
    /// infinities must not panic).
    #[test]
    fn backoff_jitter_takes_a_part_of_the_full_delay(
        backoff in exponential(true),
        streak in 0..100u32,
        jitter in prop_oneof![
            Just(0.0),
            0.0..1.0f64,
            Just(1.0 - f64::EPSILON),
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
        ],
    ) {
        let Backoff::Exponential { base, cap, .. } = backoff else { unreachable!() };
        let full = Backoff::Exponential { base, cap, jitter: false }.delay(streak, 0.0);
        let delay = backoff.delay(streak, jitter);
        prop_assert!(delay <= full, "{:?} > {:?}", delay, full);
        if jitter == 0.0 || jitter.is_nan() {
            prop_assert_eq!(delay, Duration::ZERO);
        }
    }

    /// `Immediate` never waits and every incarnation ends its streak; an
    /// exponential streak ends after a run as long as the cap.
    #[test]
    fn the_streak_ends_after_a_run_as_long_as_the_cap(
        backoff in exponential(true),
        ran in duration(),
        streak in any::<u32>(),
    ) {
        let Backoff::Exponential { cap, .. } = backoff else { unreachable!() };
        prop_assert_eq!(backoff.resets_after(ran), ran >= cap);
        prop_assert_eq!(Backoff::Immediate.delay(streak, 0.5), Duration::ZERO);
        prop_assert!(Backoff::Immediate.resets_after(ran));
    }
}

/// The regression of the first case above: the delay stopped doubling
/// after 31 doublings (`base * 2^31`), short of a larger cap.
#[test]
fn the_delay_reaches_a_cap_beyond_31_doublings() {
    let backoff = Backoff::Exponential {
        base: Duration::from_millis(1),
        cap: Duration::from_secs(10_000_000),
        jitter: false,
    };
    assert_eq!(backoff.delay(32, 0.0), Duration::from_millis(1 << 31));
    assert_eq!(backoff.delay(34, 0.0), Duration::from_millis(1 << 33));
    assert_eq!(backoff.delay(35, 0.0), Duration::from_secs(10_000_000));
    assert_eq!(
        backoff.delay(u32::MAX, 0.0),
        Duration::from_secs(10_000_000)
    );
}
