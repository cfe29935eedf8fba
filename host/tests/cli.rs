//! The `agent-host` command line, run as a process.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cli::{RunningHost, TempDir, agent_host, text, unique};
use terraphim_agent_supervisor::examples::{CRASHER, ECHO};

/// A file under the temp dir with a name no other test run uses; removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(suffix: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(unique(suffix));
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
            "ok: {} implements terraphim:agent/supervised-agent@0.1.1",
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
        stderr.contains("tree.toml: cannot read the file"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn help_of_every_subcommand_exits_zero() {
    for args in [
        &["--help"][..],
        &["demo", "--help"],
        &["validate", "--help"],
        &["run", "--help"],
        &["call", "--help"],
        &["status", "--help"],
        &["help", "demo"],
    ] {
        let out = agent_host(args);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}:\n{stdout}");
        assert!(stdout.contains("Usage: agent-host"), "{args:?}:\n{stdout}");
    }
    for command in ["run", "call", "status", "validate"] {
        let stdout = text(&agent_host(&[command, "--help"]).stdout);
        assert!(
            stdout.contains("Exit status") && stdout.contains("2  usage error"),
            "{command} --help:\n{stdout}"
        );
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
        &["run"],
        &["call", "tree.toml", "echo"],
        &["status", "tree.toml", "--frobnicate"],
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

// ---------------------------------------------------------------------------
// Tree files: validate, run, call, status
// ---------------------------------------------------------------------------

/// A tree of three agents at the root and a nested supervisor with one.
const TREE: &str = r#"
[supervisor]
name = "root"
strategy = "one_for_one"
max_restarts = 10
time_window_ms = 60_000

[[supervisor.children]]
name = "echo"
component = "echo.wasm"

[[supervisor.children]]
name = "crasher"
component = "crasher.wasm"

[[supervisor.children]]
name = "echo2"
component = "echo.wasm"

[[supervisor.children]]
name = "team"
strategy = "one_for_all"

[[supervisor.children.children]]
name = "echo-a"
component = "echo.wasm"
"#;

/// Every node of [`TREE`], in start order (a nested supervisor starts
/// after its children).
const STARTED: [&str; 5] = [
    "root/echo",
    "root/crasher",
    "root/echo2",
    "root/team/echo-a",
    "root/team",
];

/// `(path, what)` of a text event line: `[  0.001s] root/echo   started`.
fn event(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('[')?.split_once("s] ")?.1;
    let (path, what) = rest.split_once(' ')?;
    Some((path, what.trim()))
}

fn paths_with<'a>(lines: &'a [String], what: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| event(l))
        .filter(|(_, w)| *w == what)
        .map(|(path, _)| path)
        .collect()
}

#[test]
fn validate_accepts_a_valid_tree_file() {
    let dir = TempDir::new("valid-tree");
    let tree = dir.write("tree.toml", TREE);
    let out = dir.agent_host(&["validate", &tree]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "ok: {tree}: a tree of 4 agents under 2 supervisors"
        )),
        "stdout:\n{stdout}"
    );
}

/// The tree file documented in the README, which must stay valid.
fn readme_tree_example() -> String {
    common::readme_toml_block("")
}

#[test]
fn the_readme_tree_example_validates() {
    let dir = TempDir::new("readme-tree");
    std::fs::create_dir_all(dir.0.join("agents")).expect("agents dir");
    std::fs::write(dir.0.join("agents/echo_agent.wasm"), ECHO).expect("echo written");
    std::fs::write(dir.0.join("agents/crasher_agent.wasm"), CRASHER).expect("crasher written");
    let tree = dir.write("tree.toml", &readme_tree_example());
    let out = dir.agent_host(&["validate", &tree]);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", text(&out.stderr));
}

