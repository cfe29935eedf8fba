//! The chaos harness behind `agent-host chaos`: a three-level tree of
//! hundreds of the bundled guest agents under a seeded random storm of
//! faults of every class the guests can produce, while a load of messages
//! runs; then it checks the invariants that supervision promises.
//!
//! The tree: a `one_for_one` root over a few middle supervisors, each over
//! leaf supervisors, each over a handful of agents. Strategies
//! (`one_for_one`, `one_for_all`, `rest_for_one`) and restart types
//! (permanent, transient, temporary) are mixed, drawn from the seed. The
//! agents are the bundled examples (`examples::ALL`): echo, crasher,
//! fuel-burner, memory-hog, sleeper (slow to stop), hostile and moody
//! (health-checked).
//!
//! The schedule: faults of every [`FaultClass`] at random times and
//! targets, drawn from the seed ([`ChaosConfig::seed`]), so that a run can be
//! replayed (the interleaving with the load and the restarts is the
//! scheduler's, not the seed's). Meanwhile callers send `ping` to random
//! agents.
//!
//! The invariants ([`ChaosReport::invariants`]), checked on the tree's
//! events as they come and at the end, once the storm has settled:
//! the host (its root supervisor) is alive; never two incarnations of one
//! child at a time; every restart count follows the history (each restart
//! of a child is the previous one plus one, and its status agrees); no
//! restart lost (every abnormal exit of a permanent or transient child was
//! followed by its restart, unless its supervisor went down first, as OTP
//! says); every permanent child running again, unless an ancestor is
//! legitimately gone (a transient supervisor that escalated, a temporary
//! child); every call answered or failed with a typed error (none hangs,
//! none answered wrongly); no event missed; no instance or task leaked;
//! resident memory growth per 1,000 restarts within a bound.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinSet;

use crate::running::{NodeError, NodeKind, RunningTree, TreeCallError, TreeHandle};
use crate::supervisor::{EventKind, HealthPolicy, SupervisorEvent, SupervisorSpec};
use crate::{
    AgentLimits, AgentSpec, AgentStatus, AgentSupervisor, ExitReason, LoadError, RestartIntensity,
    RestartPolicy, RestartStrategy, RestartType, Runtime, RuntimeConfig, RuntimeError,
    ShutdownPolicy, SupervisionError, SupervisorConfig, SupervisorStatus, WasmAgentFactory,
    examples,
};

/// How a chaos run goes.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The seed of the tree's shape and of the fault schedule.
    pub seed: u64,
    /// How long faults are injected (the settling and the checks come
    /// after).
    pub duration: Duration,
    /// How many agents the tree holds (at least 10).
    pub agents: usize,
    /// Faults injected per second, on average.
    pub faults_per_second: f64,
    /// Callers sending `ping` to random agents all along.
    pub callers: usize,
    /// How long the tree may take to settle after the storm (every
    /// permanent child running again, every restart done).
    pub settle: Duration,
    /// The bound of the resident memory growth per 1,000 restarts after
    /// the warm-up (the first quarter of the run), in bytes.
    pub max_growth_per_1000_restarts: u64,
    /// Restarts after the warm-up below which memory growth is reported
    /// but not judged (too few to tell growth from noise).
    pub min_restarts_to_judge_memory: u64,
    /// The fault classes drawn from (empty: every class), to narrow a
    /// finding down.
    pub classes: Vec<FaultClass>,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            duration: Duration::from_secs(60),
            agents: 300,
            faults_per_second: 50.0,
            callers: 8,
            settle: Duration::from_secs(60),
            max_growth_per_1000_restarts: 1 << 20,
            min_restarts_to_judge_memory: 5_000,
            classes: Vec::new(),
        }
    }
}

/// A chaos run that could not be carried out (as opposed to one that ran
/// and found a violated invariant, which is a [`ChaosReport`]).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The configuration cannot work.
    #[error("invalid chaos configuration: {0}")]
    InvalidConfig(String),
    /// The WASM runtime could not be created.
    #[error("the runtime: {0}")]
    Runtime(#[from] RuntimeError),
    /// A bundled example did not load.
    #[error("a bundled example: {0}")]
    Load(#[from] LoadError),
    /// The tree did not start, or did not stop.
    #[error("the tree: {0}")]
    Tree(#[from] SupervisionError),
}

/// A class of fault the harness injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultClass {
    /// A guest panic (crasher `panic`).
    Panic,
    /// A trap: `unreachable` or an out-of-bounds access (crasher).
    Trap,
    /// Endless recursion (crasher `stack`).
    StackOverflow,
    /// A pure-compute endless loop that runs out of fuel (fuel-burner `burn`).
    FuelExhaustion,
    /// Allocation until the memory limit (memory-hog `grow`).
    MemoryBlowUp,
    /// A busy loop on the clock that runs into the deadline (sleeper `spin`).
    EndlessLoop,
    /// A call blocked in the host past its deadline (sleeper `sleep`).
    DeadlineOverrun,
    /// A reply larger than the supervisor takes, or a huge application
    /// error (hostile `reply`, `error`).
    BadReply,
    /// A message larger than the supervisor takes.
    OversizedMessage,
    /// A message the agent does not understand (control characters, junk).
    MalformedMessage,
    /// A flood of log records (hostile `log-flood`).
    LogFlood,
    /// An agent killed from outside (`report_exit(.., Kill)`).
    KilledAgent,
    /// A nested supervisor killed from outside, its subtree with it.
    KilledSupervisor,
    /// Failing health checks (moody `sick`).
    HealthCheckFailure,
    /// A health check that traps (moody `faint`).
    HealthCheckTrap,
    /// A sibling of a slow-stopping sleeper killed in a group strategy: the
    /// sleeper is stopped, and killed when it overruns its shutdown time.
    SlowStop,
    /// An agent added whose `init` fails (failing-init).
    FailedInit,
    /// The same crashing message again and again, until quarantined.
    PoisonMessage,
}

impl FaultClass {
    /// Every class, in the order of the summary.
    pub const ALL: [FaultClass; 18] = [
        FaultClass::Panic,
        FaultClass::Trap,
        FaultClass::StackOverflow,
        FaultClass::FuelExhaustion,
        FaultClass::MemoryBlowUp,
        FaultClass::EndlessLoop,
        FaultClass::DeadlineOverrun,
        FaultClass::BadReply,
        FaultClass::OversizedMessage,
        FaultClass::MalformedMessage,
        FaultClass::LogFlood,
        FaultClass::KilledAgent,
        FaultClass::KilledSupervisor,
        FaultClass::HealthCheckFailure,
        FaultClass::HealthCheckTrap,
        FaultClass::SlowStop,
        FaultClass::FailedInit,
        FaultClass::PoisonMessage,
    ];

    /// Its name in the summary (`fuel-exhaustion`).
    pub fn name(self) -> &'static str {
        match self {
            FaultClass::Panic => "panic",
            FaultClass::Trap => "trap",
            FaultClass::StackOverflow => "stack-overflow",
            FaultClass::FuelExhaustion => "fuel-exhaustion",
            FaultClass::MemoryBlowUp => "memory-blow-up",
            FaultClass::EndlessLoop => "endless-loop",
            FaultClass::DeadlineOverrun => "deadline-overrun",
            FaultClass::BadReply => "bad-reply",
            FaultClass::OversizedMessage => "oversized-message",
            FaultClass::MalformedMessage => "malformed-message",
            FaultClass::LogFlood => "log-flood",
            FaultClass::KilledAgent => "killed-agent",
            FaultClass::KilledSupervisor => "killed-supervisor",
            FaultClass::HealthCheckFailure => "health-check-failure",
            FaultClass::HealthCheckTrap => "health-check-trap",
            FaultClass::SlowStop => "slow-stop",
            FaultClass::FailedInit => "failed-init",
            FaultClass::PoisonMessage => "poison-message",
        }
    }
}

