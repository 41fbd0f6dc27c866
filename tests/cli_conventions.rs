//! The operator CLI as scripts see it, run as the built binary: -h/--version, exit
//! statuses, `--json` failures, `enroll [DEVICE]` with `--unlock-key-file` and no
//! terminal, and `unlock --test` for a TPM token, a key file, a passphrase, a
//! recovery key and a PCR mismatch (LUKS2 image in a file, swtpm). Needs root
//! (the key files, swtpm) and swtpm/cryptsetup installed; fails without them.

mod common;

use common::{luks_image, run, vaultguard_bin, Swtpm, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PASS: &str = "correct horse battery staple";

/// A configuration whose every path is in `dir` and whose TPM is `tcti`.
fn config(dir: &Path, tcti: &str, extra_vault: &str) -> PathBuf {
    let p = dir.join("config.json");
    let d = dir.display();
    std::fs::write(
        &p,
        format!(
            r#"{{
  "vault": {{"state_path": "{d}/state.json"{extra_vault}}},
  "tpm": {{"tcti": "{tcti}", "timeout": 5}},
  "auth": {{"state_path": "{d}/lockout.json"}},
  "control": {{"socket": "{d}/control.sock"}},
  "audit": {{"path": "{d}/audit.jsonl", "tpm_anchor": false}}
}}"#
        ),
    )
    .unwrap();
    p
}

