//! The console prompt on a real terminal (a pty with the binary as its session
//! leader), systemd's keyring passphrase cache and credentials, through the real
//! CLI: `vaultguard enroll --device IMAGE` against LUKS2 images in files and a
//! software TPM (enrolment asks for the existing passphrase first; it needs no
//! device-mapper, which hosts without dm_mod lack; the QEMU scenario
//! shared_passphrase covers `attach`).
//!
//! Root tier: the cache lives in root's user keyring. The tests of this file run
//! one at a time (they share that keyring and its `cryptsetup` key).

mod common;

use common::{luks_image, Swtpm, TempDir};
use nix::pty::openpty;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// <linux/tty.h>'s packet-mode status bit for "the input queue was flushed".
const TIOCPKT_FLUSHREAD: u8 = 1;

/// The keyring is shared: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "root tier: the passphrase cache is root's user keyring; run as root with --features root-tests"
    );
}

/// A unique passphrase, so that nothing another test cached can open our image.
fn passphrase(tag: &str) -> String {
    let mut r = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut r)
        .unwrap();
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{tag}-{hex}")
}

/// A configuration for `vaultguard -c`: the swtpm's TCTI and an audit log in `dir`.
fn config(dir: &Path, sw: &Swtpm) -> std::path::PathBuf {
    let cfg = dir.join("config.json");
    let text = format!(
        r#"{{"tpm":{{"tcti":"{}"}},"audit":{{"path":"{}"}}}}"#,
        sw.tcti(),
        dir.join("audit.jsonl").display()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `vaultguard -c CFG enroll --device IMG` in a new session; with `pty`, a new pty
/// is its controlling terminal (stdin, stdout, stderr too). Returns the child, the
/// pty master and a channel of everything the child writes to the terminal.
fn enroll_on_pty(
    cfg: &Path,
    img: &Path,
    creds: Option<&Path>,
) -> (Child, OwnedFd, mpsc::Receiver<Vec<u8>>) {
    let (child, master, rx, _) = enroll_on_pty_watching_flushes(cfg, img, creds);
    (child, master, rx)
}

/// `vaultguard -c CFG ARGS...` on a new pty, as [`enroll_on_pty`].
fn vaultguard_on_pty(
    cfg: &Path,
    args: &[&str],
    creds: Option<&Path>,
) -> (Child, OwnedFd, mpsc::Receiver<Vec<u8>>) {
    let (child, master, rx, _) = on_pty(cfg, args, creds);
    (child, master, rx)
}

/// As [`enroll_on_pty`], with the master in packet mode (TIOCPKT): the flag turns
/// true if the child ever flushes the terminal's input queue (TIOCPKT_FLUSHREAD),
/// which is what throws a passphrase typed during the prompt away.
fn enroll_on_pty_watching_flushes(
    cfg: &Path,
    img: &Path,
    creds: Option<&Path>,
) -> (
    Child,
    OwnedFd,
    mpsc::Receiver<Vec<u8>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    on_pty(cfg, &["enroll", "--device", img.to_str().unwrap()], creds)
}

fn on_pty(
    cfg: &Path,
    args: &[&str],
    creds: Option<&Path>,
) -> (
    Child,
    OwnedFd,
    mpsc::Receiver<Vec<u8>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let pty = openpty(None, None).expect("a pty pair");
    let on: nix::libc::c_int = 1;
    // SAFETY: TIOCPKT takes a pointer to an int that outlives the call.
    let rc = unsafe { nix::libc::ioctl(pty.master.as_raw_fd(), nix::libc::TIOCPKT, &on) };
    assert_eq!(rc, 0, "TIOCPKT: {}", std::io::Error::last_os_error());
    let slave = pty.slave;
    let mut cmd = Command::new(common::vaultguard_bin());
    cmd.arg("-c")
        .arg(cfg)
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    if let Some(c) = creds {
        cmd.env("CREDENTIALS_DIRECTORY", c);
    }
    // SAFETY: only async-signal-safe calls between fork and exec (setsid, ioctl).
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("vaultguard runs");
    drop(slave);
    let (tx, rx) = mpsc::channel();
    let flushed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saw_flush = flushed.clone();
    let mut reader = std::fs::File::from(pty.master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        // EIO once the child (the last holder of the slave) has exited. In packet
        // mode each read starts with a status byte: 0 for data, else events.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            if buf[0] != 0 {
                if buf[0] & TIOCPKT_FLUSHREAD != 0 {
                    saw_flush.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                continue;
            }
            if tx.send(buf[1..n].to_vec()).is_err() {
                break;
            }
        }
    });
    (child, pty.master, rx, flushed)
}

