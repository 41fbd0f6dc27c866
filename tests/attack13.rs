//! Attacks on issue 13's surfaces (signed policies, `policy predict`, revocation,
//! the event-log explainer), each a finding that was fixed: files planted where
//! the signature file, the event log or a staged component is read (a FIFO, a
//! device, a directory, a symlink loop) are refused with one line instead of
//! blocking the unlock or reading without end.

mod common;

use common::{vaultguard_bin, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vaultguard::tpm::signed::read_signature_file;

/// `mkfifo` at `p` (nobody ever writes to it).
fn fifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// Run `f` on a thread; its result, or a test failure naming `what` when it has
/// not returned within 5 s (a hang is the finding).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within 5 s (hangs)"),
    }
}

/// Run the binary, killing it (and failing) when it has not exited within 10 s.
fn run_bounded(what: &str, cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vaultguard");
    let t = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: vaultguard did not exit within 10 s (hangs)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Places an attacker can make of the signature file's name: each is refused with
/// one line naming the path and what is wrong, promptly.
fn planted(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let f = dir.join("fifo.json");
    fifo(&f);
    let d = dir.join("dir.json");
    std::fs::create_dir(&d).unwrap();
    let l = dir.join("loop.json");
    std::os::unix::fs::symlink(&l, &l).unwrap();
    vec![
        (f, "is a FIFO, not a regular file"),
        (d, "is a directory, not a regular file"),
        ("/dev/zero".into(), "is a device, not a regular file"),
        (l, "symbolic links"),
    ]
}

#[test]
fn signature_file_that_is_a_fifo_device_directory_or_loop_is_refused_at_once() {
    let dir = TempDir::new("attack13-sigfile");
    for (path, want) in planted(dir.path()) {
        let p = path.clone();
        let r = within(
            &format!("read_signature_file({})", path.display()),
            move || read_signature_file(&p).map_err(|e| e.to_string()),
        );
        let e = r.expect_err("a planted non-file must not parse as a signature file");
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(want), "{}: {e}", path.display());
        assert!(!e.contains('\n'), "{e}");
    }
}

/// `policy predict` with a staged initrd or kernel that is a FIFO or /dev/zero,
/// or an event log that is a FIFO: one line, exit 1, within seconds (it read
/// the FIFO forever, and /dev/zero until memory ran out).
#[test]
fn predict_with_a_fifo_or_device_for_the_log_initrd_or_kernel_fails_in_one_line() {
    let dir = TempDir::new("attack13-predict");
    let cfg = dir.path().join("config.json");
    // No TPM is reached: the inputs are refused first.
    std::fs::write(&cfg, r#"{"tpm":{"tcti":"swtpm:host=127.0.0.1,port=1"}}"#).unwrap();
    let log = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/tpm/testdata/ovmf-direct-boot.eventlog"
    );
    let f = dir.path().join("staged.fifo");
    fifo(&f);
    let fs = f.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--event-log", log, "--initrd", fs],
            "cannot read the staged initrd",
        ),
        (
            vec!["--event-log", log, "--kernel", fs],
            "cannot read the staged kernel",
        ),
        (
            vec!["--event-log", log, "--initrd", "/dev/zero"],
            "/dev/zero: is a device, not a regular file",
        ),
        (
            vec!["--event-log", fs, "--initrd", log],
            "cannot read the TPM event log",
        ),
    ] {
        let out = run_bounded(
            &format!("predict {args:?}"),
            Command::new(vaultguard_bin())
                .arg("-c")
                .arg(&cfg)
                .args(["policy", "predict"])
                .args(&args),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            err.contains("not a regular file"),
            "{args:?}: the line says what is wrong: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: no prediction: {out:?}");
    }
}

