//! Signed export of the audit log, for verification off the appliance.
//!
//! `vaultguard audit export --key KEY.pem` writes every entry of every segment
//! (oldest first, byte for byte as logged) followed by one trailer line:
//!
//! ```text
//! {"vaultguard_audit_export":1,"algorithm":"ed25519","key_id":"…","key_version":3,
//!  "entries":1234,"first_prev_hash":"…","chain_head":"…","exported_at":"…","signature":"…"}
//! ```
//!
//! The signature (Ed25519, hex) is over the trailer's canonical form without
//! `signature` ([`super::canonical`]); `chain_head` commits to every entry through
//! the hash chain, so one signature covers the export. `key_id` is the first 16
//! bytes (hex) of SHA-256 over the raw public key and `key_version` the operator's
//! number for it, so after a key rotation the verifier picks the right one of the
//! public keys it is given and old exports still verify.
//!
//! Keys are PKCS#8 / SPKI PEM files as `openssl genpkey -algorithm ed25519` and
//! `openssl pkey -pubout` write them. The private key is read, used and dropped
//! (ed25519-dalek zeroizes it); it belongs off the appliance in production, on the
//! machine that collects exports. This module never writes the live log.

use super::{canonical, hex, rfc3339_ms, verify, verify_from, AuditError, GENESIS_HASH};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

/// The trailer's format version.
pub const FORMAT: u64 = 1;

#[derive(Debug)]
pub enum ExportError {
    Audit(AuditError),
    Key {
        path: PathBuf,
        msg: String,
    },
    Io {
        path: PathBuf,
        err: std::io::Error,
    },
    /// The export file itself is malformed (no trailer, wrong counts, a bad line).
    Malformed {
        path: PathBuf,
        msg: String,
    },
    UnknownKey {
        key_id: String,
        key_version: u64,
    },
    BadSignature {
        key_id: String,
    },
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportError::Audit(e) => write!(f, "{e}"),
            ExportError::Key { path, msg } => write!(f, "key {}: {msg}", path.display()),
            ExportError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            ExportError::Malformed { path, msg } => {
                write!(f, "export {}: {msg}", path.display())
            }
            ExportError::UnknownKey {
                key_id,
                key_version,
            } => write!(
                f,
                "the export is signed by key {key_id} (version {key_version}), which is none of the \
                 public keys given: pass that key with --public-key"
            ),
            ExportError::BadSignature { key_id } => write!(
                f,
                "the signature by key {key_id} does not match the export: it was altered after signing"
            ),
        }
    }
}

impl std::error::Error for ExportError {}

impl From<AuditError> for ExportError {
    fn from(e: AuditError) -> Self {
        ExportError::Audit(e)
    }
}

/// The key id of a public key: SHA-256 of its 32 raw bytes, first 16 bytes, hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..16])
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey, ExportError> {
    let pem = read_pem(path)?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| ExportError::Key {
        path: path.into(),
        msg: format!(
            "not an Ed25519 private key in PKCS#8 PEM ({e}); make one with \
             `openssl genpkey -algorithm ed25519 -out KEY.pem`"
        ),
    })
}

pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, ExportError> {
    let pem = read_pem(path)?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| ExportError::Key {
        path: path.into(),
        msg: format!(
            "not an Ed25519 public key in SPKI PEM ({e}); derive it with \
             `openssl pkey -in KEY.pem -pubout -out KEY.pub.pem`"
        ),
    })
}

fn read_pem(path: &Path) -> Result<zeroize::Zeroizing<String>, ExportError> {
    std::fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|err| ExportError::Io {
            path: path.into(),
            err,
        })
}

/// The export of the log at `log` (all its segments), signed with `key`.
pub fn export(
    log: &Path,
    key: &SigningKey,
    key_version: u64,
    now_ms: u64,
) -> Result<Vec<u8>, ExportError> {
    // Which files, oldest first, and whether the chain starts at genesis.
    let v = verify(log)?;
    let mut out = Vec::new();
    for (path, _) in &v.segments {
        let text = std::fs::read(path).map_err(|err| ExportError::Io {
            path: path.clone(),
            err,
        })?;
        out.extend_from_slice(&text);
    }
    // Segments hold whole lines and each `segment_start` chains onto the one
    // before, so the concatenation is one chain. It is checked again as read: a
    // writer may have appended since `verify`.
    let first_prev = first_prev_hash(&out).unwrap_or_else(|| GENESIS_HASH.to_string());
    let start = match v.missing_predecessor {
        Some(_) => None,
        None => Some(GENESIS_HASH),
    };
    let checked = verify_from(&out, start).map_err(|(line, reason)| ExportError::Malformed {
        path: log.into(),
        msg: format!("line {line} of the concatenated segments: {reason}"),
    })?;
    let mut trailer = serde_json::json!({
        "vaultguard_audit_export": FORMAT,
        "algorithm": "ed25519",
        "key_id": key_id(&key.verifying_key()),
        "key_version": key_version,
        "entries": checked.entries,
        "first_prev_hash": first_prev,
        "chain_head": checked.last_hash,
        "exported_at": rfc3339_ms(now_ms),
    });
    let sig = key.sign(canonical(&trailer).as_bytes());
    trailer["signature"] = hex(&sig.to_bytes()).into();
    out.extend_from_slice(trailer.to_string().as_bytes());
    out.push(b'\n');
    Ok(out)
}

