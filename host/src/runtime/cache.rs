//! The on-disk cache of compiled components: a component compiled once is
//! loaded again in a fraction of the time (seconds become milliseconds for a
//! large Python or JavaScript agent).
//!
//! wasmtime's own `cache` feature was weighed and not taken: it trusts any
//! file found in its directory, and a compiled component is native code
//! that [`Component::deserialize`] maps executable without checking it. So
//! this cache keeps the rules itself:
//!
//! - **Key.** An entry's file name is the SHA-256 of the component's binary
//!   and a hash of the engine's compatibility fingerprint
//!   ([`Engine::precompile_compatibility_hash`]: the wasmtime version, the
//!   compiler settings, the CPU features, the pool's memory layout). Another
//!   component, another host build or another engine configuration never
//!   finds the entry.
//! - **Only files this host wrote.** The directory is private to the user
//!   ([`private_dir`](crate::private_dir)); an entry is read only if it is a
//!   regular file (not a link) of this user with no permission for others,
//!   as this cache writes them.
//! - **Verified.** An entry starts with a magic string and the SHA-256 of
//!   the rest; an entry that does not match (cut short by a crash, changed
//!   on disk) is never deserialised. An entry wasmtime refuses anyway (stale)
//!   is compiled again. Every such entry is replaced by a fresh one.
//! - **Atomic.** An entry is written to a temporary file and renamed into
//!   place: a reader sees a whole entry or none.
//!
//! A cache that cannot be read or written never fails a load: the component
//! is compiled as if there were no cache, and the reason is logged.

use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::private_dir::{self, PrivateDirError};

/// The first bytes of every entry (the last one is the format's version).
const MAGIC: &[u8; 16] = b"terraphim-cwasm\x01";
/// Magic plus the SHA-256 of the payload.
const HEADER: usize = MAGIC.len() + 32;

/// An opened compile cache: a private directory and the engine's key.
#[derive(Debug, Clone)]
pub(crate) struct CompileCache {
    dir: PathBuf,
    /// The engine's compatibility fingerprint, as 16 hex digits.
    engine_key: String,
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// A verified entry, deserialised.
    Hit(Component),
    /// Nothing usable; why, if an entry was there but refused.
    Miss(Option<String>),
}

impl CompileCache {
    /// Open (creating it if need be) the cache in `dir` for `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> Result<Self, PrivateDirError> {
        private_dir::ensure(
            dir,
            "the compile cache",
            "or choose another directory (RuntimeConfig::compile_cache, agent-host --cache-dir) \
             or none (--no-cache)",
        )?;
        // SipHash with fixed keys: the same in every process of this build,
        // and a new build's engine fingerprint differs anyway.
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_owned(),
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    /// The entry of the component `binary`.
    pub fn entry(&self, binary: &[u8]) -> PathBuf {
        let content = Sha256::digest(binary);
        let mut name = String::with_capacity(64 + 1 + 16 + 6);
        for byte in content {
            name.push_str(&format!("{byte:02x}"));
        }
        self.dir.join(format!("{name}-{}.cwasm", self.engine_key))
    }

    /// The compiled form of `binary`, if a verified entry holds it.
    pub fn lookup(&self, engine: &Engine, entry: &Path) -> Lookup {
        let bytes = match read_own_file(entry) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Lookup::Miss(None),
            Err(why) => return Lookup::Miss(Some(why)),
        };
        let Some(payload) = verified_payload(&bytes) else {
            return Lookup::Miss(Some(
                "its checksum does not match (corrupt or cut short)".into(),
            ));
        };
        // SAFETY: `payload` is exactly what `Component::serialize` of this
        // host wrote (its checksum matches, and only this user can write the
        // private directory and the entry); wasmtime itself checks that it
        // was compiled by this wasmtime version for this engine
        // configuration, and refuses it otherwise.
        match unsafe { Component::deserialize(engine, payload) } {
            Ok(component) => Lookup::Hit(component),
            Err(e) => Lookup::Miss(Some(format!("wasmtime refuses it: {e}"))),
        }
    }

    /// Keep the compiled `component` as `entry`, atomically.
    pub fn store(&self, component: &Component, entry: &Path) -> Result<(), String> {
        let payload = component
            .serialize()
            .map_err(|e| format!("cannot serialise the compiled component: {e}"))?;
        let digest = Sha256::digest(&payload);
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            entry
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id(),
            fastrand::u64(..)
        ));
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(MAGIC)?;
            file.write_all(&digest)?;
            file.write_all(&payload)?;
            std::fs::rename(&tmp, entry)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", entry.display())
        })
    }
}

/// The payload of an entry whose header is right and whose checksum
/// matches.
fn verified_payload(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < HEADER || bytes[..MAGIC.len()] != *MAGIC {
        return None;
    }
    let (header, payload) = bytes.split_at(HEADER);
    (Sha256::digest(payload).as_slice() == &header[MAGIC.len()..]).then_some(payload)
}

/// The bytes of `path` if it is a regular file of this user that others
/// cannot write or read; `None` if there is none; why not otherwise.
fn read_own_file(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect it: {e}"))?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    if meta.uid() != private_dir::euid() || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "it was not written by this host (owner uid {}, mode {:04o})",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    read_all(file, meta.len()).map(Some)
}

fn read_all(mut file: File, len: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_entry_with_its_checksum_is_accepted() {
        let mut entry = MAGIC.to_vec();
        entry.extend_from_slice(&Sha256::digest(b"compiled"));
        entry.extend_from_slice(b"compiled");
        assert_eq!(verified_payload(&entry), Some(&b"compiled"[..]));

        let mut flipped = entry.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(verified_payload(&flipped), None, "a changed payload");
        assert_eq!(
            verified_payload(&entry[..entry.len() - 1]),
            None,
            "cut short"
        );
        assert_eq!(verified_payload(&entry[..HEADER - 1]), None, "no header");
        let mut other = entry.clone();
        other[MAGIC.len() - 1] = 0;
        assert_eq!(verified_payload(&other), None, "another format");
    }
}
