//! Asking a human for a passphrase or PIN: systemd's ask-password protocol when
//! running under systemd, else the console with echo off.
//!
//! Answers go straight into [`SecretBytes`]; nothing typed is ever echoed, logged
//! or kept after use. This module decides nothing about what the answer unlocks.

pub mod ask_password;

use crate::secret::SecretBytes;
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use zeroize::Zeroize;

/// Longest passphrase accepted (bytes); longer input is refused, not truncated.
pub const MAX_SECRET: usize = 1024;

#[derive(Debug)]
pub enum PromptError {
    /// Nobody can be asked (no console, no agent).
    NoTerminal(String),
    Io(std::io::Error),
    TooLong,
    /// The agent or the user cancelled; or the deadline passed.
    Cancelled,
}

impl fmt::Display for PromptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromptError::NoTerminal(why) => write!(f, "cannot ask for a passphrase: {why}"),
            PromptError::Io(e) => write!(f, "passphrase prompt failed: {e}"),
            PromptError::TooLong => write!(f, "input longer than {MAX_SECRET} bytes refused"),
            PromptError::Cancelled => write!(f, "passphrase prompt cancelled"),
        }
    }
}

impl std::error::Error for PromptError {}

/// What a secret is for: decides the wording, the cache and the credential that apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// A LUKS passphrase or recovery key for a volume.
    Passphrase,
    /// The TPM2 PIN of a volume's token.
    Pin,
    /// A new TPM2 PIN being chosen at enrolment.
    NewPin,
    /// The vault passphrase sent to the supervisor.
    Unlock,
}

/// How typed characters are shown (systemd-cryptsetup's `password-echo=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Echo {
    /// Nothing is shown (`password-echo=no`).
    Off,
    /// One `*` per character (`password-echo=masked`, systemd's default).
    #[default]
    Masked,
    /// The characters themselves (`password-echo=yes`).
    On,
}

/// One request for a secret.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The ask-password `Id=`; agents (plymouth, clevis-luks-askpass) match on it,
    /// so it follows systemd: `cryptsetup:<device path>`.
    pub id: String,
    /// The text shown.
    pub message: String,
    pub kind: SecretKind,
    /// The kernel keyring cache name (systemd's `cryptsetup`), or none.
    pub keyname: Option<String>,
    /// Whether a cached answer may be used (systemd's `AcceptCached=`).
    pub accept_cached: bool,
    /// How long to wait for an answer (crypttab's `timeout=`); none: forever.
    pub timeout: Option<std::time::Duration>,
    pub echo: Echo,
}

impl Ask {
    /// A request with no cache, no timeout and echo off.
    pub fn new(kind: SecretKind, id: impl Into<String>, message: impl Into<String>) -> Ask {
        Ask {
            id: id.into(),
            message: message.into(),
            kind,
            keyname: None,
            accept_cached: false,
            timeout: None,
            echo: Echo::Off,
        }
    }
}

/// Something that can ask for a secret and tell the operator one line.
pub trait Prompter {
    /// Ask for a secret. Returns `Err(Cancelled)` on EOF or cancel.
    fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError>;
    /// Show one line to the operator (status, reasons for a fallback).
    fn say(&mut self, line: &str);
}

/// The prompter for this environment: ask-password under systemd, else a terminal.
pub fn system_prompter(headless: bool) -> Box<dyn Prompter> {
    if headless {
        return Box::new(Headless);
    }
    if ask_password::available() {
        return Box::new(ask_password::AskPassword::new());
    }
    Box::new(Console::new())
}

/// Refuses to ask: for `headless` attaches and scripted runs.
pub struct Headless;

