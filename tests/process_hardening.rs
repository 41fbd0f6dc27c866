//! The built binary keeps its secrets out of core dumps, observed from outside.
//!
//! The QEMU scenarios fail a boot that leaves a core file, but vaultguard disables
//! its own dumps, so that check can only ever catch other programs. This checks
//! the disabling itself: `vaultguard supervise` (the long-lived process that
//! receives passphrases) is started as an ordinary user, and while it waits
//! another process reads what the kernel says about it:
//!
//! - not dumpable (PR_SET_DUMPABLE 0): the kernel then gives the process's /proc
//!   files to root instead of to the process's own uid, which is also what keeps
//!   other processes of that uid from ptrace-ing it or reading its memory;
//! - RLIMIT_CORE 0, soft and hard (`/proc/PID/limits`).
//!
//! A process that does not harden itself (`sleep`, started the same way) is the
//! control: its /proc files belong to its uid, so the observation can fail.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The uid to run the binary as: not root (root owns every /proc file anyway),
/// so when the tests run as root an unprivileged uid, else the tests' own.
fn unprivileged() -> (u32, u32) {
    if rustix::process::geteuid().is_root() {
        (65534, 65534)
    } else {
        (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        )
    }
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_as(cmd: &mut Command, uid: u32, gid: u32) -> Child {
    if rustix::process::geteuid().is_root() {
        // std clears the supplementary groups when root changes uid.
        cmd.uid(uid).gid(gid);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Owner of /proc/PID/status, read while the process is known to be running.
fn proc_owner(pid: u32) -> u32 {
    std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid()
}

/// `Uid:` (real) of /proc/PID/status.
fn proc_real_uid(pid: u32) -> u32 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// The soft and hard limit of `Max core file size` in /proc/PID/limits.
fn core_limit(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .to_string();
    let mut f = line["Max core file size".len()..].split_whitespace();
    (f.next().unwrap().into(), f.next().unwrap().into())
}

fn stop(mut child: Child) -> String {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    );
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    err
}

#[test]
fn the_supervisor_is_not_dumpable_and_has_no_core_limit() {
    let (uid, gid) = unprivileged();
    let dir = Scratch(std::env::temp_dir().join(format!("vg-harden-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir(&dir.0).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Everything the supervisor writes lives in a directory of the uid it runs as,
    // writable by that uid only (the socket directory check asks for that).
    let run = dir.0.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::chown(
        &run,
        Some(rustix::process::Uid::from_raw(uid)),
        Some(rustix::process::Gid::from_raw(gid)),
    )
    .unwrap();
    let socket = run.join("control.sock");
    let config = dir.0.join("config.json");
    let p = |name: &str| run.join(name).display().to_string();
    std::fs::write(
        &config,
        serde_json::json!({
            "vault": {"name": "vg-harden-none", "mount": p("mnt"), "state_path": p("state.json")},
            "auth": {"state_path": p("lockout.json")},
            "control": {"socket": socket.display().to_string()},
            "audit": {"path": p("audit.jsonl")},
        })
        .to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    // A copy the other uid can reach: the build tree may sit below a directory
    // only root can enter (a CI clone in a 0700 temporary directory).
    let bin = dir.0.join("vaultguard");
    std::fs::copy(env!("CARGO_BIN_EXE_vaultguard"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = spawn_as(
        Command::new(&bin).arg("-c").arg(&config).arg("supervise"),
        uid,
        gid,
    );
    let pid = child.id();
    // Up and waiting once the socket is there (hardening comes before it).
    let start = Instant::now();
    while !socket.exists() {
        if start.elapsed() > Duration::from_secs(20) {
            panic!("no control socket after 20 s: {}", stop(child));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let observed = (proc_real_uid(pid), proc_owner(pid), core_limit(pid));
    let log = stop(child);
    let (real_uid, owner, core) = observed;
    assert_eq!(
        real_uid, uid,
        "the supervisor is not running as uid {uid}: {log}"
    );
    assert_eq!(
        owner, 0,
        "/proc/{pid} of `vaultguard supervise` (uid {uid}) belongs to uid {owner}: the \
         process is dumpable (PR_SET_DUMPABLE not applied); log: {log}"
    );
    assert_eq!(
        core,
        ("0".to_string(), "0".to_string()),
        "RLIMIT_CORE of `vaultguard supervise` (soft, hard); log: {log}"
    );
}

#[test]
fn a_process_that_does_not_harden_itself_is_seen_as_dumpable() {
    // The control for the test above: the same observation on `sleep`.
    let (uid, gid) = unprivileged();
    let child = spawn_as(Command::new("sleep").arg("30"), uid, gid);
    let pid = child.id();
    // Past exec (the uid is the new one), whatever the scheduler did.
    let start = Instant::now();
    while proc_real_uid(pid) != uid
        || !std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.file_name().is_some_and(|n| n == "sleep"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sleep did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let owner = proc_owner(pid);
    stop(child);
    assert_eq!(owner, uid);
}
