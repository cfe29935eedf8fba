//! The store data of one agent instance, and the host side of the WIT
//! imports (`log`, `state`).

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::terraphim::agent::{log, state, types};
use super::limits::Limiter;
use crate::state::StateStore;

/// Longest log message kept; longer ones are cut (a guest cannot flood the
/// host's log with one call).
const MAX_LOG_BYTES: usize = 4096;

/// Everything one agent's `Store` holds.
pub(crate) struct HostState {
    /// The agent's id: tags its logs and namespaces its state.
    pub agent_id: Arc<str>,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
    pub state: Arc<dyn StateStore>,
    /// When the current call must end; read by the epoch callback.
    pub deadline: Instant,
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

impl state::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.state.get(&self.agent_id, &key)
    }

    fn put(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.state
            .put(&self.agent_id, &key, value)
            .map_err(|e| e.to_string())
    }

    fn delete(&mut self, key: String) -> bool {
        self.state.delete(&self.agent_id, &key)
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(super::truncate("héllo", 2), "h");
        assert_eq!(super::truncate("héllo", 3), "hé");
        assert_eq!(super::truncate("abc", 10), "abc");
    }
}
