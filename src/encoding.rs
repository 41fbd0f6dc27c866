//! Base64 (RFC 4648, standard alphabet, padded, as systemd writes it) and hex.
//!
//! Written here rather than pulled in as a crate: about eighty lines, and secret
//! inputs (the sealed secret becomes a keyslot passphrase) can be encoded straight
//! into a [`SecretBytes`] without an intermediate `String` that would not be wiped.

use crate::secret::SecretBytes;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn encode_into(input: &[u8], mut push: impl FnMut(u8)) {
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        push(ALPHABET[(n >> 18) as usize & 63]);
        push(ALPHABET[(n >> 12) as usize & 63]);
        push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63]
        } else {
            b'='
        });
        push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63]
        } else {
            b'='
        });
    }
}

fn encoded_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

pub fn base64_encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(encoded_len(input.len()));
    encode_into(input, |c| out.push(c as char));
    out
}

/// Base64 of a secret, itself a secret.
pub fn base64_encode_secret(input: &[u8]) -> SecretBytes {
    let mut out = SecretBytes::with_capacity(encoded_len(input.len()));
    encode_into(input, |c| {
        out.push(c);
    });
    out
}

fn decode_char(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Strict decoder: padding required, whitespace (which systemd's JSON never has) and
/// stray characters refused.
pub fn base64_decode(input: &str) -> Result<Vec<u8>, String> {
    let bytes = input.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err("base64 length is not a multiple of 4".into());
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, quad) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err("misplaced base64 padding".into());
        }
        let mut n = 0u32;
        for (j, &c) in quad.iter().enumerate() {
            let v = if j >= 4 - pad {
                0
            } else {
                decode_char(c).ok_or_else(|| format!("invalid base64 character {:?}", c as char))?
            };
            n = (n << 6) | v;
        }
        out.push((n >> 16) as u8);
        if pad < 2 {
            out.push((n >> 8) as u8);
        }
        if pad < 1 {
            out.push(n as u8);
        }
    }
    Ok(out)
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

pub fn hex_decode(input: &str) -> Result<Vec<u8>, String> {
    if input.len() % 2 != 0 {
        return Err("hex string has an odd length".into());
    }
    input
        .as_bytes()
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).map_err(|_| "non-ASCII in hex string".to_string())?;
            u8::from_str_radix(s, 16).map_err(|_| format!("invalid hex digits {s:?}"))
        })
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
}
