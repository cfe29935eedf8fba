//! `agent-host run TREE.toml`: start a supervision tree from a file, print
//! its lifecycle events, serve the control socket, and stop the tree in
//! reverse start order on Ctrl-C or SIGTERM. With `--cluster`, join the
//! hosts that run the tree together ([`cluster`]).

mod cluster;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use serde::Serialize;
use terraphim_agent_supervisor::observe::Observer;
use terraphim_agent_supervisor::{EventKind, NodeKind, RunningTree, SupervisorStatus};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::oneshot;

use crate::cache_arg::CacheArgs;
use crate::events::{Printer, Shared};
use crate::http::{self, HttpArgs, TokenFile};
use crate::output::{Out, stderr_line};
use crate::problems;
use crate::state_arg::{self, StateArg};
use crate::{CliResult, EXIT_FAILURE, control};

pub const LONG_ABOUT: &str = "\
Start the supervision tree described by a tree file, and keep it running.

The tree file (TOML) declares the root supervisor, its children (agents,
each a WebAssembly component, and nested supervisors), their restart
policies and limits; see the README's \"Command line\" section. Every problem
in the file is printed as an `error: FILE: `FIELD`: what to do` line.

Once started, one line per lifecycle event is printed: a child started,
exited (and why), was restarted, a supervisor gave up (escalated), a child
or supervisor stopped. With --json each line is a JSON object instead:
{\"kind\":\"event\",\"t\":SECONDS,\"path\":...,\"event\":{...},\"at\":...},
after a first {\"kind\":\"listening\",...} line and before a last
{\"kind\":\"stopped\",\"order\":[...]} line.

While it runs, `agent-host call TREE AGENT MESSAGE` and `agent-host status
TREE` reach it through a Unix control socket: by default
$XDG_RUNTIME_DIR/agent-host/<hash of the tree's path>.sock (in
<temp dir>/agent-host-<uid>/ if XDG_RUNTIME_DIR is not set), or --socket
PATH. The default directory is created mode 0700; `run` refuses it if it
is a symbolic link, belongs to another user, or others may enter it. The
socket file is mode 0600, and the host answers clients of other users
only with an error (call and status likewise refuse a socket served by
another user). A second `run` of the same tree is refused while the first
runs.

The agents' state (what they store through the WIT `state` interface) is
kept in a file beside the tree file, <tree file name without .toml>.state.redb,
and survives restarts of the host, a crash or SIGKILL included: every write
is on disk when the agent's `put` returns. --state PATH chooses the file;
--state memory keeps the state in memory only.

With --http ADDR (PORT, IP:PORT, or nothing for a free port) the host
also serves, over HTTP: Prometheus metrics on /metrics, the status and
events as JSON on /api/status, /api/nodes/PATH, /api/events/recent, the
live events (server-sent) on /api/events, and a live view of the tree on /
(its address is printed; in the --json listening line as `http`). Only a
loopback address unless --http-allow-remote; requests whose Host header is
not that address are refused. The management calls (POST
/api/control/terminate/PATH, /api/control/restart/PATH) only with
--http-allow-control, and only with the control token printed on stderr
(also in <socket>.http-token, mode 0600) in the X-Agent-Host-Token header.

With --cluster nats://HOST:PORT --host-id ID, this host joins the hosts
that run the tree together through a NATS server with JetStream
(`nats-server -js`): each child of the root (a unit, with its subtree)
runs on one host at a time, the one that holds its lease; when that host
dies, another takes the unit over once the lease expired (`[cluster]
lease_ttl`, default 10s); Ctrl-C or SIGTERM hands its units over at once.
--labels zone=a,disk=ssd: this host's labels, for units that require some
(`placement = { labels = { zone = \"a\" } }`). The agents' state is kept in
the cluster's JetStream bucket. --http serves this host's view (the
root and the units it runs) and its /metrics; --http-allow-control is
refused with --cluster. See the README's \"Many hosts\".

Ctrl-C (SIGINT) or SIGTERM stops the tree: every supervisor stops its
children in reverse start order, each within its shutdown policy. A second
Ctrl-C exits at once without waiting.

Exit status:
  0  stopped by Ctrl-C or SIGTERM
  1  the tree file has problems, the tree did not start, another host runs
     it, its state file cannot be opened, its root supervisor gave up
     (restart intensity exceeded), or a
     second Ctrl-C cut the stop short
  2  usage error";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The tree file (TOML).
    #[arg(value_name = "TREE.toml")]
    tree: PathBuf,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// The control socket to listen on (default: derived from the tree's path).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[arg(long, value_name = "PATH|memory", help = state_arg::HELP)]
    state: Option<StateArg>,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// Join the cluster of hosts that run this tree together: the NATS
    /// server (with JetStream) they share.
    #[arg(long, value_name = "nats://HOST:PORT")]
    cluster: Option<String>,
    /// This host's id in the cluster (unique; letters, digits, `-`, `_`, `.`).
    #[arg(long, value_name = "ID", requires = "cluster")]
    host_id: Option<String>,
    /// This host's labels, matched against the units' `placement` labels.
    #[arg(long, value_name = "NAME=VALUE,...", requires = "cluster")]
    labels: Vec<String>,
}

#[derive(Serialize)]
struct ListeningLine<'a> {
    kind: &'static str,
    tree: &'a Path,
    socket: &'a Path,
    agents: usize,
    supervisors: usize,
    /// The HTTP server's address, with --http.
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    /// The file holding the HTTP control token, with --http-allow-control.
    #[serde(skip_serializing_if = "Option::is_none")]
    http_token_file: Option<&'a Path>,
}

