//! The circuit breaker of one child, as a plain state machine: the caller
//! passes the time in and carries out what it says.
//!
//! Closed: failures are counted in a sliding window; when `failures` of
//! them fall within `window`, the circuit opens. Open: the child is parked
//! (not restarted, not counted against its supervisor's intensity) until
//! the cool-down ends. Then half-open: one trial start. A trial that fails
//! (it cannot start, or exits before its probation ends) re-opens the
//! circuit with the cool-down doubled, up to `max_cooldown`; a trial that
//! runs through its probation (`window`) closes it and forgets the
//! failures.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The longest a circuit stays open, whatever the policy says (about a
/// century): the trial is due at `now + cool-down`, which must stay a
/// valid time, here and as the wall-clock time the status shows.
pub const MAX_PARK: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When a child's circuit opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerPolicy {
    /// Failures (abnormal exits, failed starts) within `window` that open
    /// the circuit. At least 1.
    pub failures: u32,
    /// The window failures are counted in; also how long a trial start must
    /// run to close the circuit again.
    #[serde(with = "crate::runtime::duration_ms")]
    pub window: Duration,
    /// How long the child stays parked the first time the circuit opens.
    #[serde(with = "crate::runtime::duration_ms")]
    pub cooldown: Duration,
    /// The longest cool-down: each failed trial doubles it up to this.
    #[serde(with = "crate::runtime::duration_ms")]
    pub max_cooldown: Duration,
}

impl BreakerPolicy {
    /// Check the policy for values that can never work.
    pub fn validate(&self) -> Result<(), String> {
        if self.failures == 0 {
            return Err("a circuit breaker needs failures >= 1".into());
        }
        if self.window.is_zero() || self.cooldown.is_zero() {
            return Err("a circuit breaker needs a window and a cool-down above 0".into());
        }
        if self.window > MAX_PARK {
            // A trial's probation ends at `now + window`: it must be a time.
            return Err(format!(
                "a circuit breaker's window ({:?}) must be at most {:?} (about a century)",
                self.window, MAX_PARK
            ));
        }
        if self.max_cooldown < self.cooldown {
            return Err(format!(
                "a circuit breaker's max_cooldown ({:?}) must be at least its cooldown ({:?})",
                self.max_cooldown, self.cooldown
            ));
        }
        Ok(())
    }
}

/// Where a circuit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Failures are counted; the child is restarted as usual.
    Closed,
    /// The child is parked until this time.
    Open {
        /// When the trial start is due.
        until: Instant,
    },
    /// A trial start is under way or on probation.
    HalfOpen,
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handle it as usual (restart type, strategy, intensity).
    Pass,
    /// Park the child: the circuit (re)opened; the trial is due at `until`.
    Park {
        /// When the trial start is due.
        until: Instant,
    },
}

/// One child's circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    circuit: Circuit,
    /// Failure times within the window, oldest first (closed only).
    failures: VecDeque<Instant>,
    /// The cool-down of the next opening.
    cooldown: Duration,
}

