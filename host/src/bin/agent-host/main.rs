//! `agent-host`: run and check supervised WebAssembly agents from the
//! command line.
//!
//! - `demo`: a supervision tree over the embedded example agents, driven
//!   into crashes so that the restarts can be watched (no file needed).
//! - `run`: start a supervision tree from a tree file, print its events,
//!   serve its control socket, stop it cleanly on Ctrl-C or SIGTERM.
//! - `call`, `status`: reach a running tree through its control socket.
//! - `validate`: does a `.wasm` file implement the agent world? Is a tree
//!   file right?

mod client;
mod control;
mod demo;
mod events;
mod output;
mod run;
mod tree_host;
mod validate;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Exit status for a validation or runtime failure (clap uses 2 for usage errors).
pub const EXIT_FAILURE: u8 = 1;

/// The result of a subcommand: its exit code, or an error printed as
/// `error: ...` (exit 1).
pub type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

const LONG_ABOUT: &str = "\
Host for AI agents that run as sandboxed WebAssembly components under
Erlang/OTP-style supervision trees: a crashed agent is restarted by its
supervisor, and every agent runs within its own fuel, memory and time limits.

New here? Run `agent-host demo`: it starts a small tree of example agents,
makes some of them crash and shows their supervisors restarting them.

Your own tree: describe it in a tree file (TOML; see the README), check it
with `agent-host validate tree.toml`, start it with `agent-host run
tree.toml`, and from another terminal talk to it with `agent-host call
tree.toml AGENT MESSAGE` and `agent-host status tree.toml`.

Exit status:
  0  success
  1  validation or runtime failure (details on stderr, as `error: ...`)
  2  usage error (unknown subcommand, missing or invalid argument)

Logging goes to stderr and is controlled by RUST_LOG (default: `warn`), e.g.
RUST_LOG=info, or RUST_LOG=agent=info for the agents' own log messages.";

#[derive(Debug, Parser)]
#[command(
    name = "agent-host",
    version,
    about = "Run and check supervised WebAssembly agents",
    long_about = LONG_ABOUT,
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch a supervision tree of example agents crash and get restarted.
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::DemoArgs),
    /// Start a supervision tree from a tree file and keep it running.
    #[command(long_about = run::LONG_ABOUT)]
    Run(run::RunArgs),
    /// Send a message to an agent of a running tree.
    #[command(long_about = client::CALL_LONG_ABOUT)]
    Call(client::CallArgs),
    /// Show the status of every node of a running tree.
    #[command(long_about = client::STATUS_LONG_ABOUT)]
    Status(client::StatusArgs),
    /// Check agent components and tree files.
    #[command(long_about = validate::LONG_ABOUT)]
    Validate(validate::ValidateArgs),
}

fn init_tracing() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("warning: ignoring RUST_LOG={spec:?} ({e}); logging warnings only");
            EnvFilter::new("warn")
        }),
        _ => EnvFilter::new("warn"),
    };
    // Fails only if a global subscriber is already set, which it is not.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Call(args) => client::call(args).await,
            Command::Status(args) => client::status(args).await,
            Command::Validate(args) => validate::run(&args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
