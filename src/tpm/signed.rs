//! Signed PCR policies (TPM2_PolicyAuthorize) in systemd's format, computed in
//! software: the policy key as systemd loads it, the sealing policy
//! systemd-cryptenroll binds to it, the `systemd-measure sign` signature file, and
//! the signing itself (`vaultguard policy sign`).
//!
//! The sealed object's policy does not name PCR values: it names a key. Whoever
//! holds the private key approves PCR policies (PolicyPCR digests over
//! `tpm2_pubkey_pcrs`) by signing them; at unlock the TPM checks the live PCRs
//! against an approved digest (PolicyPCR, then PolicyAuthorize with a ticket from
//! VerifySignature), so a kernel or initrd update needs a new signature, not a
//! reseal. Layout, as systemd 257 computes it (src/shared/tpm2-util.c):
//!
//!   PolicyAuthorize(name of the key, policyRef empty)
//!   → PolicyPCR(literal `tpm2-pcrs`, if any)
//!   → PolicyAuthValue (with a PIN)
//!
//! The key is loaded as a TPMT_PUBLIC with nameAlg SHA-256, attributes
//! decrypt|sign|userWithAuth, symmetric and scheme NULL (RSA: the exponent as
//! it is, 65537 written out; ECC: NIST P-256, KDF NULL); its name is nameAlg || SHA-256(TPMT_PUBLIC).
//! A signature is over SHA-256(approved policy digest): RSASSA-PKCS1-v1_5 with
//! SHA-256 (raw), or ECDSA P-256 with SHA-256 (DER, as OpenSSL writes it).

use super::policy::{self, Bank};
use crate::encoding::{base64_decode, base64_encode, hex_decode, hex_encode};
use p256::pkcs8::der::pem;
use serde_json::{Map, Value};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const TPM_CC_POLICY_AUTHORIZE: u32 = 0x0000_016A;
/// The file name systemd-measure writes and systemd-cryptsetup looks for.
pub const SIGNATURE_FILE_NAME: &str = "tpm2-pcr-signature.json";
/// Where systemd-cryptsetup 257 looks for it (CONF_PATHS("systemd")), in this
/// order; in the initrd `/.extra` (where systemd-stub puts it) comes last.
pub const SIGNATURE_DIRS: &[&str] = &[
    "/etc/systemd",
    "/run/systemd",
    "/usr/local/lib/systemd",
    "/usr/lib/systemd",
];
pub const INITRD_SIGNATURE_DIR: &str = "/.extra";
/// A signature file larger than this is refused before it is read: a real one
/// holds a few hundred bytes per signed policy.
pub const MAX_SIGNATURE_FILE: u64 = 1 << 20;

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ECC_NIST_P256: u16 = 0x0003;
/// decrypt | sign | userWithAuth, as systemd loads a policy key.
const POLICY_KEY_ATTRIBUTES: u32 = 0x0002_0000 | 0x0004_0000 | 0x0000_0040;

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";

/// Why a key file was refused: one line an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

fn key_err(msg: impl Into<String>) -> KeyError {
    KeyError(msg.into())
}

/// A public key that approves PCR policies (the token's `tpm2_pubkey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyKey {
    /// DER SubjectPublicKeyInfo.
    spki: Vec<u8>,
    kind: KeyKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyKind {
    Rsa { n: Vec<u8>, e: u32 },
    P256 { x: Vec<u8>, y: Vec<u8> },
}

/// Decode one PEM document, refusing encrypted ones with a line that says what to do.
fn pem_document(text: &[u8]) -> Result<(String, Vec<u8>), KeyError> {
    let s = String::from_utf8_lossy(text);
    if s.contains("ENCRYPTED") {
        return Err(key_err(
            "the key is encrypted (a passphrase-protected PEM); decrypt it first \
             (openssl pkey -in KEY -out PLAIN.pem) on the machine that keeps it",
        ));
    }
    let start = s
        .find("-----BEGIN ")
        .ok_or_else(|| key_err("not a PEM file (no -----BEGIN line)"))?;
    let (label, der) = pem::decode_vec(s[start..].trim_end().as_bytes())
        .map_err(|e| key_err(format!("not a valid PEM document: {e}")))?;
    Ok((label.to_string(), der))
}

impl PolicyKey {
    /// A `PUBLIC KEY` PEM (SubjectPublicKeyInfo), as `openssl pkey -pubout` writes
    /// it and systemd reads it: RSA-2048 or ECC NIST P-256.
    pub fn from_pem(text: &[u8]) -> Result<PolicyKey, KeyError> {
        let (label, der) = pem_document(text)?;
        match label.as_str() {
            "PUBLIC KEY" => PolicyKey::from_spki_der(&der),
            "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" => Err(key_err(
                "this is a private key; give the public key (openssl pkey -in KEY -pubout) \
                 — the private key stays off the appliance",
            )),
            other => Err(key_err(format!(
                "a PEM `{other}`, not a `PUBLIC KEY` (SubjectPublicKeyInfo)"
            ))),
        }
    }

