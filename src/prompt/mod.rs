//! Asking a human for a passphrase or PIN: systemd's ask-password protocol when
//! running under systemd, else the console; before anyone is asked, the answers
//! nobody has to type, as systemd's `ask_password_auto` finds them: a systemd
//! credential (`cryptsetup.passphrase`, `cryptsetup.tpm2-pin`), then the kernel
//! keyring cache (the `user` key `cryptsetup`) when the request accepts cached answers.
//!
//! Answers go straight into [`SecretBytes`]; what is typed is shown only as the
//! request's [`Echo`] says, and is never logged or kept after use. This module
//! decides nothing about what the answer unlocks.

pub mod ask_password;

pub use crate::log::Priority;
use crate::secret::SecretBytes;
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use zeroize::Zeroize;

/// Longest passphrase accepted (bytes); longer input is refused, not truncated.
pub const MAX_SECRET: usize = 1024;

#[derive(Debug)]
pub enum PromptError {
    /// Nobody can be asked (no console, no agent).
    NoTerminal(String),
    Io(std::io::Error),
    TooLong,
    /// The agent or the user cancelled (`-`, Ctrl-C, end of input).
    Cancelled,
    /// Nobody answered within the request's timeout (crypttab's `timeout=`).
    Timeout(std::time::Duration),
}

impl fmt::Display for PromptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromptError::NoTerminal(why) => write!(f, "cannot ask for a passphrase: {why}"),
            PromptError::Io(e) => write!(f, "passphrase prompt failed: {e}"),
            PromptError::TooLong => write!(f, "input longer than {MAX_SECRET} bytes refused"),
            PromptError::Cancelled => write!(f, "passphrase prompt cancelled"),
            PromptError::Timeout(t) => write!(
                f,
                "no passphrase entered within {} s (the crypttab `timeout=`); attach again to be asked again",
                t.as_secs()
            ),
        }
    }
}

impl std::error::Error for PromptError {}

/// What a secret is for: decides the wording, the cache and the credential that apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// A LUKS passphrase or recovery key for a volume.
    Passphrase,
    /// The current passphrase or recovery key an enrolment or reseal needs (as
    /// systemd-cryptenroll asks it: its own cache key and credential).
    CurrentPassphrase,
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
    /// [`Prompter::say`] at a journald priority: prompters whose lines go to
    /// stderr under systemd (headless, ask-password) tag them so that
    /// `journalctl -p warning` finds refusals and fallbacks; a terminal has no use
    /// for the priority.
    fn say_at(&mut self, _priority: Priority, line: &str) {
        self.say(line)
    }
    /// The answers to try before anyone is asked: the systemd credential for the
    /// request's kind, then (with `accept_cached`) the keyring cache `keyname`.
    /// Callers try each and fall through to [`Prompter::ask`] when none opens.
    fn unattended(&mut self, req: &Ask) -> Vec<SecretBytes> {
        unattended_answers(req)
    }
    /// An answer opened what it was asked for: add it to the keyring cache
    /// `keyname` so the next volume with the same passphrase needs no prompt.
    /// Only answers that opened something are cached, so the cache never holds a typo.
    fn remember(&mut self, req: &Ask, answer: &SecretBytes) {
        if let Some(name) = &req.keyname {
            // A cache that cannot be written costs a second prompt, nothing else.
            let _ = crate::keyring::cache::push(name, answer.as_bytes());
        }
    }
}

/// The systemd credential (`$CREDENTIALS_DIRECTORY`, systemd-cryptsetup 252+) that
/// answers requests of `kind`, by name.
pub fn credential_name(kind: SecretKind) -> Option<&'static str> {
    match kind {
        SecretKind::Passphrase => Some("cryptsetup.passphrase"),
        SecretKind::CurrentPassphrase => Some("cryptenroll.passphrase"),
        SecretKind::Pin => Some("cryptsetup.tpm2-pin"),
        SecretKind::NewPin | SecretKind::Unlock => None,
    }
}

/// Read the credential for `kind` if the service manager passed one. Like systemd,
/// the file holds one or more NUL-separated answers, taken byte for byte (a
/// trailing newline is part of the answer).
pub fn credential(kind: SecretKind) -> Vec<SecretBytes> {
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => credential_in(std::path::Path::new(&dir), kind),
        None => Vec::new(),
    }
}