#[test]
fn validate_names_the_file_the_field_and_the_fix_of_each_tree_problem() {
    let dir = TempDir::new("bad-trees");
    dir.write("other.wasm", "(component)");
    let agent = |extra: &str| {
        format!("[supervisor]\nname = \"root\"\n[[supervisor.children]]\nname = \"a\"\n{extra}\n")
    };
    let cases: [(&str, String, &[&str]); 6] = [
        (
            "typo.toml",
            "[supervisor]\nname = \"root\"\nmax_restart = 3\n".into(),
            &["`supervisor.max_restart`", "did you mean `max_restarts`?"],
        ),
        (
            "strategy.toml",
            "[supervisor]\nname = \"root\"\nstrategy = \"one_for_some\"\n".into(),
            &[
                "`supervisor.strategy`",
                "one_for_some",
                "did you mean `one_for_one`?",
            ],
        ),
        (
            "missing.toml",
            agent("component = \"missing.wasm\""),
            &[
                "supervisor.children[0].component",
                "missing.wasm",
                "cargo build --release --target wasm32-wasip2",
            ],
        ),
        (
            "world.toml",
            agent("component = \"other.wasm\""),
            &[
                "supervisor.children[0].component",
                "other.wasm",
                "does not implement the world `supervised-agent`",
                "wit/agent.wit",
            ],
        ),
        (
            "negative.toml",
            agent("component = \"echo.wasm\"\nlimits = { memory_bytes = -4 }"),
            &[
                "supervisor.children[0].limits.memory_bytes",
                "got -4",
                "remove it for the default",
            ],
        ),
        (
            "zero.toml",
            agent("component = \"echo.wasm\"\nlimits = { deadline_ms = 0 }"),
            &[
                "supervisor.children[0].limits.deadline_ms",
                "got 0",
                "remove it for the default",
            ],
        ),
    ];
    for (name, contents, needles) in cases {
        let file = dir.write(name, &contents);
        let out = dir.agent_host(&["validate", &file]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: stderr:\n{stderr}");
        assert!(
            stderr.starts_with(&format!("error: {file}: ")),
            "{name}: stderr:\n{stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{name}: no {needle:?} in stderr:\n{stderr}"
            );
        }
        // `run` refuses the same file with the same problems.
        let run = dir.agent_host(&["run", &file]);
        assert_eq!(run.status.code(), Some(1), "{name}: run");
        assert_eq!(text(&run.stderr), stderr, "{name}: run");
    }
}

#[test]
fn run_serves_call_and_status_and_stops_in_reverse_order_on_ctrl_c() {
    let dir = TempDir::new("run");
    let tree = dir.write("tree.toml", TREE);
    let mut host = RunningHost::start(&dir, &["run", &tree]);
    host.wait_for("every child to start", |seen| {
        let started = paths_with(seen, "started");
        STARTED.iter().all(|p| started.contains(p))
    });

    let call = dir.agent_host(&["call", &tree, "echo", "count"]);
    assert_eq!(
        (call.status.code(), text(&call.stdout).as_str()),
        (Some(0), "1\n"),
        "stderr:\n{}",
        text(&call.stderr)
    );
    assert_eq!(text(&call.stderr), "", "a running host: no note");
    assert_eq!(
        dir.sockets().len(),
        1,
        "the host's socket is where it is looked for"
    );
    let nested = dir.agent_host(&["call", &tree, "root/team/echo-a", "hello"]);
    assert_eq!(text(&nested.stdout), "echo: hello\n");

    let status = dir.agent_host(&["status", &tree]);
    let table = text(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    for path in STARTED {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{path} ")) && l.contains(" running ")),
            "{path} is not listed as running:\n{table}"
        );
    }
    let status = dir.agent_host(&["status", &tree, "--json"]);
    let rows: Vec<serde_json::Value> = text(&status.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect();
    let paths: Vec<&str> = rows.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(
        paths,
        [
            "root/echo",
            "root/crasher",
            "root/echo2",
            "root/team",
            "root/team/echo-a"
        ],
        "depth first, in start order"
    );
    assert!(rows.iter().all(|r| r["status"] == "Running"), "{rows:?}");

    let second = dir.agent_host(&["run", &tree]);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        text(&second.stderr).contains("a host is already running this tree"),
        "{}",
        text(&second.stderr)
    );

    host.signal("INT");
    let (status, lines, stderr) = host.finish();
    assert!(
        status.success(),
        "{status:?}\nstdout:\n{}\nstderr:\n{stderr}",
        lines.join("\n")
    );
    assert_eq!(
        paths_with(&lines, "stopped"),
        [
            "root/team/echo-a",
            "root/team",
            "root/echo2",
            "root/crasher",
            "root/echo"
        ],
        "reverse start order; stdout:\n{}",
        lines.join("\n")
    );
    assert!(dir.sockets().is_empty(), "socket left: {:?}", dir.sockets());

    let gone = dir.agent_host(&["status", &tree]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        text(&gone.stderr).contains("no host is running"),
        "{}",
        text(&gone.stderr)
    );
}