    pub fn from_spki_der(der: &[u8]) -> Result<PolicyKey, KeyError> {
        use p256::pkcs8::DecodePublicKey;
        let info = p256::pkcs8::spki::SubjectPublicKeyInfoRef::try_from(der)
            .map_err(|e| key_err(format!("not a SubjectPublicKeyInfo: {e}")))?;
        let kind = match info.algorithm.oid.to_string().as_str() {
            OID_RSA => {
                use rsa::traits::PublicKeyParts;
                let k = rsa::RsaPublicKey::from_public_key_der(der)
                    .map_err(|e| key_err(format!("unreadable RSA public key: {e}")))?;
                let bits = k.n().bits();
                if bits != 2048 {
                    return Err(key_err(format!(
                        "an RSA key of {bits} bits; signed PCR policies take RSA-2048 \
                         (what every TPM verifies) or ECC P-256"
                    )));
                }
                let e_bytes = k.e().to_bytes_be();
                if e_bytes.len() > 4 {
                    return Err(key_err("an RSA key whose exponent does not fit 32 bits"));
                }
                let e = e_bytes.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b));
                KeyKind::Rsa {
                    n: k.n().to_bytes_be(),
                    e,
                }
            }
            OID_EC => {
                let k = p256::PublicKey::from_public_key_der(der).map_err(|_| {
                    key_err("an EC key on a curve other than NIST P-256 (only P-256 is supported)")
                })?;
                use p256::elliptic_curve::sec1::ToEncodedPoint;
                let point = k.to_encoded_point(false);
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    return Err(key_err("an EC public key at infinity"));
                };
                KeyKind::P256 {
                    x: x.to_vec(),
                    y: y.to_vec(),
                }
            }
            oid => {
                return Err(key_err(format!(
                "a public key of algorithm {oid}; signed PCR policies take RSA-2048 or ECC P-256"
            )))
            }
        };
        Ok(PolicyKey {
            spki: der.to_vec(),
            kind,
        })
    }

    pub fn is_rsa(&self) -> bool {
        matches!(self.kind, KeyKind::Rsa { .. })
    }

    /// The signature file's `pkfp`: SHA-256 of the key as OpenSSL's
    /// i2d_PublicKey encodes it (what systemd's pubkey_fingerprint hashes): the
    /// PKCS#1 RSAPublicKey DER for RSA, the uncompressed point (04 || x || y) for
    /// ECC — not the SubjectPublicKeyInfo.
    pub fn fingerprint(&self) -> Vec<u8> {
        match &self.kind {
            KeyKind::Rsa { n, e } => {
                use rsa::pkcs1::EncodeRsaPublicKey;
                let key = rsa::RsaPublicKey::new_unchecked(
                    rsa::BigUint::from_bytes_be(n),
                    rsa::BigUint::from(*e),
                );
                // Encoding a key we decoded cannot fail; an empty input would give
                // a fingerprint no signature file holds.
                let der = key
                    .to_pkcs1_der()
                    .map(|d| d.as_bytes().to_vec())
                    .unwrap_or_default();
                Bank::Sha256.hash(&[&der])
            }
            KeyKind::P256 { x, y } => Bank::Sha256.hash(&[&[0x04], x, y]),
        }
    }

    /// The key as the TPM loads it (marshalled TPMT_PUBLIC).
    pub fn tpmt_public(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(300);
        let (alg, _) = match &self.kind {
            KeyKind::Rsa { .. } => (TPM_ALG_RSA, ()),
            KeyKind::P256 { .. } => (TPM_ALG_ECC, ()),
        };
        v.extend_from_slice(&alg.to_be_bytes());
        v.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        v.extend_from_slice(&POLICY_KEY_ATTRIBUTES.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes()); // authPolicy: empty
        v.extend_from_slice(&TPM_ALG_NULL.to_be_bytes()); // symmetric
        v.extend_from_slice(&TPM_ALG_NULL.to_be_bytes()); // scheme
        match &self.kind {
            KeyKind::Rsa { n, e } => {
                v.extend_from_slice(&((n.len() * 8) as u16).to_be_bytes());
                // The exponent as it is (65537 too, not the TPM's 0 for "default"):
                // what systemd writes, and the name must be the same to the byte.
                v.extend_from_slice(&e.to_be_bytes());
                v.extend_from_slice(&(n.len() as u16).to_be_bytes());
                v.extend_from_slice(n);
            }
            KeyKind::P256 { x, y } => {
                v.extend_from_slice(&TPM_ECC_NIST_P256.to_be_bytes());
                v.extend_from_slice(&TPM_ALG_NULL.to_be_bytes()); // kdf
                for c in [x, y] {
                    v.extend_from_slice(&(c.len() as u16).to_be_bytes());
                    v.extend_from_slice(c);
                }
            }
        }
        v
    }

    /// The key's TPM name: nameAlg || SHA-256(TPMT_PUBLIC).
    pub fn name(&self) -> Vec<u8> {
        let mut n = TPM_ALG_SHA256.to_be_bytes().to_vec();
        n.extend_from_slice(&Bank::Sha256.hash(&[&self.tpmt_public()]));
        n
    }
}

