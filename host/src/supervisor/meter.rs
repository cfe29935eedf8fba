//! What each agent of a supervisor did and consumes, counted where it
//! happens, for the observer ([`crate::observe`]).
//!
//! One meter per agent child, kept by its supervisor (created when the
//! child first starts, kept across its restarts, dropped with its spec).
//! Two writers, both lock-free: a handle's `call` counts the call and its
//! latency; the agent's worker counts each delivery of one of the agent's
//! timers as a call (how long the agent took to handle it), and reports
//! what the agent consumes ([`AgentStats`]) after its start, each call and
//! each health check. Only one incarnation of a child runs at a time, so
//! the consumption reports never interleave. A cast is not counted (it has
//! no answer to wait for). [`AgentMetrics`] is what a meter reads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{AgentStats, SupervisionError, SupervisionResult};

/// Upper bounds (seconds) of the call latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How a call ended, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// The agent replied.
    Ok,
    /// The agent answered with an application error (it keeps running).
    AppError,
    /// The agent crashed handling the message.
    Crashed,
    /// Anything else: it was not running, did not answer in time, the
    /// message or reply was too large, its circuit was open.
    Failed,
}

impl CallOutcome {
    /// Every outcome, in the order of [`CallCounts`].
    pub const ALL: [CallOutcome; 4] = [Self::Ok, Self::AppError, Self::Crashed, Self::Failed];

    /// The label value (`ok`, `app_error`, `crashed`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::AppError => "app_error",
            Self::Crashed => "crashed",
            Self::Failed => "failed",
        }
    }

    fn of<T>(result: &SupervisionResult<T>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(SupervisionError::AgentExecutionFailed(..)) => Self::AppError,
            Err(SupervisionError::AgentCrashed(..)) => Self::Crashed,
            Err(_) => Self::Failed,
        }
    }
}

/// The live counters of one agent.
#[derive(Debug, Default)]
pub(crate) struct AgentMeter {
    /// Per [`CallOutcome::ALL`].
    calls: [AtomicU64; 4],
    /// Calls per latency bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_nanos: AtomicU64,
    fuel_consumed: AtomicU64,
    /// The current incarnation's fuel as last reported.
    fuel_seen: AtomicU64,
    memory_bytes: AtomicU64,
    state_bytes: AtomicU64,
    /// Whether the agent ever reported its consumption.
    has_stats: AtomicBool,
}

impl AgentMeter {
    /// Count one call that ended with `result` after `latency`.
    pub fn record_call<T>(&self, result: &SupervisionResult<T>, latency: Duration) {
        let outcome = CallOutcome::of(result) as usize;
        self.calls[outcome].fetch_add(1, Relaxed);
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanos.fetch_add(nanos, Relaxed);
    }

    /// A new incarnation of the agent started and consumes `stats`.
    pub fn started(&self, stats: Option<AgentStats>) {
        self.fuel_seen.store(0, Relaxed);
        self.observe(stats);
    }

    /// The agent's current incarnation consumes `stats` now.
    pub fn observe(&self, stats: Option<AgentStats>) {
        let Some(stats) = stats else { return };
        let before = self.fuel_seen.swap(stats.fuel_used, Relaxed);
        self.fuel_consumed
            .fetch_add(stats.fuel_used.saturating_sub(before), Relaxed);
        self.memory_bytes.store(stats.memory_bytes, Relaxed);
        self.state_bytes.store(stats.state_bytes, Relaxed);
        self.has_stats.store(true, Relaxed);
    }

    /// What the counters say now.
    pub fn read(&self) -> AgentMetrics {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&le, n)| {
                cumulative += n.load(Relaxed);
                (le, cumulative)
            })
            .collect();
        let count = cumulative + self.buckets[LATENCY_BUCKETS.len()].load(Relaxed);
        let has_stats = self.has_stats.load(Relaxed);
        let stat = |v: &AtomicU64| has_stats.then(|| v.load(Relaxed));
        AgentMetrics {
            calls: CallCounts {
                ok: self.calls[0].load(Relaxed),
                app_error: self.calls[1].load(Relaxed),
                crashed: self.calls[2].load(Relaxed),
                failed: self.calls[3].load(Relaxed),
            },
            latency: LatencyHistogram {
                buckets,
                count,
                sum_seconds: Duration::from_nanos(self.latency_nanos.load(Relaxed)).as_secs_f64(),
            },
            fuel_consumed: stat(&self.fuel_consumed),
            memory_bytes: stat(&self.memory_bytes),
            state_bytes: stat(&self.state_bytes),
        }
    }
}

