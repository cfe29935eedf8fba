//! Supervision semantics (SPEC section 4) with real WASM guests.

mod common;

use std::time::Duration;

use common::{wait_for, wasm_factory};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentFault, AgentPid, AgentSpec, AgentStatus, AgentSupervisor, EventKind, ExitReason,
    RestartAction, RestartIntensity, RestartPolicy, RestartStrategy, RestartType, ShutdownPolicy,
    SupervisionError, SupervisorConfig, SupervisorEvent, SupervisorSpec, SupervisorStatus,
};
use tokio::sync::broadcast::Receiver;

fn config(strategy: RestartStrategy, max_restarts: u32, window: Duration) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(strategy, RestartIntensity::new(max_restarts, window)),
        agent_timeout: Duration::from_secs(20),
        ..SupervisorConfig::default()
    }
}

fn spec(agent_type: &str, name: &str) -> AgentSpec {
    AgentSpec::new(agent_type.into(), json!({})).with_name(name.into())
}

/// A started supervisor with `specs` as initial children, and its events.
async fn tree(
    config: SupervisorConfig,
    specs: &[AgentSpec],
) -> (AgentSupervisor, Receiver<SupervisorEvent>) {
    let mut sup = AgentSupervisor::new(config, wasm_factory());
    for s in specs {
        sup = sup.with_child(s.clone());
    }
    let events = sup.subscribe();
    sup.start().await.expect("tree starts");
    (sup, events)
}

async fn restarted(events: &mut Receiver<SupervisorEvent>, pid: &AgentPid) {
    wait_for(
        events,
        |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if agent == pid),
    )
    .await;
}

/// The ids of `ChildStopped` and `ChildRestarted` events until `last` is
/// restarted.
async fn stops_and_restarts(
    events: &mut Receiver<SupervisorEvent>,
    last: &AgentPid,
) -> (Vec<AgentPid>, Vec<AgentPid>) {
    let (mut stopped, mut started) = (Vec::new(), Vec::new());
    loop {
        match wait_for(events, |_| true).await.kind {
            EventKind::ChildStopped { agent, .. } => stopped.push(agent),
            EventKind::ChildRestarted { agent, .. } => {
                let done = &agent == last;
                started.push(agent);
                if done {
                    return (stopped, started);
                }
            }
            _ => {}
        }
    }
}

async fn restart_counts(sup: &AgentSupervisor) -> Vec<u32> {
    sup.get_children()
        .await
        .into_iter()
        .map(|(_, info)| info.restart_count)
        .collect()
}

#[tokio::test]
async fn one_for_one_restarts_only_the_crashed_child() {
    let specs = [spec("echo", "a"), spec("crasher", "b"), spec("echo", "c")];
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        &specs,
    )
    .await;
    let b = specs[1].agent_id.clone();
    let before = sup.get_children().await[1].1.start_time;

    let err = sup.call(&b, "panic".into()).await.unwrap_err();
    assert!(
        matches!(err, SupervisionError::AgentCrashed(_, AgentFault::Panic)),
        "{err:?}"
    );
    restarted(&mut events, &b).await;
    assert_eq!(sup.call(&b, "ping".into()).await.unwrap(), "pong");
    assert_eq!(restart_counts(&sup).await, vec![0, 1, 0]);
    let after = &sup.get_children().await[1].1;
    assert!(
        after.start_time > before,
        "start time is the new instance's"
    );
    assert_eq!(after.last_exit, Some(ExitReason::Fault(AgentFault::Panic)));

    let history = sup.get_restart_history().await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].agent_id, b);
    assert_eq!(history[0].reason, ExitReason::Fault(AgentFault::Panic));
    assert_eq!(history[0].action, RestartAction::Restarted);
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn one_for_all_stops_the_others_in_reverse_and_restarts_all_in_order() {
    let specs = [spec("echo", "a"), spec("crasher", "b"), spec("echo", "c")];
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForAll, 5, Duration::from_secs(60)),
        &specs,
    )
    .await;
    let [a, b, c] = specs.map(|s| s.agent_id);
    sup.call(&b, "unreachable".into()).await.unwrap_err();
    let (stopped, started) = stops_and_restarts(&mut events, &c).await;
    assert_eq!(stopped, vec![c.clone(), a.clone()]);
    assert_eq!(started, vec![a.clone(), b.clone(), c.clone()]);
    assert_eq!(restart_counts(&sup).await, vec![1, 1, 1]);
    let actions: Vec<_> = sup
        .get_restart_history()
        .await
        .into_iter()
        .map(|e| (e.agent_id, e.action))
        .collect();
    assert_eq!(
        actions,
        vec![
            (b.clone(), RestartAction::Restarted),
            (a, RestartAction::RestartedWithSibling(b.clone())),
            (c, RestartAction::RestartedWithSibling(b)),
        ]
    );
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    let specs = [
        spec("echo", "a"),
        spec("crasher", "b"),
        spec("echo", "c"),
        spec("echo", "d"),
    ];
    let (mut sup, mut events) = tree(
        config(RestartStrategy::RestForOne, 5, Duration::from_secs(60)),
        &specs,
    )
    .await;
    let [a, b, c, d] = specs.map(|s| s.agent_id);
    sup.call(&b, "oob".into()).await.unwrap_err();
    let (stopped, started) = stops_and_restarts(&mut events, &d).await;
    assert_eq!(stopped, vec![d.clone(), c.clone()]);
    assert_eq!(started, vec![b, c, d]);
    assert_eq!(restart_counts(&sup).await, vec![0, 1, 1, 1]);
    assert_eq!(sup.call(&a, "hi".into()).await.unwrap(), "echo: hi");
    sup.stop().await.unwrap();
}

