//! Making clevis JWEs: the `tang` pin's encryption (advertisement fetched, its
//! signing keys shown and trusted only by thumbprint or an operator's yes) and
//! `sss` over tang pins, in the exact shapes `clevis luks unlock`/`clevis luks
//! pass` read.
//!
//! The sss prime is fixed, 2^256 − 189 (the largest 256-bit prime), where clevis
//! draws a fresh random 256-bit prime per binding: the prime is public (it is in
//! the header) and any prime above the key space gives the same threshold
//! security; a fixed one spares the binary a primality test. Decryption takes `p`
//! from the header either way, so both kinds of binding open with both tools.

use super::gcry::{self, Op};
use super::http::{self, Url};
use super::jwe::concat_kdf;
use super::jwk::EcJwk;
use super::tang::{adv_keys, verify_advertisement};
use super::{b64, ClevisError};
use crate::secret::SecretBytes;
use serde_json::{json, Value};
use std::time::Instant;

/// 2^256 − 189, big-endian.
pub const SSS_PRIME: [u8; 32] = {
    let mut p = [0xffu8; 32];
    p[31] = 0x43;
    p
};

/// A Tang server's advertisement, checked to be signed by its own signing keys.
#[derive(Debug, Clone)]
pub struct Advertisement {
    pub url: String,
    /// The JWKS (`{"keys": [...]}`) as clevis records it in `clevis.tang.adv`.
    pub jwks: Value,
    /// S256 thumbprints of the signing keys: what the operator must trust.
    pub signing_thumbprints: Vec<String>,
    exchange: EcJwk,
}

/// `GET /adv`, and the JWS checked against the signing keys it carries.
pub fn fetch_advertisement(url: &str, deadline: Instant) -> Result<Advertisement, ClevisError> {
    let u = Url::parse(url).map_err(|e| ClevisError::Http(url.to_string(), e))?;
    let resp = http::request(&u, "GET", "/adv", None, deadline)
        .map_err(|e| ClevisError::Http(url.to_string(), e))?;
    let jws: Value = serde_json::from_slice(&resp.body)
        .map_err(|e| ClevisError::Malformed(format!("advertisement of {url} is not JSON: {e}")))?;
    let keys = adv_keys(&jws)?;
    let parsed: Vec<EcJwk> = keys
        .iter()
        .filter_map(|k| EcJwk::from_json(k).ok())
        .collect();
    let signing: Vec<EcJwk> = parsed
        .iter()
        .filter(|k| k.has_op("verify"))
        .cloned()
        .collect();
    // Self-consistency: signed by (at least one of) its own signing keys.
    verify_advertisement(&jws, &signing, &[])?;
    let exchange = parsed
        .iter()
        .find(|k| k.has_op("deriveKey") && k.alg.as_deref() == Some("ECMR"))
        .cloned()
        .ok_or_else(|| {
            ClevisError::Malformed(format!("advertisement of {url} has no exchange key"))
        })?;
    Ok(Advertisement {
        url: url.to_string(),
        jwks: json!({ "keys": keys }),
        signing_thumbprints: signing.iter().map(EcJwk::thumbprint).collect(),
        exchange,
    })
}

impl Advertisement {
    /// Is one of the signing keys the operator's `thp`?
    pub fn trusted_by(&self, thp: &[String]) -> bool {
        self.signing_thumbprints.iter().any(|s| thp.contains(s))
    }

    /// The tang pin's JWE of `plaintext`: ECDH-ES with the exchange key, A256GCM.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Encrypted, ClevisError> {
        let e = gcry::random_scalar()?;
        let epk = gcry::compute(Op::MulBase(e.as_bytes()))?;
        let gcry::Point { x: zx, y: mut zy } =
            gcry::compute(Op::Mul(&self.exchange.point, e.as_bytes()))?;
        zeroize::Zeroize::zeroize(&mut zy);
        let zx = zeroize::Zeroizing::new(zx);
        let cek = concat_kdf(&zx, "A256GCM", b"", b"", 256);
        let mut epk_jwk = EcJwk::from_point(epk).to_json();
        // clevis' epk carries only the public members.
        epk_jwk.as_object_mut().map(|o| o.remove("alg"));
        let header = json!({
            "alg": "ECDH-ES",
            "enc": "A256GCM",
            "clevis": {"pin": "tang", "tang": {"url": self.url, "adv": self.jwks}},
            "epk": epk_jwk,
            "kid": self.exchange.thumbprint(),
        });
        seal(&header, &cek, plaintext)
    }
}

/// The clevis `tpm2` pin's JWE of `plaintext`: a fresh A256GCM JWK sealed by
/// `seal` (which returns TPM2B_PRIVATE and TPM2B_PUBLIC) to `pcr_ids` of `bank`.
pub fn tpm2_encrypt(
    plaintext: &[u8],
    bank: &str,
    pcr_ids: &[u32],
    tpm_seal: impl FnOnce(&[u8]) -> Result<(Vec<u8>, Vec<u8>), ClevisError>,
) -> Result<Encrypted, ClevisError> {
    let mut key = SecretBytes::zeroed(32);
    crate::secret::fill_random(key.as_mut_bytes())
        .map_err(|e| ClevisError::Crypto(format!("no randomness: {e}")))?;
    // What `jose jwk gen -i '{"alg":"A256GCM"}'` makes, the shape clevis seals.
    let jwk = SecretBytes::from_vec(
        format!(
            "{{\"alg\":\"A256GCM\",\"k\":\"{}\",\"key_ops\":[\"encrypt\",\"decrypt\"],\"kty\":\"oct\"}}",
            b64::encode(key.as_bytes())
        )
        .into_bytes(),
    );
    let (private, public) = tpm_seal(jwk.as_bytes())?;
    let ids: Vec<String> = pcr_ids.iter().map(u32::to_string).collect();
    let header = json!({
        "alg": "dir",
        "enc": "A256GCM",
        "clevis": {"pin": "tpm2", "tpm2": {
            "hash": "sha256",
            "key": "ecc",
            "jwk_pub": b64::encode(&public),
            "jwk_priv": b64::encode(&private),
            "pcr_bank": bank,
            "pcr_ids": ids.join(","),
        }},
    });
    seal(&header, key.as_bytes(), plaintext)
}

