//! `agent-host call` and `agent-host status`: talk to the host running a
//! tree through its control socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use terraphim_agent_supervisor::{CircuitStatus, NodeKind, NodeStatus, RestartEntry};

use crate::cache_arg::CacheArgs;
use crate::control::{self, Failure, Request};
use crate::events::status_text;
use crate::output::{Out, stderr_line};
use crate::problems::{self, NotStarted};
use crate::state_arg::{self, StateArg};
use crate::{CliResult, EXIT_FAILURE};

pub const CALL_LONG_ABOUT: &str = "\
Send a message to an agent of a running tree and print its reply.

AGENT is the agent's path in the tree, such as root/team/echo-a (the root
supervisor's name, the nested supervisors' names, the agent's name), or
just its name (echo-a) when no other node has that name.

The message goes to the host started by `agent-host run TREE` (through its
control socket; see `agent-host run --help`), and only if that host runs
as the same user: a socket served by another user is refused, and nothing
is sent. The reply is printed on stdout. A failed call (the agent crashed, returned an error, is restarting,
or is unknown) prints `error: ...` on stderr.

If no host is running the tree, the tree is started for this one call and
stopped after it (a note on stderr says so). Its agents find the state
that `agent-host run` keeps for the tree, in the same file (by default
beside the tree file; --state PATH or --state memory as for `run`), and
what they store is kept there.

Exit status:
  0  the agent replied
  1  the call failed, the tree file has problems, or the socket is served
     by another user
  2  usage error";

pub const STATUS_LONG_ABOUT: &str = "\
Print the status of every node of a running tree.