/// One row of the restart-type table: how a child of `restart_type`
/// exiting by `how` is handled.
async fn restart_type_row(restart_type: RestartType, how: &str) -> (bool, bool, RestartAction) {
    let child = spec("exit", "x").with_restart_type(restart_type);
    let other = spec("echo", "o");
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        &[child.clone(), other],
    )
    .await;
    let pid = child.agent_id.clone();
    match how {
        "normal" => drop(sup.call(&pid, "exit 0".into()).await.unwrap_err()),
        "abnormal" => drop(sup.call(&pid, "exit 1".into()).await.unwrap_err()),
        _ => sup
            .handle_agent_exit(pid.clone(), ExitReason::Shutdown)
            .await
            .unwrap(),
    }
    let entry = loop {
        wait_for(&mut events, |e| {
            matches!(&e.kind, EventKind::ChildExited { .. })
        })
        .await;
        let history = sup.get_restart_history().await;
        if let Some(entry) = history.into_iter().find(|e| e.agent_id == pid) {
            break entry;
        }
    };
    if entry.action == RestartAction::Restarted {
        restarted(&mut events, &pid).await;
    }
    let children = sup.get_children().await;
    let kept = children.iter().find(|(p, _)| *p == pid);
    let running = kept.is_some_and(|(_, info)| info.status == AgentStatus::Running);
    sup.stop().await.unwrap();
    (kept.is_some(), running, entry.action)
}

#[tokio::test]
async fn the_restart_type_table() {
    use RestartAction::*;
    use RestartType::*;
    // (type, exit) -> (spec kept, running again, action)
    let table = [
        (Permanent, "normal", (true, true, Restarted)),
        (Permanent, "shutdown", (true, true, Restarted)),
        (Permanent, "abnormal", (true, true, Restarted)),
        (Transient, "normal", (true, false, NotRestarted)),
        (Transient, "shutdown", (true, false, NotRestarted)),
        (Transient, "abnormal", (true, true, Restarted)),
        (Temporary, "normal", (false, false, Removed)),
        (Temporary, "shutdown", (false, false, Removed)),
        (Temporary, "abnormal", (false, false, Removed)),
    ];
    for (restart_type, how, expected) in table {
        assert_eq!(
            restart_type_row(restart_type, how).await,
            expected,
            "{restart_type:?} exiting {how}"
        );
    }
}