impl std::str::FromStr for FaultClass {
    type Err = String;

    /// A class by its name (`fuel-exhaustion`).
    fn from_str(name: &str) -> Result<Self, String> {
        FaultClass::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultClass::ALL.iter().map(|c| c.name()).collect();
                format!("`{name}` is not a fault class; one of {}", names.join(", "))
            })
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One invariant and whether it held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invariant {
    /// What it promises.
    pub name: &'static str,
    /// Whether it held (`None`: not judged, with the reason in `detail`).
    pub held: Option<bool>,
    /// Figures, or the first violations found.
    pub detail: String,
}

/// What a chaos run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// The seed (to replay the run).
    pub seed: u64,
    /// How long faults were injected.
    pub storm: Duration,
    /// How long the tree took to settle afterwards.
    pub settled_in: Duration,
    /// Agents in the tree as planned.
    pub agents: usize,
    /// Supervisors in the tree as planned (the root included).
    pub supervisors: usize,
    /// Faults injected, by class.
    pub faults: BTreeMap<FaultClass, u64>,
    /// Outcomes of the injected faults, by class and outcome (`crashed`,
    /// `timeout`, `too_large`, `ok`, ...).
    pub fault_outcomes: BTreeMap<FaultClass, BTreeMap<&'static str, u64>>,
    /// Restarts (`ChildRestarted` events), bystanders included.
    pub restarts: u64,
    /// Restarts of bystanders (`one_for_all`, `rest_for_one`).
    pub bystander_restarts: u64,
    /// Exits of children (`ChildExited` events), by reason class.
    pub exits: BTreeMap<String, u64>,
    /// Children killed because they overran their shutdown time.
    pub killed_on_stop: u64,
    /// Supervisors that gave up (restart intensity exceeded).
    pub escalations: u64,
    /// Messages quarantined as poison.
    pub quarantined: u64,
    /// Load messages sent.
    pub messages_sent: u64,
    /// Load messages answered with the right reply.
    pub messages_answered: u64,
    /// Load messages that failed, by typed error.
    pub messages_errored: BTreeMap<&'static str, u64>,
    /// Resident memory at the start, after the warm-up and at the end of the
    /// storm, in bytes (`None` where it cannot be read).
    pub rss: [Option<u64>; 3],
    /// Restarts by the end of the warm-up.
    pub restarts_at_warmup: u64,
    /// Resident memory growth per 1,000 restarts after the warm-up, in bytes
    /// (negative: it shrank).
    pub growth_per_1000_restarts: Option<f64>,
    /// The same over the last quarter of the storm only: where the growth
    /// is heading (not judged).
    pub growth_last_quarter_per_1000_restarts: Option<f64>,
    /// Every invariant and whether it held.
    pub invariants: Vec<Invariant>,
}

impl ChaosReport {
    /// Whether every judged invariant held.
    pub fn passed(&self) -> bool {
        self.invariants.iter().all(|i| i.held != Some(false))
    }

    /// The invariants that did not hold.
    pub fn violations(&self) -> impl Iterator<Item = &Invariant> {
        self.invariants.iter().filter(|i| i.held == Some(false))
    }

    /// The summary table, for people.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let total: u64 = self.faults.values().sum();
        let _ = writeln!(
            out,
            "chaos run, seed {}: {} agents, {} supervisors, storm {:.0?}, settled in {:.1?}",
            self.seed, self.agents, self.supervisors, self.storm, self.settled_in
        );
        let _ = writeln!(out, "\nfaults injected: {total}");
        for (class, n) in &self.faults {
            let outcomes = self
                .fault_outcomes
                .get(class)
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let _ = writeln!(out, "  {:<22} {n:>8}   ({outcomes})", class.name());
        }
        let exits: u64 = self.exits.values().sum();
        let _ = writeln!(
            out,
            "\nrestarts: {} ({} bystanders); exits: {exits}; escalations: {}; killed on stop: {}; quarantined: {}",
            self.restarts,
            self.bystander_restarts,
            self.escalations,
            self.killed_on_stop,
            self.quarantined
        );
        for (reason, n) in &self.exits {
            let _ = writeln!(out, "  exit {reason:<20} {n:>8}");
        }
        let errored: u64 = self.messages_errored.values().sum();
        let _ = writeln!(
            out,
            "\nmessages: {} sent, {} answered, {errored} typed errors",
            self.messages_sent, self.messages_answered
        );
        for (kind, n) in &self.messages_errored {
            let _ = writeln!(out, "  error {kind:<20} {n:>8}");
        }
        let kib =
            |g: Option<f64>| g.map_or_else(|| "n/a".into(), |g| format!("{:.1} KiB", g / 1024.0));
        let mib = |b: Option<u64>| {
            b.map_or_else(
                || "n/a".into(),
                |b| format!("{:.1} MiB", b as f64 / 1048576.0),
            )
        };
        let _ = writeln!(
            out,
            "\nresident memory: start {}, after warm-up ({} restarts) {}, end {}; growth per 1,000 restarts after warm-up: {}, in the last quarter: {}",
            mib(self.rss[0]),
            self.restarts_at_warmup,
            mib(self.rss[1]),
            mib(self.rss[2]),
            kib(self.growth_per_1000_restarts),
            kib(self.growth_last_quarter_per_1000_restarts)
        );
        let _ = writeln!(out, "\ninvariants:");
        for i in &self.invariants {
            let verdict = match i.held {
                Some(true) => "held",
                Some(false) => "VIOLATED",
                None => "not judged",
            };
            let _ = writeln!(out, "  {verdict:<10} {}: {}", i.name, i.detail);
        }
        let _ = writeln!(
            out,
            "\n{} (seed {})",
            if self.passed() {
                "every invariant held"
            } else {
                "INVARIANTS VIOLATED"
            },
            self.seed
        );
        out
    }
}

