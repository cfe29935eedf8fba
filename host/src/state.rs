//! Per-agent key/value state that survives restarts.
//!
//! Agents reach it through the WIT `state` interface. Keys are namespaced by
//! the agent's id, which is stable across restarts of the same child, so a
//! restarted instance reads what its predecessor wrote and no agent can read
//! another's keys. An agent's state is kept across its restarts and cleared
//! when its spec leaves the tree for good (a temporary child that exited,
//! `delete_child`).
//!
//! Two stores implement [`StateStore`]: [`MemoryStateStore`], the library's
//! default, which lives as long as the host process, and
//! [`RedbStateStore`], one file on disk whose writes are durable when they
//! return, so that state survives the host too (a crash or SIGKILL
//! included). Another store (a networked one) can be added behind the same
//! trait.
//!
//! Bounds, so that a hostile agent cannot make the host hold more than it
//! was granted: each agent has a byte budget (its
//! [`AgentLimits::state_budget`](crate::AgentLimits::state_budget)), every
//! entry costs its key and value plus [`ENTRY_OVERHEAD`] bytes, and a store
//! has a host-wide cap ([`StateQuota::max_total_bytes`]). Every store
//! applies them the same way, with the same errors.

mod redb_store;

use std::collections::HashMap;
use std::sync::Mutex;

pub use redb_store::{OpenStateError, RedbStateStore};

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

/// Where agents' state lives.
///
/// A store may block (a durable store syncs to disk before `put` returns):
/// it says so through [`blocks`](Self::blocks), and the host then calls it
/// off the async runtime's workers (`spawn_blocking`), bounded by the
/// calling agent's deadline. A store that never blocks is called inline.
///
/// A store error other than a refused write is [`StateError::Backend`]. The
/// host hands a failed `put` to the guest as its error string; a failed
/// `get` or `delete` traps the guest (its WIT signature has no error), so
/// that an agent never mistakes an unreadable value for a missing one.
pub trait StateStore: Send + Sync + 'static {
    /// The value of `key` for `agent`.
    fn get(&self, agent: &str, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// Store `value` under `key` for `agent`, if the agent's state stays
    /// within `budget` bytes (as [`entry_cost`] counts them) and the store
    /// within its own bounds. Nothing changes on error. A durable store has
    /// made the write durable when this returns `Ok`.
    fn put(&self, agent: &str, key: &str, value: Vec<u8>, budget: usize) -> Result<(), StateError>;
    /// Remove `key` for `agent`; whether it was there.
    fn delete(&self, agent: &str, key: &str) -> Result<bool, StateError>;
    /// Remove everything `agent` stored (when its spec is removed).
    fn clear(&self, agent: &str) -> Result<(), StateError>;
    /// The bytes `agent` holds, as [`entry_cost`] counts them.
    fn bytes_used(&self, agent: &str) -> usize;
    /// Whether calls may block the calling thread (disk I/O, a network
    /// round trip). `true` unless the store says otherwise: the host then
    /// keeps them off the async runtime's workers.
    fn blocks(&self) -> bool {
        true
    }
}

/// What one agent holds, as the quotas count it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// The sum of its entries' [`entry_cost`]s.
    pub bytes: usize,
    /// How many keys it holds.
    pub keys: usize,
}

/// Refuse a key or a value larger than `quota` allows, before any work.
pub(crate) fn check_sizes(
    quota: &StateQuota,
    key: &str,
    value_len: usize,
) -> Result<(), StateError> {
    if key.len() > quota.max_key_bytes {
        return Err(StateError::KeyTooLong {
            len: key.len(),
            max: quota.max_key_bytes,
        });
    }
    if value_len > quota.max_value_bytes {
        return Err(StateError::ValueTooLarge {
            len: value_len,
            max: quota.max_value_bytes,
        });
    }
    Ok(())
}

