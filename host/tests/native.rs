//! Native (non-WASM) agents under `AgentSupervisor`: crashes are detected by
//! the supervisor itself, restart types and intensity apply to them as to
//! WASM agents, and the root supervisor's lifecycle is well defined.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentFactory, AgentPid, AgentSpec, AgentStatus, AgentSupervisor, EventKind, ExitReason,
    InitArgs, RestartAction, RestartIntensity, RestartPolicy, RestartStrategy, RestartType,
    SupervisedAgent, SupervisionError, SupervisionResult, SupervisorConfig, SupervisorEvent,
    SupervisorStatus, TestAgent, TestAgentFactory,
};
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tokio::time::timeout;

/// Hang guard only: no test asserts anything about timing.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The next event matching `pred`.
async fn wait_for(
    events: &mut Receiver<SupervisorEvent>,
    pred: impl Fn(&SupervisorEvent) -> bool,
) -> SupervisorEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if pred(&event) => return event,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => panic!("event channel closed"),
            }
        }
    };
    timeout(HANG_GUARD, wait)
        .await
        .expect("expected event did not arrive (hang guard)")
}

/// Wait until `pid` has been restarted; its restart count then.
async fn restarted(events: &mut Receiver<SupervisorEvent>, pid: &AgentPid) -> u32 {
    match wait_for(
        events,
        |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if agent == pid),
    )
    .await
    .kind
    {
        EventKind::ChildRestarted { restart_count, .. } => restart_count,
        _ => unreachable!(),
    }
}

/// Wait until `pid` has exited and the supervisor has finished handling the
/// exit (a request to the supervisor task is served only after that).
async fn exit_handled(
    sup: &AgentSupervisor,
    events: &mut Receiver<SupervisorEvent>,
    pid: &AgentPid,
) {
    wait_for(
        events,
        |e| matches!(&e.kind, EventKind::ChildExited { agent, .. } if agent == pid),
    )
    .await;
    sup.count_children().await.expect("supervisor serves");
}

fn config(strategy: RestartStrategy, max_restarts: u32, window: Duration) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(strategy, RestartIntensity::new(max_restarts, window)),
        ..SupervisorConfig::default()
    }
}

fn test_spec(name: &str) -> AgentSpec {
    AgentSpec::new("test".into(), json!({})).with_name(name.into())
}

/// A started supervisor of `TestAgent`s, and its events from the start.
async fn test_tree() -> (AgentSupervisor, Receiver<SupervisorEvent>) {
    let mut sup = AgentSupervisor::new(
        config(RestartStrategy::OneForOne, 5, Duration::from_secs(60)),
        Arc::new(TestAgentFactory),
    );
    let events = sup.subscribe();
    sup.start().await.expect("supervisor starts");
    (sup, events)
}

async fn info(
    sup: &AgentSupervisor,
    pid: &AgentPid,
) -> terraphim_agent_supervisor::SupervisedAgentInfo {
    sup.get_children()
        .await
        .into_iter()
        .find(|(p, _)| p == pid)
        .map(|(_, info)| info)
        .expect("child is known")
}

