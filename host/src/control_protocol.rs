//! The wire format of `agent-host`'s control socket, without the socket:
//! one JSON object per line each way, lines of at most [`MAX_LINE`] bytes.
//! The command line's server and client (`agent-host run`, `call`,
//! `status`) use these functions, and the fuzz targets feed them arbitrary
//! bytes.
//!
//! ```text
//! {"op":"call","agent":"root/echo","message":"count"}  ->  {"ok":"1"}
//!                                                           {"error":"...","category":"Runtime"}
//! {"op":"status"}  ->  {"ok":[...]}
//! ```

use std::io;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Largest message of a call, in bytes: the supervisors' `max_message_bytes`
/// (a tree file cannot change it; a test checks that it is the library's
/// default).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// JSON escaping turns one byte of a string into at most six (`\u0001`).
pub const MAX_ESCAPED_BYTE: usize = 6;

/// Room in a request line for everything but the escaped message:
/// `{"op":"call","agent":"...","message":""}`, the agent's path included.
const ENVELOPE_BYTES: usize = 64 << 10;

/// Longest request or answer line, in bytes, newline included: the same
/// limit on both sides of the socket.
pub const MAX_LINE: usize = 16 << 20;

// The largest legal call must fit in a line, however its message escapes.
const _: () = assert!(
    MAX_LINE >= MAX_MESSAGE_BYTES * MAX_ESCAPED_BYTE + ENVELOPE_BYTES,
    "MAX_LINE must hold a call with the largest message, escaped at worst"
);

/// `16 MiB`, for messages about [`MAX_LINE`].
pub fn max_line_text() -> String {
    format!("{} MiB", MAX_LINE >> 20)
}

/// One line read from the control socket ([`read_line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A whole line, its newline included.
    Whole(Vec<u8>),
    /// The peer hung up in the middle of a line: what came of it.
    Cut(Vec<u8>),
    /// The limit's worth of bytes came and no newline among them.
    TooLong,
    /// The peer hung up between lines.
    End,
}

/// Read one line of at most [`MAX_LINE`] bytes: how requests and answers
/// are read, by the host and by its clients alike.
///
/// # Errors
///
/// What reading `reader` failed with.
pub async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Line> {
    read_line_limited(reader, MAX_LINE).await
}

/// [`read_line`] with a limit of `limit` bytes instead of [`MAX_LINE`] (for
/// tests and fuzzing, where 16 MiB inputs are out of reach). Never reads
/// more than `limit` bytes.
///
/// # Errors
///
/// What reading `reader` failed with.
pub async fn read_line_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut limited = reader.take(limit as u64);
    limited.read_until(b'\n', &mut line).await?;
    Ok(if line.ends_with(b"\n") {
        Line::Whole(line)
    } else if line.len() >= limit {
        Line::TooLong
    } else if line.is_empty() {
        Line::End
    } else {
        Line::Cut(line)
    })
}

/// A failed request, as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What went wrong, for people.
    pub error: String,
    /// The library's `ErrorCategory` (`Runtime`, `NotFound`, ...).
    pub category: String,
}

/// A request to a running host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Send `message` to `agent` (a path such as `root/team/echo-a`, or a
    /// unique name) and answer its reply.
    Call {
        /// The agent's path or unique name.
        agent: String,
        /// The message.
        message: String,
    },
    /// Answer the status of every node. (A struct variant with no field,
    /// not a unit variant: serde lets a unit variant of an internally
    /// tagged enum take any unknown field.)
    Status {},
    /// Answer the crash reports kept for `agent` (its restart-history
    /// entries with a report).
    Crashes {
        /// The agent's path or unique name.
        agent: String,
    },
    /// Answer the dead letters of `agent`, or of every agent.
    DeadLetters {
        /// The agent's path or unique name; every agent if absent.
        agent: Option<String>,
    },
    /// Take a dead letter out of quarantine, deliver it again, answer the
    /// reply.
    Replay {
        /// The agent's path or unique name.
        agent: String,
        /// The dead letter's content hash.
        hash: String,
    },
    /// Take a dead letter out of quarantine and drop it.
    Discard {
        /// The agent's path or unique name.
        agent: String,
        /// The dead letter's content hash.
        hash: String,
    },
}

/// Whether a request line is blank (only ASCII whitespace): the host skips
/// those.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// The request in one line, or the Serialization failure the host answers
/// when it is not one.
///
/// # Errors
///
/// A [`Failure`] of category `Serialization` that says what a request
/// looks like.
pub fn parse_request(line: &[u8]) -> Result<Request, Failure> {
    serde_json::from_slice::<Request>(line).map_err(|e| Failure {
        error: format!(
            "not a request ({e}); send {{\"op\":\"call\",\"agent\":\"...\",\"message\":\"...\"}} or {{\"op\":\"status\"}}, one per line"
        ),
        category: "Serialization".into(),
    })
}