/// Whether an agent that holds `used`, in a store that holds `total`, may
/// store a value of `value_len` bytes under `key`, replacing one of
/// `old_len` bytes if the key is there. The agent's bytes and the store's
/// total after the write, or why it is refused. Every store applies the
/// quotas through this, so that they refuse the same writes the same way.
pub(crate) fn admit(
    quota: &StateQuota,
    key: &str,
    value_len: usize,
    old_len: Option<usize>,
    used: Usage,
    total: usize,
    budget: usize,
) -> Result<(usize, usize), StateError> {
    if old_len.is_none() && used.keys >= quota.max_keys {
        return Err(StateError::TooManyKeys {
            max: quota.max_keys,
        });
    }
    let cost = |len: usize| key.len().saturating_add(len).saturating_add(ENTRY_OVERHEAD);
    let freed = old_len.map_or(0, cost);
    let added = cost(value_len);
    let would_be = used.bytes.saturating_sub(freed).saturating_add(added);
    if would_be > budget {
        return Err(StateError::OverBudget { would_be, budget });
    }
    let new_total = total.saturating_sub(freed).saturating_add(added);
    if new_total > quota.max_total_bytes {
        return Err(StateError::StoreFull {
            max: quota.max_total_bytes,
        });
    }
    Ok((would_be, new_total))
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
    fn get(&self, agent: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let agents = self.agents();
        Ok(agents
            .by_id
            .get(agent)
            .and_then(|s| s.entries.get(key).cloned()))
    }

    fn put(&self, agent: &str, key: &str, value: Vec<u8>, budget: usize) -> Result<(), StateError> {
        check_sizes(&self.quota, key, value.len())?;
        let mut agents = self.agents();
        let Agents { by_id, total } = &mut *agents;
        let state = by_id.get(agent);
        let used = state.map_or(Usage::default(), |s| Usage {
            bytes: s.bytes,
            keys: s.entries.len(),
        });
        let old = state.and_then(|s| s.entries.get(key)).map(Vec::len);
        let (bytes, new_total) = admit(&self.quota, key, value.len(), old, used, *total, budget)?;
        let state = by_id.entry(agent.to_owned()).or_default();
        state.entries.insert(key.to_owned(), value);
        state.bytes = bytes;
        *total = new_total;
        Ok(())
    }

    fn delete(&self, agent: &str, key: &str) -> Result<bool, StateError> {
        let mut agents = self.agents();
        let Agents { by_id, total } = &mut *agents;
        let Some(state) = by_id.get_mut(agent) else {
            return Ok(false);
        };
        let Some(value) = state.entries.remove(key) else {
            return Ok(false);
        };
        let cost = entry_cost(key, &value);
        state.bytes -= cost;
        *total -= cost;
        if state.entries.is_empty() {
            by_id.remove(agent);
        }
        Ok(true)
    }

    fn clear(&self, agent: &str) -> Result<(), StateError> {
        let mut agents = self.agents();
        if let Some(state) = agents.by_id.remove(agent) {
            agents.total -= state.bytes;
        }
        Ok(())
    }

    fn bytes_used(&self, agent: &str) -> usize {
        self.agents().by_id.get(agent).map_or(0, |s| s.bytes)
    }

    /// Never: a map behind a mutex held for a few map operations.
    fn blocks(&self) -> bool {
        false
    }
}

