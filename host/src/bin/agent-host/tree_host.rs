//! A tree file built into a supervision tree: names for its events, and its
//! nodes reachable by path (`root/team/echo-a`) or by unique name
//! (`echo-a`), for calls and status (`run`'s control socket, and `call`
//! when no host runs).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use terraphim_agent_supervisor::tree::{
    TreeError, TreeFile, TreeNames, TreeNode, TreeProblem, TreeSupervisor,
};
use terraphim_agent_supervisor::{
    AgentPid, AgentStatus, AgentSupervisor, ExitReason, Runtime, SupervisionError, SupervisorHandle,
};

use crate::events::Names;

/// Print every problem of a tree file as an `error: ...` line; a problem
/// found by the TOML parser (`... (line N)`) is followed by that line of
/// the file, which shows the field.
pub fn report(error: &TreeError) {
    for problem in &error.problems {
        eprintln!("error: {problem}");
        if let Some(snippet) = source_line(problem) {
            eprintln!("{snippet}");
        }
    }
}

/// `    3 | strategy = "one_for_some"` for a problem that ends with `(line 3)`.
fn source_line(problem: &TreeProblem) -> Option<String> {
    let n: usize = problem
        .message
        .strip_suffix(')')?
        .rsplit_once("(line ")?
        .1
        .parse()
        .ok()?;
    let text = std::fs::read_to_string(&problem.file).ok()?;
    let line = text.lines().nth(n.checked_sub(1)?)?.trim_end();
    Some(format!("{n:>5} | {line}"))
}

/// A node of the tree file (the root excepted), in start order.
struct Node {
    /// `root/team/echo-a`.
    path: String,
    /// Its own name.
    name: String,
    /// The nodes it is nested in, outermost first (indices into `nodes`).
    ancestors: Vec<usize>,
    supervisor: bool,
}

/// A failed request, as the control socket reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    /// What went wrong, for people.
    pub error: String,
    /// The `ErrorCategory` (its Debug form: `Runtime`, `NotFound`, ...).
    pub category: String,
}

impl Failure {
    fn new(error: impl Into<String>, category: &str) -> Self {
        Self {
            error: error.into(),
            category: category.into(),
        }
    }
}

/// One node of a running tree, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub path: String,
    pub status: AgentStatus,
    pub restart_count: u32,
    pub last_exit: Option<ExitReason>,
    pub supervisor: bool,
}

/// What is known about a built tree's nodes.
pub struct Index {
    names: Arc<Names>,
    tree: TreeNames,
    nodes: Vec<Node>,
    root: String,
}

fn walk(s: &TreeSupervisor, prefix: &str, ancestors: &[usize], nodes: &mut Vec<Node>) {
    for child in &s.children {
        let path = format!("{prefix}/{}", child.name());
        let idx = nodes.len();
        nodes.push(Node {
            path: path.clone(),
            name: child.name().to_owned(),
            ancestors: ancestors.to_vec(),
            supervisor: matches!(child, TreeNode::Supervisor(_)),
        });
        if let TreeNode::Supervisor(nested) = child {
            let mut inner = ancestors.to_vec();
            inner.push(idx);
            walk(nested, &path, &inner, nodes);
        }
    }
}

impl Index {
    /// Compile the tree's components and build it (not started).
    pub fn build(
        file: &TreeFile,
        runtime: &Runtime,
    ) -> Result<(AgentSupervisor, Arc<Index>), TreeError> {
        let (sup, tree) = file.build(runtime)?;
        let root = file.root.name.clone();
        let mut nodes = Vec::new();
        walk(&file.root, &root, &[], &mut nodes);
        let mut names = Names::with_root(sup.id().clone(), root.clone());
        for node in &nodes {
            if let Some(pid) = tree.id(&node.path) {
                let parent = node
                    .path
                    .strip_suffix(&node.name)
                    .and_then(|p| p.strip_suffix('/'))
                    .unwrap_or(&root);
                names.add_child(pid.clone(), parent, &node.name);
            }
        }
        let index = Index {
            names: Arc::new(names),
            tree,
            nodes,
            root,
        };
        Ok((sup, Arc::new(index)))
    }

    /// Names for the tree's events.
    pub fn names(&self) -> &Arc<Names> {
        &self.names
    }

    /// The root supervisor's name.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// How many agents the tree declares.
    pub fn agents(&self) -> usize {
        self.nodes.iter().filter(|n| !n.supervisor).count()
    }

    /// How many supervisors, the root included.
    pub fn supervisors(&self) -> usize {
        1 + self.nodes.iter().filter(|n| n.supervisor).count()
    }

