//! The control socket of a running host: where it is, the protocol (one JSON
//! object per line each way), the server side (in `run`) and the client
//! side (`call`, `status`).
//!
//! Requests and their answers:
//!
//! ```text
//! {"op":"call","agent":"root/echo","message":"count"}  ->  {"ok":"1"}
//!                                                           {"error":"...","category":"Runtime"}
//! {"op":"status"}  ->  {"ok":[{"path":"root/echo","status":"Running","restart_count":0,
//!                              "last_exit":null,"supervisor":false}, ...]}
//! ```

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use terraphim_agent_supervisor::SupervisorHandle;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::tree_host::{Failure, Index};

/// Longest request or answer line, in bytes.
const MAX_LINE: u64 = 16 << 20;

/// A request to a running host.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Send `message` to `agent` (a path such as `root/team/echo-a`, or a
    /// unique name) and answer its reply.
    Call { agent: String, message: String },
    /// Answer the status of every node.
    Status,
}

/// 64-bit FNV-1a: small and stable across builds and Rust versions (the
/// socket's name must be the same for every `agent-host` process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The socket of the host running `tree`: `$XDG_RUNTIME_DIR` (else the temp
/// dir) / `agent-host-<FNV-1a of the canonical tree path>.sock`.
pub fn default_path(tree: &Path) -> io::Result<PathBuf> {
    let canonical = std::fs::canonicalize(tree)?;
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::temp_dir(),
    };
    let hash = fnv1a(canonical.as_os_str().as_bytes());
    Ok(dir.join(format!("agent-host-{hash:016x}.sock")))
}

/// The socket to use for `tree`: `explicit` if given, else the default.
pub fn socket_for(tree: &Path, explicit: Option<&Path>) -> Result<PathBuf, String> {
    match explicit {
        Some(path) => Ok(path.to_owned()),
        None => {
            default_path(tree).map_err(|e| format!("{}: cannot read the file: {e}", tree.display()))
        }
    }
}

/// A connection to the host listening on `path`, or `None` if none is
/// (no socket file, or nobody accepts on it).
pub async fn connect(path: &Path) -> io::Result<Option<UnixStream>> {
    match UnixStream::connect(path).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Send `request` and read the answer: `Ok(Ok(value))`, `Ok(Err(failure))`
/// when the host refused it, `Err` when the exchange itself failed.
pub async fn request<T: DeserializeOwned>(
    stream: UnixStream,
    request: &Request,
) -> Result<Result<T, Failure>, String> {
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request to the host: {e}"))?;
    let mut answer = Vec::new();
    BufReader::new(read)
        .take(MAX_LINE)
        .read_until(b'\n', &mut answer)
        .await
        .map_err(|e| format!("cannot read the host's answer: {e}"))?;
    if answer.is_empty() {
        return Err("the host closed the connection without answering (is it stopping?)".into());
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Answer<T> {
        Ok { ok: T },
        Err(Failure),
    }
    match serde_json::from_slice(&answer) {
        Ok(Answer::Ok { ok }) => Ok(Ok(ok)),
        Ok(Answer::Err(failure)) => Ok(Err(failure)),
        Err(e) => Err(format!("the host's answer is not understood ({e})")),
    }
}

/// The listening socket of a running host; the file is removed on drop.
pub struct Listener {
    pub listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path`: refuse if a host already listens there, remove a
/// stale socket file left by one that died.
pub async fn listen(path: &Path) -> Result<Listener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; remove it or choose another path with --socket",
                path.display()
            ));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "a host is already running this tree (its control socket is {}); stop it first, or give this one another --socket",
                path.display()
            ));
        }
        tracing::info!("removing the stale control socket {}", path.display());
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let listener = Listener {
        listener,
        path: path.to_owned(),
    };
    // Only this user may call its agents.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {} to this user: {e}", path.display()))?;
    Ok(listener)
}

/// Serve one client: answer each request line until it hangs up.
pub async fn serve(stream: UnixStream, root: SupervisorHandle, index: Arc<Index>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("control socket: read failed: {e}");
                return;
            }
        }
        let too_long = !line.ends_with(b"\n") && line.len() as u64 >= MAX_LINE;
        if line.iter().all(u8::is_ascii_whitespace) && !too_long {
            continue;
        }
        let answer = if too_long {
            json!({
                "error": format!("request longer than {MAX_LINE} bytes"),
                "category": "Policy",
            })
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => answer(request, &root, &index).await,
                Err(e) => json!({
                    "error": format!(
                        "not a request ({e}); send {{\"op\":\"call\",\"agent\":\"...\",\"message\":\"...\"}} or {{\"op\":\"status\"}}, one per line"
                    ),
                    "category": "Serialization",
                }),
            }
        };
        let mut text = answer.to_string();
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() || too_long {
            return;
        }
    }
}

async fn answer(request: Request, root: &SupervisorHandle, index: &Index) -> serde_json::Value {
    match request {
        Request::Call { agent, message } => match index.call(root, &agent, message).await {
            Ok(reply) => json!({ "ok": reply }),
            Err(failure) => json!(failure),
        },
        Request::Status => json!({ "ok": index.status(root).await }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_reference_function() {
        // Test vectors of the FNV reference implementation.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
