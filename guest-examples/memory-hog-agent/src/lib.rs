//! Memory-hog agent: demonstrates the host's memory limit. `grow` allocates
//! and touches 1 MiB chunks until allocation fails (Rust then aborts: a trap);
//! `grow <n>` allocates n MiB and replies `grew <n>`; `ping` → `pong`.
//! Chunks are kept until the instance is dropped.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use guest_common::{Agent, export_agent};
use std::sync::Mutex;

const MIB: usize = 1 << 20;

static CHUNKS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Allocates one MiB, writing every byte so the pages are really used.
fn grow_one() {
    CHUNKS.lock().unwrap().push(vec![0xA5; MIB]);
}

struct MemoryHog;

impl Agent for MemoryHog {
    fn handle_message(message: &str) -> Result<String, String> {
        match guest_common::split(message) {
            ("grow", None) => loop {
                grow_one();
            },
            ("grow", arg) => {
                let n: usize = guest_common::number("grow", arg)?;
                (0..n).for_each(|_| grow_one());
                Ok(format!("grew {n}"))
            }
            ("ping", None) => Ok("pong".into()),
            _ => guest_common::unknown(message),
        }
    }
}

export_agent!(MemoryHog);
