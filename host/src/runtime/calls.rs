//! Calls and casts from one agent to another (the WIT `agents` interface).
//!
//! How a call reaches the tree: agents are created by their factory before
//! their tree exists, so the factory holds a [`CallHub`] that the tree is
//! attached to when it starts ([`AgentFactory::attach_tree`](crate::AgentFactory::attach_tree),
//! called by `AgentSupervisor::start` before any child starts). Each
//! instance gets a [`CallAccess`]: its own id, its grants and the hub. On
//! its first call the instance finds itself in the hub's trees (by id),
//! which gives it its tree and its path; relative paths resolve against its
//! supervisor's path.
//!
//! Invariants:
//! - Deny-by-default: a target path must match one of the caller's
//!   [`CallPattern`]s; a refusal is logged with both paths (never the
//!   message), within the agent's log budget.
//! - Everything the guest hands in is bounded here: a path is at most
//!   [`MAX_PATH_BYTES`], a timeout at most [`MAX_CALL_TIMEOUT`], a message
//!   at most the callee's supervisor's `max_message_bytes`; a cast never
//!   waits (a full mailbox is an error).
//! - No call can deadlock: the tree keeps the wait-for graph of the calls
//!   in flight between its agents, whatever factories made them (each agent
//!   waits for at most one other, its guest being single-threaded). A call
//!   whose callee waits, directly or through others, for the caller fails
//!   at once with `would-deadlock`, before anything is sent. An edge is
//!   removed when the caller stops waiting (reply, timeout, or the caller's
//!   death: the edge's guard lives in the host call's future).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::bindings::terraphim::agent::agents::{self, CallError as WitCallError};
use super::host::HostState;
use crate::{AgentPid, Node, NodeKind, SupervisorStatus, TreeCallError, TreeHandle};

/// Longest path (or path pattern) an agent may name, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// Longest a call may wait for its reply, whatever timeout the guest asks.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Most path segments in a path or pattern.
const MAX_SEGMENTS: usize = 32;

/// Most call patterns one agent's spec may hold.
pub const MAX_CALL_PATTERNS: usize = 256;

/// A path pattern of the agents another agent may call or cast to, as
/// written in its spec (`calls` in a tree file).
///
/// Segments are separated by `/`. `*` matches any one segment, `**` (last
/// only) any one or more. A pattern whose first segment is the root's name
/// is absolute (`root/tools/*`); any other is relative to the caller's
/// supervisor (`helper` is a sibling, `../tools/*` the agents of a sibling
/// supervisor `tools`), as are the paths a guest calls.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CallPattern(String);

