//! The decision core: the vault's state and detail, authorisation, the idle
//! deadline, the lockout, and which effects follow. It calls the
//! [`VaultBackend`] (the seam to the kernel, faked in tests) but performs no other
//! I/O: audit entries, state-file writes, lockout saves and log lines come back
//! as [`Effect`]s for the shell to perform. The lock and unlock sequences are in
//! [`super::lock`] and [`super::unlock`].

use super::effects::{Effect, Effects, Field};
use super::inhibit::Inhibitors;
use super::{derive_state, LockReason, Now, Settings, VaultState};
use crate::control::protocol::{InhibitorView, ProtocolError, Request, Response, StatusReply};
use crate::control::{authorise, Peer};
use crate::supervisor::backend::{Presence, VaultBackend};
use crate::supervisor::idle::{IdleEvent, IdleTimer};
use crate::supervisor::lockout::{Lockout, LockoutFile};
use crate::supervisor::state_file::Snapshot;
use std::collections::BTreeMap;

/// How long after a failed auto-lock (e.g. a busy mount) to try again.
pub const AUTO_LOCK_RETRY_MS: u64 = 60_000;

/// Denied requests from one uid are audited at most this often (the rest counted),
/// so an unprivileged user cannot flood the log.
const DENIAL_AUDIT_INTERVAL_MS: u64 = 60_000;

pub struct Core {
    pub(super) backend: Box<dyn VaultBackend>,
    pub(super) s: Settings,
    pub(super) state: VaultState,
    pub(super) detail: String,
    pub(super) idle: IdleTimer,
    pub(super) lockout: Lockout,
    denied: BTreeMap<u32, (u64, u32)>,
    last_published: Option<Snapshot>,
    /// The last audit append's failure (reported by the shell), until one works.
    pub(super) audit_error: Option<String>,
    pub(super) fx: Effects,
    pub(super) inhibitors: Inhibitors,
    /// Per uid: when an inhibitor refusal or renewal was last audited, and how
    /// many since (so one client cannot flood the log, and nothing goes uncounted).
    pub(super) inhibit_audited: BTreeMap<u32, (u64, u32)>,
    /// In state `error`: what failed and what was done.
    pub(super) message: Option<String>,
    /// The boot path's TPM refusal and its event-log explanation (boot hint).
    pub(super) tpm_refusal: Vec<String>,
}

/// Audit entries that watchers also get as events (the rest are the
/// supervisor's own bookkeeping).
const MIRRORED: &[&str] = &[
    "unlock",
    "unlock_failed",
    "unlock_refused",
    "lockout",
    "lock",
    "lock_failed",
    "lock_declined",
    "already_locked",
    "key_revoke_failed",
    "inhibit",
    "inhibit_refused",
    "release",
];

impl Core {
    /// Derive the state from reality (and the boot path's `hint`, believed only
    /// where it agrees), take the persisted lockout (`Err`: unreadable, so fail
    /// closed), audit the start and publish.
    pub fn start(
        s: Settings,
        mut backend: Box<dyn VaultBackend>,
        hint: Option<(String, String)>,
        lockout: Result<LockoutFile, String>,
        now: Now,
    ) -> (Core, Vec<Effect>) {
        let mut fx = Effects::default();
        let reality = backend.probe();
        if let Err(e) = &reality {
            fx.warn(format!("cannot determine the vault's state: {e}"));
        }
        let (mut state, mut detail) = derive_state(reality.as_ref().copied(), hint);
        let message = reality
            .as_ref()
            .err()
            .map(|e| format!("cannot determine the vault's state: {e}"));
        if state == VaultState::Locked {
            if let Some((s, d)) = absent_state(backend.presence()) {
                (state, detail) = (s, d.into());
            }
        }
        let lockout = match lockout {
            Ok(f) => Lockout::from_file(&f, &s.policy, now.mono_ms, now.wall_s()),
            Err(e) => {
                fx.warn(format!(
                    "{e}: refusing unlocks for {} s",
                    s.policy.duration_s
                ));
                Lockout::fail_closed(&s.policy, now.mono_ms)
            }
        };
        let idle = IdleTimer::new(s.auto_lock_ms, s.warn_before_ms, now.mono_ms, now.wall_ms);
        let mut c = Core {
            backend,
            s,
            state,
            detail,
            idle,
            lockout,
            denied: BTreeMap::new(),
            last_published: None,
            audit_error: None,
            fx,
            inhibitors: Inhibitors::default(),
            inhibit_audited: BTreeMap::new(),
            message,
            tpm_refusal: Vec::new(),
        };
        c.fx.info(format!(
            "supervising: vault {} ({}), auto-lock {}",
            c.state.as_str(),
            c.detail,
            match c.s.auto_lock_ms {
                Some(ms) => format!("after {} s idle", ms / 1000),
                None => "off".into(),
            }
        ));
        c.audit_state("supervisor_start");
        c.publish(now);
        let fx = c.fx.take();
        (c, fx)
    }

