//! `tpm.reseal_after_recovery` on a software TPM and a LUKS2 file: after a PCR
//! change forced the passphrase, the reseal happens only on the operator's "yes";
//! then the TPM opens the vault again. "no" (or anything else) changes nothing.

mod common;

use common::{enroll_opts, luks_image, unlock_opts, Swtpm, TempDir};
use vaultguard::boot::self_heal::offer_reseal;
use vaultguard::boot::{acquire_volume_key, enroll, Events, Method, NoEvents};
use vaultguard::luks::Vault;
use vaultguard::prompt::Scripted;

const PASS: &str = "correct horse battery staple";

#[derive(Default)]
struct Names(Vec<String>);

impl Events for Names {
    fn event(&mut self, name: &str, _fields: &[(&str, &str)]) {
        self.0.push(name.into());
    }
}

#[test]
fn only_a_confirmed_offer_reseals_and_then_the_tpm_unlocks_again() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("selfheal");
    let img = luks_image(dir.path(), PASS);
    let o = enroll_opts(&sw, &img);
    enroll(&o, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000007"],
    );
    let unlock = || {
        let mut v = Vault::open(img.to_str().unwrap()).unwrap();
        let mut p = Scripted::new(&[PASS]);
        acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut NoEvents).unwrap()
    };
    let got = unlock();
    assert_eq!(got.method, Method::Passphrase);
    let reason = got.fallback_reason.unwrap();
    let tokens_before = Vault::open(img.to_str().unwrap()).unwrap().tpm2_tokens();

    // Declined: nothing written, the TPM still refuses.
    let mut ev = Names::default();
    let mut p = Scripted::new(&["no"]);
    assert!(!offer_reseal(&o, &reason, &mut p, &mut ev).unwrap());
    assert!(
        p.asked.iter().any(|a| a.contains("[yes/NO]")),
        "{:?}",
        p.asked
    );
    assert_eq!(ev.0, ["reseal_declined"]);
    let tokens = Vault::open(img.to_str().unwrap()).unwrap().tpm2_tokens();
    assert_eq!(format!("{tokens:?}"), format!("{tokens_before:?}"));
    assert_eq!(unlock().method, Method::Passphrase);

    // Confirmed: the reseal asks for the passphrase itself, then the TPM opens.
    let mut ev = Names::default();
    let mut p = Scripted::new(&["yes", PASS]);
    assert!(offer_reseal(&o, &reason, &mut p, &mut ev).unwrap());
    assert_eq!(
        ev.0.last().map(String::as_str),
        Some("resealed_after_recovery")
    );
    let got = unlock();
    assert_eq!(got.method, Method::Tpm2, "{:?}", got.fallback_reason);

    // A refusal that is not a PCR change is never offered.
    let mut p = Scripted::new(&["yes"]);
    let not_pcrs = vaultguard::boot::TpmRefusal::NoEnrolment;
    assert!(!offer_reseal(&o, &not_pcrs, &mut p, &mut NoEvents).unwrap());
    assert!(p.asked.is_empty());
}