/// [`credential`] from the directory `dir`. Only a regular file counts: the file
/// is opened non-blocking, so a FIFO (or a device) under the credential's name
/// cannot stall the boot waiting for a writer.
pub fn credential_in(dir: &std::path::Path, kind: SecretKind) -> Vec<SecretBytes> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(name) = credential_name(kind) else {
        return Vec::new();
    };
    let path = dir.join(name);
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&path)
    else {
        return Vec::new();
    };
    let Ok(meta) = f.metadata() else {
        return Vec::new();
    };
    if !meta.is_file() {
        return Vec::new();
    }
    let len = meta.len() as usize;
    // Credentials are small; one larger than the keyring's payload limit is not ours.
    if len > crate::keyring::cache::MAX_PAYLOAD {
        return Vec::new();
    }
    let mut buf = SecretBytes::zeroed(len);
    if f.read_exact(buf.as_mut_bytes()).is_err() {
        return Vec::new();
    }
    crate::keyring::cache::split_nulstr(buf.as_bytes())
}

/// systemd's order: the credential, then the keyring cache if the request accepts it.
pub fn unattended_answers(req: &Ask) -> Vec<SecretBytes> {
    let mut out = credential(req.kind);
    if req.accept_cached {
        if let Some(name) = &req.keyname {
            // No key, an expired one or no keyring support: nothing cached.
            out.extend(crate::keyring::cache::lookup(name).unwrap_or_default());
        }
    }
    out
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
        self.say_at(Priority::Info, line)
    }
    fn say_at(&mut self, priority: Priority, line: &str) {
        crate::log::say(priority, line)
    }
}

/// The controlling terminal, or /dev/console in an initramfs.
///
/// The terminal is switched to the prompt's modes (no kernel echo) *before* the
/// prompt text is written, and with TCSANOW: a passphrase typed or pasted before
/// or the instant the prompt appears (serial consoles, IPMI, expect scripts) stays
/// in the input queue and is read, where TCSAFLUSH would throw it away. Without
/// echo (`password-echo=no`, the default) the terminal stays canonical, the one
/// mode in which the kernel wipes what it buffered once it is read; with `*` or
/// the characters shown the line editing is ours: Enter ends, Backspace removes
/// one character, Ctrl-U the line, Ctrl-C cancels, Ctrl-D on an empty line
/// cancels. The saved modes come back on every path (drop guard).
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
        let deadline = req.timeout.map(|t| (std::time::Instant::now() + t, t));
        let tty = self.open()?;
        let guard = RawInput::new(
            tty.as_fd().try_clone_to_owned().map_err(PromptError::Io)?,
            req.echo,
        )?;
        let answer = (|| {
            tty.write_all(req.message.as_bytes())
                .and_then(|()| tty.flush())
                .map_err(PromptError::Io)?;
            let mut reader = TtyBytes {
                tty: &*tty,
                deadline,
            };
            let mut shown = &*tty;
            edit_line(&mut reader, req.echo, &mut shown)
        })();
        // Enter is not echoed by the terminal in these modes: end the prompt's line.
        let _ = tty.write_all(b"\n");
        drop(guard);
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

/// Bytes from the terminal one at a time (no buffered copy of the secret is left in
/// a reader), waiting at most until the deadline.
struct TtyBytes<'a> {
    tty: &'a std::fs::File,
    deadline: Option<(std::time::Instant, std::time::Duration)>,
}

impl TtyBytes<'_> {
    /// The next byte; `None` at end of input (terminal hung up).
    fn next(&mut self) -> Result<Option<u8>, PromptError> {
        use rustix::event::{poll, PollFd, PollFlags};
        loop {
            let wait = match self.deadline {
                None => None,
                Some((at, total)) => {
                    let left = at.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(PromptError::Timeout(total));
                    }
                    Some(rustix::time::Timespec {
                        tv_sec: left.as_secs() as i64,
                        tv_nsec: i64::from(left.subsec_nanos()),
                    })
                }
            };
            let mut fds = [PollFd::new(self.tty, PollFlags::IN)];
            match poll(&mut fds, wait.as_ref()) {
                Ok(0) => continue, // the deadline check above decides
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(PromptError::Io(e.into())),
            }
            let mut byte = [0u8; 1];
            match rustix::io::read(self.tty, &mut byte) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    let b = byte[0];
                    byte.zeroize();
                    return Ok(Some(b));
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                // A pty whose other side closed reads EIO: end of input.
                Err(rustix::io::Errno::IO) => return Ok(None),
                Err(e) => return Err(PromptError::Io(e.into())),
            }
        }
    }
}

