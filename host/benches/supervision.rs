//! `cargo bench -p terraphim_agent_supervisor --bench supervision`
//!
//! Prints latency percentiles and rates measured in this run, on this
//! machine. Each figure says what it measures. Set `BENCH_QUICK=1` for a
//! short run (fewer iterations).

use std::sync::Arc;
use std::time::{Duration, Instant};

use terraphim_agent_supervisor::{
    AgentInstance, AgentLimits, AgentPid, InitArgs, InstanceOptions, MemoryStateStore, Runtime,
    SupervisorId, WasiGrants, examples,
};

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

    let mut agent = AgentInstance::instantiate(runtime, &echo, options(&state))
        .await
        .expect("instantiate");
    agent.init(&args).await.expect("init");
    let n = iterations(100_000);
    let t0 = Instant::now();
    for _ in 0..n {
        agent.handle_message("ping").await.expect("reply");
    }
    let elapsed = t0.elapsed();
    println!(
        "{:<48} {:>9.0} calls/s  ({:.2} us each)",
        "direct call handle-message(\"ping\")",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / n as f64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let runtime = Runtime::new().expect("wasm runtime");
        println!("== raw wasmtime (one agent instance, no supervisor) ==");
        raw_wasmtime(&runtime).await;
    });
}
