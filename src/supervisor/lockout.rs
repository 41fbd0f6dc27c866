//! Failed-unlock lockout: after `auth.max_failed_attempts` wrong passphrases from one
//! identity (uid), refuse that identity for `auth.lockout_duration`; once its lockouts
//! repeat, for `auth.escalated_lockout`. Beside the per-identity counters a global
//! ceiling ([`GLOBAL_FACTOR`] times as many failures, from anyone) locks out every
//! identity but root, so many colluding uids cannot brute-force in parallel, while one
//! low-privilege user cannot lock root out. A correct passphrase clears the
//! identity's counter and the global one.
//!
//! Running deadlines are CLOCK_BOOTTIME milliseconds: stepping the wall clock cannot
//! shorten or stretch them. They are persisted (root-only 0600, written atomically)
//! at `auth.state_path` as wall-clock seconds so that a restart does not grant fresh
//! tries; on load, and on every check, a deadline is capped at its configured length,
//! so a far-future time (a tampered file, a clock stepped back) ends like any other.
//! This module only counts; it never sees a passphrase.

use crate::atomic_file::write_atomic;
use crate::config::AuthConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The global ceiling is this many times `auth.max_failed_attempts`.
pub const GLOBAL_FACTOR: u32 = 4;

/// Identities remembered at most; beyond it, those neither locked out nor holding
/// lockouts are forgotten first (a flood of uids cannot grow the file without bound).
pub const MAX_IDENTITIES: usize = 1024;

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

    fn threshold(&self, scope: Scope) -> u32 {
        match scope {
            Scope::Identity(_) => self.max_failed,
            Scope::Global => self.max_failed.saturating_mul(GLOBAL_FACTOR),
        }
    }
}

/// Whose counter a lockout belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Identity(u32),
    Global,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Identity(uid) => write!(f, "uid {uid}"),
            Scope::Global => write!(f, "all users (global ceiling)"),
        }
    }
}

/// One counter, running: `until_ms` is a CLOCK_BOOTTIME deadline (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    /// Wrong passphrases since the last lockout or success.
    pub failures: u32,
    /// Lockouts since the last success (the second and later are escalated).
    pub lockouts: u32,
    until_ms: u64,
}

impl Counter {
    fn remaining_ms(&self, policy: &Policy, now_ms: u64) -> Option<u64> {
        if self.until_ms <= now_ms {
            return None;
        }
        let cap = policy.length_of(self.lockouts.max(1)).saturating_mul(1000);
        Some((self.until_ms - now_ms).min(cap))
    }

    fn is_clear(&self) -> bool {
        self.failures == 0 && self.lockouts == 0 && self.until_ms == 0
    }

    /// Count a failure; the lockout length (s) if it triggered one.
    fn fail(&mut self, policy: &Policy, scope: Scope, now_ms: u64) -> Option<u64> {
        self.failures = self.failures.saturating_add(1);
        if self.failures < policy.threshold(scope) {
            return None;
        }
        self.failures = 0;
        self.lockouts = self.lockouts.saturating_add(1);
        let len = policy.length_of(self.lockouts);
        self.until_ms = now_ms.saturating_add(len.saturating_mul(1000));
        Some(len)
    }

    fn to_file(self, policy: &Policy, now_ms: u64, wall_s: u64) -> CounterFile {
        let locked_until = match self.remaining_ms(policy, now_ms) {
            Some(ms) => wall_s.saturating_add(ms.div_ceil(1000)),
            None => 0,
        };
        CounterFile {
            failures: self.failures,
            lockouts: self.lockouts,
            locked_until,
        }
    }

    fn from_file(f: &CounterFile, policy: &Policy, now_ms: u64, wall_s: u64) -> Counter {
        let until_ms = if f.locked_until > wall_s {
            // Capped here, not only when reported: an end beyond the configured
            // length (tampering, a clock stepped back) must still come.
            let cap = policy.length_of(f.lockouts.max(1));
            let secs = (f.locked_until - wall_s).min(cap);
            now_ms.saturating_add(secs.saturating_mul(1000))
        } else {
            0
        };
        Counter {
            failures: f.failures,
            lockouts: f.lockouts,
            until_ms,
        }
    }
}

/// One counter as persisted: wall-clock seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterFile {
    pub failures: u32,
    pub lockouts: u32,
    /// Wall-clock second until which unlocks are refused (0: not locked out).
    pub locked_until: u64,
}

