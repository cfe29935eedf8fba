//! The durable state store: one [redb](https://www.redb.org) file.
//!
//! Layout: table `entries` maps `(agent, key)` to the value; table `meta`
//! holds the file's `format` (1). Every write is one redb write transaction
//! committed with `Durability::Immediate` (redb's default): when `put`,
//! `delete` or `clear` returns `Ok`, the change is on disk (fsync'd), and a
//! crash at any point leaves the file at the last commit.
//!
//! The quotas' accounting (bytes and keys per agent, the store's total)
//! lives in memory, recomputed from the entries when the file is opened, so
//! it never disagrees with what the file holds. It changes only while the
//! store's writer lock is held, around a write transaction, and only after
//! that transaction committed: a refused or failed write changes neither the
//! file nor the accounting.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError, TableDefinition,
    WriteTransaction,
};

use super::{StateError, StateQuota, StateStore, Usage, admit, check_sizes, entry_cost};

/// `(agent, key)` → value.
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
/// `format` → the layout version of the file.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The layout this host reads and writes.
const FORMAT: u64 = 1;
/// redb's page cache. Values are read once per `get`; the OS page cache
/// serves the rest.
const CACHE_BYTES: usize = 64 << 20;

/// Why a state store file could not be opened. Each names the file and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenStateError {
    /// Another process (or another store in this one) has the file open.
    #[error(
        "the state store {path} is in use by another process (another host running the same \
         tree?); stop that host, or give this one another state file"
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be created, read or written.
    #[error(
        "cannot open the state store {path}: {source}; check that its folder exists and that \
         this user may write there"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file exists and is something else than a state store.
    #[error(
        "{path} is not a state store ({detail}); give another path, or move the file aside to \
         start with empty state"
    )]
    NotAStore {
        /// The file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The file is a state store but damaged beyond redb's repair.
    #[error(
        "the state store {path} is damaged ({detail}); move it aside to start with empty state"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What redb found.
        detail: String,
    },
    /// The file was written by a host with another layout.
    #[error(
        "the state store {path} has format {found}, this host reads format {FORMAT}; run the \
         host that wrote it, or move the file aside to start with empty state"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u64,
    },
}

/// The accounting of the quotas: what each agent holds, and the total.
#[derive(Debug, Default)]
struct Totals {
    by_agent: HashMap<String, Usage>,
    /// Sum of every agent's bytes.
    total: usize,
}

/// A durable [`StateStore`]: agents' state in one redb file, which survives
/// restarts of the host, a crash and SIGKILL included. Writes are durable
/// when they return. The quotas are those of
/// [`MemoryStateStore`](super::MemoryStateStore), with the same errors, and
/// hold across restarts (the accounting is recomputed when the file is
/// opened).
///
/// Calls block on disk I/O ([`StateStore::blocks`] is `true`): the host
/// makes them on tokio's blocking pool. One process at a time may have the
/// file open; redb locks it.
pub struct RedbStateStore {
    db: Database,
    path: PathBuf,
    quota: StateQuota,
    /// Held for the whole of every write transaction, so that the
    /// accounting read before the write is still true when it commits.
    writer: Mutex<()>,
    totals: Mutex<Totals>,
}

impl fmt::Debug for RedbStateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStateStore")
            .field("path", &self.path)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

fn backend(what: &str, e: impl Into<redb::Error>) -> StateError {
    StateError::Backend(format!("{what}: {}", e.into()))
}

