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

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

#[test]
fn tokens_in_odd_shapes_never_grant_more_than_the_uid_has() {
    let mut h = Harness::new("shapes", |_| {});
    let admin = issue(&h.config_path, "root-ish", "admin", None);
    h.start();
    // uid 60041 has no grant of its own; a usable token lets it connect.
    let mut s = connect_as(h.socket(), 60041, 60041, &[]);
    let escaped: String = admin
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    let cases = [
        // Escaped: a real token never needs an escape; refused as malformed.
        format!(r#"{{"cmd":"lock","token":"{escaped}"}}"#),
        // The key escaped, the token twice: a duplicate field.
        format!(r#"{{"cmd":"lock","token":"vg_x","\u0074oken":"{admin}"}}"#),
        // Wrong JSON type.
        format!(r#"{{"cmd":"lock","token":["{admin}"]}}"#),
        r#"{"cmd":"lock","token":null}"#.to_string(),
        // Nested: not the request's token; the uid alone decides.
        format!(r#"{{"cmd":"lock","x":{{"token":"{admin}"}}}}"#),
        // Unicode look-alike of the prefix.
        format!(r#"{{"cmd":"lock","token":"ｖg_{}"}}"#, &admin[3..]),
        // Trailing space.
        format!(r#"{{"cmd":"lock","token":"{admin} "}}"#),
    ];
    for line in &cases {
        let v = Harness::ask_on(&mut s, line);
        assert_eq!(v["success"], false, "{line}: {v}");
    }
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    // The real token from the same connection does lock: the shapes above did not.
    let v = Harness::ask_on(&mut s, &req("lock", Some(&admin)));
    assert_eq!(v["success"], true, "{v}");
    assert!(!h.audit_text().contains(&admin));
}

#[test]
fn revocation_and_a_role_edited_away_apply_to_an_open_connection() {
    let mut h = Harness::new("revoke-open", |_| {});
    let op = issue(&h.config_path, "op", "operator", None);
    let op2 = issue(&h.config_path, "op2", "operator", None);
    h.start();
    let mut s = connect_as(h.socket(), 60051, 60051, &[]);
    assert!(Harness::ask_on(&mut s, &req("status", Some(&op)))["state"].is_string());
    let out = vaultguard(&h.config_path, &["token", "revoke", "op"]);
    assert!(out.status.success());
    // Same connection, next request: refused by name.
    let v = Harness::ask_on(&mut s, &req("lock", Some(&op)));
    assert!(error_of(&v).contains("token `op` was revoked"), "{v}");
    // The role of op2 edited by hand to one that does not exist, while running.
    let file = &h.cfg.control.tokens_file;
    let text = std::fs::read_to_string(file).unwrap();
    let edited = text.replace("\"operator\"", "\"operatr\"");
    assert_ne!(text, edited);
    std::fs::write(file, edited).unwrap();
    let v = Harness::ask_on(&mut s, &req("status", Some(&op2)));
    assert_eq!(v["success"], false, "{v}");
    let e = error_of(&v);
    assert!(
        e.contains("role `operatr`") && e.contains("does not exist"),
        "the error should say the role is gone: {e}"
    );
}

#[test]
fn root_presenting_a_viewer_token_is_the_viewer() {
    // Documented: root is all-powerful without a token; a token decides who
    // asks, so root presenting a viewer's token is that viewer (a client
    // cannot be both).
    let mut h = Harness::new("root-viewer", |_| {});
    let viewer = issue(&h.config_path, "v", "viewer", None);
    h.start();
    let v = h.ask(&req("lock", Some(&viewer)));
    assert!(
        error_of(&v).contains("token `v` (role viewer) may not run `lock`"),
        "{v}"
    );
    assert_eq!(h.ask(&req("status", None))["state"], "unlocked");
    assert_eq!(h.ask(&req("lock", None))["success"], true);
}

#[test]
fn lines_that_are_not_requests_count_against_the_rate_limit() {
    let mut h = Harness::new("malformed", |c| {
        c.control.grants.insert(
            "viewer".into(),
            Allow {
                uids: vec![60061],
                gids: vec![],
            },
        );
        c.control
            .rate_limit
            .insert("viewer".into(), RateLimitConfig { rate: 5, burst: 10 });
    });
    h.start();
    // Before: answered `unknown command` 300 times, never limited.
    for line in [r#"{"cmd":"frobnicate"}"#, "not json", r#"{"cmd":7}"#] {
        let n = flood_as(&h, 60061, line, 100);
        assert!(n >= 85, "only {n} of 100 `{line}` lines limited");
    }
    // Root is never limited, also for its typos.
    assert_eq!(flood_as(&h, 0, r#"{"cmd":"frobnicate"}"#, 500), 0);
    let audit = h.audit();
    assert!(audit
        .iter()
        .any(|e| e["event"] == "rate_limited" && e["identity"] == "uid:60061"));
}

#[test]
fn only_expired_or_revoked_tokens_do_not_open_the_socket_to_every_uid() {
    let mut h = Harness::new("dead-tokens", |_| {});
    issue(&h.config_path, "short", "viewer", Some("1s"));
    issue(&h.config_path, "gone", "viewer", None);
    assert!(vaultguard(&h.config_path, &["token", "revoke", "gone"])
        .status
        .success());
    std::thread::sleep(Duration::from_millis(2100));
    h.start();
    // uid 60071 has no grant and no token could help it: answered once, closed.
    let mut s = connect_as(h.socket(), 60071, 60071, &[]);
    let line = read_line(&mut s).expect("one refusal line");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert!(
        error_of(&v).contains("may run no command on this socket"),
        "before: admitted while only dead tokens exist: {v}"
    );
    // A live token opens it again.
    issue(&h.config_path, "live", "viewer", None);
    let mut s = connect_as(h.socket(), 60071, 60071, &[]);
    let v = Harness::ask_on(&mut s, r#"{"cmd":"status"}"#);
    assert!(
        error_of(&v).starts_with("permission denied: uid 60071"),
        "{v}"
    );
}

#[test]
fn the_textfile_is_not_written_into_a_world_writable_directory() {
    let outer = tmpdir("textfile-outer");
    // A /tmp-like directory (sticky, everyone writes) holding the textfile dir
    // itself, and a symlink an attacker left there pointing at a root one.
    let open = outer.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let target = outer.join("root-only");
    std::fs::create_dir(&target).unwrap();
    let link = open.join("prom-link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let safe = outer.join("safe");
    for (dir, written) in [
        (open.clone(), false),
        (link.clone(), false),
        (safe.clone(), true),
    ] {
        let d = dir.clone();
        let mut h = Harness::new("textfile", move |c| {
            c.metrics.textfile_dir = Some(d);
        });
        h.start();
        // A change the textfile shows: a lock.
        assert_eq!(h.ask(&req("lock", None))["success"], true);
        let f = dir.join("vaultguard.prom");
        assert_eq!(f.exists(), written, "{}", f.display());
        drop(h);
    }
    assert!(!target.join("vaultguard.prom").exists());
    let _ = std::fs::remove_dir_all(&outer);
}
