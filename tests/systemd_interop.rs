//! vaultguard opens what systemd-cryptenroll (systemd 252, Debian 12) enrolled, with
//! and without PIN: the legacy transient-primary path (no `tpm2_srk`, no salt).
//! The opposite direction (systemd-cryptsetup opening a vaultguard enrolment) needs
//! systemd >= 254 and device-mapper: it is a QEMU scenario.

mod common;

use common::{luks_image, Swtpm, TempDir};
use std::process::Command;
use std::time::Duration;
use vaultguard::boot::{acquire_volume_key, Method, NoEvents, TpmOptions, UnlockOptions};
use vaultguard::luks::{ActivateFlags, Vault};
use vaultguard::prompt::Scripted;

const PASS: &str = "pw-for-interop";

fn have_cryptenroll() -> bool {
    Command::new("systemd-cryptenroll")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn cryptenroll(sw: &Swtpm, img: &std::path::Path, pin: Option<&str>) {
    let mut cmd = Command::new("systemd-cryptenroll");
    cmd.arg(format!(
        "--tpm2-device=swtpm:host=127.0.0.1,port={}",
        sw.port
    ))
    .arg("--tpm2-pcrs=7")
    .env("PASSWORD", PASS);
    if let Some(pin) = pin {
        cmd.arg("--tpm2-with-pin=yes").env("NEWPIN", pin);
    }
    cmd.arg(img);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "systemd-cryptenroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn opts(sw: &Swtpm, img: &std::path::Path) -> UnlockOptions {
    UnlockOptions {
        name: "interop".into(),
        device: img.display().to_string(),
        tpm: Some(TpmOptions {
            tcti: sw.tcti(),
            timeout: Duration::from_secs(5),
            phase_pcr: Some(15),
            signature: None,
        }),
        tries: 3,
        keyfile: None,
        flags: ActivateFlags::default(),
        crypttab: Default::default(),
    }
}

fn reference_vk(img: &std::path::Path) -> Vec<u8> {
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    v.volume_key(None, PASS.as_bytes())
        .unwrap()
        .0
        .as_bytes()
        .to_vec()
}

#[test]
fn opens_a_systemd_252_enrolment_without_pin() {
    assert!(
        have_cryptenroll(),
        "systemd-cryptenroll is part of Debian 12's systemd"
    );
    let sw = Swtpm::start();
    let dir = TempDir::new("sd-nopin");
    let img = luks_image(dir.path(), PASS);
    cryptenroll(&sw, &img, None);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let t = v.tpm2_tokens().remove(0).1.unwrap();
    assert!(t.srk.is_none(), "systemd 252 writes no tpm2_srk");
    let mut p = Scripted::new(&[]);
    let got = acquire_volume_key(&mut v, &opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Tpm2, "{:?}", p.said);
    assert!(p.asked.is_empty());
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

#[test]
fn opens_a_systemd_252_enrolment_with_pin() {
    assert!(have_cryptenroll());
    let sw = Swtpm::start();
    let dir = TempDir::new("sd-pin");
    let img = luks_image(dir.path(), PASS);
    cryptenroll(&sw, &img, Some("4321"));
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let t = v.tpm2_tokens().remove(0).1.unwrap();
    assert!(t.pin && t.salt.is_none());
    let mut p = Scripted::new(&["9999", "4321"]);
    let got = acquire_volume_key(&mut v, &opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Tpm2Pin, "{:?}", p.said);
    assert!(
        p.said.iter().any(|l| l.contains("wrong TPM PIN")),
        "{:?}",
        p.said
    );
    assert_eq!(got.vk.as_bytes(), reference_vk(&img).as_slice());
}

#[test]
fn a_changed_pcr_on_a_systemd_enrolment_is_refused_cleanly() {
    assert!(have_cryptenroll());
    let mut sw = Swtpm::start();
    let dir = TempDir::new("sd-pcr");
    let img = luks_image(dir.path(), PASS);
    cryptenroll(&sw, &img, None);
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000007"],
    );
    let mut p = Scripted::new(&[PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &opts(&sw, &img), &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    // systemd records no PCR values, so the changed one cannot be named; the
    // message says what is bound and what to do.
    let why = got.fallback_reason.unwrap();
    assert!(
        matches!(
            &why,
            vaultguard::boot::TpmRefusal::Tpm(vaultguard::tpm::TpmError::PcrMismatch { changed, .. })
                if changed.is_empty()
        ),
        "{why:?}"
    );
    let why = why.to_string();
    assert!(
        why.contains("no longer matches") && why.contains("reseal"),
        "{why}"
    );
}
