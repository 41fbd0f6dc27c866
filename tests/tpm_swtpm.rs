//! The TPM edge against a real (software) TPM 2.0: swtpm on loopback, a fresh
//! pristine state per test.

mod common;

use common::{Swtpm, TempDir, TpmCommand};
use std::time::Duration;
use vaultguard::luks::token::Tpm2Token;
use vaultguard::tpm::policy::{self, Bank};
use vaultguard::tpm::srk::{SerializedKey, SRK_HANDLE};
use vaultguard::tpm::{
    Alteration, BlobDefect, Malformed, PrimaryAlg, SealRequest, SealedObject, SrkDefect, Tpm,
    TpmError,
};

fn open(sw: &Swtpm) -> Tpm {
    open_at(&sw.tcti())
}

fn open_at(tcti: &str) -> Tpm {
    Tpm::open(tcti, Duration::from_secs(5)).expect("connect to swtpm")
}

/// The TPM's input for `sealed`, as an enrolment to PCRs `pcrs` (+ 15) records it.
fn token_from(sealed: &vaultguard::tpm::Sealed, pcrs: &[u32], pin: bool) -> SealedObject {
    let mut all: Vec<u32> = pcrs.to_vec();
    all.push(15);
    all.sort_unstable();
    SealedObject {
        blob: sealed.blob.clone(),
        pcrs: all,
        bank: Bank::Sha256,
        primary_alg: PrimaryAlg::Ecc,
        policy_hash: sealed.policy_hash.clone(),
        pin,
        salt: sealed.salt.clone(),
        srk: Some(sealed.srk.clone()),
        pcr_values: Some(sealed.pcr_values.iter().cloned().collect()),
        signed: None,
    }
}

/// The same through the `systemd-tpm2` token JSON the LUKS header stores.
fn through_the_token(object: &SealedObject) -> SealedObject {
    let token = Tpm2Token {
        keyslots: vec![1],
        blob: object.blob.clone(),
        pcrs: object.pcrs.clone(),
        bank: vaultguard::boot::token_bank(object.bank),
        primary_alg: vaultguard::luks::token::PrimaryAlg::Ecc,
        policy_hash: object.policy_hash.clone(),
        pin: object.pin,
        salt: object.salt.clone(),
        srk: object.srk.clone(),
        pcr_values: object.pcr_values.clone(),
        keyslot_macs: Default::default(),
        eventlog: Default::default(),
        pubkey: None,
        pubkey_pcrs: Vec::new(),
        revocation_counter: None,
    };
    vaultguard::boot::sealed_object(&Tpm2Token::from_json(&token.to_json()).unwrap()).unwrap()
}

/// Create, on `sw`, another ECC storage key than the SRK (other unique data,
/// so another key), as a transient object saved in the context file `ctx`.
fn create_other_storage_key(sw: &mut Swtpm, ctx: &std::path::Path) {
    sw.tool(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc256:aes128cfb",
            "-u",
            "/dev/null",
            "-c",
            ctx.to_str().unwrap(),
        ],
    );
}

fn seal(tpm: &mut Tpm, pcrs: &[u32], pin: Option<&[u8]>) -> vaultguard::tpm::Sealed {
    tpm.seal(&SealRequest {
        bank: Bank::Sha256,
        pcrs,
        phase_pcr: Some(15),
        pin,
    })
    .expect("seal")
}

#[test]
fn seal_then_unseal_returns_the_same_secret() {
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[0, 2, 4, 7], None);
    assert_eq!(sealed.secret.len(), 32);
    assert_eq!(
        sealed
            .pcr_values
            .iter()
            .map(|(p, _)| *p)
            .collect::<Vec<_>>(),
        vec![0, 2, 4, 7, 15]
    );
    let token = token_from(&sealed, &[0, 2, 4, 7], false);
    // through the JSON the header stores
    let token = through_the_token(&token);
    let secret = tpm.unseal(&token, None).expect("unseal");
    assert!(secret.ct_eq(sealed.secret.as_bytes()));
    // a second TPM context (as a later boot would open) gets it too
    drop(tpm);
    let mut tpm = open(&sw);
    assert!(tpm
        .unseal(&token, None)
        .unwrap()
        .ct_eq(sealed.secret.as_bytes()));
}

