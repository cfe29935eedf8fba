//! The llm-agent example end to end through the command line: `agent-host
//! run` serves a tree file with the llm-agent (its API key in a granted
//! environment variable of the host) and a helper agent it may delegate
//! to; `agent-host call` asks it a question; the answer comes from a local
//! OpenAI-shaped test server (127.0.0.1, never the internet), through the
//! helper. The key never appears in the host's logs, even at `debug`.

mod common;

use common::cli::{RunningHost, TempDir, text};
use common::http_server::{API_KEY, TestServer};
use terraphim_agent_supervisor::examples::LLM;

#[test]
fn the_llm_agent_answers_through_run_and_call_against_a_local_endpoint() {
    let server = TestServer::start();
    let dir = TempDir::new("llm");
    std::fs::write(dir.path("llm.wasm"), LLM).expect("component written");
    let tree = dir.write(
        "tree.toml",
        &format!(
            r#"
[supervisor]
name = "root"

[[supervisor.children]]
name = "helper"
component = "echo.wasm"

[[supervisor.children]]
name = "llm"
component = "llm.wasm"
config = {{ url = "{url}", model = "test-model", api_key_env = "LLM_API_KEY", delegates = {{ helper = "answers sub-questions" }} }}
limits = {{ deadline_ms = 60_000 }}
wasi = {{ inherit_env = ["LLM_API_KEY"] }}
http = {{ allowed_hosts = ["http://127.0.0.1:*"], max_concurrent = 2 }}
calls = ["helper"]
"#,
            url = server.url("/v1/chat/completions")
        ),
    );

    let validate = dir.agent_host(&["validate", &tree]);
    assert_eq!(
        validate.status.code(),
        Some(0),
        "{}",
        text(&validate.stderr)
    );

    let mut command = dir.command(&["run", &tree, "--json", "--state", "memory"]);
    command.env("LLM_API_KEY", API_KEY).env("RUST_LOG", "debug");
    let mut host = RunningHost::spawn(command);
    host.socket();

    let call = dir.agent_host(&["call", &tree, "llm", "What is 2+2?"]);
    assert_eq!(
        (call.status.code(), text(&call.stdout).as_str()),
        (
            Some(0),
            "The helper says: echo: sub-question: What is 2+2?\n"
        ),
        "stderr:\n{}",
        text(&call.stderr)
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "a question, then the helper's answer");
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {API_KEY}"))),
        "the key from the host's environment was sent"
    );

    let (status, stderr) = host.stop();
    assert!(status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains("outbound HTTP request to http://127.0.0.1:"),
        "the debug log shows the requests: {stderr}"
    );
    assert!(!stderr.contains(API_KEY), "the key was logged:\n{stderr}");
}
