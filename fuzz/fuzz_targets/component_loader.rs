//! The component loader: `Runtime::load_bytes` on arbitrary bytes (binary
//! or WAT text).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use terraphim_agent_supervisor::{Runtime, RuntimeConfig};

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    // A small pool: loading reserves nothing per instance, and a small
    // pool keeps the process's address space modest.
    RUNTIME.get_or_init(|| {
        Runtime::with_config(RuntimeConfig {
            max_instances: 4,
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| terraphim_fuzz::component_loader(runtime(), data));