#[tokio::test]
async fn a_transient_child_exiting_normally_is_stopped_not_failed() {
    let child = spec("exit", "x").with_restart_type(RestartType::Transient);
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        std::slice::from_ref(&child),
    )
    .await;
    sup.call(&child.agent_id, "exit 0".into())
        .await
        .unwrap_err();
    wait_for(&mut events, |e| {
        matches!(&e.kind, EventKind::ChildExited { .. })
    })
    .await;
    let (_, info) = &sup.get_children().await[0];
    assert_eq!(info.status, AgentStatus::Stopped);
    assert_eq!(info.last_exit, Some(ExitReason::Normal));
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn intensity_exceeded_escalates_and_the_root_fails() {
    let specs = [spec("echo", "a"), spec("crasher", "b")];
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 2, Duration::from_secs(60)),
        &specs,
    )
    .await;
    let b = specs[1].agent_id.clone();
    for _ in 0..2 {
        sup.call(&b, "panic".into()).await.unwrap_err();
        restarted(&mut events, &b).await;
    }
    sup.call(&b, "panic".into()).await.unwrap_err();
    wait_for(&mut events, |e| matches!(&e.kind, EventKind::Escalated)).await;
    assert!(matches!(sup.status(), SupervisorStatus::Failed(_)));
    let err = sup.call(&specs[0].agent_id, "hi".into()).await.unwrap_err();
    assert!(
        matches!(err, SupervisionError::MaxRestartsExceeded(_)),
        "{err:?}"
    );
    let last = sup.get_restart_history().await.pop().unwrap();
    assert_eq!(last.action, RestartAction::Escalated);
    // Every child was stopped.
    for (_, info) in sup.get_children().await {
        assert_ne!(info.status, AgentStatus::Running);
    }
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn never_restart_escalates_on_the_first_crash() {
    let crasher = spec("crasher", "b");
    let (mut sup, _events) = tree(never_config(), std::slice::from_ref(&crasher)).await;
    let err = sup
        .handle_agent_exit(crasher.agent_id.clone(), ExitReason::Error("boom".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SupervisionError::MaxRestartsExceeded(_)),
        "{err:?}"
    );
    assert!(matches!(sup.status(), SupervisorStatus::Failed(_)));
}

#[tokio::test]
async fn restarts_spaced_wider_than_the_window_never_trip_it() {
    let crasher = spec("crasher", "b");
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 1, Duration::from_millis(150)),
        std::slice::from_ref(&crasher),
    )
    .await;
    // Four different crashes: the same message four times in a row would be
    // quarantined as poison after the third.
    for crash in ["panic", "unreachable", "oob", "stack"] {
        sup.call(&crasher.agent_id, crash.into()).await.unwrap_err();
        restarted(&mut events, &crasher.agent_id).await;
        // Let the previous restart leave the window.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(sup.status(), SupervisorStatus::Running);
    assert_eq!(restart_counts(&sup).await, vec![4]);
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn escalation_reaches_the_parent_through_a_two_level_tree() {
    let crasher = spec("crasher", "worker");
    let child_sup = SupervisorSpec::new(
        config(RestartStrategy::OneForOne, 1, Duration::from_secs(60)),
        wasm_factory(),
    )
    .with_name("inner".into())
    .with_child(crasher.clone());
    let inner_id = child_sup.id.clone();

    let mut root = AgentSupervisor::new(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        wasm_factory(),
    )
    .with_child(spec("echo", "sibling"))
    .with_child(child_sup);
    let mut events = root.subscribe();
    root.start().await.unwrap();

    let inner = root.child_supervisor(&inner_id).unwrap();
    inner
        .call(&crasher.agent_id, "panic".into())
        .await
        .unwrap_err();
    restarted(&mut events, &crasher.agent_id).await;
    // The second crash within the window exceeds the inner intensity (1).
    inner
        .call(&crasher.agent_id, "panic".into())
        .await
        .unwrap_err();
    wait_for(&mut events, |e| {
        matches!(e.kind, EventKind::Escalated) && e.supervisor == *inner.id()
    })
    .await;
    // The root restarts the inner supervisor (permanent), with fresh children.
    restarted(&mut events, &inner_id).await;
    let history = root.get_restart_history().await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].agent_id, inner_id);
    assert_eq!(history[0].reason, ExitReason::Shutdown);
    assert_eq!(history[0].action, RestartAction::Restarted);
    let inner = root.child_supervisor(&inner_id).unwrap();
    assert_eq!(inner.status(), SupervisorStatus::Running);
    assert_eq!(
        inner.call(&crasher.agent_id, "ping".into()).await.unwrap(),
        "pong"
    );
    assert_eq!(root.status(), SupervisorStatus::Running);
    root.stop().await.unwrap();
}

