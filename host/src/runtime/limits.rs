//! Per-agent resource limits and the store's resource limiter.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The limits one agent instance runs under. Every instance gets its own
/// store, so these are enforced per agent: a fault in one never consumes
/// another's budget.
///
/// Memory and tables are bounded as **per-agent totals**: a component made
/// of several core modules has several memories and tables, and the sum over
/// all of them is what counts. How many memories, tables and core instances
/// one agent may have at all is engine-wide
/// ([`RuntimeConfig`](super::RuntimeConfig)), so that the shared pool always
/// has room for every agent it admits.
///
/// `None` means "no limit of this kind" (fuel is still metered, the budget is
/// just unbounded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentLimits {
    /// Fuel available to each call (one message, one lifecycle call). Refilled
    /// before every call.
    pub fuel_per_call: Option<u64>,
    /// Fuel available over the instance's whole life (across calls). A
    /// restarted instance starts with a fresh budget.
    pub fuel_per_lifetime: Option<u64>,
    /// Linear memory, in bytes, summed over every memory of the instance.
    /// Each single memory is also capped by the runtime's
    /// [`max_memory_bytes`](super::RuntimeConfig::max_memory_bytes).
    pub memory_bytes: usize,
    /// Table elements, summed over every table of the instance. Each single
    /// table is also capped by the runtime's
    /// [`max_table_elements`](super::RuntimeConfig::max_table_elements).
    pub table_elements: usize,
    /// Maximum core and component instances created in the agent's store.
    pub instances: usize,
    /// Bytes of durable state the agent may hold (keys and values, plus a
    /// small fixed cost per entry). `None`: as many as `memory_bytes`.
    pub state_bytes: Option<usize>,
    /// Log records the agent may emit per second (and per call); the excess
    /// is dropped and counted.
    pub log_records_per_second: u32,
    /// Log bytes the agent may emit per second (and per call); the excess is
    /// dropped and counted.
    pub log_bytes_per_second: usize,
    /// The last bytes of the agent's stdout and stderr kept for its crash
    /// reports (whether or not those streams are granted).
    pub crash_output_bytes: usize,
    /// Wall-clock deadline of each call into the agent, instantiation
    /// included.
    #[serde(with = "crate::runtime::duration_ms")]
    pub deadline: Duration,
    /// Timers the agent may have pending at once (the WIT `timers`
    /// interface). 0, the default, grants none: timers are deny-by-default.
    /// At most [`MAX_TIMERS_LIMIT`](super::MAX_TIMERS_LIMIT).
    pub max_timers: u32,
}

/// The longest deadline of a call, whatever the limits say (about a
/// century): a call must end by `now + deadline`, which must stay a valid
/// time.
pub const MAX_DEADLINE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            fuel_per_call: Some(1_000_000_000),
            fuel_per_lifetime: None,
            memory_bytes: 64 << 20,
            table_elements: 100_000,
            instances: 64,
            state_bytes: None,
            log_records_per_second: 200,
            log_bytes_per_second: 256 << 10,
            crash_output_bytes: 4096,
            deadline: Duration::from_secs(5),
            max_timers: 0,
        }
    }
}

impl AgentLimits {
    /// Check the limits for values that can never work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.fuel_per_call == Some(0) {
            return Err("fuel_per_call must be greater than 0".into());
        }
        if self.fuel_per_lifetime == Some(0) {
            return Err("fuel_per_lifetime must be greater than 0".into());
        }
        if self.memory_bytes < (1 << 16) {
            return Err(format!(
                "memory_bytes must be at least one 64 KiB page (65536), got {}",
                self.memory_bytes
            ));
        }
        if self.instances == 0 {
            return Err("instances must be greater than 0".into());
        }
        if self.deadline.is_zero() {
            return Err("deadline must be greater than 0".into());
        }
        if self.deadline > MAX_DEADLINE {
            return Err(format!(
                "deadline must be at most {MAX_DEADLINE:?} (about a century), got {:?}",
                self.deadline
            ));
        }
        if self.max_timers > super::MAX_TIMERS_LIMIT {
            return Err(format!(
                "max_timers must be at most {}, got {}",
                super::MAX_TIMERS_LIMIT,
                self.max_timers
            ));
        }
        Ok(())
    }

    /// The state budget in bytes: [`state_bytes`](Self::state_bytes), or
    /// [`memory_bytes`](Self::memory_bytes) when unset.
    pub fn state_budget(&self) -> usize {
        self.state_bytes.unwrap_or(self.memory_bytes)
    }
}

/// The engine-wide ceilings the limiter enforces besides an agent's own
/// limits: the pool's per-memory and per-table sizes, and how many memories
/// and tables one agent may have.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceilings {
    pub memory_bytes: usize,
    pub table_elements: usize,
    pub memories: usize,
    pub tables: usize,
}

/// The resource limiter installed in each agent's store.
///
/// Invariants: `memory_used` is the sum of the current sizes of all the
/// store's memories and never exceeds the agent's `memory_bytes`;
/// `table_used` likewise for table elements. Every refusal, whether by the
/// agent's total or by a ceiling, is decided here and recorded, so that the
/// trap a guest raises after a refused allocation is reported as a limit
/// fault rather than as a panic.
#[derive(Debug)]
pub(crate) struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    instances: usize,
    ceilings: Ceilings,
    memory_used: usize,
    table_used: usize,
    /// The growth granted by the last `*_growing`, taken back if wasmtime
    /// then fails to carry it out.
    memory_pending: usize,
    table_pending: usize,
    /// A memory growth was refused since the last [`Limiter::reset_hints`].
    pub memory_refused: bool,
    /// A table growth was refused since the last [`Limiter::reset_hints`].
    pub table_refused: bool,
}

