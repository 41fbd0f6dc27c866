//! The firmware's TCG event log (binary_bios_measurements) and a PE image to hash.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| bodies::eventlog(data));