One row per node, depth first in start order (a nested supervisor's
children follow it): its path, whether it is an agent or a supervisor, its
status (running, restarting, parked by its circuit breaker, stopped,
failed, ...), how many times it was restarted, and why it last exited.
With --json each row is a JSON object on its own line:
{\"path\":...,\"kind\":\"agent\",\"status\":\"Running\",\"restart_count\":0,\"last_exit\":null,...}

Through a host of a cluster (`run --cluster`), it shows the whole
cluster: a HOST column names the host that runs each unit; the nodes of
units run on other hosts are asked of those hosts (at most 2 s each, all
at once), and a unit whose host does not answer, or that no host runs
now, gets one row saying so (--json: {\"path\":...,\"host\":...,\"error\":...};
the other rows carry \"host\" too). --crashes shows only this host's nodes.

With --crashes PATH it prints instead the crash reports kept for that node:
the fault, the message it was handling (cut) and its sequence number, fuel
and memory, the WASM backtrace with function names, and the last lines the
agent wrote to its stdout and stderr (a Python traceback, a Rust panic
message). --json prints them as JSON lines.

The tree must be running (`agent-host run TREE`) as the same user; status
does not start it, and refuses a socket served by another user.

Exit status:
  0  the status was printed
  1  no host is running the tree, it could not be reached, or it runs as
     another user
  2  usage error";

#[derive(Debug, Args)]
pub struct CallArgs {
    /// The tree file (TOML) of the running host.
    #[arg(value_name = "TREE.toml")]
    tree: PathBuf,
    /// The agent: its path (root/team/echo-a) or its unique name (echo-a).
    #[arg(value_name = "AGENT")]
    agent: String,
    /// The message to send (it may start with `-`).
    #[arg(value_name = "MESSAGE", allow_hyphen_values = true)]
    message: String,
    /// The host's control socket (default: derived from the tree's path).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Only when no host runs the tree and `call` runs it for the call.
    #[arg(long, value_name = "PATH|memory", help = state_arg::HELP)]
    state: Option<StateArg>,
    /// Only when no host runs the tree and `call` runs it for the call.
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The tree file (TOML) of the running host.
    #[arg(value_name = "TREE.toml")]
    tree: PathBuf,
    /// Print one JSON object per node instead of a table.
    #[arg(long)]
    json: bool,
    /// Print the crash reports kept for this node instead (its path or
    /// unique name).
    #[arg(long, value_name = "PATH")]
    crashes: Option<String>,
    /// The host's control socket (default: derived from the tree's path).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// The tree file (TOML) of the running host.
    #[arg(value_name = "TREE.toml")]
    tree: PathBuf,
    /// Only this agent's (its path or unique name).
    #[arg(value_name = "PATH")]
    agent: Option<String>,
    /// Take this dead letter (by hash) out of quarantine and deliver it
    /// again; prints the reply.
    #[arg(
        long,
        value_name = "HASH",
        requires = "agent",
        conflicts_with = "discard"
    )]
    replay: Option<String>,
    /// Take this dead letter (by hash) out of quarantine and drop it.
    #[arg(long, value_name = "HASH", requires = "agent")]
    discard: Option<String>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// The host's control socket (default: derived from the tree's path).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

pub const DEAD_LETTERS_LONG_ABOUT: &str = "\
List the dead letters of a running tree: messages quarantined because they
crashed their agent `poison_threshold` times in a row (3 by default). A
quarantined message is not delivered again (its callers get a Quarantined
error at once); each dead letter keeps the message and the reports of the
crashes it caused.

With PATH, only that agent's. --replay HASH takes one out of quarantine and
delivers it once more (printing the reply); --discard HASH drops it.

Exit status:
  0  listed, replayed or discarded
  1  no host runs the tree, no such agent or dead letter, or the replay failed
  2  usage error";

fn failed(failure: &Failure) -> ExitCode {
    stderr_line!("error: {}", failure.error);
    ExitCode::from(EXIT_FAILURE)
}

pub async fn call(args: CallArgs) -> CliResult {
    let socket = control::socket_for(&args.tree, args.socket.as_deref())?;
    let Some(stream) = control::connect(&socket).await? else {
        return one_shot(&args).await;
    };
    let request = Request::Call {
        agent: args.agent,
        message: args.message,
    };
    Ok(match control::request::<String>(stream, &request).await? {
        Ok(reply) => {
            Out::blocking(false).line(&reply);
            ExitCode::SUCCESS
        }
        Err(failure) => failed(&failure),
    })
}

/// No host runs the tree: start it, call, stop it.
async fn one_shot(args: &CallArgs) -> CliResult {
    let Ok(file) = problems::load(&args.tree) else {
        return Ok(ExitCode::from(EXIT_FAILURE));
    };
    let (state, state_file) = state_arg::open(&args.tree, args.state.as_ref()).await?;
    let mut tree = match problems::start(&file, &args.cache.runtime()?, state).await {
        Ok(tree) => tree,
        Err(NotStarted::Reported) => return Ok(ExitCode::from(EXIT_FAILURE)),
        Err(NotStarted::Failed(why)) => return Err(why.into()),
    };
    match state_file {
        Some(path) => stderr_line!(
            "no running host for {}: started it for this call; state is kept in {}",
            args.tree.display(),
            path.display()
        ),
        None => stderr_line!(
            "no running host for {}: started it for this call; state is not kept",
            args.tree.display()
        ),
    }
    let result = tree.call(&args.agent, args.message.clone()).await;
    if let Err(e) = tree.stop().await {
        tracing::warn!("stopping the tree: {e}");
    }
    Ok(match result {
        Ok(reply) => {
            Out::blocking(false).line(&reply);
            ExitCode::SUCCESS
        }
        Err(e) => {
            stderr_line!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    })
}

pub async fn status(args: StatusArgs) -> CliResult {
    let socket = control::socket_for(&args.tree, args.socket.as_deref())?;
    let Some(stream) = control::connect(&socket).await? else {
        return Err(not_running(&args.tree, &socket).into());
    };
    if let Some(agent) = args.crashes {
        let request = Request::Crashes { agent };
        let entries = match control::request::<Vec<RestartEntry>>(stream, &request).await? {
            Ok(entries) => entries,
            Err(failure) => return Ok(failed(&failure)),
        };
        print_crashes(&Out::blocking(args.json), &entries);
        return Ok(ExitCode::SUCCESS);
    }
    let answer = match control::request::<serde_json::Value>(stream, &Request::Status {}).await? {
        Ok(answer) => answer,
        Err(failure) => return Ok(failed(&failure)),
    };
    let out = Out::blocking(args.json);
    // A host of a cluster answers for the whole cluster.
    if answer.is_object() {
        let status: control::ClusterStatus = serde_json::from_value(answer)
            .map_err(|e| format!("the host's status answer is malformed: {e}"))?;
        print_cluster_status(&out, &status);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<NodeStatus> = serde_json::from_value(answer)
        .map_err(|e| format!("the host's status answer is malformed: {e}"))?;
    if out.json() {
        for row in &rows {
            out.json_line(row);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let w = rows
        .iter()
        .map(|r| r.path.len())
        .max()
        .unwrap_or(0)
        .max("PATH".len());
    out.line(&format!(
        "{:<w$}  {:<10}  {:<10}  {:>8}  LAST EXIT",
        "PATH", "KIND", "STATUS", "RESTARTS"
    ));
    for row in &rows {
        let (kind, status, last) = columns(row);
        out.line(&format!(
            "{:<w$}  {kind:<10}  {status:<10}  {:>8}  {last}",
            row.path, row.restart_count,
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The KIND, STATUS and LAST EXIT columns of a node's row (a child whose
/// circuit is open shows as parked).
fn columns(node: &NodeStatus) -> (&'static str, &'static str, String) {
    let kind = match node.kind {
        NodeKind::Supervisor => "supervisor",
        NodeKind::Agent => "agent",
    };
    let status = match node.circuit {
        Some(CircuitStatus::Open { .. }) => "parked",
        _ => status_text(&node.status),
    };
    let last = node
        .last_exit
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    (kind, status, last)
}

/// The status of every unit of a cluster, with the host that runs it: a
/// table, or one JSON object per node (with `host`) and one per unit not
/// shown (`path`, `host`, `error`).
fn print_cluster_status(out: &Out, status: &control::ClusterStatus) {
    if out.json() {
        for row in &status.nodes {
            out.json_line(row);
        }
        for missing in &status.missing {
            out.json_line(&serde_json::json!({
                "path": missing.path,
                "host": missing.host,
                "error": missing.why,
            }));
        }
        return;
    }
    let w = status
        .nodes
        .iter()
        .map(|r| r.node.path.len())
        .chain(status.missing.iter().map(|m| m.path.len()))
        .max()
        .unwrap_or(0)
        .max("PATH".len());
    let hw = status
        .nodes
        .iter()
        .map(|r| r.host.len())
        .max()
        .unwrap_or(0)
        .max("HOST".len());
    out.line(&format!(
        "{:<w$}  {:<hw$}  {:<10}  {:<10}  {:>8}  LAST EXIT",
        "PATH", "HOST", "KIND", "STATUS", "RESTARTS"
    ));
    for row in &status.nodes {
        let node = &row.node;
        let (kind, state, last) = columns(node);
        out.line(&format!(
            "{:<w$}  {:<hw$}  {kind:<10}  {state:<10}  {:>8}  {last}",
            node.path, row.host, node.restart_count,
        ));
    }
    for missing in &status.missing {
        out.line(&format!(
            "{:<w$}  {:<hw$}  {:<10}  {:<10}  {:>8}  ({})",
            missing.path,
            missing.host.as_deref().unwrap_or("-"),
            "unit",
            "unknown",
            "-",
            missing.why
        ));
    }
}

/// Crash reports, one block each (or one JSON line each).
fn print_crashes(out: &Out, entries: &[RestartEntry]) {
    if entries.is_empty() && !out.json() {
        out.line("no crash reports kept for it");
    }
    for entry in entries {
        if out.json() {
            out.json_line(entry);
            continue;
        }
        let Some(crash) = &entry.crash else { continue };
        out.line(&format!("crash at {}: {}", entry.timestamp, crash.fault));
        if let (Some(message), Some(sequence)) = (&crash.message, crash.sequence) {
            let hash = crash.message_hash.as_deref().unwrap_or("-");
            out.line(&format!("  message #{sequence} (hash {hash}): {message:?}"));
        }
        out.line(&format!(
            "  fuel used {}, memory {} bytes",
            crash.fuel_used, crash.memory_bytes
        ));
        if !crash.backtrace.is_empty() {
            out.line("  backtrace:");
            for frame in &crash.backtrace {
                out.line(&format!("    {frame}"));
            }
        }
        if !crash.output.is_empty() {
            out.line("  last output:");
            for line in &crash.output {
                out.line(&format!("    | {line}"));
            }
        }
    }
}

pub async fn dead_letters(args: DeadLettersArgs) -> CliResult {
    let socket = control::socket_for(&args.tree, args.socket.as_deref())?;
    let Some(stream) = control::connect(&socket).await? else {
        return Err(not_running(&args.tree, &socket).into());
    };
    let out = Out::blocking(args.json);
    match (args.agent, args.replay, args.discard) {
        (Some(agent), Some(hash), _) => {
            let request = Request::Replay { agent, hash };
            match control::request::<String>(stream, &request).await? {
                Ok(reply) => out.line(&reply),
                Err(failure) => return Ok(failed(&failure)),
            }
        }
        (Some(agent), None, Some(hash)) => {
            let request = Request::Discard { agent, hash };
            if let Err(failure) = control::request::<()>(stream, &request).await? {
                return Ok(failed(&failure));
            }
        }
        (agent, _, _) => {
            let request = Request::DeadLetters { agent };
            let letters = match control::request::<Vec<serde_json::Value>>(stream, &request).await?
            {
                Ok(letters) => letters,
                Err(failure) => return Ok(failed(&failure)),
            };
            for letter in &letters {
                if out.json() {
                    out.json_line(letter);
                    continue;
                }
                let l = &letter["letter"];
                out.line(&format!(
                    "{}  {}  {}  {} crashes  {:?}",
                    letter["path"].as_str().unwrap_or("?"),
                    l["hash"].as_str().unwrap_or("?"),
                    l["at"].as_str().unwrap_or("?"),
                    l["crashes"].as_array().map_or(0, Vec::len),
                    l["message"].as_str().unwrap_or(""),
                ));
            }
            if letters.is_empty() && !out.json() {
                out.line("no dead letters");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn not_running(tree: &Path, socket: &Path) -> String {
    format!(
        "no host is running {} (nothing listens on {}); start one with `agent-host run {}`",
        tree.display(),
        socket.display(),
        tree.display()
    )
}