#[tokio::test]
async fn escalation_through_a_parent_that_cannot_restart_fails_the_root() {
    let crasher = spec("crasher", "worker");
    let child_sup = SupervisorSpec::new(never_config(), wasm_factory()).with_child(crasher.clone());
    let inner_id = child_sup.id.clone();
    let mut root = AgentSupervisor::new(never_config(), wasm_factory()).with_child(child_sup);
    let mut events = root.subscribe();
    root.start().await.unwrap();
    let inner = root.child_supervisor(&inner_id).unwrap();
    inner
        .call(&crasher.agent_id, "panic".into())
        .await
        .unwrap_err();
    wait_for(&mut events, |e| {
        matches!(e.kind, EventKind::Escalated) && e.supervisor == *root.id()
    })
    .await;
    assert!(matches!(root.status(), SupervisorStatus::Failed(_)));
    assert!(matches!(inner.status(), SupervisorStatus::Failed(_)));
}

/// A supervisor that gives up on the first restart-worthy exit.
fn never_config() -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::never_restart(),
        ..SupervisorConfig::default()
    }
}

#[tokio::test]
async fn stop_runs_in_reverse_start_order() {
    let specs = [spec("echo", "a"), spec("sleeper", "b"), spec("echo", "c")];
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        &specs,
    )
    .await;
    sup.stop().await.unwrap();
    let mut stopped = Vec::new();
    while stopped.len() < 3 {
        if let EventKind::ChildStopped { agent, killed, .. } =
            wait_for(&mut events, |_| true).await.kind
        {
            assert!(!killed, "a prompt stop is not a kill");
            stopped.push(agent);
        }
    }
    let expected: Vec<_> = specs.iter().rev().map(|s| s.agent_id.clone()).collect();
    assert_eq!(stopped, expected);
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
}

#[tokio::test]
async fn a_child_that_ignores_stop_is_killed_after_its_timeout_or_at_once() {
    // A stop that would take ten minutes: only the kill can end it.
    let slow = |shutdown| {
        AgentSpec::new("sleeper".into(), json!({ "stop_delay_ms": 600_000 }))
            .with_shutdown(shutdown)
            .with_limits(terraphim_agent_supervisor::AgentLimits {
                deadline: Duration::from_secs(900),
                ..common::test_limits()
            })
    };
    let specs = [
        slow(ShutdownPolicy::Timeout(Duration::from_millis(100))),
        slow(ShutdownPolicy::BrutalKill),
    ];
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        &specs,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(60), sup.stop())
        .await
        .expect("stop must not wait for the slow agents")
        .unwrap();
    let mut killed = 0;
    while killed < 2 {
        if let EventKind::ChildStopped { killed: true, .. } =
            wait_for(&mut events, |_| true).await.kind
        {
            killed += 1;
        }
    }
    for (_, info) in sup.get_children().await {
        assert_eq!(info.status, AgentStatus::Stopped);
    }
}

#[tokio::test]
async fn a_child_that_fails_to_start_fails_the_supervisor_start() {
    let specs = [
        spec("echo", "first"),
        spec("failing-init", "broken"),
        spec("echo", "never"),
    ];
    let mut sup = AgentSupervisor::new(SupervisorConfig::default(), wasm_factory());
    for s in &specs {
        sup = sup.with_child(s.clone());
    }
    let mut events = sup.subscribe();
    let err = sup.start().await.unwrap_err();
    let SupervisionError::AgentStartFailed(pid, message) = &err else {
        panic!("expected AgentStartFailed, got {err:?}");
    };
    assert_eq!(pid, &specs[1].agent_id);
    assert!(
        message.contains("failing-init: refusing to start"),
        "{message}"
    );
    assert_eq!(
        err.category(),
        terraphim_agent_supervisor::ErrorCategory::Startup
    );
    // The first child was started, then stopped; the third never started.
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        match event.kind {
            EventKind::ChildStarted { agent, .. } => seen.push(("started", agent)),
            EventKind::ChildStopped { agent, .. } => seen.push(("stopped", agent)),
            _ => {}
        }
    }
    let first = specs[0].agent_id.clone();
    assert_eq!(seen, vec![("started", first.clone()), ("stopped", first)]);
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
}

