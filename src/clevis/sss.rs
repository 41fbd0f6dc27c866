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
use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::U256;
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

fn u256(bytes: &[u8]) -> U256 {
    let mut b = [0u8; 32];
    b[32 - bytes.len()..].copy_from_slice(bytes);
    U256::from_be_slice(&b)
}

fn be_bytes(v: &U256, len: usize) -> SecretBytes {
    let mut out = SecretBytes::zeroed(32);
    for (i, w) in v.as_words().iter().enumerate() {
        out.as_mut_bytes()[32 - 8 * (i + 1)..32 - 8 * i].copy_from_slice(&w.to_be_bytes());
    }
    SecretBytes::from_slice(&out.as_bytes()[32 - len..])
}

/// Lagrange interpolation at 0 of the points `x ‖ y` over GF(p).
pub fn recover(p: &[u8], points: &[&SecretBytes]) -> Result<SecretBytes, ClevisError> {
    let len = p.len();
    if p.is_empty() || p.len() > 32 || p[p.len() - 1] & 1 == 0 {
        return Err(ClevisError::Malformed(
            "sss prime is not an odd number of ≤ 32 bytes".into(),
        ));
    }
    let params = DynResidueParams::<4>::new(&u256(p));
    let pv = u256(p);
    let mut xs = Vec::with_capacity(points.len());
    let mut ys = Vec::with_capacity(points.len());
    for pt in points {
        if pt.len() != 2 * len {
            return Err(ClevisError::Malformed(format!(
                "sss share of {} bytes ({} expected)",
                pt.len(),
                2 * len
            )));
        }
        let (x, y) = (u256(&pt.as_bytes()[..len]), u256(&pt.as_bytes()[len..]));
        if x >= pv || y >= pv {
            return Err(ClevisError::Malformed("sss share outside the field".into()));
        }
        xs.push(DynResidue::new(&x, params));
        ys.push(DynResidue::new(&y, params));
    }
    let zero = DynResidue::zero(params);
    let mut k = zero;
    for i in 0..xs.len() {
        let mut acc = DynResidue::one(params);
        for j in 0..xs.len() {
            if i == j {
                continue;
            }
            let (inv, ok) = (xs[i] - xs[j]).invert();
            if !bool::from(ok) {
                return Err(ClevisError::Malformed(
                    "two sss shares with the same x".into(),
                ));
            }
            acc = acc * (zero - xs[j]) * inv;
        }
        k += acc * ys[i];
    }
    Ok(be_bytes(&k.retrieve(), len))
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
