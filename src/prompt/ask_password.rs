//! systemd's password agent protocol (ask-password): a request file in
//! /run/systemd/ask-password names a datagram socket; an agent (console, Plymouth,
//! `systemd-tty-ask-password-agent`) sends `+<passphrase>` or `-` there. Only
//! answers from root are accepted (SO_PASSCRED). The request carries what systemd's
//! carries: `Id=cryptsetup:<device>` (agents such as clevis-luks-askpass match on
//! it), `AcceptCached=`, `Echo=`/`Silent=` for the echo mode and `NotAfter=` (a
//! CLOCK_MONOTONIC time in µs) for the timeout, which we also enforce ourselves.

use super::{Ask, Echo, PromptError, Prompter, MAX_SECRET};
use crate::secret::SecretBytes;
use nix::sys::socket::{
    bind, recvmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use std::io::{IoSliceMut, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const DIR: &str = "/run/systemd/ask-password";

/// Use the agent protocol when systemd's directory exists and no human sits at
/// our stdin (a service, or the initrd's cryptsetup stage).
pub fn available() -> bool {
    Path::new(DIR).is_dir() && !rustix::termios::isatty(std::io::stdin())
}

pub struct AskPassword {
    dir: PathBuf,
}

impl AskPassword {
    pub fn new() -> AskPassword {
        AskPassword {
            dir: PathBuf::from(DIR),
        }
    }

    /// For tests: a different directory in place of /run/systemd/ask-password.
    pub fn in_dir(dir: &Path) -> AskPassword {
        AskPassword {
            dir: dir.to_path_buf(),
        }
    }
}

impl Default for AskPassword {
    fn default() -> Self {
        AskPassword::new()
    }
}

/// Removes the request and socket files however `ask` ends.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn unique(tag: &str) -> String {
    let mut r = [0u8; 8];
    if crate::secret::fill_random(&mut r).is_err() {
        // Not a secret, only a name that must not collide: without the RNG, the
        // process id and a counter keep it unique.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return format!("{tag}.{}-{n}", std::process::id());
    }
    format!("{tag}.{}", crate::encoding::hex_encode(&r))
}

/// The request file's contents. `Message` must stay on one line. `not_after` is
/// the CLOCK_MONOTONIC deadline in µs, 0 for none.
pub fn request_text(pid: u32, socket: &Path, req: &Ask, not_after: u64) -> String {
    let clean = |s: &str| s.replace(['\n', '\r'], " ");
    // systemd: Echo=1 shows the characters, Silent=1 shows nothing, neither: `*`.
    let (echo, silent) = match req.echo {
        Echo::On => (1, 0),
        Echo::Masked => (0, 0),
        Echo::Off => (0, 1),
    };
    // An empty id is left out, as systemd leaves it out (its TPM2 PIN requests).
    let id = if req.id.is_empty() {
        String::new()
    } else {
        format!("Id={}\n", clean(&req.id))
    };
    format!(
        "[Ask]\nPID={pid}\nSocket={}\nAcceptCached={}\nEcho={echo}\nSilent={silent}\nNotAfter={not_after}\nMessage={}\n{id}Icon=drive-harddisk\n",
        socket.display(),
        u8::from(req.accept_cached),
        clean(&req.message),
    )
}

/// CLOCK_MONOTONIC now, in µs (the clock of `NotAfter=`).
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

impl Prompter for AskPassword {
    fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError> {
        let io = |e: nix::Error| PromptError::Io(std::io::Error::from(e));
        let sock_path = self.dir.join(unique("sck"));
        let ask_path = self.dir.join(unique("ask"));
        let tmp_path = self.dir.join(unique("tmp"));
        let _cleanup = Cleanup(vec![sock_path.clone(), ask_path.clone(), tmp_path.clone()]);

        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io)?;
        bind(fd.as_raw_fd(), &UnixAddr::new(&sock_path).map_err(io)?).map_err(io)?;
        setsockopt(&fd, sockopt::PassCred, &true).map_err(io)?;

        // Agents watch for `ask.*` with inotify: the file must appear complete.
        let deadline = req.timeout.map(|t| (std::time::Instant::now() + t, t));
        let not_after = req
            .timeout
            .map_or(0, |t| monotonic_usec().saturating_add(t.as_micros() as u64));
        let text = request_text(std::process::id(), &sock_path, req, not_after);
        let mut f = std::fs::File::create(&tmp_path).map_err(PromptError::Io)?;
        f.write_all(text.as_bytes()).map_err(PromptError::Io)?;
        f.sync_all().map_err(PromptError::Io)?;
        std::fs::rename(&tmp_path, &ask_path).map_err(PromptError::Io)?;

        loop {
            if let Some((at, total)) = deadline {
                use rustix::event::{poll, PollFd, PollFlags};
                let left = at.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(PromptError::Timeout(total));
                }
                let wait = rustix::time::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                };
                let mut fds = [PollFd::new(&fd, PollFlags::IN)];
                match poll(&mut fds, Some(&wait)) {
                    Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                    Ok(_) => {}
                    Err(e) => return Err(PromptError::Io(e.into())),
                }
            }
            let mut buf = SecretBytes::zeroed(MAX_SECRET + 2);
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let (len, uid) = {
                let mut iov = [IoSliceMut::new(buf.as_mut_bytes())];
                let msg = recvmsg::<UnixAddr>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                )
                .map_err(io)?;
                let uid = msg.cmsgs().map_err(io)?.find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(cred) => Some(cred.uid()),
                    _ => None,
                });
                (msg.bytes, uid)
            };
            if uid != Some(0) {
                continue; // not from a root agent: ignore
            }
            match buf.as_bytes().first() {
                Some(b'+') if len <= MAX_SECRET + 1 => {
                    // The reply may be a NUL-separated list (systemd's agents send
                    // one answer, some with a trailing NUL): the first is the answer.
                    let answer = &buf.as_bytes()[1..len];
                    let end = answer.iter().position(|&b| b == 0).unwrap_or(answer.len());
                    return Ok(SecretBytes::from_slice(&answer[..end]));
                }
                Some(b'+') => return Err(PromptError::TooLong),
                Some(b'-') => return Err(PromptError::Cancelled),
                _ => continue,
            }
        }
    }

    fn say(&mut self, line: &str) {
        self.say_at(crate::log::Priority::Info, line)
    }
    fn say_at(&mut self, priority: crate::log::Priority, line: &str) {
        // Under systemd our stderr goes to the journal and the console.
        crate::log::say(priority, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::SecretKind;
    use nix::sys::socket::{sendto, MsgFlags as F};

    #[test]
    fn request_file_shape() {
        let mut req = Ask::new(
            SecretKind::Passphrase,
            "cryptsetup:/dev/vdb",
            "Pass\nword for v",
        );
        let t = request_text(42, Path::new("/run/x/sck.1"), &req, 0);
        assert!(t.starts_with("[Ask]\nPID=42\nSocket=/run/x/sck.1\n"));
        assert!(
            t.contains("\nAcceptCached=0\nEcho=0\nSilent=1\nNotAfter=0\n"),
            "{t}"
        );
        assert!(t.contains("Message=Pass word for v\n"));
        assert!(t.contains("Id=cryptsetup:/dev/vdb\n"));
        req.accept_cached = true;
        req.echo = Echo::Masked;
        let t = request_text(42, Path::new("/run/x/sck.1"), &req, 123_000_000);
        assert!(
            t.contains("\nAcceptCached=1\nEcho=0\nSilent=0\nNotAfter=123000000\n"),
            "{t}"
        );
        req.echo = Echo::On;
        let t = request_text(42, Path::new("/run/x/sck.1"), &req, 0);
        assert!(t.contains("\nEcho=1\nSilent=0\n"), "{t}");
        let pin = Ask::new(SecretKind::Pin, "", "TPM2 PIN for v: ");
        let t = request_text(42, Path::new("/run/x/sck.1"), &pin, 0);
        assert!(!t.contains("Id="), "{t}");
    }

    #[test]
    fn nobody_answering_within_the_timeout_is_a_timeout() {
        let dir = crate::testutil::TmpDir::new("ask-timeout");
        let mut req = Ask::new(SecretKind::Passphrase, "cryptsetup:/dev/vdb", "m");
        req.timeout = Some(std::time::Duration::from_millis(300));
        let start = std::time::Instant::now();
        let r = AskPassword::in_dir(&dir).ask(&req);
        assert!(matches!(r, Err(PromptError::Timeout(t)) if t.as_millis() == 300));
        assert!(start.elapsed() >= std::time::Duration::from_millis(300));
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("timeout="), "{msg}");
        // request and socket files are gone afterwards
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    /// A fake agent: waits for the request, reads its socket path, answers.
    fn agent(dir: PathBuf, answer: &'static [u8]) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            for _ in 0..500 {
                if let Some(ask) = std::fs::read_dir(&dir)
                    .unwrap()
                    .filter_map(Result::ok)
                    .find(|e| e.file_name().to_string_lossy().starts_with("ask."))
                {
                    let text = std::fs::read_to_string(ask.path()).unwrap();
                    let sock = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Socket="))
                        .unwrap()
                        .to_string();
                    let fd = socket(
                        AddressFamily::Unix,
                        SockType::Datagram,
                        SockFlag::empty(),
                        None,
                    )
                    .unwrap();
                    sendto(
                        fd.as_raw_fd(),
                        answer,
                        &UnixAddr::new(sock.as_str()).unwrap(),
                        F::empty(),
                    )
                    .unwrap();
                    return text;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("no request appeared");
        })
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: run `cargo test --features root-tests` as root"
    )]
    fn answer_and_cancel_through_the_protocol() {
        // The fake agent is a thread of this process, and only root's answers count.
        assert!(
            nix::unistd::geteuid().is_root(),
            "root tier: an agent's answer is accepted only from uid 0; run as root"
        );
        let dir = crate::testutil::TmpDir::new("ask");
        let a = agent(dir.to_path_buf(), b"+s3cret");
        let got = AskPassword::in_dir(&dir)
            .ask(&Ask::new(
                SecretKind::Passphrase,
                "cryptsetup:v",
                "Passphrase for v",
            ))
            .unwrap();
        assert_eq!(got.as_bytes(), b"s3cret");
        assert!(a.join().unwrap().contains("Message=Passphrase for v"));
        let a = agent(dir.to_path_buf(), b"-");
        assert!(matches!(
            AskPassword::in_dir(&dir).ask(&Ask::new(SecretKind::Passphrase, "i", "m")),
            Err(PromptError::Cancelled)
        ));
        a.join().unwrap();
        // request and socket files are gone afterwards
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}
