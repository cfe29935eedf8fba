//! The WAT fixtures of `common::wat` against the real runtime: they load as
//! `supervised-agent` components, answer their commands, grow exactly the
//! memories and tables they claim, and fail the way a real guest fails when
//! a growth is refused.

mod common;

use std::sync::{Arc, OnceLock};

use common::wat::{Fixture, agent_component};
use terraphim_agent_supervisor::{
    AgentFault, AgentInstance, AgentLimits, AgentPid, AgentStatus, CallError, InitArgs,
    InstanceOptions, MemoryStateStore, Runtime, RuntimeConfig, SupervisorId, SystemMessage,
    TerminateReason, WasiGrants,
};

const PAGE: usize = 64 << 10;

/// A runtime whose per-agent ceilings admit the multi-memory fixtures (the
/// default admits two memories per agent).
fn roomy() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Runtime::with_config(RuntimeConfig {
            max_instances: 50,
            max_memories_per_agent: 8,
            max_tables_per_agent: 8,
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

/// Limits that no fixture of these tests reaches.
fn generous() -> AgentLimits {
    AgentLimits {
        memory_bytes: 64 << 20,
        table_elements: 10_000,
        ..common::test_limits()
    }
}

/// Load `fixture` into `runtime`, instantiate it under `limits`, and run
/// `init` and `start`.
async fn start(runtime: &Runtime, fixture: &Fixture, limits: AgentLimits) -> AgentInstance {
    let text = agent_component(fixture);
    let component = runtime
        .load_bytes("fixture", text.as_bytes())
        .unwrap_or_else(|e| panic!("{fixture:?} does not load: {e}\n{text}"));
    let options = InstanceOptions {
        agent_id: "fixture".into(),
        limits,
        grants: WasiGrants::default(),
        state: Arc::new(MemoryStateStore::default()),
        ..InstanceOptions::default()
    };
    let mut agent = AgentInstance::instantiate(runtime, &component, options)
        .await
        .unwrap_or_else(|e| panic!("{fixture:?} does not instantiate: {e}"));
    let args = InitArgs {
        agent_id: AgentPid::new(),
        supervisor_id: SupervisorId::new(),
        config: serde_json::json!({"some": "config"}),
    };
    agent.init(&args).await.expect("init");
    agent.start().await.expect("start");
    agent
}

fn small() -> Fixture {
    Fixture::default()
}

fn mixed() -> Fixture {
    Fixture {
        extra_memories: 3,
        extra_tables: 2,
        initial_pages: 2,
        table_initial: 4,
    }
}

#[tokio::test]
async fn fixtures_implement_the_whole_interface() {
    for fixture in [small(), mixed()] {
        let mut agent = start(roomy(), &fixture, generous()).await;
        assert_eq!(agent.handle_message("ping").await.unwrap(), "pong");
        assert_eq!(
            agent.handle_message("pong").await,
            Err(CallError::Application("unknown".into()))
        );
        assert_eq!(
            agent.handle_message("ping ").await,
            Err(CallError::Application("unknown".into()))
        );
        for bad in [
            "grow-all ",
            "grow-all x",
            "grow-all 1x",
            "grow-tables 4294967296",
        ] {
            assert_eq!(
                agent.handle_message(bad).await,
                Err(CallError::Application("bad number".into())),
                "{bad}"
            );
        }
        let long = "x".repeat(3 * PAGE);
        assert_eq!(
            agent.handle_message(&long).await,
            Err(CallError::Application("unknown".into())),
            "a message larger than the initial memory goes through realloc"
        );
        agent.health_check().await.unwrap();
        for message in [
            SystemMessage::Shutdown,
            SystemMessage::Restart,
            SystemMessage::HealthCheck,
            SystemMessage::StatusUpdate(AgentStatus::Running),
            SystemMessage::StatusUpdate(AgentStatus::Failed("why".into())),
            SystemMessage::SupervisorMessage("hello".into()),
        ] {
            agent.handle_system_message(&message).await.unwrap();
        }
        agent.stop().await.unwrap();
        agent
            .terminate(&TerminateReason::Error("bye".into()))
            .await
            .unwrap();
        assert!(agent.is_alive(), "{fixture:?}");
    }
}

/// `n` copies of `size`, separated by spaces.
fn sizes(n: usize, size: u32) -> String {
    vec![size.to_string(); n].join(" ")
}

#[tokio::test]
async fn fixtures_have_exactly_the_memories_and_tables_they_claim() {
    for fixture in [small(), mixed()] {
        let mut agent = start(roomy(), &fixture, generous()).await;
        assert_eq!(
            agent.handle_message("memory-sizes").await.unwrap(),
            sizes(fixture.memories(), fixture.initial_pages)
        );
        assert_eq!(
            agent.handle_message("table-sizes").await.unwrap(),
            sizes(fixture.tables(), fixture.table_initial)
        );
    }
}

#[tokio::test]
async fn grow_all_and_grow_tables_grow_every_one_within_the_limits() {
    for fixture in [small(), mixed()] {
        let mut agent = start(roomy(), &fixture, generous()).await;
        assert_eq!(agent.handle_message("grow-all 2").await.unwrap(), "grown");
        assert_eq!(agent.handle_message("grow-all 0").await.unwrap(), "grown");
        assert_eq!(
            agent.handle_message("memory-sizes").await.unwrap(),
            sizes(fixture.memories(), fixture.initial_pages + 2)
        );
        assert_eq!(
            agent.handle_message("grow-tables 10").await.unwrap(),
            "grown"
        );
        assert_eq!(
            agent.handle_message("table-sizes").await.unwrap(),
            sizes(fixture.tables(), fixture.table_initial + 10)
        );
        assert_eq!(agent.handle_message("ping").await.unwrap(), "pong");
    }
}

/// Every memory starts at `initial_pages`, and `grow-all` grows them all:
/// with room for one more page per memory in the agent's total, one round
/// of one page fits and the second is refused.
#[tokio::test]
async fn grow_all_grows_every_memory_up_to_the_agent_total() {
    let fixture = mixed();
    let initial = fixture.memories() * fixture.initial_pages as usize;
    let limits = AgentLimits {
        memory_bytes: (initial + fixture.memories()) * PAGE,
        ..generous()
    };
    let mut agent = start(roomy(), &fixture, limits).await;
    assert_eq!(agent.handle_message("grow-all 1").await.unwrap(), "grown");
    assert_eq!(
        agent.handle_message("memory-sizes").await.unwrap(),
        sizes(fixture.memories(), fixture.initial_pages + 1)
    );
    assert_eq!(agent.memory_bytes(), (initial + fixture.memories()) * PAGE);
    assert_eq!(
        agent.handle_message("grow-all 1").await,
        Err(CallError::Fault(AgentFault::MemoryLimit))
    );
    assert!(!agent.is_alive());
}

#[tokio::test]
async fn grow_all_past_the_memory_limit_is_a_memory_limit_fault() {
    for fixture in [small(), mixed()] {
        let limits = AgentLimits {
            memory_bytes: 16 * PAGE,
            ..generous()
        };
        let mut agent = start(roomy(), &fixture, limits).await;
        assert_eq!(
            agent.handle_message("grow-all 16").await,
            Err(CallError::Fault(AgentFault::MemoryLimit)),
            "{fixture:?}"
        );
        assert!(!agent.is_alive());
    }
}

#[tokio::test]
async fn grow_tables_past_the_table_limit_is_a_resource_limit_fault() {
    let fixture = mixed();
    let limits = AgentLimits {
        table_elements: 20,
        ..generous()
    };
    let mut agent = start(roomy(), &fixture, limits).await;
    assert_eq!(
        agent.handle_message("grow-tables 6").await.unwrap(),
        "grown"
    );
    assert_eq!(agent.handle_message("table-sizes").await.unwrap(), "10 10");
    assert_eq!(
        agent.handle_message("grow-tables 1").await,
        Err(CallError::Fault(AgentFault::ResourceLimit(
            "table elements".into()
        )))
    );
    assert!(!agent.is_alive());
}
