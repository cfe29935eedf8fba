//! Watching a running tree, as Erlang's `observer` does: Prometheus metrics
//! and JSON snapshots of every node, fed by the tree's events
//! ([`TreeHandle::subscribe`]), its published status ([`TreeHandle::status`])
//! and the meters its supervisors keep per agent (calls, latency, fuel,
//! memory, state; see [`crate::supervisor::meter`]).
//!
//! An [`Observer`] is cheap to clone. Creating one spawns one task that
//! counts the tree's exits and restarts by fault class and keeps the last
//! [`RECENT_EVENTS`] events; everything else is read when asked for (a
//! scrape walks the tree's published snapshots, nothing is copied in
//! between). With the `http` feature, [`http`] serves it all.
//!
//! ```
//! # use std::sync::Arc;
//! # use serde_json::json;
//! # use terraphim_agent_supervisor::{
//! #     AgentSpec, AgentSupervisor, RunningTree, SupervisorConfig, TestAgentFactory,
//! # };
//! use terraphim_agent_supervisor::observe::Observer;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = AgentSupervisor::new(SupervisorConfig::default(), Arc::new(TestAgentFactory))
//!     .with_child(AgentSpec::new("test".into(), json!({})).with_name("echo".into()));
//! let events = root.subscribe(); // before the start: nothing is missed
//! let mut tree = RunningTree::start(root).await?;
//! let observer = Observer::new(tree.handle(), events);
//!
//! tree.call("echo", "hi".into()).await?;
//! let text = observer.metrics_text()?;
//! assert!(text.contains(r#"agent_host_calls_total{path="root/echo",outcome="ok"} 1"#));
//! tree.stop().await?;
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "http")]
pub mod http;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::task::AbortOnDropHandle;

use crate::supervisor::meter::{CallOutcome, LATENCY_BUCKETS};
use crate::{
    AgentFault, AgentMetrics, AgentPid, CrashReport, EventKind, ExitReason, NodeKind, NodeStatus,
    RestartAction, RestartEntry, RestartStrategy, Runtime, SupervisorEvent, SupervisorHandle,
    SupervisorStatus, TreeHandle,
};

/// How many of the tree's last events an observer keeps.
pub const RECENT_EVENTS: usize = 256;

/// The `Content-Type` of [`Observer::metrics_text`]: the Prometheus text
/// format, version 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The class of an exit reason, as the metrics label it: `normal`,
/// `shutdown`, `kill`, `error`, `timeout`, `supervisor_shutdown`,
/// `unhealthy`, or for a WASM fault `out_of_fuel`, `memory_limit`,
/// `resource_limit`, `deadline_exceeded`, `stack_overflow`, `panic`,
/// `trap`, `instantiate_failed`, `init_failed`, `exit`, `host`.
pub fn reason_class(reason: &ExitReason) -> &'static str {
    match reason {
        ExitReason::Normal => "normal",
        ExitReason::Shutdown => "shutdown",
        ExitReason::Kill => "kill",
        ExitReason::Error(_) => "error",
        ExitReason::Timeout => "timeout",
        ExitReason::SupervisorShutdown => "supervisor_shutdown",
        ExitReason::Unhealthy(_) => "unhealthy",
        ExitReason::Fault(fault) => match fault {
            AgentFault::OutOfFuel => "out_of_fuel",
            AgentFault::MemoryLimit => "memory_limit",
            AgentFault::ResourceLimit(_) => "resource_limit",
            AgentFault::DeadlineExceeded => "deadline_exceeded",
            AgentFault::StackOverflow => "stack_overflow",
            AgentFault::Panic => "panic",
            AgentFault::Trap(_) => "trap",
            AgentFault::InstantiateFailed(_) => "instantiate_failed",
            AgentFault::InitFailed(_) => "init_failed",
            AgentFault::Exit(_) => "exit",
            AgentFault::Host(_) => "host",
        },
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    path: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    path: String,
    cause: &'static str,
    bystander: &'static str,
}

/// What the observer's task counts from the events.
#[derive(Debug, Clone, Default)]
struct EventCounters {
    exits: Family<ExitLabels, Counter>,
    restarts: Family<RestartLabels, Counter>,
    lost: Counter,
    recent: Arc<Mutex<VecDeque<SupervisorEvent>>>,
}

