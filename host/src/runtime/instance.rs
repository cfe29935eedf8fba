//! One live agent: one wasmtime `Store` with its own limits.
//!
//! Invariants:
//! - Every call is armed with a fresh fuel budget (the smaller of the
//!   per-call budget and what is left of the lifetime budget) and a
//!   wall-clock deadline, enforced twice: the epoch callback traps a guest
//!   that computes past it, and an async timeout drops a call blocked in a
//!   host function.
//! - Between epoch ticks nothing is checked; at each tick a running guest
//!   yields to tokio, so a busy agent cannot starve its neighbours.
//! - After any failure other than an application error the instance is dead
//!   and is never re-entered: wasmtime poisons the store, and so do we.
//! - Everything the instance set up dies with it: its timers (in the store's
//!   data), its HTTP requests in flight (resources of the store), its place
//!   in the wait-for graph of calls (held by the call it was making).

use std::sync::Arc;
use std::time::Instant;

use tokio::time::{error::Elapsed, timeout};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpCtx;

use super::bindings::SupervisedAgent;
use super::bindings::terraphim::agent::types as wit;
use super::calls::{CallAccess, CallState};
use super::crash::{self, CrashReport, OutputRing};
use super::fault::{FaultHints, classify};
use super::host::{DroppedLogs, HostState, LogMeter};
use super::http::HttpGate;
use super::limits::{Limiter, MAX_DEADLINE};
use super::timers::Timers;
use super::{
    AgentComponent, AgentFault, AgentLimits, CallError, HttpGrants, LiveSlot, MAX_GUEST_TEXT,
    Runtime, WasiGrants,
};
use crate::state::{MemoryStateStore, StateStore};
use crate::text::bound;
use crate::types::{InitArgs, SystemMessage, TerminateReason};

/// What an instance is created with. The default: an anonymous agent with
/// the default limits, nothing granted and its state in memory.
#[derive(Clone)]
pub struct InstanceOptions {
    /// The agent's id: tags its logs, namespaces its state.
    pub agent_id: String,
    /// Its resource limits.
    pub limits: AgentLimits,
    /// Its WASI capabilities.
    pub grants: WasiGrants,
    /// Where its durable state lives.
    pub state: Arc<dyn StateStore>,
    /// The outbound HTTP it may make (none by default).
    pub http: HttpGrants,
    /// The agents it may call, and how it reaches their tree (none by
    /// default: every call fails with `unavailable`).
    pub calls: CallAccess,
}

impl Default for InstanceOptions {
    fn default() -> Self {
        Self {
            agent_id: String::new(),
            limits: AgentLimits::default(),
            grants: WasiGrants::default(),
            state: Arc::new(MemoryStateStore::default()),
            http: HttpGrants::default(),
            calls: CallAccess::default(),
        }
    }
}

/// One instantiated agent component.
pub struct AgentInstance {
    store: Store<HostState>,
    guest: SupervisedAgent,
    limits: AgentLimits,
    /// What the guest wrote to its stdout and stderr, lately.
    output: OutputRing,
    /// The fault that killed it and the WASM backtrace at it, once dead.
    crash: Option<(String, Vec<String>)>,
    /// What remains of the lifetime fuel budget, if there is one.
    fuel_left: Option<u64>,
    fuel_used: u64,
    dead: bool,
    /// Counts the instance among its runtime's live ones while it exists.
    _live: LiveSlot,
}

impl std::fmt::Debug for AgentInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentInstance")
            .field("agent_id", &self.store.data().agent_id)
            .field("fuel_used", &self.fuel_used)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// Call a guest export of `$self` under a fresh fuel budget and the
/// deadline, turning its outcome into a `Result<_, CallError>`.
macro_rules! guarded {
    ($self:ident, $export:ident ( $($arg:expr),* )) => {{
        let budget = $self.prepare()?;
        let call = $self
            .guest
            .terraphim_agent_agent()
            .$export(&mut $self.store $(, $arg)*);
        let outcome = timeout($self.limits.deadline, call).await;
        $self.finish(budget, outcome)
    }};
}

/// An application error from the guest, bounded where it enters the host.
fn application(error: String) -> CallError {
    CallError::Application(bound(error, MAX_GUEST_TEXT))
}

/// Set the fuel budget and deadline of the next call into `store`.
fn arm(store: &mut Store<HostState>, fuel: u64, limits: &AgentLimits) -> Result<(), AgentFault> {
    store
        .set_fuel(fuel)
        .map_err(|e| AgentFault::Host(format!("cannot set fuel: {e:#}")))?;
    let data = store.data_mut();
    data.limiter.reset_hints();
    data.log.start_call();
    data.http_gate.start_call();
    data.deadline = Instant::now() + limits.deadline.min(MAX_DEADLINE);
    store.set_epoch_deadline(1);
    Ok(())
}

fn hints(store: &Store<HostState>) -> FaultHints {
    let l = &store.data().limiter;
    FaultHints {
        memory_refused: l.memory_refused,
        table_refused: l.table_refused,
    }
}

