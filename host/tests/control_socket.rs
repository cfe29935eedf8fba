//! The control socket of `agent-host run`, run as processes: where it
//! lives, who may use it, and how it holds up under abuse.
//!
//! Some tests act as another user (uid 65534) on a thread of their own;
//! that needs root, and they say so and pass without it.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cli::{HANG_GUARD, RunningHost, TempDir, output, text};

/// The uid the tests act as when they play another user.
const OTHER_UID: u32 = 65534;

/// A tree of one echo agent.
const TREE: &str = r#"
[supervisor]
name = "root"

[[supervisor.children]]
name = "echo"
component = "echo.wasm"
"#;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether the tests may play another user; if not, say why.
fn root_or_skip(test: &str) -> bool {
    let root = euid() == 0;
    if !root {
        eprintln!("{test}: skipped: acting as another user needs root");
    }
    root
}

/// An `agent-host run --json` in the background, once its agent runs, and
/// its control socket.
struct Host {
    inner: RunningHost,
    socket: PathBuf,
}

impl Host {
    /// Start `agent-host run TREE --json` (plus `extra` arguments) in `dir`
    /// and wait until its agent runs.
    fn start(dir: &TempDir, tree: &str, extra: &[&str]) -> Self {
        Self::start_command(dir.command(&[]), tree, extra)
    }

    fn start_command(mut command: Command, tree: &str, extra: &[&str]) -> Self {
        command.args(["run", tree, "--json"]).args(extra);
        let mut inner = RunningHost::spawn(command);
        inner.wait_for("the agent to start", |seen| {
            seen.iter()
                .any(|l| l.contains(r#""ChildStarted""#) && l.contains(r#""root/echo""#))
        });
        let socket = inner.socket();
        Self { inner, socket }
    }

    fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// Stop it with SIGINT; its exit status and stderr.
    fn stop(self) -> (ExitStatus, String) {
        self.inner.stop()
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn owner(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .uid()
}

// ---------------------------------------------------------------------------
// Where the socket lives
// ---------------------------------------------------------------------------

#[test]
fn the_default_socket_is_in_a_private_directory_of_the_user() {
    let dir = TempDir::new("default-dir");
    let tree = dir.write("tree.toml", TREE);

    // With XDG_RUNTIME_DIR: $XDG_RUNTIME_DIR/agent-host/.
    let host = Host::start(&dir, &tree, &[]);
    let private = dir.path("agent-host");
    assert_eq!(host.socket.parent(), Some(private.as_path()));
    assert!(private.is_dir());
    assert_eq!(mode(&private), 0o700, "{}", private.display());
    assert_eq!(owner(&private), euid());
    assert_eq!(mode(&host.socket), 0o600, "{}", host.socket.display());
    let call = dir.agent_host(&["call", &tree, "echo", "hi"]);
    assert_eq!(text(&call.stdout), "echo: hi\n", "{}", text(&call.stderr));
    let socket = host.socket.clone();
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
    assert!(!socket.exists(), "the socket is removed on exit");
    assert!(private.is_dir(), "the directory stays");

    // Without: <temp dir>/agent-host-<uid>/.
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).expect("tmp created");
    let without_xdg = |args: &[&str]| {
        let mut command = dir.command(args);
        command.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", &tmp);
        command
    };
    let host = Host::start_command(without_xdg(&[]), &tree, &[]);
    let private = tmp.join(format!("agent-host-{}", euid()));
    assert_eq!(host.socket.parent(), Some(private.as_path()));
    assert_eq!(mode(&private), 0o700, "{}", private.display());
    assert_eq!(mode(&host.socket), 0o600, "{}", host.socket.display());
    let args = ["call", &tree, "echo", "again"];
    let call = output(&mut without_xdg(&args), &args, HANG_GUARD);
    assert_eq!(
        text(&call.stdout),
        "echo: again\n",
        "{}",
        text(&call.stderr)
    );
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn run_refuses_a_default_directory_others_could_use() {
    let dir = TempDir::new("unsafe-dir");
    let tree = dir.write("tree.toml", TREE);
    let private = dir.path("agent-host");
    let shown = private.display().to_string();
    let refused = |needles: &[&str]| {
        let out = dir.agent_host(&["run", &tree]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "error: {shown} (the directory of the control sockets) "
            )),
            "stderr:\n{stderr}"
        );
        for needle in needles {
            assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
        }
        assert!(stderr.contains("--socket PATH"), "stderr:\n{stderr}");
    };

    std::fs::create_dir(&private).expect("dir created");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    refused(&["has mode 0777", &format!("chmod 700 {shown}")]);
    assert_eq!(std::fs::read_dir(&private).expect("readable").count(), 0);

    if root_or_skip("run_refuses_a_default_directory_others_could_use: owned by another user") {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::chown(&private, Some(OTHER_UID), None).expect("chown");
        refused(&[
            &format!("owned by uid {OTHER_UID} (mode 0700)"),
            &format!("not by you (uid {})", euid()),
        ]);
    }

    std::fs::remove_dir(&private).expect("dir removed");
    let elsewhere = dir.path("elsewhere");
    std::fs::create_dir(&elsewhere).expect("dir created");
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::symlink(&elsewhere, &private).expect("symlink");
    refused(&["is a symbolic link", &format!("rm {shown}")]);
    assert_eq!(std::fs::read_dir(&elsewhere).expect("readable").count(), 0);
}

// ---------------------------------------------------------------------------
// Who may use it
// ---------------------------------------------------------------------------

/// Run `f` on a thread of its own that acts as the user [`OTHER_UID`]: the
/// kernel keeps credentials per thread, and the raw setresuid system call
/// changes only the calling thread's effective uid (glibc's wrapper would
/// change every thread's). Its real and saved uid stay root's.
fn as_other_user<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let keep = -1 as libc::c_long;
        // SAFETY: a plain system call on this thread's own credentials.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_setresuid,
                keep,
                libc::c_long::from(OTHER_UID),
                keep,
            )
        };
        assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        f()
    })
}