/// PolicyAuthorize's contribution: it resets the digest, then extends the key's
/// name and the policyRef (empty in systemd's enrolments; the revocation
/// counter's name in a revocable one, see [`super::counter`]).
pub fn policy_authorize(key_name: &[u8], policy_ref: &[u8]) -> Vec<u8> {
    let d = Bank::Sha256.hash(&[&[0u8; 32], &TPM_CC_POLICY_AUTHORIZE.to_be_bytes(), key_name]);
    Bank::Sha256.hash(&[&d, policy_ref])
}

pub const TPM_CC_POLICY_NV: u32 = 0x0000_0149;
/// TPM_EO_EQ: PolicyNV passes when the index's data equals operandB.
pub const TPM_EO_EQ: u16 = 0x0000;

/// PolicyNV's contribution (TPM 2.0 Part 3, 23.9): SHA-256(digest ||
/// TPM_CC_PolicyNV || SHA-256(operandB || offset || operation) || index name).
pub fn extend_policy_nv(
    digest: &[u8],
    nv_name: &[u8],
    operand_b: &[u8],
    offset: u16,
    operation: u16,
) -> Vec<u8> {
    let args = Bank::Sha256.hash(&[operand_b, &offset.to_be_bytes(), &operation.to_be_bytes()]);
    Bank::Sha256.hash(&[digest, &TPM_CC_POLICY_NV.to_be_bytes(), &args, nv_name])
}

/// The sealing policy of a signed enrolment, in systemd's order (see the module
/// header). `literal` are the `tpm2-pcrs` values (may be empty); `policy_ref`
/// is empty except in a revocable enrolment (the counter's name).
pub fn signed_sealing_policy(
    key: &PolicyKey,
    bank: Bank,
    literal: &[(u32, Vec<u8>)],
    pin: bool,
    policy_ref: &[u8],
) -> Vec<u8> {
    let mut d = policy_authorize(&key.name(), policy_ref);
    if !literal.is_empty() {
        let mut sorted: Vec<&(u32, Vec<u8>)> = literal.iter().collect();
        sorted.sort_by_key(|(p, _)| *p);
        let mask = policy::pcr_mask(&sorted.iter().map(|(p, _)| *p).collect::<Vec<_>>());
        let vals: Vec<Vec<u8>> = sorted.iter().map(|(_, v)| v.clone()).collect();
        d = policy::extend_policy_pcr(&d, bank, mask, &vals);
    }
    if pin {
        d = policy::extend_policy_auth_value(&d);
    }
    d
}

/// The digest a signature approves: PolicyPCR over `values` from a zero digest.
pub fn approved_policy(bank: Bank, values: &[(u32, Vec<u8>)]) -> Vec<u8> {
    policy::sealing_policy(bank, values, false)
}

/// The digest a signature for a revocable enrolment approves: PolicyPCR over
/// `values`, then PolicyNV(the counter named `counter_name` == `value`).
pub fn approved_policy_revocable(
    bank: Bank,
    values: &[(u32, Vec<u8>)],
    counter_name: &[u8],
    value: u64,
) -> Vec<u8> {
    extend_policy_nv(
        &approved_policy(bank, values),
        counter_name,
        &value.to_be_bytes(),
        0,
        TPM_EO_EQ,
    )
}

/// What the key signs: SHA-256 of this (aHash = H(approved || policyRef)).
pub fn signed_message(pol: &[u8], policy_ref: &[u8]) -> Vec<u8> {
    [pol, policy_ref].concat()
}

/// The signature-file key vaultguard adds to an entry signed for a revocation
/// counter: the counter value the signature names (systemd ignores the key, and
/// could not use the entry anyway: its `pol` includes PolicyNV).
pub const COUNTER_VALUE_FIELD: &str = "vaultguard_counter_value";

/// The signature-file key vaultguard adds to an entry on the appliance (`policy
/// ticket`): the TPM's verification ticket for the entry's signature
/// (TPMT_TK_VERIFIED, base64), which PolicyAuthorize takes in place of
/// LoadExternal + VerifySignature + FlushContext at every unlock. Made by a key
/// loaded in the owner hierarchy, it stays valid until TPM2_Clear; only this TPM
/// can make one (an HMAC under its owner proof), and a stale or foreign one is
/// refused by the TPM, after which the signature is verified as without it.
/// systemd ignores the key.
pub const TICKET_FIELD: &str = "vaultguard_ticket";

