//! Attacks on the control socket by other local users (issue 11, items 2 and 3),
//! each a refusal asserted from what the attacker and root observe:
//!
//! - four unprivileged uids holding their share of connections do not lock root
//!   out of `status`;
//! - a denied or malformed line does not renew a connection's deadline (the
//!   connection is closed at its original deadline), an allowed one does;
//! - a uid that `control.allow` grants nothing is answered once and closed at
//!   accept;
//! - a squatter listening on the socket path as another uid receives nothing from
//!   `vaultguard unlock` (the client function and the built binary), which refuses
//!   and names the squatter's uid and pid;
//! - the supervisor creates the socket's directories with a fixed mode whatever the
//!   umask, refuses a socket directory that others can write or that another user
//!   owns, and names the uid and pid of another user's listener on its path.
//!
//! Other users are real: forked children drop to uids 60001.. with setuid(2).
//! A connection's peer credentials are the connecting process's, fixed at
//! connect(2), so a child connects sockets that the parent created before the fork
//! and then exits: the parent holds connections that the supervisor sees as the
//! child's uid. Needs root (to change uid), like the peer-credential tests in
//! tests/supervisor_socket.rs.

mod common;

use common::{closed_within, read_line};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vaultguard::config::{Allow, Config};
use vaultguard::secret::SecretBytes;
use vaultguard::supervisor::{
    BackendError, Handle, Options, Reality, Supervisor, SupervisorError, VaultBackend,
};

const PASS: &str = "correct horse";
const GENEROUS: Duration = Duration::from_secs(30);

/// The umask is per process and the tests of this file run on parallel threads:
/// whoever changes it, or creates directories whose mode a test asserts, holds this.
static UMASK: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------- fake vault

/// An unlocked vault that records what was asked of it.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Vec<String>>>);

impl Fake {
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn call(&self, c: &str) {
        self.0.lock().unwrap().push(c.to_string());
    }
}

impl VaultBackend for Fake {
    fn probe(&mut self) -> Result<Reality, BackendError> {
        Ok(Reality {
            mapping_active: true,
            mounted: true,
        })
    }
    fn stop_service(&mut self, unit: &str) -> Result<(), BackendError> {
        self.call(&format!("stop {unit}"));
        Ok(())
    }
    fn start_service(&mut self, unit: &str) -> Result<(), BackendError> {
        self.call(&format!("start {unit}"));
        Ok(())
    }
    fn sync(&mut self) -> Result<(), BackendError> {
        self.call("sync");
        Ok(())
    }
    fn unmount(&mut self) -> Result<(), BackendError> {
        self.call("unmount");
        Ok(())
    }
    fn close_mapping(&mut self) -> Result<(), BackendError> {
        self.call("close");
        Ok(())
    }
    fn revoke_keys(&mut self) -> Result<usize, BackendError> {
        self.call("revoke");
        Ok(0)
    }
    fn activate(&mut self, _passphrase: &SecretBytes) -> Result<(), BackendError> {
        self.call("activate");
        Ok(())
    }
    fn verify_passphrase(&mut self, _passphrase: &SecretBytes) -> Result<(), BackendError> {
        self.call("verify");
        Ok(())
    }
    fn mount(&mut self) -> Result<(), BackendError> {
        self.call("mount");
        Ok(())
    }
}

// ---------------------------------------------------------------- harness