/// The byte source [`edit_line`] reads from.
trait ByteSource {
    fn next_byte(&mut self) -> Result<Option<u8>, PromptError>;
}

impl ByteSource for TtyBytes<'_> {
    fn next_byte(&mut self) -> Result<Option<u8>, PromptError> {
        self.next()
    }
}

impl ByteSource for &[u8] {
    fn next_byte(&mut self) -> Result<Option<u8>, PromptError> {
        match self.split_first() {
            Some((&b, rest)) => {
                *self = rest;
                Ok(Some(b))
            }
            None => Ok(None),
        }
    }
}

/// Our line editor for a terminal in non-canonical mode: reads up to Enter and
/// shows what `echo` says (nothing, one `*` per character, or the characters).
/// Characters are UTF-8 aware: Backspace removes a whole character.
fn edit_line(
    input: &mut impl ByteSource,
    echo: Echo,
    shown: &mut impl Write,
) -> Result<SecretBytes, PromptError> {
    const CTRL_C: u8 = 0x03;
    const CTRL_D: u8 = 0x04;
    const CTRL_U: u8 = 0x15;
    const BACKSPACE: [u8; 2] = [0x7f, 0x08];
    let mut out = SecretBytes::with_capacity(MAX_SECRET);
    // Output is best effort: a terminal that cannot show a `*` still takes input.
    let mut show = |bytes: &[u8]| {
        let _ = shown.write_all(bytes).and_then(|()| shown.flush());
    };
    let erase_one = |out: &mut SecretBytes| -> bool {
        // Continuation bytes (10xxxxxx) belong to the character before them.
        while out.as_bytes().last().is_some_and(|b| b & 0xc0 == 0x80) {
            out.pop();
        }
        out.pop()
    };
    loop {
        let Some(b) = input.next_byte()? else {
            if out.is_empty() {
                return Err(PromptError::Cancelled);
            }
            return Ok(out);
        };
        match b {
            b'\n' | b'\r' => return Ok(out),
            CTRL_C => return Err(PromptError::Cancelled),
            CTRL_D if out.is_empty() => return Err(PromptError::Cancelled),
            CTRL_D => {}
            CTRL_U => {
                while erase_one(&mut out) {
                    if echo != Echo::Off {
                        show(b"\x08 \x08");
                    }
                }
            }
            b if BACKSPACE.contains(&b) => {
                if erase_one(&mut out) && echo != Echo::Off {
                    show(b"\x08 \x08");
                }
            }
            b => {
                if !out.push(b) {
                    return Err(PromptError::TooLong);
                }
                match echo {
                    Echo::Off => {}
                    // One star per character, not per byte.
                    Echo::Masked if b & 0xc0 != 0x80 => show(b"*"),
                    Echo::Masked => {}
                    Echo::On => show(&[b]),
                }
            }
        }
    }
}

/// The terminal in the prompt's modes while alive; the saved modes come back when
/// dropped, on error paths too, and when SIGTERM, SIGHUP, SIGQUIT or SIGINT ends
/// the process during the prompt (a stopped unit, a closed session, Ctrl-C at a
/// prompt without echo): [`restore_on_signal`].
struct RawInput {
    fd: OwnedFd,
    saved: rustix::termios::Termios,
    _signals: restore_on_signal::Armed,
}

/// Put the terminal's saved modes back from a signal handler, then die of the
/// signal as before. With echo (masked or on) ISIG is off during the prompt, so
/// Ctrl-C arrives as a byte and ends the prompt through the guard; without echo
/// the prompt is in canonical mode with ISIG, and Ctrl-C is SIGINT.
mod restore_on_signal {
    use nix::libc;
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

    const SIGNALS: [Signal; 4] = [
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGINT,
    ];

    static ARMED: AtomicBool = AtomicBool::new(false);
    static FD: AtomicI32 = AtomicI32::new(-1);
    // Written only while ARMED is false, read only by the handler while it is true.
    static mut SAVED: std::mem::MaybeUninit<libc::termios> = std::mem::MaybeUninit::uninit();

