//! The audit chain anchored in the TPM: every entry's hash is extended into a TPM
//! NV index of type EXTEND (created at enrolment), whose value only ever moves
//! forward. Root can still edit the file and recompute the hash chain, but not
//! make the TPM's value match a rewritten history: `audit verify --tpm` replays
//! the log's entry hashes and names the verdict.
//!
//! **The write path.** An entry is appended and fsynced first, then extended. A
//! power cut (or kill -9) between the two leaves the TPM one append behind: the
//! log then replays to the TPM's value *at an earlier entry*, and everything up to
//! there is proven intact. That is told apart from tampering, where no prefix of
//! the log replays to the TPM's value at all (an anchored entry was edited,
//! removed or reordered, or the file was replaced or truncated). The supervisor
//! catches up at start: it extends the entries the TPM missed and records that it
//! did (`anchor_caught_up`), so one power cut does not leave a permanent gap.
//!
//! What an anchor does not prove: entries appended later by someone who also
//! extends the index (root can extend); that is what the signed export shipped
//! off the machine is for. This module decides; [`Anchor`] is the TPM edge.

use sha2::{Digest, Sha256};
use std::fmt;

/// Why the anchor could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorError {
    /// No TPM, or no anchor index in it: nothing to keep in this run.
    Unavailable(String),
    /// A command failed; it may work next time.
    Failed(String),
}

impl fmt::Display for AnchorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnchorError::Unavailable(m) | AnchorError::Failed(m) => f.write_str(m),
        }
    }
}

/// The TPM side: an NV extend index.
pub trait Anchor {
    /// Extend the index with one entry hash.
    fn extend(&mut self, entry_hash: &[u8; 32]) -> Result<(), AnchorError>;
    /// The index's value; `None` while it was never extended.
    fn read(&mut self) -> Result<Option<[u8; 32]>, AnchorError>;
}

/// One extend step, as the TPM computes it: SHA-256(old || data). A never-written
/// index starts from 32 zero bytes.
pub fn extend_step(old: &[u8; 32], data: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(data);
    h.finalize().into()
}

/// What the TPM's value says about the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The TPM's value is the replay of every entry.
    Anchored { entries: usize },
    /// The first `anchored` entries replay to the TPM's value; the last `pending`
    /// were appended but never extended (a power cut or crash between the two
    /// when `pending` is small; otherwise written by something that did not extend).
    Behind { anchored: usize, pending: usize },
    /// The index was never extended, and the log has entries.
    NotStarted { entries: usize },
    /// No prefix of the log replays to the TPM's value.
    Mismatch { entries: usize },
}

/// Entries one append can write (a torn-write cut record and the entry itself):
/// a gap this small is what a power cut between append and extend leaves.
pub const ONE_APPEND: usize = 2;

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Anchored { entries } => write!(
                f,
                "all {entries} entries replay to the TPM's anchor: nothing anchored was rewritten"
            ),
            Verdict::Behind { anchored, pending } if *pending <= ONE_APPEND => write!(
                f,
                "the first {anchored} entries replay to the TPM's anchor; the last {pending} were \
                 written but not yet extended (a power cut or crash between the append and the \
                 extend, not tampering; the supervisor catches up at its next start)"
            ),
            Verdict::Behind { anchored, pending } => write!(
                f,
                "the first {anchored} entries replay to the TPM's anchor; the {pending} after \
                 them were never extended (written while the supervisor was not running, or \
                 by something other than vaultguard)"
            ),
            Verdict::NotStarted { entries } => write!(
                f,
                "the TPM's anchor was never extended ({entries} entries in the log): \
                 nothing to compare yet (the supervisor starts it)"
            ),
            Verdict::Mismatch { entries } => write!(
                f,
                "no prefix of the {entries} entries replays to the TPM's anchor: the log was \
                 rewritten, truncated or replaced after it was anchored"
            ),
        }
    }
}

impl Verdict {
    /// Is the log consistent with the TPM (everything anchored is intact)?
    pub fn intact(&self) -> bool {
        !matches!(self, Verdict::Mismatch { .. })
    }
}

/// Compare the log's entry hashes with the TPM's value.
pub fn judge<'a>(hashes: impl IntoIterator<Item = &'a [u8; 32]>, tpm: Option<[u8; 32]>) -> Verdict {
    let hashes: Vec<&[u8; 32]> = hashes.into_iter().collect();
    let n = hashes.len();
    let Some(want) = tpm else {
        return match n {
            0 => Verdict::Anchored { entries: 0 },
            _ => Verdict::NotStarted { entries: n },
        };
    };
    // Replay every prefix; the latest one matching wins (a later match would
    // need a SHA-256 collision).
    let mut v = [0u8; 32];
    let mut matched = None;
    for (i, h) in hashes.iter().enumerate() {
        v = extend_step(&v, h);
        if v == want {
            matched = Some(i + 1);
        }
    }
    match matched {
        Some(m) if m == n => Verdict::Anchored { entries: n },
        Some(m) => Verdict::Behind {
            anchored: m,
            pending: n - m,
        },
        None => Verdict::Mismatch { entries: n },
    }
}

