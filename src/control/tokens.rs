//! Bearer tokens for clients whose uid means nothing (containers sharing the
//! socket): their format, the root-only file of their hashes, and the lookup the
//! supervisor does on each request that carries one.
//!
//! A token is `vg_` followed by 43 base64url characters: 256 bits from the
//! kernel RNG, printed once by `vaultguard token issue` and never stored. The file
//! (`control.tokens_file`, mode 0600, written atomically) holds each token's name,
//! role, creation, expiry and revocation, and the SHA-256 of the token. A plain
//! hash is enough: a slow KDF protects guessable secrets such as passwords, but
//! nobody can enumerate 2^256 candidates, so stretching would only cost every
//! request time and buy nothing. Comparison of the hashes is constant-time anyway.
//!
//! The token never leaves the request line: [`presented`] hashes it straight from
//! the line buffer (which the framing wipes), and only the hash is compared. Audit
//! entries and errors name the token's `name`, never the token or its hash.
//! The supervisor re-reads the file when its identity (inode, size, mtime,
//! ctime) changes, checked by `stat` at each lookup: no timer, no inotify watch.

use crate::control::roles::TokenRefusal;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub const PREFIX: &str = "vg_";
/// `vg_` + base64url (no padding) of 32 bytes.
pub const TOKEN_LEN: usize = 3 + 43;
/// The largest token file read (thousands of tokens fit).
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// The SHA-256 of a presented token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not secret in itself, but nothing needs to see it.
        write!(f, "Digest(..)")
    }
}

/// What a request's `token` field held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    Digest(Digest),
    /// Not `vg_` + 43 base64url characters (wrong length, escapes, other bytes).
    Malformed,
}

/// Judge the raw (still JSON-escaped) contents of a `token` string. A real token
/// never needs an escape, so one with a backslash is malformed; nothing is copied.
pub fn presented(raw: &[u8]) -> Presented {
    let ok = raw.len() == TOKEN_LEN
        && raw.starts_with(PREFIX.as_bytes())
        && raw[PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if !ok {
        return Presented::Malformed;
    }
    Presented::Digest(hash(raw))
}

pub fn hash(token: &[u8]) -> Digest {
    Digest(Sha256::digest(token).into())
}

/// A new token, `vg_` + 43 base64url characters, in a zeroizing buffer.
pub fn generate() -> std::io::Result<crate::secret::SecretBytes> {
    let mut raw = crate::secret::SecretBytes::zeroed(32);
    crate::secret::fill_random(raw.as_mut_bytes())?;
    let mut out = crate::secret::SecretBytes::zeroed(TOKEN_LEN);
    out.as_mut_bytes()[..3].copy_from_slice(PREFIX.as_bytes());
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode_slice(raw.as_bytes(), &mut out.as_mut_bytes()[3..])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    debug_assert_eq!(n, 43);
    Ok(out)
}

/// Equal in time independent of where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// One token as the file keeps it. Times are seconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub role: String,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
    pub created: u64,
    #[serde(default)]
    pub expires: Option<u64>,
    #[serde(default)]
    pub revoked: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub version: u32,
    pub tokens: Vec<Entry>,
}

