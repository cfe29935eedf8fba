//! A supervision tree's lifecycle events as lines on stdout, text or JSON
//! (shared by `demo` and `run`). Every event names its node by path and a
//! restart its cause, so a line needs nothing but the event.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use terraphim_agent_supervisor::{AgentStatus, EventKind, ExitReason, SupervisorEvent};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::oneshot;

use crate::output::{Out, seconds, stamp};

/// How long an exit is held back, waiting for its restart, to print both on one line.
pub const PENDING_WAIT: Duration = Duration::from_millis(200);

/// Paths are padded to at least this width in text lines.
const MIN_WIDTH: usize = 12;

/// `running`, `restarting`, ...
pub fn status_text(status: &AgentStatus) -> &'static str {
    match status {
        AgentStatus::Starting => "starting",
        AgentStatus::Running => "running",
        AgentStatus::Stopping => "stopping",
        AgentStatus::Stopped => "stopped",
        AgentStatus::Failed(_) => "failed",
        AgentStatus::Restarting => "restarting",
    }
}

/// One text line: time, padded path, text.
pub fn row(at: Duration, width: usize, path: &str, text: &str) -> String {
    format!("{} {path:<width$}  {text}", stamp(at))
}

/// The last segment of a path.
pub fn name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[derive(Serialize)]
struct EventLine<'a> {
    kind: &'static str,
    t: f64,
    path: &'a str,
    event: &'a EventKind,
    at: &'a chrono::DateTime<chrono::Utc>,
}

/// State shared by the code that drives the tree and the event printer.
#[derive(Default)]
pub struct Shared {
    /// The path of the agent a call is in flight to: its exit is printed
    /// after the call's own line.
    in_flight: std::sync::Mutex<Option<String>>,
    /// Set once the tree is being stopped.
    stopping: AtomicBool,
}

impl Shared {
    pub fn set_in_flight(&self, path: Option<&str>) {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = path.map(str::to_owned);
    }

    fn is_in_flight(&self, path: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(path)
    }

    /// The tree is being stopped on purpose: stops are no longer caused by
    /// a sibling's exit.
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
    path: String,
    reason: ExitReason,
    restart_count: Option<u32>,
}

/// Prints every event of a tree, one line each (text or JSON).
pub struct Printer {
    out: Arc<Out>,
    shared: Arc<Shared>,
    /// The width paths are padded to; grows with the longest path seen.
    width: usize,
    /// Hold an exit back to print it on one line with its restart (the
    /// demo); otherwise every event gets its own line at once (`run`).
    hold_exits: bool,
    pending: Option<Pending>,
    /// Per supervisor path, the path of its child that last exited: the
    /// cause of the stops of its siblings that follow.
    last_exit: std::collections::HashMap<String, String>,
    /// Children stopped during the final stop, in order.
    stopped: Vec<String>,
}

impl Printer {
    /// A printer whose paths are padded to the longest of `paths`.
    pub fn new(
        out: Arc<Out>,
        shared: Arc<Shared>,
        paths: impl IntoIterator<Item = String>,
        hold_exits: bool,
    ) -> Self {
        let width = paths
            .into_iter()
            .map(|p| p.len())
            .max()
            .unwrap_or(0)
            .max(MIN_WIDTH);
        Self {
            out,
            shared,
            width,
            hold_exits,
            pending: None,
            last_exit: Default::default(),
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
        let call_done = !self.shared.is_in_flight(&p.path) || age >= Duration::from_secs(1);
        if !(force || settled && call_done) {
            return;
        }
        let Some(p) = self.pending.take() else { return };
        let text = match p.restart_count {
            Some(n) => format!("exited: {} -> restarted (restart #{n})", p.reason),
            None => format!("exited: {}", p.reason),
        };
        self.out.line(&row(p.at, self.width, &p.path, &text));
    }

    fn print(&self, path: &str, text: &str) {
        self.out
            .line(&row(self.out.elapsed(), self.width, path, text));
    }

    fn on_event(&mut self, event: SupervisorEvent) {
        let stopping = self.shared.is_stopping();
        if stopping && let EventKind::ChildStopped { .. } = &event.kind {
            self.stopped.push(event.path.clone());
        }
        if self.out.json() {
            self.out.json_line(&EventLine {
                kind: "event",
                t: seconds(self.out.elapsed()),
                path: &event.path,
                event: &event.kind,
                at: &event.at,
            });
            return;
        }
        self.width = self.width.max(event.path.len());
        let path = event.path;
        let parent = path.rsplit_once('/').map(|(p, _)| p.to_owned());
        match event.kind {
            EventKind::ChildStarted { .. } => {
                self.flush(true);
                self.print(&path, "started");
            }
            EventKind::ChildExited { reason, .. } => {
                self.flush(true);
                if let Some(parent) = parent {
                    self.last_exit.insert(parent, path.clone());
                }
                if !self.hold_exits {
                    self.print(&path, &format!("exited: {reason}"));
                    return;
                }
                self.pending = Some(Pending {
                    at: self.out.elapsed(),
                    since: std::time::Instant::now(),
                    path,
                    reason,
                    restart_count: None,
                });
            }
            EventKind::ChildRestarted {
                restart_count,
                cause,
                bystander,
                ..
            } => {
                if let Some(p) = &mut self.pending
                    && p.path == path
                    && p.restart_count.is_none()
                {
                    p.restart_count = Some(restart_count);
                    self.flush(false);
                    return;
                }
                self.flush(true);
                let text = if bystander {
                    format!(
                        "restarted together with {} (restart #{restart_count})",
                        name(&cause.path)
                    )
                } else {
                    format!("restarted (restart #{restart_count})")
                };
                self.print(&path, &text);
            }
            EventKind::ChildStopped { killed, .. } => {
                self.flush(true);
                let cause = parent.and_then(|p| self.last_exit.get(&p));
                let mut text = match cause {
                    Some(cause) if !stopping && *cause != path => {
                        format!("stopped, because its sibling {} exited", name(cause))
                    }
                    _ => "stopped".to_owned(),
                };
                if killed {
                    text.push_str(" (killed: it did not stop within its shutdown policy)");
                }
                self.print(&path, &text);
            }
            EventKind::ChildRemoved { .. } => {
                self.flush(true);
                self.print(&path, "removed");
            }
            EventKind::CircuitOpened { until, .. } => {
                self.flush(true);
                let until = until.format("%H:%M:%S%.3f");
                self.print(
                    &path,
                    &format!("circuit open: parked until its trial at {until}"),
                );
            }
            EventKind::CircuitHalfOpen { .. } => {
                self.flush(true);
                self.print(&path, "circuit half-open: trial start");
            }
            EventKind::CircuitClosed { .. } => {
                self.flush(true);
                self.print(&path, "circuit closed: the trial ran through its probation");
            }
            EventKind::MessageQuarantined { hash, .. } => {
                self.flush(true);
                self.print(
                    &path,
                    &format!("message {hash} quarantined: it crashed the agent too often"),
                );
            }
            EventKind::Escalated => {
                self.flush(true);
                let text = if path.contains('/') {
                    "gave up: restart intensity exceeded (escalated to its parent)"
                } else {
                    "gave up: restart intensity exceeded; the tree is down"
                };
                self.print(&path, text);
            }
            EventKind::SupervisorStopped => {
                self.flush(true);
                self.print(&path, "supervisor stopped");
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