impl RedbStateStore {
    /// Open the store in the file at `path`, creating it if it does not
    /// exist (its folder must), with `quota`.
    ///
    /// The whole file is checked (redb verifies every page's checksum, and
    /// repairs it after a crash to its last commit) and read once, to
    /// recompute the accounting; the cost grows with the state held.
    pub fn open(path: impl AsRef<Path>, quota: StateQuota) -> Result<Self, OpenStateError> {
        let path = path.as_ref().to_owned();
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| open_error(&path, e))?;
        let damaged = |e: redb::Error| classify_damage(&path, e);
        check_format(&db, &path)?;
        let totals = scan(&db).map_err(damaged)?;
        Ok(Self {
            db,
            path,
            quota,
            writer: Mutex::new(()),
            totals: Mutex::new(totals),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The quotas it applies.
    pub fn quota(&self) -> StateQuota {
        self.quota
    }

    /// Take the writer lock. If a writer panicked while holding it, a
    /// commit may have landed without its accounting: recompute it from
    /// the file before going on.
    fn writer(&self) -> Result<MutexGuard<'_, ()>, StateError> {
        match self.writer.lock() {
            Ok(guard) => Ok(guard),
            Err(poisoned) => {
                let guard = poisoned.into_inner();
                let totals = scan(&self.db).map_err(|e| backend("recounting the state", e))?;
                *self.totals() = totals;
                self.writer.clear_poison();
                Ok(guard)
            }
        }
    }

    fn totals(&self) -> MutexGuard<'_, Totals> {
        // Held only for map lookups and arithmetic that cannot panic, so a
        // poisoned lock still guards consistent data.
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin_write(&self) -> Result<WriteTransaction, StateError> {
        self.db
            .begin_write()
            .map_err(|e| backend("starting a write", e))
    }
}

/// Turn redb's open error into ours.
fn open_error(path: &Path, e: DatabaseError) -> OpenStateError {
    let path = path.to_owned();
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            OpenStateError::InUse { path }
        }
        DatabaseError::Storage(StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::InvalidData =>
        {
            OpenStateError::NotAStore {
                path,
                detail: source.to_string(),
            }
        }
        DatabaseError::Storage(StorageError::Io(source)) => OpenStateError::Io { path, source },
        DatabaseError::UpgradeRequired(version) => OpenStateError::NotAStore {
            path,
            detail: format!("a redb file of the older format {version}"),
        },
        other => OpenStateError::Damaged {
            path,
            detail: other.to_string(),
        },
    }
}

/// A failure reading a file redb opened: another program's tables, or
/// damage.
fn classify_damage(path: &Path, e: redb::Error) -> OpenStateError {
    let path = path.to_owned();
    match e {
        redb::Error::TableTypeMismatch { .. } => OpenStateError::NotAStore {
            path,
            detail: format!("a redb file with other tables: {e}"),
        },
        redb::Error::Io(source) => OpenStateError::Io { path, source },
        other => OpenStateError::Damaged {
            path,
            detail: other.to_string(),
        },
    }
}

/// Create the tables of a new file, or check the format of an existing one.
fn check_format(db: &Database, path: &Path) -> Result<(), OpenStateError> {
    let damaged = |e: redb::Error| classify_damage(path, e);
    let txn = db.begin_write().map_err(|e| damaged(e.into()))?;
    let found = {
        let mut meta = txn.open_table(META).map_err(|e| damaged(e.into()))?;
        let found = meta
            .get("format")
            .map_err(|e| damaged(e.into()))?
            .map(|v| v.value());
        if found.is_none() {
            meta.insert("format", FORMAT)
                .map_err(|e| damaged(e.into()))?;
        }
        txn.open_table(ENTRIES).map_err(|e| damaged(e.into()))?;
        found
    };
    match found {
        Some(found) if found != FORMAT => Err(OpenStateError::Format {
            path: path.to_owned(),
            found,
        }),
        Some(_) => txn.abort().map_err(|e| damaged(e.into())),
        None => txn.commit().map_err(|e| damaged(e.into())),
    }
}

/// The accounting of everything the file holds.
fn scan(db: &Database) -> Result<Totals, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(ENTRIES)?;
    let mut totals = Totals::default();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let (agent, key) = k.value();
        let cost = entry_cost(key, v.value());
        let usage = totals.by_agent.entry(agent.to_owned()).or_default();
        usage.bytes = usage.bytes.saturating_add(cost);
        usage.keys += 1;
        totals.total = totals.total.saturating_add(cost);
    }
    Ok(totals)
}