impl Default for TokenFile {
    fn default() -> Self {
        TokenFile {
            version: 1,
            tokens: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub enum TokenError {
    Read {
        path: PathBuf,
        err: std::io::Error,
    },
    Parse {
        path: PathBuf,
        msg: String,
    },
    /// Others may read or write it, or someone other than root owns it.
    Unsafe {
        path: PathBuf,
        msg: String,
    },
    Write {
        path: PathBuf,
        err: std::io::Error,
    },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Read { path, err } => {
                write!(f, "cannot read the token file {}: {err}", path.display())
            }
            TokenError::Parse { path, msg } => write!(
                f,
                "the token file {} is not valid: {msg} (restore it from a backup, or move it \
                 away and issue the tokens again)",
                path.display()
            ),
            TokenError::Unsafe { path, msg } => write!(
                f,
                "refusing the token file {}: {msg} (`chown root: {p}; chmod 600 {p}`)",
                path.display(),
                p = path.display()
            ),
            TokenError::Write { path, err } => {
                write!(f, "cannot write the token file {}: {err}", path.display())
            }
        }
    }
}

impl std::error::Error for TokenError {}

/// Read the token file; a missing one is empty. Refused when anyone but its
/// owner may read or write it, or its owner is neither root nor us.
pub fn load(path: &Path) -> Result<TokenFile, TokenError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    check_dir(path)?;
    // O_NONBLOCK: a FIFO put where the file belongs must not block the
    // supervisor's single thread in open(2) until someone writes to it.
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenFile::default()),
        Err(err) => {
            return Err(TokenError::Read {
                path: path.into(),
                err,
            })
        }
    };
    let meta = f.metadata().map_err(|err| TokenError::Read {
        path: path.into(),
        err,
    })?;
    if !meta.file_type().is_file() {
        let kind = match meta.file_type() {
            t if t.is_fifo() => "a FIFO",
            t if t.is_dir() => "a directory",
            t if t.is_socket() => "a socket",
            t if t.is_char_device() || t.is_block_device() => "a device",
            _ => "not a regular file",
        };
        return Err(TokenError::Unsafe {
            path: path.into(),
            msg: format!("it is {kind}, not a regular file"),
        });
    }
    check_owner_mode(path, meta.uid(), meta.mode())?;
    let mut text = String::new();
    f.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|err| TokenError::Read {
            path: path.into(),
            err,
        })?;
    if text.len() as u64 > MAX_FILE {
        return Err(TokenError::Parse {
            path: path.into(),
            msg: format!("larger than {} MiB", MAX_FILE >> 20),
        });
    }
    let file: TokenFile = serde_json::from_str(&text).map_err(|e| TokenError::Parse {
        path: path.into(),
        msg: e.to_string(),
    })?;
    if file.version != 1 {
        return Err(TokenError::Parse {
            path: path.into(),
            msg: format!("version {} is not known to this vaultguard", file.version),
        });
    }
    check_entries(&file.tokens).map_err(|msg| TokenError::Parse {
        path: path.into(),
        msg,
    })?;
    Ok(file)
}

/// What `token issue` guarantees and a hand edit may break. A name outside the
/// token-name alphabet would reach log lines and metric labels as written; two
/// entries of one name make `token revoke NAME` revoke only the first; two of
/// one hash let a later unrevoked copy accept a revoked token.
fn check_entries(tokens: &[Entry]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    let mut hashes = std::collections::HashSet::new();
    for e in tokens {
        if !crate::control::roles::valid_name(&e.name) {
            return Err(format!(
                "token name `{}` is not 1-64 characters from a-z, 0-9, `_` and `-`",
                e.name.escape_default()
            ));
        }
        if crate::encoding::hex_decode(&e.sha256).map_or(true, |h| h.len() != 32) {
            return Err(format!("token `{}`: sha256 is not 64 hex digits", e.name));
        }
        if !names.insert(e.name.as_str()) {
            return Err(format!(
                "the name `{}` is on two entries (`token revoke` would revoke one of them)",
                e.name
            ));
        }
        if !hashes.insert(e.sha256.to_ascii_lowercase()) {
            return Err(format!(
                "token `{}` has the sha256 of an earlier entry (one token under two entries)",
                e.name
            ));
        }
    }
    Ok(())
}

