//! Exit agent: demonstrates a guest calling WASI `exit` mid-call.
//! `exit <code>` calls `std::process::exit(code)`; `ping` → `pong`.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use guest_common::{Agent, export_agent};

struct Exit;

impl Agent for Exit {
    fn handle_message(message: &str) -> Result<String, String> {
        match guest_common::split(message) {
            ("exit", arg) => std::process::exit(guest_common::number("exit", arg)?),
            ("ping", None) => Ok("pong".into()),
            _ => guest_common::unknown(message),
        }
    }
}

export_agent!(Exit);
