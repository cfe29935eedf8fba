//! The fuzz targets' checks (`fuzz/src/lib.rs`) on the stable toolchain:
//! every checked-in corpus file of `fuzz/corpus/<target>/` (the seeds and
//! every input a fuzzer found) replayed through the entry point it was
//! found for, then random and structured inputs from proptest (arbitrary
//! bytes, inputs built from the format's own pieces, and seeds with random
//! edits). The entry points must never panic, and answer with their typed
//! results; the checks say what else must hold.
//!
//! `PROPTEST_CASES=5000 cargo test --test fuzz_inputs` runs more cases; the
//! longer runs are `cargo fuzz run` (see the README, "Fuzzing").

mod common;

#[path = "../../fuzz/src/lib.rs"]
mod checks;

use std::path::{Path, PathBuf};

use common::wat::{Fixture, agent_component};
use proptest::prelude::*;
use proptest::sample::{Index, select};

/// The checked-in corpus of one fuzz target: every file, by name.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a corpus file");
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{}: the seeds are missing", dir.display());
    files
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    corpus(target).into_iter().map(|(_, bytes)| bytes).collect()
}

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

/// One edit of a byte string, libFuzzer-style.
#[derive(Debug, Clone)]
enum Edit {
    Replace(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    /// Copy a run of up to 16 bytes from one place to another.
    Splice(Index, Index, usize),
    /// Cut the input short.
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => any::<Index>().prop_map(Edit::Delete),
        1 => (any::<Index>(), any::<Index>(), 1..16usize).prop_map(|(a, b, n)| Edit::Splice(a, b, n)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        if bytes.is_empty() {
            bytes.push(0);
        }
        let n = bytes.len();
        match *edit {
            Edit::Replace(i, b) => bytes[i.index(n)] = b,
            Edit::Insert(i, b) => bytes.insert(i.index(n + 1), b),
            Edit::Delete(i) => {
                bytes.remove(i.index(n));
            }
            Edit::Splice(from, to, len) => {
                let from = from.index(n);
                let run: Vec<u8> = bytes[from..(from + len).min(n)].to_vec();
                let to = to.index(n + 1);
                bytes.splice(to..to, run);
            }
            Edit::Truncate(i) => bytes.truncate(i.index(n + 1)),
        }
    }
    bytes
}

/// A seed of `target` with up to `max_edits` random edits.
fn mutated(target: &str, max_edits: usize) -> impl Strategy<Value = Vec<u8>> + use<> {
    (
        select(seeds(target)),
        prop::collection::vec(edit(), 1..=max_edits),
    )
        .prop_map(|(seed, edits)| apply(seed, &edits))
}

// --- tree files ---------------------------------------------------------

#[test]
fn every_tree_file_in_the_corpus_replays() {
    for (path, bytes) in corpus("tree_file") {
        eprintln!("{}", path.display());
        checks::tree_file(&bytes);
    }
}

/// A tree nested deeper than the parser goes, by tables or inline, is a
/// problem, not a stack overflow (the parser's recursion limit).
#[test]
fn tree_files_nested_too_deep_are_refused() {
    let mut tables = String::from("[supervisor]\nname = \"root\"\n");
    for depth in 1..=200 {
        let header = format!(
            "[[supervisor{}]]\nname = \"x\"\n",
            ".children".repeat(depth)
        );
        tables.push_str(&header);
    }
    let inline = format!(
        "[supervisor]\nname = \"root\"\nchildren = [{}{}]\n",
        "{ name = \"x\", children = [".repeat(100_000),
        "]}".repeat(100_000)
    );
    for text in [tables, inline] {
        let error =
            terraphim_agent_supervisor::tree::TreeFile::parse(Path::new(checks::TREE_PATH), &text)
                .expect_err("too deep");
        assert!(error.to_string().contains("recursion"), "{error}");
        checks::tree_file(text.as_bytes());
    }
}

/// A TOML value of any type, biased to the edges of the tree file's fields.
fn toml_value() -> impl Strategy<Value = String> {
    let words = vec![
        "\"one_for_one\"",
        "\"one_for_all\"",
        "\"rest_for_one\"",
        "\"permanent\"",
        "\"transient\"",
        "\"temporary\"",
        "\"brutal_kill\"",
        "\"infinity\"",
        "\"immediate\"",
        "\"5s\"",
        "\"250ms\"",
        "\"0s\"",
        "\"18446744073709551615s\"",
        "\"18446744073709551616ms\"",
        "\"9s9\"",
        "\"a/b\"",
        "\"\"",
        "\"../../etc/passwd\"",
        // A component file that exists, so that trees with agents parse.
        concat!("\"", env!("CARGO_MANIFEST_DIR"), "/Cargo.toml\""),
        "true",
        "[]",
        "{}",
        "[1, \"a\"]",
        "1.5",
        "nan",
        "-inf",
        "1979-05-27T07:32:00Z",
        "{ base_ms = 1, cap_ms = 9223372036854775807 }",
        "{ base_ms = 0, cap_ms = 0, jitter = true }",
        "{ failures = 1, cooldown_ms = 9223372036854775807, max_cooldown_ms = 9223372036854775807 }",
        "{ host = \"data\", guest = \"/data\" }",
        "[{ host = \"\", guest = \"\", read_only = false }]",
        "{ interval_ms = 0, timeout_ms = 9223372036854775807, threshold = 1 }",
        "{ memory_bytes = 65535, deadline_ms = 9223372036854775807 }",
        "{ env = { K = \"v\" }, args = [\"\"], network = true }",
    ];
    prop_oneof![
        3 => select(words).prop_map(str::to_owned),
        2 => select(vec![0i64, 1, -1, 65_535, 65_536, i64::MAX, i64::MIN, u32::MAX as i64 + 1])
            .prop_map(|v| v.to_string()),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => "[a-z0-9_./ -]{0,12}".prop_map(|s| format!("{s:?}")),
    ]
}

fn toml_key() -> impl Strategy<Value = &'static str> {
    select(vec![
        "name",
        "component",
        "config",
        "limits",
        "wasi",
        "strategy",
        "max_restarts",
        "time_window_ms",
        "max_children",
        "children",
        "health",
        "restart",
        "shutdown",
        "backoff",
        "breaker",
        "fuel_per_call",
        "fuel_per_lifetime",
        "memory_bytes",
        "table_elements",
        "instances",
        "state_bytes",
        "log_records_per_second",
        "log_bytes_per_second",
        "deadline_ms",
        "interval_ms",
        "timeout_ms",
        "threshold",
        "failures",
        "window_ms",
        "cooldown_ms",
        "max_cooldown_ms",
        "base_ms",
        "cap_ms",
        "jitter",
        "env",
        "args",
        "preopens",
        "network",
        "inherit_stdout",
        "host",
        "guest",
        "read_only",
        "max_restart",
        "colour",
    ])
}

