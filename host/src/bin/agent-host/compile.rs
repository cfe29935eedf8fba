//! `agent-host compile`: compile components ahead of time into the compile
//! cache, so that `run` starts them without compiling.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use terraphim_agent_supervisor::tree::TreeFile;

use crate::cache_arg::CacheArgs;
use crate::problems::report;
use crate::validate::{describe, is_tree_file};
use crate::{CliResult, EXIT_FAILURE};

pub const LONG_ABOUT: &str = "\
Compile agent components ahead of time into the compile cache.

Compiling a component to native code is the slow part of starting it: about
12 seconds for an 18 MB Python agent. `run`, `call` and `validate` keep what
they compile in the compile cache and load it from there next time, in a
fraction of a second; `compile` fills the cache beforehand, for the
components given and for every component a tree file (.toml) names.

The cache is $XDG_CACHE_HOME/agent-host/compiled (else
~/.cache/agent-host/compiled), or --cache-dir DIR; it is created mode 0700.
An entry is keyed by the SHA-256 of the component and by the host's engine
(wasmtime version, settings, CPU), and carries a checksum: an entry of
another build, one changed on disk or one not written by this user is never
loaded, only compiled again. Deleting the directory is always safe.

One line per component: `compiled: PATH (SECONDS s)` or `cached: PATH`
on stdout, or `error: ...` on stderr.

Exit status:
  0  every component is in the cache
  1  some file could not be compiled, or there is no cache to fill
  2  usage error";

#[derive(Debug, Args)]
pub struct CompileArgs {
    /// Agent components (`.wasm` or `.wat`) and tree files (`.toml`) whose components to compile.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

pub fn run(args: &CompileArgs) -> CliResult {
    let runtime = args.cache.runtime()?;
    let Some(dir) = runtime.config().compile_cache.clone() else {
        return Err("there is no compile cache to fill (--no-cache, or no usable cache directory: give --cache-dir DIR)".into());
    };
    let mut components = Vec::new();
    let mut failed = 0usize;
    for path in &args.paths {
        if !is_tree_file(path) {
            components.push(path.clone());
            continue;
        }
        match TreeFile::load(path) {
            Ok(tree) => {
                components.extend(tree.agents().into_iter().map(|(_, a)| a.component.clone()))
            }
            Err(e) => {
                report(&e);
                failed += 1;
            }
        }
    }
    components.sort();
    components.dedup();
    for path in &components {
        let t0 = Instant::now();
        match runtime.load_file(path) {
            Ok(component) if component.from_cache() => println!("cached: {}", path.display()),
            Ok(_) => println!(
                "compiled: {} ({:.1} s)",
                path.display(),
                t0.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("error: {}", describe(path, &e));
                failed += 1;
            }
        }
    }
    if failed == 0 {
        eprintln!("compile cache: {}", dir.display());
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(EXIT_FAILURE))
    }
}
