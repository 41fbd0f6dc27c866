//! The crypttab option table, row by row, against a LUKS2 image in a file and a
//! software TPM: `vaultguard attach --test NAME DEVICE KEYFILE OPTIONS` as the
//! built binary (which keyslot opens, or the exit status and the message), and
//! the library's unlock for what only a prompt can show (tries, timeout, echo).
//! Activation itself (discard, readonly, workqueues) needs device-mapper: here
//! the flags are checked as the unlock receives them, and `luks::tests` checks
//! that they become libcryptsetup's.

mod common;

use common::{luks_image, run, vaultguard_bin, Swtpm, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vaultguard::boot::commands::attach_options;
use vaultguard::boot::{acquire_volume_key, BootError, Method, NoEvents};
use vaultguard::config::Config;
use vaultguard::luks::Vault;
use vaultguard::prompt::{Ask, Echo, PromptError, Prompter, SecretKind};
use vaultguard::secret::SecretBytes;

const PASS: &str = "correct horse battery staple";

fn config_file(dir: &Path, tcti: &str, tpm_timeout: u64) -> PathBuf {
    named_config(dir, "config.json", tcti, tpm_timeout)
}

fn named_config(dir: &Path, name: &str, tcti: &str, tpm_timeout: u64) -> PathBuf {
    let p = dir.join(name);
    let d = dir.display();
    std::fs::write(
        &p,
        format!(
            r#"{{"vault": {{"state_path": "{d}/state.json"}},
  "tpm": {{"tcti": "{tcti}", "timeout": {tpm_timeout}}},
  "auth": {{"state_path": "{d}/lockout.json"}},
  "control": {{"socket": "{d}/control.sock"}},
  "audit": {{"path": "{d}/audit.jsonl", "tpm_anchor": false}}}}"#
        ),
    )
    .unwrap();
    p
}

