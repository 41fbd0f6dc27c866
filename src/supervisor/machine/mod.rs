//! The supervisor's state machine, in two layers:
//!
//! - [`Core`] decides: vault state and detail, authorisation of each request, the
//!   idle deadline, the lockout, and the lock ([`lock`]) and unlock ([`unlock`])
//!   sequences over the [`VaultBackend`]. It returns what should follow as
//!   [`Effect`]s (audit entries, the state to publish, the lockout to persist, log
//!   lines, events for watchers) and performs none of it, so its tests read
//!   decisions and effects with a recording fake backend and no file system. After any failed sequence the state
//!   is re-derived from the kernel (`probe`): what `status` says is what is true.
//! - [`Machine`] is the thin shell the event loop holds: it reads the boot hint and
//!   the persisted lockout at start, hands each call to the core and performs the
//!   effects in order (audit appends and rotation, state files, the lockout file,
//!   journald-prefixed log lines), and tells the core when auditing fails.
//!
//! The shell also holds the gate of the control socket (roles, bearer tokens, rate
//! limits: [`crate::control::roles`], [`crate::control::tokens`]), so that each
//! request is authorised once, before the core runs it, and the metrics
//! ([`super::metrics`]), counted from the effects it performs.
//! Inhibitors ([`inhibit`] keeps them, [`inhibiting`] decides) hold off the idle
//! lock; events are numbered (`seq`) by the shell, which keeps them for the event
//! loop to fan out to watchers.
//!
//! Neither layer touches sockets or clocks: times come in as [`Now`].

mod anchoring;
mod core;
mod effects;
mod inhibit;
mod inhibiting;
mod lock;
#[cfg(test)]
mod tests;
mod unlock;

pub use self::core::{Core, AUTO_LOCK_RETRY_MS};
pub use effects::{Effect, Field, Priority};
pub use inhibit::{MAX_INHIBITORS, MAX_INHIBITORS_PER_HOLDER};

use super::backend::{BackendError, Reality, VaultBackend};
use super::lockout::{Lockout, Policy};
use super::state_file;
use crate::audit;
use crate::audit::anchor::Anchor;
use crate::config::{Allow, Config};
use crate::control::protocol::{Request, Response, StatusReply};
use crate::control::roles::{self, Gate, Note, Val, Verdict};
use crate::control::tokens;
use crate::control::Peer;
use crate::secret::SecretBytes;
use crate::supervisor::metrics::Metrics;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultState {
    Locked,
    Unlocked,
    Unknown,
    Locking,
    Unlocking,
    /// Unlocked, inside the warning window before the idle lock.
    LockingSoon,
    /// Reality cannot be read, or a lock stopped half-way; `status` carries a
    /// `message` saying what failed and what was done.
    Error,
    /// Locked, and there is no vault to open (no LUKS volume on the device).
    SetupRequired,
    /// Locked, and the configured device is not there.
    NotAvailable,
}

impl VaultState {
    pub fn as_str(self) -> &'static str {
        match self {
            VaultState::Locked => "locked",
            VaultState::Unlocked => "unlocked",
            VaultState::Unknown => "unknown",
            VaultState::Locking => "locking",
            VaultState::Unlocking => "unlocking",
            VaultState::LockingSoon => "locking_soon",
            VaultState::Error => "error",
            VaultState::SetupRequired => "setup_required",
            VaultState::NotAvailable => "not_available",
        }
    }

    pub(crate) fn of(r: Reality) -> VaultState {
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

/// Why the vault is locked; its [`LockReason::detail`] is what the state detail,
/// the audit entry and the event say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockReason {
    /// `{"cmd":"lock"}` without a reason (the appliance's `manual_lock`).
    Manual,
    Idle,
    /// `"reason":"operator_request"`.
    Operator,
    /// `"reason":"suspend"` (the suspend unit), honoured per `vault.lock_on_suspend`.
    Suspend,
    /// `"reason":"incident:<id>"`: incident containment.
    Incident(String),
}

