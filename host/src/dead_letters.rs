//! The dead-letter store: messages quarantined because they crashed their
//! agent `poison_threshold` times in a row, each with the crash reports of
//! those crashes.
//!
//! Dead letters live in a [`StateStore`] under a namespace of their own per
//! agent (`dead-letters/<agent id>`), so they are as durable as agents'
//! state: with the redb store they outlive the host. Each agent keeps at
//! most [`MAX_LETTERS`] (the oldest is dropped for a new one) and at most
//! [`BUDGET`] bytes of them.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::AgentPid;
use crate::runtime::CrashReport;
use crate::state::{StateError, StateStore};

/// Most dead letters kept per agent.
pub const MAX_LETTERS: usize = 32;
/// Most bytes of dead letters kept per agent (as the store counts them).
pub const BUDGET: usize = 8 << 20;

const INDEX: &str = "index";

/// A quarantined message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its content hash (FNV-1a, hex): how it is named.
    pub hash: String,
    /// The agent it crashed.
    pub agent: AgentPid,
    /// When it was quarantined.
    pub at: DateTime<Utc>,
    /// The message, whole (it can be replayed).
    pub message: String,
    /// The reports of the crashes that got it quarantined, oldest first.
    pub crashes: Vec<CrashReport>,
}

/// The dead letters of every agent of a tree, in a state store. Cheap to
/// clone. Calls to a store that may block run off the runtime's workers.
#[derive(Clone)]
pub struct DeadLetters {
    store: Arc<dyn StateStore>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish_non_exhaustive()
    }
}

fn namespace(agent: &AgentPid) -> String {
    format!("dead-letters/{agent}")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StateError::Backend(format!("a dead letter is not readable: {e}")))
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(value)
        .map_err(|e| StateError::Backend(format!("a dead letter cannot be written: {e}")))
}

impl DeadLetters {
    /// Dead letters kept in `store`.
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store }
    }

    /// Run `f` on the store, off the runtime's workers if it may block.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let store = self.store.clone();
        if !store.blocks() {
            return f(&*store);
        }
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| StateError::Backend(format!("the dead-letter store failed: {e}")))?
    }

    /// Keep `letter` (replacing one of the same hash; dropping the agent's
    /// oldest beyond [`MAX_LETTERS`]).
    pub async fn put(&self, letter: DeadLetter) -> Result<(), StateError> {
        self.with(move |store| {
            let ns = namespace(&letter.agent);
            let mut index: Vec<String> = match store.get(&ns, INDEX)? {
                Some(bytes) => decode(&bytes)?,
                None => Vec::new(),
            };
            index.retain(|h| *h != letter.hash);
            while index.len() >= MAX_LETTERS {
                let oldest = index.remove(0);
                store.delete(&ns, &oldest)?;
            }
            store.put(&ns, &letter.hash, encode(&letter)?, BUDGET)?;
            index.push(letter.hash.clone());
            store.put(&ns, INDEX, encode(&index)?, BUDGET)
        })
        .await
    }

    /// The dead letters of `agent`, oldest first.
    pub async fn list(&self, agent: &AgentPid) -> Result<Vec<DeadLetter>, StateError> {
        let ns = namespace(agent);
        self.with(move |store| {
            let index: Vec<String> = match store.get(&ns, INDEX)? {
                Some(bytes) => decode(&bytes)?,
                None => return Ok(Vec::new()),
            };
            let mut letters = Vec::with_capacity(index.len());
            for hash in index {
                if let Some(bytes) = store.get(&ns, &hash)? {
                    letters.push(decode(&bytes)?);
                }
            }
            Ok(letters)
        })
        .await
    }

    /// The content hashes quarantined for `agent`.
    pub async fn hashes(&self, agent: &AgentPid) -> Result<HashSet<u64>, StateError> {
        let ns = namespace(agent);
        self.with(move |store| {
            let index: Vec<String> = match store.get(&ns, INDEX)? {
                Some(bytes) => decode(&bytes)?,
                None => return Ok(HashSet::new()),
            };
            Ok(index
                .iter()
                .filter_map(|h| u64::from_str_radix(h, 16).ok())
                .collect())
        })
        .await
    }

    /// Remove and return the dead letter `hash` of `agent`.
    pub async fn take(
        &self,
        agent: &AgentPid,
        hash: &str,
    ) -> Result<Option<DeadLetter>, StateError> {
        let ns = namespace(agent);
        let hash = hash.to_owned();
        self.with(move |store| {
            let Some(bytes) = store.get(&ns, &hash)? else {
                return Ok(None);
            };
            let letter: DeadLetter = decode(&bytes)?;
            let mut index: Vec<String> = match store.get(&ns, INDEX)? {
                Some(bytes) => decode(&bytes)?,
                None => Vec::new(),
            };
            index.retain(|h| *h != hash);
            store.put(&ns, INDEX, encode(&index)?, BUDGET)?;
            store.delete(&ns, &hash)?;
            Ok(Some(letter))
        })
        .await
    }

    /// Forget every dead letter of `agent` (its spec left the tree).
    pub async fn clear(&self, agent: &AgentPid) -> Result<(), StateError> {
        let ns = namespace(agent);
        self.with(move |store| store.clear(&ns)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStateStore;

    fn letter(agent: &AgentPid, hash: &str) -> DeadLetter {
        DeadLetter {
            hash: hash.into(),
            agent: agent.clone(),
            at: Utc::now(),
            message: format!("message {hash}"),
            crashes: vec![CrashReport::default()],
        }
    }

    #[tokio::test]
    async fn letters_are_kept_listed_and_taken_per_agent() {
        let letters = DeadLetters::new(Arc::new(MemoryStateStore::default()));
        let (a, b) = (AgentPid::new(), AgentPid::new());
        letters.put(letter(&a, "00000000000000aa")).await.unwrap();
        letters.put(letter(&a, "00000000000000bb")).await.unwrap();
        letters.put(letter(&b, "00000000000000cc")).await.unwrap();
        let listed: Vec<String> = letters
            .list(&a)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.hash)
            .collect();
        assert_eq!(listed, ["00000000000000aa", "00000000000000bb"]);
        assert_eq!(
            letters.hashes(&a).await.unwrap(),
            HashSet::from([0xaa, 0xbb])
        );
        let taken = letters.take(&a, "00000000000000aa").await.unwrap();
        assert_eq!(
            taken.map(|l| l.message),
            Some("message 00000000000000aa".into())
        );
        assert_eq!(letters.take(&a, "00000000000000aa").await.unwrap(), None);
        assert_eq!(letters.list(&a).await.unwrap().len(), 1);
        assert_eq!(letters.list(&b).await.unwrap().len(), 1);
        letters.clear(&a).await.unwrap();
        assert!(letters.list(&a).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_oldest_letter_makes_room() {
        let letters = DeadLetters::new(Arc::new(MemoryStateStore::default()));
        let a = AgentPid::new();
        for i in 0..MAX_LETTERS + 2 {
            letters.put(letter(&a, &format!("{i:016x}"))).await.unwrap();
        }
        let listed = letters.list(&a).await.unwrap();
        assert_eq!(listed.len(), MAX_LETTERS);
        assert_eq!(listed[0].hash, format!("{:016x}", 2));
    }
}
