//! Outbound HTTP (`wasi:http`) with real guests against a local test
//! server (127.0.0.1 only): an allowed request succeeds; a denied one fails
//! inside the guest with the `wasi:http` error code `HTTP-request-denied`
//! and never reaches the server; a response over the agent's bound is cut
//! with `HTTP-response-body-size` while the host reads a bounded part of
//! it; the agent's deadline covers a request it waits for; and the
//! llm-agent answers through the chat-completions endpoint, delegating a
//! sub-question to another agent.

mod common;

use std::time::Duration;

use common::http_server::{API_KEY, TestServer};
use common::{test_limits, wasm_factory};
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentFault, AgentLimits, AgentSpec, AgentSupervisor, CallPattern, HostPattern, HttpGrants,
    RunningTree, SupervisorConfig, TreeCallError, WasiGrants,
};

fn hosts(patterns: &[&str]) -> Vec<HostPattern> {
    patterns
        .iter()
        .map(|p| HostPattern::parse(p).expect("a valid host pattern"))
        .collect()
}

/// A caller agent named `name` with `http`.
fn caller(name: &str, http: HttpGrants) -> AgentSpec {
    AgentSpec::new("caller".into(), json!({}))
        .with_name(name.into())
        .with_http(http)
        .with_limits(test_limits())
}

async fn tree(children: Vec<AgentSpec>) -> RunningTree {
    let mut root = AgentSupervisor::new(SupervisorConfig::default(), wasm_factory());
    for child in children {
        root = root.with_child(child);
    }
    RunningTree::start(root).await.expect("the tree starts")
}

async fn fetch(tree: &RunningTree, path: &str, url: &str) -> Result<String, TreeCallError> {
    tree.call(path, format!("fetch {url}")).await
}

fn application(result: Result<String, TreeCallError>) -> String {
    match result {
        Err(TreeCallError::Application { error, .. }) => error,
        other => panic!("expected an application error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_request_succeeds_and_a_denied_one_never_leaves_the_host() {
    let server = TestServer::start();
    let port = server.port();
    let mut tree = tree(vec![
        caller(
            "allowed",
            HttpGrants::to(hosts(&[&format!("http://127.0.0.1:{port}")])),
        ),
        caller("nothing", HttpGrants::default()),
    ])
    .await;

    let ok = fetch(&tree, "root/allowed", &server.url("/hello"))
        .await
        .unwrap();
    assert_eq!(ok, "200 26 hello from the test server");

    // The same server under another host name, on another port, over
    // another scheme; and from an agent granted nothing.
    for (agent, url) in [
        (
            "root/allowed",
            format!("http://localhost:{port}/denied-host"),
        ),
        (
            "root/allowed",
            format!("http://127.0.0.1:{}/denied-port", port + 1),
        ),
        (
            "root/allowed",
            format!("https://127.0.0.1:{port}/denied-scheme"),
        ),
        ("root/nothing", server.url("/denied-by-default")),
    ] {
        let error = application(fetch(&tree, agent, &url).await);
        assert_eq!(error, "ErrorCode::HttpRequestDenied", "{agent} {url}");
    }
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/hello"], "no denied request reached the server");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_bound_is_cut_with_a_typed_error() {
    let server = TestServer::start();
    let http = HttpGrants {
        max_response_bytes: 4096,
        ..HttpGrants::to(hosts(&["http://127.0.0.1:*"]))
    };
    let mut tree = tree(vec![caller("a", http)]).await;

    let fits = fetch(&tree, "root/a", &server.url("/bytes/4096"))
        .await
        .unwrap();
    assert!(fits.starts_with("200 4096 "), "{fits}");

    // Declared too large: refused before any of the body is read.
    let error = application(fetch(&tree, "root/a", &server.url("/bytes/4097")).await);
    assert_eq!(error, "ErrorCode::HttpResponseBodySize(Some(4096))");

    // Too large as it streams in: 256 MiB without a length, cut after the
    // bound; the host stops reading, so the server cannot send it all (a
    // few MiB fill the sockets' buffers).
    let huge = 256 << 20;
    let error = application(fetch(&tree, "root/a", &server.url(&format!("/chunked/{huge}"))).await);
    // wasmtime-wasi-http 48 gives body-stream errors no `http-error-code`:
    // the guest reads the bound in the stream error's text.
    assert_eq!(
        error,
        "body stream failed: HTTP response body size exceeds limit: 4096 bytes"
    );
    assert!(
        server.streamed() < huge / 4,
        "the host kept reading: {} bytes were sent",
        server.streamed()
    );
    // The agent lives on.
    assert_eq!(tree.call("root/a", "ping".into()).await.unwrap(), "pong");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_deadline_covers_a_request_it_waits_for() {
    let server = TestServer::start();
    let spec =
        caller("a", HttpGrants::to(hosts(&["http://127.0.0.1:*"]))).with_limits(AgentLimits {
            deadline: Duration::from_millis(300),
            ..test_limits()
        });
    let mut tree = tree(vec![spec]).await;
    let error = fetch(&tree, "root/a", &server.url("/slow"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            TreeCallError::Crashed {
                fault: AgentFault::DeadlineExceeded,
                ..
            }
        ),
        "{error}"
    );
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_agent_answers_through_the_endpoint_and_delegates_to_another_agent() {
    let server = TestServer::start();
    let config = json!({
        "url": server.url("/v1/chat/completions"),
        "model": "test-model",
        "api_key_env": "LLM_API_KEY",
        "system": "Be brief.",
        "delegates": { "helper": "answers sub-questions" },
    });
    let llm = AgentSpec::new("llm".into(), config)
        .with_name("llm".into())
        .with_http(HttpGrants::to(hosts(&["http://127.0.0.1:*"])))
        .with_calls(vec![CallPattern::parse("helper").unwrap()])
        .with_wasi(WasiGrants {
            env: vec![("LLM_API_KEY".into(), API_KEY.into())],
            ..WasiGrants::default()
        })
        .with_limits(test_limits());
    let helper = AgentSpec::new("echo".into(), json!({})).with_name("helper".into());
    let mut tree = tree(vec![helper, llm]).await;

    let answer = tree.call("root/llm", "What is 2+2?".into()).await.unwrap();
    assert_eq!(
        answer, "The helper says: echo: sub-question: What is 2+2?",
        "the model asked the helper, then answered with its reply"
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    for request in &requests {
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {API_KEY}").as_str())
        );
    }
    let first: serde_json::Value = serde_json::from_str(&requests[0].body).unwrap();
    assert_eq!(first["model"], "test-model");
    assert_eq!(first["messages"][0]["content"], "Be brief.");
    assert_eq!(first["tools"][0]["function"]["name"], "ask_agent");
    tree.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_agent_says_what_to_grant_when_the_host_denies_it() {
    let server = TestServer::start();
    let config =
        json!({ "url": server.url("/v1/chat/completions"), "model": "m", "api_key": API_KEY });
    let llm = AgentSpec::new("llm".into(), config)
        .with_name("llm".into())
        .with_limits(test_limits());
    let mut tree = tree(vec![llm]).await;
    let error = application(tree.call("root/llm", "hi".into()).await);
    assert!(error.contains("http.allowed_hosts"), "{error}");
    assert!(server.requests().is_empty());
    tree.stop().await.unwrap();
}