/// Seal to PCR 7 (with `pin`, if any), then unseal through a recording relay and
/// return the TPM commands the unseal sent.
fn recorded_unseal(pin: Option<&[u8]>) -> Vec<TpmCommand> {
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], pin);
    let token = token_from(&sealed, &[7], pin.is_some());
    drop(tpm);
    let rec = sw.recorder();
    let mut tpm = open_at(&rec.tcti());
    rec.take(); // Startup: a simulator needs it, the kernel does it for a device
    let secret = tpm.unseal(&token, pin).expect("unseal");
    assert!(secret.ct_eq(sealed.secret.as_bytes()));
    rec.take()
}

/// The boot path's unseal is the shortest sequence that still protects the secret:
/// one salted session (one ECDH), no redundant capability or public-area reads
/// (the SRK comes from the token's `tpm2_srk`, not a ReadPublic), no extra HMAC
/// session for the load (every command is a round trip, tens of milliseconds on a
/// real TPM).
#[test]
fn unseal_is_one_salted_session_and_five_commands() {
    let sent = recorded_unseal(None);
    let names: Vec<&str> = sent.iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "StartAuthSession",
            "PolicyPCR",
            "Load",
            "Unseal",
            "FlushContext"
        ]
    );
    // salted with the SRK; the Unseal ended the session, the flush is the object's
    assert_eq!(sent[0].handle, Some(SRK_HANDLE));
    assert_eq!(sent[4].handle.map(|h| h >> 24), Some(0x80));
}

/// With a PIN, the response is encrypted under a second salted session bound to
/// the object; the policy session (where a wrong PIN must fail) stays unbound.
/// The live SRK is read first (ReadPublic) and compared with the token's: the
/// PIN's HMAC must never be keyed by a session salted to a key someone wrote
/// into the header.
#[test]
fn unseal_with_a_pin_adds_a_session_bound_to_the_object() {
    let sent = recorded_unseal(Some(b"2468"));
    let mut names: Vec<&str> = sent.iter().map(|c| c.name()).collect();
    // A DA-protected authorisation may be answered TPM_RC_RETRY first (the TPM
    // wants its NV first); tpm2-tss resubmits the same command.
    names.dedup_by(|a, b| a == b && *a == "Unseal");
    assert_eq!(
        names,
        [
            "ReadPublic",
            "StartAuthSession",
            "PolicyPCR",
            "PolicyAuthValue",
            "Load",
            "StartAuthSession",
            "Unseal",
            "FlushContext",
            "FlushContext"
        ]
    );
    const RH_NULL: u32 = 0x4000_0007;
    let sessions: Vec<_> = sent
        .iter()
        .filter(|c| c.name() == "StartAuthSession")
        .collect();
    let (policy, enc) = (sessions[0], sessions[1]);
    assert_eq!(
        (policy.handle, policy.handle2),
        (Some(SRK_HANDLE), Some(RH_NULL))
    );
    assert_eq!(enc.handle, Some(SRK_HANDLE));
    assert_eq!(
        enc.handle2.map(|h| h >> 24),
        Some(0x80),
        "bound to the loaded object"
    );
}

#[test]
fn every_salted_session_works() {
    // Each unseal runs a session salted by ECDH with the SRK. A TSS that drops the
    // leading zero bytes of the shared secret fails about one session in 256 (the
    // mbedTLS backend did, initramfs/build-cdeps.sh patches it): 1,500 sessions
    // would all succeed by chance with probability (255/256)^1500, under 0.3 %.
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    let token = token_from(&sealed, &[7], false);
    for i in 0..1500 {
        match tpm.unseal(&token, None) {
            Ok(s) => assert!(
                s.ct_eq(sealed.secret.as_bytes()),
                "session {i}: wrong secret"
            ),
            Err(e) => panic!("session {i} failed: {e}"),
        }
    }
}

