//! `agent-host demo`: a supervision tree over the embedded example agents,
//! driven into crashes for a few seconds, with every lifecycle event and
//! every call printed as it happens.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentLimits, AgentSpec, AgentStatus, AgentSupervisor, ExitReason, RestartIntensity,
    RestartPolicy, RestartStrategy, RunningTree, Runtime, SupervisionError, SupervisionResult,
    SupervisorConfig, SupervisorSpec, SupervisorStatus, TreeCallError, TreeHandle,
    WasmAgentFactory, examples, observe::Observer,
};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use crate::events::{PENDING_WAIT, Printer, Shared, row, status_text};
use crate::http::{self, HttpArgs};
use crate::output::{Out, seconds, stderr_line};
use crate::{CliResult, EXIT_FAILURE};

pub const LONG_ABOUT: &str = "\
Watch a supervision tree of example agents crash and get restarted.

Starts a one-for-one root supervisor over example agents embedded in this
binary, each a sandboxed WebAssembly component with its own limits:
  echo         counts `count` messages; the count is durable state in the host
  crasher      crashes on request: panic, unreachable, out-of-bounds, stack overflow
  fuel-burner  loops forever on `burn`, until its fuel budget runs out
  memory-hog   allocates on `grow` until it hits its 8 MiB memory limit
  team         a nested one-for-all supervisor over two echo agents

A driver sends a message every 400 ms for --seconds seconds (and twice
reports a failure from outside with handle_agent_exit), printing one line per
call and per lifecycle event. Crashed agents are restarted, and the echo
count keeps rising across restarts. At the end the demo prints each child's
status, restart count and last exit, then stops the tree: children stop in
reverse start order. Ctrl-C ends the demo early, cleanly.

With --http the tree can be watched live in a browser: the demo prints the
address of its tree view (and serves /metrics and the JSON API as `agent-host
run --http` does; see `agent-host run --help`), and the driver goes on until
Ctrl-C unless --seconds is given.

With --json every line on stdout is a JSON object with a `kind`: `event`
(the SupervisorEvent is in `event`), `call`, `inject`, `child` (the final
table) or `stopped`; with --http, a first `http` line has the `url`.

Exits 0, or 1 if the tree cannot start or its root supervisor gives up.";

/// Time between two driver steps.
const TICK: Duration = Duration::from_millis(400);
/// The reason the driver reports for the failures it injects.
const INJECTED: &str = "demo: injected failure";
/// Fuel per call of the fuel-burner.
const BURNER_FUEL: u64 = 20_000_000;
/// Memory limit of the memory-hog.
const HOG_MEMORY: usize = 8 << 20;
/// Root intensity: restarts within the window.
const ROOT_RESTARTS: u32 = 20;
const ROOT_WINDOW: Duration = Duration::from_secs(10);
/// Team intensity.
const TEAM_RESTARTS: u32 = 5;
const TEAM_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the driver sends messages, in seconds (1 to 3600; default
    /// 6, or until Ctrl-C with --http).
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    seconds: Option<u64>,
    /// Print JSON lines (events, calls, the final table) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    http: HttpArgs,
}

/// The driver's time without --http and --seconds.
const DEFAULT_SECONDS: u64 = 6;

fn plural(n: u32, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

// ---------------------------------------------------------------------------
// The tree
// ---------------------------------------------------------------------------

const ECHO: &str = "root/echo";
const CRASHER: &str = "root/crasher";
const FUEL_BURNER: &str = "root/fuel-burner";
const MEMORY_HOG: &str = "root/memory-hog";
const TEAM_A: &str = "root/team/echo-a";

fn example(agent_type: &str) -> SupervisionResult<&'static [u8]> {
    examples::ALL
        .iter()
        .find(|(name, _)| *name == agent_type)
        .map(|(_, bytes)| *bytes)
        .ok_or_else(|| {
            SupervisionError::System(format!("no embedded example agent named `{agent_type}`"))
        })
}

fn agent(agent_type: &str, name: &str) -> AgentSpec {
    AgentSpec::new(agent_type.into(), json!({})).with_name(name.into())
}

fn supervisor_config(
    strategy: RestartStrategy,
    restarts: u32,
    window: Duration,
) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(strategy, RestartIntensity::new(restarts, window)),
        agent_timeout: Duration::from_secs(10),
        ..SupervisorConfig::default()
    }
}

