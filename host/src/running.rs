//! A whole running supervision tree behind one handle: every node addressed
//! by its path (`root/team/echo`) or by its name when that is unique,
//! calls, a status snapshot of every node, the tree's events, and OTP's
//! management calls by path.
//!
//! Paths are the library's: each supervisor knows its own path and names
//! its children's (its path, `/`, the child's name, or its id if it has no
//! name). Nothing here keeps a copy of the tree: every call reads the
//! supervisors' published snapshots, so it always sees the tree as it is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::dead_letters::DeadLetter;
use crate::supervisor::{
    ChildSpec, CircuitStatus, HealthStatus, RestartEntry, SupervisorEvent, SupervisorHandle,
    SupervisorStatus,
};
use crate::{
    AgentFactory, AgentFault, AgentPid, AgentStatus, AgentSupervisor, ErrorCategory, ExitReason,
    SupervisionError, SupervisionResult,
};

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// An agent (a worker).
    Agent,
    /// A nested supervisor.
    Supervisor,
}

/// A node of a running tree, found by [`TreeHandle::resolve`].
#[derive(Debug, Clone)]
pub struct Node {
    /// Its path (`root/team/echo`).
    pub path: String,
    /// Its id (for a supervisor, also its `SupervisorId`).
    pub id: AgentPid,
    /// Agent or supervisor.
    pub kind: NodeKind,
    /// The supervisor it is a child of.
    pub parent: SupervisorHandle,
}

/// One node of a running tree, as [`TreeHandle::status`] shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its path (`root/team/echo`).
    pub path: String,
    /// Its name (the last segment of its path).
    pub name: String,
    /// Its id (stable across its restarts).
    pub id: AgentPid,
    /// Agent or supervisor.
    pub kind: NodeKind,
    /// Its status now.
    pub status: AgentStatus,
    /// How many times it was restarted (bystander restarts included).
    pub restart_count: u32,
    /// Why it last exited, if it ever did.
    pub last_exit: Option<ExitReason>,
    /// When its current instance started.
    pub start_time: DateTime<Utc>,
    /// When it was last restarted.
    pub last_restart: Option<DateTime<Utc>>,
    /// Its last health check, if it had one.
    pub health: Option<HealthStatus>,
    /// Its circuit breaker, if it has one.
    pub circuit: Option<CircuitStatus>,
}

/// A path or name that does not lead to a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No node has this path or name.
    #[error("no node `{target}` in the tree; its agents are: {}", agents.join(", "))]
    NotFound {
        /// What was asked for.
        target: String,
        /// The paths of the tree's agents, to choose from.
        agents: Vec<String>,
    },
    /// Several nodes have this name.
    #[error("`{name}` names several nodes ({}); give its path", paths.join(", "))]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The nodes' paths.
        paths: Vec<String>,
    },
    /// The path goes through a supervisor that does not run now
    /// (restarting, stopped, or gave up), so the nodes below it do not
    /// exist now.
    #[error("{path} is not running, so nothing below it can be reached")]
    SupervisorDown {
        /// The supervisor's path.
        path: String,
    },
    /// The path names the root supervisor, which is not a child.
    #[error("{path} is the root supervisor; name one of its nodes")]
    Root {
        /// The root's path.
        path: String,
    },
}

