//! The hardening issue's defects, each reproduced with a real guest (a
//! guest example, or a WAT fixture with an exact shape): a hostile agent
//! must not bloat the host or lock its neighbours out, and what it hands the
//! host is bounded where it enters.
//!
//! The supervision defects (kill paths, retries) are in `tests/kill_paths.rs`.
//! Malformed and mutated components (the fuzz corpora, each loaded and, if
//! it loads, run through its whole life under small limits) are replayed
//! by `tests/fuzz_inputs.rs`; the defects the property tests and the
//! fuzzers found are in `tests/regressions.rs` and listed in the README.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::wat::{Fixture, agent_component};
use common::{
    component, runtime, started, started_granted, started_with, test_limits, wait_for, wasm_factory,
};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentComponent, AgentFault, AgentInstance, AgentLimits, AgentSpec, AgentStatus,
    AgentSupervisor, CallError, EventKind, ExitReason, InstanceOptions, LoadError, MAX_GUEST_TEXT,
    MemoryStateStore, RestartIntensity, RestartPolicy, RestartStrategy, Runtime, RuntimeConfig,
    StateQuota, StateStore, SupervisionError, SupervisorConfig, TestAgentFactory, WasiGrants,
    WasmAgentFactory, entry_cost,
};

const PAGE: usize = 64 << 10;

fn load(runtime: &Runtime, fixture: &Fixture) -> Result<AgentComponent, LoadError> {
    runtime.load_bytes("fixture", agent_component(fixture).as_bytes())
}

async fn instantiate(
    runtime: &Runtime,
    component: &AgentComponent,
    limits: AgentLimits,
) -> Result<AgentInstance, AgentFault> {
    let options = InstanceOptions {
        agent_id: "fixture".into(),
        limits,
        grants: WasiGrants::default(),
        state: Arc::new(MemoryStateStore::default()),
        ..InstanceOptions::default()
    };
    AgentInstance::instantiate(runtime, component, options).await
}

