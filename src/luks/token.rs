//! The `systemd-tpm2` LUKS2 token: parse, validate, write.
//!
//! One token format, the ecosystem's: what systemd-cryptenroll writes is read here
//! and what is written here is what systemd-cryptsetup reads. vaultguard adds one
//! field systemd ignores, `vaultguard_pcr_values` (the enrolled PCR values, which
//! are not secret), so that a refusal can name the PCR that changed, and one more,
//! `vaultguard_keyslot_macs`: per keyslot, an HMAC keyed with the volume key that
//! binds the keyslot (by its KDF salt) to this token's sealed object. Whoever can
//! write the header cannot make one without the volume key, so a later reseal
//! can prove which keyslot is the old enrolment's even when the TPM can no longer
//! unseal it (see `boot::reseal`). Parsing is strict: a malformed or tampered
//! token is refused with the field named; a `keyslots` list is de-duplicated, so
//! that no keyslot's KDF runs twice for one token.

use crate::encoding::{base64_decode, base64_encode, hex_decode, hex_encode};
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;

pub const TOKEN_TYPE: &str = "systemd-tpm2";
const PCR_VALUES_FIELD: &str = "vaultguard_pcr_values";
const KEYSLOT_MACS_FIELD: &str = "vaultguard_keyslot_macs";
/// The firmware event log's records of each sealed PCR at enrolment, to name the
/// records that changed when the TPM refuses (`{"9":[{"event":"…","digest":"hex"}]}`).
const EVENTLOG_FIELD: &str = "vaultguard_eventlog";
/// A revocable signed policy's revocation counter: the TPM NV index (a number)
/// whose value its signatures name (`vaultguard policy revoke-older`). systemd
/// ignores the key and cannot open such an enrolment (its PolicyAuthorize has
/// the counter's name as policyRef).
pub const REVOCATION_COUNTER_FIELD: &str = "vaultguard_revocation_counter";
/// Bounds on what a header may make us keep: events per PCR, description length.
pub const EVENTLOG_MAX_EVENTS: usize = 512;
pub const EVENTLOG_MAX_TEXT: usize = 256;

/// PCR → (event description, digest) in log order; see [`Tpm2Token::eventlog`].
pub type EventDigests = BTreeMap<u32, Vec<(String, Vec<u8>)>>;
/// LUKS2 has keyslots 0-31.
pub const MAX_KEYSLOTS: usize = 32;

/// `tpm2-primary-alg`: the algorithm of the SRK (or legacy primary) the blob
/// was sealed under. The token format's vocabulary; `boot` translates it for
/// `tpm`, which this module never imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryAlg {
    Ecc,
    Rsa,
}

