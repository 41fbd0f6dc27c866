//! The exit statuses of every vaultguard command, in one place, and the one JSON
//! shape of a failure (`--json`).
//!
//! Scripts branch on these numbers, so they are part of the interface (README,
//! "Exit statuses"): 0 ok, 1 error, 2 usage, 3 supervisor not running, 4 locked
//! out, 5 TPM refused. An error is classified by what it is, never by its text.

use crate::boot::{BootError, TpmRefusal};
use crate::control::client::ClientError;
use crate::tpm::TpmError;
use std::error::Error;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// Anything that failed and is none of the below.
    Error = 1,
    /// The command line or an option cannot be used as given.
    Usage = 2,
    /// No supervisor answers on the control socket.
    NoSupervisor = 3,
    /// Refused because of too many failed attempts (the supervisor's lockout, or
    /// the TPM's dictionary-attack lockout).
    LockedOut = 4,
    /// The TPM refused to unseal (PCRs changed, wrong PIN, no TPM, ...).
    TpmRefused = 5,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// An error that carries its exit status (usage errors, and outcomes that are
/// failures without an error value, such as `unlock --test` refusals).
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub msg: String,
}

impl Failure {
    pub fn new(exit: Exit, msg: impl Into<String>) -> Failure {
        Failure {
            exit,
            msg: msg.into(),
        }
    }
    pub fn usage(msg: impl Into<String>) -> Failure {
        Failure::new(Exit::Usage, msg)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl Error for Failure {}

fn of_tpm(e: &TpmError) -> Exit {
    match e {
        TpmError::Lockout { .. } => Exit::LockedOut,
        _ => Exit::TpmRefused,
    }
}

/// Why the TPM did not open a volume, as an exit status.
pub fn of_refusal(r: &TpmRefusal) -> Exit {
    match r {
        TpmRefusal::Tpm(e) | TpmRefusal::Unavailable(e) => of_tpm(e),
        _ => Exit::TpmRefused,
    }
}

/// The exit status of an error.
pub fn classify(e: &(dyn Error + 'static)) -> Exit {
    if let Some(f) = e.downcast_ref::<Failure>() {
        return f.exit;
    }
    if let Some(b) = e.downcast_ref::<BootError>() {
        return match b {
            BootError::BadArgument(_) | BootError::NoDevice | BootError::Option(_) => Exit::Usage,
            BootError::TokenOnly(r) | BootError::TestRefused(r) => of_refusal(r),
            BootError::Tpm(t) => of_tpm(t),
            _ => Exit::Error,
        };
    }
    if let Some(c) = e.downcast_ref::<ClientError>() {
        return match c {
            ClientError::Connect { err, .. }
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Exit::NoSupervisor
            }
            _ => Exit::Error,
        };
    }
    Exit::Error
}

/// The one JSON object a failed command prints on stdout with `--json`.
pub fn json_error(msg: &str, exit: Exit) -> String {
    serde_json::json!({"success": false, "error": msg, "exit": exit.code()}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_failure_has_its_status() {
        let tpm = |e| BootError::TokenOnly(TpmRefusal::Tpm(e));
        let cases: Vec<(Box<dyn Error>, Exit)> = vec![
            (Box::new(Failure::usage("x")), Exit::Usage),
            (Box::new(BootError::NoDevice), Exit::Usage),
            (
                Box::new(tpm(TpmError::Lockout {
                    recovery_seconds: None,
                })),
                Exit::LockedOut,
            ),
            (
                Box::new(tpm(TpmError::PcrMismatch {
                    changed: vec![7],
                    bound: vec![7],
                    phase: None,
                })),
                Exit::TpmRefused,
            ),
            (
                Box::new(ClientError::Connect {
                    socket: "/run/x".into(),
                    err: std::io::ErrorKind::NotFound.into(),
                }),
                Exit::NoSupervisor,
            ),
            (
                Box::new(ClientError::Connect {
                    socket: "/run/x".into(),
                    err: std::io::ErrorKind::PermissionDenied.into(),
                }),
                Exit::Error,
            ),
            (Box::new(BootError::PinMismatch), Exit::Error),
        ];
        for (e, want) in cases {
            assert_eq!(classify(e.as_ref()), want, "{e}");
        }
    }

    #[test]
    fn the_json_error_parses_and_carries_the_status() {
        let line = json_error("cannot \"open\"\n", Exit::NoSupervisor);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["exit"], 3);
        assert_eq!(v["error"], "cannot \"open\"\n");
        assert!(!line.contains('\n'));
    }
}
