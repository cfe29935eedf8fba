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
    AgentLimits, AgentPid, AgentSpec, AgentStatus, AgentSupervisor, ExitReason, RestartIntensity,
    RestartPolicy, RestartStrategy, Runtime, SupervisedAgentInfo, SupervisionError,
    SupervisionResult, SupervisorConfig, SupervisorSpec, SupervisorStatus, WasmAgentFactory,
    examples,
};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use crate::events::{Names, PENDING_WAIT, Printer, Shared, describe_error, status_text};
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

With --json every line on stdout is a JSON object with a `kind`: `event`
(the SupervisorEvent is in `event`), `call`, `inject`, `child` (the final
table) or `stopped`.

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
    /// How long the driver sends messages, in seconds (1 to 3600).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 6,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    seconds: u64,
    /// Print JSON lines (events, calls, the final table) instead of text.
    #[arg(long)]
    json: bool,
}

fn plural(n: u32, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

// ---------------------------------------------------------------------------
// The tree
// ---------------------------------------------------------------------------

/// The demo tree and the ids of its children.
struct Tree {
    sup: AgentSupervisor,
    echo: AgentPid,
    crasher: AgentPid,
    fuel_burner: AgentPid,
    memory_hog: AgentPid,
    team: AgentPid,
    team_a: AgentPid,
    team_b: AgentPid,
}

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

fn build_tree() -> Result<(Tree, Names), Box<dyn std::error::Error>> {
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

    let echo = agent("echo", "echo");
    let crasher = agent("crasher", "crasher");
    let fuel_burner = agent("fuel-burner", "fuel-burner").with_limits(AgentLimits {
        fuel_per_call: Some(BURNER_FUEL),
        ..base.clone()
    });
    let memory_hog = agent("memory-hog", "memory-hog").with_limits(AgentLimits {
        memory_bytes: HOG_MEMORY,
        ..base
    });
    let team_a = agent("echo", "echo-a");
    let team_b = agent("echo", "echo-b");

    let team_config = SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForAll,
            RestartIntensity::new(TEAM_RESTARTS, TEAM_WINDOW),
        ),
        agent_timeout: Duration::from_secs(10),
        ..SupervisorConfig::default()
    };
    let team_id = team_config.supervisor_id.clone();
    let team = SupervisorSpec::new(team_config, factory.clone())
        .with_name("team".into())
        .with_child(team_a.clone())
        .with_child(team_b.clone());

    let root_config = SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForOne,
            RestartIntensity::new(ROOT_RESTARTS, ROOT_WINDOW),
        ),
        agent_timeout: Duration::from_secs(10),
        ..SupervisorConfig::default()
    };

    let mut names = Names::with_root(root_config.supervisor_id.clone(), "root");
    names.add_supervisor(team_id, "team");
    for spec in [&echo, &crasher, &fuel_burner, &memory_hog] {
        names.add_child(
            spec.agent_id.clone(),
            "root",
            spec.name.as_deref().unwrap_or_default(),
        );
    }
    names.add_child(team.id.clone(), "root", "team");
    for spec in [&team_a, &team_b] {
        names.add_child(
            spec.agent_id.clone(),
            "team",
            spec.name.as_deref().unwrap_or_default(),
        );
    }

    let tree = Tree {
        echo: echo.agent_id.clone(),
        crasher: crasher.agent_id.clone(),
        fuel_burner: fuel_burner.agent_id.clone(),
        memory_hog: memory_hog.agent_id.clone(),
        team: team.id.clone(),
        team_a: team_a.agent_id.clone(),
        team_b: team_b.agent_id.clone(),
        sup: AgentSupervisor::new(root_config, factory)
            .with_child(echo)
            .with_child(crasher)
            .with_child(fuel_burner)
            .with_child(memory_hog)
            .with_child(team),
    };
    Ok((tree, names))
}

