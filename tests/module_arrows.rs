//! The edge modules do not import each other (STYLE: "arrows point down"): `tpm`
//! takes its own input type and `luks` its own token vocabulary; `boot`, the flow,
//! converts. A source-level check, because the compiler accepts cycles inside a
//! crate.

use std::path::Path;

/// Lines of the `.rs` files under `dir` that name one of `forbidden`.
fn offending_lines(dir: &str, forbidden: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    if forbidden.iter().any(|f| code.contains(f)) {
                        out.push(format!("{}:{}: {}", p.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn tpm_does_not_import_luks() {
    let bad = offending_lines("src/tpm", &["crate::luks", "luks::token"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn luks_does_not_import_tpm() {
    let bad = offending_lines("src/luks", &["crate::tpm", "tpm::policy"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn boot_and_the_supervisor_meet_only_in_handoff() {
    // The initrd → supervisor hand-off (audit import path, state-file hint, the
    // initramfs test, dm UUID → LUKS UUID) lives in src/handoff.rs.
    let bad = offending_lines(
        "src/boot",
        &["crate::supervisor", "initrd-release", "CRYPT-LUKS"],
    );
    assert!(bad.is_empty(), "{bad:#?}");
}
