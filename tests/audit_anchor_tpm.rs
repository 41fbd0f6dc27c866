//! The audit anchor against a real TPM (swtpm): the NV index extended through the
//! supervisor's adapter, and `vaultguard audit verify --tpm` telling an anchored
//! log, a power cut between append and extend, and a rewritten log apart.

mod common;

use common::{Swtpm, TempDir};
use std::process::Command;
use vaultguard::audit;
use vaultguard::audit::anchor::Anchor;
use vaultguard::supervisor::tpm_anchor::TpmAnchor;
use vaultguard::tpm::nv::DEFAULT_AUDIT_NV_INDEX;

fn verify_tpm(cfg: &std::path::Path, log: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .args(["-c", cfg.to_str().unwrap(), "audit", "verify", "--tpm"])
        .arg(log)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn append_anchored(log: &std::path::Path, anchor: &mut TpmAnchor, event: &str) {
    let h = audit::append(log, event, &[]).unwrap();
    anchor.extend(&audit::digest_of_hex(&h)).unwrap();
}

#[test]
fn verify_tpm_tells_anchored_power_cut_and_rewritten_apart() {
    let tpm = Swtpm::start();
    let dir = TempDir::new("anchor-tpm");
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, format!(r#"{{"tpm":{{"tcti":"{}"}}}}"#, tpm.tcti())).unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut anchor = TpmAnchor::new(&tpm.tcti(), DEFAULT_AUDIT_NV_INDEX);

    // Before enrolment defines the index, the refusal says where it comes from.
    let (ok, out) = verify_tpm(&cfg, &log_with_one(&log));
    assert!(!ok);
    assert!(
        out.contains("0x013fa0d1") && out.contains("vaultguard enroll"),
        "{out}"
    );

    vaultguard::tpm::Tpm::open(&tpm.tcti(), std::time::Duration::ZERO)
        .unwrap()
        .define_audit_index(DEFAULT_AUDIT_NV_INDEX)
        .unwrap();
    let (ok, out) = verify_tpm(&cfg, &log);
    assert!(ok, "{out}");
    assert!(out.contains("never extended"), "{out}");
    std::fs::remove_file(&log).unwrap();

    for e in ["lock", "unlock", "lock"] {
        append_anchored(&log, &mut anchor, e);
    }
    let (ok, out) = verify_tpm(&cfg, &log);
    assert!(ok, "{out}");
    assert!(
        out.contains("all 3 entries replay to the TPM's anchor"),
        "{out}"
    );

    // Appended, then the power went before the extend.
    audit::append(&log, "unlock", &[]).unwrap();
    let (ok, out) = verify_tpm(&cfg, &log);
    assert!(ok, "{out}");
    assert!(out.contains("power cut"), "{out}");

    // Root rewrites the history and recomputes the chain: the file alone verifies,
    // the TPM does not agree.
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if i != 1 {
            audit::append(&log, v["event"].as_str().unwrap(), &[]).unwrap();
        }
    }
    audit::verify(&log).unwrap();
    let (ok, out) = verify_tpm(&cfg, &log);
    assert!(!ok, "{out}");
    assert!(out.contains("rewritten, truncated or replaced"), "{out}");
}

/// A log of one entry at `log` (returned for chaining).
fn log_with_one(log: &std::path::Path) -> std::path::PathBuf {
    audit::append(log, "supervisor_start", &[]).unwrap();
    log.to_path_buf()
}
