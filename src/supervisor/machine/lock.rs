//! The lock sequence: stop the services, sync, unmount, close the mapping, revoke
//! keyring entries. Never leaves the vault half-locked silently: a failure to
//! unmount restarts what was stopped, a failure to close mounts the vault again,
//! and the state is re-read from the kernel either way.

use super::core::Core;
use super::effects::Field;
use super::{LockReason, Now, VaultState};
use crate::control::protocol::Response;

impl Core {
    /// Lock now (`uid`: who asked; `None` for the idle timer).
    pub fn lock(
        &mut self,
        reason: LockReason,
        uid: Option<u32>,
        now: Now,
    ) -> (Response, Vec<super::Effect>) {
        let r = self.lock_sequence(reason, uid, now);
        (r, self.fx.take())
    }

    pub(super) fn lock_sequence(
        &mut self,
        reason: LockReason,
        uid: Option<u32>,
        now: Now,
    ) -> Response {
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
            self.forget_cache();
            let overrode = self.override_inhibitors(&reason, now);
            if !matches!(
                self.state,
                VaultState::Locked | VaultState::NotAvailable | VaultState::SetupRequired
            ) {
                self.set(VaultState::Locked, &reason.detail(), now);
            }
            // Nothing was locked, but the request is part of the record: an
            // `incident:` lock of a vault found locked must leave a trace (and
            // the inhibitors it overrode), without counting as a lock.
            let mut fields: Vec<(&'static str, Field)> = vec![
                ("reason", reason.detail().into()),
                ("state", self.state.as_str().into()),
            ];
            if let Some(u) = uid {
                fields.push(("uid", u.into()));
            }
            if !overrode.is_empty() {
                fields.push(("overrode", overrode.join(",").into()));
            }
            self.audit("already_locked", fields);
            return Response::ok(Some("locked")).with_overrode(overrode);
        }
        self.set(VaultState::Locking, &self.detail.clone(), now);

        let mut stopped = Vec::new();
        for unit in self.s.services.clone() {
            match self.backend.stop_service(&unit) {
                Ok(()) => stopped.push(unit),
                Err(e) => self.fx.warn(format!("could not stop {unit}: {e}")),
            }
        }
        if reality.mounted {
            if let Err(e) = self.backend.sync() {
                self.fx.warn(format!("sync before unmount failed: {e}"));
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
        self.forget_cache();
        self.set(VaultState::Locked, &reason.detail(), now);
        let mut fields: Vec<(&'static str, Field)> = vec![
            ("reason", reason.detail().into()),
            ("services_stopped", stopped.len().into()),
        ];
        if let Some(u) = uid {
            fields.push(("uid", u.into()));
        }
        if let Ok(n) = &revoke {
            fields.push(("keys_revoked", (*n).into()));
        }
        let overrode = self.override_inhibitors(&reason, now);
        if !overrode.is_empty() {
            fields.push(("overrode", overrode.join(",").into()));
        }
        self.audit("lock", fields);
        self.fx.info(format!("vault locked ({})", reason.detail()));
        match revoke {
            Ok(_) => Response::ok(Some("locked")).with_overrode(overrode),
            Err(e) => {
                let msg = format!(
                    "vault locked, but revoking its volume key from the kernel keyring failed: {e}"
                );
                self.fx.warn(msg.clone());
                self.audit("key_revoke_failed", vec![("error", msg.as_str().into())]);
                Response::failed(&msg, None).with_state("locked")
            }
        }
    }

    /// Drop the passphrase cache: the passphrase typed at boot would otherwise sit
    /// in root's keyring for up to 150 s after this lock (through a suspend).
    fn forget_cache(&mut self) {
        if let Some(name) = self.s.forget_cache_on_lock.clone() {
            self.fx.push(super::Effect::ForgetCache(name));
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
        if self.state == VaultState::Unknown {
            // Half-way: neither locked nor as it was. Say so, and what was done.
            self.message = Some(msg.to_string());
            self.set(VaultState::Error, "lock_incomplete", now);
        }
        let msg = format!("{msg}; the vault is {}", self.state.as_str());
        self.fx.warn(msg.clone());
        let mut fields: Vec<(&'static str, Field)> = vec![
            ("reason", reason.detail().into()),
            ("state", self.state.as_str().into()),
            ("error", msg.as_str().into()),
        ];
        if let Some(u) = uid {
            fields.push(("uid", u.into()));
        }
        self.audit("lock_failed", fields);
        Response::failed(&msg, None).with_state(self.state.as_str())
    }
}