/// The file at `auth.state_path`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutFile {
    pub global: CounterFile,
    /// Keyed by uid (decimal, as JSON keys must be strings).
    #[serde(default)]
    pub identities: BTreeMap<String, CounterFile>,
}

/// What a failure led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Triggered {
    pub scope: Scope,
    pub seconds: u64,
    pub lockouts: u32,
}

/// The running counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lockout {
    pub global: Counter,
    pub identities: BTreeMap<u32, Counter>,
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

/// Largest lockout file read (a flood of identities is capped far below it).
const MAX_FILE: u64 = 256 * 1024;

impl Lockout {
    /// Milliseconds until `uid` may try again at `now_ms` (CLOCK_BOOTTIME), if locked
    /// out: its own lockout, or the global one (which root is not subject to).
    pub fn remaining_ms(&self, policy: &Policy, uid: u32, now_ms: u64) -> Option<u64> {
        let own = self
            .identities
            .get(&uid)
            .and_then(|c| c.remaining_ms(policy, now_ms));
        let global = (uid != 0)
            .then(|| self.global.remaining_ms(policy, now_ms))
            .flatten();
        own.max(global)
    }

    /// [`Lockout::remaining_ms`] in whole seconds, rounded up.
    pub fn remaining(&self, policy: &Policy, uid: u32, now_ms: u64) -> Option<u64> {
        self.remaining_ms(policy, uid, now_ms)
            .map(|ms| ms.div_ceil(1000))
    }

    /// Seconds of the global lockout, if one runs (for the state file).
    pub fn global_remaining(&self, policy: &Policy, now_ms: u64) -> Option<u64> {
        self.global
            .remaining_ms(policy, now_ms)
            .map(|ms| ms.div_ceil(1000))
    }

    /// Milliseconds until the latest running lockout (any identity, or global) ends.
    pub fn latest_end_ms(&self, policy: &Policy, now_ms: u64) -> Option<u64> {
        self.identities
            .values()
            .chain(std::iter::once(&self.global))
            .filter_map(|c| c.remaining_ms(policy, now_ms))
            .max()
    }

    /// Wrong passphrases `uid` gave since its last lockout or success.
    pub fn failures_of(&self, uid: u32) -> u32 {
        self.identities.get(&uid).map_or(0, |c| c.failures)
    }

    /// Count a wrong passphrase from `uid`; returns the lockouts it triggered
    /// (its own first, then the global one).
    pub fn record_failure(&mut self, policy: &Policy, uid: u32, now_ms: u64) -> Vec<Triggered> {
        let mut out = Vec::new();
        self.make_room(uid, now_ms, policy);
        let own = self.identities.entry(uid).or_default();
        if let Some(seconds) = own.fail(policy, Scope::Identity(uid), now_ms) {
            out.push(Triggered {
                scope: Scope::Identity(uid),
                seconds,
                lockouts: own.lockouts,
            });
        }
        if let Some(seconds) = self.global.fail(policy, Scope::Global, now_ms) {
            out.push(Triggered {
                scope: Scope::Global,
                seconds,
                lockouts: self.global.lockouts,
            });
        }
        out
    }

    /// A correct passphrase from `uid`: its counter and the global one start over.
    pub fn record_success(&mut self, uid: u32) {
        self.identities.remove(&uid);
        self.global = Counter::default();
    }

    pub fn is_clear(&self) -> bool {
        self.global.is_clear() && self.identities.is_empty()
    }

    /// Keep the map bounded: forget clear or expired-and-unescalated identities
    /// first, then the oldest-numbered ones without a running lockout.
    fn make_room(&mut self, uid: u32, now_ms: u64, policy: &Policy) {
        if self.identities.len() < MAX_IDENTITIES || self.identities.contains_key(&uid) {
            return;
        }
        self.identities
            .retain(|_, c| !c.is_clear() && (c.lockouts > 0 || c.failures > 1));
        if self.identities.len() >= MAX_IDENTITIES {
            let victim = self
                .identities
                .iter()
                .find(|(_, c)| c.remaining_ms(policy, now_ms).is_none())
                .or_else(|| self.identities.iter().next())
                .map(|(u, _)| *u);
            if let Some(v) = victim {
                self.identities.remove(&v);
            }
        }
    }

    /// As persisted at `now`.
    pub fn to_file(&self, policy: &Policy, now_ms: u64, wall_s: u64) -> LockoutFile {
        LockoutFile {
            global: self.global.to_file(policy, now_ms, wall_s),
            identities: self
                .identities
                .iter()
                .map(|(u, c)| (u.to_string(), c.to_file(policy, now_ms, wall_s)))
                .collect(),
        }
    }