/// `vaultguard -c CFG attach --test vgtest DEVICE KEYFILE OPTIONS`, no terminal.
/// `password-cache=no` comes first: the keyring cache (root's user keyring, shared
/// by every test and every test binary for 150 s) would otherwise answer with a
/// passphrase another test typed. The cache has its own tests (tests/prompt_pty.rs).
fn attach_test(cfg: &Path, device: &Path, keyfile: &str, options: &str) -> Output {
    let options = format!("password-cache=no,{options}");
    let options = options.as_str();
    Command::new("setsid")
        .arg("--wait")
        .arg(vaultguard_bin())
        .arg("-c")
        .arg(cfg)
        .args(["attach", "--test", "vgtest"])
        .arg(device)
        .args([keyfile, options])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn both(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn pass_file(dir: &Path) -> PathBuf {
    let p = dir.join("pass");
    std::fs::write(&p, PASS).unwrap();
    p
}

/// Enrol `img` with the TPM (no PIN) through the binary.
fn enroll(cfg: &Path, img: &Path, pass: &Path) {
    run(Command::new(vaultguard_bin())
        .arg("-c")
        .arg(cfg)
        .args(["enroll", "--unlock-passphrase-file"])
        .arg(pass)
        .arg(img)
        .stdin(Stdio::null()));
}

#[test]
fn keyfile_offset_and_size_cut_the_key_out_of_the_file() {
    let dir = TempDir::new("kfoff");
    let img = luks_image(dir.path(), PASS);
    let cfg = config_file(dir.path(), "device:/nonexistent", 5);
    let kf = dir.path().join("padded.key");
    std::fs::write(&kf, format!("0123456789{PASS}trailing junk")).unwrap();
    let kf = kf.to_str().unwrap();
    let opts = format!(
        "keyfile-offset=10,keyfile-size={},x-vaultguard.no-tpm,headless",
        PASS.len()
    );
    let o = attach_test(&cfg, &img, kf, &opts);
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        stdout(&o).contains("the key file opens keyslot 0"),
        "{}",
        both(&o)
    );
    // The whole file is not the key.
    let o = attach_test(&cfg, &img, kf, "x-vaultguard.no-tpm,headless");
    assert_ne!(code(&o), 0, "{}", both(&o));
    assert!(both(&o).contains("opens no keyslot"), "{}", both(&o));
    // A file too short for offset+size is an error naming both, not a short key.
    let o = attach_test(
        &cfg,
        &img,
        kf,
        "keyfile-offset=10,keyfile-size=4096,x-vaultguard.no-tpm,headless",
    );
    assert_eq!(code(&o), 1, "{}", both(&o));
    assert!(both(&o).contains("keyfile-size=4096"), "{}", both(&o));
}

#[test]
fn rd_vaultguard_options_feed_the_same_table_to_the_boot_unlock() {
    let dir = TempDir::new("rdopts");
    let img = luks_image(dir.path(), PASS);
    let cfg = config_file(dir.path(), "device:/nonexistent", 5);
    let kf = dir.path().join("padded.key");
    std::fs::write(&kf, format!("0123456789{PASS}junk")).unwrap();
    let unlock = |cmdline: &str| {
        // As in attach_test: no answer from the shared keyring cache.
        let cmdline = cmdline.replace(
            "rd.vaultguard.options=",
            "rd.vaultguard.options=password-cache=no,",
        );
        let f = dir.path().join("cmdline");
        std::fs::write(&f, cmdline).unwrap();
        Command::new("setsid")
            .arg("--wait")
            .arg(vaultguard_bin())
            .arg("-c")
            .arg(&cfg)
            .arg("--cmdline")
            .arg(&f)
            .args(["unlock", "--test", "--device"])
            .arg(&img)
            .arg("--key-file")
            .arg(&kf)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = unlock(&format!(
        "quiet rd.vaultguard.options=keyfile-offset=10,keyfile-size={},x-vaultguard.no-tpm,headless",
        PASS.len()
    ));
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        stdout(&o).contains("the key file opens keyslot 0"),
        "{}",
        both(&o)
    );
    let o = unlock("rd.vaultguard.options=x-vaultguard.no-tpm,headless");
    assert_ne!(code(&o), 0, "{}", both(&o));
    // tpm2-signature= is honoured (signed PCR policies); without a path it is refused.
    let o = unlock("rd.vaultguard.options=tpm2-signature=");
    assert_eq!(code(&o), 2, "{}", both(&o));
    assert!(both(&o).contains("tpm2-signature"), "{}", both(&o));
}

#[test]
fn header_opens_a_volume_whose_header_is_detached() {
    let dir = TempDir::new("hdr");
    let data = dir.path().join("data.img");
    let hdr = dir.path().join("vault.hdr");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::File::create(&hdr)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let pass = pass_file(dir.path());
    run(Command::new("cryptsetup")
        .args(["luksFormat", "--batch-mode", "--type", "luks2"])
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .arg("--header")
        .arg(&hdr)
        .arg("--key-file")
        .arg(&pass)
        .arg(&data));
    let cfg = config_file(dir.path(), "device:/nonexistent", 5);
    let p = pass.to_str().unwrap();
    let o = attach_test(
        &cfg,
        &data,
        p,
        &format!("header={},x-vaultguard.no-tpm,headless", hdr.display()),
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        stdout(&o).contains("the key file opens keyslot 0"),
        "{}",
        both(&o)
    );
    // Without it the data device is no LUKS2 volume.
    let o = attach_test(&cfg, &data, p, "x-vaultguard.no-tpm,headless");
    assert_eq!(code(&o), 1, "{}", both(&o));
    assert!(both(&o).contains("not a LUKS2 volume"), "{}", both(&o));
    // A relative header path is refused (usage), as systemd refuses it.
    let o = attach_test(&cfg, &data, p, "header=vault.hdr");
    assert_eq!(code(&o), 2, "{}", both(&o));
    assert!(both(&o).contains("header=vault.hdr"), "{}", both(&o));
}

#[test]
fn the_tpm_options_token_only_token_timeout_and_tcti() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("tpmopts");
    let img = luks_image(dir.path(), PASS);
    let pass = pass_file(dir.path());
    // The configuration names no usable TPM: the options must supply it.
    let cfg = named_config(dir.path(), "boot.json", "device:/nonexistent/tpm", 30);
    let enrol_cfg = named_config(dir.path(), "enrol.json", &sw.tcti(), 5);
    enroll(&enrol_cfg, &img, &pass);
    let p = pass.to_str().unwrap();
    let tcti = format!("x-vaultguard.tcti={}", sw.tcti());

    // x-vaultguard.tcti= keeps the commas of swtpm's TCTI (last option).
    let o = attach_test(&cfg, &img, "-", &format!("headless,{tcti}"));
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        stdout(&o).contains("the TPM2 token opens keyslot 1"),
        "{}",
        both(&o)
    );

    // tpm2-pcrs= and tpm2-pin= describe what the token records: accepted.
    let o = attach_test(
        &cfg,
        &img,
        "-",
        &format!("tpm2-pcrs=7,tpm2-pin=no,headless,{tcti}"),
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    // tpm2-device-none is no systemd option: warned about, the TPM is still used.
    let o = attach_test(
        &cfg,
        &img,
        "-",
        &format!("tpm2-device-none,headless,{tcti}"),
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(both(&o).contains("ignoring unknown crypttab option `tpm2-device-none`"));
    assert!(stdout(&o).contains("the TPM2 token opens"), "{}", both(&o));
    // x-vaultguard.no-tpm does switch it off.
    let o = attach_test(
        &cfg,
        &img,
        p,
        &format!("x-vaultguard.no-tpm,headless,{tcti}"),
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        stdout(&o).contains("the key file opens keyslot 0"),
        "{}",
        both(&o)
    );

    // token-timeout= is the wait for the TPM device (config: 30 s), and
    // tpm2-device= names that device.
    let start = Instant::now();
    let o = attach_test(
        &cfg,
        &img,
        p,
        "tpm2-device=/nonexistent/tpm7,token-timeout=1s,headless",
    );
    let waited = start.elapsed();
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert!(both(&o).contains("/nonexistent/tpm7"), "{}", both(&o));
    assert!(
        stdout(&o).contains("the key file opens keyslot 0"),
        "{}",
        both(&o)
    );
    // timeout= is the prompt's, not the TPM's: the TPM wait stays token-timeout's.
    let start = Instant::now();
    let o = attach_test(
        &cfg,
        &img,
        p,
        "tpm2-device=/nonexistent/tpm7,token-timeout=3s,timeout=1s,headless",
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // token-only: after a PCR change the key file is not tried; status 5.
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000001"],
    );
    let o = attach_test(&cfg, &img, p, &format!("token-only,{tcti}"));
    assert_eq!(code(&o), 5, "{}", both(&o));
    assert!(
        both(&o).contains("token-only") && both(&o).contains("PCR 7"),
        "{}",
        both(&o)
    );
    let o = attach_test(&cfg, &img, p, &format!("headless,{tcti}"));
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        stdout(&o).contains("the key file opens keyslot 0"),
        "{}",
        both(&o)
    );
}

