//! The clevis `tang` pin: check the server's advertisement, then recover the
//! ECDH-ES shared secret by the McCallum–Relyea exchange.
//!
//! The token records the advertisement (`clevis.tang.adv`) seen at bind time. At
//! unlock the server's current advertisement (`GET /adv/<thp>`, which Tang also
//! signs with the named key even after rotation) must carry a valid ES512
//! signature by a signing key recorded in the token, or by a key whose thumbprint
//! the operator trusts (`clevis.tang-thumbprint` / `rd.vaultguard.tang-thumbprint=`);
//! anything else is refused as a wrong server before any exchange. The exchange
//! sends `epk + e·G` for a fresh random `e`; the server returns `s·(epk + e·G)`;
//! subtracting `e·S` leaves `s·epk`, whose x coordinate is the JWE's ECDH-ES
//! secret. The server sees only a uniformly blinded point and learns nothing of
//! the key. `e`, the secret point and the content key live in zeroizing types.

use super::gcry::{self, Op};
use super::http::{self, Url};
use super::jwe::Jwe;
use super::jwk::EcJwk;
use super::{b64, ClevisError};
use crate::secret::SecretBytes;
use serde_json::Value;
use sha2::{Digest, Sha512};
use std::time::Instant;
use zeroize::Zeroizing;

/// What a tang pin needs, read from its JWE header.
#[derive(Debug, Clone)]
pub struct TangPin {
    pub url: String,
    /// The server's exchange key (thumbprint = `kid`), from the recorded adv.
    pub exchange: EcJwk,
    pub kid: String,
    /// The JWE's ephemeral public key.
    pub epk: EcJwk,
    /// Signing (ES512 `verify`) keys recorded at bind time.
    pub signing: Vec<EcJwk>,
}

