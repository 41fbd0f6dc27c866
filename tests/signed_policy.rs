//! Signed PCR policies (PolicyAuthorize) against swtpm: vaultguard seals to a
//! public key and unseals given a signature over the live PCR values, in one
//! salted session; a signature for other PCR values, other PCRs, another key, a
//! forged one, an unreadable or huge signature file are each refused with one
//! line and never unseal.

mod common;

use common::{openssl_key, sign_live, signed_enrolment, Swtpm, TempDir};
use std::process::Command;
use std::time::Duration;
use vaultguard::tpm::policy::Bank;
use vaultguard::tpm::signed::{
    approved_policy, read_signature_file, PolicyKey, SignatureEntry, SignatureFile, SigningKey,
};
use vaultguard::tpm::{SealedObject, Tpm, TpmError};

fn open(sw: &Swtpm) -> Tpm {
    Tpm::open(&sw.tcti(), Duration::from_secs(5)).expect("connect to swtpm")
}

struct Enrolment {
    object: SealedObject,
    secret: Vec<u8>,
}

fn enrol(tpm: &mut Tpm, key: &PolicyKey, pin: Option<&[u8]>, file: SignatureFile) -> Enrolment {
    let (object, secret) = signed_enrolment(tpm, key, pin, None, file);
    Enrolment { object, secret }
}

fn with_file(object: &SealedObject, file: Result<SignatureFile, String>) -> SealedObject {
    let mut o = object.clone();
    o.signed.as_mut().unwrap().signatures = file;
    o
}

fn refusal(tpm: &mut Tpm, object: &SealedObject) -> String {
    match tpm.unseal(object, None) {
        Ok(_) => panic!("unsealed with a policy that must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn signed_unseal_is_one_salted_session_and_the_commands_are_counted() {
    let dir = TempDir::new("signed-count");
    for kind in ["ec", "rsa"] {
        let sw = Swtpm::start();
        let mut tpm = open(&sw);
        let key = SigningKey::from_pem(&openssl_key(dir.path(), kind)).unwrap();
        let mut file = SignatureFile::default();
        file.add(Bank::Sha256, &sign_live(&mut tpm, &key, &[9]));
        let e = enrol(&mut tpm, &key.public(), None, file);
        drop(tpm);
        let rec = sw.recorder();
        let mut tpm = Tpm::open(&rec.tcti(), Duration::from_secs(5)).unwrap();
        rec.take(); // Startup
        let secret = tpm.unseal(&e.object, None).expect("signed unseal");
        assert_eq!(secret.as_bytes(), e.secret.as_slice(), "{kind}");
        let sent = rec.take();
        let names: Vec<&str> = sent.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "StartAuthSession",
                "PolicyPCR",
                "LoadExternal",
                "VerifySignature",
                "FlushContext",
                "PolicyAuthorize",
                "PolicyPCR",
                "Load",
                "Unseal",
                "FlushContext"
            ],
            "{kind}"
        );
        // One session, salted with the SRK.
        assert_eq!(
            names.iter().filter(|n| **n == "StartAuthSession").count(),
            1
        );
        assert_eq!(sent[0].handle, Some(0x8100_0001));
    }
}

#[test]
fn signed_unseal_with_pin_and_after_a_new_signature() {
    let dir = TempDir::new("signed-pin");
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let key = SigningKey::from_pem(&openssl_key(dir.path(), "ec")).unwrap();
    let mut file = SignatureFile::default();
    file.add(Bank::Sha256, &sign_live(&mut tpm, &key, &[9]));
    let e = enrol(&mut tpm, &key.public(), Some(b"2468"), file.clone());
    let s = tpm.unseal(&e.object, Some(b"2468")).expect("PIN unseal");
    assert_eq!(s.as_bytes(), e.secret.as_slice());
    assert!(matches!(
        tpm.unseal(&e.object, Some(b"1111")),
        Err(TpmError::WrongPin { .. })
    ));

    // The "update": PCR 9 moves; the old signature no longer fits...
    tpm.latch(9, b"new initrd", "x", "y").unwrap();
    let why = tpm
        .unseal(&e.object, Some(b"2468"))
        .err()
        .unwrap()
        .to_string();
    assert!(why.contains("does not approve this boot"), "{why}");
    // ...until the new values are signed (appended: both stay in the file).
    file.add(Bank::Sha256, &sign_live(&mut tpm, &key, &[9]));
    assert_eq!(file.entries(Bank::Sha256).len(), 2);
    let o = with_file(&e.object, Ok(file));
    let s = tpm
        .unseal(&o, Some(b"2468"))
        .expect("unseal after re-signing");
    assert_eq!(s.as_bytes(), e.secret.as_slice());
}

