//! Roles, grants, bearer tokens and rate limits on a real control socket (issue
//! 17, item 1), with a fake vault behind the supervisor:
//!
//! - every role × every command, by token (whatever the presenter's uid) and by
//!   uid/gid grant (forked children that drop to uids 60011..);
//! - `vaultguard token issue|list|revoke` as built: printed once, a 0600 file of
//!   hashes only; a token refused once revoked (supervisor running) or expired;
//! - malformed and 1 MiB tokens each get one JSON error while another client is
//!   answered promptly, and no token ever reaches the audit log;
//! - an unknown role (in a grant, a custom role's command, a token) stops the
//!   start, named;
//! - one identity flooding is answered `rate limited` with `retry_after` while
//!   another identity is served.
//!
//! Needs root (token commands are root's; other uids are made with setuid).

mod common;

use common::{closed_within, read_line};
use serde_json::Value;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vaultguard::config::Config;
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
        .prefix(&format!("vg-roles-{name}-"))
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
    match cmd {
        "unlock" => v["passphrase"] = PASS.into(),
        // Kept past the connection's close, so that `release` (on another
        // connection, from the same uid) finds it.
        "inhibit" => {
            v["who"] = "job".into();
            v["seconds"] = 60.into();
            v["keep"] = true.into();
        }
        "release" => v["who"] = "job".into(),
        _ => {}
    }
    if let Some(t) = token {
        v["token"] = t.into();
    }
    v.to_string()
}

/// Every command of the protocol (`inhibit` comes before the `release` of the
/// inhibitor it takes).
const COMMANDS: [&str; 8] = [
    "status",
    "lock",
    "unlock",
    "keepalive",
    "metrics",
    "watch",
    "inhibit",
    "release",
];

/// Did the answer come from running `cmd` (not a refusal)?
fn ran(cmd: &str, v: &Value) -> bool {
    match cmd {
        "status" => v["state"].is_string(),
        "metrics" => v["success"] == true && v["metrics"].is_string(),
        // The stream's first line: the current state.
        "watch" => v["event"] == "state" && v["state"].is_string(),
        _ => v["success"] == true,
    }
}

fn denied(v: &Value) -> bool {
    v["success"] == false
        && v["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("permission denied"))
}

fn expected(role: &str) -> &'static [&'static str] {
    match role {
        "admin" => &[
            "status",
            "lock",
            "unlock",
            "keepalive",
            "metrics",
            "watch",
            "inhibit",
            "release",
        ],
        "operator" => &[
            "status",
            "lock",
            "unlock",
            "keepalive",
            "inhibit",
            "release",
        ],
        "viewer" => &["status", "watch"],
        "agent" => &["status", "keepalive", "inhibit", "release"],
        "backup" => &["status", "metrics"],
        _ => &[],
    }
}

// ---------------------------------------------------------------- roles × commands

