//! Health checks, circuit breakers and restart backoff, with the moody
//! guest (it turns unhealthy on command, and breaks itself so that it cannot
//! start while its state says so) and native test agents.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{component, runtime, test_limits, wait_for};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentFactory, AgentPid, AgentSpec, AgentStatus, AgentSupervisor, Backoff, BreakerPolicy,
    CircuitStatus, EventKind, ExitReason, HealthPolicy, InitArgs, MemoryStateStore, RestartAction,
    RestartIntensity, RestartPolicy, RestartStrategy, StateStore, SupervisedAgent,
    SupervisionError, SupervisionResult, SupervisorConfig, SupervisorEvent, SupervisorStatus,
    TestAgentFactory, WasmAgentFactory,
};
use tokio::sync::broadcast::Receiver;

const MS: Duration = Duration::from_millis(1);

fn config(max_restarts: u32) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForOne,
            RestartIntensity::new(max_restarts, Duration::from_secs(60)),
        ),
        agent_timeout: Duration::from_secs(20),
        ..SupervisorConfig::default()
    }
}

/// A root over one moody agent built from `spec`, its state in `store`.
async fn moody_tree(
    config: SupervisorConfig,
    spec: AgentSpec,
    store: Arc<MemoryStateStore>,
) -> (AgentSupervisor, Receiver<SupervisorEvent>, AgentPid) {
    let factory = WasmAgentFactory::new(runtime().clone())
        .with_default_limits(test_limits())
        .with_component("moody", component("moody"))
        .with_state_store(store);
    let pid = spec.agent_id.clone();
    let mut sup = AgentSupervisor::new(config, Arc::new(factory)).with_child(spec);
    let events = sup.subscribe();
    sup.start().await.expect("the tree starts");
    (sup, events, pid)
}

fn moody() -> AgentSpec {
    AgentSpec::new("moody".into(), json!({})).with_name("moody".into())
}

fn checks(threshold: u32) -> HealthPolicy {
    HealthPolicy {
        interval: 30 * MS,
        timeout: Duration::from_secs(2),
        threshold,
    }
}

async fn restarted(events: &mut Receiver<SupervisorEvent>, pid: &AgentPid) -> SupervisorEvent {
    wait_for(
        events,
        |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if agent == pid),
    )
    .await
}

// --- health checks ----------------------------------------------------------