/// A progress line during the storm.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Time since the storm began.
    pub elapsed: Duration,
    /// Faults injected so far.
    pub faults: u64,
    /// Restarts so far.
    pub restarts: u64,
    /// Load messages answered so far.
    pub answered: u64,
    /// Load messages failed with a typed error so far.
    pub errored: u64,
    /// Resident memory now, in bytes.
    pub rss: Option<u64>,
    /// Invariant violations seen so far (on the events).
    pub violations: u64,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>5.0?}: {} faults, {} restarts, {} answered, {} errors, rss {}, {} violations",
            self.elapsed,
            self.faults,
            self.restarts,
            self.answered,
            self.errored,
            self.rss.map_or_else(
                || "n/a".into(),
                |b| format!("{:.1} MiB", b as f64 / 1048576.0)
            ),
            self.violations
        )
    }
}

// --- the tree ----------------------------------------------------------------

/// The agent types of the tree, in the order agents are dealt.
const TYPES: [&str; 7] = [
    "echo",
    "crasher",
    "fuel-burner",
    "memory-hog",
    "sleeper",
    "hostile",
    "moody",
];

/// Largest message and reply in the tree (small, so that bad replies and
/// oversized messages are cheap).
const MAX_MESSAGE: usize = 64 << 10;

/// One planned node of the tree.
#[derive(Debug, Clone)]
struct PlannedNode {
    path: String,
    kind: NodeKind,
    restart: RestartType,
    /// For agents, its type; for supervisors, its strategy's name.
    what: &'static str,
    parent: Option<String>,
    /// For crashers: whether the poison quarantine is on.
    poison: bool,
}

/// The tree as planned: its root spec and its nodes.
struct Plan {
    root: AgentSupervisor,
    nodes: Vec<PlannedNode>,
}

fn strategy_of(rng: &mut fastrand::Rng) -> RestartStrategy {
    match rng.u8(0..3) {
        0 => RestartStrategy::OneForOne,
        1 => RestartStrategy::OneForAll,
        _ => RestartStrategy::RestForOne,
    }
}

fn strategy_name(s: RestartStrategy) -> &'static str {
    match s {
        RestartStrategy::OneForOne => "one_for_one",
        RestartStrategy::OneForAll => "one_for_all",
        RestartStrategy::RestForOne => "rest_for_one",
    }
}

fn supervisor_config(strategy: RestartStrategy, intensity: RestartIntensity) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(strategy, intensity),
        agent_timeout: Duration::from_secs(2),
        // Only the moody agents are health-checked (their own policy).
        health_check_interval: Duration::ZERO,
        max_children: 1_000,
        max_message_bytes: MAX_MESSAGE,
        max_history: 1_000,
        max_history_bytes: 256 << 10,
        ..SupervisorConfig::default()
    }
}

fn agent_limits(agent_type: &str) -> AgentLimits {
    AgentLimits {
        // Endless loops on the clock (the sleeper's `spin`) must meet the
        // deadline, not the fuel.
        fuel_per_call: (agent_type != "sleeper").then_some(20_000_000),
        memory_bytes: 4 << 20,
        deadline: Duration::from_millis(250),
        ..AgentLimits::default()
    }
}

fn plan(config: &ChaosConfig, factory: Arc<WasmAgentFactory>) -> Plan {
    let mut rng = fastrand::Rng::with_seed(config.seed ^ 0x7472_6565);
    let per_leaf = 10;
    let leaves = config.agents.div_ceil(per_leaf).max(3);
    let mids = leaves.div_ceil(5).clamp(2, 8);
    let mut nodes = Vec::new();
    let root_name = "root";
    // The root never gives up: it is the host.
    let mut root = AgentSupervisor::new(
        supervisor_config(
            RestartStrategy::OneForOne,
            RestartIntensity::new(u32::MAX, Duration::from_secs(1)),
        ),
        factory.clone(),
    )
    .with_name(root_name);
    let mut mid_specs: Vec<(SupervisorSpec, String)> = (0..mids)
        .map(|m| {
            let strategy = strategy_of(&mut rng);
            let name = format!("mid-{m}");
            let path = format!("{root_name}/{name}");
            nodes.push(PlannedNode {
                path: path.clone(),
                kind: NodeKind::Supervisor,
                restart: RestartType::Permanent,
                what: strategy_name(strategy),
                parent: Some(root_name.into()),
                poison: false,
            });
            let spec = SupervisorSpec::new(
                supervisor_config(strategy, RestartIntensity::new(30, Duration::from_secs(5))),
                factory.clone(),
            )
            .with_name(name)
            .with_restart_type(RestartType::Permanent)
            .with_shutdown(ShutdownPolicy::Infinity);
            (spec, path)
        })
        .collect();
    let mut dealt = 0usize;
    for l in 0..leaves {
        // The first three leaves cover the three strategies; the rest are
        // drawn.
        let strategy = match l {
            0 => RestartStrategy::OneForAll,
            1 => RestartStrategy::RestForOne,
            2 => RestartStrategy::OneForOne,
            _ => strategy_of(&mut rng),
        };
        let restart = if rng.u8(0..4) == 0 {
            RestartType::Transient
        } else {
            RestartType::Permanent
        };
        let mid_path = mid_specs[l % mids].1.clone();
        let name = format!("leaf-{l}");
        let path = format!("{mid_path}/{name}");
        nodes.push(PlannedNode {
            path: path.clone(),
            kind: NodeKind::Supervisor,
            restart,
            what: strategy_name(strategy),
            parent: Some(mid_path),
            poison: false,
        });
        let mut leaf = SupervisorSpec::new(
            // Low enough that storms make some leaves give up.
            supervisor_config(strategy, RestartIntensity::new(8, Duration::from_secs(2))),
            factory.clone(),
        )
        .with_name(name)
        .with_restart_type(restart)
        .with_shutdown(ShutdownPolicy::Infinity);
        // The agents dealt evenly over the leaves.
        let count = config.agents / leaves + usize::from(l < config.agents % leaves);
        for _ in 0..count {
            let agent_type = TYPES[(dealt + l) % TYPES.len()];
            let restart = match rng.u8(0..20) {
                0..12 => RestartType::Permanent,
                12..17 => RestartType::Transient,
                _ => RestartType::Temporary,
            };
            let name = format!("{agent_type}-{dealt}");
            let agent_path = format!("{path}/{name}");
            let poison = agent_type == "crasher" && (dealt / TYPES.len()) % 2 == 1;
            let mut spec = AgentSpec::new(agent_type.into(), json!({}))
                .with_name(name)
                .with_restart_type(restart)
                .with_limits(agent_limits(agent_type))
                .with_shutdown(ShutdownPolicy::Timeout(Duration::from_millis(200)))
                .with_poison_threshold(if poison { 3 } else { 0 });
            match agent_type {
                "sleeper" => {
                    // Slow to stop: killed when it overruns its shutdown time.
                    spec.config = json!({ "stop_delay_ms": 1_000 });
                    spec.shutdown = ShutdownPolicy::Timeout(Duration::from_millis(20));
                }
                "moody" => {
                    spec = spec.with_health(HealthPolicy {
                        interval: Duration::from_millis(100),
                        timeout: Duration::from_millis(200),
                        threshold: 2,
                    });
                }
                _ => {}
            }
            nodes.push(PlannedNode {
                path: agent_path,
                kind: NodeKind::Agent,
                restart,
                what: agent_type,
                parent: Some(path.clone()),
                poison,
            });
            leaf = leaf.with_child(spec);
            dealt += 1;
        }
        let (mid, _) = &mut mid_specs[l % mids];
        mid.children.push(leaf.into());
    }
    for (mid, _) in mid_specs {
        root = root.with_child(mid);
    }
    Plan { root, nodes }
}

