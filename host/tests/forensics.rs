//! Crashes you can debug, and poison messages quarantined: each crash
//! record (history entry, status, event) carries its report, and a message
//! that crashes its agent `poison_threshold` times in a row is kept as a
//! dead letter instead of being delivered again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cli::{RunningHost, TempDir, text};
use common::{component, runtime, test_limits, wait_for};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentFault, AgentPid, AgentSpec, AgentSupervisor, CrashReport, EventKind, MAX_REPORT_MESSAGE,
    MemoryStateStore, RedbStateStore, RestartAction, RestartIntensity, RestartPolicy,
    RestartStrategy, StateQuota, StateStore, SupervisionError, SupervisorConfig, SupervisorEvent,
    TestAgentFactory, WasiGrants, WasmAgentFactory,
};
use tokio::sync::broadcast::Receiver;

fn config() -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForOne,
            RestartIntensity::new(100, Duration::from_secs(60)),
        ),
        agent_timeout: Duration::from_secs(20),
        ..SupervisorConfig::default()
    }
}

/// A root over `spec` (a crasher agent), its state in `store`.
async fn tree(
    spec: AgentSpec,
    store: Arc<dyn StateStore>,
) -> (AgentSupervisor, Receiver<SupervisorEvent>, AgentPid) {
    let factory = WasmAgentFactory::new(runtime().clone())
        .with_default_limits(test_limits())
        .with_component("crasher", component("crasher"))
        .with_state_store(store);
    let pid = spec.agent_id.clone();
    let mut sup = AgentSupervisor::new(config(), Arc::new(factory)).with_child(spec);
    let events = sup.subscribe();
    sup.start().await.expect("the tree starts");
    (sup, events, pid)
}

fn crasher() -> AgentSpec {
    AgentSpec::new("crasher".into(), json!({})).with_name("crasher".into())
}

async fn restarted(events: &mut Receiver<SupervisorEvent>, pid: &AgentPid) {
    wait_for(
        events,
        |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if agent == pid),
    )
    .await;
}

/// The crash report of the last `ChildExited` event.
async fn exited(events: &mut Receiver<SupervisorEvent>) -> Box<CrashReport> {
    let event = wait_for(events, |e| matches!(e.kind, EventKind::ChildExited { .. })).await;
    match event.kind {
        EventKind::ChildExited {
            crash: Some(crash), ..
        } => crash,
        other => panic!("no crash report in {other:?}"),
    }
}

// --- crash reports ------------------------------------------------------------

