//! Enrol, unlock (up to the volume key), reseal and recovery on a LUKS2 image in a
//! file with a software TPM. Activation itself needs device-mapper and is covered
//! by the QEMU scenarios.

mod common;

use common::{enroll_opts, luks_image, run, unlock_opts, LoopDevice, Swtpm, TempDir};
use std::process::Command;
use std::time::Duration;
use vaultguard::boot::{
    acquire_volume_key, enroll, reseal, AuditAnchor, BootError, Events, Method, NoEvents,
    TpmOptions, TpmRefusal, UnlockOptions, Verification,
};
use vaultguard::luks::{ActivateFlags, Vault};
use vaultguard::prompt::Scripted;
use vaultguard::tpm::TpmError;

const PASS: &str = "correct horse battery staple";

/// The volume key as the passphrase opens it: the reference every path must match.
fn reference_vk(img: &std::path::Path) -> Vec<u8> {
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    v.volume_key(None, PASS.as_bytes())
        .unwrap()
        .0
        .as_bytes()
        .to_vec()
}

fn dump(img: &std::path::Path) -> String {
    String::from_utf8(run(Command::new("cryptsetup").arg("luksDump").arg(img)).stdout).unwrap()
}

#[test]
fn enroll_then_the_tpm_opens_the_vault_without_a_prompt() {
    let sw = Swtpm::start();
    let dir = TempDir::new("enroll");
    let img = luks_image(dir.path(), PASS);
    let mut p = Scripted::new(&[PASS]);
    let r = enroll(&enroll_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert!(matches!(r.verification, Verification::Unsealed));
    assert_eq!(r.pcrs, vec![0, 2, 4, 7, 15]);
    let d = dump(&img);
    assert!(d.contains("systemd-tpm2"), "{d}");
    // the passphrase keyslot is still there
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    assert_eq!(v.active_keyslots(), vec![0, r.keyslot]);
    assert!(v.volume_key(Some(0), PASS.as_bytes()).is_ok());
    drop(v);

    let mut p = Scripted::new(&[]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Tpm2);
    assert!(p.asked.is_empty(), "no prompt expected: {:?}", p.asked);
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

#[test]
fn the_token_list_follows_our_own_header_writes() {
    let sw = Swtpm::start();
    let dir = TempDir::new("tokens");
    let img = luks_image(dir.path(), PASS);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    assert!(v.tpm2_tokens().is_empty());
    drop(v);
    let mut p = Scripted::new(&[PASS]);
    let r = enroll(&enroll_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let tokens = v.tpm2_tokens();
    assert_eq!(tokens.len(), 1);
    let json = tokens[0].1.as_ref().unwrap().to_json();
    v.remove_token(tokens[0].0).unwrap();
    assert!(v.tpm2_tokens().is_empty());
    let id = v.add_token(&json).unwrap();
    assert_eq!(v.tpm2_tokens()[0].0, id);
    // destroying its keyslot takes the keyslot out of the token
    v.destroy_keyslot(r.keyslot).unwrap();
    // The token is still in the header, and its keyslot list (as libcryptsetup
    // wrote it) no longer names the keyslot: it was the only one, so it is
    // empty, and our parser refuses such a token by name. (An `all` over the
    // parsed tokens held for a list emptied by mistake as well.)
    drop(v);
    let out = run(Command::new("cryptsetup")
        .args(["token", "export", "--token-id", &id.to_string()])
        .arg(&img));
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(raw["type"], "systemd-tpm2", "{raw}");
    assert_eq!(raw["keyslots"], serde_json::json!([]), "{raw}");
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let left = v.tpm2_tokens();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        matches!(
            &left[0].1,
            Err(vaultguard::luks::token::TokenError::Field {
                field: "keyslots",
                ..
            })
        ),
        "{left:?}"
    );
}

#[test]
fn the_tpm_keyslot_uses_minimal_pbkdf2_and_the_token_is_systemds() {
    let sw = Swtpm::start();
    let dir = TempDir::new("kdf");
    let img = luks_image(dir.path(), PASS);
    let r = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    let out = run(Command::new("cryptsetup")
        .args(["token", "export", "--token-id"])
        .arg(r.token.to_string())
        .arg(&img));
    let token: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "tpm2-blob",
        "tpm2-pcrs",
        "tpm2-pcr-bank",
        "tpm2-primary-alg",
        "tpm2-policy-hash",
        "tpm2-pin",
        "tpm2_srk",
    ] {
        assert!(token.get(key).is_some(), "missing {key} in {token}");
    }
    assert_eq!(
        token["keyslots"],
        serde_json::json!([r.keyslot.to_string()])
    );
    assert_eq!(token["tpm2-pcrs"], serde_json::json!([0, 2, 4, 7, 15]));
    let d = dump(&img);
    let slot = d.split(&format!("  {}: luks2", r.keyslot)).nth(1).unwrap();
    assert!(slot.contains("PBKDF:      pbkdf2"), "{slot}");
    assert!(slot.contains("Iterations: 1000"), "{slot}");
}

#[test]
fn enrolling_twice_is_refused_and_a_wrong_passphrase_writes_nothing() {
    let sw = Swtpm::start();
    let dir = TempDir::new("twice");
    let img = luks_image(dir.path(), PASS);
    let e = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&["no", "nope", "never"]),
        &mut NoEvents,
    )
    .unwrap_err();
    assert!(matches!(e, BootError::TriesExhausted { .. }), "{e}");
    assert!(!dump(&img).contains("systemd-tpm2"));
    enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    let e = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap_err();
    assert!(e.to_string().contains("vaultguard reseal"), "{e}");
}