// --- the ledger of events ----------------------------------------------------

/// What the events say about one node.
#[derive(Debug, Default, Clone)]
struct NodeState {
    up: bool,
    restart_count: u32,
    /// An abnormal exit whose restart is still due.
    pending_restart: bool,
    /// Removed (temporary), or a transient that exited normally: not coming
    /// back unless its supervisor is restarted.
    gone: bool,
    /// Incarnations that ended: exits, stops, and deaths with an ancestor.
    ends: u64,
}

/// The harness's record of the tree's events, checked as they come.
#[derive(Debug, Default)]
struct Ledger {
    nodes: HashMap<String, NodeState>,
    /// Restart type of each planned node.
    restart_types: HashMap<String, RestartType>,
    restarts: u64,
    bystander_restarts: u64,
    exits: BTreeMap<String, u64>,
    killed_on_stop: u64,
    escalations: u64,
    quarantined: u64,
    events_lost: u64,
    two_incarnations: Vec<String>,
    count_breaks: Vec<String>,
    temporary_restarted: Vec<String>,
    violations: u64,
    /// Events applied so far (to tell when the stream has gone quiet).
    applied: u64,
}

fn exit_class(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Fault(fault) => {
            let text = format!("{fault:?}");
            let name = text.split(['(', ' ']).next().unwrap_or("fault");
            format!("fault:{name}")
        }
        ExitReason::Error(_) => "error".into(),
        ExitReason::Unhealthy(_) => "unhealthy".into(),
        other => other.to_string(),
    }
}

impl Ledger {
    fn note(list: &mut Vec<String>, violations: &mut u64, what: String) {
        *violations += 1;
        if list.len() < 10 {
            list.push(what);
        }
    }

    /// Every node below `path` died with it (or was stopped with it): down,
    /// no restart due (its supervisor starts it afresh, if it comes back).
    fn subtree_down(&mut self, path: &str) {
        let prefix = format!("{path}/");
        for (p, state) in &mut self.nodes {
            if p.starts_with(&prefix) {
                if state.up {
                    state.ends += 1;
                }
                state.up = false;
                state.pending_restart = false;
            }
        }
    }

    fn apply(&mut self, event: &SupervisorEvent) {
        self.applied += 1;
        let path = event.path.clone();
        match &event.kind {
            EventKind::ChildStarted { .. } => {
                let state = self.nodes.entry(path.clone()).or_default();
                if state.up {
                    Self::note(
                        &mut self.two_incarnations,
                        &mut self.violations,
                        format!("{path} started while an incarnation ran"),
                    );
                }
                *state = NodeState {
                    up: true,
                    ends: state.ends,
                    ..NodeState::default()
                };
            }
            EventKind::ChildRestarted {
                restart_count,
                bystander,
                ..
            } => {
                self.restarts += 1;
                if *bystander {
                    self.bystander_restarts += 1;
                }
                if self.restart_types.get(&path) == Some(&RestartType::Temporary) {
                    Self::note(
                        &mut self.temporary_restarted,
                        &mut self.violations,
                        format!("{path} (temporary) was restarted"),
                    );
                }
                let state = self.nodes.entry(path.clone()).or_default();
                if state.up {
                    Self::note(
                        &mut self.two_incarnations,
                        &mut self.violations,
                        format!("{path} restarted while an incarnation ran"),
                    );
                }
                if *restart_count != state.restart_count.saturating_add(1) {
                    Self::note(
                        &mut self.count_breaks,
                        &mut self.violations,
                        format!(
                            "{path}: restart {restart_count} after restart {}",
                            state.restart_count
                        ),
                    );
                }
                state.up = true;
                state.gone = false;
                state.pending_restart = false;
                state.restart_count = *restart_count;
            }
            EventKind::ChildExited { reason, .. } => {
                *self.exits.entry(exit_class(reason)).or_default() += 1;
                let restart = self.restart_types.get(&path).copied();
                let state = self.nodes.entry(path.clone()).or_default();
                state.up = false;
                state.ends += 1;
                if reason.is_abnormal() {
                    state.pending_restart = restart != Some(RestartType::Temporary);
                } else if restart != Some(RestartType::Permanent) {
                    state.gone = true;
                }
                self.subtree_down(&path);
            }
            EventKind::ChildStopped { killed, .. } => {
                if *killed {
                    self.killed_on_stop += 1;
                }
                let state = self.nodes.entry(path.clone()).or_default();
                if state.up {
                    state.ends += 1;
                }
                state.up = false;
                self.subtree_down(&path);
            }
            EventKind::ChildRemoved { .. } => {
                let state = self.nodes.entry(path.clone()).or_default();
                state.up = false;
                state.gone = true;
                state.pending_restart = false;
                self.subtree_down(&path);
            }
            EventKind::Escalated => {
                self.escalations += 1;
                self.subtree_down(&path);
            }
            EventKind::SupervisorStopped => self.subtree_down(&path),
            EventKind::MessageQuarantined { .. } => self.quarantined += 1,
            EventKind::CircuitOpened { .. }
            | EventKind::CircuitHalfOpen { .. }
            | EventKind::CircuitClosed { .. } => {}
        }
    }

