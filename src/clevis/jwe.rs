//! JWE (RFC 7516) as clevis writes it: compact (`a.b.c.d.e`, inside sss) or
//! flattened JSON (the LUKS2 token's `jwe`), with `enc` A256GCM and `alg`
//! ECDH-ES (tang, Concat KDF of RFC 7518 §4.6) or `dir` (sss, tpm2).
//!
//! Parsing is strict and bounded (header size, field lengths); decryption takes a
//! content key in a zeroizing buffer and returns the plaintext in one. Nothing here
//! talks to the network or the TPM.

use super::b64;
use super::ClevisError;
use crate::secret::SecretBytes;
use serde_json::Value;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Far above any clevis header (an sss of several tang pins with their
/// advertisements is a few tens of KiB), far below anything that hurts.
pub const MAX_JWE_LEN: usize = 1 << 20;

/// A parsed JWE: the protected header (decoded), and the raw pieces.
#[derive(Debug, Clone)]
pub struct Jwe {
    /// The protected header as it appears base64url-encoded: the AAD.
    pub protected_b64: String,
    pub header: Value,
    pub iv: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub tag: Vec<u8>,
}

impl Jwe {
    /// Compact serialization: five dot-separated base64url parts.
    pub fn from_compact(s: &str) -> Result<Jwe, ClevisError> {
        let s = s.trim();
        if s.len() > MAX_JWE_LEN {
            return Err(ClevisError::Malformed(format!("JWE of {} bytes", s.len())));
        }
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 5 {
            return Err(ClevisError::Malformed(format!(
                "compact JWE has {} parts, not 5",
                parts.len()
            )));
        }
        Jwe::from_parts(parts[0], parts[1], parts[2], parts[3], parts[4])
    }

    /// Flattened JSON serialization (what `clevis luks bind` stores in the token).
    pub fn from_json(v: &Value) -> Result<Jwe, ClevisError> {
        if let Some(s) = v.as_str() {
            return Jwe::from_compact(s);
        }
        let f = |k: &str| -> Result<&str, ClevisError> {
            match v.get(k) {
                None => Ok(""),
                Some(Value::String(s)) => Ok(s),
                Some(_) => Err(ClevisError::Malformed(format!(
                    "JWE \"{k}\" is not a string"
                ))),
            }
        };
        if v.get("unprotected").is_some() || v.get("header").is_some() {
            // clevis never writes them, and they would not be authenticated.
            return Err(ClevisError::Unsupported(
                "JWE with an unprotected header".into(),
            ));
        }
        Jwe::from_parts(
            f("protected")?,
            f("encrypted_key")?,
            f("iv")?,
            f("ciphertext")?,
            f("tag")?,
        )
    }

    fn from_parts(p: &str, ek: &str, iv: &str, ct: &str, tag: &str) -> Result<Jwe, ClevisError> {
        if p.is_empty() {
            return Err(ClevisError::Malformed(
                "JWE without a protected header".into(),
            ));
        }
        if p.len() + iv.len() + ct.len() + tag.len() > MAX_JWE_LEN {
            return Err(ClevisError::Malformed("JWE larger than 1 MiB".into()));
        }
        if !ek.is_empty() {
            return Err(ClevisError::Unsupported(
                "JWE with an encrypted key (clevis uses direct key agreement)".into(),
            ));
        }
        let hdr = b64::decode(p, "JWE protected header")?;
        let header: Value = serde_json::from_slice(&hdr).map_err(|e| {
            ClevisError::Malformed(format!("JWE protected header is not JSON: {e}"))
        })?;
        if !header.is_object() {
            return Err(ClevisError::Malformed(
                "JWE protected header is not an object".into(),
            ));
        }
        Ok(Jwe {
            protected_b64: p.to_string(),
            header,
            iv: b64::decode(iv, "JWE iv")?,
            ciphertext: b64::decode(ct, "JWE ciphertext")?,
            tag: b64::decode(tag, "JWE tag")?,
        })
    }

    pub fn hdr_str(&self, k: &str) -> Option<&str> {
        self.header.get(k).and_then(Value::as_str)
    }

    /// `clevis.pin`: which pin made this JWE.
    pub fn pin(&self) -> Result<&str, ClevisError> {
        self.header
            .get("clevis")
            .and_then(|c| c.get("pin"))
            .and_then(Value::as_str)
            .ok_or_else(|| ClevisError::Malformed("JWE header has no clevis.pin".into()))
    }

    /// `clevis.<pin>`: the pin's configuration object.
    pub fn pin_config(&self, pin: &str) -> Result<&Value, ClevisError> {
        self.header
            .get("clevis")
            .and_then(|c| c.get(pin))
            .filter(|v| v.is_object())
            .ok_or_else(|| ClevisError::Malformed(format!("JWE header has no clevis.{pin}")))
    }

    /// The only content encryption clevis uses.
    pub fn check_enc(&self) -> Result<(), ClevisError> {
        match self.hdr_str("enc") {
            Some("A256GCM") => Ok(()),
            Some(e) => Err(ClevisError::Unsupported(format!("JWE enc {e:?}"))),
            None => Err(ClevisError::Malformed("JWE header has no \"enc\"".into())),
        }
    }

    /// Decrypt with the content key (A256GCM; the AAD is the encoded header).
    pub fn decrypt(&self, cek: &[u8]) -> Result<SecretBytes, ClevisError> {
        self.check_enc()?;
        if cek.len() != 32 {
            return Err(ClevisError::Crypto(format!(
                "A256GCM needs a 32-byte key, not {}",
                cek.len()
            )));
        }
        if self.iv.len() != 12 || self.tag.len() != 16 {
            return Err(ClevisError::Malformed(format!(
                "A256GCM iv/tag of {}/{} bytes (12/16 expected)",
                self.iv.len(),
                self.tag.len()
            )));
        }
        let mut buf = SecretBytes::from_slice(&self.ciphertext);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&self.tag);
        let ok = super::gcry::aes256gcm(
            false,
            cek,
            &self.iv,
            self.protected_b64.as_bytes(),
            buf.as_mut_bytes(),
            &mut tag,
        )?;
        if !ok {
            return Err(ClevisError::Crypto(
                "JWE authentication failed (wrong key, or the token was altered)".into(),
            ));
        }
        Ok(buf)
    }

    /// ECDH-ES direct key agreement: the content key from the shared secret `z`
    /// (the x coordinate), by the Concat KDF of RFC 7518 §4.6.2 with SHA-256.
    pub fn ecdh_es_cek(&self, z: &[u8]) -> Result<Zeroizing<Vec<u8>>, ClevisError> {
        match self.hdr_str("alg") {
            Some("ECDH-ES") => {}
            Some(a) => {
                return Err(ClevisError::Unsupported(format!(
                    "JWE alg {a:?} for a tang pin (ECDH-ES expected)"
                )))
            }
            None => return Err(ClevisError::Malformed("JWE header has no \"alg\"".into())),
        }
        self.check_enc()?;
        let apu = match self.hdr_str("apu") {
            Some(s) => b64::decode(s, "JWE apu")?,
            None => Vec::new(),
        };
        let apv = match self.hdr_str("apv") {
            Some(s) => b64::decode(s, "JWE apv")?,
            None => Vec::new(),
        };
        Ok(concat_kdf(z, "A256GCM", &apu, &apv, 256))
    }
}

