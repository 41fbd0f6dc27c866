//! The audit log: an append-only file of JSON lines chained by SHA-256.
//!
//! Every entry is one line holding `ts` (UTC, RFC 3339 with milliseconds), `event`,
//! the caller's fields, `prev_hash` (the previous entry's `entry_hash`, 64 zeros for
//! the first entry) and `entry_hash`:
//!
//! ```text
//! {"ts":"2025-03-08T14:30:00.123Z","event":"lock","reason":"manual_lock","uid":0,"prev_hash":"…","entry_hash":"…"}
//! ```
//!
//! **Canonical form.** `entry_hash` = lowercase hex SHA-256 over the entry *without*
//! its `entry_hash` key, serialised as compact JSON (no whitespace) with object keys
//! sorted by their UTF-8 bytes, strings escaped as serde_json escapes them and
//! integers in decimal. Entries hold only strings, integers and booleans (no floats),
//! so re-serialising a parsed line reproduces exactly the bytes that were hashed.
//!
//! Appends are whole-line single `write(2)`s on an `O_APPEND` descriptor under an
//! exclusive `flock`, followed by `fsync`: concurrent writers (the boot unlock and the
//! supervisor) cannot interleave or fork the chain, and the tail hash is re-read
//! under the lock every time. A torn last line (power cut mid-write, never
//! acknowledged) is cut off before the next append, which first writes a
//! `torn_write_cut` entry saying how many bytes were dropped, so the repair itself
//! is in the chain and `verify` reports it (a cut can also hide tampering). A line
//! whose JSON repeats a key is refused by `verify`: it would read as one thing and
//! display as another.
//!
//! This module never sees a secret: fields are `&str`, integers and booleans chosen
//! by the caller, field names are restricted to `[a-z0-9_]`, and nothing here accepts
//! a `SecretBytes`. Callers must pass plain facts (uid, reason, device), never input.
//! Truncating whole lines off the end cannot be detected by a chain alone; that is
//! what off-host log shipping is for.

pub mod anchor;
pub mod export;
pub mod journal;

use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest string value kept in an entry; longer values are cut (and marked) so that
/// a caller passing an error message cannot bloat the log.
pub const MAX_VALUE_LEN: usize = 512;

/// The event that records a torn last line cut off before an append.
pub const TORN_EVENT: &str = "torn_write_cut";

/// Keys the log itself owns (`torn_bytes`: how earlier versions recorded a cut).
const RESERVED: [&str; 5] = ["ts", "event", "prev_hash", "entry_hash", "torn_bytes"];

/// One field value. Deliberately narrow: no bytes, no floats, no secret types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Str(&'a str),
    UInt(u64),
    Int(i64),
    Bool(bool),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(s: &'a str) -> Self {
        Value::Str(s)
    }
}
impl<'a> From<&'a String> for Value<'a> {
    fn from(s: &'a String) -> Self {
        Value::Str(s)
    }
}
impl From<u64> for Value<'_> {
    fn from(n: u64) -> Self {
        Value::UInt(n)
    }
}
impl From<u32> for Value<'_> {
    fn from(n: u32) -> Self {
        Value::UInt(n.into())
    }
}
impl From<usize> for Value<'_> {
    fn from(n: usize) -> Self {
        Value::UInt(n as u64)
    }
}
impl From<i64> for Value<'_> {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}
impl From<i32> for Value<'_> {
    fn from(n: i32) -> Self {
        Value::Int(n.into())
    }
}
impl From<bool> for Value<'_> {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