/// 64-bit FNV-1a, as agent-host names its default sockets.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A socket listening at `path`, bound by another user, that accepts
/// `clients` connections and answers what each sent (all of it).
fn squatter(
    path: PathBuf,
    clients: usize,
) -> (mpsc::Receiver<()>, std::thread::JoinHandle<Vec<Vec<u8>>>) {
    let (ready_tx, ready) = mpsc::channel();
    let squatter = as_other_user(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the squatter's directory");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("squatter binds");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        let deadline = Instant::now() + HANG_GUARD;
        let mut received = Vec::new();
        while received.len() < clients {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    stream.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
                    let mut bytes = Vec::new();
                    let _ = stream.read_to_end(&mut bytes);
                    received.push(bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no client came");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("squatter: accept: {e}"),
            }
        }
        received
    });
    (ready, squatter)
}

#[test]
fn a_client_refuses_a_socket_served_by_another_user() {
    if !root_or_skip("a_client_refuses_a_socket_served_by_another_user") {
        return;
    }
    let dir = TempDir::new("squatted");
    let tree = dir.write("tree.toml", TREE);
    // A shared temp dir, like /tmp, and no XDG_RUNTIME_DIR: another user
    // creates our default directory and binds our socket's name in it.
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).expect("tmp created");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let canonical = std::fs::canonicalize(&tree).expect("canonical tree path");
    let hash = fnv1a(canonical.to_str().expect("UTF-8").as_bytes());
    let socket = tmp
        .join(format!("agent-host-{}", euid()))
        .join(format!("{hash:016x}.sock"));
    let (ready, squatter) = squatter(socket.clone(), 2);
    ready
        .recv_timeout(HANG_GUARD)
        .expect("the squatter listens");

    let without_xdg = |args: &[&str]| {
        let mut command = dir.command(args);
        command.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", &tmp);
        output(&mut command, args, HANG_GUARD)
    };
    for args in [&["call", &tree, "echo", "secret"][..], &["status", &tree]] {
        let out = without_xdg(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: stderr:\n{stderr}");
        assert_eq!(text(&out.stdout), "", "{args:?}: nothing runs");
        for needle in [
            &format!(
                "error: refusing to use the control socket {}",
                socket.display()
            ),
            &format!(
                "served by a process of uid {OTHER_UID}, not by you (uid {})",
                euid()
            ),
            "nothing was sent",
        ] {
            assert!(
                stderr.contains(needle),
                "{args:?}: no {needle:?} in:\n{stderr}"
            );
        }
    }
    let received = squatter.join().expect("squatter");
    assert_eq!(
        received,
        [Vec::<u8>::new(), Vec::new()],
        "sent to the squatter"
    );

    // `run` does not use the squatted directory either.
    let run = without_xdg(&["run", &tree]);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("owned by uid {OTHER_UID}")),
        "{stderr}"
    );
}

