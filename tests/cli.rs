//! The `agent-host` command line, run as a process.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

fn agent_host(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agent-host"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("agent-host runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file under the temp dir with a name no other test run uses; removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(suffix: &str, contents: &[u8]) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!("agent-host-cli-{}-{nanos}-{suffix}", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).expect("temp file written");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("temp path is UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn demo_runs_restarts_and_exits_cleanly() {
    let out = agent_host(&["demo", "--seconds", "2"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("restarted"), "stdout:\n{stdout}");
    assert!(stdout.contains("root/crasher"), "stdout:\n{stdout}");
    assert!(stdout.contains("supervisor stopped"), "stdout:\n{stdout}");
}

#[test]
fn demo_json_prints_only_json_lines() {
    let out = agent_host(&["demo", "--seconds", "1", "--json"]);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut kinds = Vec::new();
    for line in stdout.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        kinds.push(value["kind"].as_str().unwrap_or_default().to_owned());
    }
    for kind in ["event", "call", "child", "stopped"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no `{kind}` line:\n{stdout}"
        );
    }
    assert!(stdout.contains("\"ChildRestarted\""), "stdout:\n{stdout}");
}

#[test]
fn validate_accepts_a_guest_component() {
    let file = TempFile::new("echo.wasm", terraphim_agent_supervisor::examples::ECHO);
    let out = agent_host(&["validate", file.path()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "ok: {} implements terraphim:agent/supervised-agent@0.1.0",
            file.path()
        )),
        "stdout:\n{stdout}"
    );
}

#[test]
fn validate_rejects_a_text_file_and_names_it() {
    let file = TempFile::new(
        "notes.txt",
        b"these are not the bytes you are looking for\n",
    );
    let out = agent_host(&["validate", file.path()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("error: "), "stderr:\n{stderr}");
    assert!(stderr.contains(file.path()), "stderr:\n{stderr}");
}

#[test]
fn validate_reports_each_path_and_fails_if_any_fails() {
    let good = TempFile::new("good.wasm", terraphim_agent_supervisor::examples::ECHO);
    let missing = format!("{}.missing", good.path());
    let out = agent_host(&["validate", good.path(), &missing, "tree.toml"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("ok: {}", good.path())),
        "stdout:\n{stdout}"
    );
    assert!(stderr.contains(&missing), "stderr:\n{stderr}");
    assert!(
        stderr.contains("tree.toml: tree files are not supported yet"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn help_of_every_subcommand_exits_zero() {
    for args in [
        &["--help"][..],
        &["demo", "--help"],
        &["validate", "--help"],
        &["help", "demo"],
    ] {
        let out = agent_host(args);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}:\n{stdout}");
        assert!(stdout.contains("Usage: agent-host"), "{args:?}:\n{stdout}");
    }
    assert!(text(&agent_host(&["--help"]).stdout).contains("Exit status"));
}

#[test]
fn usage_errors_exit_two() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["validate"],
        &["demo", "--seconds", "0"],
    ] {
        let out = agent_host(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}