// ---------------------------------------------------------------------------
// The driver's script
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Target {
    Echo,
    FuelBurner,
    MemoryHog,
    TeamA,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Send a message.
    Send(Target, &'static str),
    /// Send the crasher its next crash.
    Crash,
    /// Report a failure with `handle_agent_exit`.
    Inject(Target),
}

/// The first steps (6 s at 400 ms a step) show every kind of failure once.
const SCRIPT: [Step; 15] = [
    Step::Send(Target::Echo, "count"),
    Step::Crash,
    Step::Inject(Target::Echo),
    Step::Send(Target::Echo, "count"),
    Step::Send(Target::FuelBurner, "burn"),
    Step::Crash,
    Step::Send(Target::MemoryHog, "grow"),
    Step::Send(Target::TeamA, "count"),
    Step::Inject(Target::TeamA),
    Step::Crash,
    Step::Send(Target::TeamA, "count"),
    Step::Send(Target::FuelBurner, "burn"),
    Step::Crash,
    Step::Send(Target::MemoryHog, "grow"),
    Step::Send(Target::Echo, "count"),
];

/// Then this repeats: about 12 root restarts per 10 s, within the intensity.
const CYCLE: [Step; 6] = [
    Step::Send(Target::Echo, "count"),
    Step::Crash,
    Step::Send(Target::Echo, "count"),
    Step::Send(Target::FuelBurner, "burn"),
    Step::Send(Target::Echo, "count"),
    Step::Send(Target::MemoryHog, "grow"),
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
    supervisor: &'a str,
    agent: &'a str,
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
    supervisor: &'a str,
    agent: &'a str,
    reason: &'a ExitReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Tree {
    fn pid(&self, target: Target) -> &AgentPid {
        match target {
            Target::Echo => &self.echo,
            Target::FuelBurner => &self.fuel_burner,
            Target::MemoryHog => &self.memory_hog,
            Target::TeamA => &self.team_a,
        }
    }

    async fn call(&self, pid: &AgentPid, message: &str) -> SupervisionResult<String> {
        if *pid == self.team_a || *pid == self.team_b {
            self.sup
                .child_supervisor(&self.team)?
                .call(pid, message.into())
                .await
        } else {
            self.sup.call(pid, message.into()).await
        }
    }

    async fn inject(&mut self, pid: &AgentPid, reason: ExitReason) -> SupervisionResult<()> {
        if *pid == self.team_a || *pid == self.team_b {
            self.sup
                .child_supervisor(&self.team)?
                .handle_agent_exit(pid.clone(), reason)
                .await
        } else {
            self.sup.handle_agent_exit(pid.clone(), reason).await
        }
    }
}

/// Send `message` to `pid` and print the outcome.
async fn send(
    tree: &Tree,
    names: &Names,
    out: &Out,
    shared: &Shared,
    pid: &AgentPid,
    message: &str,
) {
    let at = out.elapsed();
    shared.set_in_flight(Some(pid.clone()));
    let result = tree.call(pid, message).await;
    if out.json() {
        let (supervisor, agent) = names.parts(pid);
        let (reply, error) = match &result {
            Ok(reply) => (Some(reply.as_str()), None),
            Err(e) => (None, Some(describe_error(e, names))),
        };
        out.json_line(&CallLine {
            kind: "call",
            t: seconds(at),
            supervisor: &supervisor,
            agent: &agent,
            message,
            reply,
            error,
        });
    } else {
        let outcome = match &result {
            Ok(reply) => format!("reply {reply:?}"),
            Err(e) => describe_error(e, names),
        };
        out.line(&names.row(
            at,
            &names.label(pid),
            &format!("call {message:?} -> {outcome}"),
        ));
    }
    shared.set_in_flight(None);
}

/// Report a failure of `pid` from outside and print it (before: the
/// supervisor restarts the agent before it answers).
async fn inject(tree: &mut Tree, names: &Names, out: &Out, pid: &AgentPid) {
    let reason = ExitReason::Error(INJECTED.into());
    let (supervisor, agent) = names.parts(pid);
    let line = |error: Option<String>| {
        if out.json() {
            out.json_line(&InjectLine {
                kind: "inject",
                t: seconds(out.elapsed()),
                supervisor: &supervisor,
                agent: &agent,
                reason: &reason,
                error,
            });
        } else {
            let text = match error {
                None => format!("reported as failed: handle_agent_exit({reason:?})"),
                Some(e) => format!("handle_agent_exit failed: {e}"),
            };
            out.line(&names.row(out.elapsed(), &names.label(pid), &text));
        }
    };
    line(None);
    if let Err(e) = tree.inject(pid, reason.clone()).await {
        line(Some(describe_error(&e, names)));
    }
}

// ---------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------

fn intro(out: &Out, secs: u64) {
    let text = format!(
        "\
agent-host demo: a supervision tree of sandboxed WebAssembly agents, driven into crashes for {secs}s.

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

/// The final table: one row per child, nested supervisors' children after
/// their supervisor.
async fn children(tree: &Tree) -> Vec<SupervisedAgentInfo> {
    let mut rows = Vec::new();
    for (pid, info) in tree.sup.get_children().await {
        let nested = info.is_supervisor;
        rows.push(info);
        if nested && let Ok(handle) = tree.sup.child_supervisor(&pid) {
            rows.extend(handle.get_children().await.into_iter().map(|(_, i)| i));
        }
    }
    rows
}

#[derive(Serialize)]
struct ChildLine<'a> {
    kind: &'static str,
    supervisor: String,
    name: String,
    status: &'a AgentStatus,
    restart_count: u32,
    last_exit: &'a Option<ExitReason>,
}

async fn summary(tree: &Tree, names: &Names, out: &Out) {
    let rows = children(tree).await;
    if out.json() {
        for info in &rows {
            let (supervisor, name) = names.parts(&info.pid);
            out.json_line(&ChildLine {
                kind: "child",
                supervisor,
                name,
                status: &info.status,
                restart_count: info.restart_count,
                last_exit: &info.last_exit,
            });
        }
        return;
    }
    let w = names.width();
    out.line("");
    out.line("Children now (get_children):");
    out.line(&format!(
        "  {:<w$}  {:<10}  {:>8}  LAST EXIT",
        "CHILD", "STATUS", "RESTARTS"
    ));
    for info in &rows {
        let last = info
            .last_exit
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        out.line(&format!(
            "  {:<w$}  {:<10}  {:>8}  {last}",
            names.label(&info.pid),
            status_text(&info.status),
            info.restart_count,
        ));
    }
    let restarts: u32 = rows.iter().map(|i| i.restart_count).sum();
    let history = tree.sup.get_restart_history().await.len();
    out.line(&format!(
        "  {} in all; the root's restart history has {}.",
        plural(restarts, "restart", "restarts"),
        plural(history as u32, "entry", "entries"),
    ));
    let echo_restarts = rows
        .iter()
        .find(|i| i.pid == tree.echo)
        .map_or(0, |i| i.restart_count);
    if let Ok(count) = tree.call(&tree.echo, "get").await {
        out.line(&format!(
            "  echo's count is {count} after {}: it lives in the host, not in the instance.",
            plural(echo_restarts, "restart", "restarts"),
        ));
    }
}

pub async fn run(args: DemoArgs) -> CliResult {
    let out = Arc::new(Out::new(args.json));
    if !out.json() {
        intro(&out, args.seconds);
    }
    let (mut tree, names) = build_tree()?;
    let names = Arc::new(names);
    out.start_clock();

    let shared = Arc::new(Shared::default());
    let (finish_tx, finish_rx) = oneshot::channel();
    let printer = Printer::new(out.clone(), names.clone(), shared.clone(), true);
    let printer = tokio::spawn(printer.run(tree.sup.subscribe(), finish_rx));

    if let Err(e) = tree.sup.start().await {
        let _ = finish_tx.send(());
        let _ = printer.await;
        return Err(format!(
            "the demo tree did not start: {}",
            names.humanise(e.to_string())
        )
        .into());
    }

    // The driver.
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
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
        if Instant::now() >= deadline
            || out.is_broken()
            || matches!(tree.sup.status(), SupervisorStatus::Failed(_))
        {
            break;
        }
        match step(n) {
            Step::Send(target, message) => {
                send(&tree, &names, &out, &shared, tree.pid(target), message).await;
            }
            Step::Crash => {
                let message = crashes.next().copied().unwrap_or("panic");
                send(&tree, &names, &out, &shared, &tree.crasher, message).await;
            }
            Step::Inject(target) => {
                let pid = tree.pid(target).clone();
                inject(&mut tree, &names, &out, &pid).await;
            }
        }
        n += 1;
    }
    if interrupted && !out.json() {
        out.line("Interrupted: stopping early.");
    }

    // Let the last restarts happen and print before the table.
    tokio::time::sleep(PENDING_WAIT + Duration::from_millis(100)).await;
    let root_status = tree.sup.status();
    summary(&tree, &names, &out).await;

    if !out.json() {
        out.line("");
        out.line("Stopping the tree: every supervisor stops its children in reverse start order.");
    }
    shared.set_stopping();
    let stopped = tree.sup.stop().await;
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
    stopped.map_err(|e| names.humanise(e.to_string()))?;

    if let SupervisorStatus::Failed(why) = root_status {
        stderr_line!("error: the root supervisor gave up: {why}");
        return Ok(ExitCode::from(EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}
