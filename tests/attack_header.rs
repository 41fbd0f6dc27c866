//! Refusals for LUKS2 headers edited offline: a `systemd-tpm2` token whose
//! `keyslots` names a slot that is not the TPM's, a token that lists one slot many
//! times, a token whose `tpm2-policy-hash` was changed. Whoever can write the
//! header can destroy it outright; what must not happen is that vaultguard, run
//! by the operator, destroys the operator's own keys or sends them down the wrong
//! path ("run reseal") on such a header.
//!
//! Each test enrols on a LUKS2 image in a file with swtpm, edits the header with
//! `cryptsetup token export/import` as an attacker would, and asserts what the
//! operator is left with: which keys still open the vault, and what was said.

mod common;

use common::{enroll_opts, import_token, luks_image, run, unlock_opts, Swtpm, TempDir};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vaultguard::boot::commands::enrolment_lines;
use vaultguard::boot::TpmRefusal;
use vaultguard::boot::{acquire_volume_key, enroll, reseal, Method, NoEvents};
use vaultguard::luks::Vault;
use vaultguard::prompt::Scripted;
use vaultguard::tpm::policy::{self, Bank};
use vaultguard::tpm::{Alteration, TpmError};

const PASS: &str = "correct horse battery staple";

fn export_token(img: &Path, id: u32) -> Value {
    let out = run(Command::new("cryptsetup")
        .args(["token", "export", "--token-id", &id.to_string()])
        .arg(img));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn edit_token(img: &Path, id: u32, edit: impl FnOnce(&mut Value)) {
    let mut t = export_token(img, id);
    edit(&mut t);
    import_token(img, id, &t);
}

/// Whether `key` opens keyslot `slot` (and only that slot is tried).
fn opens(img: &Path, slot: u32, key: &str) -> bool {
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    v.volume_key(Some(slot), key.as_bytes()).is_ok()
}

fn active_keyslots(img: &Path) -> Vec<u32> {
    Vault::open(img.to_str().unwrap())
        .unwrap()
        .active_keyslots()
}

fn extend_pcr(sw: &mut Swtpm, pcr: u32) {
    sw.tool(
        "tpm2_pcrextend",
        &[&format!("{pcr}:sha256={}", "0a".repeat(32))],
    );
}

/// What the kept slots' lines say, as `vaultguard reseal` prints them.
fn kept_lines(r: &vaultguard::boot::EnrollReport) -> Vec<String> {
    enrolment_lines("resealed into", r)
        .into_iter()
        .filter(|l| l.contains("kept keyslot"))
        .collect()
}

#[test]
fn reseal_keeps_the_passphrase_slot_a_tampered_token_lists() {
    let sw = Swtpm::start();
    let dir = TempDir::new("attack-pass");
    let img = luks_image(dir.path(), PASS);
    let first = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    // The attacker points the TPM token at the passphrase's keyslot.
    edit_token(&img, first.token, |t| t["keyslots"] = json!(["0"]));

    let r = reseal(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(
        opens(&img, 0, PASS),
        "the passphrase no longer opens slot 0"
    );
    assert!(
        !r.removed.iter().any(|&(_, slot)| slot == 0),
        "{:?}",
        r.removed
    );
    let kept = kept_lines(&r);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].contains("kept keyslot 0"), "{kept:?}");
    assert!(
        kept[0].contains("the passphrase used for this reseal opens it"),
        "{kept:?}"
    );
    assert!(
        kept[0].contains("the old token's TPM secret does not open it"),
        "{kept:?}"
    );
    // The new enrolment works; the old token is gone.
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    assert_eq!(v.tpm2_tokens().len(), 1);
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
fn reseal_keeps_a_slot_another_token_refers_to() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("attack-other");
    let img = luks_image(dir.path(), PASS);
    let mut o = enroll_opts(&sw, &img);
    o.recovery_key = true;
    let first = enroll(&o, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    let recovery =
        String::from_utf8(first.recovery_key.as_ref().unwrap().as_bytes().to_vec()).unwrap();
    let recovery_slot = first.recovery_keyslot.unwrap();
    // The TPM token now claims the recovery key's slot; the TPM refuses (a PCR
    // changed), so the reseal is authorised with the passphrase.
    edit_token(&img, first.token, |t| {
        t["keyslots"] = json!([recovery_slot.to_string()])
    });
    extend_pcr(&mut sw, 7);
    let r = reseal(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(
        opens(&img, recovery_slot, &recovery),
        "the recovery key no longer opens its slot"
    );
    assert!(opens(&img, 0, PASS));
    let kept = kept_lines(&r);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].contains(&format!("kept keyslot {recovery_slot}")),
        "{kept:?}"
    );
    assert!(
        kept[0].contains("token 1 (systemd-recovery) refers to it"),
        "{kept:?}"
    );
}

