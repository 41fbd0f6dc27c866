//! The supervisor's state machine: vault state and detail, the lock and unlock
//! sequences, authorisation of each request, the idle deadline and the lockout.
//!
//! Everything here is plain code over a [`VaultBackend`] and times passed in by the
//! caller ([`Now`]), so the sequences and their rollbacks are unit-tested with a
//! recording fake. After any failed sequence the state is re-derived from the
//! kernel (`probe`), so what `status` says is what is true, never what was hoped.
//! This module never touches sockets, clocks or devices itself.

use super::backend::{BackendError, Reality, VaultBackend};
use super::idle::{IdleEvent, IdleTimer};
use super::lockout::{Lockout, Policy, Scope};
use super::state_file::{self, Snapshot};
use super::{log_info, log_warn};
use crate::audit;
use crate::config::{Allow, Config};
use crate::control::protocol::{ProtocolError, Request, Response, StatusReply, UNLOCK_FAILED};
use crate::control::{authorise, Peer};
use crate::secret::SecretBytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long after a failed auto-lock (e.g. a busy mount) to try again.
pub const AUTO_LOCK_RETRY_MS: u64 = 60_000;

/// Denied requests from one uid are audited at most this often (the rest counted),
/// so an unprivileged user cannot flood the log.
const DENIAL_AUDIT_INTERVAL_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultState {
    Locked,
    Unlocked,
    Unknown,
    Locking,
    Unlocking,
}

impl VaultState {
    pub fn as_str(self) -> &'static str {
        match self {
            VaultState::Locked => "locked",
            VaultState::Unlocked => "unlocked",
            VaultState::Unknown => "unknown",
            VaultState::Locking => "locking",
            VaultState::Unlocking => "unlocking",
        }
    }

    fn of(r: Reality) -> VaultState {
        match (r.mapping_active, r.mounted) {
            (true, true) => VaultState::Unlocked,
            (false, false) => VaultState::Locked,
            _ => VaultState::Unknown,
        }
    }
}

/// The two clocks the machine needs: CLOCK_BOOTTIME for deadlines (counts suspend),
/// wall time for reports and for the persisted lockout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

