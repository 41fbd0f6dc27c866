//! The supervisor on a temporary control socket with a fake vault backend: every
//! request and response shape of SPEC §3, bad input, stalled and flooding clients,
//! peer-credential denial (a forked child that drops to another uid), the idle
//! auto-lock and keepalive, the lockout across a restart, and the state file.
//!
//! Wall-clock bounds are deliberately generous (a loaded 2-core machine must not
//! flake): lower bounds prove that nothing fires early, upper bounds are many
//! times the expected time.

mod common;

use common::{closed_within, read_line};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use vaultguard::config::{Allow, Config};
use vaultguard::secret::SecretBytes;
use vaultguard::supervisor::{
    BackendError, Handle, Options, Reality, Supervisor, SupervisorError, VaultBackend,
};

const PASS: &str = "correct horse";
const GENEROUS: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- fake vault

#[derive(Default)]
struct World {
    active: bool,
    mounted: bool,
    busy: bool,
    calls: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn unlocked() -> Fake {
        let f = Fake::default();
        f.set(|w| {
            w.active = true;
            w.mounted = true;
        });
        f
    }
    fn set(&self, f: impl FnOnce(&mut World)) {
        f(&mut self.0.lock().unwrap())
    }
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().calls.clone()
    }
    fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap().calls)
    }
    fn call(&self, c: &str) {
        self.0.lock().unwrap().calls.push(c.to_string());
    }
}

