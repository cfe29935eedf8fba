//! The benchmark behind `agent-host bench`: every figure of the host's
//! performance targets, measured in this process, beside the raw wasmtime
//! work it wraps.
//!
//! - **crash-to-ready**: a `crasher` child traps while handling a message;
//!   the clock stops when its restarted instance has answered the next
//!   message (the scenario of the Erlang/OTP anchor `otp_restart.erl`), for
//!   `one_for_one` with 1 and 100 children and `one_for_all` /
//!   `rest_for_one` with 10.
//! - **raw**: the same work without a supervisor (trap, drop the store,
//!   instantiate, init, start, call), and instantiate + init alone.
//! - **spawn rate**: supervised echo agents added by concurrent callers.
//! - **idle agents**: that many echo agents held at once under one
//!   supervisor, each answering one message; resident memory per agent.
//! - **call throughput**: one caller's round trips through the supervisor,
//!   and straight into the instance.
//! - **cold start**: loading a component with compilation, then from the
//!   compile cache.
//!
//! Every figure comes from running the code in this process; nothing is
//! estimated. Run it on a quiet machine with a release build.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast;

use crate::{
    AgentInstance, AgentLimits, AgentPid, AgentSpec, AgentSupervisor, EventKind, InitArgs,
    InstanceOptions, LoadError, MemoryStateStore, RestartIntensity, RestartPolicy, RestartStrategy,
    Runtime, RuntimeConfig, RuntimeError, SupervisionError, SupervisorConfig, SupervisorEvent,
    SupervisorId, WasiGrants, WasmAgentFactory, examples,
};

/// What to measure, and how long.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Fewer iterations of everything: a run of seconds, with noisier
    /// figures.
    pub quick: bool,
    /// How many echo agents to hold at once for the memory figure.
    pub idle_agents: usize,
    /// How many echo agents to spawn for the spawn rate.
    pub spawn_agents: usize,
    /// The component whose cold start is measured (compiled, then loaded
    /// from a fresh compile cache); `None`: the largest bundled example.
    pub cold_start: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            quick: false,
            idle_agents: 100_000,
            spawn_agents: 20_000,
            cold_start: None,
        }
    }
}

impl BenchOptions {
    /// The short run: every figure, with smaller counts.
    pub fn quick() -> Self {
        Self {
            quick: true,
            idle_agents: 10_000,
            spawn_agents: 5_000,
            cold_start: None,
        }
    }

    fn iterations(&self, full: usize) -> usize {
        if self.quick {
            (full / 20).max(50)
        } else {
            full
        }
    }
}

/// Latency percentiles of one figure, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// The slowest sample.
    pub max_us: f64,
    /// How many samples.
    pub samples: usize,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
            samples.get(i).copied().map_or(0.0, us)
        };
        Self {
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: samples.last().copied().map_or(0.0, us),
            samples: samples.len(),
        }
    }
}

/// One crash-to-ready scenario: the whole, and the median of its phases.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CrashToReady {
    /// From the call that crashes to the restarted child's answer.
    #[serde(flatten)]
    pub total: Latency,
    /// Median from the call to its error (the crash reported to the caller).
    pub trap_to_error_p50_us: f64,
    /// Median from the error to the restart event.
    pub restart_p50_us: f64,
    /// Median of the next call, to the new instance.
    pub next_call_p50_us: f64,
}

/// The crash-to-ready scenarios.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CrashToReadyAll {
    /// `one_for_one`, the crasher alone.
    pub one_for_one: CrashToReady,
    /// `one_for_one`, the crasher and 99 echo agents.
    pub one_for_one_100: CrashToReady,
    /// `one_for_all`, the crasher and 9 echo agents (all 10 restart).
    pub one_for_all: CrashToReady,
    /// `rest_for_one`, the crasher first and 9 echo agents (all 10 restart).
    pub rest_for_one: CrashToReady,
}

/// Agents held at once, and what they cost.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IdleAgents {
    /// How many agents ran at once (each answered a message).
    pub count: usize,
    /// Growth of the process's resident memory, divided by `count`.
    pub rss_bytes_per_agent: u64,
    /// The process's resident memory with all of them running.
    pub rss_bytes_total: u64,
    /// How long spawning them took, in seconds.
    pub spawn_seconds: f64,
}

/// Calls per second of one caller.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CallThroughput {
    /// Through the supervisor (`SupervisorHandle::call`).
    pub supervised: f64,
    /// Straight into the instance (`AgentInstance::handle_message`).
    pub direct: f64,
}

/// Loading a component, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ColdStart {
    /// The component measured.
    pub component: String,
    /// Its size in bytes.
    pub bytes: usize,
    /// Compiled now (no cache).
    pub compile: f64,
    /// Loaded from the compile cache.
    pub cached: f64,
}

