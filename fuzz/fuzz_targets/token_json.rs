//! A LUKS2 token's JSON, as read from a header an attacker may have written.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vaultguard::luks::token::Tpm2Token;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(t) = Tpm2Token::from_json(&v) {
        // What we accept we must write back so that it reads the same.
        let again = Tpm2Token::from_json(&t.to_json()).expect("a written token parses");
        assert_eq!(again.to_json(), t.to_json());
    }
});