#[test]
fn the_host_refuses_a_client_of_another_user() {
    if !root_or_skip("the_host_refuses_a_client_of_another_user") {
        return;
    }
    let dir = TempDir::new("other-client");
    let tree = dir.write("tree.toml", TREE);
    let open = dir.path("open");
    std::fs::create_dir(&open).expect("dir created");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = open.join("host.sock");
    let socket_arg = socket.to_str().expect("UTF-8").to_owned();
    let host = Host::start(&dir, &tree, &["--socket", &socket_arg]);
    assert_eq!(mode(&socket), 0o600);
    // Someone loosened the socket's mode: the host itself still says no.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    let path = socket.clone();
    let answer = as_other_user(move || {
        let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connects");
        stream.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
        // The host may close before this is sent: what matters is the answer.
        let _ = std::io::Write::write_all(&mut stream, b"{\"op\":\"status\"}\n");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        text(&answer)
    })
    .join()
    .expect("the other user's client");
    let lines: Vec<&str> = answer.lines().collect();
    assert_eq!(lines.len(), 1, "one line, then closed: {answer:?}");
    let value: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(value["category"], "Policy", "{value}");
    let error = value["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("runs as uid {}", euid()))
            && error.contains(&format!("you are uid {OTHER_UID}")),
        "{error}"
    );

    // Its own user is still served.
    let status = dir.agent_host(&["status", &tree, "--socket", &socket_arg]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("refused a client of uid {OTHER_UID}")),
        "stderr:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------
// How many clients, and failing accepts
// ---------------------------------------------------------------------------

/// The most clients a host serves at once (`control::MAX_CONNECTIONS`).
const MAX_CONNECTIONS: usize = 64;

/// A connection to `socket` that fails the test rather than hang.
fn connect(socket: &Path) -> std::os::unix::net::UnixStream {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(HANG_GUARD))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(HANG_GUARD))
        .expect("write timeout");
    stream
}

/// Everything the host says until it closes the connection.
fn read_to_close(mut stream: std::os::unix::net::UnixStream) -> String {
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    text(&answer)
}

/// The one JSON line of `answer`.
fn one_json_line(answer: &str) -> serde_json::Value {
    let lines: Vec<&str> = answer.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {answer:?}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"))
}

