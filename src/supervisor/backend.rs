//! The seam between the supervisor's decisions and the machine: every operation
//! that touches the vault's mapping, mount, services or keyring, one method each,
//! so the lock and unlock sequences in [`super::machine`] are plain code that a
//! fake backend can record and fail on demand.
//!
//! This module defines the contract only; [`super::system`] implements it for real.

use crate::secret::SecretBytes;
use std::fmt;

/// What is true of the vault right now, as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reality {
    /// The dm-crypt mapping exists (the volume key is in the kernel).
    pub mapping_active: bool,
    /// The vault's filesystem is mounted at its mount point.
    pub mounted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// No keyslot accepts the passphrase: counts towards the lockout.
    WrongPassphrase,
    /// The mount point is in use; nothing was unmounted.
    Busy { mount: String },
    /// Anything else, with the operation and the system's message.
    Failed { op: &'static str, msg: String },
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::WrongPassphrase => write!(f, "no keyslot accepts this passphrase"),
            BackendError::Busy { mount } => write!(
                f,
                "{mount} is busy: a process still has files open there (find it with `fuser -vm {mount}`)"
            ),
            BackendError::Failed { op, msg } => write!(f, "{op}: {msg}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// The vault's edges. Each method does one thing and reports honestly; the order
/// and the rollbacks are decided by the caller.
pub trait VaultBackend: Send {
    /// Is the mapping active, is the filesystem mounted?
    fn probe(&mut self) -> Result<Reality, BackendError>;
    /// `systemctl stop UNIT`, returning once it has stopped.
    fn stop_service(&mut self, unit: &str) -> Result<(), BackendError>;
    /// `systemctl start UNIT`.
    fn start_service(&mut self, unit: &str) -> Result<(), BackendError>;
    /// Flush the vault's filesystem.
    fn sync(&mut self) -> Result<(), BackendError>;
    /// Unmount the vault; [`BackendError::Busy`] if it is in use.
    fn unmount(&mut self) -> Result<(), BackendError>;
    /// Remove the dm-crypt mapping (dm-crypt wipes its key).
    fn close_mapping(&mut self) -> Result<(), BackendError>;
    /// Revoke any of the vault's volume keys left in kernel keyrings; returns how many.
    fn revoke_keys(&mut self) -> Result<usize, BackendError>;
    /// Open the mapping with a passphrase; [`BackendError::WrongPassphrase`] when no
    /// keyslot accepts it, [`BackendError::Failed`] for device trouble.
    fn activate(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError>;
    /// Check `passphrase` against the vault's keyslots without activating anything
    /// (for an unlock while the mapping is already open);
    /// [`BackendError::WrongPassphrase`] when no keyslot accepts it.
    fn verify_passphrase(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError>;
    /// Mount the opened mapping at the vault's mount point.
    fn mount(&mut self) -> Result<(), BackendError>;
    /// While locked: is there a vault to open at all? Only asked when the mapping
    /// is closed; the default (a backend that cannot tell) says it is there.
    fn presence(&mut self) -> Presence {
        Presence::Ready
    }
}

/// Whether a locked vault could be opened, as far as the device shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Ready,
    /// The configured device is not there (`not_available`); the detail says why.
    Absent(&'static str),
    /// There is no vault to open yet (`setup_required`); the detail says why.
    NoVault(&'static str),
}
