//! LLM agent: answers each message by asking an OpenAI-compatible
//! chat-completions endpoint, and lets the model delegate sub-questions to
//! other agents of the tree through the host's `agents.call`.
//!
//! Config (JSON, from the spec):
//! - `url` (required): the chat-completions endpoint, e.g.
//!   `https://api.openai.com/v1/chat/completions`; the agent's spec must
//!   allow its scheme, host and port in `http.allowed_hosts`;
//! - `model` (required): e.g. `gpt-4o-mini`;
//! - `api_key_env`: the environment variable holding the API key, sent as
//!   `Authorization: Bearer <key>` (grant it with `wasi.inherit_env`); if
//!   not given, `OPENAI_API_KEY` is used when present and no key is sent
//!   otherwise (local servers). `api_key` gives the key in the config
//!   instead. The key is never logged;
//! - `system`: a system prompt;
//! - `delegates`: `{ "<path>": "<what that agent does>", ... }`, agents the
//!   model may ask through the tool `ask_agent` (the spec's `calls` must
//!   grant them too);
//! - `call_timeout_ms` (default 10000), `max_rounds` (model requests per
//!   message, default 4), `max_tokens` (sent if given).
//!
//! Any message is a question; the reply is the model's answer. `ping`
//! answers `pong` without asking the model.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use std::cell::RefCell;

use guest_common::http::{self, HttpErrorCode, HttpFailure};
use guest_common::{Agent, Config, export_agent};
use serde_json::{Value, json};
use terraphim::agent::agents::{self, CallError};
use terraphim::agent::log;

/// The agent's settings, from its config.
struct Settings {
    url: String,
    model: String,
    api_key: Option<String>,
    api_key_env: Option<String>,
    system: Option<String>,
    delegates: Vec<(String, String)>,
    call_timeout_ms: u32,
    max_rounds: u32,
    max_tokens: Option<u64>,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

struct Llm;

impl Settings {
    fn from(config: &Config) -> Result<Self, String> {
        let required = |key: &str| {
            config
                .str(key)
                .map(str::to_owned)
                .ok_or_else(|| format!("config `{key}` is required (see the llm-agent's docs)"))
        };
        let url = required("url")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("config `url` must be an http(s) URL, got {url:?}"));
        }
        let delegates = match config.get("delegates") {
            None => Vec::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(path, what)| (path.clone(), what.as_str().unwrap_or("").to_owned()))
                .collect(),
            Some(_) => {
                return Err("config `delegates` must map agent paths to descriptions".into());
            }
        };
        Ok(Self {
            url,
            model: required("model")?,
            api_key: config.str("api_key").map(str::to_owned),
            api_key_env: config.str("api_key_env").map(str::to_owned),
            system: config.str("system").map(str::to_owned),
            delegates,
            call_timeout_ms: config
                .u64("call_timeout_ms")
                .map_or(10_000, |v| u32::try_from(v).unwrap_or(u32::MAX)),
            max_rounds: config
                .u64("max_rounds")
                .map_or(4, |v| u32::try_from(v).unwrap_or(u32::MAX).max(1)),
            max_tokens: config.u64("max_tokens"),
        })
    }

    /// The API key, if one is configured or in the environment.
    fn key(&self) -> Result<Option<String>, String> {
        if let Some(key) = &self.api_key {
            return Ok(Some(key.clone()));
        }
        match &self.api_key_env {
            Some(name) => std::env::var(name).map(Some).map_err(|_| {
                format!(
                    "the environment variable {name} (config `api_key_env`) is not set; \
                     grant it to the agent with `wasi = {{ inherit_env = [\"{name}\"] }}`"
                )
            }),
            None => Ok(std::env::var("OPENAI_API_KEY").ok()),
        }
    }

    /// The `ask_agent` tool, if the model may delegate.
    fn tools(&self) -> Option<Value> {
        if self.delegates.is_empty() {
            return None;
        }
        let paths: Vec<&str> = self.delegates.iter().map(|(p, _)| p.as_str()).collect();
        let described: Vec<String> = self
            .delegates
            .iter()
            .map(|(p, what)| format!("{p}: {what}"))
            .collect();
        Some(json!([{
            "type": "function",
            "function": {
                "name": "ask_agent",
                "description": format!(
                    "Ask another agent a question and get its answer. Agents: {}",
                    described.join("; ")
                ),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "agent": { "type": "string", "enum": paths },
                        "question": { "type": "string" }
                    },
                    "required": ["agent", "question"]
                }
            }
        }]))
    }
}