/// Run `status` until it succeeds (the host may need a moment to notice
/// that clients left).
fn status_until_served(dir: &TempDir, tree: &str, socket: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let status = dir.agent_host(&["status", tree, "--socket", socket]);
        if status.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the host does not serve again: {}",
            text(&status.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_client_beyond_the_connection_limit_is_refused_with_an_answer() {
    let dir = TempDir::new("too-many");
    let tree = dir.write("tree.toml", TREE);
    let socket = dir.path("host.sock");
    let socket_arg = socket.to_str().expect("UTF-8").to_owned();
    let host = Host::start(&dir, &tree, &["--socket", &socket_arg]);

    // Clients that connect and say nothing hold every slot...
    let mut idle: Vec<_> = (0..MAX_CONNECTIONS).map(|_| connect(&socket)).collect();
    // ...so the next one is told, and closed, rather than left waiting.
    let refused = one_json_line(&read_to_close(connect(&socket)));
    assert_eq!(refused["category"], "Policy", "{refused}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("too many connections") && error.contains("64 clients at once"),
        "{error}"
    );
    let status = dir.agent_host(&["status", &tree, "--socket", &socket_arg]);
    let stderr = text(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.starts_with("error: too many connections"),
        "stderr:\n{stderr}"
    );

    // One slot comes free when its client leaves.
    idle.pop();
    status_until_served(&dir, &tree, &socket_arg);
    drop(idle);
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("refused a client: 64 are connected already"),
        "stderr:\n{stderr}"
    );
}

/// CPU time (user + system) the process `pid` used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The fields after the command name, which is in parentheses: state is
    // the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a command name")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).expect("clock ticks per second");
    Duration::from_millis(ticks * 1000 / per_second)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

#[test]
fn out_of_file_descriptors_the_host_backs_off_and_recovers() {
    const FD_LIMIT: usize = 64;
    let dir = TempDir::new("emfile");
    let tree = dir.write("tree.toml", TREE);
    let socket = dir.path("host.sock");
    let socket_arg = socket.to_str().expect("UTF-8").to_owned();
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            &format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_agent-host"),
        ])
        .env_remove("RUST_LOG")
        .env("XDG_RUNTIME_DIR", &dir.0);
    let host = Host::start_command(command, &tree, &["--socket", &socket_arg]);
    let pid = host.pid();

    // More clients than the host has file descriptors for (fewer than
    // its connection limit): once they are used up, `accept` fails with
    // EMFILE while clients keep waiting in the backlog.
    const { assert!(FD_LIMIT <= MAX_CONNECTIONS) };
    let clients: Vec<_> = (0..FD_LIMIT + 16).map(|_| connect(&socket)).collect();
    let deadline = Instant::now() + HANG_GUARD;
    while open_fds(pid) < FD_LIMIT {
        assert!(
            Instant::now() < deadline,
            "the host never ran out of file descriptors: {} open",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Retrying at once would keep a core busy; backing off, the host is
    // nearly idle. (Generous: a spin would use about 2 s.)
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(500),
        "the host used {used:?} of CPU in 2 s while out of file descriptors"
    );

    drop(clients);
    status_until_served(&dir, &tree, &socket_arg);
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("accept failed: Too many open files") && stderr.contains("trying again in"),
        "stderr:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------
// How long a line may be
// ---------------------------------------------------------------------------

/// The largest message of a call (the supervisors' `max_message_bytes`).
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The longest line either side reads (`control::MAX_LINE`).
const MAX_LINE: usize = 16 << 20;

/// A message of `len` bytes that JSON escapes at the worst, six bytes each
/// (`\u0001`, ...; not `\n` and the like, two each). No NUL, so that it can
/// also be a command-line argument.
fn worst_case_message(len: usize) -> String {
    let worst: Vec<char> = ('\u{1}'..' ')
        .filter(|c| !matches!(c, '\u{8}' | '\t' | '\n' | '\u{c}' | '\r'))
        .collect();
    (0..len).map(|i| worst[i % worst.len()]).collect()
}

/// Send one request line over a fresh connection; the answer line.
fn exchange(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut stream = connect(socket);
    let mut line = request.to_string();
    line.push('\n');
    std::io::Write::write_all(&mut stream, line.as_bytes()).expect("sent");
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answered");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:.200}"))
}

