//! Attacks on the prompt path (issue 14): systemd's ask-password protocol from a
//! sender that is not root, and the keyring passphrase cache from a user that is
//! not root.
//!
//! Needs root: only root's answers count, and other uids are made with setuid in
//! forked children.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vaultguard::prompt::ask_password::AskPassword;
use vaultguard::prompt::{Ask, Prompter, SecretKind};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "root tier: only root's answers count and other uids are made with setuid; run as root"
    );
}

/// The socket named by the first request in `dir`.
fn wait_for_socket(dir: &Path) -> PathBuf {
    for _ in 0..500 {
        let found = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("ask."));
        if let Some(ask) = found {
            let text = std::fs::read_to_string(ask.path()).unwrap();
            let sock = text
                .lines()
                .find_map(|l| l.strip_prefix("Socket="))
                .unwrap();
            return PathBuf::from(sock);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no ask-password request appeared in {}", dir.display());
}

/// Send `data` to the datagram socket `sock` from a child running as `uid`.
/// Returns whether the send went through.
fn send_as(uid: u32, sock: &Path, data: &[u8]) -> bool {
    use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let addr = UnixAddr::new(sock).unwrap();
    // SAFETY: the child makes raw system calls on memory prepared before the
    // fork (no allocation, no locks) and leaves with _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = if rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(uid))
                .is_err()
                || rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)).is_err()
            {
                100
            } else {
                i32::from(sendto(fd.as_raw_fd(), data, &addr, MsgFlags::empty()).is_err())
            };
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit state.
            unsafe { nix::libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            matches!(
                nix::sys::wait::waitpid(child, None).unwrap(),
                nix::sys::wait::WaitStatus::Exited(_, 0)
            )
        }
    }
}

/// Attack: an unprivileged process answers (or cancels) a passphrase request on
/// the agent socket, here even with the socket made writable for everyone. Its
/// answers are ignored; root's agent answers and that answer is the one taken.
#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn an_agent_answer_from_a_non_root_sender_is_ignored() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("vg-attack3-ask-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path().to_path_buf();
    let asker = std::thread::spawn(move || {
        let mut req = Ask::new(SecretKind::Passphrase, "cryptsetup:/dev/vdb", "Passphrase");
        req.timeout = Some(Duration::from_secs(20));
        AskPassword::in_dir(&d)
            .ask(&req)
            .map(|s| s.as_bytes().to_vec())
    });
    let sock = wait_for_socket(dir.path());
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(
        send_as(60041, &sock, b"+planted by 60041"),
        "the send failed"
    );
    assert!(send_as(60041, &sock, b"-"), "the send failed");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!asker.is_finished(), "a non-root answer ended the request");
    assert!(send_as(0, &sock, b"+root's answer"));
    let got = asker.join().unwrap().expect("root's answer is taken");
    assert_eq!(got, b"root's answer");
}

/// Attack: an unprivileged user plants a `user` key named `cryptsetup` for root
/// to find (`keyctl add user cryptsetup … @u` from uid 60042 goes into its own
/// user keyring, and root's is out of its reach): root's cache stays empty.
#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn no_user_can_plant_a_cached_passphrase_for_root() {
    require_root();
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
    // The child tries root's user keyring by its id (as seen in /proc/keys).
    // SAFETY: KEYCTL_GET_KEYRING_ID (0) on KEY_SPEC_USER_KEYRING (-4), creating
    // it (1): integer arguments only.
    let id = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            0 as nix::libc::c_long,
            -4 as nix::libc::c_long,
            1 as nix::libc::c_long,
        )
    };
    assert!(
        id > 0,
        "root's user keyring: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as in send_as: raw system calls only, then _exit.
    let child = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = if rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(60042))
                .is_err()
                || rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(60042)).is_err()
            {
                100
            } else {
                // SAFETY: add_key with NUL-terminated static strings and a valid
                // buffer; the kernel decides whether the keyring may be written.
                let r = unsafe {
                    nix::libc::syscall(
                        nix::libc::SYS_add_key,
                        c"user".as_ptr(),
                        c"cryptsetup".as_ptr(),
                        b"planted".as_ptr(),
                        7usize,
                        id as nix::libc::c_long,
                    )
                };
                i32::from(r >= 0)
            };
            // SAFETY: _exit is async-signal-safe.
            unsafe { nix::libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    let status = nix::sys::wait::waitpid(child, None).unwrap();
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Exited(child, 0),
        "uid 60042 added a key to root's user keyring"
    );
    assert!(vaultguard::keyring::cache::lookup("cryptsetup")
        .unwrap()
        .is_empty());
}
