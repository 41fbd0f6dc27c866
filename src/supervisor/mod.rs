//! The after-boot supervisor (SPEC §2): `vaultguard supervise`.
//!
//! One process, one thread, event-driven: it derives the vault's state from the
//! kernel at start, serves the control socket, locks the vault after
//! `vault.auto_lock_timeout` minutes without activity, enforces the failed-unlock
//! lockout and audits every lock, unlock and refusal.
//!
//! Layout: [`machine`] decides (state, sequences, authorisation), [`idle`] and
//! [`lockout`] are its pure policies, [`event_loop`] owns sockets, timers and
//! clients, [`backend`] is the seam to the machine and [`system`] the real edge
//! behind it, [`state_file`] mirrors the state, [`activity`] watches the activity
//! file. This module never holds a passphrase longer than one request and never
//! locks or unlocks because it is started or stopped.

pub mod activity;
pub mod backend;
pub mod event_loop;
pub mod idle;
pub mod lockout;
pub mod machine;
pub mod metrics;
pub mod mount_check;
pub mod notify;
pub mod state_file;
pub mod system;
pub mod tpm_anchor;

pub use backend::{BackendError, Presence, Reality, VaultBackend};
pub use event_loop::{Handle, Options, Supervisor};
pub use machine::{LockReason, Machine, Now, VaultState};

use crate::config::Config;
use std::fmt;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug)]
pub enum SupervisorError {
    Socket {
        path: PathBuf,
        err: std::io::Error,
    },
    AlreadyRunning {
        path: PathBuf,
    },
    Sys {
        what: &'static str,
        err: std::io::Error,
    },
    /// Roles, grants or the token file refused at start (the message names it).
    Access(String),
}

impl fmt::Display for SupervisorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SupervisorError::Socket { path, err } => {
                write!(f, "control socket {}: {err}", path.display())
            }
            SupervisorError::AlreadyRunning { path } => write!(
                f,
                "another supervisor is already serving {} (`systemctl status vaultguard-supervisor`)",
                path.display()
            ),
            SupervisorError::Sys { what, err } => write!(f, "{what} failed: {err}"),
            SupervisorError::Access(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for SupervisorError {}

/// `vaultguard supervise`: the real backend, SIGTERM/SIGINT/SIGHUP as a clean stop.
/// `auto_lock` overrides `vault.auto_lock_timeout` (whole minutes) when given.
pub fn run_system(cfg: &Config, auto_lock: Option<Duration>) -> Result<(), SupervisorError> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    crate::secret::harden_process();
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    // Blocked before anything else runs, so the signals queue on the signalfd.
    mask.thread_block().map_err(|e| SupervisorError::Sys {
        what: "sigprocmask",
        err: e.into(),
    })?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(
        |e| SupervisorError::Sys {
            what: "signalfd",
            err: e.into(),
        },
    )?;
    // The boot unlock ran in the initramfs before the real audit log was mounted.
    match crate::audit::import(Path::new(crate::handoff::INITRD_AUDIT), &cfg.audit.path) {
        Ok(0) => {}
        Ok(n) => log_info(&format!("took over {n} audit entries from the initramfs")),
        Err(e) => log_warn(&format!("initramfs audit entries not taken over: {e}")),
    }
    // What may have kept the boot from mounting the vault, said once (errors <3>,
    // warnings <4>); the supervisor starts either way, so the operator can fix it.
    let fstab = std::fs::read_to_string("/etc/fstab").ok();
    for (priority, line) in mount_check::problems(&cfg.vault, fstab.as_deref()) {
        log(priority, &line);
    }
    let backend = Box::new(system::SystemBackend::new(&cfg.vault));
    let opts = Options {
        auto_lock_override: auto_lock,
        state_file: cfg.vault.state_path.clone(),
        release_image_when_idle: true,
        ..Options::default()
    };
    let sup = Supervisor::new(cfg, backend, opts)?;
    let sup = sup.stop_on(std::os::fd::OwnedFd::from(sfd));
    sup.run()
}

/// Log lines go to stderr, with a journald priority when stderr is the journal
/// ([`crate::log`]).
pub(crate) fn log(priority: crate::log::Priority, msg: &str) {
    crate::log::log(priority, msg);
}

pub(crate) fn log_info(msg: &str) {
    crate::log::info(msg);
}

pub(crate) fn log_warn(msg: &str) {
    crate::log::warn(msg);
}
