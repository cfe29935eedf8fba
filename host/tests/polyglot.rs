//! Agents written in Python (componentize-py) and JavaScript
//! (componentize-js), from `guest-examples/python-agent` and
//! `guest-examples/js-agent`, under supervision: they load under the
//! runtime's default ceilings, log through the host, keep their state
//! across a crash, and their exceptions, errors and endless loops are
//! classified like a Rust agent's.
//!
//! The components come from `TERRAPHIM_POLYGLOT_DIR` (`python_agent.wasm`,
//! `js_agent.wasm`) if it is set; otherwise this test binary builds them once
//! with `guest-examples/build-polyglot.sh` into `<target dir>/polyglot`,
//! which installs the pinned tools on first use and is quick when nothing
//! changed. If a tool is missing or cannot be installed, each test of that
//! language prints `SKIPPED: <test>: <why>` to stderr and returns, unless
//! `TERRAPHIM_REQUIRE_POLYGLOT=1` is set (as in CI): then it fails.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::cli::{RunningHost, TempDir, text};
use common::{runtime, wait_for};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentComponent, AgentFault, AgentInstance, AgentLimits, AgentPid, AgentSpec, AgentSupervisor,
    EventKind, ExitReason, InitArgs, InstanceOptions, MemoryStateStore, RestartIntensity,
    RestartPolicy, RestartStrategy, SupervisionError, SupervisorConfig, SupervisorEvent,
    SupervisorId, WasiGrants, WasmAgentFactory,
};

/// Fuel for each call. Measured (componentize-py 0.25.1, componentize-js
/// 0.23.0): the JS agent's `init` takes about 1.3 million, its messages
/// 0.2-0.35 million; the Python agent's `init` about 0.16 million, its
/// messages under 0.05 million and an uncaught exception (the traceback
/// printed) about 1.1 million. `loop` burns this in milliseconds.
const FUEL_PER_CALL: u64 = 50_000_000;

/// Linear memory: the Python agent starts with 12.3 MiB, the JS agent with
/// 9.1 MiB.
const MEMORY_BYTES: usize = 32 << 20;

/// Far longer than `loop` takes to burn `FUEL_PER_CALL`, so that it stops by
/// fuel; only a guard against a hang.
const DEADLINE: Duration = Duration::from_secs(10);

fn limits() -> AgentLimits {
    AgentLimits {
        fuel_per_call: Some(FUEL_PER_CALL),
        memory_bytes: MEMORY_BYTES,
        deadline: DEADLINE,
        ..AgentLimits::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    Python,
    Js,
}

impl Lang {
    /// Its name in the build script and as an agent type.
    fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }

    fn file(self) -> &'static str {
        match self {
            Lang::Python => "python_agent.wasm",
            Lang::Js => "js_agent.wasm",
        }
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is in the repository")
}

/// What became of a language's component.
#[derive(Clone)]
enum Built {
    /// Built (or given) and loaded under the default runtime configuration.
    Ready(PathBuf, AgentComponent),
    /// A tool is missing or cannot be installed.
    Unavailable(String),
    /// The build or the load failed: always a test failure.
    Broken(String),
}

