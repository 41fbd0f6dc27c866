//! Attacks on the command line's new surfaces (issues 14 and 17): the token file
//! as several `vaultguard token` processes edit it at once, and as an
//! administrator edits it by hand.
//!
//! Needs root (token commands are root's alone).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use vaultguard::config::Config;

fn tmpdir(name: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("vg-attack-cli-{name}-"))
        .tempdir()
        .unwrap()
        .keep()
}

/// A configuration whose paths all live in `dir`, written for `--config`.
fn config(dir: &Path) -> (Config, PathBuf) {
    let mut cfg = Config::default();
    cfg.control.socket = dir.join("control.sock");
    cfg.control.tokens_file = dir.join("lib").join("tokens.json");
    cfg.audit.path = dir.join("audit.jsonl");
    cfg.auth.state_path = dir.join("lib").join("lockout.json");
    cfg.audit.tpm_anchor = false;
    cfg.vault.state_path = dir.join("state.json");
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    (cfg, p)
}

fn spawn(config: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn vaultguard(config: &Path, args: &[&str]) -> Output {
    spawn(config, args).wait_with_output().unwrap()
}

fn file_names(cfg: &Config) -> Vec<(String, bool)> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(&cfg.control.tokens_file).unwrap()).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                !e["revoked"].is_null(),
            )
        })
        .collect()
}

