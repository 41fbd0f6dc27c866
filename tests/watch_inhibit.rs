//! Issue 17 on a real control socket with a fake vault backend: the `watch`
//! stream (first line the state, `seq` increasing by one, a slow reader dropped
//! while another watcher and the loop carry on, garbage from a watcher, zero idle
//! wake-ups with watchers connected), inhibitors (expiry on the clock, release on
//! disconnect unless kept, an overriding lock, 10,000 requests from one client),
//! and `vaultguard lock --reason` through the binary.
//!
//! Wall-clock bounds are generous, as in supervisor_socket.rs: lower bounds prove
//! nothing fires early, upper bounds are many times the expected time.

mod common;

use common::read_line;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
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

// ---------------------------------------------------------------- helpers

/// A watcher: a connection that sent `{"cmd":"watch"}`, read line by line.
struct Watcher {
    r: BufReader<UnixStream>,
}

impl Watcher {
    fn new(h: &Harness) -> (Watcher, Value) {
        let mut s = h.connect();
        s.write_all(b"{\"cmd\":\"watch\"}\n").unwrap();
        let mut w = Watcher {
            r: BufReader::new(s),
        };
        let first = w.next().expect("the first line");
        (w, first)
    }
    fn next(&mut self) -> Option<Value> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&l).unwrap()),
        }
    }
    /// Lines until one satisfies `pred` (which is returned with the rest).
    fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        while let Some(v) = self.next() {
            let done = pred(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
        panic!("stream ended before the line looked for: {seen:?}");
    }
    fn send(&mut self, line: &[u8]) {
        self.r.get_mut().write_all(line).unwrap();
    }
}

fn seqs(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
}

fn inhibit_req(who: &str, seconds: u64, keep: bool) -> String {
    serde_json::json!({"cmd":"inhibit","who":who,"why":"test job","seconds":seconds,"keep":keep})
        .to_string()
}

/// Send a line on an open connection and read its answer.
fn ask_on(s: &mut UnixStream, line: &str) -> Value {
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    serde_json::from_str(&read_line(s).expect("an answer")).unwrap()
}

