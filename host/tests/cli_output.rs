//! `agent-host` output under back-pressure: a reader that stops reading
//! stdout and stderr (a paused terminal, `| less`, a stalled log shipper)
//! or that went away must never stall or crash the tree.

mod common;

use std::io::{BufRead, BufReader, PipeReader, PipeWriter, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cli::{HANG_GUARD, TempDir, read_all, signal, text, wait_within};

/// How long a `call`, a `status` or the stop on SIGTERM may take while the
/// host's output is stalled. A hang detector, not a timing claim: each
/// takes well under a second when nothing blocks.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// The host's tokio worker threads. Pinned so that the floods below
/// outnumber them on every machine: if a guest's log call blocked its worker
/// in write(2), every worker would be blocked and nothing would answer.
const WORKERS: &str = "2";

/// The agents flooding the host's output at once, one call after another
/// (more than [`WORKERS`]): two through the log import, one through its
/// granted stderr.
const FLOODERS: [(&str, &str); 3] = [
    ("flood-1", "log-flood"),
    ("flood-2", "log-flood"),
    ("flood-3", "stderr-flood"),
];

/// An echo agent, three flooders killed by their 500 ms deadline (then
/// restarted, for as long as the test floods), and `counted` for bounded
/// floods (`log-flood N`, `stderr-flood N`).
const TREE: &str = r#"
[supervisor]
name = "root"
strategy = "one_for_one"
max_restarts = 1_000_000
time_window_ms = 1_000

[[supervisor.children]]
name = "echo"
component = "echo.wasm"

[[supervisor.children]]
name = "counted"
component = "hostile.wasm"
wasi = { inherit_stderr = true }

[[supervisor.children]]
name = "flood-1"
component = "hostile.wasm"
limits = { deadline_ms = 500 }

[[supervisor.children]]
name = "flood-2"
component = "hostile.wasm"
limits = { deadline_ms = 500 }

[[supervisor.children]]
name = "flood-3"
component = "hostile.wasm"
limits = { deadline_ms = 500 }
wasi = { inherit_stderr = true }
"#;

/// What happens to the output of the `run` under test.
enum Reader {
    /// Pipes that are full before the host writes its first byte and are
    /// never read: every write(2) to them blocks.
    Stalled,
    /// Pipes whose reading ends are closed at once: every write fails
    /// (EPIPE).
    Gone,
}

/// A pipe that nobody reads, filled up: its reading end is held (never
/// read) and a thread has written into it until the write blocked. Dropping
/// it closes the reading end, which ends that thread (EPIPE).
struct FullPipe {
    reader: Option<PipeReader>,
    filler: Option<std::thread::JoinHandle<()>>,
}

impl FullPipe {
    /// The pipe, and its writing end for a child's stdout or stderr.
    fn new() -> (Self, PipeWriter) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut filler = writer.try_clone().expect("pipe writer cloned");
        let filler = std::thread::spawn(move || {
            let chunk = [b'#'; 4096];
            while filler.write_all(&chunk).is_ok() {}
        });
        // Filling 64 KiB takes microseconds; nothing depends on it being
        // complete (the host's own output fills the pipe in any case).
        std::thread::sleep(Duration::from_millis(100));
        let pipe = Self {
            reader: Some(reader),
            filler: Some(filler),
        };
        (pipe, writer)
    }
}

impl Drop for FullPipe {
    fn drop(&mut self) {
        // Closing the reading end fails the filler's blocked write.
        drop(self.reader.take());
        if let Some(filler) = self.filler.take() {
            let _ = filler.join();
        }
    }
}

/// An `agent-host run` whose stdout and stderr nobody reads.
struct Host {
    child: Child,
    /// Held, never read (with [`Reader::Stalled`]).
    _pipes: Vec<FullPipe>,
}