/// The file's directory: whoever may write it may remove the file (every token
/// gone), plant the lock, or put back an older copy after a `token revoke`.
/// Owned by root (or us) and not writable by others, as the control socket's
/// directory must be.
fn check_dir(path: &Path) -> Result<(), TokenError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let Ok(m) = std::fs::metadata(dir) else {
        // Missing: `token issue` creates it 0700; nothing to read yet.
        return Ok(());
    };
    let me = rustix::process::geteuid().as_raw();
    let why = if m.uid() != 0 && m.uid() != me {
        format!(
            "its directory {} is owned by uid {}",
            dir.display(),
            m.uid()
        )
    } else if m.mode() & 0o022 != 0 {
        format!(
            "its directory {} (mode {:04o}) may be written by others",
            dir.display(),
            m.mode() & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(TokenError::Unsafe {
        path: path.into(),
        msg: format!(
            "{why}; `chown root: {d}; chmod go-w {d}`",
            d = dir.display()
        ),
    })
}

fn check_owner_mode(path: &Path, uid: u32, mode: u32) -> Result<(), TokenError> {
    let me = rustix::process::geteuid().as_raw();
    if uid != 0 && uid != me {
        return Err(TokenError::Unsafe {
            path: path.into(),
            msg: format!("it is owned by uid {uid}, not root"),
        });
    }
    if mode & 0o077 != 0 {
        return Err(TokenError::Unsafe {
            path: path.into(),
            msg: format!("mode {:04o} lets others read or write it", mode & 0o7777),
        });
    }
    Ok(())
}

/// Replace the token file (mode 0600, its directory 0700 if created).
pub fn save(path: &Path, file: &TokenFile) -> Result<(), TokenError> {
    let mut text = serde_json::to_vec_pretty(file).map_err(|e| TokenError::Write {
        path: path.into(),
        err: std::io::Error::other(e.to_string()),
    })?;
    text.push(b'\n');
    crate::atomic_file::write_atomic(path, &text, 0o600, 0o700).map_err(|err| TokenError::Write {
        path: path.into(),
        err,
    })
}

/// Held while a `vaultguard token` command reads, changes and replaces the file:
/// without it two commands at once (two `issue`s, an `issue` and a `revoke`) each
/// write their own edit of the same old file and one edit is lost, a printed
/// token that does not work or a revocation undone. The lock is `flock(2)` on
/// `<tokens_file>.lock`, mode 0600: not on the directory or the file itself,
/// which any user who may open them (a 0755 directory) could lock for ever and
/// so block every `token revoke`, and the file is replaced at each edit. The
/// supervisor only reads and needs no lock (the rename is atomic).
pub struct EditLock(#[allow(dead_code)] std::fs::File);

/// How long a `token` command waits for another one to finish.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn lock_for_edit(path: &Path) -> Result<EditLock, TokenError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let err = |err| TokenError::Write {
        path: lock_path.clone(),
        err,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
    }
    check_dir(path)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(err)?;
    // Whoever else may open it may hold it: the same rule as the file's.
    let meta = f.metadata().map_err(err)?;
    check_owner_mode(&lock_path, meta.uid(), meta.mode())?;
    let started = std::time::Instant::now();
    loop {
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(EditLock(f)),
            Err(rustix::io::Errno::WOULDBLOCK) if started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(err(std::io::Error::other(format!(
                    "another `vaultguard token` command has held it for {} s; try again when \
                     it has finished (`fuser {}` shows it)",
                    LOCK_WAIT.as_secs(),
                    lock_path.display()
                ))))
            }
            Err(e) => return Err(err(e.into())),
        }
    }
}

/// At the supervisor's start: a token whose role does not exist (the
/// configuration lost it since `token issue`) is refused by name, like a grant of
/// an unknown role. An unreadable file is not an error here: token clients are
/// refused with the reason while root keeps the socket.
pub fn check_roles(path: &Path, has_role: impl Fn(&str) -> bool) -> Result<(), String> {
    let Ok(file) = load(path) else {
        return Ok(());
    };
    match file
        .tokens
        .iter()
        .find(|e| e.revoked.is_none() && !has_role(&e.role))
    {
        Some(e) => Err(format!(
            "token `{}` in {} has role `{}`, which does not exist in the configuration: \
             define it under control.roles, or `vaultguard token revoke {}`",
            e.name,
            path.display(),
            e.role.escape_default(),
            e.name
        )),
        None => Ok(()),
    }
}

/// A token that was accepted: its name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub name: String,
    pub role: String,
}

/// A token that was refused, with its name when the hash matched one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub why: TokenRefusal,
    pub name: Option<String>,
    /// The error for the client.
    pub message: String,
}

