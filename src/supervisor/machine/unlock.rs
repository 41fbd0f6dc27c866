//! The unlock sequence and the failed-attempt lockout around it: lockout check,
//! a working audit log, the passphrase checked against a keyslot whatever the
//! mapping's state, activate, mount, start the services.

use super::core::Core;
use super::Now;
use super::VaultState;
use crate::control::protocol::{Response, UNLOCK_FAILED};
use crate::secret::SecretBytes;
use crate::supervisor::backend::BackendError;
use crate::supervisor::lockout::Scope;

impl Core {
    /// Unlock with `passphrase` on behalf of `uid`.
    pub fn unlock(
        &mut self,
        passphrase: &SecretBytes,
        uid: u32,
        now: Now,
    ) -> (Response, Vec<super::Effect>) {
        let r = self.unlock_sequence(passphrase, uid, now);
        (r, self.fx.take())
    }

    pub(super) fn unlock_sequence(
        &mut self,
        passphrase: &SecretBytes,
        uid: u32,
        now: Now,
    ) -> Response {
        if let Some(wait) = self.lockout.remaining(&self.s.policy, uid, now.mono_ms) {
            self.audit(
                "unlock_refused",
                vec![("uid", uid.into()), ("retry_after", wait.into())],
            );
            return Response::failed(
                &format!("too many failed unlock attempts; try again in {wait} s"),
                Some(wait),
            );
        }
        if passphrase.is_empty() {
            return Response::failed("empty passphrase", None);
        }
        // An unlock nobody can account for is what the log exists to prevent;
        // locking goes on regardless (it only makes the vault safer).
        if let Some(err) = &self.audit_error {
            let refusal = format!(
                "unlock refused: the audit log cannot be written ({err}); fix it, then try again"
            );
            self.fx.warn(refusal.clone());
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
                self.touch(now);
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
            vec![("uid", uid.into()), ("method", "passphrase".into())],
        );
        self.fx.info("vault unlocked with a passphrase");
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
        let failures = self.lockout.failures_of(uid);
        self.audit(
            "unlock_failed",
            vec![
                ("uid", uid.into()),
                ("reason", "wrong_passphrase".into()),
                ("failures", failures.into()),
            ],
        );
        for t in &triggered {
            self.fx.warn(format!(
                "too many failed unlock attempts by {}: refusing their unlocks for {} s",
                t.scope, t.seconds
            ));
            let scope = match t.scope {
                Scope::Identity(u) => format!("uid:{u}"),
                Scope::Global => "global".to_string(),
            };
            self.audit(
                "lockout",
                vec![
                    ("scope", scope.into()),
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

    fn unlock_failed(&mut self, uid: u32, reason: &'static str, msg: &str, now: Now) -> Response {
        self.resync("unlock_failed", now);
        self.fx.warn(msg.to_string());
        self.audit(
            "unlock_failed",
            vec![
                ("uid", uid.into()),
                ("reason", reason.into()),
                ("error", msg.into()),
            ],
        );
        Response::failed(msg, None)
    }
}
