//! vaultguard and systemd 257 (Debian 13's systemd-cryptenroll, run from a private
//! trixie root built by qemu-tests/lib/trixie-systemd.sh, never installed) open each
//! other's `systemd-tpm2` tokens sealed under the persistent SRK, with and without
//! PIN, on swtpm:
//!  - systemd-cryptenroll --unlock-tpm2-device= unseals vaultguard's token, opens
//!    its keyslot and adds a password keyslot that yields the same volume key;
//!  - vaultguard opens what systemd-cryptenroll 257 enrolled (tpm2_srk, salted PIN).
//!  - signed policies both ways, and a `tpm2-pcr-signature.json` written by the real
//!    systemd-measure 257 over a UKI's PCR 11 (as systemd-stub measures it) opens a
//!    vaultguard `--public-key` enrolment.
//!
//! systemd 252 (the host's) cannot do the first: it only knows the transient primary.
//! The root is cached in $VG_TRIXIE_CACHE, else target/trixie-systemd (built on
//! first use: about 10 MB of trixie Packages index and 10 MB of .debs, 5-10 s).

mod common;

use common::{luks_image, Swtpm, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vaultguard::boot::{
    acquire_volume_key, enroll, EnrollOptions, Method, NoEvents, TpmOptions, UnlockOptions,
    Verification,
};
use vaultguard::luks::{ActivateFlags, Vault};
use vaultguard::prompt::Scripted;
use vaultguard::tpm::policy::Bank;

const PASS: &str = "pw-for-257-interop";
const NEWPASS: &str = "added-by-systemd-257";

/// The wrapper `CACHE/run` that runs a program from the trixie root.
fn trixie() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cache = std::env::var_os("VG_TRIXIE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target/trixie-systemd"));
        // Idempotent: returns at once when the stamp says the root is complete.
        let out = Command::new("bash")
            .arg(repo.join("qemu-tests/lib/trixie-systemd.sh"))
            .arg(&cache)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "qemu-tests/lib/trixie-systemd.sh {} failed:\n{}",
            cache.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let run = cache.join("run");
        let v = common::run(Command::new(&run).args(["systemd-cryptenroll", "--version"]));
        let v = String::from_utf8_lossy(&v.stdout);
        assert!(v.starts_with("systemd 257"), "{v}");
        run
    })
}

fn cryptenroll257() -> Command {
    let mut c = Command::new(trixie());
    c.arg("systemd-cryptenroll");
    c
}

