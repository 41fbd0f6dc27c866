//! Kernel keyring: find and revoke volume keys left linked after activation, and
//! systemd's passphrase cache ([`cache`]).
//!
//! libcryptsetup hands the volume key to dm-crypt as a `logon` key named
//! `cryptsetup:<LUKS UUID>-d<N>`; once dm-crypt holds its own copy the key is
//! normally unlinked. A lock must still leave none behind (another tool, or a
//! `link-volume-key` option, may have linked one into a longer-lived keyring), so
//! the lock sequence sweeps for them here. Nothing here ever reads a key's payload.

pub mod cache;

use linux_keyutils::{Key, KeyError, KeySerialId};
use std::fmt;

#[derive(Debug)]
pub enum KeyringError {
    Read(std::io::Error),
    Revoke { id: i32, err: String },
}

impl fmt::Display for KeyringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyringError::Read(e) => write!(f, "cannot read /proc/keys: {e}"),
            KeyringError::Revoke { id, err } => write!(f, "cannot revoke key {id:08x}: {err}"),
        }
    }
}

impl std::error::Error for KeyringError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub id: i32,
    pub key_type: String,
    pub description: String,
}

/// Parse /proc/keys lines: `ID FLAGS USAGE TIMEOUT PERM UID GID TYPE DESC: SUMMARY`.
pub fn parse_proc_keys(text: &str) -> Vec<KeyEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let id = i32::from_str_radix(f.next()?, 16).ok()?;
            let key_type = f.nth(6)?.to_string();
            let rest: Vec<&str> = f.collect();
            let joined = rest.join(" ");
            let description = joined.split_once(": ").map_or(joined.as_str(), |(d, _)| d);
            let description = description.trim_end_matches(':').to_string();
            Some(KeyEntry {
                id,
                key_type,
                description,
            })
        })
        .collect()
}

/// Volume keys of the LUKS volume `uuid` among `entries`.
pub fn volume_keys_of<'a>(entries: &'a [KeyEntry], uuid: &str) -> Vec<&'a KeyEntry> {
    let prefix = format!("cryptsetup:{uuid}-d");
    entries
        .iter()
        .filter(|e| e.key_type == "logon" && e.description.starts_with(&prefix))
        .collect()
}

/// Invalidate every volume key of the volume `uuid` that this process may act on.
/// Returns how many were invalidated. A key we may only view is skipped: it is one
/// another user's process holds, or one already unlinked by libcryptsetup that the
/// kernel's key garbage collector has not yet reaped (it still shows in /proc/keys).
pub fn revoke_volume_keys(uuid: &str) -> Result<usize, KeyringError> {
    let text = std::fs::read_to_string("/proc/keys").map_err(KeyringError::Read)?;
    let entries = parse_proc_keys(&text);
    let mut n = 0;
    for e in volume_keys_of(&entries, uuid) {
        match Key::from_id(KeySerialId::new(e.id)).invalidate() {
            Ok(()) => n += 1,
            // Not possessed and not ours to touch, or gone since /proc/keys was read.
            Err(KeyError::AccessDenied | KeyError::KeyDoesNotExist | KeyError::KeyRevoked) => {}
            Err(err) => {
                return Err(KeyringError::Revoke {
                    id: e.id,
                    err: format!("{err:?}"),
                })
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
0b8f4a2c I--Q---     1 perm 3f010000     0     0 keyring   _ses: 1
1e2d3c4b I--Q---     1 perm 3f010000     0     0 logon     cryptsetup:0f9c7e3a-1111-2222-3333-444455556666-d0: 64
2a3b4c5d I--Q---     1 perm 3f010000     0     0 logon     cryptsetup:aaaaaaaa-1111-2222-3333-444455556666-d0: 64
3a3b4c5d I--Q---     1 perm 1f010000     0     0 user      cryptsetup:0f9c7e3a-1111-2222-3333-444455556666-d0: 64
";

    #[test]
    fn parses_proc_keys() {
        let e = parse_proc_keys(SAMPLE);
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].key_type, "keyring");
        assert_eq!(e[0].description, "_ses");
        assert_eq!(e[1].id, 0x1e2d3c4b);
        assert_eq!(
            e[1].description,
            "cryptsetup:0f9c7e3a-1111-2222-3333-444455556666-d0"
        );
    }

    #[test]
    fn selects_only_logon_keys_of_this_volume() {
        let e = parse_proc_keys(SAMPLE);
        let v = volume_keys_of(&e, "0f9c7e3a-1111-2222-3333-444455556666");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].id, 0x1e2d3c4b);
    }
}