/// Wait for the child; kill it and fail after `within`.
fn wait_for(child: &mut Child, within: Duration, seen: &[u8]) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vaultguard attach still waiting after {within:?} (the typed passphrase was lost); terminal showed: {:?}",
                String::from_utf8_lossy(seen)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drain(rx: &mpsc::Receiver<Vec<u8>>, into: &mut Vec<u8>, for_: Duration) {
    let end = Instant::now() + for_;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(b) => into.extend(b),
            Err(_) => break,
        }
    }
}

fn type_in(master: &OwnedFd, bytes: &[u8]) {
    let mut f = std::fs::File::from(master.try_clone().unwrap());
    f.write_all(bytes).unwrap();
}

/// The enrolment happened: the header holds a systemd-tpm2 token.
fn assert_enrolled(img: &Path) {
    let d = common::run(Command::new("cryptsetup").arg("luksDump").arg(img));
    let d = String::from_utf8_lossy(&d.stdout);
    assert!(
        d.contains("systemd-tpm2"),
        "no TPM2 token after enroll said it succeeded: {d}"
    );
}

fn wait_for_prompt(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut Vec<u8>, first: &[u8]) {
    let start = Instant::now();
    while !seen.windows(first.len()).any(|w| w == first) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(b) => seen.extend(b),
            Err(_) => panic!(
                "no prompt within {:?}: {:?}",
                start.elapsed(),
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn passphrase_written_the_instant_the_prompt_appears_unlocks() {
    require_root();
    let _one = serial();
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
    let sw = Swtpm::start();
    let dir = TempDir::new("pty-instant");
    let pass = passphrase("instant");
    let img = luks_image(dir.path(), &pass);
    let cfg = config(dir.path(), &sw);
    let (mut child, master, rx, flushed) = enroll_on_pty_watching_flushes(&cfg, &img, None);
    // The prompt's first byte ("Passphrase for ..."): answer at once.
    let mut seen = Vec::new();
    wait_for_prompt(&rx, &mut seen, b"P");
    type_in(&master, format!("{pass}\r").as_bytes());
    let st = wait_for(&mut child, Duration::from_secs(60), &seen);
    drain(&rx, &mut seen, Duration::from_millis(200));
    let shown = String::from_utf8_lossy(&seen);
    assert!(st.success(), "enroll failed: {shown}");
    assert!(shown.contains("Passphrase for "), "{shown}");
    assert_enrolled(&img);
    // Echo was off before the prompt text was written: the passphrase typed
    // while it appeared is not on the screen.
    assert!(!shown.contains(&pass), "passphrase echoed: {shown}");
    // Whether the answer arrives before or after the child changes the terminal
    // modes is a race this test cannot steer; the input queue must never have been
    // flushed either way (TCSAFLUSH would lose an answer that wins the race).
    assert!(
        !flushed.load(std::sync::atomic::Ordering::SeqCst),
        "the prompt flushed the terminal's input queue"
    );
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn passphrase_typed_ahead_before_the_prompt_unlocks() {
    require_root();
    let _one = serial();
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
    let sw = Swtpm::start();
    let dir = TempDir::new("pty-ahead");
    let pass = passphrase("ahead");
    let img = luks_image(dir.path(), &pass);
    let cfg = config(dir.path(), &sw);
    let (mut child, master, rx) = enroll_on_pty(&cfg, &img, None);
    // Typed before the binary has even opened the header: it waits in the
    // terminal's input queue, which the prompt must not flush.
    type_in(&master, format!("{pass}\r").as_bytes());
    let mut seen = Vec::new();
    let st = wait_for(&mut child, Duration::from_secs(60), &seen);
    drain(&rx, &mut seen, Duration::from_millis(200));
    let shown = String::from_utf8_lossy(&seen);
    assert!(st.success(), "enroll failed: {shown}");
    assert!(shown.contains("Passphrase for "), "{shown}");
    assert_enrolled(&img);
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
}

/// The `cryptsetup` user key of root's user keyring, as /proc/keys shows it.
fn proc_keys(name: &str) -> Option<String> {
    std::fs::read_to_string("/proc/keys")
        .unwrap()
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 8 && f[7] == "user" && f[8].trim_end_matches(':') == name
        })
        .map(str::to_string)
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn one_typed_passphrase_opens_two_volumes_through_the_keyring_cache() {
    require_root();
    let _one = serial();
    let _ = vaultguard::keyring::cache::forget("cryptenroll");
    // A cached passphrase that opens neither volume: tried, then the prompt follows.
    let wrong = passphrase("stale");
    assert!(vaultguard::keyring::cache::push("cryptenroll", wrong.as_bytes()).unwrap());
    let sw = Swtpm::start();
    let pass = passphrase("shared");
    let (d1, d2) = (TempDir::new("cache-1"), TempDir::new("cache-2"));
    let (img1, img2) = (luks_image(d1.path(), &pass), luks_image(d2.path(), &pass));
    let cfg = config(d1.path(), &sw);

    // First volume: the stale cache entry fails, the console asks, the answer opens.
    let (mut child, master, rx) = enroll_on_pty(&cfg, &img1, None);
    let mut seen = Vec::new();
    wait_for_prompt(&rx, &mut seen, b"Passphrase for");
    type_in(&master, format!("{pass}\r").as_bytes());
    let st = wait_for(&mut child, Duration::from_secs(60), &seen);
    drain(&rx, &mut seen, Duration::from_millis(200));
    assert!(st.success(), "{}", String::from_utf8_lossy(&seen));
    assert_enrolled(&img1);

    // `enroll` asks as systemd-cryptenroll does: the answer is in the user key
    // `cryptenroll` (an unlock's is `cryptsetup`), after the stale one,
    // NUL-separated, with systemd's timeout (150 s: /proc/keys shows a countdown).
    let line = proc_keys("cryptenroll").expect("a `cryptenroll` user key in /proc/keys");
    let timeout = line.split_whitespace().nth(3).unwrap().to_string();
    assert!(
        timeout != "perm" && (timeout.ends_with('m') || timeout.ends_with('s')),
        "no timeout on the cache key: {line}"
    );
    let out = Command::new("keyctl")
        .args(["pipe", "%user:cryptenroll"])
        .output()
        .unwrap();
    assert!(out.status.success(), "keyctl pipe: {out:?}");
    assert_eq!(out.stdout, format!("{wrong}\0{pass}\0").into_bytes());

    // Second volume: nobody types anything, and it opens; no prompt is shown.
    let (mut child, _master, rx) = enroll_on_pty(&cfg, &img2, None);
    let mut seen = Vec::new();
    let st = wait_for(&mut child, Duration::from_secs(60), &seen);
    drain(&rx, &mut seen, Duration::from_millis(200));
    let shown = String::from_utf8_lossy(&seen);
    assert!(st.success(), "{shown}");
    assert!(!shown.contains("Passphrase for"), "asked again: {shown}");
    assert_enrolled(&img2);
    let _ = vaultguard::keyring::cache::forget("cryptenroll");
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn a_systemd_credential_answers_before_any_prompt() {
    require_root();
    let _one = serial();
    let _ = vaultguard::keyring::cache::forget("cryptenroll");
    let sw = Swtpm::start();
    let pass = passphrase("cred");
    let dir = TempDir::new("cred");
    let img = luks_image(dir.path(), &pass);
    let cfg = config(dir.path(), &sw);
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();

    // `enroll` reads systemd-cryptenroll's credential (an unlock reads
    // `cryptsetup.passphrase`). A wrong one is no error: the prompt follows, and
    // the typed answer opens.
    std::fs::write(creds.join("cryptenroll.passphrase"), b"not it").unwrap();
    let (mut child, master, rx) = enroll_on_pty(&cfg, &img, Some(&creds));
    let mut seen = Vec::new();
    wait_for_prompt(&rx, &mut seen, b"Passphrase for");
    type_in(&master, format!("{pass}\r").as_bytes());
    let st = wait_for(&mut child, Duration::from_secs(60), &seen);
    drain(&rx, &mut seen, Duration::from_millis(200));
    assert!(st.success(), "{}", String::from_utf8_lossy(&seen));
    assert_enrolled(&img);
    let _ = vaultguard::keyring::cache::forget("cryptenroll");

    // The right one (systemd reads it byte for byte: no trailing newline) answers
    // before any prompt: nothing is typed and none is shown.
    std::fs::write(creds.join("cryptenroll.passphrase"), pass.as_bytes()).unwrap();
    let dir2 = TempDir::new("cred-2");
    let img2 = luks_image(dir2.path(), &pass);
    let (mut child, _master, rx) = enroll_on_pty(&cfg, &img2, Some(&creds));
    let mut seen = Vec::new();
    let st = wait_for(&mut child, Duration::from_secs(60), &seen);
    drain(&rx, &mut seen, Duration::from_millis(200));
    let shown = String::from_utf8_lossy(&seen);
    assert!(st.success(), "{shown}");
    assert!(!shown.contains("Passphrase for"), "asked: {shown}");
    assert_enrolled(&img2);
    // A credential is not cached: it is there for the next volume anyway.
    assert!(proc_keys("cryptenroll").is_none());
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn the_terminal_gets_its_modes_back_when_sigterm_ends_the_prompt() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    require_root();
    let _one = serial();
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
    let sw = Swtpm::start();
    let dir = TempDir::new("pty-sigterm");
    let img = luks_image(dir.path(), &passphrase("sigterm"));
    let cfg = config(dir.path(), &sw);
    let (mut child, master, rx) = enroll_on_pty(&cfg, &img, None);
    let before = tcgetattr(&master).unwrap().local_flags;
    assert!(before.contains(LocalFlags::ECHO | LocalFlags::ICANON));
    let mut seen = Vec::new();
    wait_for_prompt(&rx, &mut seen, b"Passphrase for");
    // The prompt's modes (the pair shares termios): no echo, and canonical, the
    // mode in which the kernel wipes the line it buffered once it is read.
    let during = tcgetattr(&master).unwrap().local_flags;
    assert!(!during.intersects(LocalFlags::ECHO), "{during:?}");
    assert!(during.contains(LocalFlags::ICANON), "{during:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_for(&mut child, Duration::from_secs(10), &seen);
    // It still dies of the signal, as before...
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(15), "{st:?}");
    // ...and the operator's terminal echoes again.
    let after = tcgetattr(&master).unwrap().local_flags;
    assert_eq!(
        after & (LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG),
        before & (LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG),
        "terminal left in the prompt's modes"
    );
}

/// The requests the boot flow makes (no terminal needed): the PIN prompt names
/// the volume and device and carries the TPM's own count of tries left, with no
/// ask-password Id (as systemd: agents answering `cryptsetup:<device>` with a
/// passphrase must not spend TPM tries); the passphrase request is systemd's
/// `cryptsetup:<device path>` with the `cryptsetup` cache, and only the answer
/// that opened the volume is remembered.
#[test]
fn pin_and_passphrase_requests_name_the_device_and_count_tpm_tries() {
    use vaultguard::boot::{acquire_volume_key, enroll, Method, NoEvents};
    use vaultguard::luks::Vault;
    use vaultguard::prompt::Scripted;
    const PASS: &str = "correct horse battery staple";
    let mut sw = Swtpm::start();
    sw.tool(
        "tpm2_dictionarylockout",
        &["-s", "-n", "3", "-t", "600", "-l", "600"],
    );
    let dir = TempDir::new("pin-requests");
    let img = luks_image(dir.path(), PASS);
    let mut o = common::enroll_opts(&sw, &img);
    o.pin = true;
    enroll(
        &o,
        &mut Scripted::new(&[PASS, "1357", "1357"]),
        &mut NoEvents,
    )
    .unwrap();
    let mut opts = common::unlock_opts(&sw, &img);
    opts.tries = 5;
    let mut p = Scripted::new(&["0000", "1111", "wrong passphrase", PASS]);
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &opts, &mut p, &mut NoEvents).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    let dev = img.display().to_string();
    assert_eq!(
        p.asked,
        vec![
            format!("|TPM2 PIN for secure-ai-vault ({dev}, 3 TPM tries left): "),
            format!("|TPM2 PIN for secure-ai-vault ({dev}, 2 TPM tries left): "),
            format!("cryptsetup:{dev}|Passphrase for secure-ai-vault ({dev}): "),
            format!("cryptsetup:{dev}|Passphrase for secure-ai-vault ({dev}): "),
        ]
    );
    assert!(
        p.said
            .iter()
            .any(|l| l.contains("wrong TPM PIN (2 tries left before the TPM locks out)")),
        "{:?}",
        p.said
    );
    // Only the passphrase that opened the volume goes to the cache.
    assert_eq!(p.remembered.len(), 1);
    assert_eq!(p.remembered[0].as_bytes(), PASS.as_bytes());
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn a_tpm2_pin_credential_answers_the_pin_prompt() {
    use vaultguard::boot::{enroll, NoEvents};
    use vaultguard::prompt::Scripted;
    require_root();
    let _one = serial();
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
    let sw = Swtpm::start();
    let pass = passphrase("pin-cred");
    let dir = TempDir::new("pin-cred");
    let img = luks_image(dir.path(), &pass);
    let mut o = common::enroll_opts(&sw, &img);
    o.pin = true;
    enroll(
        &o,
        &mut Scripted::new(&[&pass, "2468", "2468"]),
        &mut NoEvents,
    )
    .unwrap();
    let cfg = config(dir.path(), &sw);
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("cryptsetup.tpm2-pin"), b"2468").unwrap();
    // reseal opens the volume through the current (PIN) enrolment first: with the
    // credential nobody is asked for the current PIN or a passphrase.
    let (mut child, master, rx) = vaultguard_on_pty(
        &cfg,
        &["reseal", "--device", img.to_str().unwrap()],
        Some(&creds),
    );
    let mut seen = Vec::new();
    // The reseal keeps a PIN: the new one is typed (NewPin has no credential).
    wait_for_prompt(&rx, &mut seen, b"New TPM2 PIN: ");
    type_in(&master, b"2468\r");
    wait_for_prompt(&rx, &mut seen, b"Repeat the TPM2 PIN: ");
    type_in(&master, b"2468\r");
    let start = Instant::now();
    let st = loop {
        drain(&rx, &mut seen, Duration::from_millis(100));
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("reseal still running: {:?}", String::from_utf8_lossy(&seen));
        }
    };
    drain(&rx, &mut seen, Duration::from_millis(200));
    let shown = String::from_utf8_lossy(&seen);
    assert!(st.success(), "{shown}");
    assert!(
        !shown.contains("TPM2 PIN for"),
        "asked for the PIN: {shown}"
    );
    assert!(
        !shown.contains("Passphrase for"),
        "asked for the passphrase: {shown}"
    );
    assert!(shown.contains("resealed into TPM2 keyslot"), "{shown}");
}
