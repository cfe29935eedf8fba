//! `agent-host chaos`: a seeded storm of faults over a three-level tree of
//! the bundled example agents, then the supervision invariants checked (the
//! engine is the library's `chaos` module).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use terraphim_agent_supervisor::chaos::{self, ChaosConfig, FaultClass};

use crate::output::stderr_line;
use crate::{CliResult, EXIT_FAILURE};

pub const LONG_ABOUT: &str = "\
Run a chaos storm and check that supervision keeps its promises.

A three-level tree (a root, middle and leaf supervisors with mixed
strategies and restart types) of --agents bundled example agents takes, for
--duration, faults of every class the guests can produce (panics, traps,
stack overflows, fuel exhaustion, memory blow-ups, endless loops and calls
blocked past their deadline, bad replies, oversized and malformed messages,
log floods, killed agents and nested supervisors, failing and trapping
health checks, slow stops, failed inits, poison messages) at random times
and targets drawn from --seed, while callers send messages to random
agents. Then the storm stops, the tree settles, and the invariants are
checked: the host is alive; never two incarnations of one child; restart
counts follow the history; no restart lost; every permanent child running
again (unless its supervisor escalated as OTP says); every call answered or
failed with a typed error; no event missed; no instance or task leaked;
resident memory growth per 1,000 restarts within --max-growth-kib.

The seed is printed first: the same seed replays the same tree and the same
schedule of faults (the interleaving is the scheduler's). Exit status 1 if
an invariant was violated (the seed is printed again with the summary).

Durations: 600s, 10m, 1h, 500ms, or seconds.";

#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// The seed of the tree and of the fault schedule (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected.
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Agents in the tree (10 to 10,000).
    #[arg(long, value_name = "N", default_value_t = 300)]
    agents: usize,
    /// Faults injected per second, on average.
    #[arg(long, value_name = "N", default_value_t = 50.0)]
    faults_per_second: f64,
    /// Concurrent callers sending messages to random agents.
    #[arg(long, value_name = "N", default_value_t = 8)]
    callers: usize,
    /// How long the tree may take to settle after the storm.
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    settle: Duration,
    /// Largest resident memory growth per 1,000 restarts after the warm-up, in KiB.
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    max_growth_kib: u64,
    /// A progress line on stderr this often.
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = parse_duration)]
    progress: Duration,
    /// Only these fault classes (comma-separated names, as in the summary), to narrow a finding down.
    #[arg(long, value_name = "CLASS,...", value_delimiter = ',')]
    only: Vec<FaultClass>,
    /// Print the report as one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// `600s`, `10m`, `1h`, `500ms`, or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a time: write 600s, 10m, 1h or 500ms"))?;
    let per = match unit {
        "" | "s" => 1_000,
        "ms" => 1,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{unit}` is not a unit of time: use ms, s, m or h")),
    };
    n.checked_mul(per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
}

pub async fn run(args: ChaosArgs) -> CliResult {
    let config = ChaosConfig {
        seed: args.seed.unwrap_or_else(|| fastrand::u64(..)),
        duration: args.duration,
        agents: args.agents,
        faults_per_second: args.faults_per_second,
        callers: args.callers,
        settle: args.settle,
        max_growth_per_1000_restarts: args.max_growth_kib.saturating_mul(1024),
        classes: args.only,
        ..ChaosConfig::default()
    };
    stderr_line!(
        "chaos: seed {} ({} agents, {:?}, {} faults/s; replay with --seed {})",
        config.seed,
        config.agents,
        config.duration,
        config.faults_per_second,
        config.seed
    );
    if cfg!(debug_assertions) {
        stderr_line!("warning: a debug build of agent-host: use --release for long runs");
    }
    let every = args.progress.max(Duration::from_secs(1));
    // In a task of the runtime, as agents' callers are.
    let report =
        tokio::spawn(
            async move { chaos::run(&config, every, |p| stderr_line!("chaos: {p}")).await },
        )
        .await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.summary());
    }
    if report.passed() {
        Ok(ExitCode::SUCCESS)
    } else {
        stderr_line!(
            "error: {} invariants violated; replay with --seed {}",
            report.violations().count(),
            report.seed
        );
        Ok(ExitCode::from(EXIT_FAILURE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("600s"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration(&format!("{}h", u64::MAX)).is_err());
    }
}