/// A runtime whose agents may have up to four memories.
fn four_memories() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Runtime::with_config(RuntimeConfig {
            max_instances: 20,
            max_memories_per_agent: 4,
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

/// Is `text` a guest text cut at the boundary: at most `MAX_GUEST_TEXT`
/// bytes of it, and a marker with its full length?
fn is_cut(text: &str, full_len: usize) -> bool {
    text.len() <= MAX_GUEST_TEXT && text.ends_with(&format!("[cut: {full_len} bytes in all]"))
}

// --- 1. logging ---------------------------------------------------------

#[tokio::test]
async fn a_log_flood_is_cut_to_the_budget_and_the_rest_is_counted() {
    let limits = AgentLimits {
        log_records_per_second: 100,
        log_bytes_per_second: 100 << 20,
        ..test_limits()
    };
    let mut agent = started("hostile", "flooder", limits).await;
    assert_eq!(
        agent.handle_message("log-flood 5000").await.unwrap(),
        "logged 5000"
    );
    let dropped = agent.dropped_logs();
    assert_eq!(dropped.records, 4900, "100 admitted, the rest dropped");
    assert_eq!(dropped.bytes, 4900 * 4096);
    // The next call has a budget of its own, but the second is spent.
    agent.handle_message("log-flood 10").await.unwrap();
    assert!(agent.dropped_logs().records >= 4900);
}

#[tokio::test]
async fn the_log_byte_budget_binds_before_the_record_budget() {
    let limits = AgentLimits {
        log_records_per_second: 1000,
        log_bytes_per_second: 64 * 4096,
        ..test_limits()
    };
    let mut agent = started("hostile", "flooder", limits).await;
    agent.handle_message("log-flood 100").await.unwrap();
    assert_eq!(agent.dropped_logs().records, 36, "64 records of 4 KiB fit");
}

// --- 2. memory is a per-agent total ---------------------------------------

#[tokio::test]
async fn memory_is_bounded_per_agent_across_all_its_memories() {
    // Four memories of one page each, under a total of four pages: each
    // memory alone is far below the limit, together they are at it.
    let fixture = Fixture {
        extra_memories: 3,
        ..Fixture::default()
    };
    let component = load(four_memories(), &fixture).unwrap();
    let limits = AgentLimits {
        memory_bytes: 4 * PAGE,
        ..test_limits()
    };
    let mut agent = instantiate(four_memories(), &component, limits)
        .await
        .unwrap();
    assert_eq!(agent.memory_bytes(), 4 * PAGE);
    assert_eq!(
        agent.handle_message("grow-all 2").await,
        Err(CallError::Fault(AgentFault::MemoryLimit)),
        "before the fix, each memory grew to 3 pages: 12 pages under a 4-page limit"
    );
}

#[tokio::test]
async fn memories_that_together_pass_the_total_fail_instantiation_with_memory_limit() {
    let fixture = Fixture {
        extra_memories: 3,
        initial_pages: 2,
        ..Fixture::default()
    };
    let component = load(four_memories(), &fixture).unwrap();
    let limits = AgentLimits {
        memory_bytes: 6 * PAGE,
        ..test_limits()
    };
    let fault = instantiate(four_memories(), &component, limits)
        .await
        .unwrap_err();
    assert_eq!(fault, AgentFault::MemoryLimit);
}

// --- 3. a greedy agent cannot lock its neighbours out --------------------

#[tokio::test]
async fn a_component_with_more_memories_than_an_agent_may_have_is_refused_at_load() {
    let runtime = Runtime::with_config(RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let greedy = Fixture {
        extra_memories: 40,
        ..Fixture::default()
    };
    let err = load(&runtime, &greedy).unwrap_err();
    assert!(
        matches!(&err, LoadError::ExceedsLimits { reason, .. } if reason.contains("41 Wasm linear memories")),
        "{err}"
    );
    assert!(err.to_string().contains("max_memories_per_agent"), "{err}");
    // Every slot of the pool is still there for ordinary agents.
    let echo = runtime
        .load_bytes("echo", terraphim_agent_supervisor::examples::ECHO)
        .unwrap();
    let mut neighbours = Vec::new();
    for _ in 0..4 {
        neighbours.push(instantiate(&runtime, &echo, test_limits()).await.unwrap());
    }
}

#[tokio::test]
async fn agents_at_their_full_share_leave_room_for_every_other_agent() {
    // Three agent slots; two greedy agents take the most memories an agent
    // may have. Before the fix the pool had two memory slots per agent
    // slot, so the greedy ones took the neighbour's.
    let runtime = Runtime::with_config(RuntimeConfig {
        max_instances: 3,
        max_memories_per_agent: 4,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let greedy = load(
        &runtime,
        &Fixture {
            extra_memories: 3,
            ..Fixture::default()
        },
    )
    .unwrap();
    let echo = runtime
        .load_bytes("echo", terraphim_agent_supervisor::examples::ECHO)
        .unwrap();
    let _a = instantiate(&runtime, &greedy, test_limits()).await.unwrap();
    let _b = instantiate(&runtime, &greedy, test_limits()).await.unwrap();
    let mut neighbour = instantiate(&runtime, &echo, test_limits())
        .await
        .expect("the neighbour starts");
    let args = terraphim_agent_supervisor::InitArgs {
        agent_id: Default::default(),
        supervisor_id: Default::default(),
        config: json!({}),
    };
    neighbour.init(&args).await.unwrap();
    assert_eq!(neighbour.handle_message("hi").await.unwrap(), "echo: hi");
}

#[tokio::test]
async fn more_instances_than_the_agent_may_create_is_a_resource_limit_fault() {
    let fixture = Fixture {
        extra_tables: 3,
        ..Fixture::default()
    };
    let component = load(runtime(), &fixture).unwrap();
    let limits = AgentLimits {
        instances: 2,
        ..test_limits()
    };
    let fault = instantiate(runtime(), &component, limits)
        .await
        .unwrap_err();
    assert_eq!(fault, AgentFault::ResourceLimit("instance count".into()));
}

#[tokio::test]
async fn a_table_growth_past_the_pool_is_a_resource_limit_not_a_panic() {
    // The agent's own total (100,000 by default) would allow it; the pool's
    // per-table size (20,000 by default) does not. Before the fix the pool
    // refused silently and the trap looked like a panic.
    let fixture = Fixture {
        extra_tables: 1,
        ..Fixture::default()
    };
    let component = load(runtime(), &fixture).unwrap();
    let limits = AgentLimits {
        table_elements: 100_000,
        ..test_limits()
    };
    let mut agent = instantiate(runtime(), &component, limits).await.unwrap();
    assert_eq!(
        agent.handle_message("grow-tables 25000").await,
        Err(CallError::Fault(AgentFault::ResourceLimit(
            "table elements".into()
        )))
    );
}

// --- 4. state quota -------------------------------------------------------

/// How many keys `k0`, `k1`, ... with values of `value` bytes fit in
/// `budget` bytes.
fn keys_that_fit(value: usize, budget: usize) -> usize {
    let mut used = 0;
    (0..)
        .take_while(|i| {
            used += entry_cost(&format!("k{i}"), &vec![0; value]);
            used <= budget
        })
        .count()
}

#[tokio::test]
async fn state_is_bounded_by_bytes_in_proportion_to_the_agent_limits() {
    let store = Arc::new(MemoryStateStore::default());
    let limits = AgentLimits {
        memory_bytes: 4 << 20,
        ..test_limits()
    };
    let mut agent = started_with("hostile", "hoarder", limits, store.clone()).await;
    let reply = agent.handle_message("state-fill 10000").await.unwrap();
    let expected = keys_that_fit(10_000, 4 << 20);
    assert!(
        reply.starts_with(&format!("stored {expected} keys: "))
            && reply.contains("over its budget"),
        "{reply}"
    );
    assert!(store.bytes_used("hoarder") <= 4 << 20);
    assert!(agent.is_alive(), "a refused write is an error, not a crash");
}

#[tokio::test]
async fn state_bytes_can_be_set_per_agent() {
    let store = Arc::new(MemoryStateStore::default());
    let limits = AgentLimits {
        state_bytes: Some(50_000),
        ..test_limits()
    };
    let mut agent = started_with("hostile", "small", limits, store.clone()).await;
    let reply = agent.handle_message("state-fill 1000").await.unwrap();
    let expected = keys_that_fit(1000, 50_000);
    assert!(
        reply.starts_with(&format!("stored {expected} keys: ")),
        "{reply}"
    );
}

#[tokio::test]
async fn the_store_has_a_host_wide_cap() {
    let store = Arc::new(MemoryStateStore::with_quota(StateQuota {
        max_total_bytes: 100_000,
        ..StateQuota::default()
    }));
    let mut first = started_with("hostile", "first", test_limits(), store.clone()).await;
    let mut second = started_with("hostile", "second", test_limits(), store.clone()).await;
    let reply = first.handle_message("state-fill 1000").await.unwrap();
    assert!(reply.contains("state store is full"), "{reply}");
    let reply = second.handle_message("state-fill 1000").await.unwrap();
    assert!(reply.starts_with("stored 0 keys: "), "{reply}");
    assert!(store.bytes_used("first") + store.bytes_used("second") <= 100_000);
}

/// A tree over the echo agent whose state lives in `store`.
async fn echo_tree(store: Arc<MemoryStateStore>) -> AgentSupervisor {
    let factory = WasmAgentFactory::new(runtime().clone())
        .with_default_limits(test_limits())
        .with_component("echo", component("echo"))
        .with_state_store(store);
    let mut sup = AgentSupervisor::new(SupervisorConfig::default(), Arc::new(factory));
    sup.start().await.unwrap();
    sup
}

#[tokio::test]
async fn state_is_kept_across_restarts_and_cleared_when_the_spec_is_deleted() {
    let store = Arc::new(MemoryStateStore::default());
    let mut sup = echo_tree(store.clone()).await;
    let pid = sup
        .spawn_agent(AgentSpec::new("echo".into(), json!({})))
        .await
        .unwrap();
    let id = pid.to_string();
    assert_eq!(sup.call(&pid, "count".into()).await.unwrap(), "1");
    sup.handle_agent_exit(pid.clone(), ExitReason::Error("test".into()))
        .await
        .unwrap();
    assert_eq!(sup.call(&pid, "count".into()).await.unwrap(), "2", "kept");
    sup.terminate_child(&pid).await.unwrap();
    assert!(
        store.bytes_used(&id) > 0,
        "terminated, spec kept: state kept"
    );
    sup.delete_child(&pid).await.unwrap();
    assert_eq!(store.bytes_used(&id), 0, "spec deleted: state cleared");
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn a_temporary_childs_state_goes_with_it() {
    let store = Arc::new(MemoryStateStore::default());
    let mut sup = echo_tree(store.clone()).await;
    let spec = AgentSpec::new("echo".into(), json!({}))
        .with_restart_type(terraphim_agent_supervisor::RestartType::Temporary);
    let pid = sup.spawn_agent(spec).await.unwrap();
    sup.call(&pid, "count".into()).await.unwrap();
    assert!(store.bytes_used(&pid.to_string()) > 0);
    sup.handle_agent_exit(pid.clone(), ExitReason::Error("done".into()))
        .await
        .unwrap();
    assert_eq!(store.bytes_used(&pid.to_string()), 0);
    sup.stop().await.unwrap();
}

// --- 5. guest text is cut where it enters ---------------------------------

#[tokio::test]
async fn a_huge_application_error_is_cut_at_the_boundary() {
    let mut agent = started("hostile", "talker", test_limits()).await;
    let Err(CallError::Application(error)) = agent.handle_message("error 8388608").await else {
        panic!("expected an application error");
    };
    assert!(is_cut(&error, 8 << 20), "{} bytes", error.len());
    assert!(agent.is_alive());
}

#[tokio::test]
async fn a_huge_start_error_is_cut_at_the_boundary() {
    let factory = wasm_factory();
    let mut sup = AgentSupervisor::new(SupervisorConfig::default(), factory);
    sup.start().await.unwrap();
    let spec = AgentSpec::new("hostile".into(), json!({ "init_error_bytes": 8 << 20 }));
    let Err(SupervisionError::AgentStartFailed(_, error)) = sup.spawn_agent(spec).await else {
        panic!("expected a start failure");
    };
    assert!(error.len() < MAX_GUEST_TEXT + 200, "{} bytes", error.len());
    assert!(error.contains(&format!("[cut: {} bytes in all]", 8 << 20)));
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn exit_reasons_are_cut_and_the_history_is_bounded_by_bytes() {
    let config = SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForOne,
            RestartIntensity::new(1000, Duration::from_secs(60)),
        ),
        max_history_bytes: 64 << 10,
        ..SupervisorConfig::default()
    };
    let mut sup = AgentSupervisor::new(config, Arc::new(TestAgentFactory));
    let mut events = sup.subscribe();
    sup.start().await.unwrap();
    // The same crashing message forty times: no quarantine here.
    let spec = AgentSpec::new("test".into(), json!({})).with_poison_threshold(0);
    let pid = sup.spawn_agent(spec).await.unwrap();
    let reason = "r".repeat(100 << 10);
    for _ in 0..40 {
        // The test agent exits with the error it is sent.
        assert!(sup.call(&pid, format!("exit:{reason}")).await.is_err());
        wait_for(
            &mut events,
            |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if *agent == pid),
        )
        .await;
    }
    let history = sup.get_restart_history().await;
    let mut text = 0;
    for entry in &history {
        let ExitReason::Error(reason) = &entry.reason else {
            panic!("unexpected entry {entry:?}");
        };
        assert!(is_cut(reason, 100 << 10), "{} bytes", reason.len());
        text += reason.len();
    }
    assert!(text <= 64 << 10, "the history holds {text} bytes of text");
    assert!(history.len() < 40, "old entries were dropped by weight");
    let children = sup.get_children().await;
    let last = children[0].1.last_exit.as_ref().unwrap().to_string();
    assert!(last.len() < MAX_GUEST_TEXT + 100, "last_exit is cut too");
    sup.stop().await.unwrap();
}

// --- 6. replies are bounded like requests ---------------------------------

#[tokio::test]
async fn a_reply_larger_than_the_message_limit_is_refused_and_the_agent_lives() {
    let mut sup = AgentSupervisor::new(SupervisorConfig::default(), wasm_factory());
    sup.start().await.unwrap();
    let pid = sup
        .spawn_agent(AgentSpec::new("hostile".into(), json!({})))
        .await
        .unwrap();
    let max = SupervisorConfig::default().max_message_bytes;
    match sup.call(&pid, format!("reply {}", 2 << 20)).await {
        Err(SupervisionError::ReplyTooLarge { len, max: m }) => {
            assert_eq!((len, m), (2 << 20, max));
        }
        other => panic!("expected ReplyTooLarge, got {other:?}"),
    }
    assert_eq!(
        sup.call(&pid, format!("reply {max}")).await.unwrap().len(),
        max,
        "a reply of exactly the limit passes"
    );
    assert_eq!(sup.call(&pid, "ping".into()).await.unwrap(), "pong");
    let children = sup.get_children().await;
    assert_eq!(children[0].1.restart_count, 0);
    assert_eq!(children[0].1.status, AgentStatus::Running);
    sup.stop().await.unwrap();
}

// --- 10. the network grant ------------------------------------------------

#[tokio::test]
async fn the_network_grant_lets_an_agent_connect_and_its_absence_does_not() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let message = format!("connect {address}");

    let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
    let granted = WasiGrants {
        network: true,
        ..WasiGrants::default()
    };
    let mut probe = started_granted(
        "sandbox-probe",
        "net",
        test_limits(),
        state.clone(),
        granted,
    )
    .await;
    assert_eq!(probe.handle_message(&message).await.unwrap(), "connected");
    listener.accept().expect("the agent's connection arrived");

    let mut denied = started_granted(
        "sandbox-probe",
        "no-net",
        test_limits(),
        state,
        WasiGrants::default(),
    )
    .await;
    let err = denied.handle_message(&message).await.unwrap_err();
    assert!(matches!(err, CallError::Application(_)), "{err:?}");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    assert!(
        listener.accept().is_err(),
        "nothing connected without the grant"
    );
}
