//! The supervisor's metrics (issue 17, item 6), read the way Prometheus reads
//! them: `{"cmd":"metrics"}`, `vaultguard metrics` and the textfile in
//! `metrics.textfile_dir`, each parsed by the Prometheus client library's own text
//! parser (`prometheus_client.parser.text_string_to_metric_families`, Debian's
//! python3-prometheus-client, installed by qemu-tests/setup-host.sh), with the
//! counters asserted to move by exactly one per unlock, lock and failed attempt.

mod common;

use common::read_line;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vaultguard::config::Config;
use vaultguard::secret::SecretBytes;
use vaultguard::supervisor::{BackendError, Options, Reality, Supervisor, VaultBackend};

const PASS: &str = "correct horse";

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
        Ok(1)
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

/// Samples as `name{k="v",...}` -> value, from Prometheus's own parser; the
/// parser also rejects anything that is not the text format.
fn parse(text: &str) -> BTreeMap<String, f64> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    assert fam.documentation, fam.name + " has no HELP"
    for s in fam.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
    out["__type__" + fam.name] = {"counter": 1, "gauge": 2}.get(fam.type, 0)
print(json.dumps(out))
"#;
    // Debian's interpreter, where python3-prometheus-client installs (a python3
    // earlier on PATH, such as pyenv's, would not see it).
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the metrics (is python3-prometheus-client installed?): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

struct Sup {
    dir: PathBuf,
    cfg: Config,
    handle: vaultguard::supervisor::Handle,
    thread: Option<std::thread::JoinHandle<Result<(), vaultguard::supervisor::SupervisorError>>>,
}

