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
//!
//! Only the user the host runs as may use it. The default socket lives in
//! a directory of that user's that nobody else may enter
//! ([`default_dir`]), and the socket file is created mode 0600 (no window
//! between `bind` and `chmod`). Both ends check the other's uid (peer
//! credentials): the host answers a client of another user with one Policy
//! error line, and `call` and `status` refuse a host of another user.
//!
//! Lines are at most [`MAX_LINE`] bytes either way, enough for the largest
//! message however it escapes. The host serves [`MAX_CONNECTIONS`] clients
//! at once, disconnects one idle for [`IDLE_TIMEOUT`], and backs off when
//! `accept` fails ([`AcceptBackoff`]).

use std::future::Future;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use terraphim_agent_supervisor::cluster::{ClusterCallError, ClusterClient};
use terraphim_agent_supervisor::private_dir;
use terraphim_agent_supervisor::text::fnv1a;
use terraphim_agent_supervisor::{NodeKind, NodeStatus, ResolveError, TreeCallError, TreeHandle};
// The wire format (lines, requests, answers) is the library's, so that the
// fuzz targets reach it.
pub use terraphim_agent_supervisor::control_protocol::{Failure, Request};
use terraphim_agent_supervisor::control_protocol::{
    Line, MAX_LINE, MAX_MESSAGE_BYTES, answer_line, decode_answer, encode_request, failure_answer,
    is_blank, max_line_text, parse_request, policy_line, read_line,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, sleep_until, timeout};

/// Most clients served at once. One more is answered with a Policy error
/// line ("too many connections") and closed. Each client may buffer a line
/// of up to [`MAX_LINE`], so this also bounds the memory clients can take.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may keep the host waiting for its next request line
/// (or for it to take an answer) before it is disconnected, so that idle
/// clients cannot hold the [`MAX_CONNECTIONS`] slots for ever.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait before accepting again after `accept` failed: from
/// [`FIRST`](Self::FIRST), doubling up to [`MAX`](Self::MAX), and back to the
/// start after a success. Some failures last (out of file descriptors,
/// EMFILE, until clients hang up): retrying at once would spin a core.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    /// The pause after a first failure.
    pub const FIRST: Duration = Duration::from_millis(10);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(1);

    /// `accept` failed: how long to wait before the next one.
    pub fn on_error(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        pause
    }

    /// `accept` succeeded: the next failure waits [`FIRST`](Self::FIRST).
    pub fn on_success(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// The effective uid of this process: the user who owns its sockets.
pub use terraphim_agent_supervisor::private_dir::euid;

/// The directory of the default sockets: `$XDG_RUNTIME_DIR/agent-host` if
/// XDG_RUNTIME_DIR is set, else `<temp dir>/agent-host-<euid>`. `run`
/// creates it private ([`private_socket_dir`]).
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("agent-host"),
        _ => std::env::temp_dir().join(format!("agent-host-{}", euid())),
    }
}

/// The socket of the host running `tree`: [`default_dir`] /
/// `<FNV-1a of the canonical tree path>.sock`.
pub fn default_path(tree: &Path) -> io::Result<PathBuf> {
    let canonical = std::fs::canonicalize(tree)?;
    let hash = fnv1a(canonical.as_os_str().as_bytes());
    Ok(default_dir().join(format!("{hash:016x}.sock")))
}

/// The end of every complaint about the socket directory.
const OTHER_DIR: &str =
    "or set XDG_RUNTIME_DIR to a directory only you can write, or give --socket PATH";

/// Create `dir` (mode 0700) unless it exists, and make sure it is private
/// to this user: another user must not be able to bind our socket's name
/// first, nor reach our socket.
fn private_socket_dir(dir: &Path) -> Result<(), String> {
    private_dir::ensure(dir, "the directory of the control sockets", OTHER_DIR)
        .map_err(|e| e.to_string())
}