#[test]
fn concurrent_token_issues_and_a_revoke_lose_nothing() {
    let dir = tmpdir("concurrent");
    let (cfg, path) = config(&dir);
    let out = vaultguard(
        &path,
        &["token", "issue", "--name", "old", "--role", "viewer"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Several rounds: the window between one process's read and its rename is
    // small, but twelve writers at once hit it nearly every time.
    for round in 0..3 {
        let names: Vec<String> = (0..12).map(|i| format!("r{round}-t{i}")).collect();
        let mut kids: Vec<Child> = names
            .iter()
            .map(|n| spawn(&path, &["token", "issue", "--name", n, "--role", "agent"]))
            .collect();
        if round == 0 {
            kids.push(spawn(&path, &["token", "revoke", "old"]));
        }
        for k in kids {
            let out = k.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let have = file_names(&cfg);
        for n in &names {
            assert!(
                have.iter().any(|(h, _)| h == n),
                "token `{n}` was printed but is not in the file: {have:?}"
            );
        }
        assert!(
            have.contains(&("old".to_string(), true)),
            "the revocation of `old` was lost: {have:?}"
        );
    }
}

/// Parse stdout as exactly one JSON value (a line of text is not).
fn json_out(o: &Output) -> Value {
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.trim_end()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON value ({e}): {text:?}; stderr {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// A stand-in supervisor: answers each connection's line with `answer`.
fn fake_socket(path: &Path, answer: &'static str) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            let _ = s.write_all(format!("{answer}\n").as_bytes());
        }
    });
}

#[test]
fn json_is_json_on_every_token_config_and_metrics_path() {
    let dir = tmpdir("json");
    let (cfg, path) = config(&dir);
    // Global --json before the subcommand.
    let o = vaultguard(
        &path,
        &[
            "--json", "token", "issue", "--name", "ci", "--role", "agent",
        ],
    );
    assert!(o.status.success());
    let v = json_out(&o);
    assert_eq!(
        (v["success"].as_bool(), v["name"].as_str()),
        (Some(true), Some("ci"))
    );
    assert_eq!(v["role"], "agent");
    assert!(v["expires"].is_null());
    let token = v["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("vg_") && token.len() == 46, "{token}");
    // The printed token is the one whose hash the file holds.
    let file = std::fs::read_to_string(&cfg.control.tokens_file).unwrap();
    let digest =
        vaultguard::encoding::hex_encode(&vaultguard::control::tokens::hash(token.as_bytes()).0);
    assert!(file.contains(&digest));
    let o = vaultguard(
        &path,
        &[
            "--json",
            "token",
            "issue",
            "--name",
            "t2",
            "--role",
            "viewer",
            "--expires",
            "1d",
        ],
    );
    assert!(json_out(&o)["expires"].as_str().unwrap().ends_with('Z'));
    // list: the global flag and the subcommand's own give the same array.
    let a = json_out(&vaultguard(&path, &["--json", "token", "list"]));
    let b = json_out(&vaultguard(&path, &["token", "list", "--json"]));
    assert_eq!(a.as_array().map(Vec::len), Some(2), "{a}");
    assert_eq!(a, b);
    // revoke, twice (the second is "already revoked", still success).
    for _ in 0..2 {
        let o = vaultguard(&path, &["--json", "token", "revoke", "ci"]);
        assert!(o.status.success());
        let v = json_out(&o);
        assert_eq!(v["success"], true);
        assert!(v["message"].as_str().unwrap().contains("`ci`"), "{v}");
    }
    // A failure: the one failure shape, exit 1.
    let o = vaultguard(&path, &["--json", "token", "revoke", "nobody"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json_out(&o)["exit"], 1);
    // config --get: a JSON value, not the bare string.
    let o = vaultguard(&path, &["--json", "config", "--get", "control.socket"]);
    assert_eq!(
        json_out(&o),
        Value::String(cfg.control.socket.display().to_string())
    );
    let o = vaultguard(&path, &["--json", "config", "--get", "vault.device"]);
    assert_eq!(json_out(&o), Value::Null);
    // Without --json the bare value stays (for `$(...)` in a shell).
    let o = vaultguard(&path, &["config", "--get", "control.socket"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim_end(),
        cfg.control.socket.display().to_string()
    );
    // metrics, from a supervisor that answers, then one that refuses.
    fake_socket(
        &cfg.control.socket,
        r##"{"success":true,"metrics":"# TYPE vaultguard_lockouts_total counter\nvaultguard_lockouts_total 0\n"}"##,
    );
    let o = vaultguard(&path, &["--json", "metrics"]);
    assert!(o.status.success());
    let v = json_out(&o);
    assert_eq!(v["success"], true);
    assert!(v["metrics"]
        .as_str()
        .unwrap()
        .contains("vaultguard_lockouts_total 0\n"));
    let o = vaultguard(&path, &["metrics"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("# TYPE"));
    let dir2 = tmpdir("json-refused");
    let (cfg2, path2) = config(&dir2);
    fake_socket(
        &cfg2.control.socket,
        r#"{"success":false,"error":"permission denied: uid 5 may not run `metrics`"}"#,
    );
    let o = vaultguard(&path2, &["--json", "metrics"]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_out(&o);
    assert_eq!(
        (v["success"].as_bool(), v["exit"].as_u64()),
        (Some(false), Some(1))
    );
    assert!(v["error"].as_str().unwrap().contains("permission denied"));
}

#[test]
fn bad_token_options_are_usage_errors() {
    let dir = tmpdir("usage");
    let (cfg, path) = config(&dir);
    for args in [
        &["token", "issue", "--name", "Bad Name", "--role", "viewer"][..],
        &["token", "issue", "--name", "ok", "--role", "superuser"],
        &[
            "token",
            "issue",
            "--name",
            "ok",
            "--role",
            "viewer",
            "--expires",
            "5y",
        ],
        &[
            "token",
            "issue",
            "--name",
            "ok",
            "--role",
            "viewer",
            "--expires",
            "0",
        ],
        // Before: accepted, expiring in the year 584556019 (`token list`
        // printed a time no RFC 3339 parser reads).
        &[
            "token",
            "issue",
            "--name",
            "ok",
            "--role",
            "viewer",
            "--expires",
            "18446744073709551615",
        ],
        &[
            "token",
            "issue",
            "--name",
            "ok",
            "--role",
            "viewer",
            "--expires",
            "500000w",
        ],
        &["token", "issue", "--name", "ok"],
    ] {
        let o = vaultguard(&path, args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mut j = vec!["--json"];
        j.extend_from_slice(args);
        let v = json_out(&vaultguard(&path, &j));
        assert_eq!(v["exit"], 2, "{args:?}: {v}");
    }
    // Nothing was written by any of them.
    assert!(!cfg.control.tokens_file.exists());
    // A name taken is not a usage error: the command line was fine.
    let ok = ["token", "issue", "--name", "ok", "--role", "viewer"];
    assert!(vaultguard(&path, &ok).status.success());
    assert_eq!(vaultguard(&path, &ok).status.code(), Some(1));
}

#[test]
fn json_audit_export_to_a_file_prints_one_object() {
    let dir = tmpdir("export");
    let (cfg, path) = config(&dir);
    vaultguard::audit::append(&cfg.audit.path, "lock", &[]).unwrap();
    let key = dir.join("k.pem");
    let st = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .expect("openssl is needed to make the test key");
    assert!(st.success());
    let out = dir.join("export.jsonl");
    let o = vaultguard(
        &path,
        &[
            "--json",
            "audit",
            "export",
            "--key",
            key.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json_out(&o);
    assert_eq!(v["success"], true, "{v}");
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains("vaultguard_audit_export"));
}

#[test]
fn a_fifo_as_detached_header_is_refused_not_waited_on() {
    let dir = tmpdir("header");
    let (_cfg, path) = config(&dir);
    let img = dir.join("img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let fifo = dir.join("hdr.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (hdr, kind) in [(fifo.clone(), "a FIFO"), (dir.clone(), "a directory")] {
        let opts = format!("header={},x-vaultguard.no-tpm,headless", hdr.display());
        let mut child = spawn(
            &path,
            &["attach", "--test", "vt", img.to_str().unwrap(), "-", &opts],
        );
        // Before: libcryptsetup's open of the FIFO waited for a writer, for ever.
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                panic!(
                    "attach with header={} still waiting after 20 s",
                    hdr.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains(kind) && err.contains("header="), "{err}");
    }
}

#[test]
fn kill_9_during_token_issue_never_half_writes_or_loses_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("kill9");
    let (cfg, path) = config(&dir);
    for n in ["keep-a", "keep-b"] {
        assert!(
            vaultguard(&path, &["token", "issue", "--name", n, "--role", "agent"])
                .status
                .success()
        );
    }
    for round in 0..40u64 {
        let name = format!("k{round}");
        let mut kid = spawn(
            &path,
            &["token", "issue", "--name", &name, "--role", "agent"],
        );
        // Somewhere between start-up and the rename.
        std::thread::sleep(std::time::Duration::from_micros(round * 250));
        let _ = kid.kill();
        let _ = kid.wait();
        // Whatever instant it died at, the file is whole and keeps the others.
        let file = vaultguard::control::tokens::load(&cfg.control.tokens_file)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        for keep in ["keep-a", "keep-b"] {
            assert!(file.tokens.iter().any(|e| e.name == keep), "round {round}");
        }
    }
    // Any temporary a kill left behind is as closed as the file itself.
    for e in std::fs::read_dir(cfg.control.tokens_file.parent().unwrap()).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        assert_eq!(m.permissions().mode() & 0o077, 0);
    }
    // And the next issue works (no stale lock).
    assert!(vaultguard(
        &path,
        &["token", "issue", "--name", "after", "--role", "agent"]
    )
    .status
    .success());
}

#[test]
fn another_user_cannot_block_token_revoke_by_holding_a_lock() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("lock-dos");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cfg, path) = config(&dir);
    let lib = cfg.control.tokens_file.parent().unwrap().to_path_buf();
    // /var/lib/vaultguard as packages make it: others may enter and list it.
    std::fs::create_dir(&lib).unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(vaultguard(
        &path,
        &["token", "issue", "--name", "leaked", "--role", "admin"]
    )
    .status
    .success());
    // uid 60081 takes every lock it can open on the directory and the file's
    // neighbours, and holds them.
    let targets: Vec<std::ffi::CString> = [lib.clone(), lib.join("tokens.json.lock")]
        .iter()
        .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap())
        .collect();
    // SAFETY: the child makes raw system calls only, on memory prepared before
    // the fork, and leaves with _exit.
    let child = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // SAFETY: plain system calls on valid C strings; _exit ends the child.
            unsafe {
                if nix::libc::setgid(60081) != 0 || nix::libc::setuid(60081) != 0 {
                    nix::libc::_exit(100);
                }
                for t in &targets {
                    let fd = nix::libc::open(t.as_ptr(), nix::libc::O_RDONLY);
                    if fd >= 0 {
                        nix::libc::flock(fd, nix::libc::LOCK_EX);
                    }
                }
                nix::libc::sleep(60);
                nix::libc::_exit(0)
            }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Before: `token revoke` waited for uid 60081's lock on the directory, for
    // as long as it pleased, and the leaked token stayed valid.
    let mut kid = spawn(&path, &["token", "revoke", "leaked"]);
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = kid.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > std::time::Duration::from_secs(15) {
            let _ = kid.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(child, None);
    let status = status.expect("token revoke blocked behind another user's lock");
    assert!(status.success());
    assert!(file_names(&cfg).contains(&("leaked".to_string(), true)));
}

#[test]
fn a_header_that_is_not_luks_is_named_not_the_device() {
    let dir = tmpdir("header-text");
    let (_cfg, path) = config(&dir);
    let img = dir.join("img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let hdr = dir.join("hdr.txt");
    std::fs::write(&hdr, vec![b'x'; 1 << 20]).unwrap();
    let opts = format!("header={},x-vaultguard.no-tpm,headless", hdr.display());
    let o = vaultguard(
        &path,
        &["attach", "--test", "vt", img.to_str().unwrap(), "-", &opts],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // Before: "cannot open LUKS2 device …/img: not a LUKS2 volume", which sends
    // the operator to the (fine) data device.
    assert!(
        err.contains(&format!("the detached header {}", hdr.display()))
            && err.contains("is not a LUKS2 header"),
        "{err}"
    );
}

#[test]
fn a_token_that_could_not_be_printed_is_not_kept() {
    let dir = tmpdir("epipe");
    let (cfg, path) = config(&dir);
    // Standard output is a pipe nobody reads: the write fails (EPIPE).
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let o = Command::new(env!("CARGO_BIN_EXE_vaultguard"))
        .arg("--config")
        .arg(&path)
        .args(["token", "issue", "--name", "ci", "--role", "agent"])
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("could not print the new token"), "{err}");
    // Before: the entry stayed, its token printed nowhere, the name taken.
    assert!(!file_names(&cfg).iter().any(|(n, _)| n == "ci"));
    let o = vaultguard(
        &path,
        &["token", "issue", "--name", "ci", "--role", "agent"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim_end().len(), 46);
}