impl AgentInstance {
    /// Create a store for the agent and instantiate `component` in it.
    ///
    /// # Errors
    ///
    /// The [`AgentFault`] of a failed instantiation: a limit it exceeded
    /// (`MemoryLimit`, `ResourceLimit`, `OutOfFuel`, `DeadlineExceeded`) or
    /// `InstantiateFailed` (a full pool, a WASI grant that cannot be given).
    pub async fn instantiate(
        runtime: &Runtime,
        component: &AgentComponent,
        options: InstanceOptions,
    ) -> Result<Self, AgentFault> {
        let InstanceOptions {
            agent_id,
            limits,
            grants,
            state,
            http,
            calls,
        } = options;
        let output = OutputRing::new(limits.crash_output_bytes);
        let wasi = grants
            .build(&output)
            .map_err(AgentFault::InstantiateFailed)?;
        let agent_id: Arc<str> = agent_id.into();
        let mut store = Store::new(
            runtime.engine(),
            HostState {
                agent_id: agent_id.clone(),
                wasi,
                table: ResourceTable::new(),
                limiter: Limiter::new(&limits, runtime.config().ceilings()),
                state,
                state_budget: limits.state_budget(),
                log: LogMeter::new(&limits),
                deadline: Instant::now(),
                timers: Timers::new(limits.max_timers),
                calls: CallState::new(calls),
                http: WasiHttpCtx::new(),
                http_gate: HttpGate::new(agent_id, http, &limits),
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|ctx| {
            Ok(if Instant::now() >= ctx.data().deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
            })
        });
        let mut this_fuel = limits.fuel_per_call.unwrap_or(u64::MAX);
        if let Some(life) = limits.fuel_per_lifetime {
            this_fuel = this_fuel.min(life);
        }
        arm(&mut store, this_fuel, &limits)?;
        let result = timeout(limits.deadline, component.pre.instantiate_async(&mut store)).await;
        let used = this_fuel - store.get_fuel().unwrap_or(0);
        let guest = match result {
            Ok(Ok(guest)) => guest,
            Ok(Err(e)) => {
                return Err(match classify(&e, hints(&store)) {
                    CallError::Fault(
                        f @ (AgentFault::MemoryLimit
                        | AgentFault::ResourceLimit(_)
                        | AgentFault::OutOfFuel
                        | AgentFault::DeadlineExceeded),
                    ) => f,
                    _ => AgentFault::InstantiateFailed(format!("{e:#}")),
                });
            }
            Err(_) => return Err(AgentFault::DeadlineExceeded),
        };
        Ok(Self {
            store,
            guest,
            output,
            crash: None,
            fuel_left: limits.fuel_per_lifetime.map(|l| l.saturating_sub(used)),
            limits,
            fuel_used: used,
            dead: false,
            _live: runtime.live_slot(),
        })
    }

    /// Whether the instance can still be called.
    pub fn is_alive(&self) -> bool {
        !self.dead
    }

    /// Fuel consumed over the instance's life.
    pub fn fuel_used(&self) -> u64 {
        self.fuel_used
    }

    /// The agent's id.
    pub fn agent_id(&self) -> &str {
        &self.store.data().agent_id
    }

