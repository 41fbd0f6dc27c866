//! Which LUKS2 keyslot algorithms the binary opens. vaultguard's libgcrypt is built
//! with only AES and the SHA-1/SHA-2/SHA-3 digests (initramfs/build-cdeps.sh), so a
//! keyslot whose PBKDF2 hash is anything else (whirlpool here; Debian's cryptsetup
//! formats it) must be refused with a line that names the hash and says what to
//! do, never reported as a wrong passphrase, and never crash. The images are made
//! by the host's `cryptsetup luksFormat` (Debian's full libgcrypt).

mod common;

use common::{vaultguard_bin, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PASS: &str = "correct horse battery staple";

/// A LUKS2 image in a file, PBKDF2 with `hash` (cheap cost), AES-XTS.
fn image(dir: &Path, name: &str, hash: &str) -> PathBuf {
    common::luks_image_with(dir, name, PASS, &["--hash", hash])
}

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("config.json");
    let d = dir.display();
    std::fs::write(
        &p,
        format!(
            r#"{{"vault": {{"state_path": "{d}/state.json"}},
  "tpm": {{"tcti": "device:/nonexistent", "timeout": 5}},
  "auth": {{"state_path": "{d}/lockout.json"}},
  "control": {{"socket": "{d}/control.sock"}},
  "audit": {{"path": "{d}/audit.jsonl", "tpm_anchor": false}}}}"#
        ),
    )
    .unwrap();
    p
}

/// `vaultguard attach --test` with the passphrase in a key file, no TPM, no terminal.
fn attach_test(cfg: &Path, img: &Path, keyfile: &Path) -> Output {
    Command::new("setsid")
        .arg("--wait")
        .arg(vaultguard_bin())
        .arg("-c")
        .arg(cfg)
        .args(["attach", "--test", "vgtest"])
        .arg(img)
        .arg(keyfile)
        .arg("password-cache=no,x-vaultguard.no-tpm,headless")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn both(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn sha_keyslots_open_and_a_whirlpool_keyslot_is_refused_by_name() {
    let dir = TempDir::new("algs");
    let cfg = config(dir.path());
    let kf = dir.path().join("pass");
    std::fs::write(&kf, PASS).unwrap();
    for hash in ["sha1", "sha256", "sha512", "sha3-256"] {
        let img = image(dir.path(), &format!("{hash}.img"), hash);
        let o = attach_test(&cfg, &img, &kf);
        assert_eq!(o.status.code(), Some(0), "{hash}: {}", both(&o));
        assert!(
            both(&o).contains("the key file opens keyslot 0"),
            "{hash}: {}",
            both(&o)
        );
    }
    let img = image(dir.path(), "whirlpool.img", "whirlpool");
    let o = attach_test(&cfg, &img, &kf);
    let out = both(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(!out.contains("opens keyslot"), "{out}");
    assert!(!out.contains("no keyslot accepts"), "{out}");
    assert!(!out.contains(PASS), "{out}");
    assert!(
        out.contains("whirlpool") && out.contains("not supported"),
        "the refusal names the hash: {out}"
    );
}
