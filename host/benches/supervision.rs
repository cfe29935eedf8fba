//! `cargo bench -p terraphim_agent_supervisor --bench supervision`
//!
//! Prints latency percentiles and rates measured in this run, on this
//! machine. Each figure says what it measures. Set `BENCH_QUICK=1` for a
//! short run (fewer iterations).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use terraphim_agent_supervisor::{
    AgentInstance, AgentLimits, AgentPid, AgentSpec, AgentSupervisor, EventKind, InitArgs,
    InstanceOptions, MemoryStateStore, RestartIntensity, RestartPolicy, RestartStrategy, Runtime,
    SupervisorConfig, SupervisorEvent, SupervisorId, WasiGrants, WasmAgentFactory, examples,
};
use tokio::sync::broadcast;

/// Percentiles of a set of samples.
struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let total: Duration = samples.iter().sum();
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        mean: total / samples.len() as u32,
    }
}

fn print(label: &str, s: &Stats) {
    println!(
        "{label:<48} p50 {:>9.1} us   p99 {:>9.1} us   mean {:>9.1} us",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.mean.as_secs_f64() * 1e6
    );
}

/// `n` operations of `what` done in `elapsed`, as a rate and a mean.
fn print_rate(label: &str, what: &str, n: usize, elapsed: Duration) {
    println!(
        "{label:<48} {:>9.0} {what}/s  ({n} {what}, {:.2} us each)",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / n as f64
    );
}

fn iterations(full: usize) -> usize {
    if std::env::var_os("BENCH_QUICK").is_some() {
        (full / 20).max(50)
    } else {
        full
    }
}

fn options(state: &Arc<MemoryStateStore>) -> InstanceOptions {
    InstanceOptions {
        agent_id: "bench".into(),
        limits: AgentLimits::default(),
        grants: WasiGrants::default(),
        state: state.clone(),
    }
}

fn init_args() -> InitArgs {
    InitArgs {
        agent_id: AgentPid::new(),
        supervisor_id: SupervisorId::new(),
        config: serde_json::json!({}),
    }
}

async fn raw_wasmtime(runtime: &Runtime) {
    let state = Arc::new(MemoryStateStore::default());
    let echo = runtime
        .load_bytes("echo", examples::ECHO)
        .expect("echo loads");
    let args = init_args();

    let n = iterations(5000);
    let mut inst = Vec::with_capacity(n);
    let mut inst_init = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut agent = AgentInstance::instantiate(runtime, &echo, options(&state))
            .await
            .expect("instantiate");
        let t1 = Instant::now();
        agent.init(&args).await.expect("init");
        let t2 = Instant::now();
        inst.push(t1 - t0);
        inst_init.push(t2 - t0);
    }
    print("instantiate from InstancePre (pooled store)", &stats(inst));
    print("instantiate + init", &stats(inst_init));

    // The same work as a supervised crash-to-ready, without a supervisor:
    // the instance traps, is dropped, and a fresh one is instantiated,
    // initialised, started and answers.
    let crasher = runtime
        .load_bytes("crasher", examples::CRASHER)
        .expect("crasher loads");
    let n = iterations(5000);
    let mut samples = Vec::with_capacity(n);
    let mut agent = AgentInstance::instantiate(runtime, &crasher, options(&state))
        .await
        .expect("instantiate");
    agent.init(&args).await.expect("init");
    for _ in 0..n {
        let t0 = Instant::now();
        agent
            .handle_message("unreachable")
            .await
            .expect_err("traps");
        drop(agent);
        agent = AgentInstance::instantiate(runtime, &crasher, options(&state))
            .await
            .expect("instantiate");
        agent.init(&args).await.expect("init");
        agent.start().await.expect("start");
        let reply = agent.handle_message("ping").await.expect("reply");
        samples.push(t0.elapsed());
        assert_eq!(reply, "pong");
    }
    print("trap + new instance + init + start + call", &stats(samples));

    let mut agent = AgentInstance::instantiate(runtime, &echo, options(&state))
        .await
        .expect("instantiate");
    agent.init(&args).await.expect("init");
    let n = iterations(100_000);
    let t0 = Instant::now();
    for _ in 0..n {
        agent.handle_message("ping").await.expect("reply");
    }
    print_rate(
        "direct call handle-message(\"ping\")",
        "calls",
        n,
        t0.elapsed(),
    );
}

fn factory(runtime: &Runtime) -> Arc<WasmAgentFactory> {
    let mut factory = WasmAgentFactory::new(runtime.clone());
    for (name, bytes) in examples::ALL {
        let component = runtime.load_bytes(name, bytes).expect("example loads");
        factory = factory.with_component(*name, component);
    }
    Arc::new(factory)
}