/// What [`catch_up`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaughtUp {
    /// Nothing to do.
    InStep,
    /// Extended the last `extended` entries (the TPM was behind, or new).
    Extended { extended: usize, from_entry: usize },
    /// The log does not replay to the TPM's value: left alone as evidence.
    Mismatch,
}

/// Bring the TPM up to the log at the supervisor's start (see the module header):
/// extend what it missed, never anything before a mismatch.
pub fn catch_up<'a>(
    anchor: &mut dyn Anchor,
    hashes: impl IntoIterator<Item = &'a [u8; 32]>,
) -> Result<CaughtUp, AnchorError> {
    let hashes: Vec<&[u8; 32]> = hashes.into_iter().collect();
    let tpm = anchor.read()?;
    let from = match judge(hashes.iter().copied(), tpm) {
        Verdict::Anchored { .. } => return Ok(CaughtUp::InStep),
        Verdict::Mismatch { .. } => return Ok(CaughtUp::Mismatch),
        Verdict::Behind { anchored, .. } => anchored,
        Verdict::NotStarted { .. } => 0,
    };
    for h in &hashes[from..] {
        anchor.extend(h)?;
    }
    Ok(CaughtUp::Extended {
        extended: hashes.len() - from,
        from_entry: from + 1,
    })
}

/// An anchor in memory, for tests of the code above and of its callers.
#[derive(Debug, Default, Clone)]
pub struct MemoryAnchor {
    pub value: Option<[u8; 32]>,
    pub fail: bool,
}

impl Anchor for MemoryAnchor {
    fn extend(&mut self, entry_hash: &[u8; 32]) -> Result<(), AnchorError> {
        if self.fail {
            return Err(AnchorError::Failed("TPM busy".into()));
        }
        self.value = Some(extend_step(&self.value.unwrap_or([0; 32]), entry_hash));
        Ok(())
    }
    fn read(&mut self) -> Result<Option<[u8; 32]>, AnchorError> {
        if self.fail {
            return Err(AnchorError::Failed("TPM busy".into()));
        }
        Ok(self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> [u8; 32] {
        [i; 32]
    }

    fn anchored(hs: &[[u8; 32]]) -> MemoryAnchor {
        let mut a = MemoryAnchor::default();
        for x in hs {
            a.extend(x).unwrap();
        }
        a
    }

    #[test]
    fn the_verdicts() {
        let log = [h(1), h(2), h(3), h(4)];
        let a = anchored(&log);
        assert_eq!(judge(&log, a.value), Verdict::Anchored { entries: 4 });
        // A power cut after appending the 4th entry, before extending it.
        let a3 = anchored(&log[..3]);
        let v = judge(&log, a3.value);
        assert_eq!(
            v,
            Verdict::Behind {
                anchored: 3,
                pending: 1
            }
        );
        assert!(v.to_string().contains("power cut"), "{v}");
        assert!(v.intact());
        // An anchored entry edited (its hash changes), or removed, or reordered.
        for bad in [
            vec![h(1), h(9), h(3), h(4)],
            vec![h(1), h(3), h(4)],
            vec![h(2), h(1), h(3), h(4)],
            vec![h(1), h(2)],
        ] {
            let v = judge(&bad, a.value);
            assert!(matches!(v, Verdict::Mismatch { .. }), "{bad:?}: {v:?}");
            assert!(!v.intact());
        }
        // Many entries never extended: intact up to there, but not a power cut.
        let a1 = anchored(&log[..1]);
        let v = judge(&log, a1.value);
        assert!(!v.to_string().contains("power cut"), "{v}");
        assert_eq!(judge(&log, None), Verdict::NotStarted { entries: 4 });
        assert_eq!(judge(&[], None), Verdict::Anchored { entries: 0 });
    }

    #[test]
    fn catch_up_extends_what_the_tpm_missed_and_nothing_before_a_mismatch() {
        let log = [h(1), h(2), h(3)];
        let mut a = anchored(&log[..2]);
        assert_eq!(
            catch_up(&mut a, &log).unwrap(),
            CaughtUp::Extended {
                extended: 1,
                from_entry: 3
            }
        );
        assert_eq!(judge(&log, a.value), Verdict::Anchored { entries: 3 });
        assert_eq!(catch_up(&mut a, &log).unwrap(), CaughtUp::InStep);
        let before = a.value;
        let forged = [h(1), h(7), h(3)];
        assert_eq!(catch_up(&mut a, &forged).unwrap(), CaughtUp::Mismatch);
        assert_eq!(a.value, before, "a mismatch is left as evidence");
        let mut fresh = MemoryAnchor::default();
        assert_eq!(
            catch_up(&mut fresh, &log).unwrap(),
            CaughtUp::Extended {
                extended: 3,
                from_entry: 1
            }
        );
    }

    #[test]
    fn the_extend_step_is_sha256_of_old_and_new() {
        // SHA-256 over 64 zero bytes: the first extend of zeros onto a fresh index.
        assert_eq!(
            crate::audit::hex(&extend_step(&[0; 32], &[0; 32])),
            "f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"
        );
    }
}