/// A JWE made here, in both serializations.
pub struct Encrypted {
    pub protected: String,
    pub iv: String,
    pub ciphertext: String,
    pub tag: String,
}

impl Encrypted {
    pub fn compact(&self) -> String {
        format!(
            "{}..{}.{}.{}",
            self.protected, self.iv, self.ciphertext, self.tag
        )
    }

    /// The flattened form `clevis luks bind` puts in the token's `jwe`.
    pub fn flattened(&self) -> Value {
        json!({
            "ciphertext": self.ciphertext,
            "encrypted_key": "",
            "iv": self.iv,
            "protected": self.protected,
            "tag": self.tag,
        })
    }
}

fn seal(header: &Value, cek: &[u8], plaintext: &[u8]) -> Result<Encrypted, ClevisError> {
    let protected = b64::encode(header.to_string().as_bytes());
    let mut iv = [0u8; 12];
    crate::secret::fill_random(&mut iv)
        .map_err(|e| ClevisError::Crypto(format!("no randomness: {e}")))?;
    let mut buf = SecretBytes::from_slice(plaintext);
    let mut tag = [0u8; 16];
    super::gcry::aes256gcm(
        true,
        cek,
        &iv,
        protected.as_bytes(),
        buf.as_mut_bytes(),
        &mut tag,
    )?;
    Ok(Encrypted {
        protected,
        iv: b64::encode(&iv),
        ciphertext: b64::encode(buf.as_bytes()),
        tag: b64::encode(&tag),
    })
}

/// A random element of [1, p).
fn random_in_field() -> Result<SecretBytes, ClevisError> {
    loop {
        let mut b = SecretBytes::zeroed(32);
        crate::secret::fill_random(b.as_mut_bytes())
            .map_err(|e| ClevisError::Crypto(format!("no randomness: {e}")))?;
        if gcry::in_field(&SSS_PRIME, b.as_bytes())? {
            return Ok(b);
        }
    }
}

/// sss over children: `child(point)` makes each child's compact JWE of its
/// share; `t` of them open the outer JWE of `plaintext`.
pub fn sss_encrypt(
    t: usize,
    n: usize,
    plaintext: &[u8],
    mut child: impl FnMut(usize, &[u8]) -> Result<String, ClevisError>,
) -> Result<Encrypted, ClevisError> {
    if t == 0 || t > n {
        return Err(ClevisError::Malformed(format!(
            "threshold {t} with {n} pins: it must be between 1 and {n}"
        )));
    }
    let coeffs: Vec<SecretBytes> = (0..t)
        .map(|_| random_in_field())
        .collect::<Result<_, _>>()?;
    let mut xs: Vec<SecretBytes> = Vec::new();
    let mut children = Vec::new();
    for i in 0..n {
        let x = loop {
            let x = random_in_field()?;
            if !xs.iter().any(|o| o.as_bytes() == x.as_bytes()) {
                break x;
            }
        };
        let y = gcry::poly_eval(&SSS_PRIME, &coeffs, x.as_bytes())?;
        let mut point = x.as_bytes().to_vec();
        point.extend_from_slice(y.as_bytes());
        let point = SecretBytes::from_vec(point);
        xs.push(x);
        children.push(child(i, point.as_bytes())?);
    }
    let key = &coeffs[0];
    let header = json!({
        "alg": "dir",
        "enc": "A256GCM",
        "clevis": {"pin": "sss", "sss": {"p": b64::encode(&SSS_PRIME), "t": t, "jwe": children}},
    });
    seal(&header, key.as_bytes(), plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clevis::jwe::Jwe;
    use crate::clevis::sss::SssPin;

    #[test]
    fn sss_shares_recombine_with_the_decryptor() {
        // Children here are "dir" JWEs under a fixed key, standing in for pins.
        let key = [9u8; 32];
        let mk = |_: usize, pt: &[u8]| -> Result<String, ClevisError> {
            let h = json!({"alg":"dir","enc":"A256GCM","clevis":{"pin":"test"}});
            Ok(seal(&h, &key, pt)?.compact())
        };
        let outer = sss_encrypt(2, 3, b"the passphrase", mk).unwrap();
        let jwe = Jwe::from_compact(&outer.compact()).unwrap();
        let pin = SssPin::from_jwe(&jwe).unwrap();
        assert_eq!(pin.t, 2);
        let shares: Vec<SecretBytes> = pin
            .children
            .iter()
            .map(|c| Jwe::from_compact(c).unwrap().decrypt(&key).unwrap())
            .collect();
        for pair in [[0, 1], [1, 2], [2, 0]] {
            let got = pin
                .combine(&jwe, &[&shares[pair[0]], &shares[pair[1]]])
                .unwrap();
            assert_eq!(got.as_bytes(), b"the passphrase");
        }
        assert!(pin.combine(&jwe, &[&shares[0]]).is_err());
        assert!(sss_encrypt(4, 3, b"x", mk).is_err());
    }
}
