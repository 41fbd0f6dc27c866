//! Revocable signed policies against swtpm: an enrolment bound to a TPM NV
//! revocation counter opens with a signature made for the counter's current
//! value; bumping the counter (`policy revoke-older`) withdraws every older
//! signature, in the TPM (PolicyNV), not only in vaultguard's own check; a
//! systemd-style signature without the counter never opens it; a deleted and
//! re-created counter does not bring an old signature back.

mod common;

use common::{openssl_key, sign_live, signed_enrolment, Swtpm, TempDir};
use std::process::Command;
use std::time::Duration;
use vaultguard::tpm::counter::{counter_name, DEFAULT_REVOCATION_COUNTER};
use vaultguard::tpm::policy::Bank;
use vaultguard::tpm::signed::{
    approved_policy_revocable, signed_message, SignatureEntry, SignatureFile, SigningKey,
};
use vaultguard::tpm::{SealedObject, Tpm};

const H: u32 = DEFAULT_REVOCATION_COUNTER;

fn open(tcti: &str) -> Tpm {
    Tpm::open(tcti, Duration::from_secs(5)).expect("connect to swtpm")
}

/// A signature of the live PCR 9 for counter value `value` (as `policy sign
/// --revocation-counter` makes it).
fn sign_for(tpm: &mut Tpm, key: &SigningKey, value: u64) -> SignatureEntry {
    let live = tpm.read_pcrs(Bank::Sha256, &[9]).unwrap();
    let name = counter_name(H);
    let pol = approved_policy_revocable(Bank::Sha256, &live, &name, value);
    SignatureEntry {
        pcrs: vec![9],
        pkfp: key.public().fingerprint(),
        sig: key.sign(&signed_message(&pol, &name)).unwrap(),
        pol,
        counter: Some(value),
        ticket: None,
    }
}

fn file_of(entries: &[&SignatureEntry]) -> SignatureFile {
    let mut f = SignatureFile::default();
    for e in entries {
        f.add(Bank::Sha256, e);
    }
    f
}

struct Enrolment {
    object: SealedObject,
    secret: Vec<u8>,
}

/// Define the counter, seal to the key over PCR 9 (signed, revocable) + PCR 7
/// and the phase PCR 15 (literal).
fn enrol(tpm: &mut Tpm, key: &SigningKey) -> (Enrolment, u64) {
    let first = tpm
        .define_revocation_counter(H)
        .expect("define the counter");
    let (object, secret) =
        signed_enrolment(tpm, &key.public(), None, Some(H), SignatureFile::default());
    (Enrolment { object, secret }, first)
}

fn with_file(object: &SealedObject, file: SignatureFile) -> SealedObject {
    let mut o = object.clone();
    o.signed.as_mut().unwrap().signatures = Ok(file);
    o
}