impl TangPin {
    pub fn from_jwe(jwe: &Jwe) -> Result<TangPin, ClevisError> {
        let cfg = jwe.pin_config("tang")?;
        let url = cfg
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| ClevisError::Malformed("tang pin without clevis.tang.url".into()))?
            .to_string();
        match jwe.hdr_str("alg") {
            Some("ECDH-ES") => {}
            Some(a) => return Err(ClevisError::Unsupported(format!("tang JWE alg {a:?}"))),
            None => return Err(ClevisError::Malformed("tang JWE without \"alg\"".into())),
        }
        jwe.check_enc()?;
        let kid = jwe
            .hdr_str("kid")
            .ok_or_else(|| ClevisError::Malformed("tang JWE without \"kid\"".into()))?
            .to_string();
        let epk = EcJwk::from_json(
            jwe.header
                .get("epk")
                .ok_or_else(|| ClevisError::Malformed("tang JWE without \"epk\"".into()))?,
        )?;
        let adv = cfg
            .get("adv")
            .ok_or_else(|| ClevisError::Malformed("tang pin without clevis.tang.adv".into()))?;
        // clevis records the JWKS; an adv given as a JWS at bind time is a JWS.
        let keys = adv_keys(adv)?;
        let mut exchange = None;
        let mut signing = Vec::new();
        for k in keys.iter() {
            let Ok(k) = EcJwk::from_json(k) else { continue };
            if k.has_op("verify") {
                signing.push(k.clone());
            }
            if k.has_op("deriveKey") && (k.thumbprint() == kid || k.thumbprint_s1() == kid) {
                exchange = Some(k);
            }
        }
        let exchange = exchange.ok_or_else(|| {
            ClevisError::Malformed(format!(
                "the advertisement recorded in the token has no exchange key {kid}"
            ))
        })?;
        Ok(TangPin {
            url,
            exchange,
            kid,
            epk,
            signing,
        })
    }

    /// The whole pin: advertisement check, exchange, decryption. By `deadline`.
    pub fn decrypt(
        &self,
        jwe: &Jwe,
        trusted_thumbprints: &[String],
        deadline: Instant,
    ) -> Result<SecretBytes, ClevisError> {
        let url = Url::parse(&self.url).map_err(|e| ClevisError::Http(self.url.clone(), e))?;
        self.check_advertisement(&url, trusted_thumbprints, deadline)?;
        let z = self.recover(&url, deadline)?;
        let cek = jwe.ecdh_es_cek(&z)?;
        jwe.decrypt(&cek)
    }

    fn check_advertisement(
        &self,
        url: &Url,
        trusted: &[String],
        deadline: Instant,
    ) -> Result<(), ClevisError> {
        // Ask for the advertisement signed by a key we know: Tang adds that key's
        // signature even when the key was rotated out of the default advertisement.
        let path = match self.signing.first() {
            Some(k) => format!("/adv/{}", k.thumbprint()),
            None => "/adv".to_string(),
        };
        let resp = match http::request(url, "GET", &path, None, deadline) {
            // That key is gone from the server: its plain advertisement must then
            // be signed by a key we trust, or the server is not the one bound.
            Err(http::HttpError::Status(404)) if path != "/adv" => {
                http::request(url, "GET", "/adv", None, deadline)
            }
            r => r,
        }
        .map_err(|e| ClevisError::Http(self.url.clone(), e))?;
        let jws: Value = serde_json::from_slice(&resp.body).map_err(|e| {
            ClevisError::Malformed(format!("advertisement of {} is not JSON: {e}", self.url))
        })?;
        verify_advertisement(&jws, &self.signing, trusted).map_err(|e| match e {
            ClevisError::Untrusted(m) => ClevisError::Untrusted(format!("{}: {m}", self.url)),
            other => other,
        })?;
        Ok(())
    }

    /// The McCallum–Relyea exchange; returns Z's x coordinate (zeroizing).
    fn recover(&self, url: &Url, deadline: Instant) -> Result<Zeroizing<Vec<u8>>, ClevisError> {
        let e = gcry::random_scalar()?;
        let blinded = gcry::compute(Op::AddMulBase(&self.epk.point, e.as_bytes()))?;
        let req = EcJwk::from_point(blinded).to_json().to_string();
        let resp = http::request(
            url,
            "POST",
            &format!("/rec/{}", self.kid),
            Some(("application/jwk+json", req.as_bytes())),
            deadline,
        )
        .map_err(|e| ClevisError::Http(self.url.clone(), e))?;
        let answer: Value = serde_json::from_slice(&resp.body).map_err(|e| {
            ClevisError::Malformed(format!("recovery answer of {} is not JSON: {e}", self.url))
        })?;
        // from_json checks the point is on the curve.
        let y = EcJwk::from_json(&answer)?;
        let z = gcry::compute(Op::SubMul(&y.point, &self.exchange.point, e.as_bytes())).map_err(
            |_| ClevisError::Crypto(format!("{} answered a degenerate point", self.url)),
        )?;
        let gcry::Point { x, mut y } = z;
        zeroize::Zeroize::zeroize(&mut y);
        Ok(Zeroizing::new(x))
    }
}

/// The keys of an advertisement given as a JWKS or a JWS over one.
pub fn adv_keys(adv: &Value) -> Result<Vec<Value>, ClevisError> {
    let jwks = if adv.get("payload").is_some() {
        let p = adv["payload"].as_str().ok_or_else(|| {
            ClevisError::Malformed("advertisement payload is not a string".into())
        })?;
        serde_json::from_slice::<Value>(&b64::decode(p, "advertisement payload")?)
            .map_err(|e| ClevisError::Malformed(format!("advertisement payload: {e}")))?
    } else {
        adv.clone()
    };
    jwks.get("keys")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| ClevisError::Malformed("advertisement without \"keys\"".into()))
}