/// A call pattern that cannot be one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{pattern}` is not a call pattern: {reason}")]
pub struct PatternError {
    /// The pattern as given (cut to 100 bytes).
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

impl CallPattern {
    /// Check `text` as a pattern.
    ///
    /// # Errors
    ///
    /// [`PatternError`]: empty, longer than [`MAX_PATH_BYTES`], an empty
    /// segment (`a//b`, a leading or trailing `/`), more than 32 segments,
    /// `**` other than last, or `*` within a segment (`tool*`).
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let fail = |reason: &str| PatternError {
            pattern: crate::text::truncate(text, 100).to_owned(),
            reason: reason.to_owned(),
        };
        check_path(text).map_err(|r| fail(&r))?;
        let segments: Vec<&str> = text.split('/').collect();
        for (i, s) in segments.iter().enumerate() {
            if *s == "**" && i + 1 != segments.len() {
                return Err(fail("`**` may only be the last segment"));
            }
            if s.contains('*') && *s != "*" && *s != "**" {
                return Err(fail(
                    "`*` stands for a whole segment (`root/tools/*`), not part of one",
                ));
            }
        }
        Ok(Self(text.to_owned()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the absolute path `target` matches this pattern, for a
    /// caller whose supervisor is at `base` in a tree whose root is `root`.
    fn matches(&self, target: &[&str], base: &str, root: &str) -> bool {
        let Ok(pattern) = absolute(&self.0, base, root) else {
            return false;
        };
        let mut t = target.iter();
        for (i, &p) in pattern.iter().enumerate() {
            if p == "**" {
                return i < target.len();
            }
            match t.next() {
                Some(&segment) if p == "*" || p == segment => {}
                _ => return false,
            }
        }
        t.next().is_none()
    }
}

impl CallPattern {
    /// Whether the agent at `target` (an absolute path) matches, for a
    /// caller at `caller` (an absolute path) in a tree whose root is
    /// `root`.
    pub(crate) fn matches_path(&self, target: &str, caller: &str, root: &str) -> bool {
        let base = caller.rsplit_once('/').map_or(caller, |(base, _)| base);
        let target: Vec<&str> = target.split('/').collect();
        self.matches(&target, base, root)
    }
}

impl fmt::Debug for CallPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for CallPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CallPattern {
    type Error = PatternError;

    fn try_from(text: String) -> Result<Self, PatternError> {
        Self::parse(&text)
    }
}

impl From<CallPattern> for String {
    fn from(pattern: CallPattern) -> String {
        pattern.0
    }
}

/// Whether `text` is a well-formed path: not empty, at most
/// [`MAX_PATH_BYTES`], no empty segment, at most 32 segments.
fn check_path(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    if text.len() > MAX_PATH_BYTES {
        return Err(format!(
            "it is {} bytes long, more than {MAX_PATH_BYTES}",
            text.len()
        ));
    }
    if text.split('/').any(str::is_empty) {
        return Err("it has an empty segment (`//`, or a leading or trailing `/`)".into());
    }
    if text.split('/').count() > MAX_SEGMENTS {
        return Err(format!("it has more than {MAX_SEGMENTS} segments"));
    }
    Ok(())
}

/// The segments of `path` made absolute: as they are if the first one is
/// `root`, else appended to `base` (the caller's supervisor's path); `.` is
/// dropped and `..` goes up one level (never above the root).
fn absolute<'a>(path: &'a str, base: &'a str, root: &str) -> Result<Vec<&'a str>, String> {
    check_path(path)?;
    let mut segments: Vec<&str> = if path.split('/').next() == Some(root) {
        Vec::new()
    } else {
        base.split('/').collect()
    };
    for segment in path.split('/') {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
                if segments.is_empty() {
                    return Err(format!("`{path}` goes above the root"));
                }
            }
            s => segments.push(s),
        }
    }
    Ok(segments)
}

/// How the agents of one factory reach the trees they run in. Cheap to
/// clone; clones share the trees.
///
/// A factory holds one and hands it to every instance it creates; a tree
/// is attached when it starts ([`CallHub::attach`]). A handle to a tree
/// does not keep it running; a stopped tree is forgotten at the next
/// attach.
#[derive(Clone, Default)]
pub struct CallHub {
    trees: Arc<Mutex<Vec<TreeHandle>>>,
}

impl fmt::Debug for CallHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trees = lock(&self.trees).len();
        f.debug_struct("CallHub")
            .field("trees", &trees)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CallHub {
    /// A hub attached to no tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Let the hub's agents reach `tree`: replaces an earlier start of the
    /// same root supervisor, and forgets trees that stopped.
    pub fn attach(&self, tree: &TreeHandle) {
        let mut trees = lock(&self.trees);
        trees.retain(|t| {
            t.root().id() != tree.root().id()
                && !matches!(
                    t.supervisor_status(),
                    SupervisorStatus::Stopped | SupervisorStatus::Failed(_)
                )
        });
        trees.push(tree.clone());
    }

    /// The tree agent `pid` runs in, and its path there.
    fn locate(&self, pid: &AgentPid) -> Option<(TreeHandle, String)> {
        let trees: Vec<TreeHandle> = lock(&self.trees).clone();
        trees.into_iter().find_map(|tree| {
            let path = tree
                .status()
                .into_iter()
                .find(|n| n.id == *pid && n.kind == NodeKind::Agent)?
                .path;
            Some((tree, path))
        })
    }
}

/// What one instance may call, and how it reaches the tree. The default
/// may call nothing.
#[derive(Clone, Debug, Default)]
pub struct CallAccess {
    grants: Vec<CallPattern>,
    link: Option<(AgentPid, CallHub)>,
}

impl CallAccess {
    /// Access for the agent `pid`, which may call the paths `grants` match,
    /// in the trees attached to `hub`.
    pub fn new(pid: AgentPid, grants: Vec<CallPattern>, hub: CallHub) -> Self {
        Self {
            grants,
            link: Some((pid, hub)),
        }
    }
}

/// The state of the `agents` interface in one instance's store.
#[derive(Debug, Default)]
pub(crate) struct CallState {
    access: CallAccess,
    /// The caller's tree and path, found on its first call.
    located: Option<(TreeHandle, String)>,
}

impl CallState {
    pub fn new(access: CallAccess) -> Self {
        Self {
            access,
            located: None,
        }
    }
}

/// A granted, resolved target.
struct Target {
    tree: TreeHandle,
    caller: AgentPid,
    node: Node,
}

impl HostState {
    /// Resolve `path` for this agent and check its grants.
    fn target(&mut self, path: &str, what: &str) -> Result<Target, WitCallError> {
        let agent = self.agent_id.clone();
        let state = &self.calls;
        let Some((pid, hub)) = state.access.link.clone() else {
            return Err(WitCallError::Unavailable(
                "this agent is not part of a supervision tree".into(),
            ));
        };
        if self.calls.located.is_none() {
            self.calls.located = hub.locate(&pid);
        }
        let Some((tree, own)) = self.calls.located.clone() else {
            return Err(WitCallError::Unavailable(
                "this agent's tree is not running (yet)".into(),
            ));
        };
        let base = own.rsplit_once('/').map_or(own.as_str(), |(base, _)| base);
        let root = tree.root_name();
        let segments = absolute(path, base, root).map_err(|reason| {
            WitCallError::Invalid(format!(
                "`{}` is not a path: {reason}",
                crate::text::truncate(path, 100)
            ))
        })?;
        let target = segments.join("/");
        if !self
            .calls
            .access
            .grants
            .iter()
            .any(|p| p.matches(&segments, base, root))
        {
            let line =
                format!("{own}: {what} to {target} denied: not granted by the agent's `calls`");
            // The guest decides how often this happens: within its log budget.
            if self.log.admit(std::time::Instant::now(), line.len()) {
                tracing::warn!(target: "agent", agent = &*agent, "{line}");
            }
            return Err(WitCallError::Denied(format!(
                "{own} may not {what} {target}: its spec's `calls` do not grant it"
            )));
        }
        let node = match tree.resolve(&target) {
            Ok(node) if node.kind == NodeKind::Agent => node,
            Ok(node) => {
                return Err(WitCallError::NotFound(format!(
                    "{} is a supervisor, not an agent",
                    node.path
                )));
            }
            Err(_) => return Err(WitCallError::NotFound(format!("no agent at {target}"))),
        };
        Ok(Target {
            tree,
            caller: pid,
            node,
        })
    }
}

/// The WIT error for a failed call to the agent at `path`.
fn wit_error(path: &str, error: TreeCallError) -> WitCallError {
    match error {
        TreeCallError::NotFound(_) => WitCallError::NotFound(format!("no agent at {path}")),
        TreeCallError::NotAnAgent { path, .. } => {
            WitCallError::NotFound(format!("{path} is a supervisor, not an agent"))
        }
        TreeCallError::Crashed { fault, .. } => WitCallError::Crashed(fault.to_string()),
        TreeCallError::Application { error, .. } => WitCallError::Application(error),
        TreeCallError::Timeout { .. } => WitCallError::Timeout,
        e @ (TreeCallError::TooLarge { .. } | TreeCallError::Quarantined { .. }) => {
            WitCallError::Invalid(e.to_string())
        }
        e @ (TreeCallError::NotRunning { .. }
        | TreeCallError::CircuitOpen { .. }
        | TreeCallError::SupervisorGaveUp { .. }
        | TreeCallError::Other { .. }) => WitCallError::Unavailable(e.to_string()),
    }
}

/// The paths of `chain`'s agents in `tree`, for the would-deadlock error.
fn describe_chain(tree: &TreeHandle, caller: &str, chain: &[AgentPid]) -> String {
    let nodes = tree.status();
    let path = |pid: &AgentPid| {
        nodes
            .iter()
            .find(|n| n.id == *pid)
            .map_or_else(|| pid.to_string(), |n| n.path.clone())
    };
    let waits: Vec<String> = chain.iter().map(path).collect();
    format!(
        "{caller} calls {}, which waits for {caller}: {caller} -> {}",
        waits.first().map_or("", String::as_str),
        waits.join(" -> ")
    )
}

impl agents::Host for HostState {
    async fn call(
        &mut self,
        path: String,
        message: String,
        timeout_ms: u32,
    ) -> Result<String, WitCallError> {
        if timeout_ms == 0 {
            return Err(WitCallError::Invalid(
                "the timeout must be at least 1 ms".into(),
            ));
        }
        let wait_at_most = Duration::from_millis(u64::from(timeout_ms)).min(MAX_CALL_TIMEOUT);
        let Target { tree, caller, node } = self.target(&path, "call")?;
        let _waiting = match tree.waits().wait(&caller, &node.id) {
            Ok(guard) => guard,
            Err(chain) => {
                let own = self
                    .calls
                    .located
                    .as_ref()
                    .map_or_else(String::new, |(_, own)| own.clone());
                let why = describe_chain(&tree, &own, &chain);
                if self.log.admit(std::time::Instant::now(), why.len()) {
                    tracing::debug!(target: "agent", agent = &*self.agent_id, "call would deadlock: {why}");
                }
                return Err(WitCallError::WouldDeadlock(why));
            }
        };
        let call = tree.call_node(&node, message);
        match tokio::time::timeout(wait_at_most, call).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(wit_error(&node.path, e)),
            Err(_) => Err(WitCallError::Timeout),
        }
    }

