//! The observer's HTTP server (feature `http`): Prometheus metrics, a JSON
//! API, the live event stream and the live tree view, all on one address.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /` (`/app.js`, `/app.css`) | the live tree view (assets embedded in the binary) |
//! | `GET /metrics` | every metric, Prometheus text format 0.0.4 |
//! | `GET /api/status` | [`TreeSnapshot`](super::TreeSnapshot) as JSON |
//! | `GET /api/nodes/{path}` | [`NodeDetail`](super::NodeDetail) of one node |
//! | `GET /api/events/recent` | the last [`RECENT_EVENTS`](super::RECENT_EVENTS) events |
//! | `GET /api/events` | the live events, server-sent (`event: supervisor`, JSON data) |
//! | `POST /api/control/terminate/{path}`, `.../restart/{path}` | OTP's management calls, only with a [`ControlToken`] |
//!
//! Security, since any web page the operator opens may send requests to a
//! loopback address:
//! - [`bind`] refuses an address that is not loopback unless told
//!   otherwise ([`HttpConfig::allow_remote`]).
//! - Every request whose `Host` header is not the bound address (or
//!   `localhost` with its port, for a loopback address; any IP literal with
//!   its port when bound to every interface) is refused: a DNS-rebinding
//!   page, whose requests carry its own host name, reads nothing.
//! - No CORS headers, ever: another origin's page cannot read an answer.
//! - The management calls are off unless a [`ControlToken`] is configured,
//!   and then need it in the [`TOKEN_HEADER`] header. A cross-site form or
//!   `fetch` cannot send a custom header without a CORS preflight, which
//!   this server never grants; a request whose `Origin` is another origin
//!   is refused too.
//! - Every answer says `nosniff`, may not be framed, and has a strict
//!   content security policy; at most [`MAX_EVENT_STREAMS`] event streams
//!   are served at once.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, watch};

use super::{METRICS_CONTENT_TYPE, Observer};
use crate::{NodeError, ResolveError};

/// The header that carries the [`ControlToken`] of the management calls.
pub const TOKEN_HEADER: &str = "x-agent-host-token";

/// Most event streams (`GET /api/events`) served at once; one more is
/// answered 503.
pub const MAX_EVENT_STREAMS: usize = 32;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// Why the server cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address is not understood.
    #[error(
        "`{given}` is not an address to listen on: {why}; give PORT, IP:PORT or localhost:PORT"
    )]
    BadAddress {
        /// What was given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// The address is not a loopback one and remote access was not allowed.
    #[error(
        "{addr} is not a loopback address: anyone who can reach it could read the tree's status and metrics; listen on 127.0.0.1 or [::1], or allow it explicitly (--http-allow-remote)"
    )]
    NotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Parse the address to listen on: `PORT` (on 127.0.0.1), `IP:PORT`,
/// `[IPv6]:PORT` or `localhost:PORT` (127.0.0.1). Port 0 picks a free port.
///
/// # Errors
///
/// [`HttpError::BadAddress`] for anything else (host names other than
/// `localhost` are not resolved).
///
/// ```
/// # use terraphim_agent_supervisor::observe::http::parse_addr;
/// assert_eq!(parse_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
/// assert_eq!(parse_addr("localhost:0").unwrap().to_string(), "127.0.0.1:0");
/// assert_eq!(parse_addr("[::1]:80").unwrap().to_string(), "[::1]:80");
/// assert!(parse_addr("example.org:80").is_err());
/// ```
pub fn parse_addr(text: &str) -> Result<SocketAddr, HttpError> {
    let bad = |why: &str| HttpError::BadAddress {
        given: text.to_owned(),
        why: why.to_owned(),
    };
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match text.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
            .map_err(|_| bad("the port is not a number from 0 to 65535")),
        Some((host, _)) if host.parse::<IpAddr>().is_err() && !host.starts_with('[') => {
            Err(bad("host names other than localhost are not looked up"))
        }
        Some(_) => Err(bad("the IP address or the port is not valid")),
        None => Err(bad("no port")),
    }
}

/// The secret of the management calls: 256 bits from the operating
/// system's random source (two UUID v4s), as 64 hex digits.
#[derive(Clone)]
pub struct ControlToken(String);

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(..)")
    }
}