/// A marshalled TPMT_TK_VERIFIED: tag, hierarchy, TPM2B digest (at most 64 bytes).
const MAX_TICKET: usize = 2 + 4 + 2 + 64;

/// One signed policy in the signature file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureEntry {
    pub pcrs: Vec<u32>,
    /// SHA-256 of the signing key's DER SubjectPublicKeyInfo.
    pub pkfp: Vec<u8>,
    /// The approved PolicyPCR digest.
    pub pol: Vec<u8>,
    /// RSASSA-PKCS1-v1_5 signature, or DER ECDSA signature.
    pub sig: Vec<u8>,
    /// For a revocable enrolment: the revocation counter value it was signed for.
    pub counter: Option<u64>,
    /// This TPM's verification ticket for `sig` ([`TICKET_FIELD`]).
    pub ticket: Option<Vec<u8>>,
}

/// `tpm2-pcr-signature.json`: bank name → signed policies. Banks other than those
/// vaultguard signs are kept as they were when the file is extended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SignatureFile {
    banks: Map<String, Value>,
}

/// Why a signature file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFileError(pub String);

impl fmt::Display for SignatureFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SignatureFileError {}

fn sig_err(msg: impl Into<String>) -> SignatureFileError {
    SignatureFileError(msg.into())
}

fn parse_entry(v: &Value, bank: &str, i: usize) -> Result<SignatureEntry, SignatureFileError> {
    let at = |what: &str| sig_err(format!("entry {i} of `{bank}`: {what}"));
    let o = v.as_object().ok_or_else(|| at("is not an object"))?;
    let pcrs_v = o
        .get("pcrs")
        .and_then(Value::as_array)
        .ok_or_else(|| at("`pcrs` is missing or not an array"))?;
    let mut pcrs = Vec::with_capacity(pcrs_v.len());
    for p in pcrs_v {
        let n = p
            .as_u64()
            .filter(|&n| n < 24)
            .ok_or_else(|| at("`pcrs` holds something that is not a PCR number (0-23)"))?;
        if !pcrs.contains(&(n as u32)) {
            pcrs.push(n as u32);
        }
    }
    pcrs.sort_unstable();
    let hex_field = |name: &str| -> Result<Vec<u8>, SignatureFileError> {
        let s = o
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| at(&format!("`{name}` is missing or not a string")))?;
        hex_decode(s).map_err(|e| at(&format!("`{name}`: {e}")))
    };
    let pkfp = hex_field("pkfp")?;
    let pol = hex_field("pol")?;
    if pkfp.len() != 32 || pol.len() != 32 {
        return Err(at("`pkfp` and `pol` must be 32-byte SHA-256 digests"));
    }
    let sig = o
        .get("sig")
        .and_then(Value::as_str)
        .ok_or_else(|| at("`sig` is missing or not a string"))?;
    let sig = base64_decode(sig).map_err(|e| at(&format!("`sig`: {e}")))?;
    if sig.is_empty() || sig.len() > 1024 {
        return Err(at(
            "`sig` is empty or larger than any RSA-2048 or P-256 signature",
        ));
    }
    let counter = match o.get(COUNTER_VALUE_FIELD) {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| at(&format!("`{COUNTER_VALUE_FIELD}` is not a counter value")))?,
        ),
    };
    let ticket = match o.get(TICKET_FIELD) {
        None => None,
        Some(v) => {
            let t = v
                .as_str()
                .ok_or_else(|| at(&format!("`{TICKET_FIELD}` is not a string")))?;
            let t = base64_decode(t).map_err(|e| at(&format!("`{TICKET_FIELD}`: {e}")))?;
            if t.len() < 8 || t.len() > MAX_TICKET {
                return Err(at(&format!(
                    "`{TICKET_FIELD}` is not a TPM verification ticket (its size)"
                )));
            }
            Some(t)
        }
    };
    Ok(SignatureEntry {
        pcrs,
        pkfp,
        pol,
        sig,
        counter,
        ticket,
    })
}

