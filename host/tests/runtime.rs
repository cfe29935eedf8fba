//! The WASM runtime with real guest components: every fault class maps to
//! its exit reason, a fault never reaches a neighbour, bad input gives typed
//! errors.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{component, runtime, started, started_granted, started_with, test_limits};
use terraphim_agent_supervisor::{
    AgentFault, AgentInstance, AgentLimits, CallError, InstanceOptions, LoadError,
    MemoryStateStore, Preopen, Runtime, RuntimeConfig, WasiGrants,
};

async fn crash(name: &str, limits: AgentLimits, message: &str) -> CallError {
    let mut agent = started(name, "victim", limits).await;
    let err = agent
        .handle_message(message)
        .await
        .expect_err("the call must fail");
    assert!(!agent.is_alive(), "a faulted instance is dead");
    err
}

#[tokio::test]
async fn echo_replies_and_application_errors_are_not_crashes() {
    let mut agent = started("echo", "echo-1", test_limits()).await;
    assert_eq!(agent.handle_message("hi").await.unwrap(), "echo: hi");
    assert_eq!(
        agent.handle_message("").await,
        Err(CallError::Application("empty message".into()))
    );
    assert!(agent.is_alive());
    assert_eq!(agent.handle_message("count").await.unwrap(), "1");
    agent.health_check().await.unwrap();
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn out_of_fuel_per_call() {
    let limits = AgentLimits {
        fuel_per_call: Some(5_000_000),
        ..test_limits()
    };
    assert_eq!(
        crash("fuel-burner", limits, "burn").await,
        CallError::Fault(AgentFault::OutOfFuel)
    );
}

#[tokio::test]
async fn out_of_fuel_over_the_lifetime() {
    // Measure one call, then give a lifetime budget of a few such calls.
    let mut probe = started("echo", "probe", test_limits()).await;
    let before = probe.fuel_used();
    probe.handle_message("x").await.unwrap();
    let per_call = probe.fuel_used() - before;

    let limits = AgentLimits {
        fuel_per_lifetime: Some(probe.fuel_used() + 3 * per_call),
        ..test_limits()
    };
    let mut agent = started("echo", "frugal", limits).await;
    let mut answered = 0;
    let err = loop {
        match agent.handle_message("x").await {
            Ok(_) => answered += 1,
            Err(e) => break e,
        }
        assert!(answered < 100, "the lifetime budget was never enforced");
    };
    assert_eq!(err, CallError::Fault(AgentFault::OutOfFuel));
    assert!((2..=4).contains(&answered), "answered {answered} calls");
}

#[tokio::test]
async fn memory_limit() {
    let limits = AgentLimits {
        memory_bytes: 8 << 20,
        ..test_limits()
    };
    assert_eq!(
        crash("memory-hog", limits, "grow").await,
        CallError::Fault(AgentFault::MemoryLimit)
    );
}

#[tokio::test]
async fn memory_within_the_limit_is_fine() {
    let mut agent = started("memory-hog", "modest", test_limits()).await;
    assert_eq!(agent.handle_message("grow 4").await.unwrap(), "grew 4");
}

#[tokio::test]
async fn deadline_bounds_a_loop_without_fuel_limit() {
    let limits = AgentLimits {
        fuel_per_call: None,
        deadline: Duration::from_millis(200),
        ..test_limits()
    };
    assert_eq!(
        crash("fuel-burner", limits, "burn").await,
        CallError::Fault(AgentFault::DeadlineExceeded)
    );
}

#[tokio::test]
async fn deadline_bounds_a_blocking_host_call() {
    let limits = AgentLimits {
        deadline: Duration::from_millis(200),
        ..test_limits()
    };
    assert_eq!(
        crash("sleeper", limits, "sleep 60000").await,
        CallError::Fault(AgentFault::DeadlineExceeded)
    );
}

#[tokio::test]
async fn stack_overflow() {
    assert_eq!(
        crash("crasher", test_limits(), "stack").await,
        CallError::Fault(AgentFault::StackOverflow)
    );
}

#[tokio::test]
async fn panic_and_unreachable() {
    for message in ["panic", "unreachable"] {
        assert_eq!(
            crash("crasher", test_limits(), message).await,
            CallError::Fault(AgentFault::Panic),
            "{message}"
        );
    }
}

#[tokio::test]
async fn other_trap_carries_its_code() {
    assert_eq!(
        crash("crasher", test_limits(), "oob").await,
        CallError::Fault(AgentFault::Trap("MemoryOutOfBounds".into()))
    );
}

#[tokio::test]
async fn wasi_exit_zero_is_normal_and_non_zero_is_a_fault() {
    assert_eq!(
        crash("exit", test_limits(), "exit 0").await,
        CallError::Exited
    );
    // Rust's std on wasip2 reports any non-zero code as failure (1).
    assert_eq!(
        crash("exit", test_limits(), "exit 3").await,
        CallError::Fault(AgentFault::Exit(1))
    );
}

#[tokio::test]
async fn init_error_is_reported_not_trapped() {
    let options = InstanceOptions {
        agent_id: "init-fails".into(),
        limits: test_limits(),
        grants: WasiGrants::default(),
        state: Arc::new(MemoryStateStore::default()),
        ..InstanceOptions::default()
    };
    let mut agent = AgentInstance::instantiate(runtime(), &component("failing-init"), options)
        .await
        .unwrap();
    let args = terraphim_agent_supervisor::InitArgs {
        agent_id: Default::default(),
        supervisor_id: Default::default(),
        config: serde_json::json!({}),
    };
    assert_eq!(
        agent.init(&args).await,
        Err(CallError::Application(
            "failing-init: refusing to start".into()
        ))
    );
}

#[tokio::test]
async fn memory_below_the_initial_size_fails_instantiation() {
    let options = InstanceOptions {
        agent_id: "tiny".into(),
        limits: AgentLimits {
            memory_bytes: 64 << 10,
            ..test_limits()
        },
        grants: WasiGrants::default(),
        state: Arc::new(MemoryStateStore::default()),
        ..InstanceOptions::default()
    };
    let err = AgentInstance::instantiate(runtime(), &component("echo"), options)
        .await
        .unwrap_err();
    assert_eq!(err, AgentFault::MemoryLimit);
}

#[tokio::test]
async fn a_full_instance_pool_fails_instantiation() {
    let small = Runtime::with_config(RuntimeConfig {
        max_instances: 1,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let echo = small
        .load_bytes("echo", terraphim_agent_supervisor::examples::ECHO)
        .unwrap();
    let options = InstanceOptions {
        agent_id: "one".into(),
        limits: test_limits(),
        grants: WasiGrants::default(),
        state: Arc::new(MemoryStateStore::default()),
        ..InstanceOptions::default()
    };
    let _first = AgentInstance::instantiate(&small, &echo, options.clone())
        .await
        .unwrap();
    let second = AgentInstance::instantiate(&small, &echo, options)
        .await
        .unwrap_err();
    assert!(
        matches!(second, AgentFault::InstantiateFailed(_)),
        "{second:?}"
    );
}

#[tokio::test]
async fn a_dead_instance_is_never_re_entered() {
    let mut agent = started("crasher", "dead", test_limits()).await;
    agent.handle_message("panic").await.unwrap_err();
    let again = agent.handle_message("ping").await.unwrap_err();
    assert!(
        matches!(again, CallError::Fault(AgentFault::Host(_))),
        "{again:?}"
    );
    // terminate on a dead instance is a no-op, not a second crash.
    agent
        .terminate(&terraphim_agent_supervisor::TerminateReason::Shutdown)
        .await
        .unwrap();
}

#[tokio::test]
async fn state_survives_a_new_instance_of_the_same_agent() {
    let state: Arc<MemoryStateStore> = Arc::new(MemoryStateStore::default());
    let mut first = started_with("echo", "counter", test_limits(), state.clone()).await;
    assert_eq!(first.handle_message("count").await.unwrap(), "1");
    assert_eq!(first.handle_message("count").await.unwrap(), "2");
    drop(first);
    let mut second = started_with("echo", "counter", test_limits(), state.clone()).await;
    assert_eq!(second.handle_message("count").await.unwrap(), "3");
    let mut other = started_with("echo", "someone-else", test_limits(), state).await;
    assert_eq!(other.handle_message("count").await.unwrap(), "1");
}

/// Run `bad` while a neighbour answers pings on the same single-threaded
/// executor; the number of pings answered while `bad` ran.
async fn neighbour_answers_while(
    name: &str,
    limits: AgentLimits,
    message: &str,
) -> (CallError, usize) {
    let mut neighbour = started("echo", "neighbour", test_limits()).await;
    let mut bad = started(name, "bad", limits).await;
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let pinger = tokio::spawn(async move {
        let mut answered = 0usize;
        while !flag.load(Ordering::Acquire) {
            let reply = neighbour.handle_message("ping").await.unwrap();
            assert_eq!(reply, "echo: ping");
            answered += 1;
            tokio::task::yield_now().await;
        }
        // Still healthy afterwards.
        assert_eq!(neighbour.handle_message("count").await.unwrap(), "1");
        answered
    });
    let err = bad.handle_message(message).await.unwrap_err();
    done.store(true, Ordering::Release);
    (err, pinger.await.unwrap())
}

#[tokio::test(flavor = "current_thread")]
async fn neighbour_keeps_answering_while_an_agent_burns_fuel() {
    let limits = AgentLimits {
        fuel_per_call: Some(300_000_000),
        deadline: Duration::from_secs(30),
        ..test_limits()
    };
    let (err, answered) = neighbour_answers_while("fuel-burner", limits, "burn").await;
    assert_eq!(err, CallError::Fault(AgentFault::OutOfFuel));
    assert!(answered > 0, "the neighbour was starved");
}

#[tokio::test(flavor = "current_thread")]
async fn neighbour_keeps_answering_while_an_agent_loops() {
    let limits = AgentLimits {
        fuel_per_call: None,
        deadline: Duration::from_millis(300),
        ..test_limits()
    };
    let (err, answered) = neighbour_answers_while("fuel-burner", limits, "burn").await;
    assert_eq!(err, CallError::Fault(AgentFault::DeadlineExceeded));
    assert!(answered > 0, "the neighbour was starved");
}

#[tokio::test(flavor = "current_thread")]
async fn neighbour_keeps_answering_while_an_agent_sleeps_past_its_deadline() {
    let limits = AgentLimits {
        deadline: Duration::from_millis(300),
        ..test_limits()
    };
    let (err, answered) = neighbour_answers_while("sleeper", limits, "sleep 60000").await;
    assert_eq!(err, CallError::Fault(AgentFault::DeadlineExceeded));
    assert!(answered > 0, "the neighbour was starved");
}

#[tokio::test(flavor = "current_thread")]
async fn neighbour_survives_an_agent_blowing_its_memory_limit() {
    let limits = AgentLimits {
        memory_bytes: 32 << 20,
        ..test_limits()
    };
    // Growth to the limit may finish within one epoch tick, so only the
    // neighbour's health afterwards (checked inside) is asserted.
    let (err, _answered) = neighbour_answers_while("memory-hog", limits, "grow").await;
    assert_eq!(err, CallError::Fault(AgentFault::MemoryLimit));
}

#[test]
fn malformed_bytes_are_not_wasm() {
    let err = runtime()
        .load_bytes("junk", b"this is not wasm")
        .unwrap_err();
    assert!(matches!(err, LoadError::NotWasm { .. }), "{err:?}");
    let err = runtime()
        .load_bytes("truncated", b"\0asm\x0d\0\x01\0\x07")
        .unwrap_err();
    assert!(matches!(err, LoadError::Invalid { .. }), "{err:?}");
}

#[test]
fn a_core_module_is_not_a_component() {
    let err = runtime()
        .load_bytes("module", b"(module (func (export \"f\")))")
        .unwrap_err();
    assert!(matches!(err, LoadError::CoreModule { .. }), "{err:?}");
    assert!(err.to_string().contains("wasm32-wasip2"), "{err}");
}

#[test]
fn a_component_of_another_world_names_what_is_missing() {
    let other = r#"(component
        (core module $m (func (export "f")))
        (core instance $i (instantiate $m))
        (func (export "f") (canon lift (core func $i "f"))))"#;
    let err = runtime().load_bytes("other", other.as_bytes()).unwrap_err();
    let LoadError::WrongWorld { missing, .. } = &err else {
        panic!("expected WrongWorld, got {err:?}");
    };
    assert!(missing.contains("terraphim:agent/agent@0.1.1"), "{missing}");
}

#[test]
fn a_missing_file_is_an_io_error() {
    let err = runtime().load_file("/nonexistent/agent.wasm").unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn wasi_grants_nothing_by_default() {
    let mut probe = started("sandbox-probe", "probe", test_limits()).await;
    assert_eq!(probe.handle_message("env PATH").await.unwrap(), "unset");
    assert_eq!(probe.handle_message("args").await.unwrap(), "");
    for message in ["read /etc/hostname", "read /", "connect 127.0.0.1:9"] {
        let err = probe.handle_message(message).await.unwrap_err();
        assert!(
            matches!(err, CallError::Application(_)),
            "{message}: {err:?}"
        );
    }
    assert!(
        probe.is_alive(),
        "a refused capability is an error, not a crash"
    );
}

#[tokio::test]
async fn wasi_grants_exactly_what_the_spec_grants() {
    let dir = std::env::temp_dir().join(format!("wasi-grant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hello.txt"), "hello from the host").unwrap();
    let grants = WasiGrants {
        env: vec![("GREETING".into(), "hi".into())],
        args: vec!["probe".into(), "--verbose".into()],
        preopens: vec![Preopen {
            host: dir.clone(),
            guest: "/data".into(),
            read_only: true,
        }],
        ..WasiGrants::default()
    };
    let state = Arc::new(MemoryStateStore::default());
    let mut probe = started_granted("sandbox-probe", "granted", test_limits(), state, grants).await;
    assert_eq!(probe.handle_message("env GREETING").await.unwrap(), "hi");
    assert_eq!(probe.handle_message("env PATH").await.unwrap(), "unset");
    assert_eq!(
        probe.handle_message("args").await.unwrap(),
        "probe --verbose"
    );
    assert_eq!(
        probe.handle_message("read /data/hello.txt").await.unwrap(),
        "hello from the host"
    );
    // Outside the granted directory nothing is visible.
    probe
        .handle_message("read /etc/hostname")
        .await
        .unwrap_err();
    probe
        .handle_message("read /data/../../etc/hostname")
        .await
        .unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
}
