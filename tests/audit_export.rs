//! Signed audit export, end to end through the binary, with keys made by openssl:
//! export on "the appliance", verify "elsewhere" with only the public key; old
//! exports still verify after a key rotation; edits, reordering, a cut tail and a
//! foreign key are refused by name.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vg-export-{name}-"))
        .tempdir()
        .unwrap()
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed to make the test keys (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A key pair as an operator makes it; returns (private, public).
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let k = dir.join(format!("{name}.pem"));
    let p = dir.join(format!("{name}.pub.pem"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        k.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        k.to_str().unwrap(),
        "-pubout",
        "-out",
        p.to_str().unwrap(),
    ]);
    (k, p)
}

fn vg(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_export_verifies_elsewhere_and_refuses_every_edit() {
    let tmp = tmpdir("main");
    let dir = tmp.path();
    let log = dir.join("audit.jsonl");
    for i in 0..4u64 {
        vaultguard::audit::append(&log, "lock", &[("n", i.into())]).unwrap();
    }
    // A rotation in between: the export covers both segments.
    vaultguard::audit::rotate(&log).unwrap().unwrap();
    vaultguard::audit::append(&log, "unlock", &[("uid", 0u32.into())]).unwrap();
    let (k1, p1) = keypair(dir, "k1");
    let ex1 = dir.join("export1.jsonl");
    let (ok, out) = vg(&[
        "audit",
        "export",
        "--key",
        s(&k1),
        "--key-version",
        "1",
        "-o",
        s(&ex1),
        s(&log),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = vg(&["audit", "verify", "--public-key", s(&p1), s(&ex1)]);
    assert!(ok, "{out}");
    assert!(
        out.contains("6 entries, hash chain intact, signed by key"),
        "{out}"
    );
    assert!(out.contains("(version 1)"), "{out}");

    // Key rotation: a new key signs new exports; both verify given both public keys.
    let (k2, p2) = keypair(dir, "k2");
    vaultguard::audit::append(&log, "lock", &[]).unwrap();
    let ex2 = dir.join("export2.jsonl");
    assert!(
        vg(&[
            "audit",
            "export",
            "--key",
            s(&k2),
            "--key-version",
            "2",
            "-o",
            s(&ex2),
            s(&log)
        ])
        .0
    );
    for ex in [&ex1, &ex2] {
        let (ok, out) = vg(&[
            "audit",
            "verify",
            "--public-key",
            s(&p1),
            "--public-key",
            s(&p2),
            s(ex),
        ]);
        assert!(ok, "{out}");
    }
    // The old export with only the new key: the refusal names the key it needs.
    let (ok, out) = vg(&["audit", "verify", "--public-key", s(&p2), s(&ex1)]);
    assert!(!ok);
    assert!(
        out.contains("version 1") && out.contains("none of the public keys"),
        "{out}"
    );

    let text = std::fs::read_to_string(&ex2).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let check = |name: &str, edited: String, want: &str| {
        let p = dir.join(format!("{name}.jsonl"));
        std::fs::write(&p, edited).unwrap();
        let (ok, out) = vg(&["audit", "verify", "--public-key", s(&p2), s(&p)]);
        assert!(!ok, "{name} verified");
        assert!(out.contains(want), "{name}: {out}");
    };
    // An entry edited (its own hash recomputed would still break the chain; not
    // recomputed, the entry's hash is wrong).
    check(
        "edited",
        text.replacen("\"n\":1", "\"n\":7", 1),
        "entry edited",
    );
    // Two entries swapped.
    let mut sw = lines.clone();
    sw.swap(1, 2);
    check("swapped", sw.join("\n") + "\n", "prev_hash does not match");
    // The tail cut (the last entry removed, trailer kept).
    let mut cut = lines.clone();
    cut.remove(lines.len() - 2);
    check("cut", cut.join("\n") + "\n", "entries added or removed");
    // The trailer altered after signing.
    check(
        "trailer",
        text.replace("\"key_version\":2", "\"key_version\":3"),
        "altered after signing",
    );
    // Not an export at all.
    check(
        "plain",
        std::fs::read_to_string(&log).unwrap(),
        "not a vaultguard export trailer",
    );
    // A private key that is not Ed25519 is refused with the way to make one.
    let rsa = dir.join("rsa.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "rsa",
        "-pkeyopt",
        "rsa_keygen_bits:1024",
        "-out",
        s(&rsa),
    ]);
    let (ok, out) = vg(&["audit", "export", "--key", s(&rsa), s(&log)]);
    assert!(!ok);
    assert!(out.contains("not an Ed25519 private key"), "{out}");
}
