//! The tree API: a three-level tree driven by paths only (calls, status,
//! the management calls), and an event stream whose events name their node
//! by path and whose restarts name their cause and their bystanders.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::wait_for;
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentSpec, AgentStatus, AgentSupervisor, EventKind, ExitReason, NodeError, NodeKind,
    ResolveError, RestartIntensity, RestartPolicy, RestartStrategy, RunningTree, SupervisionError,
    SupervisorConfig, SupervisorEvent, SupervisorSpec, TestAgentFactory, TreeCallError,
};
use tokio::sync::broadcast::Receiver;

fn config(strategy: RestartStrategy) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(
            strategy,
            RestartIntensity::new(100, Duration::from_secs(60)),
        ),
        ..SupervisorConfig::default()
    }
}

fn agent(name: &str) -> AgentSpec {
    AgentSpec::new("test".into(), json!({})).with_name(name.into())
}

/// ```text
/// root (one_for_one)
/// |- a
/// |- team (one_for_all)
/// |  |- x
/// |  |- w
/// |  `- sub (rest_for_one)
/// |     |- y
/// |     |- z
/// |     `- w
/// `- b
/// ```
async fn three_levels() -> (RunningTree, Receiver<SupervisorEvent>) {
    let factory = Arc::new(TestAgentFactory);
    let sub = SupervisorSpec::new(config(RestartStrategy::RestForOne), factory.clone())
        .with_name("sub".into())
        .with_child(agent("y"))
        .with_child(agent("z"))
        .with_child(agent("w"));
    let team = SupervisorSpec::new(config(RestartStrategy::OneForAll), factory.clone())
        .with_name("team".into())
        .with_child(agent("x"))
        .with_child(agent("w"))
        .with_child(sub);
    let root = AgentSupervisor::new(config(RestartStrategy::OneForOne), factory)
        .with_child(agent("a"))
        .with_child(team)
        .with_child(agent("b"));
    let events = root.subscribe();
    let tree = RunningTree::start(root).await.expect("the tree starts");
    (tree, events)
}

const PATHS: [&str; 9] = [
    "root/a",
    "root/team",
    "root/team/x",
    "root/team/w",
    "root/team/sub",
    "root/team/sub/y",
    "root/team/sub/z",
    "root/team/sub/w",
    "root/b",
];

fn paths(tree: &RunningTree) -> Vec<String> {
    tree.status().into_iter().map(|n| n.path).collect()
}

#[tokio::test]
async fn status_lists_every_node_by_path_depth_first_in_start_order() {
    let (mut tree, _) = three_levels().await;
    let status = tree.status();
    assert_eq!(paths(&tree), PATHS);
    for node in &status {
        let expected = if ["root/team", "root/team/sub"].contains(&node.path.as_str()) {
            NodeKind::Supervisor
        } else {
            NodeKind::Agent
        };
        assert_eq!(node.kind, expected, "{}", node.path);
        assert_eq!(node.status, AgentStatus::Running, "{}", node.path);
        assert_eq!(node.restart_count, 0);
        assert_eq!(node.name, node.path.rsplit('/').next().unwrap());
    }
    // One identity: a nested supervisor's id is its id as a child.
    let team = tree.resolve("root/team").unwrap();
    let handle = team.parent.child_supervisor(&team.id).unwrap();
    assert_eq!(handle.id().0, team.id.0);
    assert_eq!(handle.path(), "root/team");
    tree.stop().await.unwrap();
}

#[tokio::test]
async fn nodes_are_found_by_path_or_by_a_unique_name() {
    let (mut tree, _) = three_levels().await;
    let y = tree.resolve("y").unwrap();
    assert_eq!(
        (y.path.as_str(), y.kind),
        ("root/team/sub/y", NodeKind::Agent)
    );
    assert_eq!(
        tree.resolve("/root/team/sub/").unwrap().path,
        "root/team/sub"
    );
    match tree.resolve("w") {
        Err(ResolveError::Ambiguous { paths, .. }) => {
            assert_eq!(paths, ["root/team/w", "root/team/sub/w"]);
        }
        other => panic!("expected an ambiguity, got {other:?}"),
    }
    match tree.resolve("root/team/nobody") {
        Err(ResolveError::NotFound { agents, .. }) => assert_eq!(agents.len(), 7),
        other => panic!("expected not found, got {other:?}"),
    }
    assert!(matches!(
        tree.resolve("root"),
        Err(ResolveError::Root { .. })
    ));
    assert!(matches!(
        tree.resolve("root/a/deeper"),
        Err(ResolveError::NotFound { .. })
    ));
    tree.stop().await.unwrap();
}