#[derive(Debug)]
pub enum AuditError {
    Io {
        path: PathBuf,
        op: &'static str,
        err: io::Error,
    },
    BadName {
        name: String,
    },
    Broken {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditError::Io { path, op, err } => {
                write!(f, "audit log {}: cannot {op}: {err}", path.display())
            }
            AuditError::BadName { name } => write!(
                f,
                "audit field or event name `{name}` is not allowed (use [a-z0-9_], not a reserved key)"
            ),
            AuditError::Broken { path, line, reason } => write!(
                f,
                "audit log {}: chain broken at line {line}: {reason}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for AuditError {}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> AuditError + 'a {
    move |err| AuditError::Io {
        path: path.to_path_buf(),
        op,
        err,
    }
}

/// Append one entry to the log at `path` (created 0600, with its directory 0700, if
/// missing). Returns the new entry's hash.
///
/// ```no_run
/// vaultguard::audit::append(
///     std::path::Path::new("/var/log/vaultguard/audit.jsonl"),
///     "unlock_failed",
///     &[("uid", 1000u32.into()), ("reason", "wrong_passphrase".into())],
/// )
/// .ok();
/// ```
pub fn append(
    path: &Path,
    event: &str,
    fields: &[(&str, Value<'_>)],
) -> Result<String, AuditError> {
    append_at(path, now_ms(), event, fields)
}

/// [`append`] with an explicit timestamp (milliseconds since the Unix epoch).
pub fn append_at(
    path: &Path,
    ts_ms: u64,
    event: &str,
    fields: &[(&str, Value<'_>)],
) -> Result<String, AuditError> {
    Ok(append_entries(path, ts_ms, event, fields)?.entry_hash)
}

/// What one append wrote: the chain's tip before it, and the hashes of the
/// entries it added (a `torn_write_cut` record first, when it cut one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub prev_hash: String,
    pub hashes: Vec<String>,
    /// The caller's entry (the last of `hashes`).
    pub entry_hash: String,
}

/// [`append_at`], telling everything it wrote (for the TPM anchor).
pub fn append_entries(
    path: &Path,
    ts_ms: u64,
    event: &str,
    fields: &[(&str, Value<'_>)],
) -> Result<Appended, AuditError> {
    check_name(event, false)?;
    for (k, _) in fields {
        check_name(k, true)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(path, "create its directory"))?;
        }
    }
    let file = open_log(path)?;
    let mut file = file;
    // Held until `file` is closed at the end of this function. A rotation may have
    // renamed the file while we waited: then append to the new one, never to a
    // closed segment (that would fork the chain).
    loop {
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(path, "lock")(e.into()))?;
        if same_file(&file, path) {
            break;
        }
        file = open_log(path)?;
    }

    let tail = read_tail(&mut file).map_err(io_err(path, "read its last entry"))?;
    let mut torn = 0u64;
    if tail.torn > 0 {
        let keep = file
            .metadata()
            .map_err(io_err(path, "stat"))?
            .len()
            .saturating_sub(tail.torn);
        file.set_len(keep)
            .map_err(io_err(path, "cut off a torn last line"))?;
        torn = tail.torn;
    }

    let mut line = String::new();
    let tip = tail.prev_hash.clone();
    let mut prev = tail.prev_hash;
    let cut_fields = [("bytes", Value::UInt(torn))];
    let mut cut_hash = None;
    if torn > 0 {
        let cut = build_entry(ts_ms, TORN_EVENT, &cut_fields, &prev);
        prev = entry_hash(&cut);
        cut_hash = Some(prev.clone());
        line.push_str(&render_line(&cut, &prev));
        line.push('\n');
    }
    let entry = build_entry(ts_ms, event, fields, &prev);
    let hash = entry_hash(&entry);
    line.push_str(&render_line(&entry, &hash));
    line.push('\n');
    // One write: with O_APPEND the kernel places it atomically at the end.
    file.write_all(line.as_bytes())
        .map_err(io_err(path, "append"))?;
    file.sync_data().map_err(io_err(path, "fsync"))?;
    if let Some(h) = &cut_hash {
        journal::mirror(TORN_EVENT, &cut_fields, h);
    }
    journal::mirror(event, fields, &hash);
    let mut hashes: Vec<String> = cut_hash.into_iter().collect();
    hashes.push(hash.clone());
    Ok(Appended {
        prev_hash: tip,
        hashes,
        entry_hash: hash,
    })
}

fn open_log(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path, "open"))
}

/// Does `path` still name the open `file`?
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The event that opens a segment after a rotation.
pub const SEGMENT_EVENT: &str = "segment_start";

/// Close the current segment: rename `path` to `<name>.<UTC time>` and start a new
/// file whose first entry, `segment_start`, names that file (`prev_segment`) and
/// chains onto its last entry, so [`verify`] walks from the newest segment back to
/// the first. Returns the closed segment's path (`None`: the log was empty).
pub fn rotate(path: &Path) -> Result<Option<PathBuf>, AuditError> {
    Ok(rotate_entries(path)?.map(|(segment, _)| segment))
}

/// [`rotate`], also telling the `segment_start` entry it wrote (for the TPM anchor).
pub fn rotate_entries(path: &Path) -> Result<Option<(PathBuf, Appended)>, AuditError> {
    let mut file = open_log(path)?;
    loop {
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(path, "lock")(e.into()))?;
        if same_file(&file, path) {
            break;
        }
        file = open_log(path)?;
    }
    if file.metadata().map_err(io_err(path, "stat"))?.len() == 0 {
        return Ok(None);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "audit.jsonl".into());
    let stamp = rfc3339_ms(now_ms()).replace([':', '-'], "");
    let mut segment = path.with_file_name(format!("{name}.{stamp}"));
    let mut n = 1;
    while segment.exists() {
        segment = path.with_file_name(format!("{name}.{stamp}.{n}"));
        n += 1;
    }
    // Under the lock: no writer can add to the segment after its last hash is read.
    let tail = read_tail(&mut file).map_err(io_err(path, "read its last entry"))?;
    let segment_name = segment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The new file is written complete beside, then renamed over `path` right
    // after the old one moved away, so a reader never finds a headless segment.
    let entry = build_entry(
        now_ms(),
        SEGMENT_EVENT,
        &[
            ("prev_segment", Value::Str(&segment_name)),
            ("prev_torn_bytes", Value::UInt(tail.torn)),
        ],
        &tail.prev_hash,
    );
    let hash = entry_hash(&entry);
    let mut line = render_line(&entry, &hash);
    line.push('\n');
    let fresh = path.with_file_name(format!(".{name}.new"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&fresh)
            .map_err(io_err(&fresh, "create"))?;
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_data())
            .map_err(io_err(&fresh, "write"))?;
    }
    std::fs::rename(path, &segment).map_err(io_err(path, "rename to a segment"))?;
    std::fs::rename(&fresh, path).map_err(io_err(path, "start a new segment"))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    journal::mirror(
        SEGMENT_EVENT,
        &[("prev_segment", Value::Str(&segment_name))],
        &hash,
    );
    let appended = Appended {
        prev_hash: tail.prev_hash,
        hashes: vec![hash.clone()],
        entry_hash: hash,
    };
    Ok(Some((segment, appended)))
}