/// Why a call to a node of a tree failed.
#[derive(Debug, thiserror::Error)]
pub enum TreeCallError {
    /// The target does not lead to a node.
    #[error(transparent)]
    NotFound(#[from] ResolveError),
    /// The target is a supervisor, not an agent.
    #[error("{path} is a supervisor; call one of its agents ({})", agents.join(", "))]
    NotAnAgent {
        /// The supervisor's path.
        path: String,
        /// The agents below it.
        agents: Vec<String>,
    },
    /// The agent does not run now (it is restarting, or stopped).
    #[error("{path} is not running (restarting or stopped)")]
    NotRunning {
        /// The agent's path.
        path: String,
    },
    /// The agent crashed handling the message; its supervisor restarts it
    /// as its restart type says.
    #[error("{path} crashed: {fault}")]
    Crashed {
        /// The agent's path.
        path: String,
        /// Its id.
        agent: AgentPid,
        /// How it died.
        fault: AgentFault,
    },
    /// The agent answered with an application error (it keeps running).
    #[error("{path} returned an error: {error}")]
    Application {
        /// The agent's path.
        path: String,
        /// Its id.
        agent: AgentPid,
        /// The error the agent returned.
        error: String,
    },
    /// The agent did not answer within its supervisor's `agent_timeout`.
    #[error("{path} did not answer within {after:?}")]
    Timeout {
        /// The agent's path.
        path: String,
        /// The time it had.
        after: Duration,
    },
    /// The message, or the reply, is larger than the supervisor allows.
    #[error("{path}: {} of {len} bytes exceeds the limit of {max}", if *reply { "reply" } else { "message" })]
    TooLarge {
        /// The agent's path.
        path: String,
        /// The size.
        len: usize,
        /// The limit.
        max: usize,
        /// Whether it was the reply (else the message).
        reply: bool,
    },
    /// The agent's circuit is open: it is parked until its trial start.
    #[error("{path}'s circuit is open: it is parked until its trial start at {until}")]
    CircuitOpen {
        /// The agent's path.
        path: String,
        /// When the trial start is due.
        until: DateTime<Utc>,
    },
    /// The message is quarantined for this agent (it crashed it too often).
    #[error(
        "{path}: the message (hash {hash}) is quarantined: it crashed the agent too often; replay or discard it from its dead letters"
    )]
    Quarantined {
        /// The agent's path.
        path: String,
        /// The message's content hash (FNV-1a, hex).
        hash: String,
    },
    /// The agent's supervisor gave up (its restart intensity was
    /// exceeded), so the agent is gone.
    #[error("{supervisor} gave up (restart intensity exceeded); {path} is gone with it")]
    SupervisorGaveUp {
        /// The agent's path.
        path: String,
        /// The supervisor's path.
        supervisor: String,
    },
    /// The supervisor's error, when no other variant fits.
    #[error("{path}: {source}")]
    Other {
        /// The agent's path.
        path: String,
        /// What the supervisor said.
        source: SupervisionError,
    },
}

impl TreeCallError {
    fn from_supervision(node: Node, error: SupervisionError) -> Self {
        let after = node.parent.config().agent_timeout;
        let path = node.path;
        match error {
            SupervisionError::MaxRestartsExceeded(_) => Self::SupervisorGaveUp {
                path,
                supervisor: node.parent.path().to_owned(),
            },
            SupervisionError::AgentCrashed(agent, fault) => Self::Crashed { path, agent, fault },
            SupervisionError::AgentExecutionFailed(agent, error) => {
                Self::Application { path, agent, error }
            }
            SupervisionError::Timeout => Self::Timeout { path, after },
            SupervisionError::MessageTooLarge { len, max } => Self::TooLarge {
                path,
                len,
                max,
                reply: false,
            },
            SupervisionError::ReplyTooLarge { len, max } => Self::TooLarge {
                path,
                len,
                max,
                reply: true,
            },
            SupervisionError::CommunicationFailed(_) => Self::NotRunning { path },
            SupervisionError::CircuitOpen { until, .. } => Self::CircuitOpen { path, until },
            SupervisionError::Quarantined { hash, .. } => Self::Quarantined { path, hash },
            source => Self::Other { path, source },
        }
    }

    /// The category, for monitoring and alerting (as
    /// [`SupervisionError::category`]).
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::NotFound(_) => ErrorCategory::NotFound,
            Self::NotAnAgent { .. } => ErrorCategory::Configuration,
            Self::NotRunning { .. } | Self::Timeout { .. } => ErrorCategory::Communication,
            Self::CircuitOpen { .. } => ErrorCategory::Recovery,
            Self::Crashed { .. } | Self::Application { .. } => ErrorCategory::Runtime,
            Self::TooLarge { .. } | Self::SupervisorGaveUp { .. } | Self::Quarantined { .. } => {
                ErrorCategory::Policy
            }
            Self::Other { source, .. } => source.category(),
        }
    }
}