#[test]
fn wrong_signatures_are_refused_with_one_line_and_never_unseal() {
    let dir = TempDir::new("signed-bad");
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let key = SigningKey::from_pem(&openssl_key(dir.path(), "ec")).unwrap();
    let other = SigningKey::from_pem(&openssl_key(dir.path(), "rsa")).unwrap();
    let good = sign_live(&mut tpm, &key, &[9]);
    let e = enrol(&mut tpm, &key.public(), None, SignatureFile::default());

    let one = |entry: &SignatureEntry| {
        let mut f = SignatureFile::default();
        f.add(Bank::Sha256, entry);
        Ok(f)
    };
    // No signature file at all.
    let why = refusal(
        &mut tpm,
        &with_file(
            &e.object,
            Err("no signature file (tpm2-pcr-signature.json in /etc/systemd)".into()),
        ),
    );
    assert!(why.contains("no signature file"), "{why}");
    // Signed by another key.
    let by_other = sign_live(&mut tpm, &other, &[9]);
    let why = refusal(&mut tpm, &with_file(&e.object, one(&by_other)));
    assert!(why.contains("other keys"), "{why}");
    // Signs other PCRs.
    let more_pcrs = sign_live(&mut tpm, &key, &[9, 11]);
    let why = refusal(&mut tpm, &with_file(&e.object, one(&more_pcrs)));
    assert!(why.contains("other PCRs"), "{why}");
    // A forged signature under the right key's fingerprint: the TPM rejects it.
    let other_ec = SigningKey::from_pem(&openssl_key(dir.path(), "ec")).unwrap();
    let mut forged = good.clone();
    forged.sig = other_ec.sign(&good.pol).unwrap();
    let why = refusal(&mut tpm, &with_file(&e.object, one(&forged)));
    assert!(why.contains("rejected the signature"), "{why}");
    // A signature of the wrong type for the key (RSA bytes for an EC key).
    let mut garbled = good.clone();
    garbled.sig = other.sign(&good.pol).unwrap();
    let why = refusal(&mut tpm, &with_file(&e.object, one(&garbled)));
    assert!(why.contains("not a DER ECDSA signature"), "{why}");
    // A signature of other PCR values, sole candidate (no PCR read before the
    // session): the TPM refuses at PolicyAuthorize; the check explains it.
    let mut stale = good.clone();
    let other_vals = vec![(9u32, vec![0x42u8; 32])];
    stale.pol = approved_policy(Bank::Sha256, &other_vals);
    stale.sig = key.sign(&stale.pol).unwrap();
    let o = with_file(&e.object, one(&stale));
    assert!(tpm.unseal(&o, None).is_err());
    let why = tpm.check_policy(&o, Some(15)).unwrap_err().to_string();
    assert!(why.contains("does not approve this boot"), "{why}");
    assert!(!why.contains('\n'));
    // And the good one opens it.
    let s = tpm.unseal(&with_file(&e.object, one(&good)), None).unwrap();
    assert_eq!(s.as_bytes(), e.secret.as_slice());
}

