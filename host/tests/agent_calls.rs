//! Calls and casts between agents with real guests (the caller agent
//! calling echo, crasher and other callers): a granted call gets its reply
//! (absolute and relative paths); a cycle fails at once with
//! `would-deadlock` instead of waiting for a timeout; a path not granted is
//! `denied` and never reached; a callee's crash reaches the caller as a
//! crash error while the callee is restarted and the caller lives on; a
//! cast is queued without waiting; a message quarantined for the callee
//! (it crashed it too often) is refused to calls and casts alike.

mod common;

use std::time::{Duration, Instant};

use common::{test_limits, wait_for, wasm_factory};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentLimits, AgentSpec, AgentSupervisor, CallPattern, ChildSpec, EventKind, RunningTree,
    SupervisorConfig, SupervisorSpec, TreeCallError,
};

/// Hang guard of every wait (never a timing assertion).
const HANG_GUARD: Duration = Duration::from_secs(30);

/// Timeouts of the calls in the cycle tests: long, so that a cycle that
/// were not detected would be seen to wait.
const LONG: u32 = 60_000;

fn patterns(calls: &[&str]) -> Vec<CallPattern> {
    calls
        .iter()
        .map(|c| CallPattern::parse(c).expect("a valid pattern"))
        .collect()
}

/// A caller agent named `name` that may call `calls`, with a deadline long
/// enough to wait for the longest call.
fn caller(name: &str, calls: &[&str]) -> AgentSpec {
    AgentSpec::new("caller".into(), json!({}))
        .with_name(name.into())
        .with_calls(patterns(calls))
        .with_limits(AgentLimits {
            deadline: Duration::from_millis(u64::from(LONG) * 2),
            ..test_limits()
        })
}

fn agent(agent_type: &str, name: &str) -> AgentSpec {
    AgentSpec::new(agent_type.into(), json!({})).with_name(name.into())
}

async fn tree(children: Vec<ChildSpec>) -> RunningTree {
    let config = SupervisorConfig {
        agent_timeout: Duration::from_millis(u64::from(LONG) * 3),
        ..SupervisorConfig::default()
    };
    let mut root = AgentSupervisor::new(config, wasm_factory());
    for child in children {
        root = root.with_child(child);
    }
    RunningTree::start(root).await.expect("the tree starts")
}

async fn call(tree: &RunningTree, path: &str, message: &str) -> Result<String, TreeCallError> {
    tree.call(path, message.to_owned()).await
}

