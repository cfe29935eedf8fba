//! The live tree view in a real browser: headless Chromium (Debian's
//! `chromium`), driven over the DevTools protocol, loads the page of
//! `agent-host demo --http` while the demo crashes its agents, sees the
//! nodes of the tree, sees a restart count change without a reload, opens
//! a node's crash report and saves a screenshot; then the host is stopped
//! and started again on the same port, and the page reconnects by itself.
//!
//! Without Chromium the test prints `SKIPPED: ...` and passes, unless
//! `TERRAPHIM_REQUIRE_BROWSER=1` (as in `.ci/run`, which installs it). The
//! screenshot goes to `$CARGO_TARGET_TMPDIR/tree-view.png`, and also to
//! `$TERRAPHIM_SCREENSHOT` if that is set (how `docs/tree-view.png` is
//! made).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{HANG_GUARD, RunningHost, TempDir};
use serde_json::{Value, json};

const BROWSERS: [&str; 3] = [
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
];

/// The demo's tree, every node by path.
const PATHS: [&str; 7] = [
    "root/echo",
    "root/crasher",
    "root/fuel-burner",
    "root/memory-hog",
    "root/team",
    "root/team/echo-a",
    "root/team/echo-b",
];

/// Chromium, or why the test cannot run.
fn browser() -> Option<PathBuf> {
    let found = BROWSERS.iter().map(PathBuf::from).find(|p| p.exists());
    common::tool_or_skip(
        found,
        "SKIPPED: tree_view: no Chromium (install Debian's `chromium` package, as .ci/run does)",
        "TERRAPHIM_REQUIRE_BROWSER",
    )
}

/// Headless Chromium with a fresh profile; killed on drop.
struct Browser {
    child: Child,
    port: u16,
}

impl Browser {
    fn start(binary: &Path, profile: &Path) -> Self {
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,820",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it chose into its profile.
        let file = profile.join("DevToolsActivePort");
        let port = wait_until("Chromium's DevTools port", || {
            let text = std::fs::read_to_string(&file).ok()?;
            text.lines().next()?.trim().parse().ok()
        });
        Self { child, port }
    }