#[test]
fn policy_arithmetic_matches_the_tpm() {
    let mut sw = Swtpm::start();
    sw.tool(
        "tpm2_pcrextend",
        &["4:sha256=0101010101010101010101010101010101010101010101010101010101010101"],
    );
    let mut tpm = open(&sw);
    for pin in [false, true] {
        let pcrs = [0, 2, 4, 7, 15];
        let live = tpm.read_pcrs(Bank::Sha256, &pcrs).unwrap();
        let ours = policy::sealing_policy(Bank::Sha256, &live, pin);
        let theirs = tpm.trial_policy(Bank::Sha256, &pcrs, pin).unwrap();
        assert_eq!(ours, theirs, "pin={pin}");
    }
    let live = tpm.read_pcrs(Bank::Sha1, &[7, 9]).unwrap();
    assert_eq!(
        policy::sealing_policy(Bank::Sha1, &live, false),
        tpm.trial_policy(Bank::Sha1, &[7, 9], false).unwrap()
    );
}

/// The policy digest tpm2-tools computes (a trial session on the TPM, with
/// `tpm2_policypcr` over PCR values given in a file, then `tpm2_policyauthvalue`
/// for a PIN): an implementation other than this crate's, and other than the
/// tss-esapi trial session `trial_policy` runs.
fn tpm2_tools_policy(
    sw: &mut Swtpm,
    dir: &std::path::Path,
    pcrs: &str,
    values: &[u8],
    pin: bool,
) -> Vec<u8> {
    let session = dir.join("trial.ctx");
    let digest = dir.join("policy.digest");
    let values_file = dir.join("pcr.values");
    std::fs::write(&values_file, values).unwrap();
    let (s, d, f) = (
        session.to_str().unwrap(),
        digest.to_str().unwrap(),
        values_file.to_str().unwrap(),
    );
    sw.tool("tpm2_startauthsession", &["-S", s]);
    sw.tool(
        "tpm2_policypcr",
        &["-S", s, "-l", &format!("sha256:{pcrs}"), "-f", f, "-L", d],
    );
    if pin {
        sw.tool("tpm2_policyauthvalue", &["-S", s, "-L", d]);
    }
    sw.tool("tpm2_flushcontext", &[s]);
    std::fs::read(&digest).unwrap()
}

#[test]
fn the_enrolled_policy_hash_is_the_one_tpm2_tools_computes() {
    let mut sw = Swtpm::start();
    let dir = common::TempDir::new("policypcr");
    // Non-trivial values, and the phase PCR already extended: the enrolment must
    // bind PCR 15 to zeros, not to its live value.
    sw.tool(
        "tpm2_pcrextend",
        &["4:sha256=0101010101010101010101010101010101010101010101010101010101010101"],
    );
    sw.tool(
        "tpm2_pcrextend",
        &["15:sha256=0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"],
    );
    // The live values of 0,2,4,7 as tpm2-tools reads them, then 32 zero bytes
    // for PCR 15.
    let live = dir.path().join("live.values");
    sw.tool(
        "tpm2_pcrread",
        &["sha256:0,2,4,7", "-o", live.to_str().unwrap()],
    );
    let mut values = std::fs::read(&live).unwrap();
    assert_eq!(values.len(), 4 * 32);
    values.extend_from_slice(&[0; 32]);
    for pin in [false, true] {
        let theirs = tpm2_tools_policy(&mut sw, dir.path(), "0,2,4,7,15", &values, pin);
        let mut tpm = open(&sw);
        let sealed = seal(&mut tpm, &[0, 2, 4, 7], pin.then_some(b"2468".as_slice()));
        drop(tpm);
        assert_eq!(theirs.len(), 32);
        assert_eq!(sealed.policy_hash, theirs, "pin={pin}");
    }
    // And a one-PCR policy over values tpm2-tools did not read: the arithmetic
    // alone, against a known digest of the selection.
    let theirs = tpm2_tools_policy(&mut sw, dir.path(), "7", &[0x5a; 32], false);
    assert_eq!(
        policy::sealing_policy(Bank::Sha256, &[(7, vec![0x5a; 32])], false),
        theirs
    );
}