/// Verify an advertisement JWS (flattened or general): at least one ES512
/// signature by a key in `known`, or by a key of the payload whose S256
/// thumbprint is in `trusted`. Returns the payload's keys.
pub fn verify_advertisement(
    jws: &Value,
    known: &[EcJwk],
    trusted: &[String],
) -> Result<Vec<Value>, ClevisError> {
    let payload = jws
        .get("payload")
        .and_then(Value::as_str)
        .ok_or_else(|| ClevisError::Malformed("advertisement is not a JWS".into()))?;
    let keys = adv_keys(jws)?;
    let mut candidates: Vec<EcJwk> = known.to_vec();
    for k in &keys {
        if let Ok(k) = EcJwk::from_json(k) {
            if k.has_op("verify") && trusted.iter().any(|t| *t == k.thumbprint()) {
                candidates.push(k);
            }
        }
    }
    let sigs: Vec<&Value> = match jws.get("signatures").and_then(Value::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![jws],
    };
    let mut algs = Vec::new();
    for sig in sigs {
        let (Some(prot), Some(s)) = (
            sig.get("protected").and_then(Value::as_str),
            sig.get("signature").and_then(Value::as_str),
        ) else {
            continue;
        };
        let hdr: Value = serde_json::from_slice(&b64::decode(prot, "JWS protected header")?)
            .map_err(|e| ClevisError::Malformed(format!("JWS protected header: {e}")))?;
        let alg = hdr.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg != "ES512" {
            algs.push(alg.to_string());
            continue;
        }
        let sig = b64::decode(s, "JWS signature")?;
        let digest = Sha512::digest(format!("{prot}.{payload}").as_bytes());
        for k in &candidates {
            if gcry::ecdsa_verify(&k.point, &digest, &sig)? {
                return Ok(keys);
            }
        }
    }
    if known.is_empty() && trusted.is_empty() {
        return Err(ClevisError::Untrusted(
            "no signing key recorded and no trusted thumbprint configured".into(),
        ));
    }
    Err(ClevisError::Untrusted(format!(
        "advertisement not signed by a key recorded at enrolment{} (wrong server, or its keys were replaced: re-bind after checking the thumbprint){}",
        if trusted.is_empty() { "" } else { " or a trusted thumbprint" },
        if algs.is_empty() {
            String::new()
        } else {
            format!("; unsupported signature algorithms: {}", algs.join(", "))
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    // An advertisement from Debian's tangd 11 (keys made by tangd-keygen).
    const ADV: &str = include_str!("testdata/adv.json");

    #[test]
    fn real_advertisement_verifies_against_its_own_keys() {
        let jws: Value = serde_json::from_str(ADV).unwrap();
        let keys = adv_keys(&jws).unwrap();
        let signing: Vec<EcJwk> = keys
            .iter()
            .filter_map(|k| EcJwk::from_json(k).ok())
            .filter(|k| k.has_op("verify"))
            .collect();
        assert_eq!(signing.len(), 1);
        assert!(verify_advertisement(&jws, &signing, &[]).is_ok());
        // By thumbprint only.
        let thp = signing[0].thumbprint();
        assert!(verify_advertisement(&jws, &[], &[thp]).is_ok());
    }

    #[test]
    fn advertisement_by_an_unknown_key_is_refused() {
        let jws: Value = serde_json::from_str(ADV).unwrap();
        // The exchange key is a valid point but never signed anything.
        let keys = adv_keys(&jws).unwrap();
        let other: Vec<EcJwk> = keys
            .iter()
            .filter_map(|k| EcJwk::from_json(k).ok())
            .filter(|k| k.has_op("deriveKey"))
            .collect();
        let e = verify_advertisement(&jws, &other, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not signed by a key recorded"), "{e}");
        let e = verify_advertisement(&jws, &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no signing key recorded"), "{e}");
        // A tampered payload fails the real key too.
        let mut bad = jws.clone();
        let mut p = b64::decode(jws["payload"].as_str().unwrap(), "p").unwrap();
        p[20] ^= 1;
        bad["payload"] = Value::String(b64::encode(&p));
        let signing: Vec<EcJwk> = adv_keys(&jws)
            .unwrap()
            .iter()
            .filter_map(|k| EcJwk::from_json(k).ok())
            .filter(|k| k.has_op("verify"))
            .collect();
        assert!(verify_advertisement(&bad, &signing, &[]).is_err());
    }

    #[test]
    fn random_scalars_differ_and_blinding_cancels() {
        let a = gcry::random_scalar().unwrap();
        let b = gcry::random_scalar().unwrap();
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_eq!(a.len(), 66);
        // (P + a·G) − a·G = P, the identity the exchange relies on.
        let p = gcry::compute(Op::MulBase(b.as_bytes())).unwrap();
        let g = gcry::compute(Op::MulBase(&[1])).unwrap();
        let blinded = gcry::compute(Op::AddMulBase(&p, a.as_bytes())).unwrap();
        let back = gcry::compute(Op::SubMul(&blinded, &g, a.as_bytes())).unwrap();
        assert_eq!(back, p);
    }
}