/// A fresh directory, mode 0755 so that other uids can reach a socket inside.
fn tmpdir(name: &str) -> PathBuf {
    // Kept (not removed on drop): the harness removes it when the test is done.
    let d = tempfile::Builder::new()
        .prefix(&format!("vg-attack-{name}-"))
        .tempdir()
        .unwrap()
        .keep();
    // Other uids must reach the socket inside.
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn config(dir: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.control.socket = dir.join("control.sock");
    cfg.audit.path = dir.join("audit.jsonl");
    cfg.auth.state_path = dir.join("lib").join("lockout.json");
    cfg
}

fn options(dir: &Path) -> Options {
    Options {
        state_file: dir.join("state.json"),
        ..Options::default()
    }
}

fn allow_uids(cfg: &mut Config, cmd: &str, uids: &[u32]) {
    cfg.control.allow.insert(
        cmd.into(),
        Allow {
            uids: uids.to_vec(),
            gids: vec![],
        },
    );
}

/// Build a supervisor, holding the umask lock while it creates its directories.
fn new_supervisor(
    cfg: &Config,
    opts: &Options,
    fake: &Fake,
) -> Result<Supervisor, SupervisorError> {
    let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    Supervisor::new(cfg, Box::new(fake.clone()), opts.clone())
}

struct Harness {
    dir: PathBuf,
    cfg: Config,
    fake: Fake,
    handle: Handle,
    thread: Option<JoinHandle<Result<(), SupervisorError>>>,
}

impl Harness {
    fn start(name: &str, tweak: impl FnOnce(&mut Config, &mut Options)) -> Harness {
        let dir = tmpdir(name);
        let mut cfg = config(&dir);
        let mut opts = options(&dir);
        tweak(&mut cfg, &mut opts);
        let fake = Fake::default();
        let sup = new_supervisor(&cfg, &opts, &fake).unwrap();
        let handle = sup.handle();
        let thread = Some(std::thread::spawn(move || sup.run()));
        Harness {
            dir,
            cfg,
            fake,
            handle,
            thread,
        }
    }

    fn socket(&self) -> &Path {
        &self.cfg.control.socket
    }

    /// One request as root on a fresh connection.
    fn ask(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(GENEROUS)).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        serde_json::from_str(&read_line(&mut s).expect("a response line")).unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------- other users (fork + setuid)

/// Run `body` in a forked child that has dropped to `uid` (gid `uid`, no
/// supplementary groups); its return value is the exit code. The test harness is
/// multi-threaded, so `body` may only make raw system calls on memory prepared
/// before the fork (no allocation, no locks).
fn fork_as(uid: u32, body: impl FnOnce() -> i32) -> nix::unistd::Pid {
    // SAFETY: the child runs only `body` (raw system calls, see above) and leaves
    // with _exit; the parent continues normally.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = if rustix::thread::set_thread_groups(&[]).is_err()
                || rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(uid)).is_err()
                || rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)).is_err()
            {
                100
            } else {
                body()
            };
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit state.
            unsafe { nix::libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    }
}

fn wait_exit(child: nix::unistd::Pid) -> i32 {
    match nix::sys::wait::waitpid(child, None).unwrap() {
        nix::sys::wait::WaitStatus::Exited(_, code) => code,
        other => panic!("child {child}: {other:?}"),
    }
}

/// `n` connections to `socket` whose peer credentials are `uid`'s: a child of
/// that uid connects sockets created here, then exits.
fn connect_as(socket: &Path, uid: u32, n: usize) -> Vec<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let addr = SocketAddrUnix::new(socket).unwrap();
    let fds: Vec<OwnedFd> = (0..n)
        .map(|_| rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap())
        .collect();
    let child = fork_as(uid, || {
        for fd in &fds {
            if rustix::net::connect(fd, &addr).is_err() {
                return 1;
            }
        }
        0
    });
    assert_eq!(wait_exit(child), 0, "uid {uid} could not connect");
    fds.into_iter()
        .map(|fd| {
            let s = UnixStream::from(fd);
            s.set_read_timeout(Some(GENEROUS)).unwrap();
            s
        })
        .collect()
}

// ---------------------------------------------------------------- item 2

#[test]
fn root_is_served_while_four_users_hold_their_share_of_connections() {
    let users = [60001, 60002, 60003, 60004];
    let h = Harness::start("share", |c, o| {
        allow_uids(c, "status", &users);
        // Held connections must not time out while the test builds up the load.
        o.read_timeout = Duration::from_secs(600);
    });
    let max = Options::default().max_clients;
    let per_uid = vaultguard::supervisor::event_loop::per_uid_limit(max);
    assert_eq!((max, per_uid), (256, 64));
    // Each user opens its whole share and proves every connection is served, as
    // the issue's attackers did (one status line each).
    let mut held = Vec::new();
    let mut refused = 0;
    for uid in users {
        let mut mine = 0;
        for mut s in connect_as(h.socket(), uid, per_uid) {
            // A refused connection may be closed before the request arrives.
            let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
            let line = read_line(&mut s).expect("an answer to every connection");
            if line.starts_with("{\"state\":\"unlocked\"") {
                mine += 1;
                held.push(s);
            } else {
                assert!(line.contains("too many connections"), "{line}");
                assert!(closed_within(&mut s, GENEROUS), "refused but left open");
                refused += 1;
            }
        }
        assert!(mine <= per_uid, "uid {uid} holds {mine}");
    }
    // Together they may not take every slot ...
    assert!(held.len() < max, "users hold all {max} slots");
    assert_eq!(held.len() + refused, users.len() * per_uid);
    // ... and while they hold what they got, root is still answered, more than once
    // at a time.
    let mut roots: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(h.socket()).unwrap())
        .collect();
    for s in &mut roots {
        s.set_read_timeout(Some(GENEROUS)).unwrap();
        s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        let v: Value = serde_json::from_str(&read_line(s).unwrap()).unwrap();
        assert_eq!(v["state"], "unlocked", "root refused: {v}");
    }
    // Another allowed user still gets a clear refusal, not a hang.
    drop(roots);
    let mut late = connect_as(h.socket(), 60001, 1).remove(0);
    let _ = late.write_all(b"{\"cmd\":\"status\"}\n");
    let line = read_line(&mut late).unwrap();
    assert!(line.contains("too many connections"), "{line}");
}