/// NIST SP 800-56A Concat KDF as JWA uses it (SHA-256). `bits` ≤ 256 here, one
/// round.
pub fn concat_kdf(z: &[u8], alg: &str, apu: &[u8], apv: &[u8], bits: u32) -> Zeroizing<Vec<u8>> {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    for part in [alg.as_bytes(), apu, apv] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.update(bits.to_be_bytes());
    let out = h.finalize();
    Zeroizing::new(out[..(bits as usize / 8).min(32)].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        // RFC 7518 Appendix C: ECDH-ES, A128GCM, apu "Alice", apv "Bob".
        let z = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let k = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(
            k.as_slice(),
            &[86, 170, 141, 234, 248, 35, 109, 32, 92, 34, 40, 205, 113, 167, 16, 26]
        );
    }

    #[test]
    fn malformed_jwes_are_named() {
        for (input, want) in [
            ("a.b.c", "3 parts"),
            ("!!..y.z.w", "JWE protected header"),
            ("eyJ9.x.y.z.w", "encrypted key"),
            ("WzFd..AA.AA.AA", "not an object"),
            ("eyJ9..AA.AA.AA", "not JSON"),
        ] {
            let e = Jwe::from_compact(input)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{input}: {e}");
        }
        let e = Jwe::from_json(&serde_json::json!({"protected": 1}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a string"), "{e}");
    }

    #[test]
    fn dir_a256gcm_round_trip_and_tamper() {
        let key = [7u8; 32];
        let hdr = b64::encode(br#"{"alg":"dir","enc":"A256GCM","clevis":{"pin":"x"}}"#);
        let iv = [1u8; 12];
        let mut ct = b"secret!".to_vec();
        let mut tag = [0u8; 16];
        assert!(
            super::super::gcry::aes256gcm(true, &key, &iv, hdr.as_bytes(), &mut ct, &mut tag)
                .unwrap()
        );
        let compact = format!(
            "{hdr}..{}.{}.{}",
            b64::encode(&iv),
            b64::encode(&ct),
            b64::encode(&tag)
        );
        let jwe = Jwe::from_compact(&compact).unwrap();
        assert_eq!(jwe.pin().unwrap(), "x");
        assert_eq!(jwe.decrypt(&key).unwrap().as_bytes(), b"secret!");
        let e = jwe.decrypt(&[8u8; 32]).unwrap_err().to_string();
        assert!(e.contains("authentication failed"), "{e}");
        let bad =
            Jwe::from_compact(&compact.replace(&hdr, &b64::encode(br#"{"enc":"A128CBC-HS256"}"#)))
                .unwrap();
        let e = bad.decrypt(&key).unwrap_err().to_string();
        assert!(e.contains("A128CBC-HS256"), "{e}");
    }
}