impl Limiter {
    pub fn new(limits: &AgentLimits, ceilings: Ceilings) -> Self {
        Self {
            memory_bytes: limits.memory_bytes,
            table_elements: limits.table_elements,
            instances: limits.instances,
            ceilings,
            memory_used: 0,
            table_used: 0,
            memory_pending: 0,
            table_pending: 0,
            memory_refused: false,
            table_refused: false,
        }
    }

    pub fn reset_hints(&mut self) {
        self.memory_refused = false;
        self.table_refused = false;
    }

    /// Bytes of linear memory the instance holds, over all its memories.
    pub fn memory_used(&self) -> usize {
        self.memory_used
    }
}

/// Grant a growth from `current` to `desired` if it stays within `ceiling`
/// for this one resource and within `total` over all of them.
fn grant(
    used: &mut usize,
    pending: &mut usize,
    refused: &mut bool,
    (current, desired): (usize, usize),
    ceiling: usize,
    total: usize,
) -> bool {
    let delta = desired.saturating_sub(current);
    let ok = desired <= ceiling && used.checked_add(delta).is_some_and(|t| t <= total);
    if ok {
        *used += delta;
        *pending = delta;
    } else {
        *pending = 0;
        *refused = true;
    }
    ok
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(grant(
            &mut self.memory_used,
            &mut self.memory_pending,
            &mut self.memory_refused,
            (current, desired),
            self.ceilings.memory_bytes,
            self.memory_bytes,
        ))
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // The memory's own maximum (or the OS) refused what we granted.
        self.memory_used -= std::mem::take(&mut self.memory_pending);
        self.memory_refused = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(grant(
            &mut self.table_used,
            &mut self.table_pending,
            &mut self.table_refused,
            (current, desired),
            self.ceilings.table_elements,
            self.table_elements,
        ))
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.table_used -= std::mem::take(&mut self.table_pending);
        self.table_refused = true;
        Ok(())
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn memories(&self) -> usize {
        self.ceilings.memories
    }

    fn tables(&self) -> usize {
        self.ceilings.tables
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter;

    use super::*;

    fn limiter(memory_bytes: usize, table_elements: usize) -> Limiter {
        let limits = AgentLimits {
            memory_bytes,
            table_elements,
            ..AgentLimits::default()
        };
        let ceilings = Ceilings {
            memory_bytes: 1000,
            table_elements: 100,
            memories: 4,
            tables: 4,
        };
        Limiter::new(&limits, ceilings)
    }

    #[test]
    fn memory_is_a_total_over_all_memories() {
        let mut l = limiter(1500, 1000);
        assert!(l.memory_growing(0, 600, None).unwrap(), "first memory");
        assert!(l.memory_growing(0, 600, None).unwrap(), "second memory");
        assert_eq!(l.memory_used(), 1200);
        assert!(!l.memory_refused);
        // Each memory stays within the ceiling, but the sum would be 1600.
        assert!(!l.memory_growing(600, 1000, None).unwrap());
        assert!(l.memory_refused);
        assert_eq!(l.memory_used(), 1200, "a refusal changes nothing");
        l.reset_hints();
        assert!(l.memory_growing(600, 1000, None).is_ok_and(|ok| !ok));
        assert!(l.memory_growing(0, 300, None).unwrap(), "exactly the total");
        assert_eq!(l.memory_used(), 1500);
    }

    #[test]
    fn one_memory_may_not_pass_the_ceiling_even_within_the_total() {
        let mut l = limiter(10_000, 1000);
        assert!(!l.memory_growing(0, 1001, None).unwrap());
        assert!(l.memory_refused);
        assert_eq!(l.memory_used(), 0);
    }

    #[test]
    fn a_granted_growth_that_fails_is_taken_back_and_recorded() {
        let mut l = limiter(1500, 1000);
        assert!(l.memory_growing(0, 500, None).unwrap());
        assert!(l.memory_growing(500, 800, None).unwrap());
        l.memory_grow_failed(wasmtime::format_err!("maximum"))
            .unwrap();
        assert_eq!(l.memory_used(), 500);
        assert!(l.memory_refused);
    }

    #[test]
    fn tables_are_a_total_with_a_per_table_ceiling() {
        let mut l = limiter(1000, 150);
        assert!(l.table_growing(0, 100, None).unwrap());
        assert!(!l.table_growing(0, 60, None).unwrap(), "total 160 > 150");
        assert!(l.table_refused);
        l.reset_hints();
        assert!(!l.table_growing(100, 101, None).unwrap(), "ceiling 100");
        assert!(l.table_refused);
        assert!(l.table_growing(0, 50, None).unwrap());
        l.table_grow_failed(wasmtime::format_err!("maximum"))
            .unwrap();
        assert!(
            l.table_growing(0, 50, None).unwrap(),
            "the failed 50 came back"
        );
    }

    #[test]
    fn a_deadline_past_a_century_is_refused() {
        let endless = AgentLimits {
            deadline: Duration::MAX,
            ..AgentLimits::default()
        };
        assert!(
            endless
                .validate()
                .unwrap_err()
                .starts_with("deadline must be at most")
        );
        let longest = AgentLimits {
            deadline: MAX_DEADLINE,
            ..AgentLimits::default()
        };
        assert_eq!(longest.validate(), Ok(()));
    }

    #[test]
    fn state_budget_defaults_to_the_memory_limit() {
        let limits = AgentLimits {
            memory_bytes: 4 << 20,
            ..AgentLimits::default()
        };
        assert_eq!(limits.state_budget(), 4 << 20);
        let limits = AgentLimits {
            state_bytes: Some(1000),
            ..limits
        };
        assert_eq!(limits.state_budget(), 1000);
    }
}