/// The demo tree, not started, and the runtime of its agents.
fn build_tree() -> Result<(AgentSupervisor, Runtime), Box<dyn std::error::Error>> {
    let runtime = Runtime::new()?;
    let base = AgentLimits {
        deadline: Duration::from_secs(2),
        ..AgentLimits::default()
    };
    let mut factory = WasmAgentFactory::new(runtime.clone()).with_default_limits(base.clone());
    for agent_type in ["echo", "crasher", "fuel-burner", "memory-hog"] {
        let component = runtime.load_bytes(agent_type, example(agent_type)?)?;
        factory = factory.with_component(agent_type, component);
    }
    let factory = Arc::new(factory);
    let fuel_burner = agent("fuel-burner", "fuel-burner").with_limits(AgentLimits {
        fuel_per_call: Some(BURNER_FUEL),
        ..base.clone()
    });
    let memory_hog = agent("memory-hog", "memory-hog").with_limits(AgentLimits {
        memory_bytes: HOG_MEMORY,
        ..base
    });
    let team_config = supervisor_config(RestartStrategy::OneForAll, TEAM_RESTARTS, TEAM_WINDOW);
    let team = SupervisorSpec::new(team_config, factory.clone())
        .with_name("team".into())
        .with_child(agent("echo", "echo-a"))
        .with_child(agent("echo", "echo-b"));
    let root_config = supervisor_config(RestartStrategy::OneForOne, ROOT_RESTARTS, ROOT_WINDOW);
    let root = AgentSupervisor::new(root_config, factory)
        .with_name("root")
        .with_child(agent("echo", "echo"))
        .with_child(agent("crasher", "crasher"))
        .with_child(fuel_burner)
        .with_child(memory_hog)
        .with_child(team);
    Ok((root, runtime))
}

// ---------------------------------------------------------------------------
// The driver's script
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Send a message to the agent at a path.
    Send(&'static str, &'static str),
    /// Send the crasher its next crash.
    Crash,
    /// Report a failure of the agent at a path with `handle_agent_exit`.
    Inject(&'static str),
}

/// The first steps (6 s at 400 ms a step) show every kind of failure once.
const SCRIPT: [Step; 15] = [
    Step::Send(ECHO, "count"),
    Step::Crash,
    Step::Inject(ECHO),
    Step::Send(ECHO, "count"),
    Step::Send(FUEL_BURNER, "burn"),
    Step::Crash,
    Step::Send(MEMORY_HOG, "grow"),
    Step::Send(TEAM_A, "count"),
    Step::Inject(TEAM_A),
    Step::Crash,
    Step::Send(TEAM_A, "count"),
    Step::Send(FUEL_BURNER, "burn"),
    Step::Crash,
    Step::Send(MEMORY_HOG, "grow"),
    Step::Send(ECHO, "count"),
];

/// Then this repeats: about 12 root restarts per 10 s, within the intensity.
const CYCLE: [Step; 6] = [
    Step::Send(ECHO, "count"),
    Step::Crash,
    Step::Send(ECHO, "count"),
    Step::Send(FUEL_BURNER, "burn"),
    Step::Send(ECHO, "count"),
    Step::Send(MEMORY_HOG, "grow"),
];

const CRASHES: [&str; 4] = ["panic", "unreachable", "oob", "stack"];

fn step(n: usize) -> Step {
    match SCRIPT.get(n) {
        Some(step) => *step,
        None => CYCLE[(n - SCRIPT.len()) % CYCLE.len()],
    }
}

#[derive(Serialize)]
struct CallLine<'a> {
    kind: &'static str,
    t: f64,
    path: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct InjectLine<'a> {
    kind: &'static str,
    t: f64,
    path: &'a str,
    reason: &'a ExitReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What the driver prints to.
struct Driver<'a> {
    tree: &'a TreeHandle,
    out: &'a Out,
    shared: &'a Shared,
    width: usize,
}

