//! Tree files: `TreeFile::parse` on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| terraphim_fuzz::tree_file(data));