impl SignatureFile {
    /// Parse (strictly: every entry of every bank must be well formed, as systemd
    /// checks the entries it walks).
    pub fn parse(bytes: &[u8]) -> Result<SignatureFile, SignatureFileError> {
        if bytes.len() as u64 > MAX_SIGNATURE_FILE {
            return Err(sig_err(format!(
                "is {} bytes, more than the {MAX_SIGNATURE_FILE} a signature file may have",
                bytes.len()
            )));
        }
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| sig_err(format!("is not JSON ({e})")))?;
        let Value::Object(banks) = v else {
            return Err(sig_err("is not a JSON object of PCR banks"));
        };
        for (bank, entries) in &banks {
            let arr = entries
                .as_array()
                .ok_or_else(|| sig_err(format!("`{bank}` is not an array of signatures")))?;
            for (i, e) in arr.iter().enumerate() {
                parse_entry(e, bank, i)?;
            }
        }
        Ok(SignatureFile { banks })
    }

    /// The entries of `bank`.
    pub fn entries(&self, bank: Bank) -> Vec<SignatureEntry> {
        self.banks
            .get(bank.name())
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .enumerate()
                    .filter_map(|(i, e)| parse_entry(e, bank.name(), i).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The signature for exactly this PCR set, key and approved digest, as
    /// systemd's find_signature matches it.
    pub fn find(
        &self,
        bank: Bank,
        pcrs: &[u32],
        pkfp: &[u8],
        pol: &[u8],
    ) -> Option<SignatureEntry> {
        self.entries(bank)
            .into_iter()
            .find(|e| e.pcrs == pcrs && e.pkfp == pkfp && e.pol == pol)
    }

    /// Why no entry matches: the closest kind of mismatch, for the refusal.
    pub fn explain_miss(&self, bank: Bank, pcrs: &[u32], pkfp: &[u8]) -> String {
        let entries = self.entries(bank);
        let list = |p: &[u32]| p.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        if entries.is_empty() {
            return format!("it holds no {} signatures", bank.name());
        }
        if !entries.iter().any(|e| e.pkfp == pkfp) {
            return "it holds signatures by other keys only (no `pkfp` is the enrolled key's)"
                .into();
        }
        if !entries.iter().any(|e| e.pkfp == pkfp && e.pcrs == pcrs) {
            return format!(
                "its signatures by the enrolled key sign other PCRs than {} (the enrolment's)",
                list(pcrs)
            );
        }
        format!(
            "none of its signatures approves the current values of PCRs {} (nobody signed \
             this boot's components)",
            list(pcrs)
        )
    }

    /// Add `entry` under `bank`, replacing an entry for the same PCRs, key and digest.
    pub fn add(&mut self, bank: Bank, entry: &SignatureEntry) {
        let arr = self
            .banks
            .entry(bank.name().to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if !arr.is_array() {
            *arr = Value::Array(Vec::new());
        }
        if let Value::Array(a) = arr {
            a.retain(|e| {
                parse_entry(e, bank.name(), 0).map_or(true, |x| {
                    !(x.pcrs == entry.pcrs && x.pkfp == entry.pkfp && x.pol == entry.pol)
                })
            });
            let mut o = Map::new();
            o.insert(
                "pcrs".into(),
                Value::Array(entry.pcrs.iter().map(|&p| Value::from(p)).collect()),
            );
            o.insert("pkfp".into(), hex_encode(&entry.pkfp).into());
            o.insert("pol".into(), hex_encode(&entry.pol).into());
            o.insert("sig".into(), base64_encode(&entry.sig).into());
            if let Some(v) = entry.counter {
                o.insert(COUNTER_VALUE_FIELD.into(), v.into());
            }
            if let Some(t) = &entry.ticket {
                o.insert(TICKET_FIELD.into(), base64_encode(t).into());
            }
            a.push(Value::Object(o));
        }
    }

    pub fn to_json_string(&self) -> String {
        let mut s = Value::Object(self.banks.clone()).to_string();
        s.push('\n');
        s
    }
}

/// Open a file whose name outside input may control (the signature file, the
/// event log, a staged initrd or kernel) for reading, refusing anything but a
/// regular file. O_NONBLOCK: a FIFO planted under the name must not block
/// open(2) (and with it the boot unlock) until someone writes to it; a device
/// such as /dev/zero would be read without end, and a terminal must not become
/// our controlling one (O_NOCTTY). Returns the file and its size.
pub fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC | nix::libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        let kind = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "something else"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {kind}, not a regular file"),
        ));
    }
    Ok((f, meta.len()))
}

/// Read a signature file, refusing one larger than [`MAX_SIGNATURE_FILE`] before
/// reading it (by its size, and by reading at most one byte more than allowed),
/// and anything but a regular file (see [`open_regular`]).
pub fn read_signature_file(path: &Path) -> Result<SignatureFile, SignatureFileError> {
    let name = path.display();
    let (f, len) = open_regular(path).map_err(|e| sig_err(format!("{name}: {e}")))?;
    if len > MAX_SIGNATURE_FILE {
        return Err(sig_err(format!(
            "{name} is {len} bytes, more than the {MAX_SIGNATURE_FILE} a signature file may have"
        )));
    }
    let mut buf = Vec::new();
    f.take(MAX_SIGNATURE_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| sig_err(format!("{name}: {e}")))?;
    SignatureFile::parse(&buf).map_err(|e| sig_err(format!("{name} {e}")))
}

