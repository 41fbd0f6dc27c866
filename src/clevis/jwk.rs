//! JWK (RFC 7517) as clevis and Tang use it: EC public keys on P-521, their
//! RFC 7638 thumbprints, and the JWK a Tang recovery exchange sends and answers.
//!
//! Every point read from outside is checked to lie on the curve before it is used
//! (a point off the curve in a Tang answer would otherwise leak the blinding
//! scalar's residues); the curve arithmetic is libgcrypt's (`gcry`). Only P-521 is built in: it is what `tangd-keygen` makes and
//! what clevis binds against a default Tang; P-256/P-384 keys are refused with the
//! curve named rather than misread.

use super::b64;
use super::gcry::{self, Point};
use super::ClevisError;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// P-521 coordinates are 66 bytes (RFC 7518 §6.2.1.2: full length, zero-padded).
pub const P521_COORD_LEN: usize = 66;

/// An EC public key as a JWK carries it, with the fields clevis reads.
#[derive(Debug, Clone)]
pub struct EcJwk {
    pub point: Point,
    pub alg: Option<String>,
    pub key_ops: Vec<String>,
    /// The JSON as received (the thumbprint covers only the required members).
    pub x: String,
    pub y: String,
}

impl EcJwk {
    /// Parse and check a JWK: `kty` EC, `crv` P-521, `x`/`y` a point on the curve.
    pub fn from_json(v: &Value) -> Result<EcJwk, ClevisError> {
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        match field("kty") {
            Some("EC") => {}
            Some(other) => {
                return Err(ClevisError::Unsupported(format!(
                    "JWK kty {other:?} (only EC keys are used by Tang)"
                )))
            }
            None => return Err(ClevisError::Malformed("JWK without \"kty\"".into())),
        }
        match field("crv") {
            Some("P-521") => {}
            Some(c @ ("P-256" | "P-384")) => {
                return Err(ClevisError::Unsupported(format!(
                    "JWK curve {c}: this build speaks P-521 only (tangd-keygen's default)"
                )))
            }
            Some(c) => return Err(ClevisError::Unsupported(format!("JWK curve {c:?}"))),
            None => return Err(ClevisError::Malformed("JWK without \"crv\"".into())),
        }
        let (Some(x), Some(y)) = (field("x"), field("y")) else {
            return Err(ClevisError::Malformed("EC JWK without \"x\"/\"y\"".into()));
        };
        let point = point_from_xy(&b64::decode(x, "JWK x")?, &b64::decode(y, "JWK y")?)?;
        Ok(EcJwk {
            point,
            alg: field("alg").map(str::to_string),
            key_ops: v
                .get("key_ops")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|o| o.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            x: x.to_string(),
            y: y.to_string(),
        })
    }

    pub fn from_point(point: Point) -> EcJwk {
        let (x, y) = (b64::encode(&point.x), b64::encode(&point.y));
        EcJwk {
            point,
            alg: None,
            key_ops: Vec::new(),
            x,
            y,
        }
    }

    /// RFC 7638 thumbprint, SHA-256 (clevis' `S256`), base64url.
    pub fn thumbprint(&self) -> String {
        // Members in lexicographic order, no whitespace: the RFC's canonical form.
        let canon = format!(
            "{{\"crv\":\"P-521\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}",
            self.x, self.y
        );
        b64::encode(&Sha256::digest(canon.as_bytes()))
    }

    /// RFC 7638 thumbprint with SHA-1 (clevis' deprecated `S1`, still accepted by
    /// clevis for `kid`).
    pub fn thumbprint_s1(&self) -> String {
        let canon = format!(
            "{{\"crv\":\"P-521\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}",
            self.x, self.y
        );
        use sha1::Digest as _;
        b64::encode(&sha1::Sha1::digest(canon.as_bytes()))
    }

    pub fn has_op(&self, op: &str) -> bool {
        self.key_ops.iter().any(|o| o == op)
    }

    /// The public JWK as sent to Tang (`kty`, `crv`, `x`, `y`).
    pub fn to_json(&self) -> Value {
        json!({"kty": "EC", "crv": "P-521", "x": self.x, "y": self.y})
    }
}

/// A point from big-endian coordinates, refused unless it is on P-521.
pub fn point_from_xy(x: &[u8], y: &[u8]) -> Result<Point, ClevisError> {
    gcry::point(x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A key tangd-keygen made (Debian tang 11), and its file name (= S256 thumbprint).
    const EXC: &str = r#"{"alg":"ECMR","crv":"P-521","key_ops":["deriveKey"],"kty":"EC","x":"AN1M8NvQSJ7IsFopmy_-WbCYSFrrZstlHfHNrbstRs3ZR0g7h-0Jy5FARO7uJNQxMmENaZgafP8yqEyg26qzRj_z","y":"ATfC1MWDJ32za9eVTsZg_1IgaGtNe-fd4Iz944owX18K7-2cTmrDqXp1PPnTrCF9bSZ1Zh100oRO8laP-pR5S4uf"}"#;

    #[test]
    fn thumbprint_is_tangs_key_file_name() {
        let k = EcJwk::from_json(&serde_json::from_str(EXC).unwrap()).unwrap();
        assert_eq!(
            k.thumbprint(),
            "HUXSQ2uSJ5p5CxRstrzbMoGzj3rfXP117Nd-QLViJOA"
        );
        assert!(k.has_op("deriveKey"));
        assert_eq!(k.alg.as_deref(), Some("ECMR"));
    }

    #[test]
    fn off_curve_point_is_refused() {
        let mut v: Value = serde_json::from_str(EXC).unwrap();
        // Flip the last bit of y: (x, y') is not on the curve.
        let mut y = b64::decode(v["y"].as_str().unwrap(), "y").unwrap();
        y[65] ^= 1;
        v["y"] = Value::String(b64::encode(&y));
        let e = EcJwk::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("not on curve P-521"), "{e}");
    }

    #[test]
    fn other_curves_and_types_are_named() {
        let e = EcJwk::from_json(&json!({"kty":"EC","crv":"P-256","x":"AA","y":"AA"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("P-256"), "{e}");
        let e = EcJwk::from_json(&json!({"kty":"RSA"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RSA"), "{e}");
        let e = EcJwk::from_json(&json!({"kty":"EC","crv":"P-521","x":"AA","y":"AA"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("66"), "{e}");
    }
}
