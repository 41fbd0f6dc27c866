//! Decisions about inhibitors and reasoned locks: `inhibit`, `release`, their
//! expiry on the core's clock and on a client's disconnect, an operator lock
//! overriding them, and `lock` with a `reason` (suspend honoured or declined per
//! `vault.lock_on_suspend`). Bookkeeping is in [`super::inhibit`]; this file
//! decides and returns effects like the rest of the core.

use super::core::Core;
use super::effects::Field;
use super::inhibit::{Inhibitor, Refused, MAX_INHIBITORS, MAX_INHIBITORS_PER_HOLDER};
use super::{LockReason, Now, VaultState};
use crate::control::protocol::{InhibitRequest, Response};
use crate::control::Peer;

/// Renewals and refusals from one uid are audited at most this often (the rest
/// counted in the next entry's `suppressed_since_last`).
const INHIBIT_AUDIT_INTERVAL_MS: u64 = 60_000;

impl Core {
    /// `lock` with a validated `reason`.
    pub(super) fn lock_because(&mut self, reason: &str, peer: &Peer, now: Now) -> Response {
        let Some(reason) = LockReason::from_request(reason) else {
            // The protocol validated it; a reason it let through that the core
            // does not know is refused rather than guessed.
            return Response::failed(&format!("unknown lock reason `{reason}`"), None);
        };
        if reason == LockReason::Suspend && !self.s.lock_on_suspend {
            self.audit(
                "lock_declined",
                vec![
                    ("reason", "suspend".into()),
                    ("uid", peer.uid.into()),
                    ("why", "vault.lock_on_suspend is false".into()),
                ],
            );
            return Response::ok(Some(self.state.as_str())).with_warning(
                "not locked for suspend: vault.lock_on_suspend is false in the configuration",
            );
        }
        self.idle.touch(now.mono_ms, now.wall_ms);
        self.lock_sequence(reason, Some(peer.uid), now)
    }

    /// A lock succeeded: the inhibitors held off only the idle lock, and this
    /// one (an operator's, a suspend's, an incident's) overrides them. Returns
    /// their names for the response and the audit entry.
    pub(super) fn override_inhibitors(&mut self, reason: &LockReason, _now: Now) -> Vec<String> {
        let gone = self.inhibitors.clear();
        for (who, i) in &gone {
            self.fx.event(
                "release",
                vec![
                    ("who", who.as_str().into()),
                    ("holder", i.holder.as_str().into()),
                    ("uid", i.uid.into()),
                    ("cause", format!("overridden:{}", reason.detail()).into()),
                ],
            );
        }
        gone.into_iter().map(|(who, _)| who).collect()
    }

    pub(super) fn inhibit(
        &mut self,
        conn: u64,
        peer: &Peer,
        holder: &str,
        req: InhibitRequest,
        now: Now,
    ) -> Response {
        let max = self.s.max_inhibit_s;
        if req.seconds > max {
            let msg = format!(
                "`seconds` {} is more than the {max} s allowed (vault.max_inhibit); ask for at \
                 most {max} and renew if the job takes longer",
                req.seconds
            );
            self.inhibit_refused(peer, &req.who, "too_long", now);
            return Response::failed(&msg, None);
        }
        let inh = Inhibitor {
            why: req.why.clone(),
            holder: holder.to_string(),
            uid: peer.uid,
            pid: peer.pid,
            conn,
            keep: req.keep,
            until_ms: now.mono_ms.saturating_add(req.seconds.saturating_mul(1000)),
        };
        match self.inhibitors.add(&req.who, inh) {
            Ok(renewed) => {
                let fields = vec![
                    ("who", req.who.as_str().into()),
                    ("why", req.why.as_str().into()),
                    ("seconds", req.seconds.into()),
                    ("holder", holder.into()),
                    ("uid", peer.uid.into()),
                    ("pid", i64::from(peer.pid).into()),
                    ("keep", u64::from(req.keep).into()),
                    ("renewed", u64::from(renewed).into()),
                ];
                if !renewed {
                    self.audit("inhibit", fields);
                } else if let Some(n) = self.throttle(peer.uid, now) {
                    let mut fields = fields;
                    fields.push(("suppressed_since_last", n.into()));
                    self.audit("inhibit", fields);
                } else {
                    self.fx.event("inhibit", fields);
                }
                // Inside the warning window, an inhibitor is as good as activity.
                if self.state == VaultState::LockingSoon {
                    self.set(VaultState::Unlocked, &self.detail.clone(), now);
                }
                self.publish(now);
                Response::ok(None)
            }
            Err(e) => {
                let (code, msg) = match e {
                    Refused::HeldByOther { holder } => (
                        "held_by_other",
                        format!(
                            "inhibitor `{}` is held by {holder}; choose another name",
                            req.who
                        ),
                    ),
                    Refused::PerHolder => (
                        "too_many_for_holder",
                        format!(
                            "{holder} already holds {MAX_INHIBITORS_PER_HOLDER} inhibitors, the \
                             most one identity may; release some first"
                        ),
                    ),
                    Refused::Total => (
                        "too_many",
                        format!(
                            "{MAX_INHIBITORS} inhibitors are held, the most allowed; try again \
                             after some are released"
                        ),
                    ),
                };
                self.inhibit_refused(peer, &req.who, code, now);
                Response::failed(&msg, None)
            }
        }
    }