/// Look `digest` up in `tokens` at `now_s`.
pub fn check(
    tokens: &[(Entry, [u8; 32])],
    digest: &Digest,
    now_s: u64,
) -> Result<Accepted, Refused> {
    // Every entry is compared, so the time does not say which one matched.
    let mut found = None;
    for (e, h) in tokens {
        if ct_eq(h, &digest.0) {
            found = Some(e);
        }
    }
    let Some(e) = found else {
        return Err(Refused {
            why: TokenRefusal::Unknown,
            name: None,
            message: "invalid token: no such token (issue one with `vaultguard token issue`)"
                .into(),
        });
    };
    let name = Some(e.name.clone());
    if let Some(at) = e.revoked {
        return Err(Refused {
            why: TokenRefusal::Revoked,
            name,
            message: format!(
                "token `{}` was revoked at {}; ask the administrator for a new one",
                e.name,
                crate::audit::rfc3339_ms(at.saturating_mul(1000))
            ),
        });
    }
    if let Some(at) = e.expires.filter(|&at| now_s >= at) {
        return Err(Refused {
            why: TokenRefusal::Expired,
            name,
            message: format!(
                "token `{}` expired at {}; ask the administrator for a new one",
                e.name,
                crate::audit::rfc3339_ms(at.saturating_mul(1000))
            ),
        });
    }
    Ok(Accepted {
        name: e.name.clone(),
        role: e.role.clone(),
    })
}

/// The supervisor's view of the token file, re-read when the file changes.
pub struct Store {
    path: PathBuf,
    /// (dev, ino, size, mtime ns, ctime ns) of what is loaded; `None`: absent.
    stamp: Option<(u64, u64, u64, i64, i64)>,
    loaded: Result<Vec<(Entry, [u8; 32])>, String>,
    /// A new load error to report once.
    pub news: Option<String>,
}

impl Store {
    pub fn new(path: &Path) -> Store {
        let mut s = Store {
            path: path.to_path_buf(),
            stamp: None,
            loaded: Ok(Vec::new()),
            news: None,
        };
        s.reload(true);
        s
    }

    fn reload(&mut self, force: bool) {
        let stamp = std::fs::metadata(&self.path).ok().map(|m| {
            (
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            )
        });
        if !force && stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        self.loaded = match load(&self.path) {
            Ok(f) => Ok(f
                .tokens
                .into_iter()
                .map(|e| {
                    let mut h = [0u8; 32];
                    if let Ok(v) = crate::encoding::hex_decode(&e.sha256) {
                        h.copy_from_slice(&v);
                    }
                    (e, h)
                })
                .collect()),
            Err(e) => {
                self.news = Some(e.to_string());
                Err(e.to_string())
            }
        };
    }

    /// Is any token issued, not revoked and not expired now (wall clock, as
    /// `expires` is)? (A uid granted nothing may still connect when one could be
    /// presented; a file of only dead tokens must not open the socket's slots
    /// to every uid.)
    pub fn any_usable(&mut self) -> bool {
        let now_s = crate::audit::now_ms() / 1000;
        self.reload(false);
        match &self.loaded {
            Ok(t) => t
                .iter()
                .any(|(e, _)| e.revoked.is_none() && e.expires.map_or(true, |at| now_s < at)),
            // Unreadable: the client gets the reason on its request.
            Err(_) => true,
        }
    }

    pub fn lookup(&mut self, p: &Presented, now_s: u64) -> Result<Accepted, Refused> {
        let Presented::Digest(d) = p else {
            return Err(Refused {
                why: TokenRefusal::Malformed,
                name: None,
                message: format!(
                    "invalid token: expected `{PREFIX}` followed by 43 base64url characters, \
                     as `vaultguard token issue` prints it"
                ),
            });
        };
        self.reload(false);
        match &self.loaded {
            Ok(t) => check(t, d, now_s),
            Err(_) => Err(Refused {
                why: TokenRefusal::StoreUnreadable,
                name: None,
                message: "tokens cannot be checked now: the token file is unreadable (the \
                          supervisor's log says why)"
                    .into(),
            }),
        }
    }
}