/// Send `line` every 300 ms on `s` until the server closes it; the time from
/// `since` to the close. Gives up (returns `None`) after `limit`.
fn keep_sending_until_closed(
    s: &mut UnixStream,
    line: &[u8],
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while since.elapsed() < limit {
        if s.write_all(line).is_err() {
            return Some(since.elapsed());
        }
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            match s.read(&mut buf) {
                Ok(0) => return Some(since.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some(since.elapsed())
                }
                Err(_) => {}
            }
        }
    }
    None
}

#[test]
fn a_denied_or_malformed_line_does_not_extend_the_deadline() {
    let timeout = Duration::from_secs(2);
    let h = Harness::start("deadline", |c, o| {
        allow_uids(c, "status", &[60001]);
        o.read_timeout = timeout;
    });
    let cases: [(&str, &[u8]); 3] = [
        ("denied", b"{\"cmd\":\"lock\"}\n"),
        ("malformed", b"{\"cmd\":\n"),
        ("unknown", b"{\"cmd\":\"reboot\"}\n"),
    ];
    for (what, line) in cases {
        // Taken before the connect: the server's deadline starts later, at accept.
        let t = Instant::now();
        let mut s = connect_as(h.socket(), 60001, 1).remove(0);
        // The first line is answered with its error.
        s.write_all(line).unwrap();
        let first = read_line(&mut s).unwrap();
        assert!(first.contains("\"success\":false"), "{what}: {first}");
        let closed = keep_sending_until_closed(&mut s, line, t, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{what} lines kept the connection open for 10 s"));
        assert!(closed >= timeout, "{what}: closed early, at {closed:?}");
        assert!(closed < timeout * 3, "{what}: closed at {closed:?}");
    }
    // An allowed request does renew it: a status every 300 ms outlives the timeout.
    let mut s = connect_as(h.socket(), 60001, 1).remove(0);
    let t = Instant::now();
    assert_eq!(
        keep_sending_until_closed(&mut s, b"{\"cmd\":\"status\"}\n", t, timeout * 2),
        None,
        "a connection running allowed requests was cut off"
    );
    // None of the denied lines reached the vault.
    assert_eq!(h.ask("{\"cmd\":\"status\"}")["state"], "unlocked");
    assert!(h.fake.calls().is_empty(), "{:?}", h.fake.calls());
}

#[test]
fn a_user_allowed_no_command_is_answered_once_and_closed_at_accept() {
    let h = Harness::start("nothing", |c, o| {
        allow_uids(c, "status", &[60001]);
        o.read_timeout = Duration::from_secs(600);
    });
    let t = Instant::now();
    let mut s = connect_as(h.socket(), 60005, 1).remove(0);
    // Without sending anything, it is told why and closed.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let line = read_line(&mut s).expect("one error line before the close");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["success"], false);
    let err = v["error"].as_str().unwrap();
    assert!(
        err.starts_with("permission denied: uid 60005 may run no command"),
        "{err}"
    );
    assert!(err.contains("control.allow"), "{err}");
    assert!(closed_within(&mut s, Duration::from_secs(5)), "left open");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // So it holds no slot: a flood of such connections leaves every slot free.
    let flood = connect_as(h.socket(), 60005, 300);
    for mut s in flood {
        let line = read_line(&mut s).unwrap();
        assert!(line.contains("may run no command"), "{line}");
    }
    let many: Vec<UnixStream> = connect_as(h.socket(), 60001, 64);
    for mut s in many {
        s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        let v: Value = serde_json::from_str(&read_line(&mut s).unwrap()).unwrap();
        assert_eq!(v["state"], "unlocked");
    }
}

#[test]
fn one_allowed_user_cannot_take_every_connection() {
    // Replaces the check of tests/supervisor_socket.rs, whose uid 65534 is allowed
    // nothing and is now closed at accept: here the user may run `status`.
    let h = Harness::start("peruid", |c, o| {
        allow_uids(c, "status", &[60006]);
        o.read_timeout = Duration::from_secs(600);
    });
    let limit = vaultguard::supervisor::event_loop::per_uid_limit(Options::default().max_clients);
    let mut conns = connect_as(h.socket(), 60006, limit + 1);
    let mut last = conns.pop().unwrap();
    let line = read_line(&mut last).unwrap();
    assert!(
        line.contains("too many connections from uid 60006"),
        "{line}"
    );
    for s in &mut conns {
        s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        let v: Value = serde_json::from_str(&read_line(s).unwrap()).unwrap();
        assert_eq!(v["state"], "unlocked");
    }
    assert_eq!(h.ask("{\"cmd\":\"status\"}")["state"], "unlocked");
}

// ---------------------------------------------------------------- item 3

/// Another user listening on a socket path, recording every byte it receives and
/// answering the first line with a fake success, as a squatter would.
struct Squatter {
    child: nix::unistd::Pid,
    go: OwnedFd,
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl Squatter {
    /// A child of `uid` binds and listens on `path` and stays alive; this process
    /// accepts on the shared descriptor. Peer credentials of a listener are fixed
    /// at listen(2), so clients see the child's uid and pid.
    fn start(path: &Path, uid: u32) -> Squatter {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
        let addr = SocketAddrUnix::new(path).unwrap();
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        let (ready_r, ready_w) = rustix::pipe::pipe().unwrap();
        let (go_r, go_w) = rustix::pipe::pipe().unwrap();
        let child = fork_as(uid, || {
            if rustix::net::bind(&fd, &addr).is_err() {
                return 1;
            }
            if rustix::net::listen(&fd, 16).is_err() {
                return 2;
            }
            if rustix::io::write(&ready_w, b"r").is_err() {
                return 3;
            }
            let mut b = [0u8; 1];
            let _ = rustix::io::read(&go_r, &mut b);
            0
        });
        drop(ready_w);
        drop(go_r);
        let mut b = [0u8; 1];
        if rustix::io::read(&ready_r, &mut b).unwrap_or(0) != 1 {
            panic!("squatter failed: exit {}", wait_exit(child));
        }
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU32::new(0));
        let (st, rec, n) = (stop.clone(), received.clone(), connections.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let mut c = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                n.fetch_add(1, Ordering::Relaxed);
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut answered = false;
                let mut buf = [0u8; 4096];
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    let mut r = rec.lock().unwrap();
                    r.extend_from_slice(&buf[..k]);
                    if !answered && r.contains(&b'\n') {
                        answered = true;
                        let _ = c.write_all(b"{\"success\":true,\"state\":\"unlocked\"}\n");
                    }
                }
            }
        });
        Squatter {
            child,
            go: go_w,
            stop,
            received,
            connections,
            thread: Some(thread),
        }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.go, b"g");
        let _ = wait_exit(self.child);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A world-writable directory, as /tmp or a socket directory created 0777 is.
