//! A `systemd-measure sign` signature file (tpm2-pcr-signature.json), as read
//! from a directory or an initrd an attacker may have written.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| bodies::signature_file(data));
