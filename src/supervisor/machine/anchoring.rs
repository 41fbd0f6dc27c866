//! The shell's half of the TPM audit anchor ([`crate::audit::anchor`]): after each
//! append, extend what was written; at start, and whenever the log moved without
//! us (another writer appended, an extend failed),
//! replay the log and catch the TPM up instead, so the index is never extended on
//! top of a gap (that would read as tampering). A mismatch found at start stops
//! anchoring: extending on top of it would change nothing, and the TPM's value is
//! kept as the evidence.

use crate::audit::anchor::{catch_up, Anchor, AnchorError, CaughtUp};
use crate::audit::{self, digest_of_hex, Appended};
use std::path::Path;

/// What the shell should record after an anchoring step.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// Audit this (the event and its fields).
    Audit(&'static str, Vec<(&'static str, String)>),
    Warn(String),
    Info(String),
}

enum State {
    /// The last entry known to be extended.
    Tip(String),
    /// Unknown: replay before the next extend.
    Unsynced,
    /// No more anchoring in this run, and why.
    Stopped,
}

pub struct Anchoring {
    anchor: Box<dyn Anchor + Send>,
    state: State,
    /// Warned about the current run of failures already.
    warned: bool,
}

impl Anchoring {
    pub fn new(anchor: Box<dyn Anchor + Send>) -> Anchoring {
        Anchoring {
            anchor,
            state: State::Unsynced,
            warned: false,
        }
    }

    /// Replay the log at `log` and extend what the TPM missed.
    pub fn sync(&mut self, log: &Path) -> Vec<Note> {
        let verified = match audit::verify(log) {
            Ok(v) => v,
            Err(audit::AuditError::Io { err, .. })
                if err.kind() == std::io::ErrorKind::NotFound =>
            {
                return self.sync_hashes(&[], audit::GENESIS_HASH.to_string())
            }
            Err(e) => {
                self.state = State::Stopped;
                return vec![Note::Warn(format!(
                    "audit anchor not kept: the log does not verify ({e})"
                ))];
            }
        };
        if let Some(missing) = &verified.missing_predecessor {
            self.state = State::Stopped;
            return vec![Note::Warn(format!(
                "audit anchor not kept: segment {missing} is not here, so the log cannot be \
                 replayed against the TPM"
            ))];
        }
        let hashes: Vec<[u8; 32]> = verified.entry_hashes().copied().collect();
        let tip = verified.last_hash().to_string();
        self.sync_hashes(&hashes, tip)
    }

    /// `tip`: the last entry's hash (the genesis hash for an empty log).
    fn sync_hashes(&mut self, hashes: &[[u8; 32]], tip: String) -> Vec<Note> {
        match catch_up(self.anchor.as_mut(), hashes) {
            Ok(CaughtUp::InStep) => {
                self.state = State::Tip(tip);
                self.recovered()
            }
            Ok(CaughtUp::Extended {
                extended,
                from_entry,
            }) => {
                self.state = State::Tip(tip);
                let mut notes = self.recovered();
                notes.push(Note::Audit(
                    "anchor_caught_up",
                    vec![
                        ("extended", extended.to_string()),
                        ("from_entry", from_entry.to_string()),
                    ],
                ));
                notes
            }
            Ok(CaughtUp::Mismatch) => {
                self.state = State::Stopped;
                vec![
                    Note::Warn(
                        "the audit log does not replay to the TPM's anchor: it was rewritten, \
                         truncated or replaced (`vaultguard audit verify --tpm`); anchoring \
                         stops, the TPM's value is kept as evidence"
                            .into(),
                    ),
                    Note::Audit("anchor_mismatch", vec![]),
                ]
            }
            Err(e) => self.failed(e),
        }
    }

    /// After an append: extend its entries, or replay if the log moved without us.
    pub fn after_append(&mut self, log: &Path, a: &Appended) -> Vec<Note> {
        match &self.state {
            State::Stopped => Vec::new(),
            State::Tip(t) if *t == a.prev_hash => {
                for h in &a.hashes {
                    if let Err(e) = self.anchor.extend(&digest_of_hex(h)) {
                        return self.failed(e);
                    }
                }
                self.state = State::Tip(a.entry_hash.clone());
                self.recovered()
            }
            _ => self.sync(log),
        }
    }

    fn failed(&mut self, e: AnchorError) -> Vec<Note> {
        if let AnchorError::Unavailable(why) = e {
            self.state = State::Stopped;
            return vec![Note::Warn(format!(
                "audit entries are not anchored in the TPM: {why}"
            ))];
        }
        self.state = State::Unsynced;
        if std::mem::replace(&mut self.warned, true) {
            return Vec::new();
        }
        vec![Note::Warn(format!(
            "cannot extend the TPM's audit anchor ({e}); the entries are kept and extended \
             once the TPM answers again"
        ))]
    }

    fn recovered(&mut self) -> Vec<Note> {
        if std::mem::replace(&mut self.warned, false) {
            vec![Note::Info(
                "the TPM's audit anchor is extended again".into(),
            )]
        } else {
            Vec::new()
        }
    }
}
