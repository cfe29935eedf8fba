//! Per-agent resource limits and the store's resource limiter.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The limits one agent instance runs under. Every instance gets its own
/// store, so these are enforced per agent: a fault in one never consumes
/// another's budget.
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
    /// Maximum linear memory, in bytes, of each memory of the instance.
    pub memory_bytes: usize,
    /// Maximum elements of each table.
    pub table_elements: usize,
    /// Maximum core and component instances created in the agent's store.
    pub instances: usize,
    /// Wall-clock deadline of each call into the agent, instantiation
    /// included.
    #[serde(with = "crate::runtime::duration_ms")]
    pub deadline: Duration,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            fuel_per_call: Some(1_000_000_000),
            fuel_per_lifetime: None,
            memory_bytes: 64 << 20,
            table_elements: 100_000,
            instances: 64,
            deadline: Duration::from_secs(5),
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
        Ok(())
    }
}

/// The resource limiter installed in each agent's store. It refuses growth
/// past the agent's limits and records the refusal, so that the trap a guest
/// raises after a refused allocation can be reported as a limit fault.
#[derive(Debug)]
pub(crate) struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    instances: usize,
    /// A memory growth was refused since the last [`Limiter::reset_hints`].
    pub memory_refused: bool,
    /// A table growth was refused since the last [`Limiter::reset_hints`].
    pub table_refused: bool,
}

impl Limiter {
    pub fn new(limits: &AgentLimits) -> Self {
        Self {
            memory_bytes: limits.memory_bytes,
            table_elements: limits.table_elements,
            instances: limits.instances,
            memory_refused: false,
            table_refused: false,
        }
    }

    pub fn reset_hints(&mut self) {
        self.memory_refused = false;
        self.table_refused = false;
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_bytes;
        self.memory_refused |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.table_elements;
        self.table_refused |= !ok;
        Ok(ok)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn memories(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.instances.saturating_mul(4)
    }
}