    extern "C" fn handler(sig: libc::c_int) {
        if ARMED.swap(false, Ordering::SeqCst) {
            // SAFETY: SAVED was fully written before ARMED was set (SeqCst) and is
            // not written again while armed; tcsetattr is async-signal-safe.
            unsafe {
                let saved = std::ptr::addr_of!(SAVED).cast::<libc::termios>();
                libc::tcsetattr(FD.load(Ordering::SeqCst), libc::TCSANOW, saved);
            }
        }
        // SAFETY: signal() and raise() are async-signal-safe; with the default
        // action back, the process ends of the signal it was sent.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }

    /// While alive, the signals restore `fd`'s modes as read at arming.
    pub struct Armed {
        previous: Vec<(Signal, SigAction)>,
    }

    /// Arm for `fd` (still in its saved modes). Best effort: a signal whose
    /// handler cannot be set keeps its old disposition.
    pub fn arm(fd: RawFd) -> Armed {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills the termios on success; it is used only then.
        if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
            return Armed {
                previous: Vec::new(),
            };
        }
        ARMED.store(false, Ordering::SeqCst);
        // SAFETY: not armed, so no handler reads SAVED while it is written; only
        // one prompt at a time arms (prompts are interactive and sequential).
        unsafe {
            std::ptr::addr_of_mut!(SAVED).write(t);
        }
        FD.store(fd, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        let act = SigAction::new(
            SigHandler::Handler(handler),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for sig in SIGNALS {
            // SAFETY: the handler only calls async-signal-safe functions.
            if let Ok(old) = unsafe { sigaction(sig, &act) } {
                previous.push((sig, old));
            }
        }
        Armed { previous }
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            ARMED.store(false, Ordering::SeqCst);
            for (sig, old) in &self.previous {
                // SAFETY: putting back the disposition that was there before arm().
                let _ = unsafe { sigaction(*sig, old) };
            }
        }
    }
}

impl RawInput {
    fn new(fd: OwnedFd, echo: Echo) -> Result<RawInput, PromptError> {
        use rustix::termios::{
            tcgetattr, tcsetattr, LocalModes, OptionalActions, SpecialCodeIndex,
        };
        let saved = tcgetattr(&fd).map_err(|e| PromptError::Io(e.into()))?;
        let signals = restore_on_signal::arm(fd.as_raw_fd());
        let mut t = saved.clone();
        if echo == Echo::Off {
            // Canonical mode without echo: the kernel edits the line (erase, kill)
            // and, in exactly this mode, wipes its input buffer as the line is read
            // (n_tty's zero_buffer, "tty: wipe buffer if not echoing data"). Raw
            // mode would leave the passphrase in kernel memory after the read; the
            // key_gone QEMU scenario finds it there. Ctrl-C stays a signal, which
            // restore_on_signal turns into restored modes and the default death.
            t.local_modes.remove(LocalModes::ECHO | LocalModes::ECHONL);
            t.local_modes.insert(LocalModes::ICANON);
        } else {
            // `*` or the characters: no kernel echo (we show them), no canonical
            // editing (ours), and Ctrl-C arrives as a byte we turn into a cancel.
            t.local_modes.remove(
                LocalModes::ECHO | LocalModes::ECHONL | LocalModes::ICANON | LocalModes::ISIG,
            );
            t.special_codes[SpecialCodeIndex::VMIN] = 1;
            t.special_codes[SpecialCodeIndex::VTIME] = 0;
        }
        // TCSANOW, never TCSAFLUSH: flushing would discard type-ahead.
        tcsetattr(&fd, OptionalActions::Now, &t).map_err(|e| PromptError::Io(e.into()))?;
        Ok(RawInput {
            fd,
            saved,
            _signals: signals,
        })
    }
}

impl Drop for RawInput {
    fn drop(&mut self) {
        // TCSADRAIN: the last `*` and newline reach the terminal in the old modes' order.
        let _ = rustix::termios::tcsetattr(
            &self.fd,
            rustix::termios::OptionalActions::Drain,
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

/// Answers from a list, for tests and for `--passphrase-file`-style input. It
/// has its own cache in memory (`cached`), never the kernel keyring's.
pub struct Scripted {
    answers: std::collections::VecDeque<SecretBytes>,
    pub asked: Vec<String>,
    pub said: Vec<String>,
    /// Served as [`Prompter::unattended`] answers to requests that accept cached ones.
    pub cached: Vec<SecretBytes>,
    /// Answers passed to [`Prompter::remember`] for requests with a keyname.
    pub remembered: Vec<SecretBytes>,
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
            cached: Vec::new(),
            remembered: Vec::new(),
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
    fn unattended(&mut self, req: &Ask) -> Vec<SecretBytes> {
        if req.accept_cached && req.keyname.is_some() {
            self.cached.clone()
        } else {
            Vec::new()
        }
    }
    fn remember(&mut self, req: &Ask, answer: &SecretBytes) {
        if req.keyname.is_some() {
            self.remembered.push(answer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attack: a FIFO under the credential's name. `File::open` blocked until a
    /// writer came, so the boot hung before any prompt; now it is no credential.
    /// A regular file (also through a symlink, as systemd reads it) still counts.
    #[test]
    fn a_fifo_credential_is_no_credential_and_does_not_block() {
        let dir = crate::testutil::TmpDir::new("cred-fifo");
        let fifo = dir.join("cryptsetup.passphrase");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let d = dir.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(credential_in(&d, SecretKind::Passphrase).len());
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(3));
        if got.is_err() {
            // Release the blocked reader before failing.
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        }
        assert_eq!(got, Ok(0), "reading a FIFO credential blocked or answered");
        std::fs::remove_file(&fifo).unwrap();
        std::fs::write(dir.join("real"), b"one\0two").unwrap();
        std::os::unix::fs::symlink(dir.join("real"), &fifo).unwrap();
        let got = credential_in(&dir, SecretKind::Passphrase);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].as_bytes(), b"two");
        // A directory under the name is none either.
        std::fs::create_dir(dir.join("cryptsetup.tpm2-pin")).unwrap();
        assert!(credential_in(&dir, SecretKind::Pin).is_empty());
    }

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

    fn edit(input: &[u8], echo: Echo) -> (Result<SecretBytes, PromptError>, Vec<u8>) {
        let mut src: &[u8] = input;
        let mut shown = Vec::new();
        let r = edit_line(&mut src, echo, &mut shown);
        (r, shown)
    }

    #[test]
    fn masked_echo_shows_one_star_per_character_and_backspace_erases_one() {
        // "é" is two bytes but one character: one star, and one Backspace removes it.
        let (r, shown) = edit("ab\u{e9}\x7fc\r".as_bytes(), Echo::Masked);
        assert_eq!(r.unwrap().as_bytes(), b"abc");
        assert_eq!(shown, b"***\x08 \x08*");
        // Backspace on an empty line shows nothing; Ctrl-U clears the line.
        let (r, shown) = edit(b"\x7fxy\x15z\n", Echo::Masked);
        assert_eq!(r.unwrap().as_bytes(), b"z");
        assert_eq!(shown, b"**\x08 \x08\x08 \x08*");
    }

    #[test]
    fn echo_off_shows_nothing_and_echo_on_shows_the_characters() {
        let (r, shown) = edit(b"pw\x08W\r", Echo::Off);
        assert_eq!(r.unwrap().as_bytes(), b"pW");
        assert!(shown.is_empty());
        let (r, shown) = edit(b"pin\n", Echo::On);
        assert_eq!(r.unwrap().as_bytes(), b"pin");
        assert_eq!(shown, b"pin");
    }

    #[test]
    fn ctrl_c_and_ctrl_d_cancel_and_overlong_input_is_refused() {
        assert!(matches!(
            edit(b"abc\x03", Echo::Off).0,
            Err(PromptError::Cancelled)
        ));
        assert!(matches!(
            edit(b"\x04", Echo::Off).0,
            Err(PromptError::Cancelled)
        ));
        assert!(matches!(
            edit(b"", Echo::Off).0,
            Err(PromptError::Cancelled)
        ));
        // Ctrl-D inside a line is ignored, as a terminal does.
        assert_eq!(edit(b"a\x04b\n", Echo::Off).0.unwrap().as_bytes(), b"ab");
        let long = vec![b'a'; MAX_SECRET + 1];
        assert!(matches!(
            edit(&long, Echo::Off).0,
            Err(PromptError::TooLong)
        ));
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