impl ControlToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        Self(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// The token, to hand to the operator.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `given` is the token (in time independent of where they
    /// differ).
    pub fn matches(&self, given: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        ours.len() == given.len()
            && ours
                .iter()
                .zip(given)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// How the server behaves.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// Listen on an address that is not loopback.
    pub allow_remote: bool,
    /// Serve the management calls to requests that carry this token.
    /// `None`: they are refused.
    pub control: Option<ControlToken>,
}

/// A bound, not yet serving, HTTP server.
#[derive(Debug)]
pub struct HttpServer {
    listener: TcpListener,
    addr: SocketAddr,
    config: HttpConfig,
}

/// Listen on `addr`.
///
/// # Errors
///
/// [`HttpError::NotLoopback`] for an address that is not loopback unless
/// `config.allow_remote`; [`HttpError::Bind`] if it cannot be bound.
pub async fn bind(addr: SocketAddr, config: HttpConfig) -> Result<HttpServer, HttpError> {
    if !addr.ip().is_loopback() && !config.allow_remote {
        return Err(HttpError::NotLoopback { addr });
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    Ok(HttpServer {
        listener,
        addr,
        config,
    })
}

#[derive(Clone)]
struct App {
    observer: Observer,
    addr: SocketAddr,
    control: Option<ControlToken>,
    streams: Arc<Semaphore>,
    closing: watch::Receiver<bool>,
}

impl HttpServer {
    /// The address it listens on (with the port chosen, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve `observer` until `shutdown` completes; then the event streams
    /// end and the server waits for the requests in progress.
    ///
    /// # Errors
    ///
    /// An I/O error of the listening socket.
    pub async fn serve(
        self,
        observer: Observer,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (closing_tx, closing) = watch::channel(false);
        let app = App {
            observer,
            addr: self.addr,
            control: self.config.control,
            streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
            closing,
        };
        let router = router(app.clone());
        let shutdown = async move {
            shutdown.await;
            let _ = closing_tx.send(true);
        };
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/api/events/recent", get(recent))
        .route("/api/nodes/{*path}", get(node))
        .route("/api/control/{action}/{*path}", post(control))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// A JSON error answer.
fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    let error = error.into();
    (status, axum::Json(json!({ "error": error }))).into_response()
}

/// Whether `host` (a `Host` header) names the server bound at `bound`: the
/// bound IP address, or for a loopback address also `localhost`, or for an
/// unspecified one (every interface) any IP literal; with the bound port.
/// Never another host name: that is what a DNS-rebinding page sends.
pub fn host_allowed(host: &str, bound: SocketAddr) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, port)) => match port.strip_prefix(':') {
                Some(port) => (ip, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    let port = match port {
        Some(port) => port.parse::<u16>().ok(),
        None => Some(80),
    };
    if port != Some(bound.port()) {
        return false;
    }
    let bound_ip = bound.ip();
    if name.eq_ignore_ascii_case("localhost") {
        return bound_ip.is_loopback() || bound_ip.is_unspecified();
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => ip == bound_ip || bound_ip.is_unspecified(),
        Err(_) => false,
    }
}

/// Every request: the `Host` check; every answer: the security headers.
async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let mut response = if host_allowed(host, app.addr) {
        next.run(request).await
    } else {
        refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "the Host header `{host}` is not this server's address (refused against DNS rebinding); use http://{}/",
                app.addr
            ),
        )
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn app_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
}

async fn app_css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS)
}

async fn not_found() -> Response {
    refuse(StatusCode::NOT_FOUND, "no such page")
}

async fn metrics(State(app): State<App>) -> Response {
    match app.observer.metrics_text() {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(_) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded",
        ),
    }
}

async fn status(State(app): State<App>) -> Response {
    let mut snapshot = serde_json::to_value(app.observer.snapshot()).unwrap_or_default();
    if let Some(object) = snapshot.as_object_mut() {
        object.insert("control".into(), json!(app.control.is_some()));
    }
    axum::Json(snapshot).into_response()
}

async fn recent(State(app): State<App>) -> Response {
    axum::Json(app.observer.recent_events()).into_response()
}

async fn node(State(app): State<App>, Path(path): Path<String>) -> Response {
    match app.observer.node(&path) {
        Some(detail) => axum::Json(detail).into_response(),
        None => refuse(StatusCode::NOT_FOUND, format!("no node `{path}` now")),
    }
}

