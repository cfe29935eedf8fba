//! Outbound HTTP for agents (`wasi:http/outgoing-handler` 0.2, through
//! `wasmtime-wasi-http`), deny-by-default.
//!
//! Every agent's store has an [`HttpGate`]: the hooks through which
//! wasmtime-wasi-http sends each request the guest makes.
//!
//! Invariants:
//! - A request goes out only if its scheme, host and port match one of the
//!   agent's [`HostPattern`]s; any other fails inside the guest with the
//!   `wasi:http` error code `HTTP-request-denied`, and is logged (scheme,
//!   host and port only: never the path, query, headers or body, which may
//!   carry secrets) within a budget like the agent's own logs (the guest
//!   decides how often it happens).
//! - At most `max_concurrent` requests of one agent are in flight: a request
//!   holds its slot until its response body is read to the end or dropped;
//!   one over the bound fails at once with `connection-limit-reached`.
//! - A response body is cut after `max_response_bytes`: a response that
//!   declares a larger `Content-Length` fails with
//!   `HTTP-response-body-size`; one that turns out larger while it is read
//!   ends its body stream with that error. The host never holds more of a
//!   body than one frame the guest has not read yet.
//! - The agent's call deadline covers a request the guest waits for (the
//!   deadline ends the whole call); a request left pending across calls has
//!   its connect, first-byte and between-bytes timeouts capped at the
//!   deadline too. Nothing is sent from a runtime worker synchronously: the
//!   request runs as a tokio task, and the instance's death aborts it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use super::host::{HostState, LogMeter};
use super::limits::AgentLimits;

/// Most requests the `max_concurrent` grant may allow one agent.
pub const MAX_HTTP_CONCURRENT: u32 = 1024;

/// Largest `max_response_bytes` a grant may give: 1 GiB.
pub const MAX_HTTP_RESPONSE_BYTES: u64 = 1 << 30;

/// Most patterns in one agent's `allowed_hosts`.
pub const MAX_ALLOWED_HOSTS: usize = 256;

/// The outbound HTTP an agent may make. The default allows none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpGrants {
    /// Where the agent may send requests (`https://api.openai.com`,
    /// `http://127.0.0.1:*`, `https://*.example.com`); empty: nowhere.
    pub allowed_hosts: Vec<HostPattern>,
    /// Most requests in flight at once.
    pub max_concurrent: u32,
    /// Largest response body the agent may receive, in bytes.
    pub max_response_bytes: u64,
}

impl Default for HttpGrants {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            max_concurrent: 4,
            max_response_bytes: 1 << 20,
        }
    }
}

impl HttpGrants {
    /// Grants to the hosts `allowed_hosts`, with the default bounds.
    pub fn to(allowed_hosts: Vec<HostPattern>) -> Self {
        Self {
            allowed_hosts,
            ..Self::default()
        }
    }

    /// Check the bounds, naming the field.
    ///
    /// # Errors
    ///
    /// A message naming the field when a bound is 0 or above its maximum,
    /// or there are more than [`MAX_ALLOWED_HOSTS`] patterns.
    pub fn validate(&self) -> Result<(), String> {
        if self.allowed_hosts.len() > MAX_ALLOWED_HOSTS {
            return Err(format!(
                "http.allowed_hosts has {} patterns, more than {MAX_ALLOWED_HOSTS}",
                self.allowed_hosts.len()
            ));
        }
        if !(1..=MAX_HTTP_CONCURRENT).contains(&self.max_concurrent) {
            return Err(format!(
                "http.max_concurrent must be between 1 and {MAX_HTTP_CONCURRENT}, got {}",
                self.max_concurrent
            ));
        }
        if !(1..=MAX_HTTP_RESPONSE_BYTES).contains(&self.max_response_bytes) {
            return Err(format!(
                "http.max_response_bytes must be between 1 and {MAX_HTTP_RESPONSE_BYTES}, got {}",
                self.max_response_bytes
            ));
        }
        Ok(())
    }

    /// Whether a request to `scheme://host:port` is allowed.
    fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.allowed_hosts
            .iter()
            .any(|p| p.matches(scheme, host, port))
    }
}