impl Sup {
    fn ask(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(&self.cfg.control.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        serde_json::from_str(&read_line(&mut s).unwrap()).unwrap()
    }

    fn metrics(&self) -> (String, BTreeMap<String, f64>) {
        let v = self.ask(r#"{"cmd":"metrics"}"#);
        assert_eq!(v["success"], true, "{v}");
        let text = v["metrics"].as_str().unwrap().to_string();
        let parsed = parse(&text);
        (text, parsed)
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(dir: PathBuf, hint: Option<&str>) -> Sup {
    let mut cfg = Config::default();
    cfg.control.socket = dir.join("control.sock");
    cfg.control.tokens_file = dir.join("tokens.json");
    cfg.audit.path = dir.join("audit.jsonl");
    cfg.audit.tpm_anchor = false;
    cfg.auth.state_path = dir.join("lockout.json");
    cfg.metrics.textfile_dir = Some(dir.join("textfile"));
    if let Some(method) = hint {
        // The boot path times its TPM unlock; other methods leave no figure.
        let tpm_s = (method == "tpm2_unseal").then_some(0.375);
        vaultguard::handoff::write_boot_hint(&dir.join("state.json"), "unlocked", method, tpm_s)
            .unwrap();
    }
    let opts = Options {
        state_file: dir.join("state.json"),
        ..Options::default()
    };
    let fake = Fake(Arc::new(Mutex::new((true, true))));
    let sup = Supervisor::new(&cfg, Box::new(fake), opts).unwrap();
    let handle = sup.handle();
    let thread = Some(std::thread::spawn(move || sup.run()));
    Sup {
        dir,
        cfg,
        handle,
        thread,
    }
}

fn tmpdir() -> PathBuf {
    let d = tempfile::Builder::new()
        .prefix("vg-metrics-")
        .tempdir()
        .unwrap()
        .keep();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or(&0.0)
}

fn unlock(p: &str) -> String {
    serde_json::json!({"cmd": "unlock", "passphrase": p}).to_string()
}

#[test]
fn counters_move_by_exactly_one_per_lock_unlock_and_failure() {
    let s = start(tmpdir(), Some("tpm2_unseal"));
    let (_, m0) = s.metrics();
    // The boot path's TPM unlock, from its hand-off, counted once, and timed.
    assert_eq!(get(&m0, "vaultguard_unlocks_total{method=\"tpm\"}"), 1.0);
    assert_eq!(get(&m0, "vaultguard_boot_tpm_unseal_seconds"), 0.375);
    assert_eq!(get(&m0, "vaultguard_vault_state{state=\"unlocked\"}"), 1.0);
    assert_eq!(get(&m0, "vaultguard_vault_state{state=\"locked\"}"), 0.0);
    assert_eq!(get(&m0, "__type__vaultguard_unlocks"), 1.0, "a counter");
    assert_eq!(get(&m0, "__type__vaultguard_vault_state"), 2.0, "a gauge");
    // Nothing is invented: no duration yet.
    assert!(!m0.contains_key("vaultguard_last_lock_duration_seconds"));

    assert_eq!(s.ask(r#"{"cmd":"lock"}"#)["success"], true);
    let (_, m1) = s.metrics();
    assert_eq!(
        get(&m1, "vaultguard_locks_total{reason=\"manual_lock\"}")
            - get(&m0, "vaultguard_locks_total{reason=\"manual_lock\"}"),
        1.0
    );
    assert_eq!(get(&m1, "vaultguard_vault_state{state=\"locked\"}"), 1.0);
    assert_eq!(get(&m1, "vaultguard_vault_state{state=\"unlocked\"}"), 0.0);
    assert!(m1.contains_key("vaultguard_last_lock_duration_seconds"));

    assert_eq!(s.ask(&unlock("wrong"))["success"], false);
    let (_, m2) = s.metrics();
    assert_eq!(
        get(&m2, "vaultguard_failed_unlocks_total") - get(&m1, "vaultguard_failed_unlocks_total"),
        1.0
    );
    assert_eq!(get(&m2, "vaultguard_vault_state{state=\"locked\"}"), 1.0);

    assert_eq!(s.ask(&unlock(PASS))["success"], true);
    let (text, m3) = s.metrics();
    assert_eq!(
        get(&m3, "vaultguard_unlocks_total{method=\"passphrase\"}")
            - get(&m2, "vaultguard_unlocks_total{method=\"passphrase\"}"),
        1.0
    );
    assert_eq!(get(&m3, "vaultguard_unlocks_total{method=\"tpm\"}"), 1.0);
    assert_eq!(get(&m3, "vaultguard_vault_state{state=\"unlocked\"}"), 1.0);
    let d = get(&m3, "vaultguard_last_unlock_duration_seconds");
    assert!(m3.contains_key("vaultguard_last_unlock_duration_seconds") && (0.0..5.0).contains(&d));
    // Exactly one state is current.
    let current: f64 = m3
        .iter()
        .filter(|(k, _)| k.starts_with("vaultguard_vault_state{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(current, 1.0);

    // The textfile was rewritten on the change, atomically, readable by a
    // node-exporter running as its own user; it says what the socket says.
    let tf = s.dir.join("textfile").join("vaultguard.prom");
    let meta = std::fs::metadata(&tf).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert_eq!(parse(&std::fs::read_to_string(&tf).unwrap()), m3);
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.join("textfile"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // `vaultguard metrics` prints the same exposition.
    let cfg_path = s.dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string(&s.cfg).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("metrics")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(parse(&printed), parse(&text));
}

#[test]
fn status_reads_change_no_metric_and_do_not_rewrite_the_textfile() {
    let s = start(tmpdir(), None);
    let tf = s.dir.join("textfile").join("vaultguard.prom");
    let before = std::fs::metadata(&tf).unwrap();
    // No TPM boot in the hand-off: no TPM latency is invented.
    assert!(!std::fs::read_to_string(&tf).unwrap().contains("unseal"));
    for _ in 0..50 {
        assert!(s.ask(r#"{"cmd":"status"}"#)["state"].is_string());
    }
    let after = std::fs::metadata(&tf).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec()),
        "the textfile was rewritten without a change"
    );
    // A found-unlocked vault (no hand-off) is not counted as an unlock.
    let (_, m) = s.metrics();
    assert!(
        !m.keys().any(|k| k.starts_with("vaultguard_unlocks_total{")),
        "{m:?}"
    );
}