impl Breaker {
    /// A closed breaker with `policy`.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            circuit: Circuit::Closed,
            failures: VecDeque::new(),
            cooldown: policy.cooldown,
        }
    }

    /// Where the circuit is.
    pub fn circuit(&self) -> Circuit {
        self.circuit
    }

    /// The child failed at `now`.
    pub fn on_failure(&mut self, now: Instant) -> Verdict {
        match self.circuit {
            Circuit::Closed => {
                let window = self.policy.window;
                while self
                    .failures
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) > window)
                {
                    self.failures.pop_front();
                }
                self.failures.push_back(now);
                if self.failures.len() < self.policy.failures as usize {
                    return Verdict::Pass;
                }
                self.failures.clear();
                self.open(now)
            }
            Circuit::HalfOpen => {
                self.cooldown = self
                    .cooldown
                    .saturating_mul(2)
                    .min(self.policy.max_cooldown);
                self.open(now)
            }
            Circuit::Open { until } => Verdict::Park { until },
        }
    }

    fn open(&mut self, now: Instant) -> Verdict {
        let until = now + self.cooldown.min(MAX_PARK);
        self.circuit = Circuit::Open { until };
        Verdict::Park { until }
    }

    /// Whether the trial start is due at `now`; if so, the circuit is
    /// half-open from now on.
    pub fn trial_due(&mut self, now: Instant) -> bool {
        match self.circuit {
            Circuit::Open { until } if now >= until => {
                self.circuit = Circuit::HalfOpen;
                true
            }
            _ => false,
        }
    }

    /// How long a trial must run to close the circuit.
    pub fn probation(&self) -> Duration {
        self.policy.window
    }

    /// The trial ran through its probation: the circuit closes and its
    /// failures and cool-down start over.
    pub fn on_probation_passed(&mut self) {
        if self.circuit == Circuit::HalfOpen {
            self.circuit = Circuit::Closed;
            self.failures.clear();
            self.cooldown = self.policy.cooldown;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn breaker() -> (Breaker, Instant) {
        let policy = BreakerPolicy {
            failures: 3,
            window: 10 * S,
            cooldown: 5 * S,
            max_cooldown: 15 * S,
        };
        (Breaker::new(policy), Instant::now())
    }

    #[test]
    fn it_opens_on_the_nth_failure_within_the_window() {
        let (mut b, t0) = breaker();
        assert_eq!(b.on_failure(t0), Verdict::Pass);
        assert_eq!(b.on_failure(t0 + S), Verdict::Pass);
        assert_eq!(
            b.on_failure(t0 + 2 * S),
            Verdict::Park { until: t0 + 7 * S }
        );
        assert_eq!(b.circuit(), Circuit::Open { until: t0 + 7 * S });
    }

    #[test]
    fn failures_further_apart_than_the_window_never_open_it() {
        let (mut b, t0) = breaker();
        for i in 0..10 {
            assert_eq!(b.on_failure(t0 + 6 * S * i), Verdict::Pass, "failure {i}");
        }
        assert_eq!(b.circuit(), Circuit::Closed);
    }

    #[test]
    fn the_trial_is_due_once_the_cooldown_ends() {
        let (mut b, t0) = breaker();
        for _ in 0..3 {
            b.on_failure(t0);
        }
        assert!(!b.trial_due(t0 + 4 * S));
        assert!(b.trial_due(t0 + 5 * S));
        assert_eq!(b.circuit(), Circuit::HalfOpen);
        assert!(!b.trial_due(t0 + 6 * S), "only one trial");
    }

    #[test]
    fn a_failed_trial_reopens_with_the_cooldown_doubled_up_to_the_cap() {
        let (mut b, t0) = breaker();
        for _ in 0..3 {
            b.on_failure(t0);
        }
        let mut now = t0;
        for expected in [10, 15, 15] {
            now += 20 * S;
            assert!(b.trial_due(now));
            assert_eq!(
                b.on_failure(now),
                Verdict::Park {
                    until: now + expected * S
                }
            );
        }
    }

    #[test]
    fn a_trial_through_its_probation_closes_and_forgets() {
        let (mut b, t0) = breaker();
        for _ in 0..3 {
            b.on_failure(t0);
        }
        assert!(b.trial_due(t0 + 5 * S));
        assert_eq!(
            b.on_failure(t0 + 6 * S),
            Verdict::Park { until: t0 + 16 * S }
        );
        assert!(b.trial_due(t0 + 16 * S));
        b.on_probation_passed();
        assert_eq!(b.circuit(), Circuit::Closed);
        // The failures and the cool-down start over.
        assert_eq!(b.on_failure(t0 + 30 * S), Verdict::Pass);
        assert_eq!(b.on_failure(t0 + 30 * S), Verdict::Pass);
        assert_eq!(
            b.on_failure(t0 + 30 * S),
            Verdict::Park { until: t0 + 35 * S }
        );
    }

    #[test]
    fn impossible_policies_are_refused() {
        let ok = BreakerPolicy {
            failures: 1,
            window: S,
            cooldown: S,
            max_cooldown: S,
        };
        assert!(ok.validate().is_ok());
        assert!(BreakerPolicy { failures: 0, ..ok }.validate().is_err());
        // Found by tests/decision_model.rs: a probation of Duration::MAX
        // overflowed the supervisor's clock arithmetic.
        let endless = BreakerPolicy {
            window: Duration::MAX,
            ..ok
        };
        assert!(endless.validate().unwrap_err().contains("at most"));
        let longest = BreakerPolicy {
            window: MAX_PARK,
            ..ok
        };
        assert!(longest.validate().is_ok());
        assert!(
            BreakerPolicy {
                max_cooldown: S / 2,
                ..ok
            }
            .validate()
            .is_err()
        );
    }
}
