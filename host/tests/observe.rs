//! The observer of a running tree (library): exits and restarts counted by
//! fault class from the events, bystanders included; calls counted on the
//! call path, a timer's delivery as a call of its agent; snapshots and node
//! details by path; a tree of 1,000 nodes; components loaded from the
//! compile cache or compiled.

mod common;

use std::sync::Arc;

use serde_json::json;
use terraphim_agent_supervisor::observe::{Observer, reason_class};
use terraphim_agent_supervisor::{
    AgentFault, AgentLimits, AgentSpec, AgentSupervisor, CallCounts, EventKind, ExitReason,
    RestartAction, RestartStrategy, RunningTree, Runtime, RuntimeConfig, SupervisorConfig,
    SupervisorSpec, TestAgentFactory, examples,
};

fn agent(name: &str) -> AgentSpec {
    AgentSpec::new("test".into(), json!({})).with_name(name.into())
}

/// The sample line of `name{labels}` in `text`, its value.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_restarts_and_calls_are_counted_by_path_and_class() {
    let factory = Arc::new(TestAgentFactory);
    let mut team_config = SupervisorConfig::default();
    team_config.restart_policy.strategy = RestartStrategy::OneForAll;
    let team = SupervisorSpec::new(team_config, factory.clone())
        .with_name("team".into())
        .with_child(agent("planner"))
        .with_child(agent("writer"));
    let root = AgentSupervisor::new(SupervisorConfig::default(), factory)
        .with_child(agent("echo"))
        .with_child(team);
    let events = root.subscribe();
    let mut watch = root.subscribe();
    let mut tree = RunningTree::start(root).await.expect("started");
    let observer = Observer::new(tree.handle(), events);

    assert_eq!(tree.call("echo", "hi".into()).await.expect("reply"), "hi");
    // The agent exits after answering: its caller sees the exit.
    assert!(tree.call("echo", "exit:boom".into()).await.is_err());
    common::wait_for(&mut watch, |e| {
        e.path == "root/echo" && matches!(e.kind, EventKind::ChildRestarted { .. })
    })
    .await;
    tree.report_exit(
        "root/team/planner",
        ExitReason::Fault(AgentFault::OutOfFuel),
    )
    .await
    .expect("reported");
    common::wait_for(&mut watch, |e| {
        e.path == "root/team/writer" && matches!(e.kind, EventKind::ChildRestarted { .. })
    })
    .await;
    // The events reached the observer's task once it has seen the last one.
    let deadline = std::time::Instant::now() + common::cli::HANG_GUARD;
    while !observer
        .recent_events()
        .iter()
        .any(|e| e.path == "root/team/writer" && matches!(e.kind, EventKind::ChildRestarted { .. }))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the observer saw nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let text = observer.metrics_text().expect("metrics");
    let at = |series: &str| sample(&text, series).unwrap_or(0.0);
    assert_eq!(
        at(r#"agent_host_exits_total{path="root/echo",reason="error"}"#),
        1.0
    );
    assert_eq!(
        at(r#"agent_host_restarts_total{path="root/echo",cause="error",bystander="false"}"#),
        1.0
    );
    assert_eq!(
        at(r#"agent_host_exits_total{path="root/team/planner",reason="out_of_fuel"}"#),
        1.0
    );
    assert_eq!(
        at(
            r#"agent_host_restarts_total{path="root/team/writer",cause="out_of_fuel",bystander="true"}"#
        ),
        1.0
    );
    assert_eq!(
        at(r#"agent_host_calls_total{path="root/echo",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        at(r#"agent_host_calls_total{path="root/echo",outcome="app_error"}"#),
        1.0
    );
    assert_eq!(
        at(r#"agent_host_call_duration_seconds_count{path="root/echo"}"#),
        2.0
    );
    assert_eq!(
        at(r#"agent_host_supervisor_intensity_used{path="root"}"#),
        1.0
    );
    assert_eq!(
        at(r#"agent_host_supervisor_intensity_used{path="root/team"}"#),
        1.0
    );
    assert_eq!(at("agent_host_root_up"), 1.0);
    // Native agents report no consumption, and without a runtime there
    // are no instance metrics.
    assert!(!text.contains(r#"agent_host_fuel_consumed_total{path="root/echo"}"#));
    assert!(!text.contains("agent_host_instances_live"));

    let snapshot = observer.snapshot();
    let paths: Vec<&str> = snapshot
        .nodes
        .iter()
        .map(|n| n.status.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "root/echo",
            "root/team",
            "root/team/planner",
            "root/team/writer"
        ]
    );
    let echo = &snapshot.nodes[0];
    let metrics = echo.metrics.as_ref().expect("the echo's counters");
    let calls = CallCounts {
        ok: 1,
        app_error: 1,
        ..CallCounts::default()
    };
    assert_eq!(metrics.calls, calls);
    assert_eq!(metrics.fuel_consumed, None);
    assert!(
        snapshot.nodes[1].metrics.is_none(),
        "a supervisor has no call counters"
    );
    let supervisors: Vec<&str> = snapshot
        .supervisors
        .iter()
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(supervisors, ["root", "root/team"]);

    let planner = observer.node("planner").expect("by its unique name");
    assert_eq!(planner.supervisor, "root/team");
    assert_eq!(
        planner.node.status.last_exit,
        Some(ExitReason::Fault(AgentFault::OutOfFuel))
    );
    assert_eq!(planner.history.len(), 1);
    assert_eq!(planner.history[0].action, RestartAction::Restarted);
    assert!(observer.node("root/nobody").is_none());
    assert_eq!(reason_class(&ExitReason::Fault(AgentFault::Panic)), "panic");

    tree.stop().await.expect("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_of_a_thousand_nodes_is_observed_whole() {
    let factory = Arc::new(TestAgentFactory);
    let config = || SupervisorConfig {
        max_children: 200,
        ..SupervisorConfig::default()
    };
    let mut root = AgentSupervisor::new(config(), factory.clone());
    for t in 0..10 {
        let mut team =
            SupervisorSpec::new(config(), factory.clone()).with_name(format!("team-{t}"));
        for a in 0..99 {
            team = team.with_child(agent(&format!("agent-{a}")));
        }
        root = root.with_child(team);
    }
    let events = root.subscribe();
    let mut tree = RunningTree::start(root).await.expect("started");
    let observer = Observer::new(tree.handle(), events);
    tree.call("root/team-9/agent-98", "hi".into())
        .await
        .expect("reply");

    let snapshot = observer.snapshot();
    assert_eq!(snapshot.nodes.len(), 1000);
    assert_eq!(snapshot.supervisors.len(), 11);
    let text = observer.metrics_text().expect("metrics");
    let running = text
        .lines()
        .filter(|l| {
            l.starts_with("agent_host_node_status{") && l.contains(r#"status="running"} 1"#)
        })
        .count();
    assert_eq!(running, 1000);
    assert_eq!(
        sample(
            &text,
            r#"agent_host_calls_total{path="root/team-9/agent-98",outcome="ok"}"#
        ),
        Some(1.0)
    );
    tree.stop().await.expect("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_loaded_from_the_compile_cache_or_compiled_are_counted() {
    let dir = common::cli::TempDir::new("observe-cache");
    let runtime = Runtime::with_config(RuntimeConfig {
        compile_cache: Some(dir.path("cache")),
        ..RuntimeConfig::default()
    })
    .expect("runtime with a cache");
    let first = runtime
        .load_bytes("echo", examples::ECHO)
        .expect("compiles");
    let second = runtime
        .load_bytes("echo", examples::ECHO)
        .expect("loads from the cache");
    assert!(!first.from_cache() && second.from_cache());
    assert!(runtime.load_bytes("notes.txt", b"hello").is_err());

    let root = AgentSupervisor::new(SupervisorConfig::default(), Arc::new(TestAgentFactory))
        .with_child(agent("echo"));
    let events = root.subscribe();
    let mut tree = RunningTree::start(root).await.expect("started");
    let observer = Observer::with_runtime(tree.handle(), events, runtime);
    let text = observer.metrics_text().expect("metrics");
    assert_eq!(
        sample(
            &text,
            r#"agent_host_components_loaded_total{source="compiled"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"agent_host_components_loaded_total{source="cache"}"#
        ),
        Some(1.0),
        "{text}"
    );
    let host = observer.snapshot().host;
    assert_eq!(
        (host.components_compiled, host.components_from_cache),
        (Some(1), Some(1))
    );
    tree.stop().await.expect("stopped");
}

/// A due timer's delivery counts as a call of its agent: its outcome (a
/// reply, or a crash) and how long the agent took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timers_delivery_counts_as_a_call_of_its_agent() {
    let caller = AgentSpec::new("caller".into(), json!({}))
        .with_name("t".into())
        .with_limits(AgentLimits {
            max_timers: 4,
            ..common::test_limits()
        });
    let root = AgentSupervisor::new(SupervisorConfig::default(), common::wasm_factory())
        .with_child(caller);
    let events = root.subscribe();
    let mut watch = root.subscribe();
    let mut tree = RunningTree::start(root).await.expect("started");
    let observer = Observer::new(tree.handle(), events);
    let metrics = || {
        observer
            .node("root/t")
            .and_then(|n| n.node.metrics)
            .expect("the agent's counters")
    };

    tree.call("root/t", "schedule 10 record once".into())
        .await
        .expect("scheduled");
    let mut asked = 1;
    let deadline = std::time::Instant::now() + common::cli::HANG_GUARD;
    loop {
        let log = tree.call("root/t", "log".into()).await.expect("its log");
        asked += 1;
        if log.contains("once") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no timer fired");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Each call, and the timer's delivery (handled before the `log` call
    // that saw it).
    let ok = CallCounts {
        ok: asked + 1,
        ..CallCounts::default()
    };
    assert_eq!(metrics().calls, ok);

    // A timer's message that crashes the agent: a crashed call.
    tree.call("root/t", "schedule 10 panic".into())
        .await
        .expect("scheduled");
    common::wait_for(&mut watch, |e| {
        e.path == "root/t" && matches!(e.kind, EventKind::ChildRestarted { .. })
    })
    .await;
    let m = metrics();
    let counted = CallCounts {
        ok: asked + 2,
        crashed: 1,
        ..CallCounts::default()
    };
    assert_eq!(m.calls, counted);
    assert_eq!(m.latency.count, asked + 3);
    assert!(m.fuel_consumed.is_some_and(|fuel| fuel > 0));
    tree.stop().await.expect("stopped");
}