#[test]
fn a_maximal_message_escaped_at_worst_round_trips() {
    let dir = TempDir::new("max-message");
    let tree = dir.write("tree.toml", TREE);
    let host = Host::start(&dir, &tree, &[]);

    // The echo agent's reply is `echo: ` and the message: the largest
    // message whose reply is within the limit too.
    let message = worst_case_message(MAX_MESSAGE_BYTES - "echo: ".len());
    let request = serde_json::json!({"op": "call", "agent": "echo", "message": message});
    assert!(
        request.to_string().len() > 6 * (MAX_MESSAGE_BYTES - 6),
        "worst case"
    );
    let answer = exchange(&host.socket, &request);
    assert!(
        answer["ok"].as_str() == Some(&format!("echo: {message}")),
        "not echoed: {:.200}",
        answer.to_string()
    );
    // A message of exactly the limit reaches the agent; its reply is then
    // six bytes too long and refused on the way back.
    let message = worst_case_message(MAX_MESSAGE_BYTES);
    let request = serde_json::json!({"op": "call", "agent": "echo", "message": message});
    let answer = exchange(&host.socket, &request);
    assert_eq!(answer["category"], "Policy", "{answer}");
    let refused = format!(
        "reply of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
        MAX_MESSAGE_BYTES + 6
    );
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains(&refused)),
        "{answer}"
    );
    // One byte more is refused by the supervisor, not by the socket.
    let message = worst_case_message(MAX_MESSAGE_BYTES + 1);
    let request = serde_json::json!({"op": "call", "agent": "echo", "message": message});
    let answer = exchange(&host.socket, &request);
    assert_eq!(answer["category"], "Policy", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("exceeds the limit of {MAX_MESSAGE_BYTES}"))),
        "{answer}"
    );

    // Through `call`: as long as one command-line argument may be (Linux:
    // 128 KiB with its NUL).
    let message = worst_case_message((128 << 10) - 1);
    let call = dir.agent_host(&["call", &tree, "echo", &message]);
    assert_eq!(call.status.code(), Some(0), "{}", text(&call.stderr));
    assert!(
        text(&call.stdout) == format!("echo: {message}\n"),
        "not echoed"
    );
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn an_over_long_request_line_gets_a_policy_error_and_the_host_carries_on() {
    let dir = TempDir::new("long-request");
    let tree = dir.write("tree.toml", TREE);
    let host = Host::start(&dir, &tree, &[]);

    let mut stream = connect(&host.socket);
    let mut writer = stream.try_clone().expect("a second handle");
    // The host stops reading at the limit: write from a thread of its own.
    let writer = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut writer, &vec![b'x'; MAX_LINE + 1]);
    });
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let refused = one_json_line(&text(&answer));
    assert_eq!(refused["category"], "Policy", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("request longer than 16777216 bytes (16 MiB)")),
        "{refused}"
    );
    writer.join().expect("the writer");

    let call = dir.agent_host(&["call", &tree, "echo", "still there?"]);
    assert_eq!(
        text(&call.stdout),
        "echo: still there?\n",
        "{}",
        text(&call.stderr)
    );
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
}

/// A host of our own making at `path`: it reads one request line from each
/// client and answers it with the next of `answers`, then hangs up.
fn fake_host(path: &Path, answers: Vec<Vec<u8>>) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("fake host binds");
    std::thread::spawn(move || {
        for answer in answers {
            let (stream, _) = listener.accept().expect("a client");
            stream.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
            let mut request = String::new();
            let _ = BufReader::new(&stream).read_line(&mut request);
            // The client may stop reading a line that is too long.
            let _ = std::io::Write::write_all(&mut &stream, &answer);
        }
    })
}

#[test]
fn the_client_reports_an_over_long_answer_clearly() {
    let dir = TempDir::new("long-answer");
    let tree = dir.write("tree.toml", TREE);
    let socket = dir.path("fake.sock");
    let socket_arg = socket.to_str().expect("UTF-8").to_owned();
    let mut too_long = b"{\"ok\":\"".to_vec();
    too_long.resize(MAX_LINE + 10, b'x');
    too_long.extend_from_slice(b"\"}\n");
    let host = fake_host(
        &socket,
        vec![too_long.clone(), too_long, b"{\"ok\":\"cut sh".to_vec()],
    );

    for args in [
        &["call", &tree, "echo", "hi", "--socket", &socket_arg][..],
        &["status", &tree, "--socket", &socket_arg],
    ] {
        let out = dir.agent_host(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: stderr:\n{stderr}");
        assert!(
            stderr.starts_with(
                "error: the host's answer is longer than the control socket's limit of 16 MiB"
            ),
            "{args:?}: stderr:\n{stderr}"
        );
    }
    let out = dir.agent_host(&["status", &tree, "--socket", &socket_arg]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.starts_with("error: the host closed the connection in the middle of its answer"),
        "stderr:\n{stderr}"
    );
    host.join().expect("the fake host");
}
