//! Supervision-tree files: a TOML description of supervisors, their
//! children, restart policies, limits and WASI grants.
//!
//! ```toml
//! [defaults.limits]            # for every agent that does not say otherwise
//! fuel_per_call = 50_000_000
//! deadline_ms = 1000
//!
//! [supervisor]                 # the root
//! name = "root"
//! strategy = "one_for_one"     # one_for_all, rest_for_one
//! max_restarts = 5             # within time_window_ms
//! time_window_ms = 60_000
//!
//! [[supervisor.children]]      # an agent: it has a `component`
//! name = "echo"
//! component = "agents/echo_agent.wasm"   # relative to this file
//! restart = "permanent"        # transient, temporary
//! shutdown = "5s"              # "brutal_kill", "infinity", "250ms"
//! config = { greeting = "hi" } # JSON handed to init
//! limits = { memory_bytes = 16_777_216, max_timers = 8 }
//! wasi = { env = { LANG = "C" }, inherit_stderr = true, inherit_env = ["OPENAI_API_KEY"] }
//! http = { allowed_hosts = ["https://api.openai.com"], max_concurrent = 4 }
//! calls = ["helper", "root/tools/*"]   # paths it may call; relative to its supervisor
//!
//! [[supervisor.children]]      # a nested supervisor: it has `children`
//! name = "pipeline"
//! strategy = "rest_for_one"
//! [[supervisor.children.children]]
//! name = "stage-1"
//! component = "agents/echo_agent.wasm"
//! ```
//!
//! Loading checks the syntax, the field names (a typo is an error naming the
//! known fields) and every value; [`TreeFile::check`] also compiles each
//! component and checks that it implements the agent world. Every problem
//! names the file, the field and what to write instead.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::runtime::{
    AgentComponent, AgentLimits, CallPattern, HostPattern, HttpGrants, MAX_ALLOWED_HOSTS,
    MAX_CALL_PATTERNS, MAX_HTTP_CONCURRENT, MAX_HTTP_RESPONSE_BYTES, MAX_TIMERS_LIMIT, Preopen,
    Runtime, WasiGrants,
};
use crate::state::{MemoryStateStore, StateStore};
use crate::supervisor::{
    AgentSupervisor, Backoff, BreakerPolicy, ChildSpec, HealthPolicy, RestartIntensity,
    RestartPolicy, RestartStrategy, RestartType, SupervisorConfig, SupervisorSpec,
};
use crate::{
    AgentFactory, AgentPid, AgentSpec, NodeKind, RunningTree, ShutdownPolicy, WasmAgentFactory,
};

/// A problem with a tree file: where, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeProblem {
    /// The tree file.
    pub file: PathBuf,
    /// The field, as a path (`supervisor.children[1].limits.memory_bytes`);
    /// empty for the file as a whole.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The line of the file it is on, when the TOML parser knows it.
    pub line: Option<usize>,
}

impl TreeProblem {
    fn new(file: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            field: field.into(),
            message: message.into(),
            line: None,
        }
    }
}

impl fmt::Display for TreeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if !self.field.is_empty() {
            write!(f, "`{}`: ", self.field)?;
        }
        f.write_str(&self.message)?;
        match self.line {
            Some(line) => write!(f, " (line {line})"),
            None => Ok(()),
        }
    }
}

/// Every problem found in a tree file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TreeError {
    /// The problems, in file order.
    pub problems: Vec<TreeProblem>,
}

impl fmt::Display for TreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawDefaults,
    supervisor: RawNode,
    cluster: Option<RawCluster>,
}

/// `[cluster]`: how the tree runs across hosts (`agent-host run --cluster`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    /// `"10s"`, `"4s"`, `"2500ms"`.
    lease_ttl: Option<String>,
}

/// `placement = { labels = { zone = "a" } }` on a top-level child.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    limits: RawLimits,
    shutdown: Option<String>,
    health: Option<RawHealth>,
    backoff: Option<RawBackoff>,
    breaker: Option<RawBreaker>,
    poison_threshold: Option<i64>,
}

/// `health = { interval_ms = 10_000, timeout_ms = 1_000, threshold = 3 }`;
/// every field optional (the rest from the defaults).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    threshold: Option<i64>,
}

/// `backoff = "immediate"` or `backoff = { base_ms = 100, cap_ms = 10_000 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawBackoff {
    Word(String),
    Exponential {
        base_ms: i64,
        cap_ms: i64,
        #[serde(default)]
        jitter: Option<bool>,
    },
}

/// `breaker = { failures = 5, window_ms = 60_000, cooldown_ms = 5_000,
/// max_cooldown_ms = 60_000 }`; every field optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failures: Option<i64>,
    window_ms: Option<i64>,
    cooldown_ms: Option<i64>,
    max_cooldown_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawStrategy {
    OneForOne,
    OneForAll,
    RestForOne,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawRestart {
    Permanent,
    Transient,
    Temporary,
}

/// One node: a supervisor (it has `children`) or an agent (it has a
/// `component`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    // agent fields
    component: Option<PathBuf>,
    config: Option<toml::Value>,
    limits: Option<RawLimits>,
    wasi: Option<RawWasi>,
    http: Option<RawHttp>,
    calls: Option<Vec<String>>,
    // supervisor fields
    strategy: Option<RawStrategy>,
    max_restarts: Option<i64>,
    time_window_ms: Option<i64>,
    max_children: Option<i64>,
    children: Option<Vec<RawNode>>,
    // agent only
    health: Option<RawHealth>,
    poison_threshold: Option<i64>,
    // both
    restart: Option<RawRestart>,
    shutdown: Option<String>,
    backoff: Option<RawBackoff>,
    breaker: Option<RawBreaker>,
    // top-level children only (cluster mode)
    placement: Option<RawPlacement>,
}

/// Limits as written: signed, so that a negative value gets a clear message
/// instead of a type error.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    fuel_per_call: Option<i64>,
    fuel_per_lifetime: Option<i64>,
    memory_bytes: Option<i64>,
    table_elements: Option<i64>,
    instances: Option<i64>,
    state_bytes: Option<i64>,
    crash_output_bytes: Option<i64>,
    log_records_per_second: Option<i64>,
    log_bytes_per_second: Option<i64>,
    deadline_ms: Option<i64>,
    max_timers: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    allowed_hosts: Vec<String>,
    max_concurrent: Option<i64>,
    max_response_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWasi {
    #[serde(default)]
    inherit_stdout: bool,
    #[serde(default)]
    inherit_stderr: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    inherit_env: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    preopens: Vec<RawPreopen>,
    #[serde(default)]
    network: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreopen {
    host: PathBuf,
    guest: String,
    #[serde(default = "yes")]
    read_only: bool,
}

fn yes() -> bool {
    true
}

/// A validated tree: every value checked, component paths resolved.
#[derive(Debug, Clone)]
pub struct TreeFile {
    /// The file it came from.
    pub path: PathBuf,
    /// The root supervisor.
    pub root: TreeSupervisor,
    /// How the tree runs across hosts (`[cluster]` and the top-level
    /// children's `placement`); unused on a single host.
    pub cluster: ClusterSettings,
}

/// The default lease time of a placement unit in cluster mode.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// The shortest lease time accepted: renewals every quarter of it must
/// reach the NATS server in time.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(400);

/// The cluster settings of a tree file: `[cluster]` and the `placement` of
/// the root's children (the placement units).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `[cluster] lease_ttl`: how long a unit's lease lasts without renewal
    /// (default [`DEFAULT_LEASE_TTL`]).
    pub lease_ttl: Duration,
    /// The labels a host must have (`--labels`) to run each top-level child,
    /// by the child's name; a child not listed runs on any host.
    pub placement: BTreeMap<String, BTreeMap<String, String>>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            lease_ttl: DEFAULT_LEASE_TTL,
            placement: BTreeMap::new(),
        }
    }
}