    pub(super) fn release(&mut self, peer: &Peer, holder: &str, who: &str, now: Now) -> Response {
        match self.inhibitors.release(who, holder) {
            Ok(Some(i)) => {
                self.released(who, &i, "released", Some(peer.uid), now);
                Response::ok(None)
            }
            Ok(None) => Response::failed(&format!("no inhibitor named `{who}` is held"), None),
            Err(Refused::HeldByOther { holder }) => Response::failed(
                &format!("inhibitor `{who}` is held by {holder}; only it or root may release it"),
                None,
            ),
            Err(_) => Response::failed("release refused", None),
        }
    }

    /// Connection `conn` closed: its inhibitors go, except those it asked to keep.
    pub fn disconnected(&mut self, conn: u64, now: Now) -> Vec<super::Effect> {
        for (who, i) in self.inhibitors.disconnected(conn) {
            self.released(&who, &i, "disconnected", None, now);
        }
        self.fx.take()
    }

    /// Expire inhibitors due by `now`. Returns true while some are still held
    /// (then the idle lock waits).
    pub(super) fn expire_inhibitors(&mut self, now: Now) -> bool {
        for (who, i) in self.inhibitors.expire(now.mono_ms) {
            self.released(&who, &i, "expired", None, now);
        }
        !self.inhibitors.is_empty()
    }

    /// One inhibitor is gone. When it was the last, the idle period starts
    /// again from now: a vault kept open for a job is not locked the instant the
    /// job ends, and the warning window comes first.
    fn released(&mut self, who: &str, i: &Inhibitor, cause: &str, by: Option<u32>, now: Now) {
        let mut fields: Vec<(&'static str, Field)> = vec![
            ("who", who.into()),
            ("holder", i.holder.as_str().into()),
            ("uid", i.uid.into()),
            ("cause", cause.into()),
        ];
        if let Some(u) = by {
            fields.push(("by_uid", u.into()));
        }
        self.audit("release", fields);
        if self.inhibitors.is_empty() {
            self.touch(now);
        } else {
            self.publish(now);
        }
    }

    fn inhibit_refused(&mut self, peer: &Peer, who: &str, code: &str, now: Now) {
        if let Some(n) = self.throttle(peer.uid, now) {
            self.audit(
                "inhibit_refused",
                vec![
                    ("who", who.into()),
                    ("uid", peer.uid.into()),
                    ("pid", i64::from(peer.pid).into()),
                    ("error", code.into()),
                    ("suppressed_since_last", n.into()),
                ],
            );
        }
    }

    /// `Some(suppressed)` when an entry for `uid` may be written now.
    fn throttle(&mut self, uid: u32, now: Now) -> Option<u32> {
        let e = self.inhibit_audited.entry(uid).or_insert((0, 0));
        if e.0 != 0 && now.mono_ms.saturating_sub(e.0) < INHIBIT_AUDIT_INTERVAL_MS {
            e.1 = e.1.saturating_add(1);
            return None;
        }
        let n = e.1;
        *e = (now.mono_ms.max(1), 0);
        Some(n)
    }
}
