//! `agent-host bench`: measure the host's performance figures in this
//! process and print them as one table (or one JSON object).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use terraphim_agent_supervisor::bench::{self, BenchOptions, BenchReport, CrashToReady, Latency};

use crate::CliResult;
use crate::output::stderr_line;

pub const LONG_ABOUT: &str = "\
Measure the host's performance on this machine, in this process.

Figures (each beside the raw wasmtime work it wraps, where there is one):
  crash-to-ready   a child traps handling a message; until its restarted
                   instance has answered the next one (one_for_one with 1
                   and 100 children, one_for_all and rest_for_one with 10)
  raw              the same without a supervisor; instantiate + init alone
  spawn rate       supervised echo agents added per second
  idle agents      that many echo agents at once, each answering a message;
                   resident memory per agent
  calls            round trips per second through the supervisor and
                   straight into the instance
  cold start       loading a component: compiling it, then from the
                   compile cache

A full run takes a few minutes and holds --agents echo agents (100,000 by
default: about 6 GB of memory); --quick takes seconds with smaller counts.
Use a release build on a quiet machine. The Erlang/OTP figures to compare
with come from ../shared/anchors/otp_restart.erl, run beside it.

--json prints one object instead of the table, with the keys
crash_to_ready.{one_for_one,one_for_one_100,one_for_all,rest_for_one}.
{p50_us,p99_us,max_us}, raw_instantiate_init, raw_crash_to_ready,
spawn_rate_per_s, idle_agents.{count,rss_bytes_per_agent},
call_throughput_per_s.{supervised,direct} and cold_start_ms.{compile,cached}.";

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A short run (seconds): fewer iterations, 10,000 idle agents.
    #[arg(long)]
    quick: bool,
    /// How many idle agents to hold at once.
    #[arg(long, value_name = "N")]
    agents: Option<usize>,
    /// How many agents to spawn for the spawn rate.
    #[arg(long, value_name = "N")]
    spawn: Option<usize>,
    /// The component whose cold start to measure (default: the largest bundled example).
    #[arg(long, value_name = "PATH")]
    component: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BenchArgs) -> CliResult {
    let mut options = if args.quick {
        BenchOptions::quick()
    } else {
        BenchOptions::default()
    };
    options.idle_agents = args.agents.unwrap_or(options.idle_agents).max(1);
    options.spawn_agents = args.spawn.unwrap_or(options.spawn_agents).max(1);
    options.cold_start = args.component;
    if cfg!(debug_assertions) {
        stderr_line!("warning: a debug build of agent-host: the figures say little");
    }
    // In a task of the runtime, as agents' callers are: the thread that
    // blocks on the command is not a runtime worker, and every wake-up from
    // it would cross threads.
    let report = tokio::spawn(async move {
        bench::run(&options, &mut |step| stderr_line!("bench: {step}...")).await
    })
    .await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn latency(label: &str, l: &Latency, baseline: &str) {
    println!(
        "{label:<40} {:>10.1} {:>10.1} {:>10.1}   {baseline}",
        l.p50_us, l.p99_us, l.max_us
    );
}

fn crash(label: &str, c: &CrashToReady, raw: &Latency) {
    latency(label, &c.total, &format!("raw {:.1} us", raw.p50_us));
    println!(
        "{:<40} phases (p50): error {:.1} us, restart {:.1} us, next call {:.1} us",
        "", c.trap_to_error_p50_us, c.restart_p50_us, c.next_call_p50_us
    );
}

fn print_table(r: &BenchReport) {
    let c = &r.crash_to_ready;
    println!(
        "{:<40} {:>10} {:>10} {:>10}   baseline",
        format!("latency ({} cores)", r.cores),
        "p50 us",
        "p99 us",
        "max us"
    );
    crash(
        "crash-to-ready one_for_one, 1 child",
        &c.one_for_one,
        &r.raw_crash_to_ready,
    );
    crash(
        "crash-to-ready one_for_one, 100 children",
        &c.one_for_one_100,
        &r.raw_crash_to_ready,
    );
    crash(
        "crash-to-ready one_for_all, 10 children",
        &c.one_for_all,
        &r.raw_crash_to_ready,
    );
    crash(
        "crash-to-ready rest_for_one, 10 children",
        &c.rest_for_one,
        &r.raw_crash_to_ready,
    );
    latency(
        "raw: trap + instantiate + init + start + call",
        &r.raw_crash_to_ready,
        "",
    );
    latency("raw: instantiate + init", &r.raw_instantiate_init, "");
    println!();
    println!("{:<40} {:>10.0} agents/s", "spawn rate", r.spawn_rate_per_s);
    let idle = &r.idle_agents;
    println!(
        "{:<40} {:>10} agents, {} bytes resident each ({:.1} GiB in all; spawned in {:.1} s)",
        "idle agents",
        idle.count,
        idle.rss_bytes_per_agent,
        idle.rss_bytes_total as f64 / f64::from(1u32 << 30),
        idle.spawn_seconds
    );
    let calls = &r.call_throughput_per_s;
    println!(
        "{:<40} {:>10.0} calls/s supervised, {:.0} direct ({:.0}%)",
        "call throughput",
        calls.supervised,
        calls.direct,
        100.0 * calls.supervised / calls.direct.max(1.0)
    );
    let cold = &r.cold_start_ms;
    println!(
        "{:<40} {:>10.1} ms compiled, {:.1} ms cached ({}, {} bytes)",
        "cold start", cold.compile, cold.cached, cold.component, cold.bytes
    );
}
