//! Sleeper agent: demonstrates timeouts on agents that block in the host.
//! `sleep <ms>` blocks in a WASI poll, `spin <ms>` busy-waits on the
//! monotonic clock (a host call per iteration, little fuel), `ping` → `pong`.
//! Config `{"stop_delay_ms": N}` makes `stop` take N ms (shutdown-policy tests).

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use core::sync::atomic::{AtomicU64, Ordering};
use guest_common::{Agent, Config, export_agent};
use std::time::{Duration, Instant};

static STOP_DELAY_MS: AtomicU64 = AtomicU64::new(0);

struct Sleeper;

impl Agent for Sleeper {
    fn init(_agent_id: &str, config: &Config) -> Result<(), String> {
        STOP_DELAY_MS.store(config.u64("stop_delay_ms").unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    fn stop() -> Result<(), String> {
        std::thread::sleep(Duration::from_millis(STOP_DELAY_MS.load(Ordering::Relaxed)));
        Ok(())
    }

    fn handle_message(message: &str) -> Result<String, String> {
        match guest_common::split(message) {
            ("sleep", arg) => {
                let ms = guest_common::number("sleep", arg)?;
                std::thread::sleep(Duration::from_millis(ms));
                Ok(format!("slept {ms}"))
            }
            ("spin", arg) => {
                let ms = guest_common::number("spin", arg)?;
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(ms) {}
                Ok(format!("spun {ms}"))
            }
            ("ping", None) => Ok("pong".into()),
            _ => guest_common::unknown(message),
        }
    }
}

export_agent!(Sleeper);
