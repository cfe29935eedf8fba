//! A supervision tree's lifecycle events as lines on stdout, text or JSON
//! (shared by `demo` and `run`), and the human names they use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use terraphim_agent_supervisor::{
    AgentPid, AgentStatus, ExitReason, SupervisionError, SupervisorEvent, SupervisorId,
};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::oneshot;

use crate::output::{Out, seconds, stamp};

/// How long an exit is held back, waiting for its restart, to print both on one line.
pub const PENDING_WAIT: Duration = Duration::from_millis(200);

/// Labels are padded to at least this width in text lines.
const MIN_WIDTH: usize = 12;

/// Human names for the ids in events.
#[derive(Default)]
pub struct Names {
    /// Supervisor id → its name. Nested supervisors' ids are only known
    /// once they run, so they are learnt as events arrive.
    supervisors: Mutex<HashMap<SupervisorId, String>>,
    /// The root supervisor.
    root: Option<SupervisorId>,
    /// Child id → (its supervisor's name, its name).
    children: HashMap<AgentPid, (String, String)>,
    width: usize,
}

fn short(id: String) -> String {
    id.chars().take(8).collect()
}

impl Names {
    /// The root supervisor is `id`, called `name`.
    pub fn with_root(id: SupervisorId, name: impl Into<String>) -> Self {
        let names = Self {
            root: Some(id.clone()),
            width: MIN_WIDTH,
            ..Self::default()
        };
        names.add_supervisor(id, name);
        names
    }

    /// The supervisor `id` is called `name`.
    pub fn add_supervisor(&self, id: SupervisorId, name: impl Into<String>) {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, name.into());
    }

    /// The child `pid` of the supervisor called `supervisor` is called `name`.
    pub fn add_child(&mut self, pid: AgentPid, supervisor: &str, name: &str) {
        self.children
            .insert(pid.clone(), (supervisor.to_owned(), name.to_owned()));
        self.width = self.width.max(self.label(&pid).len());
    }

    /// Whether `id` is the root supervisor.
    pub fn is_root(&self, id: &SupervisorId) -> bool {
        self.root.as_ref() == Some(id)
    }

    /// The name of supervisor `id` (the start of its id if it has none).
    pub fn supervisor(&self, id: &SupervisorId) -> String {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_else(|| short(id.to_string()))
    }

    /// A child started under `supervisor`: if the child is known, so is the
    /// supervisor's name.
    fn learn(&self, supervisor: &SupervisorId, child: &AgentPid) {
        if let Some((name, _)) = self.children.get(child) {
            let mut supervisors = self.supervisors.lock().unwrap_or_else(|p| p.into_inner());
            supervisors
                .entry(supervisor.clone())
                .or_insert_with(|| name.clone());
        }
    }

    /// (its supervisor's name, its own name), empty if unknown.
    pub fn parts(&self, pid: &AgentPid) -> (String, String) {
        self.children.get(pid).cloned().unwrap_or_default()
    }

    /// The child's own name.
    pub fn name(&self, pid: &AgentPid) -> String {
        self.children
            .get(pid)
            .map(|(_, name)| name.clone())
            .unwrap_or_else(|| short(pid.to_string()))
    }

    /// `supervisor/child`.
    pub fn label(&self, pid: &AgentPid) -> String {
        match self.children.get(pid) {
            Some((sup, name)) => format!("{sup}/{name}"),
            None => short(pid.to_string()),
        }
    }

    /// The width of the widest label.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Replace the ids in `text` (from a library error) by names.
    pub fn humanise(&self, text: String) -> String {
        let mut text = text;
        for pid in self.children.keys() {
            text = text.replace(&pid.to_string(), &self.label(pid));
        }
        let supervisors = self.supervisors.lock().unwrap_or_else(|p| p.into_inner());
        for (id, name) in supervisors.iter() {
            text = text.replace(&id.to_string(), name);
        }
        text
    }

    /// One text line: time, padded label, text.
    pub fn row(&self, at: Duration, label: &str, text: &str) -> String {
        format!("{} {label:<width$}  {text}", stamp(at), width = self.width)
    }
}

/// A caller-facing description of a failed call.
pub fn describe_error(error: &SupervisionError, names: &Names) -> String {
    let text = match error {
        SupervisionError::AgentCrashed(_, fault) => format!("crashed: {fault}"),
        SupervisionError::AgentExecutionFailed(_, e) => format!("error reply: {e}"),
        SupervisionError::MaxRestartsExceeded(id) => format!(
            "supervisor {} gave up (restart intensity exceeded)",
            names.supervisor(id)
        ),
        other => other.to_string(),
    };
    names.humanise(text)
}