#[test]
fn extending_a_bound_pcr_is_refused_with_that_pcr_named() {
    let mut sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[0, 2, 4, 7], None);
    let token = token_from(&sealed, &[0, 2, 4, 7], false);
    drop(tpm);
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000007"],
    );
    let mut tpm = open(&sw);
    let err = tpm.check_policy(&token, Some(15)).unwrap_err();
    match &err {
        TpmError::PcrMismatch { changed, .. } => assert_eq!(changed, &vec![7]),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("PCR 7 changed"), "{err}");
    // and the TPM itself refuses too, without trusting our pre-check
    assert!(matches!(
        tpm.unseal(&token, None),
        Err(TpmError::PcrMismatch { .. })
    ));
}

#[test]
fn pin_right_and_wrong() {
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], Some(b"2468"));
    assert!(sealed.salt.as_ref().is_some_and(|s| s.len() == 32));
    let token = token_from(&sealed, &[7], true);
    let before = tpm.da_tries_left().unwrap();
    match tpm.unseal(&token, Some(b"1111")) {
        Err(TpmError::WrongPin {
            tries_left: Some(n),
        }) => assert_eq!(n, before - 1),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("wrong PIN unsealed"),
    }
    assert!(tpm
        .unseal(&token, Some(b"2468"))
        .unwrap()
        .ct_eq(sealed.secret.as_bytes()));
    assert!(matches!(
        tpm.unseal(&token, None),
        Err(TpmError::PinRequired)
    ));
}

#[test]
fn da_lockout_is_reported_as_such() {
    let mut sw = Swtpm::start();
    sw.tool(
        "tpm2_dictionarylockout",
        &["-s", "-n", "2", "-t", "600", "-l", "600"],
    );
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], Some(b"2468"));
    let token = token_from(&sealed, &[7], true);
    for _ in 0..2 {
        assert!(matches!(
            tpm.unseal(&token, Some(b"0000")),
            Err(TpmError::WrongPin { .. })
        ));
    }
    assert!(tpm.in_lockout().unwrap());
    let err = tpm.unseal(&token, Some(b"2468")).unwrap_err();
    assert!(
        matches!(
            err,
            TpmError::Lockout {
                recovery_seconds: Some(600)
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("dictionary-attack lockout"));
}

#[test]
fn objects_without_pin_are_noda() {
    let mut sw = Swtpm::start();
    sw.tool(
        "tpm2_dictionarylockout",
        &["-s", "-n", "1", "-t", "600", "-l", "600"],
    );
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    let token = token_from(&sealed, &[7], false);
    let (_, public) = vaultguard::tpm::split_blob(&token.blob).unwrap();
    assert!(public.object_attributes().no_da());
    assert!(
        !public.object_attributes().user_with_auth(),
        "policy-only authorisation"
    );
    let with_pin = seal(&mut tpm, &[7], Some(b"1"));
    let (_, public) = vaultguard::tpm::split_blob(&with_pin.blob).unwrap();
    assert!(
        !public.object_attributes().no_da(),
        "a PIN must be DA-protected"
    );
}

#[test]
fn latch_makes_a_second_unseal_impossible() {
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[0, 7], None);
    let token = token_from(&sealed, &[0, 7], false);
    let secret = tpm.unseal(&token, None).unwrap();
    assert!(secret.ct_eq(sealed.secret.as_bytes()));
    let vk = [0x42u8; 64];
    let before = tpm.read_pcrs(Bank::Sha1, &[15]).unwrap();
    tpm.latch(15, &vk, "secure-ai-vault", "uuid-1").unwrap();
    // every active bank moved, to exactly the systemd measurement
    for bank in [Bank::Sha256, Bank::Sha1] {
        let now = tpm.read_pcrs(bank, &[15]).unwrap().remove(0).1;
        let m = policy::latch_measurement(bank, &vk, "secure-ai-vault", "uuid-1");
        assert_eq!(
            now,
            policy::pcr_after_extend(bank, &vec![0; bank.digest_len()], m.as_bytes())
        );
    }
    assert_ne!(before, tpm.read_pcrs(Bank::Sha1, &[15]).unwrap());
    let err = tpm.check_policy(&token, Some(15)).unwrap_err();
    assert!(err.to_string().contains("already extended"), "{err}");
    assert!(matches!(
        tpm.unseal(&token, None),
        Err(TpmError::PcrMismatch { .. })
    ));
}

