//! Attacks on the newest surfaces of the control socket (issues 14 and 17): the
//! watch stream, inhibitors, lock reasons and what a lock leaves behind, against a
//! real supervisor with a fake vault behind it.
//!
//! Needs root: the passphrase cache is root's user keyring, as the boot path's.

mod common;

use common::read_line;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
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
    fn stop_service(&mut self, unit: &str) -> Result<(), BackendError> {
        // A unit that takes its time to stop holds the loop, as a real one does.
        if unit == "slow.service" {
            std::thread::sleep(Duration::from_millis(700));
        }
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

struct Harness {
    dir: PathBuf,
    cfg: Config,
    handle: Option<Handle>,
    thread: Option<JoinHandle<Result<(), SupervisorError>>>,
}

impl Harness {
    fn start(name: &str) -> Harness {
        Harness::start_with(name, |_| {})
    }

    fn start_with(name: &str, tweak: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vg-attack3-{name}-"))
            .tempdir()
            .unwrap()
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cfg = Config::default();
        cfg.control.socket = dir.join("control.sock");
        cfg.control.tokens_file = dir.join("lib").join("tokens.json");
        cfg.audit.path = dir.join("audit.jsonl");
        cfg.auth.state_path = dir.join("lib").join("lockout.json");
        cfg.audit.tpm_anchor = false;
        cfg.vault.state_path = dir.join("state.json");
        tweak(&mut cfg);
        let opts = Options {
            state_file: dir.join("state.json"),
            ..Options::default()
        };
        let sup = Supervisor::new(&cfg, Box::new(Fake::unlocked()), opts).unwrap();
        let handle = Some(sup.handle());
        let thread = Some(std::thread::spawn(move || sup.run()));
        Harness {
            dir,
            cfg,
            handle,
            thread,
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.cfg.control.socket).unwrap();
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

    fn wakeups(&self) -> u64 {
        self.handle.as_ref().unwrap().wakeups()
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

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "root tier: the passphrase cache is root's user keyring; run as root"
    );
}

// ---------------------------------------------------------------- attacks

/// Attack: type the passphrase at boot (it lands in root's user keyring as
/// systemd's `cryptsetup` cache for 150 s), then lock, e.g. right before suspend.
/// The lock stopped, unmounted, closed and revoked the volume key, but left the
/// passphrase itself readable in the keyring (`keyctl pipe %user:cryptsetup`),
/// in RAM through the suspend. Every lock now drops the cache.
#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn a_lock_drops_the_boot_passphrase_cache_from_roots_keyring() {
    require_root();
    let h = Harness::start("cache");
    let cached = "typed at boot 4f1c";
    let _ = vaultguard::keyring::cache::forget("cryptsetup");
    vaultguard::keyring::cache::push("cryptsetup", cached.as_bytes()).unwrap();
    assert_eq!(
        vaultguard::keyring::cache::lookup("cryptsetup")
            .unwrap()
            .len(),
        1
    );
    let v = h.ask(r#"{"cmd":"lock","reason":"suspend"}"#);
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["state"], "locked", "{v}");
    let left = vaultguard::keyring::cache::lookup("cryptsetup").unwrap();
    assert!(
        left.is_empty(),
        "the lock left {} cached passphrase(s) in root's keyring",
        left.len()
    );
    // A lock of a vault already locked sweeps again.
    vaultguard::keyring::cache::push("cryptsetup", cached.as_bytes()).unwrap();
    let v = h.ask(r#"{"cmd":"lock"}"#);
    assert_eq!(v["success"], true, "{v}");
    assert!(vaultguard::keyring::cache::lookup("cryptsetup")
        .unwrap()
        .is_empty());
}

/// Read event lines until one whose `event` is `want` (bounded).
fn until_event(s: &mut UnixStream, want: &str) -> Option<Value> {
    for _ in 0..64 {
        let v: Value = serde_json::from_str(&read_line(s)?).unwrap();
        if v["event"] == want {
            return Some(v);
        }
    }
    None
}

/// Attack: subscribe the way shell tools do, `printf '{"cmd":"watch"}\n' | nc -N -U
/// sock` or socat: the request, then a half-close (no more requests). The
/// supervisor took the end of input as the end of the connection and dropped the
/// watcher after its first line, so no event ever reached it. A watcher's end of
/// input now only means it sends nothing more: the stream goes on, without the
/// loop spinning on the readable EOF, until the peer closes.
#[test]
fn a_watcher_that_half_closes_keeps_its_stream() {
    let h = Harness::start("halfclose");
    let mut w = h.connect();
    w.write_all(b"{\"cmd\":\"watch\"}\n").unwrap();
    let first: Value = serde_json::from_str(&read_line(&mut w).unwrap()).unwrap();
    assert_eq!(first["event"], "state", "{first}");
    w.shutdown(std::net::Shutdown::Write).unwrap();
    // The loop must not spin on the EOF: a few wake-ups at most while idle.
    std::thread::sleep(Duration::from_millis(200));
    let before = h.wakeups();
    std::thread::sleep(Duration::from_millis(500));
    let idle = h.wakeups() - before;
    assert!(
        idle <= 2,
        "{idle} wake-ups in 0.5 s with a half-closed watcher"
    );
    let v = h.ask(r#"{"cmd":"lock","reason":"incident:IR-7"}"#);
    assert_eq!(v["success"], true, "{v}");
    let ev = until_event(&mut w, "lock").expect("the half-closed watcher got no `lock` event");
    assert_eq!(ev["reason"], "incident:IR-7", "{ev}");
    // When the peer closes for good, the supervisor lets it go (no leak of a slot
    // or of wake-ups).
    drop(w);
    std::thread::sleep(Duration::from_millis(200));
    let before = h.wakeups();
    std::thread::sleep(Duration::from_millis(500));
    assert!(h.wakeups() - before <= 2);
    assert_eq!(h.ask(r#"{"cmd":"status"}"#)["state"], "locked");
}

/// Attack: subscribe in the same turn of the loop as another client's request
/// that makes events. The first line (the current state) carried the seq of the
/// newest event, and then that very event (and those before it in the turn)
/// arrived again: a repeated seq, and a `state` line older than the first. Now
/// a watcher gets only events numbered after its first line.
#[test]
fn a_watcher_subscribing_with_other_requests_sees_no_seq_twice() {
    let h = Harness::start_with("seq", |c| c.vault.services = vec!["slow.service".into()]);
    // Three clients, accepted in this order while the supervisor is idle.
    let mut a = h.connect();
    let mut b = h.connect();
    let mut c = h.connect();
    for s in [&mut a, &mut b, &mut c] {
        assert!(Harness::ask_on(s, r#"{"cmd":"status"}"#)["state"].is_string());
    }
    // C's lock holds the loop (slow.service stops for 0.7 s); meanwhile A asks
    // for a lock too (an event: already_locked) and B subscribes, so both are
    // served in the next turn, A first.
    c.write_all(b"{\"cmd\":\"lock\"}\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    a.write_all(b"{\"cmd\":\"lock\",\"reason\":\"incident:IR-9\"}\n")
        .unwrap();
    b.write_all(b"{\"cmd\":\"watch\"}\n").unwrap();
    let first: Value = serde_json::from_str(&read_line(&mut b).unwrap()).unwrap();
    assert_eq!(first["event"], "state", "{first}");
    let seq0 = first["seq"].as_u64().unwrap();
    assert_eq!(
        Harness::ask_on(&mut c, r#"{"cmd":"status"}"#)["state"],
        "locked"
    );
    // One more event, from a fresh request: the next line B reads must be it.
    let v = h.ask(r#"{"cmd":"lock","reason":"incident:IR-10"}"#);
    assert_eq!(v["success"], true, "{v}");
    let next: Value = serde_json::from_str(&read_line(&mut b).unwrap()).unwrap();
    assert_eq!(
        next["seq"].as_u64(),
        Some(seq0 + 1),
        "after a first line with seq {seq0} came {next}"
    );
    assert_eq!(next["reason"], "incident:IR-10", "{next}");
}
