//! Attacks on issue 13's surfaces (signed policies, `policy predict`, revocation,
//! the event-log explainer), each a finding that was fixed: files planted where
//! the signature file, the event log or a staged component is read (a FIFO, a
//! device, a directory, a symlink loop) are refused with one line instead of
//! blocking the unlock or reading without end.

mod common;

use common::{vaultguard_bin, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vaultguard::tpm::signed::read_signature_file;

/// `mkfifo` at `p` (nobody ever writes to it).
fn fifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// Run `f` on a thread; its result, or a test failure naming `what` when it has
/// not returned within 5 s (a hang is the finding).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within 5 s (hangs)"),
    }
}

/// Run the binary, killing it (and failing) when it has not exited within 10 s.
fn run_bounded(what: &str, cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vaultguard");
    let t = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: vaultguard did not exit within 10 s (hangs)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Places an attacker can make of the signature file's name: each is refused with
/// one line naming the path and what is wrong, promptly.
fn planted(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let f = dir.join("fifo.json");
    fifo(&f);
    let d = dir.join("dir.json");
    std::fs::create_dir(&d).unwrap();
    let l = dir.join("loop.json");
    std::os::unix::fs::symlink(&l, &l).unwrap();
    vec![
        (f, "is a FIFO, not a regular file"),
        (d, "is a directory, not a regular file"),
        ("/dev/zero".into(), "is a device, not a regular file"),
        (l, "symbolic links"),
    ]
}

#[test]
fn signature_file_that_is_a_fifo_device_directory_or_loop_is_refused_at_once() {
    let dir = TempDir::new("attack13-sigfile");
    for (path, want) in planted(dir.path()) {
        let p = path.clone();
        let r = within(
            &format!("read_signature_file({})", path.display()),
            move || read_signature_file(&p).map_err(|e| e.to_string()),
        );
        let e = r.expect_err("a planted non-file must not parse as a signature file");
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(want), "{}: {e}", path.display());
        assert!(!e.contains('\n'), "{e}");
    }
}

/// `policy predict` with a staged initrd or kernel that is a FIFO or /dev/zero,
/// or an event log that is a FIFO: one line, exit 1, within seconds (it read
/// the FIFO forever, and /dev/zero until memory ran out).
#[test]
fn predict_with_a_fifo_or_device_for_the_log_initrd_or_kernel_fails_in_one_line() {
    let dir = TempDir::new("attack13-predict");
    let cfg = dir.path().join("config.json");
    // No TPM is reached: the inputs are refused first.
    std::fs::write(&cfg, r#"{"tpm":{"tcti":"swtpm:host=127.0.0.1,port=1"}}"#).unwrap();
    let log = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/tpm/testdata/ovmf-direct-boot.eventlog"
    );
    let f = dir.path().join("staged.fifo");
    fifo(&f);
    let fs = f.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--event-log", log, "--initrd", fs],
            "cannot read the staged initrd",
        ),
        (
            vec!["--event-log", log, "--kernel", fs],
            "cannot read the staged kernel",
        ),
        (
            vec!["--event-log", log, "--initrd", "/dev/zero"],
            "/dev/zero: is a device, not a regular file",
        ),
        (
            vec!["--event-log", fs, "--initrd", log],
            "cannot read the TPM event log",
        ),
    ] {
        let out = run_bounded(
            &format!("predict {args:?}"),
            Command::new(vaultguard_bin())
                .arg("-c")
                .arg(&cfg)
                .args(["policy", "predict"])
                .args(&args),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            err.contains("not a regular file"),
            "{args:?}: the line says what is wrong: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: no prediction: {out:?}");
    }
}