#[test]
fn srk_is_the_standard_one_and_serializes_like_esys() {
    let mut sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    drop(tpm);
    let dir = TempDir::new("srk");
    let tr = dir.path().join("srk.tr");
    sw.tool(
        "tpm2_readpublic",
        &["-c", "0x81000001", "-t", tr.to_str().unwrap()],
    );
    let esys = std::fs::read(&tr).unwrap();
    assert_eq!(
        vaultguard::encoding::hex_encode(&sealed.srk),
        vaultguard::encoding::hex_encode(&esys),
        "tpm2_srk must be byte-identical to Esys_TR_Serialize"
    );
    let k = SerializedKey::parse_srk(&esys).unwrap();
    assert_eq!(k.handle, SRK_HANDLE);
    // ECC P-256 with noDA: the TCG template
    let out = sw.tool("tpm2_readpublic", &["-c", "0x81000001"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("value: ecc"), "{text}");
    assert!(
        text.to_lowercase().contains("nist p256") || text.to_lowercase().contains("nist_p256"),
        "{text}"
    );
    assert!(
        text.contains("noda") && text.contains("restricted|decrypt"),
        "{text}"
    );
}

#[test]
fn a_swapped_srk_is_refused() {
    let mut sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    let token = token_from(&sealed, &[7], false);
    drop(tpm);
    let dir = TempDir::new("swap");
    let ctx = dir.path().join("other.ctx");
    // Another storage key at the same handle (different unique data → different key).
    sw.tool("tpm2_evictcontrol", &["-C", "o", "-c", "0x81000001"]);
    create_other_storage_key(&mut sw, &ctx);
    sw.tool(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", ctx.to_str().unwrap(), "0x81000001"],
    );
    let mut tpm = open(&sw);
    let err = tpm.unseal(&token, None).unwrap_err();
    assert!(matches!(err, TpmError::SrkMismatch), "{err}");
    assert!(err
        .to_string()
        .contains("not the TPM the vault was enrolled with"));
}

/// A header whose `tpm2_srk` was replaced by another storage key (one whose
/// private half someone else holds, wanting the session salted to it): without
/// a PIN nothing secret crosses in a form they can read (the TPM keys the
/// encrypted answer with its own ECDH result) and the unseal is refused as a
/// swapped SRK; with a PIN the live SRK is checked before anything else is sent, so
/// no PIN HMAC is ever keyed by that session.
#[test]
fn a_replaced_srk_record_never_carries_a_pin() {
    let dir = TempDir::new("foreign-srk");
    let mut other = Swtpm::start();
    let ctx = dir.path().join("other.ctx");
    let (pub_path, name_path) = (dir.path().join("pub.bin"), dir.path().join("name.bin"));
    create_other_storage_key(&mut other, &ctx);
    other.tool(
        "tpm2_readpublic",
        &[
            "-c",
            ctx.to_str().unwrap(),
            "-o",
            pub_path.to_str().unwrap(),
            "-n",
            name_path.to_str().unwrap(),
        ],
    );
    let public = std::fs::read(&pub_path).unwrap();
    let foreign_srk = vaultguard::tpm::srk::SerializedKey {
        handle: vaultguard::tpm::srk::SRK_HANDLE,
        name: std::fs::read(&name_path).unwrap(),
        public: public[2..].to_vec(), // TPM2B_PUBLIC → TPMT_PUBLIC
    }
    .to_bytes();

    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    for pin in [None, Some(&b"2468"[..])] {
        let sealed = seal(&mut tpm, &[7], pin);
        let mut token = token_from(&sealed, &[7], pin.is_some());
        token.srk = Some(foreign_srk.clone());
        assert_ne!(foreign_srk, sealed.srk, "a different key");
        if pin.is_none() {
            // The answer's integrity fails in the library (its session key is
            // not the TPM's), and the failure is explained by the live SRK.
            let err = tpm.unseal(&token, None).unwrap_err();
            assert!(matches!(err, TpmError::SrkMismatch), "{err}");
            continue;
        }
        let rec = sw.recorder();
        let mut t = open_at(&rec.tcti());
        rec.take(); // Startup
        let err = t.unseal(&token, pin).unwrap_err();
        assert!(matches!(err, TpmError::SrkMismatch), "{err}");
        let names: Vec<&str> = rec.take().iter().map(|c| c.name()).collect::<Vec<_>>();
        assert_eq!(names, ["ReadPublic"], "nothing after the SRK check");
    }
}

#[test]
fn a_cleared_tpm_is_refused_as_missing_srk() {
    let mut sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    let token = token_from(&sealed, &[7], false);
    drop(tpm);
    sw.tool("tpm2_clear", &["-c", "p"]);
    let mut tpm = open(&sw);
    assert!(matches!(
        tpm.unseal(&token, None),
        Err(TpmError::SrkMissing)
    ));
}

#[test]
fn foreign_or_unusable_persistent_handles_are_rejected() {
    let mut sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    let mut token = token_from(&sealed, &[7], false);
    // a token pointing the session salt at another persistent key
    let mut k = SerializedKey::parse_srk(&sealed.srk).unwrap();
    k.handle = 0x8100_0002;
    token.srk = Some(k.to_bytes());
    let err = tpm.unseal(&token, None).unwrap_err();
    assert!(err.to_string().contains("0x81000002"), "{err}");
    token.srk = Some(vec![1, 2, 3]);
    assert!(matches!(
        tpm.unseal(&token, None),
        Err(TpmError::Malformed(Malformed::Srk(_)))
    ));
    drop(tpm);

    // a signing key squatting on the SRK handle is not used for sealing
    let dir = TempDir::new("squat");
    let ctx = dir.path().join("sign.ctx");
    sw.tool("tpm2_evictcontrol", &["-C", "o", "-c", "0x81000001"]);
    sw.tool(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-G",
            "ecc256:ecdsa-sha256",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
            "-c",
            ctx.to_str().unwrap(),
        ],
    );
    sw.tool(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", ctx.to_str().unwrap(), "0x81000001"],
    );
    let mut tpm = open(&sw);
    let err = tpm
        .seal(&SealRequest {
            bank: Bank::Sha256,
            pcrs: &[7],
            phase_pcr: Some(15),
            pin: None,
        })
        .err()
        .expect("sealing under a signing key must fail");
    assert!(
        matches!(err, TpmError::SrkUnusable(SrkDefect::NotStorageKey)),
        "{err}"
    );
}

