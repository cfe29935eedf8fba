//! A small HTTP/1.1 server for the tests, on 127.0.0.1 (never the
//! internet), on a thread of its own with its own tokio runtime, so that
//! both async tests and tests that run `agent-host` as a process can use
//! it. It records every request it receives.
//!
//! Routes:
//! - `GET /hello`: `hello from the test server`;
//! - `GET /bytes/<n>`: `n` bytes, with a `Content-Length`;
//! - `GET /chunked/<n>`: `n` bytes in 8 KiB chunks, without a length; the
//!   bytes it produced are counted ([`TestServer::streamed`]);
//! - `GET /slow`: answers after 30 s;
//! - `POST /v1/chat/completions`: an OpenAI-compatible chat-completions
//!   endpoint that wants `Authorization: Bearer test-key`. When the request
//!   offers tools and its last message is the user's, it asks for the
//!   first tool with `{"agent": <its first allowed agent>, "question":
//!   "sub-question: <user message>"}`; after a tool message it answers
//!   `The helper says: <tool message>`; without tools, `Answer to: <user
//!   message>`.
//!
//! Anything else gets a 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use wasmtime_wasi_http::io::TokioIo;

/// The API key the chat endpoint accepts.
pub const API_KEY: &str = "test-key";

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: String,
}

type Reply = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

struct State {
    requests: Mutex<Vec<Recorded>>,
    streamed: AtomicU64,
}

/// The server; stops when dropped.
pub struct TestServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Start a server on 127.0.0.1 and a free port.
    pub fn start() -> Self {
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            streamed: AtomicU64::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("an address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the server's runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let state = served.clone();
                        tokio::spawn(async move {
                            let service = service_fn(move |req| serve(state.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port())
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Whether a request for `path` was received.
    pub fn saw(&self, path: &str) -> bool {
        self.requests().iter().any(|r| r.path == path)
    }

    /// Bytes the `/chunked` route has produced so far.
    pub fn streamed(&self) -> u64 {
        self.state.streamed.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
}

fn json_reply(status: StatusCode, value: &Value) -> Reply {
    let mut response = full(status, serde_json::to_vec(value).unwrap());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn serve(state: Arc<State>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    state.requests.lock().unwrap().push(Recorded {
        method: method.clone(),
        path: path.clone(),
        authorization: authorization.clone(),
        body: body.clone(),
    });
    let size = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|n| n.parse::<u64>().ok())
    };
    Ok(match (method.as_str(), path.as_str()) {
        ("GET", "/hello") => full(StatusCode::OK, "hello from the test server"),
        ("GET", "/slow") => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            full(StatusCode::OK, "too late")
        }
        ("GET", _) if size("/bytes/").is_some() => {
            let n = size("/bytes/").unwrap_or(0) as usize;
            full(StatusCode::OK, vec![b'x'; n])
        }
        ("GET", _) if size("/chunked/").is_some() => {
            let body = Chunked {
                left: size("/chunked/").unwrap_or(0),
                state: state.clone(),
            };
            Response::new(body.boxed())
        }
        ("POST", "/v1/chat/completions") => chat(authorization.as_deref(), &body),
        _ => full(StatusCode::NOT_FOUND, "no such route"),
    })
}

/// The chat-completions endpoint (see the module's docs).
fn chat(authorization: Option<&str>, body: &str) -> Reply {
    if authorization != Some(&format!("Bearer {API_KEY}")) {
        return json_reply(
            StatusCode::UNAUTHORIZED,
            &json!({ "error": { "message": "Incorrect API key provided" } }),
        );
    }
    let Ok(request) = serde_json::from_str::<Value>(body) else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({ "error": { "message": "not JSON" } }),
        );
    };
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned();
    let message = if last["role"] == "tool" {
        json!({
            "role": "assistant",
            "content": format!("The helper says: {}", last["content"].as_str().unwrap_or("")),
        })
    } else if let Some(tool) = request["tools"].as_array().and_then(|t| t.first()) {
        let agent = tool
            .pointer("/function/parameters/properties/agent/enum/0")
            .cloned()
            .unwrap_or(Value::Null);
        let arguments = json!({ "agent": agent, "question": format!("sub-question: {user}") });
        json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": "call_1",
                "type": "function",
                "function": { "name": "ask_agent", "arguments": arguments.to_string() },
            }],
        })
    } else {
        json!({ "role": "assistant", "content": format!("Answer to: {user}") })
    };
    let finish = if message.get("tool_calls").is_some() {
        "tool_calls"
    } else {
        "stop"
    };
    json_reply(
        StatusCode::OK,
        &json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": request["model"],
            "choices": [{ "index": 0, "message": message, "finish_reason": finish }],
            "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 },
        }),
    )
}

/// A body of `left` bytes in 8 KiB chunks, of unknown length (sent
/// chunked), counting what it produced.
struct Chunked {
    left: u64,
    state: Arc<State>,
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(8 << 10);
        self.left -= n;
        self.state.streamed.fetch_add(n, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'y'; n as usize])))))
    }
}