/// Take over another chain (the initramfs writes its boot events to /run, which
/// survives switch_root, because the real log is not mounted yet): its entries
/// are appended to `into` as `initrd_<event>` with their original time in
/// `orig_ts`, then `from` is removed. A broken `from` is recorded as such (with
/// the line) and kept beside as `<from>.broken` for inspection. Returns how many
/// entries were carried over.
pub fn import(from: &Path, into: &Path) -> Result<usize, AuditError> {
    let mut text = Vec::new();
    match File::open(from) {
        Ok(mut f) => f.read_to_end(&mut text).map_err(io_err(from, "read"))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(from, "open")(e)),
    };
    if let Err((line, reason)) = verify_bytes(&text) {
        let from_s = from.display().to_string();
        append(
            into,
            "initrd_audit_broken",
            &[
                ("file", Value::Str(&from_s)),
                ("line", Value::UInt(line as u64)),
                ("reason", Value::Str(&reason)),
            ],
        )?;
        let mut kept = from.as_os_str().to_owned();
        kept.push(".broken");
        std::fs::rename(from, &kept).map_err(io_err(from, "rename"))?;
        return Ok(0);
    }
    let mut n = 0;
    for raw in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(raw)
        else {
            continue;
        };
        let event = obj
            .get("event")
            .and_then(|e| e.as_str())
            .unwrap_or("unknown");
        let event = format!("initrd_{event}");
        let orig_ts = obj
            .get("ts")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string();
        let mut fields: Vec<(&str, Value<'_>)> = vec![("orig_ts", Value::Str(&orig_ts))];
        for (k, v) in &obj {
            if RESERVED.contains(&k.as_str()) {
                continue;
            }
            let v = match v {
                serde_json::Value::String(s) => Value::Str(s),
                serde_json::Value::Bool(b) => Value::Bool(*b),
                serde_json::Value::Number(x) if x.is_u64() => Value::UInt(x.as_u64().unwrap_or(0)),
                serde_json::Value::Number(x) if x.is_i64() => Value::Int(x.as_i64().unwrap_or(0)),
                _ => continue,
            };
            fields.push((k.as_str(), v));
        }
        append(into, &event, &fields)?;
        n += 1;
    }
    std::fs::remove_file(from).map_err(io_err(from, "remove"))?;
    Ok(n)
}

/// What [`verify`] found in an intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: usize,
    pub last_hash: String,
    /// Torn writes cut off before an append: (line of the entry recording it, bytes).
    pub torn_cuts: Vec<(usize, u64)>,
    /// Every entry's hash, in order (what the TPM anchor was extended with).
    pub entry_hashes: Vec<[u8; 32]>,
}

/// What [`verify`] found in an intact log of one or more segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLog {
    /// Oldest first; the last is the live file.
    pub segments: Vec<(PathBuf, Verified)>,
    /// The oldest segment present continues one that is not here (archived or
    /// deleted); its first entry's `prev_hash` is then taken as the chain's start.
    pub missing_predecessor: Option<String>,
}

impl VerifiedLog {
    /// Every entry's hash across the segments, oldest first.
    pub fn entry_hashes(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.segments
            .iter()
            .flat_map(|(_, v)| v.entry_hashes.iter())
    }

    pub fn entries(&self) -> usize {
        self.segments.iter().map(|(_, v)| v.entries).sum()
    }

    pub fn last_hash(&self) -> &str {
        self.segments
            .last()
            .map_or(GENESIS_HASH, |(_, v)| v.last_hash.as_str())
    }
}

impl fmt::Display for VerifiedLog {
    /// What `vaultguard audit verify` prints for an intact chain.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let live = self.segments.last().map(|(p, _)| p.display().to_string());
        write!(
            f,
            "{}: {} entries",
            live.as_deref().unwrap_or("audit log"),
            self.entries()
        )?;
        if self.segments.len() > 1 {
            write!(f, " in {} segments", self.segments.len())?;
        }
        write!(f, ", hash chain intact")?;
        if let Some(m) = &self.missing_predecessor {
            let oldest = self.segments.first().map(|(p, _)| p.display().to_string());
            write!(
                f,
                "\n{}: continues segment {m}, which is not here (archived or deleted): \
                 the chain is verified from there on",
                oldest.unwrap_or_default()
            )?;
        }
        for (p, v) in &self.segments {
            for (line, bytes) in &v.torn_cuts {
                write!(
                    f,
                    "\n{}: line {line} records that a torn last line of {bytes} bytes was cut off \
                     before it (a write interrupted by a crash or power cut, or tampering)",
                    p.display()
                )?;
            }
        }
        Ok(())
    }
}

