//! Directories only the user running the host may enter: where the control
//! sockets and the compile cache live.
//!
//! Invariant of a directory accepted by [`ensure`]: it is a real directory
//! (not a symbolic link), owned by the effective user of this process, and
//! grants no permission to group or others. Root is no exception: a
//! directory of another user is refused, so that nobody else can plant,
//! read or replace what the host keeps there.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

/// A directory that is not, or cannot be made, private to this user. The
/// message names the directory, what it is for, what is wrong and what to
/// do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PrivateDirError(String);

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// What the checks of [`ensure`] look at, from `symlink_metadata` (links are
/// not followed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirFacts {
    pub symlink: bool,
    pub dir: bool,
    pub owner: u32,
    /// The permission bits.
    pub mode: u32,
}

impl DirFacts {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            symlink: meta.file_type().is_symlink(),
            dir: meta.is_dir(),
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// Whether `dir`, described by `facts`, is a private directory of the user
/// `euid`. `what` says what the directory is for ("the directory of the
/// control sockets"); `hint` ends every complaint with the way out.
pub(crate) fn check(
    dir: &Path,
    facts: DirFacts,
    euid: u32,
    what: &str,
    hint: &str,
) -> Result<(), PrivateDirError> {
    let dir = dir.display();
    let mode = facts.mode;
    let refuse = |why: String| Err(PrivateDirError(format!("{dir} ({what}) {why}, {hint}")));
    if facts.symlink {
        return refuse(format!(
            "is a symbolic link, not a directory of your own; remove it (`rm {dir}`)"
        ));
    }
    if !facts.dir {
        return refuse("is not a directory; remove it".into());
    }
    if facts.owner != euid {
        return refuse(format!(
            "is owned by uid {} (mode {mode:04o}), not by you (uid {euid}): its owner could \
             read or replace what is in it; remove it if you know it is stale",
            facts.owner
        ));
    }
    if mode & 0o077 != 0 {
        return refuse(format!(
            "has mode {mode:04o}: other users could reach what is in it; make it private \
             with `chmod 700 {dir}`"
        ));
    }
    Ok(())
}

/// Create `dir` (mode 0700, and its missing parents) unless it exists, and
/// make sure it is private to this user (see the module's invariant).
///
/// # Errors
///
/// [`PrivateDirError`] if it cannot be created or inspected, or is not
/// private: the message says why and ends with `hint`.
pub fn ensure(dir: &Path, what: &str, hint: &str) -> Result<(), PrivateDirError> {
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(PrivateDirError(format!(
                "cannot create {} ({what}): {e}; create it yourself (mode 0700), {hint}",
                dir.display()
            )));
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| {
        PrivateDirError(format!(
            "cannot inspect {} ({what}): {e}; remove it, {hint}",
            dir.display()
        ))
    })?;
    check(dir, DirFacts::of(&meta), euid(), what, hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_directory_of_ours_is_accepted() {
        let dir = Path::new("/tmp/agent-host-1000");
        let (what, hint) = ("the directory of the sockets", "or give --socket PATH");
        let ours = DirFacts {
            symlink: false,
            dir: true,
            owner: 1000,
            mode: 0o700,
        };
        assert_eq!(check(dir, ours, 1000, what, hint), Ok(()));
        let refused = |facts: DirFacts, euid: u32, needles: &[&str]| {
            let Err(why) = check(dir, facts, euid, what, hint) else {
                panic!("{facts:?} for uid {euid} was accepted");
            };
            let why = why.to_string();
            assert!(
                why.starts_with("/tmp/agent-host-1000 (the directory of the sockets) "),
                "{why}"
            );
            assert!(why.ends_with(", or give --socket PATH"), "{why}");
            for needle in needles {
                assert!(why.contains(needle), "no {needle:?} in: {why}");
            }
        };
        let symlink = DirFacts {
            symlink: true,
            dir: false,
            ..ours
        };
        refused(symlink, 1000, &["symbolic link"]);
        refused(DirFacts { dir: false, ..ours }, 1000, &["not a directory"]);
        let theirs = DirFacts {
            owner: 65534,
            ..ours
        };
        refused(
            theirs,
            1000,
            &["owned by uid 65534", "(mode 0700)", "uid 1000"],
        );
        // Root is no exception: a directory of another user is refused.
        refused(theirs, 0, &["owned by uid 65534", "not by you (uid 0)"]);
        for mode in [0o777, 0o1777, 0o750, 0o701, 0o710, 0o702] {
            refused(
                DirFacts { mode, ..ours },
                1000,
                &[&format!("mode {mode:04o}"), "chmod 700"],
            );
        }
    }

    #[test]
    fn ensure_creates_a_private_directory_and_refuses_an_open_one() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("private-dir-test-{}", std::process::id()));
        let dir = base.join("a/b");
        ensure(&dir, "test", "hint").expect("created");
        let mode = std::fs::metadata(&dir)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let why = ensure(&dir, "test", "hint").expect_err("open to others");
        assert!(why.to_string().contains("mode 0755"), "{why}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