fn refusal(tpm: &mut Tpm, object: &SealedObject) -> String {
    match tpm.unseal(object, None) {
        Ok(_) => panic!("unsealed with a signature that must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn revoke_older_withdraws_signatures_in_the_tpm() {
    let dir = TempDir::new("revocation");
    let mut sw = Swtpm::start();
    let key = SigningKey::from_pem(&openssl_key(dir.path(), "ec")).unwrap();
    let mut tpm = open(&sw.tcti());
    let (e, v0) = enrol(&mut tpm, &key);
    assert_eq!(tpm.read_revocation_counter(H).unwrap(), Some(v0));
    // Defining again keeps the counter (and its value).
    assert_eq!(tpm.define_revocation_counter(H).unwrap(), v0);

    // The TPM's name of the counter is the one computed in software.
    let out = sw.tool("tpm2_nvreadpublic", &[&format!("{H:#010x}")]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let name_hex: String = counter_name(H).iter().map(|b| format!("{b:02x}")).collect();
    assert!(text.contains(&name_hex), "{text}\nwanted name {name_hex}");

    // Signed for the current value: opens, one session.
    let s0 = sign_for(&mut tpm, &key, v0);
    let o = with_file(&e.object, file_of(&[&s0]));
    let secret = tpm
        .unseal(&o, None)
        .expect("unseal with a signature for v0");
    assert_eq!(secret.as_bytes(), e.secret.as_slice());
    drop(tpm);
    let rec = sw.recorder();
    let mut tpm = open(&rec.tcti());
    rec.take(); // Startup
    tpm.unseal(&o, None).expect("recorded unseal");
    let names: Vec<String> = rec.take().iter().map(|c| c.name().to_string()).collect();
    assert_eq!(
        names,
        [
            "StartAuthSession",
            "PolicyPCR",
            "NV_ReadPublic",
            "PolicyNV",
            "LoadExternal",
            "VerifySignature",
            "FlushContext",
            "PolicyAuthorize",
            "PolicyPCR",
            "Load",
            "Unseal",
            "FlushContext"
        ]
    );
    drop(tpm);
    let mut tpm = open(&sw.tcti());

    // A systemd-measure style signature (no counter) for the same PCRs never
    // opens it: vaultguard does not offer it...
    let plain = sign_live(&mut tpm, &key, &[9]);
    let why = refusal(&mut tpm, &with_file(&e.object, file_of(&[&plain])));
    assert!(why.contains("--revocation-counter"), "{why}");
    // ...and the TPM refuses it when it is presented as if it named the counter.
    let forged = SignatureEntry {
        counter: Some(v0),
        ticket: None,
        ..plain.clone()
    };
    refusal(&mut tpm, &with_file(&e.object, file_of(&[&forged])));

    // revoke-older: the counter moves on; the v0 signature is refused by the
    // TPM (the single candidate goes straight to PolicyNV) and explained.
    let v1 = tpm.increment_revocation_counter(H).unwrap();
    assert_eq!(v1, v0 + 1);
    let why = refusal(&mut tpm, &o);
    assert!(
        why.contains(&format!("= {v0}")) && why.contains("withdrawn"),
        "{why}"
    );
    // A signature for the new value opens it, beside the withdrawn one.
    let s1 = sign_for(&mut tpm, &key, v1);
    let o1 = with_file(&e.object, file_of(&[&s0, &s1]));
    let secret = tpm
        .unseal(&o1, None)
        .expect("unseal with a signature for v1");
    assert_eq!(secret.as_bytes(), e.secret.as_slice());

    // Deleted counter: one clear line, no unseal.
    drop(tpm);
    sw.tool("tpm2_nvundefine", &[&format!("{H:#010x}")]);
    let mut tpm = open(&sw.tcti());
    let why = refusal(&mut tpm, &o1);
    assert!(why.contains("is not defined on this TPM"), "{why}");
    // Re-created: it starts above every value it had, so neither old signature
    // comes back.
    let v2 = tpm.define_revocation_counter(H).unwrap();
    assert!(v2 > v1, "re-created counter at {v2}, was {v1}");
    let why = refusal(&mut tpm, &o1);
    assert!(why.contains("withdrawn"), "{why}");
    let s2 = sign_for(&mut tpm, &key, v2);
    let secret = tpm
        .unseal(&with_file(&e.object, file_of(&[&s2])), None)
        .expect("unseal after re-signing for the re-created counter");
    assert_eq!(secret.as_bytes(), e.secret.as_slice());
}

/// A header edit that drops the counter from the token, or points it at another
/// index, changes nothing the TPM accepts: the sealed object's PolicyAuthorize
/// names the enrolled counter (its policyRef), so the edited record is refused
/// as inconsistent before the TPM, and the TPM refuses it too.
#[test]
fn an_edited_counter_field_opens_nothing() {
    let dir = TempDir::new("revocation-edit");
    let sw = Swtpm::start();
    let key = SigningKey::from_pem(&openssl_key(dir.path(), "ec")).unwrap();
    let mut tpm = open(&sw.tcti());
    let (e, v0) = enrol(&mut tpm, &key);
    let s0 = sign_for(&mut tpm, &key, v0);
    // A plain signature too, so that a record without the counter has one to use.
    let plain = sign_live(&mut tpm, &key, &[9]);
    let good = with_file(&e.object, file_of(&[&s0, &plain]));
    assert!(tpm.unseal(&good, None).is_ok());
    // A second counter the attacker controls.
    let other = H + 1;
    let v_other = tpm.define_revocation_counter(other).unwrap();
    for counter in [None, Some(other)] {
        let mut o = good.clone();
        o.signed.as_mut().unwrap().counter = counter;
        let why = tpm
            .check_policy(&o, Some(15))
            .expect_err("an edited record must not pass the policy check")
            .to_string();
        assert!(why.contains("token was altered"), "{counter:?}: {why}");
        assert!(tpm.unseal(&o, None).is_err(), "{counter:?} unsealed");
    }
    // Even with a signature made for the other counter (the attacker's key would
    // be needed for that; here the real key signs it): the sealed object names
    // the enrolled counter, so the TPM refuses.
    let name = counter_name(other);
    let live = tpm.read_pcrs(Bank::Sha256, &[9]).unwrap();
    let pol = approved_policy_revocable(Bank::Sha256, &live, &name, v_other);
    let for_other = SignatureEntry {
        pcrs: vec![9],
        pkfp: key.public().fingerprint(),
        sig: key.sign(&signed_message(&pol, &name)).unwrap(),
        pol,
        counter: Some(v_other),
        ticket: None,
    };
    let mut o = with_file(&e.object, file_of(&[&for_other]));
    o.signed.as_mut().unwrap().counter = Some(other);
    assert!(tpm.unseal(&o, None).is_err(), "opened with another counter");
}

#[test]
fn a_counter_with_other_attributes_is_refused_and_left_alone() {
    let mut sw = Swtpm::start();
    // An ordinary 8-byte index where the counter would go.
    sw.tool(
        "tpm2_nvdefine",
        &[
            &format!("{H:#010x}"),
            "-s",
            "8",
            "-a",
            "ownerwrite|authread|authwrite",
        ],
    );
    let mut tpm = open(&sw.tcti());
    let why = tpm.define_revocation_counter(H).unwrap_err().to_string();
    assert!(why.contains("not a vaultguard revocation counter"), "{why}");
    assert!(tpm.increment_revocation_counter(H).is_err());
    drop(tpm);
    let out = sw.tool("tpm2_nvreadpublic", &[&format!("{H:#010x}")]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("authwrite"),
        "the index was changed"
    );
}

#[test]
fn policy_cli_signs_for_a_counter_and_revoke_older_bumps_it() {
    let dir = TempDir::new("revocation-cli");
    let sw = Swtpm::start();
    let key_pem = openssl_key(dir.path(), "rsa");
    let key_path = dir.path().join("rsa.pem");
    std::fs::write(&key_path, &key_pem).unwrap();
    let key = SigningKey::from_pem(&key_pem).unwrap();
    let mut tpm = open(&sw.tcti());
    let (e, v0) = enrol(&mut tpm, &key);
    drop(tpm);
    let sig = dir.path().join("sig.json");
    let cfg = dir.path().join("config.json");
    let audit = dir.path().join("audit.jsonl");
    std::fs::write(
        &cfg,
        serde_json::json!({"tpm": {"tcti": sw.tcti(), "timeout": 5},
                           "audit": {"path": audit}})
        .to_string(),
    )
    .unwrap();
    let vg = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let h = format!("{H:#010x}");
    let sig_s = sig.to_str().unwrap();
    let key_s = key_path.to_str().unwrap();
    // `policy sign` of PCR 9 for this counter into sig.json, plus `extra`.
    let sign = |extra: &[&str]| {
        let mut args = vec![
            "policy",
            "sign",
            "--private-key",
            key_s,
            "--public-key-pcrs",
            "9",
            "--revocation-counter",
            &h,
            "--signature",
            sig_s,
        ];
        args.extend_from_slice(extra);
        vg(&args)
    };
    // Sign the live PCR 9 for the live counter value.
    let (code, out, err) = sign(&["--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["counter_value"], v0);
    let file = vaultguard::tpm::signed::read_signature_file(&sig).unwrap();
    let mut tpm = open(&sw.tcti());
    let o = with_file(&e.object, file);
    assert_eq!(
        tpm.unseal(&o, None)
            .expect("CLI signature opens")
            .as_bytes(),
        e.secret.as_slice()
    );
    drop(tpm);
    // Sign ahead for the next value (as on the signing machine), appended.
    let next = (v0 + 1).to_string();
    let (code, out, err) = sign(&["--counter-value", &next, "--append"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("{h} = {next}")), "{out}");
    // --counter-value without the counter, a handle outside the owner range.
    let (code, _, err) = vg(&[
        "policy",
        "sign",
        "--private-key",
        key_s,
        "--counter-value",
        "3",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--counter-value needs --revocation-counter"),
        "{err}"
    );
    let (code, _, err) = vg(&[
        "policy",
        "revoke-older",
        "--revocation-counter",
        "0x01800400",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("outside the owner NV range"), "{err}");

    // revoke-older: bumped, audited, and the v0 signature no longer opens.
    let (code, out, err) = vg(&[
        "policy",
        "revoke-older",
        "--revocation-counter",
        &h,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (j["old_value"].as_u64(), j["new_value"].as_u64()),
        (Some(v0), Some(v0 + 1))
    );
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains("policy_revoke_older") && log.contains(&format!("\"new_value\":\"{next}\"")),
        "{log}"
    );
    let mut tpm = open(&sw.tcti());
    let only_v0 = {
        let mut f = SignatureFile::default();
        let all = vaultguard::tpm::signed::read_signature_file(&sig).unwrap();
        for en in all.entries(Bank::Sha256) {
            if en.counter == Some(v0) {
                f.add(Bank::Sha256, &en);
            }
        }
        f
    };
    let why = refusal(&mut tpm, &with_file(&e.object, only_v0));
    assert!(why.contains("withdrawn"), "{why}");
    // The signature made ahead for v0+1 opens it.
    let all = vaultguard::tpm::signed::read_signature_file(&sig).unwrap();
    assert_eq!(
        tpm.unseal(&with_file(&e.object, all), None)
            .expect("the signature made ahead opens after revoke-older")
            .as_bytes(),
        e.secret.as_slice()
    );
}

/// `reseal` of a revocable signed enrolment (e.g. after a firmware update moved
/// its literal PCR 7) keeps it signed and revocable: same key, signed PCRs and
/// counter, so the same signature file opens it afterwards, and revoke-older
/// still withdraws it.
#[test]
fn reseal_keeps_a_revocable_signed_enrolment_signed() {
    use common::{enroll_opts, luks_image, unlock_opts};
    use vaultguard::boot::{acquire_volume_key, enroll, reseal, Method, NoEvents};
    use vaultguard::luks::Vault;
    use vaultguard::prompt::Scripted;
    const PASS: &str = "reseal-revocable";

    let dir = TempDir::new("revocation-reseal");
    let mut sw = Swtpm::start();
    let img = luks_image(dir.path(), PASS);
    let key_pem = openssl_key(dir.path(), "ec");
    let key = SigningKey::from_pem(&key_pem).unwrap();
    let public = dir.path().join("pub.pem");
    let pub_out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(dir.path().join("ec.pem"))
        .output()
        .unwrap();
    std::fs::write(&public, &pub_out.stdout).unwrap();
    let sig = dir.path().join("sig.json");
    let mut opts = enroll_opts(&sw, &img);
    opts.pcrs = vec![7];
    opts.tpm.signature = Some(sig.clone());
    opts.signed = Some(vaultguard::boot::SignedEnrolment {
        public_key_pem: std::fs::read(&public).unwrap(),
        pcrs: vec![9],
        revocation_counter: Some(H),
    });
    enroll(&opts, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    let mut tpm = open(&sw.tcti());
    let v0 = tpm.read_revocation_counter(H).unwrap().unwrap();
    let s0 = sign_for(&mut tpm, &key, v0);
    drop(tpm);
    std::fs::write(&sig, file_of(&[&s0]).to_json_string()).unwrap();

    let open_with_tpm = |sw: &Swtpm| {
        let mut v = Vault::open(img.to_str().unwrap()).unwrap();
        let mut uopts = unlock_opts(sw, &img);
        uopts.tpm.as_mut().unwrap().signature = Some(sig.clone());
        let mut p = Scripted::new(&[PASS]);
        let got = acquire_volume_key(&mut v, &uopts, &mut p, &mut NoEvents).unwrap();
        (got.method, p.said)
    };
    assert_eq!(open_with_tpm(&sw).0, Method::Tpm2);

    // A firmware update moves PCR 7 (literal): the TPM refuses, reseal.
    sw.tool(
        "tpm2_pcrextend",
        &[&format!("7:sha256={}", "0a".repeat(32))],
    );
    assert_eq!(open_with_tpm(&sw).0, Method::Passphrase);
    let mut ropts = enroll_opts(&sw, &img);
    ropts.tpm.signature = Some(sig.clone());
    reseal(&ropts, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let tokens: Vec<_> = v
        .tpm2_tokens()
        .into_iter()
        .filter_map(|(_, t)| t.ok())
        .collect();
    assert_eq!(tokens.len(), 1);
    let t = &tokens[0];
    assert!(t.pubkey.is_some(), "the reseal dropped the signed policy");
    assert_eq!(
        (t.pubkey_pcrs.clone(), t.pcrs.clone(), t.revocation_counter),
        (vec![9], vec![7, 15], Some(H))
    );
    // The same signature file opens it; revoke-older still withdraws it.
    assert_eq!(open_with_tpm(&sw).0, Method::Tpm2);
    let mut tpm = open(&sw.tcti());
    tpm.increment_revocation_counter(H).unwrap();
    drop(tpm);
    let (method, said) = open_with_tpm(&sw);
    assert_eq!(method, Method::Passphrase);
    assert!(said.iter().any(|l| l.contains("withdrawn")), "{said:?}");
}

/// A verification ticket (`policy ticket`) saves the revocable unseal the same
/// three commands as a plain one, and withdraws nothing from revocation: the
/// TPM checks PolicyNV before it looks at the ticket, so after revoke-older the
/// ticketed v0 signature opens nothing.
#[test]
fn a_ticket_does_not_outlive_revocation() {
    let dir = TempDir::new("revocation-ticket");
    let sw = Swtpm::start();
    let key = SigningKey::from_pem(&openssl_key(dir.path(), "ec")).unwrap();
    let mut tpm = open(&sw.tcti());
    let (e, v0) = enrol(&mut tpm, &key);
    let mut s0 = sign_for(&mut tpm, &key, v0);
    s0.ticket = Some(
        tpm.signature_ticket(&key.public(), &s0, &counter_name(H))
            .expect("a ticket for the v0 signature"),
    );
    let o = with_file(&e.object, file_of(&[&s0]));
    drop(tpm);
    let rec = sw.recorder();
    let mut tpm = open(&rec.tcti());
    rec.take(); // Startup
    let secret = tpm.unseal(&o, None).expect("unseal with the ticket");
    assert_eq!(secret.as_bytes(), e.secret.as_slice());
    let names: Vec<String> = rec.take().iter().map(|c| c.name().to_string()).collect();
    assert_eq!(
        names,
        [
            "StartAuthSession",
            "PolicyPCR",
            "NV_ReadPublic",
            "PolicyNV",
            "PolicyAuthorize",
            "PolicyPCR",
            "Load",
            "Unseal",
            "FlushContext"
        ]
    );
    tpm.increment_revocation_counter(H).unwrap();
    let why = refusal(&mut tpm, &o);
    assert!(why.contains("withdrawn"), "{why}");
}
