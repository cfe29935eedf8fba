//! Tree files for the subcommands: their problems on stderr, one `error:
//! FILE: `FIELD`: what to do` line each, followed by the line of the file
//! when the parser knows it; and their trees started.

use std::path::Path;
use std::sync::Arc;

use terraphim_agent_supervisor::tree::{TreeError, TreeFile, TreeProblem};
use terraphim_agent_supervisor::{RunningTree, Runtime, StateStore};

use crate::output::stderr_line;

/// Why a tree file's tree is not running.
pub enum NotStarted {
    /// The file has problems; they were printed.
    Reported,
    /// It did not start; the message says why.
    Failed(String),
}

/// Load the tree file at `path`, printing its problems.
pub fn load(path: &Path) -> Result<TreeFile, NotStarted> {
    TreeFile::load(path).map_err(|e| {
        report(&e);
        NotStarted::Reported
    })
}

/// Compile and start the tree of `file` with its agents' state in `state`,
/// printing the file's problems.
pub async fn start(
    file: &TreeFile,
    runtime: &Runtime,
    state: Arc<dyn StateStore>,
) -> Result<RunningTree, NotStarted> {
    let root = file.build_with_state(runtime, state).map_err(|e| {
        report(&e);
        NotStarted::Reported
    })?;
    RunningTree::start(root)
        .await
        .map_err(|e| NotStarted::Failed(format!("the tree did not start: {e}")))
}

/// Print every problem of a tree file.
pub fn report(error: &TreeError) {
    for problem in &error.problems {
        stderr_line!("error: {problem}");
        if let Some(snippet) = source_line(problem) {
            stderr_line!("{snippet}");
        }
    }
}

/// `    3 | strategy = "one_for_some"` for a problem on line 3.
fn source_line(problem: &TreeProblem) -> Option<String> {
    let n = problem.line?;
    let text = std::fs::read_to_string(&problem.file).ok()?;
    let line = text.lines().nth(n.checked_sub(1)?)?.trim_end();
    Some(format!("{n:>5} | {line}"))
}
