//! A short chaos run with a fixed seed: about a hundred agents in a
//! three-level tree under faults of every class for a few seconds, then
//! every invariant of `agent-host chaos` must hold. (The long run is the
//! README's `agent-host chaos` command.)

use std::time::Duration;

use terraphim_agent_supervisor::chaos::{self, ChaosConfig, FaultClass};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_fixed_seed_storm_keeps_every_invariant() {
    let config = ChaosConfig {
        seed: 14,
        duration: Duration::from_secs(6),
        agents: 100,
        faults_per_second: 40.0,
        callers: 4,
        settle: Duration::from_secs(120),
        ..ChaosConfig::default()
    };
    let report = chaos::run(&config, Duration::from_secs(3600), |_| {})
        .await
        .expect("the chaos run is carried out");
    let summary = report.summary();
    // Written past the output capture, so that a failure shows the figures.
    eprintln!("{summary}");
    assert!(report.passed(), "{summary}");
    assert_eq!(report.agents, 100);
    // The storm happened: faults were injected, agents crashed and were
    // restarted, messages were answered.
    let faults: u64 = report.faults.values().sum();
    assert!(faults > 0, "{summary}");
    assert!(report.restarts > 0, "{summary}");
    assert!(report.messages_answered > 0, "{summary}");
    // The schedule is the seed's: the same seed draws the same classes.
    assert!(
        report.faults.keys().all(|c| FaultClass::ALL.contains(c)),
        "{summary}"
    );
}