impl From<TreeCallError> for SupervisionError {
    fn from(error: TreeCallError) -> Self {
        match error {
            TreeCallError::Crashed { agent, fault, .. } => Self::AgentCrashed(agent, fault),
            TreeCallError::Application { agent, error, .. } => {
                Self::AgentExecutionFailed(agent, error)
            }
            TreeCallError::Timeout { .. } => Self::Timeout,
            TreeCallError::TooLarge {
                len,
                max,
                reply: false,
                ..
            } => Self::MessageTooLarge { len, max },
            TreeCallError::TooLarge {
                len,
                max,
                reply: true,
                ..
            } => Self::ReplyTooLarge { len, max },
            TreeCallError::Other { source, .. } => source,
            e @ TreeCallError::NotFound(_) => Self::NodeNotFound(e.to_string()),
            e @ TreeCallError::NotAnAgent { .. } => Self::InvalidAgentSpec(e.to_string()),
            e @ TreeCallError::NotRunning { .. } => Self::CommunicationFailed(e.to_string()),
            e @ TreeCallError::SupervisorGaveUp { .. } => Self::CommunicationFailed(e.to_string()),
            e @ TreeCallError::CircuitOpen { .. } => Self::CommunicationFailed(e.to_string()),
            e @ TreeCallError::Quarantined { .. } => Self::System(e.to_string()),
        }
    }
}

/// A management call on a node (terminate, restart, delete, add) that
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The path does not lead to a node.
    #[error(transparent)]
    NotFound(#[from] ResolveError),
    /// The path leads to an agent where a supervisor is needed.
    #[error("{path} is an agent, not a supervisor")]
    NotASupervisor {
        /// The node's path.
        path: String,
    },
    /// The node's supervisor refused or failed.
    #[error("{path}: {}", describe(source))]
    Refused {
        /// The node's path.
        path: String,
        /// What its supervisor said.
        source: SupervisionError,
    },
}

impl NodeError {
    /// The category, for monitoring and alerting.
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::NotFound(_) => ErrorCategory::NotFound,
            Self::NotASupervisor { .. } => ErrorCategory::Configuration,
            Self::Refused { source, .. } => source.category(),
        }
    }
}

/// A supervisor's refusal in words that do not repeat the node's id (the
/// path says which node it is).
fn describe(error: &SupervisionError) -> String {
    match error {
        SupervisionError::AgentRunning(_) => "it is running".into(),
        SupervisionError::AgentRestarting(_) => "it is being restarted".into(),
        SupervisionError::AgentNotFound(_) => "no such child (it was removed)".into(),
        SupervisionError::AgentStartFailed(_, why) => format!("it failed to start: {why}"),
        other => other.to_string(),
    }
}

/// A running supervision tree: the root supervisor, owned, and every node
/// below it reachable by path. It derefs to its [`TreeHandle`], which does
/// everything but stop the tree.
///
/// Dropping it without [`stop`](Self::stop) kills the tree.
///
/// ```
/// # use std::sync::Arc;
/// # use serde_json::json;
/// # use terraphim_agent_supervisor::{
/// #     AgentSpec, AgentSupervisor, RunningTree, SupervisorConfig, SupervisorSpec, TestAgentFactory,
/// # };
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let factory = Arc::new(TestAgentFactory);
/// let team = SupervisorSpec::new(SupervisorConfig::default(), factory.clone())
///     .with_name("team".into())
///     .with_child(AgentSpec::new("test".into(), json!({})).with_name("echo".into()));
/// let root = AgentSupervisor::new(SupervisorConfig::default(), factory).with_child(team);
/// let mut tree = RunningTree::start(root).await?;
///
/// assert_eq!(tree.call("root/team/echo", "hi".into()).await?, "hi");
/// assert_eq!(tree.call("echo", "by name".into()).await?, "by name");
/// let paths: Vec<String> = tree.status().into_iter().map(|n| n.path).collect();
/// assert_eq!(paths, ["root/team", "root/team/echo"]);
/// tree.stop().await?;
/// # Ok(())
/// # }
/// ```
pub struct RunningTree {
    owner: AgentSupervisor,
    handle: TreeHandle,
}

impl std::fmt::Debug for RunningTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningTree")
            .field("root", &self.handle.root.path())
            .field("status", &self.handle.root.status())
            .finish_non_exhaustive()
    }
}

