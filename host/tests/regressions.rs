//! Regression tests of the defects found by the property tests
//! (`tests/decision_model.rs`) and the fuzzers (`fuzz/`), end to end where
//! the defect reached a running supervisor. The pure cases are next to their
//! properties in `tests/decision_model.rs` and `tests/fuzz_inputs.rs`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::wait_for;
use common::wat::{Fixture, agent_component};
use serde_json::json;
use terraphim_agent_supervisor::runtime::MAX_DEADLINE;
use terraphim_agent_supervisor::supervisor::breaker::MAX_PARK;
use terraphim_agent_supervisor::supervisor::health::MAX_HEALTH_INTERVAL;
use terraphim_agent_supervisor::tree::TreeFile;
use terraphim_agent_supervisor::{
    AgentInstance, AgentLimits, AgentPid, AgentSpec, AgentSupervisor, CircuitStatus, EventKind,
    HealthPolicy, InitArgs, InstanceOptions, MemoryStateStore, RestartIntensity, RestartPolicy,
    RestartStrategy, SupervisionError, SupervisorConfig, SupervisorId, SupervisorStatus,
    TestAgentFactory, WasiGrants,
};

/// A tree file may set a cool-down of `i64::MAX` ms (some 292 million
/// years). When such a circuit opened, the supervisor turned its trial time
/// into a wall-clock date past chrono's last one and panicked: the whole
/// level died. Found by `decision_model::the_breaker_survives_huge_policies`.
/// Now the circuit stays open for at most `MAX_PARK` (about a century).
#[tokio::test]
async fn a_circuit_with_an_endless_cooldown_opens_without_killing_its_supervisor() {
    let text = format!(
        "[defaults.breaker]\nfailures = 1\ncooldown_ms = {max}\nmax_cooldown_ms = {max}\n\
         [supervisor]\nname = \"root\"\nchildren = []\n",
        max = i64::MAX
    );
    let tree = TreeFile::parse(Path::new("/nonexistent/tree.toml"), &text).expect("accepted");
    let policy = tree.root.breaker.expect("the default breaker");
    assert_eq!(policy.cooldown, Duration::from_millis(i64::MAX as u64));

    let config = SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForOne,
            RestartIntensity::new(10, Duration::from_secs(60)),
        ),
        ..SupervisorConfig::default()
    };
    let spec = AgentSpec::new("test".into(), json!({})).with_breaker(policy);
    let pid = spec.agent_id.clone();
    let mut sup = AgentSupervisor::new(config, Arc::new(TestAgentFactory)).with_child(spec);
    let mut events = sup.subscribe();
    sup.start().await.expect("starts");
    assert!(sup.call(&pid, "exit:crash".into()).await.is_err());
    let opened = wait_for(&mut events, |e| {
        matches!(e.kind, EventKind::CircuitOpened { .. })
    })
    .await;
    let EventKind::CircuitOpened { until, .. } = opened.kind else {
        unreachable!()
    };
    let longest = chrono::TimeDelta::from_std(MAX_PARK).expect("a century fits");
    assert!(
        until > Utc::now() && until <= Utc::now() + longest,
        "{until}"
    );
    // The level is alive and answers.
    assert_eq!(sup.status(), SupervisorStatus::Running);
    let info = sup.get_children().await[0].1.clone();
    assert_eq!(info.circuit, Some(CircuitStatus::Open { until }));
    sup.stop().await.expect("stops");
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
}

/// `AgentLimits { deadline: Duration::MAX }` (the public API takes it)
/// overflowed `Instant` when the first call was armed: every call into the
/// agent panicked. Now a deadline counts up to `MAX_DEADLINE`, and
/// `AgentLimits::validate` (which the factories call on every spec)
/// refuses a longer one. Found by reading the clock arithmetic the
/// breaker's property test pointed at.
#[tokio::test]
async fn an_endless_deadline_does_not_overflow_the_clock() {
    let limits = AgentLimits {
        deadline: Duration::MAX,
        ..common::test_limits()
    };
    assert!(limits.validate().is_err(), "refused at the door");
    let runtime = common::runtime();
    let component = runtime
        .load_bytes("fixture", agent_component(&Fixture::default()).as_bytes())
        .expect("the fixture loads");
    let options = InstanceOptions {
        agent_id: "endless".into(),
        limits,
        grants: WasiGrants::default(),
        state: Arc::new(MemoryStateStore::default()),
        ..InstanceOptions::default()
    };
    let mut agent = AgentInstance::instantiate(runtime, &component, options)
        .await
        .expect("instantiates");
    let args = InitArgs {
        agent_id: AgentPid::new(),
        supervisor_id: SupervisorId::new(),
        config: json!({}),
    };
    agent.init(&args).await.expect("init");
    assert_eq!(agent.handle_message("ping").await.expect("a reply"), "pong");
    assert!(MAX_DEADLINE >= Duration::from_secs(3600 * 24 * 365));
}

/// A `HealthPolicy` built through the library (not a tree file) with an
/// interval of `Duration::MAX` was taken as it was, and the child's task
/// panicked arming its first check (`now + interval` overflowed
/// `Instant`). Now the supervisor refuses the spec when the child is
/// added, with a typed error, as it does a bad backoff or breaker; and a
/// tree file with such a policy is refused when it is checked.
#[tokio::test]
async fn an_endless_health_interval_is_refused_when_the_child_is_added() {
    let endless = HealthPolicy {
        interval: Duration::MAX,
        ..HealthPolicy::OFF
    };
    assert!(endless.validate().is_err());
    let longest = HealthPolicy {
        interval: MAX_HEALTH_INTERVAL,
        ..HealthPolicy::OFF
    };
    assert!(longest.validate().is_ok());

    let mut sup = AgentSupervisor::new(SupervisorConfig::default(), Arc::new(TestAgentFactory));
    sup.start().await.expect("starts");
    let spec = AgentSpec::new("test".into(), json!({})).with_health(endless);
    match sup.spawn_agent(spec).await {
        Err(SupervisionError::InvalidAgentSpec(why)) => {
            assert!(why.contains("health check interval"), "{why}")
        }
        other => panic!("expected InvalidAgentSpec, got {other:?}"),
    }
    // The supervisor is alive and takes a sound child.
    assert_eq!(sup.status(), SupervisorStatus::Running);
    let pid = sup
        .spawn_agent(AgentSpec::new("test".into(), json!({})))
        .await
        .expect("a sound child is added");
    assert_eq!(sup.call(&pid, "hi".into()).await.expect("a reply"), "hi");
    sup.stop().await.expect("stops");

    let text = format!(
        "[supervisor]\nname = \"root\"\n\n[[supervisor.children]]\nname = \"a\"\n\
         component = \"a.wasm\"\nhealth = {{ interval_ms = {max} }}\n",
        max = i64::MAX
    );
    let Err(problems) = TreeFile::parse(Path::new("/nonexistent/tree.toml"), &text) else {
        panic!("a tree with an endless health interval was accepted");
    };
    let problems = problems.to_string();
    assert!(
        problems.contains("health") && problems.contains("at most"),
        "{problems}"
    );
}
