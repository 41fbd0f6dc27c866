//! The supervisor's metrics in the Prometheus text exposition format (version
//! 0.0.4), for `{"cmd":"metrics"}`, `vaultguard metrics` and, optionally, a
//! node-exporter textfile (`metrics.textfile_dir`/vaultguard.prom).
//!
//! Every counter is derived from what the machine's shell already sees: the
//! effects the decision core returns (the published state, the `unlock`, `lock`,
//! `unlock_failed` and `lockout` audit events), the gate's verdicts (rate limiting,
//! refused tokens) and the time a lock or unlock sequence took. Nothing is
//! threaded through the core. Counters start at zero when the supervisor starts,
//! as Prometheus expects of a process's counters; the boot path's unlock (the
//! method in its hand-off) is counted once at start.
//!
//! The TPM unseal latency comes from the boot path's hand-off (the state file's
//! `tpm_unseal_seconds`, written when the TPM opened the vault at boot); without
//! it the series is left out rather than invented.
//! Nothing here runs on a timer: the textfile is written when a value changes.

use super::machine::{Effect, Field};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Every state name the vault can be in; each gets a gauge (1 for the current).
const STATES: [&str; 9] = [
    "locked",
    "unlocked",
    "unknown",
    "locking",
    "unlocking",
    "locking_soon",
    "error",
    "setup_required",
    "not_available",
];

/// The file written in `metrics.textfile_dir`.
pub const TEXTFILE_NAME: &str = "vaultguard.prom";

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metrics {
    state: String,
    unlocks: BTreeMap<String, u64>,
    locks: BTreeMap<String, u64>,
    failed_unlocks: u64,
    lockouts: u64,
    rate_limited: BTreeMap<String, u64>,
    tokens_refused: BTreeMap<String, u64>,
    last_unlock_s: Option<f64>,
    last_lock_s: Option<f64>,
    /// The boot unlock's TPM path, from the hand-off.
    boot_tpm_unseal_s: Option<f64>,
    /// Something the textfile shows changed since it was last written.
    dirty: bool,
}