impl RunningTree {
    /// Start `root` (configured with its children; see
    /// [`AgentSupervisor::with_child`]) and hold it.
    ///
    /// # Errors
    ///
    /// `AgentStartFailed` if an initial child fails to start (those already
    /// started are stopped again).
    pub async fn start(mut root: AgentSupervisor) -> SupervisionResult<Self> {
        root.start().await?;
        let handle = TreeHandle {
            root: root.handle()?,
        };
        Ok(Self {
            owner: root,
            handle,
        })
    }

    /// A handle to the tree, cheap to clone, for everything but stopping it.
    pub fn handle(&self) -> TreeHandle {
        self.handle.clone()
    }

    /// Stop the tree: every supervisor stops its children in reverse start
    /// order, each within its shutdown policy. When this returns, nothing of
    /// the tree runs.
    ///
    /// # Errors
    ///
    /// `ShutdownFailed` if the root supervisor's task panicked.
    pub async fn stop(&mut self) -> SupervisionResult<()> {
        self.owner.stop().await
    }
}

impl std::ops::Deref for RunningTree {
    type Target = TreeHandle;

    fn deref(&self) -> &TreeHandle {
        &self.handle
    }
}

/// A handle to a running tree: every node by path, calls, status, events
/// and the management calls. Cheap to clone; it does not keep the tree
/// alive (its [`RunningTree`] does).
#[derive(Debug, Clone)]
pub struct TreeHandle {
    root: SupervisorHandle,
}

impl TreeHandle {
    /// The handle of the tree under `root`.
    pub(crate) fn new(root: SupervisorHandle) -> Self {
        Self { root }
    }

    /// Who waits for whom among the tree's agents.
    pub(crate) fn waits(&self) -> &WaitGraph {
        &self.root.shared.waits
    }

    /// The root supervisor's handle.
    pub fn root(&self) -> &SupervisorHandle {
        &self.root
    }

    /// The root supervisor's name: the first segment of every path.
    pub fn root_name(&self) -> &str {
        self.root.path()
    }

    /// The root supervisor's status (`Failed` once it gave up).
    pub fn supervisor_status(&self) -> SupervisorStatus {
        self.root.status()
    }

    /// The events of the whole tree; each carries the path of its node.
    pub fn subscribe(&self) -> broadcast::Receiver<SupervisorEvent> {
        self.root.subscribe()
    }

    /// Every node of the tree (the root excepted), depth first in start
    /// order: a nested supervisor is followed by its children. The children
    /// of a supervisor that does not run now are not listed.
    pub fn status(&self) -> Vec<NodeStatus> {
        let mut rows = Vec::new();
        collect(&self.root, &mut rows);
        rows
    }

    /// The node at `target`: a path (`root/team/echo`) or a name that only
    /// one node of the tree has (`echo`).
    ///
    /// # Errors
    ///
    /// [`ResolveError`]: nothing by that path or name, several nodes by that
    /// name, a supervisor on the way that does not run now, or the root.
    pub fn resolve(&self, target: &str) -> Result<Node, ResolveError> {
        let target = target.trim_matches('/');
        let root = self.root.path();
        if target == root {
            return Err(ResolveError::Root { path: root.into() });
        }
        match target
            .strip_prefix(root)
            .and_then(|rest| rest.strip_prefix('/'))
        {
            Some(rest) => self.walk(rest, target),
            None => self.by_name(target),
        }
    }

    /// Follow `rest` (the path after the root's name) down the tree.
    fn walk(&self, rest: &str, target: &str) -> Result<Node, ResolveError> {
        let mut parent = self.root.clone();
        let mut segments = rest.split('/').peekable();
        while let Some(segment) = segments.next() {
            let child = parent
                .children()
                .into_iter()
                .find(|c| c.path.rsplit('/').next() == Some(segment))
                .ok_or_else(|| self.not_found(target))?;
            let kind = if child.is_supervisor() {
                NodeKind::Supervisor
            } else {
                NodeKind::Agent
            };
            if segments.peek().is_none() {
                return Ok(Node {
                    path: child.path,
                    id: child.pid,
                    kind,
                    parent,
                });
            }
            if kind == NodeKind::Agent {
                return Err(self.not_found(target));
            }
            parent = parent
                .child_supervisor(&child.pid)
                .map_err(|_| ResolveError::SupervisorDown { path: child.path })?;
        }
        Err(self.not_found(target))
    }