fn first_prev_hash(text: &[u8]) -> Option<String> {
    let first = text.split(|&b| b == b'\n').next()?;
    let v: serde_json::Value = serde_json::from_slice(first).ok()?;
    Some(v.get("prev_hash")?.as_str()?.to_string())
}

/// What an export verified to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedExport {
    pub entries: usize,
    pub chain_head: String,
    pub key_id: String,
    pub key_version: u64,
    pub exported_at: String,
}

impl fmt::Display for VerifiedExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} entries, hash chain intact, signed by key {} (version {}) at {}",
            self.entries, self.key_id, self.key_version, self.exported_at
        )
    }
}

/// Check an export with any of `keys`: the trailer's signature, then the chain
/// of the entries above it, which must end at the signed `chain_head`.
pub fn verify_export(
    path: &Path,
    text: &[u8],
    keys: &[VerifyingKey],
) -> Result<VerifiedExport, ExportError> {
    let bad = |msg: String| ExportError::Malformed {
        path: path.into(),
        msg,
    };
    let body = text
        .strip_suffix(b"\n")
        .ok_or_else(|| bad("does not end with a newline (cut short?)".into()))?;
    let (entries, trailer) = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => (&text[..i + 1], &body[i + 1..]),
        None => (&text[..0], body),
    };
    crate::json::check_no_duplicate_keys(trailer).map_err(|e| bad(format!("trailer: {e}")))?;
    let mut t: serde_json::Value =
        serde_json::from_slice(trailer).map_err(|e| bad(format!("trailer: {e}")))?;
    if t.get("vaultguard_audit_export").and_then(|v| v.as_u64()) != Some(FORMAT) {
        return Err(bad(
            "the last line is not a vaultguard export trailer (format 1)".into(),
        ));
    }
    if t.get("algorithm").and_then(|v| v.as_str()) != Some("ed25519") {
        return Err(bad("algorithm is not ed25519".into()));
    }
    let field = |t: &serde_json::Value, k: &str| -> Result<String, ExportError> {
        t.get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| bad(format!("trailer: `{k}` missing or not a string")))
    };
    let sig_hex = field(&t, "signature")?;
    let key_id_s = field(&t, "key_id")?;
    let key_version = t.get("key_version").and_then(|v| v.as_u64()).unwrap_or(0);
    let sig_bytes: [u8; 64] = crate::encoding::hex_decode(&sig_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("signature is not 64 bytes of hex".into()))?;
    let key =
        keys.iter()
            .find(|k| key_id(k) == key_id_s)
            .ok_or_else(|| ExportError::UnknownKey {
                key_id: key_id_s.clone(),
                key_version,
            })?;
    if let Some(o) = t.as_object_mut() {
        o.remove("signature");
    }
    key.verify(canonical(&t).as_bytes(), &Signature::from_bytes(&sig_bytes))
        .map_err(|_| ExportError::BadSignature {
            key_id: key_id_s.clone(),
        })?;
    // Signed: now the entries must be the chain the trailer commits to.
    let first_prev = field(&t, "first_prev_hash")?;
    let v = verify_from(entries, Some(&first_prev))
        .map_err(|(line, reason)| bad(format!("line {line}: {reason}")))?;
    let chain_head = field(&t, "chain_head")?;
    if v.last_hash != chain_head {
        return Err(bad(format!(
            "the entries end at {}…, the signed chain head is {}… (entries added or removed)",
            v.last_hash.get(..12).unwrap_or(""),
            chain_head.get(..12).unwrap_or("")
        )));
    }
    let n = t.get("entries").and_then(|v| v.as_u64());
    if n != Some(v.entries as u64) {
        return Err(bad(format!(
            "{} entries, the trailer says {n:?}",
            v.entries
        )));
    }
    Ok(VerifiedExport {
        entries: v.entries,
        chain_head,
        key_id: key_id_s,
        key_version,
        exported_at: field(&t, "exported_at")?,
    })
}
