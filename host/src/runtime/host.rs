//! The store data of one agent instance, and the host side of the WIT
//! imports `log` and `state` (`agents` is in `calls.rs`, `timers` in
//! `timers.rs`, `wasi:http`'s hooks in `http.rs`).
//!
//! Everything a guest hands the host through these imports is bounded here:
//! a log record's length, the log volume per call and per second, the
//! state's size (by the agent's budget and the store's own quotas).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::WasiHttpCtx;

use super::bindings::terraphim::agent::{log, state, types};
use super::calls::CallState;
use super::http::HttpGate;
use super::limits::{AgentLimits, Limiter};
use super::timers::Timers;
use crate::state::{StateError, StateStore};
use crate::text::truncate;

/// Longest log message kept; longer ones are cut.
pub const MAX_LOG_BYTES: usize = 4096;

/// Everything one agent's `Store` holds.
pub(crate) struct HostState {
    /// The agent's id: tags its logs and namespaces its state.
    pub agent_id: Arc<str>,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
    pub state: Arc<dyn StateStore>,
    /// The agent's state budget in bytes.
    pub state_budget: usize,
    pub log: LogMeter,
    /// When the current call must end; read by the epoch callback.
    pub deadline: Instant,
    /// Pending timers (they die with the store).
    pub timers: Timers,
    /// Calls to other agents: grants, and the way to the tree.
    pub calls: CallState,
    /// `wasi:http`'s context, and the hooks that enforce the HTTP grants.
    pub http: WasiHttpCtx,
    pub http_gate: HttpGate,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let message = truncate(&message, MAX_LOG_BYTES);
        if !self.log.admit(Instant::now(), message.len()) {
            return;
        }
        let agent = &*self.agent_id;
        match level {
            log::Level::Trace => tracing::trace!(target: "agent", agent, "{message}"),
            log::Level::Debug => tracing::debug!(target: "agent", agent, "{message}"),
            log::Level::Info => tracing::info!(target: "agent", agent, "{message}"),
            log::Level::Warn => tracing::warn!(target: "agent", agent, "{message}"),
            log::Level::Error => tracing::error!(target: "agent", agent, "{message}"),
        }
    }
}

impl HostState {
    /// Report the log records dropped since the last report, if any, as one
    /// host warning (not subject to the agent's budget).
    pub fn report_dropped_logs(&mut self) {
        if let Some(dropped) = self.log.take_dropped() {
            tracing::warn!(
                target: "agent",
                agent = &*self.agent_id,
                "{} log records ({} bytes) over the agent's budget were dropped",
                dropped.records,
                dropped.bytes
            );
        }
    }
}

/// Run `op` on `store`: inline if the store never blocks, otherwise on
/// tokio's blocking pool, so that a disk sync never holds a runtime worker.
/// The caller's deadline (the timeout around the guest call) bounds the
/// wait; a call cut off by it still runs to its end on the pool, so a `put`
/// cut off may or may not have been committed (never half of it).
async fn off_worker<T: Send + 'static>(
    store: &Arc<dyn StateStore>,
    op: impl FnOnce(&dyn StateStore) -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    if !store.blocks() {
        return op(&**store);
    }
    let store = store.clone();
    tokio::task::spawn_blocking(move || op(&*store))
        .await
        .map_err(|e| StateError::Backend(format!("the state store's call did not finish: {e}")))?
}

/// A store error on `get` or `delete`, whose WIT signatures carry none: it
/// traps the guest, which fails as `AgentFault::Host`.
fn trap(agent: &str, what: &str, error: StateError) -> wasmtime::Error {
    wasmtime::Error::msg(format!("state {what} for agent {agent}: {error}"))
}

impl state::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let agent = self.agent_id.clone();
        off_worker(&self.state, move |s| s.get(&agent, &key))
            .await
            .map_err(|e| trap(&self.agent_id, "get", e))
    }

    async fn put(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        let agent = self.agent_id.clone();
        let budget = self.state_budget;
        let result = off_worker(&self.state, move |s| s.put(&agent, &key, value, budget)).await;
        Ok(result.map_err(|e| e.to_string()))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<bool> {
        let agent = self.agent_id.clone();
        off_worker(&self.state, move |s| s.delete(&agent, &key))
            .await
            .map_err(|e| trap(&self.agent_id, "delete", e))
    }
}