impl Prompter for Headless {
    fn ask(&mut self, _req: &Ask) -> Result<SecretBytes, PromptError> {
        Err(PromptError::NoTerminal("running headless".into()))
    }
    fn say(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

/// The controlling terminal, or /dev/console in an initramfs, with echo off.
pub struct Console {
    tty: Option<std::fs::File>,
}

impl Console {
    pub fn new() -> Console {
        Console { tty: None }
    }

    fn open(&mut self) -> Result<&mut std::fs::File, PromptError> {
        if self.tty.is_none() {
            let mut last = String::new();
            for path in ["/dev/tty", "/dev/console"] {
                match std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                {
                    Ok(f) if rustix::termios::isatty(&f) => {
                        self.tty = Some(f);
                        break;
                    }
                    Ok(_) => last = format!("{path} is not a terminal"),
                    Err(e) => last = format!("{path}: {e}"),
                }
            }
            if self.tty.is_none() {
                return Err(PromptError::NoTerminal(last));
            }
        }
        Ok(self.tty.as_mut().expect("opened above"))
    }
}

impl Default for Console {
    fn default() -> Self {
        Console::new()
    }
}

impl Prompter for Console {
    fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError> {
        let tty = self.open()?;
        write!(tty, "{}", req.message).map_err(PromptError::Io)?;
        tty.flush().map_err(PromptError::Io)?;
        let guard = EchoOff::new(tty.as_fd().try_clone_to_owned().map_err(PromptError::Io)?)?;
        let answer = read_line(tty);
        drop(guard);
        let _ = writeln!(tty);
        answer
    }

    fn say(&mut self, line: &str) {
        match self.open() {
            Ok(tty) => {
                let _ = writeln!(tty, "{line}");
            }
            Err(_) => eprintln!("{line}"),
        }
    }
}

/// Restores the terminal's modes when dropped, also on error paths.
struct EchoOff {
    fd: OwnedFd,
    saved: rustix::termios::Termios,
}

impl EchoOff {
    fn new(fd: OwnedFd) -> Result<EchoOff, PromptError> {
        use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
        let saved = tcgetattr(&fd).map_err(|e| PromptError::Io(e.into()))?;
        let mut t = saved.clone();
        t.local_modes.remove(LocalModes::ECHO);
        t.local_modes.insert(LocalModes::ICANON);
        tcsetattr(&fd, OptionalActions::Flush, &t).map_err(|e| PromptError::Io(e.into()))?;
        Ok(EchoOff { fd, saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            &self.fd,
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// Read one line (without its newline) into a secret, byte by byte so that no
/// buffered copy is left in a reader. EOF before any byte is a cancel.
pub fn read_line(r: &mut impl Read) -> Result<SecretBytes, PromptError> {
    let mut out = SecretBytes::with_capacity(MAX_SECRET);
    let mut byte = [0u8; 1];
    let mut seen_any = false;
    loop {
        match r.read(&mut byte) {
            Ok(0) if !seen_any => return Err(PromptError::Cancelled),
            Ok(0) => break,
            Ok(_) => {
                seen_any = true;
                match byte[0] {
                    b'\n' => break,
                    b'\r' => {}
                    b => {
                        if !out.push(b) {
                            byte.zeroize();
                            return Err(PromptError::TooLong);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PromptError::Io(e)),
        }
    }
    byte.zeroize();
    Ok(out)
}

/// Answers from a list, for tests and for `--passphrase-file`-style input.
pub struct Scripted {
    answers: std::collections::VecDeque<SecretBytes>,
    pub asked: Vec<String>,
    pub said: Vec<String>,
}

impl Scripted {
    pub fn new(answers: &[&str]) -> Scripted {
        Scripted {
            answers: answers
                .iter()
                .map(|a| SecretBytes::from_slice(a.as_bytes()))
                .collect(),
            asked: Vec::new(),
            said: Vec::new(),
        }
    }
}

impl Prompter for Scripted {
    fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError> {
        self.asked.push(format!("{}|{}", req.id, req.message));
        self.answers.pop_front().ok_or(PromptError::Cancelled)
    }
    fn say(&mut self, line: &str) {
        self.said.push(line.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_line_strips_newline_and_cr() {
        let mut r: &[u8] = b"hunter2\r\nrest";
        assert_eq!(read_line(&mut r).unwrap().as_bytes(), b"hunter2");
        let mut r: &[u8] = b"last";
        assert_eq!(read_line(&mut r).unwrap().as_bytes(), b"last");
        let mut r: &[u8] = b"";
        assert!(matches!(read_line(&mut r), Err(PromptError::Cancelled)));
        let mut r: &[u8] = b"\n";
        assert_eq!(read_line(&mut r).unwrap().len(), 0);
    }

    #[test]
    fn read_line_refuses_overlong_input() {
        let long = vec![b'a'; MAX_SECRET + 10];
        let mut r: &[u8] = &long;
        assert!(matches!(read_line(&mut r), Err(PromptError::TooLong)));
    }

    #[test]
    fn scripted_answers_in_order_then_cancels() {
        let mut p = Scripted::new(&["a", "b"]);
        let q = Ask::new(SecretKind::Passphrase, "x", "m");
        assert_eq!(p.ask(&q).unwrap().as_bytes(), b"a");
        assert_eq!(p.ask(&q).unwrap().as_bytes(), b"b");
        assert!(matches!(p.ask(&q), Err(PromptError::Cancelled)));
        assert_eq!(p.asked.len(), 3);
    }
}