/// The application error a call ended with.
fn application(result: Result<String, TreeCallError>) -> String {
    match result {
        Err(TreeCallError::Application { error, .. }) => error,
        other => panic!("expected an application error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_b_and_gets_its_reply() {
    let tools = SupervisorSpec::new(SupervisorConfig::default(), wasm_factory())
        .with_name("tools".into())
        .with_child(agent("echo", "search"));
    let mut tree = tree(vec![
        caller("a", &["b", "root/tools/*"]).into(),
        agent("echo", "b").into(),
        tools.into(),
    ])
    .await;

    assert_eq!(
        call(&tree, "root/a", "call b 5000 hello").await.unwrap(),
        "echo: hello",
        "a sibling, by a relative path"
    );
    assert_eq!(
        call(&tree, "root/a", "call root/b 5000 again")
            .await
            .unwrap(),
        "echo: again",
        "by its absolute path"
    );
    assert_eq!(
        call(&tree, "root/a", "call tools/search 5000 deep")
            .await
            .unwrap(),
        "echo: deep",
        "below a sibling supervisor, granted by a wildcard"
    );
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_fails_at_once_with_would_deadlock() {
    // `team/x` is made by another factory than the others: cycles are
    // the tree's, whichever factories made its agents.
    let team = SupervisorSpec::new(SupervisorConfig::default(), wasm_factory())
        .with_name("team".into())
        .with_child(caller("x", &["../a"]));
    let mut tree = tree(vec![
        caller("a", &["b", "a", "team/x"]).into(),
        caller("b", &["a", "c"]).into(),
        caller("c", &["a"]).into(),
        team.into(),
    ])
    .await;

    // A calls B, which calls A while A waits for it.
    let started = Instant::now();
    let error = application(
        call(
            &tree,
            "root/a",
            &format!("call b {LONG} call a {LONG} ping"),
        )
        .await,
    );
    assert!(
        error.starts_with("application: would-deadlock: root/b calls root/a"),
        "{error}"
    );
    // Through three agents: A waits for B, B for C, C calls A.
    let error = application(
        call(
            &tree,
            "root/a",
            &format!("call b {LONG} call c {LONG} call a {LONG} ping"),
        )
        .await,
    );
    assert!(
        error.contains("would-deadlock: root/c calls root/a"),
        "{error}"
    );
    // Through an agent of another factory.
    let error = application(
        call(
            &tree,
            "root/a",
            &format!("call team/x {LONG} call ../a {LONG} ping"),
        )
        .await,
    );
    assert!(
        error.starts_with("application: would-deadlock: root/team/x calls root/a"),
        "{error}"
    );
    // An agent calling itself.
    let error = application(call(&tree, "root/a", &format!("call a {LONG} ping")).await);
    assert!(error.starts_with("would-deadlock"), "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(u64::from(LONG) / 2),
        "the cycles were refused, not waited out"
    );

    // Nothing is left waiting: the same agents call each other again.
    assert_eq!(
        call(&tree, "root/a", &format!("call b {LONG} ping"))
            .await
            .unwrap(),
        "pong"
    );
    assert_eq!(
        call(&tree, "root/b", &format!("call a {LONG} ping"))
            .await
            .unwrap(),
        "pong"
    );
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_calling_each_other_at_once_never_deadlock() {
    // Two independent calls from outside: A calls B while B, handling
    // another message, calls A. No chain of callers links them; the
    // tree's wait-for graph does. Whichever call comes second (if they
    // overlap at all) is refused; neither waits for its timeout.
    let mut tree = tree(vec![caller("a", &["b"]).into(), caller("b", &["a"]).into()]).await;
    let (a_to_b, b_to_a) = (format!("call b {LONG} ping"), format!("call a {LONG} ping"));
    let started = Instant::now();
    for _ in 0..20 {
        let (from_a, from_b) = tokio::join!(
            call(&tree, "root/a", &a_to_b),
            call(&tree, "root/b", &b_to_a),
        );
        for outcome in [from_a, from_b] {
            match outcome {
                Ok(reply) => assert_eq!(reply, "pong"),
                Err(TreeCallError::Application { error, .. }) => {
                    assert!(error.starts_with("would-deadlock"), "{error}")
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_millis(u64::from(LONG) / 2),
        "no call waited out its timeout"
    );
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_not_granted_is_denied_and_never_reached() {
    let mut tree = tree(vec![
        caller("a", &["b"]).into(),
        agent("echo", "b").into(),
        agent("echo", "c").into(),
        caller("nothing", &[]).into(),
    ])
    .await;

    let error = application(call(&tree, "root/a", "call c 5000 count").await);
    assert!(
        error.starts_with("denied: root/a may not call root/c"),
        "{error}"
    );
    let error = application(call(&tree, "root/a", "cast root/c count").await);
    assert!(error.starts_with("denied"), "{error}");
    let error = application(call(&tree, "root/nothing", "call b 5000 count").await);
    assert!(error.starts_with("denied"), "deny-by-default: {error}");
    assert_eq!(
        call(&tree, "root/c", "get").await.unwrap(),
        "0",
        "the denied calls never reached c"
    );

    // Malformed paths and timeouts are refused before anything else.
    let error = application(call(&tree, "root/a", "call b//x 5000 hi").await);
    assert!(error.starts_with("invalid"), "{error}");
    let error = application(call(&tree, "root/a", "call b 0 hi").await);
    assert!(error.starts_with("invalid"), "{error}");
    let error = application(call(&tree, "root/a", "call ../.. 5000 hi").await);
    assert!(error.starts_with("invalid"), "{error}");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callees_crash_reaches_the_caller_while_the_callee_is_restarted() {
    let mut tree = tree(vec![
        caller("a", &["crasher"]).into(),
        agent("crasher", "crasher").into(),
    ])
    .await;
    let mut events = tree.subscribe();

    let error = application(call(&tree, "root/a", "call crasher 5000 panic").await);
    assert!(
        error.starts_with("crashed: guest panic"),
        "the fault reaches the caller: {error}"
    );
    wait_for(&mut events, |e| {
        e.path() == "root/crasher" && matches!(e.kind(), EventKind::ChildRestarted { .. })
    })
    .await;
    assert_eq!(
        call(&tree, "root/a", "call crasher 5000 ping")
            .await
            .unwrap(),
        "pong",
        "the restarted callee answers"
    );
    let a = tree
        .status()
        .into_iter()
        .find(|n| n.path == "root/a")
        .unwrap();
    assert_eq!(a.restart_count, 0, "the caller did not crash");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cast_is_queued_without_waiting() {
    let mut tree = tree(vec![
        caller("a", &["b", "a"]).into(),
        agent("echo", "b").into(),
    ])
    .await;
    assert_eq!(call(&tree, "root/a", "cast b count").await.unwrap(), "cast");
    // An agent may cast to itself: the message waits in its own mailbox.
    assert_eq!(
        call(&tree, "root/a", "cast a record to-myself")
            .await
            .unwrap(),
        "cast"
    );
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let count = call(&tree, "root/b", "get").await.unwrap();
        let log = call(&tree, "root/a", "log").await.unwrap();
        if count == "1" && log == "to-myself" {
            break;
        }
        assert!(Instant::now() < deadline, "count {count}, log {log:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_message_is_refused_to_calls_and_casts_between_agents() {
    let mut tree = tree(vec![
        caller("a", &["crasher"]).into(),
        agent("crasher", "crasher").into(),
    ])
    .await;
    let mut events = tree.subscribe();

    // The default poison threshold: three crashes in a row on one message
    // (the third is quarantined before its restart).
    for crash in 1..=3 {
        let error = application(call(&tree, "root/a", "call crasher 5000 panic").await);
        assert!(error.starts_with("crashed: guest panic"), "{error}");
        if crash == 3 {
            let quarantined = wait_for(&mut events, |e| {
                matches!(e.kind(), EventKind::MessageQuarantined { .. })
            })
            .await;
            assert_eq!(quarantined.path(), "root/crasher");
        }
        wait_for(&mut events, |e| {
            e.path() == "root/crasher" && matches!(e.kind(), EventKind::ChildRestarted { .. })
        })
        .await;
    }

    // Neither a call nor a cast delivers it again; both say why.
    let error = application(call(&tree, "root/a", "call crasher 5000 panic").await);
    assert!(
        error.starts_with("invalid: ") && error.contains("quarantined"),
        "{error}"
    );
    let error = application(call(&tree, "root/a", "cast crasher panic").await);
    assert!(
        error.starts_with("invalid: ") && error.contains("quarantined"),
        "{error}"
    );
    assert_eq!(
        call(&tree, "root/a", "call crasher 5000 ping")
            .await
            .unwrap(),
        "pong",
        "other messages still reach it"
    );
    let crasher = tree
        .status()
        .into_iter()
        .find(|n| n.path == "root/crasher")
        .unwrap();
    assert_eq!(
        crasher.restart_count, 3,
        "the quarantined message never ran"
    );
    tree.stop().await.unwrap();
}
