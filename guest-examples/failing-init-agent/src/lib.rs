//! Failing-init agent: demonstrates a start failure reported as an
//! application error. `init` returns an error unless the config has
//! `{"succeed": true}`; `ping` → `pong`.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use guest_common::{Agent, Config, export_agent};

struct FailingInit;

impl Agent for FailingInit {
    fn init(_agent_id: &str, config: &Config) -> Result<(), String> {
        if config.flag("succeed") {
            Ok(())
        } else {
            Err("failing-init: refusing to start".into())
        }
    }

    fn handle_message(message: &str) -> Result<String, String> {
        match message {
            "ping" => Ok("pong".into()),
            _ => guest_common::unknown(message),
        }
    }
}

export_agent!(FailingInit);