#[tokio::test]
async fn an_agent_that_turns_unhealthy_is_restarted_after_the_threshold() {
    let store = Arc::new(MemoryStateStore::default());
    let spec = moody().with_health(checks(3));
    let (mut sup, mut events, pid) = moody_tree(config(10), spec, store).await;
    assert_eq!(sup.call(&pid, "sick".into()).await.unwrap(), "sick");
    restarted(&mut events, &pid).await;
    let history = sup.get_restart_history().await;
    match &history[0].reason {
        ExitReason::Unhealthy(why) => {
            assert!(why.starts_with("3 health checks failed in a row"), "{why}");
            assert!(why.ends_with("feeling sick"), "{why}");
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
    assert_eq!(history[0].action, RestartAction::Restarted);
    // The new instance is healthy (the mood lived in the old one).
    assert_eq!(sup.call(&pid, "ping".into()).await.unwrap(), "pong");
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn the_last_check_its_time_and_the_failure_streak_are_in_the_status() {
    let store = Arc::new(MemoryStateStore::default());
    let spec = moody().with_health(checks(1000));
    let (mut sup, _events, pid) = moody_tree(config(10), spec, store).await;
    let health = |sup: &AgentSupervisor| sup.handle().unwrap().children()[0].health.clone();
    sup.call(&pid, "sick".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let sick = loop {
        if let Some(h) = health(&sup)
            && h.streak >= 2
        {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "no failed checks: {:?}",
            health(&sup)
        );
        tokio::time::sleep(10 * MS).await;
    };
    assert_eq!(sick.failure.as_deref(), Some("feeling sick"));
    assert!(sick.at <= chrono::Utc::now());
    sup.call(&pid, "well".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&sup).is_none_or(|h| h.streak != 0) {
        assert!(Instant::now() < deadline, "never healthy again");
        tokio::time::sleep(10 * MS).await;
    }
    assert_eq!(health(&sup).unwrap().failure, None);
    assert_eq!(
        sup.get_children().await[0].1.restart_count,
        0,
        "below the threshold: not restarted"
    );
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn a_health_check_that_traps_ends_the_agent_at_once() {
    let store = Arc::new(MemoryStateStore::default());
    let spec = moody().with_health(checks(1000));
    let (mut sup, mut events, pid) = moody_tree(config(10), spec, store).await;
    sup.call(&pid, "faint".into()).await.unwrap();
    restarted(&mut events, &pid).await;
    let history = sup.get_restart_history().await;
    assert!(
        matches!(&history[0].reason, ExitReason::Unhealthy(why)
            if why.contains("its health check ended it") && why.contains("guest panic")),
        "{:?}",
        history[0].reason
    );
    sup.stop().await.unwrap();
}

/// A native agent whose health check says "no" once told so.
#[derive(Default)]
struct Gloomy {
    gloomy: bool,
}

#[async_trait]
impl SupervisedAgent for Gloomy {
    async fn init(&mut self, _args: InitArgs) -> SupervisionResult<()> {
        Ok(())
    }

    async fn start(&mut self) -> SupervisionResult<()> {
        Ok(())
    }

    async fn stop(&mut self) -> SupervisionResult<()> {
        Ok(())
    }

    async fn handle_message(&mut self, message: String) -> SupervisionResult<String> {
        self.gloomy = message == "gloom";
        Ok(message)
    }

    async fn health_check(&mut self) -> SupervisionResult<bool> {
        Ok(!self.gloomy)
    }
}

struct GloomyFactory;

#[async_trait]
impl AgentFactory for GloomyFactory {
    async fn create_agent(&self, _spec: &AgentSpec) -> SupervisionResult<Box<dyn SupervisedAgent>> {
        Ok(Box::new(Gloomy::default()))
    }

    fn validate_spec(&self, _spec: &AgentSpec) -> SupervisionResult<()> {
        Ok(())
    }

    fn supported_types(&self) -> Vec<String> {
        vec!["gloomy".into()]
    }
}

#[tokio::test]
async fn native_agents_are_checked_the_same_way_with_the_supervisors_defaults() {
    let config = SupervisorConfig {
        health_check_interval: 30 * MS,
        health_threshold: 2,
        ..config(10)
    };
    let spec = AgentSpec::new("gloomy".into(), json!({}));
    let pid = spec.agent_id.clone();
    let mut sup = AgentSupervisor::new(config, Arc::new(GloomyFactory)).with_child(spec);
    let mut events = sup.subscribe();
    sup.start().await.unwrap();
    sup.call(&pid, "gloom".into()).await.unwrap();
    restarted(&mut events, &pid).await;
    let history = sup.get_restart_history().await;
    assert!(
        matches!(&history[0].reason, ExitReason::Unhealthy(why)
            if why.starts_with("2 health checks failed in a row")
                && why.contains("reported itself unhealthy")),
        "{:?}",
        history[0].reason
    );
    sup.stop().await.unwrap();
}

// --- circuit breaker ----------------------------------------------------------

fn breaker() -> BreakerPolicy {
    BreakerPolicy {
        failures: 3,
        window: Duration::from_millis(500),
        cooldown: Duration::from_millis(300),
        max_cooldown: Duration::from_secs(2),
    }
}

async fn circuit_event(
    events: &mut Receiver<SupervisorEvent>,
    which: fn(&EventKind) -> bool,
) -> SupervisorEvent {
    wait_for(events, |e| which(&e.kind)).await
}

fn opened(kind: &EventKind) -> bool {
    matches!(kind, EventKind::CircuitOpened { .. })
}

#[tokio::test]
async fn without_a_breaker_a_crash_looping_child_brings_its_supervisor_down() {
    let store = Arc::new(MemoryStateStore::default());
    let (mut sup, mut events, pid) = moody_tree(config(2), moody(), store).await;
    assert!(sup.call(&pid, "break".into()).await.is_err());
    wait_for(&mut events, |e| matches!(e.kind, EventKind::Escalated)).await;
    assert!(matches!(sup.status(), SupervisorStatus::Failed(_)));
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn a_crash_looping_child_trips_its_circuit_fails_fast_and_recovers() {
    let store = Arc::new(MemoryStateStore::default());
    let spec = moody().with_breaker(breaker());
    let (mut sup, mut events, pid) = moody_tree(config(2), spec, store.clone()).await;

    // It breaks itself: the exit and two failed restarts trip the circuit
    // before the supervisor's intensity (2) is exceeded.
    assert!(sup.call(&pid, "break".into()).await.is_err());
    let first = circuit_event(&mut events, opened).await;
    assert_eq!(sup.status(), SupervisorStatus::Running, "no escalation");
    let info = sup.get_children().await[0].1.clone();
    assert_eq!(info.status, AgentStatus::Restarting);
    assert!(matches!(info.circuit, Some(CircuitStatus::Open { .. })));
    match sup.call(&pid, "ping".into()).await {
        Err(SupervisionError::CircuitOpen { agent, until }) => {
            assert_eq!(agent, pid);
            assert!(until > first.at);
        }
        other => panic!("expected a fast CircuitOpen, got {other:?}"),
    }

    // Its trial fails too (still broken): the circuit re-opens, with a
    // longer cool-down.
    circuit_event(&mut events, |k| {
        matches!(k, EventKind::CircuitHalfOpen { .. })
    })
    .await;
    let second = circuit_event(&mut events, opened).await;
    let cooldown = |e: &SupervisorEvent| match e.kind {
        EventKind::CircuitOpened { until, .. } => until - e.at,
        _ => unreachable!(),
    };
    assert!(
        cooldown(&second) > cooldown(&first),
        "{:?} then {:?}",
        cooldown(&first),
        cooldown(&second)
    );

    // The fault clears: the next trial starts and runs through its
    // probation, and the circuit closes.
    assert_eq!(store.delete(&pid.to_string(), "broken"), Ok(true));
    circuit_event(&mut events, |k| {
        matches!(k, EventKind::CircuitHalfOpen { .. })
    })
    .await;
    restarted(&mut events, &pid).await;
    assert_eq!(sup.call(&pid, "ping".into()).await.unwrap(), "pong");
    circuit_event(&mut events, |k| {
        matches!(k, EventKind::CircuitClosed { .. })
    })
    .await;
    let info = sup.get_children().await[0].1.clone();
    assert_eq!(info.circuit, Some(CircuitStatus::Closed));
    assert_eq!(sup.status(), SupervisorStatus::Running);

    let actions: Vec<RestartAction> = sup
        .get_restart_history()
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    let opened = actions
        .iter()
        .filter(|a| matches!(a, RestartAction::CircuitOpened { .. }))
        .count();
    assert_eq!(opened, 2, "{actions:?}");
    assert!(
        actions.contains(&RestartAction::CircuitClosed),
        "{actions:?}"
    );
    sup.stop().await.unwrap();
}

// --- backoff --------------------------------------------------------------------

/// The test agent (`exit:<reason>` ends it) with a backoff.
async fn backoff_tree(backoff: Backoff) -> (AgentSupervisor, Receiver<SupervisorEvent>, AgentPid) {
    let spec = AgentSpec::new("test".into(), json!({})).with_backoff(backoff);
    let pid = spec.agent_id.clone();
    let mut sup = AgentSupervisor::new(config(100), Arc::new(TestAgentFactory)).with_child(spec);
    let events = sup.subscribe();
    sup.start().await.unwrap();
    (sup, events, pid)
}

#[tokio::test]
async fn backoff_delays_grow_as_configured_and_never_block_other_requests() {
    let backoff = Backoff::Exponential {
        base: 200 * MS,
        cap: Duration::from_secs(10),
        jitter: false,
    };
    let (mut sup, mut events, pid) = backoff_tree(backoff).await;
    for expected in [200, 400, 800] {
        let crashed = Instant::now();
        assert!(sup.call(&pid, "exit:crash".into()).await.is_err());
        wait_for(&mut events, |e| {
            matches!(e.kind, EventKind::ChildExited { .. })
        })
        .await;
        // While it waits: shown as restarting, calls fail at once, and the
        // supervisor answers.
        let count = sup.count_children().await.unwrap();
        assert_eq!(count.active, 0, "still waiting for its backoff");
        assert_eq!(
            sup.get_children().await[0].1.status,
            AgentStatus::Restarting
        );
        assert!(matches!(
            sup.call(&pid, "ping".into()).await,
            Err(SupervisionError::CommunicationFailed(_))
        ));
        restarted(&mut events, &pid).await;
        let waited = crashed.elapsed();
        assert!(
            waited >= expected * MS && waited < expected * MS + Duration::from_secs(10),
            "restart {expected} ms after the crash: waited {waited:?}"
        );
        assert_eq!(sup.call(&pid, "ping".into()).await.unwrap(), "ping");
    }
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn stopping_during_a_backoff_wait_does_not_wait_for_it() {
    let backoff = Backoff::Exponential {
        base: Duration::from_secs(3600),
        cap: Duration::from_secs(3600),
        jitter: false,
    };
    let (mut sup, mut events, pid) = backoff_tree(backoff).await;
    assert!(sup.call(&pid, "exit:crash".into()).await.is_err());
    wait_for(&mut events, |e| {
        matches!(e.kind, EventKind::ChildExited { .. })
    })
    .await;
    tokio::time::timeout(Duration::from_secs(30), sup.stop())
        .await
        .expect("the stop does not wait an hour")
        .unwrap();
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
    assert_eq!(sup.get_children().await[0].1.restart_count, 0);
}