    /// The one node named `name`.
    fn by_name(&self, name: &str) -> Result<Node, ResolveError> {
        let paths: Vec<String> = self
            .status()
            .into_iter()
            .filter(|n| n.name == name)
            .map(|n| n.path)
            .collect();
        match paths.as_slice() {
            [path] => self.resolve(path),
            [] => Err(self.not_found(name)),
            _ => Err(ResolveError::Ambiguous {
                name: name.into(),
                paths,
            }),
        }
    }

    fn not_found(&self, target: &str) -> ResolveError {
        ResolveError::NotFound {
            target: target.into(),
            agents: self.agent_paths(""),
        }
    }

    /// The paths of the agents whose path starts with `prefix`.
    fn agent_paths(&self, prefix: &str) -> Vec<String> {
        self.status()
            .into_iter()
            .filter(|n| n.kind == NodeKind::Agent && n.path.starts_with(prefix))
            .map(|n| n.path)
            .collect()
    }

    /// Send `message` to the agent at `target` (a path or a unique name) and
    /// return its reply. The agent runs it in the caller's task (see
    /// [`SupervisorHandle::call`](crate::SupervisorHandle::call)).
    ///
    /// # Errors
    ///
    /// [`TreeCallError`]: no such agent, a supervisor rather than an agent,
    /// not running now, crashed (with its fault), an application error, no
    /// answer in time, or a message or reply over the size limit.
    pub async fn call(&self, target: &str, message: String) -> Result<String, TreeCallError> {
        let node = self.resolve(target)?;
        if node.kind == NodeKind::Supervisor {
            let agents = self.agent_paths(&format!("{}/", node.path));
            return Err(TreeCallError::NotAnAgent {
                path: node.path,
                agents,
            });
        }
        self.call_node(&node, message).await
    }

