//! Moody agent: health checks and circuit breakers at work. It turns
//! unhealthy on command, and it can break itself so that every restart fails
//! until the host clears the fault in its state.
//!
//! Messages:
//! - `sick`: from now on its `health-check` answers `err("feeling sick")`
//!   (kept in the instance: a restarted agent is healthy again);
//! - `well`: healthy again;
//! - `faint`: from now on its `health-check` traps;
//! - `break`: stores `broken` in its state and panics; while `broken` is in
//!   its state, `init` panics, so every restart fails (delete the key from
//!   the host's state store to let it start again);
//! - `ping` → `pong`.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use core::sync::atomic::{AtomicU8, Ordering};
use guest_common::{Agent, Config, export_agent, unknown};
use terraphim::agent::{log, state};

const HEALTHY: u8 = 0;
const SICK: u8 = 1;
const FAINT: u8 = 2;

static MOOD: AtomicU8 = AtomicU8::new(HEALTHY);

const BROKEN: &str = "broken";

struct Moody;

impl Agent for Moody {
    fn init(_agent_id: &str, _config: &Config) -> Result<(), String> {
        if state::get(BROKEN).is_some() {
            log::log(log::Level::Error, "moody agent: broken, cannot start");
            panic!("moody agent: broken");
        }
        Ok(())
    }

    fn health_check() -> Result<(), String> {
        match MOOD.load(Ordering::Relaxed) {
            SICK => Err("feeling sick".into()),
            FAINT => panic!("moody agent: fainted in a health check"),
            _ => Ok(()),
        }
    }

    fn handle_message(message: &str) -> Result<String, String> {
        match message {
            "sick" | "well" | "faint" => {
                let mood = match message {
                    "sick" => SICK,
                    "faint" => FAINT,
                    _ => HEALTHY,
                };
                MOOD.store(mood, Ordering::Relaxed);
                Ok(message.into())
            }
            "break" => {
                state::put(BROKEN, b"1")?;
                panic!("moody agent: broke itself");
            }
            "ping" => Ok("pong".into()),
            _ => unknown(message),
        }
    }
}

export_agent!(Moody);
