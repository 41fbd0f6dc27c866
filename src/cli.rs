//! Command-line types (argh). No behaviour lives here: `main.rs` dispatches each
//! command to the module that owns it.

use argh::FromArgs;
use std::path::PathBuf;

/// vaultguard: unlock the encrypted AI vault at boot (TPM2, passphrase fallback) and
/// lock it again when idle.
#[derive(FromArgs, Debug)]
pub struct Args {
    /// configuration file (default /etc/vaultguard/config.json)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,

    /// apply rd.vaultguard.* options from this kernel command line file
    /// (default: /proc/cmdline when running in the initramfs)
    #[argh(option)]
    pub cmdline: Option<PathBuf>,

    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Config(ConfigCmd),
    Version(VersionCmd),
}

/// check the configuration and print the effective settings as JSON
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config")]
pub struct ConfigCmd {}

/// print the version and the versions of the linked C libraries
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "version")]
pub struct VersionCmd {}