impl Driver<'_> {
    /// Send `message` to the agent at `path` and print the outcome.
    async fn send(&self, path: &str, message: &str) {
        let at = self.out.elapsed();
        self.shared.set_in_flight(Some(path));
        let result = self.tree.call(path, message.into()).await;
        if self.out.json() {
            let (reply, error) = match &result {
                Ok(reply) => (Some(reply.as_str()), None),
                Err(e) => (None, Some(describe(e))),
            };
            self.out.json_line(&CallLine {
                kind: "call",
                t: seconds(at),
                path,
                message,
                reply,
                error,
            });
        } else {
            let outcome = match &result {
                Ok(reply) => format!("reply {reply:?}"),
                Err(e) => describe(e),
            };
            let text = format!("call {message:?} -> {outcome}");
            self.out.line(&row(at, self.width, path, &text));
        }
        self.shared.set_in_flight(None);
    }

    /// Report a failure of the agent at `path` from outside and print it
    /// (before: the supervisor restarts the agent before it answers).
    async fn inject(&self, path: &str) {
        let reason = ExitReason::Error(INJECTED.into());
        let line = |error: Option<String>| {
            if self.out.json() {
                self.out.json_line(&InjectLine {
                    kind: "inject",
                    t: seconds(self.out.elapsed()),
                    path,
                    reason: &reason,
                    error,
                });
            } else {
                let text = match error {
                    None => format!("reported as failed: handle_agent_exit({reason:?})"),
                    Some(e) => format!("handle_agent_exit failed: {e}"),
                };
                self.out
                    .line(&row(self.out.elapsed(), self.width, path, &text));
            }
        };
        line(None);
        if let Err(e) = self.tree.report_exit(path, reason.clone()).await {
            line(Some(e.to_string()));
        }
    }
}

