//! The agents' state in cluster mode: a JetStream key/value bucket per tree
//! (`ah-<tree>-state`), authoritative, so that a unit taken over by another
//! host sees its agents' last committed state.
//!
//! Writes are fenced twice: an agent of a unit whose lease this host does
//! not hold (its [`UnitGate`](super::UnitGate) is closed) cannot write at
//! all, and every write is a compare-and-set on the revision this host last
//! read or wrote for that key, so that a write from a stale incarnation
//! that passed the gate just before it closed (a paused process) cannot
//! overwrite what a newer incarnation wrote.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use tokio::runtime::Handle;

use super::{Gates, token};
use crate::state::{StateError, StateQuota, Usage, admit, check_sizes};
use crate::{AgentPid, ChildSpec, StateStore};

/// What this host knows of one key.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// The revision last read or written (of a delete marker: the
    /// marker's; 0: the key never existed).
    revision: u64,
    /// The value's length, if the key holds one.
    len: Option<usize>,
}

#[derive(Debug, Default)]
struct Cache {
    /// By bucket key.
    keys: HashMap<String, Known>,
    /// What each agent holds, as far as this host has seen it.
    usage: HashMap<String, Usage>,
    total: usize,
    /// The unit of each agent id registered (its gate fences its writes).
    units: HashMap<String, String>,
}

/// A [`StateStore`] in a JetStream key/value bucket. Its calls block on
/// network round trips: the host makes them off the async runtime's
/// workers, as for any store that [`blocks`](StateStore::blocks).
///
/// Limits: the byte and key quotas count what this host has read or written
/// (a host that takes a unit over counts its agents' keys as they are
/// read); [`clear`](StateStore::clear) keeps the values (a unit handed over
/// is removed from one host's tree but lives on elsewhere).
pub struct KvStateStore {
    store: kv::Store,
    runtime: Handle,
    gates: Arc<Mutex<Gates>>,
    quota: StateQuota,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for KvStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStateStore").finish_non_exhaustive()
    }
}

fn backend(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Backend(format!("the cluster's state bucket: {what}: {e}"))
}