/// Every figure of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Crash-to-ready per scenario.
    pub crash_to_ready: CrashToReadyAll,
    /// Instantiate + init of the echo agent, without a supervisor.
    pub raw_instantiate_init: Latency,
    /// Trap, new instance, init, start and the next call, without a
    /// supervisor.
    pub raw_crash_to_ready: Latency,
    /// Supervised agents spawned per second (concurrent callers).
    pub spawn_rate_per_s: f64,
    /// Agents held at once.
    pub idle_agents: IdleAgents,
    /// Call round trips per second.
    pub call_throughput_per_s: CallThroughput,
    /// Loading a component.
    pub cold_start_ms: ColdStart,
    /// Cores this process may use.
    pub cores: usize,
}

/// Why the benchmark could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The WASM runtime could not be created.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A component could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A supervisor or agent did not do what the scenario needs.
    #[error("{0}")]
    Supervision(#[from] SupervisionError),
    /// An agent answered something else than expected.
    #[error("unexpected: {0}")]
    Unexpected(String),
}

type Result<T> = std::result::Result<T, BenchError>;

/// Run every measurement; `progress` hears the name of each before it
/// starts.
///
/// # Errors
///
/// [`BenchError`] if a runtime, component or supervisor needed fails.
pub async fn run(
    options: &BenchOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<BenchReport> {
    // A pool for the idle agents that this machine cannot hold is refused
    // now, not after minutes of measuring.
    crate::runtime::check_pool_fits(pool_size(options.idle_agents.max(options.spawn_agents)))?;
    let runtime = Runtime::new()?;
    progress("raw wasmtime");
    let raw = raw(options, &runtime).await?;
    let factory = factory(&runtime)?;
    let scenario = |strategy, children, iterations| {
        let factory = factory.clone();
        async move { crash_to_ready(&factory, strategy, children, iterations).await }
    };
    progress("crash-to-ready one_for_one, 1 child");
    let one_for_one = scenario(RestartStrategy::OneForOne, 1, options.iterations(5000)).await?;
    progress("crash-to-ready one_for_one, 100 children");
    let one_for_one_100 =
        scenario(RestartStrategy::OneForOne, 100, options.iterations(2000)).await?;
    progress("crash-to-ready one_for_all, 10 children");
    let one_for_all = scenario(RestartStrategy::OneForAll, 10, options.iterations(1000)).await?;
    progress("crash-to-ready rest_for_one, 10 children");
    let rest_for_one = scenario(RestartStrategy::RestForOne, 10, options.iterations(1000)).await?;
    progress("supervised call throughput");
    let supervised = supervised_calls(&factory, options.iterations(100_000)).await?;
    drop(factory);
    progress("spawn rate");
    let spawn_rate_per_s = spawn_rate(options.spawn_agents).await?;
    progress("idle agents");
    let idle_agents = idle_agents(options.idle_agents).await?;
    progress("cold start");
    let cold_start_ms = cold_start(options).await?;
    Ok(BenchReport {
        crash_to_ready: CrashToReadyAll {
            one_for_one,
            one_for_one_100,
            one_for_all,
            rest_for_one,
        },
        raw_instantiate_init: raw.instantiate_init,
        raw_crash_to_ready: raw.crash_to_ready,
        spawn_rate_per_s,
        idle_agents,
        call_throughput_per_s: CallThroughput {
            supervised,
            direct: raw.calls_per_s,
        },
        cold_start_ms,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

struct Raw {
    instantiate_init: Latency,
    crash_to_ready: Latency,
    calls_per_s: f64,
}

fn options(state: &Arc<MemoryStateStore>) -> InstanceOptions {
    InstanceOptions {
        agent_id: "bench".into(),
        limits: AgentLimits::default(),
        grants: WasiGrants::default(),
        state: state.clone(),
        ..InstanceOptions::default()
    }
}

fn init_args() -> InitArgs {
    InitArgs {
        agent_id: AgentPid::new(),
        supervisor_id: SupervisorId::new(),
        config: json!({}),
    }
}

fn unexpected(what: impl std::fmt::Display) -> BenchError {
    BenchError::Unexpected(what.to_string())
}

/// The work a supervisor wraps, done by hand on one instance.
async fn raw(options_: &BenchOptions, runtime: &Runtime) -> Result<Raw> {
    let state = Arc::new(MemoryStateStore::default());
    let echo = runtime.load_bytes("echo", examples::ECHO)?;
    let args = init_args();
    let n = options_.iterations(5000);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut agent = AgentInstance::instantiate(runtime, &echo, options(&state))
            .await
            .map_err(unexpected)?;
        agent.init(&args).await.map_err(unexpected)?;
        samples.push(t0.elapsed());
    }
    let instantiate_init = Latency::of(samples);

    let crasher = runtime.load_bytes("crasher", examples::CRASHER)?;
    let n = options_.iterations(5000);
    let mut samples = Vec::with_capacity(n);
    let mut agent = AgentInstance::instantiate(runtime, &crasher, options(&state))
        .await
        .map_err(unexpected)?;
    agent.init(&args).await.map_err(unexpected)?;
    for _ in 0..n {
        let t0 = Instant::now();
        if agent.handle_message("unreachable").await.is_ok() {
            return Err(unexpected("the crasher did not trap"));
        }
        drop(agent);
        agent = AgentInstance::instantiate(runtime, &crasher, options(&state))
            .await
            .map_err(unexpected)?;
        agent.init(&args).await.map_err(unexpected)?;
        agent.start().await.map_err(unexpected)?;
        let reply = agent.handle_message("ping").await.map_err(unexpected)?;
        samples.push(t0.elapsed());
        if reply != "pong" {
            return Err(unexpected(format!("the crasher answered {reply:?}")));
        }
    }
    let crash_to_ready = Latency::of(samples);

    let mut agent = AgentInstance::instantiate(runtime, &echo, options(&state))
        .await
        .map_err(unexpected)?;
    agent.init(&args).await.map_err(unexpected)?;
    let n = options_.iterations(200_000);
    let t0 = Instant::now();
    for _ in 0..n {
        agent.handle_message("ping").await.map_err(unexpected)?;
    }
    let calls_per_s = n as f64 / t0.elapsed().as_secs_f64();
    Ok(Raw {
        instantiate_init,
        crash_to_ready,
        calls_per_s,
    })
}

fn factory(runtime: &Runtime) -> Result<Arc<WasmAgentFactory>> {
    let mut factory = WasmAgentFactory::new(runtime.clone());
    for (name, bytes) in examples::ALL {
        factory = factory.with_component(*name, runtime.load_bytes(name, bytes)?);
    }
    Ok(Arc::new(factory))
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

/// The spec of a benchmark agent: the poison quarantine off, since the
/// crasher crashes on the same message every time on purpose.
fn spec(agent_type: &str) -> AgentSpec {
    let mut spec = AgentSpec::new(agent_type.into(), json!({}));
    spec.poison_threshold = 0;
    spec
}

async fn restarted(
    events: &mut broadcast::Receiver<SupervisorEvent>,
    pid: &AgentPid,
) -> Result<()> {
    loop {
        match events.recv().await {
            Ok(SupervisorEvent {
                kind: EventKind::ChildRestarted { agent, .. },
                ..
            }) if &agent == pid => return Ok(()),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => return Err(unexpected(format!("event channel: {e}"))),
        }
    }
}

/// A `crasher` first, then `children - 1` echo agents.
async fn crash_to_ready(
    factory: &Arc<WasmAgentFactory>,
    strategy: RestartStrategy,
    children: usize,
    iterations: usize,
) -> Result<CrashToReady> {
    let crasher = spec("crasher");
    let pid = crasher.agent_id.clone();
    let mut sup =
        AgentSupervisor::new(config(strategy, children), factory.clone()).with_child(crasher);
    for _ in 1..children {
        sup = sup.with_child(spec("echo"));
    }
    let mut events = sup.subscribe();
    sup.start().await?;
    let handle = sup.handle()?;
    let mut samples = Vec::with_capacity(iterations);
    let mut phases = [
        Vec::with_capacity(iterations),
        Vec::with_capacity(iterations),
        Vec::with_capacity(iterations),
    ];
    for _ in 0..iterations {
        let t0 = Instant::now();
        if handle.call(&pid, "unreachable".into()).await.is_ok() {
            return Err(unexpected("the crasher did not trap"));
        }
        let t1 = Instant::now();
        restarted(&mut events, &pid).await?;
        let t2 = Instant::now();
        let reply = handle.call(&pid, "ping".into()).await?;
        let t3 = Instant::now();
        if reply != "pong" {
            return Err(unexpected(format!("the crasher answered {reply:?}")));
        }
        samples.push(t3 - t0);
        phases[0].push(t1 - t0);
        phases[1].push(t2 - t1);
        phases[2].push(t3 - t2);
    }
    sup.stop().await?;
    let [trap, restart, next] = phases.map(|p| Latency::of(p).p50_us);
    Ok(CrashToReady {
        total: Latency::of(samples),
        trap_to_error_p50_us: trap,
        restart_p50_us: restart,
        next_call_p50_us: next,
    })
}

async fn supervised_calls(factory: &Arc<WasmAgentFactory>, n: usize) -> Result<f64> {
    let echo = spec("echo");
    let pid = echo.agent_id.clone();
    let mut sup = AgentSupervisor::new(config(RestartStrategy::OneForOne, 1), factory.clone())
        .with_child(echo);
    sup.start().await?;
    let handle = sup.handle()?;
    let t0 = Instant::now();
    for _ in 0..n {
        handle.call(&pid, "ping".into()).await?;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    sup.stop().await?;
    Ok(rate)
}

/// The pool slots for `agents` instances, with a few to spare.
fn pool_size(agents: usize) -> u32 {
    u32::try_from(agents + 16).unwrap_or(u32::MAX)
}

/// A runtime and an echo-only factory with room for `agents` instances.
fn sized(agents: usize) -> Result<Arc<WasmAgentFactory>> {
    let runtime = Runtime::with_config(RuntimeConfig {
        max_instances: pool_size(agents),
        // The agents' own default limit: the pool reserves no more.
        max_memory_bytes: AgentLimits::default().memory_bytes,
        ..RuntimeConfig::default()
    })?;
    let echo = runtime.load_bytes("echo", examples::ECHO)?;
    Ok(Arc::new(
        WasmAgentFactory::new(runtime).with_component("echo", echo),
    ))
}

/// Spawn `agents` echo agents under one supervisor from concurrent callers.
async fn spawn_many(
    factory: &Arc<WasmAgentFactory>,
    agents: usize,
) -> Result<(AgentSupervisor, Vec<AgentPid>, Duration)> {
    let mut sup = AgentSupervisor::new(config(RestartStrategy::OneForOne, agents), factory.clone());
    sup.start().await?;
    let handle = sup.handle()?;
    let callers = 4 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let handle = handle.clone();
        let share = agents / callers + usize::from(caller < agents % callers);
        tasks.push(tokio::spawn(async move {
            let mut pids = Vec::with_capacity(share);
            for _ in 0..share {
                pids.push(handle.spawn_agent(spec("echo")).await?);
            }
            Ok::<_, SupervisionError>(pids)
        }));
    }
    let mut pids = Vec::with_capacity(agents);
    for task in tasks {
        pids.extend(task.await.map_err(unexpected)??);
    }
    Ok((sup, pids, t0.elapsed()))
}

async fn spawn_rate(agents: usize) -> Result<f64> {
    let factory = sized(agents)?;
    let (mut sup, pids, elapsed) = spawn_many(&factory, agents).await?;
    sup.stop().await?;
    Ok(pids.len() as f64 / elapsed.as_secs_f64())
}

async fn idle_agents(agents: usize) -> Result<IdleAgents> {
    let factory = sized(agents)?;
    let before = resident_bytes();
    let (mut sup, pids, elapsed) = spawn_many(&factory, agents).await?;
    let handle = sup.handle()?;
    for pid in &pids {
        let reply = handle.call(pid, "ping".into()).await?;
        if reply != "echo: ping" {
            return Err(unexpected(format!("an echo agent answered {reply:?}")));
        }
    }
    let after = resident_bytes();
    sup.stop().await?;
    Ok(IdleAgents {
        count: pids.len(),
        rss_bytes_per_agent: after.saturating_sub(before) / pids.len().max(1) as u64,
        rss_bytes_total: after,
        spawn_seconds: elapsed.as_secs_f64(),
    })
}

/// The process's resident memory, from `/proc/self/statm` (0 if unknown).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

async fn cold_start(options: &BenchOptions) -> Result<ColdStart> {
    let (name, bytes) = match &options.cold_start {
        Some(path) => (
            path.display().to_string(),
            std::fs::read(path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?,
        ),
        None => {
            let (name, bytes) = examples::ALL
                .iter()
                .max_by_key(|(_, bytes)| bytes.len())
                .ok_or_else(|| unexpected("no bundled example"))?;
            ((*name).to_owned(), bytes.to_vec())
        }
    };
    let dir = std::env::temp_dir().join(format!("agent-host-bench-{}", std::process::id()));
    let runtime = Runtime::with_config(RuntimeConfig {
        compile_cache: Some(dir.clone()),
        ..RuntimeConfig::default()
    })?;
    let t0 = Instant::now();
    let first = runtime.load_bytes(&name, &bytes);
    let compile = t0.elapsed();
    let t1 = Instant::now();
    let second = runtime.load_bytes(&name, &bytes);
    let cached = t1.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    let (first, second) = (first?, second?);
    if first.from_cache() || !second.from_cache() {
        return Err(unexpected(
            "the compile cache did not serve the second load",
        ));
    }
    Ok(ColdStart {
        component: name,
        bytes: bytes.len(),
        compile: compile.as_secs_f64() * 1e3,
        cached: cached.as_secs_f64() * 1e3,
    })
}
