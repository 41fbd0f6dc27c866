//! Core tests for issue 17's decisions: inhibitors (expiry on the core's clock,
//! release, disconnect, keep, bounds, an overriding lock), lock reasons, the new
//! states, and the events watchers get (numbered by the shell).

use super::*;
use crate::control::protocol::{parse_request, InhibitRequest};
use crate::supervisor::backend::Presence;

fn user(uid: u32) -> Peer {
    Peer {
        pid: 4242,
        uid,
        gid: uid,
        groups: vec![],
    }
}

/// The core with uids 1000 and 1001 allowed `inhibit` and `release`.
fn start_allowing_users(fake: Fake) -> T {
    let mut s = settings();
    for cmd in ["inhibit", "release"] {
        s.allow.insert(
            cmd.into(),
            crate::config::Allow {
                uids: vec![1000, 1001],
                gids: vec![],
            },
        );
    }
    start_with(s, fake, Ok(LockoutFile::default()))
}

fn inhibit(who: &str, seconds: u64, keep: bool) -> Request {
    Request::Inhibit(InhibitRequest {
        who: who.into(),
        why: "model download".into(),
        seconds,
        keep,
    })
}

impl T {
    fn handle_on(&mut self, conn: u64, peer: &Peer, req: Request, now: Now) -> Response {
        let (r, fx) = self.core.handle_on(conn, peer, req, now);
        self.fx.extend(fx);
        r
    }
    fn disconnected(&mut self, conn: u64, now: Now) {
        let fx = self.core.disconnected(conn, now);
        self.fx.extend(fx);
    }
    /// The watch events so far: (event, fields).
    fn watch_events(&self) -> Vec<(&'static str, Vec<(&'static str, Field)>)> {
        self.fx
            .iter()
            .filter_map(|e| match e {
                Effect::Event { event, fields } => Some((*event, fields.clone())),
                _ => None,
            })
            .collect()
    }
    fn audit_count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| **e == event).count()
    }
}

