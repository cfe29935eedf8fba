//! Durable agent state: the `state` interface backed by a redb file, with
//! real guests. State written before a trap is read back by the restarted
//! agent, and by a new host over the same file (in the library, and with
//! `agent-host` killed by SIGKILL); the quotas hold and are recounted when
//! the file is opened again; a slow or failing store neither holds a
//! runtime worker nor fools an agent.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{component, runtime, started, started_with, test_limits, wait_for};
use serde_json::json;
use terraphim_agent_supervisor::examples::ECHO;
use terraphim_agent_supervisor::tree::TreeFile;
use terraphim_agent_supervisor::{
    AgentFault, AgentLimits, AgentPid, AgentSpec, AgentSupervisor, CallError, EventKind,
    ExitReason, RedbStateStore, RunningTree, Runtime, RuntimeConfig, StateError, StateQuota,
    StateStore, SupervisionError, SupervisorConfig, WasmAgentFactory, entry_cost,
};

/// Hang guard for every wait (never a timing assertion).
const HANG_GUARD: Duration = Duration::from_secs(120);

/// A folder under the temp dir that no other test run uses; removed on
/// drop. For the CLI tests it is also `XDG_RUNTIME_DIR`, so that control
/// sockets land in it.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "durable-state-{}-{nanos}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("temp dir created");
        Self(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: &[u8]) -> String {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("file written");
        path.to_str().expect("temp path is UTF-8").to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(file: &Path, quota: StateQuota) -> Arc<RedbStateStore> {
    Arc::new(RedbStateStore::open(file, quota).expect("the state file opens"))
}

/// A supervisor over the echo agent with `store`, started.
async fn echo_supervisor(
    runtime: &Runtime,
    store: Arc<dyn StateStore>,
    limits: AgentLimits,
    spec: AgentSpec,
) -> AgentSupervisor {
    let echo = if std::ptr::eq(runtime, common::runtime()) {
        component("echo")
    } else {
        runtime.load_bytes("echo", ECHO).expect("echo loads")
    };
    let factory = WasmAgentFactory::new(runtime.clone())
        .with_component("echo", echo)
        .with_default_limits(limits)
        .with_state_store(store);
    let mut sup =
        AgentSupervisor::new(SupervisorConfig::default(), Arc::new(factory)).with_child(spec);
    sup.start().await.expect("the supervisor starts");
    sup
}

async fn count(sup: &AgentSupervisor, pid: &AgentPid) -> String {
    sup.call(pid, "count".into()).await.expect("count")
}

// --- 1. in the library ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_written_before_a_trap_is_read_back_after_the_restart_and_by_a_new_host() {
    let dir = TempDir::new("trap");
    let file = dir.path("state.redb");
    // Limits under which `count` works and an echo of a 1 MB message
    // traps: receiving it fits in memory, the reply (a second copy) does not.
    let baseline = started("echo", "baseline", test_limits())
        .await
        .memory_bytes();
    let limits = AgentLimits {
        memory_bytes: baseline + (3 << 19),
        ..test_limits()
    };
    let spec = || AgentSpec::new("echo".into(), json!({})).with_id(AgentPid::named("root/echo"));
    let pid = spec().agent_id;

    let store = open(&file, StateQuota::default());
    let mut sup = echo_supervisor(runtime(), store.clone(), limits.clone(), spec()).await;
    let mut events = sup.subscribe();
    assert_eq!(count(&sup, &pid).await, "1");
    assert_eq!(count(&sup, &pid).await, "2");
    match sup.call(&pid, "x".repeat(1_000_000)).await {
        Err(SupervisionError::AgentCrashed(_, AgentFault::MemoryLimit)) => {}
        other => panic!("expected a memory-limit trap, got {other:?}"),
    }
    wait_for(
        &mut events,
        |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if *agent == pid),
    )
    .await;
    let history = sup.get_restart_history().await;
    assert_eq!(
        history.last().map(|h| &h.reason),
        Some(&ExitReason::Fault(AgentFault::MemoryLimit)),
        "a real trap of the guest"
    );
    assert_eq!(
        count(&sup, &pid).await,
        "3",
        "the restarted agent continues"
    );
    sup.stop().await.expect("stopped");
    drop(sup);
    drop(store);

    // A new host: a new runtime and supervisor over the same file.
    let runtime = Runtime::with_config(RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .expect("a second runtime");
    let store = open(&file, StateQuota::default());
    let mut sup = echo_supervisor(&runtime, store.clone(), limits, spec()).await;
    assert_eq!(
        count(&sup, &pid).await,
        "4",
        "what was committed, read back"
    );
    assert_eq!(
        store.bytes_used(&pid.to_string()),
        entry_cost("count", &4u64.to_le_bytes())
    );
    sup.stop().await.expect("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_built_again_over_the_same_file_finds_its_agents_state() {
    let dir = TempDir::new("tree");
    dir.write("echo.wasm", ECHO);
    let tree = dir.path("tree.toml");
    std::fs::write(
        &tree,
        "[supervisor]\nname = \"root\"\n\
         [[supervisor.children]]\nname = \"team\"\n\
         [[supervisor.children.children]]\nname = \"echo\"\ncomponent = \"echo.wasm\"\n",
    )
    .expect("tree written");
    let file = TreeFile::load(&tree).expect("the tree loads");
    let state = dir.path("tree.state.redb");
    for expected in ["1", "2"] {
        let store = open(&state, StateQuota::default());
        let root = file
            .build_with_state(runtime(), store)
            .expect("the tree builds");
        let mut tree = RunningTree::start(root).await.expect("started");
        let echo = tree.resolve("root/team/echo").expect("the agent");
        assert_eq!(echo.id, AgentPid::named("root/team/echo"));
        assert_eq!(
            tree.call("root/team/echo", "count".into()).await.unwrap(),
            expected
        );
        tree.stop().await.expect("stopped");
    }
}

/// How many `state-fill` keys of `value` bytes fit in `budget`.
fn keys_that_fit(value: usize, budget: usize) -> usize {
    let mut used = 0;
    (0..)
        .take_while(|i| {
            used += entry_cost(&format!("k{i}"), &vec![0; value]);
            used <= budget
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quotas_hold_and_are_recounted_when_the_file_is_opened_again() {
    let dir = TempDir::new("quota");
    let file = dir.path("state.redb");
    let budget = 50_000;
    let limits = AgentLimits {
        state_bytes: Some(budget),
        ..test_limits()
    };
    let (first_fill, held) = {
        let store = open(&file, StateQuota::default());
        let mut hoarder = started_with("hostile", "hoarder", limits.clone(), store.clone()).await;
        let reply = hoarder.handle_message("state-fill 1000").await.unwrap();
        let fit = keys_that_fit(1000, budget);
        assert!(
            reply.starts_with(&format!("stored {fit} keys: ")) && reply.contains("over its budget"),
            "{reply}"
        );
        let expected: usize = (0..fit)
            .map(|i| entry_cost(&format!("k{i}"), &[0; 1000]))
            .sum();
        assert_eq!(store.bytes_used("hoarder"), expected);
        (reply, expected)
    };

    // Reopened with a host-wide cap a few entries above what is held.
    let room = 5 * entry_cost("k0", &[0; 1000]) + 100;
    let store = open(
        &file,
        StateQuota {
            max_total_bytes: held + room,
            ..StateQuota::default()
        },
    );
    assert_eq!(store.bytes_used("hoarder"), held, "recounted from the file");
    // The same agent again: overwriting its keys costs nothing more, and
    // the next key is refused with the same count as before the reopen.
    let mut hoarder = started_with("hostile", "hoarder", limits.clone(), store.clone()).await;
    let reply = hoarder.handle_message("state-fill 1000").await.unwrap();
    assert_eq!(reply, first_fill, "the budget counts what the file holds");
    // Another agent gets only the room left under the host-wide cap.
    let mut other = started_with("hostile", "other", limits, store.clone()).await;
    let reply = other.handle_message("state-fill 1000").await.unwrap();
    assert!(
        reply.starts_with("stored 5 keys: ") && reply.contains("state store is full"),
        "{reply}"
    );
    assert!(store.bytes_used("hoarder") + store.bytes_used("other") <= held + room);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_childs_state_is_removed_from_the_file() {
    let dir = TempDir::new("clear");
    let file = dir.path("state.redb");
    let spec = AgentSpec::new("echo".into(), json!({}));
    let pid = spec.agent_id.clone();
    let keeper = AgentSpec::new("echo".into(), json!({}));
    let kept = keeper.agent_id.clone();
    {
        let store = open(&file, StateQuota::default());
        let mut sup = echo_supervisor(runtime(), store.clone(), test_limits(), spec).await;
        sup.spawn_agent(keeper).await.expect("a second agent");
        count(&sup, &pid).await;
        count(&sup, &kept).await;
        sup.terminate_child(&pid).await.expect("terminated");
        sup.delete_child(&pid).await.expect("deleted");
        assert_eq!(store.bytes_used(&pid.to_string()), 0);
        sup.stop().await.expect("stopped");
    }
    let store = open(&file, StateQuota::default());
    assert_eq!(
        store.get(&pid.to_string(), "count"),
        Ok(None),
        "gone from disk"
    );
    assert_eq!(store.bytes_used(&pid.to_string()), 0);
    assert_eq!(
        store.get(&kept.to_string(), "count"),
        Ok(Some(1u64.to_le_bytes().to_vec())),
        "another agent's state is kept"
    );
}

/// A store that blocks in `put`, or fails every call once told to.
#[derive(Default)]
struct Troubled {
    /// Block `put` for this long.
    block: Option<Duration>,
    /// Set when a blocked `put` ends.
    ended: AtomicBool,
    /// Fail every call with this, once set.
    fail: std::sync::Mutex<Option<String>>,
}

impl Troubled {
    fn failure(&self) -> Result<(), StateError> {
        match &*self.fail.lock().unwrap() {
            Some(why) => Err(StateError::Backend(why.clone())),
            None => Ok(()),
        }
    }
}

impl StateStore for Troubled {
    fn get(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.failure().map(|()| None)
    }

    fn put(&self, _: &str, _: &str, _: Vec<u8>, _: usize) -> Result<(), StateError> {
        if let Some(block) = self.block {
            std::thread::sleep(block);
            self.ended.store(true, Ordering::SeqCst);
        }
        self.failure()
    }

    fn delete(&self, _: &str, _: &str) -> Result<bool, StateError> {
        self.failure().map(|()| false)
    }

    fn clear(&self, _: &str) -> Result<(), StateError> {
        self.failure()
    }

    fn bytes_used(&self, _: &str) -> usize {
        0
    }
}

/// On a single-threaded runtime, a store that blocks past the deadline:
/// had the store been called on the worker, the deadline's timer could not
/// fire until the store returned.
#[tokio::test(flavor = "current_thread")]
async fn a_blocking_store_is_called_off_the_worker_and_bounded_by_the_deadline() {
    // The deadline also bounds instantiate, init and start: long enough
    // for them on a loaded machine (300 ms was not, under a parallel
    // build), far shorter than the blocked put.
    let store = Arc::new(Troubled {
        block: Some(Duration::from_secs(10)),
        ..Troubled::default()
    });
    let limits = AgentLimits {
        deadline: Duration::from_secs(2),
        ..test_limits()
    };
    let mut agent = started_with("echo", "slow", limits, store.clone()).await;
    assert_eq!(
        agent.handle_message("count").await,
        Err(CallError::Fault(AgentFault::DeadlineExceeded))
    );
    assert!(
        !store.ended.load(Ordering::SeqCst),
        "the call ended at its deadline, before the store's put"
    );
}

#[tokio::test]
async fn a_failing_store_is_an_error_on_put_and_a_crash_on_get() {
    let store = Arc::new(Troubled::default());
    let mut reader = started_with("echo", "reader", test_limits(), store.clone()).await;
    let mut writer = started_with("hostile", "writer", test_limits(), store.clone()).await;
    *store.fail.lock().unwrap() = Some("disk on fire".into());
    // `count` reads first: a failed read is a crash, never "absent".
    match reader.handle_message("count").await {
        Err(CallError::Fault(AgentFault::Host(why))) => {
            assert!(why.contains("disk on fire"), "{why}");
            assert!(why.contains("state get for agent reader"), "{why}");
        }
        other => panic!("expected a host fault, got {other:?}"),
    }
    // `state-fill` only writes: the guest gets the store's error as text.
    let reply = writer.handle_message("state-fill 10").await.unwrap();
    assert_eq!(reply, "stored 0 keys: state backend failed: disk on fire");
    assert!(writer.is_alive());
}

/// A rough cost of a durable `put`, printed (run with `--nocapture`), never
/// asserted: it depends on the disk.
#[test]
fn the_cost_of_a_durable_put_is_printed() {
    let dir = TempDir::new("cost");
    let store = RedbStateStore::open(dir.path("state.redb"), StateQuota::default()).unwrap();
    let n = 200u32;
    let value = 8u64.to_le_bytes().to_vec();
    let start = Instant::now();
    for i in 0..n {
        store
            .put(
                "agent",
                "count",
                u64::from(i).to_le_bytes().to_vec(),
                usize::MAX,
            )
            .unwrap();
    }
    let put = start.elapsed() / n;
    let start = Instant::now();
    for _ in 0..n {
        store.get("agent", "count").unwrap();
    }
    let get = start.elapsed() / n;
    let memory = terraphim_agent_supervisor::MemoryStateStore::default();
    let start = Instant::now();
    for _ in 0..n {
        memory
            .put("agent", "count", value.clone(), usize::MAX)
            .unwrap();
    }
    let in_memory = start.elapsed() / n;
    println!(
        "measurement (not asserted; this machine, {}): durable put of an 8-byte value {put:?}, \
         get {get:?}; in-memory put {in_memory:?}",
        std::env::temp_dir().display()
    );
}

// --- 2. `agent-host`, killed with SIGKILL -----------------------------------

const TREE: &str = r#"
[supervisor]
name = "root"

[[supervisor.children]]
name = "echo"
component = "echo.wasm"
"#;

fn command(dir: &TempDir, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent-host"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env("XDG_RUNTIME_DIR", &dir.0)
        .env("XDG_CACHE_HOME", dir.path("cache"));
    command
}

fn read_all(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn wait_bounded(child: &mut Child, what: &[&str]) -> ExitStatus {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent-host {what:?} did not exit within {HANG_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `agent-host args` to the end (bounded by the hang guard).
fn agent_host(dir: &TempDir, args: &[&str]) -> Output {
    let mut child = command(dir, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent-host runs");
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let status = wait_bounded(&mut child, args);
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `agent-host call TREE echo count`: its reply, or a panic with stderr.
fn call_count(dir: &TempDir, tree: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["call", tree, "echo", "count"];
    args.extend_from_slice(extra);
    let out = agent_host(dir, &args);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "call failed:\n{stderr}");
    (text(&out.stdout).trim_end().to_owned(), stderr)
}

/// An `agent-host run` in the background, started and serving.
struct RunningHost {
    child: Child,
}

impl RunningHost {
    /// Start `agent-host run TREE extra...` and wait for `root/echo` to
    /// have started (its socket is listening by then).
    fn start(dir: &TempDir, tree: &str, extra: &[&str]) -> Self {
        let mut args = vec!["run", tree];
        args.extend_from_slice(extra);
        let mut child = command(dir, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent-host run starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + HANG_GUARD;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains("root/echo") && line.ends_with("started") => break,
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "waiting for root/echo to start: {e:?}; stdout so far:\n{}",
                    seen.join("\n")
                ),
            }
        }
        Self { child }
    }

    /// `kill -KILL` it: no shutdown, no flush, no chance to clean up.
    fn kill(mut self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -KILL failed");
        let status = wait_bounded(&mut self.child, &["run"]);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status:?}"
        );
    }
}

impl Drop for RunningHost {
    fn drop(&mut self) {
        // A failed test must not leave the host running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn a_host_killed_with_sigkill_and_started_again_sees_what_was_committed() {
    let dir = TempDir::new("sigkill");
    dir.write("echo.wasm", ECHO);
    let tree = dir.write("tree.toml", TREE.as_bytes());
    let state = dir.path("tree.state.redb");

    let host = RunningHost::start(&dir, &tree, &[]);
    assert!(state.exists(), "the default state file is beside the tree");
    assert_eq!(call_count(&dir, &tree, &[]).0, "1");
    assert_eq!(call_count(&dir, &tree, &[]).0, "2");
    // Another host of the same tree on another socket reaches the state
    // file's lock, and says so.
    let other_socket = dir.path("other.sock");
    let other = agent_host(
        &dir,
        &["run", &tree, "--socket", other_socket.to_str().unwrap()],
    );
    let stderr = text(&other.stderr);
    assert_eq!(other.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("the state file {} is in use", state.display()))
            && stderr.contains("--state PATH"),
        "{stderr}"
    );
    host.kill();

    // No host: `call` runs the tree for one call, over the same file.
    let (reply, note) = call_count(&dir, &tree, &[]);
    assert_eq!(reply, "3", "{note}");
    assert!(
        note.contains(&format!("state is kept in {}", state.display())),
        "{note}"
    );

    let host = RunningHost::start(&dir, &tree, &[]);
    assert_eq!(call_count(&dir, &tree, &[]).0, "4");
    host.kill();
    let host = RunningHost::start(&dir, &tree, &[]);
    assert_eq!(call_count(&dir, &tree, &[]).0, "5");
    drop(host);
}

#[test]
fn with_state_in_memory_a_restarted_host_starts_afresh() {
    let dir = TempDir::new("memory");
    dir.write("echo.wasm", ECHO);
    let tree = dir.write("tree.toml", TREE.as_bytes());
    for _ in 0..2 {
        let host = RunningHost::start(&dir, &tree, &["--state", "memory"]);
        assert_eq!(call_count(&dir, &tree, &[]).0, "1");
        assert_eq!(call_count(&dir, &tree, &[]).0, "2");
        host.kill();
    }
    let (reply, note) = call_count(&dir, &tree, &["--state", "memory"]);
    assert_eq!(reply, "1");
    assert!(note.contains("state is not kept"), "{note}");
    assert!(
        !dir.path("tree.state.redb").exists(),
        "no state file with --state memory"
    );
    // A file of one's choosing.
    let chosen = dir.path("chosen.redb");
    let chosen = chosen.to_str().unwrap();
    assert_eq!(call_count(&dir, &tree, &["--state", chosen]).0, "1");
    assert_eq!(call_count(&dir, &tree, &["--state", chosen]).0, "2");
}
