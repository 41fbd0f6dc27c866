//! Tests of the decision core: a recording fake backend, effects read as data, no
//! file system; and of the shell, which performs them on real files.

use super::*;
use crate::control::protocol::UNLOCK_FAILED;
use crate::supervisor::lockout::LockoutFile;
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
    /// What `presence` says (`None`: the default, ready).
    presence: Option<crate::supervisor::backend::Presence>,
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
    fn presence(&mut self) -> crate::supervisor::backend::Presence {
        self.w()
            .presence
            .unwrap_or(crate::supervisor::backend::Presence::Ready)
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

/// The core with every effect it returned kept, oldest first.
struct T {
    fake: Fake,
    core: Core,
    fx: Vec<Effect>,
}

fn settings() -> Settings {
    Settings {
        services: vec!["ollama.service".into(), "webui.service".into()],
        auto_lock_ms: Some(30 * 60_000),
        warn_before_ms: 60_000,
        policy: Policy {
            max_failed: 3,
            duration_s: 60,
            escalated_s: 900,
        },
        // Not used by the core: the shell performs the effects.
        lockout_path: "/nonexistent/lockout.json".into(),
        audit_path: None,
        audit_rotate_size: 0,
        audit_anchor: None,
        state_files: vec![],
        allow: crate::config::ControlConfig::default().allow,
        max_inhibit_s: 3600,
        lock_on_suspend: true,
        // The shell tests must not drop the test runner's real keyring cache.
        forget_cache_on_lock: None,
    }
}

fn at(s: u64) -> Now {
    Now {
        mono_ms: s * 1000,
        wall_ms: 1_700_000_000_000 + s * 1000,
    }
}

fn start(fake: Fake) -> T {
    start_with(settings(), fake, Ok(LockoutFile::default()))
}

fn start_with(s: Settings, fake: Fake, lockout: Result<LockoutFile, String>) -> T {
    let (core, fx) = Core::start(s, Box::new(fake.clone()), None, lockout, at(0));
    fake.calls();
    T { fake, core, fx }
}

impl T {
    fn handle(&mut self, peer: &Peer, req: Request, now: Now) -> Response {
        let (r, fx) = self.core.handle(peer, req, now);
        self.fx.extend(fx);
        r
    }
    fn lock(&mut self, reason: LockReason, uid: Option<u32>, now: Now) -> Response {
        let (r, fx) = self.core.lock(reason, uid, now);
        self.fx.extend(fx);
        r
    }
    fn unlock(&mut self, pass: &SecretBytes, uid: u32, now: Now) -> Response {
        let (r, fx) = self.core.unlock(pass, uid, now);
        self.fx.extend(fx);
        r
    }
    fn on_timer(&mut self, now: Now) {
        let fx = self.core.on_timer(now);
        self.fx.extend(fx);
    }
    fn state(&self) -> VaultState {
        self.core.state()
    }
    fn detail(&self) -> &str {
        self.core.detail()
    }
    fn next_wakeup(&self) -> Option<u64> {
        self.core.next_wakeup()
    }
    fn status(&self, uid: u32, now: Now) -> StatusReply {
        self.core.status(uid, now)
    }
    /// The audit events so far, in order.
    fn events(&self) -> Vec<&'static str> {
        self.fx
            .iter()
            .filter_map(|e| match e {
                Effect::Audit { event, .. } => Some(*event),
                _ => None,
            })
            .collect()
    }
    /// The fields of the last audit entry named `event`.
    fn audited(&self, event: &str) -> Vec<(&'static str, Field)> {
        self.fx
            .iter()
            .rev()
            .find_map(|e| match e {
                Effect::Audit { event: ev, fields } if *ev == event => Some(fields.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {event} audited: {:?}", self.fx))
    }
    /// The state file as last published.
    fn state_file(&self) -> serde_json::Value {
        let snap = self
            .fx
            .iter()
            .rev()
            .find_map(|e| match e {
                Effect::Publish(s) => Some(s),
                _ => None,
            })
            .expect("published");
        serde_json::to_value(snap).unwrap()
    }
    /// The lockout as last saved.
    fn saved_lockout(&self) -> Option<LockoutFile> {
        self.fx.iter().rev().find_map(|e| match e {
            Effect::SaveLockout(f) => Some(f.clone()),
            _ => None,
        })
    }
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
        (VaultState::Error, "probe_failed".into())
    );
    // A hint with a strange detail is not repeated to clients.
    assert_eq!(
        derive_state(ok(true, true), hint("unlocked", "<script>")).1,
        "found_unlocked"
    );
}

#[test]
fn lock_runs_the_sequence_in_order_and_audits() {
    let mut t = start(Fake::unlocked());
    let r = t.handle(&root(), Request::Lock, at(5));
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
    assert_eq!(t.state(), VaultState::Locked);
    assert_eq!(t.detail(), "manual_lock");
    assert_eq!(t.events(), ["supervisor_start", "lock"]);
    let sf = t.state_file();
    assert_eq!(sf["state"], "locked");
    assert_eq!(sf["detail"], "manual_lock");
    assert!(sf.get("auto_lock_at").is_none());
    // Locking again is harmless and still sweeps keys.
    let r = t.handle(&root(), Request::Lock, at(6));
    assert_eq!(line(&r)["success"], true);
    assert_eq!(t.fake.calls(), ["revoke"]);
}

/// Attack: an incident responder locks a vault that is already locked
/// (`lock --reason incident:IR-7`): the answer was success and the audit log had
/// no trace of the request or of the incident id. Now it is audited (and sent to
/// watchers) as `already_locked`, naming the reason and who asked; the state
/// detail keeps why the vault was locked.
#[test]
fn a_reasoned_lock_of_a_locked_vault_is_audited() {
    let mut t = start(Fake::unlocked());
    t.handle(&root(), Request::Lock, at(5));
    let r = t.handle(&root(), Request::LockBecause("incident:IR-7".into()), at(6));
    assert_eq!(line(&r)["state"], "locked");
    assert_eq!(t.events(), ["supervisor_start", "lock", "already_locked"]);
    let f = t.audited("already_locked");
    assert!(f.contains(&("reason", "incident:IR-7".into())), "{f:?}");
    assert!(f.contains(&("uid", 0u32.into())), "{f:?}");
    assert!(t.fx.iter().any(|e| matches!(
        e,
        Effect::Event {
            event: "already_locked",
            ..
        }
    )));
    assert_eq!(t.detail(), "manual_lock");
}

/// Attack: a passphrase typed at boot sits 150 s in root's keyring cache; a lock
/// (before suspend, say) within that time left it there. Every lock that ends
/// locked now drops the cache, also a lock of a vault already locked; a failed
/// lock (the vault still open) does not.
#[test]
fn every_lock_drops_the_passphrase_cache() {
    let forgets = |t: &T| {
        t.fx.iter()
            .filter(|e| matches!(e, Effect::ForgetCache(n) if n == "cryptsetup"))
            .count()
    };
    let s = Settings {
        forget_cache_on_lock: Some("cryptsetup".into()),
        ..settings()
    };
    let mut t = start_with(s.clone(), Fake::unlocked(), Ok(LockoutFile::default()));
    assert_eq!(forgets(&t), 0);
    t.handle(&root(), Request::Lock, at(5));
    assert_eq!(forgets(&t), 1);
    t.handle(&root(), Request::Lock, at(6));
    assert_eq!(forgets(&t), 2);
    let fake = Fake::unlocked();
    fake.w().busy = true;
    let mut t = start_with(s, fake, Ok(LockoutFile::default()));
    t.handle(&root(), Request::Lock, at(5));
    assert_eq!(t.state(), VaultState::Unlocked);
    assert_eq!(forgets(&t), 0);
}

#[test]
fn busy_mount_restarts_services_and_stays_unlocked() {
    let fake = Fake::unlocked();
    fake.w().busy = true;
    let mut t = start(fake);
    let r = t.handle(&root(), Request::Lock, at(5));
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
    assert_eq!(t.state(), VaultState::Unlocked);
    assert_eq!(t.state_file()["state"], "unlocked");
    assert_eq!(t.events(), ["supervisor_start", "lock_failed"]);
}

#[test]
fn failed_close_remounts_and_reports_the_truth() {
    let fake = Fake::unlocked();
    fake.w().close_fails = true;
    let mut t = start(fake);
    let v = line(&t.lock(LockReason::Manual, None, at(1)));
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
    // If the remount fails too, the state says so: `error`, with what failed
    // and what was done in status's `message`.
    t.fake.w().mount_fails = true;
    let v = line(&t.lock(LockReason::Manual, None, at(2)));
    assert_eq!(v["state"], "error");
    assert_eq!(t.state(), VaultState::Error);
    assert_eq!(t.detail(), "lock_incomplete");
    let msg = t
        .status(0, at(2))
        .message
        .expect("a message in state error");
    assert!(
        msg.contains("closing the mapping failed") && msg.contains("mounting it again failed"),
        "{msg}"
    );
}

#[test]
fn revoke_failure_is_reported_but_the_vault_is_locked() {
    let fake = Fake::unlocked();
    fake.w().revoke_fails = true;
    let mut t = start(fake);
    let v = line(&t.lock(LockReason::Manual, None, at(1)));
    assert_eq!(v["success"], false);
    assert_eq!(v["state"], "locked");
    assert!(v["error"].as_str().unwrap().contains("keyring"));
    assert_eq!(t.state(), VaultState::Locked);
}

#[test]
fn unlock_runs_activate_mount_start_and_resets_idle() {
    let mut t = start(Fake::default());
    assert_eq!(t.state(), VaultState::Locked);
    assert_eq!(t.next_wakeup(), None, "no deadline while locked");
    let r = t.handle(
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
    assert_eq!(t.state(), VaultState::Unlocked);
    assert_eq!(t.detail(), "passphrase");
    let s = t.status(0, at(110));
    assert_eq!(s.idle_seconds, 10);
    assert_eq!(s.lock_in_seconds, Some(30 * 60 - 10));
    assert_eq!(t.next_wakeup(), Some((100 + 29 * 60) * 1000));
    assert_eq!(t.events(), ["supervisor_start", "unlock"]);
    // Unlocking an unlocked vault still checks the passphrase (else any string
    // would count as activity and keep the vault open), and activates nothing.
    let r = t.unlock(&SecretBytes::from_slice(b"whatever"), 0, at(120));
    assert_eq!(line(&r)["error"], UNLOCK_FAILED);
    assert_eq!(t.fake.calls(), ["verify"]);
    assert_eq!(t.status(0, at(120)).idle_seconds, 20, "not activity");
    let r = t.unlock(&SecretBytes::from_slice(b"right"), 0, at(130));
    assert_eq!(line(&r)["success"], true);
    assert_eq!(t.fake.calls(), ["verify"]);
    assert_eq!(t.status(0, at(130)).idle_seconds, 0);
}

#[test]
fn an_open_but_unmounted_mapping_still_needs_the_right_passphrase() {
    // After a lock whose close failed, or a mount that failed at boot.
    let fake = Fake::default();
    fake.w().active = true;
    let mut t = start(fake);
    assert_eq!(t.state(), VaultState::Unknown);
    let r = t.handle(
        &root(),
        Request::Unlock(SecretBytes::from_slice(b"anything")),
        at(10),
    );
    assert_eq!(line(&r)["error"], UNLOCK_FAILED);
    assert_eq!(t.fake.calls(), ["verify"], "nothing mounted");
    assert!(!t.fake.w().mounted);
    assert_ne!(t.state(), VaultState::Unlocked);
    assert_eq!(t.events(), ["supervisor_start", "unlock_failed"]);
    assert!(t
        .audited("unlock_failed")
        .contains(&("reason", "wrong_passphrase".into())));
    let r = t.handle(
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
    assert_eq!(t.state(), VaultState::Unlocked);
}

#[test]
fn unlocks_wait_for_a_working_audit_log() {
    // The shell reports a failed append; until an append works again the core
    // refuses unlocks (and says why in status) but still locks.
    let mut t = start(Fake::unlocked());
    t.core
        .audit_failed("audit log /x: cannot open: loop".into());
    let v = line(&t.handle(&root(), Request::Status, at(1)));
    assert_eq!(v["audit_error"], "audit log /x: cannot open: loop");
    let v = line(&t.unlock(&SecretBytes::from_slice(b"right"), 0, at(2)));
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("audit log cannot be written"),
        "{v}"
    );
    assert!(t.fake.calls().is_empty(), "nothing was tried");
    let v = line(&t.lock(LockReason::Manual, Some(0), at(3)));
    assert_eq!(v["success"], true, "locking goes on: {v}");
    // The shell's retry entry names the error; once it is written, unlocks work.
    assert_eq!(
        t.core.audit_retry(),
        Some(Effect::Audit {
            event: "audit_resumed",
            fields: vec![("after_error", "audit log /x: cannot open: loop".into())]
        })
    );
    let fx = t.core.audit_recovered();
    assert!(
        matches!(&fx[..], [Effect::Log(Priority::Info, _)]),
        "{fx:?}"
    );
    assert_eq!(t.core.audit_retry(), None);
    let v = line(&t.unlock(&SecretBytes::from_slice(b"right"), 0, at(4)));
    assert_eq!(v["success"], true, "{v}");
}

#[test]
fn a_low_privilege_user_cannot_lock_root_out() {
    let mut t = start(Fake::default());
    let user = Peer {
        pid: 2,
        uid: 1000,
        gid: 1000,
        groups: vec![],
    };
    let mut allow = crate::config::ControlConfig::default().allow;
    allow.get_mut("unlock").unwrap().uids.push(1000);
    allow.get_mut("status").unwrap().uids.push(1000);
    t.core.s.allow = allow;
    for i in 0..5 {
        t.handle(&user, Request::Unlock(SecretBytes::from_slice(b"x")), at(i));
    }
    let v = line(&t.handle(&user, Request::Status, at(5)));
    assert_eq!(
        v["lockout_seconds"], 57,
        "3 failures at t=2 s: 60 s from there"
    );
    assert_eq!(t.status(0, at(5)).lockout_seconds, None);
    let v = line(&t.handle(
        &root(),
        Request::Unlock(SecretBytes::from_slice(b"right")),
        at(6),
    ));
    assert_eq!(v["success"], true, "{v}");
}

#[test]
fn wrong_passphrase_counts_and_locks_out_with_retry_after() {
    let mut t = start(Fake::default());
    let wrong = || Request::Unlock(SecretBytes::from_slice(b"wrong"));
    for i in 0..2 {
        let v = line(&t.handle(&root(), wrong(), at(10 + i)));
        assert_eq!(
            v,
            serde_json::json!({"success": false, "error": UNLOCK_FAILED})
        );
    }
    let v = line(&t.handle(&root(), wrong(), at(12)));
    assert_eq!(v["error"], UNLOCK_FAILED);
    assert_eq!(v["retry_after"], 60);
    assert_eq!(t.state(), VaultState::Locked);
    t.fake.calls();
    // Locked out: even the right passphrase is not tried.
    let v = line(&t.handle(
        &root(),
        Request::Unlock(SecretBytes::from_slice(b"right")),
        at(42),
    ));
    assert_eq!(v["success"], false);
    assert_eq!(v["retry_after"], 30);
    assert!(t.fake.calls().is_empty());
    assert_eq!(t.status(0, at(42)).lockout_seconds, Some(30));
    assert_eq!(t.state_file()["lockout_until"], 1_700_000_000 + 72);
    // A restart keeps the lockout (the shell hands the saved file back).
    let saved = t.saved_lockout().expect("saved");
    let t2 = start_with(settings(), t.fake.clone(), Ok(saved));
    assert_eq!(
        t2.status(0, at(0)).lockout_seconds,
        Some(60),
        "restarted at t=0 s"
    );
    let (core, _) = Core::start(
        settings(),
        Box::new(t.fake.clone()),
        None,
        Ok(t.saved_lockout().unwrap()),
        at(50),
    );
    assert_eq!(core.status(0, at(50)).lockout_seconds, Some(22));
    // After it expires the right passphrase works and clears the counters.
    let v = line(&t.unlock(&SecretBytes::from_slice(b"right"), 0, at(73)));
    assert_eq!(v["success"], true);
    assert_eq!(t.saved_lockout(), Some(LockoutFile::default()));
    let ev = t.events();
    assert_eq!(ev.iter().filter(|e| **e == "unlock_failed").count(), 3);
    assert!(ev.contains(&"lockout") && ev.contains(&"unlock_refused"));
    // No passphrase in any effect (audit, state, logs).
    let all = format!("{:?}", t.fx);
    assert!(!all.contains("wrong\"") && !all.contains("right"), "{all}");
}

#[test]
fn second_lockout_is_escalated() {
    let mut t = start(Fake::default());
    for i in 0..3 {
        t.unlock(&SecretBytes::from_slice(b"x"), 0, at(i));
    }
    assert_eq!(t.status(0, at(3)).lockout_seconds, Some(59));
    for i in 0..3 {
        t.unlock(&SecretBytes::from_slice(b"x"), 0, at(100 + i));
    }
    assert_eq!(t.status(0, at(102)).lockout_seconds, Some(900));
}

#[test]
fn device_error_does_not_count_as_a_failed_attempt() {
    let fake = Fake::default();
    fake.w().device_error = true;
    let mut t = start(fake);
    for i in 0..5 {
        let v = line(&t.unlock(&SecretBytes::from_slice(b"right"), 0, at(i)));
        assert!(
            v["error"].as_str().unwrap().starts_with("device error: "),
            "{v}"
        );
        assert!(v.get("retry_after").is_none());
    }
    assert_eq!(t.status(0, at(5)).lockout_seconds, None);
}

#[test]
fn failed_mount_closes_the_mapping_again() {
    let fake = Fake::default();
    fake.w().mount_fails = true;
    let mut t = start(fake);
    let v = line(&t.unlock(&SecretBytes::from_slice(b"right"), 0, at(1)));
    assert!(
        v["error"].as_str().unwrap().contains("closed it again"),
        "{v}"
    );
    assert_eq!(t.fake.calls(), ["activate", "mount", "close", "revoke"]);
    assert_eq!(t.state(), VaultState::Locked);
}

#[test]
fn idle_deadline_warns_then_auto_locks() {
    let mut t = start(Fake::unlocked());
    assert_eq!(t.next_wakeup(), Some(29 * 60_000));
    t.on_timer(at(29 * 60));
    // Inside the warning window: `locking_soon`, and the watchers are warned.
    assert_eq!(t.state(), VaultState::LockingSoon);
    assert!(t.fx.iter().any(|e| matches!(e,
        Effect::Event { event: "warning", fields } if fields.contains(&("lock_in_seconds", Field::UInt(60))))));
    assert!(t.fake.calls().is_empty());
    assert_eq!(t.next_wakeup(), Some(30 * 60_000));
    // A keepalive postpones everything.
    t.handle(&root(), Request::Keepalive, at(29 * 60 + 30));
    t.on_timer(at(30 * 60));
    assert_eq!(t.state(), VaultState::Unlocked);
    assert_eq!(t.next_wakeup(), Some((29 * 60 + 30 + 29 * 60) * 1000));
    // Status does not count as activity.
    t.handle(&root(), Request::Status, at(59 * 60));
    t.on_timer(at(59 * 60 + 30));
    assert_eq!(t.state(), VaultState::Locked);
    assert_eq!(t.detail(), "auto_lock_idle");
    assert_eq!(t.next_wakeup(), None);
    assert_eq!(t.events(), ["supervisor_start", "lock"]);
}

#[test]
fn failed_auto_lock_is_retried_a_minute_later() {
    let fake = Fake::unlocked();
    fake.w().busy = true;
    let mut t = start(fake);
    t.on_timer(at(30 * 60));
    assert_eq!(t.state(), VaultState::Unlocked);
    assert_eq!(t.next_wakeup(), Some(31 * 60_000));
    t.fake.w().busy = false;
    t.on_timer(at(31 * 60));
    assert_eq!(t.state(), VaultState::Locked);
}

#[test]
fn permission_denied_is_audited_but_rate_limited() {
    let mut t = start(Fake::unlocked());
    let user = Peer {
        pid: 99,
        uid: 1000,
        gid: 1000,
        groups: vec![],
    };
    for i in 0..5 {
        let v = line(&t.handle(&user, Request::Lock, at(i)));
        assert_eq!(v["success"], false);
        assert!(v["error"]
            .as_str()
            .unwrap()
            .starts_with("permission denied"));
    }
    assert!(t.fake.calls().is_empty());
    assert_eq!(t.state(), VaultState::Unlocked);
    assert_eq!(t.events(), ["supervisor_start", "permission_denied"]);
    t.handle(&user, Request::Status, at(61));
    assert!(t
        .audited("permission_denied")
        .contains(&("suppressed_since_last", 4u32.into())));
}

#[test]
fn an_unreadable_lockout_file_fails_closed() {
    let t = start_with(settings(), Fake::default(), Err("damaged".into()));
    assert_eq!(t.status(0, at(0)).lockout_seconds, Some(60));
    assert_eq!(t.status(1000, at(0)).lockout_seconds, Some(60));
}

#[test]
fn disabled_auto_lock_never_schedules() {
    let mut s = settings();
    s.auto_lock_ms = None;
    let mut t = start_with(s, Fake::unlocked(), Ok(LockoutFile::default()));
    assert_eq!(t.next_wakeup(), None);
    t.on_timer(at(1_000_000));
    assert_eq!(t.state(), VaultState::Unlocked);
    assert_eq!(t.status(0, at(10)).lock_in_seconds, None);
}

/// The shell: the same effects, performed on real files.
mod shell {
    use super::*;
    use crate::testutil::TmpDir;

    fn settings_in(dir: &Path) -> Settings {
        Settings {
            lockout_path: dir.join("lockout.json"),
            audit_path: Some(dir.join("audit.jsonl")),
            state_files: vec![dir.join("state.json"), dir.join("compat")],
            ..settings()
        }
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

    #[test]
    fn effects_land_in_the_audit_log_state_files_and_lockout_file() {
        let dir = TmpDir::new("machine-shell");
        let fake = Fake::unlocked();
        let mut m = Machine::start(settings_in(&dir), Box::new(fake.clone()), at(0));
        m.handle(&root(), Request::Lock, at(1));
        for i in 0..3 {
            m.unlock(&SecretBytes::from_slice(b"wrong"), 0, at(2 + i));
        }
        assert_eq!(
            events(&dir),
            [
                "supervisor_start",
                "lock",
                "unlock_failed",
                "unlock_failed",
                "unlock_failed",
                "lockout"
            ]
        );
        let state = std::fs::read(dir.join("state.json")).unwrap();
        assert_eq!(state, std::fs::read(dir.join("compat")).unwrap());
        let v: serde_json::Value = serde_json::from_slice(&state).unwrap();
        assert_eq!(v["state"], "locked");
        assert_eq!(v["lockout_until"], 1_700_000_000 + 4 + 60);
        // The lockout file carries it across a restart.
        drop(m);
        let m2 = Machine::start(settings_in(&dir), Box::new(fake), at(10));
        assert_eq!(m2.status(0, at(10)).lockout_seconds, Some(54));
        // A damaged lockout file fails closed.
        std::fs::write(dir.join("lockout.json"), b"{not json").unwrap();
        let m3 = Machine::start(settings_in(&dir), Box::new(Fake::default()), at(0));
        assert_eq!(m3.status(0, at(0)).lockout_seconds, Some(60));
    }

    #[test]
    fn status_shows_the_boot_paths_tpm_refusal_and_its_event_log_lines() {
        let dir = TmpDir::new("machine-refusal");
        let lines = [
            "PCR 9 changed since enrolment: run `vaultguard reseal` after verifying the update"
                .to_string(),
            "PCR 9: EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\": aa -> bb".to_string(),
        ];
        crate::handoff::write_boot_hint_with_refusal(
            &dir.join("state.json"),
            "unlocked",
            "passphrase",
            None,
            &lines,
        )
        .unwrap();
        let m = Machine::start(settings_in(&dir), Box::new(Fake::unlocked()), at(0));
        let st = m.status(0, at(1));
        assert_eq!(st.detail, "passphrase");
        assert_eq!(st.tpm_refusal, lines);
        let line =
            String::from_utf8(crate::control::protocol::Response::status(&st).to_line()).unwrap();
        assert!(line.contains("\"tpm_refusal\":[\"PCR 9 changed"), "{line}");
    }

    #[test]
    fn unlocks_wait_until_the_audit_log_can_be_written_again() {
        // A symlinked audit path (O_NOFOLLOW refuses it): the shell tells the
        // core, which refuses unlocks until the shell's retry entry is written.
        let dir = TmpDir::new("machine-auditbroken");
        let log = dir.join("audit.jsonl");
        std::os::unix::fs::symlink("/dev/null", &log).unwrap();
        let fake = Fake::default();
        let mut m = Machine::start(settings_in(&dir), Box::new(fake.clone()), at(0));
        fake.calls();
        let v = line(&m.handle(&root(), Request::Status, at(1)));
        assert!(
            v["audit_error"].as_str().unwrap().contains("audit.jsonl"),
            "{v}"
        );
        let right = || Request::Unlock(SecretBytes::from_slice(b"right"));
        let v = line(&m.handle(&root(), right(), at(2)));
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("audit log cannot be written"),
            "{v}"
        );
        assert!(fake.calls().is_empty(), "nothing was tried");
        assert_eq!(m.state(), VaultState::Locked);
        std::fs::remove_file(&log).unwrap();
        let v = line(&m.handle(&root(), right(), at(3)));
        assert_eq!(v["success"], true, "{v}");
        assert_eq!(events(&dir), ["audit_resumed", "unlock"]);
        let v = line(&m.handle(&root(), Request::Status, at(4)));
        assert!(v.get("audit_error").is_none(), "{v}");
    }

    /// A memory anchor the test can look into while the machine holds it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<crate::audit::anchor::MemoryAnchor>>);

    impl crate::audit::anchor::Anchor for Shared {
        fn extend(&mut self, h: &[u8; 32]) -> Result<(), crate::audit::anchor::AnchorError> {
            self.0.lock().unwrap().extend(h)
        }
        fn read(&mut self) -> Result<Option<[u8; 32]>, crate::audit::anchor::AnchorError> {
            self.0.lock().unwrap().read()
        }
    }

    fn verdict(dir: &Path, a: &Shared) -> crate::audit::anchor::Verdict {
        let v = audit::verify(&dir.join("audit.jsonl")).unwrap();
        crate::audit::anchor::judge(v.entry_hashes(), a.0.lock().unwrap().value)
    }

    fn start_anchored(dir: &Path, a: &Shared, s: Settings) -> Machine {
        let _ = dir;
        Machine::start_with_anchor(
            s,
            Box::new(Fake::unlocked()),
            Some(Box::new(a.clone())),
            at(0),
        )
    }

    #[test]
    fn every_entry_is_extended_into_the_anchor() {
        use crate::audit::anchor::Verdict;
        let dir = TmpDir::new("machine-anchor");
        let a = Shared::default();
        let mut m = start_anchored(&dir, &a, settings_in(&dir));
        m.handle(&root(), Request::Lock, at(1));
        m.unlock(&SecretBytes::from_slice(b"wrong"), 0, at(2));
        assert_eq!(verdict(&dir, &a), Verdict::Anchored { entries: 3 });
        // Another writer appends (the CLI's enrol, say) without extending: the
        // next append of ours replays and catches the TPM up first.
        audit::append(&dir.join("audit.jsonl"), "enroll", &[]).unwrap();
        m.unlock(&SecretBytes::from_slice(b"right"), 0, at(3));
        assert_eq!(verdict(&dir, &a), Verdict::Anchored { entries: 6 });
        assert!(events(&dir).contains(&"anchor_caught_up".to_string()));
        // The TPM is busy for a while: nothing is extended on top of a gap, and
        // once it answers the missed entries are caught up.
        a.0.lock().unwrap().fail = true;
        m.handle(&root(), Request::Lock, at(4));
        a.0.lock().unwrap().fail = false;
        m.handle(&root(), Request::Keepalive, at(5));
        m.stopping();
        assert!(
            matches!(verdict(&dir, &a), Verdict::Anchored { .. }),
            "{:?}",
            verdict(&dir, &a)
        );
    }

    #[test]
    fn a_power_cut_between_append_and_extend_is_caught_up_at_start() {
        use crate::audit::anchor::Verdict;
        let dir = TmpDir::new("machine-anchor-cut");
        let a = Shared::default();
        let mut m = start_anchored(&dir, &a, settings_in(&dir));
        m.handle(&root(), Request::Lock, at(1));
        drop(m);
        // Appended and fsynced, then the power went: never extended.
        audit::append(&dir.join("audit.jsonl"), "lock", &[]).unwrap();
        let v = verdict(&dir, &a);
        assert_eq!(
            v,
            Verdict::Behind {
                anchored: 2,
                pending: 1
            }
        );
        assert!(v.to_string().contains("power cut"), "{v}");
        let _m = start_anchored(&dir, &a, settings_in(&dir));
        assert!(matches!(verdict(&dir, &a), Verdict::Anchored { .. }));
        let ev = events(&dir);
        assert_eq!(
            ev[2..],
            ["lock", "supervisor_start", "anchor_caught_up"].map(String::from)
        );
    }

    #[test]
    fn a_rewritten_log_is_reported_and_left_as_evidence() {
        use crate::audit::anchor::Verdict;
        let dir = TmpDir::new("machine-anchor-tamper");
        let a = Shared::default();
        let mut m = start_anchored(&dir, &a, settings_in(&dir));
        m.handle(&root(), Request::Lock, at(1));
        m.unlock(&SecretBytes::from_slice(b"wrong"), 0, at(2));
        drop(m);
        // Root rewrites history and recomputes the whole chain: the file verifies.
        let log = dir.join("audit.jsonl");
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_file(&log).unwrap();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ev = v["event"].as_str().unwrap();
            if ev != "unlock_failed" {
                audit::append(&log, ev, &[]).unwrap();
            }
        }
        audit::verify(&log).unwrap();
        let value_before = a.0.lock().unwrap().value;
        assert!(matches!(verdict(&dir, &a), Verdict::Mismatch { .. }));
        let mut m = start_anchored(&dir, &a, settings_in(&dir));
        m.handle(&root(), Request::Keepalive, at(3));
        assert!(events(&dir).contains(&"anchor_mismatch".to_string()));
        assert_eq!(
            a.0.lock().unwrap().value,
            value_before,
            "nothing extended after a mismatch"
        );
    }

    #[test]
    fn rotation_keeps_the_anchor_in_step() {
        use crate::audit::anchor::Verdict;
        let dir = TmpDir::new("machine-anchor-rotate");
        let a = Shared::default();
        let mut s = settings_in(&dir);
        s.audit_rotate_size = 600;
        let mut m = start_anchored(&dir, &a, s);
        for i in 0..8 {
            m.unlock(&SecretBytes::from_slice(b"wrong"), 1000 + i, at(i.into()));
        }
        let v = audit::verify(&dir.join("audit.jsonl")).unwrap();
        assert!(v.segments.len() > 2, "rotated: {}", v.segments.len());
        assert_eq!(
            verdict(&dir, &a),
            Verdict::Anchored {
                entries: v.entries()
            }
        );
    }
}

mod events_and_inhibitors;
