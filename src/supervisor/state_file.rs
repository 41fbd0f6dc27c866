//! The state file (`/run/vaultguard/state.json`, plus `vault.state_compat_path`):
//! a mirror of the supervisor's state for readers that cannot use the socket.
//!
//! It is replaced atomically ([`crate::atomic_file`]), so a reader sees the old or
//! the new content, never a mix. The supervisor never
//! *trusts* this file: at start it derives the state from the kernel and only
//! borrows the `detail` (how the vault was opened at boot, e.g. `tpm2_unseal`) when
//! the file agrees with what the kernel shows.

use serde::{Deserialize, Serialize};
use std::io;
use std::path::Path;

/// Where the supervisor mirrors its state (and where the boot path leaves its hint).
pub const DEFAULT_PATH: &str = "/run/vaultguard/state.json";

/// The file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub state: String,
    pub detail: String,
    /// Seconds since the epoch of the last activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<f64>,
    /// Seconds since the epoch at which the vault auto-locks, while unlocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_lock_at: Option<f64>,
    /// Seconds since the epoch until which unlocks are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockout_until: Option<u64>,
    /// Seconds since the epoch of this write.
    pub updated: f64,
}

/// Write `snapshot` to `path` atomically (mode 0644: readers need not be root).
pub fn write(path: &Path, snapshot: &Snapshot) -> io::Result<()> {
    let mut text = serde_json::to_vec(snapshot).map_err(io::Error::other)?;
    text.push(b'\n');
    crate::atomic_file::write_atomic(path, &text, 0o644, 0o755)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_state_file_is_0644_and_the_boot_hint_reads_it() {
        let dir = crate::testutil::TmpDir::new("statefile");
        let p = dir.join("state.json");
        let snap = Snapshot {
            state: "unlocked".into(),
            detail: "tpm2_unseal".into(),
            last_activity: None,
            auto_lock_at: Some(1.5),
            lockout_until: None,
            updated: 1.0,
        };
        write(&p, &snap).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // The boot path's reader takes the supervisor's file too.
        assert_eq!(
            crate::handoff::read_boot_hint(&p),
            Some(("unlocked".to_string(), "tpm2_unseal".to_string()))
        );
    }
}
