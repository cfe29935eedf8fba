//! What the fuzz targets check of one input, shared with the stable-toolchain
//! tests of `host/tests/fuzz_inputs.rs` (which include this file as a
//! module): the three entry points that take untrusted bytes must never
//! panic (nor hang), and must answer with their typed results.
//!
//! - [`tree_file`]: `TreeFile::parse`, a tree file's text.
//! - [`component_loader`]: `Runtime::load_bytes`, a component's bytes.
//! - [`control_protocol`]: the control socket's line reading, request
//!   parsing and answer encoding, over a byte stream.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde_json::json;
use terraphim_agent_supervisor::control_protocol::{
    Failure, Line, Request, answer_line, decode_answer, encode_request, failure_answer, is_blank,
    parse_request, read_line_limited,
};
use terraphim_agent_supervisor::tree::{TreeFile, TreeNode};
use terraphim_agent_supervisor::{
    AgentComponent, AgentInstance, AgentLimits, AgentPid, CallError, InitArgs, InstanceOptions,
    LoadError, MAX_GUEST_TEXT, MemoryStateStore, Runtime, SupervisorId, TerminateReason,
    WasiGrants,
};

/// Where the fuzzed tree files pretend to live: component paths resolve
/// against a folder that does not exist.
pub const TREE_PATH: &str = "/nonexistent/fuzz/tree.toml";

/// Check one tree file's text: `TreeFile::parse` returns a tree or its
/// problems, never panics; every problem names the file and says
/// something; a line it gives is in the text.
pub fn tree_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(TREE_PATH);
    match TreeFile::parse(path, text) {
        Ok(tree) => {
            let nodes = tree.nodes();
            let agents = tree.agents();
            assert!(agents.len() <= nodes.len());
            // Every agent's component resolves under the file's folder or
            // is an absolute path of its own, and every value the file
            // gave passes the checks the supervisor makes when it adds the
            // child: a tree that `validate` accepts does not fail later.
            for (field, agent) in agents {
                assert!(agent.component.is_absolute());
                let checks = [
                    agent.limits.validate(),
                    agent.health.validate(),
                    agent.backoff.validate(),
                    agent.breaker.map_or(Ok(()), |b| b.validate()),
                ];
                for check in checks {
                    assert_eq!(check, Ok(()), "{field}");
                }
            }
            let mut supervisors = vec![&tree.root];
            while let Some(supervisor) = supervisors.pop() {
                assert_eq!(supervisor.backoff.validate(), Ok(()));
                assert_eq!(supervisor.breaker.map_or(Ok(()), |b| b.validate()), Ok(()));
                assert!(supervisor.children.len() <= supervisor.max_children);
                for child in &supervisor.children {
                    if let TreeNode::Supervisor(nested) = child {
                        supervisors.push(nested);
                    }
                }
            }
        }
        Err(error) => {
            assert!(!error.problems.is_empty(), "an error without a problem");
            let lines = text.split('\n').count();
            for problem in &error.problems {
                assert_eq!(problem.file, path);
                assert!(!problem.message.trim().is_empty(), "{problem:?}");
                if let Some(line) = problem.line {
                    assert!((1..=lines).contains(&line), "line {line} of {lines}");
                }
            }
            assert!(error.to_string().contains(TREE_PATH));
        }
    }
}

/// Check one component's bytes: `Runtime::load_bytes` loads it or says
/// why not with a [`LoadError`] that names it, never panics. One that
/// loads is run as a hostile guest would be ([`run_agent`]).
pub fn component_loader(runtime: &Runtime, data: &[u8]) {
    const NAME: &str = "fuzzed.wasm";
    match runtime.load_bytes(NAME, data) {
        Ok(component) => {
            assert_eq!(component.name(), NAME);
            run_agent(runtime, &component);
        }
        Err(error) => {
            assert!(error.to_string().contains(NAME), "{error}");
            let header = data.len() >= 8 && data.starts_with(b"\0asm");
            if header && data[6..8] == [0, 0] {
                assert!(matches!(error, LoadError::CoreModule { .. }), "{error}");
            }
            if !header && std::str::from_utf8(data).is_err() {
                assert!(matches!(error, LoadError::NotWasm { .. }), "{error}");
            }
            assert!(!matches!(error, LoadError::Io { .. }), "no file here");
        }
    }
}

/// Limits of a fuzzed agent: small and short, so that a guest that loops
/// or grows is stopped quickly.
pub fn fuzz_limits() -> AgentLimits {
    AgentLimits {
        fuel_per_call: Some(10_000_000),
        deadline: Duration::from_secs(2),
        memory_bytes: 4 << 20,
        ..AgentLimits::default()
    }
}

