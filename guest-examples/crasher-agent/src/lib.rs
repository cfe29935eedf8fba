//! Crasher agent: demonstrates how each kind of guest failure reaches the
//! supervisor as a trap (a crash), as opposed to an `err` (an application error).
//!
//! Messages: `panic`, `unreachable`, `oob` (memory out of bounds), `stack`
//! (stack overflow), `div0` (integer divide by zero), `ping` → `pong`,
//! anything else is echoed. Config: `{"fail_start": true}` makes `start`
//! return an error, `{"panic_in_init": true}` makes `init` panic.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use core::hint::black_box;
use core::sync::atomic::{AtomicBool, Ordering};
use guest_common::{Agent, Config, export_agent};

static FAIL_START: AtomicBool = AtomicBool::new(false);

struct Crasher;

/// Recurses until the wasm stack overflows; `black_box` keeps every frame.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(black_box(depth + 1)) + black_box(1)
}

/// Executes a wasm `i32.div_u` by zero. Rust checks `/` for a zero divisor
/// (a panic), so the divisor is declared non-zero to get the raw instruction:
/// deliberately undefined behaviour whose wasm-level result is the trap.
fn divide_by_zero() -> u32 {
    let divisor = black_box(0u32);
    // SAFETY: none; this is the crash being demonstrated. `black_box` hides
    // the value, so the compiler emits a plain division that traps.
    unsafe { core::hint::assert_unchecked(divisor != 0) };
    black_box(7u32) / divisor
}

impl Agent for Crasher {
    fn init(_agent_id: &str, config: &Config) -> Result<(), String> {
        if config.flag("panic_in_init") {
            panic!("crasher: configured to panic in init");
        }
        FAIL_START.store(config.flag("fail_start"), Ordering::Relaxed);
        Ok(())
    }

    fn start() -> Result<(), String> {
        if FAIL_START.load(Ordering::Relaxed) {
            return Err("crasher: configured to fail start".into());
        }
        Ok(())
    }

    fn handle_message(message: &str) -> Result<String, String> {
        match message {
            "panic" => panic!("crasher: asked to panic"),
            "unreachable" => core::arch::wasm32::unreachable(),
            "oob" => {
                let address = black_box(0xFFFF_FFF0usize) as *const u64;
                // SAFETY: none; the read is far beyond linear memory and traps.
                let value = unsafe { address.read_volatile() };
                Ok(value.to_string())
            }
            "stack" => Ok(recurse(0).to_string()),
            "div0" => Ok(divide_by_zero().to_string()),
            "ping" => Ok("pong".into()),
            _ => Ok(message.into()),
        }
    }
}

export_agent!(Crasher);