/// The live events, one `supervisor` event each (its JSON the data); a
/// `lagged` event (the number missed as data) when this stream fell
/// behind, after which a client should read the status again.
async fn events(State(app): State<App>) -> Response {
    let Ok(permit) = app.streams.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_EVENT_STREAMS} event streams are served already; try again later"),
        );
    };
    let events = app.observer.tree().subscribe();
    let state = (events, app.closing.clone(), permit);
    let stream =
        futures_util::stream::unfold(state, |(mut events, mut closing, permit)| async move {
            let event = loop {
                if *closing.borrow() {
                    return None;
                }
                tokio::select! {
                    received = events.recv() => match received {
                        Ok(event) => {
                            let data = serde_json::to_string(&event).ok()?;
                            break Event::default().event("supervisor").data(data);
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            break Event::default().event("lagged").data(n.to_string());
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                    changed = closing.changed() => if changed.is_err() { return None },
                }
            };
            Some((Ok::<_, Infallible>(event), (events, closing, permit)))
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Whether the request's `Origin`, if it has one, is this server's.
fn same_origin(headers: &HeaderMap, addr: SocketAddr) -> bool {
    match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        None => true,
        Some(origin) => origin
            .strip_prefix("http://")
            .is_some_and(|host| host_allowed(host, addr)),
    }
}

async fn control(
    State(app): State<App>,
    Path((action, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = &app.control else {
        return refuse(
            StatusCode::FORBIDDEN,
            "management calls are off; start the host with --http-allow-control",
        );
    };
    let given = headers.get(TOKEN_HEADER).map(HeaderValue::as_bytes);
    if !given.is_some_and(|given| token.matches(given)) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            format!(
                "a management call needs the host's control token in the {TOKEN_HEADER} header"
            ),
        );
    }
    if !same_origin(&headers, app.addr) {
        return refuse(StatusCode::FORBIDDEN, "a request from another origin");
    }
    let tree = app.observer.tree();
    let result = match action.as_str() {
        "terminate" => tree.terminate(&path).await,
        "restart" => tree.restart(&path).await,
        _ => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("no management call `{action}`; there are terminate and restart"),
            );
        }
    };
    match result {
        Ok(()) => axum::Json(json!({ "ok": path })).into_response(),
        Err(e @ NodeError::NotFound(ResolveError::NotFound { .. })) => {
            refuse(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e) => refuse(StatusCode::CONFLICT, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn only_the_bound_address_passes_the_host_check() {
        let bound = at("127.0.0.1:8080");
        for ok in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080"] {
            assert!(host_allowed(ok, bound), "{ok}");
        }
        for refused in [
            "evil.example:8080",
            "127.0.0.1:8081",
            "127.0.0.1",
            "127.0.0.2:8080",
            "localhost.evil.example:8080",
            "",
            "[::1]:8080",
        ] {
            assert!(!host_allowed(refused, bound), "{refused}");
        }
        let v6 = at("[::1]:80");
        assert!(host_allowed("[::1]:80", v6));
        assert!(host_allowed("[::1]", v6));
        assert!(host_allowed("localhost", v6));
        assert!(!host_allowed("[::1]x", v6));
        let any = at("0.0.0.0:9000");
        assert!(host_allowed("192.0.2.7:9000", any));
        assert!(!host_allowed("rebind.example:9000", any));
    }

    #[test]
    fn addresses_are_parsed_and_names_not_resolved() {
        assert_eq!(parse_addr("0").unwrap(), at("127.0.0.1:0"));
        assert_eq!(parse_addr("0.0.0.0:9").unwrap(), at("0.0.0.0:9"));
        for bad in [
            "",
            "localhost",
            "localhost:x",
            "host:80",
            "1.2.3.4:99999",
            "[::1",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_is_long_random_and_compared_whole() {
        let token = ControlToken::generate();
        assert_eq!(token.as_str().len(), 64);
        assert_ne!(token.as_str(), ControlToken::generate().as_str());
        assert!(token.matches(token.as_str().as_bytes()));
        assert!(!token.matches(&token.as_str().as_bytes()[..63]));
        assert!(!token.matches(b""));
        assert!(!format!("{token:?}").contains(token.as_str()));
    }

    #[tokio::test]
    async fn a_non_loopback_address_is_refused_without_the_flag() {
        let err = bind(at("0.0.0.0:0"), HttpConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::NotLoopback { .. }), "{err}");
        assert!(err.to_string().contains("--http-allow-remote"), "{err}");
    }
}