fn build(lang: Lang) -> Built {
    let path = match std::env::var_os("TERRAPHIM_POLYGLOT_DIR") {
        Some(dir) => {
            let path = PathBuf::from(dir).join(lang.file());
            if !path.is_file() {
                return Built::Broken(format!(
                    "TERRAPHIM_POLYGLOT_DIR is set but {} is not there",
                    path.display()
                ));
            }
            path
        }
        None => {
            // `<target dir>/polyglot`, next to `<target dir>/tmp`.
            let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("the target tmp dir is in the target dir")
                .join("polyglot");
            let script = repo().join("guest-examples/build-polyglot.sh");
            let started = Instant::now();
            let output = Command::new("bash")
                .arg(&script)
                .arg(&out)
                .arg(lang.name())
                .stdin(Stdio::null())
                .output();
            let output = match output {
                Ok(output) => output,
                Err(e) => return Built::Unavailable(format!("cannot run bash: {e}")),
            };
            let stderr = String::from_utf8_lossy(&output.stderr);
            eprintln!(
                "{} ({:.1?}):\n{stderr}",
                script.display(),
                started.elapsed()
            );
            match output.status.code() {
                Some(0) => out.join(lang.file()),
                Some(3) => {
                    let why = stderr
                        .lines()
                        .rev()
                        .find_map(|l| l.strip_prefix("build-polyglot: "))
                        .unwrap_or("a tool is missing");
                    return Built::Unavailable(why.to_owned());
                }
                _ => {
                    return Built::Broken(format!(
                        "{} failed ({}):\n{stderr}",
                        script.display(),
                        output.status
                    ));
                }
            }
        }
    };
    let started = Instant::now();
    // The default runtime configuration: its per-agent ceilings (memories,
    // tables, core instances) must admit both components.
    match runtime().load_file(&path) {
        Ok(component) => {
            eprintln!("compiled {} in {:.1?}", path.display(), started.elapsed());
            Built::Ready(path, component)
        }
        Err(e) => Built::Broken(format!("{e}")),
    }
}

/// A language's component, built and compiled once per test binary.
fn built(lang: Lang) -> Built {
    static PYTHON: OnceLock<Built> = OnceLock::new();
    static JS: OnceLock<Built> = OnceLock::new();
    let cell = match lang {
        Lang::Python => &PYTHON,
        Lang::Js => &JS,
    };
    cell.get_or_init(|| build(lang)).clone()
}

/// The component, or `None` after printing why the test is skipped. Fails
/// the test when the build is broken, or when a tool is missing and
/// `TERRAPHIM_REQUIRE_POLYGLOT=1`.
fn component_or_skip(lang: Lang, test: &str) -> Option<(PathBuf, AgentComponent)> {
    match built(lang) {
        Built::Ready(path, component) => Some((path, component)),
        Built::Broken(why) => panic!("the {} agent: {why}", lang.name()),
        Built::Unavailable(why) => {
            if std::env::var_os("TERRAPHIM_REQUIRE_POLYGLOT").is_some_and(|v| v == "1") {
                panic!(
                    "TERRAPHIM_REQUIRE_POLYGLOT=1 but the {} agent cannot be built: {why}",
                    lang.name()
                );
            }
            // Straight to stderr, past the test harness's capture: a skip
            // shows in a plain `cargo test` run.
            let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
            None
        }
    }
}

// ---------------------------------------------------------------------------
// The guests' log records, captured from the host's `tracing`.
// ---------------------------------------------------------------------------

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Capture the records the agents log (target `agent`).
fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("agent=info"))
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .init();
    });
}

fn logged(needle: &str) -> bool {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).contains(needle)
}

// ---------------------------------------------------------------------------
// Under a supervisor
// ---------------------------------------------------------------------------

/// A started one-for-one supervisor over one agent of `lang`, its pid and
/// its events.
async fn supervised(
    lang: Lang,
    component: AgentComponent,
) -> (
    AgentSupervisor,
    AgentPid,
    tokio::sync::broadcast::Receiver<SupervisorEvent>,
) {
    capture_logs();
    let factory = WasmAgentFactory::new(runtime().clone())
        .with_default_limits(limits())
        .with_component(lang.name(), component);
    let spec = AgentSpec::new(lang.name().into(), json!({})).with_name(lang.name().into());
    let pid = spec.agent_id.clone();
    let config = SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForOne,
            RestartIntensity::new(5, Duration::from_secs(60)),
        ),
        agent_timeout: Duration::from_secs(20),
        ..SupervisorConfig::default()
    };
    let mut sup = AgentSupervisor::new(config, Arc::new(factory)).with_child(spec);
    let events = sup.subscribe();
    sup.start().await.expect("the tree starts");
    (sup, pid, events)
}