/// `90d`, `12h`, `30min`/`30m`, `45s`, `2w`, or a bare number of seconds, as
/// systemd writes time spans (several parts add up: `1d12h`).
pub fn parse_span(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "`{}` is not a duration: use a number with s, min, h, d or w (e.g. 90d)",
            s.escape_default()
        )
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let mult = match &rest[..unit_len] {
            "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" | "hr" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => return Err(bad()),
        };
        rest = rest[unit_len..].trim_start();
        total = n
            .checked_mul(mult)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, token: &[u8]) -> (Entry, [u8; 32]) {
        let d = hash(token);
        (
            Entry {
                name: name.into(),
                role: "agent".into(),
                sha256: crate::encoding::hex_encode(&d.0),
                created: 100,
                expires: None,
                revoked: None,
            },
            d.0,
        )
    }

    #[test]
    fn generated_tokens_have_the_format_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(a.as_bytes().starts_with(b"vg_"));
        assert!(matches!(presented(a.as_bytes()), Presented::Digest(_)));
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_lookup() {
        let good = generate().unwrap();
        let g = good.as_bytes();
        assert_eq!(presented(&g[..45]), Presented::Malformed);
        assert_eq!(presented(&[g, b"x"].concat()), Presented::Malformed);
        let mut esc = g.to_vec();
        esc[10] = b'\\';
        assert_eq!(presented(&esc), Presented::Malformed);
        let mut other = g.to_vec();
        other[0] = b'x';
        assert_eq!(presented(&other), Presented::Malformed);
        assert_eq!(presented(&vec![b'a'; 1 << 20]), Presented::Malformed);
        assert_eq!(presented(b""), Presented::Malformed);
    }

    #[test]
    fn lookup_accepts_refuses_expired_and_revoked_by_name() {
        let t1 = generate().unwrap();
        let t2 = generate().unwrap();
        let t3 = generate().unwrap();
        let mut list = vec![entry("ci", t1.as_bytes()), entry("old", t2.as_bytes())];
        list[1].0.expires = Some(200);
        list.push(entry("gone", t3.as_bytes()));
        list[2].0.revoked = Some(150);
        let d = |t: &crate::secret::SecretBytes| hash(t.as_bytes());
        assert_eq!(check(&list, &d(&t1), 300).unwrap().name, "ci");
        assert_eq!(check(&list, &d(&t2), 199).unwrap().name, "old");
        let e = check(&list, &d(&t2), 200).unwrap_err();
        assert_eq!(
            (e.why, e.name.as_deref()),
            (TokenRefusal::Expired, Some("old"))
        );
        assert!(e.message.contains("expired"), "{}", e.message);
        let e = check(&list, &d(&t3), 160).unwrap_err();
        assert_eq!(e.why, TokenRefusal::Revoked);
        let e = check(&list, &hash(b"vg_nothing"), 160).unwrap_err();
        assert_eq!((e.why, e.name), (TokenRefusal::Unknown, None));
        // No message ever holds a token.
        for t in [&t1, &t2, &t3] {
            let s = std::str::from_utf8(t.as_bytes()).unwrap();
            assert!(!e.message.contains(s));
        }
    }

    #[test]
    fn spans_parse_like_systemd() {
        assert_eq!(parse_span("90d"), Ok(90 * 86_400));
        assert_eq!(parse_span("1d12h"), Ok(86_400 + 12 * 3600));
        assert_eq!(parse_span("30min"), Ok(1800));
        assert_eq!(parse_span("2w"), Ok(14 * 86_400));
        assert_eq!(parse_span("45"), Ok(45));
        assert!(parse_span("90 days").is_err());
        assert!(parse_span("-1d").is_err());
        assert!(parse_span("").is_err());
        assert!(parse_span("99999999999999999999w").is_err());
    }

    #[test]
    fn hand_edited_duplicates_and_bad_names_refuse_the_file() {
        let dir = crate::testutil::TmpDir::new("tokens-hand");
        let p = dir.join("tokens.json");
        let t = generate().unwrap();
        let (ok, _) = entry("ci", t.as_bytes());
        let write = |tokens: Vec<Entry>| {
            save(&p, &TokenFile { version: 1, tokens }).unwrap();
        };
        // A revoked entry and an unrevoked copy of its hash: the revoked token
        // must not be accepted through the copy.
        let mut revoked = ok.clone();
        revoked.revoked = Some(5);
        let mut copy = ok.clone();
        copy.name = "ci-copy".into();
        write(vec![revoked, copy]);
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("sha256 of an earlier entry"), "{e}");
        let mut s = Store::new(&p);
        let r = s.lookup(&presented(t.as_bytes()), 10).unwrap_err();
        assert_eq!(r.why, TokenRefusal::StoreUnreadable);
        // Hash in upper case is the same hash.
        let mut upper = ok.clone();
        upper.name = "ci-upper".into();
        upper.sha256 = upper.sha256.to_ascii_uppercase();
        write(vec![ok.clone(), upper]);
        assert!(load(&p).is_err());
        // Two entries of one name.
        let (other, _) = entry("ci", generate().unwrap().as_bytes());
        write(vec![ok.clone(), other]);
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("`ci` is on two entries"), "{e}");
        // A name that would inject a line into the log or a metric label.
        for bad in ["ci\nvaultguard_lockouts_total 9", "a\"b", "", "Upper"] {
            let mut n = ok.clone();
            n.name = bad.to_string();
            write(vec![n]);
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains("is not 1-64 characters"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        write(vec![ok]);
        assert_eq!(load(&p).unwrap().tokens.len(), 1);
    }

    #[test]
    fn a_fifo_or_directory_in_place_of_the_file_is_refused_without_blocking() {
        let dir = crate::testutil::TmpDir::new("tokens-fifo");
        let p = dir.join("tokens.json");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let q = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load(&q).map_err(|e| e.to_string()));
        });
        // Before: open(2) waited for a writer, and with it the supervisor.
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("load blocked on a FIFO");
        let e = r.unwrap_err();
        assert!(e.contains("it is a FIFO"), "{e}");
        let d = dir.join("d.json");
        std::fs::create_dir(&d).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
    }

    #[test]
    fn a_directory_others_may_write_refuses_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::testutil::TmpDir::new("tokens-dir");
        let sub = dir.join("lib");
        let p = sub.join("tokens.json");
        let (e, _) = entry("ci", b"vg_x");
        save(
            &p,
            &TokenFile {
                version: 1,
                tokens: vec![e],
            },
        )
        .unwrap();
        assert_eq!(load(&p).unwrap().tokens.len(), 1);
        for mode in [0o777, 0o1777, 0o775] {
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(
                e.contains("may be written by others") && e.contains("chmod go-w"),
                "{e}"
            );
            // The edit lock goes through load too: no edit in such a directory.
        }
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(load(&p).unwrap().tokens.len(), 1);
    }

    #[test]
    fn a_file_over_4_mib_is_refused_and_one_at_the_limit_is_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::testutil::TmpDir::new("tokens-big");
        let p = dir.join("tokens.json");
        let body = r#"{"version":1,"tokens":[]}"#;
        let write = |len: usize| {
            let mut t = body.as_bytes().to_vec();
            t.resize(len, b' ');
            std::fs::write(&p, &t).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(MAX_FILE as usize);
        assert!(load(&p).unwrap().tokens.is_empty());
        write(MAX_FILE as usize + 1);
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("larger than 4 MiB"), "{e}");
    }

    #[test]
    fn the_file_round_trips_with_mode_0600_and_an_open_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::testutil::TmpDir::new("tokens");
        let p = dir.join("sub").join("tokens.json");
        assert_eq!(load(&p).unwrap(), TokenFile::default());
        let (e, _) = entry("ci", b"vg_x");
        let f = TokenFile {
            version: 1,
            tokens: vec![e],
        };
        save(&p, &f).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load(&p).unwrap(), f);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644"), "{e}");
        // The store refuses every token while the file is unsafe, and says why once.
        let mut s = Store::new(&p);
        assert!(s.news.take().is_some());
        let r = s
            .lookup(&presented(generate().unwrap().as_bytes()), 0)
            .unwrap_err();
        assert_eq!(r.why, TokenRefusal::StoreUnreadable);
    }
}
