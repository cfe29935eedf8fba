//! `--no-cache` and `--cache-dir`: where the commands that load components
//! keep their compiled code (the runtime's compile cache).

use std::path::PathBuf;

use clap::Args;
use terraphim_agent_supervisor::{Runtime, RuntimeConfig, RuntimeError};

use crate::output::stderr_line;

/// The compile cache options of `run`, `call`, `validate` and `compile`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Compile every component now: neither read nor write the compile cache.
    #[arg(long)]
    no_cache: bool,
    /// The compile cache's directory (default: $XDG_CACHE_HOME/agent-host/compiled,
    /// else ~/.cache/agent-host/compiled). Created mode 0700.
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    /// The WASM runtime, with the compile cache these options choose. A
    /// default cache directory that cannot be used is skipped with a
    /// warning; one given with `--cache-dir` is an error.
    pub fn runtime(&self) -> Result<Runtime, RuntimeError> {
        let with = |compile_cache| {
            Runtime::with_config(RuntimeConfig {
                compile_cache,
                ..RuntimeConfig::default()
            })
        };
        if self.no_cache {
            return with(None);
        }
        if let Some(dir) = &self.cache_dir {
            return with(Some(dir.clone()));
        }
        match RuntimeConfig::default_cache_dir() {
            Some(dir) => with(Some(dir)).or_else(|e| {
                stderr_line!("warning: compiling without a cache: {e}");
                with(None)
            }),
            None => with(None),
        }
    }
}