impl KvStateStore {
    pub(crate) fn new(
        store: kv::Store,
        runtime: Handle,
        gates: Arc<Mutex<Gates>>,
        quota: StateQuota,
    ) -> Self {
        Self {
            store,
            runtime,
            gates,
            quota,
            cache: Mutex::default(),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // Every update checks first and then changes plain maps.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fence the writes of `spec`'s agents (the unit `unit` and everything
    /// below it) by the unit's lease.
    pub(crate) fn register_spec(&self, unit: &str, spec: &ChildSpec) {
        let mut cache = self.cache();
        let mut stack = vec![spec];
        while let Some(spec) = stack.pop() {
            cache.units.insert(spec.id().to_string(), unit.to_owned());
            dead_letters_too(&mut cache, spec.id(), unit);
            if let ChildSpec::Supervisor(s) = spec {
                stack.extend(s.children.iter());
            }
        }
    }

    /// Refuse a write for `agent` unless its unit's lease is held here.
    fn check_gate(&self, agent: &str) -> Result<(), StateError> {
        let unit = self.cache().units.get(agent).cloned();
        let Some(unit) = unit else {
            return Ok(());
        };
        let open = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .gate(&unit)
            .is_some_and(|g| g.is_open());
        if open {
            Ok(())
        } else {
            Err(StateError::Backend(format!(
                "fenced: this host does not hold the lease of unit `{unit}`, so its agents cannot write"
            )))
        }
    }

    /// Read `key` from the bucket, remembering its revision.
    fn fetch(&self, bucket_key: &str) -> Result<(Option<Vec<u8>>, Known), StateError> {
        let entry = self
            .runtime
            .block_on(self.store.entry(bucket_key.to_owned()))
            .map_err(|e| backend("read", e))?;
        let (value, known) = match entry {
            None => (
                None,
                Known {
                    revision: 0,
                    len: None,
                },
            ),
            Some(entry) => match entry.operation {
                Operation::Put => {
                    let len = entry.value.len();
                    (
                        Some(entry.value.to_vec()),
                        Known {
                            revision: entry.revision,
                            len: Some(len),
                        },
                    )
                }
                Operation::Delete | Operation::Purge => (
                    None,
                    Known {
                        revision: entry.revision,
                        len: None,
                    },
                ),
            },
        };
        Ok((value, known))
    }

    /// Record what `agent` holds under `key` now.
    fn remember(&self, agent: &str, key: &str, bucket_key: &str, known: Known) {
        let mut cache = self.cache();
        let Cache {
            keys, usage, total, ..
        } = &mut *cache;
        let cost = |len: usize| crate::state::entry_cost(key, &[]).saturating_add(len);
        let old = keys.insert(bucket_key.to_owned(), known);
        let used = usage.entry(agent.to_owned()).or_default();
        if let Some(len) = old.and_then(|k| k.len) {
            used.bytes = used.bytes.saturating_sub(cost(len));
            used.keys = used.keys.saturating_sub(1);
            *total = total.saturating_sub(cost(len));
        }
        if let Some(len) = known.len {
            used.bytes = used.bytes.saturating_add(cost(len));
            used.keys += 1;
            *total = total.saturating_add(cost(len));
        }
    }

    /// Write `value` (or a delete marker) by compare-and-set on `known`.
    fn write(
        &self,
        bucket_key: &str,
        value: Option<&[u8]>,
        known: Known,
    ) -> Result<u64, Result<(), StateError>> {
        let result = match value {
            Some(value) => self.runtime.block_on(self.store.update(
                bucket_key,
                Bytes::copy_from_slice(value),
                known.revision,
            )),
            None => {
                return self
                    .runtime
                    .block_on(
                        self.store
                            .delete_expect_revision(bucket_key, Some(known.revision)),
                    )
                    // The marker's revision is not returned: unknown (0).
                    .map(|()| 0)
                    .map_err(|e| Err(backend("delete", e)));
            }
        };
        match result {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(Ok(())),
            Err(e) => Err(Err(backend("write", e))),
        }
    }

    /// Where `agent`'s `key` lives in the bucket.
    fn bucket_key(agent: &str, key: &str) -> String {
        format!("{}.{}", token(agent), token(key))
    }

    fn known(&self, agent: &str, key: &str, bucket_key: &str) -> Result<Known, StateError> {
        if let Some(known) = self.cache().keys.get(bucket_key).copied() {
            return Ok(known);
        }
        let (_, known) = self.fetch(bucket_key)?;
        self.remember(agent, key, bucket_key, known);
        Ok(known)
    }
}

/// The dead letters of an agent are kept under `dead-letters/<id>`: fenced
/// like the agent.
fn dead_letters_too(cache: &mut Cache, id: &AgentPid, unit: &str) {
    cache
        .units
        .insert(format!("dead-letters/{id}"), unit.to_owned());
}

impl StateStore for KvStateStore {
    fn get(&self, agent: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let bucket_key = Self::bucket_key(agent, key);
        let (value, known) = self.fetch(&bucket_key)?;
        self.remember(agent, key, &bucket_key, known);
        Ok(value)
    }

    fn put(&self, agent: &str, key: &str, value: Vec<u8>, budget: usize) -> Result<(), StateError> {
        check_sizes(&self.quota, key, value.len())?;
        self.check_gate(agent)?;
        let bucket_key = Self::bucket_key(agent, key);
        // Once more after a conflict, if the gate is still open: a conflict
        // from a newer incarnation closes the gate first (its lease write
        // comes before its agents' writes).
        for attempt in 0..2 {
            let known = self.known(agent, key, &bucket_key)?;
            {
                let cache = self.cache();
                let used = cache.usage.get(agent).copied().unwrap_or_default();
                admit(
                    &self.quota,
                    key,
                    value.len(),
                    known.len,
                    used,
                    cache.total,
                    budget,
                )?;
            }
            match self.write(&bucket_key, Some(&value), known) {
                Ok(revision) => {
                    self.remember(
                        agent,
                        key,
                        &bucket_key,
                        Known {
                            revision,
                            len: Some(value.len()),
                        },
                    );
                    return Ok(());
                }
                Err(Ok(())) if attempt == 0 => {
                    self.cache().keys.remove(&bucket_key);
                    self.check_gate(agent)?;
                }
                Err(Ok(())) => {
                    return Err(StateError::Backend(format!(
                        "`{key}` was changed by another incarnation of this agent; not written"
                    )));
                }
                Err(Err(e)) => return Err(e),
            }
        }
        Err(StateError::Backend(format!("`{key}`: not written")))
    }

    fn delete(&self, agent: &str, key: &str) -> Result<bool, StateError> {
        self.check_gate(agent)?;
        let bucket_key = Self::bucket_key(agent, key);
        let (value, known) = self.fetch(&bucket_key)?;
        if value.is_none() {
            self.remember(agent, key, &bucket_key, known);
            return Ok(false);
        }
        match self.write(&bucket_key, None, known) {
            Ok(_) => {
                self.remember(
                    agent,
                    key,
                    &bucket_key,
                    Known {
                        revision: 0,
                        len: None,
                    },
                );
                // The marker's revision is read again before the next write.
                self.cache().keys.remove(&bucket_key);
                Ok(true)
            }
            Err(Ok(())) => Err(StateError::Backend(format!(
                "`{key}` was changed by another incarnation of this agent; not deleted"
            ))),
            Err(Err(e)) => Err(e),
        }
    }

    /// Kept: in cluster mode a unit leaves a host's tree when it is handed
    /// over, and its agents' state must outlive that.
    fn clear(&self, _agent: &str) -> Result<(), StateError> {
        Ok(())
    }

    fn bytes_used(&self, agent: &str) -> usize {
        self.cache().usage.get(agent).map_or(0, |u| u.bytes)
    }
}
