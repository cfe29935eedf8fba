//! Echo/counter agent: demonstrates durable state. The counter lives in the
//! host's per-agent state (key `count`, u64 little-endian), so a restarted
//! instance continues where its predecessor stopped.
//!
//! Messages: `count` increments and returns the counter, `get` returns it,
//! anything else is echoed as `echo: <message>`; an empty message is an
//! application error.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use guest_common::{Agent, Config, export_agent};
use terraphim::agent::{log, state};

const KEY: &str = "count";

struct Echo;

fn count() -> u64 {
    state::get(KEY)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

impl Agent for Echo {
    fn init(agent_id: &str, _config: &Config) -> Result<(), String> {
        log::log(
            log::Level::Info,
            &format!("echo agent {agent_id} initialised, count = {}", count()),
        );
        Ok(())
    }

    fn handle_message(message: &str) -> Result<String, String> {
        match message {
            "" => Err("empty message".into()),
            "get" => Ok(count().to_string()),
            "count" => {
                let next = count() + 1;
                state::put(KEY, &next.to_le_bytes())?;
                Ok(next.to_string())
            }
            _ => Ok(format!("echo: {message}")),
        }
    }
}

export_agent!(Echo);