    pub fn state(&self) -> VaultState {
        self.state
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub(super) fn armed(&self) -> bool {
        matches!(self.state, VaultState::Unlocked | VaultState::LockingSoon)
    }

    /// When the caller must next call [`Core::on_timer`] (CLOCK_BOOTTIME ms);
    /// `None`: nothing is scheduled. While inhibitors are held only their
    /// expiry is due: the idle period starts again when the last one ends.
    pub fn next_wakeup(&self) -> Option<u64> {
        match self.inhibitors.next_expiry() {
            Some(t) => Some(t),
            None => self.idle.next_wakeup(self.armed()),
        }
    }

    /// Milliseconds until the idle lock if nothing happens: while inhibited,
    /// the latest inhibitor's expiry plus a full idle period.
    fn lock_in_ms(&self, now: Now) -> Option<u64> {
        match self.inhibitors.last_expiry() {
            Some(until) if self.armed() => {
                let t = self.s.auto_lock_ms?;
                Some(until.saturating_sub(now.mono_ms).saturating_add(t))
            }
            _ => self.idle.remaining_ms(now.mono_ms, self.armed()),
        }
    }

    /// The state as `uid` sees it (its own lockout, or the global one).
    pub fn status(&self, uid: u32, now: Now) -> StatusReply {
        StatusReply {
            state: self.state.as_str(),
            detail: self.detail.clone(),
            idle_seconds: self.idle.idle_ms(now.mono_ms) / 1000,
            last_activity_ms: self.idle.last_activity_wall_ms(),
            lock_in_seconds: self.lock_in_ms(now).map(|ms| ms.div_ceil(1000)),
            lockout_seconds: self.lockout.remaining(&self.s.policy, uid, now.mono_ms),
            message: self.message.clone(),
            inhibitors: self
                .inhibitors
                .iter()
                .map(|(who, i)| InhibitorView {
                    who: who.clone(),
                    why: i.why.clone(),
                    remaining_seconds: i.until_ms.saturating_sub(now.mono_ms).div_ceil(1000),
                    holder: i.holder.clone(),
                    uid: i.uid,
                    pid: i.pid,
                    keep: i.keep,
                })
                .collect(),
            tpm_refusal: self.tpm_refusal.clone(),
        }
    }

    /// Activity from outside the socket (the activity file).
    pub fn activity(&mut self, now: Now) -> Vec<Effect> {
        self.touch(now);
        self.fx.take()
    }

    pub(super) fn touch(&mut self, now: Now) {
        self.idle.touch(now.mono_ms, now.wall_ms);
        if self.state == VaultState::LockingSoon {
            self.set(VaultState::Unlocked, &self.detail.clone(), now);
        }
        self.publish(now);
    }

    /// Authorise by `control.allow` alone and run one request from `peer` (the
    /// supervisor's shell decides with roles and tokens instead and calls
    /// [`Core::run`]).
    pub fn handle(&mut self, peer: &Peer, req: Request, now: Now) -> (Response, Vec<Effect>) {
        self.handle_on(0, peer, req, now)
    }

    /// Authorise and run one request from `peer` on connection `conn` (whose
    /// close releases the inhibitors it took, see [`Core::disconnected`]).
    pub fn handle_on(
        &mut self,
        conn: u64,
        peer: &Peer,
        req: Request,
        now: Now,
    ) -> (Response, Vec<Effect>) {
        let cmd = req.name();
        let r = if !authorise(&self.s.allow, cmd, peer) {
            self.audit_denied(peer, cmd, now);
            Response::failed(
                &ProtocolError::PermissionDenied { uid: peer.uid, cmd }.to_string(),
                None,
            )
        } else {
            return self.run(conn, peer, &format!("uid:{}", peer.uid), req, now);
        };
        (r, self.fx.take())
    }

    /// Run one request that the caller has already authorised (the supervisor's
    /// gate: roles, tokens, rate limits), from `peer` (whose uid is the lockout key)
    /// known as `identity` (`uid:N`, `token:NAME`: who holds the inhibitors it
    /// takes) on connection `conn` (whose close releases them).
    pub fn run(
        &mut self,
        conn: u64,
        peer: &Peer,
        identity: &str,
        req: Request,
        now: Now,
    ) -> (Response, Vec<Effect>) {
        let uid = peer.uid;
        let r = {
            match req {
                // Reading the state is not activity: a dashboard polling status
                // must not keep the vault open forever.
                Request::Status => {
                    let r = Response::status(&self.status(uid, now));
                    match &self.audit_error {
                        Some(e) => r.with_audit_error(e),
                        None => r,
                    }
                }
                Request::Keepalive => {
                    self.touch(now);
                    Response::ok(None)
                }
                Request::Lock => {
                    self.idle.touch(now.mono_ms, now.wall_ms);
                    self.lock_sequence(LockReason::Manual, Some(uid), now)
                }
                Request::Unlock(passphrase) => self.unlock_sequence(&passphrase, uid, now),
                // The shell owns the counters and answers this itself.
                Request::Metrics => Response::failed("metrics are not available here", None),
                Request::LockBecause(r) => self.lock_because(&r, peer, now),
                // The shell turns this into the first line of the stream.
                Request::Watch => Response::ok(Some(self.state.as_str())),
                Request::Inhibit(i) => self.inhibit(conn, peer, identity, i, now),
                Request::Release(who) => self.release(peer, identity, &who, now),
            }
        };
        (r, self.fx.take())
    }

    /// The supervisor is stopping (the vault is left as it is).
    pub fn stopping(&mut self) -> Vec<Effect> {
        self.audit_state("supervisor_stop");
        self.fx.take()
    }

    /// The idle timer fired (or the caller looked at the clock): warn or lock.
    pub fn on_timer(&mut self, now: Now) -> Vec<Effect> {
        if self.expire_inhibitors(now) {
            return self.fx.take();
        }
        match self.idle.check(now.mono_ms, self.armed()) {
            IdleEvent::Nothing => {}
            IdleEvent::Warn { in_ms } => {
                self.fx.warn(format!(
                    "vault idle for {} s: auto-lock in {} s unless there is activity",
                    self.idle.idle_ms(now.mono_ms) / 1000,
                    in_ms.div_ceil(1000)
                ));
                self.set(VaultState::LockingSoon, &self.detail.clone(), now);
                self.fx.event(
                    "warning",
                    vec![("lock_in_seconds", in_ms.div_ceil(1000).into())],
                );
            }
            IdleEvent::Expired => {
                self.fx.info(format!(
                    "vault idle for {} s: locking",
                    self.idle.idle_ms(now.mono_ms) / 1000
                ));
                self.lock_sequence(LockReason::Idle, None, now);
                if self.state != VaultState::Locked {
                    self.fx.warn(format!(
                        "auto-lock failed; retrying in {} s",
                        AUTO_LOCK_RETRY_MS / 1000
                    ));
                    self.idle.retry_later(now.mono_ms, AUTO_LOCK_RETRY_MS);
                    self.publish(now);
                }
            }
        }
        self.fx.take()
    }

    /// The shell could not append an audit entry.
    pub fn audit_failed(&mut self, err: String) {
        self.audit_error = Some(err);
    }

    /// While the audit log is failing: the entry whose successful append shows
    /// it works again (the shell tries it before an unlock).
    pub fn audit_retry(&self) -> Option<Effect> {
        let err = self.audit_error.as_ref()?;
        Some(Effect::Audit {
            event: "audit_resumed",
            fields: vec![("after_error", err.as_str().into())],
        })
    }

    /// The retry entry was appended: auditing works again.
    pub fn audit_recovered(&mut self) -> Vec<Effect> {
        if self.audit_error.take().is_some() {
            self.fx.info("the audit log can be written again");
        }
        self.fx.take()
    }

    /// After a failure: believe the kernel, not the plan.
    pub(super) fn resync(&mut self, detail_if_changed: &str, now: Now) {
        let (state, detail) = match self.backend.probe() {
            Ok(r) => {
                let s = VaultState::of(r);
                let d = if s == self.previous_stable() {
                    self.detail.clone()
                } else {
                    detail_if_changed.to_string()
                };
                match absent_state(self.backend.presence()) {
                    Some((a, ad)) if s == VaultState::Locked => (a, ad.to_string()),
                    _ => (s, d),
                }
            }
            Err(e) => {
                self.message = Some(format!("cannot determine the vault's state: {e}"));
                (VaultState::Error, "probe_failed".to_string())
            }
        };
        self.set(state, &detail, now);
    }

    /// The state before a transient one, as implied by the kept detail.
    fn previous_stable(&self) -> VaultState {
        match self.state {
            VaultState::Locking | VaultState::LockingSoon => VaultState::Unlocked,
            VaultState::Unlocking => VaultState::Locked,
            s => s,
        }
    }

    pub(super) fn set(&mut self, state: VaultState, detail: &str, now: Now) {
        let changed = self.state != state || self.detail != detail;
        self.state = state;
        self.detail = detail.to_string();
        if state != VaultState::Error {
            self.message = None;
        }
        if changed {
            let mut fields = vec![("state", state.as_str().into()), ("detail", detail.into())];
            if let Some(m) = &self.message {
                fields.push(("message", m.as_str().into()));
            }
            self.fx.event("state", fields);
        }
        self.publish(now);
    }

    fn snapshot(&self, now: Now) -> Snapshot {
        let secs = |ms: u64| ms as f64 / 1000.0;
        // As `status` says it: while inhibited, past the latest expiry.
        let auto_lock_at = self
            .lock_in_ms(now)
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
    pub(super) fn publish(&mut self, now: Now) {
        let snap = self.snapshot(now);
        let same = self.last_published.as_ref().is_some_and(|p| {
            Snapshot {
                updated: snap.updated,
                ..p.clone()
            } == snap
        });
        if !same {
            self.last_published = Some(snap.clone());
            self.fx.push(Effect::Publish(snap));
        }
    }

    pub(super) fn save_lockout(&mut self, now: Now) {
        let file = self
            .lockout
            .to_file(&self.s.policy, now.mono_ms, now.wall_s());
        self.fx.push(Effect::SaveLockout(file));
    }

    pub(super) fn audit(&mut self, event: &'static str, fields: Vec<(&'static str, Field)>) {
        if MIRRORED.contains(&event) {
            self.fx.event(event, fields.clone());
        }
        self.fx.audit(event, fields);
    }

    fn audit_state(&mut self, event: &'static str) {
        let fields = vec![
            ("state", self.state.as_str().into()),
            ("detail", self.detail.clone().into()),
        ];
        self.audit(event, fields);
    }

    fn audit_denied(&mut self, peer: &Peer, cmd: &str, now: Now) {
        let entry = self.denied.entry(peer.uid).or_insert((0, 0));
        if entry.0 != 0 && now.mono_ms.saturating_sub(entry.0) < DENIAL_AUDIT_INTERVAL_MS {
            entry.1 = entry.1.saturating_add(1);
            return;
        }
        let suppressed = entry.1;
        *entry = (now.mono_ms.max(1), 0);
        self.fx.warn(format!(
            "denied `{cmd}` to uid {} (pid {})",
            peer.uid, peer.pid
        ));
        self.audit(
            "permission_denied",
            vec![
                ("uid", peer.uid.into()),
                ("pid", i64::from(peer.pid).into()),
                ("cmd", cmd.into()),
                ("suppressed_since_last", suppressed.into()),
            ],
        );
    }

    /// Start `units`; returns a message naming those that failed.
    pub(super) fn start_services(&mut self, units: &[String]) -> Option<String> {
        let mut failed = Vec::new();
        for unit in units {
            if let Err(e) = self.backend.start_service(unit) {
                self.fx.warn(format!("could not start {unit}: {e}"));
                failed.push(format!("{unit}: {e}"));
            }
        }
        (!failed.is_empty()).then(|| format!("could not start {}", failed.join(", ")))
    }
}

/// The state of a locked vault whose device says there is nothing to open.
pub(super) fn absent_state(p: Presence) -> Option<(VaultState, &'static str)> {
    match p {
        Presence::Ready => None,
        Presence::Absent(d) => Some((VaultState::NotAvailable, d)),
        Presence::NoVault(d) => Some((VaultState::SetupRequired, d)),
    }
}
