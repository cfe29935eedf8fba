//! The cluster's shared restart history: every takeover of a unit (a unit
//! restarted on another host because its host was lost) in a key/value
//! bucket (`ah-<tree>-history`, key `entries`), written by compare-and-set.
//! Takeovers count against the root supervisor's restart intensity, one
//! lost host once however many units it ran; when the count exceeds it,
//! the root gives up on every host (the key `halt` of the leases bucket).

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::RestartIntensity;

/// The longest history kept (oldest dropped first).
pub const MAX_ENTRIES: usize = 256;

/// The key of the history's entries.
pub(crate) const ENTRIES_KEY: &str = "entries";

/// The key, in the leases bucket, that stops the tree on every host.
pub(crate) const HALT_KEY: &str = "halt";

/// One takeover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When (milliseconds since the Unix epoch, the recording host's clock).
    pub at_ms: u64,
    /// The unit taken over.
    pub unit: String,
    /// The host that was lost.
    pub lost_host: String,
    /// That host's session (one run of `agent-host`): a lost host is one
    /// restart, however many units it ran.
    pub lost_session: String,
    /// The host that took the unit over.
    pub by_host: String,
    /// The new incarnation.
    pub incarnation: String,
    /// Whether this entry counts against the root's intensity (the first
    /// entry of its lost session).
    pub counted: bool,
}

/// Why the history could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The bucket failed or kept changing.
    #[error("the restart history could not be written: {0}")]
    Write(String),
    /// The history is not readable JSON.
    #[error("the restart history is unreadable: {0}")]
    Corrupt(String),
}

/// Read the history.
pub(crate) async fn read(store: &kv::Store) -> Result<(Vec<HistoryEntry>, u64), HistoryError> {
    match store.entry(ENTRIES_KEY).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            let entries = serde_json::from_slice(&entry.value)
                .map_err(|e| HistoryError::Corrupt(e.to_string()))?;
            Ok((entries, entry.revision))
        }
        Ok(Some(entry)) => Ok((Vec::new(), entry.revision)),
        Ok(None) => Ok((Vec::new(), 0)),
        Err(e) => Err(HistoryError::Write(e.to_string())),
    }
}

/// Add `entry` (counted unless its lost session is there already) by
/// compare-and-set; the number of counted entries within `intensity`'s
/// window, this one included, by `now_ms`.
pub(crate) async fn record(
    store: &kv::Store,
    mut entry: HistoryEntry,
    intensity: &RestartIntensity,
    now_ms: u64,
) -> Result<usize, HistoryError> {
    for _ in 0..8 {
        let (mut entries, revision) = read(store).await?;
        entry.counted = !entries.iter().any(|e| e.lost_session == entry.lost_session);
        entries.push(entry.clone());
        if entries.len() > MAX_ENTRIES {
            let excess = entries.len() - MAX_ENTRIES;
            entries.drain(..excess);
        }
        let bytes = serde_json::to_vec(&entries).map_err(|e| HistoryError::Write(e.to_string()))?;
        match store
            .update(ENTRIES_KEY, Bytes::from(bytes), revision)
            .await
        {
            Ok(_) => return Ok(counted_within(&entries, intensity.time_window, now_ms)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(HistoryError::Write(e.to_string())),
        }
    }
    Err(HistoryError::Write(
        "it kept changing (8 compare-and-set attempts)".into(),
    ))
}

/// The counted entries within `window` before `now_ms`.
pub fn counted_within(entries: &[HistoryEntry], window: Duration, now_ms: u64) -> usize {
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let since = now_ms.saturating_sub(window);
    entries
        .iter()
        .filter(|e| e.counted && e.at_ms >= since)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(session: &str, at_ms: u64, counted: bool) -> HistoryEntry {
        HistoryEntry {
            at_ms,
            unit: "u".into(),
            lost_host: "h".into(),
            lost_session: session.into(),
            by_host: "b".into(),
            incarnation: "i".into(),
            counted,
        }
    }

    #[test]
    fn only_counted_entries_within_the_window_count() {
        let entries = [
            entry("a", 1_000, true),
            entry("a", 1_100, false),
            entry("b", 50_000, true),
            entry("c", 60_000, true),
        ];
        assert_eq!(counted_within(&entries, Duration::from_secs(60), 60_000), 3);
        assert_eq!(counted_within(&entries, Duration::from_secs(20), 60_000), 2);
        assert_eq!(counted_within(&entries, Duration::from_secs(1), 60_000), 1);
    }
}