#[test]
fn refused_and_unknown_options() {
    let dir = TempDir::new("refused");
    let img = luks_image(dir.path(), PASS);
    let cfg = config_file(dir.path(), "device:/nonexistent", 5);
    let pass = pass_file(dir.path());
    let p = pass.to_str().unwrap();
    for (opt, why) in [
        ("tpm2-pcrlock=/var/lib/systemd/pcrlock.json", "pcrlock"),
        ("fido2-device=auto", "FIDO2"),
        ("pkcs11-uri=auto", "PKCS#11"),
        ("tcrypt", "LUKS2 volumes only"),
        ("cipher=aes-xts-plain64", "plain dm-crypt"),
        ("tpm2-device=swtpm:port=2321", "x-vaultguard.tcti"),
        ("tpm2-pcrs=7+x", "PCR list"),
        ("x-vaultguard.colour=red", "not a vaultguard option"),
    ] {
        let o = attach_test(&cfg, &img, p, &format!("headless,{opt}"));
        assert_eq!(code(&o), 2, "{opt}: {}", both(&o));
        assert!(
            both(&o).contains(opt) && both(&o).contains(why),
            "{opt}: {}",
            both(&o)
        );
        assert!(!stdout(&o).contains("opens keyslot"), "{opt}: {}", both(&o));
    }
    // Unknown: one warning naming it, and the volume opens as without it.
    let o = attach_test(&cfg, &img, p, "colour=red,x-vaultguard.no-tpm,headless");
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        both(&o).contains("ignoring unknown crypttab option `colour=red`"),
        "{}",
        both(&o)
    );
    // The generator's options: accepted without a word.
    let o = attach_test(
        &cfg,
        &img,
        p,
        "nofail,noauto,luks,_netdev,x-systemd.device-timeout=10s,x-initrd.attach,\
         keyfile-timeout=5s,x-vaultguard.no-tpm,headless",
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(!both(&o).contains("ignoring"), "{}", both(&o));
    // headless: no prompt at all, said as such.
    let o = attach_test(&cfg, &img, "-", "x-vaultguard.no-tpm,headless");
    assert_eq!(code(&o), 1, "{}", both(&o));
    assert!(both(&o).contains("running headless"), "{}", both(&o));
}