#[test]
fn reseal_keeps_the_tpm_slot_when_a_token_of_another_kind_refers_to_it() {
    // Here the slot IS the old TPM slot (the old secret opens it), but another
    // token uses it too: removing it would break that token.
    let sw = Swtpm::start();
    let dir = TempDir::new("attack-shared");
    let img = luks_image(dir.path(), PASS);
    let first = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    let other = json!({"type": "x-site-escrow", "keyslots": [first.keyslot.to_string()]});
    import_token(&img, 5, &other);
    let r = reseal(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(
        active_keyslots(&img).contains(&first.keyslot),
        "{:?}",
        active_keyslots(&img)
    );
    assert_eq!(
        export_token(&img, 5)["keyslots"],
        json!([first.keyslot.to_string()])
    );
    let kept = kept_lines(&r);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].contains("token 5 (x-site-escrow) refers to it"),
        "{kept:?}"
    );
}

#[test]
fn reseal_keeps_the_slot_of_the_key_used_and_removes_the_proven_tpm_slot() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("attack-used");
    let img = luks_image(dir.path(), PASS);
    let first = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    // The token lists its own slot and the passphrase's; after a firmware update
    // the TPM refuses, and the passphrase authorises the reseal.
    edit_token(&img, first.token, |t| {
        t["keyslots"] = json!(["0", first.keyslot.to_string()])
    });
    extend_pcr(&mut sw, 4);
    let r = reseal(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(
        opens(&img, 0, PASS),
        "the passphrase no longer opens slot 0"
    );
    // The old TPM slot is proven the token's (its binding, keyed by the volume
    // key, names it) and goes; slot 0 stays.
    assert_eq!(r.removed, vec![(first.token, first.keyslot)]);
    assert_eq!(active_keyslots(&img), vec![0, r.keyslot]);
    let kept = kept_lines(&r);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].contains("kept keyslot 0"), "{kept:?}");
}

#[test]
fn reseal_keeps_a_slot_nothing_proves_is_the_tpms() {
    // A token without vaultguard's binding (as systemd writes them, or as an
    // attacker strips it) on a TPM that can no longer unseal it: nothing proves
    // which slot its secret opened, so the slot stays and the operator is told.
    let mut sw = Swtpm::start();
    let dir = TempDir::new("attack-unproven");
    let img = luks_image(dir.path(), PASS);
    let first = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    edit_token(&img, first.token, |t| {
        t.as_object_mut().unwrap().remove("vaultguard_keyslot_macs");
    });
    extend_pcr(&mut sw, 7);
    let r = reseal(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert!(r.removed.iter().all(|&(_, s)| s != first.keyslot));
    assert!(active_keyslots(&img).contains(&first.keyslot));
    let kept = kept_lines(&r);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].contains("nothing proves it is the old TPM enrolment's"),
        "{kept:?}"
    );
    assert!(kept[0].contains("cryptsetup luksKillSlot"), "{kept:?}");
}

