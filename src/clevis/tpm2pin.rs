//! The clevis `tpm2` pin's header, as `clevis encrypt tpm2` (clevis 19, through
//! tpm2-tools) writes it: `clevis.tpm2` = {`hash`, `key`, `jwk_pub`, `jwk_priv`,
//! `pcr_bank`, `pcr_ids`}. `jwk_priv`/`jwk_pub` are the TPM2B_PRIVATE and
//! TPM2B_PUBLIC `tpm2_create` wrote for a sealed object under a transient primary
//! made by `tpm2_createprimary -C o -g <hash> -G <key>` (tpm2-tools' default
//! template: restricted decrypt, no noDA, ECC P-256 or RSA 2048, AES-128-CFB,
//! empty unique — the same template systemd < 254 used for its primary). The
//! sealed data is a JWK (`kty` oct) whose `k` decrypts the JWE (`dir`, A256GCM).
//!
//! This module reads the header and finishes the decryption; the TPM work is the
//! caller's (`boot` converts this into its sealed-object record for `tpm`, which
//! this module never imports).

use super::jwe::Jwe;
use super::{b64, ClevisError};
use crate::secret::SecretBytes;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tpm2PinConfig {
    /// TPM2B_PRIVATE followed by TPM2B_PUBLIC.
    pub blob: Vec<u8>,
    /// `ecc` or `rsa` (the primary's algorithm).
    pub key: String,
    /// `sha1`, `sha256`, …
    pub pcr_bank: String,
    pub pcr_ids: Vec<u32>,
}

impl Tpm2PinConfig {
    pub fn from_jwe(jwe: &Jwe) -> Result<Tpm2PinConfig, ClevisError> {
        let cfg = jwe.pin_config("tpm2")?;
        let s = |k: &str| cfg.get(k).and_then(Value::as_str);
        match s("hash").unwrap_or("sha256") {
            "sha256" => {}
            h => {
                return Err(ClevisError::Unsupported(format!(
                    "tpm2 pin with primary name hash {h:?} (sha256 supported)"
                )))
            }
        }
        let key = s("key").unwrap_or("ecc").to_string();
        if key != "ecc" && key != "rsa" {
            return Err(ClevisError::Unsupported(format!("tpm2 pin key {key:?}")));
        }
        let pub_ = b64::decode(
            s("jwk_pub")
                .ok_or_else(|| ClevisError::Malformed("tpm2 pin without jwk_pub".into()))?,
            "tpm2 jwk_pub",
        )?;
        let priv_ = b64::decode(
            s("jwk_priv")
                .ok_or_else(|| ClevisError::Malformed("tpm2 pin without jwk_priv".into()))?,
            "tpm2 jwk_priv",
        )?;
        let pcr_ids: Vec<u32> = match cfg.get("pcr_ids") {
            None => Vec::new(),
            // clevis writes a string ("0,7"); accept a number or an array too.
            Some(Value::String(l)) => l
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.trim().parse::<u32>().ok().filter(|n| *n < 24))
                .collect::<Option<_>>()
                .ok_or_else(|| ClevisError::Malformed(format!("tpm2 pcr_ids {l:?}")))?,
            Some(Value::Number(n)) => vec![n
                .as_u64()
                .filter(|n| *n < 24)
                .ok_or_else(|| ClevisError::Malformed("tpm2 pcr_ids".into()))?
                as u32],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().filter(|n| *n < 24).map(|n| n as u32))
                .collect::<Option<_>>()
                .ok_or_else(|| ClevisError::Malformed("tpm2 pcr_ids".into()))?,
            Some(_) => return Err(ClevisError::Malformed("tpm2 pcr_ids".into())),
        };
        if pcr_ids.is_empty() {
            // Such an object is opened by its (empty) auth value, not a policy.
            return Err(ClevisError::Unsupported(
                "tpm2 pin bound to no PCRs (vaultguard unseals through a PCR policy only)".into(),
            ));
        }
        let mut blob = priv_;
        blob.extend_from_slice(&pub_);
        Ok(Tpm2PinConfig {
            blob,
            key,
            pcr_bank: s("pcr_bank").unwrap_or("sha256").to_string(),
            pcr_ids,
        })
    }
}

/// The JWE's plaintext from what the TPM unsealed (a JWK with the content key).
pub fn finish(jwe: &Jwe, unsealed: &SecretBytes) -> Result<SecretBytes, ClevisError> {
    #[derive(serde::Deserialize)]
    struct Oct {
        k: String,
    }
    let oct: Oct = serde_json::from_slice(unsealed.as_bytes())
        .map_err(|_| ClevisError::Malformed("the TPM's sealed data is not a key (JWK)".into()))?;
    let key = zeroize::Zeroizing::new(b64::decode(&oct.k, "sealed JWK k")?);
    let mut oct = oct;
    zeroize::Zeroize::zeroize(&mut oct.k);
    jwe.decrypt(&key)
}
