//! The cluster's shared restart history: every restart of a unit by the
//! root supervisor, wherever it happened, in a key/value bucket
//! (`ah-<tree>-history`, key `entries`), written by compare-and-set. A
//! restart is a takeover (a unit restarted on another host because its
//! host was lost) or a crash (a unit exited and its host's root restarted
//! it there). Both count against the root supervisor's restart intensity
//! in one window over the whole cluster, one lost host once however many
//! units it ran; when the count exceeds it, the root gives up on every
//! host (the key `halt` of the leases bucket).

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

/// What restarted a unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartKind {
    /// Its host was lost; another host took it over.
    #[default]
    Takeover,
    /// It exited; its host's root supervisor restarted it there.
    Crash,
}

/// One restart of a unit by the root supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The entry's id (a UUID; empty in entries written before ids were):
    /// each host applies the root's strategy to each entry once.
    #[serde(default)]
    pub id: String,
    /// A takeover or a crash (entries written before crashes were recorded
    /// are takeovers).
    #[serde(default)]
    pub kind: RestartKind,
    /// When (milliseconds since the Unix epoch, the recording host's clock).
    pub at_ms: u64,
    /// The unit restarted.
    pub unit: String,
    /// The host that was lost (a takeover), or where the unit crashed.
    pub lost_host: String,
    /// That host's session (one run of `agent-host`): a lost host is one
    /// restart, however many units it ran.
    pub lost_session: String,
    /// The host that restarted the unit (took it over, or restarted it
    /// after its crash).
    pub by_host: String,
    /// The incarnation that runs the unit now (a crash keeps the
    /// incarnation: the lease did not change hands).
    pub incarnation: String,
    /// Whether this entry counts against the root's intensity: every
    /// crash, and the first takeover of each lost session.
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

/// Add `entry` (a crash is counted; a takeover unless a takeover from its
/// lost session is there already) by
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
        entry.counted = match entry.kind {
            RestartKind::Crash => true,
            RestartKind::Takeover => !entries
                .iter()
                .any(|e| e.kind == RestartKind::Takeover && e.lost_session == entry.lost_session),
        };
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
            id: format!("{session}-{at_ms}"),
            kind: RestartKind::Takeover,
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

    #[test]
    fn an_entry_from_before_crashes_were_recorded_is_a_takeover() {
        let old = r#"{"at_ms":1,"unit":"u","lost_host":"h","lost_session":"s","by_host":"b","incarnation":"i","counted":true}"#;
        let entry: HistoryEntry = serde_json::from_str(old).expect("the old shape reads");
        assert_eq!(entry.kind, RestartKind::Takeover);
    }
}