fn inhibitor_names(status: &Value) -> Vec<String> {
    status
        .get("inhibitors")
        .and_then(|i| i.as_array())
        .map(|a| {
            a.iter()
                .map(|i| i["who"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- tests

#[test]
fn watch_starts_with_the_state_and_numbers_every_event() {
    let h = Harness::start("watch-seq", Fake::unlocked());
    let (mut w, first) = Watcher::new(&h);
    assert_eq!(first["event"], "state");
    assert_eq!(first["state"], "unlocked");
    let seq0 = first["seq"].as_u64().unwrap();

    // Kept: the asking connection closes right after.
    assert_eq!(h.ask(&inhibit_req("job", 60, true))["success"], true);
    let v = h.ask(r#"{"cmd":"lock","reason":"incident:IR-7"}"#);
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["overrode"], serde_json::json!(["job"]));
    let bad =
        h.ask(&serde_json::json!({"cmd":"unlock","passphrase":"Tr0ub4dor-xyzzy"}).to_string());
    assert_eq!(bad["success"], false);

    let lines = w.until(|v| v["event"] == "unlock_failed");
    let s = seqs(&lines);
    let expect: Vec<u64> = (seq0 + 1..=seq0 + s.len() as u64).collect();
    assert_eq!(s, expect, "{lines:?}");
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"inhibit") && kinds.contains(&"lock"),
        "{kinds:?}"
    );
    assert!(
        lines.iter().any(|l| l["event"] == "state"
            && l["state"] == "locked"
            && l["detail"] == "incident:IR-7"),
        "{lines:?}"
    );
    // An auth failure names who failed, never what was typed.
    let failed = lines.last().unwrap();
    assert_eq!(failed["uid"], 0);
    assert!(!failed.to_string().contains("xyzzy"), "{failed}");
    assert!(h
        .fake
        .0
        .lock()
        .unwrap()
        .calls
        .contains(&"close".to_string()));
    // The state file and the audit log agree.
    assert_eq!(h.state_file()["detail"], "incident:IR-7");
    let audit = std::fs::read_to_string(&h.cfg.audit.path).unwrap();
    assert!(audit.contains("\"reason\":\"incident:IR-7\""), "{audit}");
    assert!(audit.contains("\"overrode\":\"job\""), "{audit}");
}

#[test]
fn garbage_from_a_watcher_gets_one_error_line_and_the_stream_goes_on() {
    let h = Harness::start("watch-garbage", Fake::unlocked());
    let (mut w, _) = Watcher::new(&h);
    w.send(b"this is not json\n");
    let e = w.next().unwrap();
    assert_eq!(e["success"], false);
    assert!(e["error"].as_str().unwrap().contains("watching"), "{e}");
    w.send(b"{\"cmd\":\"lock\"}\n");
    let e = w.next().unwrap();
    assert!(e["error"].as_str().unwrap().contains("watching"), "{e}");
    // ...and the lock it sent was not run; a real one is streamed.
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    h.ask(r#"{"cmd":"lock"}"#);
    let lines = w.until(|v| v["event"] == "lock");
    assert!(lines.iter().all(|l| l.get("seq").is_some()), "{lines:?}");
}

#[test]
fn a_watcher_that_does_not_read_is_dropped_and_nobody_else_waits_for_it() {
    let h = Harness::start("watch-slow", Fake::unlocked());
    let (slow, _) = Watcher::new(&h);
    let (mut good, first) = Watcher::new(&h);
    let seq0 = first["seq"].as_u64().unwrap();
    // The good watcher reads everything, in a thread.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        while let Some(v) = good.next() {
            let done = v["event"] == "lock";
            got.push(v["seq"].as_u64().unwrap());
            if done {
                break;
            }
        }
        got
    });
    // Some 1.5 MB of events (a renewal is one line each, and not audited each),
    // well past the slow reader's socket buffers and its 64 KiB queue.
    let mut c = h.connect();
    let mut worst = Duration::ZERO;
    for n in 0..8000 {
        let t = Instant::now();
        let v = ask_on(&mut c, &inhibit_req("job", 60 + n % 7, false));
        worst = worst.max(t.elapsed());
        assert_eq!(v["success"], true, "{v}");
    }
    // The loop stayed responsive for everyone else.
    let t = Instant::now();
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(worst < Duration::from_secs(2), "a request waited {worst:?}");
    h.ask(r#"{"cmd":"lock"}"#);
    let got = reader.join().unwrap();
    let expect: Vec<u64> = (seq0 + 1..=seq0 + got.len() as u64).collect();
    assert_eq!(got, expect, "the reading watcher lost or reordered lines");
    assert!(got.len() > 8000);
    // The slow one was cut off: what it can still read ends in EOF, long
    // before all the lines.
    let mut slow = slow;
    let mut n = 0;
    while slow.next().is_some() {
        n += 1;
    }
    assert!(n < 8000, "the slow watcher got {n} lines: not dropped");
    // The first take and the first renewal were audited; the other 7998
    // renewals are counted in the next entry, not written one by one.
    let audit = h.audit_events();
    assert_eq!(
        audit.iter().filter(|e| *e == "inhibit").count(),
        2,
        "{audit:?}"
    );
}

#[test]
fn watchers_add_no_wake_ups() {
    let h = Harness::start("watch-quiet", Fake::unlocked());
    let _ws: Vec<Watcher> = (0..20).map(|_| Watcher::new(&h).0).collect();
    // Let the brief look for a next request after answering end.
    std::thread::sleep(Duration::from_millis(300));
    let before = h.handle.wakeups();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        h.handle.wakeups(),
        before,
        "woke up with only watchers connected"
    );
    // And they are not cut off by the request read timeout either.
    assert!(h.opts.read_timeout <= Duration::from_secs(10));
}

#[test]
fn watchers_outlive_the_read_timeout() {
    let h = Harness::start_with("watch-timeout", Fake::unlocked(), |_, o| {
        o.read_timeout = Duration::from_millis(300)
    });
    let (mut w, _) = Watcher::new(&h);
    std::thread::sleep(Duration::from_secs(1));
    h.ask(r#"{"cmd":"lock"}"#);
    w.until(|v| v["event"] == "lock");
}

#[test]
fn the_warning_window_is_locking_soon_and_watchers_are_warned() {
    let h = Harness::start_with("watch-warn", Fake::unlocked(), |_, o| {
        o.auto_lock_override = Some(Duration::from_secs(3));
        o.warn_before = Some(Duration::from_secs(2));
    });
    let (mut w, _) = Watcher::new(&h);
    let lines = w.until(|v| v["event"] == "lock");
    let kinds: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["event"].as_str().unwrap(),
                l["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let soon = kinds.iter().position(|k| *k == ("state", "locking_soon"));
    let warn = kinds.iter().position(|k| k.0 == "warning");
    let locked = kinds.iter().position(|k| *k == ("state", "locked"));
    assert!(
        soon.is_some() && warn.is_some() && locked.is_some(),
        "{kinds:?}"
    );
    assert!(soon < locked && warn < locked, "{kinds:?}");
    let warning = &lines[warn.unwrap()];
    assert_eq!(warning["lock_in_seconds"], 2, "{warning}");
}

#[test]
fn an_inhibitor_holds_off_the_auto_lock_until_it_expires() {
    let h = Harness::start_with("inhibit-expiry", Fake::unlocked(), |_, o| {
        o.auto_lock_override = Some(Duration::from_secs(2))
    });
    let v = h.ask(&inhibit_req("model-download", 4, true));
    assert_eq!(v["success"], true, "{v}");
    let s = h.ask(r#"{"cmd":"status"}"#);
    let i = &s["inhibitors"][0];
    assert_eq!(i["who"], "model-download");
    assert_eq!(i["why"], "test job");
    assert_eq!(i["uid"], 0);
    assert_eq!(i["keep"], true);
    assert!(
        (3..=4).contains(&i["remaining_seconds"].as_u64().unwrap()),
        "{s}"
    );
    let locked = h
        .wait_state(GENEROUS, |v| v["state"] == "locked")
        .expect("no lock after the inhibitor expired");
    // 4 s of inhibitor, then a full 2 s idle period.
    let after = locked - h.started;
    assert!(after >= Duration::from_secs(6), "locked early: {after:?}");
    assert!(after < Duration::from_secs(20), "locked late: {after:?}");
    // The state file is written just before the lock's audit entry.
    let end = Instant::now() + GENEROUS;
    while h.audit_events().len() < 4 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let audit = h.audit_events();
    assert_eq!(audit, ["supervisor_start", "inhibit", "release", "lock"]);
}

#[test]
fn disconnecting_releases_inhibitors_unless_kept() {
    let h = Harness::start("inhibit-disconnect", Fake::unlocked());
    let mut c = h.connect();
    assert_eq!(
        ask_on(&mut c, &inhibit_req("goes", 600, false))["success"],
        true
    );
    assert_eq!(
        ask_on(&mut c, &inhibit_req("stays", 600, true))["success"],
        true
    );
    assert_eq!(
        inhibitor_names(&h.ask(r#"{"cmd":"status"}"#)),
        ["goes", "stays"]
    );
    drop(c);
    let end = Instant::now() + GENEROUS;
    loop {
        let names = inhibitor_names(&h.ask(r#"{"cmd":"status"}"#));
        if names == ["stays"] {
            break;
        }
        assert!(
            Instant::now() < end,
            "still held after disconnect: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let audit = std::fs::read_to_string(&h.cfg.audit.path).unwrap();
    assert!(
        audit.contains("\"cause\":\"disconnected\"") && audit.contains("\"who\":\"goes\""),
        "{audit}"
    );
    assert_eq!(h.ask(r#"{"cmd":"release","who":"stays"}"#)["success"], true);
    assert!(inhibitor_names(&h.ask(r#"{"cmd":"status"}"#)).is_empty());
}

#[test]
fn ten_thousand_inhibit_requests_from_one_client_are_bounded() {
    let h = Harness::start("inhibit-flood", Fake::unlocked());
    let mut c = h.connect();
    let (mut ok, mut refused) = (0, 0);
    let t = Instant::now();
    for n in 0..10_000 {
        let v = ask_on(&mut c, &inhibit_req(&format!("job-{n}"), 600, false));
        if v["success"] == true {
            ok += 1;
        } else {
            let e = v["error"].as_str().unwrap();
            assert!(e.contains("already holds 64 inhibitors"), "{e}");
            refused += 1;
        }
    }
    assert_eq!((ok, refused), (64, 10_000 - 64));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    // Bad durations each get their own clear error on the same connection.
    for (line, want) in [
        (
            r#"{"cmd":"inhibit","who":"x","seconds":-1}"#,
            "must be positive",
        ),
        (
            r#"{"cmd":"inhibit","who":"x","seconds":0}"#,
            "must be positive",
        ),
        (
            r#"{"cmd":"inhibit","who":"x","seconds":2.5}"#,
            "whole number",
        ),
        (
            r#"{"cmd":"inhibit","who":"x","seconds":1e9}"#,
            "whole number",
        ),
        (
            r#"{"cmd":"inhibit","who":"x","seconds":"10"}"#,
            "whole number",
        ),
        (
            r#"{"cmd":"inhibit","who":"x","seconds":184467440737095516160}"#,
            "too large",
        ),
        (
            r#"{"cmd":"inhibit","who":"x","seconds":999999}"#,
            "vault.max_inhibit",
        ),
    ] {
        let v = ask_on(&mut c, line);
        assert_eq!(v["success"], false, "{line}");
        assert!(v["error"].as_str().unwrap().contains(want), "{line}: {v}");
    }
    // The audit holds the 64 and one refusal entry; the rest are counted in
    // the next one, not lost and not written one by one.
    let audit = h.audit_events();
    assert_eq!(audit.iter().filter(|e| *e == "inhibit").count(), 64);
    assert_eq!(audit.iter().filter(|e| *e == "inhibit_refused").count(), 1);
    assert_eq!(inhibitor_names(&h.ask(r#"{"cmd":"status"}"#)).len(), 64);
}

#[test]
fn lock_reason_from_the_command_line() {
    let h = Harness::start("lock-reason-cli", Fake::unlocked());
    let cfg_path = h.dir.join("config.json");
    let cfg = serde_json::json!({
        "control": {"socket": h.socket()},
    });
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(common::vaultguard_bin())
            .arg("--config")
            .arg(&cfg_path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["lock", "--reason", "incident:a b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("incident:<id>"), "{err}");
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    let out = run(&["lock", "--reason", "incident:IR-9", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["success"], true);
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["detail"], "incident:IR-9");
}

#[test]
fn watchers_give_back_their_request_slot_and_all_hear_the_lock() {
    let h = Harness::start_with("watch-many", Fake::unlocked(), |_, o| o.max_clients = 16);
    let mut ws: Vec<Watcher> = (0..100).map(|_| Watcher::new(&h).0).collect();
    // Six times max_clients watch, and a command still gets a slot.
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "unlocked");
    assert_eq!(h.ask(r#"{"cmd":"lock"}"#)["success"], true);
    for w in &mut ws {
        w.until(|v| v["event"] == "lock");
    }
}