fn check(what: &str, out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n{}{err}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

fn tpm_opts(sw: &Swtpm) -> TpmOptions {
    TpmOptions {
        tcti: sw.tcti(),
        timeout: Duration::from_secs(5),
        phase_pcr: Some(15),
        signature: None,
    }
}

/// A vaultguard enrolment of `img` in systemd's bank, bound to `pcrs`.
fn enroll_opts(sw: &Swtpm, img: &Path, pcrs: Vec<u32>, pin: bool) -> EnrollOptions {
    EnrollOptions {
        device: img.display().to_string(),
        name: "interop257".into(),
        tpm: tpm_opts(sw),
        bank: Bank::Sha256,
        pcrs,
        pin,
        recovery_key: false,
        tries: 3,
        audit_nv_index: Some(vaultguard::tpm::nv::DEFAULT_AUDIT_NV_INDEX),
        signed: None,
    }
}

fn volume_key(img: &Path, pass: &str) -> Vec<u8> {
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    v.volume_key(None, pass.as_bytes())
        .unwrap_or_else(|e| panic!("passphrase {pass:?} does not open {}: {e}", img.display()))
        .0
        .as_bytes()
        .to_vec()
}

/// vaultguard enrols (PCRs 0,2,4,7 + phase PCR 15, sha256, SRK at 0x81000001);
/// systemd-cryptenroll 257 unseals that token to add NEWPASS.
fn vaultguard_enrolment_opened_by_257(pin: Option<&str>) {
    let sw = Swtpm::start();
    let dir = TempDir::new(if pin.is_some() { "vg257-pin" } else { "vg257" });
    let img = luks_image(dir.path(), PASS);
    let opts = enroll_opts(&sw, &img, vec![0, 2, 4, 7], pin.is_some());
    let answers: Vec<&str> = match pin {
        Some(p) => vec![PASS, p, p],
        None => vec![PASS],
    };
    let r = enroll(&opts, &mut Scripted::new(&answers), &mut NoEvents).unwrap();
    assert!(matches!(r.verification, Verification::Unsealed));
    let token = {
        let mut v = Vault::open(img.to_str().unwrap()).unwrap();
        v.tpm2_tokens().remove(0).1.unwrap()
    };
    assert!(token.srk.is_some(), "vaultguard writes tpm2_srk");
    assert_eq!(token.pin, pin.is_some());

    let mut cmd = cryptenroll257();
    cmd.arg(format!("--unlock-tpm2-device={}", sw.tcti()))
        .arg("--password")
        .arg(&img)
        .env("NEWPASSWORD", NEWPASS)
        .env_remove("PASSWORD");
    match pin {
        Some(p) => cmd.env("PIN", p),
        None => cmd.env_remove("PIN"),
    };
    let err = check(
        "systemd-cryptenroll 257 --unlock-tpm2-device",
        cmd.output().unwrap(),
    );
    assert!(err.contains("New password enrolled as key slot"), "{err}");

    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    assert_eq!(
        v.active_keyslots().len(),
        3,
        "passphrase, TPM2 and the new one"
    );
    drop(v);
    assert_eq!(volume_key(&img, NEWPASS), volume_key(&img, PASS));
}

#[test]
fn systemd_257_unseals_a_vaultguard_enrolment_without_pin() {
    vaultguard_enrolment_opened_by_257(None);
}

#[test]
fn systemd_257_unseals_a_vaultguard_enrolment_with_pin() {
    vaultguard_enrolment_opened_by_257(Some("2468"));
}

/// vaultguard's token binds its phase PCR 15 too: once it is extended (as vaultguard
/// does after unlocking), systemd 257 cannot unseal it either.
#[test]
fn systemd_257_refuses_a_vaultguard_enrolment_after_the_phase_pcr_moved() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("vg257-pcr");
    let img = luks_image(dir.path(), PASS);
    let opts = enroll_opts(&sw, &img, vec![7], false);
    enroll(&opts, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    sw.tool(
        "tpm2_pcrextend",
        &["15:sha256=1515151515151515151515151515151515151515151515151515151515151515"],
    );
    let mut cmd = cryptenroll257();
    cmd.arg(format!("--unlock-tpm2-device={}", sw.tcti()))
        .arg("--password")
        .arg(&img)
        .env("NEWPASSWORD", NEWPASS)
        .env_remove("PASSWORD")
        .env_remove("PIN");
    let out = run_bounded(cmd, dir.path(), Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Failed to unseal secret using TPM2"), "{err}");
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    assert_eq!(v.active_keyslots().len(), 2, "nothing was added");
}

/// Run `cmd` (stdin null, output to files in `dir`), killed after `limit`.
fn run_bounded(mut cmd: Command, dir: &Path, limit: Duration) -> Output {
    let out = dir.join("child.out");
    let err = dir.join("child.err");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

/// A wrong $PIN: systemd 257 gets TPM_RC_AUTH_FAIL from the TPM and then asks for
/// the PIN through the password agent protocol (it has no tty); the test answers
/// that request as an agent would, with a cancel, and nothing is enrolled.
#[test]
fn systemd_257_refuses_a_vaultguard_pin_enrolment_with_a_wrong_pin() {
    let sw = Swtpm::start();
    let dir = TempDir::new("vg257-badpin");
    let img = luks_image(dir.path(), PASS);
    let opts = enroll_opts(&sw, &img, vec![7], true);
    enroll(
        &opts,
        &mut Scripted::new(&[PASS, "2468", "2468"]),
        &mut NoEvents,
    )
    .unwrap();
    // systemd-cryptenroll asks through /run/systemd/ask-password; it runs in a
    // mount namespace of its own where that directory is ours, so that neither
    // the host's password agents see the question nor this test answers theirs.
    let agent_dir = dir.path().join("ask-password");
    std::fs::create_dir(&agent_dir).unwrap();
    let mut cmd = in_private_ask_password_dir(&agent_dir, cryptenroll257());
    cmd.arg(format!("--unlock-tpm2-device={}", sw.tcti()))
        .arg("--password")
        .arg(&img)
        .env("NEWPASSWORD", NEWPASS)
        .env("PIN", "1111")
        .env_remove("PASSWORD");
    let agent = std::thread::spawn(move || cancel_the_pin_question(&agent_dir));
    let out = run_bounded(cmd, dir.path(), Duration::from_secs(60));
    let asked = agent.join().unwrap();
    assert!(!out.status.success(), "a wrong PIN must not unseal");
    assert!(
        asked.contains("TPM2 PIN"),
        "systemd asked again for the PIN after the wrong one: {asked}"
    );
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    assert_eq!(v.active_keyslots().len(), 2, "nothing was added");
    assert!(v.volume_key(None, NEWPASS.as_bytes()).is_err());
}

/// `cmd`, run in a private mount namespace in which `dir` is mounted over
/// /run/systemd/ask-password (over a private /run when the host has no such
/// directory): the password-agent protocol between it and this test stays
/// between them.
fn in_private_ask_password_dir(dir: &Path, cmd: Command) -> Command {
    let mut wrapped = Command::new("unshare");
    wrapped
        .args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(
            "[ -d /run/systemd/ask-password ] || \
               { mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/ask-password; }
             mount --bind \"$0\" /run/systemd/ask-password
             exec \"$@\"",
        )
        .arg(dir)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    wrapped
}

/// Acts as a password agent on `dir` (the child's /run/systemd/ask-password) for
/// one request that asks for a TPM2 PIN: replies "-" (cancel) and returns the
/// request's Message=.
fn cancel_the_pin_question(dir: &Path) -> String {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with("ask.") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .unwrap_or("")
                    .to_string()
            };
            let message = field("Message=");
            if !message.contains("TPM2 PIN") {
                continue;
            }
            // Socket= is the child's path, /run/systemd/ask-password/sck.*: the
            // same socket is in `dir` under its name.
            let socket = field("Socket=");
            assert!(socket.starts_with("/run/systemd/ask-password/"), "{socket}");
            let name = Path::new(&socket).file_name().unwrap().to_owned();
            let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
            sock.send_to(b"-", dir.join(name)).unwrap();
            return message;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    String::from("(no PIN question within 30 s)")
}

/// systemd-cryptenroll 257 enrols (PCR 7; it creates the SRK at 0x81000001 if the
/// TPM has none and records it in tpm2_srk); vaultguard opens it.
fn systemd_257_enrolment_opened_by_vaultguard(pin: Option<&str>) {
    let mut sw = Swtpm::start();
    let dir = TempDir::new(if pin.is_some() { "sd257-pin" } else { "sd257" });
    let img = luks_image(dir.path(), PASS);
    let persistent = sw.tool("tpm2_getcap", &["handles-persistent"]);
    assert!(
        !String::from_utf8_lossy(&persistent.stdout).contains("0x81000001"),
        "a fresh TPM has no SRK yet"
    );
    // as firmware would (systemd 257 warns that an all-zero PCR is unenforced)
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0707070707070707070707070707070707070707070707070707070707070707"],
    );
    let mut cmd = cryptenroll257();
    cmd.arg(format!("--tpm2-device={}", sw.tcti()))
        .arg("--tpm2-pcrs=7")
        .env("PASSWORD", PASS);
    if let Some(p) = pin {
        cmd.arg("--tpm2-with-pin=yes").env("NEWPIN", p);
    }
    cmd.arg(&img);
    let err = check(
        "systemd-cryptenroll 257 --tpm2-device",
        cmd.output().unwrap(),
    );
    assert!(err.contains("New TPM2 token enrolled"), "{err}");
    let persistent = sw.tool("tpm2_getcap", &["handles-persistent"]);
    assert!(
        String::from_utf8_lossy(&persistent.stdout).contains("0x81000001"),
        "systemd 257 created the SRK and made it persistent"
    );

    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let t = v.tpm2_tokens().remove(0).1.unwrap();
    assert!(t.srk.is_some(), "systemd 257 writes tpm2_srk");
    assert_eq!(t.pcrs, vec![7]);
    assert_eq!(t.bank, vaultguard::luks::token::PcrBank::Sha256);
    assert_eq!(t.pin, pin.is_some());
    assert_eq!(t.salt.is_some(), pin.is_some(), "257 salts the PIN");

    let uopts = UnlockOptions {
        name: "interop257".into(),
        device: img.display().to_string(),
        tpm: Some(tpm_opts(&sw)),
        tries: 3,
        keyfile: None,
        flags: ActivateFlags::default(),
        crypttab: Default::default(),
    };
    let answers: Vec<&str> = match pin {
        Some(p) => vec!["9999", p],
        None => vec![],
    };
    let mut p = Scripted::new(&answers);
    let got = acquire_volume_key(&mut v, &uopts, &mut p, &mut NoEvents).unwrap();
    match pin {
        Some(_) => {
            assert_eq!(got.method, Method::Tpm2Pin, "{:?}", p.said);
            assert!(
                p.said.iter().any(|l| l.contains("wrong TPM PIN")),
                "{:?}",
                p.said
            );
        }
        None => {
            assert_eq!(got.method, Method::Tpm2, "{:?}", p.said);
            assert!(p.asked.is_empty(), "{:?}", p.asked);
        }
    }
    assert_eq!(got.vk.as_bytes(), volume_key(&img, PASS).as_slice());
}

#[test]
fn vaultguard_opens_a_systemd_257_enrolment_without_pin() {
    systemd_257_enrolment_opened_by_vaultguard(None);
}

#[test]
fn vaultguard_opens_a_systemd_257_enrolment_with_pin() {
    systemd_257_enrolment_opened_by_vaultguard(Some("4321"));
}

// ---- Signed PCR policies (PolicyAuthorize), both directions -----------------

/// A P-256 or RSA-2048 key pair made by openssl: (private PEM path, public PEM path).
fn signing_key(dir: &Path, kind: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{kind}-key.pem"));
    let public = dir.join(format!("{kind}-pub.pem"));
    let alg: &[&str] = match kind {
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    };
    check(
        "openssl genpkey",
        Command::new("openssl")
            .arg("genpkey")
            .args(alg)
            .arg("-out")
            .arg(&private)
            .output()
            .unwrap(),
    );
    check(
        "openssl pkey -pubout",
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap(),
    );
    (private, public)
}

/// `vaultguard policy sign` (the binary) over the live PCR 9 of `sw`, into `sig`.
fn policy_sign(sw: &Swtpm, dir: &Path, private: &Path, sig: &Path, append: bool) -> String {
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, format!("{{\"tpm\":{{\"tcti\":\"{}\"}}}}", sw.tcti())).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vaultguard"));
    cmd.arg("-c")
        .arg(&cfg)
        .args(["policy", "sign", "--private-key"])
        .arg(private)
        .args(["--public-key-pcrs", "9", "--signature"])
        .arg(sig);
    if append {
        cmd.arg("--append");
    }
    let out = cmd.output().unwrap();
    check("vaultguard policy sign", out.clone());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// systemd-cryptenroll 257 --tpm2-public-key enrols (PCR 9 signed; with or
/// without literal PCR 7 and a PIN); `vaultguard policy sign` signs the live PCR 9;
/// vaultguard opens the volume with that signature file.
fn systemd_257_signed_enrolment_opened_by_vaultguard(kind: &str, literal_and_pin: bool) {
    let mut sw = Swtpm::start();
    let dir = TempDir::new(&format!("sd257-signed-{kind}"));
    let img = luks_image(dir.path(), PASS);
    sw.tool(
        "tpm2_pcrextend",
        &["9:sha256=0909090909090909090909090909090909090909090909090909090909090909"],
    );
    let (private, public) = signing_key(dir.path(), kind);
    let mut cmd = cryptenroll257();
    cmd.arg(format!("--tpm2-device={}", sw.tcti()))
        .arg(format!("--tpm2-public-key={}", public.display()))
        .arg("--tpm2-public-key-pcrs=9")
        .env("PASSWORD", PASS);
    if literal_and_pin {
        cmd.arg("--tpm2-pcrs=7")
            .arg("--tpm2-with-pin=yes")
            .env("NEWPIN", "4321");
    } else {
        cmd.arg("--tpm2-pcrs=");
    }
    cmd.arg(&img);
    let err = check(
        "systemd-cryptenroll 257 --tpm2-public-key",
        cmd.output().unwrap(),
    );
    assert!(err.contains("New TPM2 token enrolled"), "{err}");
    let t = {
        let mut v = Vault::open(img.to_str().unwrap()).unwrap();
        v.tpm2_tokens().remove(0).1.unwrap()
    };
    assert_eq!(t.pubkey_pcrs, vec![9]);
    assert_eq!(
        t.pubkey.as_deref(),
        Some(std::fs::read(&public).unwrap().as_slice())
    );

    let sig = dir.path().join("tpm2-pcr-signature.json");
    let mut opts = tpm_opts(&sw);
    opts.signature = Some(sig.clone());
    let uopts = UnlockOptions {
        name: "signed257".into(),
        device: img.display().to_string(),
        tpm: Some(opts),
        tries: 3,
        keyfile: None,
        flags: ActivateFlags::default(),
        crypttab: Default::default(),
    };
    // Before anyone signed: refused with the reason, the passphrase opens it.
    let mut p = Scripted::new(&[PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &uopts, &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    assert!(
        p.said.iter().any(|l| l.contains("no signature file")),
        "{:?}",
        p.said
    );

    policy_sign(&sw, dir.path(), &private, &sig, false);
    let answers: Vec<&str> = if literal_and_pin {
        vec!["4321"]
    } else {
        vec![]
    };
    let mut p = Scripted::new(&answers);
    let got = acquire_volume_key(&mut v, &uopts, &mut p, &mut NoEvents).unwrap();
    assert_eq!(
        got.method,
        if literal_and_pin {
            Method::Tpm2Pin
        } else {
            Method::Tpm2
        },
        "{:?}",
        p.said
    );
    assert_eq!(got.vk.as_bytes(), volume_key(&img, PASS).as_slice());
}

#[test]
fn vaultguard_opens_a_systemd_257_signed_enrolment_ecc() {
    systemd_257_signed_enrolment_opened_by_vaultguard("ec", false);
}

#[test]
fn vaultguard_opens_a_systemd_257_signed_enrolment_rsa_with_literal_pcr_and_pin() {
    systemd_257_signed_enrolment_opened_by_vaultguard("rsa", true);
}

/// vaultguard enrols with --public-key (PCR 9 signed, literal PCR 7 + phase PCR
/// 15); `vaultguard policy sign` writes the signature file where
/// systemd-cryptsetup looks (/run/systemd, bound from a temporary directory in a
/// private mount namespace so the host's is untouched); systemd-cryptenroll 257
/// unseals the token with it and adds NEWPASS.
#[test]
fn systemd_257_opens_a_vaultguard_signed_enrolment() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("vg257-signed");
    let img = luks_image(dir.path(), PASS);
    sw.tool(
        "tpm2_pcrextend",
        &["9:sha256=0909090909090909090909090909090909090909090909090909090909090909"],
    );
    // RSA: systemd 257 hands the TPM every policy signature as RSASSA, so an ECC
    // key's signature fails there with TPM_RC_SCHEME (vaultguard verifies both).
    let (private, public) = signing_key(dir.path(), "rsa");
    let mut opts = enroll_opts(&sw, &img, vec![7], false);
    let runsd = dir.path().join("run-systemd");
    std::fs::create_dir(&runsd).unwrap();
    let sig = runsd.join("tpm2-pcr-signature.json");
    opts.tpm.signature = Some(sig.clone());
    opts.signed = Some(vaultguard::boot::SignedEnrolment {
        public_key_pem: std::fs::read(&public).unwrap(),
        pcrs: vec![9],
        revocation_counter: None,
    });
    let r = enroll(&opts, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    assert!(
        matches!(r.verification, Verification::Unsigned(ref why) if why.contains("no signature file")),
        "{:?}",
        r.verification
    );
    policy_sign(&sw, dir.path(), &private, &sig, false);
    // `policy ticket` adds this TPM's verification ticket to the entry
    // (vaultguard_ticket): systemd ignores the key and still opens the volume.
    let out = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .arg("-c")
        .arg(dir.path().join("config.json"))
        .args(["policy", "ticket", "--json", "--device"])
        .arg(&img)
        .arg("--signature")
        .arg(&sig)
        .output()
        .unwrap();
    check("vaultguard policy ticket", out.clone());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (j["success"].as_bool(), j["tickets"].as_u64()),
        (Some(true), Some(1)),
        "{j}"
    );
    let text = std::fs::read_to_string(&sig).unwrap();
    assert!(text.contains("\"vaultguard_ticket\""), "{text}");
    // A signature the enrolled key did not make gets no ticket: exit 1, a line.
    let mut forged: serde_json::Value = serde_json::from_str(&text).unwrap();
    let other = vaultguard::encoding::base64_encode(&[7u8; 256]);
    forged["sha256"][0]["sig"] = serde_json::Value::String(other);
    let forged_path = dir.path().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .arg("-c")
        .arg(dir.path().join("config.json"))
        .args(["policy", "ticket", "--device"])
        .arg(&img)
        .arg("--signature")
        .arg(&forged_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no ticket for sha256") && err.contains("rejected"),
        "{err}"
    );

    cryptenroll_unlocks_with_signature(&sw, &img, &runsd, "signed");
}

/// systemd-cryptenroll 257 unseals the signed token of `img` with the signature
/// file in `runsd` (bound on /run/systemd in a private mount namespace, so the
/// host's is untouched) and adds NEWPASS: its own proof that it opened it.
fn cryptenroll_unlocks_with_signature(sw: &Swtpm, img: &Path, runsd: &Path, what: &str) {
    let script = format!(
        "mount --bind {} /run/systemd && exec {} systemd-cryptenroll \
         --unlock-tpm2-device={} --password {}",
        runsd.display(),
        trixie().display(),
        sw.tcti(),
        img.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env("NEWPASSWORD", NEWPASS)
        .env_remove("PASSWORD")
        .env_remove("PIN")
        .output()
        .unwrap();
    let err = check(
        &format!("systemd-cryptenroll 257 --unlock-tpm2-device ({what})"),
        out,
    );
    assert!(err.contains("New password enrolled as key slot"), "{err}");
    assert_eq!(volume_key(img, NEWPASS), volume_key(img, PASS));
}

// ---- systemd-measure 257: the signature file of a UKI's PCR 11 ---------------

/// The UKI sections measured here, in the canonical order of the UKI
/// specification in which systemd-stub measures them and systemd-measure
/// calculates: (systemd-measure option and file name, PE section name).
const UKI_SECTIONS: [(&str, &str); 4] = [
    ("linux", ".linux"),
    ("osrel", ".osrel"),
    ("cmdline", ".cmdline"),
    ("initrd", ".initrd"),
];

/// A UKI's sections as small files in `dir` (created), `kernel` as its .linux;
/// returns systemd-measure's section options for them.
fn uki(dir: &Path, kernel: &str) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let contents = [
        kernel,
        "ID=debian\nVERSION_ID=13\n",
        "root=/dev/mapper/vault ro quiet",
        "initrd of the measure interop test\n",
    ];
    UKI_SECTIONS
        .iter()
        .zip(contents)
        .map(|((opt, _), text)| {
            let f = dir.join(opt);
            std::fs::write(&f, text).unwrap();
            format!("--{opt}={}", f.display())
        })
        .collect()
}

/// PCR 11 after booting the UKI in `dir` up to the initrd, extended as
/// systemd-stub and systemd-pcrphase do it (docs/TPM2_PCR_MEASUREMENTS.md): per
/// section its name in ASCII with the trailing NUL, then its contents; then the
/// phase string "enter-initrd" without a NUL. Each through TPM2_PCR_Event
/// (tpm2_pcrevent), so the TPM hashes it into every bank as the firmware's
/// HashLogExtendEvent does.
fn boot_uki(sw: &mut Swtpm, dir: &Path) {
    for (opt, section) in UKI_SECTIONS {
        let name = dir.join(format!("{opt}.name"));
        std::fs::write(&name, format!("{section}\0")).unwrap();
        for f in [name, dir.join(opt)] {
            sw.tool("tpm2_pcrevent", &[f.to_str().unwrap(), "11"]);
        }
    }
    let phase = dir.join("phase");
    std::fs::write(&phase, "enter-initrd").unwrap();
    sw.tool("tpm2_pcrevent", &[phase.to_str().unwrap(), "11"]);
}

/// The live sha256 PCR 11 of `sw`, in hex.
fn pcr11(sw: &mut Swtpm, dir: &Path) -> String {
    let out = dir.join("pcr11.bin");
    sw.tool("tpm2_pcrread", &["sha256:11", "-o", out.to_str().unwrap()]);
    let raw = std::fs::read(&out).unwrap();
    assert_eq!(raw.len(), 32, "one sha256 PCR");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn measure257() -> Command {
    let mut c = Command::new(trixie());
    c.arg("/usr/lib/systemd/systemd-measure");
    c
}

/// `systemd-measure calculate --bank=sha256 --phase=enter-initrd --json=short`:
/// the PCR 11 value it predicts for the UKI.
fn measure_calculate(sections: &[String]) -> String {
    let out = measure257()
        .args([
            "calculate",
            "--bank=sha256",
            "--phase=enter-initrd",
            "--json=short",
        ])
        .args(sections)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    check("systemd-measure calculate", out);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("calculate --json");
    let e = &v["sha256"][0];
    assert_eq!(e["pcr"], 11, "{stdout}");
    assert_eq!(e["phase"], "enter-initrd", "{stdout}");
    e["hash"].as_str().expect("hash").to_string()
}

/// `systemd-measure sign` for the UKI into `sig` (with `--append=` it when it
/// exists). `phase`: one phase, or systemd-measure's default (the four phase
/// paths from enter-initrd to ready, as ukify signs them).
fn measure_sign(sections: &[String], keys: &(PathBuf, PathBuf), phase: Option<&str>, sig: &Path) {
    let mut cmd = measure257();
    cmd.args(["sign", "--bank=sha256", "--json=short"])
        .arg(format!("--private-key={}", keys.0.display()))
        .arg(format!("--public-key={}", keys.1.display()))
        .args(sections);
    if let Some(p) = phase {
        cmd.arg(format!("--phase={p}"));
    }
    if sig.exists() {
        cmd.arg(format!("--append={}", sig.display()));
    }
    let out = cmd.output().unwrap();
    let json = out.stdout.clone();
    check("systemd-measure sign", out);
    // systemd-measure writes the whole (merged) file to stdout.
    let tmp = sig.with_extension("new");
    std::fs::write(&tmp, json).unwrap();
    std::fs::rename(&tmp, sig).unwrap();
}

/// systemd-measure 257 signs a UKI's PCR 11 (RSA-2048 or P-256, one phase or
/// its default four); vaultguard, enrolled with `--public-key` over PCR 11,
/// unseals with that very file. A new kernel without a new signature is refused
/// with the one-line reason and the passphrase opens; once systemd-measure signs
/// it (`--append=`), the TPM opens both the new and the old UKI.
fn systemd_measure_signature_opens_vaultguard(kind: &str, phase: Option<&str>) {
    let mut sw = Swtpm::start();
    let dir = TempDir::new(&format!("measure257-{kind}"));
    let img = luks_image(dir.path(), PASS);
    let keys = signing_key(dir.path(), kind);
    // where systemd-cryptsetup looks (/run/systemd, bound over it below)
    let runsd = dir.path().join("run-systemd");
    std::fs::create_dir(&runsd).unwrap();
    let sig = runsd.join("tpm2-pcr-signature.json");
    let old = uki(&dir.path().join("uki1"), "vmlinuz 6.12.30-amd64");
    let new = uki(&dir.path().join("uki2"), "vmlinuz 6.12.31-amd64");

    // The boot as systemd-stub measures it is what systemd-measure predicts.
    boot_uki(&mut sw, &dir.path().join("uki1"));
    let predicted = measure_calculate(&old);
    assert_eq!(
        pcr11(&mut sw, dir.path()),
        predicted,
        "PCR 11 as measured is systemd-measure's calculation"
    );
    measure_sign(&old, &keys, phase, &sig);
    let entries = |sig: &Path| {
        vaultguard::tpm::signed::read_signature_file(sig)
            .unwrap()
            .entries(Bank::Sha256)
    };
    let per_uki = if phase.is_some() { 1 } else { 4 };
    assert_eq!(entries(&sig).len(), per_uki);
    assert!(entries(&sig).iter().all(|e| e.pcrs == [11]));

    // vaultguard enrols over signed PCR 11 (+ literal PCR 7 and the phase PCR
    // 15); its trial unseal at enrolment already opens with systemd-measure's file.
    let mut opts = enroll_opts(&sw, &img, vec![7], false);
    opts.tpm.signature = Some(sig.clone());
    opts.signed = Some(vaultguard::boot::SignedEnrolment {
        public_key_pem: std::fs::read(&keys.1).unwrap(),
        pcrs: vec![11],
        revocation_counter: None,
    });
    let r = enroll(&opts, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    assert!(
        matches!(r.verification, Verification::Unsealed),
        "{:?}",
        r.verification
    );
    let t = {
        let mut v = Vault::open(img.to_str().unwrap()).unwrap();
        v.tpm2_tokens().remove(0).1.unwrap()
    };
    assert_eq!(t.pubkey_pcrs, vec![11]);

    let mut uopts_tpm = tpm_opts(&sw);
    uopts_tpm.signature = Some(sig.clone());
    let unlock = |sw: &Swtpm, answers: &[&str]| {
        let mut t = uopts_tpm.clone();
        t.tcti = sw.tcti();
        let uopts = UnlockOptions {
            name: "measure257".into(),
            device: img.display().to_string(),
            tpm: Some(t),
            tries: 3,
            keyfile: None,
            flags: ActivateFlags::default(),
            crypttab: Default::default(),
        };
        let mut p = Scripted::new(answers);
        let mut v = Vault::open(img.to_str().unwrap()).unwrap();
        let got = acquire_volume_key(&mut v, &uopts, &mut p, &mut NoEvents).unwrap();
        assert_eq!(got.vk.as_bytes(), volume_key(&img, PASS).as_slice());
        (got.method, p.said)
    };
    let (method, said) = unlock(&sw, &[]);
    assert_eq!(method, Method::Tpm2, "{said:?}");
    if kind == "rsa" {
        // systemd 257 itself unseals the enrolment with systemd-measure's file.
        // RSA only: systemd-cryptenroll 257 hands the TPM systemd-measure's own
        // P-256 signature as RSASSA too and gets TPM_RC_SCHEME (0x2d2) from
        // VerifySignature (tried; vaultguard opens it, above).
        cryptenroll_unlocks_with_signature(&sw, &img, &runsd, "measure");
    }

    // A new kernel, nobody signed it: refused, one line naming why, passphrase.
    sw.restart();
    boot_uki(&mut sw, &dir.path().join("uki2"));
    let live = pcr11(&mut sw, dir.path());
    assert_eq!(live, measure_calculate(&new));
    assert_ne!(live, predicted);
    let (method, said) = unlock(&sw, &[PASS]);
    assert_eq!(method, Method::Passphrase, "{said:?}");
    let why = said
        .iter()
        .find(|l| l.contains("does not approve this boot"))
        .unwrap_or_else(|| panic!("no refusal reason in {said:?}"));
    assert!(
        why.contains(&format!("{} does not approve this boot", sig.display()))
            && why.contains("none of its signatures approves the current values of PCRs 11"),
        "{why}"
    );
    assert!(!why.trim_end().contains('\n'), "one line: {why:?}");

    // systemd-measure signs the new UKI into the same file: both boots open.
    measure_sign(&new, &keys, phase, &sig);
    assert_eq!(
        entries(&sig).len(),
        2 * per_uki,
        "--append= kept the old ones"
    );
    let (method, said) = unlock(&sw, &[]);
    assert_eq!(method, Method::Tpm2, "{said:?}");
    sw.restart();
    boot_uki(&mut sw, &dir.path().join("uki1"));
    let (method, said) = unlock(&sw, &[]);
    assert_eq!(method, Method::Tpm2, "the old UKI still opens: {said:?}");
}

#[test]
fn systemd_measure_257_signature_opens_a_vaultguard_enrolment_rsa_all_phases() {
    systemd_measure_signature_opens_vaultguard("rsa", None);
}

#[test]
fn systemd_measure_257_signature_opens_a_vaultguard_enrolment_ecc_enter_initrd() {
    systemd_measure_signature_opens_vaultguard("ec", Some("enter-initrd"));
}