#[tokio::test]
async fn a_rust_guests_crash_report_has_its_panic_message_and_function_names() {
    let store = Arc::new(MemoryStateStore::default());
    let (mut sup, mut events, pid) = tree(crasher(), store).await;
    assert_eq!(sup.call(&pid, "ping".into()).await.unwrap(), "pong");
    assert!(matches!(
        sup.call(&pid, "panic".into()).await,
        Err(SupervisionError::AgentCrashed(_, AgentFault::Panic))
    ));
    let report = exited(&mut events).await;
    assert_eq!(report.fault, "guest panic (unreachable)");
    let output = report.output.join("\n");
    assert!(
        output.contains("crasher: asked to panic"),
        "the panic message, from the guest's (not granted) stderr:\n{output}"
    );
    // Named frames (from the component's name section, demangled): the
    // panic machinery down to the export the host called. (The agent's own
    // function is inlined into the export by the release build.)
    let frames = report.backtrace.join("\n");
    assert!(
        frames.contains("core::panicking::panic_fmt")
            && frames.contains("terraphim:agent/agent@0.1.1#handle-message"),
        "function names in the backtrace:\n{frames}"
    );
    assert_eq!(report.message.as_deref(), Some("panic"));
    assert_eq!(
        report.sequence,
        Some(2),
        "the second message of its incarnation"
    );
    assert_eq!(report.message_hash.as_deref().map(str::len), Some(16));
    assert!(
        report.fuel_used > 0 && report.memory_bytes > 0,
        "{report:?}"
    );

    // The same report in the history and in the status.
    restarted(&mut events, &pid).await;
    let history = sup.get_restart_history().await;
    assert_eq!(history[0].crash.as_deref(), Some(&*report));
    let info = sup.get_children().await[0].1.clone();
    assert_eq!(info.last_crash.as_deref(), Some(&*report));
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn the_output_kept_is_bounded_and_a_granted_stderr_is_kept_too() {
    let store = Arc::new(MemoryStateStore::default());
    let mut limits = test_limits();
    limits.crash_output_bytes = 40;
    let spec = crasher().with_limits(limits).with_wasi(WasiGrants {
        inherit_stderr: true,
        ..WasiGrants::default()
    });
    let (mut sup, mut events, pid) = tree(spec, store).await;
    sup.call(&pid, "panic".into()).await.unwrap_err();
    let report = exited(&mut events).await;
    let kept: usize = report.output.iter().map(|l| l.len()).sum();
    assert!(kept <= 40 + "…".len(), "{:?}", report.output);
    assert!(
        report.output.concat().ends_with("to display a backtrace"),
        "the end of what it wrote: {:?}",
        report.output
    );
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn a_native_agents_crash_is_reported_with_its_message_cut() {
    let spec = AgentSpec::new("test".into(), json!({}));
    let pid = spec.agent_id.clone();
    let mut sup = AgentSupervisor::new(config(), Arc::new(TestAgentFactory)).with_child(spec);
    let mut events = sup.subscribe();
    sup.start().await.unwrap();
    // The test agent exits with the error it is sent.
    let message = format!("exit:{}", "x".repeat(10_000));
    sup.call(&pid, message).await.unwrap_err();
    let report = exited(&mut events).await;
    assert!(report.fault.starts_with("error: xxx"), "{}", report.fault);
    let kept = report.message.as_deref().expect("the message");
    assert!(kept.len() <= MAX_REPORT_MESSAGE && kept.starts_with("exit:xxx"));
    assert!(kept.ends_with("[cut: 10005 bytes in all]"), "{kept}");
    assert_eq!(report.sequence, Some(1));
    assert!(
        report.backtrace.is_empty(),
        "a native agent has no WASM frames"
    );
    sup.stop().await.unwrap();
}

// --- quarantine ---------------------------------------------------------------

#[tokio::test]
async fn a_poison_message_is_quarantined_and_the_agent_serves_the_next_one() {
    let store = Arc::new(MemoryStateStore::default());
    let (mut sup, mut events, pid) = tree(crasher().with_poison_threshold(3), store).await;
    for _ in 0..2 {
        assert!(matches!(
            sup.call(&pid, "panic".into()).await,
            Err(SupervisionError::AgentCrashed(..))
        ));
        restarted(&mut events, &pid).await;
    }
    assert!(matches!(
        sup.call(&pid, "panic".into()).await,
        Err(SupervisionError::AgentCrashed(..))
    ));
    let quarantined = wait_for(&mut events, |e| {
        matches!(e.kind, EventKind::MessageQuarantined { .. })
    })
    .await;
    restarted(&mut events, &pid).await;
    let EventKind::MessageQuarantined { hash, .. } = quarantined.kind else {
        unreachable!()
    };
    // The fourth time it is refused at once, and not delivered.
    match sup.call(&pid, "panic".into()).await {
        Err(SupervisionError::Quarantined { agent, hash: h }) => {
            assert_eq!((agent, h), (pid.clone(), hash.clone()));
        }
        other => panic!("expected Quarantined, got {other:?}"),
    }
    assert_eq!(sup.call(&pid, "ping".into()).await.unwrap(), "pong");
    let info = sup.get_children().await[0].1.clone();
    assert_eq!(
        info.restart_count, 3,
        "no restart for the quarantined message"
    );

    let handle = sup.handle().unwrap();
    let letters = handle.dead_letters(&pid).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message, "panic");
    assert_eq!(letters[0].hash, hash);
    assert_eq!(
        letters[0].crashes.len(),
        3,
        "the reports of its three crashes"
    );
    assert!(
        letters[0]
            .crashes
            .iter()
            .all(|c| c.message.as_deref() == Some("panic"))
    );
    let history = sup.get_restart_history().await;
    assert!(
        history
            .iter()
            .any(|e| e.action == RestartAction::Quarantined { hash: hash.clone() })
    );

    // Replayed, it is delivered once more (and crashes again, counting
    // from one); discarded, it is gone.
    assert!(matches!(
        handle.replay_dead_letter(&pid, &hash).await,
        Err(SupervisionError::AgentCrashed(..))
    ));
    restarted(&mut events, &pid).await;
    assert!(handle.dead_letters(&pid).await.unwrap().is_empty());
    assert!(matches!(
        handle.discard_dead_letter(&pid, &hash).await,
        Err(SupervisionError::NodeNotFound(_))
    ));
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn crashes_on_different_messages_do_not_quarantine_and_zero_turns_it_off() {
    let store = Arc::new(MemoryStateStore::default());
    let (mut sup, mut events, pid) = tree(crasher().with_poison_threshold(2), store).await;
    for message in ["panic", "unreachable", "panic", "unreachable"] {
        sup.call(&pid, message.into()).await.unwrap_err();
        restarted(&mut events, &pid).await;
    }
    assert!(
        sup.handle()
            .unwrap()
            .dead_letters(&pid)
            .await
            .unwrap()
            .is_empty()
    );
    sup.stop().await.unwrap();

    let store = Arc::new(MemoryStateStore::default());
    let (mut sup, mut events, pid) = tree(crasher().with_poison_threshold(0), store).await;
    for _ in 0..4 {
        sup.call(&pid, "panic".into()).await.unwrap_err();
        restarted(&mut events, &pid).await;
    }
    assert!(
        sup.handle()
            .unwrap()
            .dead_letters(&pid)
            .await
            .unwrap()
            .is_empty()
    );
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_durable_with_a_durable_store() {
    let dir = TempDir::new("dead-letters");
    let file = dir.path("state.redb");
    let spec = crasher().with_poison_threshold(1);
    let pid = spec.agent_id.clone();
    {
        let store = Arc::new(RedbStateStore::open(&file, StateQuota::default()).unwrap());
        let (mut sup, mut events, _) = tree(spec.clone(), store).await;
        sup.call(&pid, "panic".into()).await.unwrap_err();
        wait_for(&mut events, |e| {
            matches!(e.kind, EventKind::MessageQuarantined { .. })
        })
        .await;
        sup.stop().await.unwrap();
    }
    // A new host over the same file: still quarantined.
    let store = Arc::new(RedbStateStore::open(&file, StateQuota::default()).unwrap());
    let (mut sup, _events, _) = tree(spec, store).await;
    assert!(matches!(
        sup.call(&pid, "panic".into()).await,
        Err(SupervisionError::Quarantined { .. })
    ));
    assert_eq!(
        sup.handle()
            .unwrap()
            .dead_letters(&pid)
            .await
            .unwrap()
            .len(),
        1
    );
    sup.stop().await.unwrap();
}

// --- the command line -----------------------------------------------------------

const TREE: &str = r#"
[supervisor]
name = "root"
max_restarts = 100

[[supervisor.children]]
name = "crasher"
component = "crasher.wasm"
poison_threshold = 2
"#;

#[test]
fn status_crashes_and_dead_letters_show_what_happened() {
    let dir = TempDir::new("forensics-cli");
    let tree = dir.write("tree.toml", TREE);
    let mut host = RunningHost::start(&dir, &["run", &tree, "--json", "--state", "memory"]);
    host.wait_for("the crasher to start", |seen| {
        seen.iter().any(|l| l.contains(r#""ChildStarted""#))
    });
    for round in 1..=2 {
        let crash = dir.agent_host(&["call", &tree, "crasher", "panic"]);
        assert_eq!(crash.status.code(), Some(1), "{}", text(&crash.stderr));
        host.wait_for("the restart", |seen| {
            seen.iter()
                .filter(|l| l.contains(r#""ChildRestarted""#))
                .count()
                >= round
        });
    }
    let quarantined = dir.agent_host(&["call", &tree, "crasher", "panic"]);
    assert!(
        text(&quarantined.stderr).contains("is quarantined"),
        "{}",
        text(&quarantined.stderr)
    );

    let crashes = dir.agent_host(&["status", &tree, "--crashes", "crasher"]);
    let out = text(&crashes.stdout);
    assert_eq!(crashes.status.code(), Some(0), "{}", text(&crashes.stderr));
    for needle in [
        "guest panic (unreachable)",
        "message #1",
        "\"panic\"",
        "backtrace:",
        "core::panicking::panic_fmt",
        "last output:",
        "crasher: asked to panic",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }

    let letters = dir.agent_host(&["dead-letters", &tree, "--json"]);
    let line = text(&letters.stdout);
    let letter: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert_eq!(letter["path"], "root/crasher");
    assert_eq!(letter["letter"]["message"], "panic");
    let hash = letter["letter"]["hash"]
        .as_str()
        .expect("a hash")
        .to_owned();
    let discard = dir.agent_host(&["dead-letters", &tree, "crasher", "--discard", &hash]);
    assert_eq!(discard.status.code(), Some(0), "{}", text(&discard.stderr));
    let none = dir.agent_host(&["dead-letters", &tree]);
    assert_eq!(text(&none.stdout), "no dead letters\n");
    let (status, _) = host.stop();
    assert!(status.success());
}
