//! `vaultguard token issue|list|revoke`: edit the token file (see
//! [`super::tokens`]) directly, so they work with the supervisor stopped; a
//! running supervisor notices the new file at its next token lookup.
//!
//! A new token is printed once, on standard output alone (so that a script can
//! capture it), and never stored: only its SHA-256 goes into the file. Nothing
//! here prints a token's hash, in full or in part.
//!
//! With `--json` (global, or `token list --json`) every outcome is one JSON
//! object or array on standard output: `issue` prints
//! `{"success":true,"name":..,"role":..,"expires":..,"token":"vg_.."}`, `revoke`
//! `{"success":true,"message":..}`, and a failure the object of
//! [`crate::exit::json_error`] (printed by `main`).

use super::roles::{valid_name, Policy};
use super::tokens::{self, Entry};
use crate::cli::{TokenCmd, TokenSub};
use crate::config::Config;
use crate::exit::Failure;
use crate::secret::SecretBytes;
use std::io::Write;
use std::process::ExitCode;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub fn run(cfg: &Config, cmd: &TokenCmd, json: bool) -> Result<ExitCode> {
    if rustix::process::geteuid().as_raw() != 0 {
        return Err(format!(
            "token commands need root: the token file {} is root's alone (run with sudo)",
            cfg.control.tokens_file.display()
        )
        .into());
    }
    let path = &cfg.control.tokens_file;
    let now = crate::audit::now_ms() / 1000;
    match &cmd.command {
        TokenSub::Issue(c) => {
            // A bad --name, --role or --expires is a usage error (exit 2), as
            // every other option that cannot be used as given.
            if !valid_name(&c.name) {
                return Err(Failure::usage(format!(
                    "`{}` is not a token name: use 1-64 characters from a-z, 0-9, `_` and `-`",
                    c.name.escape_default()
                ))
                .into());
            }
            let policy = Policy::from_config(&cfg.control).map_err(|e| e.to_string())?;
            if !policy.has_role(&c.role) {
                return Err(Failure::usage(format!(
                    "role `{}` does not exist (known: {}; define others under control.roles)",
                    c.role.escape_default(),
                    policy.role_names().join(", ")
                ))
                .into());
            }
            let expires = match &c.expires {
                None => None,
                Some(s) => {
                    let span = tokens::parse_span(s)
                        .map_err(|e| Failure::usage(format!("--expires: {e}")))?;
                    if span == 0 {
                        return Err(Failure::usage("--expires must be longer than 0 s").into());
                    }
                    // RFC 3339 has four-digit years: beyond 9999 `token list`
                    // would print a time no parser reads. Leave --expires out
                    // for a token that does not expire.
                    match now.checked_add(span).filter(|&at| at <= LAST_RFC3339_S) {
                        Some(at) => Some(at),
                        None => {
                            return Err(Failure::usage(format!(
                                "--expires {s} ends after the year 9999; leave --expires out \
                                 for a token without expiry"
                            ))
                            .into())
                        }
                    }
                }
            };
            // Held until the new file is in place (see `lock_for_edit`).
            let _lock = tokens::lock_for_edit(path)?;
            let mut file = tokens::load(path)?;
            if let Some(e) = file.tokens.iter().find(|e| e.name == c.name) {
                return Err(format!(
                    "a token named `{}` exists already (role {}{}); choose another name, or \
                     revoke it and issue one under a new name",
                    e.name,
                    e.role,
                    if e.revoked.is_some() { ", revoked" } else { "" }
                )
                .into());
            }
            let token = tokens::generate()
                .map_err(|e| format!("the kernel random number generator failed: {e}"))?;
            file.tokens.push(Entry {
                name: c.name.clone(),
                role: c.role.clone(),
                sha256: crate::encoding::hex_encode(&tokens::hash(token.as_bytes()).0),
                created: now,
                expires,
                revoked: None,
            });
            tokens::save(path, &file)?;
            // The line is built in a zeroizing buffer and written to fd 1
            // directly: std's stdout buffer would keep a copy of the token.
            let head = if json {
                // Around the token, not through a serde String (base64url needs
                // no escaping).
                let h = serde_json::json!({
                    "success": true,
                    "name": c.name,
                    "role": c.role,
                    "expires": expires.map(when),
                })
                .to_string();
                format!("{},\"token\":\"", h.trim_end_matches('}'))
            } else {
                String::new()
            };
            let tail: &[u8] = if json { b"\"}\n" } else { b"\n" };
            let mut line = SecretBytes::with_capacity(head.len() + token.len() + tail.len());
            for b in head
                .bytes()
                .chain(token.as_bytes().iter().copied())
                .chain(tail.iter().copied())
            {
                line.push(b);
            }
            if let Err(e) = write_stdout(line.as_bytes()) {
                // Nobody has the token (a closed pipe, a full disk behind a
                // redirect): keeping its entry would leave a name taken by a
                // token no one can present. Taken back out.
                file.tokens.retain(|e| e.name != c.name);
                tokens::save(path, &file)?;
                return Err(format!(
                    "could not print the new token ({e}); it was not kept, issue it again"
                )
                .into());
            }
            eprintln!(
                "vaultguard: token `{}` (role {}) issued{}; it is shown only this once. A client \
                 sends it as \"token\" in each request.",
                c.name,
                c.role,
                match expires {
                    Some(at) => format!(", valid until {}", when(at)),
                    None => ", without expiry".into(),
                }
            );
        }
        TokenSub::List(c) => {
            let file = tokens::load(path)?;
            if c.json || json {
                let list: Vec<serde_json::Value> = file
                    .tokens
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "name": e.name,
                            "role": e.role,
                            "created": when(e.created),
                            "expires": e.expires.map(when),
                            "revoked": e.revoked.map(when),
                            "expired": e.expires.is_some_and(|at| now >= at),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!(
                    "{:<24} {:<12} {:<20} {:<20} REVOKED",
                    "NAME", "ROLE", "CREATED", "EXPIRES"
                );
                for e in &file.tokens {
                    let exp = match e.expires {
                        None => "never".to_string(),
                        Some(at) if now >= at => format!("{} (expired)", when(at)),
                        Some(at) => when(at),
                    };
                    println!(
                        "{:<24} {:<12} {:<20} {:<20} {}",
                        e.name,
                        e.role,
                        when(e.created),
                        exp,
                        e.revoked.map_or("-".into(), when)
                    );
                }
            }
        }
        TokenSub::Revoke(c) => {
            let _lock = tokens::lock_for_edit(path)?;
            let mut file = tokens::load(path)?;
            let Some(e) = file.tokens.iter_mut().find(|e| e.name == c.name) else {
                return Err(format!(
                    "no token named `{}` in {} (`vaultguard token list` shows them)",
                    c.name.escape_default(),
                    path.display()
                )
                .into());
            };
            let say = |text: String| {
                if json {
                    println!("{}", serde_json::json!({"success": true, "message": text}));
                } else {
                    eprintln!("vaultguard: {text}");
                }
            };
            if let Some(at) = e.revoked {
                say(format!(
                    "token `{}` was already revoked at {}",
                    e.name,
                    when(at)
                ));
                return Ok(ExitCode::SUCCESS);
            }
            e.revoked = Some(now);
            let name = e.name.clone();
            tokens::save(path, &file)?;
            say(format!(
                "token `{name}` revoked; the supervisor refuses it from its next request"
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// All of `data` to standard output, unbuffered.
fn write_stdout(mut data: &[u8]) -> std::io::Result<()> {
    let out = std::io::stdout();
    // Anything std buffered so far goes first (nothing, in practice).
    out.lock().flush()?;
    while !data.is_empty() {
        match rustix::io::write(rustix::stdio::stdout(), data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// 9999-12-31T23:59:59Z.
const LAST_RFC3339_S: u64 = 253_402_300_799;

/// Seconds since the epoch as `2026-11-25T20:00:00Z`.
fn when(s: u64) -> String {
    let t = crate::audit::rfc3339_ms(s.saturating_mul(1000));
    // Whole seconds: drop the `.000`.
    match t.strip_suffix(".000Z") {
        Some(base) => format!("{base}Z"),
        None => t,
    }
}