#[tokio::test]
async fn a_temporary_bystander_is_removed_not_restarted() {
    let temp = spec("echo", "temp").with_restart_type(RestartType::Temporary);
    let crasher = spec("crasher", "b");
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForAll, 5, Duration::from_secs(60)),
        &[temp.clone(), crasher.clone()],
    )
    .await;
    sup.call(&crasher.agent_id, "panic".into())
        .await
        .unwrap_err();
    restarted(&mut events, &crasher.agent_id).await;
    let children = sup.get_children().await;
    assert_eq!(children.len(), 1);
    assert_eq!(children[0].0, crasher.agent_id);
    let removed = sup
        .get_restart_history()
        .await
        .into_iter()
        .find(|e| e.agent_id == temp.agent_id)
        .expect("the bystander's removal is recorded");
    assert_eq!(removed.action, RestartAction::Removed);
    assert!(matches!(
        sup.call(&temp.agent_id, "hi".into()).await,
        Err(SupervisionError::AgentNotFound(_))
    ));
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn management_calls_follow_otp() {
    let (mut sup, _events) = tree(SupervisorConfig::default(), &[]).await;
    let a = sup.spawn_agent(spec("echo", "a")).await.unwrap();
    let dup = spec("echo", "dup").with_id(a.clone());
    assert!(matches!(
        sup.spawn_agent(dup).await,
        Err(SupervisionError::DuplicateAgent(_))
    ));
    let unknown = sup
        .spawn_agent(spec("no-such-type", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, SupervisionError::InvalidAgentSpec(_)),
        "{unknown:?}"
    );
    assert!(
        unknown.to_string().contains("echo"),
        "lists known types: {unknown}"
    );

    let count = sup.count_children().await.unwrap();
    assert_eq!((count.specs, count.active, count.workers), (1, 1, 1));
    assert!(matches!(
        sup.restart_child(&a).await,
        Err(SupervisionError::AgentRunning(_))
    ));
    assert!(matches!(
        sup.delete_child(&a).await,
        Err(SupervisionError::AgentRunning(_))
    ));

    sup.terminate_child(&a).await.unwrap();
    assert_eq!(sup.get_children().await[0].1.status, AgentStatus::Stopped);
    assert_eq!(sup.count_children().await.unwrap().active, 0);
    assert!(matches!(
        sup.call(&a, "hi".into()).await,
        Err(SupervisionError::CommunicationFailed(_))
    ));
    sup.restart_child(&a).await.unwrap();
    assert_eq!(sup.call(&a, "hi".into()).await.unwrap(), "echo: hi");
    sup.terminate_child(&a).await.unwrap();
    sup.delete_child(&a).await.unwrap();
    assert!(sup.get_children().await.is_empty());
    let ghost = AgentPid::new();
    for result in [
        sup.terminate_child(&ghost).await,
        sup.restart_child(&ghost).await,
        sup.delete_child(&ghost).await,
    ] {
        assert!(
            matches!(result, Err(SupervisionError::AgentNotFound(_))),
            "{result:?}"
        );
    }
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn application_errors_are_replies_and_oversized_messages_are_refused() {
    let echo = spec("echo", "e");
    let cfg = SupervisorConfig {
        max_message_bytes: 16,
        ..SupervisorConfig::default()
    };
    let (mut sup, _events) = tree(cfg, std::slice::from_ref(&echo)).await;
    let err = sup.call(&echo.agent_id, String::new()).await.unwrap_err();
    assert!(
        matches!(err, SupervisionError::AgentExecutionFailed(_, ref m) if m == "empty message")
    );
    let err = sup.call(&echo.agent_id, "x".repeat(17)).await.unwrap_err();
    assert!(matches!(
        err,
        SupervisionError::MessageTooLarge { len: 17, max: 16 }
    ));
    assert_eq!(
        sup.call(&echo.agent_id, "ok".into()).await.unwrap(),
        "echo: ok"
    );
    assert!(
        sup.get_restart_history().await.is_empty(),
        "no crash, no restart"
    );
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn state_survives_a_supervised_restart() {
    let echo = spec("echo", "counter");
    let (mut sup, mut events) = tree(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        std::slice::from_ref(&echo),
    )
    .await;
    let pid = echo.agent_id.clone();
    assert_eq!(sup.call(&pid, "count".into()).await.unwrap(), "1");
    assert_eq!(sup.call(&pid, "count".into()).await.unwrap(), "2");
    sup.handle_agent_exit(pid.clone(), ExitReason::Error("injected".into()))
        .await
        .unwrap();
    restarted(&mut events, &pid).await;
    assert_eq!(sup.call(&pid, "count".into()).await.unwrap(), "3");
    sup.stop().await.unwrap();
}