fn world_writable_dir(name: &str) -> PathBuf {
    let d = tmpdir(name).join("shared");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

#[test]
fn unlock_sends_nothing_to_a_socket_held_by_another_user() {
    let dir = world_writable_dir("squat");
    let sock = dir.join("control.sock");
    let squatter = Squatter::start(&sock, 60010);
    let pid = squatter.child.as_raw();

    // The client function.
    let e = vaultguard::control::client::unlock(&sock, &SecretBytes::from_slice(PASS.as_bytes()))
        .expect_err("unlock talked to a squatter");
    let msg = e.to_string();
    assert!(msg.contains("uid 60010"), "{msg}");
    assert!(msg.contains(&format!("pid {pid}")), "{msg}");
    assert!(msg.contains(&sock.display().to_string()), "{msg}");
    // status, lock and keepalive do not trust it either.
    assert!(vaultguard::control::client::status(&sock).is_err());
    assert!(vaultguard::control::client::lock(&sock).is_err());

    // The CLI, as the operator runs it.
    let cfg_path = dir.parent().unwrap().join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::json!({"control": {"socket": sock}}).to_string(),
    )
    .unwrap();
    let key = dir.parent().unwrap().join("key");
    std::fs::write(&key, PASS).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .arg("-c")
        .arg(&cfg_path)
        .arg("unlock")
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(!stdout.contains("vault unlocked"), "{stdout}");
    assert!(stderr.contains("uid 60010"), "{stderr}");
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");

    // The squatter was reached (so the refusal is the client's doing) and got nothing.
    let deadline = Instant::now() + GENEROUS;
    while squatter.connections.load(Ordering::Relaxed) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(squatter.connections.load(Ordering::Relaxed) >= 4);
    std::thread::sleep(Duration::from_millis(200));
    let got = squatter.received();
    assert!(
        got.is_empty(),
        "squatter received {:?}",
        String::from_utf8_lossy(&got)
    );
    drop(squatter);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn the_client_still_talks_to_a_supervisor_run_by_root() {
    let h = Harness::start("trusted", |_, _| {});
    let r = vaultguard::control::client::status(h.socket()).unwrap();
    assert_eq!(r.value["state"], "unlocked");
    let r =
        vaultguard::control::client::unlock(h.socket(), &SecretBytes::from_slice(b"x")).unwrap();
    assert!(r.line.contains("\"success\""), "{}", r.line);
}

#[test]
fn socket_directories_are_created_with_a_fixed_mode_whatever_the_umask() {
    for (mask, name) in [(0o000, "umask000"), (0o077, "umask077")] {
        let dir = tmpdir(name);
        let mut cfg = config(&dir);
        cfg.control.socket = dir.join("run").join("vg").join("control.sock");
        let sup = {
            let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
            let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
            let sup = Supervisor::new(&cfg, Box::new(Fake::default()), options(&dir));
            rustix::process::umask(old);
            sup
        };
        let sup = sup.unwrap();
        for d in [dir.join("run"), dir.join("run").join("vg")] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "{} under umask {mask:03o}", d.display());
        }
        drop(sup);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_socket_directory_others_can_write_is_refused() {
    for mode in [0o777, 0o1777, 0o775, 0o757] {
        let dir = world_writable_dir("writable");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut cfg = config(dir.parent().unwrap());
        cfg.control.socket = dir.join("control.sock");
        let e = match new_supervisor(&cfg, &options(dir.parent().unwrap()), &Fake::default()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("bound a socket in a directory of mode {mode:o}"),
        };
        assert!(e.contains(&dir.display().to_string()), "{e}");
        assert!(e.contains("writable"), "{e}");
        assert!(!cfg.control.socket.exists(), "mode {mode:o}");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}

#[test]
fn a_socket_directory_owned_by_another_user_is_refused() {
    let parent = tmpdir("owned");
    let dir = parent.join("theirs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(60007), Some(60007)).unwrap();
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 60007);
    let mut cfg = config(&parent);
    cfg.control.socket = dir.join("control.sock");
    let e = match new_supervisor(&cfg, &options(&parent), &Fake::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("bound a socket in a directory owned by uid 60007"),
    };
    assert!(e.contains(&dir.display().to_string()), "{e}");
    assert!(e.contains("owned by uid 60007"), "{e}");
    let _ = std::fs::remove_dir_all(&parent);
}

#[test]
fn a_squatted_socket_path_names_who_holds_it() {
    let dir = world_writable_dir("held");
    let sock = dir.join("control.sock");
    let squatter = Squatter::start(&sock, 60011);
    let pid = squatter.child.as_raw();
    let mut cfg = config(dir.parent().unwrap());
    cfg.control.socket = sock.clone();
    let e = match new_supervisor(&cfg, &options(dir.parent().unwrap()), &Fake::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("bound over a squatter"),
    };
    assert!(e.contains("uid 60011"), "{e}");
    assert!(e.contains(&format!("pid {pid}")), "{e}");
    assert!(e.contains(&sock.display().to_string()), "{e}");
    // The squatter's socket was left for the operator to look at.
    assert!(sock.exists());
    drop(squatter);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}
