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