    /// Send `message` to the agent `node` (resolved, an agent) and return
    /// its reply.
    pub(crate) async fn call_node(
        &self,
        node: &Node,
        message: String,
    ) -> Result<String, TreeCallError> {
        match node.parent.call(&node.id, message).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(TreeCallError::from_supervision(node.clone(), e)),
        }
    }

    /// The restart-history entries of the node at `target` that carry a
    /// crash report, oldest first (bounded by its supervisor's history).
    ///
    /// # Errors
    ///
    /// [`ResolveError`] if there is no such node.
    pub fn crashes(&self, target: &str) -> Result<Vec<RestartEntry>, ResolveError> {
        let node = self.resolve(target)?;
        Ok(node
            .parent
            .restart_history()
            .into_iter()
            .filter(|e| e.agent_id == node.id && e.crash.is_some())
            .collect())
    }

    /// The dead letters (quarantined messages) of the agent at `target`.
    ///
    /// # Errors
    ///
    /// [`NodeError`]: no such node, or the store that keeps them failed.
    pub async fn dead_letters(&self, target: &str) -> Result<Vec<DeadLetter>, NodeError> {
        let node = self.resolve(target)?;
        node.parent
            .dead_letters(&node.id)
            .await
            .map_err(|source| NodeError::Refused {
                path: node.path,
                source,
            })
    }

    /// Take the dead letter `hash` of the agent at `target` out of
    /// quarantine and deliver it once more; the agent's reply.
    ///
    /// # Errors
    ///
    /// [`TreeCallError`]: no such node or dead letter, or the call failed.
    pub async fn replay_dead_letter(
        &self,
        target: &str,
        hash: &str,
    ) -> Result<String, TreeCallError> {
        let node = self.resolve(target)?;
        match node.parent.replay_dead_letter(&node.id, hash).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(TreeCallError::from_supervision(node, e)),
        }
    }

    /// Take the dead letter `hash` of the agent at `target` out of
    /// quarantine and drop it.
    ///
    /// # Errors
    ///
    /// [`NodeError`]: no such node or dead letter.
    pub async fn discard_dead_letter(&self, target: &str, hash: &str) -> Result<(), NodeError> {
        let node = self.resolve(target)?;
        refused(&node, node.parent.discard_dead_letter(&node.id, hash).await)
    }

    /// Queue `message` for the agent at `target` (a path or a unique name)
    /// without waiting for it to be handled; its reply is dropped (OTP's
    /// `cast`). Never waits: a full mailbox is an error.
    ///
    /// # Errors
    ///
    /// [`TreeCallError`]: no such agent, a supervisor rather than an agent,
    /// not running now or its mailbox full (`NotRunning`), or a message
    /// over the size limit.
    pub fn cast(&self, target: &str, message: String) -> Result<(), TreeCallError> {
        let node = self.resolve(target)?;
        if node.kind == NodeKind::Supervisor {
            let agents = self.agent_paths(&format!("{}/", node.path));
            return Err(TreeCallError::NotAnAgent {
                path: node.path,
                agents,
            });
        }
        self.cast_node(&node, message)
    }

    /// Queue `message` for the agent `node` (resolved, an agent).
    pub(crate) fn cast_node(&self, node: &Node, message: String) -> Result<(), TreeCallError> {
        node.parent
            .cast(&node.id, message)
            .map_err(|e| TreeCallError::from_supervision(node.clone(), e))
    }

    /// Report that the node at `target` exited with `reason` (OTP's
    /// `handle_agent_exit`): its running instance is killed and its
    /// supervisor's restart strategy applied.
    ///
    /// # Errors
    ///
    /// [`NodeError`]: no such node, or its supervisor gave up over it
    /// (`MaxRestartsExceeded`).
    pub async fn report_exit(&self, target: &str, reason: ExitReason) -> Result<(), NodeError> {
        let node = self.resolve(target)?;
        refused(
            &node,
            node.parent.handle_agent_exit(node.id.clone(), reason).await,
        )
    }

    /// Stop the node at `target` under its shutdown policy, without
    /// restarting it (OTP's `terminate_child`); its spec is kept (removed for
    /// a temporary child).
    ///
    /// # Errors
    ///
    /// [`NodeError`]: no such node, or its supervisor refused.
    pub async fn terminate(&self, target: &str) -> Result<(), NodeError> {
        let node = self.resolve(target)?;
        refused(&node, node.parent.terminate_child(&node.id).await)
    }

    /// Start a terminated node again (OTP's `restart_child`).
    ///
    /// # Errors
    ///
    /// [`NodeError`]: no such node, it runs or is being restarted, or it
    /// failed to start.
    pub async fn restart(&self, target: &str) -> Result<(), NodeError> {
        let node = self.resolve(target)?;
        refused(&node, node.parent.restart_child(&node.id).await)
    }

    /// Remove a terminated node's spec (OTP's `delete_child`).
    ///
    /// # Errors
    ///
    /// [`NodeError`]: no such node, or it runs or is being restarted.
    pub async fn delete(&self, target: &str) -> Result<(), NodeError> {
        let node = self.resolve(target)?;
        refused(&node, node.parent.delete_child(&node.id).await)
    }

    /// Add `child` under the supervisor at `parent` (a path, a unique name,
    /// or the root's name) and start it; its path.
    ///
    /// # Errors
    ///
    /// [`NodeError`]: no such supervisor, an agent where a supervisor is
    /// needed, or the supervisor refused (duplicate id or name, too many
    /// children, invalid spec, the child failed to start).
    pub async fn add_child(
        &self,
        parent: &str,
        child: impl Into<ChildSpec>,
    ) -> Result<String, NodeError> {
        let parent = parent.trim_matches('/');
        let supervisor = if parent == self.root.path() {
            self.root.clone()
        } else {
            let node = self.resolve(parent)?;
            if node.kind == NodeKind::Agent {
                return Err(NodeError::NotASupervisor { path: node.path });
            }
            node.parent
                .child_supervisor(&node.id)
                .map_err(|_| ResolveError::SupervisorDown { path: node.path })?
        };
        let child = child.into();
        if let ChildSpec::Supervisor(spec) = &child {
            attach_factories(self, &spec.factory, &spec.children);
        }
        let name = child
            .name()
            .map_or_else(|| child.id().to_string(), str::to_owned);
        let path = format!("{}/{name}", supervisor.path());
        match supervisor.add_child(child).await {
            Ok(_) => Ok(path),
            Err(source) => Err(NodeError::Refused { path, source }),
        }
    }
}

