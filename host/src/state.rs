//! Per-agent key/value state that survives restarts.
//!
//! Agents reach it through the WIT `state` interface. Keys are namespaced by
//! the agent's id, which is stable across restarts of the same child, so a
//! restarted instance reads what its predecessor wrote and no agent can read
//! another's keys. Quotas bound what a hostile agent can make the host hold.

use std::collections::HashMap;
use std::sync::Mutex;

/// Bounds on one agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateQuota {
    /// Maximum number of keys per agent.
    pub max_keys: usize,
    /// Maximum length of a key, in bytes.
    pub max_key_bytes: usize,
    /// Maximum size of one value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for StateQuota {
    fn default() -> Self {
        Self {
            max_keys: 1024,
            max_key_bytes: 256,
            max_value_bytes: 1 << 20,
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
    /// The backing store failed.
    #[error("state backend failed: {0}")]
    Backend(String),
}

/// Where agents' state lives. Implementations must be cheap to call from a
/// host import (no `.await`: they run inside a WASM call).
pub trait StateStore: Send + Sync + 'static {
    /// The value of `key` for `agent`.
    fn get(&self, agent: &str, key: &str) -> Option<Vec<u8>>;
    /// Store `value` under `key` for `agent`. Nothing changes on error.
    fn put(&self, agent: &str, key: &str, value: Vec<u8>) -> Result<(), StateError>;
    /// Remove `key` for `agent`; whether it was there.
    fn delete(&self, agent: &str, key: &str) -> bool;
    /// Remove everything `agent` stored (when its spec is deleted).
    fn clear(&self, agent: &str);
}

/// The in-memory state store: survives restarts of agents, not of the host.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    quota: StateQuota,
    agents: Mutex<HashMap<String, HashMap<String, Vec<u8>>>>,
}

impl MemoryStateStore {
    /// An empty store with the given quota.
    pub fn with_quota(quota: StateQuota) -> Self {
        Self {
            quota,
            agents: Mutex::default(),
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Vec<u8>>>> {
        // A panic while holding the lock cannot leave a map half-updated
        // (every update is a single insert or remove), so poisoning is benign.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StateStore for MemoryStateStore {
    fn get(&self, agent: &str, key: &str) -> Option<Vec<u8>> {
        self.agents().get(agent)?.get(key).cloned()
    }

    fn put(&self, agent: &str, key: &str, value: Vec<u8>) -> Result<(), StateError> {
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
        let keys = agents.entry(agent.to_owned()).or_default();
        if !keys.contains_key(key) && keys.len() >= q.max_keys {
            return Err(StateError::TooManyKeys { max: q.max_keys });
        }
        keys.insert(key.to_owned(), value);
        Ok(())
    }

    fn delete(&self, agent: &str, key: &str) -> bool {
        self.agents()
            .get_mut(agent)
            .is_some_and(|keys| keys.remove(key).is_some())
    }

    fn clear(&self, agent: &str) {
        self.agents().remove(agent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_per_agent() {
        let s = MemoryStateStore::default();
        s.put("a", "k", b"1".to_vec()).unwrap();
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
        });
        s.put("a", "k", b"12".to_vec()).unwrap();
        assert_eq!(
            s.put("a", "k2", b"1".to_vec()),
            Err(StateError::TooManyKeys { max: 1 })
        );
        assert_eq!(
            s.put("a", "k", b"123".to_vec()),
            Err(StateError::ValueTooLarge { len: 3, max: 2 })
        );
        assert_eq!(
            s.put("a", "long", b"1".to_vec()),
            Err(StateError::KeyTooLong { len: 4, max: 3 })
        );
        // Overwriting an existing key is allowed at the key limit.
        s.put("a", "k", b"34".to_vec()).unwrap();
        assert_eq!(s.get("a", "k"), Some(b"34".to_vec()));
        s.clear("a");
        assert_eq!(s.get("a", "k"), None);
    }
}