/// What every [`StateStore`] must do, run against each store by its tests.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    const BIG: usize = usize::MAX;

    /// Every check below, on stores made by `store` (from a quota).
    pub fn all(store: impl Fn(StateQuota) -> Box<dyn StateStore>) {
        keys_are_private_per_agent(&*store(StateQuota::default()));
        quota_refuses_without_changing_anything(&*store(StateQuota {
            max_keys: 1,
            max_key_bytes: 3,
            max_value_bytes: 2,
            ..StateQuota::default()
        }));
        the_byte_budget_counts_keys_values_and_overhead(&*store(StateQuota::default()));
        let entry = 1 + 100 + ENTRY_OVERHEAD;
        the_host_wide_cap_holds_across_agents_and_frees_on_clear(&*store(StateQuota {
            max_total_bytes: 2 * entry,
            ..StateQuota::default()
        }));
        clear_takes_exactly_the_agents_keys(&*store(StateQuota::default()));
    }

    fn keys_are_private_per_agent(s: &dyn StateStore) {
        s.put("a", "k", b"1".to_vec(), BIG).unwrap();
        assert_eq!(s.get("a", "k").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get("b", "k").unwrap(), None);
        assert!(!s.delete("b", "k").unwrap());
        assert!(s.delete("a", "k").unwrap());
        assert_eq!(s.get("a", "k").unwrap(), None);
    }

    /// On a store of at most 1 key of 3 bytes and values of 2 bytes.
    fn quota_refuses_without_changing_anything(s: &dyn StateStore) {
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
        assert_eq!(s.get("a", "k").unwrap(), Some(b"12".to_vec()), "unchanged");
        assert_eq!(s.bytes_used("a"), entry_cost("k", b"12"));
        // Overwriting an existing key is allowed at the key limit.
        s.put("a", "k", b"34".to_vec(), BIG).unwrap();
        assert_eq!(s.get("a", "k").unwrap(), Some(b"34".to_vec()));
        s.clear("a").unwrap();
        assert_eq!(s.get("a", "k").unwrap(), None);
    }

    fn the_byte_budget_counts_keys_values_and_overhead(s: &dyn StateStore) {
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
        assert!(s.delete("a", "x").unwrap());
        assert_eq!(s.bytes_used("a"), 1 + 4 + ENTRY_OVERHEAD);
        s.clear("a").unwrap();
        assert_eq!(s.bytes_used("a"), 0);
    }

    /// On a store capped at two entries of a 1-byte key and 100 bytes.
    fn the_host_wide_cap_holds_across_agents_and_frees_on_clear(s: &dyn StateStore) {
        let entry = 1 + 100 + ENTRY_OVERHEAD;
        s.put("a", "k", vec![0; 100], BIG).unwrap();
        s.put("b", "k", vec![0; 100], BIG).unwrap();
        assert_eq!(
            s.put("c", "k", vec![0; 100], BIG),
            Err(StateError::StoreFull { max: 2 * entry })
        );
        assert_eq!(s.get("c", "k").unwrap(), None);
        s.clear("a").unwrap();
        s.put("c", "k", vec![0; 100], BIG).unwrap();
        assert!(s.delete("b", "k").unwrap());
        s.put("d", "k", vec![0; 100], BIG).unwrap();
    }

    /// An agent whose id starts another's, or is another's plus more, keeps
    /// its keys when the other is cleared.
    fn clear_takes_exactly_the_agents_keys(s: &dyn StateStore) {
        for agent in ["a", "ab", "a\0", "b", ""] {
            s.put(agent, "k", agent.as_bytes().to_vec(), BIG).unwrap();
            s.put(agent, "", b"empty key".to_vec(), BIG).unwrap();
        }
        s.clear("a").unwrap();
        assert_eq!(s.get("a", "k").unwrap(), None);
        assert_eq!(s.get("a", "").unwrap(), None);
        assert_eq!(s.bytes_used("a"), 0);
        for agent in ["ab", "a\0", "b", ""] {
            assert_eq!(s.get(agent, "k").unwrap(), Some(agent.as_bytes().to_vec()));
            assert_eq!(
                s.bytes_used(agent),
                entry_cost("k", agent.as_bytes()) + entry_cost("", b"empty key")
            );
        }
        s.clear("nobody").unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_store_keeps_the_contract() {
        contract::all(|quota| Box::new(MemoryStateStore::with_quota(quota)));
    }

    #[test]
    fn the_memory_store_never_blocks() {
        assert!(!MemoryStateStore::default().blocks());
    }
}
