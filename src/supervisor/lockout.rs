//! Failed-unlock lockout: after `auth.max_failed_attempts` wrong passphrases, refuse
//! for `auth.lockout_duration`; once lockouts repeat, for `auth.escalated_lockout`.
//! A correct passphrase clears everything.
//!
//! The counters are persisted (root-only 0600, written atomically) at
//! `auth.state_path` so that restarting the supervisor does not grant fresh tries.
//! Times are wall-clock seconds because they must survive a reboot; a clock set
//! backwards can never stretch a lockout beyond its configured length. This module
//! only counts; it never sees a passphrase.

use super::state_file::write_atomic;
use crate::config::AuthConfig;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_failed: u32,
    pub duration_s: u64,
    pub escalated_s: u64,
}

impl Policy {
    pub fn from_config(auth: &AuthConfig) -> Policy {
        Policy {
            max_failed: auth.max_failed_attempts.max(1),
            duration_s: auth.lockout_duration,
            escalated_s: auth.escalated_lockout.max(auth.lockout_duration),
        }
    }

    fn length_of(&self, lockout_number: u32) -> u64 {
        if lockout_number > 1 {
            self.escalated_s
        } else {
            self.duration_s
        }
    }
}

/// The persisted counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lockout {
    /// Wrong passphrases since the last lockout or success.
    pub failures: u32,
    /// Lockouts since the last success (the second and later are escalated).
    pub lockouts: u32,
    /// Wall-clock second until which unlocks are refused (0: not locked out).
    pub locked_until: u64,
}

#[derive(Debug)]
pub enum LockoutError {
    Read { path: PathBuf, err: std::io::Error },
    Parse { path: PathBuf, msg: String },
    Write { path: PathBuf, err: std::io::Error },
}

impl fmt::Display for LockoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockoutError::Read { path, err } => {
                write!(f, "cannot read lockout state {}: {err}", path.display())
            }
            LockoutError::Parse { path, msg } => write!(
                f,
                "lockout state {} is damaged ({msg}); treating the vault as locked out",
                path.display()
            ),
            LockoutError::Write { path, err } => write!(
                f,
                "cannot save lockout state {}: {err} (a restart would forget failed attempts)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for LockoutError {}

impl Lockout {
    /// Seconds until unlocks are allowed again, if locked out at `now_s`.
    pub fn remaining(&self, policy: &Policy, now_s: u64) -> Option<u64> {
        if self.locked_until <= now_s {
            return None;
        }
        let cap = policy.length_of(self.lockouts.max(1));
        Some((self.locked_until - now_s).min(cap))
    }

    /// Count a wrong passphrase; returns the lockout length if this one triggered it.
    pub fn record_failure(&mut self, policy: &Policy, now_s: u64) -> Option<u64> {
        self.failures = self.failures.saturating_add(1);
        if self.failures < policy.max_failed {
            return None;
        }
        self.failures = 0;
        self.lockouts = self.lockouts.saturating_add(1);
        let len = policy.length_of(self.lockouts);
        self.locked_until = now_s.saturating_add(len);
        Some(len)
    }

    pub fn record_success(&mut self) {
        *self = Lockout::default();
    }

    /// Load from `path`; a missing file is a clean slate. A damaged file is an
    /// error: the caller then fails closed with one ordinary lockout, since a file
    /// that only root writes, atomically, was damaged by tampering or a disk fault.
    pub fn load(path: &Path) -> Result<Lockout, LockoutError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lockout::default()),
            Err(err) => {
                return Err(LockoutError::Read {
                    path: path.into(),
                    err,
                })
            }
        };
        serde_json::from_slice(&text).map_err(|e| LockoutError::Parse {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    /// Write to `path` atomically, mode 0600 (directory created 0700).
    pub fn save(&self, path: &Path) -> Result<(), LockoutError> {
        let mut text = serde_json::to_vec(self).unwrap_or_default();
        text.push(b'\n');
        write_atomic(path, &text, 0o600, 0o700).map_err(|err| LockoutError::Write {
            path: path.into(),
            err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const P: Policy = Policy {
        max_failed: 3,
        duration_s: 60,
        escalated_s: 900,
    };

    #[test]
    fn locks_out_after_max_failures() {
        let mut l = Lockout::default();
        assert_eq!(l.record_failure(&P, 1000), None);
        assert_eq!(l.record_failure(&P, 1001), None);
        assert_eq!(l.remaining(&P, 1001), None);
        assert_eq!(l.record_failure(&P, 1002), Some(60));
        assert_eq!(l.remaining(&P, 1002), Some(60));
        assert_eq!(l.remaining(&P, 1061), Some(1));
        assert_eq!(l.remaining(&P, 1062), None);
    }

    #[test]
    fn repeated_lockouts_escalate_until_success() {
        let mut l = Lockout::default();
        for _ in 0..3 {
            l.record_failure(&P, 0);
        }
        assert_eq!(l.remaining(&P, 0), Some(60));
        // After the first lockout expires, three more failures escalate.
        assert_eq!(l.record_failure(&P, 100), None);
        assert_eq!(l.record_failure(&P, 100), None);
        assert_eq!(l.record_failure(&P, 100), Some(900));
        assert_eq!(l.remaining(&P, 100), Some(900));
        // And stay escalated.
        for _ in 0..2 {
            l.record_failure(&P, 2000);
        }
        assert_eq!(l.record_failure(&P, 2000), Some(900));
        l.record_success();
        assert_eq!(l, Lockout::default());
        for _ in 0..2 {
            l.record_failure(&P, 5000);
        }
        assert_eq!(l.record_failure(&P, 5000), Some(60));
    }

    #[test]
    fn clock_set_backwards_cannot_stretch_a_lockout() {
        let mut l = Lockout::default();
        for _ in 0..3 {
            l.record_failure(&P, 1_000_000);
        }
        assert_eq!(l.remaining(&P, 10), Some(60));
    }

    #[test]
    fn persists_root_only_and_survives_reload() {
        let dir = std::env::temp_dir().join(format!("vg-lockout-{}", std::process::id()));
        let path = dir.join("sub").join("lockout.json");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(Lockout::load(&path).unwrap(), Lockout::default());
        let mut l = Lockout::default();
        for _ in 0..3 {
            l.record_failure(&P, 500);
        }
        l.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let back = Lockout::load(&path).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.remaining(&P, 530), Some(30));
        std::fs::write(&path, b"{garbage").unwrap();
        assert!(matches!(
            Lockout::load(&path),
            Err(LockoutError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