/// `request` as one line, newline included.
///
/// # Errors
///
/// Why it cannot be sent: longer than [`MAX_LINE`] once encoded.
pub fn encode_request(request: &Request) -> Result<String, String> {
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    if line.len() > MAX_LINE {
        return Err(format!(
            "the request is {} bytes once encoded, more than the control socket takes ({}); a message may have at most {MAX_MESSAGE_BYTES} bytes",
            line.len(),
            max_line_text()
        ));
    }
    Ok(line)
}

/// One error line (`{"error":...,"category":"Policy"}`, newline included).
pub fn policy_line(error: &str) -> String {
    let mut line = json!({ "error": error, "category": "Policy" }).to_string();
    line.push('\n');
    line
}

/// `failure` as a JSON answer.
pub fn failure_answer(failure: &Failure) -> serde_json::Value {
    json!({ "error": failure.error, "category": failure.category })
}

/// `answer` as one line, newline included; a Policy error line instead if
/// it would be longer than [`MAX_LINE`] (a client would not read it).
pub fn answer_line(answer: &serde_json::Value) -> String {
    let mut line = answer.to_string();
    line.push('\n');
    if line.len() <= MAX_LINE {
        return line;
    }
    policy_line(&format!(
        "the answer is {} bytes once encoded, more than the control socket takes ({}); it was not sent",
        line.len(),
        max_line_text()
    ))
}

/// An answer line as the client reads it: `Ok(Ok(value))`,
/// `Ok(Err(failure))` when the host refused the request.
///
/// # Errors
///
/// The line is neither `{"ok":...}` with a `T` nor a [`Failure`].
pub fn decode_answer<T: DeserializeOwned>(line: &[u8]) -> Result<Result<T, Failure>, String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Answer<T> {
        Ok { ok: T },
        Err(Failure),
    }
    match serde_json::from_slice(line) {
        Ok(Answer::Ok { ok }) => Ok(Ok(ok)),
        Ok(Answer::Err(failure)) => Ok(Err(failure)),
        Err(e) => Err(format!("the host's answer is not understood ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_junk_is_a_serialization_failure() {
        for request in [
            Request::Status {},
            Request::Call {
                agent: "root/echo".into(),
                message: "a \"quoted\"\nline\u{1}".into(),
            },
        ] {
            let line = encode_request(&request).unwrap();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(parse_request(line.as_bytes()), Ok(request));
        }
        for junk in [
            &b"{\"op\":\"stop\"}"[..],
            b"",
            b"\xff",
            b"{\"op\":\"status\",\"x\":1}",
        ] {
            let failure = parse_request(junk).unwrap_err();
            assert_eq!(failure.category, "Serialization");
            assert!(
                failure.error.starts_with("not a request ("),
                "{}",
                failure.error
            );
        }
        assert!(is_blank(b" \r\n") && !is_blank(b" x\n"));
    }

    #[test]
    fn answers_decode_as_ok_failure_or_not_understood() {
        let ok: Result<Result<String, Failure>, String> = decode_answer(b"{\"ok\":\"1\"}\n");
        assert_eq!(ok, Ok(Ok("1".into())));
        let line = answer_line(&failure_answer(&Failure {
            error: "no".into(),
            category: "NotFound".into(),
        }));
        let failure: Result<Result<String, Failure>, String> = decode_answer(line.as_bytes());
        assert_eq!(
            failure,
            Ok(Err(Failure {
                error: "no".into(),
                category: "NotFound".into()
            }))
        );
        let junk: Result<Result<String, Failure>, String> = decode_answer(b"[1]");
        assert!(
            junk.unwrap_err()
                .starts_with("the host's answer is not understood")
        );
    }

    #[tokio::test]
    async fn lines_are_whole_cut_too_long_or_the_end() {
        let mut input: &[u8] = b"ab\ncd";
        assert_eq!(
            read_line_limited(&mut input, 8).await.unwrap(),
            Line::Whole(b"ab\n".to_vec())
        );
        assert_eq!(
            read_line_limited(&mut input, 8).await.unwrap(),
            Line::Cut(b"cd".to_vec())
        );
        assert_eq!(read_line_limited(&mut input, 8).await.unwrap(), Line::End);
        let mut input: &[u8] = b"abcdefgh\n";
        assert_eq!(
            read_line_limited(&mut input, 8).await.unwrap(),
            Line::TooLong
        );
    }
}