/// Calls to one agent by outcome, since its supervisor started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCounts {
    /// Replies.
    pub ok: u64,
    /// Application errors.
    pub app_error: u64,
    /// Calls the agent crashed on.
    pub crashed: u64,
    /// Calls that failed otherwise (see [`CallOutcome::Failed`]).
    pub failed: u64,
}

impl CallCounts {
    /// The count of `outcome`.
    pub fn get(&self, outcome: CallOutcome) -> u64 {
        match outcome {
            CallOutcome::Ok => self.ok,
            CallOutcome::AppError => self.app_error,
            CallOutcome::Crashed => self.crashed,
            CallOutcome::Failed => self.failed,
        }
    }
}

/// The latency of one agent's calls (from `call` to its answer, whatever
/// the outcome; for a timer's delivery, from its delivery to the agent's
/// answer).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// `(upper bound in seconds, calls at most that long)`, cumulative, as
    /// Prometheus has them; the `+Inf` bucket is `count`.
    pub buckets: Vec<(f64, u64)>,
    /// Every call.
    pub count: u64,
    /// Their latencies added up, in seconds.
    pub sum_seconds: f64,
}

/// What one agent did and consumes, as its supervisor counted it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentMetrics {
    /// Its calls by outcome.
    pub calls: CallCounts,
    /// Its calls' latency.
    pub latency: LatencyHistogram,
    /// Fuel its incarnations consumed, as of their last report (`None` for
    /// an agent that reports none, such as a native one).
    pub fuel_consumed: Option<u64>,
    /// Its linear memory, as of its last report.
    pub memory_bytes: Option<u64>,
    /// Its durable state, as of its last report.
    pub state_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AgentPid;

    #[test]
    fn calls_are_counted_by_outcome_and_latency() {
        let meter = AgentMeter::default();
        let pid = AgentPid::new();
        meter.record_call(&Ok::<_, SupervisionError>(()), Duration::from_micros(100));
        meter.record_call::<()>(
            &Err(SupervisionError::AgentExecutionFailed(
                pid.clone(),
                "no".into(),
            )),
            Duration::from_millis(3),
        );
        meter.record_call::<()>(
            &Err(SupervisionError::AgentCrashed(
                pid,
                crate::AgentFault::Panic,
            )),
            Duration::from_secs(60),
        );
        meter.record_call::<()>(&Err(SupervisionError::Timeout), Duration::from_millis(3));
        let m = meter.read();
        assert_eq!(
            m.calls,
            CallCounts {
                ok: 1,
                app_error: 1,
                crashed: 1,
                failed: 1
            }
        );
        assert_eq!(m.latency.count, 4);
        assert_eq!(m.latency.buckets[0], (0.000_5, 1));
        assert_eq!(m.latency.buckets[3], (0.005, 3));
        assert_eq!(m.latency.buckets.last(), Some(&(10.0, 3)));
        assert!(m.latency.sum_seconds > 60.0);
        assert_eq!(m.fuel_consumed, None);
    }

    #[test]
    fn fuel_adds_up_across_incarnations() {
        let meter = AgentMeter::default();
        let stats = |fuel_used| {
            Some(AgentStats {
                fuel_used,
                memory_bytes: 65536,
                state_bytes: 8,
            })
        };
        meter.started(stats(100));
        meter.observe(stats(250));
        meter.started(stats(40)); // a restart: a new instance counts from 0
        meter.observe(None); // no report changes nothing
        let m = meter.read();
        assert_eq!(m.fuel_consumed, Some(290));
        assert_eq!((m.memory_bytes, m.state_bytes), (Some(65536), Some(8)));
    }
}
