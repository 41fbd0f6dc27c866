//! One request line from a local client of the control socket.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    // Any outcome is fine except a panic, a hang or an unbounded allocation.
    let _ = vaultguard::control::protocol::parse_request(line);
});