/// The signature file to use: `explicit` (config `tpm.signature`, crypttab
/// `tpm2-signature=`) if given, else the first of systemd-cryptsetup's places that
/// exists (`/.extra` too when `in_initrd`). A relative `explicit` name is looked up
/// in those places, as systemd does.
pub fn locate_signature_file(explicit: Option<&Path>, in_initrd: bool) -> Option<PathBuf> {
    if let Some(p) = explicit.filter(|p| p.is_absolute()) {
        return Some(p.to_path_buf());
    }
    let name = explicit.map_or(Path::new(SIGNATURE_FILE_NAME), |p| p);
    let mut dirs: Vec<&str> = SIGNATURE_DIRS.to_vec();
    if in_initrd {
        dirs.push(INITRD_SIGNATURE_DIR);
    }
    dirs.iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Read a PEM key file (public or private), refusing anything larger than a key
/// file can be before reading it all.
pub fn read_key_file(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
    const MAX: u64 = 64 * 1024;
    let f = std::fs::File::open(path).map_err(|e| key_err(e.to_string()))?;
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    f.take(MAX + 1)
        .read_to_end(&mut buf)
        .map_err(|e| key_err(e.to_string()))?;
    if buf.len() as u64 > MAX {
        return Err(key_err(format!("larger than {MAX} bytes: not a PEM key")));
    }
    Ok(buf)
}

/// A private key that signs PCR policies (`vaultguard policy sign`).
pub enum SigningKey {
    Rsa(Box<rsa::RsaPrivateKey>),
    P256(p256::ecdsa::SigningKey),
}

impl SigningKey {
    /// PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY` PEM.
    pub fn from_pem(text: &[u8]) -> Result<SigningKey, KeyError> {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let (label, der) = pem_document(text)?;
        let der = zeroize::Zeroizing::new(der);
        let key = match label.as_str() {
            "RSA PRIVATE KEY" => SigningKey::Rsa(Box::new(
                rsa::RsaPrivateKey::from_pkcs1_der(&der)
                    .map_err(|e| key_err(format!("unreadable RSA private key: {e}")))?,
            )),
            "EC PRIVATE KEY" => SigningKey::P256(p256::ecdsa::SigningKey::from(
                p256::SecretKey::from_sec1_der(&der).map_err(|_| {
                    key_err("an EC private key on a curve other than NIST P-256 (only P-256 is supported)")
                })?,
            )),
            "PRIVATE KEY" => {
                let info = rsa::pkcs8::PrivateKeyInfo::try_from(der.as_slice())
                    .map_err(|e| key_err(format!("not a PKCS#8 private key: {e}")))?;
                match info.algorithm.oid.to_string().as_str() {
                    OID_RSA => SigningKey::Rsa(Box::new(
                        rsa::RsaPrivateKey::from_pkcs8_der(&der)
                            .map_err(|e| key_err(format!("unreadable RSA private key: {e}")))?,
                    )),
                    OID_EC => SigningKey::P256(
                        p256::ecdsa::SigningKey::from_pkcs8_der(&der).map_err(|_| {
                            key_err("an EC private key on a curve other than NIST P-256 (only P-256 is supported)")
                        })?,
                    ),
                    oid => {
                        return Err(key_err(format!(
                            "a private key of algorithm {oid}; policy signing takes RSA-2048 or ECC P-256"
                        )))
                    }
                }
            }
            "PUBLIC KEY" => {
                return Err(key_err(
                    "this is a public key; signing needs the private key",
                ))
            }
            other => return Err(key_err(format!("a PEM `{other}`, not a private key"))),
        };
        if let SigningKey::Rsa(k) = &key {
            use rsa::traits::PublicKeyParts;
            let bits = k.n().bits();
            if bits != 2048 {
                return Err(key_err(format!(
                    "an RSA key of {bits} bits; signed PCR policies take RSA-2048 or ECC P-256"
                )));
            }
        }
        Ok(key)
    }

    /// The matching public key.
    pub fn public(&self) -> PolicyKey {
        use p256::pkcs8::EncodePublicKey;
        let der = match self {
            SigningKey::Rsa(k) => k.to_public_key().to_public_key_der(),
            SigningKey::P256(k) => k.verifying_key().to_public_key_der(),
        };
        // Encoding a key we just decoded cannot fail; from_spki_der checks it again.
        let der = der.map(|d| d.as_bytes().to_vec()).unwrap_or_default();
        match PolicyKey::from_spki_der(&der) {
            Ok(k) => k,
            Err(e) => unreachable!("a decoded private key's public half is valid: {e}"),
        }
    }

    /// Sign an approved policy digest as systemd-measure does (over its SHA-256).
    pub fn sign(&self, pol: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            SigningKey::Rsa(k) => {
                use rsa::sha2::{Digest, Sha256};
                let hashed = Sha256::digest(pol);
                k.sign_with_rng(&mut KernelRng, rsa::Pkcs1v15Sign::new::<Sha256>(), &hashed)
                    .map_err(|e| key_err(format!("RSA signing failed: {e}")))
            }
            SigningKey::P256(k) => {
                use p256::ecdsa::signature::Signer;
                let sig: p256::ecdsa::Signature = k
                    .try_sign(pol)
                    .map_err(|e| key_err(format!("ECDSA signing failed: {e}")))?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
        }
    }
}

/// The kernel's RNG for RSA blinding.
struct KernelRng;

impl rsa::rand_core::RngCore for KernelRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        if let Err(e) = crate::secret::fill_random(dest) {
            // Without randomness there is no safe blinding; stop rather than sign.
            panic!("the kernel RNG failed: {e}");
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        crate::secret::fill_random(dest).map_err(|_| {
            rsa::rand_core::Error::from(
                std::num::NonZeroU32::new(rsa::rand_core::Error::CUSTOM_START)
                    .unwrap_or(std::num::NonZeroU32::MIN),
            )
        })
    }
}

