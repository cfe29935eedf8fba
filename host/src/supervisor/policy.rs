//! Restart policies: strategy plus intensity, with the original API's
//! constructors.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::decision::RestartStrategy;

/// How many restarts a supervisor tolerates within a sliding time window
/// (OTP's intensity and period) before it gives up and escalates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartIntensity {
    /// Restarts allowed within `time_window`; 0 means none.
    pub max_restarts: u32,
    /// Length of the sliding window.
    pub time_window: Duration,
}

impl Default for RestartIntensity {
    /// Five restarts per minute.
    fn default() -> Self {
        Self::new(5, Duration::from_secs(60))
    }
}

impl RestartIntensity {
    /// `max_restarts` within any `time_window`.
    pub fn new(max_restarts: u32, time_window: Duration) -> Self {
        Self {
            max_restarts,
            time_window,
        }
    }

    /// Ten restarts in two minutes.
    pub fn lenient() -> Self {
        Self::new(10, Duration::from_secs(120))
    }

    /// Three restarts in thirty seconds.
    pub fn strict() -> Self {
        Self::new(3, Duration::from_secs(30))
    }

    /// No restart at all: the first restart-worthy exit escalates.
    pub fn never() -> Self {
        Self::new(0, Duration::from_secs(1))
    }
}

/// A supervisor's restart strategy and intensity.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// Which children restart together.
    pub strategy: RestartStrategy,
    /// How many restarts are tolerated.
    pub intensity: RestartIntensity,
}

impl RestartPolicy {
    /// A policy from its parts.
    pub fn new(strategy: RestartStrategy, intensity: RestartIntensity) -> Self {
        Self {
            strategy,
            intensity,
        }
    }

    /// One-for-one, lenient intensity.
    pub fn lenient_one_for_one() -> Self {
        Self::new(RestartStrategy::OneForOne, RestartIntensity::lenient())
    }

    /// One-for-all, strict intensity.
    pub fn strict_one_for_all() -> Self {
        Self::new(RestartStrategy::OneForAll, RestartIntensity::strict())
    }

    /// Never restart: any restart-worthy exit makes the supervisor give up.
    pub fn never_restart() -> Self {
        Self::new(RestartStrategy::OneForOne, RestartIntensity::never())
    }
}
