//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod http_client;
pub mod http_server;
pub mod wat;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use terraphim_agent_supervisor::{
    AgentComponent, AgentInstance, AgentLimits, AgentPid, InitArgs, InstanceOptions,
    MemoryStateStore, Runtime, StateStore, SupervisorId, WasiGrants,
};

/// `found` (a tool a test needs), or `None` after saying why the test
/// skips: `why` on stderr and the terminal (past the test harness's
/// capture, so that a plain run shows it). With `require_env` set to `1`
/// (as CI sets it) a missing tool fails the test instead.
pub fn tool_or_skip(
    found: Option<std::path::PathBuf>,
    why: &str,
    require_env: &str,
) -> Option<std::path::PathBuf> {
    use std::io::Write;
    if found.is_none() {
        assert!(
            std::env::var(require_env).as_deref() != Ok("1"),
            "{why}, and {require_env}=1"
        );
        let _ = writeln!(std::io::stderr().lock(), "{why}");
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/tty")
            .and_then(|mut tty| writeln!(tty, "{why}"));
    }
    found
}

/// The first ```` ```toml ```` block of the README after `heading` (from
/// the top with `""`): documented tree files, which must stay valid.
pub fn readme_toml_block(heading: &str) -> String {
    let readme = include_str!("../../../README.md");
    let section = readme
        .find(heading)
        .unwrap_or_else(|| panic!("the README has {heading:?}"));
    let start = section
        + readme[section..]
            .find("```toml\n")
            .unwrap_or_else(|| panic!("{heading:?} has a toml block"))
        + "```toml\n".len();
    let end = start + readme[start..].find("```").expect("the toml block ends");
    readme[start..end].to_owned()
}

/// One runtime (engine) shared by every test of a test binary.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::new().expect("runtime"))
}

/// Load one of the embedded guest examples, compiled once per test binary.
pub fn component(name: &str) -> AgentComponent {
    static CACHE: OnceLock<std::sync::Mutex<Vec<(String, AgentComponent)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap();
    if let Some((_, c)) = cache.iter().find(|(n, _)| n == name) {
        return c.clone();
    }
    let bytes = terraphim_agent_supervisor::examples::ALL
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no guest example named {name}"))
        .1;
    let c = runtime().load_bytes(name, bytes).expect("example loads");
    cache.push((name.to_owned(), c.clone()));
    c
}

/// Limits for tests: short deadline, moderate fuel.
pub fn test_limits() -> AgentLimits {
    AgentLimits {
        fuel_per_call: Some(200_000_000),
        deadline: Duration::from_secs(2),
        memory_bytes: 16 << 20,
        ..AgentLimits::default()
    }
}

/// Instantiate `name` with `limits` and run `init` + `start`.
pub async fn started(name: &str, agent_id: &str, limits: AgentLimits) -> AgentInstance {
    started_with(
        name,
        agent_id,
        limits,
        Arc::new(MemoryStateStore::default()),
    )
    .await
}

/// Like [`started`], with a given state store.
pub async fn started_with(
    name: &str,
    agent_id: &str,
    limits: AgentLimits,
    state: Arc<dyn StateStore>,
) -> AgentInstance {
    started_granted(name, agent_id, limits, state, WasiGrants::default()).await
}

/// Like [`started_with`], with WASI grants.
pub async fn started_granted(
    name: &str,
    agent_id: &str,
    limits: AgentLimits,
    state: Arc<dyn StateStore>,
    grants: WasiGrants,
) -> AgentInstance {
    let options = InstanceOptions {
        agent_id: agent_id.to_owned(),
        limits,
        grants,
        state,
        ..InstanceOptions::default()
    };
    let mut agent = AgentInstance::instantiate(runtime(), &component(name), options)
        .await
        .expect("instantiates");
    let args = InitArgs {
        agent_id: AgentPid::new(),
        supervisor_id: SupervisorId::new(),
        config: serde_json::json!({}),
    };
    agent.init(&args).await.expect("init");
    agent.start().await.expect("start");
    agent
}

/// A factory with every guest example registered under its name.
pub fn wasm_factory() -> Arc<terraphim_agent_supervisor::WasmAgentFactory> {
    let mut factory = terraphim_agent_supervisor::WasmAgentFactory::new(runtime().clone())
        .with_default_limits(test_limits());
    for (name, _) in terraphim_agent_supervisor::examples::ALL {
        factory = factory.with_component(*name, component(name));
    }
    Arc::new(factory)
}

/// Wait (at most 30 s, a safety net against hangs) for the first event
/// matching `pred`.
pub async fn wait_for(
    events: &mut tokio::sync::broadcast::Receiver<terraphim_agent_supervisor::SupervisorEvent>,
    pred: impl Fn(&terraphim_agent_supervisor::SupervisorEvent) -> bool,
) -> terraphim_agent_supervisor::SupervisorEvent {
    use tokio::sync::broadcast::error::RecvError;
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if pred(&event) => return event,
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => panic!("event channel closed"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("the expected event never came")
}
pub mod cli;