impl LockReason {
    pub fn detail(&self) -> String {
        match self {
            LockReason::Manual => "manual_lock".into(),
            LockReason::Idle => "auto_lock_idle".into(),
            LockReason::Operator => "operator_request".into(),
            LockReason::Suspend => "suspend".into(),
            LockReason::Incident(id) => format!("incident:{id}"),
        }
    }

    /// From a request's validated `reason` (see
    /// [`crate::control::protocol::valid_lock_reason`]).
    pub fn from_request(r: &str) -> Option<LockReason> {
        match r {
            "operator_request" => Some(LockReason::Operator),
            "suspend" => Some(LockReason::Suspend),
            _ => r
                .strip_prefix("incident:")
                .filter(|id| crate::control::protocol::valid_name(id, 64))
                .map(|id| LockReason::Incident(id.into())),
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
    /// The TPM audit anchor to keep: (TCTI, NV index).
    pub audit_anchor: Option<(String, u32)>,
    /// The state file first, then the compatibility path if configured.
    pub state_files: Vec<PathBuf>,
    pub allow: BTreeMap<String, Allow>,
    /// `vault.max_inhibit`: the longest an inhibitor may hold off the idle lock.
    pub max_inhibit_s: u64,
    /// `vault.lock_on_suspend`: honour `lock` with reason `suspend`.
    pub lock_on_suspend: bool,
    /// The keyring passphrase cache dropped at every lock (`cryptsetup`: the
    /// passphrase typed at boot stays 150 s in root's user keyring otherwise, and
    /// a lock, above all one before suspend, must leave no secret in RAM).
    pub forget_cache_on_lock: Option<String>,
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
            audit_anchor: cfg
                .audit
                .tpm_anchor
                .then(|| (cfg.tpm.tcti.clone(), cfg.audit.tpm_nv_index)),
            state_files,
            allow: cfg.control.allow.clone(),
            max_inhibit_s: cfg.vault.max_inhibit,
            lock_on_suspend: cfg.vault.lock_on_suspend,
            forget_cache_on_lock: Some("cryptsetup".into()),
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
        Err(_) => return (VaultState::Error, "probe_failed".into()),
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

/// The shell around [`Core`]: same calls, with the effects performed.
pub struct Machine {
    core: Core,
    gate: Gate,
    tokens: Option<tokens::Store>,
    metrics: Metrics,
    textfile: Option<PathBuf>,
    lockout_path: PathBuf,
    audit_path: Option<PathBuf>,
    audit_rotate_size: u64,
    state_files: Vec<PathBuf>,
    anchoring: Option<anchoring::Anchoring>,
    /// The last event's sequence number (watchers see it increase by one per
    /// event, so a gap means a line was lost).
    seq: u64,
    /// Event lines not yet fanned out by the event loop.
    events: Vec<Vec<u8>>,
    /// systemd's `$NOTIFY_SOCKET`, when run as a `Type=notify` service.
    notify: Option<super::notify::Notifier>,
}

impl Machine {
    /// Read the boot path's hint and the persisted lockout, derive the state from
    /// reality, audit the start and publish the state file.
    pub fn start(s: Settings, backend: Box<dyn VaultBackend>, now: Now) -> Machine {
        let anchor = s.audit_anchor.as_ref().map(|(tcti, index)| {
            Box::new(super::tpm_anchor::TpmAnchor::new(tcti, *index)) as Box<dyn Anchor + Send>
        });
        Machine::start_with_anchor(s, backend, anchor, now)
    }

    /// [`Machine::start`] with the audit anchor given (a fake one in tests).
    pub fn start_with_anchor(
        s: Settings,
        backend: Box<dyn VaultBackend>,
        anchor: Option<Box<dyn Anchor + Send>>,
        now: Now,
    ) -> Machine {
        // Before anything new is appended: extending on top of a gap would read
        // as tampering.
        let mut anchoring = None;
        let mut notes = Vec::new();
        if let (Some(a), Some(log)) = (anchor, &s.audit_path) {
            let mut an = anchoring::Anchoring::new(a);
            notes = an.sync(log);
            anchoring = Some(an);
        }
        let hint_full = s
            .state_files
            .first()
            .and_then(|p| crate::handoff::read_boot_hint_full(p));
        let boot_tpm_s = hint_full.as_ref().and_then(|h| h.tpm_unseal_seconds);
        let tpm_refusal = hint_full
            .as_ref()
            .map(|h| h.tpm_refusal.clone())
            .unwrap_or_default();
        let hint = hint_full.map(|h| (h.state, h.detail));
        let lockout = Lockout::load(&s.lockout_path).map_err(|e| e.to_string());
        let lockout_path = s.lockout_path.clone();
        let audit_path = s.audit_path.clone();
        let audit_rotate_size = s.audit_rotate_size;
        let state_files = s.state_files.clone();
        // Until `with_access` gives the full control configuration: the
        // `control.allow` table the settings carry (no roles, no tokens).
        let policy = roles::Policy::from_config(&crate::config::ControlConfig {
            allow: s.allow.clone(),
            ..crate::config::ControlConfig::default()
        })
        .unwrap_or_else(|_| {
            roles::Policy::from_config(&crate::config::ControlConfig::default())
                .expect("the default control configuration is valid")
        });
        let (mut core, fx) = Core::start(s, backend, hint, lockout, now);
        core.tpm_refusal = tpm_refusal;
        let mut m = Machine {
            core,
            gate: Gate::new(policy),
            tokens: None,
            metrics: Metrics::new(),
            textfile: None,
            lockout_path,
            audit_path,
            audit_rotate_size,
            state_files,
            anchoring,
            seq: 0,
            events: Vec::new(),
            notify: None,
        };
        if let Some(secs) = boot_tpm_s {
            m.metrics.boot_tpm_unseal(secs);
        }
        m.perform(fx);
        m.note(notes);
        m
    }

    /// Authorise with the configuration's roles, grants, rate limits and token
    /// file, and write the metrics textfile to `textfile_dir` on each change.
    pub fn with_access(
        mut self,
        policy: roles::Policy,
        tokens_file: &Path,
        textfile_dir: Option<&Path>,
    ) -> Machine {
        self.gate = Gate::new(policy);
        let mut store = tokens::Store::new(tokens_file);
        if let Some(e) = store.news.take() {
            super::log_warn(&format!("{e}; token clients are refused until it is fixed"));
        }
        self.tokens = Some(store);
        self.textfile = textfile_dir.map(|d| d.join(super::metrics::TEXTFILE_NAME));
        // The start's counts are still unwritten (there was no path): now.
        self.write_textfile();
        self
    }

    /// May `peer` hold a connection at all: some command is granted to it, or a
    /// token could be presented on it.
    pub fn may_connect(&mut self, peer: &Peer) -> bool {
        !self.gate.policy().for_peer(peer).commands.is_empty()
            || self.tokens.as_mut().is_some_and(|t| t.any_usable())
    }

    pub fn state(&self) -> VaultState {
        self.core.state()
    }

    pub fn detail(&self) -> &str {
        self.core.detail()
    }

    /// When the caller must next call [`Machine::on_timer`] (CLOCK_BOOTTIME ms);
    /// `None`: nothing is scheduled.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.core.next_wakeup()
    }

    /// The state as `uid` sees it.
    pub fn status(&self, uid: u32, now: Now) -> StatusReply {
        self.core.status(uid, now)
    }

    /// Activity from outside the socket (the activity file).
    pub fn activity(&mut self, now: Now) {
        let fx = self.core.activity(now);
        self.perform(fx);
    }

    /// Authorise and run one request from `peer` (no token).
    pub fn handle(&mut self, peer: &Peer, req: Request, now: Now) -> Response {
        self.request(0, peer, None, req, now).0
    }

    /// [`Machine::request`] without a token, on connection `conn`.
    pub fn handle_on(&mut self, conn: u64, peer: &Peer, req: Request, now: Now) -> Response {
        self.request(conn, peer, None, req, now).0
    }

    /// Identify (by `token` if one was presented, else by the peer's
    /// credentials), authorise and rate-limit once, then run one request. The
    /// bool: the request was allowed to run (it counts as a connection's progress).
    /// `conn` is the connection (whose close releases the inhibitors it took); an
    /// allowed `watch` is answered with the stream's first line: the current
    /// state, carrying the sequence number of the last event before it.
    pub fn request(
        &mut self,
        conn: u64,
        peer: &Peer,
        token: Option<tokens::Presented>,
        req: Request,
        now: Now,
    ) -> (Response, bool) {
        let who = match token {
            None => self.gate.policy().for_peer(peer),
            Some(p) => {
                let found = match &mut self.tokens {
                    Some(store) => store.lookup(&p, now.wall_s()),
                    None => Err(tokens::Refused {
                        why: crate::control::roles::TokenRefusal::StoreUnreadable,
                        name: None,
                        message: "this supervisor accepts no tokens".into(),
                    }),
                };
                if let Some(e) = self.tokens.as_mut().and_then(|t| t.news.take()) {
                    super::log_warn(&format!("{e}; token clients are refused until it is fixed"));
                }
                match found {
                    Ok(a) => self.gate.policy().for_token(&a.name, &a.role, peer),
                    Err(r) => {
                        // Charged to the presenting uid: otherwise a stream of bad
                        // tokens (each a stat, a hash and a comparison with every
                        // entry) would be the one request nobody limits.
                        let by_uid = self.gate.policy().for_peer(peer);
                        let (limited, notes) = self.gate.throttle(&by_uid, req.name(), now.mono_ms);
                        if let Some(retry_after) = limited {
                            return self.refuse_limited(&by_uid.name, notes, retry_after);
                        }
                        let notes =
                            self.gate
                                .token_refused(peer, r.name.as_deref(), r.why, now.mono_ms);
                        self.metrics.token_refused(r.why.as_str());
                        self.notes(notes);
                        return (Response::failed(&r.message, None), false);
                    }
                }
            }
        };
        let cmd = req.name();
        let (verdict, notes) = self.gate.decide(&who, cmd, now.mono_ms);
        match verdict {
            Verdict::Allowed => self.notes(notes),
            Verdict::Denied => {
                self.notes(notes);
                let msg = match &who.token {
                    None => crate::control::protocol::ProtocolError::PermissionDenied {
                        uid: peer.uid,
                        cmd,
                    }
                    .to_string(),
                    // The token file edited while running (checked at start only).
                    Some(name) if !self.gate.policy().has_role(&who.role) => format!(
                        "permission denied: token `{name}` has role `{}`, which does not \
                         exist in the configuration; ask the administrator to fix the \
                         token file or define the role",
                        who.role.escape_default()
                    ),
                    Some(name) => format!(
                        "permission denied: token `{name}` (role {}) may not run `{cmd}`",
                        who.role
                    ),
                };
                return (Response::failed(&msg, None), false);
            }
            Verdict::RateLimited { retry_after } => {
                return self.refuse_limited(&who.name, notes, retry_after);
            }
        }
        if matches!(req, Request::Metrics) {
            return (Response::metrics(self.metrics.render()), true);
        }
        if matches!(req, Request::Unlock(_)) {
            self.retry_audit();
        }
        let timed = matches!(
            req,
            Request::Lock | Request::LockBecause(_) | Request::Unlock(_)
        );
        let watch = matches!(req, Request::Watch);
        let started = std::time::Instant::now();
        let (r, mut fx) = self.core.run(conn, peer, &who.name, req, now);
        if timed {
            self.time_sequence(&fx, started);
        }
        // Every entry this request caused names who asked (`token:ci`, `uid:1000`).
        for e in &mut fx {
            if let Effect::Audit { fields, .. } = e {
                if !fields.iter().any(|(k, _)| *k == "identity") {
                    fields.push(("identity", Field::Str(who.name.clone())));
                }
            }
        }
        self.perform(fx);
        if watch && r.succeeded() {
            let st = self.core.status(peer.uid, now);
            let mut m = serde_json::Map::new();
            m.insert("seq".into(), self.seq.into());
            m.insert("event".into(), "state".into());
            m.insert("state".into(), st.state.into());
            m.insert("detail".into(), st.detail.into());
            if let Some(l) = st.lock_in_seconds {
                m.insert("lock_in_seconds".into(), l.into());
            }
            if let Some(msg) = st.message {
                m.insert("message".into(), msg.into());
            }
            return (Response::Event(m), true);
        }
        (r, true)
    }

    /// Answer a request over its identity's rate limit (counted; the textfile
    /// is written once per run, not per refused request).
    fn refuse_limited(
        &mut self,
        identity: &str,
        notes: Vec<Note>,
        retry_after: u64,
    ) -> (Response, bool) {
        let begun = notes.iter().any(|n| n.event == "rate_limited");
        self.notes(notes);
        self.metrics.rate_limited(identity);
        if begun {
            self.metrics.mark_changed();
            self.write_textfile();
        }
        (Response::failed("rate limited", Some(retry_after)), false)
    }

    /// A line that is not a request (bad JSON, unknown command, a field of the
    /// wrong type): answered with `error`, but charged to the peer's rate limit
    /// first, or a stream of them (each a JSON parse of up to 64 KiB) would be
    /// the way around it.
    pub fn malformed(&mut self, peer: &Peer, error: &str, now: Now) -> Response {
        let who = self.gate.policy().for_peer(peer);
        let (limited, notes) = self.gate.throttle(&who, "invalid_request", now.mono_ms);
        if let Some(retry_after) = limited {
            return self.refuse_limited(&who.name, notes, retry_after).0;
        }
        self.notes(notes);
        Response::failed(error, None)
    }

    /// A request line over the limit was refused (and its connection closed):
    /// audited, coalesced per uid, without anything it carried.
    pub fn oversized(&mut self, peer: &Peer, now: Now) {
        let notes = self.gate.oversized(peer, now.mono_ms);
        self.notes(notes);
    }

    /// A lock or unlock sequence that succeeded: how long it took.
    fn time_sequence(&mut self, fx: &[Effect], started: std::time::Instant) {
        let secs = started.elapsed().as_secs_f64();
        for e in fx {
            if let Effect::Audit { event, .. } = e {
                match *event {
                    "lock" => self.metrics.lock_took(secs),
                    "unlock" => self.metrics.unlock_took(secs),
                    _ => {}
                }
            }
        }
    }

    /// Append the gate's entries (and log what it asks to).
    fn notes(&mut self, notes: Vec<Note>) {
        let fx = notes
            .into_iter()
            .flat_map(|n| {
                let fields = n
                    .fields
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            match v {
                                Val::Str(s) => Field::Str(s),
                                Val::UInt(u) => Field::UInt(u),
                            },
                        )
                    })
                    .collect();
                let log = n.log.map(|m| Effect::Log(Priority::Warning, m));
                std::iter::once(Effect::Audit {
                    event: n.event,
                    fields,
                })
                .chain(log)
            })
            .collect();
        self.perform(fx);
    }

    /// Rewrite the textfile if a metric it shows changed.
    fn write_textfile(&mut self) {
        let Some(path) = &self.textfile else {
            return;
        };
        if !self.metrics.take_dirty() {
            return;
        }
        // A directory every user may write (/tmp, a 0777 one): anyone could
        // forge the file node-exporter serves, or put a symlink there and have
        // root create vaultguard.prom wherever it points. Refused, as the
        // control socket's directory is.
        if let Some(why) = path.parent().and_then(textfile_dir_unsafe) {
            super::log_warn(&format!(
                "not writing the metrics textfile {}: {why}; point metrics.textfile_dir \
                 at a directory only its owner can write (`chmod o-w`)",
                path.display()
            ));
            return;
        }
        // 0644: node-exporter runs as its own user and must read it.
        if let Err(e) =
            crate::atomic_file::write_atomic(path, self.metrics.render().as_bytes(), 0o644, 0o755)
        {
            super::log_warn(&format!(
                "cannot write the metrics textfile {}: {e}",
                path.display()
            ));
        }
    }

    /// Connection `conn` closed: release the inhibitors it did not keep.
    pub fn disconnected(&mut self, conn: u64, now: Now) {
        let fx = self.core.disconnected(conn, now);
        self.perform(fx);
    }

    /// The `seq` of the newest event line (taken or not).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The event lines since the last call, in order, for the watchers; the last
    /// one has [`Machine::seq`], the ones before it one less each.
    pub fn take_events(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.events)
    }

    /// Lock now (`uid`: who asked; `None`: the supervisor itself).
    pub fn lock(&mut self, reason: LockReason, uid: Option<u32>, now: Now) -> Response {
        let (r, fx) = self.core.lock(reason, uid, now);
        self.perform(fx);
        r
    }

    /// Unlock with `passphrase` on behalf of `uid`.
    pub fn unlock(&mut self, passphrase: &SecretBytes, uid: u32, now: Now) -> Response {
        self.retry_audit();
        let (r, fx) = self.core.unlock(passphrase, uid, now);
        self.perform(fx);
        r
    }

    /// Tell systemd the supervisor is ready (the socket is bound and the state
    /// derived), and from now on each state change (`STATUS=`) and the stop.
    pub fn notify_ready(&mut self, mut n: super::notify::Notifier) {
        n.ready(self.state().as_str(), self.detail());
        self.notify = Some(n);
    }

    /// The supervisor is stopping (the vault is left as it is).
    pub fn stopping(&mut self) {
        if let Some(n) = &self.notify {
            n.stopping();
        }
        // Counts of coalesced entries first: a stop loses none.
        let notes = self.gate.flush();
        self.notes(notes);
        let fx = self.core.stopping();
        self.perform(fx);
    }

    /// The idle timer fired (or the caller looked at the clock): warn or lock.
    pub fn on_timer(&mut self, now: Now) {
        let started = std::time::Instant::now();
        let fx = self.core.on_timer(now);
        self.time_sequence(&fx, started);
        self.perform(fx);
    }

    /// While auditing fails, try the core's `audit_resumed` entry before an
    /// unlock; if it is written, auditing works again.
    fn retry_audit(&mut self) {
        let Some(Effect::Audit { event, fields }) = self.core.audit_retry() else {
            return;
        };
        if self.append(event, &fields).is_ok() {
            let fx = self.core.audit_recovered();
            self.perform(fx);
        }
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        for e in &effects {
            self.metrics.observe(e);
        }
        for e in effects {
            match e {
                Effect::Audit { event, fields } => {
                    if let Err(err) = self.append(event, &fields) {
                        super::log(Priority::Warning, &format!("`{event}` not audited: {err}"));
                        self.core.audit_failed(err.to_string());
                    }
                }
                Effect::Publish(snap) => {
                    // Here and never on a timer: systemd hears of a change when
                    // the state file does.
                    if let Some(n) = &mut self.notify {
                        n.status(&snap.state, &snap.detail);
                    }
                    for path in &self.state_files {
                        if let Err(e) = state_file::write(path, &snap) {
                            super::log_warn(&format!(
                                "cannot write state file {}: {e}",
                                path.display()
                            ));
                        }
                    }
                }
                Effect::SaveLockout(file) => {
                    if let Err(e) = Lockout::save(&file, &self.lockout_path) {
                        super::log_warn(&e.to_string());
                    }
                }
                Effect::Log(p, msg) => super::log(p, &msg),
                Effect::ForgetCache(name) => match crate::keyring::cache::forget(&name) {
                    Ok(true) => super::log(
                        Priority::Info,
                        &format!(
                            "lock: dropped the passphrase cache (user key `{name}`) from the \
                             keyring"
                        ),
                    ),
                    Ok(false) => {}
                    Err(e) => super::log_warn(&format!(
                        "lock: cannot drop the passphrase cache: {e}; drop it with `keyctl \
                         purge user {name}`"
                    )),
                },
                Effect::Event { event, fields } => {
                    self.seq += 1;
                    let mut m = serde_json::Map::new();
                    m.insert("seq".into(), self.seq.into());
                    m.insert("event".into(), event.into());
                    for (k, v) in fields {
                        let v: serde_json::Value = match v {
                            Field::Str(s) => s.into(),
                            Field::UInt(n) => n.into(),
                            Field::Int(n) => n.into(),
                        };
                        m.insert(k.into(), v);
                    }
                    self.events.push(Response::Event(m).to_line());
                }
            }
        }
        self.write_textfile();
    }

    fn append(
        &mut self,
        event: &str,
        fields: &[(&'static str, Field)],
    ) -> Result<(), audit::AuditError> {
        let Some(path) = self.audit_path.clone() else {
            return Ok(());
        };
        let values: Vec<(&str, audit::Value<'_>)> =
            fields.iter().map(|(k, v)| (*k, v.as_value())).collect();
        let appended = audit::append_entries(&path, audit::now_ms(), event, &values)?;
        if let Some(an) = &mut self.anchoring {
            let notes = an.after_append(&path, &appended);
            self.note(notes);
        }
        if let Some(started) = self.rotate_audit_if_large(&path) {
            if let Some(an) = &mut self.anchoring {
                let notes = an.after_append(&path, &started);
                self.note(notes);
            }
        }
        Ok(())
    }

    /// Record what anchoring asked for.
    fn note(&mut self, notes: Vec<anchoring::Note>) {
        for n in notes {
            match n {
                anchoring::Note::Warn(m) => super::log_warn(&m),
                anchoring::Note::Info(m) => super::log_info(&m),
                anchoring::Note::Audit(event, fields) => {
                    let fields: Vec<(&'static str, Field)> = fields
                        .into_iter()
                        .map(|(k, v)| (k, Field::Str(v)))
                        .collect();
                    if let Err(e) = self.append(event, &fields) {
                        super::log_warn(&format!("`{event}` not audited: {e}"));
                        self.core.audit_failed(e.to_string());
                    }
                }
            }
        }
    }

    /// Rotate past the configured size; what the new segment starts with, if it did.
    fn rotate_audit_if_large(&self, path: &Path) -> Option<audit::Appended> {
        let max = self.audit_rotate_size;
        if max == 0 || std::fs::metadata(path).map_or(true, |m| m.len() < max) {
            return None;
        }
        match audit::rotate_entries(path) {
            Ok(Some((seg, started))) => {
                super::log_info(&format!(
                    "audit log rotated: {} closed as {}",
                    path.display(),
                    seg.display()
                ));
                Some(started)
            }
            Ok(None) => None,
            Err(e) => {
                super::log_warn(&format!("audit log rotation failed: {e}"));
                None
            }
        }
    }
}

/// Why the textfile's directory is not safe to write as root, if it is not:
/// every user may write it, or it is a symlink in a directory every user may
/// write (which anyone could have pointed elsewhere).
fn textfile_dir_unsafe(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let world = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o002 != 0);
    if world(dir) {
        return Some(format!("{} is writable by every user", dir.display()));
    }
    let link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    if link && dir.parent().is_some_and(world) {
        return Some(format!(
            "{} is a symlink in a directory every user may write",
            dir.display()
        ));
    }
    None
}