impl Host {
    fn start(dir: &TempDir, tree: &str, reader: Reader) -> Self {
        let mut command = dir.command(&["run", tree]);
        command
            // Warnings are logged (also the default): the flooders' records
            // are written, not filtered out.
            .env("RUST_LOG", "warn")
            .env("TOKIO_WORKER_THREADS", WORKERS)
            .stdin(Stdio::null());
        let mut pipes = Vec::new();
        match reader {
            Reader::Stalled => {
                let (stdout, writer) = FullPipe::new();
                command.stdout(writer);
                pipes.push(stdout);
                let (stderr, writer) = FullPipe::new();
                command.stderr(writer);
                pipes.push(stderr);
            }
            Reader::Gone => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let mut child = command.spawn().expect("agent-host run starts");
        // With `Gone`, the reading ends go now; with `Stalled`, the
        // command's writing ends do (the pipes stay full).
        drop(child.stdout.take());
        drop(child.stderr.take());
        drop(command);
        Self {
            child,
            _pipes: pipes,
        }
    }

    /// SIGTERM, then the exit status (fails the test if there is none
    /// within [`ANSWER_WITHIN`]).
    fn terminate(mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        wait_within(&mut self.child, ANSWER_WITHIN, &["run", "(SIGTERM)"])
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A failed test must not leave the host running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait until the host answers `status` (it compiles its components first).
fn wait_until_serving(dir: &TempDir, tree: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let status = dir.agent_host_within(&["status", tree], HANG_GUARD);
        if status.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the host did not start serving within {HANG_GUARD:?}: {}",
            text(&status.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `log-flood` calls to every flooder, one after another, until dropped.
struct Floods {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Floods {
    fn start(dir: &TempDir, tree: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = FLOODERS
            .iter()
            .map(|(agent, flood)| {
                let mut command = dir.command(&["call", tree, agent, flood]);
                command
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut call) = command.spawn() else {
                            return;
                        };
                        // Each call ends with the flooder's deadline (a crash);
                        // a host that hangs is what the test detects, so a call
                        // that hangs is only killed when the floods stop.
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(Some(_)) = call.try_wait() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        let _ = call.kill();
                        let _ = call.wait();
                        // The flooder may be restarting: do not spin.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Floods {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// While the floods go on, the host answers: a bounded flood finishes (the
/// log import does not block), echo replies and `status` lists the tree.
fn assert_answers_while_flooding(dir: &TempDir, tree: &str) {
    let floods = Floods::start(dir, tree);
    // Let the floods fill the pipes and the host's buffers.
    std::thread::sleep(Duration::from_secs(1));

    // 1000 records of 4 KiB: far more than a pipe holds.
    let counted =
        dir.agent_host_within(&["call", tree, "counted", "log-flood 1000"], ANSWER_WITHIN);
    assert_eq!(
        (counted.status.code(), text(&counted.stdout).as_str()),
        (Some(0), "logged 1000\n"),
        "stderr:\n{}",
        text(&counted.stderr)
    );
    // The same through a granted stderr.
    let written = dir.agent_host_within(
        &["call", tree, "counted", "stderr-flood 1000"],
        ANSWER_WITHIN,
    );
    assert_eq!(
        (written.status.code(), text(&written.stdout).as_str()),
        (Some(0), "wrote 1000\n"),
        "stderr:\n{}",
        text(&written.stderr)
    );
    for round in 0..3 {
        let message = format!("ping-{round}");
        let call = dir.agent_host_within(&["call", tree, "echo", &message], ANSWER_WITHIN);
        assert_eq!(
            (call.status.code(), text(&call.stdout)),
            (Some(0), format!("echo: {message}\n")),
            "stderr:\n{}",
            text(&call.stderr)
        );
        let status = dir.agent_host_within(&["status", tree], ANSWER_WITHIN);
        let table = text(&status.stdout);
        assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("root/echo ") && l.contains(" running ")),
            "root/echo is not listed as running:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(floods);
}

#[test]
fn a_host_whose_output_nobody_reads_keeps_answering_and_stops_on_sigterm() {
    let dir = TempDir::new("stalled");
    let tree = dir.write("tree.toml", TREE);
    let host = Host::start(&dir, &tree, Reader::Stalled);
    wait_until_serving(&dir, &tree);

    assert_answers_while_flooding(&dir, &tree);

    // Its stdout and stderr are still stalled: the last lines and the
    // flush at exit must not keep it from stopping.
    let status = host.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_host_whose_output_is_closed_keeps_answering_and_does_not_panic() {
    let dir = TempDir::new("closed");
    let tree = dir.write("tree.toml", TREE);
    let host = Host::start(&dir, &tree, Reader::Gone);
    wait_until_serving(&dir, &tree);

    // A panic in the log import would fail the bounded flood (the agent
    // crashes) and a panic in the host would change the exit status.
    assert_answers_while_flooding(&dir, &tree);

    let status = host.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn demo_json_winds_down_once_its_reader_goes_away() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent-host"))
        .args(["demo", "--json", "--seconds", "600"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent-host demo starts");
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    // `| head -n 1`: one line, then the reader goes away.
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut first)
        .expect("a first line");
    assert!(first.starts_with('{'), "{first}");

    // It notices the closed pipe and stops long before its 600 s are up.
    let status = wait_within(&mut child, HANG_GUARD, &["demo", "--json"]);
    let stderr = text(&stderr.join().expect("stderr reader"));
    assert!(status.success(), "{status:?}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}