/// Segments walked back at most (a loop of names cannot run forever).
const MAX_SEGMENTS: usize = 100_000;

/// Check every link of the chain, walking back through rotated segments (each
/// `segment_start` names its predecessor in the same directory). The error names
/// the file and the first broken line (1-based).
pub fn verify(path: &Path) -> Result<VerifiedLog, AuditError> {
    let read = |p: &Path| -> Result<Vec<u8>, AuditError> {
        let mut text = Vec::new();
        File::open(p)
            .and_then(|mut f| f.read_to_end(&mut text))
            .map_err(io_err(p, "read"))?;
        Ok(text)
    };
    let broken = |p: &Path, line: usize, reason: String| AuditError::Broken {
        path: p.to_path_buf(),
        line,
        reason,
    };
    // Newest to oldest, by the names the segments' first entries give.
    let mut chain = vec![(path.to_path_buf(), read(path)?)];
    let mut missing_predecessor = None;
    loop {
        let (p, text) = chain.last().expect("never empty");
        let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
        let Some(prev_name) = segment_predecessor(first) else {
            break;
        };
        if prev_name.is_empty() || prev_name.contains('/') || prev_name.starts_with('.') {
            return Err(broken(
                p,
                1,
                format!("prev_segment `{prev_name}` is not a file name"),
            ));
        }
        let prev_path = p.with_file_name(&prev_name);
        if chain.iter().any(|(q, _)| *q == prev_path) || chain.len() >= MAX_SEGMENTS {
            return Err(broken(p, 1, format!("segments loop back to {prev_name}")));
        }
        match read(&prev_path) {
            Ok(t) => chain.push((prev_path, t)),
            Err(AuditError::Io { err, .. }) if err.kind() == io::ErrorKind::NotFound => {
                missing_predecessor = Some(prev_name);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let mut segments = Vec::with_capacity(chain.len());
    let mut prev: Option<String> = match missing_predecessor {
        Some(_) => None,
        None => Some(GENESIS_HASH.to_string()),
    };
    for (p, text) in chain.into_iter().rev() {
        let v = verify_from(&text, prev.as_deref()).map_err(|(l, r)| broken(&p, l, r))?;
        prev = Some(v.last_hash.clone());
        segments.push((p, v));
    }
    Ok(VerifiedLog {
        segments,
        missing_predecessor,
    })
}

/// The predecessor a segment's first line names, if it is a `segment_start`.
fn segment_predecessor(first_line: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(first_line).ok()?;
    if v.get("event")?.as_str()? != SEGMENT_EVENT {
        return None;
    }
    Some(v.get("prev_segment")?.as_str()?.to_string())
}

/// One file's bytes, as the first (or only) segment: `Err((line, reason))`.
pub fn verify_bytes(text: &[u8]) -> Result<Verified, (usize, String)> {
    verify_from(text, Some(GENESIS_HASH))
}

/// One segment's bytes chained onto `start` (`None`: take the first entry's
/// `prev_hash` as given, for a segment whose predecessor is gone).
pub(crate) fn verify_from(text: &[u8], start: Option<&str>) -> Result<Verified, (usize, String)> {
    let mut prev = start.unwrap_or_default().to_string();
    let mut trust_first = start.is_none();
    let mut entries = 0;
    let mut torn_cuts = Vec::new();
    let mut entry_hashes = Vec::new();
    if text.is_empty() {
        return Ok(Verified {
            entries,
            last_hash: prev,
            torn_cuts,
            entry_hashes,
        });
    }
    let body = match text.strip_suffix(b"\n") {
        Some(b) => b,
        None => {
            let n = text.split(|&b| b == b'\n').count();
            return Err((n, "last line is not terminated (torn write)".into()));
        }
    };
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let (hash, claimed_prev, torn) = check_line(raw).map_err(|r| (line_no, r))?;
        if let Some(bytes) = torn {
            torn_cuts.push((line_no, bytes));
        }
        if std::mem::take(&mut trust_first) {
            prev = claimed_prev.clone();
        }
        if claimed_prev != prev {
            return Err((
                line_no,
                format!(
                    "prev_hash does not match the entry before it (line deleted, inserted or reordered; expected {}…, found {}…)",
                    short(&prev),
                    short(&claimed_prev)
                ),
            ));
        }
        entry_hashes.push(digest_of_hex(&hash));
        prev = hash;
        entries += 1;
    }
    Ok(Verified {
        entries,
        last_hash: prev,
        torn_cuts,
        entry_hashes,
    })
}

/// Parse one line and check its own hash; returns (entry_hash, prev_hash, and the
/// bytes of a torn write whose cut the line records).
fn check_line(raw: &[u8]) -> Result<(String, String, Option<u64>), String> {
    crate::json::check_no_duplicate_keys(raw).map_err(|e| format!("not a valid entry ({e})"))?;
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| format!("not valid JSON ({e})"))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err("not a JSON object".into());
    };
    let Some(serde_json::Value::String(claimed)) = obj.remove("entry_hash") else {
        return Err("entry_hash missing or not a string".into());
    };
    let prev = match obj.get("prev_hash") {
        Some(serde_json::Value::String(p)) => p.clone(),
        _ => return Err("prev_hash missing or not a string".into()),
    };
    for key in ["ts", "event"] {
        if !matches!(obj.get(key), Some(serde_json::Value::String(_))) {
            return Err(format!("{key} missing or not a string"));
        }
    }
    let torn = match obj.get("event").and_then(|e| e.as_str()) {
        Some(TORN_EVENT) => obj.get("bytes").and_then(|b| b.as_u64()),
        _ => obj.get("torn_bytes").and_then(|b| b.as_u64()),
    };
    let actual = hex(&Sha256::digest(
        canonical(&serde_json::Value::Object(obj)).as_bytes(),
    ));
    if actual != claimed {
        return Err("entry_hash does not match the entry's contents (entry edited)".into());
    }
    Ok((claimed, prev, torn))
}

