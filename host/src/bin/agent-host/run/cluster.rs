//! `agent-host run --cluster nats://HOST:PORT --host-id ID TREE.toml`: this
//! host joins the cluster of hosts that run the tree together (see the
//! library's `cluster` module and the README's "Many hosts").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use terraphim_agent_supervisor::cluster::{ClusterEvent, ClusterHost, ClusterOptions, token};
use terraphim_agent_supervisor::tree::TreeFile;
use terraphim_agent_supervisor::{EventKind, SupervisorStatus};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::RunArgs;
use crate::events::{Printer, Shared};
use crate::output::{Out, stderr_line};
use crate::{CliResult, EXIT_FAILURE, control, http};
use terraphim_agent_supervisor::observe::Observer;

/// The first line of a cluster host with --json.
#[derive(Serialize)]
struct JoinedLine<'a> {
    kind: &'static str,
    tree: &'a Path,
    socket: &'a Path,
    cluster: &'a str,
    host_id: &'a str,
    labels: &'a BTreeMap<String, String>,
    lease_ttl_ms: u128,
    units: Vec<&'a str>,
    /// The HTTP server's address, with --http (this host's view).
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<String>,
}

/// A lease event with --json: `{"kind":"cluster","t":..,"at_ms":..,"host":..,"event":..,...}`.
#[derive(Serialize)]
struct ClusterLine<'a> {
    kind: &'static str,
    t: f64,
    /// Milliseconds since the Unix epoch, by this host's clock.
    at_ms: u128,
    host: &'a str,
    #[serde(flatten)]
    event: &'a ClusterEvent,
}

#[derive(Serialize)]
struct StoppedLine<'a> {
    kind: &'static str,
    signal: Option<&'a str>,
    order: Vec<String>,
}