#[tokio::test]
async fn panic_in_native_agent_is_detected_and_restarted() {
    let (mut sup, mut events) = test_tree().await;
    let pid = sup.spawn_agent(test_spec("panicky")).await.unwrap();
    assert_eq!(sup.call(&pid, "hello".into()).await.unwrap(), "hello");

    // No handle_agent_exit: the supervisor notices the panic itself.
    let err = sup.call(&pid, "panic".into()).await;
    assert!(err.is_err(), "the caller of a panicking call gets an error");
    assert_eq!(restarted(&mut events, &pid).await, 1);

    let history = sup.get_restart_history().await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].agent_id, pid);
    assert_eq!(history[0].action, RestartAction::Restarted);
    match &history[0].reason {
        ExitReason::Error(message) => assert!(message.contains("panicked"), "{message}"),
        other => panic!("expected an error exit, got {other:?}"),
    }

    let child = info(&sup, &pid).await;
    assert_eq!(child.restart_count, 1);
    assert_eq!(child.status, AgentStatus::Running);
    assert!(matches!(child.last_exit, Some(ExitReason::Error(_))));
    assert_eq!(sup.call(&pid, "again".into()).await.unwrap(), "again");
    assert_eq!(sup.status(), SupervisorStatus::Running);
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn normal_exit_of_transient_child_is_not_restarted() {
    let (mut sup, mut events) = test_tree().await;
    let pid = sup
        .spawn_agent(test_spec("transient").with_restart_type(RestartType::Transient))
        .await
        .unwrap();

    assert!(sup.call(&pid, "exit:normal".into()).await.is_err());
    exit_handled(&sup, &mut events, &pid).await;

    let child = info(&sup, &pid).await;
    assert_eq!(child.status, AgentStatus::Stopped);
    assert_eq!(child.restart_count, 0);
    assert_eq!(child.last_exit, Some(ExitReason::Normal));
    let history = sup.get_restart_history().await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].reason, ExitReason::Normal);
    assert_eq!(history[0].action, RestartAction::NotRestarted);
    assert_eq!(sup.count_children().await.unwrap().active, 0);
    assert!(sup.call(&pid, "hello".into()).await.is_err());
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn error_exit_of_transient_child_is_restarted() {
    let (mut sup, mut events) = test_tree().await;
    let pid = sup
        .spawn_agent(test_spec("transient").with_restart_type(RestartType::Transient))
        .await
        .unwrap();

    assert!(sup.call(&pid, "exit:boom".into()).await.is_err());
    assert_eq!(restarted(&mut events, &pid).await, 1);
    let history = sup.get_restart_history().await;
    assert_eq!(history[0].reason, ExitReason::Error("boom".into()));
    assert_eq!(history[0].action, RestartAction::Restarted);
    assert_eq!(sup.call(&pid, "hello".into()).await.unwrap(), "hello");
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn normal_exit_of_permanent_child_is_restarted() {
    let (mut sup, mut events) = test_tree().await;
    let pid = sup
        .spawn_agent(test_spec("permanent").with_restart_type(RestartType::Permanent))
        .await
        .unwrap();

    assert!(sup.call(&pid, "exit:normal".into()).await.is_err());
    assert_eq!(restarted(&mut events, &pid).await, 1);

    let history = sup.get_restart_history().await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].reason, ExitReason::Normal);
    assert_eq!(history[0].action, RestartAction::Restarted);
    let child = info(&sup, &pid).await;
    assert_eq!(child.status, AgentStatus::Running);
    assert_eq!(child.restart_count, 1);
    assert_eq!(sup.call(&pid, "hello".into()).await.unwrap(), "hello");
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn handle_agent_exit_unknown_and_running_child() {
    let (mut sup, _events) = test_tree().await;
    let pid = sup.spawn_agent(test_spec("reported")).await.unwrap();

    let unknown = AgentPid::new();
    match sup
        .handle_agent_exit(unknown.clone(), ExitReason::Error("x".into()))
        .await
    {
        Err(SupervisionError::AgentNotFound(p)) => assert_eq!(p, unknown),
        other => panic!("expected AgentNotFound, got {other:?}"),
    }
    assert!(sup.get_restart_history().await.is_empty());

    sup.handle_agent_exit(pid.clone(), ExitReason::Error("reported".into()))
        .await
        .unwrap();
    // handle_agent_exit returns once the restart is done.
    let child = info(&sup, &pid).await;
    assert_eq!(child.restart_count, 1);
    assert_eq!(child.status, AgentStatus::Running);
    let history = sup.get_restart_history().await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].reason, ExitReason::Error("reported".into()));
    assert_eq!(history[0].action, RestartAction::Restarted);
    assert_eq!(sup.call(&pid, "hello".into()).await.unwrap(), "hello");

    sup.handle_agent_exit(pid.clone(), ExitReason::Kill)
        .await
        .unwrap();
    assert_eq!(info(&sup, &pid).await.restart_count, 2);
    sup.stop().await.unwrap();
}

/// A `TestAgent` whose `start` fails if `fail_start`.
struct FlakyAgent {
    inner: TestAgent,
    fail_start: bool,
}

#[async_trait]
impl SupervisedAgent for FlakyAgent {
    async fn init(&mut self, args: InitArgs) -> SupervisionResult<()> {
        self.inner.init(args).await
    }

    async fn start(&mut self) -> SupervisionResult<()> {
        if self.fail_start {
            return Err(SupervisionError::System("flaky start".into()));
        }
        self.inner.start().await
    }

    async fn stop(&mut self) -> SupervisionResult<()> {
        self.inner.stop().await
    }

    async fn handle_message(&mut self, message: String) -> SupervisionResult<String> {
        self.inner.handle_message(message).await
    }

    fn exit_reason(&self) -> Option<ExitReason> {
        self.inner.exit_reason()
    }
}

/// Makes `FlakyAgent`s (type "test"); incarnation `n` (0 is the first)
/// fails to start if `fails(n)`.
struct FlakyFactory {
    created: Arc<AtomicUsize>,
    fails: fn(usize) -> bool,
}

#[async_trait]
impl AgentFactory for FlakyFactory {
    async fn create_agent(&self, spec: &AgentSpec) -> SupervisionResult<Box<dyn SupervisedAgent>> {
        self.validate_spec(spec)?;
        let incarnation = self.created.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FlakyAgent {
            inner: TestAgent::default(),
            fail_start: (self.fails)(incarnation),
        }))
    }

    fn validate_spec(&self, spec: &AgentSpec) -> SupervisionResult<()> {
        TestAgentFactory.validate_spec(spec)
    }

    fn supported_types(&self) -> Vec<String> {
        TestAgentFactory.supported_types()
    }
}