impl rsa::rand_core::CryptoRng for KernelRng {}

/// Check a signature over `pol` (or, for a revocable enrolment,
/// [`signed_message`]) in software, as the TPM's VerifySignature will (used by
/// `policy sign` before writing, and by the tests).
pub fn verify(key: &PolicyKey, pol: &[u8], sig: &[u8]) -> bool {
    use p256::pkcs8::DecodePublicKey;
    match &key.kind {
        KeyKind::Rsa { .. } => {
            use rsa::sha2::{Digest, Sha256};
            let Ok(k) = rsa::RsaPublicKey::from_public_key_der(&key.spki) else {
                return false;
            };
            k.verify(
                rsa::Pkcs1v15Sign::new::<Sha256>(),
                &Sha256::digest(pol),
                sig,
            )
            .is_ok()
        }
        KeyKind::P256 { .. } => {
            use p256::ecdsa::signature::Verifier;
            let (Ok(k), Ok(s)) = (
                p256::ecdsa::VerifyingKey::from_public_key_der(&key.spki),
                p256::ecdsa::Signature::from_der(sig),
            ) else {
                return false;
            };
            k.verify(pol, &s).is_ok()
        }
    }
}

/// An ECDSA DER signature's r and s (big-endian, as the TPM takes them).
pub fn ecdsa_r_s(sig: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let s = p256::ecdsa::Signature::from_der(sig).ok()?;
    let (r, s) = s.split_bytes();
    Some((r.to_vec(), s.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys and the policy digests systemd-cryptenroll 257 wrote for them on a
    /// fresh swtpm (PCR 7 = zeros), `--tpm2-public-key-pcrs=9`.
    const RSA_PUB: &str = include_str!("testdata/rsapub.pem");
    const EC_PUB: &str = include_str!("testdata/ecpub.pem");

    #[test]
    fn policy_matches_systemd_cryptenroll_257() {
        let zero7 = vec![(7u32, vec![0u8; 32])];
        let rsa = PolicyKey::from_pem(RSA_PUB.as_bytes()).unwrap();
        assert_eq!(
            hex_encode(&signed_sealing_policy(
                &rsa,
                Bank::Sha256,
                &zero7,
                false,
                &[]
            )),
            "6610d2aac8327bf4778713459f9dd733980e58c408cd18e8bbcaa5367b2477d1"
        );
        let ec = PolicyKey::from_pem(EC_PUB.as_bytes()).unwrap();
        assert_eq!(
            hex_encode(&signed_sealing_policy(&ec, Bank::Sha256, &[], false, &[])),
            "7b9acf1f17c0e0856319518c91c2b5819d7cad8e903ed12500365865375f9827"
        );
        assert_eq!(
            hex_encode(&signed_sealing_policy(&ec, Bank::Sha256, &zero7, true, &[])),
            "70ab085157f4d2bc4589dbcf0e156a7e3a4fab5cef5ed54d89bc1b1a0445b9dd"
        );
    }

    #[test]
    fn fingerprints_are_systemds() {
        // sha256 of `openssl rsa -pubin -RSAPublicKey_out -outform DER` and of the
        // EC point, the pkfp systemd-cryptsetup 257 accepted for these keys.
        let rsa = PolicyKey::from_pem(RSA_PUB.as_bytes()).unwrap();
        assert_eq!(
            hex_encode(&rsa.fingerprint()),
            "838132ab26b5a532ecbab211938110168bfb0698d9fed58c5e18d0dfb5fd0c1d"
        );
        let ec = PolicyKey::from_pem(EC_PUB.as_bytes()).unwrap();
        assert_eq!(
            hex_encode(&ec.fingerprint()),
            "647a5df9dd2ebeacbb2107fe6abad841994da5212a9f688b73b061fbed6bd12d"
        );
    }

    #[test]
    fn signature_file_round_trip_and_lookup() {
        let e = SignatureEntry {
            pcrs: vec![9, 11],
            pkfp: vec![1; 32],
            pol: vec![2; 32],
            sig: vec![3; 64],
            counter: None,
            ticket: None,
        };
        let mut f = SignatureFile::default();
        f.add(Bank::Sha256, &e);
        f.add(Bank::Sha256, &e); // same entry: replaced, not doubled
        let text = f.to_json_string();
        assert!(!text.contains(COUNTER_VALUE_FIELD), "{text}");
        let back = SignatureFile::parse(text.as_bytes()).unwrap();
        assert_eq!(back.entries(Bank::Sha256), vec![e.clone()]);
        // A revocable entry keeps its counter value; a bad one is refused.
        let mut r = SignatureFile::default();
        let rev = SignatureEntry {
            counter: Some(7),
            ..e.clone()
        };
        r.add(Bank::Sha256, &rev);
        let back_r = SignatureFile::parse(r.to_json_string().as_bytes()).unwrap();
        assert_eq!(back_r.entries(Bank::Sha256), vec![rev]);
        let bad = r.to_json_string().replace(
            &format!("\"{COUNTER_VALUE_FIELD}\":7"),
            &format!("\"{COUNTER_VALUE_FIELD}\":\"7\""),
        );
        let why = SignatureFile::parse(bad.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(why.contains(COUNTER_VALUE_FIELD), "{why}");
        // A ticket is kept (replacing the entry it was made for); one of a size
        // no TPMT_TK_VERIFIED has is refused.
        let ticketed = SignatureEntry {
            ticket: Some(vec![0x80, 0x22, 0x40, 0, 0, 1, 0, 2, 5, 6]),
            ..e.clone()
        };
        let mut t = back.clone();
        t.add(Bank::Sha256, &ticketed);
        let back_t = SignatureFile::parse(t.to_json_string().as_bytes()).unwrap();
        assert_eq!(back_t.entries(Bank::Sha256), vec![ticketed]);
        let short = t.to_json_string().replace(
            &base64_encode(&[0x80, 0x22, 0x40, 0, 0, 1, 0, 2, 5, 6]),
            "AAAA",
        );
        let why = SignatureFile::parse(short.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(why.contains(TICKET_FIELD), "{why}");
        assert!(back
            .find(Bank::Sha256, &[9, 11], &[1; 32], &[2; 32])
            .is_some());
        assert!(back.find(Bank::Sha256, &[9], &[1; 32], &[2; 32]).is_none());
        assert!(back
            .find(Bank::Sha256, &[9, 11], &[9; 32], &[2; 32])
            .is_none());
        assert!(back
            .explain_miss(Bank::Sha256, &[9, 11], &[9; 32])
            .contains("other keys"));
        assert!(back
            .explain_miss(Bank::Sha256, &[9], &[1; 32])
            .contains("other PCRs"));
        assert!(back
            .explain_miss(Bank::Sha256, &[9, 11], &[1; 32])
            .contains("current values"));
    }

    #[test]
    fn signature_file_bad_input_is_one_line() {
        for (bytes, want) in [
            (&b"not json"[..], "is not JSON"),
            (b"[1,2]", "not a JSON object"),
            (b"{\"sha256\":{}}", "not an array"),
            (b"{\"sha256\":[{\"pcrs\":[99]}]}", "PCR number"),
            (
                b"{\"sha256\":[{\"pcrs\":[9],\"pkfp\":\"zz\",\"pol\":\"00\",\"sig\":\"AA==\"}]}",
                "`pkfp`",
            ),
        ] {
            let e = SignatureFile::parse(bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let huge = vec![b' '; (MAX_SIGNATURE_FILE + 1) as usize];
        assert!(SignatureFile::parse(&huge)
            .unwrap_err()
            .to_string()
            .contains("more than"));
    }

    #[test]
    fn sign_and_verify_both_key_types() {
        let ec = p256::SecretKey::random(&mut KernelRng);
        use p256::pkcs8::EncodePrivateKey;
        let pem = ec.to_pkcs8_pem(Default::default()).unwrap();
        let k = SigningKey::from_pem(pem.as_bytes()).unwrap();
        let pol = [7u8; 32];
        let sig = k.sign(&pol).unwrap();
        assert!(verify(&k.public(), &pol, &sig));
        assert!(!verify(&k.public(), &[8u8; 32], &sig));
        assert!(ecdsa_r_s(&sig).is_some());
        assert!(!k.public().is_rsa());
    }

    #[test]
    fn key_file_errors_are_one_clear_line() {
        let e = PolicyKey::from_pem(b"hello").unwrap_err().to_string();
        assert!(e.contains("not a PEM"), "{e}");
        let enc =
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = SigningKey::from_pem(enc).err().unwrap().to_string();
        assert!(e.contains("encrypted"), "{e}");
        // Ed25519 public key: unsupported type.
        let ed = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        let e = PolicyKey::from_pem(ed.as_bytes()).unwrap_err().to_string();
        assert!(
            e.contains("1.3.101.112") && e.contains("RSA-2048 or ECC P-256"),
            "{e}"
        );
        let e = PolicyKey::from_pem(EC_PUB.replace("PUBLIC KEY", "PRIVATE KEY").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("private key"), "{e}");
    }
}