/// An entry hash back to bytes (it was checked to be our own lowercase hex).
pub fn digest_of_hex(h: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, pair) in h.as_bytes().chunks(2).take(32).enumerate() {
        let v = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => 0,
        };
        out[i] = v(pair[0]) << 4 | v(pair.get(1).copied().unwrap_or(b'0'));
    }
    out
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

struct Tail {
    prev_hash: String,
    /// Bytes after the last newline (a torn write) to be cut off.
    torn: u64,
}

/// Find the hash to chain onto by reading backwards from the end until the last
/// complete line is in hand (entries are small, so this is normally one read).
fn read_tail(file: &mut File) -> io::Result<Tail> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Tail {
            prev_hash: GENESIS_HASH.into(),
            torn: 0,
        });
    }
    let mut chunk = 4096u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = vec![0u8; (len - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        let torn = buf.iter().rev().take_while(|&&b| b != b'\n').count();
        // If no newline at all in the file, everything is a torn first line.
        if torn == buf.len() && start == 0 {
            return Ok(Tail {
                prev_hash: GENESIS_HASH.into(),
                torn: torn as u64,
            });
        }
        if torn < buf.len() {
            let complete = &buf[..buf.len() - torn - 1];
            let line_start = complete.iter().rposition(|&b| b == b'\n').map(|p| p + 1);
            match line_start {
                Some(s) => return Ok(tail_from_line(&complete[s..], torn)),
                None if start == 0 => return Ok(tail_from_line(complete, torn)),
                None => {}
            }
        }
        chunk = chunk.saturating_mul(4);
    }
}

fn tail_from_line(line: &[u8], torn: usize) -> Tail {
    // A line that does not parse keeps the chain going from the hash of its raw
    // bytes; `verify` reports that line anyway.
    let prev_hash = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("entry_hash")?.as_str().map(str::to_string))
        .unwrap_or_else(|| hex(&Sha256::digest(line)));
    Tail {
        prev_hash,
        torn: torn as u64,
    }
}

fn check_name(name: &str, is_field: bool) -> Result<(), AuditError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !(is_field && RESERVED.contains(&name));
    if ok {
        Ok(())
    } else {
        Err(AuditError::BadName { name: name.into() })
    }
}