/// The wait-for graph of the calls in flight between the agents of one tree:
/// an edge from each caller to the agent it waits for. Each agent waits for
/// at most one other (its guest is single-threaded), so the graph is a set
/// of chains; a call that would close one into a cycle is refused.
#[derive(Debug, Default)]
pub(crate) struct WaitGraph {
    edges: Arc<Mutex<HashMap<AgentPid, AgentPid>>>,
}

/// An edge of a [`WaitGraph`], removed when dropped (when the caller stops
/// waiting: reply, timeout, or its death).
pub(crate) struct WaitGuard {
    edges: Arc<Mutex<HashMap<AgentPid, AgentPid>>>,
    caller: AgentPid,
    callee: AgentPid,
}

impl WaitGraph {
    /// Record that `caller` waits for `callee`, unless `callee` waits
    /// (directly or through others) for `caller`, or is `caller`: then the
    /// chain of waits from `callee` back to `caller`.
    pub fn wait(&self, caller: &AgentPid, callee: &AgentPid) -> Result<WaitGuard, Vec<AgentPid>> {
        let mut edges = self.edges.lock().unwrap_or_else(PoisonError::into_inner);
        let mut chain = vec![callee.clone()];
        let mut at = callee;
        // The walk follows a chain; it is bounded by the number of edges
        // even if the graph were wrong.
        for _ in 0..=edges.len() {
            if at == caller {
                return Err(chain);
            }
            match edges.get(at) {
                Some(next) => {
                    chain.push(next.clone());
                    at = next;
                }
                None => break,
            }
        }
        edges.insert(caller.clone(), callee.clone());
        Ok(WaitGuard {
            edges: self.edges.clone(),
            caller: caller.clone(),
            callee: callee.clone(),
        })
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut edges = self.edges.lock().unwrap_or_else(PoisonError::into_inner);
        if edges.get(&self.caller) == Some(&self.callee) {
            edges.remove(&self.caller);
        }
    }
}

/// Tell `factory` and the factories of the supervisors among `children`
/// (at any depth) that their agents run in `tree`.
pub(crate) fn attach_factories(
    tree: &TreeHandle,
    factory: &Arc<dyn AgentFactory>,
    children: &[ChildSpec],
) {
    factory.attach_tree(tree);
    for child in children {
        if let ChildSpec::Supervisor(spec) = child {
            attach_factories(tree, &spec.factory, &spec.children);
        }
    }
}

fn refused(node: &Node, result: SupervisionResult<()>) -> Result<(), NodeError> {
    result.map_err(|source| NodeError::Refused {
        path: node.path.clone(),
        source,
    })
}

/// Append the rows of `supervisor`'s subtree to `rows`.
fn collect(supervisor: &SupervisorHandle, rows: &mut Vec<NodeStatus>) {
    for child in supervisor.children() {
        let kind = if child.is_supervisor() {
            NodeKind::Supervisor
        } else {
            NodeKind::Agent
        };
        let name = child.path.rsplit('/').next().unwrap_or_default().to_owned();
        let nested = (kind == NodeKind::Supervisor)
            .then(|| supervisor.child_supervisor(&child.pid).ok())
            .flatten();
        rows.push(NodeStatus {
            path: child.path,
            name,
            id: child.pid,
            kind,
            status: child.status,
            restart_count: child.restart_count,
            last_exit: child.last_exit,
            start_time: child.start_time,
            last_restart: child.last_restart,
            health: child.health,
            circuit: child.circuit,
        });
        if let Some(nested) = nested {
            collect(&nested, rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cycle_in_the_wait_for_graph_is_refused_and_edges_go_when_dropped() {
        let graph = WaitGraph::default();
        let (a, b, c) = (AgentPid::new(), AgentPid::new(), AgentPid::new());
        let a_waits = graph.wait(&a, &b).expect("a may wait for b");
        let b_waits = graph.wait(&b, &c).expect("b may wait for c");
        assert_eq!(
            graph.wait(&c, &a).err(),
            Some(vec![a.clone(), b.clone(), c.clone()])
        );
        assert!(graph.wait(&a, &a).is_err(), "a call to oneself");
        drop(b_waits);
        let c_waits = graph.wait(&c, &a).expect("b no longer waits: no cycle");
        drop((a_waits, c_waits));
        assert!(graph.edges.lock().unwrap().is_empty());
    }
}