/// A failed call, as the driver's line shows it (the path is on the line).
fn describe(error: &TreeCallError) -> String {
    match error {
        TreeCallError::Crashed { fault, .. } => format!("crashed: {fault}"),
        TreeCallError::Application { error, .. } => format!("error reply: {error}"),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------

fn intro(out: &Out, secs: Option<u64>) {
    let how_long = match secs {
        Some(secs) => format!("for {secs}s"),
        None => "until Ctrl-C".to_owned(),
    };
    let text = format!(
        "\
agent-host demo: a supervision tree of sandboxed WebAssembly agents, driven into crashes {how_long}.

  root             one-for-one supervisor, at most {ROOT_RESTARTS} restarts in {root_window}s
  |- echo          counts `count` messages; the count is durable state kept by the host
  |- crasher       crashes on request: panic, unreachable, out-of-bounds read, stack overflow
  |- fuel-burner   loops forever on `burn`, until its fuel ({fuel}M per call) runs out
  |- memory-hog    allocates on `grow` until it hits its {mem} MiB memory limit
  `- team          one-for-all supervisor: when one member fails, both are restarted
     |- echo-a
     `- echo-b

Every {tick} ms the driver sends one message, or reports a failure from outside (handle_agent_exit).
Each line is a call and its outcome, or a lifecycle event from a supervisor. Watch crashed agents
come back, and echo's count keep rising across its restarts.
",
        root_window = ROOT_WINDOW.as_secs(),
        fuel = BURNER_FUEL / 1_000_000,
        mem = HOG_MEMORY >> 20,
        tick = TICK.as_millis(),
    );
    out.line(&text);
}

#[derive(Serialize)]
struct ChildLine<'a> {
    kind: &'static str,
    path: &'a str,
    status: &'a AgentStatus,
    restart_count: u32,
    last_exit: &'a Option<ExitReason>,
}

async fn summary(tree: &TreeHandle, out: &Out, width: usize) {
    let rows = tree.status();
    if out.json() {
        for node in &rows {
            out.json_line(&ChildLine {
                kind: "child",
                path: &node.path,
                status: &node.status,
                restart_count: node.restart_count,
                last_exit: &node.last_exit,
            });
        }
        return;
    }
    out.line("");
    out.line("Every node now (RunningTree::status):");
    out.line(&format!(
        "  {:<width$}  {:<10}  {:>8}  LAST EXIT",
        "PATH", "STATUS", "RESTARTS"
    ));
    for node in &rows {
        let last = node
            .last_exit
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        out.line(&format!(
            "  {:<width$}  {:<10}  {:>8}  {last}",
            node.path,
            status_text(&node.status),
            node.restart_count,
        ));
    }
    let restarts: u32 = rows.iter().map(|n| n.restart_count).sum();
    let history = tree.root().restart_history().len();
    out.line(&format!(
        "  {} in all; the root's restart history has {}.",
        plural(restarts, "restart", "restarts"),
        plural(history as u32, "entry", "entries"),
    ));
    let echo_restarts = rows
        .iter()
        .find(|n| n.path == ECHO)
        .map_or(0, |n| n.restart_count);
    if let Ok(count) = tree.call(ECHO, "get".into()).await {
        out.line(&format!(
            "  echo's count is {count} after {}: it lives in the host, not in the instance.",
            plural(echo_restarts, "restart", "restarts"),
        ));
    }
}

pub async fn run(args: DemoArgs) -> CliResult {
    let out = Arc::new(Out::new(args.json));
    let seconds = match (args.seconds, &args.http.http) {
        (Some(seconds), _) => Some(seconds),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_SECONDS),
    };
    let http = http::bind(&args.http).await?;
    if !out.json() {
        intro(&out, seconds);
    }
    let (root, runtime) = build_tree()?;
    if let Some(bound) = &http {
        if out.json() {
            out.json_line(&json!({ "kind": "http", "url": format!("http://{}/", bound.addr()) }));
        } else {
            out.line(&format!(
                "Watch it live: http://{}/ (metrics: /metrics, JSON: /api/status)\n",
                bound.addr()
            ));
        }
        http::announce_token(bound, None);
    }
    let observed = http.as_ref().map(|_| root.subscribe());
    out.start_clock();

    let shared = Arc::new(Shared::default());
    let (finish_tx, finish_rx) = oneshot::channel();
    let paths = [ECHO, CRASHER, FUEL_BURNER, MEMORY_HOG, TEAM_A].map(String::from);
    let width = paths.iter().map(String::len).max().unwrap_or(0);
    let printer = Printer::new(out.clone(), shared.clone(), paths, true);
    // Subscribed before the start: the printer sees every child start.
    let printer = tokio::spawn(printer.run(root.subscribe(), finish_rx));

    let mut tree = match RunningTree::start(root).await {
        Ok(tree) => tree,
        Err(e) => {
            let _ = finish_tx.send(());
            let _ = printer.await;
            return Err(format!("the demo tree did not start: {e}").into());
        }
    };
    let handle = tree.handle();
    let serving = match (http, observed) {
        (Some(bound), Some(events)) => {
            let observer = Observer::with_runtime(handle.clone(), events, runtime);
            Some(http::serve(bound, observer))
        }
        _ => None,
    };
    let driver = Driver {
        tree: &handle,
        out: &out,
        shared: &shared,
        width,
    };

    // The driver.
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut watch_ctrl_c = true;
    let mut interrupted = false;
    let mut crashes = CRASHES.iter().cycle();
    let mut n = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            signal = &mut ctrl_c, if watch_ctrl_c => match signal {
                Ok(()) => {
                    interrupted = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!("cannot listen for Ctrl-C: {e}");
                    watch_ctrl_c = false;
                    continue;
                }
            },
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline)
            || out.is_broken()
            || matches!(tree.supervisor_status(), SupervisorStatus::Failed(_))
        {
            break;
        }
        match step(n) {
            Step::Send(path, message) => driver.send(path, message).await,
            Step::Crash => {
                let message = crashes.next().copied().unwrap_or("panic");
                driver.send(CRASHER, message).await;
            }
            Step::Inject(path) => driver.inject(path).await,
        }
        n += 1;
    }
    if interrupted && !out.json() {
        out.line("Interrupted: stopping early.");
    }

    // Let the last restarts happen and print before the table.
    tokio::time::sleep(PENDING_WAIT + Duration::from_millis(100)).await;
    let root_status = tree.supervisor_status();
    summary(&handle, &out, width).await;
    if let Some(serving) = serving {
        serving.stop().await;
    }

    if !out.json() {
        out.line("");
        out.line("Stopping the tree: every supervisor stops its children in reverse start order.");
    }
    shared.set_stopping();
    let stopped = tree.stop().await;
    let _ = finish_tx.send(());
    let order = match tokio::time::timeout(Duration::from_secs(5), printer).await {
        Ok(Ok(order)) => order,
        _ => Vec::new(),
    };
    if out.json() {
        out.json_line(&json!({ "kind": "stopped", "order": order }));
    } else if order.is_empty() {
        out.line("Nothing left to stop: the root stopped its children when it gave up.");
    } else {
        out.line(&format!("Stopped, in this order: {}.", order.join(", ")));
    }
    stopped?;

    if let SupervisorStatus::Failed(why) = root_status {
        stderr_line!("error: the root supervisor gave up: {why}");
        return Ok(ExitCode::from(EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}
