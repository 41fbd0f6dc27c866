//! Attacks on issue 13's surfaces (signed policies, `policy predict`, revocation,
//! the event-log explainer), each a finding that was fixed: files planted where
//! the signature file, the event log or a staged component is read (a FIFO, a
//! device, a directory, a symlink loop) are refused with one line instead of
//! blocking the unlock or reading without end.

mod common;

use common::TempDir;
use std::path::{Path, PathBuf};
use std::time::Duration;
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