/// `tpm2-pcr-bank`: the PCR bank the policy binds, by the names systemd writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcrBank {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl PcrBank {
    pub fn from_name(s: &str) -> Option<PcrBank> {
        match s.to_ascii_lowercase().as_str() {
            "sha1" => Some(PcrBank::Sha1),
            "sha256" => Some(PcrBank::Sha256),
            "sha384" => Some(PcrBank::Sha384),
            "sha512" => Some(PcrBank::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PcrBank::Sha1 => "sha1",
            PcrBank::Sha256 => "sha256",
            PcrBank::Sha384 => "sha384",
            PcrBank::Sha512 => "sha512",
        }
    }

    /// Length of one PCR value in this bank.
    pub fn digest_len(self) -> usize {
        match self {
            PcrBank::Sha1 => 20,
            PcrBank::Sha256 => 32,
            PcrBank::Sha384 => 48,
            PcrBank::Sha512 => 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tpm2Token {
    pub keyslots: Vec<u32>,
    /// Marshalled TPM2B_PRIVATE followed by TPM2B_PUBLIC.
    pub blob: Vec<u8>,
    pub pcrs: Vec<u32>,
    pub bank: PcrBank,
    pub primary_alg: PrimaryAlg,
    pub policy_hash: Vec<u8>,
    pub pin: bool,
    pub salt: Option<Vec<u8>>,
    /// Serialized ESYS_TR of the SRK (absent in enrolments by systemd < 254).
    pub srk: Option<Vec<u8>>,
    pub pcr_values: Option<BTreeMap<u32, Vec<u8>>>,
    /// Keyslot → HMAC-SHA256(volume key, binding of that keyslot to `blob`); see
    /// [`Tpm2Token::keyslot_mac`]. Empty in enrolments by other tools.
    pub keyslot_macs: BTreeMap<u32, Vec<u8>>,
    /// The event-log records of the sealed PCRs at enrolment (not secret: the
    /// log is world-readable measurements); empty when the log was not usable.
    pub eventlog: EventDigests,
    /// `tpm2_pubkey`: the PEM public key that signs PCR policies (a signed
    /// enrolment), as systemd-cryptenroll --tpm2-public-key= writes it (base64 of
    /// the PEM text).
    pub pubkey: Option<Vec<u8>>,
    /// `tpm2_pubkey_pcrs`: the PCRs whose values the signatures approve.
    pub pubkey_pcrs: Vec<u32>,
    /// The revocation counter of a revocable signed policy (NV index handle).
    pub revocation_counter: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    NotTpm2,
    Field { field: &'static str, msg: String },
    Unsupported(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::NotTpm2 => write!(f, "not a systemd-tpm2 token"),
            TokenError::Field { field, msg } => write!(f, "token field `{field}`: {msg}"),
            TokenError::Unsupported(what) => write!(f, "unsupported token feature: {what}"),
        }
    }
}

impl std::error::Error for TokenError {}

fn field(field: &'static str, msg: impl Into<String>) -> TokenError {
    TokenError::Field {
        field,
        msg: msg.into(),
    }
}

/// systemd ≥ 255 may write one-element arrays where older versions wrote strings.
fn single_string<'a>(v: &'a Value, name: &'static str) -> Result<&'a str, TokenError> {
    match v {
        Value::String(s) => Ok(s),
        Value::Array(a) if a.len() == 1 => {
            a[0].as_str().ok_or_else(|| field(name, "is not a string"))
        }
        Value::Array(a) if a.len() > 1 => Err(TokenError::Unsupported(format!(
            "`{name}` with {} shards (signed PCR policy combined with pcrlock)",
            a.len()
        ))),
        _ => Err(field(name, "is not a string")),
    }
}

fn parse_pcr_array(v: &Value, name: &'static str) -> Result<Vec<u32>, TokenError> {
    let arr = v.as_array().ok_or_else(|| field(name, "is not an array"))?;
    let mut out = Vec::with_capacity(arr.len());
    for e in arr {
        let n = e
            .as_u64()
            .ok_or_else(|| field(name, "holds a non-integer"))?;
        if n > 23 {
            return Err(field(name, format!("PCR {n} out of range")));
        }
        if !out.contains(&(n as u32)) {
            out.push(n as u32);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `keyslots`: numbers as strings, each keyslot once (a duplicate would only make
/// its KDF run again: a token listing one slow keyslot twenty times would cost
/// twenty runs at every boot), at most as many as LUKS2 has keyslots.
fn parse_keyslots(v: &Value) -> Result<Vec<u32>, TokenError> {
    let arr = v
        .as_array()
        .ok_or_else(|| field("keyslots", "missing or not an array"))?;
    if arr.len() > MAX_KEYSLOTS {
        return Err(field(
            "keyslots",
            format!(
                "lists {} entries; LUKS2 has at most {MAX_KEYSLOTS} keyslots",
                arr.len()
            ),
        ));
    }
    let mut out: Vec<u32> = Vec::with_capacity(arr.len());
    for k in arr {
        let n = k
            .as_str()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| field("keyslots", "entries must be keyslot numbers as strings"))?;
        if n as usize >= MAX_KEYSLOTS {
            return Err(field(
                "keyslots",
                format!("keyslot {n} out of range (LUKS2 has keyslots 0-31)"),
            ));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

/// An event description from the header, made safe to print: it reaches the
/// console, `status` and the journal in a refusal's explanation, and the header
/// is not authenticated, so control characters (a newline forging a line of its
/// own, an escape sequence clearing the line that names the changed record) and
/// bidirectional overrides become `?`, as the event-log parser does for the log.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                '?'
            } else {
                c
            }
        })
        .collect()
}
impl Tpm2Token {
    pub fn from_json(v: &Value) -> Result<Tpm2Token, TokenError> {
        let obj = v.as_object().ok_or(TokenError::NotTpm2)?;
        if obj.get("type").and_then(Value::as_str) != Some(TOKEN_TYPE) {
            return Err(TokenError::NotTpm2);
        }
        let keyslots = parse_keyslots(
            obj.get("keyslots")
                .ok_or_else(|| field("keyslots", "missing or not an array"))?,
        )?;
        if keyslots.is_empty() {
            return Err(field("keyslots", "is empty"));
        }

        let blob = obj
            .get("tpm2-blob")
            .ok_or_else(|| field("tpm2-blob", "missing"))?;
        let blob =
            base64_decode(single_string(blob, "tpm2-blob")?).map_err(|e| field("tpm2-blob", e))?;
        if blob.len() < 4 {
            return Err(field("tpm2-blob", "too short"));
        }

        let pcrs = parse_pcr_array(
            obj.get("tpm2-pcrs")
                .ok_or_else(|| field("tpm2-pcrs", "missing"))?,
            "tpm2-pcrs",
        )?;

        let bank = match obj.get("tpm2-pcr-bank") {
            None => PcrBank::Sha256, // systemd < 250 always used sha256
            Some(b) => {
                let s = b
                    .as_str()
                    .ok_or_else(|| field("tpm2-pcr-bank", "is not a string"))?;
                PcrBank::from_name(s)
                    .ok_or_else(|| field("tpm2-pcr-bank", format!("unknown bank `{s}`")))?
            }
        };
        let primary_alg = match obj.get("tpm2-primary-alg").map(|a| a.as_str()) {
            None => PrimaryAlg::Ecc, // systemd < 250 always used ECC
            Some(Some("ecc")) => PrimaryAlg::Ecc,
            Some(Some("rsa")) => PrimaryAlg::Rsa,
            Some(_) => return Err(field("tpm2-primary-alg", "must be `ecc` or `rsa`")),
        };

        let hash = obj
            .get("tpm2-policy-hash")
            .ok_or_else(|| field("tpm2-policy-hash", "missing"))?;
        let policy_hash = hex_decode(single_string(hash, "tpm2-policy-hash")?)
            .map_err(|e| field("tpm2-policy-hash", e))?;
        if policy_hash.len() != 32 {
            return Err(field(
                "tpm2-policy-hash",
                format!(
                    "is {} bytes, a SHA-256 policy digest is 32",
                    policy_hash.len()
                ),
            ));
        }

        let pin = match obj.get("tpm2-pin") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(field("tpm2-pin", "is not a boolean")),
        };
        let salt = match obj.get("tpm2_salt") {
            None => None,
            Some(s) => {
                let s = s
                    .as_str()
                    .ok_or_else(|| field("tpm2_salt", "is not a string"))?;
                let salt = base64_decode(s).map_err(|e| field("tpm2_salt", e))?;
                if salt.is_empty() {
                    return Err(field("tpm2_salt", "is empty"));
                }
                Some(salt)
            }
        };
        if salt.is_some() && !pin {
            return Err(field("tpm2_salt", "present although `tpm2-pin` is false"));
        }
        let srk = match obj.get("tpm2_srk") {
            None => None,
            Some(s) => {
                let s = s
                    .as_str()
                    .ok_or_else(|| field("tpm2_srk", "is not a string"))?;
                Some(base64_decode(s).map_err(|e| field("tpm2_srk", e))?)
            }
        };

        let pubkey = match obj.get("tpm2_pubkey") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let text = base64_decode(single_string(v, "tpm2_pubkey")?)
                    .map_err(|e| field("tpm2_pubkey", e))?;
                if text.is_empty() {
                    None
                } else {
                    Some(text)
                }
            }
        };
        let pubkey_pcrs = match obj.get("tpm2_pubkey_pcrs") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => parse_pcr_array(v, "tpm2_pubkey_pcrs")?,
        };
        if pubkey.is_some() == pubkey_pcrs.is_empty() {
            return Err(field(
                "tpm2_pubkey_pcrs",
                "a signed policy needs both `tpm2_pubkey` and a non-empty `tpm2_pubkey_pcrs`",
            ));
        }
        if obj.get("tpm2_pcrlock").and_then(Value::as_bool) == Some(true) {
            return Err(TokenError::Unsupported(
                "pcrlock policies (tpm2_pcrlock)".into(),
            ));
        }

        let pcr_values = match obj.get(PCR_VALUES_FIELD) {
            None => None,
            Some(m) => {
                let m = m
                    .as_object()
                    .ok_or_else(|| field(PCR_VALUES_FIELD, "is not an object"))?;
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    let p: u32 = k.parse().ok().filter(|p| pcrs.contains(p)).ok_or_else(|| {
                        field(PCR_VALUES_FIELD, format!("key `{k}` is not a bound PCR"))
                    })?;
                    let hexv = v
                        .as_str()
                        .ok_or_else(|| field(PCR_VALUES_FIELD, "values must be hex strings"))?;
                    let bytes = hex_decode(hexv).map_err(|e| field(PCR_VALUES_FIELD, e))?;
                    if bytes.len() != bank.digest_len() {
                        return Err(field(
                            PCR_VALUES_FIELD,
                            format!("PCR {p} value has the wrong length"),
                        ));
                    }
                    out.insert(p, bytes);
                }
                Some(out)
            }
        };

        let mut keyslot_macs = BTreeMap::new();
        if let Some(m) = obj.get(KEYSLOT_MACS_FIELD) {
            let m = m
                .as_object()
                .ok_or_else(|| field(KEYSLOT_MACS_FIELD, "is not an object"))?;
            if m.len() > MAX_KEYSLOTS {
                return Err(field(KEYSLOT_MACS_FIELD, "has more entries than keyslots"));
            }
            for (k, v) in m {
                let slot = k
                    .parse::<u32>()
                    .ok()
                    .filter(|&s| (s as usize) < MAX_KEYSLOTS)
                    .ok_or_else(|| {
                        field(KEYSLOT_MACS_FIELD, format!("key `{k}` is not a keyslot"))
                    })?;
                let mac = v
                    .as_str()
                    .ok_or_else(|| field(KEYSLOT_MACS_FIELD, "values must be hex strings"))
                    .and_then(|h| hex_decode(h).map_err(|e| field(KEYSLOT_MACS_FIELD, e)))?;
                if mac.len() != 32 {
                    return Err(field(KEYSLOT_MACS_FIELD, "values must be 32 bytes"));
                }
                keyslot_macs.insert(slot, mac);
            }
        }

        let mut eventlog = BTreeMap::new();
        if let Some(m) = obj.get(EVENTLOG_FIELD) {
            let m = m
                .as_object()
                .ok_or_else(|| field(EVENTLOG_FIELD, "is not an object"))?;
            for (k, v) in m {
                let p: u32 = k
                    .parse()
                    .ok()
                    .filter(|p| pcrs.contains(p) || pubkey_pcrs.contains(p))
                    .ok_or_else(|| {
                        field(EVENTLOG_FIELD, format!("key `{k}` is not a bound PCR"))
                    })?;
                let list = v
                    .as_array()
                    .filter(|a| a.len() <= EVENTLOG_MAX_EVENTS)
                    .ok_or_else(|| field(EVENTLOG_FIELD, "values must be short arrays"))?;
                let mut events = Vec::with_capacity(list.len());
                for e in list {
                    let text = e
                        .get("event")
                        .and_then(Value::as_str)
                        .filter(|t| t.len() <= EVENTLOG_MAX_TEXT)
                        .ok_or_else(|| field(EVENTLOG_FIELD, "an entry has no short `event`"))?;
                    let digest = e
                        .get("digest")
                        .and_then(Value::as_str)
                        .ok_or_else(|| field(EVENTLOG_FIELD, "an entry has no `digest`"))
                        .and_then(|h| hex_decode(h).map_err(|e| field(EVENTLOG_FIELD, e)))?;
                    if digest.len() != bank.digest_len() {
                        return Err(field(EVENTLOG_FIELD, "a digest has the wrong length"));
                    }
                    events.push((printable(text), digest));
                }
                eventlog.insert(p, events);
            }
        }

        let revocation_counter = match obj.get(REVOCATION_COUNTER_FIELD) {
            None => None,
            Some(v) => {
                let h = v
                    .as_u64()
                    .and_then(|h| u32::try_from(h).ok())
                    .ok_or_else(|| field(REVOCATION_COUNTER_FIELD, "is not an NV index handle"))?;
                // Whether the TPM may hold a counter there is the TPM side's to
                // judge (an index outside the owner range is refused at unlock).
                if pubkey.is_none() {
                    return Err(field(
                        REVOCATION_COUNTER_FIELD,
                        "present in an enrolment without a signed policy (`tpm2_pubkey`)",
                    ));
                }
                Some(h)
            }
        };

        Ok(Tpm2Token {
            keyslots,
            blob,
            pcrs,
            bank,
            primary_alg,
            policy_hash,
            pin,
            salt,
            srk,
            pcr_values,
            keyslot_macs,
            eventlog,
            pubkey,
            pubkey_pcrs,
            revocation_counter,
        })
    }

    /// The binding of keyslot `slot` (whose KDF salt, as the header stores it, is
    /// `salt`) to this token's sealed object, keyed with the volume key. The salt
    /// is random per keyslot and cannot be changed without breaking the keyslot,
    /// so the MAC names one keyslot; the blob's hash names one sealed object.
    pub fn keyslot_mac(&self, volume_key: &[u8], slot: u32, salt: &str) -> Vec<u8> {
        let mut data = b"vaultguard-tpm2-keyslot-v1\0".to_vec();
        data.extend_from_slice(slot.to_string().as_bytes());
        data.push(0);
        data.extend_from_slice(salt.as_bytes());
        data.push(0);
        data.extend_from_slice(&Sha256::digest(&self.blob));
        // HMAC takes keys of any length: new_from_slice cannot fail.
        let Ok(mut mac) = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(volume_key) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(&data);
        mac.finalize().into_bytes().to_vec()
    }

    /// Whether the token carries a valid binding for `slot` (see `keyslot_mac`).
    pub fn binds_keyslot(&self, volume_key: &[u8], slot: u32, salt: &str) -> bool {
        let Some(recorded) = self.keyslot_macs.get(&slot) else {
            return false;
        };
        let expected = self.keyslot_mac(volume_key, slot, salt);
        // Constant time: the MAC is public, but the comparison costs nothing more.
        recorded.len() == expected.len()
            && recorded
                .iter()
                .zip(&expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), TOKEN_TYPE.into());
        m.insert(
            "keyslots".into(),
            Value::Array(
                self.keyslots
                    .iter()
                    .map(|k| Value::String(k.to_string()))
                    .collect(),
            ),
        );
        m.insert("tpm2-blob".into(), base64_encode(&self.blob).into());
        m.insert(
            "tpm2-pcrs".into(),
            Value::Array(self.pcrs.iter().map(|&p| Value::from(p)).collect()),
        );
        m.insert("tpm2-pcr-bank".into(), self.bank.name().into());
        m.insert(
            "tpm2-primary-alg".into(),
            match self.primary_alg {
                PrimaryAlg::Ecc => "ecc",
                PrimaryAlg::Rsa => "rsa",
            }
            .into(),
        );
        m.insert(
            "tpm2-policy-hash".into(),
            hex_encode(&self.policy_hash).into(),
        );
        m.insert("tpm2-pin".into(), self.pin.into());
        if let Some(salt) = &self.salt {
            m.insert("tpm2_salt".into(), base64_encode(salt).into());
        }
        if let Some(srk) = &self.srk {
            m.insert("tpm2_srk".into(), base64_encode(srk).into());
        }
        if let Some(values) = &self.pcr_values {
            let vm: Map<String, Value> = values
                .iter()
                .map(|(p, v)| (p.to_string(), Value::String(hex_encode(v))))
                .collect();
            m.insert(PCR_VALUES_FIELD.into(), Value::Object(vm));
        }
        if !self.keyslot_macs.is_empty() {
            let vm: Map<String, Value> = self
                .keyslot_macs
                .iter()
                .map(|(s, v)| (s.to_string(), Value::String(hex_encode(v))))
                .collect();
            m.insert(KEYSLOT_MACS_FIELD.into(), Value::Object(vm));
        }
        if !self.eventlog.is_empty() {
            let vm: Map<String, Value> = self
                .eventlog
                .iter()
                .map(|(p, list)| {
                    let events = list
                        .iter()
                        .map(|(t, d)| serde_json::json!({"event": t, "digest": hex_encode(d)}))
                        .collect();
                    (p.to_string(), Value::Array(events))
                })
                .collect();
            m.insert(EVENTLOG_FIELD.into(), Value::Object(vm));
        }
        if let Some(pubkey) = &self.pubkey {
            m.insert("tpm2_pubkey".into(), base64_encode(pubkey).into());
            m.insert(
                "tpm2_pubkey_pcrs".into(),
                Value::Array(self.pubkey_pcrs.iter().map(|&p| Value::from(p)).collect()),
            );
        }
        if let Some(h) = self.revocation_counter {
            m.insert(REVOCATION_COUNTER_FIELD.into(), h.into());
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Tpm2Token {
        Tpm2Token {
            keyslots: vec![1],
            blob: vec![0, 2, 0xaa, 0xbb, 0, 1, 0xcc],
            pcrs: vec![0, 2, 4, 7, 15],
            bank: PcrBank::Sha256,
            primary_alg: PrimaryAlg::Ecc,
            policy_hash: vec![0x5a; 32],
            pin: true,
            salt: Some(vec![9; 32]),
            srk: Some(vec![0x81, 0, 0, 1, 0, 0]),
            pcr_values: Some([(7, vec![1; 32]), (15, vec![0; 32])].into_iter().collect()),
            keyslot_macs: [(1, vec![0x33; 32])].into_iter().collect(),
            eventlog: [(
                7,
                vec![(
                    "EV_EFI_VARIABLE_DRIVER_CONFIG variable SecureBoot".into(),
                    vec![2; 32],
                )],
            )]
            .into_iter()
            .collect(),
            pubkey: None,
            pubkey_pcrs: Vec::new(),
            revocation_counter: None,
        }
    }

    #[test]
    fn eventlog_may_record_the_signed_pcrs_of_a_signed_enrolment() {
        let mut t = sample();
        t.pubkey = Some(b"-----BEGIN PUBLIC KEY-----\n...\n".to_vec());
        t.pubkey_pcrs = vec![9];
        t.eventlog.insert(
            9,
            vec![(
                "EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\"".into(),
                vec![3; 32],
            )],
        );
        let j = t.to_json();
        assert_eq!(Tpm2Token::from_json(&j).unwrap(), t);
        // Neither literal nor signed: refused.
        let mut j = t.to_json();
        j["vaultguard_eventlog"]["11"] = j["vaultguard_eventlog"]["9"].clone();
        assert!(Tpm2Token::from_json(&j).is_err());
    }

    #[test]
    fn eventlog_field_round_trips_and_is_bounded() {
        let t = sample();
        let j = t.to_json();
        assert_eq!(
            j["vaultguard_eventlog"]["7"][0]["event"],
            "EV_EFI_VARIABLE_DRIVER_CONFIG variable SecureBoot"
        );
        assert_eq!(Tpm2Token::from_json(&j).unwrap(), t);
        for bad in [
            json!({"3": []}),
            json!({"7": [{"event": "x", "digest": "00"}]}),
            json!({"7": [{"digest": "00".repeat(32)}]}),
            json!({"7": [{"event": "x".repeat(300), "digest": "00".repeat(32)}]}),
            json!({"7": vec![json!({"event": "x", "digest": "00".repeat(32)}); 513]}),
            json!([]),
        ] {
            let mut j = t.to_json();
            j["vaultguard_eventlog"] = bad.clone();
            assert!(
                matches!(
                    Tpm2Token::from_json(&j),
                    Err(TokenError::Field {
                        field: "vaultguard_eventlog",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        // Absent: empty, and not written back.
        let mut j = t.to_json();
        j.as_object_mut().unwrap().remove("vaultguard_eventlog");
        let back = Tpm2Token::from_json(&j).unwrap();
        assert!(back.eventlog.is_empty());
        assert!(back.to_json().get("vaultguard_eventlog").is_none());
    }

    #[test]
    fn keyslots_are_deduplicated_and_capped() {
        let mut j = sample().to_json();
        j["keyslots"] = json!(vec!["3"; 20]);
        assert_eq!(Tpm2Token::from_json(&j).unwrap().keyslots, vec![3]);
        j["keyslots"] = json!(["3", "1", "3", "1", "0"]);
        assert_eq!(Tpm2Token::from_json(&j).unwrap().keyslots, vec![3, 1, 0]);
        j["keyslots"] = json!(vec!["1"; 33]);
        let e = Tpm2Token::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("keyslots") && e.contains("at most 32"), "{e}");
        j["keyslots"] = json!(["32"]);
        let e = Tpm2Token::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("keyslot 32 out of range"), "{e}");
    }

    #[test]
    fn the_keyslot_binding_names_one_keyslot_one_salt_one_blob_one_volume_key() {
        let mut t = sample();
        let vk = [0x42u8; 64];
        let mac = t.keyslot_mac(&vk, 1, "c2FsdA==");
        t.keyslot_macs = [(1, mac)].into_iter().collect();
        let t = Tpm2Token::from_json(&t.to_json()).unwrap();
        assert!(t.binds_keyslot(&vk, 1, "c2FsdA=="));
        assert!(!t.binds_keyslot(&vk, 0, "c2FsdA=="), "another slot number");
        assert!(
            !t.binds_keyslot(&vk, 1, "b3RoZXI="),
            "another keyslot's salt"
        );
        assert!(
            !t.binds_keyslot(&[0x43u8; 64], 1, "c2FsdA=="),
            "another volume"
        );
        let mut other_blob = t.clone();
        other_blob.blob.push(0);
        assert!(
            !other_blob.binds_keyslot(&vk, 1, "c2FsdA=="),
            "another blob"
        );
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let j = t.to_json();
        assert_eq!(j["type"], "systemd-tpm2");
        assert_eq!(j["keyslots"], json!(["1"]));
        assert_eq!(j["tpm2-pcrs"], json!([0, 2, 4, 7, 15]));
        assert_eq!(j["tpm2-policy-hash"], "5a".repeat(32));
        assert_eq!(j["tpm2-pin"], true);
        assert_eq!(Tpm2Token::from_json(&j).unwrap(), t);
    }

    /// A token as systemd-cryptenroll 252 writes it (no salt, no SRK, no values).
    #[test]
    fn parses_a_systemd_252_token() {
        let j = json!({
            "type": "systemd-tpm2", "keyslots": ["2"], "tpm2-blob": "AAIBAgABAw==",
            "tpm2-pcrs": [7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
            "tpm2-policy-hash": "00".repeat(32), "tpm2-pin": false
        });
        let t = Tpm2Token::from_json(&j).unwrap();
        assert_eq!(t.keyslots, vec![2]);
        assert_eq!(t.pcrs, vec![7]);
        assert!(t.srk.is_none() && t.salt.is_none() && t.pcr_values.is_none());
        assert!(t.keyslot_macs.is_empty());
        // systemd < 250: no bank, no primary alg
        let mut old = j.clone();
        old.as_object_mut().unwrap().remove("tpm2-pcr-bank");
        old.as_object_mut().unwrap().remove("tpm2-primary-alg");
        let t = Tpm2Token::from_json(&old).unwrap();
        assert_eq!((t.bank, t.primary_alg), (PcrBank::Sha256, PrimaryAlg::Ecc));
        // systemd >= 255 writes one-element arrays
        let mut new = j.clone();
        new["tpm2-blob"] = json!(["AAIBAgABAw=="]);
        new["tpm2-policy-hash"] = json!(["00".repeat(32)]);
        assert_eq!(
            Tpm2Token::from_json(&new).unwrap().blob,
            vec![0, 2, 1, 2, 0, 1, 3]
        );
    }

    #[test]
    fn malformed_and_tampered_tokens_are_refused_with_the_field_named() {
        let good = sample().to_json();
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("keyslots", Box::new(|j| j["keyslots"] = json!([]))),
            ("keyslots", Box::new(|j| j["keyslots"] = json!([1]))),
            (
                "tpm2-blob",
                Box::new(|j| j["tpm2-blob"] = json!("not base64!")),
            ),
            (
                "tpm2-blob",
                Box::new(|j| {
                    j.as_object_mut().unwrap().remove("tpm2-blob");
                }),
            ),
            ("tpm2-pcrs", Box::new(|j| j["tpm2-pcrs"] = json!([7, 24]))),
            ("tpm2-pcrs", Box::new(|j| j["tpm2-pcrs"] = json!("7"))),
            (
                "tpm2-pcr-bank",
                Box::new(|j| j["tpm2-pcr-bank"] = json!("md5")),
            ),
            (
                "tpm2-primary-alg",
                Box::new(|j| j["tpm2-primary-alg"] = json!("dsa")),
            ),
            (
                "tpm2-policy-hash",
                Box::new(|j| j["tpm2-policy-hash"] = json!("abcd")),
            ),
            (
                "tpm2-policy-hash",
                Box::new(|j| j["tpm2-policy-hash"] = json!("zz".repeat(32))),
            ),
            ("tpm2-pin", Box::new(|j| j["tpm2-pin"] = json!("yes"))),
            ("tpm2_salt", Box::new(|j| j["tpm2-pin"] = json!(false))),
            ("tpm2_srk", Box::new(|j| j["tpm2_srk"] = json!(17))),
            (
                "vaultguard_pcr_values",
                Box::new(|j| j["vaultguard_pcr_values"] = json!({"3": "00"})),
            ),
            (
                "vaultguard_pcr_values",
                Box::new(|j| j["vaultguard_pcr_values"] = json!({"7": "00"})),
            ),
            (
                "vaultguard_keyslot_macs",
                Box::new(|j| j["vaultguard_keyslot_macs"] = json!({"1": "00"})),
            ),
            (
                "vaultguard_keyslot_macs",
                Box::new(|j| j["vaultguard_keyslot_macs"] = json!({"x": "00".repeat(32)})),
            ),
        ];
        for (name, mutate) in cases {
            let mut j = good.clone();
            mutate(&mut j);
            let e = Tpm2Token::from_json(&j).unwrap_err();
            assert!(e.to_string().contains(name), "{name}: {e}");
        }
        assert_eq!(
            Tpm2Token::from_json(&json!({"type": "luks2-keyring"})),
            Err(TokenError::NotTpm2)
        );
        // A signed policy: both fields or neither; round trip keeps them.
        let mut signed = good.clone();
        signed["tpm2_pubkey_pcrs"] = json!([11]);
        let e = Tpm2Token::from_json(&signed).unwrap_err().to_string();
        assert!(e.contains("tpm2_pubkey_pcrs"), "{e}");
        signed["tpm2_pubkey"] = json!(base64_encode(b"-----BEGIN PUBLIC KEY-----\n"));
        let t = Tpm2Token::from_json(&signed).unwrap();
        assert_eq!(t.pubkey_pcrs, vec![11]);
        assert_eq!(
            t.pubkey.as_deref(),
            Some(&b"-----BEGIN PUBLIC KEY-----\n"[..])
        );
        assert_eq!(Tpm2Token::from_json(&t.to_json()).unwrap(), t);
        // A revocation counter: a handle number, only beside a signed policy.
        let mut revocable = signed.clone();
        revocable[REVOCATION_COUNTER_FIELD] = json!(0x013f_a0d2u32);
        let r = Tpm2Token::from_json(&revocable).unwrap();
        assert_eq!(r.revocation_counter, Some(0x013f_a0d2));
        assert_eq!(Tpm2Token::from_json(&r.to_json()).unwrap(), r);
        for bad in [
            json!("0x013fa0d2"),
            json!(-1),
            json!(1u64 << 33),
            json!(null),
        ] {
            revocable[REVOCATION_COUNTER_FIELD] = bad.clone();
            let e = Tpm2Token::from_json(&revocable).unwrap_err().to_string();
            assert!(e.contains(REVOCATION_COUNTER_FIELD), "{bad}: {e}");
        }
        let mut unsigned = good.clone();
        unsigned[REVOCATION_COUNTER_FIELD] = json!(0x013f_a0d2u32);
        let e = Tpm2Token::from_json(&unsigned).unwrap_err().to_string();
        assert!(e.contains("without a signed policy"), "{e}");
        let mut pcrlock = good;
        pcrlock["tpm2_pcrlock"] = json!(true);
        assert!(matches!(
            Tpm2Token::from_json(&pcrlock),
            Err(TokenError::Unsupported(_))
        ));
    }
}