fn toml_header() -> impl Strategy<Value = &'static str> {
    select(vec![
        "[supervisor]",
        "[[supervisor.children]]",
        "[[supervisor.children.children]]",
        "[[supervisor.children.children.children]]",
        "[supervisor.children.limits]",
        "[[supervisor.children.wasi.preopens]]",
        "[defaults]",
        "[defaults.limits]",
        "[defaults.health]",
        "[defaults.backoff]",
        "[defaults.breaker]",
        "[supervisor.config]",
        "[nonsense]",
    ])
}

/// A tree file made of the format's own pieces: headers, known (and a few
/// unknown) keys, values of every type.
fn tree_text() -> impl Strategy<Value = String> {
    let line = (toml_key(), toml_value()).prop_map(|(k, v)| format!("{k} = {v}"));
    let section = (
        prop::option::weighted(0.8, toml_header()),
        prop::collection::vec(line, 0..6),
    );
    (any::<bool>(), prop::collection::vec(section, 0..8)).prop_map(|(rooted, sections)| {
        let mut text = String::new();
        if rooted {
            text.push_str("[supervisor]\nname = \"root\"\n");
        }
        for (header, lines) in sections {
            if let Some(header) = header {
                text.push_str(header);
                text.push('\n');
            }
            for line in lines {
                text.push_str(&line);
                text.push('\n');
            }
        }
        text
    })
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn tree_files_of_random_text(text in "\\PC{0,200}") {
        checks::tree_file(text.as_bytes());
    }

    #[test]
    fn tree_files_of_the_formats_pieces(text in tree_text()) {
        checks::tree_file(text.as_bytes());
    }

    #[test]
    fn tree_files_edited_from_the_seeds(bytes in mutated("tree_file", 8)) {
        checks::tree_file(&bytes);
    }
}