/// Log records dropped over an agent's budget.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DroppedLogs {
    /// Log records dropped.
    pub records: u64,
    /// Their bytes (after truncation to [`MAX_LOG_BYTES`]).
    pub bytes: u64,
}

/// An agent's log budget: at most `records` records and `bytes` bytes in
/// any one-second window, and in any one call. Pure bookkeeping: the caller
/// passes the time in.
#[derive(Debug)]
pub(crate) struct LogMeter {
    records: u64,
    bytes: u64,
    window_start: Option<Instant>,
    window: DroppedLogs,
    call: DroppedLogs,
    /// Dropped since the last [`LogMeter::take_dropped`].
    unreported: DroppedLogs,
    /// Dropped over the instance's life.
    pub total_dropped: DroppedLogs,
}

impl LogMeter {
    pub fn new(limits: &AgentLimits) -> Self {
        Self {
            records: u64::from(limits.log_records_per_second),
            bytes: limits.log_bytes_per_second as u64,
            window_start: None,
            window: DroppedLogs::default(),
            call: DroppedLogs::default(),
            unreported: DroppedLogs::default(),
            total_dropped: DroppedLogs::default(),
        }
    }

    /// A new call begins: its own budget starts afresh.
    pub fn start_call(&mut self) {
        self.call = DroppedLogs::default();
    }

    /// Whether a record of `len` bytes may be emitted at `now`; counts it
    /// either way.
    pub fn admit(&mut self, now: Instant, len: usize) -> bool {
        let len = len as u64;
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= Duration::from_secs(1) {
            self.window_start = Some(now);
            self.window = DroppedLogs::default();
        }
        let within = |used: &DroppedLogs| {
            used.records < self.records && used.bytes.saturating_add(len) <= self.bytes
        };
        if within(&self.window) && within(&self.call) {
            for used in [&mut self.window, &mut self.call] {
                used.records += 1;
                used.bytes += len;
            }
            return true;
        }
        for dropped in [&mut self.unreported, &mut self.total_dropped] {
            dropped.records += 1;
            dropped.bytes += len;
        }
        false
    }

    /// What was dropped since the last call of this, if anything.
    pub fn take_dropped(&mut self) -> Option<DroppedLogs> {
        let dropped = std::mem::take(&mut self.unreported);
        (dropped.records > 0).then_some(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(records: u32, bytes: usize) -> LogMeter {
        LogMeter::new(&AgentLimits {
            log_records_per_second: records,
            log_bytes_per_second: bytes,
            ..AgentLimits::default()
        })
    }

    #[test]
    fn records_over_the_per_second_budget_are_dropped_and_counted() {
        let t = Instant::now();
        let mut m = meter(3, 1000);
        let admitted: Vec<bool> = (0..5).map(|_| m.admit(t, 10)).collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        assert_eq!(
            m.take_dropped(),
            Some(DroppedLogs {
                records: 2,
                bytes: 20
            })
        );
        assert_eq!(m.take_dropped(), None, "reported once");
        // A new window (and a new call) admits again.
        m.start_call();
        assert!(m.admit(t + Duration::from_secs(1), 10));
        assert_eq!(m.total_dropped.records, 2);
    }

    #[test]
    fn bytes_are_budgeted_too() {
        let t = Instant::now();
        let mut m = meter(100, 25);
        assert!(m.admit(t, 10));
        assert!(m.admit(t, 10));
        assert!(!m.admit(t, 10), "30 bytes > 25");
        assert!(m.admit(t, 5), "a smaller record still fits");
    }

    #[test]
    fn one_call_cannot_spend_more_than_one_budget_across_windows() {
        let t = Instant::now();
        let mut m = meter(2, 1000);
        assert!(m.admit(t, 1));
        assert!(m.admit(t, 1));
        // The next window has room, but this call spent its budget.
        assert!(!m.admit(t + Duration::from_secs(2), 1));
        m.start_call();
        assert!(m.admit(t + Duration::from_secs(2), 1));
    }
}