async fn restarted(events: &mut tokio::sync::broadcast::Receiver<SupervisorEvent>, pid: &AgentPid) {
    wait_for(
        events,
        |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if agent == pid),
    )
    .await;
}

async fn restart_count(sup: &AgentSupervisor) -> u32 {
    sup.get_children().await[0].1.restart_count
}

/// count, count -> 2; an uncaught exception is a crash (a trap:
/// `AgentFault::Panic`) and the agent is restarted; count -> 3, the state
/// kept; an `error` is an application error and not a restart.
async fn keeps_state_across_a_crash(lang: Lang, test: &str) {
    let Some((_, component)) = component_or_skip(lang, test) else {
        return;
    };
    let (mut sup, pid, mut events) = supervised(lang, component).await;
    let call = |message: &str| sup.call(&pid, message.to_owned());
    let name = lang.name();

    assert!(
        logged(&format!("{name} agent {pid} initialised, count = 0")),
        "init logs through the host"
    );
    assert_eq!(call("ping").await.unwrap(), "pong");
    assert_eq!(call("count").await.unwrap(), "1");
    assert_eq!(call("count").await.unwrap(), "2");
    assert_eq!(call("get").await.unwrap(), "2");

    let err = call("raise").await.unwrap_err();
    assert!(
        matches!(err, SupervisionError::AgentCrashed(_, AgentFault::Panic)),
        "an uncaught exception traps: {err:?}"
    );
    restarted(&mut events, &pid).await;
    assert!(
        logged(&format!("{name} agent {pid} initialised, count = 2")),
        "the restarted instance's init sees the state"
    );
    assert_eq!(call("count").await.unwrap(), "3", "the state is kept");
    assert_eq!(restart_count(&sup).await, 1);
    assert_eq!(
        sup.get_children().await[0].1.last_exit,
        Some(ExitReason::Fault(AgentFault::Panic))
    );

    let err = call("error").await.unwrap_err();
    assert!(
        matches!(err, SupervisionError::AgentExecutionFailed(_, ref m) if m == "asked for an error"),
        "an error result is an application error: {err:?}"
    );
    let err = call("frobnicate").await.unwrap_err();
    assert!(
        matches!(err, SupervisionError::AgentExecutionFailed(_, ref m) if m.contains("frobnicate")),
        "{err:?}"
    );
    assert_eq!(call("get").await.unwrap(), "3", "the same instance answers");
    assert_eq!(restart_count(&sup).await, 1, "no restart for an error");
    assert_eq!(sup.get_restart_history().await.len(), 1);
    sup.stop().await.unwrap();
}

/// `loop` never returns: it runs out of fuel (not the deadline), is a crash,
/// and the agent is restarted.
async fn endless_loop_runs_out_of_fuel(lang: Lang, test: &str) {
    let Some((_, component)) = component_or_skip(lang, test) else {
        return;
    };
    let (mut sup, pid, mut events) = supervised(lang, component).await;
    let started = Instant::now();
    let err = sup.call(&pid, "loop".into()).await.unwrap_err();
    eprintln!(
        "{}: `loop` stopped after {:.1?}",
        lang.name(),
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            SupervisionError::AgentCrashed(_, AgentFault::OutOfFuel)
        ),
        "{err:?}"
    );
    restarted(&mut events, &pid).await;
    assert_eq!(sup.call(&pid, "ping".into()).await.unwrap(), "pong");
    let child = &sup.get_children().await[0].1;
    assert_eq!(child.restart_count, 1);
    assert_eq!(
        child.last_exit,
        Some(ExitReason::Fault(AgentFault::OutOfFuel))
    );
    sup.stop().await.unwrap();
}