impl Now {
    fn wall_s(self) -> u64 {
        self.wall_ms / 1000
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockReason {
    Manual,
    Idle,
}

impl LockReason {
    pub fn detail(self) -> &'static str {
        match self {
            LockReason::Manual => "manual_lock",
            LockReason::Idle => "auto_lock_idle",
        }
    }
}

/// What the machine needs from the configuration (and the test hooks).
#[derive(Debug, Clone)]
pub struct Settings {
    pub services: Vec<String>,
    /// Auto-lock after this much idle time; `None` disables.
    pub auto_lock_ms: Option<u64>,
    pub warn_before_ms: u64,
    pub policy: Policy,
    pub lockout_path: PathBuf,
    pub audit_path: Option<PathBuf>,
    /// Rotate the audit log past this size (0: never).
    pub audit_rotate_size: u64,
    /// The state file first, then the compatibility path if configured.
    pub state_files: Vec<PathBuf>,
    pub allow: BTreeMap<String, Allow>,
}

impl Settings {
    /// From the configuration. `auto_lock_override` is the test hook for
    /// sub-minute timeouts; the configuration only speaks whole minutes.
    pub fn from_config(
        cfg: &Config,
        state_file: &Path,
        auto_lock_override: Option<Duration>,
        warn_before: Duration,
    ) -> Settings {
        // Bounded like the configuration's own minutes, so that no deadline
        // arithmetic downstream can overflow.
        let max_ms = crate::config::MAX_AUTO_LOCK_MINUTES * 60_000;
        let auto_lock_ms = match auto_lock_override {
            Some(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => Some(cfg.vault.auto_lock_timeout.saturating_mul(60_000)),
        }
        .map(|ms| ms.min(max_ms))
        .filter(|&ms| ms > 0);
        let mut state_files = vec![state_file.to_path_buf()];
        if let Some(p) = &cfg.vault.state_compat_path {
            state_files.push(p.clone());
        }
        Settings {
            services: cfg.vault.services.clone(),
            auto_lock_ms,
            warn_before_ms: warn_before.as_millis() as u64,
            policy: Policy::from_config(&cfg.auth),
            lockout_path: cfg.auth.state_path.clone(),
            audit_path: Some(cfg.audit.path.clone()),
            audit_rotate_size: cfg.audit.rotate_size,
            state_files,
            allow: cfg.control.allow.clone(),
        }
    }
}

/// The state at start, from the kernel's view and the boot path's hint.
pub fn derive_state(
    reality: Result<Reality, &BackendError>,
    hint: Option<(String, String)>,
) -> (VaultState, String) {
    let r = match reality {
        Ok(r) => r,
        Err(_) => return (VaultState::Unknown, "probe_failed".into()),
    };
    let state = VaultState::of(r);
    let detail = match (state, hint) {
        (VaultState::Unknown, _) if r.mapping_active => "mapping_open_not_mounted".into(),
        (VaultState::Unknown, _) => "mounted_without_mapping".into(),
        // The hint is only believed when it agrees with the kernel.
        (s, Some((hs, hd))) if hs == s.as_str() && valid_detail(&hd) => hd,
        (VaultState::Unlocked, _) => "found_unlocked".into(),
        _ => "found_locked".into(),
    };
    (state, detail)
}

fn valid_detail(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 64
        && d.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

pub struct Machine {
    backend: Box<dyn VaultBackend>,
    s: Settings,
    state: VaultState,
    detail: String,
    idle: IdleTimer,
    lockout: Lockout,
    denied: BTreeMap<u32, (u64, u32)>,
    last_published: Option<Snapshot>,
    /// The last audit append's failure, until an append works again.
    audit_error: std::cell::RefCell<Option<String>>,
}

impl Machine {
    /// Derive the state from reality, load the lockout, audit the start and
    /// publish the state file.
    pub fn start(s: Settings, mut backend: Box<dyn VaultBackend>, now: Now) -> Machine {
        let hint = s.state_files.first().and_then(|p| state_file::read_hint(p));
        let reality = backend.probe();
        if let Err(e) = &reality {
            log_warn(&format!("cannot determine the vault's state: {e}"));
        }
        let (state, detail) = derive_state(reality.as_ref().copied(), hint);
        let lockout = match Lockout::load(&s.lockout_path) {
            Ok(f) => Lockout::from_file(&f, &s.policy, now.mono_ms, now.wall_s()),
            Err(e) => {
                log_warn(&format!(
                    "{e}: refusing unlocks for {} s",
                    s.policy.duration_s
                ));
                Lockout::fail_closed(&s.policy, now.mono_ms)
            }
        };
        let idle = IdleTimer::new(s.auto_lock_ms, s.warn_before_ms, now.mono_ms, now.wall_ms);
        let mut m = Machine {
            backend,
            s,
            state,
            detail,
            idle,
            lockout,
            denied: BTreeMap::new(),
            last_published: None,
            audit_error: Default::default(),
        };
        log_info(&format!(
            "supervising: vault {} ({}), auto-lock {}",
            m.state.as_str(),
            m.detail,
            match m.s.auto_lock_ms {
                Some(ms) => format!("after {} s idle", ms / 1000),
                None => "off".into(),
            }
        ));
        m.audit(
            "supervisor_start",
            &[
                ("state", m.state.as_str().into()),
                ("detail", m.detail.as_str().into()),
            ],
        );
        m.publish(now);
        m
    }

    pub fn state(&self) -> VaultState {
        self.state
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    fn armed(&self) -> bool {
        self.state == VaultState::Unlocked
    }

    /// When the caller must next call [`Machine::on_timer`] (CLOCK_BOOTTIME ms);
    /// `None`: nothing is scheduled.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.idle.next_wakeup(self.armed())
    }

    /// The state as `uid` sees it (its own lockout, or the global one).
    pub fn status(&self, uid: u32, now: Now) -> StatusReply {
        StatusReply {
            state: self.state.as_str(),
            detail: self.detail.clone(),
            idle_seconds: self.idle.idle_ms(now.mono_ms) / 1000,
            last_activity_ms: self.idle.last_activity_wall_ms(),
            lock_in_seconds: self
                .idle
                .remaining_ms(now.mono_ms, self.armed())
                .map(|ms| ms.div_ceil(1000)),
            lockout_seconds: self.lockout.remaining(&self.s.policy, uid, now.mono_ms),
        }
    }

    /// Activity from outside the socket (the activity file).
    pub fn activity(&mut self, now: Now) {
        self.idle.touch(now.mono_ms, now.wall_ms);
        self.publish(now);
    }

    /// Authorise and run one request from `peer`.
    pub fn handle(&mut self, peer: &Peer, req: Request, now: Now) -> Response {
        let cmd = req.name();
        if !authorise(&self.s.allow, cmd, peer) {
            self.audit_denied(peer, cmd, now);
            return Response::failed(
                &ProtocolError::PermissionDenied { uid: peer.uid, cmd }.to_string(),
                None,
            );
        }
        match req {
            // Reading the state is not activity: a dashboard polling status must
            // not keep the vault open forever.
            Request::Status => {
                let r = Response::status(&self.status(peer.uid, now));
                match self.audit_error.borrow().as_deref() {
                    Some(e) => r.with_audit_error(e),
                    None => r,
                }
            }
            Request::Keepalive => {
                self.activity(now);
                Response::ok(None)
            }
            Request::Lock => {
                self.idle.touch(now.mono_ms, now.wall_ms);
                self.lock(LockReason::Manual, Some(peer.uid), now)
            }
            Request::Unlock(passphrase) => self.unlock(&passphrase, peer.uid, now),
        }
    }

    /// The supervisor is stopping (the vault is left as it is).
    pub fn stopping(&mut self) {
        self.audit(
            "supervisor_stop",
            &[
                ("state", self.state.as_str().into()),
                ("detail", self.detail.as_str().into()),
            ],
        );
    }

    /// The idle timer fired (or the caller looked at the clock): warn or lock.
    pub fn on_timer(&mut self, now: Now) {
        match self.idle.check(now.mono_ms, self.armed()) {
            IdleEvent::Nothing => {}
            IdleEvent::Warn { in_ms } => log_warn(&format!(
                "vault idle for {} s: auto-lock in {} s unless there is activity",
                self.idle.idle_ms(now.mono_ms) / 1000,
                in_ms.div_ceil(1000)
            )),
            IdleEvent::Expired => {
                log_info(&format!(
                    "vault idle for {} s: locking",
                    self.idle.idle_ms(now.mono_ms) / 1000
                ));
                self.lock(LockReason::Idle, None, now);
                if self.state != VaultState::Locked {
                    log_warn(&format!(
                        "auto-lock failed; retrying in {} s",
                        AUTO_LOCK_RETRY_MS / 1000
                    ));
                    self.idle.retry_later(now.mono_ms, AUTO_LOCK_RETRY_MS);
                    self.publish(now);
                }
            }
        }
    }

    /// The lock sequence: stop services, sync, unmount, close, revoke keys.
    /// Never leaves the vault half-locked silently: a failure to unmount restarts
    /// what was stopped and the state is re-read from the kernel.
    pub fn lock(&mut self, reason: LockReason, uid: Option<u32>, now: Now) -> Response {
        let reality = match self.backend.probe() {
            Ok(r) => r,
            Err(e) => {
                return self.lock_failed(
                    reason,
                    uid,
                    now,
                    &format!("cannot determine the vault's state: {e}"),
                )
            }
        };
        if !reality.mapping_active && !reality.mounted {
            // Already locked; still make sure no key lingers.
            let _ = self.backend.revoke_keys();
            if self.state != VaultState::Locked {
                self.set(VaultState::Locked, reason.detail(), now);
            }
            return Response::ok(Some("locked"));
        }
        self.set(VaultState::Locking, &self.detail.clone(), now);

        let mut stopped = Vec::new();
        let mut stop_errors = Vec::new();
        for unit in self.s.services.clone() {
            match self.backend.stop_service(&unit) {
                Ok(()) => stopped.push(unit),
                Err(e) => {
                    log_warn(&format!("could not stop {unit}: {e}"));
                    stop_errors.push(e.to_string());
                }
            }
        }
        if reality.mounted {
            if let Err(e) = self.backend.sync() {
                log_warn(&format!("sync before unmount failed: {e}"));
            }
            if let Err(e) = self.backend.unmount() {
                let restart = self.start_services(&stopped);
                let mut msg = format!("cannot lock: {e}");
                if !stopped.is_empty() {
                    msg.push_str("; the stopped services were restarted");
                }
                if let Some(r) = restart {
                    msg.push_str(&format!(" ({r})"));
                }
                return self.lock_failed(reason, uid, now, &msg);
            }
        }
        if reality.mapping_active {
            if let Err(e) = self.backend.close_mapping() {
                // Unmounted but the key is still in the kernel: put things back as
                // they were rather than leave a vault that is neither.
                let mut msg = format!("cannot lock: closing the mapping failed: {e}");
                if reality.mounted {
                    match self.backend.mount() {
                        Ok(()) => {
                            if let Some(r) = self.start_services(&stopped) {
                                msg.push_str(&format!("; {r}"));
                            }
                            msg.push_str("; the vault was mounted again");
                        }
                        Err(me) => msg.push_str(&format!("; mounting it again failed too: {me}")),
                    }
                }
                return self.lock_failed(reason, uid, now, &msg);
            }
        }
        let revoke = self.backend.revoke_keys();
        self.set(VaultState::Locked, reason.detail(), now);
        let uid_field = uid.map(u64::from);
        let mut fields: Vec<(&str, audit::Value)> = vec![
            ("reason", reason.detail().into()),
            ("services_stopped", stopped.len().into()),
        ];
        if let Some(u) = uid_field {
            fields.push(("uid", u.into()));
        }
        if let Ok(n) = &revoke {
            fields.push(("keys_revoked", (*n).into()));
        }
        self.audit("lock", &fields);
        log_info(&format!("vault locked ({})", reason.detail()));
        match revoke {
            Ok(_) => Response::ok(Some("locked")),
            Err(e) => {
                let msg = format!(
                    "vault locked, but revoking its volume key from the kernel keyring failed: {e}"
                );
                log_warn(&msg);
                self.audit("key_revoke_failed", &[("error", msg.as_str().into())]);
                Response::failed(&msg, None).with_state("locked")
            }
        }
    }

    fn lock_failed(
        &mut self,
        reason: LockReason,
        uid: Option<u32>,
        now: Now,
        msg: &str,
    ) -> Response {
        self.resync("lock_incomplete", now);
        let msg = format!("{msg}; the vault is {}", self.state.as_str());
        log_warn(&msg);
        let mut fields: Vec<(&str, audit::Value)> = vec![
            ("reason", reason.detail().into()),
            ("state", self.state.as_str().into()),
            ("error", msg.as_str().into()),
        ];
        if let Some(u) = uid {
            fields.push(("uid", u.into()));
        }
        self.audit("lock_failed", &fields);
        Response::failed(&msg, None).with_state(self.state.as_str())
    }

    /// The unlock sequence: lockout check, the passphrase checked against a keyslot
    /// (whatever the mapping's state), activate, mount, start services.
    pub fn unlock(&mut self, passphrase: &SecretBytes, uid: u32, now: Now) -> Response {
        if let Some(wait) = self.lockout.remaining(&self.s.policy, uid, now.mono_ms) {
            self.audit(
                "unlock_refused",
                &[("uid", uid.into()), ("retry_after", wait.into())],
            );
            return Response::failed(
                &format!("too many failed unlock attempts; try again in {wait} s"),
                Some(wait),
            );
        }
        if passphrase.is_empty() {
            return Response::failed("empty passphrase", None);
        }
        if let Some(refusal) = self.audit_must_work() {
            log_warn(&refusal);
            return Response::failed(&refusal, None);
        }
        let reality = match self.backend.probe() {
            Ok(r) => r,
            Err(e) => {
                return Response::failed(&format!("cannot determine the vault's state: {e}"), None)
            }
        };
        let mut activated = false;
        if reality.mapping_active {
            // Open already (a lock whose close failed, a mount that failed at boot,
            // or an unlocked vault): activation would check nothing, so the
            // passphrase is checked against a keyslot on its own. Without this any
            // string would mount the vault, or keep it open as activity.
            match self.backend.verify_passphrase(passphrase) {
                Ok(()) => {}
                Err(BackendError::WrongPassphrase) => return self.wrong_passphrase(uid, now),
                Err(e) => {
                    let msg = format!("device error: {e}");
                    return self.unlock_failed(uid, "device_error", &msg, now);
                }
            }
            if reality.mounted {
                if self.state != VaultState::Unlocked {
                    self.set(VaultState::Unlocked, "found_unlocked", now);
                }
                self.record_success(uid, now);
                self.activity(now);
                return Response::ok(Some("unlocked"));
            }
            self.set(VaultState::Unlocking, &self.detail.clone(), now);
        } else {
            self.set(VaultState::Unlocking, &self.detail.clone(), now);
            match self.backend.activate(passphrase) {
                Ok(()) => activated = true,
                Err(BackendError::WrongPassphrase) => return self.wrong_passphrase(uid, now),
                Err(e) => {
                    let msg = format!("device error: {e}");
                    return self.unlock_failed(uid, "device_error", &msg, now);
                }
            }
        }
        if !reality.mounted {
            if let Err(e) = self.backend.mount() {
                let mut msg = format!("vault opened but mounting it failed: {e}");
                if activated {
                    match self.backend.close_mapping() {
                        Ok(()) => {
                            let _ = self.backend.revoke_keys();
                            msg.push_str("; closed it again");
                        }
                        Err(ce) => msg.push_str(&format!("; closing it again failed: {ce}")),
                    }
                }
                return self.unlock_failed(uid, "mount_failed", &msg, now);
            }
        }
        let warning = self.start_services(&self.s.services.clone());
        self.record_success(uid, now);
        self.idle.touch(now.mono_ms, now.wall_ms);
        self.set(VaultState::Unlocked, "passphrase", now);
        self.audit(
            "unlock",
            &[("uid", uid.into()), ("method", "passphrase".into())],
        );
        log_info("vault unlocked with a passphrase");
        let r = Response::ok(Some("unlocked"));
        match warning {
            Some(w) => r.with_warning(&w),
            None => r,
        }
    }

    /// A verified passphrase from `uid`: its failures (and the global count) end.
    fn record_success(&mut self, uid: u32, now: Now) {
        if !self.lockout.is_clear() {
            self.lockout.record_success(uid);
            self.save_lockout(now);
        }
    }

    fn wrong_passphrase(&mut self, uid: u32, now: Now) -> Response {
        let triggered = self
            .lockout
            .record_failure(&self.s.policy, uid, now.mono_ms);
        self.save_lockout(now);
        self.resync("unlock_failed", now);
        self.audit(
            "unlock_failed",
            &[
                ("uid", uid.into()),
                ("reason", "wrong_passphrase".into()),
                ("failures", self.lockout.failures_of(uid).into()),
            ],
        );
        for t in &triggered {
            log_warn(&format!(
                "too many failed unlock attempts by {}: refusing their unlocks for {} s",
                t.scope, t.seconds
            ));
            let scope = match t.scope {
                Scope::Identity(u) => format!("uid:{u}"),
                Scope::Global => "global".to_string(),
            };
            self.audit(
                "lockout",
                &[
                    ("scope", scope.as_str().into()),
                    ("seconds", t.seconds.into()),
                    ("lockouts", t.lockouts.into()),
                ],
            );
        }
        if !triggered.is_empty() {
            self.publish(now);
        }
        Response::failed(
            UNLOCK_FAILED,
            self.lockout.remaining(&self.s.policy, uid, now.mono_ms),
        )
    }

    fn unlock_failed(&mut self, uid: u32, reason: &str, msg: &str, now: Now) -> Response {
        self.resync("unlock_failed", now);
        log_warn(msg);
        self.audit(
            "unlock_failed",
            &[
                ("uid", uid.into()),
                ("reason", reason.into()),
                ("error", msg.into()),
            ],
        );
        Response::failed(msg, None)
    }

    /// Start `units`; returns a message naming those that failed.
    fn start_services(&mut self, units: &[String]) -> Option<String> {
        let mut failed = Vec::new();
        for unit in units {
            if let Err(e) = self.backend.start_service(unit) {
                log_warn(&format!("could not start {unit}: {e}"));
                failed.push(format!("{unit}: {e}"));
            }
        }
        (!failed.is_empty()).then(|| format!("could not start {}", failed.join(", ")))
    }

    fn save_lockout(&self, now: Now) {
        let file = self
            .lockout
            .to_file(&self.s.policy, now.mono_ms, now.wall_s());
        if let Err(e) = Lockout::save(&file, &self.s.lockout_path) {
            log_warn(&e.to_string());
        }
    }

    /// After a failure: believe the kernel, not the plan.
    fn resync(&mut self, detail_if_changed: &str, now: Now) {
        let (state, detail) = match self.backend.probe() {
            Ok(r) => {
                let s = VaultState::of(r);
                let stable_before = self.previous_stable();
                let d = if Some(s) == stable_before {
                    self.detail.clone()
                } else {
                    detail_if_changed.to_string()
                };
                (s, d)
            }
            Err(_) => (VaultState::Unknown, "probe_failed".to_string()),
        };
        self.set(state, &detail, now);
    }

    /// The state before a transient one, as implied by the kept detail.
    fn previous_stable(&self) -> Option<VaultState> {
        match self.state {
            VaultState::Locking => Some(VaultState::Unlocked),
            VaultState::Unlocking => Some(VaultState::Locked),
            s => Some(s),
        }
    }

    fn set(&mut self, state: VaultState, detail: &str, now: Now) {
        self.state = state;
        self.detail = detail.to_string();
        self.publish(now);
    }

    fn snapshot(&self, now: Now) -> Snapshot {
        let secs = |ms: u64| ms as f64 / 1000.0;
        let auto_lock_at = self
            .idle
            .remaining_ms(now.mono_ms, self.armed())
            .map(|r| secs(now.wall_ms.saturating_add(r)));
        // For readers without a socket: when the latest running lockout (of any
        // identity, or the global one) ends.
        let lockout_until = self
            .lockout
            .latest_end_ms(&self.s.policy, now.mono_ms)
            .map(|ms| now.wall_s() + ms.div_ceil(1000));
        Snapshot {
            state: self.state.as_str().into(),
            detail: self.detail.clone(),
            last_activity: Some(secs(self.idle.last_activity_wall_ms())),
            auto_lock_at,
            lockout_until,
            updated: secs(now.wall_ms),
        }
    }

    /// Mirror the state to the state file(s), skipping identical rewrites.
    fn publish(&mut self, now: Now) {
        let snap = self.snapshot(now);
        let same = self.last_published.as_ref().is_some_and(|p| {
            Snapshot {
                updated: snap.updated,
                ..p.clone()
            } == snap
        });
        if same {
            return;
        }
        for path in &self.s.state_files {
            if let Err(e) = state_file::write(path, &snap) {
                log_warn(&format!("cannot write state file {}: {e}", path.display()));
            }
        }
        self.last_published = Some(snap);
    }

    fn audit(&self, event: &str, fields: &[(&str, audit::Value<'_>)]) {
        if let Some(path) = &self.s.audit_path {
            match audit::append(path, event, fields) {
                Ok(_) => self.rotate_audit_if_large(path),
                Err(e) => {
                    log_warn(&format!("`{event}` not audited: {e}"));
                    self.audit_error.replace(Some(e.to_string()));
                }
            }
        }
    }

    fn rotate_audit_if_large(&self, path: &Path) {
        let max = self.s.audit_rotate_size;
        if max == 0 || std::fs::metadata(path).map_or(true, |m| m.len() < max) {
            return;
        }
        match audit::rotate(path) {
            Ok(Some(seg)) => log_info(&format!(
                "audit log rotated: {} closed as {}",
                path.display(),
                seg.display()
            )),
            Ok(None) => {}
            Err(e) => log_warn(&format!("audit log rotation failed: {e}")),
        }
    }

    /// Unlocks wait for a working audit log: an unlock nobody can account for is
    /// what the log exists to prevent. Locking goes on regardless (it only makes
    /// the vault safer). Returns the refusal while the log still cannot be written.
    fn audit_must_work(&self) -> Option<String> {
        let err = self.audit_error.borrow().clone()?;
        let path = self.s.audit_path.as_ref()?;
        match audit::append(
            path,
            "audit_resumed",
            &[("after_error", err.as_str().into())],
        ) {
            Ok(_) => {
                log_info("the audit log can be written again");
                self.audit_error.replace(None);
                None
            }
            Err(e) => Some(format!(
                "unlock refused: the audit log cannot be written ({e}); fix it, then try again"
            )),
        }
    }

    fn audit_denied(&mut self, peer: &Peer, cmd: &str, now: Now) {
        let entry = self.denied.entry(peer.uid).or_insert((0, 0));
        if entry.0 != 0 && now.mono_ms.saturating_sub(entry.0) < DENIAL_AUDIT_INTERVAL_MS {
            entry.1 = entry.1.saturating_add(1);
            return;
        }
        let suppressed = entry.1;
        *entry = (now.mono_ms.max(1), 0);
        log_warn(&format!(
            "denied `{cmd}` to uid {} (pid {})",
            peer.uid, peer.pid
        ));
        self.audit(
            "permission_denied",
            &[
                ("uid", peer.uid.into()),
                ("pid", i64::from(peer.pid).into()),
                ("cmd", cmd.into()),
                ("suppressed_since_last", suppressed.into()),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TmpDir;
    use std::sync::{Arc, Mutex};

    /// A vault that records every call and can be told to fail.
    #[derive(Default)]
    struct World {
        active: bool,
        mounted: bool,
        calls: Vec<String>,
        busy: bool,
        close_fails: bool,
        mount_fails: bool,
        device_error: bool,
        revoke_fails: bool,
        probe_fails: bool,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<World>>);

    impl Fake {
        fn unlocked() -> Fake {
            let f = Fake::default();
            {
                let mut w = f.0.lock().unwrap();
                w.active = true;
                w.mounted = true;
            }
            f
        }
        fn w(&self) -> std::sync::MutexGuard<'_, World> {
            self.0.lock().unwrap()
        }
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut self.w().calls)
        }
    }

    impl VaultBackend for Fake {
        fn probe(&mut self) -> Result<Reality, BackendError> {
            let w = self.w();
            if w.probe_fails {
                return Err(BackendError::Failed {
                    op: "probe",
                    msg: "boom".into(),
                });
            }
            Ok(Reality {
                mapping_active: w.active,
                mounted: w.mounted,
            })
        }
        fn stop_service(&mut self, unit: &str) -> Result<(), BackendError> {
            self.w().calls.push(format!("stop {unit}"));
            Ok(())
        }
        fn start_service(&mut self, unit: &str) -> Result<(), BackendError> {
            self.w().calls.push(format!("start {unit}"));
            Ok(())
        }
        fn sync(&mut self) -> Result<(), BackendError> {
            self.w().calls.push("sync".into());
            Ok(())
        }
        fn unmount(&mut self) -> Result<(), BackendError> {
            let mut w = self.w();
            w.calls.push("unmount".into());
            if w.busy {
                return Err(BackendError::Busy {
                    mount: "/vault".into(),
                });
            }
            w.mounted = false;
            Ok(())
        }
        fn close_mapping(&mut self) -> Result<(), BackendError> {
            let mut w = self.w();
            w.calls.push("close".into());
            if w.close_fails {
                return Err(BackendError::Failed {
                    op: "close",
                    msg: "device busy".into(),
                });
            }
            w.active = false;
            Ok(())
        }
        fn revoke_keys(&mut self) -> Result<usize, BackendError> {
            let mut w = self.w();
            w.calls.push("revoke".into());
            if w.revoke_fails {
                return Err(BackendError::Failed {
                    op: "revoke",
                    msg: "EACCES".into(),
                });
            }
            Ok(1)
        }
        fn activate(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError> {
            let mut w = self.w();
            w.calls.push("activate".into());
            if w.device_error {
                return Err(BackendError::Failed {
                    op: "activate",
                    msg: "I/O error".into(),
                });
            }
            if passphrase.as_bytes() != b"right" {
                return Err(BackendError::WrongPassphrase);
            }
            w.active = true;
            Ok(())
        }
        fn verify_passphrase(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError> {
            let mut w = self.w();
            w.calls.push("verify".into());
            if w.device_error {
                return Err(BackendError::Failed {
                    op: "verify",
                    msg: "I/O error".into(),
                });
            }
            if passphrase.as_bytes() != b"right" {
                return Err(BackendError::WrongPassphrase);
            }
            Ok(())
        }
        fn mount(&mut self) -> Result<(), BackendError> {
            let mut w = self.w();
            w.calls.push("mount".into());
            if w.mount_fails {
                return Err(BackendError::Failed {
                    op: "mount",
                    msg: "bad superblock".into(),
                });
            }
            w.mounted = true;
            Ok(())
        }
    }

    struct T {
        fake: Fake,
        m: Machine,
        /// Last, so that it is removed after the machine is dropped.
        dir: TmpDir,
    }

    fn settings(dir: &Path) -> Settings {
        Settings {
            services: vec!["ollama.service".into(), "webui.service".into()],
            auto_lock_ms: Some(30 * 60_000),
            warn_before_ms: 60_000,
            policy: Policy {
                max_failed: 3,
                duration_s: 60,
                escalated_s: 900,
            },
            lockout_path: dir.join("lockout.json"),
            audit_path: Some(dir.join("audit.jsonl")),
            audit_rotate_size: 0,
            state_files: vec![dir.join("state.json"), dir.join("compat")],
            allow: crate::config::ControlConfig::default().allow,
        }
    }

    fn tmpdir(name: &str) -> TmpDir {
        TmpDir::new(&format!("machine-{name}"))
    }

    fn at(s: u64) -> Now {
        Now {
            mono_ms: s * 1000,
            wall_ms: 1_700_000_000_000 + s * 1000,
        }
    }

    fn start(name: &str, fake: Fake) -> T {
        let dir = tmpdir(name);
        let m = Machine::start(settings(&dir), Box::new(fake.clone()), at(0));
        fake.calls();
        T { dir, fake, m }
    }

    fn root() -> Peer {
        Peer {
            pid: 1,
            uid: 0,
            gid: 0,
            groups: vec![],
        }
    }

    fn line(r: &Response) -> serde_json::Value {
        serde_json::from_slice(&r.to_line()).unwrap()
    }

    fn events(dir: &Path) -> Vec<String> {
        audit::verify(&dir.join("audit.jsonl")).unwrap();
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    fn state_file(dir: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap()
    }

    #[test]
    fn state_at_start_comes_from_reality() {
        let ok = |a, m| {
            Ok(Reality {
                mapping_active: a,
                mounted: m,
            })
        };
        let hint = |s: &str, d: &str| Some((s.to_string(), d.to_string()));
        assert_eq!(
            derive_state(ok(true, true), None),
            (VaultState::Unlocked, "found_unlocked".into())
        );
        assert_eq!(
            derive_state(ok(true, true), hint("unlocked", "tpm2_unseal")),
            (VaultState::Unlocked, "tpm2_unseal".into())
        );
        // A stale file that disagrees with the kernel is ignored.
        assert_eq!(
            derive_state(ok(false, false), hint("unlocked", "tpm2_unseal")),
            (VaultState::Locked, "found_locked".into())
        );
        assert_eq!(
            derive_state(ok(true, false), hint("unlocked", "tpm2_unseal")),
            (VaultState::Unknown, "mapping_open_not_mounted".into())
        );
        assert_eq!(derive_state(ok(false, true), None).0, VaultState::Unknown);
        let err = BackendError::Failed {
            op: "p",
            msg: "x".into(),
        };
        assert_eq!(
            derive_state(Err(&err), None),
            (VaultState::Unknown, "probe_failed".into())
        );
        // A hint with a strange detail is not repeated to clients.
        assert_eq!(
            derive_state(ok(true, true), hint("unlocked", "<script>")).1,
            "found_unlocked"
        );
    }

    #[test]
    fn lock_runs_the_sequence_in_order_and_audits() {
        let mut t = start("lock", Fake::unlocked());
        let r = t.m.handle(&root(), Request::Lock, at(5));
        assert_eq!(
            line(&r),
            serde_json::json!({"success": true, "state": "locked"})
        );
        assert_eq!(
            t.fake.calls(),
            [
                "stop ollama.service",
                "stop webui.service",
                "sync",
                "unmount",
                "close",
                "revoke"
            ]
        );
        assert_eq!(t.m.state(), VaultState::Locked);
        assert_eq!(t.m.detail(), "manual_lock");
        assert_eq!(events(&t.dir), ["supervisor_start", "lock"]);
        let sf = state_file(&t.dir);
        assert_eq!(sf["state"], "locked");
        assert_eq!(sf["detail"], "manual_lock");
        assert!(sf.get("auto_lock_at").is_none());
        assert_eq!(
            std::fs::read(t.dir.join("compat")).unwrap(),
            std::fs::read(t.dir.join("state.json")).unwrap()
        );
        // Locking again is harmless and still sweeps keys.
        let r = t.m.handle(&root(), Request::Lock, at(6));
        assert_eq!(line(&r)["success"], true);
        assert_eq!(t.fake.calls(), ["revoke"]);
    }

    #[test]
    fn busy_mount_restarts_services_and_stays_unlocked() {
        let fake = Fake::unlocked();
        fake.w().busy = true;
        let mut t = start("busy", fake);
        let r = t.m.handle(&root(), Request::Lock, at(5));
        let v = line(&r);
        assert_eq!(v["success"], false);
        assert_eq!(v["state"], "unlocked");
        let err = v["error"].as_str().unwrap();
        assert!(
            err.contains("/vault is busy") && err.contains("fuser"),
            "{err}"
        );
        assert!(err.contains("restarted"), "{err}");
        assert_eq!(
            t.fake.calls(),
            [
                "stop ollama.service",
                "stop webui.service",
                "sync",
                "unmount",
                "start ollama.service",
                "start webui.service"
            ]
        );
        assert_eq!(t.m.state(), VaultState::Unlocked);
        assert_eq!(state_file(&t.dir)["state"], "unlocked");
        assert_eq!(events(&t.dir), ["supervisor_start", "lock_failed"]);
    }

    #[test]
    fn failed_close_remounts_and_reports_the_truth() {
        let fake = Fake::unlocked();
        fake.w().close_fails = true;
        let mut t = start("close", fake);
        let v = line(&t.m.lock(LockReason::Manual, None, at(1)));
        assert_eq!(v["success"], false);
        assert_eq!(v["state"], "unlocked");
        assert!(
            v["error"].as_str().unwrap().contains("mounted again"),
            "{v}"
        );
        let calls = t.fake.calls();
        assert_eq!(
            &calls[calls.len() - 4..],
            [
                "close",
                "mount",
                "start ollama.service",
                "start webui.service"
            ]
        );
        // If the remount fails too, the state says so.
        t.fake.w().mount_fails = true;
        let v = line(&t.m.lock(LockReason::Manual, None, at(2)));
        assert_eq!(v["state"], "unknown");
        assert_eq!(t.m.state(), VaultState::Unknown);
        assert_eq!(t.m.detail(), "lock_incomplete");
    }

    #[test]
    fn revoke_failure_is_reported_but_the_vault_is_locked() {
        let fake = Fake::unlocked();
        fake.w().revoke_fails = true;
        let mut t = start("revoke", fake);
        let v = line(&t.m.lock(LockReason::Manual, None, at(1)));
        assert_eq!(v["success"], false);
        assert_eq!(v["state"], "locked");
        assert!(v["error"].as_str().unwrap().contains("keyring"));
        assert_eq!(t.m.state(), VaultState::Locked);
    }

    #[test]
    fn unlock_runs_activate_mount_start_and_resets_idle() {
        let mut t = start("unlock", Fake::default());
        assert_eq!(t.m.state(), VaultState::Locked);
        assert_eq!(t.m.next_wakeup(), None, "no deadline while locked");
        let r = t.m.handle(
            &root(),
            Request::Unlock(SecretBytes::from_slice(b"right")),
            at(100),
        );
        assert_eq!(
            line(&r),
            serde_json::json!({"success": true, "state": "unlocked"})
        );
        assert_eq!(
            t.fake.calls(),
            [
                "activate",
                "mount",
                "start ollama.service",
                "start webui.service"
            ]
        );
        assert_eq!(t.m.state(), VaultState::Unlocked);
        assert_eq!(t.m.detail(), "passphrase");
        let s = t.m.status(0, at(110));
        assert_eq!(s.idle_seconds, 10);
        assert_eq!(s.lock_in_seconds, Some(30 * 60 - 10));
        assert_eq!(t.m.next_wakeup(), Some((100 + 29 * 60) * 1000));
        assert_eq!(events(&t.dir), ["supervisor_start", "unlock"]);
        // Unlocking an unlocked vault still checks the passphrase (else any string
        // would count as activity and keep the vault open), and activates nothing.
        let r =
            t.m.unlock(&SecretBytes::from_slice(b"whatever"), 0, at(120));
        assert_eq!(line(&r)["error"], UNLOCK_FAILED);
        assert_eq!(t.fake.calls(), ["verify"]);
        assert_eq!(t.m.status(0, at(120)).idle_seconds, 20, "not activity");
        let r = t.m.unlock(&SecretBytes::from_slice(b"right"), 0, at(130));
        assert_eq!(line(&r)["success"], true);
        assert_eq!(t.fake.calls(), ["verify"]);
        assert_eq!(t.m.status(0, at(130)).idle_seconds, 0);
    }

    #[test]
    fn an_open_but_unmounted_mapping_still_needs_the_right_passphrase() {
        // After a lock whose close failed, or a mount that failed at boot.
        let fake = Fake::default();
        fake.w().active = true;
        let mut t = start("openunmounted", fake);
        assert_eq!(t.m.state(), VaultState::Unknown);
        let r = t.m.handle(
            &root(),
            Request::Unlock(SecretBytes::from_slice(b"anything")),
            at(10),
        );
        assert_eq!(line(&r)["error"], UNLOCK_FAILED);
        assert_eq!(t.fake.calls(), ["verify"], "nothing mounted");
        assert!(!t.fake.w().mounted);
        assert_ne!(t.m.state(), VaultState::Unlocked);
        let log = std::fs::read_to_string(t.dir.join("audit.jsonl")).unwrap();
        assert!(log.contains("\"reason\":\"wrong_passphrase\""), "{log}");
        assert!(!log.contains("\"method\""), "{log}");
        let r = t.m.handle(
            &root(),
            Request::Unlock(SecretBytes::from_slice(b"right")),
            at(11),
        );
        assert_eq!(line(&r)["success"], true);
        assert_eq!(
            t.fake.calls(),
            [
                "verify",
                "mount",
                "start ollama.service",
                "start webui.service"
            ]
        );
        assert_eq!(t.m.state(), VaultState::Unlocked);
    }

    #[test]
    fn unlocks_wait_for_a_working_audit_log() {
        // A symlinked audit path (O_NOFOLLOW refuses it): the supervisor keeps
        // serving and locking, but no unlock happens that the log cannot record.
        let dir = tmpdir("auditbroken");
        let log = dir.join("audit.jsonl");
        std::os::unix::fs::symlink("/dev/null", &log).unwrap();
        let fake = Fake::default();
        let mut m = Machine::start(settings(&dir), Box::new(fake.clone()), at(0));
        fake.calls();
        let v = line(&m.handle(&root(), Request::Status, at(1)));
        assert!(
            v["audit_error"].as_str().unwrap().contains("audit.jsonl"),
            "{v}"
        );
        let v = line(&m.handle(
            &root(),
            Request::Unlock(SecretBytes::from_slice(b"right")),
            at(2),
        ));
        assert_eq!(v["success"], false);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("audit log cannot be written"),
            "{v}"
        );
        assert!(fake.calls().is_empty(), "nothing was tried");
        assert_eq!(m.state(), VaultState::Locked);
        // Once the log works again, the unlock goes through and the gap is recorded.
        std::fs::remove_file(&log).unwrap();
        let v = line(&m.handle(
            &root(),
            Request::Unlock(SecretBytes::from_slice(b"right")),
            at(3),
        ));
        assert_eq!(v["success"], true, "{v}");
        assert_eq!(events(&dir), ["audit_resumed", "unlock"]);
        let v = line(&m.handle(&root(), Request::Status, at(4)));
        assert!(v.get("audit_error").is_none(), "{v}");
        drop(m);
    }

    #[test]
    fn a_low_privilege_user_cannot_lock_root_out() {
        let mut t = start("peruid", Fake::default());
        let user = Peer {
            pid: 2,
            uid: 1000,
            gid: 1000,
            groups: vec![],
        };
        let mut allow = crate::config::ControlConfig::default().allow;
        allow.get_mut("unlock").unwrap().uids.push(1000);
        allow.get_mut("status").unwrap().uids.push(1000);
        t.m.s.allow = allow;
        for i in 0..5 {
            t.m.handle(&user, Request::Unlock(SecretBytes::from_slice(b"x")), at(i));
        }
        let v = line(&t.m.handle(&user, Request::Status, at(5)));
        assert_eq!(
            v["lockout_seconds"], 57,
            "3 failures at t=2 s: 60 s from there"
        );
        assert_eq!(t.m.status(0, at(5)).lockout_seconds, None);
        let v = line(&t.m.handle(
            &root(),
            Request::Unlock(SecretBytes::from_slice(b"right")),
            at(6),
        ));
        assert_eq!(v["success"], true, "{v}");
    }

    #[test]
    fn wrong_passphrase_counts_and_locks_out_with_retry_after() {
        let mut t = start("wrong", Fake::default());
        let wrong = || Request::Unlock(SecretBytes::from_slice(b"wrong"));
        for i in 0..2 {
            let v = line(&t.m.handle(&root(), wrong(), at(10 + i)));
            assert_eq!(
                v,
                serde_json::json!({"success": false, "error": UNLOCK_FAILED})
            );
        }
        let v = line(&t.m.handle(&root(), wrong(), at(12)));
        assert_eq!(v["error"], UNLOCK_FAILED);
        assert_eq!(v["retry_after"], 60);
        assert_eq!(t.m.state(), VaultState::Locked);
        t.fake.calls();
        // Locked out: even the right passphrase is not tried.
        let v = line(&t.m.handle(
            &root(),
            Request::Unlock(SecretBytes::from_slice(b"right")),
            at(42),
        ));
        assert_eq!(v["success"], false);
        assert_eq!(v["retry_after"], 30);
        assert!(t.fake.calls().is_empty());
        assert_eq!(t.m.status(0, at(42)).lockout_seconds, Some(30));
        assert_eq!(state_file(&t.dir)["lockout_until"], 1_700_000_000 + 72);
        // A restart keeps the lockout.
        let m2 = Machine::start(settings(&t.dir), Box::new(t.fake.clone()), at(50));
        assert_eq!(m2.status(0, at(50)).lockout_seconds, Some(22));
        // After it expires the right passphrase works and clears the counters.
        let v = line(&t.m.unlock(&SecretBytes::from_slice(b"right"), 0, at(73)));
        assert_eq!(v["success"], true);
        assert_eq!(
            Lockout::load(&t.dir.join("lockout.json")).unwrap(),
            super::super::lockout::LockoutFile::default()
        );
        let ev = events(&t.dir);
        assert_eq!(ev.iter().filter(|e| *e == "unlock_failed").count(), 3);
        assert!(ev.contains(&"lockout".to_string()) && ev.contains(&"unlock_refused".to_string()));
        // No passphrase in the audit log or the state file.
        let log = std::fs::read_to_string(t.dir.join("audit.jsonl")).unwrap();
        assert!(!log.contains("\"wrong\""));
        assert!(!log.contains("right"));
    }

    #[test]
    fn second_lockout_is_escalated() {
        let mut t = start("escalate", Fake::default());
        for i in 0..3 {
            t.m.unlock(&SecretBytes::from_slice(b"x"), 0, at(i));
        }
        assert_eq!(t.m.status(0, at(3)).lockout_seconds, Some(59));
        for i in 0..3 {
            t.m.unlock(&SecretBytes::from_slice(b"x"), 0, at(100 + i));
        }
        assert_eq!(t.m.status(0, at(102)).lockout_seconds, Some(900));
    }

    #[test]
    fn device_error_does_not_count_as_a_failed_attempt() {
        let fake = Fake::default();
        fake.w().device_error = true;
        let mut t = start("device", fake);
        for i in 0..5 {
            let v = line(&t.m.unlock(&SecretBytes::from_slice(b"right"), 0, at(i)));
            assert!(
                v["error"].as_str().unwrap().starts_with("device error: "),
                "{v}"
            );
            assert!(v.get("retry_after").is_none());
        }
        assert_eq!(t.m.status(0, at(5)).lockout_seconds, None);
    }

    #[test]
    fn failed_mount_closes_the_mapping_again() {
        let fake = Fake::default();
        fake.w().mount_fails = true;
        let mut t = start("mountfail", fake);
        let v = line(&t.m.unlock(&SecretBytes::from_slice(b"right"), 0, at(1)));
        assert!(
            v["error"].as_str().unwrap().contains("closed it again"),
            "{v}"
        );
        assert_eq!(t.fake.calls(), ["activate", "mount", "close", "revoke"]);
        assert_eq!(t.m.state(), VaultState::Locked);
    }

    #[test]
    fn idle_deadline_warns_then_auto_locks() {
        let mut t = start("idle", Fake::unlocked());
        assert_eq!(t.m.next_wakeup(), Some(29 * 60_000));
        t.m.on_timer(at(29 * 60));
        assert_eq!(t.m.state(), VaultState::Unlocked);
        assert!(t.fake.calls().is_empty());
        assert_eq!(t.m.next_wakeup(), Some(30 * 60_000));
        // A keepalive postpones everything.
        t.m.handle(&root(), Request::Keepalive, at(29 * 60 + 30));
        t.m.on_timer(at(30 * 60));
        assert_eq!(t.m.state(), VaultState::Unlocked);
        assert_eq!(t.m.next_wakeup(), Some((29 * 60 + 30 + 29 * 60) * 1000));
        // Status does not count as activity.
        t.m.handle(&root(), Request::Status, at(59 * 60));
        t.m.on_timer(at(59 * 60 + 30));
        assert_eq!(t.m.state(), VaultState::Locked);
        assert_eq!(t.m.detail(), "auto_lock_idle");
        assert_eq!(t.m.next_wakeup(), None);
        assert_eq!(events(&t.dir), ["supervisor_start", "lock"]);
    }

    #[test]
    fn failed_auto_lock_is_retried_a_minute_later() {
        let fake = Fake::unlocked();
        fake.w().busy = true;
        let mut t = start("idlebusy", fake);
        t.m.on_timer(at(30 * 60));
        assert_eq!(t.m.state(), VaultState::Unlocked);
        assert_eq!(t.m.next_wakeup(), Some(31 * 60_000));
        t.fake.w().busy = false;
        t.m.on_timer(at(31 * 60));
        assert_eq!(t.m.state(), VaultState::Locked);
    }

    #[test]
    fn permission_denied_is_audited_but_rate_limited() {
        let mut t = start("denied", Fake::unlocked());
        let user = Peer {
            pid: 99,
            uid: 1000,
            gid: 1000,
            groups: vec![],
        };
        for i in 0..5 {
            let v = line(&t.m.handle(&user, Request::Lock, at(i)));
            assert_eq!(v["success"], false);
            assert!(v["error"]
                .as_str()
                .unwrap()
                .starts_with("permission denied"));
        }
        assert!(t.fake.calls().is_empty());
        assert_eq!(t.m.state(), VaultState::Unlocked);
        assert_eq!(events(&t.dir), ["supervisor_start", "permission_denied"]);
        t.m.handle(&user, Request::Status, at(61));
        let log = std::fs::read_to_string(t.dir.join("audit.jsonl")).unwrap();
        assert!(log.contains("\"suppressed_since_last\":4"), "{log}");
    }

    #[test]
    fn damaged_lockout_file_fails_closed() {
        let dir = tmpdir("damaged");
        std::fs::write(dir.join("lockout.json"), b"{not json").unwrap();
        let m = Machine::start(settings(&dir), Box::new(Fake::default()), at(0));
        assert_eq!(m.status(0, at(0)).lockout_seconds, Some(60));
    }

    #[test]
    fn disabled_auto_lock_never_schedules() {
        let dir = tmpdir("disabled");
        let mut s = settings(&dir);
        s.auto_lock_ms = None;
        let mut m = Machine::start(s, Box::new(Fake::unlocked()), at(0));
        assert_eq!(m.next_wakeup(), None);
        m.on_timer(at(1_000_000));
        assert_eq!(m.state(), VaultState::Unlocked);
        assert_eq!(m.status(0, at(10)).lock_in_seconds, None);
    }
}