#[test]
fn signature_files_that_are_not_json_or_huge_are_refused_before_use() {
    let dir = TempDir::new("signed-files");
    let p = dir.path().join("sig.json");
    std::fs::write(&p, b"this is not json").unwrap();
    let e = read_signature_file(&p).unwrap_err().to_string();
    assert!(e.contains("is not JSON") && e.contains("sig.json"), "{e}");
    // Huge: refused by its size, before it is read (a sparse file of 2 GiB).
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(2 << 30).unwrap();
    let t = std::time::Instant::now();
    let e = read_signature_file(&p).unwrap_err().to_string();
    assert!(e.contains("more than"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// `policy sign --predicted -` (the update workflow's second half) signs exactly
/// the values it is given, reading the TPM for none of them; `--append` keeps the
/// earlier signatures; key files that cannot sign are refused with one line, exit 2.
#[test]
fn policy_sign_cli_signs_predicted_values_and_refuses_bad_keys() {
    use std::io::Write;
    let dir = TempDir::new("signed-cli");
    let key = dir.path().join("ec.pem");
    std::fs::write(&key, openssl_key(dir.path(), "ec")).unwrap();
    let sig = dir.path().join("sig.json");
    // No TPM anywhere: every value comes from --predicted.
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"tpm":{"tcti":"swtpm:host=127.0.0.1,port=9","timeout":0}}"#,
    )
    .unwrap();
    let run = |predicted: &str, append: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vaultguard"));
        cmd.arg("-c")
            .arg(&cfg)
            .args(["policy", "sign", "--private-key"])
            .arg(&key);
        cmd.args([
            "--public-key-pcrs",
            "9",
            "--predicted",
            "-",
            "--json",
            "--signature",
        ])
        .arg(&sig);
        if append {
            cmd.arg("--append");
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(predicted.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let v1 = "11".repeat(32);
    let out = run(
        &format!(r#"{{"bank":"sha256","pcrs":{{"9":"{v1}"}}}}"#),
        false,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = "22".repeat(32);
    let out = run(
        &format!(r#"{{"bank":"sha256","pcrs":{{"9":"{v2}"}}}}"#),
        true,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = read_signature_file(&sig).unwrap();
    let entries = file.entries(Bank::Sha256);
    assert_eq!(entries.len(), 2);
    let signer = SigningKey::from_pem(&std::fs::read(&key).unwrap()).unwrap();
    for (e, v) in entries.iter().zip([&v1, &v2]) {
        let want = approved_policy(
            Bank::Sha256,
            &[(9, vaultguard::encoding::hex_decode(v).unwrap())],
        );
        assert_eq!(e.pol, want);
        assert_eq!(e.pcrs, vec![9]);
        assert_eq!(e.pkfp, signer.public().fingerprint());
        assert!(vaultguard::tpm::signed::verify(
            &signer.public(),
            &e.pol,
            &e.sig
        ));
    }

    // Bad key files: one line each, exit 2, nothing written.
    let enc = dir.path().join("enc.pem");
    let o = Command::new("openssl")
        .args(["pkey", "-aes256", "-passout", "pass:x", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&enc)
        .output()
        .unwrap();
    assert!(o.status.success());
    let ed = dir.path().join("ed.pem");
    let o = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&ed)
        .output()
        .unwrap();
    assert!(o.status.success());
    for (bad, word) in [(&enc, "encrypted"), (&ed, "RSA-2048 or ECC P-256")] {
        let out = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
            .arg("-c")
            .arg(&cfg)
            .args(["policy", "sign", "--private-key"])
            .arg(bad)
            .args(["--public-key-pcrs", "9", "--signature"])
            .arg(dir.path().join("never.json"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(word), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!dir.path().join("never.json").exists());
    }
}

/// The entry with this TPM's verification ticket for its signature.
fn ticketed(tpm: &mut Tpm, key: &SigningKey, entry: &SignatureEntry) -> SignatureEntry {
    let ticket = tpm
        .signature_ticket(&key.public(), entry, &[])
        .expect("the TPM verifies the signature and gives a ticket");
    SignatureEntry {
        ticket: Some(ticket),
        ..entry.clone()
    }
}

/// With a ticket from `policy ticket` in the entry, PolicyAuthorize takes it and
/// LoadExternal + VerifySignature + FlushContext are not sent: seven commands,
/// still one salted session. The ticket outlives a power cycle (made in the
/// owner hierarchy: valid until TPM2_Clear).
#[test]
fn a_ticket_takes_the_signed_unseal_to_seven_commands_across_reboots() {
    let dir = TempDir::new("signed-ticket");
    for kind in ["ec", "rsa"] {
        let mut sw = Swtpm::start();
        let mut tpm = open(&sw);
        let key = SigningKey::from_pem(&openssl_key(dir.path(), kind)).unwrap();
        let entry = sign_live(&mut tpm, &key, &[9]);
        let entry = ticketed(&mut tpm, &key, &entry);
        let mut file = SignatureFile::default();
        file.add(Bank::Sha256, &entry);
        let text = file.to_json_string();
        assert!(text.contains("\"vaultguard_ticket\""), "{text}");
        let file = SignatureFile::parse(text.as_bytes()).unwrap();
        let e = enrol(&mut tpm, &key.public(), None, file);
        drop(tpm);
        sw.restart(); // a reboot: PCRs reset (PCR 9 as signed), owner proof kept
        let rec = sw.recorder();
        let mut tpm = Tpm::open(&rec.tcti(), Duration::from_secs(5)).unwrap();
        rec.take(); // Startup
        let secret = tpm
            .unseal(&e.object, None)
            .expect("signed unseal with a ticket");
        assert_eq!(secret.as_bytes(), e.secret.as_slice(), "{kind}");
        let sent = rec.take();
        let names: Vec<&str> = sent.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "StartAuthSession",
                "PolicyPCR",
                "PolicyAuthorize",
                "PolicyPCR",
                "Load",
                "Unseal",
                "FlushContext"
            ],
            "{kind}"
        );
        assert_eq!(sent[0].handle, Some(0x8100_0001));
    }
}

/// A ticket another TPM made, or one made for another entry, is refused by the
/// TPM (its HMAC is under this TPM's owner proof, over this approval): the
/// session is unchanged, the signature is verified as without a ticket and the
/// volume opens. A ticket never stands in for PCR values it was not made for.
#[test]
fn a_foreign_or_misplaced_ticket_falls_back_to_the_signature() {
    let dir = TempDir::new("signed-ticket-bad");
    let key = SigningKey::from_pem(&openssl_key(dir.path(), "ec")).unwrap();
    let sw = Swtpm::start();
    // Another TPM: a copy of the same pristine state would share the owner
    // proof, so clear it (new owner seed and proof, as any other chip has).
    let mut other = Swtpm::start();
    other.tool("tpm2_clear", &["-c", "p"]);
    let mut tpm = open(&sw);
    let mut elsewhere = open(&other);
    let entry = sign_live(&mut tpm, &key, &[9]);
    // Made by another TPM for the same signature.
    let foreign = ticketed(&mut elsewhere, &key, &entry);
    // Made by this TPM, for a signature of other PCR 9 values.
    tpm.latch(9, b"another initrd", "x", "y").unwrap();
    let later = sign_live(&mut tpm, &key, &[9]);
    let later = ticketed(&mut tpm, &key, &later);
    drop(tpm);
    let mut sw = sw;
    sw.restart(); // PCR 9 back to the value `entry` signs
    let mut tpm = open(&sw);
    let e = enrol(&mut tpm, &key.public(), None, SignatureFile::default());
    drop(tpm);
    let misplaced = SignatureEntry {
        ticket: later.ticket.clone(),
        ..entry.clone()
    };
    for (what, bad) in [("foreign", &foreign), ("misplaced", &misplaced)] {
        let mut file = SignatureFile::default();
        file.add(Bank::Sha256, bad);
        let object = with_file(&e.object, Ok(file));
        let rec = sw.recorder();
        let mut tpm = Tpm::open(&rec.tcti(), Duration::from_secs(5)).unwrap();
        rec.take();
        let secret = tpm.unseal(&object, None).expect(what);
        assert_eq!(secret.as_bytes(), e.secret.as_slice(), "{what}");
        let names: Vec<&str> = rec.take().iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "StartAuthSession",
                "PolicyPCR",
                "PolicyAuthorize", // the ticket, refused
                "LoadExternal",
                "VerifySignature",
                "FlushContext",
                "PolicyAuthorize",
                "PolicyPCR",
                "Load",
                "Unseal",
                "FlushContext"
            ],
            "{what}"
        );
    }
    // `later`'s own entry (ticket and all) approves other PCR 9 values: refused.
    let mut file = SignatureFile::default();
    file.add(Bank::Sha256, &later);
    let mut tpm = open(&sw);
    let why = refusal(&mut tpm, &with_file(&e.object, Ok(file)));
    assert!(why.contains("does not approve this boot"), "{why}");
}