/// One chat-completions request; the assistant's message.
fn complete(settings: &Settings, messages: &[Value]) -> Result<Value, String> {
    let mut body = json!({ "model": settings.model, "messages": messages });
    if let Some(tools) = settings.tools() {
        body["tools"] = tools;
    }
    if let Some(max) = settings.max_tokens {
        body["max_tokens"] = json!(max);
    }
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let key = settings.key()?;
    let bearer = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    let response = http::request("POST", &settings.url, &headers, Some(&body))
        .map_err(|e| explain(&settings.url, e))?;
    if !(200..300).contains(&response.status) {
        let text = String::from_utf8_lossy(&response.body);
        let excerpt: String = text.chars().take(300).collect();
        return Err(format!(
            "the model endpoint answered HTTP {}: {excerpt}",
            response.status
        ));
    }
    let reply: Value = serde_json::from_slice(&response.body)
        .map_err(|e| format!("the model endpoint's answer is not JSON: {e}"))?;
    reply
        .pointer("/choices/0/message")
        .cloned()
        .ok_or_else(|| "the model endpoint's answer has no choices[0].message".into())
}

/// A failed request, in words that say what to do.
fn explain(url: &str, failure: HttpFailure) -> String {
    match failure.code() {
        Some(HttpErrorCode::HttpRequestDenied) => format!(
            "the host denied the request to {url}: add its scheme://host[:port] to the agent's \
             `http.allowed_hosts`"
        ),
        Some(HttpErrorCode::HttpResponseBodySize(_)) => format!(
            "the answer from {url} is larger than the agent's `http.max_response_bytes` ({failure})"
        ),
        _ => format!("the request to {url} failed: {failure}"),
    }
}

/// Run the `ask_agent` tool call `call`; the text for the model.
fn ask_agent(settings: &Settings, call: &Value) -> String {
    let arguments = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .unwrap_or(Value::Null);
    let agent = arguments["agent"].as_str().unwrap_or("");
    let question = arguments["question"].as_str().unwrap_or("");
    if call.pointer("/function/name").and_then(Value::as_str) != Some("ask_agent") {
        return "error: unknown tool".into();
    }
    if !settings.delegates.iter().any(|(p, _)| p == agent) {
        return format!("error: {agent:?} is not an agent you may ask");
    }
    log::log(log::Level::Debug, &format!("asking {agent}"));
    match agents::call(agent, question, settings.call_timeout_ms) {
        Ok(answer) => answer,
        Err(CallError::Timeout) => format!("error: {agent} did not answer in time"),
        Err(e) => format!("error: {agent} could not answer: {e:?}"),
    }
}

fn answer(settings: &Settings, question: &str) -> Result<String, String> {
    let mut messages = Vec::new();
    if let Some(system) = &settings.system {
        messages.push(json!({ "role": "system", "content": system }));
    }
    messages.push(json!({ "role": "user", "content": question }));
    for _ in 0..settings.max_rounds {
        let message = complete(settings, &messages)?;
        let calls = message
            .get("tool_calls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if calls.is_empty() {
            return message
                .get("content")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| "the model's answer has no content".into());
        }
        messages.push(message);
        for call in &calls {
            let content = ask_agent(settings, call);
            let id = call.get("id").cloned().unwrap_or(Value::Null);
            messages.push(json!({ "role": "tool", "tool_call_id": id, "content": content }));
        }
    }
    Err(format!(
        "no answer after {} requests to the model (config `max_rounds`)",
        settings.max_rounds
    ))
}

impl Agent for Llm {
    fn init(_agent_id: &str, config: &Config) -> Result<(), String> {
        let settings = Settings::from(config)?;
        SETTINGS.with(|s| *s.borrow_mut() = Some(settings));
        Ok(())
    }

    fn handle_message(message: &str) -> Result<String, String> {
        if message.trim() == "ping" {
            return Ok("pong".into());
        }
        SETTINGS.with(|s| match &*s.borrow() {
            Some(settings) => answer(settings, message),
            None => Err("not initialised".into()),
        })
    }
}

export_agent!(Llm);
