//! What a supervisor publishes for its handles: a snapshot of its status,
//! its children and its restart history.
//!
//! The supervisor task is the only writer: it replaces the snapshot's parts
//! after every change (a [`tokio::sync::watch`]), and handles read it without
//! asking the task and without waiting for it. The snapshot is derived from
//! the task's own list of children; nothing else holds a child's state.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock, Weak};

use tokio::sync::{broadcast, mpsc, watch};

use super::cell::AgentCell;
use super::child::WorkerCommand;
use super::meter::AgentMeter;
use super::{RestartEntry, SupervisorConfig, SupervisorEvent, SupervisorHandle, SupervisorStatus};
use crate::dead_letters::DeadLetters;
use crate::running::WaitGraph;
use crate::{AgentFactory, AgentPid, SupervisedAgentInfo, SupervisorId};

/// How to reach a running agent: calls lock its cell from the caller's
/// task; casts, system messages and health checks go to its worker's
/// mailbox.
#[derive(Clone)]
pub(crate) struct WorkerLink {
    pub cell: Arc<AgentCell>,
    pub mailbox: mpsc::Sender<WorkerCommand>,
}

/// How to reach a child, for calls that bypass the supervisor task.
#[derive(Clone)]
pub(crate) enum Route {
    /// A running agent: its cell, for calls, and its worker's mailbox.
    Worker(WorkerLink),
    /// A running nested supervisor.
    Supervisor(SupervisorHandle),
    /// A known child that does not run now.
    Down,
    /// A child parked by its open circuit until its trial start.
    Parked {
        /// When the trial start is due.
        until: chrono::DateTime<chrono::Utc>,
    },
}

/// One child as handles see it.
#[derive(Clone)]
pub(crate) struct ChildView {
    pub info: SupervisedAgentInfo,
    pub route: Route,
    /// Content hashes of its quarantined messages.
    pub quarantine: Arc<HashSet<u64>>,
}

/// A supervisor as handles see it.
pub(crate) struct View {
    pub status: SupervisorStatus,
    /// In start order.
    pub children: Vec<Arc<ChildView>>,
    /// Each child's index in `children`.
    index: HashMap<AgentPid, usize>,
    /// Oldest first.
    pub history: Arc<VecDeque<RestartEntry>>,
}

impl View {
    pub fn child(&self, pid: &AgentPid) -> Option<&Arc<ChildView>> {
        self.children.get(*self.index.get(pid)?)
    }

    /// Replace every child.
    pub fn set_children(&mut self, children: Vec<Arc<ChildView>>) {
        self.index = children
            .iter()
            .enumerate()
            .map(|(idx, c)| (c.info.pid.clone(), idx))
            .collect();
        self.children = children;
    }

    /// Add a child at the end.
    pub fn push_child(&mut self, child: Arc<ChildView>) {
        self.index
            .insert(child.info.pid.clone(), self.children.len());
        self.children.push(child);
    }
}

/// What a supervisor's task and its handles share.
pub(crate) struct Shared {
    pub id: SupervisorId,
    /// The supervisor's path in its tree (`root`, `root/team`).
    pub path: String,
    pub config: SupervisorConfig,
    /// Written by the task only.
    pub view: watch::Sender<View>,
    /// The tree's events (one channel for every supervisor of a tree).
    pub events: broadcast::Sender<SupervisorEvent>,
    /// Where its children's quarantined messages are kept.
    pub dead_letters: DeadLetters,
    /// Who waits for whom among the tree's agents (calls in flight). Only
    /// the root's is used: one graph per tree.
    pub waits: WaitGraph,
    /// Makes the supervisor's agents (handles create added agents ahead).
    /// Weak: a factory may hold the tree (to route calls between agents),
    /// and the tree must not keep itself alive through it.
    pub factory: Weak<dyn AgentFactory>,
    /// The meters of the agent children, by id (see [`Self::meter_of`]).
    meters: RwLock<HashMap<AgentPid, Arc<AgentMeter>>>,
}