fn field<'a>(fields: &'a [(&'static str, Field)], k: &str) -> Option<&'a Field> {
    fields.iter().find(|(n, _)| *n == k).map(|(_, v)| v)
}

#[test]
fn an_inhibitor_holds_off_the_idle_lock_until_it_expires_then_idle_starts_again() {
    let mut t = start(Fake::unlocked());
    // 30 min idle timeout; inhibit for 2 h at minute 10.
    let r = line(&t.handle_on(7, &root(), inhibit("model-download", 3000, false), at(600)));
    assert_eq!(r["success"], true, "{r}");
    // Only the inhibitor's expiry is due, not the idle deadline.
    assert_eq!(t.next_wakeup(), Some(3600 * 1000));
    let st = t.status(0, at(2000));
    assert_eq!(st.inhibitors.len(), 1);
    let i = &st.inhibitors[0];
    assert_eq!(
        (
            i.who.as_str(),
            i.why.as_str(),
            i.remaining_seconds,
            i.uid,
            i.keep
        ),
        ("model-download", "model download", 3600 - 2000, 0, false)
    );
    // Latest expiry plus a full idle period.
    assert_eq!(st.lock_in_seconds, Some(3600 - 2000 + 1800));
    // Past the idle deadline, still open.
    t.on_timer(at(1900));
    assert_eq!(t.state(), VaultState::Unlocked);
    assert!(t.fake.calls().is_empty());
    // Expiry: released (audited, an event), and idle counts from now.
    t.on_timer(at(3600));
    assert_eq!(t.state(), VaultState::Unlocked);
    let rel = t.audited("release");
    assert_eq!(field(&rel, "cause"), Some(&Field::from("expired")));
    assert!(t.status(0, at(3600)).inhibitors.is_empty());
    assert_eq!(t.next_wakeup(), Some((3600 + 1740) * 1000));
    t.on_timer(at(3600 + 1800));
    assert_eq!(t.state(), VaultState::Locked);
    assert_eq!(t.detail(), "auto_lock_idle");
}

#[test]
fn release_by_its_holder_or_root_only_and_disconnect_releases_unless_kept() {
    let mut t = start_allowing_users(Fake::unlocked());
    let alice = user(1000);
    let bob = user(1001);
    assert_eq!(
        line(&t.handle_on(1, &alice, inhibit("a", 60, false), at(1)))["success"],
        true
    );
    assert_eq!(
        line(&t.handle_on(1, &alice, inhibit("kept", 60, true), at(1)))["success"],
        true
    );
    assert_eq!(
        line(&t.handle_on(2, &bob, inhibit("b", 60, false), at(1)))["success"],
        true
    );
    // Bob may neither take nor release Alice's name.
    let v = line(&t.handle_on(2, &bob, inhibit("a", 60, false), at(2)));
    assert!(
        v["error"].as_str().unwrap().contains("held by uid:1000"),
        "{v}"
    );
    let v = line(&t.handle_on(2, &bob, Request::Release("a".into()), at(2)));
    assert!(
        v["error"].as_str().unwrap().contains("held by uid:1000"),
        "{v}"
    );
    let v = line(&t.handle_on(2, &bob, Request::Release("nope".into()), at(2)));
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no inhibitor named `nope`"),
        "{v}"
    );
    // Alice's connection closes: `a` goes, `kept` stays; Bob's is untouched.
    t.disconnected(1, at(3));
    let names: Vec<String> = t
        .status(0, at(3))
        .inhibitors
        .into_iter()
        .map(|i| i.who)
        .collect();
    assert_eq!(names, ["b", "kept"]);
    let rel = t.audited("release");
    assert_eq!(field(&rel, "who"), Some(&Field::from("a")));
    assert_eq!(field(&rel, "cause"), Some(&Field::from("disconnected")));
    // Root may release anyone's.
    assert_eq!(
        line(&t.handle(&root(), Request::Release("kept".into()), at(4)))["success"],
        true
    );
    assert_eq!(
        line(&t.handle_on(2, &bob, Request::Release("b".into()), at(4)))["success"],
        true
    );
    assert!(t.status(0, at(4)).inhibitors.is_empty());
}

#[test]
fn an_operator_lock_overrides_inhibitors_and_says_which() {
    let mut t = start(Fake::unlocked());
    t.handle_on(1, &root(), inhibit("backup", 600, false), at(1));
    t.handle_on(1, &root(), inhibit("model-download", 600, true), at(1));
    let v = line(&t.handle(
        &root(),
        Request::LockBecause("operator_request".into()),
        at(2),
    ));
    assert_eq!(v["success"], true);
    assert_eq!(
        v["overrode"],
        serde_json::json!(["backup", "model-download"])
    );
    assert_eq!(t.state(), VaultState::Locked);
    assert_eq!(t.detail(), "operator_request");
    let lock = t.audited("lock");
    assert_eq!(
        field(&lock, "reason"),
        Some(&Field::from("operator_request"))
    );
    assert_eq!(
        field(&lock, "overrode"),
        Some(&Field::from("backup,model-download"))
    );
    assert!(t.status(0, at(2)).inhibitors.is_empty());
    assert_eq!(t.next_wakeup(), None);
    // Watchers hear each overridden inhibitor go, with who held it.
    let released: Vec<_> = t
        .watch_events()
        .into_iter()
        .filter(|(e, _)| *e == "release")
        .collect();
    assert_eq!(released.len(), 2, "{released:?}");
    for (_, f) in &released {
        assert_eq!(field(f, "holder"), Some(&Field::from("uid:0")), "{f:?}");
        assert_eq!(
            field(f, "cause"),
            Some(&Field::from("overridden:operator_request"))
        );
    }
}

#[test]
fn ten_thousand_inhibit_requests_from_one_client_are_bounded_and_the_audit_counts_them() {
    let mut t = start_allowing_users(Fake::unlocked());
    let alice = user(1000);
    let (mut ok, mut refused) = (0, 0);
    for n in 0..10_000u64 {
        let v = line(&t.handle_on(1, &alice, inhibit(&format!("job-{n}"), 60, false), at(1)));
        if v["success"] == true {
            ok += 1;
        } else {
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("already holds 64 inhibitors"),
                "{v}"
            );
            refused += 1;
        }
    }
    assert_eq!((ok, refused), (64, 10_000 - 64));
    assert_eq!(t.status(0, at(1)).inhibitors.len(), 64);
    // Every new inhibitor is audited; the refusals once, the rest counted in
    // the next entry.
    assert_eq!(t.audit_count("inhibit"), 64);
    assert_eq!(t.audit_count("inhibit_refused"), 1);
    t.handle_on(1, &alice, inhibit("again", 60, false), at(120));
    let e = t.audited("inhibit_refused");
    assert_eq!(
        field(&e, "suppressed_since_last"),
        Some(&Field::UInt(10_000 - 64 - 1))
    );
    // Others are not refused for Alice's sake.
    let v = line(&t.handle_on(2, &user(1001), inhibit("bob", 60, false), at(120)));
    assert_eq!(v["success"], true, "{v}");
}