    async fn cast(&mut self, path: String, message: String) -> Result<(), WitCallError> {
        let Target { tree, node, .. } = self.target(&path, "cast to")?;
        tree.cast_node(&node, message)
            .map_err(|e| wit_error(&node.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, target: &str, base: &str) -> bool {
        let target: Vec<&str> = target.split('/').collect();
        CallPattern::parse(pattern)
            .unwrap()
            .matches(&target, base, "root")
    }

    #[test]
    fn patterns_match_whole_segments() {
        assert!(matches("root/tools/*", "root/tools/search", "root"));
        assert!(!matches("root/tools/*", "root/tools", "root"));
        assert!(!matches("root/tools/*", "root/tools/a/b", "root"));
        assert!(matches("root/tools/**", "root/tools/a/b", "root"));
        assert!(!matches("root/tools/**", "root/tools", "root"));
        assert!(matches("root/b", "root/b", "root/team"));
        assert!(!matches("root/b", "root/bb", "root"));
    }

    #[test]
    fn relative_patterns_and_paths_resolve_against_the_callers_supervisor() {
        assert!(matches("helper", "root/team/helper", "root/team"));
        assert!(!matches("helper", "root/helper", "root/team"));
        assert!(matches("../tools/*", "root/tools/x", "root/team"));
        assert!(matches("./*", "root/team/x", "root/team"));
        assert_eq!(
            absolute("../x", "root/team", "root").unwrap(),
            ["root", "x"]
        );
        assert_eq!(
            absolute("root/a", "root/team", "root").unwrap(),
            ["root", "a"]
        );
        assert!(
            absolute("../..", "root/team", "root").is_err(),
            "above the root"
        );
        assert!(
            !matches("../../x", "root/x", "root"),
            "never above the root"
        );
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["", "a//b", "/root/a", "root/a/", "root/**/a", "root/tool*"] {
            assert!(CallPattern::parse(bad).is_err(), "{bad:?}");
        }
        let long = "a/".repeat(40) + "a";
        assert!(CallPattern::parse(&long).is_err());
        assert!(CallPattern::parse(&"a".repeat(MAX_PATH_BYTES + 1)).is_err());
        assert!(CallPattern::parse("root/*/x").is_ok());
    }
}