    /// From the persisted form, every deadline capped at its configured length.
    pub fn from_file(f: &LockoutFile, policy: &Policy, now_ms: u64, wall_s: u64) -> Lockout {
        let mut identities = BTreeMap::new();
        for (k, c) in &f.identities {
            // A key that is not a uid cannot come from us; it counts globally.
            if let Ok(uid) = k.parse::<u32>() {
                identities.insert(uid, Counter::from_file(c, policy, now_ms, wall_s));
            }
        }
        Lockout {
            global: Counter::from_file(&f.global, policy, now_ms, wall_s),
            identities,
        }
    }

    /// Load from `path`; a missing file is a clean slate. A damaged file is an
    /// error: the caller then fails closed with one ordinary lockout, since a file
    /// that only root writes, atomically, was damaged by tampering or a disk fault.
    /// The format before per-identity counters (one flat counter) is read as the
    /// global counter.
    pub fn load(path: &Path) -> Result<LockoutFile, LockoutError> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LockoutFile::default()),
            Err(err) => {
                return Err(LockoutError::Read {
                    path: path.into(),
                    err,
                })
            }
        };
        let mut text = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut text)
            .map_err(|err| LockoutError::Read {
                path: path.into(),
                err,
            })?;
        let parse_err = |msg: String| LockoutError::Parse {
            path: path.into(),
            msg,
        };
        if text.len() as u64 > MAX_FILE {
            return Err(parse_err(format!("larger than {MAX_FILE} bytes")));
        }
        match serde_json::from_slice::<LockoutFile>(&text) {
            Ok(f) => Ok(f),
            Err(e) => match serde_json::from_slice::<CounterFile>(&text) {
                Ok(old) => Ok(LockoutFile {
                    global: old,
                    identities: BTreeMap::new(),
                }),
                Err(_) => Err(parse_err(e.to_string())),
            },
        }
    }

    /// Write `file` to `path` atomically, mode 0600 (directory created 0700).
    pub fn save(file: &LockoutFile, path: &Path) -> Result<(), LockoutError> {
        let mut text = serde_json::to_vec(file).unwrap_or_default();
        text.push(b'\n');
        write_atomic(path, &text, 0o600, 0o700).map_err(|err| LockoutError::Write {
            path: path.into(),
            err,
        })
    }

    /// After a damaged or unreadable state file: one ordinary global lockout that
    /// also holds root, from now.
    pub fn fail_closed(policy: &Policy, now_ms: u64) -> Lockout {
        let mut l = Lockout::default();
        l.global.lockouts = 1;
        l.global.until_ms = now_ms.saturating_add(policy.duration_s.saturating_mul(1000));
        l.identities.insert(
            0,
            Counter {
                failures: 0,
                lockouts: 1,
                until_ms: l.global.until_ms,
            },
        );
        l
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
    const U: u32 = 1000;

    /// Seconds on CLOCK_BOOTTIME, as the machine passes them.
    fn s(secs: u64) -> u64 {
        secs * 1000
    }

    #[test]
    fn locks_out_after_max_failures() {
        let mut l = Lockout::default();
        assert!(l.record_failure(&P, U, s(1000)).is_empty());
        assert!(l.record_failure(&P, U, s(1001)).is_empty());
        assert_eq!(l.remaining(&P, U, s(1001)), None);
        let t = l.record_failure(&P, U, s(1002));
        assert_eq!(
            t,
            vec![Triggered {
                scope: Scope::Identity(U),
                seconds: 60,
                lockouts: 1
            }]
        );
        assert_eq!(l.remaining(&P, U, s(1002)), Some(60));
        assert_eq!(l.remaining(&P, U, s(1061)), Some(1));
        assert_eq!(l.remaining(&P, U, s(1062)), None);
    }

    #[test]
    fn repeated_lockouts_escalate_until_success() {
        let mut l = Lockout::default();
        for _ in 0..3 {
            l.record_failure(&P, U, 0);
        }
        assert_eq!(l.remaining(&P, U, 0), Some(60));
        assert!(l.record_failure(&P, U, s(100)).is_empty());
        assert!(l.record_failure(&P, U, s(100)).is_empty());
        assert_eq!(l.record_failure(&P, U, s(100))[0].seconds, 900);
        assert_eq!(l.remaining(&P, U, s(100)), Some(900));
        l.record_success(U);
        assert!(l.is_clear());
        for _ in 0..2 {
            l.record_failure(&P, U, s(5000));
        }
        assert_eq!(l.record_failure(&P, U, s(5000))[0].seconds, 60);
    }

    #[test]
    fn one_user_cannot_lock_out_another_or_root() {
        let mut l = Lockout::default();
        for _ in 0..3 {
            l.record_failure(&P, U, s(10));
        }
        assert_eq!(l.remaining(&P, U, s(10)), Some(60));
        assert_eq!(l.remaining(&P, 0, s(10)), None);
        assert_eq!(l.remaining(&P, 1001, s(10)), None);
    }

    #[test]
    fn the_global_ceiling_holds_everyone_but_root() {
        let mut l = Lockout::default();
        let mut triggered = Vec::new();
        // Four uids, three failures each: 12 = 3 x GLOBAL_FACTOR.
        for uid in 2000..2004 {
            for _ in 0..3 {
                triggered.extend(l.record_failure(&P, uid, s(10)));
            }
        }
        assert!(triggered.iter().any(|t| t.scope == Scope::Global));
        assert_eq!(l.remaining(&P, 3000, s(10)), Some(60));
        assert_eq!(l.global_remaining(&P, s(10)), Some(60));
        assert_eq!(l.remaining(&P, 0, s(10)), None);
    }

    #[test]
    fn a_clock_set_backwards_cannot_stretch_a_lockout() {
        let mut l = Lockout::default();
        for _ in 0..3 {
            l.record_failure(&P, U, s(100));
        }
        // Saved with a wall clock that later steps back by a year: the end is
        // capped at the configured length on load.
        let f = l.to_file(&P, s(100), 1_700_000_000);
        assert_eq!(f.identities["1000"].locked_until, 1_700_000_060);
        let back = Lockout::from_file(&f, &P, s(5), 1_700_000_000 - 365 * 86400);
        assert_eq!(back.remaining(&P, U, s(5)), Some(60));
        assert_eq!(back.remaining(&P, U, s(65)), None);
    }

    #[test]
    fn a_far_future_end_in_the_file_still_ends() {
        let f = LockoutFile {
            global: CounterFile {
                failures: 0,
                lockouts: 1,
                locked_until: u64::MAX,
            },
            identities: [(
                "1000".to_string(),
                CounterFile {
                    failures: 0,
                    lockouts: 7,
                    locked_until: u64::MAX,
                },
            )]
            .into(),
        };
        let l = Lockout::from_file(&f, &P, s(10), 1_700_000_000);
        assert_eq!(l.remaining(&P, 2000, s(10)), Some(60));
        assert_eq!(l.remaining(&P, U, s(10)), Some(900));
        assert_eq!(l.remaining(&P, U, s(910)), None);
        assert_eq!(l.remaining(&P, 2000, s(70)), None);
    }

    #[test]
    fn the_identity_map_stays_bounded() {
        let mut l = Lockout::default();
        for uid in 0..(MAX_IDENTITIES as u32 * 3) {
            l.record_failure(&P, 10_000 + uid, s(1));
        }
        assert!(l.identities.len() <= MAX_IDENTITIES);
    }

    #[test]
    fn persists_root_only_and_survives_reload() {
        let dir = crate::testutil::TmpDir::new("lockout");
        let path = dir.join("sub").join("lockout.json");
        assert_eq!(Lockout::load(&path).unwrap(), LockoutFile::default());
        let mut l = Lockout::default();
        for _ in 0..3 {
            l.record_failure(&P, U, s(500));
        }
        Lockout::save(&l.to_file(&P, s(500), 1_700_000_500), &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let back = Lockout::from_file(&Lockout::load(&path).unwrap(), &P, s(7), 1_700_000_530);
        assert_eq!(back.remaining(&P, U, s(7)), Some(30));
        std::fs::write(&path, b"{garbage").unwrap();
        assert!(matches!(
            Lockout::load(&path),
            Err(LockoutError::Parse { .. })
        ));
        // The flat format of earlier versions is the global counter.
        std::fs::write(
            &path,
            br#"{"failures":1,"lockouts":1,"locked_until":1700000540}"#,
        )
        .unwrap();
        let old = Lockout::from_file(&Lockout::load(&path).unwrap(), &P, s(7), 1_700_000_530);
        assert_eq!(old.remaining(&P, U, s(7)), Some(10));
        assert_eq!(old.remaining(&P, 0, s(7)), None);
    }
}