/// A supervisor of a tree file.
#[derive(Debug, Clone)]
pub struct TreeSupervisor {
    /// Its name (unique among its siblings).
    pub name: String,
    /// Its strategy and intensity.
    pub policy: RestartPolicy,
    /// Most children it accepts.
    pub max_children: usize,
    /// Its restart type (when it is a child).
    pub restart: RestartType,
    /// Its shutdown policy (when it is a child).
    pub shutdown: ShutdownPolicy,
    /// How long its parent waits before restarting it (when it is a child).
    pub backoff: Backoff,
    /// Its circuit breaker in its parent, if any (when it is a child).
    pub breaker: Option<BreakerPolicy>,
    /// Its children, in start order.
    pub children: Vec<TreeNode>,
}

/// An agent of a tree file.
#[derive(Debug, Clone)]
pub struct TreeAgent {
    /// Its name (unique among its siblings).
    pub name: String,
    /// The component file, resolved against the tree file's folder.
    pub component: PathBuf,
    /// JSON configuration handed to `init`.
    pub config: serde_json::Value,
    /// When its supervisor restarts it.
    pub restart: RestartType,
    /// How its supervisor stops it.
    pub shutdown: ShutdownPolicy,
    /// Limits (defaults merged in).
    pub limits: AgentLimits,
    /// What it may reach through WASI.
    pub wasi: WasiGrants,
    /// The outbound HTTP it may make.
    pub http: HttpGrants,
    /// The agents it may call and cast to.
    pub calls: Vec<CallPattern>,
    /// How its health is checked (defaults merged in).
    pub health: HealthPolicy,
    /// How long its supervisor waits before restarting it.
    pub backoff: Backoff,
    /// Its circuit breaker, if any.
    pub breaker: Option<BreakerPolicy>,
    /// Crashes in a row on one message that quarantine it (0: never).
    pub poison_threshold: u32,
}

/// A child in a tree file.
#[derive(Debug, Clone)]
pub enum TreeNode {
    /// An agent (it has a `component`).
    Agent(Box<TreeAgent>),
    /// A nested supervisor.
    Supervisor(TreeSupervisor),
}

impl TreeNode {
    /// The node's name.
    pub fn name(&self) -> &str {
        match self {
            TreeNode::Agent(a) => &a.name,
            TreeNode::Supervisor(s) => &s.name,
        }
    }
}

/// Collects problems while a raw file is turned into a [`TreeFile`].
struct Checker<'a> {
    file: &'a Path,
    dir: PathBuf,
    problems: Vec<TreeProblem>,
    /// The `placement` labels of the root's children, by name.
    placement: BTreeMap<String, BTreeMap<String, String>>,
}

