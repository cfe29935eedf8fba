//! A small blocking HTTP client over `wasi:http/outgoing-handler` 0.2.
//!
//! The host decides where an agent may send requests: one to a host its
//! spec does not allow fails with [`ErrorCode::HttpRequestDenied`], and a
//! response body over its bound with [`ErrorCode::HttpResponseBodySize`]
//! (when the response declares its length) or a body stream error naming
//! it (when it turns out longer while read).

use std::fmt;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme, http_error_code,
};
use wasip2::io::streams::StreamError;

pub use wasip2::http::types::ErrorCode as HttpErrorCode;

/// A response: its status and its whole body.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// Why a request failed.
#[derive(Debug)]
pub enum HttpFailure {
    /// The URL is not `http(s)://host[:port][/path]`.
    BadUrl(String),
    /// The request failed with this `wasi:http` error code (the host denied
    /// it, the connection failed, the response was too large, ...).
    Code(ErrorCode),
    /// Reading or writing a body failed: the host's description, and its
    /// `wasi:http` error code when it gives one.
    Stream(String, Option<ErrorCode>),
    /// Something else went wrong (a header the host refused, ...).
    Other(String),
}

impl fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpFailure::BadUrl(url) => write!(f, "not an http(s) URL: {url}"),
            HttpFailure::Code(code) => write!(f, "{code:?}"),
            HttpFailure::Stream(text, Some(code)) => write!(f, "{code:?}: {text}"),
            HttpFailure::Stream(text, None) => write!(f, "body stream failed: {text}"),
            HttpFailure::Other(text) => f.write_str(text),
        }
    }
}

impl HttpFailure {
    /// The `wasi:http` error code, if the failure has one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            HttpFailure::Code(code) | HttpFailure::Stream(_, Some(code)) => Some(code),
            _ => None,
        }
    }
}

/// `url` split into scheme, authority and path with query.
fn parse_url(url: &str) -> Result<(Scheme, &str, &str), HttpFailure> {
    let bad = || HttpFailure::BadUrl(url.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(bad()),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], &rest[i..]),
        Some(_) => return Err(bad()),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad());
    }
    Ok((scheme, authority, path))
}

/// Send a request and read the whole response. `headers` are name/value
/// pairs; `body` is sent if given.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, HttpFailure> {
    let (scheme, authority, path) = parse_url(url)?;
    let entries: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
        .collect();
    let fields = Fields::from_list(&entries)
        .map_err(|e| HttpFailure::Other(format!("a header was refused: {e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        other => Method::Other(other.to_owned()),
    };
    let refused = |what: &str| HttpFailure::Other(format!("the request's {what} was refused"));
    request
        .set_method(&method)
        .map_err(|()| refused("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| refused("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| refused("authority"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| refused("path"))?;
    let outgoing = request.body().map_err(|()| refused("body"))?;
    // Send first, then write the body: the host streams it to the server.
    let future = outgoing_handler::handle(request, None).map_err(HttpFailure::Code)?;
    // A refused request (denied, too many in flight) drops the body's
    // receiver: the write fails, and the response says why.
    let written = write_body(&outgoing, body.unwrap_or_default());
    let finished = OutgoingBody::finish(outgoing, None);
    let response = loop {
        match future.get() {
            Some(Ok(Ok(response))) => break response,
            Some(Ok(Err(code))) => return Err(HttpFailure::Code(code)),
            Some(Err(())) => return Err(HttpFailure::Other("the response was taken twice".into())),
            None => future.subscribe().block(),
        }
    };
    written?;
    finished.map_err(HttpFailure::Code)?;
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|()| HttpFailure::Other("the response body was taken twice".into()))?;
    let body = read_body(&incoming);
    let _trailers = IncomingBody::finish(incoming);
    Ok(Response {
        status,
        body: body?,
    })
}

fn write_body(body: &OutgoingBody, bytes: &[u8]) -> Result<(), HttpFailure> {
    let stream = body
        .write()
        .map_err(|()| HttpFailure::Other("the request body was taken twice".into()))?;
    for chunk in bytes.chunks(4096) {
        stream
            .blocking_write_and_flush(chunk)
            .map_err(stream_failure)?;
    }
    Ok(())
}

fn read_body(body: &IncomingBody) -> Result<Vec<u8>, HttpFailure> {
    let stream = body
        .stream()
        .map_err(|()| HttpFailure::Other("the response body stream was taken twice".into()))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 << 10) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return Ok(bytes),
            Err(e) => return Err(stream_failure(e)),
        }
    }
}

fn stream_failure(error: StreamError) -> HttpFailure {
    match error {
        StreamError::Closed => HttpFailure::Stream("the stream is closed".into(), None),
        StreamError::LastOperationFailed(e) => {
            HttpFailure::Stream(e.to_debug_string(), http_error_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let (s, a, p) = parse_url("http://127.0.0.1:8080/v1/chat?x=1").unwrap();
        assert!(matches!(s, Scheme::Http));
        assert_eq!((a, p), ("127.0.0.1:8080", "/v1/chat?x=1"));
        let (_, a, p) = parse_url("https://api.openai.com").unwrap();
        assert_eq!((a, p), ("api.openai.com", "/"));
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("https:///x").is_err());
    }
}