#[test]
fn every_role_by_token_runs_exactly_its_commands_whatever_the_uid() {
    let mut h = Harness::new("table", |c| {
        c.control
            .roles
            .insert("backup".into(), vec!["status".into(), "metrics".into()]);
    });
    let roles = ["admin", "operator", "viewer", "agent", "backup"];
    let tokens: Vec<(String, String)> = roles
        .iter()
        .map(|r| {
            (
                r.to_string(),
                issue(&h.config_path, &format!("t-{r}"), r, None),
            )
        })
        .collect();
    h.start();
    for (role, token) in &tokens {
        for cmd in COMMANDS {
            // Root's connection: the token decides, not the uid.
            let v = h.ask(&req(cmd, Some(token)));
            if expected(role).contains(&cmd) {
                assert!(ran(cmd, &v), "role {role}, {cmd}: {v}");
            } else {
                assert!(denied(&v), "role {role}, {cmd}: {v}");
                let e = v["error"].as_str().unwrap();
                assert!(
                    e.contains(&format!(
                        "token `t-{role}` (role {role}) may not run `{cmd}`"
                    )),
                    "{e}"
                );
            }
        }
    }
    // Every lock and unlock names the token that asked; denials are audited per
    // identity with the identity's name; no token is anywhere in the log.
    let audit = h.audit();
    let named = |event: &str, who: &str| {
        audit
            .iter()
            .any(|e| e["event"] == event && e["identity"] == who)
    };
    assert!(named("lock", "token:t-admin"));
    assert!(named("lock", "token:t-operator"));
    assert!(named("unlock", "token:t-operator"));
    assert!(named("keepalive", "token:t-agent"));
    assert!(named("permission_denied", "token:t-viewer"));
    assert!(named("permission_denied", "token:t-agent"));
    let text = h.audit_text();
    for (_, t) in &tokens {
        assert!(!text.contains(t.as_str()), "a token reached the audit log");
    }
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

#[test]
fn uid_and_gid_grants_give_their_roles_and_allow_still_works() {
    let mut h = Harness::new("grants", |c| {
        let json = serde_json::json!({
            "roles": {"backup": ["status", "metrics"]},
            "grants": {
                "operator": {"uids": [60011]},
                "viewer": {"gids": [60120]},
                "backup": {"uids": [60013]},
                "agent": {"gids": [60014]},
            },
            "allow": {"lock": {"uids": [60015]}},
        });
        let extra: vaultguard::config::ControlConfig = serde_json::from_value(json).unwrap();
        c.control.roles = extra.roles;
        c.control.grants = extra.grants;
        c.control
            .allow
            .insert("lock".into(), extra.allow["lock"].clone());
    });
    h.start();
    // (uid, gid, supplementary groups, its commands)
    let peers: [(u32, u32, &[u32], &[&str]); 5] = [
        (60011, 60011, &[], expected("operator")),
        (60012, 60012, &[60120], expected("viewer")),
        (60013, 60013, &[], expected("backup")),
        (60014, 60014, &[], expected("agent")), // primary gid
        (60015, 60015, &[], &["lock"]),         // control.allow, as before
    ];
    for (uid, gid, groups, cmds) in peers {
        for cmd in COMMANDS {
            let mut s = connect_as(h.socket(), uid, gid, groups);
            let v = Harness::ask_on(&mut s, &req(cmd, None));
            if cmds.contains(&cmd) {
                assert!(ran(cmd, &v), "uid {uid}, {cmd}: {v}");
            } else {
                assert!(denied(&v), "uid {uid}, {cmd}: {v}");
                assert!(
                    v["error"]
                        .as_str()
                        .unwrap()
                        .contains(&format!("uid {uid} may not run `{cmd}`")),
                    "{v}"
                );
            }
        }
    }
    let audit = h.audit();
    assert!(audit
        .iter()
        .any(|e| e["event"] == "lock" && e["identity"] == "uid:60011"));
    assert!(audit
        .iter()
        .any(|e| e["event"] == "permission_denied" && e["identity"] == "uid:60012"));
}

// ---------------------------------------------------------------- token lifecycle

#[test]
fn a_token_is_printed_once_stored_hashed_and_refused_once_revoked() {
    use sha2::Digest as _;
    let mut h = Harness::new("lifecycle", |_| {});
    let token = issue(&h.config_path, "ci-runner", "agent", Some("90d"));
    assert_eq!(token.len(), 46, "{token}");
    assert!(token.starts_with("vg_"));
    assert!(token[3..]
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    // The file: root's, 0600, the hash and never the token.
    let file = &h.cfg.control.tokens_file;
    let meta = std::fs::metadata(file).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));
    let text = std::fs::read_to_string(file).unwrap();
    assert!(!text.contains(&token));
    let hash = vaultguard::encoding::hex_encode(&sha2::Sha256::digest(token.as_bytes()));
    let stored: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(stored["tokens"][0]["sha256"], hash.as_str());
    assert_eq!(stored["tokens"][0]["role"], "agent");
    // A second issue under the same name is refused; so is an unknown role.
    let again = vaultguard(
        &h.config_path,
        &["token", "issue", "--name", "ci-runner", "--role", "agent"],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    let bad = vaultguard(
        &h.config_path,
        &["token", "issue", "--name", "x", "--role", "superuser"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("role `superuser` does not exist"));
    // `list` shows it without the token or any of its hash.
    let list = vaultguard(&h.config_path, &["token", "list"]);
    let shown = String::from_utf8(list.stdout).unwrap();
    assert!(
        shown.contains("ci-runner") && shown.contains("agent"),
        "{shown}"
    );
    assert!(
        !shown.contains(&token) && !shown.contains(&hash[..8]),
        "{shown}"
    );
    // Token commands are root's alone.
    let as_user = {
        use std::os::unix::process::CommandExt;
        // A copy the other uid can reach: the build tree may sit below a directory
        // only root can enter (a CI clone in a 0700 temporary directory).
        let reach = tempfile::Builder::new()
            .prefix("vg-tokens-bin-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(reach.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = reach.path().join("vaultguard");
        std::fs::copy(env!("CARGO_BIN_EXE_vaultguard"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        Command::new(&bin)
            .arg("--config")
            .arg(&h.config_path)
            .args(["token", "list"])
            .uid(60001)
            .gid(60001)
            .output()
            .unwrap()
    };
    assert!(!as_user.status.success());
    assert!(String::from_utf8_lossy(&as_user.stderr).contains("token commands need root"));

    h.start();
    assert!(ran("keepalive", &h.ask(&req("keepalive", Some(&token)))));
    // Revoked while the supervisor runs: its next request is refused.
    let out = vaultguard(&h.config_path, &["token", "revoke", "ci-runner"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = h.ask(&req("status", Some(&token)));
    assert_eq!(v["success"], false, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("token `ci-runner` was revoked"), "{e}");
    let list = vaultguard(&h.config_path, &["token", "list", "--json"]);
    let l: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert!(l[0]["revoked"].is_string(), "{l}");
    let refused: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "token_refused")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["identity"], "token:ci-runner");
    assert_eq!(refused[0]["reason"], "revoked");
    assert!(!h.audit_text().contains(&token));
}

#[test]
fn an_expired_token_is_refused_with_a_clear_error() {
    let mut h = Harness::new("expiry", |_| {});
    let token = issue(&h.config_path, "short", "viewer", Some("1s"));
    h.start();
    // Issued with one second: it may already be over by now, which is fine.
    std::thread::sleep(Duration::from_millis(2100));
    let v = h.ask(&req("status", Some(&token)));
    assert_eq!(v["success"], false, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("token `short` expired at"),
        "{v}"
    );
    let audit = h.audit();
    assert!(audit
        .iter()
        .any(|e| e["event"] == "token_refused" && e["reason"] == "expired"));
}

#[test]
fn malformed_and_huge_tokens_get_one_error_and_slow_nobody() {
    let mut h = Harness::new("malformed", |_| {});
    let good = issue(&h.config_path, "good", "viewer", None);
    h.start();
    for bad in [
        "abc".to_string(),
        format!("{good}x"),
        good.replace("vg_", "xx_"),
        format!("{}\\u0041", &good[..40]),
        "vg_".to_string() + &"A".repeat(43), // well-formed, unknown
    ] {
        let mut s = h.connect();
        let line = format!(r#"{{"cmd":"status","token":"{bad}"}}"#);
        let v = Harness::ask_on(&mut s, &line);
        assert_eq!(v["success"], false, "{v}");
        assert!(
            v["error"].as_str().unwrap().starts_with("invalid token"),
            "{v}"
        );
        // Answered, and the connection still serves the next request.
        assert!(ran(
            "status",
            &Harness::ask_on(&mut s, &req("status", Some(&good)))
        ));
    }
    // A 1 MiB token: one error, the connection closed, while another client is
    // answered promptly throughout.
    let sock = h.socket().to_path_buf();
    let writer = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(GENEROUS)).unwrap();
        let mut line = br#"{"cmd":"status","token":""#.to_vec();
        line.extend(std::iter::repeat(b'A').take(1 << 20));
        line.extend_from_slice(b"\"}\n");
        // The supervisor stops reading at its line limit: the rest may not go in.
        let _ = s.write_all(&line);
        let answer = read_line(&mut s);
        (answer, closed_within(&mut s, GENEROUS))
    });
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert!(ran("status", &h.ask(&req("status", Some(&good)))));
        worst = worst.max(t.elapsed());
    }
    let (answer, closed) = writer.join().unwrap();
    let v: Value = serde_json::from_str(&answer.expect("an answer to the 1 MiB line")).unwrap();
    assert_eq!(v["success"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("request line longer than"),
        "{v}"
    );
    assert!(closed, "the 1 MiB line's connection was left open");
    assert!(worst < Duration::from_secs(1), "a status took {worst:?}");
    let audit = h.audit();
    let reasons: Vec<&str> = audit
        .iter()
        .filter(|e| e["event"] == "token_refused")
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"malformed") && reasons.contains(&"unknown"),
        "{reasons:?}"
    );
    // The 1 MiB line is audited too, naming who sent it and nothing of it.
    let long: Vec<&Value> = audit
        .iter()
        .filter(|e| e["event"] == "request_too_long")
        .collect();
    assert_eq!(long.len(), 1, "{long:?}");
    assert_eq!(long[0]["identity"], "uid:0");
    let text = h.audit_text();
    assert!(!text.contains(&"A".repeat(64)) && !text.contains(&good));
}

#[test]
fn an_unknown_role_stops_the_start_naming_it() {
    // In a grant, and as a custom role's command: the configuration is refused.
    let dir = tmpdir("unknown-role");
    for (json, named) in [
        (
            r#"{"control":{"grants":{"operater":{"uids":[1000]}}}}"#,
            "role `operater` does not exist",
        ),
        (
            r#"{"control":{"roles":{"backup":["status","reboot"]}}}"#,
            "`reboot` is not a command",
        ),
        (
            r#"{"control":{"rate_limit":{"ghost":{"rate":1,"burst":1}}}}"#,
            "role `ghost` does not exist",
        ),
    ] {
        let p = dir.join("bad.json");
        std::fs::write(&p, json).unwrap();
        let out = vaultguard(&p, &["supervise"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{err}");
    }
    // A token whose role the configuration no longer has.
    let mut cfg = config(&dir);
    cfg.control
        .roles
        .insert("backup".into(), vec!["status".into()]);
    let p = write_config(&dir, &cfg);
    issue(&p, "nightly", "backup", None);
    cfg.control.roles.clear();
    let opts = Options {
        state_file: dir.join("state.json"),
        ..Options::default()
    };
    let e = match Supervisor::new(&cfg, Box::new(Fake::unlocked()), opts) {
        Ok(_) => panic!("started with a token of an unknown role"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("token `nightly`") && e.contains("role `backup`"),
        "{e}"
    );
    assert!(
        !cfg.control.socket.exists(),
        "a refused start left its socket"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- rate limit

#[test]
fn one_identity_flooding_is_rate_limited_while_another_is_served() {
    let mut h = Harness::new("flood", |c| {
        c.control.rate_limit.insert(
            "viewer".into(),
            vaultguard::config::RateLimitConfig { rate: 5, burst: 10 },
        );
    });
    let flood = issue(&h.config_path, "flood", "viewer", None);
    let calm = issue(&h.config_path, "calm", "viewer", None);
    h.start();
    let sock = h.socket().to_path_buf();
    let line = req("status", Some(&flood));
    let flooder = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(GENEROUS)).unwrap();
        let mut limited = 0;
        let mut retry_after = Vec::new();
        for _ in 0..400 {
            let v = Harness::ask_on(&mut s, &line);
            if v["error"] == "rate limited" {
                limited += 1;
                retry_after.push(v["retry_after"].as_u64().expect("retry_after"));
            }
        }
        (limited, retry_after)
    });
    let mut worst = Duration::ZERO;
    for _ in 0..8 {
        let t = Instant::now();
        let v = h.ask(&req("status", Some(&calm)));
        worst = worst.max(t.elapsed());
        assert!(ran("status", &v), "the calm identity was refused: {v}");
    }
    let (limited, retry_after) = flooder.join().unwrap();
    // 10 at once plus 5/s over the flood's short life: most are refused.
    assert!(limited >= 300, "only {limited} of 400 limited");
    assert!(retry_after.iter().all(|&r| r >= 1), "{retry_after:?}");
    assert!(
        worst < Duration::from_secs(1),
        "the calm identity waited {worst:?}"
    );
    // One entry for the run (the rest counted), naming the identity.
    let audit = h.audit();
    let entries: Vec<&Value> = audit
        .iter()
        .filter(|e| e["event"] == "rate_limited")
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["identity"], "token:flood");
    // The metrics count every refused request of that identity.
    let m = h.ask(r#"{"cmd":"metrics"}"#);
    let text = m["metrics"].as_str().unwrap();
    let want =
        format!("vaultguard_rate_limited_requests_total{{identity=\"token:flood\"}} {limited}");
    assert!(text.lines().any(|l| l == want), "{want} not in\n{text}");
}

/// Two containers sharing root's uid, each with its own token: an inhibitor is
/// held by the token that took it, and the other token can neither renew nor
/// release it; root by its uid can.
#[test]
fn an_inhibitor_belongs_to_the_token_that_took_it_not_to_the_uid() {
    let mut h = Harness::new("holders", |_| {});
    let a = issue(&h.config_path, "box-a", "agent", None);
    let b = issue(&h.config_path, "box-b", "agent", None);
    h.start();
    let inhibit = |t: &str| {
        serde_json::json!({"cmd": "inhibit", "who": "job", "seconds": 60, "keep": true, "token": t})
            .to_string()
    };
    let release = |t: Option<&str>| {
        let mut v = serde_json::json!({"cmd": "release", "who": "job"});
        if let Some(t) = t {
            v["token"] = t.into();
        }
        v.to_string()
    };
    assert_eq!(h.ask(&inhibit(&a))["success"], true);
    let s = h.ask(r#"{"cmd":"status"}"#);
    assert_eq!(s["inhibitors"][0]["holder"], "token:box-a", "{s}");
    for line in [inhibit(&b), release(Some(&b))] {
        let v = h.ask(&line);
        assert_eq!(v["success"], false, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("held by token:box-a"),
            "{v}"
        );
    }
    assert_eq!(h.ask(&release(Some(&a)))["success"], true);
    assert_eq!(h.ask(&inhibit(&b))["success"], true);
    // Root without a token may release anyone's.
    assert_eq!(h.ask(&release(None))["success"], true);
    assert!(h.audit().iter().any(|e| e["event"] == "inhibit"
        && e["holder"] == "token:box-b"
        && e["identity"] == "token:box-b"));
}