impl Checker<'_> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems
            .push(TreeProblem::new(self.file, field, message));
    }

    fn positive(&mut self, field: &str, value: Option<i64>, what: &str) -> Option<u64> {
        match value {
            Some(v) if v > 0 => Some(v as u64),
            Some(v) => {
                self.problem(
                    field,
                    format!("must be a positive {what}, got {v}; remove it for the default"),
                );
                None
            }
            None => None,
        }
    }

    fn limits(&mut self, field: &str, base: &AgentLimits, raw: &RawLimits) -> AgentLimits {
        let mut l = base.clone();
        let f = |name: &str| format!("{field}.{name}");
        if let Some(v) = self.positive(&f("fuel_per_call"), raw.fuel_per_call, "amount of fuel") {
            l.fuel_per_call = Some(v);
        }
        if let Some(v) = self.positive(
            &f("fuel_per_lifetime"),
            raw.fuel_per_lifetime,
            "amount of fuel",
        ) {
            l.fuel_per_lifetime = Some(v);
        }
        if let Some(v) = self.positive(&f("memory_bytes"), raw.memory_bytes, "number of bytes") {
            if v < 1 << 16 {
                self.problem(
                    &f("memory_bytes"),
                    format!("{v} is below one 64 KiB WebAssembly page; use at least 65536 (a Rust agent needs about 1.1 MiB)"),
                );
            } else {
                l.memory_bytes = usize::try_from(v).unwrap_or(usize::MAX);
            }
        }
        if let Some(v) = self.positive(&f("table_elements"), raw.table_elements, "count") {
            l.table_elements = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = self.positive(&f("instances"), raw.instances, "count") {
            l.instances = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = self.positive(&f("state_bytes"), raw.state_bytes, "number of bytes") {
            l.state_bytes = Some(usize::try_from(v).unwrap_or(usize::MAX));
        }
        if let Some(v) = self.positive(
            &f("crash_output_bytes"),
            raw.crash_output_bytes,
            "number of bytes",
        ) {
            l.crash_output_bytes = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = self.positive(
            &f("log_records_per_second"),
            raw.log_records_per_second,
            "count",
        ) {
            l.log_records_per_second = u32::try_from(v).unwrap_or(u32::MAX);
        }
        if let Some(v) = self.positive(
            &f("log_bytes_per_second"),
            raw.log_bytes_per_second,
            "number of bytes",
        ) {
            l.log_bytes_per_second = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = self.positive(&f("deadline_ms"), raw.deadline_ms, "number of milliseconds")
        {
            l.deadline = Duration::from_millis(v);
        }
        match raw.max_timers {
            Some(v) if !(0..=i64::from(MAX_TIMERS_LIMIT)).contains(&v) => self.problem(
                &f("max_timers"),
                format!("must be between 0 (no timers) and {MAX_TIMERS_LIMIT}, got {v}"),
            ),
            Some(v) => l.max_timers = u32::try_from(v).unwrap_or(MAX_TIMERS_LIMIT),
            None => {}
        }
        l
    }

    /// A count or size between 1 and `max`, or `default` when not given.
    fn bounded(&mut self, field: &str, value: Option<i64>, max: u64, default: u64) -> u64 {
        match value {
            Some(v) if v >= 1 && (v as u64) <= max => v as u64,
            Some(v) => {
                self.problem(
                    field,
                    format!("must be between 1 and {max}, got {v}; remove it for the default ({default})"),
                );
                default
            }
            None => default,
        }
    }

    fn http(&mut self, field: &str, raw: RawHttp) -> HttpGrants {
        let defaults = HttpGrants::default();
        if raw.allowed_hosts.is_empty() {
            self.problem(
                &format!("{field}.allowed_hosts"),
                "grants no host; list the hosts the agent may reach, such as \"https://api.openai.com\" or \"http://127.0.0.1:*\", or remove `http`",
            );
        }
        if raw.allowed_hosts.len() > MAX_ALLOWED_HOSTS {
            self.problem(
                &format!("{field}.allowed_hosts"),
                format!(
                    "{} hosts are more than {MAX_ALLOWED_HOSTS}",
                    raw.allowed_hosts.len()
                ),
            );
        }
        let mut allowed_hosts = Vec::new();
        for (i, text) in raw.allowed_hosts.iter().enumerate() {
            match HostPattern::parse(text) {
                Ok(p) => allowed_hosts.push(p),
                Err(e) => self.problem(&format!("{field}.allowed_hosts[{i}]"), e.to_string()),
            }
        }
        let max_concurrent = self.bounded(
            &format!("{field}.max_concurrent"),
            raw.max_concurrent,
            u64::from(MAX_HTTP_CONCURRENT),
            u64::from(defaults.max_concurrent),
        );
        let max_response_bytes = self.bounded(
            &format!("{field}.max_response_bytes"),
            raw.max_response_bytes,
            MAX_HTTP_RESPONSE_BYTES,
            defaults.max_response_bytes,
        );
        HttpGrants {
            allowed_hosts,
            max_concurrent: u32::try_from(max_concurrent).unwrap_or(defaults.max_concurrent),
            max_response_bytes,
        }
    }

    fn calls(&mut self, field: &str, raw: Vec<String>) -> Vec<CallPattern> {
        if raw.len() > MAX_CALL_PATTERNS {
            self.problem(
                field,
                format!("{} patterns are more than {MAX_CALL_PATTERNS}", raw.len()),
            );
        }
        let mut calls = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            match CallPattern::parse(text) {
                Ok(p) => calls.push(p),
                Err(e) => self.problem(
                    &format!("{field}[{i}]"),
                    format!("{e}; write a path such as \"root/tools/search\", \"root/tools/*\" or \"helper\" (a sibling)"),
                ),
            }
        }
        calls
    }

    fn shutdown(
        &mut self,
        field: &str,
        text: Option<&str>,
        default: ShutdownPolicy,
    ) -> ShutdownPolicy {
        let Some(text) = text else { return default };
        match parse_shutdown(text) {
            Some(policy) => policy,
            None => {
                self.problem(
                    field,
                    format!("`{text}` is not a shutdown policy; write \"brutal_kill\", \"infinity\" or a time such as \"5s\" or \"250ms\""),
                );
                default
            }
        }
    }

    fn node(&mut self, field: &str, raw: RawNode, defaults: &Defaults) -> Option<TreeNode> {
        let is_supervisor = raw.children.is_some() || raw.strategy.is_some();
        if is_supervisor {
            if raw.component.is_some() {
                self.problem(
                    field,
                    "has both `component` (an agent) and `children`/`strategy` (a supervisor); keep one",
                );
            }
            self.agent_only_fields(field, &raw);
            Some(TreeNode::Supervisor(self.supervisor(field, raw, defaults)))
        } else {
            self.agent(field, raw, defaults)
                .map(|a| TreeNode::Agent(Box::new(a)))
        }
    }

    /// A problem for each field of a supervisor that only agents take.
    fn agent_only_fields(&mut self, field: &str, raw: &RawNode) {
        for (name, set) in [
            ("config", raw.config.is_some()),
            ("limits", raw.limits.is_some()),
            ("wasi", raw.wasi.is_some()),
            ("health", raw.health.is_some()),
            ("poison_threshold", raw.poison_threshold.is_some()),
            ("http", raw.http.is_some()),
            ("calls", raw.calls.is_some()),
        ] {
            if set {
                self.problem(
                    &format!("{field}.{name}"),
                    "only agents take this; move it to the agents under `children` (or to [defaults])",
                );
            }
        }
    }

    fn supervisor(&mut self, field: &str, raw: RawNode, defaults: &Defaults) -> TreeSupervisor {
        let strategy = match raw.strategy {
            Some(RawStrategy::OneForAll) => RestartStrategy::OneForAll,
            Some(RawStrategy::RestForOne) => RestartStrategy::RestForOne,
            Some(RawStrategy::OneForOne) | None => RestartStrategy::OneForOne,
        };
        let mut intensity = RestartIntensity::default();
        match raw.max_restarts {
            Some(v) if v < 0 => self.problem(
                &format!("{field}.max_restarts"),
                format!("must be 0 or more, got {v} (0 means: give up on the first crash)"),
            ),
            Some(v) => intensity.max_restarts = u32::try_from(v).unwrap_or(u32::MAX),
            None => {}
        }
        if let Some(ms) = self.positive(
            &format!("{field}.time_window_ms"),
            raw.time_window_ms,
            "number of milliseconds",
        ) {
            intensity.time_window = Duration::from_millis(ms);
        }
        let max_children = self
            .positive(&format!("{field}.max_children"), raw.max_children, "count")
            .map_or(SupervisorConfig::default().max_children, |v| {
                usize::try_from(v).unwrap_or(usize::MAX)
            });
        let children_raw = raw.children.unwrap_or_default();
        let mut children = Vec::with_capacity(children_raw.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, mut child) in children_raw.into_iter().enumerate() {
            let child_field = format!("{field}.children[{i}]");
            if let Some(placement) = child.placement.take() {
                if field == "supervisor" {
                    self.placement_labels(&child_field, &child.name, placement);
                } else {
                    self.problem(
                        &format!("{child_field}.placement"),
                        "only the root's children are placed on hosts (each with its subtree); move `placement` to the top-level child that contains this node",
                    );
                }
            }
            if child.name.is_empty() || child.name.contains('/') {
                self.problem(
                    &format!("{child_field}.name"),
                    format!(
                        "`{}` cannot name a node: use a non-empty name without `/` (paths such as root/team/echo are built from names)",
                        child.name
                    ),
                );
            }
            if let Some(first) = names.insert(child.name.clone(), i) {
                self.problem(
                    &format!("{child_field}.name"),
                    format!(
                        "`{}` is already the name of children[{first}]; names must be unique among siblings",
                        child.name
                    ),
                );
            }
            if let Some(node) = self.node(&child_field, child, defaults) {
                children.push(node);
            }
        }
        if children.len() > max_children {
            self.problem(
                &format!("{field}.max_children"),
                format!(
                    "{} children are declared but max_children is {max_children}; raise it",
                    children.len()
                ),
            );
        }
        TreeSupervisor {
            backoff: self.backoff(&format!("{field}.backoff"), defaults.backoff, raw.backoff),
            breaker: self.breaker(&format!("{field}.breaker"), defaults.breaker, raw.breaker),
            name: raw.name,
            policy: RestartPolicy::new(strategy, intensity),
            max_children,
            restart: restart_type(raw.restart),
            shutdown: self.shutdown(
                &format!("{field}.shutdown"),
                raw.shutdown.as_deref(),
                ShutdownPolicy::Infinity,
            ),
            children,
        }
    }

    fn agent(&mut self, field: &str, raw: RawNode, defaults: &Defaults) -> Option<TreeAgent> {
        for (name, set) in [
            ("max_restarts", raw.max_restarts.is_some()),
            ("time_window_ms", raw.time_window_ms.is_some()),
            ("max_children", raw.max_children.is_some()),
        ] {
            if set {
                self.problem(
                    &format!("{field}.{name}"),
                    "only supervisors take this; give the node `children` to make it a supervisor, or remove it",
                );
            }
        }
        let Some(component) = raw.component else {
            self.problem(
                field,
                format!(
                    "`{}` has no `component`; add `component = \"path/to/agent.wasm\"` (relative to the tree file), or `children` to make it a supervisor",
                    raw.name
                ),
            );
            return None;
        };
        let resolved = self.dir.join(&component);
        if !resolved.is_file() {
            self.problem(
                &format!("{field}.component"),
                format!(
                    "no file at {} (paths are relative to the tree file's folder); build the agent with `cargo build --release --target wasm32-wasip2` and point here to its .wasm",
                    resolved.display()
                ),
            );
        }
        let config = match raw.config.map(serde_json::to_value).transpose() {
            Ok(config) => config.unwrap_or(serde_json::Value::Object(Default::default())),
            Err(e) => {
                self.problem(
                    &format!("{field}.config"),
                    format!("cannot be turned into JSON: {e}"),
                );
                serde_json::Value::Null
            }
        };
        let limits = self.limits(
            &format!("{field}.limits"),
            &defaults.limits,
            &raw.limits.unwrap_or_default(),
        );
        let wasi = raw
            .wasi
            .map(|w| self.wasi(&format!("{field}.wasi"), w))
            .unwrap_or_default();
        let http = raw
            .http
            .map(|h| self.http(&format!("{field}.http"), h))
            .unwrap_or_default();
        let calls = raw
            .calls
            .map(|c| self.calls(&format!("{field}.calls"), c))
            .unwrap_or_default();
        Some(TreeAgent {
            name: raw.name,
            component: resolved,
            config,
            restart: restart_type(raw.restart),
            shutdown: self.shutdown(
                &format!("{field}.shutdown"),
                raw.shutdown.as_deref(),
                defaults.shutdown,
            ),
            limits,
            wasi,
            http,
            calls,
            health: self.health(&format!("{field}.health"), defaults.health, raw.health),
            backoff: self.backoff(&format!("{field}.backoff"), defaults.backoff, raw.backoff),
            breaker: self.breaker(&format!("{field}.breaker"), defaults.breaker, raw.breaker),
            poison_threshold: self
                .count(&format!("{field}.poison_threshold"), raw.poison_threshold)
                .unwrap_or(defaults.poison_threshold),
        })
    }

    /// A count that may be zero.
    fn count(&mut self, field: &str, value: Option<i64>) -> Option<u32> {
        match value {
            Some(v) if v >= 0 => Some(u32::try_from(v).unwrap_or(u32::MAX)),
            Some(v) => {
                self.problem(field, format!("must be 0 or more, got {v}"));
                None
            }
            None => None,
        }
    }

    /// A duration in milliseconds that may be zero.
    fn millis(&mut self, field: &str, value: Option<i64>) -> Option<Duration> {
        match value {
            Some(v) if v >= 0 => Some(Duration::from_millis(v as u64)),
            Some(v) => {
                self.problem(
                    field,
                    format!("must be 0 or more milliseconds, got {v}; remove it for the default"),
                );
                None
            }
            None => None,
        }
    }

    fn health(&mut self, field: &str, base: HealthPolicy, raw: Option<RawHealth>) -> HealthPolicy {
        let Some(raw) = raw else { return base };
        let f = |name: &str| format!("{field}.{name}");
        let mut h = base;
        if let Some(d) = self.millis(&f("interval_ms"), raw.interval_ms) {
            h.interval = d;
        }
        if let Some(ms) = self.positive(&f("timeout_ms"), raw.timeout_ms, "number of milliseconds")
        {
            h.timeout = Duration::from_millis(ms);
        }
        if let Some(n) = self.positive(&f("threshold"), raw.threshold, "count") {
            h.threshold = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Err(why) = h.validate() {
            self.problem(field, why);
        }
        h
    }

    fn backoff(&mut self, field: &str, base: Backoff, raw: Option<RawBackoff>) -> Backoff {
        match raw {
            None => base,
            Some(RawBackoff::Word(word)) if word == "immediate" => Backoff::Immediate,
            Some(RawBackoff::Word(word)) => {
                self.problem(
                    field,
                    format!(
                        "`{word}` is not a backoff; write \"immediate\" or {{ base_ms = 100, cap_ms = 10_000 }}"
                    ),
                );
                base
            }
            Some(RawBackoff::Exponential {
                base_ms,
                cap_ms,
                jitter,
            }) => {
                let f = |name: &str| format!("{field}.{name}");
                let b = self.positive(&f("base_ms"), Some(base_ms), "number of milliseconds");
                let c = self.positive(&f("cap_ms"), Some(cap_ms), "number of milliseconds");
                let (Some(b), Some(c)) = (b, c) else {
                    return base;
                };
                let backoff = Backoff::Exponential {
                    base: Duration::from_millis(b),
                    cap: Duration::from_millis(c),
                    jitter: jitter.unwrap_or(true),
                };
                if let Err(why) = backoff.validate() {
                    self.problem(field, why);
                }
                backoff
            }
        }
    }

    fn breaker(
        &mut self,
        field: &str,
        base: Option<BreakerPolicy>,
        raw: Option<RawBreaker>,
    ) -> Option<BreakerPolicy> {
        let Some(raw) = raw else { return base };
        let f = |name: &str| format!("{field}.{name}");
        let mut b = base.unwrap_or(DEFAULT_BREAKER);
        if let Some(n) = self.positive(&f("failures"), raw.failures, "count") {
            b.failures = u32::try_from(n).unwrap_or(u32::MAX);
        }
        for (name, value, slot) in [
            ("window_ms", raw.window_ms, &mut b.window),
            ("cooldown_ms", raw.cooldown_ms, &mut b.cooldown),
            ("max_cooldown_ms", raw.max_cooldown_ms, &mut b.max_cooldown),
        ] {
            if let Some(ms) = self.positive(&f(name), value, "number of milliseconds") {
                *slot = Duration::from_millis(ms);
            }
        }
        if let Err(why) = b.validate() {
            self.problem(field, why);
        }
        Some(b)
    }

    fn wasi(&mut self, field: &str, raw: RawWasi) -> WasiGrants {
        for (i, name) in raw.inherit_env.iter().enumerate() {
            let f = format!("{field}.inherit_env[{i}]");
            if name.is_empty() || name.contains(['=', '\0']) {
                self.problem(
                    &f,
                    format!(
                        "`{name}` cannot name an environment variable (empty, or with `=` or NUL)"
                    ),
                );
            } else if raw.env.contains_key(name) {
                self.problem(
                    &f,
                    format!("`{name}` is also set in `env`; keep one (`inherit_env` passes the host's value)"),
                );
            }
        }
        WasiGrants {
            inherit_stdout: raw.inherit_stdout,
            inherit_stderr: raw.inherit_stderr,
            env: raw.env.into_iter().collect(),
            inherit_env: raw.inherit_env,
            args: raw.args,
            preopens: raw
                .preopens
                .into_iter()
                .map(|p| Preopen {
                    host: self.dir.join(p.host),
                    guest: p.guest,
                    read_only: p.read_only,
                })
                .collect(),
            network: raw.network,
        }
    }
}

impl Checker<'_> {
    /// `[cluster] lease_ttl`: a time such as `"10s"` or `"2500ms"`.
    fn lease_ttl(&mut self, raw: Option<&str>) -> Duration {
        let Some(text) = raw else {
            return DEFAULT_LEASE_TTL;
        };
        match parse_shutdown(text) {
            Some(ShutdownPolicy::Timeout(d)) if d >= MIN_LEASE_TTL => d,
            _ => {
                self.problem(
                    "cluster.lease_ttl",
                    format!(
                        "`{text}` is not a lease time: give seconds or milliseconds such as \"10s\" or \"2500ms\", at least {} ms; remove it for the default (10s)",
                        MIN_LEASE_TTL.as_millis()
                    ),
                );
                DEFAULT_LEASE_TTL
            }
        }
    }

    /// A top-level child's `placement`: non-empty label names and values.
    fn placement_labels(&mut self, field: &str, name: &str, raw: RawPlacement) {
        for (k, v) in &raw.labels {
            if !valid_label(k) || !valid_label(v) {
                self.problem(
                    &format!("{field}.placement.labels"),
                    format!(
                        "`{k} = \"{v}\"`: label names and values are non-empty and use only letters, digits, `-`, `_` and `.`"
                    ),
                );
            }
        }
        self.placement.insert(name.to_owned(), raw.labels);
    }

    /// Every `calls` pattern must match an agent of the tree other than the
    /// caller: one that matches none is a typo (or a path that goes above
    /// the root).
    fn check_calls(&mut self, tree: &TreeFile) {
        let nodes = tree.nodes();
        let root = &tree.root.name;
        let paths = tree.agent_paths();
        for ((field, agent), own) in tree.agents().into_iter().zip(&paths) {
            for (i, pattern) in agent.calls.iter().enumerate() {
                let reaches = nodes.iter().any(|(path, kind)| {
                    *kind == NodeKind::Agent && path != own && pattern.matches_path(path, own, root)
                });
                if !reaches {
                    let agents: Vec<&str> = nodes
                        .iter()
                        .filter(|(p, k)| *k == NodeKind::Agent && p != own)
                        .map(|(p, _)| p.as_str())
                        .collect();
                    self.problem(
                        &format!("{field}.calls[{i}]"),
                        format!(
                            "`{pattern}` matches no other agent of this tree (relative paths start at {}); its agents are: {}",
                            own.rsplit_once('/').map_or(own.as_str(), |(base, _)| base),
                            if agents.is_empty() { "none".to_owned() } else { agents.join(", ") }
                        ),
                    );
                }
            }
        }
    }
}

struct Defaults {
    limits: AgentLimits,
    shutdown: ShutdownPolicy,
    health: HealthPolicy,
    backoff: Backoff,
    breaker: Option<BreakerPolicy>,
    poison_threshold: u32,
}

/// The fields of a `breaker` table that are not given.
const DEFAULT_BREAKER: BreakerPolicy = BreakerPolicy {
    failures: 5,
    window: Duration::from_secs(60),
    cooldown: Duration::from_secs(5),
    max_cooldown: Duration::from_secs(60),
};

fn restart_type(raw: Option<RawRestart>) -> RestartType {
    match raw {
        Some(RawRestart::Transient) => RestartType::Transient,
        Some(RawRestart::Temporary) => RestartType::Temporary,
        Some(RawRestart::Permanent) | None => RestartType::Permanent,
    }
}

/// Whether `s` may be a label name or value (`--labels`, `placement`).
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `"brutal_kill"`, `"infinity"`, `"5s"`, `"250ms"`.
fn parse_shutdown(text: &str) -> Option<ShutdownPolicy> {
    match text {
        "brutal_kill" => Some(ShutdownPolicy::BrutalKill),
        "infinity" => Some(ShutdownPolicy::Infinity),
        _ => {
            let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
            let n: u64 = number.parse().ok()?;
            let d = match unit {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                _ => return None,
            };
            (!d.is_zero()).then_some(ShutdownPolicy::Timeout(d))
        }
    }
}

/// Turn a parse error into a problem that names the field (as a path such as
/// `supervisor.children[1].strategy`) and, for a misspelt name, suggests the
/// closest known one.
fn parse_problem(file: &Path, text: &str, field: String, e: toml::de::Error) -> TreeProblem {
    let line = e.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        before.matches('\n').count() + 1
    });
    let message = e.message().trim();
    let hint = did_you_mean(message)
        .map(|known| format!("; did you mean `{known}`?"))
        .unwrap_or_default();
    TreeProblem {
        line,
        ..TreeProblem::new(file, field, format!("{message}{hint}"))
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown
/// variant"), the expected name closest to `x`, if it is close.
fn did_you_mean(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (given, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|known| (edit_distance(given, known), known))
        .filter(|(d, known)| *d <= known.len().max(given.len()) / 3 + 1)
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

/// Levenshtein distance, for short identifiers.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

impl TreeFile {
    /// Read and check the tree file at `path` (syntax, field names, values,
    /// component files present). Components are not compiled: see
    /// [`check`](Self::check).
    ///
    /// # Errors
    ///
    /// A [`TreeError`] with every problem found, each naming the file, the
    /// field and what to do.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TreeError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TreeError {
            problems: vec![TreeProblem::new(
                path,
                "",
                format!("cannot read the file: {e}"),
            )],
        })?;
        Self::parse(path, &text)
    }

    /// Check `text` as if it were the content of the file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TreeError> {
        let problem = |field: String, e| TreeError {
            problems: vec![parse_problem(path, text, field, e)],
        };
        let document =
            toml::de::Deserializer::parse(text).map_err(|e| problem(String::new(), e))?;
        let raw: RawFile = serde_path_to_error::deserialize(document).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            problem(field, e.into_inner())
        })?;
        let mut checker = Checker {
            file: path,
            dir: path.parent().map(Path::to_owned).unwrap_or_default(),
            problems: Vec::new(),
            placement: BTreeMap::new(),
        };
        let lease_ttl = checker.lease_ttl(raw.cluster.unwrap_or_default().lease_ttl.as_deref());
        let defaults = Defaults {
            limits: checker.limits(
                "defaults.limits",
                &AgentLimits::default(),
                &raw.defaults.limits,
            ),
            shutdown: checker.shutdown(
                "defaults.shutdown",
                raw.defaults.shutdown.as_deref(),
                ShutdownPolicy::default(),
            ),
            health: checker.health(
                "defaults.health",
                SupervisorConfig::default().health_policy(),
                raw.defaults.health,
            ),
            backoff: checker.backoff("defaults.backoff", Backoff::Immediate, raw.defaults.backoff),
            breaker: checker.breaker("defaults.breaker", None, raw.defaults.breaker),
            poison_threshold: checker
                .count("defaults.poison_threshold", raw.defaults.poison_threshold)
                .unwrap_or(crate::agent::DEFAULT_POISON_THRESHOLD),
        };
        if raw.supervisor.component.is_some() {
            checker.problem(
                "supervisor.component",
                "the root must be a supervisor; put the agent under [[supervisor.children]]",
            );
        }
        if raw.supervisor.placement.is_some() {
            checker.problem(
                "supervisor.placement",
                "the root runs on every host; put `placement` on its children",
            );
        }
        checker.agent_only_fields("supervisor", &raw.supervisor);
        let root = checker.supervisor("supervisor", raw.supervisor, &defaults);
        if checker.problems.is_empty() {
            let tree = TreeFile {
                path: path.to_owned(),
                root,
                cluster: ClusterSettings {
                    lease_ttl,
                    placement: std::mem::take(&mut checker.placement),
                },
            };
            checker.check_calls(&tree);
            if !checker.problems.is_empty() {
                return Err(TreeError {
                    problems: checker.problems,
                });
            }
            Ok(tree)
        } else {
            Err(TreeError {
                problems: checker.problems,
            })
        }
    }

    /// Every node of the tree (the root excepted) with its path
    /// (`root/team/echo`), depth first in start order, as
    /// [`RunningTree::status`](crate::TreeHandle::status) lists them.
    pub fn nodes(&self) -> Vec<(String, NodeKind)> {
        fn walk(s: &TreeSupervisor, prefix: &str, out: &mut Vec<(String, NodeKind)>) {
            for child in &s.children {
                let path = format!("{prefix}/{}", child.name());
                match child {
                    TreeNode::Agent(_) => out.push((path, NodeKind::Agent)),
                    TreeNode::Supervisor(nested) => {
                        out.push((path.clone(), NodeKind::Supervisor));
                        walk(nested, &path, out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root.name, &mut out);
        out
    }

    /// Every agent of the tree with its field path, depth first.
    pub fn agents(&self) -> Vec<(String, &TreeAgent)> {
        fn walk<'a>(s: &'a TreeSupervisor, field: &str, out: &mut Vec<(String, &'a TreeAgent)>) {
            for (i, child) in s.children.iter().enumerate() {
                let f = format!("{field}.children[{i}]");
                match child {
                    TreeNode::Agent(a) => out.push((f, a)),
                    TreeNode::Supervisor(s) => walk(s, &f, out),
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, "supervisor", &mut out);
        out
    }

    /// The path of every agent, in the order of [`agents`](Self::agents).
    fn agent_paths(&self) -> Vec<String> {
        fn walk(s: &TreeSupervisor, prefix: &str, out: &mut Vec<String>) {
            for child in &s.children {
                let path = format!("{prefix}/{}", child.name());
                match child {
                    TreeNode::Agent(_) => out.push(path),
                    TreeNode::Supervisor(nested) => walk(nested, &path, out),
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root.name, &mut out);
        out
    }

    /// Compile every component and check it implements the agent world; the
    /// loaded components by path, or every problem found.
    pub fn check(&self, runtime: &Runtime) -> Result<HashMap<PathBuf, AgentComponent>, TreeError> {
        let mut components = HashMap::new();
        let mut problems = Vec::new();
        for (field, agent) in self.agents() {
            if components.contains_key(&agent.component) {
                continue;
            }
            match runtime.load_file(&agent.component) {
                Ok(c) => {
                    components.insert(agent.component.clone(), c);
                }
                Err(e) => problems.push(TreeProblem::new(
                    &self.path,
                    format!("{field}.component"),
                    e.to_string(),
                )),
            }
        }
        if problems.is_empty() {
            Ok(components)
        } else {
            Err(TreeError { problems })
        }
    }

    /// Build the root supervisor (not started) over `runtime`, with the
    /// agents' state in memory (see [`build_with_state`](Self::build_with_state)):
    /// every component compiled, every node named as in the file, so that
    /// paths are those of the file (`root/pipeline/stage-1`).
    ///
    /// # Errors
    ///
    /// Every component that cannot be loaded, as a [`TreeError`].
    pub fn build(&self, runtime: &Runtime) -> Result<AgentSupervisor, TreeError> {
        self.build_with_state(runtime, Arc::new(MemoryStateStore::default()))
    }

    /// Like [`build`](Self::build), with the agents' state in `state` (a
    /// [`RedbStateStore`](crate::RedbStateStore) to keep it across restarts
    /// of the host).
    ///
    /// Each node's id is derived from its path in the tree
    /// ([`AgentPid::named`]), so every build of the same tree gives its
    /// agents the same ids, and with them the state they stored: two trees
    /// that share a store share the state of agents with the same path.
    ///
    /// # Errors
    ///
    /// Every component that cannot be loaded, as a [`TreeError`].
    pub fn build_with_state(
        &self,
        runtime: &Runtime,
        state: Arc<dyn StateStore>,
    ) -> Result<AgentSupervisor, TreeError> {
        let (root, children) = self.build_units(runtime, state)?;
        Ok(children
            .into_iter()
            .fold(root, |root, (_, child)| root.with_child(child)))
    }

    /// Like [`build_with_state`](Self::build_with_state), for a host of a
    /// cluster: the root supervisor without children, and the spec of each
    /// of its children (the placement units) by name, in file order, to be
    /// added ([`TreeHandle::add_child`](crate::TreeHandle::add_child)) when
    /// this host wins a unit's lease.
    ///
    /// # Errors
    ///
    /// Every component that cannot be loaded, as a [`TreeError`].
    pub fn build_units(
        &self,
        runtime: &Runtime,
        state: Arc<dyn StateStore>,
    ) -> Result<(AgentSupervisor, Vec<(String, ChildSpec)>), TreeError> {
        let components = self.check(runtime)?;
        let mut factory = WasmAgentFactory::new(runtime.clone()).with_state_store(state);
        for (path, component) in components {
            factory = factory.with_component(path.display().to_string(), component);
        }
        let factory: Arc<dyn AgentFactory> = Arc::new(factory);
        let config = supervisor_config(&self.root);
        let sup = AgentSupervisor::new(config, factory.clone()).with_name(&self.root.name);
        let units = self
            .root
            .children
            .iter()
            .map(|child| {
                (
                    child.name().to_owned(),
                    child_spec(child, &self.root.name, &factory),
                )
            })
            .collect();
        Ok((sup, units))
    }

    /// Build the tree and start it.
    ///
    /// # Errors
    ///
    /// [`StartError::File`] if a component cannot be loaded,
    /// [`StartError::Start`] if a child fails to start (the message names
    /// its path).
    pub async fn start(&self, runtime: &Runtime) -> Result<RunningTree, StartError> {
        let root = self.build(runtime)?;
        Ok(RunningTree::start(root).await?)
    }
}

/// Why a tree file's tree did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The file's components could not be loaded.
    #[error(transparent)]
    File(#[from] TreeError),
    /// A child failed to start.
    #[error("the tree did not start: {0}")]
    Start(#[from] crate::SupervisionError),
}

fn supervisor_config(s: &TreeSupervisor) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: s.policy.clone(),
        max_children: s.max_children,
        ..SupervisorConfig::default()
    }
}

/// The spec of `node`, a child of the supervisor at `parent`.
fn child_spec(node: &TreeNode, parent: &str, factory: &Arc<dyn AgentFactory>) -> ChildSpec {
    let path = format!("{parent}/{}", node.name());
    match node {
        TreeNode::Agent(a) => {
            let mut spec = AgentSpec::new(a.component.display().to_string(), a.config.clone())
                .with_id(AgentPid::named(&path))
                .with_name(a.name.clone())
                .with_restart_type(a.restart)
                .with_shutdown(a.shutdown)
                .with_limits(a.limits.clone())
                .with_wasi(a.wasi.clone())
                .with_http(a.http.clone())
                .with_calls(a.calls.clone())
                .with_health(a.health)
                .with_backoff(a.backoff)
                .with_poison_threshold(a.poison_threshold);
            spec.breaker = a.breaker;
            ChildSpec::Agent(spec)
        }
        TreeNode::Supervisor(s) => {
            let mut spec = SupervisorSpec::new(supervisor_config(s), factory.clone())
                .with_id(AgentPid::named(&path))
                .with_name(s.name.clone())
                .with_restart_type(s.restart)
                .with_shutdown(s.shutdown)
                .with_backoff(s.backoff);
            spec.breaker = s.breaker;
            for child in &s.children {
                spec = spec.with_child(child_spec(child, &path, factory));
            }
            ChildSpec::Supervisor(spec)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TreeFile, TreeError> {
        TreeFile::parse(Path::new("/nonexistent/tree.toml"), text)
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn cluster_settings_and_placement_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("tree-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.wasm"), b"").unwrap();
        let text = r#"
            [cluster]
            lease_ttl = "4s"
            [supervisor]
            name = "root"
            [[supervisor.children]]
            name = "a"
            component = "a.wasm"
            placement = { labels = { zone = "b" } }
            [[supervisor.children]]
            name = "c"
            component = "a.wasm"
            "#;
        let tree = TreeFile::parse(&dir.join("tree.toml"), text).unwrap();
        assert_eq!(tree.cluster.lease_ttl, Duration::from_secs(4));
        assert_eq!(tree.cluster.placement.len(), 1);
        assert_eq!(tree.cluster.placement["a"]["zone"], "b");
        let default = TreeFile::parse(
            &dir.join("tree.toml"),
            "[supervisor]\nname = \"root\"\n[[supervisor.children]]\nname = \"a\"\ncomponent = \"a.wasm\"\n",
        )
        .unwrap();
        assert_eq!(default.cluster, ClusterSettings::default());
        std::fs::remove_dir_all(&dir).unwrap();

        let p = problems(
            r#"
            [cluster]
            lease_ttl = "100ms"
            [supervisor]
            name = "root"
            placement = { labels = { zone = "a" } }
            [[supervisor.children]]
            name = "team"
            placement = { labels = { "bad key" = "x" } }
            [[supervisor.children.children]]
            name = "x"
            component = "x.wasm"
            placement = { labels = { zone = "a" } }
            "#,
        );
        let all = p.join("\n");
        for needle in [
            "`cluster.lease_ttl`: `100ms` is not a lease time",
            "`supervisor.placement`: the root runs on every host",
            "`supervisor.children[0].placement.labels`: `bad key = \"x\"`",
            "`supervisor.children[0].children[0].placement`: only the root's children are placed on hosts",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn shutdown_policies() {
        assert_eq!(
            parse_shutdown("brutal_kill"),
            Some(ShutdownPolicy::BrutalKill)
        );
        assert_eq!(parse_shutdown("infinity"), Some(ShutdownPolicy::Infinity));
        assert_eq!(
            parse_shutdown("250ms"),
            Some(ShutdownPolicy::Timeout(Duration::from_millis(250)))
        );
        assert_eq!(
            parse_shutdown("5s"),
            Some(ShutdownPolicy::Timeout(Duration::from_secs(5)))
        );
        for bad in ["", "5", "0s", "5m", "s", "-1s"] {
            assert_eq!(parse_shutdown(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_typo_names_the_field_and_the_known_ones() {
        let p =
            problems("[supervisor]\nname = \"r\"\nstrategy = \"one_for_one\"\nmax_restart = 3\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("/nonexistent/tree.toml"), "{}", p[0]);
        assert!(p[0].contains("max_restart"), "{}", p[0]);
        assert!(p[0].contains("did you mean `max_restarts`?"), "{}", p[0]);
        assert!(
            p[0].contains("`supervisor.max_restart`"),
            "names the field: {}",
            p[0]
        );
        assert!(p[0].ends_with("(line 4)"), "{}", p[0]);
    }

    #[test]
    fn an_unknown_strategy_names_the_field_and_the_known_ones() {
        let text = "[supervisor]\nname = \"r\"\n[[supervisor.children]]\nname = \"c\"\nstrategy = \"one_for_none\"\n";
        let p = problems(text);
        assert!(
            p[0].contains("`supervisor.children[0].strategy`"),
            "{}",
            p[0]
        );
        assert!(p[0].contains("rest_for_one"), "{}", p[0]);
        assert!(p[0].contains("did you mean `one_for_one`?"), "{}", p[0]);
    }

    #[test]
    fn suggestions_only_for_close_names() {
        let close =
            "unknown field `max_restart`, expected one of `name`, `max_restarts`, `children`";
        assert_eq!(did_you_mean(close), Some("max_restarts"));
        let far = "unknown field `colour`, expected one of `name`, `max_restarts`";
        assert_eq!(did_you_mean(far), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn names_must_make_paths() {
        let p = problems(
            "[supervisor]\nname = \"r\"\n[[supervisor.children]]\nname = \"a/b\"\nchildren = []\n",
        );
        assert!(
            p[0].contains("`supervisor.children[0].name`: `a/b` cannot name a node"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn every_value_problem_is_listed() {
        let p = problems(
            r#"
            [defaults.limits]
            memory_bytes = -5
            [supervisor]
            name = "root"
            max_restarts = -1
            [[supervisor.children]]
            name = "a"
            component = "missing.wasm"
            shutdown = "soon"
            limits = { deadline_ms = 0, fuel_per_call = 1, state_bytes = -1, log_records_per_second = 0 }
            health = { interval_ms = -1, threshold = 0 }
            backoff = "soon"
            breaker = { failures = 0, cooldown_ms = 10_000, max_cooldown_ms = 1_000 }
            [[supervisor.children]]
            name = "a"
            [[supervisor.children]]
            name = "s"
            children = []
            backoff = { base_ms = 500, cap_ms = 100 }
            "#,
        );
        let all = p.join("\n");
        for needle in [
            "`defaults.limits.memory_bytes`: must be a positive number of bytes, got -5",
            "`supervisor.max_restarts`: must be 0 or more",
            "`supervisor.children[0].component`: no file at /nonexistent/missing.wasm",
            "`supervisor.children[0].shutdown`: `soon` is not a shutdown policy",
            "`supervisor.children[0].limits.deadline_ms`: must be a positive number of milliseconds, got 0",
            "`supervisor.children[0].limits.state_bytes`: must be a positive number of bytes, got -1",
            "`supervisor.children[0].limits.log_records_per_second`: must be a positive count, got 0",
            "`supervisor.children[0].health.interval_ms`: must be 0 or more milliseconds, got -1",
            "`supervisor.children[0].health.threshold`: must be a positive count, got 0",
            "`supervisor.children[0].backoff`: `soon` is not a backoff",
            "`supervisor.children[0].breaker.failures`: must be a positive count, got 0",
            "`supervisor.children[0].breaker`: a circuit breaker's max_cooldown (1s) must be at least its cooldown (10s)",
            "`supervisor.children[2].backoff`: an exponential backoff needs 0 < base <= cap",
            "`supervisor.children[1].name`: `a` is already the name of children[0]",
            "`supervisor.children[1]`: `a` has no `component`",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn capability_fields_are_checked() {
        let p = problems(
            r#"
            [defaults.limits]
            max_timers = -1
            [supervisor]
            name = "root"
            http = { allowed_hosts = ["https://x.com"] }
            [[supervisor.children]]
            name = "a"
            component = "a.wasm"
            limits = { max_timers = 10_001 }
            http = { allowed_hosts = ["api.openai.com", "https://x.com/v1"], max_concurrent = 0, max_response_bytes = -1 }
            calls = ["root//b", "root/tool*", "root/**/x"]
            wasi = { env = { KEY = "v" }, inherit_env = ["KEY", "A=B", ""] }
            [[supervisor.children]]
            name = "b"
            component = "b.wasm"
            http = { max_concurrent = 2 }
            "#,
        );
        let all = p.join("\n");
        for needle in [
            "`defaults.limits.max_timers`: must be between 0 (no timers) and 10000, got -1",
            "`supervisor.http`: only agents take this",
            "`supervisor.children[0].limits.max_timers`: must be between 0 (no timers) and 10000, got 10001",
            "`supervisor.children[0].http.allowed_hosts[0]`: `api.openai.com` is not a host pattern: it has no scheme",
            "`supervisor.children[0].http.allowed_hosts[1]`: `https://x.com/v1` is not a host pattern",
            "`supervisor.children[0].http.max_concurrent`: must be between 1 and 1024, got 0",
            "`supervisor.children[0].http.max_response_bytes`: must be between 1 and 1073741824, got -1",
            "`supervisor.children[0].calls[0]`: `root//b` is not a call pattern: it has an empty segment",
            "`supervisor.children[0].calls[1]`: `root/tool*` is not a call pattern",
            "`supervisor.children[0].calls[2]`: `root/**/x` is not a call pattern: `**` may only be the last segment",
            "`supervisor.children[0].wasi.inherit_env[0]`: `KEY` is also set in `env`",
            "`supervisor.children[0].wasi.inherit_env[1]`: `A=B` cannot name an environment variable",
            "`supervisor.children[0].wasi.inherit_env[2]`: `` cannot name an environment variable",
            "`supervisor.children[1].http.allowed_hosts`: grants no host",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn capability_fields_of_a_valid_tree() {
        let dir = std::env::temp_dir().join(format!("tree-caps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.wasm"), b"").unwrap();
        let text = r#"
            [defaults.limits]
            max_timers = 4
            [supervisor]
            name = "root"
            [[supervisor.children]]
            name = "llm"
            component = "a.wasm"
            http = { allowed_hosts = ["https://api.openai.com", "http://127.0.0.1:*"], max_response_bytes = 65536 }
            calls = ["helper", "root/tools/*"]
            wasi = { inherit_env = ["OPENAI_API_KEY"] }
            [[supervisor.children]]
            name = "helper"
            component = "a.wasm"
            limits = { max_timers = 0 }
            [[supervisor.children]]
            name = "tools"
            [[supervisor.children.children]]
            name = "search"
            component = "a.wasm"
        "#;
        let tree = TreeFile::parse(&dir.join("tree.toml"), text).unwrap();
        let TreeNode::Agent(llm) = &tree.root.children[0] else {
            panic!("llm is an agent")
        };
        assert_eq!(llm.limits.max_timers, 4, "default merged");
        assert_eq!(llm.http.allowed_hosts.len(), 2);
        assert_eq!(llm.http.max_response_bytes, 65536);
        assert_eq!(
            llm.http.max_concurrent,
            HttpGrants::default().max_concurrent
        );
        assert_eq!(llm.calls.len(), 2);
        assert_eq!(llm.wasi.inherit_env, ["OPENAI_API_KEY"]);
        let TreeNode::Agent(helper) = &tree.root.children[1] else {
            panic!("helper is an agent")
        };
        assert_eq!(helper.limits.max_timers, 0);
        assert!(helper.http.allowed_hosts.is_empty() && helper.calls.is_empty());

        // A pattern that reaches no other agent is a typo.
        let typo = text.replace("root/tools/*", "root/tool/*");
        let p = TreeFile::parse(&dir.join("tree.toml"), &typo).unwrap_err();
        let all = p.to_string();
        assert!(
            all.contains("`supervisor.children[0].calls[1]`: `root/tool/*` matches no other agent of this tree (relative paths start at root); its agents are: root/helper, root/tools/search"),
            "{all}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_valid_tree_with_a_nested_supervisor() {
        let dir = std::env::temp_dir().join(format!("tree-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.wasm"), b"").unwrap();
        let text = r#"
            [defaults.limits]
            fuel_per_call = 1000
            [defaults.health]
            interval_ms = 2000
            [defaults.breaker]
            failures = 2
            [supervisor]
            name = "root"
            strategy = "one_for_all"
            max_restarts = 0
            [[supervisor.children]]
            name = "inner"
            strategy = "rest_for_one"
            backoff = "immediate"
            [[supervisor.children.children]]
            name = "a"
            component = "a.wasm"
            restart = "transient"
            shutdown = "brutal_kill"
            config = { k = [1, 2] }
            limits = { memory_bytes = 2_000_000, state_bytes = 4096, log_bytes_per_second = 100 }
            wasi = { env = { K = "v" } }
            health = { threshold = 7 }
            backoff = { base_ms = 10, cap_ms = 1000, jitter = false }
        "#;
        let tree = TreeFile::parse(&dir.join("tree.toml"), text).unwrap();
        assert_eq!(tree.root.policy.strategy, RestartStrategy::OneForAll);
        assert_eq!(tree.root.policy.intensity.max_restarts, 0);
        let TreeNode::Supervisor(inner) = &tree.root.children[0] else {
            panic!("inner is a supervisor")
        };
        assert_eq!(inner.policy.strategy, RestartStrategy::RestForOne);
        let TreeNode::Agent(a) = &inner.children[0] else {
            panic!("a is an agent")
        };
        assert_eq!(a.component, dir.join("a.wasm"));
        assert_eq!(a.restart, RestartType::Transient);
        assert_eq!(a.shutdown, ShutdownPolicy::BrutalKill);
        assert_eq!(a.config, serde_json::json!({ "k": [1, 2] }));
        assert_eq!(a.limits.fuel_per_call, Some(1000), "default merged");
        assert_eq!(a.limits.memory_bytes, 2_000_000);
        assert_eq!(a.limits.state_bytes, Some(4096));
        assert_eq!(a.limits.log_bytes_per_second, 100);
        assert_eq!(
            a.health,
            HealthPolicy {
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(5),
                threshold: 7
            },
            "defaults and the agent's own fields merged"
        );
        assert_eq!(
            a.backoff,
            Backoff::Exponential {
                base: Duration::from_millis(10),
                cap: Duration::from_secs(1),
                jitter: false
            }
        );
        assert_eq!(
            a.breaker,
            Some(BreakerPolicy {
                failures: 2,
                ..DEFAULT_BREAKER
            })
        );
        assert_eq!(inner.backoff, Backoff::Immediate);
        assert_eq!(a.wasi.env, vec![("K".to_owned(), "v".to_owned())]);
        assert_eq!(tree.agents().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
