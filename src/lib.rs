//! vaultguard: the boot-time guard of an encrypted AI vault.
//!
//! In the initramfs it unseals a TPM2 PCR-sealed key, opens the LUKS2 vault with it
//! through the kernel keyring and falls back to a passphrase; after boot it supervises
//! idle time, locks the vault and serves a small JSON control socket. `main.rs` only
//! dispatches; each module below owns one real thing.

pub mod atomic_file;
pub mod audit;
pub mod boot;
pub mod clevis;
pub mod cli;
pub mod config;
pub mod control;
pub mod encoding;
pub mod exit;
pub mod generator;
pub mod handoff;
pub mod json;
pub mod keyring;
pub mod log;
pub mod luks;
pub mod policy_cli;
pub mod predict_cli;
pub mod prompt;
pub mod secret;
pub mod supervisor;
pub mod tpm;

#[cfg(test)]
mod testutil;