    /// A DevTools connection to its page.
    fn page(&self) -> Page {
        let url = wait_until("a page target", || {
            let list = http_get(&format!("127.0.0.1:{}", self.port), "/json/list")?;
            let targets: Value = serde_json::from_str(&list).ok()?;
            targets.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                .as_str()
                .map(str::to_owned)
        });
        let (socket, _) = tungstenite::connect(url.as_str()).expect("DevTools connection");
        if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
        }
        Page { socket, next: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page, over the DevTools protocol.
struct Page {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Page {
    /// Call `method`; its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket
            .send(tungstenite::Message::text(message))
            .expect("DevTools request sent");
        loop {
            let message = self.socket.read().expect("DevTools answer");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let Ok(answer) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of the JavaScript `expression` in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// Wait (bounded by the hang guard) until `expression` is true.
    fn wait_for(&mut self, what: &str, expression: &str) {
        wait_until(what, || {
            (self.eval(expression) == json!(true)).then_some(())
        });
    }
}

/// Poll `probe` until it gives a value; fails the test after the hang guard.
fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "waiting for {what}: gave up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The body of `GET path` on `addr`, if it answers 200 (read by its
/// `Content-Length`: Chromium's DevTools server keeps the connection open).
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    let mut buf = [0; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })?;
        if body.len() >= length {
            return head.starts_with("HTTP/1.1 200").then(|| body.to_owned());
        }
    }
}

/// `agent-host demo --json --http ADDR`, running until stopped; its URL.
fn demo(dir: &TempDir, addr: &str) -> (RunningHost, String) {
    let mut host = RunningHost::start(dir, &["demo", "--json", "--http", addr]);
    host.wait_for("the demo's http line", |seen| {
        seen.iter().any(|l| l.contains(r#""kind":"http""#))
    });
    let url = host
        .seen
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["kind"] == "http")
        .and_then(|v| v["url"].as_str().map(str::to_owned))
        .expect("an http line with a url");
    (host, url)
}

fn restarts_of(page: &mut Page, path: &str) -> Option<u64> {
    let value = page.eval(&format!(
        r#"(document.querySelector('li[data-path="{path}"]') || {{dataset: {{}}}}).dataset.restarts"#
    ));
    value.as_str().and_then(|v| v.parse().ok())
}

#[test]
fn the_tree_view_shows_the_tree_live_and_reconnects() {
    let Some(binary) = browser() else { return };
    let dir = TempDir::new("tree-view");
    let (host, url) = demo(&dir, "127.0.0.1:0");
    let profile = dir.path("chromium-profile");
    let browser = Browser::start(&binary, &profile);
    let mut page = browser.page();
    page.call("Page.navigate", json!({ "url": url }));

    // The nodes of the tree, by path, each with a status.
    let all_nodes = PATHS
        .iter()
        .map(|p| format!(r#"!!document.querySelector('li[data-path="{p}"][data-status]')"#))
        .collect::<Vec<_>>()
        .join(" && ");
    page.wait_for("every node of the demo tree", &all_nodes);
    page.wait_for(
        "the live event stream",
        r#"document.getElementById("conn").dataset.state === "live""#,
    );
    assert_eq!(
        page.eval(r#"document.querySelector('li[data-path="root/team"]').className"#),
        json!("supervisor")
    );

    // A restart count changes while the page stays loaded: a mark set now
    // would be gone after a reload.
    page.eval("window.__sameDocument = true");
    let before = wait_until("the crasher's restart count", || {
        restarts_of(&mut page, "root/crasher")
    });
    wait_until("the crasher's restart count to change", || {
        restarts_of(&mut page, "root/crasher").filter(|now| *now > before)
    });
    assert_eq!(page.eval("window.__sameDocument === true"), json!(true));

    // A node's crash report, on click.
    page.eval(r#"document.querySelector('li[data-path="root/crasher"] > .row').click()"#);
    page.wait_for(
        "the crasher's crash report",
        r#"(() => { const d = document.getElementById("detail-body"); return !!d && d.textContent.includes("root/crasher") && d.textContent.includes("Last crash report") && d.textContent.includes("Fault"); })()"#,
    );
    // Let the counters settle on the screen before the picture.
    page.wait_for(
        "a few restarts of the team",
        r#"(() => { const a = document.querySelector('li[data-path="root/team/echo-a"]'); return Number(a.dataset.restarts) >= 1 && a.querySelector(".exit").textContent !== ""; })()"#,
    );
    let shot = page.call("Page.captureScreenshot", json!({ "format": "png" }));
    let png = data_encoding::BASE64
        .decode(shot["data"].as_str().expect("screenshot data").as_bytes())
        .expect("base64 PNG");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tree-view.png");
    std::fs::write(&out, &png).expect("screenshot saved");
    if let Ok(copy) = std::env::var("TERRAPHIM_SCREENSHOT") {
        std::fs::write(&copy, &png).expect("screenshot copied");
    }

    // The host goes away and comes back on the same port: the page says
    // so, then shows the new host's tree without a reload.
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (status, stderr) = host.stop();
    assert!(status.success(), "the demo failed: {stderr}");
    page.wait_for(
        "the page to notice the host is gone",
        r#"document.getElementById("conn").dataset.state !== "live""#,
    );
    let (host, _) = demo(&dir, &addr);
    page.wait_for(
        "the page to reconnect",
        r#"document.getElementById("conn").dataset.state === "live""#,
    );
    page.wait_for("every node again", &all_nodes);
    assert_eq!(page.eval("window.__sameDocument === true"), json!(true));
    let (status, stderr) = host.stop();
    assert!(status.success(), "the demo failed: {stderr}");
    drop(browser);
}