/// Run a loaded component through its whole life under [`fuzz_limits`]:
/// instantiate, init, start, a few messages (those the WAT fixture knows),
/// a health check, stop, terminate. Whatever the guest does, each step
/// ends with its typed result (a fault, a call error), never a panic or a
/// hang; after a trap the instance is dead and says so. The results of the
/// steps after `instantiate`, in order (none if it did not instantiate).
pub fn run_agent(runtime: &Runtime, component: &AgentComponent) -> Vec<Result<String, CallError>> {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    tokio.block_on(async {
        let options = InstanceOptions {
            agent_id: "fuzzed".into(),
            limits: fuzz_limits(),
            grants: WasiGrants::default(),
            state: Arc::new(MemoryStateStore::default()),
            ..InstanceOptions::default()
        };
        let Ok(mut agent) = AgentInstance::instantiate(runtime, component, options).await else {
            return Vec::new();
        };
        let args = InitArgs {
            agent_id: AgentPid::new(),
            supervisor_id: SupervisorId::new(),
            config: json!({}),
        };
        let mut steps: Vec<Result<String, CallError>> = vec![
            agent.init(&args).await.map(|()| String::new()),
            agent.start().await.map(|()| String::new()),
        ];
        for message in [
            "ping",
            "grow-all 1",
            "memory-sizes",
            "grow-tables 1",
            "table-sizes",
        ] {
            steps.push(agent.handle_message(message).await);
        }
        steps.push(agent.health_check().await.map(|()| String::new()));
        steps.push(agent.stop().await.map(|()| String::new()));
        let reason = TerminateReason::Normal;
        steps.push(agent.terminate(&reason).await.map(|()| String::new()));
        for step in &steps {
            match step {
                // A reply is copied out of the guest's memory: no larger.
                Ok(reply) => assert!(reply.len() <= fuzz_limits().memory_bytes),
                // What a guest says in an error is bounded where it enters.
                Err(CallError::Application(text)) => assert!(text.len() <= MAX_GUEST_TEXT),
                Err(CallError::Exited | CallError::Fault(_)) => {}
            }
        }
        let died = steps
            .iter()
            .any(|s| s.as_ref().is_err_and(|e| !e.instance_alive()));
        assert_eq!(agent.is_alive(), !died, "{steps:?}");
        steps
    })
}

/// Poll a future that never waits (reading from memory) to its end.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("reading from memory never waits"),
    }
}

/// Check one byte stream through the control protocol, as the host reads
/// it: the first byte sets the line limit (1 to 256 bytes, to reach
/// the too-long case; the host's is 16 MiB), the rest is what a client
/// sends. Lines come out whole, cut or too long, and nothing is lost or
/// read twice; each non-blank line is a request or a Serialization
/// failure; a request encodes back to a line that parses to it; every
/// answer is one line that the client decodes back; no line, as an
/// answer, makes the client panic.
pub fn control_protocol(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let limit = usize::from(first) + 1;
    let mut reader = stream;
    let mut consumed = 0;
    loop {
        let line = ready(read_line_limited(&mut reader, limit)).expect("memory reads");
        let line = match line {
            Line::End => break,
            Line::TooLong => {
                // The host refuses the connection after a too-long line.
                consumed += limit;
                assert_eq!(consumed + reader.len(), stream.len());
                assert!(!stream[consumed - limit..consumed].contains(&b'\n'));
                break;
            }
            Line::Whole(line) => {
                assert!(line.ends_with(b"\n") && line.len() <= limit);
                line
            }
            Line::Cut(line) => {
                assert!(!line.contains(&b'\n') && line.len() < limit);
                assert!(reader.is_empty(), "cut only at the end");
                line
            }
        };
        assert_eq!(&stream[consumed..consumed + line.len()], &line[..]);
        consumed += line.len();
        // What the client makes of it as an answer: never a panic.
        let _ = decode_answer::<serde_json::Value>(&line);
        let _ = decode_answer::<String>(&line);
        if is_blank(&line) {
            continue;
        }
        let answer = match parse_request(&line) {
            Ok(request) => {
                let encoded = encode_request(&request).expect("a parsed request fits");
                assert_eq!(parse_request(encoded.as_bytes()), Ok(request.clone()));
                let reply = match &request {
                    Request::Call { agent, message } => {
                        json!({ "ok": format!("{agent}: {message}") })
                    }
                    Request::Status {}
                    | Request::Crashes { .. }
                    | Request::DeadLetters { .. }
                    | Request::Replay { .. }
                    | Request::Discard { .. } => json!({ "ok": [] }),
                };
                let line = answer_line(&reply);
                if let Request::Call { agent, message } = &request {
                    let decoded: Result<Result<String, Failure>, String> =
                        decode_answer(line.as_bytes());
                    assert_eq!(decoded, Ok(Ok(format!("{agent}: {message}"))));
                }
                line
            }
            Err(failure) => {
                assert_eq!(failure.category, "Serialization");
                let line = answer_line(&failure_answer(&failure));
                let decoded: Result<Result<String, Failure>, String> =
                    decode_answer(line.as_bytes());
                assert_eq!(decoded, Ok(Err(failure)));
                line
            }
        };
        assert!(answer.ends_with('\n') && answer.matches('\n').count() == 1);
    }
    assert_eq!(consumed.min(stream.len()), consumed);
}