/// Bind `path` under the umask 0o177, so that the socket file is 0600 from
/// the moment it exists. The umask is process-wide: a file another thread
/// creates meanwhile gets no group or other permission either, which errs
/// on the safe side.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; this restores the previous mask.
    unsafe { libc::umask(previous) };
    bound
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

/// Whether the client of uid `ours` may talk to a server of uid `server`
/// on `socket`: only when it is the same user (root is no exception), as
/// anyone else could read the messages or forge the answers.
fn check_server(socket: &Path, server: u32, ours: u32) -> Result<(), String> {
    if server == ours {
        return Ok(());
    }
    Err(format!(
        "refusing to use the control socket {}: it is served by a process of uid {server}, not by you (uid {ours}), so it is not your host; nothing was sent to it. Find out who runs it, remove the socket if it should be yours, or start your host with --socket PATH in a directory only you can write",
        socket.display()
    ))
}

/// A connection to the host listening on `path`, or `None` if none is
/// (no socket file, or nobody accepts on it). Refused, before anything is
/// sent, if the host runs as another user ([`check_server`]).
pub async fn connect(path: &Path) -> Result<Option<UnixStream>, String> {
    let stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot connect to {}: {e}", path.display())),
    };
    let server = stream
        .peer_cred()
        .map_err(|e| format!("cannot tell who serves {}: {e}", path.display()))?
        .uid();
    check_server(path, server, euid())?;
    Ok(Some(stream))
}

/// Send `request` and read the answer: `Ok(Ok(value))`, `Ok(Err(failure))`
/// when the host refused it, `Err` when the exchange itself failed.
pub async fn request<T: DeserializeOwned>(
    stream: UnixStream,
    request: &Request,
) -> Result<Result<T, Failure>, String> {
    let (read, mut write) = stream.into_split();
    let line = encode_request(request)?;
    // If sending fails, the host may still have said why before it closed
    // the connection (a refusal): read that first.
    let sent = write.write_all(line.as_bytes()).await;
    let answer = match (read_line(&mut BufReader::new(read)).await, sent) {
        (Ok(Line::Whole(answer)), _) => answer,
        (Ok(Line::TooLong), _) => {
            return Err(format!(
                "the host's answer is longer than the control socket's limit of {} per line; it was not read",
                max_line_text()
            ));
        }
        (_, Err(e)) => return Err(format!("cannot send the request to the host: {e}")),
        (Err(e), Ok(())) => return Err(format!("cannot read the host's answer: {e}")),
        (Ok(Line::Cut(part)), Ok(())) => {
            return Err(format!(
                "the host closed the connection in the middle of its answer, after {} bytes (is it stopping?)",
                part.len()
            ));
        }
        (Ok(Line::End), Ok(())) => {
            return Err(
                "the host closed the connection without answering (is it stopping?)".into(),
            );
        }
    };
    decode_answer(&answer)
}

/// Whether a client of uid `peer` may use the socket of a host running as
/// `ours`: only the same user (root is no exception). The refusal is
/// written to the client.
fn check_peer(peer: u32, ours: u32) -> Result<(), String> {
    if peer == ours {
        return Ok(());
    }
    Err(format!(
        "this host runs as uid {ours} and serves only that user; you are uid {peer}"
    ))
}

/// Write `error` as one Policy error line to a just accepted client and
/// close the connection, without waiting: a fresh socket has room for one
/// short line, and a client that does not read loses it.
fn refuse(stream: UnixStream, error: &str) {
    if let Ok(stream) = stream.into_std() {
        let _ = (&stream).write_all(policy_line(error).as_bytes());
    }
}

/// The listening socket of a running host; the file is removed on drop.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// The user it serves (ours).
    uid: u32,
    /// One per client served, [`MAX_CONNECTIONS`] in all.
    slots: Arc<Semaphore>,
    backoff: AcceptBackoff,
    /// No `accept` before this, after a failed one.
    resume_at: Option<Instant>,
    /// In cluster mode: where a call to an agent that does not run here
    /// goes (the host that runs it, over NATS).
    cluster: Option<ClusterClient>,
}