impl Shared {
    pub fn new(
        id: SupervisorId,
        path: String,
        config: SupervisorConfig,
        events: broadcast::Sender<SupervisorEvent>,
        dead_letters: DeadLetters,
        factory: Weak<dyn AgentFactory>,
    ) -> Self {
        let view = View {
            status: SupervisorStatus::Starting,
            children: Vec::new(),
            index: HashMap::new(),
            history: Arc::default(),
        };
        Self {
            id,
            path,
            config,
            view: watch::Sender::new(view),
            events,
            dead_letters,
            waits: WaitGraph::default(),
            factory,
            meters: RwLock::default(),
        }
    }

    /// The meter of the agent child `pid`, if it ever started.
    pub fn meter(&self, pid: &AgentPid) -> Option<Arc<AgentMeter>> {
        let meters = self.meters.read().unwrap_or_else(|p| p.into_inner());
        meters.get(pid).cloned()
    }

    /// The meter of the agent child `pid` (a child now), created on its
    /// first start. The actor drops it with [`Self::forget_meter`] when it
    /// removes the child, so that there are never more meters than
    /// children (and adding one costs the same with 10 or 100,000).
    pub fn meter_of(&self, pid: &AgentPid) -> Arc<AgentMeter> {
        if let Some(meter) = self.meter(pid) {
            return meter;
        }
        let mut meters = self.meters.write().unwrap_or_else(|p| p.into_inner());
        meters.entry(pid.clone()).or_default().clone()
    }

    /// Drop the meter of `pid`, a child removed for good.
    pub fn forget_meter(&self, pid: &AgentPid) {
        let mut meters = self.meters.write().unwrap_or_else(|p| p.into_inner());
        meters.remove(pid);
    }

    pub fn status(&self) -> SupervisorStatus {
        self.view.borrow().status.clone()
    }

    pub fn route(&self, pid: &AgentPid) -> Option<Route> {
        self.view.borrow().child(pid).map(|c| c.route.clone())
    }

    /// The route to `pid` and its quarantined hashes, in one read.
    pub fn route_and_quarantine(&self, pid: &AgentPid) -> Option<(Route, Arc<HashSet<u64>>)> {
        self.view
            .borrow()
            .child(pid)
            .map(|c| (c.route.clone(), c.quarantine.clone()))
    }

    pub fn children(&self) -> Vec<SupervisedAgentInfo> {
        self.view
            .borrow()
            .children
            .iter()
            .map(|c| c.info.clone())
            .collect()
    }

    pub fn history(&self) -> Arc<VecDeque<RestartEntry>> {
        self.view.borrow().history.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use crate::{AgentSpec, AgentSupervisor, RestartType, SupervisorConfig, TestAgentFactory};

    /// Meters live as long as their children: a supervisor that spawns and
    /// removes agents all day keeps only the meters of its children now.
    #[tokio::test]
    async fn a_removed_childs_meter_is_dropped() {
        let mut sup = AgentSupervisor::new(SupervisorConfig::default(), Arc::new(TestAgentFactory));
        sup.start().await.expect("started");
        let handle = sup.handle().expect("running");
        let mut spec = AgentSpec::new("test".into(), json!({}));
        spec.restart_type = RestartType::Temporary;
        let pid = handle.spawn_agent(spec).await.expect("spawned");
        handle.call(&pid, "hi".into()).await.expect("reply");
        let meter = handle.shared.meter(&pid).expect("a meter once started");
        assert_eq!(meter.read().calls.ok, 1);

        // A temporary child's spec goes with its termination (OTP).
        handle.terminate_child(&pid).await.expect("terminated");
        assert!(handle.delete_child(&pid).await.is_err(), "still a child");
        assert!(
            handle.shared.meter(&pid).is_none(),
            "the meter outlived its child"
        );
        sup.stop().await.expect("stopped");
    }
}