async fn flaky_tree(
    fails: fn(usize) -> bool,
) -> (
    AgentSupervisor,
    Receiver<SupervisorEvent>,
    Arc<AtomicUsize>,
    AgentPid,
) {
    let created = Arc::new(AtomicUsize::new(0));
    let factory = FlakyFactory {
        created: created.clone(),
        fails,
    };
    let mut sup = AgentSupervisor::new(
        config(RestartStrategy::OneForOne, 3, Duration::from_secs(60)),
        Arc::new(factory),
    );
    let events = sup.subscribe();
    sup.start().await.unwrap();
    let pid = sup.spawn_agent(test_spec("flaky")).await.unwrap();
    (sup, events, created, pid)
}

#[tokio::test]
async fn restart_attempts_that_fail_count_and_escalate() {
    // Only the first incarnation starts; every restart attempt fails.
    let (mut sup, mut events, created, pid) = flaky_tree(|n| n >= 1).await;

    assert!(sup.call(&pid, "panic".into()).await.is_err());
    wait_for(&mut events, |e| matches!(&e.kind, EventKind::Escalated)).await;

    assert!(
        matches!(sup.status(), SupervisorStatus::Failed(_)),
        "{:?}",
        sup.status()
    );
    let history = sup.get_restart_history().await;
    let actions: Vec<_> = history.iter().map(|e| e.action.clone()).collect();
    assert_eq!(
        actions.first(),
        Some(&RestartAction::Restarted),
        "{actions:?}"
    );
    // Intensity 3 in the window: the crash and the first two failed attempts
    // are restarted, the third failed attempt exceeds the intensity. So the
    // factory made the first incarnation and three failed ones, no more.
    assert_eq!(created.load(Ordering::SeqCst), 4);
    let failed_starts = actions
        .iter()
        .filter(|a| **a == RestartAction::StartFailed)
        .count();
    assert!((2..=3).contains(&failed_starts), "{actions:?}");
    for entry in history
        .iter()
        .filter(|e| e.action == RestartAction::StartFailed)
    {
        assert_eq!(entry.agent_id, pid);
        assert!(entry.reason.is_abnormal(), "{entry:?}");
    }

    // A failed supervisor refuses work instead of hanging.
    match sup.spawn_agent(test_spec("late")).await {
        Err(SupervisionError::MaxRestartsExceeded(_)) => {}
        other => panic!("expected MaxRestartsExceeded, got {other:?}"),
    }
    sup.stop().await.unwrap();
    assert!(matches!(sup.status(), SupervisorStatus::Failed(_)));

    assert_eq!(
        actions.last(),
        Some(&RestartAction::Escalated),
        "the history ends with the escalation: {actions:?}"
    );
}

#[tokio::test]
async fn a_failed_restart_attempt_is_retried() {
    // Only the second incarnation (the first restart attempt) fails.
    let (mut sup, mut events, created, pid) = flaky_tree(|n| n == 1).await;

    assert!(sup.call(&pid, "panic".into()).await.is_err());
    assert_eq!(restarted(&mut events, &pid).await, 1);

    let actions: Vec<_> = sup
        .get_restart_history()
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [RestartAction::Restarted, RestartAction::StartFailed]
    );
    assert_eq!(created.load(Ordering::SeqCst), 3);
    assert_eq!(sup.status(), SupervisorStatus::Running);
    assert_eq!(info(&sup, &pid).await.status, AgentStatus::Running);
    assert_eq!(sup.call(&pid, "hello".into()).await.unwrap(), "hello");
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn supervisor_lifecycle_before_and_after_start() {
    let mut sup = AgentSupervisor::new(SupervisorConfig::default(), Arc::new(TestAgentFactory));

    assert!(sup.get_children().await.is_empty());
    assert!(sup.get_restart_history().await.is_empty());
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
    assert!(sup.spawn_agent(test_spec("too-early")).await.is_err());
    assert!(
        sup.handle_agent_exit(AgentPid::new(), ExitReason::Normal)
            .await
            .is_err()
    );
    sup.stop()
        .await
        .expect("stopping a never-started supervisor is fine");

    sup.start().await.unwrap();
    assert_eq!(sup.status(), SupervisorStatus::Running);
    assert!(sup.start().await.is_err(), "second start is refused");
    assert_eq!(sup.status(), SupervisorStatus::Running);
    let pid = sup.spawn_agent(test_spec("one")).await.unwrap();
    assert_eq!(sup.call(&pid, "hello".into()).await.unwrap(), "hello");

    sup.stop().await.unwrap();
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
    sup.stop().await.expect("second stop is fine");
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
    assert!(sup.spawn_agent(test_spec("too-late")).await.is_err());
}
