//! Legacy agent: built against `terraphim:agent@0.1.0`, the WIT package
//! before `agents` and `timers` were added (a frozen copy in `wit/` here),
//! to prove that components built against an earlier compatible version
//! keep loading on a host that implements a later one. It imports `log`
//! and `state` of 0.1.0 and exports the 0.1.0 `agent` interface.
//!
//! Messages: `count` increments a counter in the host state and returns
//! it, `ping` answers `pong`; anything else is an application error.

wit_bindgen::generate!({ world: "supervised-agent", path: "wit" });

use guest_common::{Agent, Config, export_agent, unknown};
use terraphim::agent::{log, state};

struct Legacy;

impl Agent for Legacy {
    fn init(agent_id: &str, _config: &Config) -> Result<(), String> {
        log::log(
            log::Level::Info,
            &format!("legacy agent {agent_id} (built against terraphim:agent@0.1.0)"),
        );
        Ok(())
    }

    fn handle_message(message: &str) -> Result<String, String> {
        match message {
            "ping" => Ok("pong".into()),
            "count" => {
                let next = state::get("count")
                    .and_then(|bytes| bytes.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0)
                    + 1;
                state::put("count", &next.to_le_bytes())?;
                Ok(next.to_string())
            }
            _ => unknown(message),
        }
    }
}

export_agent!(Legacy);
