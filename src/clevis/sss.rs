//! The clevis `sss` pin: Shamir's secret sharing over a prime field, as
//! `clevis encrypt sss` makes it.
//!
//! The header's `clevis.sss` holds the prime `p` (big-endian, base64url, 32 bytes
//! for clevis' 256-bit key), the threshold `t` and `jwe`: one compact JWE per
//! share, each made by a child pin (tang, tpm2, or another sss). A child's
//! plaintext is its point `x ‖ y` (each `len(p)` bytes); any `t` points give, by
//! Lagrange interpolation at 0, the key `k` (again `len(p)` bytes) that decrypts
//! the outer JWE directly (`alg` `dir`, `enc` A256GCM). This module does the
//! arithmetic and the outer decryption; the engine (`super`) runs the children.

use super::jwe::Jwe;
use super::{b64, ClevisError};
use crate::secret::SecretBytes;
use serde_json::Value;

/// An sss pin's parameters.
#[derive(Debug, Clone)]
pub struct SssPin {
    pub p: Vec<u8>,
    pub t: usize,
    pub children: Vec<String>,
}

impl SssPin {
    pub fn from_jwe(jwe: &Jwe) -> Result<SssPin, ClevisError> {
        let cfg = jwe.pin_config("sss")?;
        let p = cfg
            .get("p")
            .and_then(Value::as_str)
            .ok_or_else(|| ClevisError::Malformed("sss pin without \"p\"".into()))?;
        let p = b64::decode(p, "sss p")?;
        if p.is_empty() || p.len() > 32 || p.last().is_some_and(|b| b & 1 == 0) {
            return Err(ClevisError::Unsupported(format!(
                "sss prime of {} bytes (an odd prime of at most 32 bytes expected)",
                p.len()
            )));
        }
        let t = cfg
            .get("t")
            .and_then(Value::as_u64)
            .filter(|t| *t >= 1)
            .ok_or_else(|| {
                ClevisError::Malformed("sss pin without a threshold \"t\" ≥ 1".into())
            })?;
        let children: Vec<String> = cfg
            .get("jwe")
            .and_then(Value::as_array)
            .ok_or_else(|| ClevisError::Malformed("sss pin without \"jwe\"".into()))?
            .iter()
            .map(|j| {
                j.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ClevisError::Malformed("sss child JWE is not a string".into()))
            })
            .collect::<Result<_, _>>()?;
        if t as usize > children.len() {
            return Err(ClevisError::Malformed(format!(
                "sss threshold {t} above its {} pins: it can never unlock",
                children.len()
            )));
        }
        if !matches!(jwe.hdr_str("alg"), Some("dir")) {
            return Err(ClevisError::Unsupported(format!(
                "sss JWE alg {:?} (dir expected)",
                jwe.hdr_str("alg")
            )));
        }
        Ok(SssPin {
            p,
            t: t as usize,
            children,
        })
    }

    /// Combine `t` child plaintexts (points) and decrypt the outer JWE.
    pub fn combine(&self, jwe: &Jwe, points: &[&SecretBytes]) -> Result<SecretBytes, ClevisError> {
        let key = recover(&self.p, &points[..self.t.min(points.len())])?;
        jwe.decrypt(key.as_bytes())
    }
}

/// Lagrange interpolation at 0 of the points `x ‖ y` over GF(p) (libgcrypt's
/// modular arithmetic, `gcry`).
pub fn recover(p: &[u8], points: &[&SecretBytes]) -> Result<SecretBytes, ClevisError> {
    let len = p.len();
    if p.is_empty() || p.len() > 32 || p[p.len() - 1] & 1 == 0 {
        return Err(ClevisError::Malformed(
            "sss prime is not an odd number of ≤ 32 bytes".into(),
        ));
    }
    let mut pts = Vec::with_capacity(points.len());
    for pt in points {
        if pt.len() != 2 * len {
            return Err(ClevisError::Malformed(format!(
                "sss share of {} bytes ({} expected)",
                pt.len(),
                2 * len
            )));
        }
        pts.push((&pt.as_bytes()[..len], &pt.as_bytes()[len..]));
    }
    super::gcry::lagrange_at_zero(p, &pts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_recovers_the_constant_term() {
        // p = 2^255 - 19; f(x) = k + 5x + 7x^2; shares at x = 1, 2, 3.
        let p = {
            let mut b = [0xffu8; 32];
            b[0] = 0x7f;
            b[31] = 0xed;
            b
        };
        let k = 123456789u64;
        let f = |x: u64| k + 5 * x + 7 * x * x;
        let share = |x: u64| {
            let mut v = vec![0u8; 64];
            v[24..32].copy_from_slice(&x.to_be_bytes());
            v[56..64].copy_from_slice(&f(x).to_be_bytes());
            SecretBytes::from_vec(v)
        };
        let (a, b, c) = (share(1), share(2), share(3));
        let got = recover(&p, &[&a, &b, &c]).unwrap();
        assert_eq!(&got.as_bytes()[24..], &k.to_be_bytes());
        assert!(got.as_bytes()[..24].iter().all(|b| *b == 0));
        let got = recover(&p, &[&c, &a, &b]).unwrap();
        assert_eq!(&got.as_bytes()[24..], &k.to_be_bytes());
        // Two shares of a degree-2 polynomial give something else.
        let wrong = recover(&p, &[&a, &b]).unwrap();
        assert_ne!(&wrong.as_bytes()[24..], &k.to_be_bytes());
        let e = recover(&p, &[&a, &a]).unwrap_err().to_string();
        assert!(e.contains("same x"), "{e}");
    }
}
