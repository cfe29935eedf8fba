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
//! - `compile`: fill the compile cache ahead of time.
//! - `cluster`: the units of a tree run by several hosts, and draining a host.
//! - `bench`: measure the host's performance figures.
//! - `chaos`: a seeded storm of faults, then the supervision invariants checked.

/// jemalloc: restarts and spawns allocate and free across threads (stores,
/// tasks, messages), where glibc's allocator spends up to a sixth of a
/// group restart (README: Benchmark).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bench;
mod cache_arg;
mod chaos;
mod client;
mod cluster_cmd;
mod compile;
mod control;
mod demo;
mod events;
mod http;
mod output;
mod problems;
mod run;
mod state_arg;
mod validate;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::output::stderr_line;

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
RUST_LOG=info, or RUST_LOG=agent=info for the agents' own log messages.
Output and logs never hold the agents up: lines that stdout or stderr cannot
take in time are dropped, and how many is reported on stderr at exit.";

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
    /// List, replay or discard the quarantined messages of a running tree.
    #[command(name = "dead-letters", long_about = client::DEAD_LETTERS_LONG_ABOUT)]
    DeadLetters(client::DeadLettersArgs),
    /// Check agent components and tree files.
    #[command(long_about = validate::LONG_ABOUT)]
    Validate(validate::ValidateArgs),
    /// Compile agent components ahead of time into the compile cache.
    #[command(long_about = compile::LONG_ABOUT)]
    Compile(compile::CompileArgs),
    /// Look at and steer the hosts that run a tree together (`run --cluster`).
    #[command(long_about = cluster_cmd::LONG_ABOUT)]
    Cluster(cluster_cmd::ClusterArgs),
    /// Measure restart latency, spawn rate, memory per agent, call throughput and cold start.
    #[command(long_about = bench::LONG_ABOUT)]
    Bench(bench::BenchArgs),
    /// Inject a seeded storm of faults into a large tree and check the supervision invariants.
    #[command(long_about = chaos::LONG_ABOUT)]
    Chaos(chaos::ChaosArgs),
}

/// Logs go to stderr through the non-blocking, lossy queue of
/// [`output`]: a guest's `log` import formats its record and returns, even
/// while nobody reads stderr.
///
/// `default` is the filter without `RUST_LOG`: `warn`, but `error` for
/// `chaos`, whose hostile agents flood their logs with warnings on purpose.
fn init_tracing(default: &str) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            stderr_line!("warning: ignoring RUST_LOG={spec:?} ({e}); logging {default} only");
            EnvFilter::new(default)
        }),
        _ => EnvFilter::new(default),
    };
    // Fails only if a global subscriber is already set, which it is not.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| output::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        // On a failed write the subscriber would `eprintln!`, which panics
        // once stderr is closed. `LogWriter` never fails; this makes sure.
        .log_internal_errors(false)
        .try_init();
}

/// How long the async runtime's threads get to stop at exit, once the
/// subcommand returned (the tree is stopped by then).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(match cli.command {
        Command::Chaos(_) => "error",
        _ => "warn",
    });
    let code = run_command(cli);
    // The writer threads of stdout and stderr, and their tracing-appender
    // `WorkerGuard`s, live in `output` from the first line until here.
    // Everything queued is written now, each stream waited for within
    // bounds (about a second once it takes nothing; see `output::finish`,
    // which also says why a guard is dropped only once its queue is empty):
    // a stalled reader cannot keep the process from exiting after Ctrl-C or
    // SIGTERM.
    output::finish();
    code
}

fn run_command(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            stderr_line!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Call(args) => client::call(args).await,
            Command::Status(args) => client::status(args).await,
            Command::DeadLetters(args) => client::dead_letters(args).await,
            Command::Validate(args) => validate::run(&args),
            Command::Compile(args) => compile::run(&args),
            Command::Cluster(args) => cluster_cmd::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Chaos(args) => chaos::run(args).await,
        }
    });
    // No task writes output after this (bounded: a task stuck in a guest
    // call is left behind, and ends with the process).
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(code) => code,
        Err(e) => {
            stderr_line!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
