//! Line-oriented output to stdout that survives a closed pipe
//! (`agent-host demo --json | head`): once stdout is gone, lines are
//! dropped and [`Out::is_broken`] tells the caller to wind down.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

pub struct Out {
    start: OnceLock<Instant>,
    json: bool,
    broken: AtomicBool,
}

impl Out {
    pub fn new(json: bool) -> Self {
        Self {
            start: OnceLock::new(),
            json,
            broken: AtomicBool::new(false),
        }
    }

    /// Whether lines are JSON objects rather than text.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Start the clock of [`elapsed`](Self::elapsed) now, unless it runs already.
    pub fn start_clock(&self) {
        self.start.get_or_init(Instant::now);
    }

    /// Time since the clock started (it starts at the first use).
    pub fn elapsed(&self) -> Duration {
        self.start.get_or_init(Instant::now).elapsed()
    }

    /// Whether stdout was closed (the reader went away).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Write one line (in one piece, so concurrent writers do not interleave).
    pub fn line(&self, text: &str) {
        if self.is_broken() {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            self.broken.store(true, Ordering::Relaxed);
        }
    }

    /// Write `value` as one JSON line.
    pub fn json_line(&self, value: &impl Serialize) {
        match serde_json::to_string(value) {
            Ok(text) => self.line(&text),
            Err(e) => tracing::warn!("cannot serialise an output line: {e}"),
        }
    }
}

/// Seconds with millisecond precision, for JSON.
pub fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// `[  1.203s]`
pub fn stamp(d: Duration) -> String {
    format!("[{:>7.3}s]", d.as_secs_f64())
}
