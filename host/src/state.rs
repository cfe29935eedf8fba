//! Per-agent key/value state that survives restarts.
//!
//! Agents reach it through the WIT `state` interface. Keys are namespaced by
//! the agent's id, which is stable across restarts of the same child, so a
//! restarted instance reads what its predecessor wrote and no agent can read
//! another's keys. An agent's state is kept across its restarts and cleared
//! when its spec leaves the tree for good (a temporary child that exited,
//! `delete_child`).
//!
//! Bounds, so that a hostile agent cannot make the host hold more than it
//! was granted: each agent has a byte budget (its
//! [`AgentLimits::state_budget`](crate::AgentLimits::state_budget)), every
//! entry costs its key and value plus [`ENTRY_OVERHEAD`] bytes, and a store
//! has a host-wide cap ([`StateQuota::max_total_bytes`]).

use std::collections::HashMap;
use std::sync::Mutex;

/// What one stored entry costs beyond its key and value bytes: the
/// bookkeeping of a map entry, so that a million empty values are not free.
pub const ENTRY_OVERHEAD: usize = 64;

/// What an entry of `key` and `value` costs against a budget.
pub fn entry_cost(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

/// Bounds of a state store, besides each agent's own byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateQuota {
    /// Maximum number of keys per agent.
    pub max_keys: usize,
    /// Maximum length of a key, in bytes.
    pub max_key_bytes: usize,
    /// Maximum size of one value, in bytes.
    pub max_value_bytes: usize,
    /// Maximum bytes (as [`entry_cost`] counts them) of all agents together.
    pub max_total_bytes: usize,
}

impl Default for StateQuota {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            max_key_bytes: 256,
            max_value_bytes: 1 << 20,
            max_total_bytes: 1 << 30,
        }
    }
}

/// A refused write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The key is longer than the quota allows.
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLong {
        /// The key's length.
        len: usize,
        /// The quota.
        max: usize,
    },
    /// The value is larger than the quota allows.
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
        /// The quota.
        max: usize,
    },
    /// The agent already holds as many keys as it may.
    #[error("agent already holds the maximum of {max} keys")]
    TooManyKeys {
        /// The quota.
        max: usize,
    },
    /// The write would take the agent past its byte budget.
    #[error("agent state would grow to {would_be} bytes, over its budget of {budget}")]
    OverBudget {
        /// The agent's state size after the write (entry costs included).
        would_be: usize,
        /// The agent's budget.
        budget: usize,
    },
    /// The write would take the whole store past its host-wide cap.
    #[error("the host's state store is full ({max} bytes for all agents)")]
    StoreFull {
        /// The host-wide cap.
        max: usize,
    },
    /// The backing store failed.
    #[error("state backend failed: {0}")]
    Backend(String),
}

/// Where agents' state lives. Implementations must be cheap to call from a
/// host import (no `.await`, no blocking I/O: they run inside a WASM call).
pub trait StateStore: Send + Sync + 'static {
    /// The value of `key` for `agent`.
    fn get(&self, agent: &str, key: &str) -> Option<Vec<u8>>;
    /// Store `value` under `key` for `agent`, if the agent's state stays
    /// within `budget` bytes (as [`entry_cost`] counts them) and the store
    /// within its own bounds. Nothing changes on error.
    fn put(&self, agent: &str, key: &str, value: Vec<u8>, budget: usize) -> Result<(), StateError>;
    /// Remove `key` for `agent`; whether it was there.
    fn delete(&self, agent: &str, key: &str) -> bool;
    /// Remove everything `agent` stored (when its spec is removed).
    fn clear(&self, agent: &str);
    /// The bytes `agent` holds, as [`entry_cost`] counts them.
    fn bytes_used(&self, agent: &str) -> usize;
}

/// One agent's entries and their total cost.
#[derive(Debug, Default)]
struct AgentState {
    entries: HashMap<String, Vec<u8>>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Agents {
    by_id: HashMap<String, AgentState>,
    /// Sum of every agent's `bytes`.
    total: usize,
}

/// The in-memory state store: survives restarts of agents, not of the host.
///
/// Invariant: each agent's `bytes` is the sum of its entries' costs, and
/// `total` the sum over agents; neither ever exceeds its bound.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    quota: StateQuota,
    agents: Mutex<Agents>,
}

