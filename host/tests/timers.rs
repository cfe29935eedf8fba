//! Timers with real guests (the caller agent): a timer delivers its message
//! once, after its delay; a cancelled one never; a timer dies with the
//! instance that set it (a restarted agent re-arms in `init`); a crash while
//! handling a timer's message is a crash like any other (with a crash
//! report that names the message); timers are
//! deny-by-default and bounded.
//!
//! Nothing here asserts how fast anything happens: a timer that must not
//! fire is shown not to have fired once a later timer has.

mod common;

use std::time::{Duration, Instant};

use common::{test_limits, wait_for, wasm_factory};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentFault, AgentLimits, AgentSpec, AgentSupervisor, EventKind, ExitReason, RunningTree,
    SupervisorConfig, TreeCallError,
};

/// Hang guard of every wait (never a timing assertion).
const HANG_GUARD: Duration = Duration::from_secs(30);

/// A caller agent named `name` that may have `max_timers` timers.
fn caller(name: &str, max_timers: u32, config: serde_json::Value) -> AgentSpec {
    AgentSpec::new("caller".into(), config)
        .with_name(name.into())
        .with_limits(AgentLimits {
            max_timers,
            ..test_limits()
        })
}

async fn tree(children: Vec<AgentSpec>) -> RunningTree {
    let mut root = AgentSupervisor::new(SupervisorConfig::default(), wasm_factory());
    for child in children {
        root = root.with_child(child);
    }
    RunningTree::start(root).await.expect("the tree starts")
}

async fn call(tree: &RunningTree, path: &str, message: &str) -> Result<String, TreeCallError> {
    tree.call(path, message.to_owned()).await
}

/// The labels the agent at `path` recorded, once `done` says they are
/// complete.
async fn log_until(tree: &RunningTree, path: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let log = call(tree, path, "log").await.expect("log");
        if done(&log) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{path}'s log never became complete: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_delivers_its_message_once_after_its_delay() {
    let mut tree = tree(vec![caller("t", 4, json!({}))]).await;
    let set = Instant::now();
    let first = call(&tree, "root/t", "schedule 50 record once")
        .await
        .unwrap();
    let second = call(&tree, "root/t", "schedule 200 record later")
        .await
        .unwrap();
    assert_ne!(first, second, "each timer has its own id");

    let log = log_until(&tree, "root/t", |log| log.contains("later")).await;
    assert_eq!(log, "once,later", "each delivered once, in due order");
    assert!(
        set.elapsed() >= Duration::from_millis(200),
        "not before its delay"
    );
    // Fired timers are gone: cancelling one says so.
    assert_eq!(
        call(&tree, "root/t", &format!("cancel {first}"))
            .await
            .unwrap(),
        "false"
    );
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_timer_never_fires() {
    let mut tree = tree(vec![caller("t", 4, json!({}))]).await;
    let id = call(&tree, "root/t", "schedule 50 record cancelled")
        .await
        .unwrap();
    assert_eq!(
        call(&tree, "root/t", &format!("cancel {id}"))
            .await
            .unwrap(),
        "true"
    );
    assert_eq!(
        call(&tree, "root/t", &format!("cancel {id}"))
            .await
            .unwrap(),
        "false",
        "cancelled once"
    );
    call(&tree, "root/t", "schedule 200 record after")
        .await
        .unwrap();

    // The second timer was due after the first would have been.
    let log = log_until(&tree, "root/t", |log| log.contains("after")).await;
    assert_eq!(log, "after");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_die_with_the_instance_that_set_them() {
    let mut tree = tree(vec![caller("t", 4, json!({}))]).await;
    let mut events = tree.subscribe();
    call(&tree, "root/t", "schedule 100 record before-crash")
        .await
        .unwrap();
    let crash = call(&tree, "root/t", "panic").await.unwrap_err();
    assert!(
        matches!(
            crash,
            TreeCallError::Crashed {
                fault: AgentFault::Panic,
                ..
            }
        ),
        "{crash}"
    );
    wait_for(&mut events, |e| {
        e.path() == "root/t" && matches!(e.kind(), EventKind::ChildRestarted { .. })
    })
    .await;

    // A timer of the new instance, due after the old one would have been.
    call(&tree, "root/t", "schedule 300 record after-restart")
        .await
        .unwrap();
    let log = log_until(&tree, "root/t", |log| log.contains("after-restart")).await;
    assert_eq!(
        log, "after-restart",
        "the crashed instance's timer died with it"
    );
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_rearms_its_timers_in_init() {
    let mut tree = tree(vec![caller("t", 4, json!({ "init_timer_ms": 20 }))]).await;
    let mut events = tree.subscribe();
    log_until(&tree, "root/t", |log| log == "init-timer").await;

    let _ = call(&tree, "root/t", "panic").await.unwrap_err();
    wait_for(&mut events, |e| {
        e.path() == "root/t" && matches!(e.kind(), EventKind::ChildRestarted { .. })
    })
    .await;
    let log = log_until(&tree, "root/t", |log| {
        log.matches("init-timer").count() == 2
    })
    .await;
    assert_eq!(log, "init-timer,init-timer");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_handling_a_timer_is_a_crash_like_any_other() {
    let mut tree = tree(vec![caller("t", 4, json!({}))]).await;
    let mut events = tree.subscribe();
    call(&tree, "root/t", "schedule 10 panic").await.unwrap();
    // Its crash report, as for a message sent by a caller: the message,
    // its sequence number in the incarnation (the `schedule` call was the
    // first) and hash, and what the guest wrote.
    let exited = wait_for(&mut events, |e| {
        e.path() == "root/t" && matches!(e.kind(), EventKind::ChildExited { .. })
    })
    .await;
    let EventKind::ChildExited {
        crash: Some(report),
        ..
    } = exited.kind()
    else {
        panic!("no crash report: {exited:?}")
    };
    assert_eq!(report.message.as_deref(), Some("panic"), "{report:?}");
    assert_eq!(report.sequence, Some(2), "{report:?}");
    assert!(report.message_hash.is_some(), "{report:?}");
    assert!(
        report.output.join("\n").contains("asked to panic"),
        "{report:?}"
    );
    let restarted = wait_for(&mut events, |e| {
        e.path() == "root/t" && matches!(e.kind(), EventKind::ChildRestarted { .. })
    })
    .await;
    let EventKind::ChildRestarted { cause, .. } = restarted.kind() else {
        unreachable!()
    };
    assert_eq!(cause.reason, ExitReason::Fault(AgentFault::Panic));
    assert_eq!(call(&tree, "root/t", "ping").await.unwrap(), "pong");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_are_deny_by_default_and_bounded() {
    let mut tree = tree(vec![
        caller("none", 0, json!({})),
        caller("two", 2, json!({})),
    ])
    .await;
    let refused = call(&tree, "root/none", "schedule 10 record x")
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("NotGranted"), "{refused}");

    call(&tree, "root/two", "schedule 60000 record a")
        .await
        .unwrap();
    call(&tree, "root/two", "schedule 60000 record b")
        .await
        .unwrap();
    let third = call(&tree, "root/two", "schedule 60000 record c")
        .await
        .unwrap_err();
    assert!(third.to_string().contains("TooMany(2)"), "{third}");

    let month = 31 * 24 * 3600 * 1000_u64;
    let too_long = call(&tree, "root/two", &format!("schedule {month} record x"))
        .await
        .unwrap_err();
    assert!(too_long.to_string().contains("DelayTooLong"), "{too_long}");
    tree.stop().await.unwrap();
}
