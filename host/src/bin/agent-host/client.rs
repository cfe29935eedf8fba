//! `agent-host call` and `agent-host status`: talk to the host running a
//! tree through its control socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use terraphim_agent_supervisor::Runtime;

use terraphim_agent_supervisor::{CircuitStatus, NodeKind, NodeStatus};

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
failed, ...), how many times it was
restarted, and why it last exited. With --json each row is a JSON object
on its own line:
{\"path\":...,\"status\":\"Running\",\"restart_count\":0,\"last_exit\":null,\"supervisor\":false}

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
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The tree file (TOML) of the running host.
    #[arg(value_name = "TREE.toml")]
    tree: PathBuf,
    /// Print one JSON object per node instead of a table.
    #[arg(long)]
    json: bool,
    /// The host's control socket (default: derived from the tree's path).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

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
    let mut tree = match problems::start(&file, &Runtime::new()?, state).await {
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
    let rows = match control::request::<Vec<NodeStatus>>(stream, &Request::Status).await? {
        Ok(rows) => rows,
        Err(failure) => return Ok(failed(&failure)),
    };
    let out = Out::blocking(args.json);
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
        let last = row
            .last_exit
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        out.line(&format!(
            "{:<w$}  {:<10}  {:<10}  {:>8}  {last}",
            row.path,
            match row.kind {
                NodeKind::Supervisor => "supervisor",
                NodeKind::Agent => "agent",
            },
            match row.circuit {
                Some(CircuitStatus::Open { .. }) => "parked",
                _ => status_text(&row.status),
            },
            row.restart_count,
        ));
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
