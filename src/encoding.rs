//! Base64 (RFC 4648, standard alphabet, padded, as systemd writes it) and hex.
//!
//! Base64 is the `base64` crate's (already linked through tss-esapi's X.509
//! dependency), strict as its STANDARD engine is: canonical padding required, no
//! whitespace, no non-zero trailing bits. A secret (the sealed secret becomes a
//! keyslot passphrase) is encoded straight into a zeroizing [`SecretBytes`], with
//! no intermediate `String` that would not be wiped. Hex stays here: ten lines,
//! and strict (digits only, no sign, no prefix), which `u8::from_str_radix` is not.

use crate::secret::SecretBytes;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

pub fn base64_encode(input: &[u8]) -> String {
    STANDARD.encode(input)
}

/// Base64 of a secret, itself a secret.
pub fn base64_encode_secret(input: &[u8]) -> SecretBytes {
    // Padded base64 of n bytes: 4 * ceil(n / 3), which cannot overflow for any
    // slice in memory.
    let mut out = SecretBytes::zeroed(input.len().div_ceil(3) * 4);
    let written = STANDARD
        .encode_slice(input, out.as_mut_bytes())
        .expect("the buffer is exactly the padded encoding's length");
    out.truncate(written);
    out
}

/// Strict decoder: padding required, whitespace (which systemd's JSON never has),
/// stray characters and non-canonical trailing bits refused.
pub fn base64_decode(input: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(input)
        .map_err(|e| format!("invalid base64: {e}"))
}

pub fn hex_encode(input: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(input.len() * 2);
    for &b in input {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Hex digits (either case) in pairs, nothing else.
pub fn hex_decode(input: &str) -> Result<Vec<u8>, String> {
    let digit = |c: u8| -> Result<u8, String> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("invalid hex digit {:?}", c as char))
    };
    let b = input.as_bytes();
    if b.len() % 2 != 0 {
        return Err("hex string has an odd length".into());
    }
    b.chunks(2)
        .map(|p| Ok((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc).unwrap(), plain.as_bytes());
            assert_eq!(
                base64_encode_secret(plain.as_bytes()).as_bytes(),
                enc.as_bytes()
            );
        }
    }

    #[test]
    fn base64_round_trip_all_bytes() {
        let data: Vec<u8> = (0..=255u8).collect();
        assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
    }

    #[test]
    fn base64_rejects_garbage() {
        assert!(base64_decode("Zm9").is_err());
        assert!(base64_decode("Zm=v").is_err());
        assert!(base64_decode("Zg==Zg==").is_err());
        assert!(base64_decode("Z===").is_err());
        assert!(base64_decode("Zm9v\n").is_err());
        assert!(base64_decode("Zm-v").is_err());
    }

    #[test]
    fn hex() {
        assert_eq!(hex_encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(hex_decode("00ABff").unwrap(), vec![0, 0xab, 0xff]);
        assert!(hex_decode("abc").is_err());
        assert!(hex_decode("zz").is_err());
    }

    #[test]
    fn hex_refuses_signs_and_spaces() {
        // u8::from_str_radix takes a leading '+': "+f+a" must not decode to 0f 0a.
        for bad in ["+f+a", "+f", "-1", " f", "f ", "0x", "é"] {
            assert!(hex_decode(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn base64_refuses_non_canonical_trailing_bits() {
        // "QQ==" is 'A'; "QR==" sets bits that padding discards: two spellings
        // of one value, which a strict parser of a signed-off format refuses.
        assert_eq!(base64_decode("QQ==").unwrap(), b"A");
        assert!(base64_decode("QR==").is_err());
    }
}