/// The entry as an ordered list of (key, JSON value), without `entry_hash`.
fn build_entry(
    ts_ms: u64,
    event: &str,
    fields: &[(&str, Value<'_>)],
    prev: &str,
) -> Vec<(String, serde_json::Value)> {
    use serde_json::Value as J;
    let mut e = vec![
        ("ts".to_string(), J::String(rfc3339_ms(ts_ms))),
        ("event".to_string(), J::String(event.into())),
    ];
    for (k, v) in fields {
        if e.iter().any(|(have, _)| have == k) {
            continue; // first one wins; a duplicate key would make the JSON ambiguous
        }
        let j = match *v {
            Value::Str(s) => J::String(clip(s)),
            Value::UInt(n) => J::from(n),
            Value::Int(n) => J::from(n),
            Value::Bool(b) => J::Bool(b),
        };
        e.push((k.to_string(), j));
    }
    e.push(("prev_hash".into(), J::String(prev.into())));
    e
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_VALUE_LEN {
        return s.to_string();
    }
    let mut end = MAX_VALUE_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn entry_hash(entry: &[(String, serde_json::Value)]) -> String {
    let obj: serde_json::Map<String, serde_json::Value> = entry.iter().cloned().collect();
    hex(&Sha256::digest(
        canonical(&serde_json::Value::Object(obj)).as_bytes(),
    ))
}

/// The line as written: keys in a readable order (the hash does not depend on it).
fn render_line(entry: &[(String, serde_json::Value)], hash: &str) -> String {
    let mut out = String::from("{");
    for (k, v) in entry {
        push_pair(&mut out, k, v);
    }
    push_pair(
        &mut out,
        "entry_hash",
        &serde_json::Value::String(hash.into()),
    );
    out.push('}');
    out
}

fn push_pair(out: &mut String, k: &str, v: &serde_json::Value) {
    if out.len() > 1 {
        out.push(',');
    }
    out.push_str(&serde_json::Value::String(k.into()).to_string());
    out.push(':');
    out.push_str(&canonical(v));
}

/// Compact JSON with object keys sorted bytewise, independent of whether serde_json
/// was built with `preserve_order`.
pub fn canonical(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2025-03-08T14:30:00.123Z` from milliseconds since the epoch.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TmpDir;
    use std::os::unix::fs::PermissionsExt;

    /// An audit log path in a fresh directory, removed when the test ends.
    struct TmpLog {
        path: PathBuf,
        _dir: TmpDir,
    }

    impl std::ops::Deref for TmpLog {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.path
        }
    }

    impl AsRef<Path> for TmpLog {
        fn as_ref(&self) -> &Path {
            &self.path
        }
    }

    /// Recompute an edited entry's own hash, as a forger would.
    fn rehash(entry: &mut serde_json::Value) {
        entry.as_object_mut().unwrap().remove("entry_hash");
        let h = hex(&Sha256::digest(canonical(entry).as_bytes()));
        entry["entry_hash"] = h.into();
    }

    fn tmp(name: &str) -> TmpLog {
        let dir = TmpDir::new(&format!("audit-{name}"));
        TmpLog {
            path: dir.join("audit.jsonl"),
            _dir: dir,
        }
    }

    fn write_log(path: &Path, n: usize) {
        for i in 0..n {
            append_at(
                path,
                1_741_444_200_000 + i as u64,
                "test_event",
                &[("n", (i as u64).into()), ("who", "op\"er\nator".into())],
            )
            .unwrap();
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(path, s).unwrap();
    }

    fn broken_line(path: &Path) -> usize {
        match verify(path) {
            Err(AuditError::Broken { line, .. }) => line,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_741_444_200_123), "2025-03-08T14:30:00.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn chain_links_and_verifies() {
        let p = tmp("ok");
        write_log(&p, 5);
        let v = verify(&p).unwrap();
        assert_eq!(v.entries(), 5);
        let ls = lines(&p);
        let first: serde_json::Value = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!(first["prev_hash"], GENESIS_HASH);
        assert_eq!(first["event"], "test_event");
        assert_eq!(first["ts"], "2025-03-08T14:30:00.000Z");
        assert_eq!(first["who"], "op\"er\nator");
        let second: serde_json::Value = serde_json::from_str(&ls[1]).unwrap();
        assert_eq!(second["prev_hash"], first["entry_hash"]);
        assert_eq!(
            v.last_hash(),
            serde_json::from_str::<serde_json::Value>(&ls[4]).unwrap()["entry_hash"]
        );
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn hash_is_over_the_documented_canonical_form() {
        let p = tmp("canon");
        append_at(&p, 0, "e", &[("b", 2u64.into()), ("a", "x".into())]).unwrap();
        let line = &lines(&p)[0];
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let expected_input = format!(
            r#"{{"a":"x","b":2,"event":"e","prev_hash":"{GENESIS_HASH}","ts":"1970-01-01T00:00:00.000Z"}}"#
        );
        assert_eq!(
            v["entry_hash"],
            hex(&Sha256::digest(expected_input.as_bytes()))
        );
    }

    #[test]
    fn an_edited_line_is_named() {
        let p = tmp("edit");
        write_log(&p, 6);
        let mut ls = lines(&p);
        ls[3] = ls[3].replace("\"n\":3", "\"n\":9");
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 4);
        let msg = verify(&p).unwrap_err().to_string();
        assert!(msg.contains("line 4") && msg.contains("edited"), "{msg}");
    }

    #[test]
    fn a_deleted_line_is_named_at_its_successor() {
        let p = tmp("delete");
        write_log(&p, 6);
        let mut ls = lines(&p);
        ls.remove(2);
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 3);
        // Deleting the first line breaks the genesis link.
        let mut ls = lines(&p);
        ls.remove(0);
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 1);
    }

    #[test]
    fn reordered_lines_are_named() {
        let p = tmp("reorder");
        write_log(&p, 6);
        let mut ls = lines(&p);
        ls.swap(1, 4);
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 2);
    }

    #[test]
    fn a_recomputed_hash_still_breaks_the_next_link() {
        // An attacker who edits a line and fixes its entry_hash breaks the next
        // line's prev_hash instead.
        let p = tmp("forge");
        write_log(&p, 4);
        let mut ls = lines(&p);
        let mut v: serde_json::Value = serde_json::from_str(&ls[1]).unwrap();
        v["who"] = "mallory".into();
        rehash(&mut v);
        ls[1] = v.to_string();
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 3);
    }

    #[test]
    fn garbage_and_missing_fields_are_named() {
        let p = tmp("garbage");
        write_log(&p, 3);
        let mut ls = lines(&p);
        ls[1] = "not json".into();
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 2);
        let mut ls = lines(&p);
        ls[1] = "{}".into();
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 2);
        let mut ls = lines(&p);
        ls.insert(0, String::new());
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 1);
    }

    #[test]
    fn torn_tail_is_reported_then_repaired_by_the_next_append() {
        let p = tmp("torn");
        write_log(&p, 3);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"ts\":\"2025-").unwrap();
        drop(f);
        assert_eq!(broken_line(&p), 4);
        append_at(&p, 5, "after_crash", &[]).unwrap();
        // The cut is an entry of its own, and verify reports it: a cut line can
        // also be tampering, so "intact" alone would say too little.
        let v = verify(&p).unwrap();
        assert_eq!(v.entries(), 5);
        assert_eq!(v.segments[0].1.torn_cuts, [(4, 12)]);
        let cut: serde_json::Value = serde_json::from_str(&lines(&p)[3]).unwrap();
        assert_eq!(cut["event"], TORN_EVENT);
        assert_eq!(cut["bytes"], 12);
        let last: serde_json::Value = serde_json::from_str(&lines(&p)[4]).unwrap();
        assert_eq!(last["event"], "after_crash");
        assert_eq!(last["prev_hash"], cut["entry_hash"]);
        // Logs of earlier versions recorded the cut as a field; still reported.
        let q = tmp("torn-old");
        std::fs::write(&q, "").unwrap();
        let e = build_entry(
            0,
            "after_crash",
            &[("torn_bytes_", Value::UInt(1))],
            GENESIS_HASH,
        );
        let mut obj: serde_json::Map<String, serde_json::Value> = e.into_iter().collect();
        obj.remove("torn_bytes_");
        obj.insert("torn_bytes".into(), 7.into());
        let h = hex(&Sha256::digest(
            canonical(&serde_json::Value::Object(obj.clone())).as_bytes(),
        ));
        obj.insert("entry_hash".into(), h.into());
        std::fs::write(&q, format!("{}\n", serde_json::Value::Object(obj))).unwrap();
        assert_eq!(verify(&q).unwrap().segments[0].1.torn_cuts, [(1, 7)]);
    }

    #[test]
    fn rotated_segments_chain_and_verify_walks_them_all() {
        let p = tmp("rotate");
        write_log(&p, 3);
        let head = verify(&p).unwrap().last_hash().to_string();
        let seg1 = rotate(&p).unwrap().expect("a non-empty log rotates");
        append(&p, "after_rotation", &[]).unwrap();
        let seg2 = rotate(&p).unwrap().unwrap();
        append(&p, "later", &[]).unwrap();
        let first: serde_json::Value = serde_json::from_str(&lines(&seg2)[0]).unwrap();
        assert_eq!(first["event"], SEGMENT_EVENT);
        assert_eq!(first["prev_hash"], head.as_str());
        assert_eq!(
            first["prev_segment"],
            seg1.file_name().unwrap().to_str().unwrap()
        );
        let v = verify(&p).unwrap();
        assert_eq!(v.segments.len(), 3);
        assert_eq!(v.entries(), 3 + 2 + 2);
        assert_eq!(v.missing_predecessor, None);
        assert!(
            v.to_string()
                .contains("7 entries in 3 segments, hash chain intact"),
            "{v}"
        );
        // An edit in an old segment is found, and named by its file.
        let mut ls = lines(&seg1);
        ls[1] = ls[1].replace("\"n\":1", "\"n\":9");
        rewrite(&seg1, &ls);
        let e = verify(&p).unwrap_err();
        assert!(
            matches!(&e, AuditError::Broken { path, line: 2, .. } if *path == seg1),
            "{e}"
        );
        // With the oldest segment archived away, the rest still verifies and says so.
        std::fs::remove_file(&seg1).unwrap();
        let v = verify(&p).unwrap();
        assert_eq!(v.segments.len(), 2);
        assert_eq!(
            v.missing_predecessor.as_deref(),
            seg1.file_name().unwrap().to_str()
        );
        assert!(v.to_string().contains("which is not here"), "{v}");
        // A segment that names a file outside its directory is refused.
        let mut ls = lines(&seg2);
        let mut e: serde_json::Value = serde_json::from_str(&ls[0]).unwrap();
        e["prev_segment"] = "../etc/passwd".into();
        rehash(&mut e);
        ls[0] = e.to_string();
        rewrite(&seg2, &ls);
        assert!(verify(&p)
            .unwrap_err()
            .to_string()
            .contains("not a file name"));
    }

    #[test]
    fn a_writer_waiting_through_a_rotation_appends_to_the_new_segment() {
        let p = tmp("rotate-race");
        write_log(&p, 2);
        // Hold the lock as a rotation would, rename underneath, then let go.
        let held = open_log(&p).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let writer = {
            let p = p.to_path_buf();
            std::thread::spawn(move || append(&p, "waited", &[]).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let old = p.with_file_name("moved.jsonl");
        std::fs::rename(&p, &old).unwrap();
        drop(held);
        writer.join().unwrap();
        assert_eq!(lines(&old).len(), 2, "nothing was added to the moved file");
        assert!(lines(&p)[0].contains("\"event\":\"waited\""));
    }

    #[test]
    fn a_line_with_a_repeated_key_is_refused() {
        // serde_json keeps the last of two equal keys: the line would hash and
        // verify as "unlock" while grep and eyes see "lock" first.
        let p = tmp("dupkey");
        write_log(&p, 3);
        let mut ls = lines(&p);
        let v: serde_json::Value = serde_json::from_str(&ls[1]).unwrap();
        ls[1] = ls[1].replacen('{', "{\"event\":\"forged\",", 1);
        assert!(ls[1].contains(&format!("\"event\":{}", v["event"])));
        rewrite(&p, &ls);
        assert_eq!(broken_line(&p), 2);
        let e = verify(&p).unwrap_err().to_string();
        assert!(e.contains("`event` appears twice"), "{e}");
    }

    #[test]
    fn appends_reread_the_tail_written_by_someone_else() {
        // Two writers (boot unlock, then supervisor) on the same file stay chained.
        let p = tmp("two");
        append(&p, "boot_unlock", &[("method", "tpm2".into())]).unwrap();
        append(&p, "supervisor_start", &[]).unwrap();
        append(&p, "lock", &[("reason", "manual_lock".into())]).unwrap();
        assert_eq!(verify(&p).unwrap().entries(), 3);
    }

    #[test]
    fn concurrent_appends_never_fork_the_chain() {
        let p = tmp("concurrent");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = p.to_path_buf();
                std::thread::spawn(move || {
                    for i in 0..25u64 {
                        append(&p, "t", &[("thread", (t as u64).into()), ("i", i.into())]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(verify(&p).unwrap().entries(), 100);
    }

    #[test]
    fn names_are_restricted() {
        let p = tmp("names");
        for bad in [
            "",
            "Upper",
            "with space",
            "entry_hash",
            "prev_hash",
            "ts",
            "event",
        ] {
            assert!(
                matches!(
                    append(&p, "e", &[(bad, 1u64.into())]),
                    Err(AuditError::BadName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert!(append(&p, "Bad-Event", &[]).is_err());
        assert!(!p.exists() || verify(&p).unwrap().entries() == 0);
    }

    #[test]
    fn long_values_are_clipped() {
        let p = tmp("clip");
        let long = "é".repeat(MAX_VALUE_LEN);
        append(&p, "e", &[("msg", long.as_str().into())]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&lines(&p)[0]).unwrap();
        assert!(v["msg"].as_str().unwrap().len() <= MAX_VALUE_LEN + '…'.len_utf8());
        verify(&p).unwrap();
    }

    #[test]
    fn empty_or_missing_log() {
        assert_eq!(verify_bytes(b"").unwrap().entries, 0);
        assert!(matches!(
            verify(Path::new("/nonexistent/audit.jsonl")),
            Err(AuditError::Io { .. })
        ));
    }

    #[test]
    fn import_carries_the_initrd_chain_over_and_removes_it() {
        let dir = crate::testutil::TmpDir::new("audit-import");
        let initrd = dir.join("initrd.jsonl");
        let main = dir.join("main.jsonl");
        append(&main, "supervisor_start", &[]).unwrap();
        append(
            &initrd,
            "tpm_refused",
            &[("reason", Value::Str("PCR 7 changed"))],
        )
        .unwrap();
        append(&initrd, "unlocked", &[("method", Value::Str("passphrase"))]).unwrap();
        assert_eq!(import(&initrd, &main).unwrap(), 2);
        assert!(!initrd.exists());
        let v = verify(&main).unwrap();
        assert_eq!(v.entries(), 3);
        let text = std::fs::read_to_string(&main).unwrap();
        assert!(text.contains("\"event\":\"initrd_tpm_refused\""), "{text}");
        assert!(text.contains("PCR 7 changed") && text.contains("orig_ts"));
        // nothing to import is not an error
        assert_eq!(import(&initrd, &main).unwrap(), 0);
        // a tampered initrd chain is recorded and kept aside, not imported
        append(&initrd, "a", &[]).unwrap();
        append(&initrd, "b", &[]).unwrap();
        let t = std::fs::read_to_string(&initrd)
            .unwrap()
            .replace("\"event\":\"a\"", "\"event\":\"x\"");
        std::fs::write(&initrd, t).unwrap();
        assert_eq!(import(&initrd, &main).unwrap(), 0);
        assert!(dir.join("initrd.jsonl.broken").exists());
        assert!(std::fs::read_to_string(&main)
            .unwrap()
            .contains("initrd_audit_broken"));
        assert_eq!(verify(&main).unwrap().entries(), 4);
    }
}
