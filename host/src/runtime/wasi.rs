//! WASI capabilities of an agent: deny by default, granted per agent.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use super::crash::OutputRing;
use super::stdio::{self, GuestOutput};

/// What an agent may reach through WASI. The default grants nothing: no
/// files, no environment, no arguments, no network, and stdio connected to
/// nothing (reads see end of file, writes are discarded).
///
/// Environment values may be secrets (API keys): `Debug` shows their names
/// only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WasiGrants {
    /// Let the agent write to the host's stdout. Its writes never block: they
    /// are queued for the host's stream, and dropped if the queue is full.
    pub inherit_stdout: bool,
    /// Let the agent write to the host's stderr (where a Rust guest's panic
    /// message goes); like `inherit_stdout`, never blocking.
    pub inherit_stderr: bool,
    /// Environment variables the agent sees.
    pub env: Vec<(String, String)>,
    /// Environment variables of the host passed on to the agent, by name
    /// (`OPENAI_API_KEY`): each instance sees the host's value when it is
    /// created; a variable the host does not have is left out. Keeps
    /// secrets out of tree files.
    pub inherit_env: Vec<String>,
    /// Command-line arguments the agent sees.
    pub args: Vec<String>,
    /// Host directories the agent may open.
    pub preopens: Vec<Preopen>,
    /// Allow TCP and UDP sockets (outgoing and incoming) and name lookups,
    /// to any address the host can reach.
    pub network: bool,
}

/// One host directory made visible to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preopen {
    /// The directory on the host.
    pub host: PathBuf,
    /// The path the agent sees it under.
    pub guest: String,
    /// Whether the agent may only read.
    #[serde(default = "yes")]
    pub read_only: bool,
}

fn yes() -> bool {
    true
}

impl std::fmt::Debug for WasiGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(name, _)| format!("{name}=<redacted>"))
            .collect();
        f.debug_struct("WasiGrants")
            .field("inherit_stdout", &self.inherit_stdout)
            .field("inherit_stderr", &self.inherit_stderr)
            .field("env", &env)
            .field("inherit_env", &self.inherit_env)
            .field("args", &self.args)
            .field("preopens", &self.preopens)
            .field("network", &self.network)
            .finish()
    }
}

impl WasiGrants {
    /// Build the WASI context for one instance; whatever it writes to its
    /// stdout and stderr is kept in `output`, granted or not.
    pub(crate) fn build(&self, output: &OutputRing) -> Result<WasiCtx, String> {
        let mut b = WasiCtxBuilder::new();
        // Not `inherit_stdout`/`inherit_stderr`: those write inside the
        // guest's call and a stalled reader would block a runtime worker.
        b.stdout(GuestOutput {
            ring: output.clone(),
            forward: self.inherit_stdout.then(stdio::host_stdout),
        });
        b.stderr(GuestOutput {
            ring: output.clone(),
            forward: self.inherit_stderr.then(stdio::host_stderr),
        });
        for (k, v) in &self.env {
            b.env(k, v);
        }
        for name in &self.inherit_env {
            // Reads the process's environment in memory: no I/O.
            if let Some(value) = std::env::var_os(name).and_then(|v| v.into_string().ok()) {
                b.env(name, value);
            }
        }
        if !self.args.is_empty() {
            b.args(&self.args);
        }
        for p in &self.preopens {
            let perms = if p.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            b.preopened_dir(&p.host, &p.guest, perms)
                .map_err(|e| format!("cannot grant directory {}: {e}", p.host.display()))?;
        }
        if self.network {
            // `inherit_network` alone still refuses TCP and UDP: wasmtime-wasi
            // needs each protocol allowed as well.
            b.inherit_network()
                .allow_tcp(true)
                .allow_udp(true)
                .allow_ip_name_lookup(true);
        }
        Ok(b.build())
    }
}