#[derive(Serialize)]
struct StoppedLine<'a> {
    kind: &'static str,
    /// `SIGINT` or `SIGTERM`; none when the root supervisor gave up.
    signal: Option<&'a str>,
    /// The children stopped, in order.
    order: Vec<String>,
}

/// Why the host stops.
enum Stop {
    Signal(&'static str),
    RootDown,
}

pub async fn run(args: RunArgs) -> CliResult {
    let file = match problems::load(&args.tree) {
        Ok(file) => file,
        Err(_) => return Ok(ExitCode::from(EXIT_FAILURE)),
    };
    if let Some(url) = args.cluster.clone() {
        return cluster::run(args, file, url).await;
    }
    let socket = control::socket_for(&args.tree, args.socket.as_deref())?;
    let runtime = args.cache.runtime()?;
    // The socket first: a second host of the tree is refused by it before
    // it reaches the state file's lock.
    let mut listener = control::listen(&socket, args.socket.is_none()).await?;
    let http = http::bind(&args.http).await?;
    let token_file = match http.as_ref().and_then(|bound| bound.token()) {
        Some(token) => Some(TokenFile::write(
            socket.with_extension("http-token"),
            token,
        )?),
        None => None,
    };
    let (state, _) = state_arg::open(&args.tree, args.state.as_ref()).await?;
    let root = match file.build_with_state(&runtime, state) {
        Ok(root) => root,
        Err(e) => {
            problems::report(&e);
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    let out = Arc::new(Out::new(args.json));
    let nodes = file.nodes();
    let agents = nodes.iter().filter(|(_, k)| *k == NodeKind::Agent).count();
    let supervisors = 1 + nodes.len() - agents;
    if out.json() {
        out.json_line(&ListeningLine {
            kind: "listening",
            tree: &args.tree,
            socket: &socket,
            agents,
            supervisors,
            http: http.as_ref().map(|bound| bound.addr().to_string()),
            http_token_file: token_file.as_ref().map(TokenFile::path),
        });
    } else {
        out.line(&format!(
            "Running {}: {} under {}. Ctrl-C stops it.",
            args.tree.display(),
            count(agents, "agent", "agents"),
            count(supervisors, "supervisor", "supervisors"),
        ));
        out.line(&format!(
            "Control socket: {} (for `agent-host call` and `agent-host status`)",
            socket.display()
        ));
        if let Some(bound) = &http {
            out.line(&format!(
                "Tree view: http://{}/ (metrics: /metrics, JSON: /api/status)",
                bound.addr()
            ));
        }
    }
    if let Some(bound) = &http {
        http::announce_token(bound, token_file.as_ref().map(TokenFile::path));
    }
    out.start_clock();
    let shared = Arc::new(Shared::default());
    let (finish_tx, finish_rx) = oneshot::channel();
    let paths = nodes.into_iter().map(|(path, _)| path);
    let printer = Printer::new(out.clone(), shared.clone(), paths, false);
    // Subscribed before the start: the printer sees every child start.
    let printer = tokio::spawn(printer.run(root.subscribe(), finish_rx));
    let mut watch = root.subscribe();
    // Subscribed before the start too: the observer counts every exit.
    let observed = http.as_ref().map(|_| root.subscribe());
    let finish = |finish_tx: oneshot::Sender<()>, printer| async move {
        let _ = finish_tx.send(());
        match tokio::time::timeout(std::time::Duration::from_secs(5), printer).await {
            Ok(Ok(order)) => order,
            _ => Vec::new(),
        }
    };

    let mut tree = match RunningTree::start(root).await {
        Ok(tree) => tree,
        Err(e) => {
            drop(listener);
            finish(finish_tx, printer).await;
            return Err(format!("the tree did not start: {e}").into());
        }
    };
    let handle = tree.handle();
    let serving = match (http, observed) {
        (Some(bound), Some(events)) => {
            let observer = Observer::with_runtime(handle.clone(), events, runtime.clone());
            Some(http::serve(bound, observer))
        }
        _ => None,
    };

    let why = loop {
        tokio::select! {
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            () = listener.serve_next(&handle) => {}
            event = watch.recv() => match event {
                Ok(event) if matches!(event.kind, EventKind::SupervisorStopped)
                    && event.path == tree.root_name() => break Stop::RootDown,
                Err(RecvError::Closed) => break Stop::RootDown,
                _ => {
                    if matches!(tree.supervisor_status(), SupervisorStatus::Failed(_)) {
                        break Stop::RootDown;
                    }
                }
            },
        }
    };
    // No new clients: from now on `call` runs the tree on its own.
    drop(listener);
    if let Some(serving) = serving {
        serving.stop().await;
    }
    drop(token_file);

    let signal = match why {
        Stop::Signal(signal) => Some(signal),
        Stop::RootDown => None,
    };
    if let Some(signal) = signal {
        shared.set_stopping();
        if !out.json() {
            out.line(&format!(
                "{signal}: stopping the tree; children stop in reverse start order."
            ));
        }
    }
    let stopped = tokio::select! {
        stopped = tree.stop() => stopped,
        _ = sigint.recv() => {
            stderr_line!("error: interrupted again: exiting without waiting for the tree to stop");
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
    };
    let order = finish(finish_tx, printer).await;
    if out.json() {
        out.json_line(&StoppedLine {
            kind: "stopped",
            signal,
            order,
        });
    } else if signal.is_some() {
        out.line("Stopped.");
    }
    stopped?;
    if let SupervisorStatus::Failed(why) = tree.supervisor_status() {
        stderr_line!(
            "error: the root supervisor `{}` gave up ({why}); the tree is down",
            tree.root_name()
        );
        return Ok(ExitCode::from(EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
