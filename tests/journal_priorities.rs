//! Journald priorities on the lines the built binary writes, as systemd would
//! see them: stdout and stderr on one stream (a file standing in for journald's
//! socket) and `$JOURNAL_STREAM` naming that stream's `dev:ino`. A config error is
//! `<3>`, a config warning `<4>`; `attach --test` against a LUKS2 image whose TPM
//! refuses (PCR 7 changed after enrolment, key file fallback) tags the refusal
//! `<4>` and the success `<6>`. With `$JOURNAL_STREAM` naming another file (stderr
//! redirected under a service), nothing is tagged.

mod common;

use common::{luks_image, run, vaultguard_bin, Swtpm, TempDir};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PASS: &str = "correct horse battery staple";

fn dev_ino(p: &Path) -> String {
    let m = std::fs::metadata(p).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// Run the binary with stdout and stderr on `out`, `$JOURNAL_STREAM` set to
/// `journal`'s `dev:ino`; the lines written, and the exit code.
fn run_logged(dir: &Path, journal_is_out: bool, args: &[&str]) -> (Vec<String>, i32) {
    let out = dir.join("stream");
    let f = File::create(&out).unwrap();
    let elsewhere = dir.join("elsewhere");
    File::create(&elsewhere).unwrap();
    let journal = if journal_is_out { &out } else { &elsewhere };
    let status = Command::new("setsid")
        .arg("--wait")
        .arg(vaultguard_bin())
        .args(args)
        .env("JOURNAL_STREAM", dev_ino(journal))
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    (
        text.lines().map(str::to_string).collect(),
        status.code().unwrap(),
    )
}

fn config(dir: &Path, tcti: &str, extra_vault: &str) -> PathBuf {
    let p = dir.join("config.json");
    let d = dir.display();
    std::fs::write(
        &p,
        format!(
            r#"{{"vault": {{"state_path": "{d}/state.json"{extra_vault}}},
  "tpm": {{"tcti": "{tcti}", "timeout": 5}},
  "auth": {{"state_path": "{d}/lockout.json"}},
  "control": {{"socket": "{d}/control.sock"}},
  "audit": {{"path": "{d}/audit.jsonl", "tpm_anchor": false}}}}"#
        ),
    )
    .unwrap();
    p
}

fn line_starting<'a>(lines: &'a [String], prefix: &str, containing: &str) -> Option<&'a String> {
    lines
        .iter()
        .find(|l| l.starts_with(prefix) && l.contains(containing))
}

#[test]
fn config_errors_are_3_and_warnings_4_only_on_the_named_stream() {
    let dir = TempDir::new("jp-config");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"vault\": ").unwrap();
    let bad = bad.to_str().unwrap();
    let (lines, code) = run_logged(dir.path(), true, &["-c", bad, "config"]);
    assert_ne!(code, 0, "{lines:?}");
    assert!(
        lines.len() == 1 && lines[0].starts_with("<3>") && lines[0].contains("bad.json"),
        "{lines:?}"
    );

    let cfg = config(
        dir.path(),
        "device:/nonexistent",
        r#", "check_interval": 30"#,
    );
    let cfg = cfg.to_str().unwrap();
    let args = ["-c", cfg, "config", "--get", "vault.name"];
    let (lines, code) = run_logged(dir.path(), true, &args);
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        line_starting(&lines, "<4>", "vault.check_interval does nothing").is_some(),
        "{lines:?}"
    );

    // The variable inherited, but stderr is another file: today's plain lines.
    let (lines, _) = run_logged(dir.path(), false, &["-c", bad, "config"]);
    assert!(lines[0].starts_with("vaultguard: "), "{lines:?}");
    let (lines, _) = run_logged(dir.path(), false, &args);
    assert!(
        line_starting(&lines, "vaultguard: warning: ", "check_interval").is_some(),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| !l.starts_with('<')), "{lines:?}");
}

#[test]
fn a_tpm_refusal_is_a_warning_and_the_fallback_success_info() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("jp-attach");
    let img = luks_image(dir.path(), PASS);
    let pass = dir.path().join("pass");
    std::fs::write(&pass, PASS).unwrap();
    let cfg = config(dir.path(), &sw.tcti(), "");
    run(Command::new(vaultguard_bin())
        .arg("-c")
        .arg(&cfg)
        .args(["enroll", "--unlock-passphrase-file"])
        .arg(&pass)
        .arg(&img)
        .stdin(Stdio::null()));
    // What an update of the firmware's Secure Boot state does: the TPM refuses.
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000001"],
    );
    let args = [
        "-c",
        cfg.to_str().unwrap(),
        "attach",
        "--test",
        "vgtest",
        img.to_str().unwrap(),
        pass.to_str().unwrap(),
        "password-cache=no,headless",
    ];
    let (lines, code) = run_logged(dir.path(), true, &args);
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        line_starting(
            &lines,
            "<4>vaultguard: TPM unlock of vgtest not possible",
            "PCR 7"
        )
        .is_some(),
        "{lines:?}"
    );
    assert!(
        line_starting(&lines, "<6>vaultguard: the key file opens keyslot 0", "").is_some(),
        "{lines:?}"
    );
    assert!(
        line_starting(&lines, "<4>vaultguard: the TPM would not", "").is_some(),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l.starts_with('<')), "{lines:?}");

    let (lines, code) = run_logged(dir.path(), false, &args);
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        line_starting(&lines, "vaultguard: TPM unlock of vgtest not possible", "").is_some(),
        "{lines:?}"
    );
    assert!(
        line_starting(&lines, "vaultguard: the key file opens keyslot 0", "").is_some(),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| !l.starts_with('<')), "{lines:?}");
}