/// Records every request and answers from a list.
struct Recorder {
    answers: Vec<&'static str>,
    asked: Vec<Ask>,
}

impl Prompter for Recorder {
    fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError> {
        self.asked.push(req.clone());
        if self.answers.is_empty() {
            return Err(PromptError::Cancelled);
        }
        Ok(SecretBytes::from_slice(self.answers.remove(0).as_bytes()))
    }
    fn say(&mut self, _line: &str) {}
    // Only the listed answers: not root's keyring cache, which other tests fill.
    fn unattended(&mut self, _req: &Ask) -> Vec<SecretBytes> {
        Vec::new()
    }
    fn remember(&mut self, _req: &Ask, _answer: &SecretBytes) {}
}

/// The unlock an attach line makes, up to the volume key, with `answers`.
fn unlock_with(
    img: &Path,
    options: &str,
    answers: Vec<&'static str>,
) -> (Result<Method, BootError>, Vec<Ask>) {
    let cfg = Config::default();
    let (opts, _, _) = attach_options(&cfg, "vgtest", img.to_str().unwrap(), None, Some(options))
        .expect("options accepted");
    let mut p = Recorder {
        answers,
        asked: Vec::new(),
    };
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let r = acquire_volume_key(&mut v, &opts, &mut p, &mut NoEvents).map(|a| a.method);
    (r, p.asked)
}

#[test]
fn tries_zero_is_unlimited_and_tries_n_stops_after_n() {
    let dir = TempDir::new("tries");
    let img = luks_image(dir.path(), PASS);
    let wrong = vec!["a", "b", "c", "d", "e", "f"];
    let mut answers = wrong.clone();
    answers.push(PASS);
    let (r, asked) = unlock_with(&img, "tries=0,x-vaultguard.no-tpm", answers);
    assert_eq!(r.unwrap(), Method::Passphrase);
    assert_eq!(asked.len(), 7);
    let (r, asked) = unlock_with(&img, "tries=2,x-vaultguard.no-tpm", wrong);
    assert!(
        matches!(r, Err(BootError::TriesExhausted { tries: 2, .. })),
        "{r:?}"
    );
    assert_eq!(asked.len(), 2);
}

#[test]
fn timeout_echo_and_cache_reach_the_prompt() {
    let dir = TempDir::new("prompt");
    let img = luks_image(dir.path(), PASS);
    let (r, asked) = unlock_with(
        &img,
        "timeout=45s,password-echo=yes,password-cache=no,x-vaultguard.no-tpm",
        vec![PASS],
    );
    assert_eq!(r.unwrap(), Method::Passphrase);
    let a = &asked[0];
    assert_eq!(a.kind, SecretKind::Passphrase);
    assert_eq!(a.timeout, Some(Duration::from_secs(45)));
    assert_eq!(a.echo, Echo::On);
    assert!(!a.accept_cached);
    let (_, asked) = unlock_with(
        &img,
        "password-echo=no,timeout=0,x-vaultguard.no-tpm",
        vec![PASS],
    );
    assert_eq!(asked[0].echo, Echo::Off);
    assert_eq!(asked[0].timeout, None);
    let (_, asked) = unlock_with(&img, "password-echo=masked,x-vaultguard.no-tpm", vec![PASS]);
    assert_eq!(asked[0].echo, Echo::Masked);
}

