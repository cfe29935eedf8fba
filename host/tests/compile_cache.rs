//! The compile cache: a component compiled once is loaded from the cache
//! next time; an entry that is corrupt, cut short, not private or of
//! another engine is never loaded, only compiled again and replaced.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::cli::{TempDir, text};
use terraphim_agent_supervisor::examples::ECHO;
use terraphim_agent_supervisor::{
    AgentInstance, AgentLimits, InstanceOptions, MemoryStateStore, Runtime, RuntimeConfig,
    WasiGrants,
};

fn cached_runtime(dir: &Path) -> Runtime {
    Runtime::with_config(RuntimeConfig {
        compile_cache: Some(dir.to_owned()),
        ..RuntimeConfig::default()
    })
    .expect("runtime with a cache")
}

/// The single entry in the cache directory.
fn entry(dir: &Path) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(entries.len(), 1, "one entry, no leftovers: {entries:?}");
    entries[0].clone()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777
}

/// Load echo twice more: the first of them compiles (the entry was not
/// usable), the second finds the replaced entry.
fn recompiled_then_cached(runtime: &Runtime) {
    let again = runtime.load_bytes("echo", ECHO).expect("loads");
    assert!(!again.from_cache(), "an unusable entry must not be loaded");
    let then = runtime.load_bytes("echo", ECHO).expect("loads");
    assert!(then.from_cache(), "the entry was replaced by a good one");
}

#[tokio::test]
async fn a_component_compiled_once_is_loaded_from_the_cache_and_works() {
    let tmp = TempDir::new("cache-hit");
    let dir = tmp.path("cache");
    let runtime = cached_runtime(&dir);
    let first = runtime.load_bytes("echo", ECHO).expect("compiles");
    assert!(!first.from_cache());
    assert_eq!(mode(&dir), 0o700, "the cache directory is private");
    let path = entry(&dir);
    assert_eq!(mode(&path), 0o600, "entries are private");

    // Another runtime of the same configuration: a new process, in effect.
    let other = cached_runtime(&dir);
    let second = other
        .load_bytes("echo", ECHO)
        .expect("loads from the cache");
    assert!(second.from_cache());
    let mut agent = AgentInstance::instantiate(
        &other,
        &second,
        InstanceOptions {
            agent_id: "cached".into(),
            limits: AgentLimits::default(),
            grants: WasiGrants::default(),
            state: std::sync::Arc::new(MemoryStateStore::default()),
            ..InstanceOptions::default()
        },
    )
    .await
    .expect("the cached component instantiates");
    assert_eq!(
        agent.handle_message("hello").await.expect("answers"),
        "echo: hello"
    );
}

#[test]
fn a_corrupt_or_cut_entry_is_compiled_again() {
    let tmp = TempDir::new("cache-corrupt");
    let dir = tmp.path("cache");
    let runtime = cached_runtime(&dir);
    runtime.load_bytes("echo", ECHO).expect("compiles");
    let path = entry(&dir);

    let mut bytes = std::fs::read(&path).expect("entry");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, &bytes).expect("corrupted");
    recompiled_then_cached(&runtime);

    let bytes = std::fs::read(&path).expect("entry");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("cut short");
    recompiled_then_cached(&runtime);

    std::fs::write(&path, b"").expect("emptied");
    recompiled_then_cached(&runtime);
    entry(&dir);
}

#[test]
fn an_entry_others_could_have_written_is_not_loaded() {
    let tmp = TempDir::new("cache-foreign");
    let dir = tmp.path("cache");
    let runtime = cached_runtime(&dir);
    runtime.load_bytes("echo", ECHO).expect("compiles");
    let path = entry(&dir);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    recompiled_then_cached(&runtime);
    assert_eq!(mode(&entry(&dir)), 0o600);

    // A symbolic link in place of the entry is not followed.
    let elsewhere = tmp.path("elsewhere.cwasm");
    std::fs::rename(&path, &elsewhere).expect("moved");
    std::os::unix::fs::symlink(&elsewhere, &path).expect("link");
    recompiled_then_cached(&runtime);
    assert!(
        !std::fs::symlink_metadata(&path)
            .expect("entry")
            .file_type()
            .is_symlink(),
        "the link was replaced by an entry"
    );
}

#[test]
fn another_engine_configuration_does_not_share_entries() {
    let tmp = TempDir::new("cache-engine");
    let dir = tmp.path("cache");
    cached_runtime(&dir)
        .load_bytes("echo", ECHO)
        .expect("compiles");
    // So many agents that memories get narrow slots with bounds checks:
    // code compiled for wide slots must not be used.
    let narrow = Runtime::with_config(RuntimeConfig {
        max_instances: 5_000,
        max_memory_bytes: 64 << 20,
        compile_cache: Some(dir.clone()),
        ..RuntimeConfig::default()
    })
    .expect("narrow runtime");
    let loaded = narrow.load_bytes("echo", ECHO).expect("compiles");
    assert!(!loaded.from_cache(), "an entry of another engine was used");
    assert!(narrow.load_bytes("echo", ECHO).expect("loads").from_cache());
    assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 2);
}

#[test]
fn a_cache_directory_others_may_enter_is_refused() {
    let tmp = TempDir::new("cache-open-dir");
    let dir = tmp.path("cache");
    std::fs::create_dir(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let err = Runtime::with_config(RuntimeConfig {
        compile_cache: Some(dir.clone()),
        ..RuntimeConfig::default()
    })
    .expect_err("an open directory");
    let why = err.to_string();
    assert!(
        why.contains("mode 0755") && why.contains("chmod 700"),
        "{why}"
    );
}

#[test]
fn agent_host_compile_fills_the_cache_that_validate_then_uses() {
    let tmp = TempDir::new("cache-cli");
    let echo = tmp.path("echo.wasm");
    let echo = echo.to_str().expect("utf-8");
    let cache = tmp.path("cli-cache");
    let cache = cache.to_str().expect("utf-8");
    let tree = tmp.write(
        "tree.toml",
        "[supervisor]\nname = \"root\"\n\n[[supervisor.children]]\nname = \"echo\"\ncomponent = \"echo.wasm\"\n",
    );

    let out = tmp.agent_host(&["compile", &tree, "--cache-dir", cache]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("compiled: "), "{stdout}");
    assert!(stdout.contains("echo.wasm"), "{stdout}");

    let out = tmp.agent_host(&["compile", echo, "--cache-dir", cache]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), format!("cached: {echo}\n"));

    let out = tmp.agent_host(&["validate", &tree, "--cache-dir", cache]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = tmp.agent_host(&["compile", echo, "--no-cache"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no compile cache"),
        "{}",
        text(&out.stderr)
    );
    let out = tmp.agent_host(&["compile", echo, "--no-cache", "--cache-dir", cache]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "conflicting options are a usage error"
    );

    let out = tmp.agent_host(&["compile", "missing.wasm", "--cache-dir", cache]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing.wasm"));
}
