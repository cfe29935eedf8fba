//! The control socket's protocol: a byte stream read as request lines,
//! parsed, answered and decoded back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| terraphim_fuzz::control_protocol(data));