#[tokio::test]
async fn calls_go_by_path_and_fail_with_typed_errors() {
    let (mut tree, _) = three_levels().await;
    assert_eq!(
        tree.call("root/team/sub/z", "hi".into()).await.unwrap(),
        "hi"
    );
    assert_eq!(tree.call("z", "by name".into()).await.unwrap(), "by name");
    match tree.call("root/team/sub", "hi".into()).await {
        Err(TreeCallError::NotAnAgent { path, agents }) => {
            assert_eq!(path, "root/team/sub");
            assert_eq!(
                agents,
                ["root/team/sub/y", "root/team/sub/z", "root/team/sub/w"]
            );
        }
        other => panic!("expected NotAnAgent, got {other:?}"),
    }
    let err = tree.call("nobody", "hi".into()).await.unwrap_err();
    assert!(matches!(err, TreeCallError::NotFound(_)), "{err}");
    assert_eq!(
        err.category(),
        terraphim_agent_supervisor::ErrorCategory::NotFound
    );
    let too_big = "x".repeat(SupervisorConfig::default().max_message_bytes + 1);
    match tree.call("root/a", too_big).await {
        Err(e @ TreeCallError::TooLarge { reply: false, .. }) => {
            let e = SupervisionError::from(e);
            assert!(matches!(e, SupervisionError::MessageTooLarge { .. }));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    tree.stop().await.unwrap();
}

/// The restart events that follow, up to and including `last`'s.
async fn restarts_until(
    events: &mut Receiver<SupervisorEvent>,
    last: &str,
) -> Vec<(String, String, bool)> {
    let mut seen = Vec::new();
    loop {
        let event = wait_for(events, |e| {
            matches!(e.kind, EventKind::ChildRestarted { .. })
        })
        .await;
        let EventKind::ChildRestarted {
            cause, bystander, ..
        } = &event.kind
        else {
            unreachable!()
        };
        seen.push((event.path.clone(), cause.path.clone(), *bystander));
        if event.path == last {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_restart_event_names_its_cause_and_its_bystanders() {
    let (mut tree, mut events) = three_levels().await;

    // rest_for_one in sub: y's crash restarts y, then z and w after it.
    assert!(
        tree.call("root/team/sub/y", "exit:boom".into())
            .await
            .is_err()
    );
    let restarts = restarts_until(&mut events, "root/team/sub/w").await;
    assert_eq!(
        restarts,
        [
            ("root/team/sub/y".into(), "root/team/sub/y".into(), false),
            ("root/team/sub/z".into(), "root/team/sub/y".into(), true),
            ("root/team/sub/w".into(), "root/team/sub/y".into(), true),
        ]
    );

    // one_for_all in team: an exit of x reported from outside restarts x,
    // w and the whole nested supervisor sub, in start order.
    tree.report_exit("root/team/x", ExitReason::Error("reported".into()))
        .await
        .unwrap();
    let restarts = restarts_until(&mut events, "root/team/sub").await;
    assert_eq!(
        restarts,
        [
            ("root/team/x".into(), "root/team/x".into(), false),
            ("root/team/w".into(), "root/team/x".into(), true),
            ("root/team/sub".into(), "root/team/x".into(), true),
        ]
    );
    let status = tree.status();
    let count = |path: &str| {
        status
            .iter()
            .find(|n| n.path == path)
            .map(|n| n.restart_count)
    };
    assert_eq!(count("root/team/x"), Some(1));
    assert_eq!(count("root/team/sub"), Some(1));
    assert_eq!(count("root/a"), Some(0), "one_for_one at the root");
    // A restarted nested supervisor starts its children afresh.
    assert_eq!(count("root/team/sub/y"), Some(0));
    assert_eq!(paths(&tree), PATHS);

    // The history says the same, by path.
    let history = tree.root().restart_history();
    assert!(
        history.is_empty(),
        "nothing exited at the root: {history:?}"
    );
    let team = tree.resolve("root/team").unwrap();
    let team = team.parent.child_supervisor(&team.id).unwrap();
    let history: Vec<(String, String)> = team
        .restart_history()
        .iter()
        .map(|e| (e.path.clone(), format!("{:?}", e.action)))
        .collect();
    assert_eq!(history[0], ("root/team/x".into(), "Restarted".into()));
    assert!(history[1].0 == "root/team/w" && history[1].1.starts_with("RestartedWithSibling"));
    tree.stop().await.unwrap();
}

#[tokio::test]
async fn events_carry_time_path_and_kind_and_serialise() {
    let (mut tree, mut events) = three_levels().await;
    tree.terminate("root/b").await.unwrap();
    let stopped = wait_for(&mut events, |e| {
        matches!(e.kind, EventKind::ChildStopped { .. })
    })
    .await;
    assert_eq!(stopped.path(), "root/b");
    assert!(matches!(
        stopped.kind(),
        EventKind::ChildStopped { killed: false, .. }
    ));
    assert!(stopped.at <= chrono::Utc::now());
    let json = serde_json::to_value(&stopped).unwrap();
    assert_eq!(json["path"], "root/b");
    assert_eq!(json["kind"]["ChildStopped"]["killed"], false);
    assert!(json["at"].is_string());
    tree.stop().await.unwrap();
}

#[tokio::test]
async fn the_management_calls_go_by_path() {
    let (mut tree, _) = three_levels().await;
    let status = |tree: &RunningTree, path: &str| {
        tree.status()
            .into_iter()
            .find(|n| n.path == path)
            .map(|n| n.status)
    };

    tree.terminate("root/b").await.unwrap();
    assert_eq!(status(&tree, "root/b"), Some(AgentStatus::Stopped));
    match tree.delete("root/a").await {
        Err(e @ NodeError::Refused { .. }) => {
            assert_eq!(e.to_string(), "root/a: it is running");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    tree.restart("root/b").await.unwrap();
    assert_eq!(status(&tree, "root/b"), Some(AgentStatus::Running));
    tree.terminate("root/b").await.unwrap();
    tree.delete("root/b").await.unwrap();
    assert_eq!(status(&tree, "root/b"), None);

    let path = tree.add_child("root/team/sub", agent("new")).await.unwrap();
    assert_eq!(path, "root/team/sub/new");
    assert_eq!(tree.call("new", "hello".into()).await.unwrap(), "hello");
    match tree.add_child("sub", agent("new")).await {
        Err(NodeError::Refused {
            source: SupervisionError::NameTaken(path),
            ..
        }) => assert_eq!(path, "root/team/sub/new"),
        other => panic!("expected NameTaken, got {other:?}"),
    }
    assert!(matches!(
        tree.add_child("root/a", agent("under-an-agent")).await,
        Err(NodeError::NotASupervisor { .. })
    ));
    tree.add_child("root", agent("top")).await.unwrap();
    assert_eq!(status(&tree, "root/top"), Some(AgentStatus::Running));

    // A terminated nested supervisor takes its subtree with it.
    tree.terminate("root/team/sub").await.unwrap();
    assert_eq!(status(&tree, "root/team/sub"), Some(AgentStatus::Stopped));
    assert_eq!(status(&tree, "root/team/sub/y"), None);
    assert!(matches!(
        tree.call("root/team/sub/y", "hi".into()).await,
        Err(TreeCallError::NotFound(ResolveError::SupervisorDown { .. }))
    ));
    tree.restart("root/team/sub").await.unwrap();
    assert_eq!(
        tree.call("root/team/sub/y", "back".into()).await.unwrap(),
        "back"
    );
    tree.stop().await.unwrap();
}
