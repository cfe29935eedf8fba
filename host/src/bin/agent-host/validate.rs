//! `agent-host validate`: load each file as an agent component and say
//! whether it implements the `supervised-agent` world.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use terraphim_agent_supervisor::tree::{TreeFile, TreeNode, TreeSupervisor};
use terraphim_agent_supervisor::{LoadError, Runtime};

use crate::cache_arg::CacheArgs;
use crate::problems::report;
use crate::{CliResult, EXIT_FAILURE};

/// The world every agent component must implement.
const WORLD: &str = "terraphim:agent/supervised-agent@0.1.1";

pub const LONG_ABOUT: &str = "\
Check agent components and tree files.

A component (.wasm binary or .wat text) must implement the agent world
terraphim:agent/supervised-agent@0.1.1 (or a component built against
a compatible version, 0.1.x): it is compiled, type-checked against
the world and linked against the host's imports, as a supervisor does before
starting it. One line per file: `ok: PATH implements ...` on stdout, or
`error: PATH ...` on stderr with the reason (not WebAssembly, a core module
rather than a component, a missing or mistyped export, an import the host
does not provide, ...).

A tree file (.toml) is read and checked as `agent-host run` would: its
syntax, its field names, every value, and each component it names (compiled
and checked against the world). Every problem is printed on its own line,
`error: FILE: `FIELD`: what is wrong and what to write instead`.

Exit status:
  0  every file is valid
  1  some file is not
  2  usage error";

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Agent components (`.wasm` binaries or `.wat` text) and tree files (`.toml`) to check.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Is `path` a tree file (`.toml`)?
pub fn is_tree_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("toml"))
}

/// The reason `path` failed to load, on one line, starting with the path.
pub fn describe(path: &Path, error: &LoadError) -> String {
    match error {
        // The other variants' messages already start with the path.
        LoadError::Io { source, .. } => {
            format!("{}: cannot read the file: {source}", path.display())
        }
        other => one_line(&other.to_string()),
    }
}

/// The first line of `text`, plus the position of a WAT parse error (whose
/// message goes on with a source snippet: `--> <anon>:LINE:COLUMN`, ...).
fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default().trim_end();
    let position = text.lines().find_map(|line| {
        let mut parts = line.trim().strip_prefix("--> ")?.rsplitn(3, ':');
        let column = parts.next()?;
        let line = parts.next()?;
        Some(format!(" (line {line}, column {column})"))
    });
    format!("{first}{}", position.unwrap_or_default())
}

/// Load and check the tree file at `path`, printing every problem; whether
/// it is valid.
fn check_tree(runtime: &Runtime, path: &Path) -> bool {
    let checked = TreeFile::load(path).and_then(|tree| tree.check(runtime).map(|_| tree));
    match checked {
        Ok(tree) => {
            let (agents, supervisors) = count(&tree.root);
            println!(
                "ok: {}: a tree of {agents} agent{} under {supervisors} supervisor{}",
                path.display(),
                if agents == 1 { "" } else { "s" },
                if supervisors == 1 { "" } else { "s" },
            );
            true
        }
        Err(e) => {
            report(&e);
            false
        }
    }
}

/// (agents, supervisors) of the tree under `s`, `s` included.
fn count(s: &TreeSupervisor) -> (usize, usize) {
    s.children
        .iter()
        .fold((0, 1), |(agents, supervisors), child| match child {
            TreeNode::Agent(_) => (agents + 1, supervisors),
            TreeNode::Supervisor(nested) => {
                let (a, s) = count(nested);
                (agents + a, supervisors + s)
            }
        })
}

pub fn run(args: &ValidateArgs) -> CliResult {
    let runtime = args.cache.runtime()?;
    let mut failed = 0usize;
    for path in &args.paths {
        if is_tree_file(path) {
            if !check_tree(&runtime, path) {
                failed += 1;
            }
            continue;
        }
        match runtime.load_file(path) {
            Ok(_) => println!("ok: {} implements {WORLD}", path.display()),
            Err(e) => {
                eprintln!("error: {}", describe(path, &e));
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}