impl VaultBackend for Fake {
    fn probe(&mut self) -> Result<Reality, BackendError> {
        let w = self.0.lock().unwrap();
        Ok(Reality {
            mapping_active: w.active,
            mounted: w.mounted,
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
        let mut w = self.0.lock().unwrap();
        if w.busy {
            return Err(BackendError::Busy {
                mount: "/var/lib/secure-ai".into(),
            });
        }
        w.mounted = false;
        Ok(())
    }
    fn close_mapping(&mut self) -> Result<(), BackendError> {
        self.call("close");
        self.0.lock().unwrap().active = false;
        Ok(())
    }
    fn revoke_keys(&mut self) -> Result<usize, BackendError> {
        self.call("revoke");
        Ok(0)
    }
    fn activate(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError> {
        self.call("activate");
        if passphrase.as_bytes() != PASS.as_bytes() {
            return Err(BackendError::WrongPassphrase);
        }
        self.0.lock().unwrap().active = true;
        Ok(())
    }
    fn verify_passphrase(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError> {
        self.call("verify");
        if passphrase.as_bytes() != PASS.as_bytes() {
            return Err(BackendError::WrongPassphrase);
        }
        Ok(())
    }
    fn mount(&mut self) -> Result<(), BackendError> {
        self.call("mount");
        self.0.lock().unwrap().mounted = true;
        Ok(())
    }
}

// ---------------------------------------------------------------- harness

fn tmpdir(name: &str) -> PathBuf {
    // Kept (not removed on drop): the harness removes it when the test is done.
    let d = tempfile::Builder::new()
        .prefix(&format!("vg-sock-{name}-"))
        .tempdir()
        .unwrap()
        .keep();
    // Other uids must reach the socket inside.
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

struct Harness {
    dir: PathBuf,
    cfg: Config,
    opts: Options,
    fake: Fake,
    handle: Handle,
    thread: Option<JoinHandle<Result<(), SupervisorError>>>,
    started: Instant,
}

fn config(dir: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.control.socket = dir.join("control.sock");
    cfg.audit.path = dir.join("audit.jsonl");
    cfg.auth.state_path = dir.join("lib").join("lockout.json");
    cfg.vault.services = vec!["ollama.service".into()];
    cfg.vault.state_compat_path = Some(dir.join("compat").join("vault-state"));
    cfg
}

fn options(dir: &Path) -> Options {
    Options {
        state_file: dir.join("state.json"),
        ..Options::default()
    }
}

impl Harness {
    fn start(name: &str, fake: Fake) -> Harness {
        Harness::start_with(name, fake, |_, _| {})
    }

    fn start_with(
        name: &str,
        fake: Fake,
        tweak: impl FnOnce(&mut Config, &mut Options),
    ) -> Harness {
        let dir = tmpdir(name);
        let mut cfg = config(&dir);
        let mut opts = options(&dir);
        tweak(&mut cfg, &mut opts);
        Harness::launch(dir, cfg, opts, fake)
    }

    fn launch(dir: PathBuf, cfg: Config, opts: Options, fake: Fake) -> Harness {
        let started = Instant::now();
        let sup = Supervisor::new(&cfg, Box::new(fake.clone()), opts.clone()).unwrap();
        let handle = sup.handle();
        let thread = Some(std::thread::spawn(move || sup.run()));
        Harness {
            dir,
            cfg,
            opts,
            fake,
            handle,
            thread,
            started,
        }
    }

    fn socket(&self) -> &Path {
        &self.cfg.control.socket
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(GENEROUS)).unwrap();
        s
    }

    /// One request on a fresh connection; the raw response line.
    fn raw(&self, line: &str) -> String {
        let mut s = self.connect();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        read_line(&mut s).expect("a response line")
    }

    fn ask(&self, line: &str) -> Value {
        serde_json::from_str(&self.raw(line)).unwrap()
    }

    fn state_file(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("state.json")).unwrap()).unwrap()
    }

    fn audit_events(&self) -> Vec<String> {
        vaultguard::audit::verify(&self.cfg.audit.path).expect("audit chain intact");
        std::fs::read_to_string(&self.cfg.audit.path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// Poll the state file until `pred` holds; returns when it did.
    fn wait_state(&self, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Instant> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(bytes) = std::fs::read(self.dir.join("state.json")) {
                if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                    if pred(&v) {
                        return Some(Instant::now());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn stop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
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

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

fn unlock_req(p: &str) -> String {
    serde_json::json!({"cmd": "unlock", "passphrase": p}).to_string()
}

// ---------------------------------------------------------------- tests

#[test]
fn every_request_has_the_documented_response_shape() {
    let dir = tmpdir("shapes");
    // The boot path left a hint that agrees with the kernel: it becomes the detail.
    vaultguard::handoff::write_boot_hint(&dir.join("state.json"), "unlocked", "tpm2_unseal", None)
        .unwrap();
    let h = Harness::launch(dir.clone(), config(&dir), options(&dir), Fake::unlocked());

    let raw = h.raw(r#"{"cmd":"status"}"#);
    assert!(
        raw.starts_with(r#"{"state":"unlocked","detail":"tpm2_unseal","idle_seconds":"#),
        "{raw}"
    );
    let s: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        keys(&s),
        [
            "detail",
            "idle_seconds",
            "last_activity",
            "lock_in_seconds",
            "state"
        ]
    );
    assert!(s["idle_seconds"].is_u64());
    assert!(s["last_activity"].is_f64(), "{raw}");
    let la = s["last_activity"].as_f64().unwrap();
    let wall = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((wall - la).abs() < 60.0, "last_activity {la} vs now {wall}");
    let lock_in = s["lock_in_seconds"].as_u64().unwrap();
    assert!((1700..=1800).contains(&lock_in), "{lock_in}");

    assert_eq!(
        h.raw(r#"{"cmd":"lock"}"#),
        r#"{"success":true,"state":"locked"}"#
    );
    assert_eq!(
        h.fake.take_calls(),
        ["stop ollama.service", "sync", "unmount", "close", "revoke"]
    );
    let s = h.ask(r#"{"cmd":"status"}"#);
    assert_eq!(
        keys(&s),
        ["detail", "idle_seconds", "last_activity", "state"]
    );
    assert_eq!(s["state"], "locked");
    assert_eq!(s["detail"], "manual_lock");

    assert_eq!(
        h.raw(&unlock_req("wrong")),
        r#"{"success":false,"error":"incorrect passphrase or device error"}"#
    );
    assert_eq!(
        h.raw(&unlock_req(PASS)),
        r#"{"success":true,"state":"unlocked"}"#
    );
    assert_eq!(
        h.fake.take_calls(),
        ["activate", "activate", "mount", "start ollama.service"]
    );
    assert_eq!(h.raw(r#"{"cmd":"keepalive"}"#), r#"{"success":true}"#);

    // The state file mirrors it, in both places.
    let sf = h.state_file();
    assert_eq!(sf["state"], "unlocked");
    assert_eq!(sf["detail"], "passphrase");
    assert!(sf["auto_lock_at"].as_f64().unwrap() > wall);
    assert_eq!(
        std::fs::read(dir.join("state.json")).unwrap(),
        std::fs::read(dir.join("compat").join("vault-state")).unwrap()
    );
    // A keepalive postpones the auto-lock: its decision is audited (coalesced
    // per identity, issue 17); status reads are not.
    assert_eq!(
        h.audit_events(),
        [
            "supervisor_start",
            "lock",
            "unlock_failed",
            "unlock",
            "keepalive"
        ]
    );
    // No passphrase anywhere on disk.
    for f in [dir.join("audit.jsonl"), dir.join("state.json")] {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains(PASS) && !text.contains("\"wrong\""),
            "{}",
            f.display()
        );
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_the_connection_survives() {
    let h = Harness::start("bad", Fake::unlocked());
    let mut s = h.connect();
    let cases = [
        ("{\"cmd\":", "invalid JSON: "),
        ("not json at all", "invalid JSON: "),
        ("[1,2]", "request must be a JSON object"),
        ("{\"cmd\":\"reboot\"}", "unknown command `reboot`"),
        ("{\"command\":\"status\"}", "missing field `cmd`"),
        ("{\"cmd\":\"unlock\"}", "missing field `passphrase`"),
        (
            "{\"cmd\":\"unlock\",\"passphrase\":42}",
            "field `passphrase` must be a string",
        ),
        ("{\"cmd\":7}", "field `cmd` must be a string"),
    ];
    for (line, want) in cases {
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let v: Value = serde_json::from_str(&read_line(&mut s).unwrap()).unwrap();
        assert_eq!(v["success"], false, "{line}");
        assert_eq!(keys(&v), ["error", "success"], "{line}");
        let err = v["error"].as_str().unwrap();
        assert!(err.starts_with(want), "{line}: {err}");
    }
    // Pipelined requests on the same connection are answered in order.
    s.write_all(b"{\"cmd\":\"keepalive\"}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), r#"{"success":true}"#);
    let v: Value = serde_json::from_str(&read_line(&mut s).unwrap()).unwrap();
    assert_eq!(v["state"], "unlocked");
    // None of it touched the vault.
    assert!(h.fake.calls().is_empty());
    // A last request without a newline before the client shuts down its side.
    let mut s = h.connect();
    s.write_all(b"{\"cmd\":\"keepalive\"}").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), r#"{"success":true}"#);
}

#[test]
fn a_70_kib_line_is_refused_and_the_connection_closed() {
    let h = Harness::start("long", Fake::unlocked());
    let mut s = h.connect();
    let line = format!(
        "{{\"cmd\":\"status\",\"pad\":\"{}\"}}\n",
        "x".repeat(70 * 1024)
    );
    // The server may close before it has read everything; a failed write is fine.
    let _ = s.write_all(line.as_bytes());
    let v: Value = serde_json::from_str(&read_line(&mut s).unwrap()).unwrap();
    assert_eq!(v["success"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("longer than 65536 bytes"),
        "{v}"
    );
    assert!(closed_within(&mut s, GENEROUS));
    // The supervisor is fine.
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
}

#[test]
fn a_stalled_client_does_not_delay_another() {
    let h = Harness::start_with("stall", Fake::unlocked(), |_, o| {
        o.read_timeout = Duration::from_secs(60)
    });
    let mut stalled = h.connect();
    stalled.write_all(b"{\"cmd\":\"sta").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    // Answered long before the stalled client's 60 s timeout could have freed anything.
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // And the stalled one is still waiting, not answered, not closed.
    stalled.set_nonblocking(true).unwrap();
    let mut b = [0u8; 16];
    let r = stalled.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    // Finishing the line still works.
    stalled.set_nonblocking(false).unwrap();
    stalled.write_all(b"tus\"}\n").unwrap();
    let v: Value = serde_json::from_str(&read_line(&mut stalled).unwrap()).unwrap();
    assert_eq!(v["state"], "unlocked");
}

#[test]
fn a_stalled_client_is_cut_off_after_the_read_timeout() {
    let h = Harness::start_with("cutoff", Fake::unlocked(), |_, o| {
        o.read_timeout = Duration::from_secs(1)
    });
    let mut stalled = h.connect();
    stalled.write_all(b"{\"cmd\":\"sta").unwrap();
    let t = Instant::now();
    let v: Value = serde_json::from_str(&read_line(&mut stalled).unwrap()).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(v["success"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not completed in time"),
        "{v}"
    );
    assert!(closed_within(&mut stalled, GENEROUS));
}

#[test]
fn two_hundred_fifty_simultaneous_connections_are_all_served() {
    let h = Harness::start("flood", Fake::unlocked());
    let mut conns: Vec<UnixStream> = (0..250).map(|_| h.connect()).collect();
    for c in &mut conns {
        c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    }
    for c in &mut conns {
        let v: Value = serde_json::from_str(&read_line(c).unwrap()).unwrap();
        assert_eq!(v["state"], "unlocked");
    }
}

#[test]
fn connections_beyond_the_bound_are_refused_and_closed() {
    let h = Harness::start_with("bound", Fake::unlocked(), |_, o| o.max_clients = 8);
    let mut held: Vec<UnixStream> = (0..8).map(|_| h.connect()).collect();
    // Make sure all eight have been accepted before the ninth arrives.
    for c in &mut held {
        c.write_all(b"{\"cmd\":\"keepalive\"}\n").unwrap();
        assert_eq!(read_line(c).unwrap(), r#"{"success":true}"#);
    }
    let mut ninth = h.connect();
    let v: Value = serde_json::from_str(&read_line(&mut ninth).unwrap()).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("too many connections"),
        "{v}"
    );
    assert!(closed_within(&mut ninth, GENEROUS));
    // Closing one frees a slot.
    drop(held.pop());
    let end = Instant::now() + GENEROUS;
    loop {
        let v = h.ask(r#"{"cmd":"status"}"#);
        if v["state"] == "unlocked" {
            break;
        }
        assert!(Instant::now() < end, "no slot freed: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn auto_lock_fires_at_the_deadline_and_not_before() {
    let h = Harness::start_with("autolock", Fake::unlocked(), |_, o| {
        o.auto_lock_override = Some(Duration::from_secs(2))
    });
    let locked = h
        .wait_state(GENEROUS, |v| v["state"] == "locked")
        .expect("auto-lock never happened");
    let after = locked - h.started;
    assert!(after >= Duration::from_secs(2), "locked early: {after:?}");
    assert!(after < Duration::from_secs(15), "locked late: {after:?}");
    let s = h.ask(r#"{"cmd":"status"}"#);
    assert_eq!(s["detail"], "auto_lock_idle");
    assert!(s.get("lock_in_seconds").is_none());
    assert_eq!(
        h.fake.calls(),
        ["stop ollama.service", "sync", "unmount", "close", "revoke"]
    );
    assert_eq!(h.audit_events(), ["supervisor_start", "lock"]);
}

#[test]
fn keepalive_postpones_the_lock() {
    let h = Harness::start_with("keepalive", Fake::unlocked(), |_, o| {
        o.auto_lock_override = Some(Duration::from_secs(6))
    });
    let mut last = Instant::now();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(2));
        last = Instant::now();
        assert_eq!(h.raw(r#"{"cmd":"keepalive"}"#), r#"{"success":true}"#);
        let s = h.ask(r#"{"cmd":"status"}"#);
        assert_eq!(s["state"], "unlocked", "locked despite keepalives");
        let lock_in = s["lock_in_seconds"].as_u64().unwrap();
        assert!((1..=6).contains(&lock_in), "{lock_in}");
    }
    // 8 s after start, past the unpostponed deadline of 6 s.
    assert!(h.started.elapsed() >= Duration::from_secs(8));
    assert!(h.fake.calls().is_empty());
    let locked = h
        .wait_state(GENEROUS, |v| v["state"] == "locked")
        .expect("no lock after keepalives stopped");
    assert!(
        locked - last >= Duration::from_secs(6),
        "{:?}",
        locked - last
    );
    assert_eq!(h.state_file()["detail"], "auto_lock_idle");
}

#[test]
fn idle_supervisor_does_not_wake_up() {
    let h = Harness::start("quiet", Fake::unlocked());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(h.handle.wakeups(), 0, "woke up with nothing to do");
    h.ask(r#"{"cmd":"status"}"#);
    assert!(h.handle.wakeups() > 0);
    // The brief look for a next request after answering ends: quiet again, and
    // not spinning either (CPU time of this process, clock ticks).
    std::thread::sleep(Duration::from_millis(200));
    let (after, cpu) = (h.handle.wakeups(), cpu_ticks());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        h.handle.wakeups(),
        after,
        "kept waking up after one request"
    );
    assert!(cpu_ticks() - cpu <= 5, "busy after one request");
}

/// User + system CPU time of this process so far, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split(' ').collect();
    // fields 14 and 15 of stat(5); field 3 is the first after the command name
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn activity_file_counts_as_activity() {
    let dir = tmpdir("activity-file");
    let file = dir.join("secure-ai").join("last-activity");
    let mut cfg = config(&dir);
    cfg.vault.activity_file = Some(file.clone());
    let mut opts = options(&dir);
    opts.auto_lock_override = Some(Duration::from_secs(10));
    let h = Harness::launch(dir.clone(), cfg, opts, Fake::unlocked());
    std::thread::sleep(Duration::from_secs(3));
    let before = h.ask(r#"{"cmd":"status"}"#)["lock_in_seconds"]
        .as_u64()
        .unwrap();
    assert!(before <= 7, "{before}");
    // The directory did not exist at start; it and the file appear now.
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"").unwrap();
    let end = Instant::now() + GENEROUS;
    loop {
        let s = h.ask(r#"{"cmd":"status"}"#);
        if s["lock_in_seconds"].as_u64().unwrap_or(0) >= 8 {
            break;
        }
        assert!(
            Instant::now() < end,
            "touching the activity file was not activity: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
}

#[test]
fn lockout_reports_retry_after_and_survives_a_restart() {
    let dir = tmpdir("lockout");
    let mut cfg = config(&dir);
    cfg.auth.max_failed_attempts = 2;
    cfg.auth.lockout_duration = 60;
    cfg.auth.escalated_lockout = 900;
    let mut h = Harness::launch(dir.clone(), cfg.clone(), options(&dir), Fake::default());
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "locked");

    let v = h.ask(&unlock_req("nope"));
    assert_eq!(keys(&v), ["error", "success"]);
    let v = h.ask(&unlock_req("nope again"));
    assert_eq!(v["error"], "incorrect passphrase or device error");
    let retry = v["retry_after"]
        .as_u64()
        .expect("retry_after after the last allowed failure");
    assert!((50..=60).contains(&retry), "{retry}");
    // The right passphrase is refused without being tried.
    let v = h.ask(&unlock_req(PASS));
    assert_eq!(v["success"], false);
    assert!(v["retry_after"].as_u64().unwrap() <= retry);
    assert_eq!(h.fake.calls(), ["activate", "activate"]);
    let s = h.ask(r#"{"cmd":"status"}"#);
    assert!(s["lockout_seconds"].as_u64().unwrap() > 0, "{s}");
    assert!(h.state_file()["lockout_until"].as_u64().is_some());

    let lockfile = cfg.auth.state_path.clone();
    let mode = std::fs::metadata(&lockfile).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!std::fs::read_to_string(&lockfile).unwrap().contains("nope"));

    // A restart does not reset it.
    h.stop();
    assert!(!cfg.control.socket.exists(), "socket removed on stop");
    let h2 = Harness::launch(dir.clone(), cfg.clone(), options(&dir), h.fake.clone());
    let s = h2.ask(r#"{"cmd":"status"}"#);
    assert!(s["lockout_seconds"].as_u64().unwrap() > 0, "{s}");
    let v = h2.ask(&unlock_req(PASS));
    assert!(v["retry_after"].as_u64().is_some(), "{v}");
    assert_eq!(h2.fake.calls(), ["activate", "activate"]);
    let ev = h2.audit_events();
    assert_eq!(
        ev.iter().filter(|e| *e == "unlock_refused").count(),
        2,
        "{ev:?}"
    );
    assert!(ev.contains(&"lockout".to_string()));
    // The first supervisor's stop was audited; the vault was not touched by it.
    assert!(ev.contains(&"supervisor_stop".to_string()), "{ev:?}");
    std::mem::forget(h); // its directory belongs to h2 now
}

#[test]
fn busy_mount_is_reported_and_the_state_stays_truthful() {
    let fake = Fake::unlocked();
    fake.set(|w| w.busy = true);
    let h = Harness::start("busy", fake);
    let v = h.ask(r#"{"cmd":"lock"}"#);
    assert_eq!(v["success"], false);
    assert_eq!(v["state"], "unlocked");
    assert!(v["error"].as_str().unwrap().contains("busy"), "{v}");
    assert_eq!(
        h.fake.calls(),
        [
            "stop ollama.service",
            "sync",
            "unmount",
            "start ollama.service"
        ]
    );
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    assert_eq!(h.state_file()["state"], "unlocked");
}

#[test]
fn a_second_supervisor_refuses_a_live_socket_and_replaces_a_stale_one() {
    let h = Harness::start("twice", Fake::unlocked());
    let e = match Supervisor::new(&h.cfg, Box::new(Fake::unlocked()), h.opts.clone()) {
        Err(e) => e,
        Ok(_) => panic!("second supervisor bound a live socket"),
    };
    assert!(matches!(e, SupervisorError::AlreadyRunning { .. }), "{e}");
    drop(h);

    let dir = tmpdir("stale");
    let cfg = config(&dir);
    drop(std::os::unix::net::UnixListener::bind(&cfg.control.socket).unwrap());
    assert!(cfg.control.socket.exists());
    let h = Harness::launch(dir.clone(), cfg, options(&dir), Fake::unlocked());
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
}

// ------------------------------------------------- peer credentials (fork + setuid)

/// In a forked child: drop to `uid`/`gid` with supplementary `groups`, send
/// `request`, and exit 0 if the response contains `expect`, 1 if not, 2+ on error.
/// Only raw syscalls run in the child (the test harness is multi-threaded).
fn as_other_user(
    socket: &Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    request: &[u8],
    expect: &[u8],
) -> i32 {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let addr = SocketAddrUnix::new(socket).unwrap();
    let gids: Vec<rustix::process::Gid> = groups
        .iter()
        .map(|&g| rustix::process::Gid::from_raw(g))
        .collect();
    // SAFETY: the child only makes raw system calls on memory prepared before the
    // fork (no allocation, no locks) and leaves with _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = (|| -> i32 {
                if rustix::thread::set_thread_groups(&gids).is_err()
                    || rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(gid)).is_err()
                    || rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)).is_err()
                {
                    return 2;
                }
                let Ok(fd) = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)
                else {
                    return 3;
                };
                if rustix::net::connect(&fd, &addr).is_err() {
                    return 4;
                }
                // A uid allowed no command is answered and closed at accept, maybe
                // before the request is written: its answer is read all the same.
                let _ = rustix::io::write(&fd, request);
                let mut buf = [0u8; 1024];
                let mut len = 0;
                while len < buf.len() {
                    match rustix::io::read(&fd, &mut buf[len..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            len += n;
                            if buf[..len].contains(&b'\n') {
                                break;
                            }
                        }
                    }
                }
                let found = buf[..len].windows(expect.len()).any(|w| w == expect);
                i32::from(!found)
            })();
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit state.
            unsafe { nix::libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None).unwrap() {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("child: {other:?}"),
            }
        }
    }
}

#[test]
fn peer_credentials_decide_who_may_do_what() {
    let h = Harness::start_with("peercred", Fake::unlocked(), |c, _| {
        c.control.allow.insert(
            "status".into(),
            Allow {
                uids: vec![],
                gids: vec![4242],
            },
        );
        c.control.allow.insert(
            "keepalive".into(),
            Allow {
                uids: vec![65533],
                gids: vec![],
            },
        );
    });
    let sock = h.socket().to_path_buf();
    let denied = br#""error":"permission denied: uid 65534"#;
    // Nobody, no groups: denied everything.
    assert_eq!(
        as_other_user(&sock, 65534, 65534, &[], b"{\"cmd\":\"lock\"}\n", denied),
        0
    );
    assert_eq!(
        as_other_user(&sock, 65534, 65534, &[], b"{\"cmd\":\"status\"}\n", denied),
        0
    );
    // A supplementary group listed for status grants status, and only status.
    assert_eq!(
        as_other_user(
            &sock,
            65534,
            65534,
            &[4242],
            b"{\"cmd\":\"status\"}\n",
            br#"{"state":"unlocked""#
        ),
        0
    );
    assert_eq!(
        as_other_user(
            &sock,
            65534,
            65534,
            &[4242],
            b"{\"cmd\":\"lock\"}\n",
            denied
        ),
        0
    );
    let pass_line = format!("{}\n", unlock_req(PASS));
    assert_eq!(
        as_other_user(&sock, 65534, 65534, &[4242], pass_line.as_bytes(), denied),
        0
    );
    // A listed uid.
    assert_eq!(
        as_other_user(
            &sock,
            65533,
            65533,
            &[],
            b"{\"cmd\":\"keepalive\"}\n",
            br#"{"success":true}"#
        ),
        0
    );
    // None of the denied requests reached the vault; root still may.
    assert!(h.fake.calls().is_empty());
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    let ev = h.audit_events();
    assert!(ev.contains(&"permission_denied".to_string()), "{ev:?}");
}

#[test]
fn one_user_cannot_take_every_connection() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    // A uid allowed nothing is closed at accept: this one may run `status`.
    let h = Harness::start_with("peruid", Fake::unlocked(), |c, _| {
        c.control.allow.insert(
            "status".into(),
            Allow {
                uids: vec![65534],
                gids: vec![],
            },
        );
    });
    let limit = vaultguard::supervisor::event_loop::per_uid_limit(Options::default().max_clients);
    assert_eq!(limit, 64);
    let addr = SocketAddrUnix::new(h.socket()).unwrap();
    let (ready_r, ready_w) = rustix::pipe::pipe().unwrap();
    let (go_r, go_w) = rustix::pipe::pipe().unwrap();
    let expect: &[u8] = b"too many connections from uid 65534";
    // SAFETY: the child only makes raw system calls on memory prepared before the
    // fork (no allocation, no locks) and leaves with _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = (|| -> i32 {
                if rustix::thread::set_thread_groups(&[]).is_err()
                    || rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(65534))
                        .is_err()
                    || rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(65534))
                        .is_err()
                {
                    return 2;
                }
                let mut held: [Option<rustix::fd::OwnedFd>; 65] = std::array::from_fn(|_| None);
                for slot in held.iter_mut() {
                    let Ok(fd) = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)
                    else {
                        return 3;
                    };
                    if rustix::net::connect(&fd, &addr).is_err() {
                        return 4;
                    }
                    *slot = Some(fd);
                }
                // The 65th is refused with a reason; the first 64 stay open.
                let Some(last) = &held[64] else { return 5 };
                let mut buf = [0u8; 256];
                let mut len = 0;
                while len < buf.len() {
                    match rustix::io::read(last, &mut buf[len..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
                if !buf[..len].windows(expect.len()).any(|w| w == expect) {
                    return 1;
                }
                let _ = rustix::io::write(&ready_w, b"r");
                let mut b = [0u8; 1];
                let _ = rustix::io::read(&go_r, &mut b);
                0
            })();
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit state.
            unsafe { nix::libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_w);
            let mut b = [0u8; 1];
            let got = rustix::io::read(&ready_r, &mut b).unwrap_or(0);
            // While that user holds its 64 connections, root is still served.
            let state = if got == 1 {
                Some(h.ask(r#"{"cmd":"status"}"#)["state"].clone())
            } else {
                None
            };
            let _ = rustix::io::write(&go_w, b"g");
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            assert_eq!(state, Some(Value::from("unlocked")));
        }
    }
}
