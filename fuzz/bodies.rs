//! The fuzz targets' bodies, in one place for two runners: the libFuzzer targets in
//! `fuzz_targets/` (cargo fuzz, nightly, in CI for a bounded time) and
//! `tests/fuzz_corpus.rs`, which replays every committed input in `corpus/` and
//! `regressions/` through the same bodies on stable, in the ordinary `cargo test`.
//! A body's only failure is a panic (or a hang, or an unbounded allocation).
#![allow(dead_code)] // each fuzz target uses one body

/// One request line from a local client of the control socket.
pub fn control_request(line: &[u8]) {
    let _ = vaultguard::control::protocol::parse_request(line);
}

/// A LUKS2 token's JSON, as read from a header an attacker may have written. What
/// is accepted must write back so that it reads the same.
pub fn token_json(data: &[u8]) {
    use vaultguard::luks::token::Tpm2Token;
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(t) = Tpm2Token::from_json(&v) {
        let again = Tpm2Token::from_json(&t.to_json()).expect("a written token parses");
        assert_eq!(again.to_json(), t.to_json());
    }
}

/// The configuration file, then rd.vaultguard.* options from a kernel command line
/// (the input's part after the first NUL byte).
pub fn config(data: &[u8]) {
    use vaultguard::config::Config;
    let (json, cmdline) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(json) = std::str::from_utf8(json) else {
        return;
    };
    let mut cfg = Config::from_json(json, "fuzz").unwrap_or_default();
    let _ = cfg.apply_cmdline(&String::from_utf8_lossy(cmdline));
    let _ = cfg.validate();
}

/// A `systemd-measure sign` signature file (`tpm2-pcr-signature.json`), as read
/// from /etc/systemd, /run/systemd or the initrd's /.extra. What is accepted must
/// write back so that it reads the same, and looking a signature up never panics.
pub fn signature_file(data: &[u8]) {
    use vaultguard::tpm::policy::Bank;
    use vaultguard::tpm::signed::SignatureFile;
    let Ok(f) = SignatureFile::parse(data) else {
        return;
    };
    let again = SignatureFile::parse(f.to_json_string().as_bytes()).expect("a written file parses");
    for bank in [Bank::Sha1, Bank::Sha256, Bank::Sha384, Bank::Sha512] {
        assert_eq!(again.entries(bank), f.entries(bank));
        for e in f.entries(bank) {
            assert!(f.find(bank, &e.pcrs, &e.pkfp, &e.pol).is_some());
            let _ = f.explain_miss(bank, &e.pcrs, &[0; 32]);
        }
    }
}

/// A clevis LUKS2 token (or a bare compact JWE, or a Tang advertisement), as an
/// attacker who can write the header or answer for a Tang server shapes it:
/// token, JWE, JWK and advertisement parsers, and the pin readers on top.
pub fn clevis_jwe(data: &[u8]) {
    use vaultguard::clevis::jwe::Jwe;
    use vaultguard::clevis::{jwk::EcJwk, sss::SssPin, tang, ClevisToken};
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(j) = Jwe::from_compact(s) {
            let _ = SssPin::from_jwe(&j);
            let _ = tang::TangPin::from_jwe(&j);
        }
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(t) = ClevisToken::from_json(0, &v) {
        let _ = t.jwe.pin();
        let _ = tang::TangPin::from_jwe(&t.jwe);
        if let Ok(s) = SssPin::from_jwe(&t.jwe) {
            for c in &s.children {
                let _ = Jwe::from_compact(c);
            }
        }
    }
    let _ = EcJwk::from_json(&v);
    if let Ok(keys) = tang::adv_keys(&v) {
        let known: Vec<EcJwk> = keys
            .iter()
            .filter_map(|k| EcJwk::from_json(k).ok())
            .collect();
        let _ = tang::verify_advertisement(&v, &known, &[]);
    }
}

/// A Tang server's HTTP response, complete or cut anywhere.
pub fn http_response(data: &[u8]) {
    use vaultguard::clevis::http::{parse_response, MAX_RESPONSE};
    for closed in [false, true] {
        if let Ok(Some(r)) = parse_response(data, closed) {
            assert!(r.body.len() <= MAX_RESPONSE && (200..300).contains(&r.status));
        }
    }
}

/// A target's name (that of its `fuzz_targets/` file and corpus folder) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: [Target; 7] = [
    ("control_request", control_request),
    ("token_json", token_json),
    ("config", config),
    ("eventlog", eventlog),
    ("signature_file", signature_file),
    ("clevis_jwe", clevis_jwe),
    ("http_response", http_response),
];

/// The firmware's TCG event log (binary_bios_measurements), which root or a
/// firmware bug may have written: parsed, replayed, described, diffed and used for
/// a prediction, never a panic. The input's first byte also goes through the PE
/// hasher as an image of the rest.
pub fn eventlog(data: &[u8]) {
    use vaultguard::tpm::eventlog;
    use vaultguard::tpm::policy::Bank;
    let _ = eventlog::authenticode_digest(Bank::Sha256, data);
    let Ok(log) = eventlog::parse(data) else {
        return;
    };
    for bank in [Bank::Sha1, Bank::Sha256] {
        let _ = log.replay(bank);
        let lists: std::collections::BTreeMap<u32, _> = log
            .pcrs()
            .into_iter()
            .map(|p| (p, log.digest_list(bank, p)))
            .collect();
        let changes = eventlog::Changes {
            initrd: Some(data.to_vec()),
            kernel: Some(data.to_vec()),
            load_options: Some("x".into()),
        };
        if let Ok(new) = log.with_changes(bank, &changes) {
            let now = new
                .pcrs()
                .into_iter()
                .map(|p| (p, new.digest_list(bank, p)))
                .collect();
            for d in eventlog::diff(&lists, &now) {
                let _ = d.to_string();
            }
        }
    }
}
