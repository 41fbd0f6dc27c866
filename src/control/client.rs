//! The client side of the control socket, used by `vaultguard status|lock|unlock|
//! keepalive`: one request line, one response line, printed for a human or raw.
//!
//! An unlock request is assembled inside a [`SecretBytes`] (the passphrase is
//! JSON-escaped straight into it) and written from there; nothing else holds the
//! passphrase. This module never interprets the vault's state beyond printing it.
//!
//! Whatever listens on the socket path is not trusted for being there: another
//! user may have put their own listener where the supervisor's should be. Before
//! a byte is sent (and before the passphrase is asked for), the listener's peer
//! credentials (SO_PEERCRED, recorded by the kernel when it called listen(2)) must
//! be root's or our own euid's; anything else is refused with its uid and pid.

use super::auth::peer_of;
use super::protocol::MAX_LINE;
use crate::secret::SecretBytes;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long to wait for status and keepalive answers.
const QUICK_TIMEOUT: Duration = Duration::from_secs(30);
/// Lock and unlock wait for services to stop/start and for the LUKS KDF.
const SLOW_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub enum ClientError {
    Connect {
        socket: PathBuf,
        err: io::Error,
    },
    /// The listener on the socket is neither root nor us: nothing was sent.
    Untrusted {
        socket: PathBuf,
        uid: u32,
        pid: i32,
        euid: u32,
    },
    Io {
        socket: PathBuf,
        err: io::Error,
    },
    Closed {
        socket: PathBuf,
    },
    BadResponse(String),
    PassphraseNotUtf8,
    Prompt(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { socket, err } => write!(
                f,
                "cannot connect to {}: {err} (is `vaultguard supervise` running? `systemctl status vaultguard-supervisor`)",
                socket.display()
            ),
            ClientError::Untrusted {
                socket,
                uid,
                pid,
                euid,
            } => write!(
                f,
                "refusing to talk to {}: it is held by uid {uid} (pid {pid}), not by root or by \
                 you (uid {euid}), so it is not the vaultguard supervisor; nothing was sent. \
                 Another user may be impersonating it: see `ps -o user,pid,args -p {pid}`, \
                 stop that process, remove the socket and restart vaultguard-supervisor",
                socket.display()
            ),
            ClientError::Io { socket, err } if err.kind() == io::ErrorKind::WouldBlock => {
                write!(f, "no answer from {} in time", socket.display())
            }
            ClientError::Io { socket, err } => write!(f, "{}: {err}", socket.display()),
            ClientError::Closed { socket } => write!(
                f,
                "{} closed the connection without an answer",
                socket.display()
            ),
            ClientError::BadResponse(m) => write!(f, "unexpected answer from the supervisor: {m}"),
            ClientError::PassphraseNotUtf8 => write!(
                f,
                "the passphrase is not valid UTF-8 and cannot be sent over the JSON socket"
            ),
            ClientError::Prompt(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// One response: the raw line (for `--json`) and its parsed form.
#[derive(Debug, Clone)]
pub struct Reply {
    pub line: String,
    pub value: serde_json::Value,
}

impl Reply {
    /// `success` if present, else true for a status answer (it has no such key).
    pub fn success(&self) -> bool {
        match self.value.get("success") {
            Some(v) => v.as_bool().unwrap_or(false),
            None => self.value.get("state").is_some(),
        }
    }

    fn error(&self) -> &str {
        self.value
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("(no error message)")
    }
}

/// Does something answer on `socket`? (Used to route `vaultguard unlock` to the
/// socket after boot and to the boot path before.) Whoever answers is checked by
/// [`connect`] before anything is sent: a squatter routes the unlock to a loud
/// refusal, not to the boot path.
pub fn is_serving(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// May a client running as `client_euid` talk to a listener of `server_uid`?
/// Root's supervisor, or one we run ourselves (tests, a per-user setup); nothing
/// else, since the listener learns whatever we send.
pub fn trusted_server(server_uid: u32, client_euid: u32) -> bool {
    server_uid == 0 || server_uid == client_euid
}

/// Connect to `socket` and check who listens there before anything is sent.
pub fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    let s = UnixStream::connect(socket).map_err(|err| ClientError::Connect {
        socket: socket.to_path_buf(),
        err,
    })?;
    let peer = peer_of(&s).map_err(|e| ClientError::Io {
        socket: socket.to_path_buf(),
        err: io::Error::other(e.to_string()),
    })?;
    let euid = rustix::process::geteuid().as_raw();
    if !trusted_server(peer.uid, euid) {
        return Err(ClientError::Untrusted {
            socket: socket.to_path_buf(),
            uid: peer.uid,
            pid: peer.pid,
            euid,
        });
    }
    Ok(s)
}

pub fn status(socket: &Path) -> Result<Reply, ClientError> {
    request(socket, b"{\"cmd\":\"status\"}\n", QUICK_TIMEOUT)
}

pub fn lock(socket: &Path) -> Result<Reply, ClientError> {
    request(socket, b"{\"cmd\":\"lock\"}\n", SLOW_TIMEOUT)
}

/// `{"cmd":"lock","reason":R}`; R is checked by the supervisor (which names
/// the accepted reasons when it refuses one).
pub fn lock_because(socket: &Path, reason: &str) -> Result<Reply, ClientError> {
    let mut line = serde_json::json!({"cmd": "lock", "reason": reason}).to_string();
    line.push('\n');
    request(socket, line.as_bytes(), SLOW_TIMEOUT)
}

/// `vaultguard lock [--reason R]`: print the reply and return it.
pub fn run_lock(socket: &Path, reason: Option<&str>, json: bool) -> Result<Reply, ClientError> {
    let reply = match reason {
        Some(r) => lock_because(socket, r)?,
        None => lock(socket)?,
    };
    let ok = reply.success();
    if json {
        println!("{}", reply.line);
    } else if ok {
        println!("{}", human(Cmd::Lock, &reply));
    } else {
        eprintln!("{}", human(Cmd::Lock, &reply));
    }
    Ok(reply)
}

pub fn keepalive(socket: &Path) -> Result<Reply, ClientError> {
    request(socket, b"{\"cmd\":\"keepalive\"}\n", QUICK_TIMEOUT)
}

pub fn unlock(socket: &Path, passphrase: &SecretBytes) -> Result<Reply, ClientError> {
    let line = unlock_line(passphrase)?;
    request(socket, line.as_bytes(), SLOW_TIMEOUT)
}

/// `{"cmd":"unlock","passphrase":"..."}\n`, built inside a secret buffer.
pub fn unlock_line(passphrase: &SecretBytes) -> Result<SecretBytes, ClientError> {
    let p = passphrase.as_bytes();
    if std::str::from_utf8(p).is_err() {
        return Err(ClientError::PassphraseNotUtf8);
    }
    const HEAD: &[u8] = b"{\"cmd\":\"unlock\",\"passphrase\":\"";
    const TAIL: &[u8] = b"\"}\n";
    // Worst case every byte becomes a six-byte \u00XX escape.
    let mut out = SecretBytes::with_capacity(HEAD.len() + 6 * p.len() + TAIL.len());
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            // Capacity is computed above, so a refusal here is a bug, not input.
            let pushed = out.push(b);
            debug_assert!(pushed);
        }
    };
    put(HEAD);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in p {
        match b {
            b'"' => put(b"\\\""),
            b'\\' => put(b"\\\\"),
            0..=0x1f | 0x7f => put(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
            _ => put(&[b]),
        }
    }
    put(TAIL);
    Ok(out)
}

/// Send one line, read one line back.
pub fn request(socket: &Path, line: &[u8], timeout: Duration) -> Result<Reply, ClientError> {
    let io = |err| ClientError::Io {
        socket: socket.to_path_buf(),
        err,
    };
    let mut s = connect(socket)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(QUICK_TIMEOUT)).map_err(io)?;
    s.write_all(line).map_err(io)?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.contains(&b'\n') || buf.len() > MAX_LINE {
            break;
        }
    }
    let end = match buf.iter().position(|&b| b == b'\n') {
        Some(nl) => nl,
        None if buf.is_empty() => {
            return Err(ClientError::Closed {
                socket: socket.to_path_buf(),
            })
        }
        None => {
            return Err(ClientError::BadResponse(
                "no newline-terminated line".into(),
            ))
        }
    };
    let text = String::from_utf8(buf[..end].to_vec())
        .map_err(|_| ClientError::BadResponse("not UTF-8".into()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ClientError::BadResponse(format!("{e}: {text}")))?;
    if !value.is_object() {
        return Err(ClientError::BadResponse(text));
    }
    Ok(Reply { line: text, value })
}

/// Ask the operator for the passphrase on the terminal, echo off.
pub fn read_passphrase() -> Result<SecretBytes, ClientError> {
    use crate::prompt::Prompter;
    crate::prompt::Console::new()
        .ask(&crate::prompt::Ask::new(
            crate::prompt::SecretKind::Unlock,
            "vaultguard:unlock",
            "Vault passphrase: ",
        ))
        .map_err(|e| ClientError::Prompt(e.to_string()))
}

/// Which request the CLI sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Status,
    Lock,
    Keepalive,
    Unlock,
}

