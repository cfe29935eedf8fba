//! Restart backoff per child: how long a child waits before it is started
//! again, as plain functions of its failure streak (no clock, no
//! randomness of their own: both are passed in).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a child waits before each restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Backoff {
    /// Restart at once (OTP's behaviour, the default).
    #[default]
    Immediate,
    /// Wait `base * 2^(n-1)` before the `n`-th restart in a row, at most
    /// `cap`; with `jitter` (the default), a uniformly random part of that
    /// ("full jitter"), so that children that failed together do not restart
    /// together. The streak starts over once an incarnation has run for at
    /// least `cap`.
    Exponential {
        /// The first delay.
        #[serde(with = "crate::runtime::duration_ms")]
        base: Duration,
        /// The longest delay; also how long an incarnation must run for the
        /// streak to start over.
        #[serde(with = "crate::runtime::duration_ms")]
        cap: Duration,
        /// Whether to take a random part of each delay.
        #[serde(default = "yes")]
        jitter: bool,
    },
}

/// The longest delay, whatever the policy says (about a century): the
/// restart is due at `now + delay`, which must stay a valid time.
pub const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn yes() -> bool {
    true
}

impl Backoff {
    /// The delay before the `streak`-th restart in a row (1 for the first),
    /// given `jitter` in `[0, 1)`: full jitter takes that fraction of the
    /// exponential delay. The delay is at most `cap`, and at most
    /// [`MAX_DELAY`].
    pub fn delay(&self, streak: u32, jitter: f64) -> Duration {
        match *self {
            Backoff::Immediate => Duration::ZERO,
            Backoff::Exponential {
                base,
                cap,
                jitter: with_jitter,
            } => {
                let cap = cap.min(MAX_DELAY);
                // Doubled one step at a time: no streak overflows, and the
                // loop ends at the cap (at most ~64 doublings from 1 ns).
                let mut full = base.min(cap);
                for _ in 1..streak {
                    if full >= cap || full.is_zero() {
                        break;
                    }
                    full = full.saturating_mul(2).min(cap);
                }
                if with_jitter {
                    let part = if jitter.is_nan() {
                        0.0
                    } else {
                        jitter.clamp(0.0, 1.0)
                    };
                    // `min`: the float product may round above `full`.
                    full.mul_f64(part).min(full)
                } else {
                    full
                }
            }
        }
    }

    /// Whether an incarnation that ran for `ran` ends the failure streak.
    pub fn resets_after(&self, ran: Duration) -> bool {
        match *self {
            Backoff::Immediate => true,
            Backoff::Exponential { cap, .. } => ran >= cap,
        }
    }

    /// Check the policy for values that can never work.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Backoff::Exponential { base, cap, .. } if base.is_zero() || cap < base => Err(format!(
                "an exponential backoff needs 0 < base <= cap, got base {base:?} and cap {cap:?}"
            )),
            _ => Ok(()),
        }
    }
}

/// A jitter source: a number in `[0, 1)`, from the thread's random
/// generator. Kept apart so that the policy stays a pure function.
pub(crate) fn jitter() -> f64 {
    fastrand::f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn exp(base: u32, cap: u32) -> Backoff {
        Backoff::Exponential {
            base: MS * base,
            cap: MS * cap,
            jitter: true,
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_takes_a_part() {
        let b = exp(100, 1000);
        let table = [
            (1, 1.0, 100),
            (2, 1.0, 200),
            (3, 1.0, 400),
            (4, 1.0, 800),
            (5, 1.0, 1000),
            (60, 1.0, 1000),
            (1000, 1.0, 1000),
            (3, 0.5, 200),
            (3, 0.0, 0),
            (0, 1.0, 100),
        ];
        for (streak, jitter, expected) in table {
            assert_eq!(
                b.delay(streak, jitter),
                MS * expected,
                "streak {streak}, jitter {jitter}"
            );
        }
    }

    #[test]
    fn without_jitter_the_delay_is_the_whole_doubling() {
        let b = Backoff::Exponential {
            base: MS * 100,
            cap: MS * 1000,
            jitter: false,
        };
        assert_eq!(b.delay(3, 0.1), MS * 400);
    }

    #[test]
    fn immediate_never_waits() {
        assert_eq!(Backoff::Immediate.delay(50, 0.9), Duration::ZERO);
        assert!(Backoff::Immediate.resets_after(Duration::ZERO));
    }

    #[test]
    fn the_streak_starts_over_after_a_run_as_long_as_the_cap() {
        let b = exp(100, 1000);
        assert!(!b.resets_after(MS * 999));
        assert!(b.resets_after(MS * 1000));
    }

    #[test]
    fn impossible_policies_are_refused() {
        assert!(exp(0, 10).validate().is_err());
        assert!(exp(20, 10).validate().is_err());
        assert!(exp(10, 10).validate().is_ok());
    }
}