    /// Bytes of linear memory the instance holds, summed over its memories.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limiter.memory_used()
    }

    /// What is known about the crash that killed the instance: the fault,
    /// the WASM backtrace, its last output lines, fuel used and memory held.
    /// `None` while it lives. The message it handled is the caller's to add.
    pub fn crash_report(&self) -> Option<CrashReport> {
        let (fault, backtrace) = self.crash.clone()?;
        Some(CrashReport {
            at: chrono::Utc::now(),
            fault,
            backtrace,
            output: self.output.lines(),
            fuel_used: self.fuel_used,
            memory_bytes: self.memory_bytes(),
            ..CrashReport::default()
        })
    }

    /// Bytes of durable state the agent holds, as its quota counts them
    /// ([`StateStore::bytes_used`]).
    pub fn state_bytes(&self) -> usize {
        let data = self.store.data();
        data.state.bytes_used(&data.agent_id)
    }

    /// Log records the instance emitted over its budget, which were dropped.
    pub fn dropped_logs(&self) -> DroppedLogs {
        self.store.data().log.total_dropped
    }

    /// Timers the instance has pending.
    pub fn pending_timers(&self) -> usize {
        self.store.data().timers.pending()
    }

    /// When the instance's earliest timer is due; `None` without timers,
    /// or once the instance is dead.
    pub fn next_timer_due(&self) -> Option<tokio::time::Instant> {
        if self.dead {
            return None;
        }
        self.store.data().timers.next_due()
    }

    /// Remove and return the message of the earliest timer if it is due at
    /// `now`; the caller delivers it through
    /// [`handle_message`](Self::handle_message) (the supervisor's worker
    /// does; the reply goes nowhere). `None` once the instance is dead.
    pub fn take_due_timer(&mut self, now: tokio::time::Instant) -> Option<String> {
        if self.dead {
            return None;
        }
        self.store.data_mut().timers.take_due(now)
    }

    /// Arm the store for a call; the fuel budget given.
    fn prepare(&mut self) -> Result<u64, CallError> {
        if self.dead {
            return Err(CallError::Fault(AgentFault::Host(
                "the instance died earlier and cannot be re-entered".into(),
            )));
        }
        let budget = match (self.limits.fuel_per_call, self.fuel_left) {
            (Some(call), Some(left)) => call.min(left),
            (Some(call), None) => call,
            (None, Some(left)) => left,
            (None, None) => u64::MAX,
        };
        if budget == 0 {
            self.dead = true;
            return Err(CallError::Fault(AgentFault::OutOfFuel));
        }
        arm(&mut self.store, budget, &self.limits).map_err(CallError::Fault)?;
        Ok(budget)
    }

    /// Account the call's fuel and turn its outcome into ours.
    fn finish<T>(
        &mut self,
        budget: u64,
        outcome: Result<wasmtime::Result<T>, Elapsed>,
    ) -> Result<T, CallError> {
        let used = budget - self.store.get_fuel().unwrap_or(0);
        self.fuel_used = self.fuel_used.saturating_add(used);
        self.store.data_mut().report_dropped_logs();
        if let Some(left) = &mut self.fuel_left {
            *left = left.saturating_sub(used);
        }
        let (err, backtrace) = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => (classify(&e, hints(&self.store)), crash::backtrace(&e)),
            Err(_) => (CallError::Fault(AgentFault::DeadlineExceeded), Vec::new()),
        };
        self.dead = true;
        let fault = match &err {
            CallError::Fault(fault) => fault.to_string(),
            other => other.to_string(),
        };
        self.crash = Some((fault, backtrace));
        Err(err)
    }

    /// Call the agent's `init`. An `err` from the agent is an application
    /// error; the caller decides that it fails the start.
    pub async fn init(&mut self, args: &InitArgs) -> Result<(), CallError> {
        let args = wit::InitArgs {
            agent_id: args.agent_id.to_string(),
            supervisor_id: args.supervisor_id.to_string(),
            config: args.config.to_string(),
        };
        guarded!(self, call_init(&args))?.map_err(application)
    }

    /// Call the agent's `start`.
    pub async fn start(&mut self) -> Result<(), CallError> {
        guarded!(self, call_start())?.map_err(application)
    }

    /// Call the agent's `stop`.
    pub async fn stop(&mut self) -> Result<(), CallError> {
        guarded!(self, call_stop())?.map_err(application)
    }

    /// Send one message; the agent's reply.
    pub async fn handle_message(&mut self, message: &str) -> Result<String, CallError> {
        guarded!(self, call_handle_message(message))?.map_err(application)
    }

    /// Deliver a system message.
    pub async fn handle_system_message(
        &mut self,
        message: &SystemMessage,
    ) -> Result<(), CallError> {
        let message = to_wit_system(message);
        guarded!(self, call_handle_system_message(&message))?.map_err(application)
    }

    /// Ask the agent whether it is healthy; `Err(Application)` when it says
    /// it is not.
    pub async fn health_check(&mut self) -> Result<(), CallError> {
        guarded!(self, call_health_check())?.map_err(application)
    }

    /// Tell the agent it is being terminated. Does nothing on a dead
    /// instance.
    pub async fn terminate(&mut self, reason: &TerminateReason) -> Result<(), CallError> {
        if self.dead {
            return Ok(());
        }
        let reason = to_wit_terminate(reason);
        guarded!(self, call_terminate(&reason))
    }
}

fn to_wit_status(status: &crate::types::AgentStatus) -> wit::AgentStatus {
    use crate::types::AgentStatus as S;
    match status {
        S::Starting => wit::AgentStatus::Starting,
        S::Running => wit::AgentStatus::Running,
        S::Stopping => wit::AgentStatus::Stopping,
        S::Stopped => wit::AgentStatus::Stopped,
        S::Failed(e) => wit::AgentStatus::Failed(e.clone()),
        S::Restarting => wit::AgentStatus::Restarting,
    }
}

fn to_wit_system(message: &SystemMessage) -> wit::SystemMessage {
    match message {
        SystemMessage::Shutdown => wit::SystemMessage::Shutdown,
        SystemMessage::Restart => wit::SystemMessage::Restart,
        SystemMessage::HealthCheck => wit::SystemMessage::HealthCheck,
        SystemMessage::StatusUpdate(s) => wit::SystemMessage::StatusUpdate(to_wit_status(s)),
        SystemMessage::SupervisorMessage(m) => wit::SystemMessage::SupervisorMessage(m.clone()),
    }
}

fn to_wit_terminate(reason: &TerminateReason) -> wit::TerminateReason {
    match reason {
        TerminateReason::Normal => wit::TerminateReason::Normal,
        TerminateReason::Shutdown => wit::TerminateReason::Shutdown,
        TerminateReason::Error(e) => wit::TerminateReason::Error(e.clone()),
        TerminateReason::Timeout => wit::TerminateReason::Timeout,
        TerminateReason::SupervisorRequest => wit::TerminateReason::SupervisorRequest,
    }
}