impl EventCounters {
    fn count(&self, event: &SupervisorEvent) {
        match &event.kind {
            EventKind::ChildExited { reason, .. } => {
                let labels = ExitLabels {
                    path: event.path.clone(),
                    reason: reason_class(reason),
                };
                self.exits.get_or_create(&labels).inc();
            }
            EventKind::ChildRestarted {
                cause, bystander, ..
            } => {
                let labels = RestartLabels {
                    path: event.path.clone(),
                    cause: reason_class(&cause.reason),
                    bystander: if *bystander { "true" } else { "false" },
                };
                self.restarts.get_or_create(&labels).inc();
            }
            _ => {}
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(event.clone());
    }

    async fn run(self, mut events: broadcast::Receiver<SupervisorEvent>) {
        loop {
            match events.recv().await {
                Ok(event) => self.count(&event),
                Err(RecvError::Lagged(n)) => {
                    self.lost.inc_by(n);
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// Watches a running tree: its metrics ([`metrics_text`](Self::metrics_text)),
/// its status with every agent's counters ([`snapshot`](Self::snapshot)),
/// one node in detail ([`node`](Self::node)) and its recent events. Cheap
/// to clone; the counting task ends when the last clone is dropped or the
/// tree's event channel closes.
#[derive(Clone)]
pub struct Observer {
    inner: Arc<Inner>,
}

struct Inner {
    tree: TreeHandle,
    runtime: Option<Runtime>,
    counters: EventCounters,
    registry: Registry,
    _task: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("root", &self.inner.tree.root_name())
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// Watch `tree`, counting what `events` (a subscription to its events,
    /// best taken before the tree started) reports from now on. Spawns the
    /// counting task: call it within a tokio runtime.
    pub fn new(tree: TreeHandle, events: broadcast::Receiver<SupervisorEvent>) -> Self {
        Self::build(tree, events, None)
    }

    /// Like [`new`](Self::new), also reporting the live instances, the pool
    /// slots and the components loaded (compiled, or from the compile
    /// cache) of the WASM `runtime` the tree's agents run in.
    pub fn with_runtime(
        tree: TreeHandle,
        events: broadcast::Receiver<SupervisorEvent>,
        runtime: Runtime,
    ) -> Self {
        Self::build(tree, events, Some(runtime))
    }

    fn build(
        tree: TreeHandle,
        events: broadcast::Receiver<SupervisorEvent>,
        runtime: Option<Runtime>,
    ) -> Self {
        let counters = EventCounters::default();
        let mut registry = Registry::default();
        registry.register(
            "agent_host_exits",
            "Exits of each node, by fault class (`reason`)",
            counters.exits.clone(),
        );
        registry.register(
            "agent_host_restarts",
            "Restarts of each node, by the fault class of the exit that caused them (`cause`); `bystander` is true when a sibling's exit caused it",
            counters.restarts.clone(),
        );
        registry.register(
            "agent_host_events_lost",
            "Tree events the observer missed because it fell behind (its counters are short by as many)",
            counters.lost.clone(),
        );
        registry.register_collector(Box::new(TreeCollector {
            tree: tree.clone(),
            runtime: runtime.clone(),
        }));
        let task = AbortOnDropHandle::new(tokio::spawn(counters.clone().run(events)));
        Self {
            inner: Arc::new(Inner {
                tree,
                runtime,
                counters,
                registry,
                _task: task,
            }),
        }
    }

    /// The tree it watches.
    pub fn tree(&self) -> &TreeHandle {
        &self.inner.tree
    }

    /// Every metric, in the Prometheus text format (version 0.0.4; see
    /// [`METRICS_CONTENT_TYPE`]).
    ///
    /// # Errors
    ///
    /// Only if formatting fails, which writing to a `String` does not.
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
    }

    /// The tree's last events (at most [`RECENT_EVENTS`]), oldest first.
    pub fn recent_events(&self) -> Vec<SupervisorEvent> {
        let recent = self.inner.counters.recent.lock();
        recent
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Every node with its counters, every supervisor with its restart
    /// intensity, and the host's instances.
    pub fn snapshot(&self) -> TreeSnapshot {
        let tree = &self.inner.tree;
        let walk = Walk::of(tree);
        let nodes = tree
            .status()
            .into_iter()
            .map(|status| {
                let metrics = walk.metrics(&status);
                NodeReport { status, metrics }
            })
            .collect();
        TreeSnapshot {
            root: tree.root_name().to_owned(),
            root_status: tree.supervisor_status(),
            nodes,
            supervisors: walk.supervisors.iter().map(supervisor_report).collect(),
            host: self.host(),
            events_lost: self.inner.counters.lost.get(),
        }
    }

    /// The node at `path` (a path or a unique name), with its counters,
    /// its last crash report, its entries in its supervisor's restart
    /// history (the last [`NODE_HISTORY`]) and its recent events; `None` if
    /// there is no such node now.
    pub fn node(&self, path: &str) -> Option<NodeDetail> {
        let tree = &self.inner.tree;
        let node = tree.resolve(path).ok()?;
        let status = tree.status().into_iter().find(|n| n.path == node.path)?;
        let metrics = match status.kind {
            NodeKind::Agent => node.parent.shared.meter(&status.id).map(|m| m.read()),
            NodeKind::Supervisor => None,
        };
        let mut history: Vec<RestartEntry> = node
            .parent
            .restart_history()
            .into_iter()
            .rev()
            .filter(|e| e.path == status.path)
            .take(NODE_HISTORY)
            .collect();
        history.reverse();
        let events = self
            .recent_events()
            .into_iter()
            .filter(|e| e.path == status.path)
            .collect();
        let last_crash = (node.parent.shared.view.borrow())
            .child(&status.id)
            .and_then(|c| c.info.last_crash.clone());
        Some(NodeDetail {
            node: NodeReport { status, metrics },
            supervisor: node.parent.path().to_owned(),
            last_crash,
            history,
            events,
        })
    }

    fn host(&self) -> HostReport {
        match &self.inner.runtime {
            Some(runtime) => {
                let live = runtime.live_instances();
                let slots = runtime.config().max_instances as usize;
                HostReport {
                    live_instances: Some(live),
                    pool_slots_used: Some(live.min(slots)),
                    pool_slots_free: Some(slots.saturating_sub(live)),
                    components_compiled: Some(runtime.components_compiled()),
                    components_from_cache: Some(runtime.components_from_cache()),
                }
            }
            None => HostReport::default(),
        }
    }
}

/// How many restart-history entries [`Observer::node`] gives.
pub const NODE_HISTORY: usize = 50;

/// A node as the observer reports it: its status and, for an agent, its
/// counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its status.
    #[serde(flatten)]
    pub status: NodeStatus,
    /// An agent's calls, latency and consumption (since its supervisor
    /// started); `None` for a supervisor or an agent that never started.
    pub metrics: Option<AgentMetrics>,
}

/// One node in detail ([`Observer::node`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeDetail {
    /// The node.
    pub node: NodeReport,
    /// The path of its supervisor.
    pub supervisor: String,
    /// The report of its last crash, if it ever crashed (kept when its
    /// history entry is gone).
    pub last_crash: Option<Box<CrashReport>>,
    /// Its entries in its supervisor's restart history, oldest first: each
    /// exit and what was done about it.
    pub history: Vec<RestartEntry>,
    /// Its events among the observer's recent ones, oldest first.
    pub events: Vec<SupervisorEvent>,
}

/// One supervisor and how much of its restart intensity is used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisorReport {
    /// Its path.
    pub path: String,
    /// Its status.
    pub status: SupervisorStatus,
    /// Its strategy.
    pub strategy: RestartStrategy,
    /// Restarts that count against its intensity within its window now
    /// (from its restart history: restarts and failed restart attempts).
    pub intensity_used: u32,
    /// The restarts it allows within its window.
    pub max_restarts: u32,
    /// Its window, in milliseconds.
    pub window_ms: u64,
}

/// The WASM runtime's instances, when the observer knows the runtime.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostReport {
    /// Agent instances alive now.
    pub live_instances: Option<usize>,
    /// Pool slots in use.
    pub pool_slots_used: Option<usize>,
    /// Pool slots free.
    pub pool_slots_free: Option<usize>,
    /// Components the runtime compiled so far.
    pub components_compiled: Option<u64>,
    /// Components the runtime loaded from its compile cache so far.
    pub components_from_cache: Option<u64>,
}

/// The whole tree as the observer reports it ([`Observer::snapshot`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeSnapshot {
    /// The root supervisor's name.
    pub root: String,
    /// The root supervisor's status.
    pub root_status: SupervisorStatus,
    /// Every node but the root, depth first in start order.
    pub nodes: Vec<NodeReport>,
    /// Every running supervisor, the root first.
    pub supervisors: Vec<SupervisorReport>,
    /// The host's instances.
    pub host: HostReport,
    /// Events the observer missed (its counters are short by as many).
    pub events_lost: u64,
}

fn supervisor_report(handle: &SupervisorHandle) -> SupervisorReport {
    let policy = &handle.config().restart_policy;
    SupervisorReport {
        path: handle.path().to_owned(),
        status: handle.status(),
        strategy: policy.strategy,
        intensity_used: intensity_used(handle),
        max_restarts: policy.intensity.max_restarts,
        window_ms: u64::try_from(policy.intensity.time_window.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The restarts within `handle`'s window that count against its intensity,
/// as its restart history shows them: each exit that led to a restart, and
/// each failed restart attempt (bystanders, circuit transitions and exits
/// without a restart do not count).
fn intensity_used(handle: &SupervisorHandle) -> u32 {
    let window = handle.config().restart_policy.intensity.time_window;
    let Ok(window) = chrono::Duration::from_std(window) else {
        return 0;
    };
    let since = Utc::now() - window;
    let history = handle.shared.history();
    let counted = history
        .iter()
        .rev()
        .take_while(|e| e.timestamp >= since)
        .filter(|e| {
            matches!(
                e.action,
                RestartAction::Restarted | RestartAction::StartFailed
            )
        })
        .count();
    u32::try_from(counted).unwrap_or(u32::MAX)
}

/// The running supervisors of a tree, the root first, and their agents'
/// meters.
struct Walk {
    supervisors: Vec<SupervisorHandle>,
    /// Agent id to the supervisor (index) it is a child of.
    parents: HashMap<AgentPid, usize>,
}

impl Walk {
    fn of(tree: &TreeHandle) -> Self {
        let mut walk = Self {
            supervisors: Vec::new(),
            parents: HashMap::new(),
        };
        walk.visit(tree.root().clone());
        walk
    }

    fn visit(&mut self, supervisor: SupervisorHandle) {
        let idx = self.supervisors.len();
        let children = supervisor.children();
        self.supervisors.push(supervisor);
        for child in children {
            if child.is_supervisor() {
                if let Ok(nested) = self.supervisors[idx].child_supervisor(&child.pid) {
                    self.visit(nested);
                }
            } else {
                self.parents.insert(child.pid, idx);
            }
        }
    }

    fn metrics(&self, node: &NodeStatus) -> Option<AgentMetrics> {
        let parent = self.parents.get(&node.id)?;
        let meter = self.supervisors[*parent].shared.meter(&node.id)?;
        Some(meter.read())
    }
}

/// The metrics read from the tree at each scrape.
#[derive(Debug)]
struct TreeCollector {
    tree: TreeHandle,
    runtime: Option<Runtime>,
}

/// Every status a node can have, for the `agent_host_node_status` state set.
const STATUSES: [&str; 6] = [
    "starting",
    "running",
    "stopping",
    "stopped",
    "failed",
    "restarting",
];

fn status_label(status: &crate::AgentStatus) -> &'static str {
    use crate::AgentStatus as S;
    match status {
        S::Starting => "starting",
        S::Running => "running",
        S::Stopping => "stopping",
        S::Stopped => "stopped",
        S::Failed(_) => "failed",
        S::Restarting => "restarting",
    }
}

fn kind_label(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::Agent => "agent",
        NodeKind::Supervisor => "supervisor",
    }
}

impl Collector for TreeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let walk = Walk::of(&self.tree);
        let nodes = self.tree.status();
        let agents: Vec<(&NodeStatus, AgentMetrics)> = nodes
            .iter()
            .filter_map(|n| walk.metrics(n).map(|m| (n, m)))
            .collect();

        let mut m = encoder.encode_descriptor(
            "agent_host_node_status",
            "1 for each node's status now, 0 for its other statuses",
            None,
            MetricType::Gauge,
        )?;
        for node in &nodes {
            let now = status_label(&node.status);
            for status in STATUSES {
                let labels = [
                    ("path", node.path.as_str()),
                    ("kind", kind_label(node.kind)),
                    ("status", status),
                ];
                m.encode_family(&labels)?
                    .encode_gauge(&u32::from(status == now))?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "agent_host_calls",
            "Calls to each agent, by outcome: ok, app_error (an application error), crashed, failed (not running, timed out, too large, circuit open)",
            None,
            MetricType::Counter,
        )?;
        for (node, metrics) in &agents {
            for outcome in CallOutcome::ALL {
                let labels = [("path", node.path.as_str()), ("outcome", outcome.as_str())];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&metrics.calls.get(outcome), None)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "agent_host_call_duration_seconds",
            "Time from a call to its answer, whatever the outcome",
            None,
            MetricType::Histogram,
        )?;
        for (node, metrics) in &agents {
            let latency = &metrics.latency;
            // The encoder takes counts per bucket and adds them up itself.
            let mut below = 0;
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                .iter()
                .zip(&latency.buckets)
                .map(|(&le, &(_, cumulative))| {
                    let n = cumulative - below;
                    below = cumulative;
                    (le, n)
                })
                .collect();
            m.encode_family(&[("path", node.path.as_str())])?
                .encode_histogram::<NoLabelSet>(
                    latency.sum_seconds,
                    latency.count,
                    &buckets,
                    None,
                )?;
        }

        let mut m = encoder.encode_descriptor(
            "agent_host_fuel_consumed",
            "Fuel consumed by each WASM agent's instances, as of their last report (after start, each call and each health check)",
            None,
            MetricType::Counter,
        )?;
        for (node, metrics) in &agents {
            if let Some(fuel) = metrics.fuel_consumed {
                m.encode_family(&[("path", node.path.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&fuel, None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "agent_host_memory_bytes",
            "Linear memory of each WASM agent as of its last report; 0 when it does not run",
            None,
            MetricType::Gauge,
        )?;
        for (node, metrics) in &agents {
            if let Some(bytes) = metrics.memory_bytes {
                let running = node.status == crate::AgentStatus::Running;
                m.encode_family(&[("path", node.path.as_str())])?
                    .encode_gauge(&if running { bytes } else { 0 })?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "agent_host_state_bytes",
            "Durable state each WASM agent holds, as its quota counts it, as of its last report",
            None,
            MetricType::Gauge,
        )?;
        for (node, metrics) in &agents {
            if let Some(bytes) = metrics.state_bytes {
                m.encode_family(&[("path", node.path.as_str())])?
                    .encode_gauge(&bytes)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "agent_host_supervisor_intensity_used",
            "Restarts counting against each running supervisor's restart intensity within its window now",
            None,
            MetricType::Gauge,
        )?;
        for supervisor in &walk.supervisors {
            m.encode_family(&[("path", supervisor.path())])?
                .encode_gauge(&intensity_used(supervisor))?;
        }
        let mut m = encoder.encode_descriptor(
            "agent_host_supervisor_intensity_max",
            "Restarts each running supervisor allows within its window (more, and it gives up)",
            None,
            MetricType::Gauge,
        )?;
        for supervisor in &walk.supervisors {
            let max = supervisor.config().restart_policy.intensity.max_restarts;
            m.encode_family(&[("path", supervisor.path())])?
                .encode_gauge(&max)?;
        }
        let mut m = encoder.encode_descriptor(
            "agent_host_root_up",
            "1 while the root supervisor runs, 0 once it gave up or stopped",
            None,
            MetricType::Gauge,
        )?;
        let up = matches!(self.tree.supervisor_status(), SupervisorStatus::Running);
        m.encode_gauge(&u32::from(up))?;

        if let Some(runtime) = &self.runtime {
            let live = runtime.live_instances() as u64;
            let slots = u64::from(runtime.config().max_instances);
            let mut m = encoder.encode_descriptor(
                "agent_host_instances_live",
                "WASM agent instances alive now",
                None,
                MetricType::Gauge,
            )?;
            m.encode_gauge(&live)?;
            let mut m = encoder.encode_descriptor(
                "agent_host_pool_slots",
                "Instance slots of the WASM runtime's pool, used and free",
                None,
                MetricType::Gauge,
            )?;
            m.encode_family(&[("state", "used")])?
                .encode_gauge(&live.min(slots))?;
            m.encode_family(&[("state", "free")])?
                .encode_gauge(&slots.saturating_sub(live))?;
            let mut m = encoder.encode_descriptor(
                "agent_host_components_loaded",
                "Components the WASM runtime loaded, by `source`: compiled, or loaded from its compile cache",
                None,
                MetricType::Counter,
            )?;
            for (source, n) in [
                ("compiled", runtime.components_compiled()),
                ("cache", runtime.components_from_cache()),
            ] {
                m.encode_family(&[("source", source)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }
}