// --- the control protocol -----------------------------------------------

#[test]
fn every_control_stream_in_the_corpus_replays() {
    for (path, bytes) in corpus("control_protocol") {
        eprintln!("{}", path.display());
        checks::control_protocol(&bytes);
    }
}

/// A control line made of JSON pieces: requests right and wrong, answers,
/// junk.
fn control_line() -> impl Strategy<Value = String> {
    let text = "[a-z/\"\\\\ \u{1}é-]{0,10}".prop_map(|s| serde_json::to_string(&s).unwrap());
    prop_oneof![
        Just("{\"op\":\"status\"}".to_owned()),
        (text.clone(), text.clone())
            .prop_map(|(a, m)| format!("{{\"op\":\"call\",\"agent\":{a},\"message\":{m}}}")),
        (toml_key(), text.clone()).prop_map(|(k, v)| format!("{{\"op\":\"status\",\"{k}\":{v}}}")),
        text.clone().prop_map(|v| format!("{{\"ok\":{v}}}")),
        text.clone()
            .prop_map(|e| format!("{{\"error\":{e},\"category\":\"Runtime\"}}")),
        "[\\[\\]{}\":,a-z0-9 ]{0,30}",
        Just(String::new()),
        Just(" \t\r".to_owned()),
    ]
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn control_streams_of_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        checks::control_protocol(&bytes);
    }

    #[test]
    fn control_streams_of_json_lines(
        limit in any::<u8>(),
        lines in prop::collection::vec(control_line(), 0..8),
        cut_last in any::<bool>(),
    ) {
        let mut bytes = vec![limit];
        for line in &lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
        }
        if cut_last {
            bytes.pop();
        }
        checks::control_protocol(&bytes);
    }

    #[test]
    fn control_streams_edited_from_the_seeds(bytes in mutated("control_protocol", 8)) {
        checks::control_protocol(&bytes);
    }
}

// --- the component loader -----------------------------------------------

#[test]
fn every_component_in_the_corpus_replays() {
    for (path, bytes) in corpus("component_loader") {
        eprintln!("{}", path.display());
        checks::component_loader(common::runtime(), &bytes);
    }
}