#[test]
fn a_changed_pcr_falls_back_to_the_passphrase_with_the_reason() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("pcr");
    let img = luks_image(dir.path(), PASS);
    enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    sw.tool(
        "tpm2_pcrextend",
        &["2:sha256=0000000000000000000000000000000000000000000000000000000000000002"],
    );
    let mut p = Scripted::new(&["wrong", PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    let reason = got.fallback_reason.unwrap();
    assert!(
        matches!(&reason, TpmRefusal::Tpm(TpmError::PcrMismatch { changed, .. }) if changed == &[2]),
        "{reason:?}"
    );
    assert!(reason.to_string().contains("PCR 2 changed"), "{reason}");
    assert!(
        p.said.iter().any(|l| l.contains("PCR 2 changed")),
        "{:?}",
        p.said
    );
    assert!(
        p.said
            .iter()
            .any(|l| l.contains("wrong passphrase (2 tries left)")),
        "{:?}",
        p.said
    );
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

#[test]
fn after_the_latch_the_tpm_refuses_until_reboot() {
    let sw = Swtpm::start();
    let dir = TempDir::new("latch");
    let img = luks_image(dir.path(), PASS);
    enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let uuid = v.uuid().unwrap();
    let mut got = acquire_volume_key(
        &mut v,
        &unlock_opts(&sw, &img),
        &mut Scripted::new(&[]),
        &mut NoEvents,
    )
    .unwrap();
    got.tpm
        .as_mut()
        .unwrap()
        .latch(15, got.vk.as_bytes(), "secure-ai-vault", &uuid)
        .unwrap();
    drop(got);
    let mut p = Scripted::new(&[]);
    let e = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents)
        .err()
        .unwrap();
    assert!(matches!(e, BootError::Prompt(_)), "{e}");
    assert!(
        p.said
            .iter()
            .any(|l| l.contains("PCR 15 (phase) is already extended")),
        "{:?}",
        p.said
    );
}

#[test]
fn pin_loop_stops_before_the_tpm_locks_out() {
    let mut sw = Swtpm::start();
    sw.tool(
        "tpm2_dictionarylockout",
        &["-s", "-n", "3", "-t", "600", "-l", "600"],
    );
    let dir = TempDir::new("pin");
    let img = luks_image(dir.path(), PASS);
    let mut o = enroll_opts(&sw, &img);
    o.pin = true;
    enroll(
        &o,
        &mut Scripted::new(&[PASS, "1357", "1357"]),
        &mut NoEvents,
    )
    .unwrap();

    // Wrong PINs: vaultguard stops while the TPM still has one try, then asks for
    // the passphrase instead.
    let mut opts = unlock_opts(&sw, &img);
    opts.tries = 5;
    let mut p = Scripted::new(&["0000", "1111", PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &opts, &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    let reason = got.fallback_reason.unwrap();
    assert!(
        matches!(reason, TpmRefusal::PinBudget { left: 1 }),
        "{reason:?}"
    );
    assert!(reason.to_string().contains("not risking it"));
    let mut tpm = got.tpm.unwrap();
    assert_eq!(tpm.da_tries_left().unwrap(), 1);
    assert!(!tpm.in_lockout().unwrap(), "the TPM must not be in lockout");
    drop(tpm);

    // The right PIN still works: the TPM is not locked out.
    let mut tpm = got_tpm_reopen(&sw);
    let token = v.tpm2_tokens().remove(0).1.unwrap();
    assert!(tpm
        .unseal(
            &vaultguard::boot::sealed_object(&token).unwrap(),
            Some(b"1357")
        )
        .is_ok());
    // and once the counter has decayed (here: reset by the owner), the PIN path
    // opens the vault again without the passphrase
    drop(tpm);
    sw.tool("tpm2_dictionarylockout", &["-c"]);
    let mut p = Scripted::new(&["1357"]);
    let got = acquire_volume_key(&mut v, &opts, &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Tpm2Pin);
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

fn got_tpm_reopen(sw: &Swtpm) -> vaultguard::tpm::Tpm {
    vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap()
}

#[test]
fn reseal_writes_the_new_enrolment_before_removing_the_old() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("reseal");
    let img = luks_image(dir.path(), PASS);
    let first = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    // a legitimate update changes PCR 4
    sw.tool(
        "tpm2_pcrextend",
        &["4:sha256=0404040404040404040404040404040404040404040404040404040404040404"],
    );
    let mut p = Scripted::new(&[PASS]);
    let r = reseal(&enroll_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert!(matches!(r.verification, Verification::Unsealed));
    assert_eq!(r.removed, vec![(first.token, first.keyslot)]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let tokens = v.tpm2_tokens();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].0, r.token);
    assert_eq!(v.active_keyslots(), vec![0, r.keyslot]);
    let got = acquire_volume_key(
        &mut v,
        &unlock_opts(&sw, &img),
        &mut Scripted::new(&[]),
        &mut NoEvents,
    )
    .unwrap();
    assert_eq!(got.method, Method::Tpm2);
}

#[test]
fn recovery_key_opens_the_vault_after_the_tpm_is_wiped_and_reseal_restores_it() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("recovery");
    let img = luks_image(dir.path(), PASS);
    let mut o = enroll_opts(&sw, &img);
    o.recovery_key = true;
    let r = enroll(&o, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    let key = String::from_utf8(r.recovery_key.as_ref().unwrap().as_bytes().to_vec()).unwrap();
    assert!(dump(&img).contains("systemd-recovery"));
    // the TPM is cleared: its SRK is gone
    sw.tool("tpm2_clear", &["-c", "p"]);
    let mut p = Scripted::new(&[&key]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    let reason = got.fallback_reason.as_ref().unwrap();
    assert!(
        matches!(reason, TpmRefusal::Tpm(TpmError::SrkMissing)),
        "{reason:?}"
    );
    assert!(
        reason.to_string().contains("cleared or replaced"),
        "{reason}"
    );
    drop(got);
    drop(v);
    let mut p = Scripted::new(&[&key]);
    reseal(&enroll_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(
        &mut v,
        &unlock_opts(&sw, &img),
        &mut Scripted::new(&[]),
        &mut NoEvents,
    )
    .unwrap();
    assert_eq!(got.method, Method::Tpm2);
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

#[test]
fn enrolment_after_the_latch_is_verified_by_policy_and_works_next_boot() {
    let sw = Swtpm::start();
    let dir = TempDir::new("postlatch");
    let img = luks_image(dir.path(), PASS);
    // this boot already latched PCR 15
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    tpm.latch(15, &[1u8; 64], "other", "x").unwrap();
    drop(tpm);
    let r = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(matches!(r.verification, Verification::PolicyOnly));
    // reboot: TPM reset, PCR 15 back to zeros
    let mut sw = sw;
    sw.restart();
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(
        &mut v,
        &unlock_opts(&sw, &img),
        &mut Scripted::new(&[]),
        &mut NoEvents,
    )
    .unwrap();
    assert_eq!(got.method, Method::Tpm2);
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

#[test]
fn without_an_enrolment_the_tpm_is_not_waited_for() {
    // A TPM that never appears: a volume with no TPM2 token must go straight to
    // the passphrase, without waiting for it. The timeout is long against the
    // time allowed (a wait shows as a failure, not as a test that hangs for an
    // hour) and short enough that a regression fails within the run.
    let dir = TempDir::new("notoken");
    let img = luks_image(dir.path(), PASS);
    let opts = UnlockOptions {
        tpm: Some(TpmOptions {
            tcti: format!("device:{}", dir.path().join("no-such-tpm").display()),
            timeout: Duration::from_secs(20),
            phase_pcr: Some(15),
            signature: None,
        }),
        ..UnlockOptions {
            name: "secure-ai-vault".into(),
            device: img.display().to_string(),
            tpm: None,
            tries: 3,
            keyfile: None,
            flags: ActivateFlags::default(),
            crypttab: Default::default(),
        }
    };
    let mut p = Scripted::new(&[PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let start = std::time::Instant::now();
    let got = acquire_volume_key(&mut v, &opts, &mut p, &mut NoEvents).unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "waited {took:?} for a TPM the volume does not use"
    );
    assert_eq!(got.method, Method::Passphrase);
    let reason = got.fallback_reason.unwrap();
    assert!(matches!(reason, TpmRefusal::NoEnrolment), "{reason:?}");
    assert_eq!(reason.to_string(), "no TPM2 enrolment in the LUKS header");
    assert!(got.tpm.is_none());
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

/// Makes the device read-only right after the `nth` keyslot an enrolment adds
/// (so the token write that follows fails), and writable again when the rollback
/// starts: a header write error in the middle, as a failing disk gives one.
struct FailAfterKeyslot<'a> {
    dev: &'a LoopDevice,
    nth: usize,
    added: usize,
    events: Vec<String>,
}

impl Events for FailAfterKeyslot<'_> {
    fn event(&mut self, name: &str, _fields: &[(&str, &str)]) {
        self.events.push(name.to_string());
        match name {
            "keyslot_added" => {
                self.added += 1;
                if self.added == self.nth {
                    self.dev.set_readonly(true);
                }
            }
            "enrolment_rollback" => self.dev.set_readonly(false),
            _ => {}
        }
    }
}

fn interrupted_enrolment_leaves_nothing(nth: usize, recovery_key: bool) {
    let sw = Swtpm::start();
    let dir = TempDir::new("rollback");
    let img = luks_image(dir.path(), PASS);
    let dev = LoopDevice::attach(&img);
    let mut o = enroll_opts(&sw, &img);
    o.device = dev.path.clone();
    o.recovery_key = recovery_key;
    let mut events = FailAfterKeyslot {
        dev: &dev,
        nth,
        added: 0,
        events: Vec::new(),
    };
    let e = enroll(&o, &mut Scripted::new(&[PASS]), &mut events).unwrap_err();
    let seen = std::mem::take(&mut events.events);
    drop(events);
    drop(dev);
    // The header as the next reader sees it: no token of any kind, no keyslot
    // but the passphrase's, which still opens.
    let d = dump(&img);
    assert!(!d.contains("systemd-"), "{d}");
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    assert_eq!(v.token_refs().unwrap(), vec![], "{d}");
    assert_eq!(v.active_keyslots(), vec![0], "{d}");
    assert!(v.volume_key(Some(0), PASS.as_bytes()).is_ok());
    // and the operator is told the header is as it was
    assert!(
        matches!(e, BootError::PartlyWritten { left: None, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("the header is as it was"), "{e}");
    assert!(
        seen.iter().any(|n| n == "enrolment_rolled_back"),
        "{seen:?}"
    );
    // and enrolling again works (nothing half-written is in the way)
    drop(v);
    enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
}

#[test]
fn an_enrolment_whose_token_write_fails_leaves_no_token_and_no_keyslot() {
    interrupted_enrolment_leaves_nothing(1, false);
}

#[test]
fn an_enrolment_whose_recovery_token_write_fails_takes_the_tpm_enrolment_back_too() {
    interrupted_enrolment_leaves_nothing(2, true);
}

#[test]
fn enrolment_defines_the_audit_anchor_once_and_says_so() {
    let sw = Swtpm::start();
    let dir = TempDir::new("anchor");
    let img = luks_image(dir.path(), PASS);
    let h = vaultguard::tpm::nv::DEFAULT_AUDIT_NV_INDEX;
    let r = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(
        matches!(r.audit_anchor, AuditAnchor::Created { handle } if handle == h),
        "{:?}",
        r.audit_anchor
    );
    let lines = vaultguard::boot::commands::enrolment_lines("enrolled", &r);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("defined the audit log's TPM anchor (NV index 0x013fa0d1)")),
        "{lines:?}"
    );
    // Defined and not yet extended: the TPM has it, with no value.
    let mut tpm = got_tpm_reopen(&sw);
    assert_eq!(tpm.read_audit_index(h).unwrap(), None);
    tpm.extend_audit_index(h, &[9; 32]).unwrap();
    drop(tpm);
    // A reseal finds it there and leaves its value alone.
    let r = reseal(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(matches!(r.audit_anchor, AuditAnchor::AlreadyThere { .. }));
    let mut tpm = got_tpm_reopen(&sw);
    assert_eq!(
        tpm.read_audit_index(h).unwrap(),
        Some(vaultguard::tpm::nv::nv_extend(&[0; 32], &[9; 32]))
    );
}

#[test]
fn an_audit_anchor_that_cannot_be_defined_is_a_warning_not_a_failed_enrolment() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("anchor-owner");
    let img = luks_image(dir.path(), PASS);
    // An operator's own index sits at the handle.
    sw.tool(
        "tpm2_nvdefine",
        &[
            "0x013fa0d1",
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite",
        ],
    );
    let mut events = Recorded::default();
    let r = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut events,
    )
    .unwrap();
    assert!(
        matches!(
            r.audit_anchor,
            AuditAnchor::Failed {
                error: vaultguard::tpm::TpmError::NvIndexConflict { .. },
                ..
            }
        ),
        "{:?}",
        r.audit_anchor
    );
    let lines = vaultguard::boot::commands::enrolment_lines("enrolled", &r);
    assert!(
        lines.iter().any(|l| l.contains("warning")
            && l.contains("0x013fa0d1 exists but is not vaultguard's audit index")
            && l.contains("enrolment is complete")),
        "{lines:?}"
    );
    assert!(
        events.0.iter().any(|e| e == "audit_anchor_failed"),
        "{:?}",
        events.0
    );
    // The enrolment works: the TPM opens the vault.
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let mut p = Scripted::new(&[]);
    let got = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Tpm2);
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
    // Skipping it asks nothing of the TPM's NV.
    let dir2 = TempDir::new("anchor-skip");
    let img2 = luks_image(dir2.path(), PASS);
    let mut opts = enroll_opts(&sw, &img2);
    opts.audit_nv_index = None;
    let r = enroll(&opts, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    assert!(matches!(r.audit_anchor, AuditAnchor::Skipped));
}

#[derive(Default)]
struct Recorded(Vec<String>);

impl Events for Recorded {
    fn event(&mut self, name: &str, _fields: &[(&str, &str)]) {
        self.0.push(name.to_string());
    }
}