#[test]
fn tampered_blobs_are_refused() {
    let sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    let good = token_from(&sealed, &[7], false);
    let mut t = good.clone();
    t.blob.push(0);
    assert!(matches!(
        tpm.unseal(&t, None),
        Err(TpmError::Malformed(Malformed::Blob(
            BlobDefect::TrailingBytes
        )))
    ));
    let mut t = good.clone();
    t.blob.truncate(10);
    assert!(matches!(
        tpm.unseal(&t, None),
        Err(TpmError::Malformed(Malformed::Blob(BlobDefect::Truncated)))
    ));
    // a flipped bit in the private part: the TPM's integrity check refuses it
    let mut t = good.clone();
    t.blob[10] ^= 1;
    assert!(tpm.unseal(&t, None).is_err());
    // a policy hash that does not match what the object was sealed with: the
    // token contradicts itself, which no PCR change does; not a reason to reseal
    let mut t = good.clone();
    t.policy_hash[0] ^= 1;
    let err = tpm.check_policy(&t, Some(15)).unwrap_err();
    assert!(
        matches!(err, TpmError::Altered(Alteration::PolicyNotTheObjects)),
        "{err}"
    );
    assert!(err.to_string().contains("tpm2-policy-hash"), "{err}");
    assert!(!err.to_string().contains("reseal"), "{err}");
    // recorded PCR values that do not give the recorded policy
    let mut t = good.clone();
    t.pcr_values.as_mut().unwrap().insert(7, vec![7; 32]);
    let err = tpm.check_policy(&t, Some(15)).unwrap_err();
    assert!(
        matches!(err, TpmError::Altered(Alteration::PolicyNotTheRecordedPcrs)),
        "{err}"
    );
    assert!(err.to_string().contains("vaultguard_pcr_values"), "{err}");
    // the genuine token is consistent
    assert!(vaultguard::tpm::check_sealed(&good).is_ok());
}

