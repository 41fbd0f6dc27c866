//! Strict JSON for files an attacker or a slip of the hand may have edited: an
//! object with the same key twice is refused. serde_json keeps the last value of
//! a repeated key silently, so `{"event":"lock","event":"unlock"}` would read as
//! one thing and be displayed (by `grep`, by an operator) as another.
//!
//! This module only checks; callers parse with serde_json as usual afterwards.

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeSet;
use std::fmt;

/// Refuse `text` if any object in it (at any depth) repeats a key; the error names
/// the key. Invalid JSON is reported as serde_json reports it.
pub fn check_no_duplicate_keys(text: &[u8]) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    NoDup.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

#[derive(Clone, Copy)]
struct NoDup;

impl<'de> DeserializeSeed<'de> for NoDup {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDup {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDup)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(A::Error::custom(format!("key `{key}` appears twice")));
            }
            map.next_value_seed(NoDup)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_named_at_any_depth() {
        assert!(check_no_duplicate_keys(br#"{"a":1,"b":[{"c":1,"d":{"e":2}}]}"#).is_ok());
        let e = check_no_duplicate_keys(br#"{"event":"lock","event":"unlock"}"#).unwrap_err();
        assert!(e.contains("`event` appears twice"), "{e}");
        let e = check_no_duplicate_keys(br#"{"a":[{"x":1,"y":2,"x":3}]}"#).unwrap_err();
        assert!(e.contains("`x`"), "{e}");
        // Escapes are decoded before comparing: "\u0061" is "a".
        assert!(check_no_duplicate_keys(br#"{"a":1,"\u0061":2}"#).is_err());
    }

    #[test]
    fn invalid_json_and_trailing_bytes_are_errors() {
        assert!(check_no_duplicate_keys(b"{").is_err());
        assert!(check_no_duplicate_keys(b"{} {}").is_err());
        assert!(check_no_duplicate_keys(b"[1,2,\"x\",null,true,1.5,-3]").is_ok());
    }
}