#[test]
fn durations_beyond_the_maximum_are_refused_with_the_key_to_raise() {
    let mut t = start(Fake::unlocked());
    let v = line(&t.handle(&root(), inhibit("x", 3601, false), at(1)));
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("3601") && e.contains("vault.max_inhibit"), "{e}");
    assert!(t.status(0, at(1)).inhibitors.is_empty());
    // Zero, negative, fractional, string and huge never reach the core.
    for bad in [
        r#"{"cmd":"inhibit","who":"x","seconds":0}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":-5}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":1.5}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":"60"}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":1e3}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":99999999999999999999999}"#,
        r#"{"cmd":"inhibit","who":"x"}"#,
        r#"{"cmd":"inhibit","who":"has space","seconds":5}"#,
        r#"{"cmd":"inhibit","who":"","seconds":5}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":5,"keep":"yes"}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":5,"keep":"true"}"#,
        r#"{"cmd":"inhibit","who":"x","seconds":[5]}"#,
    ] {
        let e = match parse_request(bad.as_bytes()) {
            Ok(r) => panic!("{bad} parsed: {r:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("seconds") || e.contains("who") || e.contains("keep"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn lock_reasons_are_recorded_in_state_audit_and_events() {
    let mut t = start(Fake::unlocked());
    let v = line(&t.handle(
        &root(),
        Request::LockBecause("incident:IR-2291".into()),
        at(1),
    ));
    assert_eq!(v["success"], true);
    assert_eq!(t.detail(), "incident:IR-2291");
    assert_eq!(
        field(&t.audited("lock"), "reason"),
        Some(&Field::from("incident:IR-2291"))
    );
    let ev = t.watch_events();
    assert!(ev.iter().any(|(e, f)| *e == "state"
        && field(f, "state") == Some(&Field::from("locked"))
        && field(f, "detail") == Some(&Field::from("incident:IR-2291"))));
    assert!(
        ev.iter()
            .any(|(e, f)| *e == "lock"
                && field(f, "reason") == Some(&Field::from("incident:IR-2291")))
    );
    // What the protocol refuses.
    for bad in [
        "incident:",
        "incident:a b",
        "incident:\\\"x",
        "because",
        "auto_lock_idle",
        "incident:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        let req = format!(r#"{{"cmd":"lock","reason":"{bad}"}}"#);
        let e = parse_request(req.as_bytes())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`reason`") && e.contains("incident:<id>"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn a_suspend_lock_is_honoured_or_declined_per_the_configuration() {
    let mut t = start(Fake::unlocked());
    let v = line(&t.handle(&root(), Request::LockBecause("suspend".into()), at(1)));
    assert_eq!(v["success"], true);
    assert_eq!((t.state(), t.detail()), (VaultState::Locked, "suspend"));
    assert_eq!(
        field(&t.audited("lock"), "reason"),
        Some(&Field::from("suspend"))
    );

    let s = Settings {
        lock_on_suspend: false,
        ..settings()
    };
    let mut t = start_with(s, Fake::unlocked(), Ok(LockoutFile::default()));
    let v = line(&t.handle(&root(), Request::LockBecause("suspend".into()), at(1)));
    assert_eq!(v["success"], true);
    assert_eq!(v["state"], "unlocked");
    assert!(
        v["warning"]
            .as_str()
            .unwrap()
            .contains("vault.lock_on_suspend"),
        "{v}"
    );
    assert_eq!(t.state(), VaultState::Unlocked);
    assert!(t.fake.calls().is_empty());
    assert_eq!(
        field(&t.audited("lock_declined"), "reason"),
        Some(&Field::from("suspend"))
    );
}

#[test]
fn locking_soon_ends_with_activity_or_an_inhibitor() {
    let mut t = start(Fake::unlocked());
    t.on_timer(at(29 * 60));
    assert_eq!(t.state(), VaultState::LockingSoon);
    assert_eq!(t.status(0, at(29 * 60)).state, "locking_soon");
    t.handle(&root(), Request::Keepalive, at(29 * 60 + 1));
    assert_eq!(t.state(), VaultState::Unlocked);
    t.on_timer(at(58 * 60 + 1));
    assert_eq!(t.state(), VaultState::LockingSoon);
    t.handle(&root(), inhibit("job", 60, false), at(58 * 60 + 2));
    assert_eq!(t.state(), VaultState::Unlocked);
    // A lock from locking_soon is an ordinary lock.
    t.on_timer(at(58 * 60 + 62));
    assert_eq!(
        t.state(),
        VaultState::Unlocked,
        "idle restarts after the job"
    );
}

#[test]
fn error_setup_required_and_not_available_are_derived_from_the_backend() {
    // The probe fails: `error`, and status says why.
    let fake = Fake::unlocked();
    fake.w().probe_fails = true;
    let t = start(fake);
    assert_eq!((t.state(), t.detail()), (VaultState::Error, "probe_failed"));
    let st = t.status(0, at(0));
    assert_eq!(st.state, "error");
    assert!(st.message.unwrap().contains("boom"));

    // Locked, and the device is not there.
    let fake = Fake::default();
    fake.w().presence = Some(Presence::Absent("device_absent"));
    let mut t = start(fake.clone());
    assert_eq!(
        (t.state(), t.detail()),
        (VaultState::NotAvailable, "device_absent")
    );
    // An unlock attempt cannot help; the state stays what is true.
    fake.w().device_error = true;
    t.unlock(&SecretBytes::from_slice(b"right"), 0, at(1));
    assert_eq!(t.state(), VaultState::NotAvailable);
    // The device appears: after the next look, locked.
    fake.w().presence = None;
    fake.w().device_error = false;
    let v = line(&t.unlock(&SecretBytes::from_slice(b"right"), 0, at(2)));
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(t.state(), VaultState::Unlocked);

    // No LUKS volume on the device.
    let fake = Fake::default();
    fake.w().presence = Some(Presence::NoVault("not_a_luks_volume"));
    let t = start(fake);
    assert_eq!(
        (t.state(), t.detail()),
        (VaultState::SetupRequired, "not_a_luks_volume")
    );
    assert_eq!(t.status(0, at(0)).state, "setup_required");
}

#[test]
fn watchers_get_numbered_lines_starting_with_the_current_state() {
    let dir = crate::testutil::TmpDir::new("machine-watch");
    let s = Settings {
        audit_path: Some(dir.join("audit.jsonl")),
        state_files: vec![dir.join("state.json")],
        ..settings()
    };
    let mut m = Machine::start(s, Box::new(Fake::unlocked()), at(0));
    m.take_events();
    let first = line(&m.handle_on(9, &root(), Request::Watch, at(1)));
    assert_eq!(first["event"], "state");
    assert_eq!(first["state"], "unlocked");
    let seq0 = first["seq"].as_u64().unwrap();
    m.handle_on(3, &root(), inhibit("job", 60, false), at(2));
    m.handle(&root(), Request::LockBecause("incident:42".into()), at(3));
    let lines: Vec<serde_json::Value> = m
        .take_events()
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    let expect: Vec<u64> = (seq0 + 1..=seq0 + lines.len() as u64).collect();
    assert_eq!(seqs, expect, "{lines:?}");
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["inhibit", "state", "state", "release", "lock"],
        "{lines:?}"
    );
    assert_eq!(lines[1]["state"], "locking", "{lines:?}");
    assert_eq!(lines[2]["detail"], "incident:42");
    // A viewer not allowed to watch gets the refusal, not the stream.
    let v = line(&m.handle_on(10, &user(1000), Request::Watch, at(4)));
    assert_eq!(v["success"], false);
    assert!(v["error"].as_str().unwrap().contains("`watch`"), "{v}");
}

#[test]
fn the_state_file_says_when_an_inhibited_vault_would_lock() {
    let mut t = start(Fake::unlocked());
    t.handle(&root(), inhibit("job", 3000, false), at(600));
    let v = t.state_file();
    let wall0 = 1_700_000_000.0;
    // The latest expiry (3600) plus a full idle period (1800), not 1800 from start.
    assert_eq!(
        v["auto_lock_at"].as_f64(),
        Some(wall0 + 3600.0 + 1800.0),
        "{v}"
    );
}