fn config(strategy: RestartStrategy, max_children: usize) -> SupervisorConfig {
    SupervisorConfig {
        // Never give up: the benchmark crashes on purpose, many times.
        restart_policy: RestartPolicy::new(
            strategy,
            RestartIntensity::new(u32::MAX, Duration::from_millis(1)),
        ),
        max_children,
        ..SupervisorConfig::default()
    }
}

async fn restarted(events: &mut broadcast::Receiver<SupervisorEvent>, pid: &AgentPid) {
    loop {
        match events.recv().await {
            Ok(SupervisorEvent {
                kind: EventKind::ChildRestarted { agent, .. },
                ..
            }) if &agent == pid => return,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("event channel: {e}"),
        }
    }
}

/// A `crasher` first, then `children - 1` echo agents; the crasher traps
/// while handling a message, and the clock stops when its restarted
/// instance has answered the next message (the OTP anchor's scenario).
/// Also the p50 of its three phases: until the caller has the error, until
/// the restart event, and the next call.
async fn crash_to_ready(
    factory: &Arc<WasmAgentFactory>,
    strategy: RestartStrategy,
    children: usize,
    iterations: usize,
) -> (Stats, [Duration; 3]) {
    let crasher = AgentSpec::new("crasher".into(), json!({}));
    let pid = crasher.agent_id.clone();
    let mut sup =
        AgentSupervisor::new(config(strategy, children), factory.clone()).with_child(crasher);
    for _ in 1..children {
        sup = sup.with_child(AgentSpec::new("echo".into(), json!({})));
    }
    let mut events = sup.subscribe();
    sup.start().await.expect("tree starts");
    let mut samples = Vec::with_capacity(iterations);
    let mut phases = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t0 = Instant::now();
        sup.call(&pid, "unreachable".into())
            .await
            .expect_err("traps");
        let t1 = Instant::now();
        restarted(&mut events, &pid).await;
        let t2 = Instant::now();
        let reply = sup
            .call(&pid, "ping".into())
            .await
            .expect("new instance answers");
        let t3 = Instant::now();
        samples.push(t3 - t0);
        phases.push([t1 - t0, t2 - t1, t3 - t2]);
        assert_eq!(reply, "pong");
    }
    sup.stop().await.expect("tree stops");
    let phase = |i: usize| stats(phases.iter().map(|p: &[Duration; 3]| p[i]).collect()).p50;
    (stats(samples), [phase(0), phase(1), phase(2)])
}

async fn supervised(runtime: &Runtime) {
    let factory = factory(runtime);
    for (strategy, children, iters) in [
        (RestartStrategy::OneForOne, 1, 5000),
        (RestartStrategy::OneForOne, 100, 2000),
        (RestartStrategy::OneForAll, 10, 1000),
        (RestartStrategy::RestForOne, 10, 1000),
    ] {
        let (s, [trap, restart, next]) =
            crash_to_ready(&factory, strategy, children, iterations(iters)).await;
        print(
            &format!("crash-to-ready {strategy:?} children={children}"),
            &s,
        );
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "    phases (p50): trap to error reply {:.1} us, restart {:.1} us, next call {:.1} us",
            us(trap),
            us(restart),
            us(next)
        );
    }

    // Spawn rate: supervised echo agents added one by one.
    let n = iterations(800);
    let mut sup = AgentSupervisor::new(config(RestartStrategy::OneForOne, n), factory.clone());
    sup.start().await.expect("supervisor starts");
    let t0 = Instant::now();
    for _ in 0..n {
        sup.spawn_agent(AgentSpec::new("echo".into(), json!({})))
            .await
            .expect("spawn");
    }
    print_rate(
        "spawn_agent (create + instantiate + init + start)",
        "agents",
        n,
        t0.elapsed(),
    );
    sup.stop().await.expect("stops");

    // Round trips through the supervisor's call path.
    let echo = AgentSpec::new("echo".into(), json!({}));
    let pid = echo.agent_id.clone();
    let mut sup =
        AgentSupervisor::new(config(RestartStrategy::OneForOne, 1), factory).with_child(echo);
    sup.start().await.expect("starts");
    let n = iterations(100_000);
    let t0 = Instant::now();
    for _ in 0..n {
        sup.call(&pid, "ping".into()).await.expect("reply");
    }
    print_rate(
        "supervisor call path handle-message(\"ping\")",
        "calls",
        n,
        t0.elapsed(),
    );
    sup.stop().await.expect("stops");
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The measured code runs in a spawned task, as agents' callers do: the
    // block_on thread is not a runtime worker, and every wake-up from it
    // would cross threads.
    rt.block_on(async {
        tokio::spawn(async {
            let runtime = Runtime::new().expect("wasm runtime");
            println!("== raw wasmtime (one agent instance, no supervisor) ==");
            raw_wasmtime(&runtime).await;
            println!("== supervised (AgentSupervisor + WasmAgentFactory) ==");
            supervised(&runtime).await;
        })
        .await
        .expect("benchmark task");
    });
}