    /// Learn the ids of the running nested supervisors, so that their
    /// events carry their names.
    pub fn register_supervisors(&self, root: &SupervisorHandle) {
        for node in self.nodes.iter().filter(|n| n.supervisor) {
            if let Ok(handle) = self.supervisor_of(root, node, true) {
                self.names
                    .add_supervisor(handle.id().clone(), node.path.clone());
            }
        }
    }

    fn pid(&self, node: &Node) -> Result<AgentPid, Failure> {
        self.tree
            .id(&node.path)
            .cloned()
            .ok_or_else(|| Failure::new(format!("{} has no id", node.path), "NotFound"))
    }

    /// The node called `agent` (a path, or an unambiguous name).
    fn find(&self, agent: &str) -> Result<&Node, Failure> {
        if let Some(path) = self.tree.id(agent).and_then(|id| self.tree.name(id))
            && let Some(node) = self.nodes.iter().find(|n| n.path == path)
        {
            return Ok(node);
        }
        let same_name: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.name == agent)
            .map(|n| n.path.as_str())
            .collect();
        if same_name.len() > 1 {
            return Err(Failure::new(
                format!(
                    "`{agent}` names several nodes ({}); give its path",
                    same_name.join(", ")
                ),
                "NotFound",
            ));
        }
        let known: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| !n.supervisor)
            .map(|n| n.path.as_str())
            .collect();
        Err(Failure::new(
            format!(
                "no agent `{agent}` in the tree; its agents are: {}",
                known.join(", ")
            ),
            "NotFound",
        ))
    }

    /// The handle of the supervisor `node` runs under (with `itself`, of
    /// `node` itself, a supervisor).
    fn supervisor_of(
        &self,
        root: &SupervisorHandle,
        node: &Node,
        itself: bool,
    ) -> Result<SupervisorHandle, SupervisionError> {
        let mut handle = root.clone();
        let own = itself.then_some(node);
        for ancestor in node.ancestors.iter().map(|&i| &self.nodes[i]).chain(own) {
            let Some(pid) = self.tree.id(&ancestor.path) else {
                return Err(SupervisionError::System(format!(
                    "{} has no id",
                    ancestor.path
                )));
            };
            handle = handle.child_supervisor(pid)?;
        }
        Ok(handle)
    }

    /// A failed call, for people: ids replaced by paths.
    fn failure(&self, path: &str, error: &SupervisionError) -> Failure {
        let text = match error {
            SupervisionError::AgentCrashed(_, fault) => format!("{path} crashed: {fault}"),
            SupervisionError::AgentExecutionFailed(_, e) => {
                format!("{path} returned an error: {e}")
            }
            SupervisionError::MaxRestartsExceeded(id) => format!(
                "supervisor {} gave up (restart intensity exceeded)",
                self.names.supervisor(id)
            ),
            other => self.names.humanise(other.to_string()),
        };
        Failure::new(text, &format!("{:?}", error.category()))
    }

    /// Send `message` to the agent `agent` of the tree under `root`.
    pub async fn call(
        &self,
        root: &SupervisorHandle,
        agent: &str,
        message: String,
    ) -> Result<String, Failure> {
        let node = self.find(agent)?;
        if node.supervisor {
            let agents: Vec<&str> = self
                .nodes
                .iter()
                .filter(|n| !n.supervisor && n.path.starts_with(&format!("{}/", node.path)))
                .map(|n| n.path.as_str())
                .collect();
            return Err(Failure::new(
                format!(
                    "{} is a supervisor; call one of its agents ({})",
                    node.path,
                    agents.join(", ")
                ),
                "Configuration",
            ));
        }
        let pid = self.pid(node)?;
        let handle = self
            .supervisor_of(root, node, false)
            .map_err(|e| self.failure(&node.path, &e))?;
        handle
            .call(&pid, message)
            .await
            .map_err(|e| self.failure(&node.path, &e))
    }

    /// Every node of the tree under `root`, depth first in start order.
    pub async fn status(&self, root: &SupervisorHandle) -> Vec<NodeStatus> {
        let mut rows = Vec::new();
        self.collect(root.clone(), self.root.clone(), &mut rows)
            .await;
        rows
    }

    fn collect<'a>(
        &'a self,
        handle: SupervisorHandle,
        prefix: String,
        rows: &'a mut Vec<NodeStatus>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            for (pid, info) in handle.get_children().await {
                let path = self.tree.name(&pid).map_or_else(
                    || format!("{prefix}/{}", info.spec.name.as_deref().unwrap_or("?")),
                    str::to_owned,
                );
                rows.push(NodeStatus {
                    path: path.clone(),
                    status: info.status.clone(),
                    restart_count: info.restart_count,
                    last_exit: info.last_exit.clone(),
                    supervisor: info.is_supervisor,
                });
                if info.is_supervisor
                    && let Ok(nested) = handle.child_supervisor(&pid)
                {
                    self.collect(nested, path, rows).await;
                }
            }
        })
    }
}
