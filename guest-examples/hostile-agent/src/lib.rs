//! Hostile agent: pushes on every boundary where guest data enters the host,
//! so the host can prove that each one is bounded.
//!
//! Messages:
//! - `log-flood [n]`: logs `n` records of 4 KiB (forever without `n`), then
//!   replies with how many it sent;
//! - `reply <bytes>`: a reply of that many bytes;
//! - `error <bytes>`: an application error of that many bytes;
//! - `stderr-flood [n]`: writes `n` lines of 4 KiB to its stderr (forever
//!   without `n`), then replies with how many it wrote;
//! - `state-fill <value-bytes>`: stores values of that size under fresh keys
//!   until the host refuses one; replies `stored <keys> keys: <refusal>`;
//! - `ping` → `pong`.
//!
//! Config: `{"init_error_bytes": N}` makes `init` fail with an error of N
//! bytes, `{"start_error_bytes": N}` likewise for `start`.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use core::sync::atomic::{AtomicU64, Ordering};
use guest_common::{Agent, Config, export_agent, number, split, unknown};
use terraphim::agent::{log, state};

static START_ERROR_BYTES: AtomicU64 = AtomicU64::new(0);

struct Hostile;

fn text(bytes: u64) -> String {
    "x".repeat(bytes as usize)
}

fn log_flood(count: Option<u64>) -> String {
    let record = text(4096);
    let mut sent = 0u64;
    while count.is_none_or(|n| sent < n) {
        log::log(log::Level::Warn, &record);
        sent += 1;
    }
    format!("logged {sent}")
}

fn stderr_flood(count: Option<u64>) -> String {
    use std::io::Write;
    let mut line = text(4095);
    line.push('\n');
    let mut stderr = std::io::stderr();
    let mut written = 0u64;
    while count.is_none_or(|n| written < n) {
        // An error (stderr not granted is not one: it discards) ends it.
        if stderr.write_all(line.as_bytes()).is_err() {
            break;
        }
        written += 1;
    }
    format!("wrote {written}")
}

fn state_fill(value_bytes: usize) -> String {
    let value = vec![7u8; value_bytes];
    let mut stored = 0u64;
    loop {
        if let Err(refusal) = state::put(&format!("k{stored}"), &value) {
            return format!("stored {stored} keys: {refusal}");
        }
        stored += 1;
    }
}

impl Agent for Hostile {
    fn init(_agent_id: &str, config: &Config) -> Result<(), String> {
        if let Some(n) = config.u64("init_error_bytes") {
            return Err(text(n));
        }
        START_ERROR_BYTES.store(
            config.u64("start_error_bytes").unwrap_or(0),
            Ordering::Relaxed,
        );
        Ok(())
    }

    fn start() -> Result<(), String> {
        match START_ERROR_BYTES.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => Err(text(n)),
        }
    }

    fn handle_message(message: &str) -> Result<String, String> {
        match split(message) {
            ("log-flood", None) => Ok(log_flood(None)),
            ("log-flood", arg) => Ok(log_flood(Some(number("log-flood", arg)?))),
            ("reply", arg) => Ok(text(number("reply", arg)?)),
            ("error", arg) => Err(text(number("error", arg)?)),
            ("stderr-flood", None) => Ok(stderr_flood(None)),
            ("stderr-flood", arg) => Ok(stderr_flood(Some(number("stderr-flood", arg)?))),
            ("state-fill", arg) => Ok(state_fill(number("state-fill", arg)?)),
            ("ping", None) => Ok("pong".into()),
            _ => unknown(message),
        }
    }
}

export_agent!(Hostile);
