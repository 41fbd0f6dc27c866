//! Attacks on the control socket's new surfaces (issue 17): roles, tokens and
//! rate limits, from other uids (forked children that drop to uids 60031..) and
//! from root, with a fake vault behind a real supervisor.
//!
//! Needs root (token commands are root's; other uids are made with setuid).

mod common;

use common::read_line;
use serde_json::Value;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vaultguard::config::{Allow, Config, RateLimitConfig};
use vaultguard::secret::SecretBytes;
use vaultguard::supervisor::{
    BackendError, Handle, Options, Reality, Supervisor, SupervisorError, VaultBackend,
};

const PASS: &str = "correct horse";
const GENEROUS: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- fake vault

#[derive(Clone)]
struct Fake(Arc<Mutex<(bool, bool)>>);

impl Fake {
    fn unlocked() -> Fake {
        Fake(Arc::new(Mutex::new((true, true))))
    }
}

impl VaultBackend for Fake {
    fn probe(&mut self) -> Result<Reality, BackendError> {
        let w = self.0.lock().unwrap();
        Ok(Reality {
            mapping_active: w.0,
            mounted: w.1,
        })
    }
    fn stop_service(&mut self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    fn start_service(&mut self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn unmount(&mut self) -> Result<(), BackendError> {
        self.0.lock().unwrap().1 = false;
        Ok(())
    }
    fn close_mapping(&mut self) -> Result<(), BackendError> {
        self.0.lock().unwrap().0 = false;
        Ok(())
    }
    fn revoke_keys(&mut self) -> Result<usize, BackendError> {
        Ok(0)
    }
    fn activate(&mut self, p: &SecretBytes) -> Result<(), BackendError> {
        if p.as_bytes() != PASS.as_bytes() {
            return Err(BackendError::WrongPassphrase);
        }
        self.0.lock().unwrap().0 = true;
        Ok(())
    }
    fn verify_passphrase(&mut self, p: &SecretBytes) -> Result<(), BackendError> {
        if p.as_bytes() != PASS.as_bytes() {
            return Err(BackendError::WrongPassphrase);
        }
        Ok(())
    }
    fn mount(&mut self) -> Result<(), BackendError> {
        self.0.lock().unwrap().1 = true;
        Ok(())
    }
}

// ---------------------------------------------------------------- harness

fn tmpdir(name: &str) -> PathBuf {
    let d = tempfile::Builder::new()
        .prefix(&format!("vg-attack-sock-{name}-"))
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
    cfg.control.tokens_file = dir.join("lib").join("tokens.json");
    cfg.audit.path = dir.join("audit.jsonl");
    cfg.auth.state_path = dir.join("lib").join("lockout.json");
    cfg.audit.tpm_anchor = false;
    cfg.vault.state_path = dir.join("state.json");
    cfg
}

/// The configuration, also written where `vaultguard --config` reads it.
fn write_config(dir: &Path, cfg: &Config) -> PathBuf {
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
    p
}

fn vaultguard(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `vaultguard token issue`: the printed token.
fn issue(config: &Path, name: &str, role: &str, expires: Option<&str>) -> String {
    let mut args = vec!["token", "issue", "--name", name, "--role", role];
    if let Some(e) = expires {
        args.extend(["--expires", e]);
    }
    let out = vaultguard(config, &args);
    assert!(
        out.status.success(),
        "token issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap();
    t.trim_end().to_string()
}

struct Harness {
    dir: PathBuf,
    cfg: Config,
    config_path: PathBuf,
    handle: Option<Handle>,
    thread: Option<JoinHandle<Result<(), SupervisorError>>>,
}

impl Harness {
    fn new(name: &str, tweak: impl FnOnce(&mut Config)) -> Harness {
        let dir = tmpdir(name);
        let mut cfg = config(&dir);
        tweak(&mut cfg);
        let config_path = write_config(&dir, &cfg);
        Harness {
            dir,
            cfg,
            config_path,
            handle: None,
            thread: None,
        }
    }

    fn start(&mut self) {
        let opts = Options {
            state_file: self.dir.join("state.json"),
            ..Options::default()
        };
        let sup = Supervisor::new(&self.cfg, Box::new(Fake::unlocked()), opts).unwrap();
        self.handle = Some(sup.handle());
        self.thread = Some(std::thread::spawn(move || sup.run()));
    }

    fn socket(&self) -> &Path {
        &self.cfg.control.socket
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(GENEROUS)).unwrap();
        s
    }

    fn ask_on(s: &mut UnixStream, line: &str) -> Value {
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        serde_json::from_str(&read_line(s).expect("a response line")).unwrap()
    }

    fn ask(&self, line: &str) -> Value {
        Harness::ask_on(&mut self.connect(), line)
    }

    fn audit(&self) -> Vec<Value> {
        vaultguard::audit::verify(&self.cfg.audit.path).expect("audit chain intact");
        std::fs::read_to_string(&self.cfg.audit.path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.cfg.audit.path).unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A request line carrying `token` (`None`: none).
fn req(cmd: &str, token: Option<&str>) -> String {
    let mut v = serde_json::json!({ "cmd": cmd });
    if cmd == "unlock" {
        v["passphrase"] = PASS.into();
    }
    if let Some(t) = token {
        v["token"] = t.into();
    }
    v.to_string()
}

/// Run `body` in a forked child that dropped to `uid` with primary group `gid`
/// and supplementary `groups`; raw system calls only (the harness is threaded).
fn fork_as(uid: u32, gid: u32, groups: &[u32], body: impl FnOnce() -> i32) -> nix::unistd::Pid {
    let gids: Vec<rustix::process::Gid> = groups
        .iter()
        .map(|&g| rustix::process::Gid::from_raw(g))
        .collect();
    // SAFETY: the child only makes raw system calls on memory prepared before the
    // fork (no allocation, no locks) and leaves with _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = if rustix::thread::set_thread_groups(&gids).is_err()
                || rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(gid)).is_err()
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

/// A connection whose peer credentials are `uid`'s (a child connects, exits).
fn connect_as(socket: &Path, uid: u32, gid: u32, groups: &[u32]) -> UnixStream {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let addr = SocketAddrUnix::new(socket).unwrap();
    let fd: OwnedFd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    let child = fork_as(uid, gid, groups, || {
        i32::from(rustix::net::connect(&fd, &addr).is_err())
    });
    match nix::sys::wait::waitpid(child, None).unwrap() {
        nix::sys::wait::WaitStatus::Exited(_, 0) => {}
        other => panic!("uid {uid} could not connect: {other:?}"),
    }
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(GENEROUS)).unwrap();
    s
}

fn limited(v: &Value) -> bool {
    v["error"] == "rate limited"
}

/// `n` requests of `line` on one connection of `uid` (root: 0): how many were
/// answered `rate limited`.
fn flood_as(h: &Harness, uid: u32, line: &str, n: usize) -> usize {
    let mut s = if uid == 0 {
        h.connect()
    } else {
        connect_as(h.socket(), uid, uid, &[])
    };
    (0..n)
        .filter(|_| limited(&Harness::ask_on(&mut s, line)))
        .count()
}

#[test]
fn refused_tokens_and_denied_commands_count_against_the_rate_limit() {
    // uid 60031 is a viewer at 5/s, burst 10.
    let mut h = Harness::new("evade", |c| {
        c.control.grants.insert(
            "viewer".into(),
            Allow {
                uids: vec![60031],
                gids: vec![],
            },
        );
        c.control
            .rate_limit
            .insert("viewer".into(), RateLimitConfig { rate: 5, burst: 10 });
    });
    let viewer = issue(&h.config_path, "watcher", "viewer", None);
    h.start();
    // A well-formed token nobody issued: each one costs a stat, a hash and a
    // comparison with every entry, and was never limited.
    let unknown = format!("vg_{}", "A".repeat(43));
    let n = flood_as(&h, 60031, &req("status", Some(&unknown)), 300);
    assert!(n >= 250, "only {n} of 300 unknown-token requests limited");
    // A malformed one likewise.
    let n = flood_as(&h, 60032, &req("status", Some("vg_short")), 300);
    assert!(n >= 50, "only {n} of 300 malformed-token requests limited");
    // A viewer's token asking for `lock` over and over.
    let n = flood_as(&h, 60031, &req("lock", Some(&viewer)), 300);
    assert!(n >= 250, "only {n} of 300 denied requests limited");
    // The token's bucket is the token's, whatever uid presents it.
    let v = Harness::ask_on(
        &mut connect_as(h.socket(), 60033, 60033, &[]),
        &req("status", Some(&viewer)),
    );
    assert!(limited(&v), "token:watcher is flooded: {v}");
    let v = h.ask(&req("status", None));
    assert!(v["state"].is_string(), "root was refused: {v}");
    // The runs are audited once per identity, naming the uid behind a bad token.
    let audit = h.audit();
    for who in ["uid:60031", "uid:60032", "token:watcher"] {
        assert!(
            audit
                .iter()
                .any(|e| e["event"] == "rate_limited" && e["identity"] == who),
            "no rate_limited entry for {who}"
        );
    }
    let text = h.audit_text();
    assert!(!text.contains(&viewer) && !text.contains(&unknown));
    // Root without a token is never limited, even after thousands.
    assert_eq!(flood_as(&h, 0, &req("status", None), 1000), 0);
}