    /// Whether `path` or one of its ancestors is legitimately gone.
    fn gone(&self, path: &str) -> bool {
        let mut at = path;
        loop {
            if self.nodes.get(at).is_some_and(|s| s.gone) {
                return true;
            }
            match at.rfind('/') {
                Some(i) => at = &at[..i],
                None => return false,
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn follow(mut events: broadcast::Receiver<SupervisorEvent>, ledger: Arc<Mutex<Ledger>>) {
    loop {
        match events.recv().await {
            Ok(event) => lock(&ledger).apply(&event),
            Err(broadcast::error::RecvError::Lagged(n)) => lock(&ledger).events_lost += n,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

// --- calls and their outcomes ------------------------------------------------

/// How long a call may take before it counts as lost: far beyond every
/// timeout in the tree.
const LOST_AFTER: Duration = Duration::from_secs(60);

fn call_outcome(result: &Result<String, TreeCallError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(TreeCallError::NotFound(_)) => "not_found",
        Err(TreeCallError::NotAnAgent { .. }) => "not_an_agent",
        Err(TreeCallError::NotRunning { .. }) => "not_running",
        Err(TreeCallError::Crashed { .. }) => "crashed",
        Err(TreeCallError::Application { .. }) => "app_error",
        Err(TreeCallError::Timeout { .. }) => "timeout",
        Err(TreeCallError::TooLarge { .. }) => "too_large",
        Err(TreeCallError::CircuitOpen { .. }) => "circuit_open",
        Err(TreeCallError::Quarantined { .. }) => "quarantined",
        Err(TreeCallError::SupervisorGaveUp { .. }) => "supervisor_gave_up",
        Err(TreeCallError::Other { .. }) => "other",
    }
}

fn node_outcome(result: &Result<(), NodeError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(NodeError::NotFound(_)) => "not_found",
        Err(NodeError::NotASupervisor { .. }) => "not_a_supervisor",
        Err(NodeError::Refused { .. }) => "refused",
    }
}

/// What the load and the faults saw.
#[derive(Debug, Default)]
struct Calls {
    sent: AtomicU64,
    answered: AtomicU64,
    errored: Mutex<BTreeMap<&'static str, u64>>,
    wrong: Mutex<Vec<String>>,
    lost: Mutex<Vec<String>>,
    faults: Mutex<BTreeMap<FaultClass, u64>>,
    fault_outcomes: Mutex<BTreeMap<FaultClass, BTreeMap<&'static str, u64>>>,
    /// Calls answered `Crashed`, by agent path.
    crashed: Mutex<HashMap<String, u64>>,
    /// Failed-init agents added by mistake (their start should fail).
    added: Mutex<Vec<String>>,
}

impl Calls {
    fn errored_total(&self) -> u64 {
        lock(&self.errored).values().sum()
    }
}

async fn guarded<T>(
    calls: &Calls,
    what: String,
    call: impl std::future::Future<Output = T>,
) -> Option<T> {
    match tokio::time::timeout(LOST_AFTER, call).await {
        Ok(result) => Some(result),
        Err(_) => {
            lock(&calls.lost).push(what);
            None
        }
    }
}

fn expected_reply(agent_type: &str) -> &'static str {
    if agent_type == "echo" {
        "echo: ping"
    } else {
        "pong"
    }
}

async fn load(
    tree: TreeHandle,
    agents: Arc<Vec<PlannedNode>>,
    calls: Arc<Calls>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::Relaxed) {
        let Some(agent) = agents.get(rng.usize(..agents.len())) else {
            return;
        };
        calls.sent.fetch_add(1, Ordering::Relaxed);
        let what = format!("ping to {}", agent.path);
        let Some(result) = guarded(&calls, what, tree.call(&agent.path, "ping".into())).await
        else {
            continue;
        };
        match &result {
            Ok(reply) if reply == expected_reply(agent.what) => {
                calls.answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) => {
                let mut wrong = lock(&calls.wrong);
                if wrong.len() < 10 {
                    wrong.push(format!("{}: {reply:?} to ping", agent.path));
                }
            }
            Err(_) => {
                *lock(&calls.errored)
                    .entry(call_outcome(&result))
                    .or_default() += 1
            }
        }
        // Not a hot loop when every agent fails at once.
        if result.is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

// --- faults ------------------------------------------------------------------

/// One scheduled fault: its class, its target and what to send.
#[derive(Debug, Clone)]
enum Action {
    Call(String, String),
    Kill(String),
    Add(String, usize),
}

fn pick<'a>(
    rng: &mut fastrand::Rng,
    nodes: &'a [PlannedNode],
    test: impl Fn(&PlannedNode) -> bool,
) -> Option<&'a PlannedNode> {
    let candidates: Vec<&PlannedNode> = nodes.iter().filter(|n| test(n)).collect();
    (!candidates.is_empty()).then(|| candidates[rng.usize(..candidates.len())])
}

fn schedule(
    rng: &mut fastrand::Rng,
    nodes: &[PlannedNode],
    classes: &[FaultClass],
    serial: usize,
) -> (FaultClass, Option<Action>) {
    let class = classes[rng.usize(..classes.len())];
    let agent = |rng: &mut fastrand::Rng, t: &str, poison: bool| {
        pick(rng, nodes, |n| {
            n.kind == NodeKind::Agent && n.what == t && n.poison == poison
        })
        .map(|n| n.path.clone())
    };
    let call = |target: Option<String>, message: String| target.map(|t| Action::Call(t, message));
    let action = match class {
        FaultClass::Panic => call(agent(rng, "crasher", false), "panic".into()),
        FaultClass::Trap => {
            let message = if rng.bool() { "unreachable" } else { "oob" };
            call(agent(rng, "crasher", false), message.into())
        }
        FaultClass::StackOverflow => call(agent(rng, "crasher", false), "stack".into()),
        FaultClass::FuelExhaustion => call(agent(rng, "fuel-burner", false), "burn".into()),
        FaultClass::MemoryBlowUp => call(agent(rng, "memory-hog", false), "grow".into()),
        FaultClass::EndlessLoop => call(agent(rng, "sleeper", false), "spin 600000".into()),
        FaultClass::DeadlineOverrun => call(agent(rng, "sleeper", false), "sleep 600000".into()),
        FaultClass::BadReply => {
            let message = if rng.bool() {
                "reply 100000"
            } else {
                "error 100000"
            };
            call(agent(rng, "hostile", false), message.into())
        }
        FaultClass::OversizedMessage => call(
            pick(rng, nodes, |n| n.kind == NodeKind::Agent).map(|n| n.path.clone()),
            "x".repeat(MAX_MESSAGE + 1),
        ),
        FaultClass::MalformedMessage => call(
            pick(rng, nodes, |n| n.kind == NodeKind::Agent).map(|n| n.path.clone()),
            format!("\u{0}\u{7f}{{\"junk\": {}}}\u{fffd}", rng.u32(..)),
        ),
        FaultClass::LogFlood => call(agent(rng, "hostile", false), "log-flood 500".into()),
        FaultClass::KilledAgent => {
            pick(rng, nodes, |n| n.kind == NodeKind::Agent).map(|n| Action::Kill(n.path.clone()))
        }
        FaultClass::KilledSupervisor => pick(rng, nodes, |n| {
            n.kind == NodeKind::Supervisor && n.parent.is_some()
        })
        .map(|n| Action::Kill(n.path.clone())),
        FaultClass::HealthCheckFailure => call(agent(rng, "moody", false), "sick".into()),
        FaultClass::HealthCheckTrap => call(agent(rng, "moody", false), "faint".into()),
        FaultClass::SlowStop => {
            // A sibling before a sleeper in a group strategy: the sleeper is
            // stopped with it.
            let group = |n: &PlannedNode| {
                nodes.iter().any(|p| {
                    Some(&p.path) == n.parent.as_ref()
                        && (p.what == "one_for_all" || p.what == "rest_for_one")
                })
            };
            pick(rng, nodes, |n| n.what == "sleeper" && group(n)).and_then(|sleeper| {
                pick(rng, nodes, |n| {
                    n.parent == sleeper.parent && n.kind == NodeKind::Agent && n.path < sleeper.path
                })
                .or(Some(sleeper))
                .map(|n| Action::Kill(n.path.clone()))
            })
        }
        FaultClass::FailedInit => pick(rng, nodes, |n| {
            n.kind == NodeKind::Supervisor && n.parent.as_ref().is_some_and(|p| p != "root")
        })
        .map(|n| Action::Add(n.path.clone(), serial)),
        FaultClass::PoisonMessage => call(agent(rng, "crasher", true), "div0".into()),
    };
    (class, action)
}

async fn inject(tree: TreeHandle, calls: Arc<Calls>, class: FaultClass, action: Action) {
    let outcome = match action {
        Action::Call(target, message) => {
            let what = format!("{class} to {target}");
            match guarded(&calls, what, tree.call(&target, message)).await {
                Some(result) => {
                    if matches!(result, Err(TreeCallError::Crashed { .. })) {
                        *lock(&calls.crashed).entry(target).or_default() += 1;
                    }
                    call_outcome(&result)
                }
                None => "lost",
            }
        }
        Action::Kill(target) => {
            let what = format!("{class}: kill {target}");
            match guarded(&calls, what, tree.report_exit(&target, ExitReason::Kill)).await {
                Some(result) => node_outcome(&result),
                None => "lost",
            }
        }
        Action::Add(parent, serial) => {
            let spec = AgentSpec::new("failing-init".into(), json!({ "succeed": false }))
                .with_name(format!("failed-init-{serial}"))
                .with_restart_type(RestartType::Temporary)
                .with_limits(agent_limits("failing-init"));
            let what = format!("{class}: add to {parent}");
            match guarded(&calls, what, tree.add_child(&parent, spec)).await {
                Some(Ok(path)) => {
                    lock(&calls.added).push(path);
                    "ok"
                }
                Some(Err(e)) => node_outcome(&Err(e)),
                None => "lost",
            }
        }
    };
    *lock(&calls.fault_outcomes)
        .entry(class)
        .or_default()
        .entry(outcome)
        .or_default() += 1;
}

// --- measurements ------------------------------------------------------------

/// This process's resident memory, in bytes (Linux; `None` elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

fn invariant(name: &'static str, problems: &[String], ok_detail: String) -> Invariant {
    if problems.is_empty() {
        Invariant {
            name,
            held: Some(true),
            detail: ok_detail,
        }
    } else {
        let mut detail = problems
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if problems.len() > 5 {
            let _ = write!(detail, "; and {} more", problems.len() - 5);
        }
        Invariant {
            name,
            held: Some(false),
            detail,
        }
    }
}

/// Poll `check` every 50 ms until it returns `true` or `within` passes.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The planned nodes that should be running once the storm has settled,
/// and those of them that are not (with their status).
fn not_running(tree: &TreeHandle, nodes: &[PlannedNode], ledger: &Ledger) -> Vec<String> {
    let status: HashMap<String, AgentStatus> = tree
        .status()
        .into_iter()
        .map(|n| (n.path, n.status))
        .collect();
    nodes
        .iter()
        .filter(|n| n.restart != RestartType::Temporary && !ledger.gone(&n.path))
        .filter_map(|n| match status.get(&n.path) {
            Some(AgentStatus::Running) => None,
            Some(other) => Some(format!(
                "{} ({}) is {other:?}",
                n.path,
                restart_name(n.restart)
            )),
            None => Some(format!(
                "{} ({}) is absent",
                n.path,
                restart_name(n.restart)
            )),
        })
        .collect()
}

fn restart_name(r: RestartType) -> &'static str {
    match r {
        RestartType::Permanent => "permanent",
        RestartType::Transient => "transient",
        RestartType::Temporary => "temporary",
    }
}

/// Run a chaos storm as `config` says and check the invariants;
/// `progress` is called every `progress_every` during the storm.
///
/// # Errors
///
/// [`ChaosError`] when the run cannot be carried out (a bad
/// configuration, the runtime, the examples, the tree's start); a run that
/// finds a violated invariant returns its report
/// ([`ChaosReport::passed`] is then `false`).
pub async fn run(
    config: &ChaosConfig,
    progress_every: Duration,
    mut progress: impl FnMut(&Progress),
) -> Result<ChaosReport, ChaosError> {
    if config.agents < 10 || config.agents > 10_000 {
        return Err(ChaosError::InvalidConfig(format!(
            "agents must be between 10 and 10,000, got {}",
            config.agents
        )));
    }
    if !(config.faults_per_second.is_finite() && config.faults_per_second > 0.0) {
        return Err(ChaosError::InvalidConfig(format!(
            "faults per second must be a positive number, got {}",
            config.faults_per_second
        )));
    }
    if config.callers == 0 || config.callers > 1_000 {
        return Err(ChaosError::InvalidConfig(format!(
            "callers must be between 1 and 1,000, got {}",
            config.callers
        )));
    }
    let tasks_before = alive_tasks();
    let rss_start = resident_bytes();
    let runtime = Runtime::with_config(RuntimeConfig {
        // Room for every agent twice (an agent is created ahead of its
        // restart), and the failed inits.
        max_instances: u32::try_from(config.agents * 2 + 64).unwrap_or(u32::MAX),
        ..RuntimeConfig::default()
    })?;
    let mut factory = WasmAgentFactory::new(runtime.clone());
    for (name, bytes) in examples::ALL {
        if TYPES.contains(name) || *name == "failing-init" {
            factory = factory.with_component(*name, runtime.load_bytes(name, bytes)?);
        }
    }
    let factory = Arc::new(factory);
    let Plan { root, nodes } = plan(config, factory);
    let ledger = Arc::new(Mutex::new(Ledger {
        restart_types: nodes.iter().map(|n| (n.path.clone(), n.restart)).collect(),
        ..Ledger::default()
    }));
    let follower = tokio::spawn(follow(root.subscribe(), ledger.clone()));
    let mut tree = RunningTree::start(root).await?;
    let handle = tree.handle();
    let agents: Arc<Vec<PlannedNode>> = Arc::new(
        nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Agent)
            .cloned()
            .collect(),
    );
    let supervisors = nodes.len() - agents.len() + 1;

    // The storm.
    let calls = Arc::new(Calls::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = JoinSet::new();
    for i in 0..config.callers {
        callers.spawn(load(
            handle.clone(),
            agents.clone(),
            calls.clone(),
            stop.clone(),
            config.seed.wrapping_add(1 + i as u64),
        ));
    }
    let injector = {
        let (handle, calls, stop, nodes) =
            (handle.clone(), calls.clone(), stop.clone(), nodes.clone());
        let (seed, rate) = (config.seed, config.faults_per_second);
        let classes = if config.classes.is_empty() {
            FaultClass::ALL.to_vec()
        } else {
            config.classes.clone()
        };
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let in_flight = Arc::new(Semaphore::new(64));
            let mut faults = JoinSet::new();
            let mut serial = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // Uniform gaps around the mean of 1 / rate.
                let gap = Duration::from_secs_f64(rng.f64() * 2.0 / rate);
                tokio::time::sleep(gap).await;
                let (class, action) = schedule(&mut rng, &nodes, &classes, serial);
                serial += 1;
                let Some(action) = action else { continue };
                *lock(&calls.faults).entry(class).or_default() += 1;
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let (handle, calls) = (handle.clone(), calls.clone());
                faults.spawn(async move {
                    inject(handle, calls, class, action).await;
                    drop(permit);
                });
                while faults.try_join_next().is_some() {}
            }
            while faults.join_next().await.is_some() {}
        })
    };
    let started = Instant::now();
    let warmup = config.duration / 4;
    let mut warm: Option<(Option<u64>, u64)> = None;
    let mut last_quarter: Option<(Option<u64>, u64)> = None;
    let mut next_progress = started + progress_every;
    while started.elapsed() < config.duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let restarts = lock(&ledger).restarts;
        if warm.is_none() && started.elapsed() >= warmup {
            warm = Some((resident_bytes(), restarts));
        }
        if last_quarter.is_none() && started.elapsed() >= config.duration - warmup {
            last_quarter = Some((resident_bytes(), restarts));
        }
        if Instant::now() >= next_progress {
            next_progress += progress_every;
            let (violations, restarts) = {
                let l = lock(&ledger);
                (l.violations, l.restarts)
            };
            progress(&Progress {
                elapsed: started.elapsed(),
                faults: lock(&calls.faults).values().sum(),
                restarts,
                answered: calls.answered.load(Ordering::Relaxed),
                errored: calls.errored_total(),
                rss: resident_bytes(),
                violations,
            });
        }
    }
    let storm = started.elapsed();
    let rss_end = resident_bytes();
    let restarts_end = lock(&ledger).restarts;
    stop.store(true, Ordering::Relaxed);
    let _ = injector.await;
    while callers.join_next().await.is_some() {}

    // Settle: every child that should run runs, no restart is due.
    let settle_start = Instant::now();
    // Settled also means quiet: no event since the last look, and the
    // events seen agree with the restart counts the status shows (a supervisor
    // updates its status just before it emits the event, so a look between
    // the two is not a verdict).
    let mut applied_before = None;
    let settled = eventually(config.settle, || {
        let l = lock(&ledger);
        let quiet = applied_before.replace(l.applied) == Some(l.applied);
        quiet
            && not_running(&handle, &nodes, &l).is_empty()
            && !l.nodes.iter().any(|(p, s)| s.pending_restart && !l.gone(p))
            && handle.status().iter().all(|node| {
                node.status != AgentStatus::Running
                    || l.nodes
                        .get(&node.path)
                        .is_none_or(|state| state.restart_count == node.restart_count)
            })
    })
    .await;
    let settled_in = settle_start.elapsed();

    // The checks on the settled tree.
    let mut invariants = Vec::new();
    let root_status = handle.supervisor_status();
    invariants.push(invariant(
        "host alive (the root supervisor runs)",
        &if root_status == SupervisorStatus::Running {
            Vec::new()
        } else {
            vec![format!("the root is {root_status:?}")]
        },
        "the root runs".into(),
    ));
    let status = handle.status();
    let running_agents = status
        .iter()
        .filter(|n| n.kind == NodeKind::Agent && n.status == AgentStatus::Running)
        .count();
    {
        let l = lock(&ledger);
        invariant_list(
            &mut invariants,
            &l,
            &handle,
            &nodes,
            &status,
            &calls,
            settled,
        );
    }
    // No instance leaked: as many live instances as running agents.
    let mut live = runtime.live_instances();
    let instances_ok = eventually(Duration::from_secs(10), || {
        let running = handle
            .status()
            .iter()
            .filter(|n| n.kind == NodeKind::Agent && n.status == AgentStatus::Running)
            .count();
        live = runtime.live_instances();
        live == running
    })
    .await;
    invariants.push(invariant(
        "no instance leaked (live instances = running agents)",
        &if instances_ok {
            Vec::new()
        } else {
            vec![format!(
                "{live} live instances, {running_agents} running agents"
            )]
        },
        format!("{live} live instances, {running_agents} running agents"),
    ));

    // Stop the tree: nothing of it may remain.
    tree.stop().await?;
    let stopped_clean = eventually(Duration::from_secs(10), || runtime.live_instances() == 0).await;
    follower.abort();
    let _ = follower.await;
    let mut tasks_after = alive_tasks();
    let tasks_ok = eventually(Duration::from_secs(10), || {
        tasks_after = alive_tasks();
        tasks_after <= tasks_before
    })
    .await;
    let mut leaks = Vec::new();
    if !stopped_clean {
        leaks.push(format!(
            "{} instances alive after the tree stopped",
            runtime.live_instances()
        ));
    }
    if !tasks_ok {
        leaks.push(format!(
            "{tasks_after} tasks alive after the tree stopped, {tasks_before} before it started"
        ));
    }
    invariants.push(invariant(
        "no task or instance leaked after stop",
        &leaks,
        format!("{tasks_after} tasks alive after stop ({tasks_before} before start), 0 instances"),
    ));

    // Memory.
    let (rss_warm, restarts_at_warmup) = warm.unwrap_or((rss_end, restarts_end));
    let since = restarts_end.saturating_sub(restarts_at_warmup);
    let growth = match (rss_warm, rss_end) {
        (Some(a), Some(b)) if since > 0 => Some((b as f64 - a as f64) * 1000.0 / since as f64),
        _ => None,
    };
    invariants.push(match growth {
        Some(g) if since >= config.min_restarts_to_judge_memory => {
            let bound = config.max_growth_per_1000_restarts as f64;
            Invariant {
                name: "memory bounded (growth per 1,000 restarts after warm-up)",
                held: Some(g <= bound),
                detail: format!(
                    "{:.1} KiB per 1,000 restarts over {since} restarts (bound {:.0} KiB)",
                    g / 1024.0,
                    bound / 1024.0
                ),
            }
        }
        _ => Invariant {
            name: "memory bounded (growth per 1,000 restarts after warm-up)",
            held: None,
            detail: format!(
                "{since} restarts after warm-up, fewer than the {} needed to judge",
                config.min_restarts_to_judge_memory
            ),
        },
    });

    let l = lock(&ledger);
    let report = ChaosReport {
        seed: config.seed,
        storm,
        settled_in,
        agents: agents.len(),
        supervisors,
        faults: lock(&calls.faults).clone(),
        fault_outcomes: lock(&calls.fault_outcomes).clone(),
        restarts: l.restarts,
        bystander_restarts: l.bystander_restarts,
        exits: l.exits.clone(),
        killed_on_stop: l.killed_on_stop,
        escalations: l.escalations,
        quarantined: l.quarantined,
        messages_sent: calls.sent.load(Ordering::Relaxed),
        messages_answered: calls.answered.load(Ordering::Relaxed),
        messages_errored: lock(&calls.errored).clone(),
        rss: [rss_start, rss_warm, rss_end],
        restarts_at_warmup,
        growth_per_1000_restarts: growth,
        growth_last_quarter_per_1000_restarts: match last_quarter {
            Some((Some(a), r)) if restarts_end > r => {
                rss_end.map(|b| (b as f64 - a as f64) * 1000.0 / (restarts_end - r) as f64)
            }
            _ => None,
        },
        invariants,
    };
    Ok(report)
}