/// `running`, `restarting`, ...
pub fn status_text(status: &AgentStatus) -> String {
    match status {
        AgentStatus::Starting => "starting".into(),
        AgentStatus::Running => "running".into(),
        AgentStatus::Stopping => "stopping".into(),
        AgentStatus::Stopped => "stopped".into(),
        AgentStatus::Failed(_) => "failed".into(),
        AgentStatus::Restarting => "restarting".into(),
    }
}

#[derive(Serialize)]
struct EventLine<'a> {
    kind: &'static str,
    t: f64,
    supervisor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    /// `supervisor/agent`, when the event is about a child.
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    event: &'a SupervisorEvent,
}

/// State shared by the code that drives the tree and the event printer.
#[derive(Default)]
pub struct Shared {
    /// The agent a call is in flight to: its exit is printed after the
    /// call's own line.
    in_flight: Mutex<Option<AgentPid>>,
    /// Set once the tree is being stopped.
    stopping: AtomicBool,
}

impl Shared {
    pub fn set_in_flight(&self, pid: Option<AgentPid>) {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = pid;
    }

    fn is_in_flight(&self, pid: &AgentPid) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            == Some(pid)
    }

    /// The tree is being stopped on purpose: stops are no longer caused
    /// by a sibling's exit.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// An exit held back to be printed on one line with its restart, after the
/// line of the call that caused it.
struct Pending {
    at: Duration,
    since: std::time::Instant,
    agent: AgentPid,
    reason: ExitReason,
    restart_count: Option<u32>,
}

/// Prints every event of a tree, one line each (text or JSON).
pub struct Printer {
    out: Arc<Out>,
    names: Arc<Names>,
    shared: Arc<Shared>,
    /// Hold an exit back to print it on one line with its restart (the
    /// demo); otherwise every event gets its own line at once (`run`).
    hold_exits: bool,
    pending: Option<Pending>,
    /// Per supervisor, the last child that exited (the cause of sibling restarts).
    last_exit: HashMap<SupervisorId, AgentPid>,
    /// Children stopped during the final stop, in order.
    stopped: Vec<String>,
}

impl Printer {
    pub fn new(out: Arc<Out>, names: Arc<Names>, shared: Arc<Shared>, hold_exits: bool) -> Self {
        Self {
            out,
            names,
            shared,
            hold_exits,
            pending: None,
            last_exit: HashMap::new(),
            stopped: Vec::new(),
        }
    }

    /// Print the held-back exit: always if `force`, else once its restart
    /// came (or [`PENDING_WAIT`] passed) and the call that caused it printed
    /// its line (or a second passed).
    fn flush(&mut self, force: bool) {
        let Some(p) = &self.pending else { return };
        let age = p.since.elapsed();
        let settled = p.restart_count.is_some() || age >= PENDING_WAIT;
        let call_done = !self.shared.is_in_flight(&p.agent) || age >= Duration::from_secs(1);
        if !(force || settled && call_done) {
            return;
        }
        let Some(p) = self.pending.take() else { return };
        let text = match p.restart_count {
            Some(n) => format!("exited: {} -> restarted (restart #{n})", p.reason),
            None => format!("exited: {}", p.reason),
        };
        self.out
            .line(&self.names.row(p.at, &self.names.label(&p.agent), &text));
    }

    fn print(&self, label: &str, text: &str) {
        self.out
            .line(&self.names.row(self.out.elapsed(), label, text));
    }

    fn json(&self, event: &SupervisorEvent) {
        let (supervisor, agent) = match event {
            SupervisorEvent::ChildStarted {
                supervisor, agent, ..
            }
            | SupervisorEvent::ChildExited {
                supervisor, agent, ..
            }
            | SupervisorEvent::ChildRestarted {
                supervisor, agent, ..
            }
            | SupervisorEvent::ChildStopped {
                supervisor, agent, ..
            }
            | SupervisorEvent::ChildRemoved { supervisor, agent } => (supervisor, Some(agent)),
            SupervisorEvent::Escalated { supervisor }
            | SupervisorEvent::SupervisorStopped { supervisor } => (supervisor, None),
        };
        self.out.json_line(&EventLine {
            kind: "event",
            t: seconds(self.out.elapsed()),
            supervisor: self.names.supervisor(supervisor),
            agent: agent.map(|a| self.names.name(a)),
            path: agent.map(|a| self.names.label(a)),
            event,
        });
    }

