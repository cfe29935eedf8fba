//! `agent-host run --http`: the metrics move by exactly the crashes
//! injected and parse as the Prometheus text format; the JSON API; and each
//! refusal of the server (a non-loopback bind, a foreign Host header, the
//! management calls without the flag, the token or the origin).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use common::cli::{HANG_GUARD, RunningHost, TempDir, text};
use common::http_client::{Response, get, request};

const TREE: &str = r#"
[supervisor]
name = "root"
max_restarts = 100
time_window_ms = 60_000

[[supervisor.children]]
name = "crasher"
component = "crasher.wasm"

[[supervisor.children]]
name = "echo"
component = "echo.wasm"
"#;

/// A host running `TREE` with `extra` flags (and `--http 127.0.0.1:0`
/// unless they have an `--http`); its
/// HTTP address and listening line.
fn start(dir: &TempDir, extra: &[&str]) -> (RunningHost, String, serde_json::Value) {
    let tree = dir.write("tree.toml", TREE);
    let mut args = vec!["run", tree.as_str(), "--json", "--state", "memory"];
    if !extra.contains(&"--http") {
        args.extend(["--http", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    let mut host = RunningHost::start(dir, &args);
    host.wait_for("both agents started", |seen| {
        let started = |path: &str| {
            seen.iter()
                .any(|l| l.contains(r#""ChildStarted""#) && l.contains(&format!("\"{path}\"")))
        };
        started("root/crasher") && started("root/echo")
    });
    let listening = host
        .seen
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "listening")
        .expect("a listening line");
    let addr = listening["http"]
        .as_str()
        .expect("the listening line has the HTTP address")
        .to_owned();
    (host, addr, listening)
}

/// The restarts of `path` printed so far.
fn restarts(seen: &[String], path: &str) -> usize {
    seen.iter()
        .filter(|l| l.contains(r#""ChildRestarted""#) && l.contains(&format!(r#""path":"{path}""#)))
        .count()
}

// ---------------------------------------------------------------------------
// The Prometheus text format, checked line by line
// ---------------------------------------------------------------------------

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parse `{a="x",b="y"}` strictly (escapes `\\`, `\"`, `\n`); the rest of
/// the line after it.
fn parse_labels(line: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = line.strip_prefix('{').ok_or("no `{`")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or("a label without =\"")?;
        if !is_metric_name(name) || name.contains(':') {
            return Err(format!("bad label name `{name}`"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err("an unterminated label value".into()),
            }
        };
        labels.insert(name.to_owned(), value);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn bad(n: usize, line: &str, why: &str) -> ! {
    panic!("line {}: {why}: {line}", n + 1)
}

/// Check `text` against the Prometheus text format 0.0.4: every line a
/// HELP, a TYPE (before the family's samples, once per family) or a sample
/// of a declared family (with the suffixes its type allows), names and
/// labels well formed, values numbers, histograms' buckets cumulative and
/// ending with `+Inf` equal to `_count`. Returns every sample.
fn check_format(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    assert!(text.ends_with('\n'), "the text must end with a newline");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').unwrap_or((rest, ""));
            if !is_metric_name(name) {
                bad(n, line, "a HELP of a bad name");
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .unwrap_or_else(|| bad(n, line, "a TYPE without a type"));
            if !is_metric_name(name)
                || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
            {
                bad(n, line, "a bad TYPE");
            }
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                bad(n, line, "a second TYPE of one family");
            }
        } else if line.starts_with('#') || line.is_empty() {
            bad(n, line, "a stray comment or an empty line");
        } else {
            let name_end = line
                .find(['{', ' '])
                .unwrap_or_else(|| bad(n, line, "no value"));
            let name = &line[..name_end];
            if !is_metric_name(name) {
                bad(n, line, "a bad metric name");
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).unwrap_or_else(|e| bad(n, line, &e))
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| bad(n, line, "no space before the value"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                v => v
                    .parse()
                    .unwrap_or_else(|_| bad(n, line, "a value that is not a number")),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                })
                .unwrap_or(name);
            match types.get(family).map(String::as_str) {
                None => bad(n, line, "a sample before its TYPE"),
                Some("counter") if value < 0.0 => bad(n, line, "a negative counter"),
                Some("histogram") if name.ends_with("_bucket") && !labels.contains_key("le") => {
                    bad(n, line, "a bucket without `le`")
                }
                _ => {}
            }
            samples.push((name.to_owned(), labels, value));
        }
    }
    // Histograms: cumulative buckets, +Inf last and equal to _count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut by_series: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut counts: BTreeMap<String, f64> = BTreeMap::new();
        for (name, labels, value) in &samples {
            let mut key = labels.clone();
            let le = key.remove("le");
            let key = format!("{key:?}");
            if *name == format!("{family}_bucket") {
                assert!(le.is_some());
                by_series.entry(key).or_default().push(*value);
            } else if *name == format!("{family}_count") {
                counts.insert(key, *value);
            }
        }
        for (key, buckets) in by_series {
            assert!(
                buckets.windows(2).all(|w| w[0] <= w[1]),
                "{family}{key}: buckets not cumulative"
            );
            assert_eq!(
                buckets.last(),
                counts.get(&key),
                "{family}{key}: +Inf != _count"
            );
        }
    }
    samples
}

/// The scrape, checked, as `(name, labels) -> value`; also parsed with the
/// `prometheus-parse` crate, which must find every sample.
fn scrape(addr: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let response = get(addr, "/metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let samples = check_format(&response.body);
    let parsed = prometheus_parse::Scrape::parse(response.body.lines().map(|l| Ok(l.to_owned())))
        .expect("prometheus-parse parses it");
    let histogram_lines = samples
        .iter()
        .filter(|(name, ..)| name.contains("_duration_seconds"))
        .count();
    let histograms = parsed
        .samples
        .iter()
        .filter(|s| matches!(s.value, prometheus_parse::Value::Histogram(_)))
        .count();
    // prometheus-parse folds each histogram's buckets into one sample.
    assert!(
        histogram_lines == 0 || histograms > 0,
        "no histogram parsed"
    );
    assert!(!parsed.samples.is_empty());
    samples
        .into_iter()
        .map(|(name, labels, value)| ((name, labels), value))
        .collect()
}

fn value(
    metrics: &BTreeMap<(String, BTreeMap<String, String>), f64>,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    metrics
        .get(&(name.to_owned(), labels))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn metrics_move_by_exactly_the_crashes_injected() {
    const CRASHES: usize = 3;
    let dir = TempDir::new("metrics");
    let (mut host, addr, _) = start(&dir, &[]);
    let tree = dir.path("tree.toml");
    let tree = tree.to_str().expect("UTF-8");
    let crasher = [("path", "root/crasher")];

    let before = scrape(&addr);
    for (name, labels) in [
        (
            "agent_host_exits_total",
            &[("path", "root/crasher"), ("reason", "panic")][..],
        ),
        (
            "agent_host_restarts_total",
            &[
                ("path", "root/crasher"),
                ("cause", "panic"),
                ("bystander", "false"),
            ],
        ),
        (
            "agent_host_calls_total",
            &[("path", "root/crasher"), ("outcome", "crashed")],
        ),
    ] {
        assert_eq!(value(&before, name, labels), 0.0, "{name} before any crash");
    }
    assert_eq!(
        value(
            &before,
            "agent_host_node_status",
            &[
                ("path", "root/crasher"),
                ("kind", "agent"),
                ("status", "running")
            ]
        ),
        1.0
    );

    for n in 1..=CRASHES {
        let out = dir.agent_host(&["call", tree, "crasher", "panic"]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("crashed"),
            "{}",
            text(&out.stderr)
        );
        host.wait_for("the crasher's restart", |seen| {
            restarts(seen, "root/crasher") == n
        });
    }
    let out = dir.agent_host(&["call", tree, "crasher", "ping"]);
    assert_eq!(text(&out.stdout).trim(), "pong");

    // The observer counts the events on its own task: wait (bounded) until
    // it has seen the last restart, then every counter must be exact.
    let deadline = std::time::Instant::now() + HANG_GUARD;
    let metrics = loop {
        let metrics = scrape(&addr);
        let restarted = value(
            &metrics,
            "agent_host_restarts_total",
            &[
                ("path", "root/crasher"),
                ("cause", "panic"),
                ("bystander", "false"),
            ],
        );
        if restarted >= CRASHES as f64 || std::time::Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let n = CRASHES as f64;
    assert_eq!(
        value(
            &metrics,
            "agent_host_exits_total",
            &[("path", "root/crasher"), ("reason", "panic")]
        ),
        n
    );
    assert_eq!(
        value(
            &metrics,
            "agent_host_restarts_total",
            &[
                ("path", "root/crasher"),
                ("cause", "panic"),
                ("bystander", "false")
            ]
        ),
        n
    );
    assert_eq!(
        value(
            &metrics,
            "agent_host_calls_total",
            &[("path", "root/crasher"), ("outcome", "crashed")]
        ),
        n
    );
    assert_eq!(
        value(
            &metrics,
            "agent_host_calls_total",
            &[("path", "root/crasher"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(&metrics, "agent_host_call_duration_seconds_count", &crasher),
        n + 1.0
    );
    // Nothing else exited or restarted.
    let others: f64 = metrics
        .iter()
        .filter(|((name, labels), _)| {
            (name == "agent_host_exits_total" || name == "agent_host_restarts_total")
                && labels.get("path").map(String::as_str) != Some("root/crasher")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(others, 0.0);
    assert_eq!(
        value(
            &metrics,
            "agent_host_node_status",
            &[
                ("path", "root/crasher"),
                ("kind", "agent"),
                ("status", "running")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "agent_host_supervisor_intensity_used",
            &[("path", "root")]
        ),
        n
    );
    assert_eq!(
        value(
            &metrics,
            "agent_host_supervisor_intensity_max",
            &[("path", "root")]
        ),
        100.0
    );
    assert_eq!(value(&metrics, "agent_host_instances_live", &[]), 2.0);
    // Both components, compiled or from the tests' compile cache.
    let loaded = |source| {
        value(
            &metrics,
            "agent_host_components_loaded_total",
            &[("source", source)],
        )
    };
    assert_eq!(loaded("compiled") + loaded("cache"), 2.0);
    assert!(value(&metrics, "agent_host_fuel_consumed_total", &crasher) > 0.0);
    assert!(value(&metrics, "agent_host_memory_bytes", &crasher) > 0.0);
    assert_eq!(value(&metrics, "agent_host_events_lost_total", &[]), 0.0);

    // The JSON API says the same.
    let status = get(&addr, "/api/status").json();
    let node = status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["path"] == "root/crasher"))
        .expect("the crasher in the status")
        .clone();
    assert_eq!(node["restart_count"], CRASHES);
    assert_eq!(node["metrics"]["calls"]["crashed"], CRASHES);
    assert_eq!(status["control"], false);
    let detail = get(&addr, "/api/nodes/root/crasher").json();
    assert_eq!(detail["supervisor"], "root");
    assert_eq!(
        detail["node"]["last_exit"],
        serde_json::json!({ "Fault": "Panic" })
    );
    let entries = detail["history"].as_array().expect("history");
    // Each crash restarted the crasher, with the crash's report; the
    // same message crashed it `CRASHES` times in a row (the default poison
    // threshold), so it was quarantined too.
    let restarted: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["action"] == "Restarted")
        .collect();
    assert_eq!(restarted.len(), CRASHES, "{entries:?}");
    assert!(
        restarted
            .iter()
            .all(|e| e["crash"]["message"] == "panic" && e["crash"]["sequence"] == 1),
        "{entries:?}"
    );
    let quarantined: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["action"].get("Quarantined").is_some())
        .collect();
    assert_eq!(quarantined.len(), 1, "{entries:?}");
    assert_eq!(entries.len(), CRASHES + 1, "{entries:?}");
    // The node's last crash report, for the page's crash report panel.
    let crash = &detail["last_crash"];
    assert_eq!(crash["message"], "panic", "{crash}");
    assert_eq!(crash["fault"], "guest panic (unreachable)", "{crash}");
    assert!(
        crash["output"]
            .as_array()
            .is_some_and(|lines| lines.iter().any(|l| l
                .as_str()
                .is_some_and(|l| l.contains("crasher: asked to panic")))),
        "{crash}"
    );
    assert!(
        crash["backtrace"]
            .as_array()
            .is_some_and(|frames| !frames.is_empty()),
        "{crash}"
    );
    assert_eq!(
        quarantined[0]["action"]["Quarantined"]["hash"],
        crash["message_hash"]
    );
    let recent = get(&addr, "/api/events/recent").json();
    assert!(
        recent
            .as_array()
            .is_some_and(|events| events.len() >= 2 * CRASHES)
    );
    assert_eq!(get(&addr, "/api/nodes/root/nobody").status, 404);
    // The page and its assets are served.
    let page = get(&addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/app.js"));
    assert_eq!(get(&addr, "/app.js").status, 200);

    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Whether no answer carries a CORS header.
fn no_cors(response: &Response) {
    assert!(
        !response
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("access-control-")),
        "a CORS header: {:?}",
        response.headers
    );
}

#[test]
fn a_non_loopback_address_is_refused_without_the_flag() {
    let dir = TempDir::new("http-remote");
    let tree = dir.write("tree.toml", TREE);
    let out = dir.agent_host(&["run", &tree, "--http", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("is not a loopback address"), "{stderr}");
    assert!(stderr.contains("--http-allow-remote"), "{stderr}");
    assert!(
        text(&out.stdout).is_empty(),
        "it started: {}",
        text(&out.stdout)
    );

    // The flags need --http.
    let out = dir.agent_host(&["run", &tree, "--http-allow-control"]);
    assert_eq!(out.status.code(), Some(2));

    // With the flag it listens on every interface, and still checks Host.
    let (host, addr, _) = start(&dir, &["--http", "0.0.0.0:0", "--http-allow-remote"]);
    let port = addr.rsplit_once(':').expect("a port").1;
    let local = format!("127.0.0.1:{port}");
    assert_eq!(get(&local, "/api/status").status, 200);
    let rebinding = request(
        &local,
        "GET",
        "/api/status",
        &[("Host", &format!("rebind.example:{port}"))],
    );
    assert_eq!(rebinding.status, 421);
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn requests_for_another_host_name_are_refused() {
    let dir = TempDir::new("http-host");
    let (host, addr, _) = start(&dir, &[]);
    let port = addr.rsplit_once(':').expect("a port").1;
    for path in [
        "/",
        "/metrics",
        "/api/status",
        "/api/events/recent",
        "/api/events",
    ] {
        for name in [
            format!("attacker.example:{port}"),
            format!("127.0.0.1:{}", port.parse::<u16>().unwrap_or(1) ^ 1),
            String::new(),
        ] {
            let response = request(&addr, "GET", path, &[("Host", &name)]);
            assert_eq!(
                response.status, 421,
                "{path} with Host {name}: {}",
                response.body
            );
            assert!(
                !response.body.contains("root/echo"),
                "it leaked: {}",
                response.body
            );
            no_cors(&response);
        }
    }
    let local = request(
        &addr,
        "GET",
        "/api/status",
        &[("Host", &format!("localhost:{port}"))],
    );
    assert_eq!(local.status, 200);
    let cross = request(
        &addr,
        "GET",
        "/api/status",
        &[("Origin", "http://attacker.example")],
    );
    assert_eq!(cross.status, 200);
    no_cors(&cross);
    assert_eq!(cross.header("x-frame-options"), Some("DENY"));
    assert_eq!(cross.header("x-content-type-options"), Some("nosniff"));
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn management_calls_need_the_flag_the_token_and_the_origin() {
    // Without --http-allow-control: refused whatever the request carries.
    let dir = TempDir::new("http-control-off");
    let (host, addr, listening) = start(&dir, &[]);
    assert!(listening.get("http_token_file").is_none());
    let refused = request(
        &addr,
        "POST",
        "/api/control/terminate/root/echo",
        &[("X-Agent-Host-Token", "0123")],
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("--http-allow-control"));
    let (status, _) = host.stop();
    assert!(status.success());

    // With it: the token, from the 0600 file the listening line names.
    let dir = TempDir::new("http-control-on");
    let (host, addr, listening) = start(&dir, &["--http-allow-control"]);
    let file = listening["http_token_file"].as_str().expect("a token file");
    let mode = std::fs::metadata(file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_owned();
    assert_eq!(token.len(), 64);
    let path = "/api/control/terminate/root/echo";
    let origin = format!("http://{addr}");
    for (headers, expected) in [
        (vec![], 401),
        (vec![("X-Agent-Host-Token", "not-the-token")], 401),
        (vec![("X-Agent-Host-Token", &token[..63])], 401),
        (
            vec![
                ("X-Agent-Host-Token", token.as_str()),
                ("Origin", "http://attacker.example"),
            ],
            403,
        ),
    ] {
        let response = request(&addr, "POST", path, &headers);
        assert_eq!(response.status, expected, "{headers:?}: {}", response.body);
        no_cors(&response);
    }
    // Refused requests changed nothing.
    let echo = |addr: &str| get(addr, "/api/nodes/root/echo").json()["node"]["status"].clone();
    assert_eq!(echo(&addr), "Running");
    // A GET cannot reach it.
    assert_eq!(get(&addr, path).status, 405);
    // With the token (and our own origin, as the page sends it): done.
    let done = request(
        &addr,
        "POST",
        path,
        &[("X-Agent-Host-Token", &token), ("Origin", &origin)],
    );
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(echo(&addr), "Stopped");
    let again = request(
        &addr,
        "POST",
        "/api/control/restart/root/echo",
        &[("X-Agent-Host-Token", &token)],
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(echo(&addr), "Running");
    let conflict = request(
        &addr,
        "POST",
        "/api/control/restart/root/echo",
        &[("X-Agent-Host-Token", &token)],
    );
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    let (status, stderr) = host.stop();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&token),
        "the token is printed on stderr: {stderr}"
    );
    assert!(
        !std::path::Path::new(file).exists(),
        "the token file is removed at exit"
    );
}
