//! Sandbox probe agent: demonstrates that WASI is deny-by-default. It tries
//! to reach what a hostile agent would want and reports what it got, so the
//! host can check that only what an agent's spec grants is visible.
//!
//! Messages: `env <NAME>` (the variable's value, or `unset`), `args` (the
//! arguments, space-separated), `read <path>` (the file's text, or the
//! error), `connect <host:port>` (`connected`, or the error), `ping` → `pong`.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use guest_common::{Agent, export_agent, split, unknown};

struct Probe;

impl Agent for Probe {
    fn handle_message(message: &str) -> Result<String, String> {
        match split(message) {
            ("env", Some(name)) => Ok(std::env::var(name).unwrap_or_else(|_| "unset".into())),
            ("args", None) => Ok(std::env::args().collect::<Vec<_>>().join(" ")),
            ("read", Some(path)) => std::fs::read_to_string(path).map_err(|e| e.to_string()),
            ("connect", Some(address)) => std::net::TcpStream::connect(address)
                .map(|_| "connected".to_owned())
                .map_err(|e| e.to_string()),
            ("ping", None) => Ok("pong".into()),
            _ => unknown(message),
        }
    }
}

export_agent!(Probe);
