//! Health monitoring of agents: how often each is asked, how long it may
//! take, and how many failures in a row make it count as crashed.
//!
//! The check runs in the agent's own task, between two messages, so it
//! holds the agent's messages up for at most one check. An `err` answer
//! (or `Ok(false)` from a native agent) adds to the failure streak; a
//! healthy answer ends it; `threshold` failures in a row end the agent with
//! [`ExitReason::Unhealthy`](crate::ExitReason::Unhealthy). A check that
//! traps or does not answer within its timeout ends the agent at once (its
//! instance cannot be trusted, or re-entered, after that).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The longest interval between, and timeout of, health checks (about a
/// century): [`HealthPolicy::validate`] refuses longer ones.
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How an agent's health is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthPolicy {
    /// Time between two checks; zero turns checks off.
    #[serde(with = "crate::runtime::duration_ms")]
    pub interval: Duration,
    /// How long one check may take.
    #[serde(with = "crate::runtime::duration_ms")]
    pub timeout: Duration,
    /// Failed checks in a row that end the agent (at least 1).
    pub threshold: u32,
}

impl HealthPolicy {
    /// No checks.
    pub const OFF: HealthPolicy = HealthPolicy {
        interval: Duration::ZERO,
        timeout: Duration::from_secs(5),
        threshold: 3,
    };

    /// Whether checks run at all.
    pub fn is_on(&self) -> bool {
        !self.interval.is_zero()
    }

    /// Check the policy for values that can never work: checks on without
    /// a timeout or threshold, or an interval or timeout past
    /// [`MAX_HEALTH_INTERVAL`] (the first check is due `now + interval`,
    /// which must stay a valid time).
    ///
    /// # Errors
    ///
    /// What is wrong with it, for people.
    pub fn validate(&self) -> Result<(), String> {
        if self.is_on() && (self.timeout.is_zero() || self.threshold == 0) {
            return Err(format!(
                "health checks need a timeout above 0 and a threshold of at least 1, got {:?} and {}",
                self.timeout, self.threshold
            ));
        }
        for (name, value) in [("interval", self.interval), ("timeout", self.timeout)] {
            if value > MAX_HEALTH_INTERVAL {
                return Err(format!(
                    "the health check {name} must be at most {MAX_HEALTH_INTERVAL:?} (about a century), got {value:?}"
                ));
            }
        }
        Ok(())
    }
}

/// The outcome of an agent's last health check, as its status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// When the last check ended.
    pub at: DateTime<Utc>,
    /// `None` if it was healthy; why not otherwise.
    pub failure: Option<String>,
    /// Failed checks in a row, the last one included.
    pub streak: u32,
}
