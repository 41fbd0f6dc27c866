//! The configuration file, then rd.vaultguard.* options from a kernel command line
//! (the input's part after the first NUL byte).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| bodies::config(data));
