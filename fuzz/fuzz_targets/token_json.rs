//! A LUKS2 token's JSON, as read from a header an attacker may have written.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| bodies::token_json(data));
