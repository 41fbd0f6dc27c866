//! `vaultguard policy predict` against a real (software) TPM: swtpm's PCRs are
//! extended with the records of a real OVMF event log (as the firmware and the EFI
//! stub extended them in that guest), so the log replays; the prediction for a
//! staged initrd is then checked against the PCRs of a "reboot" (swtpm power
//! cycle, the same records extended again with the new initrd's digest).

mod common;

use common::{vaultguard_bin, Swtpm, TempDir};
use std::path::Path;
use std::process::Command;
use vaultguard::encoding::hex_encode;
use vaultguard::tpm::eventlog::{self, TAG_LINUX_INITRD};
use vaultguard::tpm::policy::Bank;

const LOG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/src/tpm/testdata/ovmf-direct-boot.eventlog"
);

/// Extend the TPM as the firmware did for `log`, with `initrd_digest` for the
/// initrd record when given.
fn boot(sw: &mut Swtpm, log: &eventlog::EventLog, initrd_digest: Option<&[u8]>) {
    for e in log.events.iter().filter(|e| e.extends()) {
        let mut d = e.digest(Bank::Sha256).unwrap().to_vec();
        if e.tag_id() == Some(TAG_LINUX_INITRD) {
            if let Some(n) = initrd_digest {
                d = n.to_vec();
            }
        }
        sw.tool(
            "tpm2_pcrextend",
            &[&format!("{}:sha256={}", e.pcr, hex_encode(&d))],
        );
    }
}

fn pcr(sw: &mut Swtpm, n: u32) -> String {
    // tpm2_pcrread prints `  sha256:\n    N : 0xHEX`.
    let out = sw.tool("tpm2_pcrread", &[&format!("sha256:{n}")]);
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("0x").expect("tpm2_pcrread output");
    text[at + 2..at + 66].to_ascii_lowercase()
}

fn predict(cfg: &Path, args: &[&str]) -> std::process::Output {
    Command::new(vaultguard_bin())
        .arg("-c")
        .arg(cfg)
        .args(["policy", "predict", "--event-log", LOG])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn predicted_pcrs_for_a_staged_initrd_equal_the_pcrs_after_the_reboot() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("predict");
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, format!(r#"{{"tpm":{{"tcti":"{}"}}}}"#, sw.tcti())).unwrap();
    let log = eventlog::parse(&std::fs::read(LOG).unwrap()).unwrap();
    boot(&mut sw, &log, None);
    let staged = dir.path().join("initrd.img-new");
    std::fs::write(&staged, b"a staged initramfs, not the booted one").unwrap();

    let out = predict(&cfg, &["--initrd", staged.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bank"], "sha256");
    let pcrs = v["pcrs"].as_object().unwrap();
    // Default: 4, 7, 9, 11 as far as the log has them (11 is not in this log).
    assert_eq!(
        pcrs.keys().map(String::as_str).collect::<Vec<_>>(),
        ["4", "7", "9"]
    );
    let (p4, p7, p9) = (pcr(&mut sw, 4), pcr(&mut sw, 7), pcr(&mut sw, 9));
    assert_eq!(pcrs["4"], p4.as_str());
    assert_eq!(pcrs["7"], p7.as_str());
    assert_ne!(pcrs["9"], p9.as_str());

    // Reboot into the staged initrd: the same firmware records, the new digest.
    sw.restart();
    let digest = Bank::Sha256.hash(&[&std::fs::read(&staged).unwrap()]);
    boot(&mut sw, &log, Some(&digest));
    assert_eq!(pcrs["9"], pcr(&mut sw, 9).as_str());
    assert_eq!(pcrs["7"], pcr(&mut sw, 7).as_str());
    assert_eq!(pcrs["4"], pcr(&mut sw, 4).as_str());

    // Text form names each PCR and whether it changes (swtpm's port moved).
    std::fs::write(&cfg, format!(r#"{{"tpm":{{"tcti":"{}"}}}}"#, sw.tcti())).unwrap();
    let out = predict(&cfg, &["--pcrs", "7", "--initrd", staged.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("PCR 7 sha256:") && text.contains("(unchanged)"),
        "{out:?}"
    );
}

#[test]
fn a_log_that_does_not_replay_is_refused_naming_the_pcr() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("predict");
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, format!(r#"{{"tpm":{{"tcti":"{}"}}}}"#, sw.tcti())).unwrap();
    let log = eventlog::parse(&std::fs::read(LOG).unwrap()).unwrap();
    boot(&mut sw, &log, None);
    // Something extended PCR 9 outside the log.
    sw.tool(
        "tpm2_pcrextend",
        &[&format!("9:sha256={}", "11".repeat(32))],
    );
    let out = predict(&cfg, &["--initrd", LOG, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("does not replay: PCR 9"), "{err}");
    assert!(out.stderr.is_empty() || !String::from_utf8_lossy(&out.stderr).contains("panick"));
    // And a log that is not a log at all: one line, no prediction.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"\x00\x01not a log").unwrap();
    let out = Command::new(vaultguard_bin())
        .arg("-c")
        .arg(&cfg)
        .args(["policy", "predict", "--event-log", junk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("event log"), "{err}");
}