#[test]
fn a_policy_refusal_names_the_tokens_pcrs() {
    // The TPM's own refusal (no pre-check) names the PCRs the token binds, never
    // an empty list.
    let mut sw = Swtpm::start();
    let mut tpm = open(&sw);
    let sealed = seal(&mut tpm, &[7], None);
    let token = token_from(&sealed, &[7], false);
    drop(tpm);
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000007"],
    );
    let mut tpm = open(&sw);
    let err = tpm.unseal(&token, None).unwrap_err();
    match &err {
        TpmError::PcrMismatch { bound, .. } => assert_eq!(bound, &vec![7, 15]),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("bound to PCRs 7,15"), "{err}");
    let empty = TpmError::PcrMismatch {
        changed: vec![],
        bound: vec![],
        phase: None,
    };
    assert!(!empty.to_string().contains("PCRs )"), "{empty}");
}

// ---- The audit anchor's NV extend index (tpm::nv) ----

use vaultguard::tpm::nv::{self as nv, Defined, NvDifference, DEFAULT_AUDIT_NV_INDEX};

fn nv_hex(handle: u32) -> String {
    format!("{handle:#010x}")
}

/// The index's value as tpm2-tools reads it (an implementation other than ours).
fn tool_nvread(sw: &mut Swtpm, handle: u32) -> Vec<u8> {
    sw.tool(
        "tpm2_nvread",
        &[&nv_hex(handle), "-C", &nv_hex(handle), "-s", "32"],
    )
    .stdout
}

#[test]
fn defining_the_audit_index_twice_finds_it_already_there() {
    let mut sw = Swtpm::start();
    let mut tpm = open(&sw);
    assert_eq!(
        tpm.define_audit_index(DEFAULT_AUDIT_NV_INDEX).unwrap(),
        Defined::Created
    );
    tpm.extend_audit_index(DEFAULT_AUDIT_NV_INDEX, &[7; 32])
        .unwrap();
    let value = tpm.read_audit_index(DEFAULT_AUDIT_NV_INDEX).unwrap();
    assert_eq!(
        tpm.define_audit_index(DEFAULT_AUDIT_NV_INDEX).unwrap(),
        Defined::AlreadyThere
    );
    // Defining again kept the value (the anchor is never reset by enrolment).
    assert_eq!(tpm.read_audit_index(DEFAULT_AUDIT_NV_INDEX).unwrap(), value);
    drop(tpm);
    // What the TPM says it holds, through tpm2-tools: TPMA_NV 0x22040044 =
    // written (bit 29, set by the extend) | no_da (25) | authread (18) |
    // TPM_NT_EXTEND (4, in bits 7:4) | authwrite (2); sha256; 32 bytes. (The
    // tpm2-tools here prints the type as "nt=0x1" in its friendly line; the raw
    // value is the TPM's.)
    let out = sw.tool("tpm2_nvreadpublic", &[&nv_hex(DEFAULT_AUDIT_NV_INDEX)]);
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    for want in ["value: 0x22040044", "size: 32", "sha256"] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    assert!(!text.contains("ownerwrite"), "{text}");
}

