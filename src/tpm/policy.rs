//! Pure TPM2 arithmetic: hash banks, PCR selections and policy digests, the
//! PIN-to-authValue derivation systemd uses. HMAC and PBKDF2 come from the
//! RustCrypto `hmac` and `pbkdf2` crates (the same family as `sha2`).
//!
//! Computing the policy digest here rather than in a trial session lets enrolment
//! bind the phase PCR to zeros even after this boot has already extended it, and lets
//! unlock compare the live digest with the enrolled one before asking the TPM to
//! unseal. Nothing here talks to a TPM; the TPM-facing code checks these functions
//! against a real policy session in the host tests.

use crate::encoding::base64_encode_secret;
use crate::secret::SecretBytes;
use hmac::{KeyInit, Mac};
use sha2::Digest;

pub const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
pub const TPM_CC_POLICY_AUTH_VALUE: u32 = 0x0000_016B;
/// systemd's iteration count for the salted PIN.
pub const PIN_PBKDF2_ITERATIONS: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bank {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Bank {
    pub fn from_name(s: &str) -> Option<Bank> {
        match s.to_ascii_lowercase().as_str() {
            "sha1" => Some(Bank::Sha1),
            "sha256" => Some(Bank::Sha256),
            "sha384" => Some(Bank::Sha384),
            "sha512" => Some(Bank::Sha512),
            _ => None,
        }
    }

    pub fn from_alg_id(id: u16) -> Option<Bank> {
        match id {
            0x0004 => Some(Bank::Sha1),
            0x000B => Some(Bank::Sha256),
            0x000C => Some(Bank::Sha384),
            0x000D => Some(Bank::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bank::Sha1 => "sha1",
            Bank::Sha256 => "sha256",
            Bank::Sha384 => "sha384",
            Bank::Sha512 => "sha512",
        }
    }

    /// TPM_ALG_ID.
    pub fn alg_id(self) -> u16 {
        match self {
            Bank::Sha1 => 0x0004,
            Bank::Sha256 => 0x000B,
            Bank::Sha384 => 0x000C,
            Bank::Sha512 => 0x000D,
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            Bank::Sha1 => 20,
            Bank::Sha256 => 32,
            Bank::Sha384 => 48,
            Bank::Sha512 => 64,
        }
    }

    pub fn hash(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Bank::Sha1 => run::<sha1::Sha1>(parts),
            Bank::Sha256 => run::<sha2::Sha256>(parts),
            Bank::Sha384 => run::<sha2::Sha384>(parts),
            Bank::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// HMAC (RFC 2104) with this bank's hash. The result is a secret when the key
    /// is; the `hmac` crate (with its `zeroize` feature) wipes its key pads.
    pub fn hmac(self, key: &[u8], data: &[u8]) -> SecretBytes {
        fn run<D>(key: &[u8], data: &[u8]) -> SecretBytes
        where
            D: hmac::EagerHash,
            hmac::Hmac<D>: KeyInit + Mac,
        {
            // HMAC accepts keys of any length: new_from_slice cannot fail here.
            let Ok(mut mac) = <hmac::Hmac<D> as KeyInit>::new_from_slice(key) else {
                unreachable!("HMAC takes keys of any length")
            };
            mac.update(data);
            SecretBytes::from_slice(&mac.finalize().into_bytes())
        }
        match self {
            Bank::Sha1 => run::<sha1::Sha1>(key, data),
            Bank::Sha256 => run::<sha2::Sha256>(key, data),
            Bank::Sha384 => run::<sha2::Sha384>(key, data),
            Bank::Sha512 => run::<sha2::Sha512>(key, data),
        }
    }
}

/// PBKDF2-HMAC-SHA256 with a 32-byte output (one block), as systemd computes it.
pub fn pbkdf2_hmac_sha256(pass: &[u8], salt: &[u8], iterations: u32) -> SecretBytes {
    let mut out = SecretBytes::zeroed(32);
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(pass, salt, iterations, out.as_mut_bytes());
    out
}

/// The authValue of a PIN-protected object. With a salt (systemd ≥ 254): the PIN is
/// stretched with PBKDF2, base64-encoded, then hashed; without (older enrolments): the
/// PIN is hashed directly. Trailing zero bytes are trimmed as the TPM does with
/// authValues, so both sides of the HMAC agree.
pub fn pin_auth_value(pin: &[u8], salt: Option<&[u8]>) -> SecretBytes {
    let mut auth = match salt {
        Some(salt) => {
            let stretched = pbkdf2_hmac_sha256(pin, salt, PIN_PBKDF2_ITERATIONS);
            let b64 = base64_encode_secret(stretched.as_bytes());
            SecretBytes::from_vec(Bank::Sha256.hash(&[b64.as_bytes()]))
        }
        None => SecretBytes::from_vec(Bank::Sha256.hash(&[pin])),
    };
    let keep = auth
        .as_bytes()
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i + 1);
    auth.truncate(keep);
    auth
}

/// A PCR bitmap over PCRs 0-23.
pub fn pcr_mask(pcrs: &[u32]) -> u32 {
    pcrs.iter()
        .filter(|&&p| p < 24)
        .fold(0, |m, &p| m | (1 << p))
}

pub fn pcrs_from_mask(mask: u32) -> Vec<u32> {
    (0..24).filter(|p| mask & (1 << p) != 0).collect()
}

/// TPML_PCR_SELECTION with one bank, three select bytes (24 PCRs), as systemd marshals it.
pub fn marshal_pcr_selection(bank: Bank, mask: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(10);
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&bank.alg_id().to_be_bytes());
    v.push(3);
    v.extend_from_slice(&[
        (mask & 0xff) as u8,
        ((mask >> 8) & 0xff) as u8,
        ((mask >> 16) & 0xff) as u8,
    ]);
    v
}

/// PolicyPCR extension of `prev` (SHA-256 policy session): `values` are the PCR
/// values in ascending PCR order, exactly those selected by `mask`.
pub fn extend_policy_pcr(prev: &[u8], bank: Bank, mask: u32, values: &[Vec<u8>]) -> Vec<u8> {
    let parts: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    let pcr_digest = Bank::Sha256.hash(&parts);
    Bank::Sha256.hash(&[
        prev,
        &TPM_CC_POLICY_PCR.to_be_bytes(),
        &marshal_pcr_selection(bank, mask),
        &pcr_digest,
    ])
}

pub fn extend_policy_auth_value(prev: &[u8]) -> Vec<u8> {
    Bank::Sha256.hash(&[prev, &TPM_CC_POLICY_AUTH_VALUE.to_be_bytes()])
}

/// The sealing policy: PolicyPCR over `values` (PCR → value, all in `bank`), then
/// PolicyAuthValue when a PIN is used. The order matches systemd's.
pub fn sealing_policy(bank: Bank, values: &[(u32, Vec<u8>)], pin: bool) -> Vec<u8> {
    let mut sorted: Vec<&(u32, Vec<u8>)> = values.iter().collect();
    sorted.sort_by_key(|(p, _)| *p);
    let mask = pcr_mask(&sorted.iter().map(|(p, _)| *p).collect::<Vec<_>>());
    let vals: Vec<Vec<u8>> = sorted.iter().map(|(_, v)| v.clone()).collect();
    let mut d = vec![0u8; 32];
    if mask != 0 {
        d = extend_policy_pcr(&d, bank, mask, &vals);
    }
    if pin {
        d = extend_policy_auth_value(&d);
    }
    d
}

/// The measurement systemd makes into the phase PCR after activation: the bank's
/// HMAC keyed with the volume key over `cryptsetup:NAME:UUID`. The HMAC (not a plain
/// hash) keeps a literal hash of the volume key off the TPM bus.
pub fn latch_measurement(bank: Bank, volume_key: &[u8], name: &str, uuid: &str) -> SecretBytes {
    // systemd escapes ':' in the name so that the joined string stays unambiguous.
    let escaped = name.replace('\\', "\\\\").replace(':', "\\x3a");
    let data = format!("cryptsetup:{escaped}:{uuid}");
    bank.hmac(volume_key, data.as_bytes())
}

/// New PCR value after extending `old` with `digest`.
pub fn pcr_after_extend(bank: Bank, old: &[u8], digest: &[u8]) -> Vec<u8> {
    bank.hash(&[old, digest])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::{hex_decode, hex_encode};

    #[test]
    fn hmac_rfc4231_case2() {
        let out = Bank::Sha256.hmac(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex_encode(out.as_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // key longer than the block is hashed first (RFC 4231 case 6)
        let key = [0xaau8; 131];
        let out = Bank::Sha256.hmac(
            &key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex_encode(out.as_bytes()),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        // RFC 2202 test 2 for HMAC-SHA1
        let out = Bank::Sha1.hmac(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex_encode(out.as_bytes()),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    #[test]
    fn pbkdf2_known_answers() {
        // RFC 7914 §11, PBKDF2-HMAC-SHA256 ("passwd", "salt", 1): first 32 bytes.
        let out = pbkdf2_hmac_sha256(b"passwd", b"salt", 1);
        assert_eq!(
            hex_encode(out.as_bytes()),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
        // Widely published vector: ("password", "salt", 4096).
        let out = pbkdf2_hmac_sha256(b"password", b"salt", 4096);
        assert_eq!(
            hex_encode(out.as_bytes()),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn pin_auth_without_salt_is_sha256_of_pin() {
        let a = pin_auth_value(b"1234", None);
        assert_eq!(
            hex_encode(a.as_bytes()),
            "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"
        );
    }

    #[test]
    fn pin_auth_with_salt_stretches_then_hashes() {
        let salt = [7u8; 32];
        let stretched = pbkdf2_hmac_sha256(b"1234", &salt, PIN_PBKDF2_ITERATIONS);
        let b64 = crate::encoding::base64_encode(stretched.as_bytes());
        let expect = Bank::Sha256.hash(&[b64.as_bytes()]);
        let a = pin_auth_value(b"1234", Some(&salt));
        let trimmed_len = expect.iter().rposition(|&b| b != 0).unwrap() + 1;
        assert_eq!(a.as_bytes(), &expect[..trimmed_len]);
        assert_ne!(a.as_bytes(), pin_auth_value(b"1234", None).as_bytes());
    }

    #[test]
    fn selection_marshalling() {
        let m = pcr_mask(&[0, 2, 4, 7, 15]);
        assert_eq!(m, 0b1000_0000_1001_0101);
        assert_eq!(
            marshal_pcr_selection(Bank::Sha256, m),
            vec![0, 0, 0, 1, 0x00, 0x0b, 3, 0x95, 0x80, 0x00]
        );
        assert_eq!(pcrs_from_mask(m), vec![0, 2, 4, 7, 15]);
    }

    #[test]
    fn policy_pcr_known_answer() {
        // PolicyPCR over sha256 PCR 7 = zeros, computed independently:
        // H(0^32 || 0000017f || 00000001 000b 03 800000 || H(0^32))
        let zero = vec![0u8; 32];
        let d = sealing_policy(Bank::Sha256, &[(7, zero.clone())], false);
        let mut manual = vec![0u8; 32];
        manual.extend_from_slice(&hex_decode("0000017f00000001000b03800000").unwrap());
        manual.extend_from_slice(&Bank::Sha256.hash(&[&zero]));
        assert_eq!(d, Bank::Sha256.hash(&[&manual]));
        // order of the input does not matter; the PCR order does
        let a = sealing_policy(Bank::Sha256, &[(0, vec![1; 32]), (7, vec![2; 32])], false);
        let b = sealing_policy(Bank::Sha256, &[(7, vec![2; 32]), (0, vec![1; 32])], false);
        assert_eq!(a, b);
        let c = sealing_policy(Bank::Sha256, &[(0, vec![2; 32]), (7, vec![1; 32])], false);
        assert_ne!(a, c);
        // PIN adds PolicyAuthValue
        let p = sealing_policy(Bank::Sha256, &[(7, zero.clone())], true);
        assert_eq!(p, extend_policy_auth_value(&d));
    }

    #[test]
    fn latch_measurement_is_keyed() {
        let vk = [0x11u8; 64];
        let m = latch_measurement(Bank::Sha256, &vk, "secure-ai-vault", "1234-uuid");
        let expect = Bank::Sha256.hmac(&vk, b"cryptsetup:secure-ai-vault:1234-uuid");
        assert_eq!(m.as_bytes(), expect.as_bytes());
        let other = latch_measurement(Bank::Sha256, &[0x12u8; 64], "secure-ai-vault", "1234-uuid");
        assert_ne!(m.as_bytes(), other.as_bytes());
        assert_eq!(latch_measurement(Bank::Sha1, &vk, "a", "b").len(), 20);
        // a ':' in the name cannot collide with the separator
        let a = latch_measurement(Bank::Sha256, &vk, "a:b", "c");
        let b = latch_measurement(Bank::Sha256, &vk, "a", "b:c");
        assert_ne!(a.as_bytes(), b.as_bytes());
    }
}