impl Listener {
    fn new(listener: UnixListener, path: &Path) -> Self {
        Self {
            listener,
            path: path.to_owned(),
            uid: euid(),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            backoff: AcceptBackoff::default(),
            resume_at: None,
            cluster: None,
        }
    }

    /// Forward calls to agents that do not run on this host to the
    /// cluster (`run --cluster`).
    pub fn set_cluster(&mut self, client: ClusterClient) {
        self.cluster = Some(client);
    }

    /// Accept the next connection and serve it in a task of its own, or
    /// refuse it (a client of another user, too many clients). After a
    /// failed `accept` it first waits ([`AcceptBackoff`]). Cancel-safe, for
    /// `select!`.
    pub async fn serve_next(&mut self, tree: &TreeHandle) {
        if let Some(at) = self.resume_at {
            sleep_until(at).await;
            self.resume_at = None;
        }
        let stream = match self.listener.accept().await {
            Ok((stream, _)) => {
                self.backoff.on_success();
                stream
            }
            Err(e) => {
                let pause = self.backoff.on_error();
                tracing::warn!(
                    "control socket: accept failed: {e}; trying again in {} ms",
                    pause.as_millis()
                );
                self.resume_at = Some(Instant::now() + pause);
                return;
            }
        };
        let slot = match self.admit(&stream) {
            Ok(slot) => slot,
            Err(why) => {
                refuse(stream, &why);
                return;
            }
        };
        let tree = tree.clone();
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            serve(stream, tree, cluster).await;
            drop(slot);
        });
    }

    /// A slot to serve `stream`'s client in, or why not, for it.
    fn admit(&self, stream: &UnixStream) -> Result<OwnedSemaphorePermit, String> {
        let cred = stream.peer_cred().map_err(|e| {
            tracing::warn!("control socket: refused a client whose uid is unknown ({e})");
            format!("cannot tell who you are ({e})")
        })?;
        check_peer(cred.uid(), self.uid).inspect_err(|_| {
            tracing::warn!(
                "control socket: refused a client of uid {} (pid {}): only uid {} may use {}",
                cred.uid(),
                cred.pid().map_or_else(|| "?".to_owned(), |p| p.to_string()),
                self.uid,
                self.path.display()
            );
        })?;
        self.slots.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(
                "control socket: refused a client: {MAX_CONNECTIONS} are connected already"
            );
            format!(
                "too many connections: this host serves {MAX_CONNECTIONS} clients at once; try again later"
            )
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path`: refuse if a host already listens there, remove a
/// stale socket file left by one that died. With `in_default_dir`, the
/// socket's directory is created private first, or refused if it is not
/// ([`private_socket_dir`]).
pub async fn listen(path: &Path, in_default_dir: bool) -> Result<Listener, String> {
    if in_default_dir && let Some(dir) = path.parent() {
        private_socket_dir(dir)?;
    }
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
    let listener =
        bind_private(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let listener = Listener::new(listener, path);
    // Only this user may call its agents (the umask made it so already;
    // this makes sure).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {} to this user: {e}", path.display()))?;
    Ok(listener)
}

/// Serve one client: answer each request line until it hangs up.
async fn serve(stream: UnixStream, tree: TreeHandle, cluster: Option<ClusterClient>) {
    serve_with(stream, move |request| {
        let tree = tree.clone();
        let cluster = cluster.clone();
        async move { answer(request, &tree, cluster.as_ref()).await }
    })
    .await;
}

/// How long a call forwarded to another host of the cluster may take.
const CLUSTER_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A call to `agent` (a path, or a path below the root without the root's
/// name) on whichever host of the cluster runs it.
async fn cluster_call(
    cluster: &ClusterClient,
    root: &str,
    agent: &str,
    message: &str,
) -> serde_json::Value {
    let agent = agent.trim_matches('/');
    let path = if agent.starts_with(&format!("{root}/")) {
        agent.to_owned()
    } else {
        format!("{root}/{agent}")
    };
    match cluster
        .call(&path, message, CLUSTER_CALL_TIMEOUT, None)
        .await
    {
        Ok(reply) => match reply.result {
            Ok(ok) => json!({ "ok": ok, "host": reply.host }),
            Err(error) => json!({ "error": error, "category": reply.category, "host": reply.host }),
        },
        Err(e @ ClusterCallError::NoSuchUnit { .. }) => {
            json!({ "error": e.to_string(), "category": "NotFound" })
        }
        Err(e) => json!({ "error": e.to_string(), "category": "Communication" }),
    }
}

/// How long `status` waits for the host of a unit run elsewhere.
const CLUSTER_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// `agent-host status` of a host in cluster mode: every unit of the tree
/// with its nodes, wherever it runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The host that answered.
    pub host: String,
    /// The nodes of the units that answered, in the tree file's order of
    /// units, each unit's nodes depth first.
    pub nodes: Vec<ClusterNode>,
    /// The units whose nodes could not be shown.
    pub missing: Vec<MissingUnit>,
}

/// A node and the host that runs it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterNode {
    /// The node.
    #[serde(flatten)]
    pub node: NodeStatus,
    /// The host that runs its unit.
    pub host: String,
}

/// A unit whose nodes could not be shown.
#[derive(Debug, Serialize, Deserialize)]
pub struct MissingUnit {
    /// Its path (`root/unit`).
    pub path: String,
    /// The host that holds its lease, if any.
    pub host: Option<String>,
    /// Why it is not shown.
    pub why: String,
}

/// The whole cluster's status: this host's units from its tree, the
/// others' asked of their owners, all at once, each within
/// [`CLUSTER_STATUS_TIMEOUT`] (an owner that does not answer is shown as
/// such, never waited for longer).
async fn cluster_status(cluster: &ClusterClient, tree: &TreeHandle) -> ClusterStatus {
    let here = cluster.host_id().unwrap_or_default().to_owned();
    let root = tree.root_name().to_owned();
    let local = tree.status();
    let holders: std::collections::HashMap<String, String> =
        match cluster.units(cluster.unit_names()).await {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|r| r.holder.map(|h| (r.unit, h.host)))
                .collect(),
            Err(e) => {
                tracing::debug!("status: cannot read the leases: {e}");
                std::collections::HashMap::new()
            }
        };
    let lookups = cluster.unit_names().iter().map(|unit| {
        let path = format!("{root}/{unit}");
        let below = format!("{path}/");
        let mine: Vec<NodeStatus> = local
            .iter()
            .filter(|n| n.path == path || n.path.starts_with(&below))
            .cloned()
            .collect();
        let holder = holders.get(unit).cloned();
        let here = here.clone();
        async move {
            if !mine.is_empty() {
                return Ok((here, mine));
            }
            match cluster.unit_nodes(unit, CLUSTER_STATUS_TIMEOUT).await {
                Ok(found) => Ok((found.host, found.nodes)),
                Err(e) => Err(MissingUnit {
                    path,
                    why: match &holder {
                        Some(host) => format!("its host {host} did not answer: {e}"),
                        None => format!("no host runs it now: {e}"),
                    },
                    host: holder,
                }),
            }
        }
    });
    let found = futures_util::future::join_all(lookups).await;
    let mut status = ClusterStatus {
        host: here,
        nodes: Vec::new(),
        missing: Vec::new(),
    };
    for found in found {
        match found {
            Ok((host, nodes)) => status
                .nodes
                .extend(nodes.into_iter().map(|node| ClusterNode {
                    node,
                    host: host.clone(),
                })),
            Err(missing) => status.missing.push(missing),
        }
    }
    status
}

/// Serve one client with `handle`, which answers one request: answer each
/// request line until the client hangs up, sends a line longer than
/// [`MAX_LINE`], or keeps the host waiting longer than [`IDLE_TIMEOUT`].
async fn serve_with<H, F>(stream: UnixStream, mut handle: H)
where
    H: FnMut(Request) -> F,
    F: Future<Output = serde_json::Value>,
{
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let (line, last) = match timeout(IDLE_TIMEOUT, read_line(&mut reader)).await {
            Ok(Ok(Line::Whole(line))) => (line, false),
            // A last request without its newline is still answered.
            Ok(Ok(Line::Cut(line))) => (line, true),
            Ok(Ok(Line::End)) => return,
            Ok(Ok(Line::TooLong)) => {
                let refusal = policy_line(&format!(
                    "request longer than {} bytes ({}); a message may have at most {MAX_MESSAGE_BYTES} bytes",
                    MAX_LINE,
                    max_line_text()
                ));
                let _ = timeout(IDLE_TIMEOUT, write.write_all(refusal.as_bytes())).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!("control socket: read failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("control socket: closing a connection idle for {IDLE_TIMEOUT:?}");
                return;
            }
        };
        if is_blank(&line) {
            if last {
                return;
            }
            continue;
        }
        let answer = match parse_request(&line) {
            Ok(request) => handle(request).await,
            Err(failure) => failure_answer(&failure),
        };
        let text = answer_line(&answer);
        let written = timeout(IDLE_TIMEOUT, write.write_all(text.as_bytes())).await;
        if !matches!(written, Ok(Ok(()))) || last {
            return;
        }
    }
}

async fn answer(
    request: Request,
    tree: &TreeHandle,
    cluster: Option<&ClusterClient>,
) -> serde_json::Value {
    match request {
        Request::Call { agent, message } => {
            // The message again for the cluster, only in cluster mode.
            let forward = cluster.zip(cluster.is_some().then(|| message.clone()));
            match (tree.call(&agent, message).await, forward) {
                (Ok(reply), _) => json!({ "ok": reply }),
                // Not on this host: on another of the cluster.
                (Err(TreeCallError::NotFound(ResolveError::NotFound { .. })), Some((c, m))) => {
                    cluster_call(c, tree.root_name(), &agent, &m).await
                }
                (Err(e), _) => json!({ "error": e.to_string(), "category": e.category() }),
            }
        }
        Request::Status {} => match cluster {
            None => json!({ "ok": tree.status() }),
            Some(c) => json!({ "ok": cluster_status(c, tree).await }),
        },
        Request::Crashes { agent } => match tree.crashes(&agent) {
            Ok(entries) => json!({ "ok": entries }),
            Err(e) => json!({ "error": e.to_string(), "category": "NotFound" }),
        },
        Request::DeadLetters { agent } => {
            let agents = match agent {
                Some(agent) => vec![agent],
                None => tree
                    .status()
                    .into_iter()
                    .filter(|n| n.kind == NodeKind::Agent)
                    .map(|n| n.path)
                    .collect(),
            };
            let mut letters = Vec::new();
            for agent in agents {
                match tree.dead_letters(&agent).await {
                    Ok(found) => letters.extend(found.into_iter().map(|l| (agent.clone(), l))),
                    Err(e) => return json!({ "error": e.to_string(), "category": e.category() }),
                }
            }
            let letters: Vec<serde_json::Value> = letters
                .into_iter()
                .map(|(path, letter)| json!({ "path": path, "letter": letter }))
                .collect();
            json!({ "ok": letters })
        }
        Request::Replay { agent, hash } => match tree.replay_dead_letter(&agent, &hash).await {
            Ok(reply) => json!({ "ok": reply }),
            Err(e) => json!({ "error": e.to_string(), "category": e.category() }),
        },
        Request::Discard { agent, hash } => match tree.discard_dead_letter(&agent, &hash).await {
            Ok(()) => json!({ "ok": null }),
            Err(e) => json!({ "error": e.to_string(), "category": e.category() }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use terraphim_agent_supervisor::control_protocol::MAX_ESCAPED_BYTE;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};

    #[test]
    fn the_message_limit_is_the_supervisors() {
        assert_eq!(
            MAX_MESSAGE_BYTES,
            terraphim_agent_supervisor::SupervisorConfig::default().max_message_bytes,
            "update MAX_MESSAGE_BYTES (and check MAX_LINE) with the library's default"
        );
    }

    /// A message of `len` bytes that JSON escapes at the worst: six bytes
    /// each (`\u0000`, `\u0001`, ...; not `\n` and the like, two each).
    fn worst_case_message(len: usize) -> String {
        let worst: Vec<char> = ('\0'..' ')
            .filter(|c| !matches!(c, '\u{8}' | '\t' | '\n' | '\u{c}' | '\r'))
            .collect();
        (0..len).map(|i| worst[i % worst.len()]).collect()
    }

    #[tokio::test]
    async fn a_maximal_message_escaped_at_worst_round_trips() {
        let message = worst_case_message(MAX_MESSAGE_BYTES);
        let call = Request::Call {
            agent: "root/team/echo-a".into(),
            message: message.clone(),
        };
        let encoded = serde_json::to_string(&call).expect("encoded");
        assert!(
            encoded.len() >= MAX_MESSAGE_BYTES * MAX_ESCAPED_BYTE,
            "worst case"
        );
        let (client, server) = echo_server();
        match request::<String>(client, &call).await {
            Ok(Ok(reply)) => assert!(reply == format!("echo: {message}"), "not the message"),
            Ok(Err(failure)) => panic!("{failure:?}"),
            Err(e) => panic!("{e}"),
        }
        server.await.expect("the server ended");
    }

    #[tokio::test]
    async fn an_over_long_request_line_gets_a_policy_error() {
        let (client, server) = echo_server();
        let (read, mut write) = client.into_split();
        // The host stops reading at the limit: write from a task of its own.
        let writer = tokio::spawn(async move {
            let _ = write.write_all(&vec![b' '; MAX_LINE + 1]).await;
        });
        let answer = read_line(&mut BufReader::new(read))
            .await
            .expect("answered");
        let Line::Whole(answer) = answer else {
            panic!("{answer:?}")
        };
        let failure: Failure = serde_json::from_slice(&answer).expect("a failure");
        assert_eq!(failure.category, "Policy");
        assert!(
            failure
                .error
                .starts_with("request longer than 16777216 bytes (16 MiB)"),
            "{}",
            failure.error
        );
        server.await.expect("the server ended");
        writer.await.expect("the writer ended");
    }

    #[tokio::test]
    async fn the_host_never_sends_a_line_longer_than_the_limit() {
        let (client, server) = UnixStream::pair().expect("a socket pair");
        let huge = worst_case_message(MAX_LINE / MAX_ESCAPED_BYTE + 1);
        let server = tokio::spawn(serve_with(server, move |_| {
            let huge = huge.clone();
            async move { json!({ "ok": huge }) }
        }));
        match request::<String>(client, &Request::Status {}).await {
            Ok(Err(failure)) => {
                assert_eq!(failure.category, "Policy");
                assert!(
                    failure
                        .error
                        .contains("more than the control socket takes (16 MiB)"),
                    "{}",
                    failure.error
                );
            }
            other => panic!("{other:?}"),
        }
        server.await.expect("the server ended");
    }

    /// What [`request`] makes of a host that answers `answer` and hangs up.
    async fn client_reading(answer: Vec<u8>) -> Result<Result<String, Failure>, String> {
        let (client, server) = UnixStream::pair().expect("a socket pair");
        let host = tokio::spawn(async move {
            let (read, mut write) = server.into_split();
            let request = read_line(&mut BufReader::new(read)).await;
            let _ = write.write_all(&answer).await;
            request
        });
        let result = request::<String>(client, &Request::Status {}).await;
        let request = host.await.expect("the host ended").expect("read");
        assert_eq!(request, Line::Whole(b"{\"op\":\"status\"}\n".to_vec()));
        result
    }

    #[tokio::test]
    async fn the_client_reports_a_bad_answer_clearly() {
        let mut too_long = b"{\"ok\":\"".to_vec();
        too_long.resize(MAX_LINE + 10, b'x');
        too_long.extend_from_slice(b"\"}\n");
        let error = client_reading(too_long).await.expect_err("too long");
        assert!(
            error.starts_with(
                "the host's answer is longer than the control socket's limit of 16 MiB"
            ),
            "{error}"
        );
        let error = client_reading(b"{\"ok\":\"trunc".to_vec())
            .await
            .expect_err("cut");
        assert!(
            error.starts_with(
                "the host closed the connection in the middle of its answer, after 12 bytes"
            ),
            "{error}"
        );
        let error = client_reading(Vec::new()).await.expect_err("nothing");
        assert!(error.contains("without answering"), "{error}");
        // A longest answer is still read.
        let mut longest = b"{\"ok\":\"".to_vec();
        longest.resize(MAX_LINE - 3, b'x');
        longest.extend_from_slice(b"\"}\n");
        let reply = client_reading(longest).await.expect("read").expect("ok");
        assert_eq!(reply.len(), MAX_LINE - 3 - 7);
    }

    #[test]
    fn accept_backoff_doubles_to_a_cap_and_starts_over_after_a_success() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<u128> = (0..10).map(|_| backoff.on_error().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.on_success();
        assert_eq!(backoff.on_error(), AcceptBackoff::FIRST);
        assert_eq!(backoff.on_error(), AcceptBackoff::FIRST * 2);
    }

    /// A client of [`serve_with`] whose requests are answered by echoing.
    fn echo_server() -> (UnixStream, tokio::task::JoinHandle<()>) {
        let (client, server) = UnixStream::pair().expect("a socket pair");
        let server = tokio::spawn(serve_with(server, |request| async move {
            match request {
                Request::Call { message, .. } => json!({ "ok": format!("echo: {message}") }),
                _ => json!({ "ok": [] }),
            }
        }));
        (client, server)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_is_disconnected_after_the_idle_timeout() {
        let (client, server) = echo_server();
        let (read, mut write) = client.into_split();
        let mut reader = BufReader::new(read);
        // Busy clients are served as long as they like.
        for _ in 0..3 {
            tokio::time::sleep(IDLE_TIMEOUT - Duration::from_secs(1)).await;
            write
                .write_all(b"{\"op\":\"status\"}\n")
                .await
                .expect("sent");
            let mut answer = String::new();
            reader.read_line(&mut answer).await.expect("answered");
            assert_eq!(answer, "{\"ok\":[]}\n");
        }
        // An idle one is not.
        let started = Instant::now();
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.expect("closed");
        assert!(rest.is_empty());
        let waited = started.elapsed();
        assert!(
            waited >= IDLE_TIMEOUT && waited < IDLE_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
        server.await.expect("the server ended");
    }

    #[test]
    fn only_the_same_user_is_served_and_trusted() {
        let socket = Path::new("/run/user/1000/agent-host/0123456789abcdef.sock");
        assert_eq!(check_server(socket, 1000, 1000), Ok(()));
        assert_eq!(check_peer(1000, 1000), Ok(()));
        // Root is no exception, either way.
        for (server, ours) in [(65534, 1000), (0, 1000), (1000, 0)] {
            let why = check_server(socket, server, ours).expect_err("another user");
            for needle in [
                socket.to_str().unwrap_or_default(),
                &format!("served by a process of uid {server}"),
                &format!("not by you (uid {ours})"),
                "nothing was sent",
            ] {
                assert!(why.contains(needle), "no {needle:?} in: {why}");
            }
            let why = check_peer(server, ours).expect_err("another user");
            assert!(
                why.contains(&format!("runs as uid {ours}"))
                    && why.contains(&format!("uid {server}")),
                "{why}"
            );
        }
    }
}
