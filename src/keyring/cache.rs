//! systemd's passphrase cache in the kernel keyring, so one passphrase typed at boot
//! opens every volume that shares it, whether systemd-cryptsetup or vaultguard asks.
//!
//! The format is systemd's (src/shared/ask-password-api.c): a key of type `user`,
//! named by the request's keyname (`cryptsetup` for volume passphrases), in the
//! caller's user keyring; its payload is the cached answers, each followed by a
//! NUL; a new answer is appended (never twice), the key's timeout is set to 150 s,
//! and the mtime of /run/systemd/ask-password is touched so agents look again.
//! Payloads are read into and written from [`SecretBytes`] only.

use crate::secret::SecretBytes;
use linux_keyutils::{KeyError, KeyRing, KeyRingIdentifier};
use std::fmt;

/// How long a cached passphrase lives: systemd's KEYRING_TIMEOUT_USEC, 2.5 minutes.
pub const TIMEOUT_SECS: usize = 150;

/// The largest payload of a `user` key (the kernel's limit).
pub const MAX_PAYLOAD: usize = 32767;

#[derive(Debug)]
pub struct CacheError {
    pub keyname: String,
    pub err: KeyError,
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "passphrase cache (user key `{}` in the user keyring): {:?}; the next volume will ask again",
            self.keyname, self.err
        )
    }
}

impl std::error::Error for CacheError {}

/// Split a NUL-separated list (systemd's nulstr; the last NUL may be missing) into
/// secrets. Empty entries are skipped.
pub fn split_nulstr(payload: &[u8]) -> Vec<SecretBytes> {
    payload
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(SecretBytes::from_slice)
        .collect()
}

fn user_keyring(keyname: &str, create: bool) -> Result<KeyRing, CacheError> {
    KeyRing::from_special_id(KeyRingIdentifier::User, create).map_err(|err| CacheError {
        keyname: keyname.to_string(),
        err,
    })
}

/// The cached answers under `keyname`; none when there is no such key (never
/// cached, or expired).
pub fn lookup(keyname: &str) -> Result<Vec<SecretBytes>, CacheError> {
    let fail = |err| CacheError {
        keyname: keyname.to_string(),
        err,
    };
    let ring = match user_keyring(keyname, false) {
        Ok(r) => r,
        Err(e) if e.err == KeyError::KeyDoesNotExist => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let key = match ring.search(keyname) {
        Ok(k) => k,
        Err(KeyError::KeyDoesNotExist | KeyError::KeyExpired | KeyError::KeyRevoked) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(fail(e)),
    };
    let mut buf = SecretBytes::zeroed(MAX_PAYLOAD + 1);
    let len = match key.read(&mut buf.as_mut_bytes()) {
        Ok(n) => n,
        Err(KeyError::KeyDoesNotExist | KeyError::KeyExpired | KeyError::KeyRevoked) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(fail(e)),
    };
    Ok(split_nulstr(&buf.as_bytes()[..len.min(MAX_PAYLOAD)]))
}

/// Add `answer` to the cache `keyname` (appended; already there: nothing changes,
/// as systemd does) and give the key systemd's 150 s timeout. Returns whether the
/// key was written.
pub fn push(keyname: &str, answer: &[u8]) -> Result<bool, CacheError> {
    let fail = |err| CacheError {
        keyname: keyname.to_string(),
        err,
    };
    if answer.is_empty() || answer.contains(&0) {
        // An answer with a NUL cannot be told apart from two answers in the list.
        return Ok(false);
    }
    let cached = lookup(keyname)?;
    if cached.iter().any(|c| c.ct_eq(answer)) {
        return Ok(false);
    }
    let len: usize = cached.iter().map(|c| c.len() + 1).sum::<usize>() + answer.len() + 1;
    if len > MAX_PAYLOAD {
        return Err(fail(KeyError::QuotaExceeded));
    }
    let mut payload = SecretBytes::with_capacity(len);
    for part in cached.iter().map(SecretBytes::as_bytes).chain([answer]) {
        for &b in part.iter().chain(&[0u8]) {
            payload.push(b);
        }
    }
    let key = user_keyring(keyname, true)?
        .add_key(keyname, payload.as_bytes())
        .map_err(fail)?;
    key.set_timeout(TIMEOUT_SECS).map_err(fail)?;
    // Tell agents to check the keyring again; only if the directory exists (a
    // missing one must not become a plain file).
    let dir = std::path::Path::new("/run/systemd/ask-password");
    if dir.is_dir() {
        let _ = std::fs::File::open(dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }
    Ok(true)
}

/// Remove the cache `keyname` (tests, and an operator who wants it gone now).
pub fn forget(keyname: &str) -> Result<bool, CacheError> {
    let ring = match user_keyring(keyname, false) {
        Ok(r) => r,
        Err(e) if e.err == KeyError::KeyDoesNotExist => return Ok(false),
        Err(e) => return Err(e),
    };
    match ring.search(keyname) {
        Ok(k) => k.invalidate().map(|()| true).map_err(|err| CacheError {
            keyname: keyname.to_string(),
            err,
        }),
        Err(KeyError::KeyDoesNotExist | KeyError::KeyExpired | KeyError::KeyRevoked) => Ok(false),
        Err(err) => Err(CacheError {
            keyname: keyname.to_string(),
            err,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulstr_split_like_systemd() {
        let got = split_nulstr(b"one\0two\0");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_bytes(), b"one");
        assert_eq!(got[1].as_bytes(), b"two");
        // The last NUL may be missing; empty entries are no answers.
        let got = split_nulstr(b"\0one\0\0two");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].as_bytes(), b"two");
        assert!(split_nulstr(b"").is_empty());
    }
}
