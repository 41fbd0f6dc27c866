//! The supervisor as a `Type=notify` service: a datagram socket stands in for
//! systemd's `$NOTIFY_SOCKET` (a path and an abstract `@name`), the supervisor runs
//! in-process on a fake vault. READY=1 only once the control socket exists,
//! STATUS= following lock and unlock, STOPPING=1 on a clean stop, the variable
//! removed so children do not inherit it, and nothing broken without it.
//!
//! `$NOTIFY_SOCKET` is process-wide: the tests take [`ENV`] in turn.

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vaultguard::config::Config;
use vaultguard::secret::SecretBytes;
use vaultguard::supervisor::{BackendError, Options, Reality, Supervisor, VaultBackend};

const PASS: &str = "correct horse";
const GENEROUS: Duration = Duration::from_secs(30);
static ENV: Mutex<()> = Mutex::new(());

/// A vault that is a pair of booleans.
#[derive(Clone)]
struct Fake(Arc<Mutex<(bool, bool)>>);

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

fn setup(name: &str) -> (tempfile::TempDir, Config, Options) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("vg-notify-{name}-"))
        .tempdir()
        .unwrap();
    let d = dir.path();
    let mut cfg = Config::default();
    cfg.control.socket = d.join("control.sock");
    cfg.audit.path = d.join("audit.jsonl");
    cfg.auth.state_path = d.join("lib").join("lockout.json");
    cfg.vault.services = vec!["ollama.service".into()];
    let opts = Options {
        state_file: d.join("state.json"),
        ..Options::default()
    };
    (dir, cfg, opts)
}

fn ask(socket: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(GENEROUS)).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    out
}

fn recv(sock: &UnixDatagram) -> Option<String> {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8(buf[..n].to_vec()).unwrap())
}

/// Datagrams until one holds `want` as a whole line; all of them.
fn recv_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let end = Instant::now() + GENEROUS;
    let mut seen = Vec::new();
    while Instant::now() < end {
        let Some(m) = recv(sock) else { break };
        let hit = m.lines().any(|l| l == want);
        seen.push(m);
        if hit {
            return seen;
        }
    }
    panic!("no `{want}` among {seen:?}");
}

/// The whole conversation with systemd, at `env_value` (received on `sock`).
fn converse(name: &str, sock: UnixDatagram, env_value: &str) {
    sock.set_read_timeout(Some(GENEROUS)).unwrap();
    let (_dir, cfg, opts) = setup(name);
    let socket = cfg.control.socket.clone();
    let fake = Fake(Arc::new(Mutex::new((true, true))));
    std::env::set_var("NOTIFY_SOCKET", env_value);
    // Started on another thread so that READY=1 is observed while it happens:
    // the control socket must already exist when it arrives.
    let starter = std::thread::spawn(move || {
        let sup = Supervisor::new(&cfg, Box::new(fake), opts).unwrap();
        let h = sup.handle();
        (h, std::thread::spawn(move || sup.run()))
    });
    let first = recv(&sock).expect("READY=1 within 30 s");
    let socket_there = socket.exists();
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[0], "READY=1", "{first:?}");
    assert!(
        lines.len() == 2 && lines[1].starts_with("STATUS=vault unlocked"),
        "{first:?}"
    );
    assert!(socket_there, "READY=1 before the control socket was bound");
    let (handle, runner) = starter.join().unwrap();
    assert!(
        std::env::var_os("NOTIFY_SOCKET").is_none(),
        "NOTIFY_SOCKET left for the children to inherit"
    );

    assert_eq!(
        ask(&socket, r#"{"cmd":"lock"}"#).trim(),
        r#"{"success":true,"state":"locked"}"#
    );
    recv_until(&sock, "STATUS=vault locked (manual_lock)");
    let unlock = serde_json::json!({"cmd": "unlock", "passphrase": PASS}).to_string();
    assert!(ask(&socket, &unlock).contains(r#""success":true"#));
    let after = recv_until(&sock, "STATUS=vault unlocked (passphrase)");
    assert!(
        after.iter().all(|m| !m.contains("READY=1")),
        "READY=1 sent twice: {after:?}"
    );

    handle.stop();
    runner.join().unwrap().unwrap();
    recv_until(&sock, "STOPPING=1");
    // Nothing after the stop, and no keepalive ever (no watchdog).
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv(&mut buf).is_err(), "a datagram after STOPPING=1");
}

#[test]
fn ready_status_and_stopping_reach_a_path_socket() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    converse("path", sock, path.to_str().unwrap());
}

#[test]
fn ready_status_and_stopping_reach_an_abstract_socket() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let name = format!("vg-sd-notify-test-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    converse("abstract", sock, &format!("@{name}"));
}

#[test]
fn without_notify_socket_the_supervisor_serves_as_before() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    std::env::remove_var("NOTIFY_SOCKET");
    let (_dir, cfg, opts) = setup("none");
    let socket = cfg.control.socket.clone();
    let fake = Fake(Arc::new(Mutex::new((true, true))));
    let sup = Supervisor::new(&cfg, Box::new(fake), opts).unwrap();
    let h = sup.handle();
    let t = std::thread::spawn(move || sup.run());
    assert_eq!(
        ask(&socket, r#"{"cmd":"lock"}"#).trim(),
        r#"{"success":true,"state":"locked"}"#
    );
    h.stop();
    t.join().unwrap().unwrap();
    assert!(!socket.exists(), "control socket left behind");
}

#[test]
fn an_unusable_notify_socket_does_not_stop_the_supervisor() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let (dir, cfg, opts) = setup("dangling");
    // A path nobody listens on, then an address form we do not speak.
    for value in [
        dir.path().join("nobody").to_str().unwrap().to_string(),
        "vsock:2:9999".to_string(),
    ] {
        std::env::set_var("NOTIFY_SOCKET", &value);
        let fake = Fake(Arc::new(Mutex::new((false, false))));
        let sup = Supervisor::new(&cfg, Box::new(fake), opts.clone()).unwrap();
        assert!(std::env::var_os("NOTIFY_SOCKET").is_none());
        let h = sup.handle();
        let t = std::thread::spawn(move || sup.run());
        assert!(ask(&cfg.control.socket, r#"{"cmd":"status"}"#).contains(r#""state":"locked""#));
        h.stop();
        t.join().unwrap().unwrap();
    }
}
