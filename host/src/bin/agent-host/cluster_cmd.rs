//! `agent-host cluster status|drain`: look at and steer the hosts that run
//! a tree together (`run --cluster`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use terraphim_agent_supervisor::cluster::ClusterClient;

use crate::output::Out;
use crate::{CliResult, EXIT_FAILURE, problems};

pub const LONG_ABOUT: &str = "\
Look at and steer the hosts that run a tree together (`agent-host run
--cluster`): `status` lists the tree's units and who holds each one's
lease (a host that died holds it until the lease expires), then every
live host (one that renewed its record within the lease time) with its
labels and the units it holds, idle hosts included (`--json`: one object,
`{\"units\": [...], \"hosts\": [...]}`, where hosts gone silent are
listed too, with `\"live\": false`); `drain HOST`
asks that host to hand every unit it runs over to the others (gracefully:
each stops there, then its lease is released) and to take none any more.

Exit status:
  0  success
  1  the tree file has problems, the NATS server cannot be reached, no
     such host, or it did not answer within 60 s
  2  usage error";

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// The units of the tree and the hosts that hold them.
    Status(StatusArgs),
    /// Hand every unit of a host over to the other hosts.
    Drain(DrainArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// The tree file (TOML) the cluster runs.
    #[arg(value_name = "TREE.toml")]
    tree: PathBuf,
    /// The cluster's NATS server.
    #[arg(long, value_name = "nats://HOST:PORT")]
    cluster: String,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    common: Common,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DrainArgs {
    #[command(flatten)]
    common: Common,
    /// The host to drain (its --host-id).
    #[arg(value_name = "HOST")]
    host: String,
}

/// How long `drain` waits for the host to hand its units over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(args: ClusterArgs) -> CliResult {
    match args.command {
        ClusterCommand::Status(args) => status(args).await,
        ClusterCommand::Drain(args) => drain(args).await,
    }
}

async fn status(args: StatusArgs) -> CliResult {
    let Ok(file) = problems::load(&args.common.tree) else {
        return Ok(ExitCode::from(EXIT_FAILURE));
    };
    let client = ClusterClient::connect(&args.common.cluster, &file.root.name).await?;
    let units: Vec<String> = file
        .root
        .children
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let rows = client.units(&units).await?;
    let hosts = client.hosts(&rows).await?;
    let out = Out::blocking(args.json);
    if args.json {
        out.json_line(&serde_json::json!({ "units": rows, "hosts": hosts }));
        return Ok(ExitCode::SUCCESS);
    }
    let width = units.iter().map(String::len).max().unwrap_or(4).max(4);
    out.line(&format!(
        "{:width$}  {:12}  {:36}  REVISION",
        "UNIT", "HOST", "INCARNATION"
    ));
    for row in rows {
        let (host, incarnation) = row
            .holder
            .as_ref()
            .map_or(("-", "-"), |h| (h.host.as_str(), h.incarnation.as_str()));
        out.line(&format!(
            "{:width$}  {host:12}  {incarnation:36}  {}",
            row.unit, row.revision
        ));
    }
    let live: Vec<_> = hosts.iter().filter(|h| h.live).collect();
    let width = live
        .iter()
        .map(|h| h.record.host.len())
        .max()
        .unwrap_or(4)
        .max(4);
    out.line("");
    out.line(&format!("{:width$}  {:24}  UNITS", "HOST", "LABELS"));
    for host in live {
        let labels = if host.record.labels.is_empty() {
            "-".to_owned()
        } else {
            host.record
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let units = if host.units.is_empty() {
            "(idle)".to_owned()
        } else {
            host.units.join(", ")
        };
        let draining = if host.record.draining {
            " (drained)"
        } else {
            ""
        };
        out.line(&format!(
            "{:width$}  {labels:24}  {units}{draining}",
            host.record.host
        ));
    }
    Ok(ExitCode::SUCCESS)
}

async fn drain(args: DrainArgs) -> CliResult {
    let Ok(file) = problems::load(&args.common.tree) else {
        return Ok(ExitCode::from(EXIT_FAILURE));
    };
    let client = ClusterClient::connect(&args.common.cluster, &file.root.name).await?;
    let units = client.drain(&args.host, DRAIN_TIMEOUT).await?;
    let out = Out::blocking(false);
    if units.is_empty() {
        out.line(&format!(
            "{} ran no unit; it takes none any more.",
            args.host
        ));
    } else {
        out.line(&format!(
            "{} handed over: {}; it takes none any more.",
            args.host,
            units.join(", ")
        ));
    }
    Ok(ExitCode::SUCCESS)
}
