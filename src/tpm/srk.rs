//! The storage root key (SRK): the persistent handle it lives at, and the
//! serialized ESYS_TR that systemd stores in the token as `tpm2_srk`.
//!
//! `Esys_TR_Serialize` of a key is: TPM handle (u32), TPM2B_NAME, resource type
//! (u32, 1 = key), TPM2B_PUBLIC. Unlock checks it here (the SRK handle, a name
//! that is the digest of the public area) before deserializing it into the ESYS
//! context, which costs no TPM command; when an unseal fails, the recorded name is
//! compared with the live SRK's to say plainly that the TPM was swapped or cleared.

use super::marshal::{Reader, Truncated};
use std::fmt;

/// Where systemd and vaultguard keep the SRK (TCG provisioning guidance).
pub const SRK_HANDLE: u32 = 0x8100_0001;
const IESYSC_KEY_RSRC: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerializedKey {
    pub handle: u32,
    /// TPM2B_NAME contents: nameAlg (u16) followed by the digest of the public area.
    pub name: Vec<u8>,
    /// TPMT_PUBLIC (the contents of the TPM2B_PUBLIC).
    pub public: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SrkError {
    Truncated(&'static str),
    NotAKey(u32),
    TrailingBytes(usize),
    ForeignHandle(u32),
}

impl fmt::Display for SrkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SrkError::Truncated(what) => write!(f, "tpm2_srk is truncated (in {what})"),
            SrkError::NotAKey(t) => {
                write!(f, "tpm2_srk describes a resource of type {t}, not a key")
            }
            SrkError::TrailingBytes(n) => write!(f, "tpm2_srk has {n} unexpected trailing bytes"),
            SrkError::ForeignHandle(h) => write!(
                f,
                "tpm2_srk names handle 0x{h:08x}; only the SRK at 0x{SRK_HANDLE:08x} is accepted"
            ),
        }
    }
}

impl From<Truncated> for SrkError {
    fn from(t: Truncated) -> Self {
        SrkError::Truncated(t.0)
    }
}

impl SerializedKey {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(14 + self.name.len() + self.public.len());
        v.extend_from_slice(&self.handle.to_be_bytes());
        v.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&self.name);
        v.extend_from_slice(&IESYSC_KEY_RSRC.to_be_bytes());
        v.extend_from_slice(&(self.public.len() as u16).to_be_bytes());
        v.extend_from_slice(&self.public);
        v
    }

    /// Parse and check that it is the persistent SRK; anything else is refused, so
    /// a crafted header cannot make vaultguard salt its session to a key of the
    /// attacker's choosing.
    pub fn parse_srk(bytes: &[u8]) -> Result<SerializedKey, SrkError> {
        let mut r = Reader::new(bytes);
        let handle = r.u32("handle")?;
        let name = r.sized("name")?.to_vec();
        let kind = r.u32("resource type")?;
        if kind != IESYSC_KEY_RSRC {
            return Err(SrkError::NotAKey(kind));
        }
        let public = r.sized("public area")?.to_vec();
        if r.remaining() != 0 {
            return Err(SrkError::TrailingBytes(r.remaining()));
        }
        if name.len() < 2 {
            return Err(SrkError::Truncated("name"));
        }
        if handle != SRK_HANDLE {
            return Err(SrkError::ForeignHandle(handle));
        }
        Ok(SerializedKey {
            handle,
            name,
            public,
        })
    }

    /// Whether `name` is the TPM name of `public` (nameAlg, then the digest of the
    /// public area in that algorithm): only then does a name match on the TPM
    /// vouch for the public area recorded beside it.
    pub fn name_matches_public(&self) -> bool {
        use sha2::Digest;
        let (alg, digest) = self.name.split_at(2);
        let ours: Vec<u8> = match u16::from_be_bytes([alg[0], alg[1]]) {
            0x000B => sha2::Sha256::digest(&self.public).to_vec(),
            0x000C => sha2::Sha384::digest(&self.public).to_vec(),
            0x000D => sha2::Sha512::digest(&self.public).to_vec(),
            _ => return false,
        };
        ours == digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SerializedKey {
        SerializedKey {
            handle: SRK_HANDLE,
            name: [vec![0x00, 0x0b], vec![0xab; 32]].concat(),
            public: vec![0x00, 0x23, 0x00, 0x0b, 1, 2, 3],
        }
    }

    #[test]
    fn the_name_must_be_the_digest_of_the_public_area() {
        use sha2::Digest;
        let mut k = sample();
        assert!(!k.name_matches_public());
        k.name = [vec![0x00, 0x0b], sha2::Sha256::digest(&k.public).to_vec()].concat();
        assert!(k.name_matches_public());
        k.public[4] ^= 1;
        assert!(!k.name_matches_public());
        k.name = [vec![0x00, 0x04], vec![0; 20]].concat(); // SHA-1 names are not trusted
        assert!(!k.name_matches_public());
    }

    #[test]
    fn round_trip() {
        let k = sample();
        let b = k.to_bytes();
        assert_eq!(&b[..4], &[0x81, 0, 0, 1]);
        assert_eq!(SerializedKey::parse_srk(&b).unwrap(), k);
    }

    #[test]
    fn rejects_foreign_handles_and_damage() {
        let mut k = sample();
        k.handle = 0x8100_0002;
        assert_eq!(
            SerializedKey::parse_srk(&k.to_bytes()),
            Err(SrkError::ForeignHandle(0x8100_0002))
        );
        k.handle = 0x4000_0001; // the owner hierarchy handle is not a key
        assert!(SerializedKey::parse_srk(&k.to_bytes()).is_err());

        let b = sample().to_bytes();
        for cut in [0, 3, 5, 40, b.len() - 1] {
            assert!(
                matches!(
                    SerializedKey::parse_srk(&b[..cut]),
                    Err(SrkError::Truncated(_))
                ),
                "cut {cut}"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            SerializedKey::parse_srk(&long),
            Err(SrkError::TrailingBytes(1))
        );
        let mut nv = b.clone();
        let at = 4 + 2 + 34;
        nv[at..at + 4].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(SerializedKey::parse_srk(&nv), Err(SrkError::NotAKey(2)));
    }
}