#[test]
fn a_token_listing_one_slot_many_times_costs_one_kdf_run() {
    let sw = Swtpm::start();
    let dir = TempDir::new("attack-dups");
    let img = luks_image(dir.path(), PASS);
    // A second passphrase with a deliberately slow KDF, in keyslot 1.
    let slow = "a slow second passphrase";
    let pass_file = dir.path().join("pass");
    let slow_file = dir.path().join("slow");
    std::fs::write(&pass_file, PASS).unwrap();
    std::fs::write(&slow_file, slow).unwrap();
    run(Command::new("cryptsetup")
        .args([
            "luksAddKey",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "400000",
            "--key-slot",
            "1",
            "--key-file",
        ])
        .arg(&pass_file)
        .arg(&img)
        .arg(&slow_file));
    let first = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    // One KDF run of the slow slot, for scale.
    let start = Instant::now();
    assert!(!opens(&img, 1, "not the slow passphrase"));
    let one_run = start.elapsed();
    // The token lists the slow slot 20 times, and two more copies of it do too.
    let mut t = export_token(&img, first.token);
    t["keyslots"] = json!(vec!["1"; 20]);
    import_token(&img, first.token, &t);
    import_token(&img, 6, &t);
    import_token(&img, 7, &t);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let start = Instant::now();
    let got = acquire_volume_key(
        &mut v,
        &unlock_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    let took = start.elapsed();
    assert_eq!(got.method, Method::Passphrase);
    // One run of the slow KDF plus three unseals and the passphrase: far less
    // than the 60 runs the header asks for.
    assert!(
        took < one_run * 4 + Duration::from_secs(2),
        "{took:?} for 60 listed tries of a slot whose KDF takes {one_run:?}"
    );
}

/// The policy digest of the TPM's current sha256 values of `pcrs` (phase PCR
/// included as it is now), as a consistent-looking forged token would carry.
fn live_values(sw: &mut Swtpm, pcrs: &[u32]) -> Vec<(u32, Vec<u8>)> {
    let mut tpm = vaultguard::tpm::Tpm::open(&sw.tcti(), Duration::from_secs(5)).unwrap();
    tpm.read_pcrs(Bank::Sha256, pcrs).unwrap()
}

#[test]
fn a_tampered_policy_hash_is_reported_as_tampering_not_as_a_pcr_change() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("attack-policy");
    let img = luks_image(dir.path(), PASS);
    let first = enroll(
        &enroll_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    extend_pcr(&mut sw, 7);
    // A forged token that is consistent with itself and with the live PCRs: the
    // policy hash and recorded values say "nothing changed"; only the sealed
    // object still carries the old policy.
    let values = live_values(&mut sw, &[0, 2, 4, 7, 15]);
    let digest = policy::sealing_policy(Bank::Sha256, &values, false);
    edit_token(&img, first.token, |t| {
        t["tpm2-policy-hash"] = json!(vaultguard::encoding::hex_encode(&digest));
        t["vaultguard_pcr_values"] = Value::Object(
            values
                .iter()
                .map(|(p, v)| (p.to_string(), json!(vaultguard::encoding::hex_encode(v))))
                .collect(),
        );
    });
    let mut p = Scripted::new(&[PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    let reason = got.fallback_reason.unwrap();
    assert!(
        matches!(
            reason,
            TpmRefusal::TokenAltered {
                err: TpmError::Altered(Alteration::PolicyNotTheObjects),
                ..
            }
        ),
        "{reason:?}"
    );
    let reason = reason.to_string();
    assert!(reason.contains("was altered or damaged"), "{reason}");
    assert!(reason.contains("tpm2-policy-hash"), "{reason}");
    assert!(!reason.contains("reseal"), "{reason}");
    assert!(!reason.contains("PCRs )"), "{reason}");

    // Only the hash changed (values left as enrolled): the token contradicts
    // itself, whatever the PCRs do.
    edit_token(&img, first.token, |t| {
        t["tpm2-policy-hash"] = json!("5a".repeat(32));
        t.as_object_mut().unwrap().remove("vaultguard_pcr_values");
    });
    let mut p = Scripted::new(&[PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    let reason = got.fallback_reason.unwrap();
    assert!(
        matches!(
            reason,
            TpmRefusal::TokenAltered {
                err: TpmError::Altered(Alteration::PolicyNotTheObjects),
                ..
            }
        ),
        "{reason:?}"
    );
    let reason = reason.to_string();
    assert!(reason.contains("was altered or damaged"), "{reason}");
    assert!(!reason.contains("reseal"), "{reason}");
}