/// The invariants judged on the events and the settled tree.
fn invariant_list(
    invariants: &mut Vec<Invariant>,
    l: &Ledger,
    tree: &TreeHandle,
    nodes: &[PlannedNode],
    status: &[crate::NodeStatus],
    calls: &Calls,
    settled: bool,
) {
    invariants.push(invariant(
        "never two incarnations of one child",
        &l.two_incarnations,
        format!("{} starts and restarts checked", l.restarts),
    ));
    let mut counts = l.count_breaks.clone();
    counts.extend(l.temporary_restarted.iter().cloned());
    for node in status {
        if node.status != AgentStatus::Running {
            continue;
        }
        if let Some(state) = l.nodes.get(&node.path)
            && state.restart_count != node.restart_count
        {
            counts.push(format!(
                "{}: status says {} restarts, the events {}",
                node.path, node.restart_count, state.restart_count
            ));
        }
    }
    let crashed = lock(&calls.crashed);
    for (path, n) in crashed.iter() {
        let ends = l.nodes.get(path).map_or(0, |s| s.ends);
        if *n > ends {
            counts.push(format!(
                "{path}: {n} calls answered `crashed`, {ends} incarnations ended"
            ));
        }
    }
    invariants.push(invariant(
        "restart counts follow the history (no restart duplicated, none of a temporary child)",
        &counts,
        format!(
            "{} restarts, each the previous count plus one; {} crashed calls matched by ended incarnations",
            l.restarts,
            crashed.values().sum::<u64>()
        ),
    ));
    let lost: Vec<String> = l
        .nodes
        .iter()
        .filter(|(p, s)| s.pending_restart && !l.gone(p))
        .map(|(p, _)| format!("{p} exited abnormally and was not restarted"))
        .collect();
    invariants.push(invariant(
        "no restart lost (every abnormal exit restarted, or its supervisor went down)",
        &lost,
        "none due".into(),
    ));
    let mut down = not_running(tree, nodes, l);
    if !settled && down.is_empty() {
        down.push("the tree did not settle within the time given".into());
    }
    let excused = nodes.iter().filter(|n| l.gone(&n.path)).count();
    invariants.push(invariant(
        "every permanent child running again after the storm (unless an ancestor is gone as OTP says)",
        &down,
        format!("{excused} planned nodes legitimately gone (temporary, transient ended normally, or below an escalated transient supervisor)"),
    ));
    let mut calls_problems = lock(&calls.lost).clone();
    calls_problems.extend(lock(&calls.wrong).iter().cloned());
    invariants.push(invariant(
        "every call answered or failed with a typed error (none lost, none answered wrongly)",
        &calls_problems,
        format!(
            "{} load messages and {} faults, each answered",
            calls.sent.load(Ordering::Relaxed),
            lock(&calls.faults).values().sum::<u64>()
        ),
    ));
    let added = lock(&calls.added);
    invariants.push(invariant(
        "an agent whose init fails is refused",
        &added
            .iter()
            .map(|p| format!("{p} was added"))
            .collect::<Vec<_>>(),
        "every failed init refused with a typed error".into(),
    ));
    invariants.push(invariant(
        "every event observed",
        &if l.events_lost > 0 {
            vec![format!(
                "{} events missed (the checks are incomplete)",
                l.events_lost
            )]
        } else {
            Vec::new()
        },
        "none missed".into(),
    ));
}