    fn on_event(&mut self, event: SupervisorEvent) {
        if let SupervisorEvent::ChildStarted {
            supervisor, agent, ..
        } = &event
        {
            self.names.learn(supervisor, agent);
        }
        let stopping = self.shared.is_stopping();
        if stopping && let SupervisorEvent::ChildStopped { agent, .. } = &event {
            self.stopped.push(self.names.label(agent));
        }
        if self.out.json() {
            self.json(&event);
            return;
        }
        let names = self.names.clone();
        match event {
            SupervisorEvent::ChildStarted { agent, .. } => {
                self.flush(true);
                self.print(&names.label(&agent), "started");
            }
            SupervisorEvent::ChildExited {
                supervisor,
                agent,
                reason,
            } => {
                self.flush(true);
                self.last_exit.insert(supervisor, agent.clone());
                if !self.hold_exits {
                    self.print(&names.label(&agent), &format!("exited: {reason}"));
                    return;
                }
                self.pending = Some(Pending {
                    at: self.out.elapsed(),
                    since: std::time::Instant::now(),
                    agent,
                    reason,
                    restart_count: None,
                });
            }
            SupervisorEvent::ChildRestarted {
                supervisor,
                agent,
                restart_count,
            } => {
                if let Some(p) = &mut self.pending
                    && p.agent == agent
                    && p.restart_count.is_none()
                {
                    p.restart_count = Some(restart_count);
                    self.flush(false);
                    return;
                }
                self.flush(true);
                let text = match self.last_exit.get(&supervisor) {
                    Some(cause) if *cause != agent => format!(
                        "restarted together with {} (restart #{restart_count})",
                        names.name(cause)
                    ),
                    _ => format!("restarted (restart #{restart_count})"),
                };
                self.print(&names.label(&agent), &text);
            }
            SupervisorEvent::ChildStopped {
                supervisor,
                agent,
                killed,
            } => {
                self.flush(true);
                let mut text = match self.last_exit.get(&supervisor) {
                    Some(cause) if !stopping && *cause != agent => {
                        format!("stopped, because its sibling {} exited", names.name(cause))
                    }
                    _ => "stopped".to_owned(),
                };
                if killed {
                    text.push_str(" (killed: it did not stop within its shutdown policy)");
                }
                self.print(&names.label(&agent), &text);
            }
            SupervisorEvent::ChildRemoved { agent, .. } => {
                self.flush(true);
                self.print(&names.label(&agent), "removed");
            }
            SupervisorEvent::Escalated { supervisor } => {
                self.flush(true);
                let text = if names.is_root(&supervisor) {
                    "gave up: restart intensity exceeded; the tree is down"
                } else {
                    "gave up: restart intensity exceeded (escalated to its parent)"
                };
                self.print(&names.supervisor(&supervisor), text);
            }
            SupervisorEvent::SupervisorStopped { supervisor } => {
                self.flush(true);
                self.print(&names.supervisor(&supervisor), "supervisor stopped");
            }
        }
    }

    fn on_lagged(&mut self, missed: u64) {
        self.flush(true);
        if !self.out.json() {
            self.out.line(&format!("({missed} events missed)"));
        }
    }

    /// Print events until `finish` fires, then drain what is left. Returns
    /// the children stopped after [`Shared::set_stopping`], in order.
    pub async fn run(
        mut self,
        mut events: broadcast::Receiver<SupervisorEvent>,
        mut finish: oneshot::Receiver<()>,
    ) -> Vec<String> {
        loop {
            let wait = if self.pending.is_some() {
                Duration::from_millis(10)
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                biased;
                event = events.recv() => match event {
                    Ok(event) => self.on_event(event),
                    Err(RecvError::Lagged(missed)) => self.on_lagged(missed),
                    Err(RecvError::Closed) => break,
                },
                _ = tokio::time::sleep(wait) => self.flush(false),
                _ = &mut finish => {
                    loop {
                        match events.try_recv() {
                            Ok(event) => self.on_event(event),
                            Err(TryRecvError::Lagged(missed)) => self.on_lagged(missed),
                            Err(_) => break,
                        }
                    }
                    break;
                }
            }
        }
        self.flush(true);
        self.stopped
    }
}