/// A signed enrolment (PCR 9 signed, PCR 7 literal) of a fresh LUKS2 image on
/// `sw`, with `counter` as its revocation counter; returns the image, the
/// signature file path (holding a signature of the live PCR 9 when not
/// revocable) and the policy key.
fn signed_vault(
    sw: &common::Swtpm,
    dir: &Path,
    counter: Option<u32>,
) -> (PathBuf, PathBuf, vaultguard::tpm::signed::SigningKey) {
    use vaultguard::boot::{enroll, NoEvents, SignedEnrolment};
    use vaultguard::prompt::Scripted;
    use vaultguard::tpm::signed::{SignatureFile, SigningKey};
    let img = common::luks_image(dir, PASS);
    let key = SigningKey::from_pem(&common::openssl_key(dir, "ec")).unwrap();
    let sig = dir.join("sig.json");
    let mut opts = common::enroll_opts(sw, &img);
    opts.pcrs = vec![7];
    opts.tpm.signature = Some(sig.clone());
    opts.signed = Some(SignedEnrolment {
        public_key_pem: public_pem(dir, "ec"),
        pcrs: vec![9],
        revocation_counter: counter,
    });
    enroll(&opts, &mut Scripted::new(&[PASS]), &mut NoEvents).expect("signed enrolment");
    let mut file = SignatureFile::default();
    if counter.is_none() {
        let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
        file.add(
            vaultguard::tpm::policy::Bank::Sha256,
            &common::sign_live(&mut tpm, &key, &[9]),
        );
    }
    std::fs::write(&sig, file.to_json_string()).unwrap();
    (img, sig, key)
}

const PASS: &str = "attack13-passphrase";

/// The public half of the key `common::openssl_key(dir, kind)` wrote, as PEM.
fn public_pem(dir: &Path, kind: &str) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(dir.join(format!("{kind}.pem")))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

/// The vaultguard token's id and JSON, as `cryptsetup token export` gives it.
fn token(img: &Path) -> (u32, serde_json::Value) {
    let mut v = vaultguard::luks::Vault::open(img.to_str().unwrap()).unwrap();
    let ids: Vec<u32> = v.tpm2_tokens().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 1, "one TPM2 token");
    let out = Command::new("cryptsetup")
        .args(["token", "export", "--token-id", &ids[0].to_string()])
        .arg(img)
        .output()
        .expect("cryptsetup");
    assert!(out.status.success(), "{out:?}");
    (ids[0], serde_json::from_slice(&out.stdout).unwrap())
}

