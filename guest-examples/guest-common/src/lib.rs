//! Helpers shared by the example agents.
//!
//! Each agent crate runs `wit_bindgen::generate!` itself (the bindings belong
//! to the component being built), implements the plain-Rust [`Agent`] trait,
//! whose lifecycle functions default to `Ok(())`, and calls
//! [`export_agent!`] to implement the generated `Guest` trait on top of it.

use serde_json::Value;

#[cfg(feature = "http")]
pub mod http;

/// A supervised agent in plain Rust types. Only `handle_message` is required;
/// everything else succeeds by default.
pub trait Agent {
    /// `init` with the agent's id and its parsed configuration.
    fn init(_agent_id: &str, _config: &Config) -> Result<(), String> {
        Ok(())
    }

    /// `start`, called after `init`.
    fn start() -> Result<(), String> {
        Ok(())
    }

    /// `stop`, a graceful stop request.
    fn stop() -> Result<(), String> {
        Ok(())
    }

    /// `handle-message`: one application message and its reply.
    fn handle_message(message: &str) -> Result<String, String>;

    /// `health-check`.
    fn health_check() -> Result<(), String> {
        Ok(())
    }

    /// `terminate`, with the reason rendered as text.
    fn terminate(_reason: &str) {}
}

/// Implements the generated `exports::terraphim::agent::agent::Guest` trait
/// for a type implementing [`Agent`] and exports it. Invoke it at the crate
/// root, after `wit_bindgen::generate!`. System messages are acknowledged.
#[macro_export]
macro_rules! export_agent {
    ($agent:ident) => {
        impl exports::terraphim::agent::agent::Guest for $agent {
            fn init(args: exports::terraphim::agent::agent::InitArgs) -> Result<(), String> {
                let config = $crate::Config::parse(&args.config)?;
                <$agent as $crate::Agent>::init(&args.agent_id, &config)
            }

            fn start() -> Result<(), String> {
                <$agent as $crate::Agent>::start()
            }

            fn stop() -> Result<(), String> {
                <$agent as $crate::Agent>::stop()
            }

            fn handle_message(message: String) -> Result<String, String> {
                <$agent as $crate::Agent>::handle_message(&message)
            }

            fn handle_system_message(
                _message: exports::terraphim::agent::agent::SystemMessage,
            ) -> Result<(), String> {
                Ok(())
            }

            fn health_check() -> Result<(), String> {
                <$agent as $crate::Agent>::health_check()
            }

            fn terminate(reason: exports::terraphim::agent::agent::TerminateReason) {
                <$agent as $crate::Agent>::terminate(&format!("{reason:?}"))
            }
        }

        export!($agent);
    };
}

/// An agent's configuration: the JSON object of `init-args.config`.
#[derive(Debug, Default)]
pub struct Config(Value);

impl Config {
    /// Parses the config text; empty text is an empty config.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(text)
            .map(Self)
            .map_err(|e| format!("invalid config JSON: {e}"))
    }

    /// Whether `key` is `true`.
    pub fn flag(&self, key: &str) -> bool {
        self.0.get(key).and_then(Value::as_bool).unwrap_or(false)
    }

    /// The unsigned integer under `key`, if any.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.0.get(key).and_then(Value::as_u64)
    }

    /// The string under `key`, if any.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    /// The JSON value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }
}

/// Splits `"command argument"` into the command and its (trimmed) argument.
pub fn split(message: &str) -> (&str, Option<&str>) {
    match message.trim().split_once(char::is_whitespace) {
        Some((command, arg)) => (command, Some(arg.trim())),
        None => (message.trim(), None),
    }
}

/// Parses a command's required numeric argument.
pub fn number<T: core::str::FromStr>(command: &str, arg: Option<&str>) -> Result<T, String> {
    arg.and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("usage: {command} <number>"))
}

/// The reply to a message an agent does not understand.
pub fn unknown(message: &str) -> Result<String, String> {
    Err(format!("unknown message: {message:?}"))
}