/// Human-readable rendering of a reply.
pub fn human(cmd: Cmd, reply: &Reply) -> String {
    if !reply.success() {
        let mut s = match cmd {
            Cmd::Lock => format!("lock failed: {}", reply.error()),
            Cmd::Unlock => format!("unlock failed: {}", reply.error()),
            _ => format!("error: {}", reply.error()),
        };
        if let Some(r) = reply.value.get("retry_after").and_then(|v| v.as_u64()) {
            s.push_str(&format!(" (locked out: retry in {})", duration(r)));
        }
        if let Some(st) = reply.value.get("state").and_then(|v| v.as_str()) {
            s.push_str(&format!("\nvault is {st}"));
        }
        return s;
    }
    let v = &reply.value;
    match cmd {
        Cmd::Status => {
            let state = v.get("state").and_then(|s| s.as_str()).unwrap_or("unknown");
            let mut s = format!("vault: {state}");
            if let Some(d) = v.get("detail").and_then(|d| d.as_str()) {
                s.push_str(&format!(" ({})", d.replace('_', " ")));
            }
            if let Some(i) = v.get("idle_seconds").and_then(|x| x.as_u64()) {
                s.push_str(&format!("\nidle for: {}", duration(i)));
            }
            match v.get("lock_in_seconds").and_then(|x| x.as_u64()) {
                Some(l) => s.push_str(&format!("\nauto-lock in: {}", duration(l))),
                None if state == "unlocked" => s.push_str("\nauto-lock: off"),
                None => {}
            }
            if let Some(l) = v.get("lockout_seconds").and_then(|x| x.as_u64()) {
                s.push_str(&format!(
                    "\nunlock refused for: {} (too many failed attempts)",
                    duration(l)
                ));
            }
            if let Some(m) = v.get("message").and_then(|m| m.as_str()) {
                s.push_str(&format!("\nproblem: {m}"));
            }
            for line in v
                .get("tpm_refusal")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str())
            {
                s.push_str(&format!("\nTPM refused at boot: {line}"));
            }
            for i in v
                .get("inhibitors")
                .and_then(|i| i.as_array())
                .into_iter()
                .flatten()
            {
                let field = |k: &str| i.get(k).and_then(|x| x.as_str()).unwrap_or("");
                let left = i.get("remaining_seconds").and_then(|x| x.as_u64());
                s.push_str(&format!(
                    "\nauto-lock held off by: {} ({}), {} left, uid {}",
                    field("who"),
                    field("why"),
                    duration(left.unwrap_or(0)),
                    i.get("uid").and_then(|x| x.as_u64()).unwrap_or(0)
                ));
            }
            s
        }
        Cmd::Lock => {
            // A declined suspend lock succeeds with a warning and the state.
            let mut s = match v.get("warning").and_then(|w| w.as_str()) {
                Some(w) => format!("warning: {w}"),
                None => "vault locked".into(),
            };
            if let Some(names) = v.get("overrode").and_then(|o| o.as_array()) {
                let names: Vec<&str> = names.iter().filter_map(|n| n.as_str()).collect();
                s.push_str(&format!("\noverrode inhibitors: {}", names.join(", ")));
            }
            s
        }
        Cmd::Unlock => {
            let mut s = String::from("vault unlocked");
            if let Some(w) = v.get("warning").and_then(|w| w.as_str()) {
                s.push_str(&format!("\nwarning: {w}"));
            }
            s
        }
        Cmd::Keepalive => "activity recorded; auto-lock postponed".into(),
    }
}

