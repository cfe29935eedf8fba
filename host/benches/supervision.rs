//! `cargo bench -p terraphim_agent_supervisor --bench supervision`
//!
//! The figures of `agent-host bench` (see `terraphim_agent_supervisor::bench`),
//! printed as one JSON object. `BENCH_QUICK=1` for the short run.

use terraphim_agent_supervisor::bench::{self, BenchOptions};

/// The allocator `agent-host bench` runs with, for the same figures.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let options = if std::env::var_os("BENCH_QUICK").is_some() {
        BenchOptions::quick()
    } else {
        BenchOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The measured code runs in a spawned task, as agents' callers do: the
    // block_on thread is not a runtime worker.
    let report = rt
        .block_on(async move {
            tokio::spawn(async move {
                bench::run(&options, &mut |step| eprintln!("bench: {step}...")).await
            })
            .await
        })
        .expect("benchmark task")
        .expect("benchmark");
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report serialises")
    );
}
