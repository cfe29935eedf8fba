//! Helpers of the tests that run `agent-host` as a process: a private
//! directory with the example components, commands bounded by a hang guard,
//! and a host running in the background whose stdout is read line by line.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use terraphim_agent_supervisor::examples::{CRASHER, ECHO, HOSTILE};

/// Hang guard for every wait on a child process (never a timing assertion).
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// Bytes as text, lossily.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A name no other test (run) uses, with `name` in it.
pub fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("agent-host-test-{}-{nanos}-{name}", std::process::id())
}

/// The compile cache of the commands the tests run (not the user's).
pub fn test_cache_home() -> PathBuf {
    std::env::temp_dir().join(format!(
        "agent-host-tests-cache-{}",
        terraphim_agent_supervisor::private_dir::euid()
    ))
}

/// `agent-host args`, run to the end, outside any directory of a test.
pub fn agent_host(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent-host"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env("XDG_CACHE_HOME", test_cache_home());
    output(&mut command, args, HANG_GUARD)
}

/// A directory no other test (run) uses, with the example components
/// `echo.wasm`, `crasher.wasm` and `hostile.wasm` in it; removed on drop. It
/// is also the `XDG_RUNTIME_DIR` of the commands run in it, so control
/// sockets land in it. Others may enter it, not write to it (mode 0755).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&path).expect("temp dir created");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("temp dir mode set");
        for (file, bytes) in [
            ("echo.wasm", ECHO),
            ("crasher.wasm", CRASHER),
            ("hostile.wasm", HOSTILE),
        ] {
            std::fs::write(path.join(file), bytes).expect("component written");
        }
        Self(path)
    }

    /// The path of `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Write `contents` to `name` in the directory; its path.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("file written");
        path.to_str().expect("temp path is UTF-8").to_owned()
    }

    /// `agent-host args`, with this directory as `XDG_RUNTIME_DIR`, the
    /// tests' compile cache and no `RUST_LOG`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agent-host"));
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env("XDG_RUNTIME_DIR", &self.0)
            .env("XDG_CACHE_HOME", test_cache_home());
        command
    }

    /// Run `agent-host args` to the end (bounded by the hang guard).
    pub fn agent_host(&self, args: &[&str]) -> Output {
        self.agent_host_within(args, HANG_GUARD)
    }

    /// Run `agent-host args` to the end; fails the test if it takes longer
    /// than `within`.
    pub fn agent_host_within(&self, args: &[&str], within: Duration) -> Output {
        output(&mut self.command(args), args, within)
    }

    /// The control sockets in the default socket directory
    /// (`$XDG_RUNTIME_DIR/agent-host/`).
    pub fn sockets(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.0.join("agent-host")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".sock"))
            .collect()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `command` to the end, reading its output; fails the test if it
/// takes longer than `within`.
pub fn output(command: &mut Command, what: &[&str], within: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent-host runs");
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let status = wait_within(&mut child, within, what);
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Read `pipe` to its end on a thread of its own.
pub fn read_all(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Wait for `child` to exit; kill it and fail the test after `within`.
pub fn wait_within(child: &mut Child, within: Duration, what: &[&str]) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent-host {what:?} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send signal `name` (`INT`, `TERM`, `KILL`) to the process `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// An `agent-host` command (usually `run`) in the background, its stdout
/// read line by line; killed on drop if it still runs.
pub struct RunningHost {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The stdout lines read so far.
    pub seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl RunningHost {
    /// Start `agent-host args` in `dir`.
    pub fn start(dir: &TempDir, args: &[&str]) -> Self {
        Self::spawn(dir.command(args))
    }

    /// Start `command`.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent-host starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = read_all(child.stderr.take().expect("piped stderr"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Read lines until `done` says every expected line came; fails the
    /// test (with what it printed) after the hang guard.
    pub fn wait_for(&mut self, what: &str, mut done: impl FnMut(&[String]) -> bool) {
        let deadline = Instant::now() + HANG_GUARD;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => {
                    let _ = self.child.kill();
                    let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
                    panic!(
                        "waiting for {what}: {e:?}; stdout so far:\n{}\nstderr:\n{}",
                        self.seen.join("\n"),
                        text(&stderr.unwrap_or_default())
                    )
                }
            }
        }
    }

    /// Whether it has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Take the stdout lines printed so far without waiting.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// The control socket its `--json` `listening` line names.
    pub fn socket(&mut self) -> PathBuf {
        self.wait_for("the listening line", |seen| {
            seen.iter().any(|l| l.contains(r#""kind":"listening""#))
        });
        self.seen
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["kind"] == "listening")
            .and_then(|v| v["socket"].as_str().map(PathBuf::from))
            .expect("a listening line with a socket")
    }

    /// Send it signal `name`.
    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    /// Wait for the exit; the status, every stdout line and the stderr.
    pub fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        let status = wait_within(&mut self.child, HANG_GUARD, &["(background)"]);
        while let Ok(line) = self.lines.recv_timeout(HANG_GUARD) {
            self.seen.push(line);
        }
        let stderr = self.stderr.take().map(|h| h.join().expect("stderr reader"));
        (
            status,
            std::mem::take(&mut self.seen),
            text(&stderr.unwrap_or_default()),
        )
    }

    /// Stop it with SIGINT; its exit status and stderr.
    pub fn stop(self) -> (ExitStatus, String) {
        self.signal("INT");
        let (status, _, stderr) = self.finish();
        (status, stderr)
    }
}

impl Drop for RunningHost {
    fn drop(&mut self) {
        // A failed test must not leave the host running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
