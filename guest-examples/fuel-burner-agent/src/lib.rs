//! Fuel-burner agent: demonstrates interrupting runaway compute (fuel or
//! epoch deadlines). `burn` loops forever without calling the host; `ping` → `pong`.

wit_bindgen::generate!({ world: "supervised-agent", path: "../../wit" });

use core::hint::black_box;
use guest_common::{Agent, export_agent};

struct FuelBurner;

impl Agent for FuelBurner {
    fn handle_message(message: &str) -> Result<String, String> {
        match message {
            "burn" => {
                let mut x = 0u64;
                loop {
                    x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "ping" => Ok("pong".into()),
            _ => guest_common::unknown(message),
        }
    }
}

export_agent!(FuelBurner);