#[test]
fn activation_flags_and_the_measured_pcr_reach_the_unlock() {
    let dir = TempDir::new("flags");
    let img = luks_image(dir.path(), PASS);
    let cfg = Config::default();
    let (opts, headless, warnings) = attach_options(
        &cfg,
        "vgtest",
        img.to_str().unwrap(),
        None,
        Some(
            "discard,read-only,same-cpu-crypt,submit-from-crypt-cpus,no-read-workqueue,\
             no-write-workqueue,tpm2-measure-pcr=14,headless",
        ),
    )
    .unwrap();
    let f = opts.flags;
    assert!(f.discard && f.readonly && f.same_cpu_crypt && f.submit_from_crypt_cpus);
    assert!(f.no_read_workqueue && f.no_write_workqueue);
    assert_eq!(opts.tpm.as_ref().unwrap().phase_pcr, Some(14));
    assert!(headless && warnings.is_empty(), "{warnings:?}");
    let (opts, _, _) = attach_options(
        &cfg,
        "vgtest",
        img.to_str().unwrap(),
        None,
        Some("tpm2-measure-pcr=no"),
    )
    .unwrap();
    // No extend after this unlock; the phase PCR the enrolment binds stays known.
    assert!(opts.crypttab.no_measure);
    assert_eq!(opts.tpm.unwrap().phase_pcr, Some(cfg.tpm.phase_pcr));
}

/// A second volume attached with `tpm2-measure-pcr=no` after another volume's
/// unlock extended the phase PCR: refused, and told why (the phase PCR is
/// already extended in this boot), not sent to `vaultguard reseal`.
#[test]
fn after_another_volumes_latch_the_refusal_names_the_phase_pcr() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("latched");
    let img = luks_image(dir.path(), PASS);
    let pass = pass_file(dir.path());
    let cfg = named_config(dir.path(), "c.json", &sw.tcti(), 5);
    enroll(&cfg, &img, &pass);
    // What the first volume's unlock leaves behind.
    sw.tool(
        "tpm2_pcrextend",
        &["15:sha256=0000000000000000000000000000000000000000000000000000000000000001"],
    );
    let o = attach_test(
        &cfg,
        &img,
        pass.to_str().unwrap(),
        "tpm2-measure-pcr=no,headless",
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(
        both(&o).contains("PCR 15 (phase) is already extended"),
        "{}",
        both(&o)
    );
    assert!(!both(&o).contains("reseal"), "{}", both(&o));
    assert!(
        stdout(&o).contains("the key file opens keyslot 0"),
        "{}",
        both(&o)
    );
}

/// `--test` checks and leaves nothing behind: the passphrase that opened the
/// volume is not added to the keyring cache (an unlock would add it).
#[test]
fn a_test_unlock_adds_nothing_to_the_passphrase_cache() {
    struct Counting(usize);
    impl Prompter for Counting {
        fn ask(&mut self, _: &Ask) -> Result<SecretBytes, PromptError> {
            Ok(SecretBytes::from_slice(PASS.as_bytes()))
        }
        fn say(&mut self, _: &str) {}
        fn unattended(&mut self, _: &Ask) -> Vec<SecretBytes> {
            Vec::new()
        }
        fn remember(&mut self, _: &Ask, _: &SecretBytes) {
            self.0 += 1;
        }
    }
    let dir = TempDir::new("testcache");
    let img = luks_image(dir.path(), PASS);
    let cfg = Config::default();
    let (opts, _, _) = attach_options(
        &cfg,
        "vgtest",
        img.to_str().unwrap(),
        None,
        Some("x-vaultguard.no-tpm"),
    )
    .expect("options accepted");
    let mut p = Counting(0);
    let t = vaultguard::boot::test_unlock(&opts, &mut p, &mut NoEvents).unwrap();
    assert_eq!(t.method, Method::Passphrase);
    assert_eq!(p.0, 0, "--test cached the passphrase");
    // The same prompter through the unlock's own path does cache it.
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    acquire_volume_key(&mut v, &opts, &mut p, &mut NoEvents).unwrap();
    assert_eq!(p.0, 1);
}