fn opened_by(sw: &common::Swtpm, img: &Path, sig: &Path) -> vaultguard::boot::Method {
    use vaultguard::boot::{acquire_volume_key, NoEvents};
    let mut v = vaultguard::luks::Vault::open(img.to_str().unwrap()).unwrap();
    let mut u = common::unlock_opts(sw, img);
    u.tpm.as_mut().unwrap().signature = Some(sig.to_path_buf());
    acquire_volume_key(
        &mut v,
        &u,
        &mut vaultguard::prompt::Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .expect("the passphrase opens it at least")
    .method
}

/// Attack: the header's `tpm2_pubkey` is swapped offline for the attacker's key.
/// The TPM refuses the edited token, the operator types the passphrase into
/// `reseal` (as after any update): the reseal carried the header's key into
/// the new enrolment, so the attacker's signature opened the vault from then
/// on. Now the key is carried only when proven (a TPM unseal through the
/// token, or its keyslot MAC under the volume key plus its blob's authPolicy).
#[test]
fn reseal_after_a_passphrase_unlock_does_not_carry_a_swapped_public_key() {
    use vaultguard::boot::{reseal, BootError, Method, NoEvents};
    use vaultguard::encoding::base64_encode;
    use vaultguard::prompt::Scripted;
    use vaultguard::tpm::signed::SigningKey;
    let dir = TempDir::new("attack13-reseal-key");
    let sw = common::Swtpm::start();
    let (img, sig, _key) = signed_vault(&sw, dir.path(), None);
    assert_eq!(opened_by(&sw, &img, &sig), Method::Tpm2);

    let evil = SigningKey::from_pem(&common::openssl_key(dir.path(), "rsa")).unwrap();
    let (id, mut t) = token(&img);
    t["tpm2_pubkey"] = base64_encode(&public_pem(dir.path(), "rsa")).into();
    common::import_token(&img, id, &t);

    let mut ropts = common::enroll_opts(&sw, &img);
    ropts.tpm.signature = Some(sig.clone());
    match reseal(&ropts, &mut Scripted::new(&[PASS]), &mut NoEvents) {
        Err(e @ BootError::UnprovenSignedPolicy { .. }) => {
            let line = e.to_string();
            assert!(
                line.contains("not proven") && line.contains("enroll --public-key"),
                "{line}"
            );
            assert!(!line.contains('\n'), "{line}");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(r) => panic!("resealed to the header's (swapped) key: {r:?}"),
    }
    // Nothing was written: the header holds the edited token as it was, and the
    // attacker's signature of this boot opens nothing.
    assert_eq!(token(&img), (id, t));
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    let mut file = vaultguard::tpm::signed::SignatureFile::default();
    file.add(
        vaultguard::tpm::policy::Bank::Sha256,
        &common::sign_live(&mut tpm, &evil, &[9]),
    );
    drop(tpm);
    std::fs::write(&sig, file.to_json_string()).unwrap();
    assert_eq!(opened_by(&sw, &img, &sig), Method::Passphrase);
}

/// Attack: `vaultguard_revocation_counter` deleted from the header offline, so
/// that a reseal would drop revocation (every withdrawn signature valid again
/// for the new enrolment). Refused the same way; with the field restored the
/// same passphrase reseal (after a literal PCR moved) keeps it revocable.
#[test]
fn reseal_does_not_drop_a_revocation_counter_removed_from_the_header() {
    use vaultguard::boot::{reseal, BootError, NoEvents};
    use vaultguard::prompt::Scripted;
    use vaultguard::tpm::counter::DEFAULT_REVOCATION_COUNTER as H;
    let dir = TempDir::new("attack13-reseal-counter");
    let mut sw = common::Swtpm::start();
    let (img, sig, _key) = signed_vault(&sw, dir.path(), Some(H));
    let (id, original) = token(&img);
    let mut t = original.clone();
    t.as_object_mut()
        .unwrap()
        .remove("vaultguard_revocation_counter")
        .expect("a revocable token");
    common::import_token(&img, id, &t);
    let mut ropts = common::enroll_opts(&sw, &img);
    ropts.tpm.signature = Some(sig.clone());
    match reseal(&ropts, &mut Scripted::new(&[PASS]), &mut NoEvents) {
        Err(BootError::UnprovenSignedPolicy { token, .. }) => assert_eq!(token, id),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(r) => panic!("resealed without the revocation counter: {r:?}"),
    }
    assert_eq!(token(&img), (id, t));

    // The genuine token, after a literal PCR moved: proven by its keyslot MAC,
    // resealed, still revocable.
    common::import_token(&img, id, &original);
    sw.tool(
        "tpm2_pcrextend",
        &[&format!("7:sha256={}", "0a".repeat(32))],
    );
    reseal(&ropts, &mut Scripted::new(&[PASS]), &mut NoEvents)
        .expect("reseal of the genuine token");
    let (_, after) = token(&img);
    assert_eq!(after["vaultguard_revocation_counter"], serde_json::json!(H));
    assert_eq!(after["tpm2_pubkey"], original["tpm2_pubkey"]);
}

/// Attack: `vaultguard_eventlog` descriptions edited in the header to carry a
/// newline (a forged line of its own on the console and in the journal), an
/// escape sequence that clears the line naming the changed record, or a
/// bidirectional override. The refusal's explanation printed them as they were;
/// now every such character is `?`, in the token and in each explanation line.
#[test]
fn event_descriptions_from_the_header_cannot_forge_or_hide_explanation_lines() {
    use std::collections::BTreeMap;
    use vaultguard::luks::token::Tpm2Token;
    use vaultguard::tpm::eventlog::diff;
    let dir = TempDir::new("attack13-eventlog-text");
    let sw = common::Swtpm::start();
    let (img, _sig, _key) = signed_vault(&sw, dir.path(), None);
    let (_, mut t) = token(&img);
    let evil = "EV_EVENT_TAG tag\nvaultguard: PCR 9 unchanged, safe to reseal\x1b[2K\r\u{202E}x";
    t["vaultguard_eventlog"] =
        serde_json::json!({"9": [{"event": evil, "digest": "11".repeat(32)}]});
    let parsed = Tpm2Token::from_json(&t).expect("the token stays usable");
    let text = &parsed.eventlog[&9][0].0;
    assert!(
        !text.chars().any(|c| c.is_control() || c == '\u{202E}'),
        "{text:?}"
    );
    assert!(
        text.starts_with("EV_EVENT_TAG tag?vaultguard: PCR 9"),
        "{text:?}"
    );
    // The explanation of a changed record (the same one, now another digest).
    let now = BTreeMap::from([(9u32, vec![(text.clone(), vec![0x22u8; 32])])]);
    let lines: Vec<String> = diff(&parsed.eventlog, &now)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        !lines[0].chars().any(|c| c.is_control() || c == '\u{202E}'),
        "{:?}",
        lines[0]
    );
    assert!(lines[0].contains(&"22".repeat(32)), "{}", lines[0]);
}

/// Concurrent `policy sign --append` runs (two kernels' postinst hooks, an
/// operator and a hook): each read the file, added its entry and renamed its
/// own copy over it, so all but the last signature were lost and the boot they
/// approved fell back to the passphrase. The read-modify-write now holds an
/// exclusive lock on the signature file's directory: every signature is kept.
#[test]
fn concurrent_policy_sign_append_runs_keep_every_signature() {
    use std::io::Write;
    let dir = TempDir::new("attack13-sign-race");
    let key = dir.path().join("ec.pem");
    std::fs::write(&key, common::openssl_key(dir.path(), "ec")).unwrap();
    let sigdir = dir.path().join("systemd");
    std::fs::create_dir(&sigdir).unwrap();
    let sig = sigdir.join("tpm2-pcr-signature.json");
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"tpm":{"tcti":"swtpm:host=127.0.0.1,port=9","timeout":0}}"#,
    )
    .unwrap();
    const RUNS: usize = 12;
    let children: Vec<_> = (0..RUNS)
        .map(|i| {
            let mut child = Command::new(vaultguard_bin())
                .arg("-c")
                .arg(&cfg)
                .args(["policy", "sign", "--private-key"])
                .arg(&key)
                .args(["--public-key-pcrs", "9", "--predicted", "-", "--append"])
                .arg("--signature")
                .arg(&sig)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let v = format!("{:02x}", i + 1).repeat(32);
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(format!(r#"{{"bank":"sha256","pcrs":{{"9":"{v}"}}}}"#).as_bytes())
                .unwrap();
            (child, stdin)
        })
        .collect();
    // All are started before any has its whole input: they run as one burst.
    let children: Vec<_> = children
        .into_iter()
        .map(|(child, stdin)| {
            drop(stdin);
            child
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let file = read_signature_file(&sig).unwrap();
    let entries = file.entries(vaultguard::tpm::policy::Bank::Sha256);
    assert_eq!(
        entries.len(),
        RUNS,
        "signatures lost to concurrent --append runs"
    );
    // And no temporary or lock file is left beside it.
    let names: Vec<String> = std::fs::read_dir(&sigdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["tpm2-pcr-signature.json"]);
}

/// Attack: the token's `vaultguard_eventlog` filled (512 records per PCR, what
/// the parser allows) so that every record differs: the explanation printed one
/// line each above the passphrase prompt and into the journal and the audit.
/// Now at most `MAX_EXPLAINED` lines, the last counting the rest.
#[test]
fn a_stuffed_event_record_list_gives_a_bounded_explanation() {
    use std::collections::BTreeMap;
    use vaultguard::boot::explain::{lines, MAX_EXPLAINED};
    use vaultguard::tpm::eventlog;
    use vaultguard::tpm::policy::Bank;
    let log = eventlog::parse(include_bytes!(
        "../src/tpm/testdata/ovmf-direct-boot.eventlog"
    ))
    .unwrap();
    let stuffed: Vec<(String, Vec<u8>)> = (0..512u32)
        .map(|i| (format!("EV_EFI_ACTION \"forged {i}\""), vec![0x33; 32]))
        .collect();
    let enrolled = BTreeMap::from([(9u32, stuffed)]);
    let out = lines(&enrolled, &log, Bank::Sha256, &[9]);
    assert_eq!(out.len(), MAX_EXPLAINED, "{}", out.len());
    assert!(out[0].starts_with("PCR 9: "), "{}", out[0]);
    assert_eq!(
        out[MAX_EXPLAINED - 1],
        format!(
            "… and {} more event-log records differ",
            512 - (MAX_EXPLAINED - 1)
        )
    );
}

/// Attack: `vaultguard_revocation_counter` pointed offline at another counter
/// (one with vaultguard's attributes, defined by anyone with the TPM's empty
/// owner password): `policy revoke-older` bumped that one, said so, and every
/// signature the operator meant to withdraw stayed valid. Likewise a whole
/// token whose claims agree with a blob made by another TPM. Now the header's
/// counter is bumped only when its claims give the blob's authPolicy and this
/// TPM made the blob; the genuine header still bumps its counter.
#[test]
fn revoke_older_does_not_bump_a_counter_the_header_was_edited_to_name() {
    use vaultguard::tpm::counter::DEFAULT_REVOCATION_COUNTER as H;
    let h2 = H + 1;
    let dir = TempDir::new("attack13-revoke");
    let sw = common::Swtpm::start();
    let (img, _sig, _key) = signed_vault(&sw, dir.path(), Some(H));
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    tpm.define_revocation_counter(h2).unwrap();
    let counters = |tpm: &mut vaultguard::tpm::Tpm| {
        (
            tpm.read_revocation_counter(H).unwrap(),
            tpm.read_revocation_counter(h2).unwrap(),
        )
    };
    let before = counters(&mut tpm);
    drop(tpm);
    let cfg = tpm_and_audit_config(&sw, dir.path());
    let revoke = || {
        run_bounded(
            "revoke-older",
            Command::new(vaultguard_bin())
                .arg("-c")
                .arg(&cfg)
                .args(["policy", "revoke-older", "--device"])
                .arg(&img),
        )
    };
    let refused = |what: &str, why: &str| {
        let out = revoke();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        assert!(
            err.contains("not proven") && err.contains("nothing was bumped") && err.contains(why),
            "{what}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
        let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
        assert_eq!(counters(&mut tpm), before, "{what}: a counter was bumped");
    };

    let (id, original) = token(&img);
    let mut t = original.clone();
    t["vaultguard_revocation_counter"] = serde_json::json!(h2);
    common::import_token(&img, id, &t);
    refused("counter field edited", "recorded PCR");

    // A consistent token for h2, sealed by another TPM (same PCR values), with
    // this header's SRK and keyslot: its claims agree with its blob.
    let other_dir = TempDir::new("attack13-revoke-other");
    let mut other = common::Swtpm::start();
    // The test TPMs are copies of one pristine state: TPM2_Clear gives this one
    // its own storage seed, as another machine's TPM has.
    other.tool("tpm2_clear", &[]);
    let mut tpm = vaultguard::tpm::Tpm::open(&other.tcti(), Duration::from_secs(5)).unwrap();
    tpm.define_revocation_counter(h2).unwrap();
    drop(tpm);
    let (other_img, _, _) = signed_vault(&other, other_dir.path(), Some(h2));
    let (_, mut forged) = token(&other_img);
    for k in ["tpm2_srk", "keyslots", "vaultguard_keyslot_macs"] {
        match original.get(k) {
            Some(v) => forged[k] = v.clone(),
            None => {
                forged.as_object_mut().unwrap().remove(k);
            }
        }
    }
    common::import_token(&img, id, &forged);
    refused("a token made on another TPM", "not made by this TPM");

    // The genuine header: its counter is bumped.
    common::import_token(&img, id, &original);
    let out = revoke();
    assert!(out.status.success(), "{out:?}");
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    let after = counters(&mut tpm);
    assert_eq!(after.0, before.0.map(|v| v + 1));
    assert_eq!(after.1, before.1);
}

/// Signature files an attacker can write (no fix needed; kept as evidence):
/// each is refused with one line, or (many entries) read quickly.
#[test]
fn hostile_signature_file_contents_are_one_line_refusals_or_cheap() {
    use vaultguard::tpm::policy::Bank;
    use vaultguard::tpm::signed::{SignatureFile, MAX_SIGNATURE_FILE};
    let entry = |extra: &str| {
        format!(
            r#"{{"sha256":[{{"pcrs":[9],"pkfp":"{}","pol":"{}","sig":"AAAA"{extra}}}]}}"#,
            "11".repeat(32),
            "22".repeat(32)
        )
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for (what, text, want) in [
        ("deeply nested", deep, "is not JSON"),
        (
            "negative counter",
            entry(r#","vaultguard_counter_value":-1"#),
            "vaultguard_counter_value",
        ),
        (
            "float counter",
            entry(r#","vaultguard_counter_value":1.5"#),
            "vaultguard_counter_value",
        ),
        (
            "2^64 counter",
            entry(r#","vaultguard_counter_value":18446744073709551616"#),
            "vaultguard_counter_value",
        ),
        ("PCR 24", entry("").replace("[9]", "[24]"), "PCR number"),
        (
            "negative PCR",
            entry("").replace("[9]", "[-1]"),
            "PCR number",
        ),
        (
            "short pol",
            entry("").replace(&"22".repeat(32), "22"),
            "32-byte",
        ),
        (
            "huge sig",
            entry("").replace("AAAA", &"A".repeat(4000)),
            "larger than any",
        ),
    ] {
        let e = SignatureFile::parse(text.as_bytes())
            .expect_err(what)
            .to_string();
        assert!(e.contains(want), "{what}: {e}");
        assert!(!e.contains('\n'), "{what}: {e}");
    }
    // Duplicate keys: serde_json keeps the last; the entry is still checked whole.
    let dup = entry("").replace(r#""pcrs":[9]"#, r#""pcrs":[9],"pcrs":[99]"#);
    assert!(SignatureFile::parse(dup.as_bytes()).is_err());
    // As many well-formed entries as fit in the size cap: every lookup stays cheap.
    let one = format!(
        r#"{{"pcrs":[9],"pkfp":"{}","pol":"{}","sig":"{}"}}"#,
        "11".repeat(32),
        "22".repeat(32),
        "A".repeat(96)
    );
    let n = (MAX_SIGNATURE_FILE as usize - 64) / (one.len() + 1);
    let big = format!(r#"{{"sha256":[{}]}}"#, vec![one; n].join(","));
    assert!(big.len() as u64 <= MAX_SIGNATURE_FILE);
    let t = Instant::now();
    let f = SignatureFile::parse(big.as_bytes()).unwrap();
    assert!(f
        .find(Bank::Sha256, &[9], &[0x11; 32], &[0x33; 32])
        .is_none());
    let why = f.explain_miss(Bank::Sha256, &[9], &[0x11; 32]);
    assert!(why.contains("current values"), "{why}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "{n} entries: {:?}",
        t.elapsed()
    );
}

/// `enroll --revocation-counter` naming the audit anchor's NV index (the
/// default 0x013fa0d1, one digit from the counter's default): on a TPM without
/// the anchor yet, the counter was defined there and the enrolment then failed
/// to define the audit anchor ("never a failed enrolment"), so the audit log
/// lost its TPM anchor for good. Now refused before anything is defined.
#[test]
fn enroll_refuses_the_audit_index_as_revocation_counter() {
    use vaultguard::boot::{enroll, BootError, NoEvents, SignedEnrolment};
    use vaultguard::prompt::Scripted;
    use vaultguard::tpm::nv::DEFAULT_AUDIT_NV_INDEX;
    let dir = TempDir::new("attack13-counter-audit");
    let sw = common::Swtpm::start();
    let img = common::luks_image(dir.path(), PASS);
    common::openssl_key(dir.path(), "ec");
    let mut opts = common::enroll_opts(&sw, &img);
    opts.pcrs = vec![7];
    opts.signed = Some(SignedEnrolment {
        public_key_pem: public_pem(dir.path(), "ec"),
        pcrs: vec![9],
        revocation_counter: Some(DEFAULT_AUDIT_NV_INDEX),
    });
    match enroll(&opts, &mut Scripted::new(&[PASS]), &mut NoEvents) {
        Err(e @ BootError::BadArgument(_)) => {
            let line = e.to_string();
            assert!(line.contains("audit"), "{line}");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(r) => panic!("enrolled with the audit index as its counter: {r:?}"),
    }
    // Nothing is defined at the audit index, and the header has no token.
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    assert!(tpm.read_revocation_counter(DEFAULT_AUDIT_NV_INDEX).is_err());
    let mut v = vaultguard::luks::Vault::open(img.to_str().unwrap()).unwrap();
    assert!(v.tpm2_tokens().is_empty());
}

/// `policy revoke-older` on a TPM whose owner password was set after enrolment
/// (as the README advises for the audit anchor): the refusal said vaultguard
/// "cannot define its audit NV index", which is not what failed. It now names
/// the revocation counter and the command that bumps it with the password; the
/// counter is unchanged.
#[test]
fn revoke_older_with_an_owner_password_names_the_counter_not_the_audit_index() {
    use vaultguard::tpm::counter::DEFAULT_REVOCATION_COUNTER as H;
    let dir = TempDir::new("attack13-revoke-owner");
    let mut sw = common::Swtpm::start();
    let (_img, _sig, _key) = signed_vault(&sw, dir.path(), Some(H));
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    let before = tpm.read_revocation_counter(H).unwrap();
    drop(tpm);
    sw.tool("tpm2_changeauth", &["-c", "owner", "ownerpass"]);
    let cfg = tpm_and_audit_config(&sw, dir.path());
    let out = run_bounded(
        "revoke-older",
        Command::new(vaultguard_bin()).arg("-c").arg(&cfg).args([
            "policy",
            "revoke-older",
            "--revocation-counter",
            "0x013fa0d2",
        ]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("revocation counter 0x013fa0d2") && !err.contains("audit NV index"),
        "{err}"
    );
    assert!(err.contains("tpm2_nvincrement -C o -P"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    assert_eq!(tpm.read_revocation_counter(H).unwrap(), before);
}

/// A config.json in `dir` naming `sw` and an audit log beside it.
fn tpm_and_audit_config(sw: &common::Swtpm, dir: &Path) -> PathBuf {
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"tpm": {"tcti": sw.tcti(), "timeout": 5},
                           "audit": {"path": dir.join("audit.jsonl")}})
        .to_string(),
    )
    .unwrap();
    cfg
}

/// A relay to `sw` that forwards every TPM command but, once an NV_Increment
/// has gone through, no more responses: the client waits (here, to be killed)
/// after the TPM has done the increment. Returns the relay's TCTI and a flag
/// set when the NV_Increment was forwarded.
fn swallowing_relay(sw: &common::Swtpm) -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tpm_port: u16 = sw
        .tcti()
        .rsplit("port=")
        .next()
        .and_then(|p| p.parse().ok())
        .expect("swtpm tcti port");
    let (data, ctrl, port) = common::port_pair();
    let seen = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for c in ctrl.incoming().flatten() {
            let s = TcpStream::connect(("127.0.0.1", tpm_port + 1)).unwrap();
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || drop(std::io::copy(&mut s2, &mut c2)));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &c, &mut &s);
                let _ = s.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    let flag = seen.clone();
    std::thread::spawn(move || {
        for mut client in data.incoming().flatten() {
            let server = TcpStream::connect(("127.0.0.1", tpm_port)).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let f = flag.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s2.read(&mut buf) {
                    if n == 0 || f.load(Ordering::SeqCst) {
                        return; // swallowed: the client waits
                    }
                    if c2.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
            let f = flag.clone();
            let mut server = server;
            std::thread::spawn(move || {
                let mut head = [0u8; 10];
                while client.read_exact(&mut head).is_ok() {
                    let size = u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize;
                    let mut cmd = head.to_vec();
                    cmd.resize(size.max(10), 0);
                    if client.read_exact(&mut cmd[10..]).is_err() {
                        return;
                    }
                    let code = u32::from_be_bytes(head[6..10].try_into().unwrap());
                    if code == 0x134 {
                        f.store(true, Ordering::SeqCst);
                    }
                    if server.write_all(&cmd).is_err() {
                        return;
                    }
                }
                // The client is gone: free swtpm (one connection at a time)
                // for its next one.
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (format!("swtpm:host=127.0.0.1,port={port}"), seen)
}

/// kill -9 of `policy revoke-older` after the TPM bumped the counter and before
/// the audit entry was written: the bump, a security act, was in no audit log.
/// Now the intent (`policy_revoke_older_started`, counter and old value) is
/// audited before the increment, so a killed run still leaves its trace.
#[test]
fn revoke_older_killed_after_the_increment_has_left_an_audit_entry() {
    use std::sync::atomic::Ordering;
    use vaultguard::tpm::counter::DEFAULT_REVOCATION_COUNTER as H;
    let dir = TempDir::new("attack13-revoke-kill");
    let sw = common::Swtpm::start();
    let (_img, _sig, _key) = signed_vault(&sw, dir.path(), Some(H));
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    let before = tpm.read_revocation_counter(H).unwrap().unwrap();
    drop(tpm);
    let (tcti, incremented) = swallowing_relay(&sw);
    let audit = dir.path().join("audit.jsonl");
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"tpm": {"tcti": tcti, "timeout": 30}, "audit": {"path": audit}})
            .to_string(),
    )
    .unwrap();
    let mut child = Command::new(vaultguard_bin())
        .arg("-c")
        .arg(&cfg)
        .args([
            "policy",
            "revoke-older",
            "--revocation-counter",
            "0x013fa0d2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !incremented.load(Ordering::SeqCst) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no NV_Increment sent"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before the increment"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300)); // swtpm executes it
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    assert_eq!(tpm.read_revocation_counter(H).unwrap(), Some(before + 1));
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    let entry = log
        .lines()
        .find(|l| l.contains("policy_revoke_older"))
        .unwrap_or_else(|| panic!("the bump left no audit entry: {log:?}"));
    assert!(
        entry.contains("0x013fa0d2") && entry.contains(&format!("\"old_value\":\"{before}\"")),
        "{entry}"
    );
}