/// Run vaultguard with no terminal at all (a new session: no controlling tty;
/// standard input is `input` or /dev/null).
fn vg(args: &[&str], input: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("setsid");
    cmd.arg("--wait")
        .arg(vaultguard_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("setsid and the vaultguard binary");
    if let Some(i) = input {
        child.stdin.take().unwrap().write_all(i).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The one JSON object `--json` prints.
fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(out(o).trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}\n{}", out(o), err(o)))
}

#[test]
fn help_and_version_at_the_top_level() {
    for flag in ["-h", "--help"] {
        let o = vg(&[flag], None);
        assert_eq!(code(&o), 0, "{flag}: {}", err(&o));
        assert!(out(&o).contains("Usage: vaultguard"), "{flag}: {}", out(&o));
        assert!(out(&o).contains("enroll"), "{}", out(&o));
    }
    let o = vg(&["enroll", "-h"], None);
    assert_eq!(code(&o), 0);
    assert!(out(&o).contains("--unlock-key-file"), "{}", out(&o));
    let o = vg(&["--version"], None);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).starts_with(&format!("vaultguard {}", env!("CARGO_PKG_VERSION"))),
        "{}",
        out(&o)
    );
    let v = json(&vg(&["--json", "--version"], None));
    assert_eq!(v["vaultguard"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn usage_errors_exit_2_and_print_json_when_asked() {
    let o = vg(&["frobnicate"], None);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("frobnicate"), "{}", err(&o));
    let o = vg(&["--json", "frobnicate"], None);
    assert_eq!(code(&o), 2);
    let v = json(&o);
    assert_eq!(
        (v["success"].clone(), v["exit"].clone()),
        (false.into(), 2.into())
    );
    assert!(v["error"].as_str().unwrap().contains("frobnicate"), "{v}");
}

#[test]
fn audit_commands_print_one_json_object_with_json() {
    let dir = TempDir::new("auditjson");
    let log = dir.path().join("audit.jsonl");
    std::fs::write(&log, "").unwrap();
    let log = log.to_str().unwrap();
    let v = json(&vg(&["--json", "audit", "verify", log], None));
    assert_eq!(v["success"], true);
    assert!(v["message"].as_str().unwrap().contains("intact"), "{v}");
    let o = vg(
        &["--json", "audit", "verify", "/nonexistent/audit.jsonl"],
        None,
    );
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(
        (v["success"].clone(), v["exit"].clone()),
        (false.into(), 1.into())
    );
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/audit.jsonl"));
}

#[test]
fn status_without_a_supervisor_exits_3_with_json() {
    let dir = TempDir::new("nosup");
    let cfg = config(dir.path(), "device:/nonexistent", "");
    let cfg = cfg.to_str().unwrap();
    let o = vg(&["-c", cfg, "status", "--json"], None);
    assert_eq!(code(&o), 3, "{}", err(&o));
    let v = json(&o);
    assert_eq!(v["success"], false);
    assert_eq!(v["exit"], 3);
    assert!(v["error"].as_str().unwrap().contains("control.sock"), "{v}");
    let o = vg(&["-c", cfg, "lock"], None);
    assert_eq!(code(&o), 3, "{}", err(&o));
    assert!(err(&o).contains("vaultguard supervise"), "{}", err(&o));
}

#[test]
fn detach_of_a_name_that_is_not_open_says_so() {
    let dir = TempDir::new("detach");
    let cfg = config(dir.path(), "device:/nonexistent", "");
    let cfg = cfg.to_str().unwrap();
    let o = vg(&["-c", cfg, "detach", "nosuch"], None);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("nosuch is not open"), "{}", out(&o));
    assert!(!out(&o).contains("nosuch closed"), "{}", out(&o));
    let v = json(&vg(&["-c", cfg, "detach", "--json", "nosuch"], None));
    assert_eq!(v["was_open"], false);
}

#[test]
fn configuration_errors_name_the_key_and_what_was_expected() {
    let dir = TempDir::new("cfgerr");
    let p = dir.path().join("bad.json");
    std::fs::write(&p, r#"{"vault":{"auto_lock_timeout":"30"}}"#).unwrap();
    let o = vg(&["-c", p.to_str().unwrap(), "config"], None);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains(r#"vault.auto_lock_timeout: expected a number, got "30""#),
        "{}",
        err(&o)
    );
    let v = json(&vg(&["--json", "-c", p.to_str().unwrap(), "config"], None));
    assert_eq!(v["exit"], 1);

    std::fs::write(&p, r#"{"control":{"socket":"run/control.sock"}}"#).unwrap();
    let o = vg(&["-c", p.to_str().unwrap(), "config"], None);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("control.socket") && err(&o).contains("relative"),
        "{}",
        err(&o)
    );

    std::fs::write(&p, r#"{"vault":{"check_interval":30}}"#).unwrap();
    let o = vg(&["-c", p.to_str().unwrap(), "config"], None);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(
        err(&o).matches("vault.check_interval").count(),
        1,
        "{}",
        err(&o)
    );
    assert!(err(&o).contains("event-driven"), "{}", err(&o));
}

#[test]
fn attach_without_device_mapper_says_so() {
    // This host's kernel offers no device-mapper to the tests; the message must
    // say that, not "name is invalid or still in use".
    assert!(
        !vaultguard::luks::has_device_mapper(),
        "this test needs a host without a working device-mapper"
    );
    let dir = TempDir::new("nodm");
    let img = luks_image(dir.path(), PASS);
    let key = dir.path().join("pass");
    std::fs::write(&key, PASS).unwrap();
    let cfg = config(dir.path(), "device:/nonexistent", "");
    let o = vg(
        &[
            "-c",
            cfg.to_str().unwrap(),
            "attach",
            "vgnodm",
            img.to_str().unwrap(),
            key.to_str().unwrap(),
            "x-vaultguard.no-tpm,headless",
        ],
        None,
    );
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("no device-mapper") && err(&o).contains("modprobe dm_mod"),
        "{}",
        err(&o)
    );
    assert!(!err(&o).contains("in use"), "{}", err(&o));
}

fn dump(img: &Path) -> String {
    String::from_utf8(run(Command::new("cryptsetup").arg("luksDump").arg(img)).stdout).unwrap()
}

/// Add a binary key file (NUL bytes, newlines, high bytes) as another keyslot.
fn add_binary_key(dir: &Path, img: &Path) -> (PathBuf, Vec<u8>) {
    let key: Vec<u8> = (0u8..=255).rev().chain([b'\n', 0, b'\n']).collect();
    let kf = dir.join("binary.key");
    std::fs::write(&kf, &key).unwrap();
    let pf = dir.join("pass.tmp");
    std::fs::write(&pf, PASS).unwrap();
    run(Command::new("cryptsetup")
        .args(["luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2"])
        .args(["--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(&pf)
        .arg(img)
        .arg(&kf));
    (kf, key)
}

#[test]
fn enroll_takes_the_device_positionally_and_unlocks_from_files_without_a_terminal() {
    let sw = Swtpm::start();
    let dir = TempDir::new("enrolpos");
    let img = luks_image(dir.path(), PASS);
    let (_, key) = add_binary_key(dir.path(), &img);
    let cfg = config(dir.path(), &sw.tcti(), "");
    let cfg = cfg.to_str().unwrap();
    let img_s = img.to_str().unwrap();

    // Two different devices: refused as a usage error before anything is read.
    let o = vg(
        &["-c", cfg, "enroll", "--device", "/dev/other", img_s],
        None,
    );
    assert_eq!(code(&o), 2, "{}", err(&o));

    // A wrong key from standard input: one try, then a clear refusal.
    let o = vg(
        &["-c", cfg, "enroll", "--unlock-key-file", "-", img_s],
        Some(b"not the key"),
    );
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(!dump(&img).contains("systemd-tpm2"));

    // The binary key on standard input, byte for byte (no newline trimming).
    let o = vg(
        &[
            "-c",
            cfg,
            "enroll",
            "--json",
            "--unlock-key-file",
            "-",
            img_s,
        ],
        Some(&key),
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    let v = json(&o);
    assert_eq!(v["success"], true);
    assert_eq!(v["device"], img_s);
    assert!(dump(&img).contains("systemd-tpm2"), "{}", dump(&img));

    // reseal with a passphrase file whose trailing newline is not part of it.
    let pf = dir.path().join("passphrase");
    std::fs::write(&pf, format!("{PASS}\n")).unwrap();
    let o = vg(
        &[
            "-c",
            cfg,
            "reseal",
            "--unlock-passphrase-file",
            pf.to_str().unwrap(),
            img_s,
        ],
        None,
    );
    assert_eq!(code(&o), 0, "{}{}", out(&o), err(&o));
    assert!(
        out(&o).contains("resealed into TPM2 keyslot"),
        "{}",
        out(&o)
    );
}

/// `unlock --test` on `img`: the output and its JSON.
fn test_unlock(cfg: &str, img: &str, extra: &[&str]) -> Output {
    let mut args = vec!["-c", cfg, "unlock", "--test", "--device", img];
    args.extend_from_slice(extra);
    vg(&args, None)
}

#[test]
fn unlock_test_names_the_keyslot_each_key_opens_and_the_pcr_that_changed() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("unlocktest");
    let img = luks_image(dir.path(), PASS);
    let (kf, _) = add_binary_key(dir.path(), &img);
    let cfg = config(dir.path(), &sw.tcti(), "");
    let cfg = cfg.to_str().unwrap();
    let img_s = img.to_str().unwrap();
    let pf = dir.path().join("passphrase");
    std::fs::write(&pf, format!("{PASS}\n")).unwrap();

    let o = vg(
        &[
            "-c",
            cfg,
            "enroll",
            "--json",
            "--recovery-key",
            "--unlock-passphrase-file",
            pf.to_str().unwrap(),
            img_s,
        ],
        None,
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    let e = json(&o);
    let tpm_slot = e["keyslot"].as_u64().unwrap();
    let recovery_slot = e["recovery_keyslot"].as_u64().unwrap();
    let rk = dir.path().join("recovery");
    std::fs::write(&rk, e["recovery_key"].as_str().unwrap()).unwrap();

    // The TPM token, with no prompt possible.
    let o = test_unlock(cfg, img_s, &["--headless", "--json"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let v = json(&o);
    assert_eq!(v["method"], "tpm2_unseal");
    assert_eq!(v["keyslot"], tpm_slot);
    assert_eq!(v["activated"], false);
    let o = test_unlock(cfg, img_s, &["--headless"]);
    assert!(
        out(&o).contains(&format!("the TPM2 token opens keyslot {tpm_slot}"))
            && out(&o).contains("activation was not tried"),
        "{}",
        out(&o)
    );

    // The key file (keyslot 1), the passphrase (0), the recovery key.
    let o = test_unlock(
        cfg,
        img_s,
        &["--no-tpm", "--headless", "--key-file", kf.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("the key file opens keyslot 1"),
        "{}",
        out(&o)
    );
    let o = test_unlock(
        cfg,
        img_s,
        &["--no-tpm", "--unlock-passphrase-file", pf.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("the passphrase opens keyslot 0"),
        "{}",
        out(&o)
    );
    let o = test_unlock(
        cfg,
        img_s,
        &["--no-tpm", "--unlock-passphrase-file", rk.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains(&format!("the recovery key opens keyslot {recovery_slot}")),
        "{}",
        out(&o)
    );
    // A wrong passphrase: non-zero, and nothing opened.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong").unwrap();
    let o = test_unlock(
        cfg,
        img_s,
        &[
            "--no-tpm",
            "--unlock-passphrase-file",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 1, "{}", err(&o));

    // PCR 7 changes (a firmware update, say): status 5, naming the PCR.
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000001"],
    );
    let o = test_unlock(cfg, img_s, &["--headless"]);
    assert_eq!(code(&o), 5, "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("PCR 7"), "{}", err(&o));
    let o = test_unlock(cfg, img_s, &["--headless", "--json"]);
    assert_eq!(code(&o), 5);
    let v = json(&o);
    assert_eq!(v["exit"], 5);
    assert!(v["error"].as_str().unwrap().contains("PCR 7"), "{v}");
    // The key file still opens it, and the TPM's refusal is reported beside it.
    let o = test_unlock(
        cfg,
        img_s,
        &["--headless", "--key-file", kf.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("the key file opens keyslot 1") && out(&o).contains("PCR 7"),
        "{}",
        out(&o)
    );
}