#[test]
fn a_crash_in_a_call_is_an_error_and_the_agent_comes_back() {
    let dir = TempDir::new("crash");
    let tree = dir.write("tree.toml", TREE);
    let mut host = RunningHost::start(&dir, &["run", &tree, "--json"]);
    let json_paths = |seen: &[String], kind: &str| -> Vec<String> {
        seen.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"].get(kind).is_some())
            .filter_map(|v| v["path"].as_str().map(str::to_owned))
            .collect()
    };
    host.wait_for("every child to start", |seen| {
        let started = json_paths(seen, "ChildStarted");
        STARTED.iter().all(|p| started.iter().any(|s| s == p))
    });

    let crash = dir.agent_host(&["call", &tree, "crasher", "panic"]);
    let stderr = text(&crash.stderr);
    assert_eq!(crash.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.starts_with("error: root/crasher crashed: guest panic"),
        "stderr:\n{stderr}"
    );

    let mut attempts = 0;
    loop {
        let ping = dir.agent_host(&["call", &tree, "crasher", "ping"]);
        if ping.status.success() {
            assert_eq!(text(&ping.stdout), "pong\n");
            break;
        }
        let stderr = text(&ping.stderr);
        attempts += 1;
        assert!(
            stderr.contains("restarting") && attempts < 100,
            "attempt {attempts}: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    host.wait_for("the crasher's restart", |seen| {
        json_paths(seen, "ChildRestarted")
            .iter()
            .any(|p| p == "root/crasher")
    });

    host.signal("TERM");
    let (status, lines, stderr) = host.finish();
    assert!(status.success(), "{status:?}\nstderr:\n{stderr}");
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    let exited: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"].get("ChildExited").is_some())
        .collect();
    assert_eq!(exited.len(), 1, "{exited:?}");
    assert_eq!(exited[0]["path"], "root/crasher");
    let last = lines.last().map(String::as_str).unwrap_or_default();
    assert!(last.contains(r#""kind":"stopped""#), "{last}");
}

#[test]
fn call_without_a_running_host_runs_the_tree_for_that_call() {
    let dir = TempDir::new("one-shot");
    let tree = dir.write("tree.toml", TREE);
    let out = dir.agent_host(&["call", &tree, "echo", "count"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(text(&out.stdout), "1\n");
    assert!(
        stderr.contains(&format!(
            "no running host for {tree}: started it for this call; state is kept in {}",
            dir.0.join("tree.state.redb").display()
        )),
        "stderr:\n{stderr}"
    );

    let unknown = dir.agent_host(&["call", &tree, "nobody", "count"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stderr).contains("no node `nobody` in the tree"),
        "{}",
        text(&unknown.stderr)
    );

    let status = dir.agent_host(&["status", &tree]);
    assert_eq!(status.status.code(), Some(1));
    assert!(
        text(&status.stderr).contains("no host is running"),
        "{}",
        text(&status.stderr)
    );
    assert!(dir.sockets().is_empty(), "{:?}", dir.sockets());
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = TempDir::new("stale");
    let tree = dir.write("tree.toml", TREE);
    let socket = dir.0.join("control.sock");
    // A socket file nobody listens on, as a killed host leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let socket = socket.to_str().expect("UTF-8");
    let mut host = RunningHost::start(&dir, &["run", &tree, "--socket", socket]);
    host.wait_for("every child to start", |seen| {
        let started = paths_with(seen, "started");
        STARTED.iter().all(|p| started.contains(p))
    });
    let call = dir.agent_host(&["call", &tree, "echo2", "count", "--socket", socket]);
    assert_eq!(text(&call.stdout), "1\n", "{}", text(&call.stderr));
    host.signal("INT");
    let (status, _, stderr) = host.finish();
    assert!(status.success(), "{stderr}");
    assert!(!Path::new(socket).exists(), "the socket is removed on exit");
}