/// One entry of an allow-list: a scheme (`http` or `https`), a host (a
/// name, an IP address, `[v6]`, `*.example.com` for any subdomain of
/// example.com, or `*` for any host) and an optional port (a number, `*`
/// for any; without one, only the scheme's default port, 80 or 443).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern {
    text: String,
    https: bool,
    host: HostMatch,
    port: PortMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// The suffix with its leading dot: `.example.com`.
    Subdomains(String),
    Exact(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortMatch {
    Default,
    Any,
    Exact(u16),
}

/// A host pattern that cannot be one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{pattern}` is not a host pattern: {reason}; write scheme://host[:port], e.g. https://api.openai.com, http://127.0.0.1:*, https://*.example.com"
)]
pub struct HostPatternError {
    /// The pattern as given (cut to 100 bytes).
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A host name as compared: lower case, without a trailing dot.
fn normalise(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl HostPattern {
    /// Parse `scheme://host[:port]`.
    ///
    /// # Errors
    ///
    /// [`HostPatternError`] for another scheme, a path, query or user info,
    /// an empty or malformed host, `*` inside a name other than a leading
    /// `*.`, or a port that is not 1-65535 or `*`.
    pub fn parse(text: &str) -> Result<Self, HostPatternError> {
        let fail = |reason: &str| HostPatternError {
            pattern: crate::text::truncate(text, 100).to_owned(),
            reason: reason.to_owned(),
        };
        if text.len() > 300 {
            return Err(fail("it is longer than 300 bytes"));
        }
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| fail("it has no scheme"))?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            _ => return Err(fail("the scheme must be http or https")),
        };
        if rest.contains(['/', '?', '#', '@']) {
            return Err(fail(
                "it may name a scheme, a host and a port only (no path, query or user)",
            ));
        }
        let (host, port) = if rest.starts_with('[') {
            let end = rest
                .find(']')
                .ok_or_else(|| fail("an IPv6 address lacks its `]`"))?;
            let after = &rest[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => return Err(fail("unexpected text after the IPv6 address")),
            };
            (&rest[..=end], port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = match port {
            None => PortMatch::Default,
            Some("*") => PortMatch::Any,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => PortMatch::Exact(n),
                _ => return Err(fail("the port must be 1-65535 or `*`")),
            },
        };
        let host = normalise(host);
        let valid_name = |name: &str| {
            !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        };
        let host = if host == "*" {
            HostMatch::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_name(suffix) {
                return Err(fail("the host after `*.` must be a domain name"));
            }
            HostMatch::Subdomains(format!(".{suffix}"))
        } else if host.starts_with('[') {
            if host.len() < 3
                || !host[1..host.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return Err(fail("malformed IPv6 address"));
            }
            HostMatch::Exact(host)
        } else {
            if !valid_name(&host) {
                return Err(fail(
                    "the host must be a name or an address (`*` only as `*.domain` or alone)",
                ));
            }
            HostMatch::Exact(host)
        };
        Ok(Self {
            text: text.to_owned(),
            https,
            host,
            port,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a request to `scheme://host:port` matches (`host` already
    /// normalised).
    fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return false,
        };
        if https != self.https {
            return false;
        }
        let port_ok = match self.port {
            PortMatch::Any => true,
            PortMatch::Exact(p) => p == port,
            PortMatch::Default => port == if https { 443 } else { 80 },
        };
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Subdomains(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        };
        port_ok && host_ok
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TryFrom<String> for HostPattern {
    type Error = HostPatternError;

    fn try_from(text: String) -> Result<Self, HostPatternError> {
        Self::parse(&text)
    }
}

impl From<HostPattern> for String {
    fn from(pattern: HostPattern) -> String {
        pattern.text
    }
}

impl std::str::FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(text: &str) -> Result<Self, HostPatternError> {
        Self::parse(text)
    }
}

/// The hooks through which one agent's requests go out: the allow-list,
/// the concurrency slots, the response bound and the deadline.
pub(crate) struct HttpGate {
    agent: Arc<str>,
    grants: HttpGrants,
    slots: Arc<Semaphore>,
    deadline: Duration,
    /// The budget of the denial warnings.
    log: LogMeter,
}

impl HttpGate {
    pub fn new(agent: Arc<str>, grants: HttpGrants, limits: &AgentLimits) -> Self {
        let slots = Arc::new(Semaphore::new(grants.max_concurrent as usize));
        Self {
            agent,
            grants,
            slots,
            deadline: limits.deadline,
            log: LogMeter::new(limits),
        }
    }

    /// A new call into the agent begins: its denials get a fresh per-call
    /// budget.
    pub fn start_call(&mut self) {
        self.log.start_call();
    }

    /// Log `line` about a request at `level` (`WARN` or `DEBUG`), within
    /// the budget; the first line after some were dropped says how many.
    fn note(&mut self, level: tracing::Level, line: &str) {
        if level > tracing::Level::WARN
            && !tracing::enabled!(target: "agent", tracing::Level::DEBUG)
        {
            return;
        }
        if !self.log.admit(std::time::Instant::now(), line.len()) {
            return;
        }
        let agent = &*self.agent;
        let line = match self.log.take_dropped() {
            Some(dropped) => format!("{line} ({} earlier lines were not logged)", dropped.records),
            None => line.to_owned(),
        };
        if level == tracing::Level::WARN {
            tracing::warn!(target: "agent", agent, "{line}");
        } else {
            tracing::debug!(target: "agent", agent, "{line}");
        }
    }
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

fn fail(error: HttpError) -> Box<dyn Future<Output = SendResult> + Send> {
    Box::new(async move { Err(error) })
}

/// `limit`, or `given` if that is shorter.
fn capped(given: Option<Duration>, limit: Duration) -> Option<Duration> {
    Some(given.map_or(limit, |d| d.min(limit)))
}

impl WasiHttpHooks for HttpGate {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
        let host = normalise(uri.host().unwrap_or(""));
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        if !self.grants.allows(&scheme, &host, port) {
            self.note(
                tracing::Level::WARN,
                &format!(
                    "outbound HTTP request to {scheme}://{host}:{port} denied: not in the agent's http.allowed_hosts"
                ),
            );
            return fail(HttpError::HttpRequestDenied);
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.note(
                tracing::Level::DEBUG,
                &format!(
                    "outbound HTTP request to {scheme}://{host}:{port} refused: {} requests in flight",
                    self.grants.max_concurrent
                ),
            );
            return fail(HttpError::ConnectionLimitReached);
        };
        self.note(
            tracing::Level::DEBUG,
            &format!("outbound HTTP request to {scheme}://{host}:{port}"),
        );
        let given = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: capped(given.connect_timeout, self.deadline),
            first_byte_timeout: capped(given.first_byte_timeout, self.deadline),
            between_bytes_timeout: capped(given.between_bytes_timeout, self.deadline),
        };
        let max = self.grants.max_response_bytes;
        Box::new(async move {
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            let declared = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|len| len > max) {
                return Err(HttpError::HttpResponseBodySize(Some(max)));
            }
            let response = response.map(|body| {
                LimitedBody {
                    inner: body.boxed_unsync(),
                    max,
                    read: 0,
                    cut: false,
                    _slot: slot,
                }
                .boxed_unsync()
            });
            let io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> = Box::new(io);
            Ok((response, io))
        })
    }
}

/// A response body cut after a number of bytes, holding its request's
/// concurrency slot until it is dropped.
struct LimitedBody {
    inner: WasiBody,
    max: u64,
    read: u64,
    cut: bool,
    _slot: OwnedSemaphorePermit,
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if self.cut {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            self.read = self.read.saturating_add(data.len() as u64);
            if self.read > self.max {
                self.cut = true;
                // Let go of the connection at once.
                self.inner = http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync();
                return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(self.max)))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.cut || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_gate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(patterns: &[&str], scheme: &str, host: &str, port: u16) -> bool {
        let grants = HttpGrants::to(
            patterns
                .iter()
                .map(|p| HostPattern::parse(p).unwrap())
                .collect(),
        );
        grants.allows(scheme, &normalise(host), port)
    }

    #[test]
    fn host_patterns_match_scheme_host_and_port() {
        let openai = ["https://api.openai.com"];
        assert!(allows(&openai, "https", "api.openai.com", 443));
        assert!(allows(&openai, "https", "API.OpenAI.com.", 443));
        assert!(!allows(&openai, "http", "api.openai.com", 80), "scheme");
        assert!(!allows(&openai, "https", "api.openai.com", 8443), "port");
        assert!(!allows(&openai, "https", "evil.api.openai.com", 443));
        let local = ["http://127.0.0.1:*"];
        assert!(allows(&local, "http", "127.0.0.1", 8080));
        assert!(!allows(&local, "http", "127.0.0.2", 8080));
        let wild = ["https://*.example.com"];
        assert!(allows(&wild, "https", "a.b.example.com", 443));
        assert!(!allows(&wild, "https", "example.com", 443));
        assert!(!allows(&wild, "https", "badexample.com", 443));
        assert!(allows(&["http://[::1]:8080"], "http", "[::1]", 8080));
        assert!(
            !allows(&[], "https", "api.openai.com", 443),
            "none by default"
        );
    }

    #[test]
    fn malformed_host_patterns_are_refused() {
        for bad in [
            "api.openai.com",
            "ftp://x.com",
            "https://x.com/v1",
            "https://user@x.com",
            "https://",
            "https://x.com:0",
            "https://x.com:99999",
            "https://x*.com",
            "https://a.*.com",
            "https://x..com",
            "http://[::1",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
        let p = HostPattern::parse("https://*.example.com:8443").unwrap();
        assert_eq!(p.to_string(), "https://*.example.com:8443");
    }

    #[test]
    fn grants_validate_their_bounds() {
        assert!(HttpGrants::default().validate().is_ok());
        let zero = HttpGrants {
            max_concurrent: 0,
            ..HttpGrants::default()
        };
        assert!(zero.validate().unwrap_err().contains("max_concurrent"));
        let huge = HttpGrants {
            max_response_bytes: MAX_HTTP_RESPONSE_BYTES + 1,
            ..HttpGrants::default()
        };
        assert!(huge.validate().unwrap_err().contains("max_response_bytes"));
    }
}
