//! A Tang server's HTTP response, from a server an attacker runs.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| bodies::http_response(data));