impl MemoryStateStore {
    /// An empty store with the given quota.
    pub fn with_quota(quota: StateQuota) -> Self {
        Self {
            quota,
            agents: Mutex::default(),
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, Agents> {
        // Every update below checks first and then changes the maps and
        // counters without any call that can panic in between, so a poisoned
        // lock still guards consistent data.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StateStore for MemoryStateStore {
    fn get(&self, agent: &str, key: &str) -> Option<Vec<u8>> {
        self.agents().by_id.get(agent)?.entries.get(key).cloned()
    }

    fn put(&self, agent: &str, key: &str, value: Vec<u8>, budget: usize) -> Result<(), StateError> {
        let q = self.quota;
        if key.len() > q.max_key_bytes {
            return Err(StateError::KeyTooLong {
                len: key.len(),
                max: q.max_key_bytes,
            });
        }
        if value.len() > q.max_value_bytes {
            return Err(StateError::ValueTooLarge {
                len: value.len(),
                max: q.max_value_bytes,
            });
        }
        let mut agents = self.agents();
        let Agents { by_id, total } = &mut *agents;
        let state = by_id.get(agent);
        let old = state.and_then(|s| s.entries.get(key));
        let keys = state.map_or(0, |s| s.entries.len());
        if old.is_none() && keys >= q.max_keys {
            return Err(StateError::TooManyKeys { max: q.max_keys });
        }
        let freed = old.map_or(0, |v| entry_cost(key, v));
        let cost = entry_cost(key, &value);
        let would_be = state.map_or(0, |s| s.bytes) - freed + cost;
        if would_be > budget {
            return Err(StateError::OverBudget { would_be, budget });
        }
        if *total - freed + cost > q.max_total_bytes {
            return Err(StateError::StoreFull {
                max: q.max_total_bytes,
            });
        }
        let state = by_id.entry(agent.to_owned()).or_default();
        state.entries.insert(key.to_owned(), value);
        state.bytes = would_be;
        *total = *total - freed + cost;
        Ok(())
    }

    fn delete(&self, agent: &str, key: &str) -> bool {
        let mut agents = self.agents();
        let Agents { by_id, total } = &mut *agents;
        let Some(state) = by_id.get_mut(agent) else {
            return false;
        };
        let Some(value) = state.entries.remove(key) else {
            return false;
        };
        let cost = entry_cost(key, &value);
        state.bytes -= cost;
        *total -= cost;
        if state.entries.is_empty() {
            by_id.remove(agent);
        }
        true
    }

    fn clear(&self, agent: &str) {
        let mut agents = self.agents();
        if let Some(state) = agents.by_id.remove(agent) {
            agents.total -= state.bytes;
        }
    }

    fn bytes_used(&self, agent: &str) -> usize {
        self.agents().by_id.get(agent).map_or(0, |s| s.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = usize::MAX;

    #[test]
    fn keys_are_private_per_agent() {
        let s = MemoryStateStore::default();
        s.put("a", "k", b"1".to_vec(), BIG).unwrap();
        assert_eq!(s.get("a", "k"), Some(b"1".to_vec()));
        assert_eq!(s.get("b", "k"), None);
        assert!(!s.delete("b", "k"));
        assert!(s.delete("a", "k"));
        assert_eq!(s.get("a", "k"), None);
    }

    #[test]
    fn quota_refuses_without_changing_anything() {
        let s = MemoryStateStore::with_quota(StateQuota {
            max_keys: 1,
            max_key_bytes: 3,
            max_value_bytes: 2,
            ..StateQuota::default()
        });
        s.put("a", "k", b"12".to_vec(), BIG).unwrap();
        assert_eq!(
            s.put("a", "k2", b"1".to_vec(), BIG),
            Err(StateError::TooManyKeys { max: 1 })
        );
        assert_eq!(
            s.put("a", "k", b"123".to_vec(), BIG),
            Err(StateError::ValueTooLarge { len: 3, max: 2 })
        );
        assert_eq!(
            s.put("a", "long", b"1".to_vec(), BIG),
            Err(StateError::KeyTooLong { len: 4, max: 3 })
        );
        // Overwriting an existing key is allowed at the key limit.
        s.put("a", "k", b"34".to_vec(), BIG).unwrap();
        assert_eq!(s.get("a", "k"), Some(b"34".to_vec()));
        s.clear("a");
        assert_eq!(s.get("a", "k"), None);
    }

    #[test]
    fn the_byte_budget_counts_keys_values_and_overhead() {
        let s = MemoryStateStore::default();
        let budget = 2 * (1 + 10 + ENTRY_OVERHEAD);
        s.put("a", "x", vec![0; 10], budget).unwrap();
        s.put("a", "y", vec![0; 10], budget).unwrap();
        assert_eq!(s.bytes_used("a"), budget);
        assert_eq!(
            s.put("a", "z", Vec::new(), budget),
            Err(StateError::OverBudget {
                would_be: budget + 1 + ENTRY_OVERHEAD,
                budget
            })
        );
        // Replacing a value counts the new size, not both.
        s.put("a", "y", vec![0; 4], budget).unwrap();
        assert_eq!(s.bytes_used("a"), budget - 6);
        assert_eq!(
            s.put("a", "y", vec![0; 17], budget),
            Err(StateError::OverBudget {
                would_be: budget + 7,
                budget
            })
        );
        assert!(s.delete("a", "x"));
        assert_eq!(s.bytes_used("a"), 1 + 4 + ENTRY_OVERHEAD);
        s.clear("a");
        assert_eq!(s.bytes_used("a"), 0);
    }

    #[test]
    fn the_host_wide_cap_holds_across_agents_and_frees_on_clear() {
        let entry = 1 + 100 + ENTRY_OVERHEAD;
        let s = MemoryStateStore::with_quota(StateQuota {
            max_total_bytes: 2 * entry,
            ..StateQuota::default()
        });
        s.put("a", "k", vec![0; 100], BIG).unwrap();
        s.put("b", "k", vec![0; 100], BIG).unwrap();
        assert_eq!(
            s.put("c", "k", vec![0; 100], BIG),
            Err(StateError::StoreFull { max: 2 * entry })
        );
        assert_eq!(s.get("c", "k"), None);
        s.clear("a");
        s.put("c", "k", vec![0; 100], BIG).unwrap();
        assert!(s.delete("b", "k"));
        s.put("d", "k", vec![0; 100], BIG).unwrap();
    }
}
