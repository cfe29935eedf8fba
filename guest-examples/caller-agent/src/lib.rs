//! Caller agent: drives the host's `agents` and `timers` interfaces and
//! `wasi:http` on command, to show (and test) what an agent may do beyond
//! answering, and what it may not.
//!
//! Messages:
//! - `call <path> <timeout-ms> <message>`: call another agent; its reply,
//!   or an application error `<call-error>: <detail>` (`denied: ...`,
//!   `would-deadlock: ...`, `crashed: ...`, `timeout`, ...);
//! - `cast <path> <message>`: cast to another agent; `cast`, or the error;
//! - `schedule <delay-ms> <message>`: set a timer; its id, or the error;
//! - `cancel <id>`: cancel a timer; `true` if it was pending;
//! - `record <label>`: append `<label>` to the list kept in the agent's
//!   state (timers send it to see when they fire); `recorded`;
//! - `log`: that list, comma-separated;
//! - `fetch <url>`: GET the URL; `<status> <body bytes> <body>` (the body
//!   cut to 64 bytes), or an application error with the `wasi:http` error
//!   code (`HttpRequestDenied`, `HttpResponseBodySize(...)`, ...);
//! - `panic`: panics (a crash); `ping`: `pong`.
//!
//! Config `init_timer_ms` (a number) sets a timer in `init` that records
//! `init-timer`, as an OTP process re-arms its timers when it starts.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use guest_common::http;
use guest_common::{Agent, Config, export_agent, number, split, unknown};
use terraphim::agent::agents::{self, CallError};
use terraphim::agent::{state, timers};

const LOG: &str = "log";

struct Caller;

fn describe(error: CallError) -> String {
    match error {
        CallError::Denied(m) => format!("denied: {m}"),
        CallError::Invalid(m) => format!("invalid: {m}"),
        CallError::NotFound(m) => format!("not-found: {m}"),
        CallError::WouldDeadlock(m) => format!("would-deadlock: {m}"),
        CallError::Unavailable(m) => format!("unavailable: {m}"),
        CallError::Timeout => "timeout".into(),
        CallError::Crashed(m) => format!("crashed: {m}"),
        CallError::Application(m) => format!("application: {m}"),
    }
}

fn log() -> String {
    state::get(LOG)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn record(label: &str) -> Result<String, String> {
    let mut list = log();
    if !list.is_empty() {
        list.push(',');
    }
    list.push_str(label);
    state::put(LOG, list.as_bytes())?;
    Ok("recorded".into())
}

/// `"<first> <rest>"`, both required.
fn two<'a>(command: &str, arg: Option<&'a str>) -> Result<(&'a str, &'a str), String> {
    match arg.map(split) {
        Some((first, Some(rest))) => Ok((first, rest)),
        _ => Err(format!("usage: {command} <target> <message>")),
    }
}

fn fetch(url: &str) -> Result<String, String> {
    let response = http::request("GET", url, &[], None).map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&response.body);
    let cut: String = body.chars().take(64).collect();
    Ok(format!("{} {} {cut}", response.status, response.body.len()))
}

impl Agent for Caller {
    fn init(_agent_id: &str, config: &Config) -> Result<(), String> {
        if let Some(ms) = config.u64("init_timer_ms") {
            timers::schedule(ms, "record init-timer").map_err(|e| format!("{e:?}"))?;
        }
        Ok(())
    }

    fn handle_message(message: &str) -> Result<String, String> {
        let (command, arg) = split(message);
        match command {
            "ping" => Ok("pong".into()),
            "call" => {
                let (path, rest) = two("call", arg)?;
                let (timeout, message) = two("call", Some(rest))?;
                let timeout: u32 = number("call <path>", Some(timeout))?;
                agents::call(path, message, timeout).map_err(describe)
            }
            "cast" => {
                let (path, message) = two("cast", arg)?;
                agents::cast(path, message)
                    .map(|()| "cast".into())
                    .map_err(describe)
            }
            "schedule" => {
                let (delay, message) = two("schedule", arg)?;
                let delay: u64 = number("schedule", Some(delay))?;
                timers::schedule(delay, message)
                    .map(|id| id.to_string())
                    .map_err(|e| format!("{e:?}"))
            }
            "cancel" => {
                let id: u64 = number("cancel", arg)?;
                Ok(timers::cancel(id).to_string())
            }
            "record" => record(arg.unwrap_or("")),
            "log" => Ok(log()),
            "fetch" => fetch(arg.ok_or("usage: fetch <url>")?),
            "panic" => panic!("asked to panic"),
            _ => unknown(message),
        }
    }
}

export_agent!(Caller);