/// The hand-made seeds are what their names say: each reaches the error
/// it is there for, so that the fuzzers start from every branch.
#[test]
fn each_component_seed_reaches_its_branch() {
    use terraphim_agent_supervisor::LoadError::*;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/component_loader");
    let load = |name: &str| {
        let bytes = std::fs::read(dir.join(name)).expect("a seed");
        common::runtime().load_bytes(name, &bytes)
    };
    for ok in ["agent.wasm", "agent.wat", "agent_memories_and_tables.wasm"] {
        let component = load(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        // The whole life runs, as the fuzz target runs it.
        let steps = checks::run_agent(common::runtime(), &component);
        let replies: Vec<String> = steps.into_iter().map(|s| s.expect(ok)).collect();
        assert_eq!(replies[2], "pong", "{ok}: {replies:?}");
        assert_eq!(replies.len(), 10, "{ok}: {replies:?}");
    }
    let expect = |name: &str, want: fn(&terraphim_agent_supervisor::LoadError) -> bool| {
        let error = load(name).expect_err(name);
        assert!(want(&error), "{name}: {error}");
    };
    expect("binary_junk", |e| matches!(e, NotWasm { .. }));
    expect("not_wasm.txt", |e| matches!(e, NotWasm { .. }));
    expect("core_module.wasm", |e| matches!(e, CoreModule { .. }));
    expect("core_module.wat", |e| matches!(e, CoreModule { .. }));
    expect("component_header_only.wasm", |e| {
        matches!(e, WrongWorld { .. })
    });
    expect("empty_component.wat", |e| matches!(e, WrongWorld { .. }));
    expect("two_memories_in_one_module.wat", |e| {
        matches!(e, ExceedsLimits { .. })
    });
    expect("unknown_import.wat", |e| matches!(e, WrongWorld { .. }));
    expect("three_memories.wat", |e| matches!(e, ExceedsLimits { .. }));
    expect(
        "agent_other_version.wasm",
        |e| matches!(e, WrongWorld { missing, .. } if missing.contains("agent@0.2.0")),
    );
    expect(
        "agent_without_health_check.wat",
        |e| matches!(e, WrongWorld { missing, .. } if missing.contains("health-check")),
    );
}

/// The components of the seed corpus that are generated (the WAT fixture
/// in text and binary); `cargo test --test fuzz_inputs -- --ignored
/// write_component_seeds` writes them again (after a change of the
/// fixture, if the seeds should follow it).
fn generated_component_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let agent = agent_component(&Fixture::default());
    let wide = agent_component(&Fixture {
        extra_memories: 1,
        extra_tables: 2,
        initial_pages: 2,
        table_initial: 3,
    });
    let binary = |text: &str| wat::parse_str(text).expect("the fixture is valid WAT");
    vec![
        ("agent.wat", agent.clone().into_bytes()),
        ("agent.wasm", binary(&agent)),
        ("agent_memories_and_tables.wasm", binary(&wide)),
        (
            "agent_other_version.wasm",
            binary(&agent.replace("terraphim:agent/agent@0.1.0", "terraphim:agent/agent@0.2.0")),
        ),
        (
            "agent_without_health_check.wat",
            agent
                .replace("\"health-check\"", "\"health-check-x\"")
                .into_bytes(),
        ),
    ]
}

#[test]
#[ignore = "writes the generated seeds into fuzz/corpus/component_loader"]
fn write_component_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/component_loader");
    for (name, bytes) in generated_component_seeds() {
        std::fs::write(dir.join(name), bytes).expect("written");
    }
}

/// A WAT text made of component and module pieces.
fn wat_text() -> impl Strategy<Value = String> {
    let piece = select(vec![
        "(core module $m (memory 1) (func (export \"f\") unreachable))",
        "(core module $m (memory 65536))",
        "(core module $m (table 100000000 funcref))",
        "(core instance $i (instantiate $m))",
        "(import \"wasi:cli/environment@0.2.0\" (instance))",
        "(import \"x:y/z\" (instance (export \"f\" (func))))",
        "(export \"terraphim:agent/agent@0.1.0\" (instance))",
        "(type $t (func (param \"a\" string) (result string)))",
        "(component)",
        "(core func $f (canon lower (func $g)))",
        "(func $g (param \"x\" u32))",
        "(alias core export $i \"f\" (core func))",
    ]);
    (any::<bool>(), prop::collection::vec(piece, 0..6)).prop_map(|(component, pieces)| {
        let body = pieces.join("\n  ");
        if component {
            format!("(component\n  {body}\n)")
        } else {
            format!("(module {body})")
        }
    })
}

proptest! {
    #![proptest_config(cases(100))]

    #[test]
    fn components_of_random_bytes(
        header in select(vec![
            Vec::new(),
            b"\0asm\x01\0\0\0".to_vec(),
            b"\0asm\x0d\0\x01\0".to_vec(),
            b"\0asm\x0d\0\x02\0".to_vec(),
        ]),
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let bytes: Vec<u8> = header.into_iter().chain(body).collect();
        checks::component_loader(common::runtime(), &bytes);
    }

    #[test]
    fn components_of_wat_pieces(text in wat_text()) {
        checks::component_loader(common::runtime(), text.as_bytes());
    }

    #[test]
    fn components_edited_from_the_seeds(bytes in mutated("component_loader", 4)) {
        checks::component_loader(common::runtime(), &bytes);
    }
}

#[test]
fn the_valid_tree_seed_parses() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/tree_file/valid_with_agents.toml"),
    )
    .expect("the seed");
    let tree =
        terraphim_agent_supervisor::tree::TreeFile::parse(Path::new(checks::TREE_PATH), &text)
            .expect("valid");
    assert_eq!(tree.agents().len(), 2);
}
