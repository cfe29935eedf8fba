//! `--state`: where `run` (and `call`, when it runs the tree itself) keeps
//! the agents' state. By default in a redb file beside the tree file, so
//! that it survives the host; `--state PATH` chooses the file, `--state
//! memory` keeps it in memory only.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use terraphim_agent_supervisor::{
    MemoryStateStore, OpenStateError, RedbStateStore, StateQuota, StateStore,
};

/// The `--state` help line.
pub const HELP: &str = "Where the agents' state is kept: a file (default: <tree folder>/<tree file name without .toml>.state.redb), or `memory` to keep none across restarts of the host";

/// What `--state` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateArg {
    /// `--state memory`: in memory, lost when the host stops.
    Memory,
    /// `--state PATH`: in this file (`./memory` for a file of that name).
    File(PathBuf),
}

impl FromStr for StateArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("give a file, or `memory`".into()),
            "memory" => Ok(StateArg::Memory),
            path => Ok(StateArg::File(PathBuf::from(path))),
        }
    }
}

/// The default state file of `tree`: `tree.toml` → `tree.state.redb`, in
/// the same folder.
pub fn default_file(tree: &Path) -> PathBuf {
    let stem = tree
        .file_stem()
        .map_or_else(|| "tree".into(), |s| s.to_string_lossy().into_owned());
    tree.with_file_name(format!("{stem}.state.redb"))
}

/// The state store of the tree `tree` that `arg` asks for, and the file it
/// lives in (none in memory). The file is opened (created if missing,
/// checked, its accounting recomputed) on the blocking pool.
pub async fn open(
    tree: &Path,
    arg: Option<&StateArg>,
) -> Result<(Arc<dyn StateStore>, Option<PathBuf>), String> {
    let path = match arg {
        Some(StateArg::Memory) => return Ok((Arc::new(MemoryStateStore::default()), None)),
        Some(StateArg::File(path)) => path.clone(),
        None => default_file(tree),
    };
    let file = path.clone();
    let opened =
        tokio::task::spawn_blocking(move || RedbStateStore::open(file, StateQuota::default()))
            .await
            .map_err(|e| format!("opening the state store {}: {e}", path.display()))?;
    match opened {
        Ok(store) => Ok((Arc::new(store), Some(path))),
        Err(OpenStateError::InUse { path }) => Err(format!(
            "the state file {} is in use by another agent-host (a `run` of this tree with \
             another --socket, or a `call` running it for one call); stop it, or choose another \
             file with --state PATH (--state memory keeps no state)",
            path.display()
        )),
        Err(e) => Err(format!(
            "{e} (--state PATH chooses another file, --state memory keeps no state)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_beside_the_tree() {
        assert_eq!(
            default_file(Path::new("/srv/trees/prod.toml")),
            Path::new("/srv/trees/prod.state.redb")
        );
        assert_eq!(
            default_file(Path::new("tree.toml")),
            Path::new("tree.state.redb")
        );
        assert_eq!(
            default_file(Path::new("a/b.tree")),
            Path::new("a/b.state.redb")
        );
    }

    #[test]
    fn memory_is_a_word_and_anything_else_a_file() {
        assert_eq!("memory".parse(), Ok(StateArg::Memory));
        assert_eq!(
            "./memory".parse(),
            Ok(StateArg::File(PathBuf::from("./memory")))
        );
        assert!("".parse::<StateArg>().is_err());
    }
}
