//! Every audit entry mirrored to the systemd journal, with structured fields, so
//! that journald's own sealing (Forward Secure Sealing) and forwarding apply to it:
//! `VAULTGUARD_EVENT=`, `VAULTGUARD_IDENTITY=`, `VAULTGUARD_ENTRY_HASH=` and one
//! `VAULTGUARD_<FIELD>=` per audit field, beside `MESSAGE=` and `PRIORITY=`.
//!
//! Written by hand in journald's native protocol (one datagram to
//! `/run/systemd/journal/socket`, `KEY=value` lines; a value holding a newline is
//! sent as `KEY\n<u64 LE length><bytes>\n`) because it is thirty lines and the
//! libraries for it link libsystemd, which a static initramfs binary cannot carry.
//! Best effort: no journald (an initramfs without systemd, a container) means no
//! mirror, never a failed append. The file log stays the record of truth.

use super::Value;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// journald's native socket.
pub const SOCKET: &str = "/run/systemd/journal/socket";

#[cfg(test)]
thread_local! {
    /// Where unit tests' mirrors go (nowhere unless a test says so).
    pub static TEST_SOCKET: std::cell::RefCell<Option<std::path::PathBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// Who an entry is about, as a journal field: an `identity` field as given, else
/// `uid:N`, else `system` (the boot path, the timer).
pub fn identity(fields: &[(&str, Value<'_>)]) -> String {
    let get = |k: &str| fields.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    match (get("identity"), get("uid")) {
        (Some(Value::Str(s)), _) => s.to_string(),
        (_, Some(Value::UInt(u))) => format!("uid:{u}"),
        (_, Some(Value::Int(u))) => format!("uid:{u}"),
        _ => "system".to_string(),
    }
}

/// The datagram for one entry.
pub fn datagram(event: &str, fields: &[(&str, Value<'_>)], entry_hash: &str) -> Vec<u8> {
    // Refusals and failures are warnings; everything else is a notice.
    let priority = if ["failed", "refused", "denied", "broken", "lockout", "cut"]
        .iter()
        .any(|w| event.contains(w))
    {
        4
    } else {
        5
    };
    let mut out = Vec::with_capacity(256);
    let mut message = format!("audit: {event}");
    for (k, v) in fields {
        message.push_str(&format!(" {k}={}", render(v)));
    }
    push(&mut out, "MESSAGE", &message);
    push(&mut out, "PRIORITY", &priority.to_string());
    push(&mut out, "SYSLOG_IDENTIFIER", "vaultguard");
    push(&mut out, "VAULTGUARD_EVENT", event);
    push(&mut out, "VAULTGUARD_IDENTITY", &identity(fields));
    push(&mut out, "VAULTGUARD_ENTRY_HASH", entry_hash);
    for (k, v) in fields {
        // Audit field names are [a-z0-9_], so upper-cased they are valid journal
        // field names.
        push(
            &mut out,
            &format!("VAULTGUARD_{}", k.to_ascii_uppercase()),
            &render(v),
        );
    }
    out
}

fn render(v: &Value<'_>) -> String {
    match v {
        Value::Str(s) => s.to_string(),
        Value::UInt(n) => n.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
    }
}

fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

/// Send one entry to journald, if it is there.
pub fn mirror(event: &str, fields: &[(&str, Value<'_>)], entry_hash: &str) {
    #[cfg(test)]
    let target = TEST_SOCKET.with(|t| t.borrow().clone());
    #[cfg(not(test))]
    let target = Some(std::path::PathBuf::from(SOCKET));
    if let Some(path) = target {
        send_to(&path, &datagram(event, fields, entry_hash));
    }
}

fn send_to(path: &Path, data: &[u8]) {
    if let Ok(sock) = UnixDatagram::unbound() {
        let _ = sock.send_to(data, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse the native protocol back into (key, value) pairs.
    pub fn parse(mut d: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !d.is_empty() {
            let nl = d.iter().position(|&b| b == b'\n').unwrap();
            let line = &d[..nl];
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                out.push((
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
                ));
                d = &d[nl + 1..];
            } else {
                let key = String::from_utf8(line.to_vec()).unwrap();
                let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = String::from_utf8(d[nl + 9..nl + 9 + len].to_vec()).unwrap();
                assert_eq!(d[nl + 9 + len], b'\n');
                out.push((key, value));
                d = &d[nl + 10 + len..];
            }
        }
        out
    }

    #[test]
    fn fields_follow_the_native_protocol() {
        let d = datagram(
            "unlock_failed",
            &[
                ("uid", 1000u32.into()),
                ("reason", "wrong_passphrase".into()),
                ("error", "line one\nline two".into()),
            ],
            "ab12",
        );
        let kv = parse(&d);
        let get = |k: &str| kv.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("VAULTGUARD_EVENT"), Some("unlock_failed"));
        assert_eq!(get("VAULTGUARD_IDENTITY"), Some("uid:1000"));
        assert_eq!(get("VAULTGUARD_ENTRY_HASH"), Some("ab12"));
        assert_eq!(get("VAULTGUARD_REASON"), Some("wrong_passphrase"));
        assert_eq!(get("VAULTGUARD_ERROR"), Some("line one\nline two"));
        assert_eq!(get("PRIORITY"), Some("4"));
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some("vaultguard"));
        assert!(get("MESSAGE")
            .unwrap()
            .starts_with("audit: unlock_failed uid=1000"));
        assert_eq!(identity(&[]), "system");
        assert_eq!(identity(&[("identity", "webui".into())]), "webui");
    }

    #[test]
    fn append_mirrors_each_entry_to_the_journal_socket() {
        let dir = crate::testutil::TmpDir::new("journal");
        let sock_path = dir.join("journal.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        TEST_SOCKET.with(|t| *t.borrow_mut() = Some(sock_path.clone()));
        let log = dir.join("audit.jsonl");
        let hash = super::super::append(&log, "lock", &[("reason", "manual_lock".into())]).unwrap();
        TEST_SOCKET.with(|t| *t.borrow_mut() = None);
        let mut buf = vec![0u8; 65536];
        sock.set_nonblocking(true).unwrap();
        let n = sock.recv(&mut buf).expect("one datagram per entry");
        let kv = parse(&buf[..n]);
        assert!(kv.contains(&("VAULTGUARD_EVENT".into(), "lock".into())));
        assert!(kv.contains(&("VAULTGUARD_ENTRY_HASH".into(), hash)));
        assert!(kv.contains(&("VAULTGUARD_IDENTITY".into(), "system".into())));
        assert!(sock.recv(&mut buf).is_err(), "exactly one");
    }
}