#[test]
fn an_index_with_other_attributes_is_refused_and_left_alone() {
    let mut sw = Swtpm::start();
    let h = DEFAULT_AUDIT_NV_INDEX;
    sw.tool(
        "tpm2_nvdefine",
        &[
            &nv_hex(h),
            "-C",
            "o",
            "-s",
            "16",
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
        ],
    );
    let mut tpm = open(&sw);
    match tpm.define_audit_index(h) {
        Err(TpmError::NvIndexConflict { handle, differs }) => {
            assert_eq!(handle, h);
            assert!(
                differs.contains(&NvDifference::Type { found: 0 }),
                "{differs:?}"
            );
            assert!(
                differs.contains(&NvDifference::Size { found: 16 }),
                "{differs:?}"
            );
            let msg = TpmError::NvIndexConflict { handle, differs }.to_string();
            assert!(msg.contains("0x013fa0d1"), "{msg}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    drop(tpm);
    // Still the operator's ordinary 16-byte index (ownerwrite|authwrite|ownerread|authread).
    let out = sw.tool("tpm2_nvreadpublic", &[&nv_hex(h)]);
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        text.contains("value: 0x60006") && text.contains("size: 16"),
        "{text}"
    );
}

#[test]
fn nv_extend_matches_the_tpm() {
    let mut sw = Swtpm::start();
    let h = DEFAULT_AUDIT_NV_INDEX;
    let mut tpm = open(&sw);
    tpm.define_audit_index(h).unwrap();
    // Defined, never extended: the TPM refuses to read it, which is `None`.
    assert_eq!(tpm.read_audit_index(h).unwrap(), None);
    let mut expected = [0u8; 32];
    for i in 0..4u8 {
        let data = [i.wrapping_mul(37).wrapping_add(1); 32];
        tpm.extend_audit_index(h, &data).unwrap();
        expected = nv::nv_extend(&expected, &data);
        assert_eq!(
            tpm.read_audit_index(h).unwrap(),
            Some(expected),
            "extend {i}"
        );
    }
    // The connection was reopened after each extend: the rest of the API works.
    assert_eq!(
        tpm.read_pcrs(Bank::Sha256, &[15]).unwrap()[0].1,
        vec![0; 32]
    );
    drop(tpm);
    // tpm2-tools reads the same value.
    assert_eq!(tool_nvread(&mut sw, h), expected.to_vec());
    // And the value survives a power cycle (NV, not a PCR).
    sw.restart();
    let mut tpm = open(&sw);
    assert_eq!(tpm.read_audit_index(h).unwrap(), Some(expected));
}

#[test]
fn a_missing_audit_index_is_its_own_error() {
    let sw = Swtpm::start();
    let h = DEFAULT_AUDIT_NV_INDEX;
    let mut tpm = open(&sw);
    assert!(matches!(
        tpm.read_audit_index(h),
        Err(TpmError::NvIndexAbsent { handle }) if handle == h
    ));
    assert!(matches!(
        tpm.extend_audit_index(h, &[1; 32]),
        Err(TpmError::NvIndexAbsent { handle }) if handle == h
    ));
    // Out of the owner range: refused before asking the TPM.
    assert!(matches!(
        tpm.define_audit_index(0x0180_0420),
        Err(TpmError::NvHandleOutOfRange { .. })
    ));
}

#[test]
fn an_owner_password_stops_the_definition_with_a_clear_error() {
    let mut sw = Swtpm::start();
    sw.tool("tpm2_changeauth", &["-c", "owner", "ownerpw"]);
    let mut tpm = open(&sw);
    let err = tpm.define_audit_index(DEFAULT_AUDIT_NV_INDEX).unwrap_err();
    assert!(matches!(err, TpmError::OwnerAuthSet), "{err:?}");
    assert!(err.to_string().contains("owner password"), "{err}");
    drop(tpm);
    // Nothing was defined, and the lockout counter did not move.
    let out = sw.tool_status("tpm2_nvreadpublic", &[&nv_hex(DEFAULT_AUDIT_NV_INDEX)]);
    assert!(!out.status.success());
    let out = sw.tool("tpm2_getcap", &["properties-variable"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TPM2_PT_LOCKOUT_COUNTER: 0x0"), "{text}");
}