/// What instantiation, `init` and a `count` take, well inside the limits the
/// other tests give: at most a tenth of the fuel per call, half the memory.
async fn fits_its_limits(lang: Lang, test: &str) {
    let Some((_, component)) = component_or_skip(lang, test) else {
        return;
    };
    let options = InstanceOptions {
        agent_id: lang.name().to_owned(),
        limits: limits(),
        grants: WasiGrants::default(),
        state: Arc::new(MemoryStateStore::default()),
        ..InstanceOptions::default()
    };
    let started = Instant::now();
    let mut agent = AgentInstance::instantiate(runtime(), &component, options)
        .await
        .expect("instantiates");
    let instantiated = (started.elapsed(), agent.fuel_used());
    let args = InitArgs {
        agent_id: AgentPid::new(),
        supervisor_id: SupervisorId::new(),
        config: json!({}),
    };
    agent.init(&args).await.expect("init");
    let init = agent.fuel_used() - instantiated.1;
    agent.start().await.expect("start");
    let before = agent.fuel_used();
    assert_eq!(agent.handle_message("count").await.unwrap(), "1");
    let count = agent.fuel_used() - before;
    let memory = agent.memory_bytes();
    eprintln!(
        "{}: instantiated in {:.1?} ({} fuel), init {init} fuel, count {count} fuel, \
         memory {memory} bytes",
        lang.name(),
        instantiated.0,
        instantiated.1
    );
    for (what, fuel) in [("init", init), ("count", count)] {
        assert!(
            fuel <= FUEL_PER_CALL / 10,
            "{what} takes {fuel} fuel: raise FUEL_PER_CALL ({FUEL_PER_CALL})"
        );
    }
    assert!(
        memory <= MEMORY_BYTES / 2,
        "the agent uses {memory} bytes: raise MEMORY_BYTES ({MEMORY_BYTES})"
    );
}

/// An uncaught exception's text (and its traceback, for Python) reaches
/// the crash report: the guest printed it to its stderr, which the host
/// keeps for the report although it is not granted to the terminal.
async fn exception_reaches_the_crash_report(lang: Lang, test: &str, needles: &[&str]) {
    let Some((_, component)) = component_or_skip(lang, test) else {
        return;
    };
    let (mut sup, pid, mut events) = supervised(lang, component).await;
    sup.call(&pid, "raise".to_owned()).await.unwrap_err();
    restarted(&mut events, &pid).await;
    let history = sup.get_restart_history().await;
    let report = history[0].crash.as_deref().expect("a crash report");
    let output = report.output.join("\n");
    for needle in needles {
        assert!(
            output.contains(needle),
            "no {needle:?} in the report's output:\n{output}"
        );
    }
    assert_eq!(report.message.as_deref(), Some("raise"));
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn python_agent_exception_reaches_the_crash_report() {
    let needles = [
        "Traceback (most recent call last)",
        "ValueError: asked to raise",
    ];
    exception_reaches_the_crash_report(
        Lang::Python,
        "python_agent_exception_reaches_the_crash_report",
        &needles,
    )
    .await;
}

/// componentize-js 0.23 turns a thrown `Error` into an abort while it tries
/// to encode it as the `err` string; what it prints is its complaint and
/// the JavaScript stack, which the report keeps.
#[tokio::test]
async fn js_agent_exception_reaches_the_crash_report() {
    exception_reaches_the_crash_report(
        Lang::Js,
        "js_agent_exception_reaches_the_crash_report",
        &["Stack:", "handleMessage"],
    )
    .await;
}

#[tokio::test]
async fn python_agent_keeps_state_across_a_crash() {
    keeps_state_across_a_crash(Lang::Python, "python_agent_keeps_state_across_a_crash").await;
}

#[tokio::test]
async fn js_agent_keeps_state_across_a_crash() {
    keeps_state_across_a_crash(Lang::Js, "js_agent_keeps_state_across_a_crash").await;
}

#[tokio::test]
async fn python_agent_endless_loop_runs_out_of_fuel() {
    endless_loop_runs_out_of_fuel(Lang::Python, "python_agent_endless_loop_runs_out_of_fuel").await;
}

#[tokio::test]
async fn js_agent_endless_loop_runs_out_of_fuel() {
    endless_loop_runs_out_of_fuel(Lang::Js, "js_agent_endless_loop_runs_out_of_fuel").await;
}

#[tokio::test]
async fn python_agent_fits_its_limits() {
    fits_its_limits(Lang::Python, "python_agent_fits_its_limits").await;
}

#[tokio::test]
async fn js_agent_fits_its_limits() {
    fits_its_limits(Lang::Js, "js_agent_fits_its_limits").await;
}

// ---------------------------------------------------------------------------
// The command line: validate, and the README's tree file under `run`
// ---------------------------------------------------------------------------

/// The tree file of the README's "Write an agent" section.
fn readme_polyglot_tree() -> String {
    common::readme_toml_block("## Write an agent in Rust, Python or JavaScript")
}

/// Whether `seen` has an event of `kind` (`ChildStarted`, ...) for `path`
/// among `run --json`'s lines.
fn came(seen: &[String], kind: &str, path: &str) -> bool {
    seen.iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| v["event"].get(kind).is_some() && v["path"] == path)
}