impl StateStore for RedbStateStore {
    fn get(&self, agent: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| backend("starting a read", e))?;
        let table = txn
            .open_table(ENTRIES)
            .map_err(|e| backend("opening the entries", e))?;
        let value = table
            .get((agent, key))
            .map_err(|e| backend("reading a value", e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn put(&self, agent: &str, key: &str, value: Vec<u8>, budget: usize) -> Result<(), StateError> {
        check_sizes(&self.quota, key, value.len())?;
        let _writer = self.writer()?;
        let txn = self.begin_write()?;
        let admitted = {
            let mut table = txn
                .open_table(ENTRIES)
                .map_err(|e| backend("opening the entries", e))?;
            let old = table
                .get((agent, key))
                .map_err(|e| backend("reading the old value", e))?
                .map(|v| v.value().len());
            let admitted = {
                let totals = self.totals();
                let used = totals.by_agent.get(agent).copied().unwrap_or_default();
                admit(
                    &self.quota,
                    key,
                    value.len(),
                    old,
                    used,
                    totals.total,
                    budget,
                )
            };
            if admitted.is_ok() {
                table
                    .insert((agent, key), value.as_slice())
                    .map_err(|e| backend("writing the value", e))?;
            }
            admitted.map(|(bytes, total)| (bytes, total, old.is_none()))
        };
        let (bytes, total, new_key) = match admitted {
            Ok(admitted) => admitted,
            Err(refused) => {
                // Nothing was written; an abort that fails leaves nothing
                // behind either.
                let _ = txn.abort();
                return Err(refused);
            }
        };
        txn.commit().map_err(|e| backend("committing", e))?;
        let mut totals = self.totals();
        let usage = totals.by_agent.entry(agent.to_owned()).or_default();
        usage.bytes = bytes;
        usage.keys += usize::from(new_key);
        totals.total = total;
        Ok(())
    }

    fn delete(&self, agent: &str, key: &str) -> Result<bool, StateError> {
        let _writer = self.writer()?;
        let txn = self.begin_write()?;
        let freed = {
            let mut table = txn
                .open_table(ENTRIES)
                .map_err(|e| backend("opening the entries", e))?;
            let old = table
                .remove((agent, key))
                .map_err(|e| backend("removing the value", e))?;
            old.map(|v| entry_cost(key, v.value()))
        };
        let Some(freed) = freed else {
            let _ = txn.abort();
            return Ok(false);
        };
        txn.commit().map_err(|e| backend("committing", e))?;
        let mut totals = self.totals();
        let Totals { by_agent, total } = &mut *totals;
        *total = total.saturating_sub(freed);
        if let Some(usage) = by_agent.get_mut(agent) {
            usage.bytes = usage.bytes.saturating_sub(freed);
            usage.keys = usage.keys.saturating_sub(1);
            if usage.keys == 0 {
                by_agent.remove(agent);
            }
        }
        Ok(true)
    }

    fn clear(&self, agent: &str) -> Result<(), StateError> {
        let _writer = self.writer()?;
        if !self.totals().by_agent.contains_key(agent) {
            // The accounting mirrors the file: nothing to remove.
            return Ok(());
        }
        // Every key of `agent`, and nothing else: no string sorts between
        // `agent` and `agent` followed by NUL.
        let end = format!("{agent}\0");
        let txn = self.begin_write()?;
        {
            let mut table = txn
                .open_table(ENTRIES)
                .map_err(|e| backend("opening the entries", e))?;
            table
                .retain_in((agent, "")..(end.as_str(), ""), |_, _| false)
                .map_err(|e| backend("removing the agent's entries", e))?;
        }
        txn.commit().map_err(|e| backend("committing", e))?;
        let mut totals = self.totals();
        if let Some(usage) = totals.by_agent.remove(agent) {
            totals.total = totals.total.saturating_sub(usage.bytes);
        }
        Ok(())
    }

    fn bytes_used(&self, agent: &str) -> usize {
        self.totals().by_agent.get(agent).map_or(0, |u| u.bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::state::{ENTRY_OVERHEAD, contract};

    const BIG: usize = usize::MAX;

    /// A folder no other test (run) uses; removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let path = std::env::temp_dir()
                .join(format!("redb-state-{}-{nanos}-{name}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_redb_store_keeps_the_contract() {
        let dir = TempDir::new("contract");
        let n = std::sync::atomic::AtomicUsize::new(0);
        contract::all(|quota| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let file = dir.file(&format!("{i}.redb"));
            Box::new(RedbStateStore::open(file, quota).unwrap())
        });
    }

    #[test]
    fn writes_survive_reopening_and_so_does_the_accounting() {
        let dir = TempDir::new("reopen");
        let file = dir.file("state.redb");
        let entry = 1 + 100 + ENTRY_OVERHEAD;
        let quota = StateQuota {
            max_total_bytes: 3 * entry,
            ..StateQuota::default()
        };
        {
            let s = RedbStateStore::open(&file, quota).unwrap();
            s.put("a", "x", vec![1; 100], BIG).unwrap();
            s.put("a", "y", vec![2; 100], BIG).unwrap();
            s.put("b", "gone", vec![3; 10], BIG).unwrap();
            assert!(s.delete("b", "gone").unwrap());
            s.put("b", "x", vec![3; 100], BIG).unwrap();
        }
        let s = RedbStateStore::open(&file, quota).unwrap();
        assert_eq!(s.get("a", "y").unwrap(), Some(vec![2; 100]));
        assert_eq!(s.get("b", "gone").unwrap(), None);
        assert_eq!(s.bytes_used("a"), 2 * entry);
        assert_eq!(s.bytes_used("b"), entry);
        // The budget and the host-wide cap count what was stored before.
        assert_eq!(
            s.put("a", "z", vec![0; 100], 2 * entry),
            Err(StateError::OverBudget {
                would_be: 3 * entry,
                budget: 2 * entry
            })
        );
        assert_eq!(
            s.put("c", "x", vec![0; 100], BIG),
            Err(StateError::StoreFull { max: 3 * entry })
        );
        // The number of keys too.
        drop(s);
        let s = RedbStateStore::open(
            &file,
            StateQuota {
                max_keys: 2,
                ..quota
            },
        )
        .unwrap();
        assert_eq!(
            s.put("a", "z", Vec::new(), BIG),
            Err(StateError::TooManyKeys { max: 2 })
        );
        s.clear("a").unwrap();
        drop(s);
        let s = RedbStateStore::open(&file, quota).unwrap();
        assert_eq!(s.get("a", "x").unwrap(), None, "cleared on disk");
        assert_eq!(s.bytes_used("a"), 0);
        s.put("c", "x", vec![0; 100], BIG).unwrap();
    }

    #[test]
    fn a_refused_write_leaves_the_file_as_it_was() {
        let dir = TempDir::new("refused");
        let file = dir.file("state.redb");
        {
            let s = RedbStateStore::open(&file, StateQuota::default()).unwrap();
            s.put("a", "k", b"old".to_vec(), BIG).unwrap();
            let budget = entry_cost("k", b"old");
            assert!(matches!(
                s.put("a", "k", b"longer".to_vec(), budget),
                Err(StateError::OverBudget { .. })
            ));
        }
        let s = RedbStateStore::open(&file, StateQuota::default()).unwrap();
        assert_eq!(s.get("a", "k").unwrap(), Some(b"old".to_vec()));
        assert_eq!(s.bytes_used("a"), entry_cost("k", b"old"));
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused_by_name() {
        let dir = TempDir::new("locked");
        let file = dir.file("state.redb");
        let _first = RedbStateStore::open(&file, StateQuota::default()).unwrap();
        let err = RedbStateStore::open(&file, StateQuota::default()).unwrap_err();
        assert!(matches!(err, OpenStateError::InUse { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&file.display().to_string()), "{text}");
        assert!(text.contains("in use by another process"), "{text}");
    }

    #[test]
    fn a_file_that_is_not_a_store_is_refused_and_left_alone() {
        let dir = TempDir::new("foreign");
        let file = dir.file("tree.toml");
        let text = b"[supervisor]\nname = \"root\"\n".repeat(200);
        std::fs::write(&file, &text).unwrap();
        let err = RedbStateStore::open(&file, StateQuota::default()).unwrap_err();
        assert!(matches!(err, OpenStateError::NotAStore { .. }), "{err:?}");
        assert!(err.to_string().contains("is not a state store"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), text, "the file is untouched");
    }

    #[test]
    fn a_missing_folder_is_an_io_error_naming_the_file() {
        let dir = TempDir::new("missing");
        let file = dir.file("no/such/folder/state.redb");
        let err = RedbStateStore::open(&file, StateQuota::default()).unwrap_err();
        assert!(matches!(err, OpenStateError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&file.display().to_string()));
    }

    #[test]
    fn another_format_is_refused() {
        let dir = TempDir::new("format");
        let file = dir.file("state.redb");
        {
            let db = Database::create(&file).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 2).unwrap();
            txn.commit().unwrap();
        }
        let err = RedbStateStore::open(&file, StateQuota::default()).unwrap_err();
        assert!(
            matches!(err, OpenStateError::Format { found: 2, .. }),
            "{err:?}"
        );
    }
}