/// `--labels zone=a,disk=ssd` (the flag may be repeated).
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}`: write labels as NAME=VALUE"))?;
            let (k, v) = (k.trim(), v.trim());
            if !terraphim_agent_supervisor::tree::valid_label(k)
                || !terraphim_agent_supervisor::tree::valid_label(v)
            {
                return Err(format!(
                    "`{pair}`: label names and values use letters, digits, `-`, `_` and `.`"
                ));
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The default control socket of host `host_id` of the tree: several hosts
/// of one tree may run on one machine.
fn socket_for(tree: &Path, explicit: Option<&Path>, host_id: &str) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let single = control::socket_for(tree, None)?;
    let stem = single
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    Ok(single.with_file_name(format!("{stem}-{}.sock", token(host_id))))
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

pub async fn run(args: RunArgs, file: TreeFile, url: String) -> CliResult {
    let Some(host_id) = args.host_id.clone() else {
        return Err(
            "--cluster needs --host-id ID: a name for this host, unique in the cluster".into(),
        );
    };
    if args.state.is_some() {
        return Err("--state does not apply with --cluster: the agents' state is kept in the cluster's JetStream bucket".into());
    }
    if args.http.http_allow_control {
        return Err("--http-allow-control is not available with --cluster: a unit's nodes are managed by its host's lease, not by hand (the read-only view and /metrics are)".into());
    }
    let mut labels = BTreeMap::new();
    for text in &args.labels {
        labels.extend(parse_labels(text).map_err(|e| format!("--labels {e}"))?);
    }
    let socket = socket_for(&args.tree, args.socket.as_deref(), &host_id)?;
    let runtime = args.cache.runtime()?;
    let mut listener = control::listen(&socket, args.socket.is_none()).await?;
    let http = http::bind(&args.http).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let options = ClusterOptions {
        url: url.clone(),
        host_id: host_id.clone(),
        labels: labels.clone(),
    };
    let host = ClusterHost::join(options, &file, &runtime).await?;
    listener.set_cluster(host.client().clone());
    // This host's view: its part of the tree (the root and the units it
    // runs), as `/metrics` and `/api/status` count them.
    let serving = http.map(|bound| {
        let handle = host.tree();
        let observer = Observer::with_runtime(handle.clone(), handle.subscribe(), runtime.clone());
        let addr = bound.addr();
        (addr, http::serve(bound, observer))
    });
    let out = Arc::new(Out::new(args.json));
    let units: Vec<&str> = file.root.children.iter().map(|c| c.name()).collect();
    if out.json() {
        out.json_line(&JoinedLine {
            kind: "listening",
            tree: &args.tree,
            socket: &socket,
            cluster: &url,
            host_id: &host_id,
            labels: &labels,
            lease_ttl_ms: host.lease_ttl().as_millis(),
            units: units.clone(),
            http: serving.as_ref().map(|(addr, _)| addr.to_string()),
        });
    } else {
        out.line(&format!(
            "Host {host_id} joined the cluster at {url} for {} (units: {}; lease {} ms). Ctrl-C hands its units over and stops it.",
            args.tree.display(),
            units.join(", "),
            host.lease_ttl().as_millis()
        ));
        out.line(&format!(
            "Control socket: {} (for `agent-host call` and `agent-host status` of the whole cluster)",
            socket.display()
        ));
        if let Some((addr, _)) = &serving {
            out.line(&format!(
                "This host's view: http://{addr}/ (metrics: /metrics, JSON: /api/status; the units run here)"
            ));
        }
    }
    out.start_clock();

    let handle = host.tree();
    let shared = Arc::new(Shared::default());
    let (finish_tx, finish_rx) = oneshot::channel();
    let paths = file.nodes().into_iter().map(|(path, _)| path);
    let printer = Printer::new(out.clone(), shared.clone(), paths, false);
    let printer = tokio::spawn(printer.run(handle.subscribe(), finish_rx));
    let mut watch = handle.subscribe();

    // Lease events, printed until the host is shut down.
    let stop_events = CancellationToken::new();
    let lease_printer = {
        let mut events = host.subscribe();
        let out = out.clone();
        let stop = stop_events.clone();
        let host_id = host_id.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => break,
                    event = events.recv() => event,
                };
                match event {
                    Ok(event) => print_event(&out, &host_id, &event),
                    Err(RecvError::Lagged(n)) => {
                        if !out.json() {
                            out.line(&format!("({n} cluster events missed)"));
                        }
                    }
                    Err(RecvError::Closed) => break,
                }
            }
            // What came before the stop is printed too.
            while let Ok(event) = events.try_recv() {
                print_event(&out, &host_id, &event);
            }
        })
    };

    let mut halted = None;
    let why = loop {
        tokio::select! {
            reason = host.wait_halted() => {
                halted = Some(reason);
                break None;
            }
            _ = sigint.recv() => break Some("SIGINT"),
            _ = sigterm.recv() => break Some("SIGTERM"),
            () = listener.serve_next(&handle) => {}
            event = watch.recv() => match event {
                Ok(event) if matches!(event.kind, EventKind::SupervisorStopped)
                    && event.path == handle.root_name() => break None,
                Err(RecvError::Closed) => break None,
                _ => {
                    if matches!(handle.supervisor_status(), SupervisorStatus::Failed(_)) {
                        break None;
                    }
                }
            },
        }
    };
    drop(listener);
    if let Some((_, serving)) = serving {
        serving.stop().await;
    }
    if let Some(signal) = why {
        shared.set_stopping();
        if !out.json() {
            out.line(&format!(
                "{signal}: handing this host's units over; they stop here first."
            ));
        }
    }
    let failed = match handle.supervisor_status() {
        SupervisorStatus::Failed(why) => Some(why.to_string()),
        _ => None,
    };
    // The root gave up here: it gives up on every host (OTP: the tree is
    // down), instead of its units moving on to crash elsewhere.
    if let Some(why) = &failed
        && halted.is_none()
    {
        let reason = format!("the root supervisor gave up ({why})");
        if let Err(e) = host.halt(&reason).await {
            stderr_line!("warning: could not stop the tree on the other hosts: {e}");
        }
        halted = Some(reason);
    }
    let stopped = tokio::select! {
        stopped = host.shutdown() => stopped,
        _ = sigint.recv() => {
            stderr_line!("error: interrupted again: exiting without handing the units over (their leases expire)");
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
    };
    stop_events.cancel();
    let _ = lease_printer.await;
    let _ = finish_tx.send(());
    let order = match tokio::time::timeout(Duration::from_secs(5), printer).await {
        Ok(Ok(order)) => order,
        _ => Vec::new(),
    };
    if out.json() {
        out.json_line(&StoppedLine {
            kind: "stopped",
            signal: why,
            order,
        });
    } else if why.is_some() {
        out.line("Stopped.");
    }
    stopped?;
    if let Some(reason) = halted {
        stderr_line!(
            "error: the root supervisor `{}` gave up on the cluster ({reason}); the tree is down on every host",
            handle.root_name()
        );
        return Ok(ExitCode::from(EXIT_FAILURE));
    }
    if failed.is_some() {
        stderr_line!(
            "error: the root supervisor `{}` gave up; this host's part of the tree is down",
            handle.root_name()
        );
        return Ok(ExitCode::from(EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_event(out: &Out, host_id: &str, event: &ClusterEvent) {
    if out.json() {
        out.json_line(&ClusterLine {
            kind: "cluster",
            t: crate::output::seconds(out.elapsed()),
            at_ms: unix_ms(),
            host: host_id,
            event,
        });
        return;
    }
    let text = match event {
        ClusterEvent::Acquired {
            unit,
            incarnation,
            revision,
            takeover,
        } => format!(
            "cluster: {} unit {unit} (incarnation {incarnation}, lease revision {revision})",
            if *takeover { "took over" } else { "won" }
        ),
        ClusterEvent::Started { unit, .. } => format!("cluster: unit {unit} runs here"),
        ClusterEvent::StartFailed { unit, error, .. } => {
            format!("cluster: unit {unit} did not start here: {error}; lease given up")
        }
        ClusterEvent::Fenced { unit, reason, .. } => {
            format!("cluster: unit {unit} fenced ({reason}); stopping it")
        }
        ClusterEvent::Stopped { unit, .. } => format!("cluster: unit {unit} stopped here"),
        ClusterEvent::Restarted { unit, cause, .. } => {
            format!("cluster: unit {unit} restarted here with {cause} (the root's strategy)")
        }
        ClusterEvent::Released { unit, .. } => {
            format!("cluster: lease of unit {unit} released for another host")
        }
    };
    out.line(&format!("{} {text}", crate::output::stamp(out.elapsed())));
}
