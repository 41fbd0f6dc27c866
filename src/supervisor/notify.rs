//! sd_notify(3) for the supervisor: `READY=1` once the control socket is bound
//! and the state derived, `STATUS=vault <state> (<detail>)` when the state
//! changes, `STOPPING=1` on a clean stop.
//!
//! Written by hand rather than with a crate: the protocol is one datagram to the
//! path (or abstract `@name`) in `$NOTIFY_SOCKET`, a dozen lines on std. It never
//! sends on a timer (no `WATCHDOG=1`): the supervisor keeps zero idle wake-ups, so
//! the unit has no `WatchdogSec=`. Sending is best effort: systemd not listening
//! is no reason to stop guarding the vault.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where systemd listens for this service's notifications.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// The last `STATUS=` sent: a snapshot is published for every activity
    /// update too, and systemd needs only the changes.
    last_status: Option<String>,
}

impl Notifier {
    /// The notifier named by `$NOTIFY_SOCKET`, if set. The variable is removed,
    /// so that the services and tools the supervisor starts do not inherit it and
    /// notify on its behalf.
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        // Called before the event loop runs; removing a variable is only unsound
        // while another thread reads the environment, and none does here.
        std::env::remove_var("NOTIFY_SOCKET");
        match Notifier::to(&value) {
            Ok(n) => Some(n),
            Err(e) => {
                super::log_warn(&format!(
                    "NOTIFY_SOCKET={}: {e}; systemd will not hear that the supervisor is \
                     ready (check the unit's Type=notify)",
                    value.to_string_lossy()
                ));
                None
            }
        }
    }

    /// A notifier for `addr`: an absolute path, or `@name` for an abstract socket.
    pub fn to(addr: &OsStr) -> io::Result<Notifier> {
        let addr = parse_addr(addr.as_bytes())?;
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            sock,
            addr,
            last_status: None,
        })
    }

    /// Send one notification (newline-separated assignments). A failure is
    /// logged as a warning and otherwise ignored.
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            super::log_warn(&format!(
                "sd_notify `{}` not delivered: {e}",
                first_line(msg)
            ));
        }
    }

    /// `READY=1` with the current state.
    pub fn ready(&mut self, state: &str, detail: &str) {
        let status = status_line(state, detail);
        self.send(&format!("READY=1\n{status}"));
        self.last_status = Some(status);
    }

    /// `STATUS=` if it differs from the last one sent.
    pub fn status(&mut self, state: &str, detail: &str) {
        let status = status_line(state, detail);
        if self.last_status.as_deref() != Some(status.as_str()) {
            self.send(&status);
            self.last_status = Some(status);
        }
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}

fn first_line(msg: &str) -> &str {
    msg.lines().next().unwrap_or("")
}

/// `STATUS=vault <state> (<detail>)`, or without the parentheses when there is
/// no detail. Newlines would start a new assignment: they become spaces.
pub fn status_line(state: &str, detail: &str) -> String {
    let line = if detail.is_empty() {
        format!("STATUS=vault {state}")
    } else {
        format!("STATUS=vault {state} ({detail})")
    };
    line.replace('\n', " ")
}

fn parse_addr(raw: &[u8]) -> io::Result<SocketAddr> {
    match raw.first() {
        Some(b'/') => SocketAddr::from_pathname(OsStr::from_bytes(raw)),
        Some(b'@') if raw.len() > 1 => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&raw[1..])
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or an abstract `@name` (vsock addresses are not supported)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    #[test]
    fn status_names_state_and_detail_on_one_line() {
        assert_eq!(
            status_line("locked", "manual_lock"),
            "STATUS=vault locked (manual_lock)"
        );
        assert_eq!(status_line("unknown", ""), "STATUS=vault unknown");
        assert_eq!(status_line("error", "a\nb"), "STATUS=vault error (a b)");
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let p = parse_addr(b"/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = parse_addr(b"@vg-notify").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"vg-notify"[..]));
        for bad in [&b""[..], b"@", b"relative", b"vsock:2:1234"] {
            assert!(
                parse_addr(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn only_changes_of_status_are_sent() {
        let server = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(format!("vg-notify-unit-{}", std::process::id()))
                .unwrap(),
        )
        .unwrap();
        server.set_nonblocking(true).unwrap();
        let name = format!("@vg-notify-unit-{}", std::process::id());
        let mut n = Notifier::to(OsStr::new(&name)).unwrap();
        n.ready("unlocked", "tpm2_unseal");
        n.status("unlocked", "tpm2_unseal");
        n.status("locked", "manual_lock");
        n.stopping();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(len) = server.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1\nSTATUS=vault unlocked (tpm2_unseal)",
                "STATUS=vault locked (manual_lock)",
                "STOPPING=1"
            ]
        );
    }
}
