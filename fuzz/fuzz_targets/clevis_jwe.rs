//! A clevis token, compact JWE, JWK or Tang advertisement from an attacker.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| bodies::clevis_jwe(data));