fn field<'a>(fields: &'a [(&'static str, Field)], key: &str) -> Option<&'a Field> {
    fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

fn str_field<'a>(fields: &'a [(&'static str, Field)], key: &str) -> Option<&'a str> {
    match field(fields, key) {
        Some(Field::Str(s)) => Some(s),
        _ => None,
    }
}

/// The boot path's method (its hand-off detail) as an unlock method label.
fn boot_method(detail: &str) -> Option<&'static str> {
    match detail {
        "tpm2_unseal" => Some("tpm"),
        "tpm2_pin" => Some("tpm_pin"),
        "keyfile" => Some("keyfile"),
        "passphrase" => Some("passphrase"),
        _ => None,
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_insert(0) += 1;
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            state: "unknown".into(),
            dirty: true,
            ..Metrics::default()
        }
    }

    /// Count what one effect says happened.
    pub fn observe(&mut self, e: &Effect) {
        match e {
            Effect::Publish(snap) if snap.state != self.state => {
                self.state = snap.state.clone();
                self.dirty = true;
            }
            Effect::Audit { event, fields } => {
                match *event {
                    "unlock" => {
                        let m = str_field(fields, "method").unwrap_or("unknown");
                        bump(&mut self.unlocks, m);
                    }
                    "supervisor_start" => {
                        let boot = (str_field(fields, "state") == Some("unlocked"))
                            .then(|| str_field(fields, "detail").and_then(boot_method))
                            .flatten();
                        match boot {
                            Some(m) => bump(&mut self.unlocks, m),
                            None => return,
                        }
                    }
                    "lock" => {
                        let r = str_field(fields, "reason").unwrap_or("unknown");
                        // One series for all incidents: a label value per incident
                        // id would grow the exposition without bound (the id is in
                        // the audit log and the events).
                        let r = if r.starts_with("incident:") {
                            "incident"
                        } else {
                            r
                        };
                        bump(&mut self.locks, r);
                    }
                    "unlock_failed" => self.failed_unlocks += 1,
                    "lockout" => self.lockouts += 1,
                    _ => return,
                }
                self.dirty = true;
            }
            _ => {}
        }
    }

    /// One request refused for its identity's rate. Not marked dirty: a flood
    /// must not rewrite the textfile per request; the next change carries it.
    pub fn rate_limited(&mut self, identity: &str) {
        bump(&mut self.rate_limited, identity);
    }

    /// Something worth a textfile write that no effect shows (the start of a run
    /// of rate-limited requests, audited: the counts so far go out with it).
    pub fn mark_changed(&mut self) {
        self.dirty = true;
    }

    pub fn token_refused(&mut self, reason: &str) {
        bump(&mut self.tokens_refused, reason);
    }

    pub fn unlock_took(&mut self, secs: f64) {
        self.last_unlock_s = Some(secs);
        self.dirty = true;
    }

    pub fn lock_took(&mut self, secs: f64) {
        self.last_lock_s = Some(secs);
        self.dirty = true;
    }

    /// Did anything the textfile shows change since the last call?
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The boot path's TPM unseal took `secs` (from its hand-off).
    pub fn boot_tpm_unseal(&mut self, secs: f64) {
        if secs.is_finite() && secs >= 0.0 {
            self.boot_tpm_unseal_s = Some(secs);
            self.dirty = true;
        }
    }

    /// The text exposition format: HELP and TYPE before each family.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(2048);
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };
        head(
            &mut o,
            "vaultguard_vault_state",
            "gauge",
            "The vault's state: 1 for the current state, 0 for the others.",
        );
        let mut states: Vec<&str> = STATES.to_vec();
        if !states.contains(&self.state.as_str()) {
            states.push(&self.state);
        }
        for s in states {
            let _ = writeln!(
                o,
                "vaultguard_vault_state{{state=\"{}\"}} {}",
                label(s),
                u8::from(s == self.state)
            );
        }
        let family =
            |o: &mut String, name: &str, help: &str, lbl: &str, m: &BTreeMap<String, u64>| {
                head(o, name, "counter", help);
                for (k, v) in m {
                    let _ = writeln!(o, "{name}{{{lbl}=\"{}\"}} {v}", label(k));
                }
            };
        family(
            &mut o,
            "vaultguard_unlocks_total",
            "Unlocks since the supervisor started, by method (the boot path's included).",
            "method",
            &self.unlocks,
        );
        family(
            &mut o,
            "vaultguard_locks_total",
            "Locks since the supervisor started, by reason.",
            "reason",
            &self.locks,
        );
        head(
            &mut o,
            "vaultguard_failed_unlocks_total",
            "counter",
            "Failed unlock attempts (wrong passphrase or device error).",
        );
        let _ = writeln!(o, "vaultguard_failed_unlocks_total {}", self.failed_unlocks);
        head(
            &mut o,
            "vaultguard_lockouts_total",
            "counter",
            "Lockouts begun after too many failed unlock attempts.",
        );
        let _ = writeln!(o, "vaultguard_lockouts_total {}", self.lockouts);
        family(
            &mut o,
            "vaultguard_rate_limited_requests_total",
            "Requests refused by the per-identity rate limit, by identity.",
            "identity",
            &self.rate_limited,
        );
        family(
            &mut o,
            "vaultguard_tokens_refused_total",
            "Requests whose bearer token was refused, by reason.",
            "reason",
            &self.tokens_refused,
        );
        if let Some(s) = self.last_unlock_s {
            head(
                &mut o,
                "vaultguard_last_unlock_duration_seconds",
                "gauge",
                "How long the last successful unlock over the socket took.",
            );
            let _ = writeln!(o, "vaultguard_last_unlock_duration_seconds {s:.6}");
        }
        if let Some(s) = self.last_lock_s {
            head(
                &mut o,
                "vaultguard_last_lock_duration_seconds",
                "gauge",
                "How long the last successful lock took.",
            );
            let _ = writeln!(o, "vaultguard_last_lock_duration_seconds {s:.6}");
        }
        if let Some(s) = self.boot_tpm_unseal_s {
            head(
                &mut o,
                "vaultguard_boot_tpm_unseal_seconds",
                "gauge",
                "How long this boot's TPM unlock took: TPM opened, key unsealed, keyslot opened.",
            );
            let _ = writeln!(o, "vaultguard_boot_tpm_unseal_seconds {s:.6}");
        }
        o
    }
}

/// A label value escaped as the text format requires (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::state_file::Snapshot;

    fn audit(event: &'static str, fields: Vec<(&'static str, Field)>) -> Effect {
        Effect::Audit { event, fields }
    }

    fn snap(state: &str) -> Effect {
        Effect::Publish(Snapshot {
            state: state.into(),
            detail: "x".into(),
            last_activity: None,
            auto_lock_at: None,
            lockout_until: None,
            updated: 0.0,
        })
    }

    #[test]
    fn effects_move_exactly_their_counters() {
        let mut m = Metrics::new();
        m.observe(&audit(
            "supervisor_start",
            vec![
                ("state", "unlocked".into()),
                ("detail", "tpm2_unseal".into()),
            ],
        ));
        m.observe(&snap("unlocked"));
        m.observe(&audit("lock", vec![("reason", "manual_lock".into())]));
        m.observe(&audit("lock", vec![("reason", "incident:INC-1".into())]));
        m.observe(&audit("lock", vec![("reason", "incident:INC-2".into())]));
        m.observe(&snap("locked"));
        m.observe(&audit("unlock_failed", vec![]));
        m.observe(&audit("lockout", vec![]));
        m.observe(&audit("unlock", vec![("method", "passphrase".into())]));
        m.observe(&audit("permission_denied", vec![]));
        m.rate_limited("token:ci");
        m.rate_limited("token:ci");
        m.lock_took(0.25);
        let t = m.render();
        for line in [
            "vaultguard_vault_state{state=\"locked\"} 1",
            "vaultguard_vault_state{state=\"unlocked\"} 0",
            "vaultguard_unlocks_total{method=\"tpm\"} 1",
            "vaultguard_unlocks_total{method=\"passphrase\"} 1",
            "vaultguard_locks_total{reason=\"manual_lock\"} 1",
            "vaultguard_locks_total{reason=\"incident\"} 2",
            "vaultguard_failed_unlocks_total 1",
            "vaultguard_lockouts_total 1",
            "vaultguard_rate_limited_requests_total{identity=\"token:ci\"} 2",
            "vaultguard_last_lock_duration_seconds 0.250000",
            "# TYPE vaultguard_unlocks_total counter",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in\n{t}");
        }
        // Unknown until known: no unlock duration, no TPM latency.
        assert!(!t.contains("last_unlock_duration"));
        assert!(!t.contains("unseal"));
        m.boot_tpm_unseal(0.125);
        m.boot_tpm_unseal(f64::NAN);
        let t = m.render();
        assert!(
            t.lines()
                .any(|l| l == "vaultguard_boot_tpm_unseal_seconds 0.125000"),
            "{t}"
        );
        assert!(t.contains("# TYPE vaultguard_boot_tpm_unseal_seconds gauge"));
    }

    #[test]
    fn a_found_unlocked_vault_is_not_an_unlock_and_labels_are_escaped() {
        let mut m = Metrics::new();
        m.observe(&audit(
            "supervisor_start",
            vec![
                ("state", "unlocked".into()),
                ("detail", "found_unlocked".into()),
            ],
        ));
        assert!(m.unlocks.is_empty());
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert!(m.take_dirty());
        assert!(!m.take_dirty());
        m.rate_limited("uid:5");
        assert!(!m.take_dirty(), "a flood must not rewrite the textfile");
    }
}