/// `2h 05m`, `4m 10s`, `12s`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Run one CLI command: print the reply (raw with `json`) and return whether it
/// succeeded. For [`Cmd::Unlock`], the caller passes the passphrase.
pub fn run(
    socket: &Path,
    cmd: Cmd,
    json: bool,
    passphrase: Option<&SecretBytes>,
) -> Result<bool, ClientError> {
    run_reply(socket, cmd, json, passphrase).map(|r| r.success())
}

/// The exit status of a reply (README, "Exit statuses"): a refusal with
/// `retry_after` is the supervisor's lockout.
pub fn exit_of(reply: &Reply) -> crate::exit::Exit {
    use crate::exit::Exit;
    if reply.success() {
        Exit::Ok
    } else if reply.value.get("retry_after").is_some() {
        Exit::LockedOut
    } else {
        Exit::Error
    }
}

/// [`run`], returning the reply itself.
pub fn run_reply(
    socket: &Path,
    cmd: Cmd,
    json: bool,
    passphrase: Option<&SecretBytes>,
) -> Result<Reply, ClientError> {
    let reply = match (cmd, passphrase) {
        (Cmd::Status, _) => status(socket)?,
        (Cmd::Lock, _) => lock(socket)?,
        (Cmd::Keepalive, _) => keepalive(socket)?,
        (Cmd::Unlock, Some(p)) => unlock(socket, p)?,
        (Cmd::Unlock, None) => {
            // Who listens is checked before the operator types anything; the
            // request's own connection is checked again (the prompt may be long).
            drop(connect(socket)?);
            unlock(socket, &read_passphrase()?)?
        }
    };
    let ok = reply.success();
    if json {
        println!("{}", reply.line);
    } else if ok {
        println!("{}", human(cmd, &reply));
    } else {
        eprintln!("{}", human(cmd, &reply));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{parse_request, Request};

    fn reply(line: &str) -> Reply {
        Reply {
            line: line.into(),
            value: serde_json::from_str(line).unwrap(),
        }
    }

    #[test]
    fn unlock_line_round_trips_through_the_server_parser() {
        for p in ["hunter2", "a\"b\\c", "tab\tnew\nline\u{7f}", "café 😀", ""] {
            let line = unlock_line(&SecretBytes::from_slice(p.as_bytes())).unwrap();
            let bytes = line.as_bytes();
            assert_eq!(bytes.last(), Some(&b'\n'));
            assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "{p:?}");
            match parse_request(&bytes[..bytes.len() - 1]).unwrap() {
                Request::Unlock(s) => assert_eq!(s.as_bytes(), p.as_bytes()),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            unlock_line(&SecretBytes::from_slice(b"\xff")),
            Err(ClientError::PassphraseNotUtf8)
        ));
    }

    #[test]
    fn human_rendering() {
        let s = human(
            Cmd::Status,
            &reply(
                r#"{"state":"unlocked","detail":"tpm2_unseal","idle_seconds":142,"last_activity":1741444200.0,"lock_in_seconds":1658}"#,
            ),
        );
        assert_eq!(
            s,
            "vault: unlocked (tpm2 unseal)\nidle for: 2m 22s\nauto-lock in: 27m 38s"
        );
        let s = human(
            Cmd::Status,
            &reply(
                r#"{"state":"locked","detail":"auto_lock_idle","idle_seconds":5,"last_activity":1.0,"lockout_seconds":40}"#,
            ),
        );
        assert!(s.contains("unlock refused for: 40s"), "{s}");
        let f = reply(
            r#"{"success":false,"error":"incorrect passphrase or device error","retry_after":60}"#,
        );
        assert!(!f.success());
        assert_eq!(
            human(Cmd::Unlock, &f),
            "unlock failed: incorrect passphrase or device error (locked out: retry in 1m 00s)"
        );
        assert!(reply(r#"{"success":true}"#).success());
        assert_eq!(duration(7300), "2h 01m");
    }

    #[test]
    fn human_rendering_of_inhibitors_problems_and_overrides() {
        let s = human(
            Cmd::Status,
            &reply(
                r#"{"state":"error","detail":"lock_incomplete","idle_seconds":0,"last_activity":1.0,"message":"cannot lock: closing the mapping failed: busy","inhibitors":[{"who":"backup","why":"nightly","remaining_seconds":125,"uid":1000,"pid":7,"keep":false}]}"#,
            ),
        );
        assert!(s.contains("vault: error (lock incomplete)"), "{s}");
        assert!(
            s.contains("problem: cannot lock: closing the mapping failed"),
            "{s}"
        );
        assert!(
            s.contains("auto-lock held off by: backup (nightly), 2m 05s left, uid 1000"),
            "{s}"
        );
        let s = human(
            Cmd::Lock,
            &reply(r#"{"success":true,"state":"locked","overrode":["backup","dl"]}"#),
        );
        assert_eq!(s, "vault locked\noverrode inhibitors: backup, dl");
        let s = human(
            Cmd::Lock,
            &reply(
                r#"{"success":true,"state":"unlocked","warning":"not locked for suspend: vault.lock_on_suspend is false in the configuration"}"#,
            ),
        );
        assert!(s.starts_with("warning: not locked for suspend"), "{s}");
    }

    #[test]
    fn only_root_or_ourselves_are_trusted_servers() {
        assert!(trusted_server(0, 1000));
        assert!(trusted_server(1000, 1000));
        assert!(trusted_server(0, 0));
        assert!(!trusted_server(60010, 0));
        assert!(!trusted_server(60010, 1000));
        let e = ClientError::Untrusted {
            socket: "/run/vaultguard/control.sock".into(),
            uid: 60010,
            pid: 4242,
            euid: 0,
        }
        .to_string();
        for part in [
            "/run/vaultguard/control.sock",
            "uid 60010",
            "pid 4242",
            "nothing was sent",
        ] {
            assert!(e.contains(part), "{e}");
        }
    }

    #[test]
    fn a_listener_of_our_own_uid_is_trusted() {
        let dir = crate::testutil::TmpDir::new("client");
        let sock = dir.join("s");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let s = connect(&sock);
        drop(l);
        assert!(s.is_ok(), "{:?}", s.err());
    }

    #[test]
    fn connect_errors_name_the_socket() {
        let e = status(Path::new("/nonexistent/vaultguard.sock")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/vaultguard.sock"),
            "{e}"
        );
        assert!(!is_serving(Path::new("/nonexistent/vaultguard.sock")));
    }
}