#[test]
fn agent_host_validates_and_runs_both_agents() {
    let test = "agent_host_validates_and_runs_both_agents";
    let Some((python, _)) = component_or_skip(Lang::Python, test) else {
        return;
    };
    let Some((js, _)) = component_or_skip(Lang::Js, test) else {
        return;
    };
    let dir = TempDir::new("polyglot-run");
    std::fs::create_dir_all(dir.path("agents")).expect("agents dir");
    let (python_file, js_file) = (
        dir.path("agents/python_agent.wasm"),
        dir.path("agents/js_agent.wasm"),
    );
    std::fs::copy(&python, &python_file).expect("python agent copied");
    std::fs::copy(&js, &js_file).expect("js agent copied");
    let (python_file, js_file) = (
        python_file.display().to_string(),
        js_file.display().to_string(),
    );

    let out = dir.agent_host(&["validate", &python_file, &js_file]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", text(&out.stderr));
    for file in [&python_file, &js_file] {
        assert!(
            stdout.contains(&format!(
                "ok: {file} implements terraphim:agent/supervised-agent@0.1.1"
            )),
            "stdout:\n{stdout}"
        );
    }

    let tree = dir.write("polyglot.toml", &readme_polyglot_tree());
    let mut host = RunningHost::start(&dir, &["run", &tree, "--json"]);
    host.wait_for("both agents to start", |seen| {
        came(seen, "ChildStarted", "root/python") && came(seen, "ChildStarted", "root/js")
    });
    let call = |agent: &str, message: &str| {
        let out = dir.agent_host(&["call", &tree, agent, message]);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    for agent in ["python", "js"] {
        assert_eq!(call(agent, "count").0, Some(0));
        let (code, stdout, stderr) = call(agent, "count");
        assert_eq!((code, stdout.as_str()), (Some(0), "2\n"), "{stderr}");
        let (code, _, stderr) = call(agent, "raise");
        assert_eq!(code, Some(1), "{agent}: {stderr}");
        assert!(
            stderr.contains(&format!("root/{agent} crashed: guest panic")),
            "{agent}: {stderr}"
        );
        let path = format!("root/{agent}");
        host.wait_for("the restart", |seen| came(seen, "ChildRestarted", &path));
        let (code, stdout, stderr) = call(agent, "count");
        assert_eq!(
            (code, stdout.as_str()),
            (Some(0), "3\n"),
            "{agent}: {stderr}"
        );
    }
    host.signal("TERM");
    let (status, _, stderr) = host.finish();
    assert!(status.success(), "run stopped with {status:?}: {stderr}");
}
