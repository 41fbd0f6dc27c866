//! The one TPM2B reader and writer: big-endian integers and u16-length-prefixed
//! byte strings, as the TPM marshals TPM2B_* structures. Used for `tpm2-blob`
//! (TPM2B_PRIVATE then TPM2B_PUBLIC) and `tpm2_srk` (a serialized ESYS_TR).
//! Bounds-checked: input comes from a LUKS header anyone with root can write.

/// Where the input ended early: the field that did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated(pub &'static str);

/// A cursor over marshalled TPM data.
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Truncated> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(Truncated(what))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Truncated> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Truncated> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// A TPM2B: u16 length, then that many bytes.
    pub fn sized(&mut self, what: &'static str) -> Result<&'a [u8], Truncated> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.b.len() - self.at
    }
}

/// `bytes` as a TPM2B: u16 length prefix, then the bytes. Callers pass TPM
/// structures, which are far below 64 KiB.
pub fn sized(bytes: &[u8]) -> Vec<u8> {
    debug_assert!(bytes.len() <= u16::MAX as usize);
    let mut v = Vec::with_capacity(2 + bytes.len());
    v.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_sized_writes_and_stops_at_the_end() {
        let mut data = sized(b"abc");
        data.extend_from_slice(&sized(b""));
        data.extend_from_slice(&0x8100_0001u32.to_be_bytes());
        let mut r = Reader::new(&data);
        assert_eq!(r.sized("a").unwrap(), b"abc");
        assert_eq!(r.sized("b").unwrap(), b"");
        assert_eq!(r.u32("h").unwrap(), 0x8100_0001);
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u16("past the end"), Err(Truncated("past the end")));
    }

    #[test]
    fn a_length_beyond_the_input_is_truncation_not_a_panic() {
        // Claims 0xffff bytes, has 3.
        let mut r = Reader::new(&[0xff, 0xff, 1, 2, 3]);
        assert_eq!(r.sized("blob"), Err(Truncated("blob")));
        let mut r = Reader::new(&[0x00]);
        assert_eq!(r.sized("len"), Err(Truncated("len")));
        // Offsets near usize::MAX cannot wrap.
        let mut r = Reader::new(&[1, 2]);
        assert_eq!(r.take(usize::MAX, "huge"), Err(Truncated("huge")));
    }
}
