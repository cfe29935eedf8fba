//! What is known about a crash, to debug it: the fault, the WASM backtrace
//! with function names, the last lines the guest wrote to its stdout and
//! stderr, the message it was handling, and the fuel and memory it had used.
//! Every part is bounded, so that a report can be kept in the history.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::text::bound;

/// Most backtrace frames kept (the innermost first).
pub const MAX_FRAMES: usize = 64;
/// Longest frame description kept.
const MAX_FRAME_BYTES: usize = 256;
/// Most bytes of the message being handled kept in a report.
pub const MAX_REPORT_MESSAGE: usize = 1024;

/// A crash, as its history entry, its status and its event show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashReport {
    /// When the crash was seen.
    pub at: DateTime<Utc>,
    /// What killed it (the exit reason, as text).
    pub fault: String,
    /// The WASM call stack at the trap, innermost first: function names
    /// where the component has a name section (demangled), else
    /// `<module>#<function index>`.
    pub backtrace: Vec<String>,
    /// The last lines the guest wrote to its stdout and stderr (captured
    /// whether or not they were granted), oldest first.
    pub output: Vec<String>,
    /// The message it was handling (cut), if it crashed on one.
    pub message: Option<String>,
    /// That message's sequence number in its incarnation (1 for the first).
    pub sequence: Option<u64>,
    /// That message's content hash (FNV-1a, hex), which quarantine goes by.
    pub message_hash: Option<String>,
    /// Fuel the instance had used over its life.
    pub fuel_used: u64,
    /// Linear memory it held, in bytes.
    pub memory_bytes: usize,
}

impl CrashReport {
    /// What the report weighs in memory, roughly (for the history's byte
    /// bound).
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.fault.len()
            + self.backtrace.iter().map(String::len).sum::<usize>()
            + self.output.iter().map(String::len).sum::<usize>()
            + self.message.as_ref().map_or(0, String::len)
    }
}

/// The WASM frames of a wasmtime error, bounded.
pub(crate) fn backtrace(err: &wasmtime::Error) -> Vec<String> {
    let Some(trace) = err.downcast_ref::<wasmtime::WasmBacktrace>() else {
        return Vec::new();
    };
    trace
        .frames()
        .iter()
        .take(MAX_FRAMES)
        .map(|frame| {
            let text = match frame.func_name() {
                // `{:#}`: without the hashes that say nothing to a reader.
                Some(name) => format!("{:#}", rustc_demangle::demangle(name)),
                None => format!(
                    "{}#{}",
                    frame.module().name().unwrap_or("<module>"),
                    frame.func_index()
                ),
            };
            bound(text, MAX_FRAME_BYTES)
        })
        .collect()
}

/// The last bytes an instance wrote to its stdout and stderr, at most
/// `capacity` of them (older bytes are dropped). Shared by the instance's
/// output streams and whoever reports its crash.
#[derive(Debug, Clone)]
pub(crate) struct OutputRing {
    inner: Arc<Mutex<VecDeque<u8>>>,
    capacity: usize,
}

impl OutputRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            capacity,
        }
    }

    /// Keep `bytes`, dropping the oldest beyond the capacity.
    pub fn push(&self, bytes: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let mut ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let excess = (ring.len() + bytes.len())
            .saturating_sub(self.capacity)
            .min(ring.len());
        ring.drain(..excess);
        ring.extend(bytes);
    }

    /// The kept output as lines, oldest first; a first line cut by the ring
    /// is marked with `…`.
    pub fn lines(&self) -> Vec<String> {
        let ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = ring.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let full = ring.len() >= self.capacity;
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if full && let Some(first) = lines.first_mut() {
            first.insert(0, '…');
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_bytes_as_lines() {
        let ring = OutputRing::new(16);
        ring.push(b"first line\n");
        assert_eq!(ring.lines(), ["first line"]);
        ring.push(b"second\nthird\n");
        // 24 bytes written, 16 kept: "line\nsecond\nthird\n" cut to its end.
        assert_eq!(ring.lines(), ["…ne", "second", "third"]);
        ring.push(&[b'x'; 100]);
        assert_eq!(ring.lines(), [format!("…{}", "x".repeat(16))]);
    }

    #[test]
    fn a_ring_of_no_bytes_keeps_nothing() {
        let ring = OutputRing::new(0);
        ring.push(b"lost\n");
        assert!(ring.lines().is_empty());
    }
}
