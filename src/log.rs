//! The lines vaultguard writes for the operator on stderr (and `--test`'s report
//! on stdout): with a journald priority prefix (`<3>` error, `<4>` warning, `<6>`
//! info, `<7>` debug) when the stream is the journal, `vaultguard: ` otherwise.
//!
//! "The stream is the journal" is decided as systemd documents for
//! `$JOURNAL_STREAM` (systemd.exec(5)): its `dev:ino` must be the stream's own
//! fstat. A presence check is not enough: a service that redirects stderr to a
//! file, or a tool started from one, inherits the variable, and `<4>` in a file is
//! noise. This module owns no other output and never decides what is logged.

use std::os::fd::AsFd;
use std::sync::OnceLock;

/// Syslog priorities, as journald files them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Error = 3,
    Warning = 4,
    Info = 6,
    Debug = 7,
}

/// `dev:ino` from `$JOURNAL_STREAM` (decimal, as systemd writes them).
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Whether `fd` is the stream `$JOURNAL_STREAM` names.
fn is_journal(fd: impl AsFd) -> bool {
    let Some(want) = std::env::var("JOURNAL_STREAM")
        .ok()
        .and_then(|v| parse_journal_stream(&v))
    else {
        return false;
    };
    match rustix::fs::fstat(fd) {
        Ok(st) => (st.st_dev, st.st_ino) == want,
        Err(_) => false,
    }
}

/// Decided once per process: stderr does not change under a running command.
fn stderr_is_journal() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| is_journal(std::io::stderr()))
}

fn stdout_is_journal() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| is_journal(std::io::stdout()))
}

/// `msg` (without the `vaultguard: ` prefix) as one stderr line.
pub fn log(priority: Priority, msg: &str) {
    eprintln!("{}", line(stderr_is_journal(), priority, msg));
}

pub fn error(msg: &str) {
    log(Priority::Error, msg);
}

pub fn warn(msg: &str) {
    log(Priority::Warning, msg);
}

pub fn info(msg: &str) {
    log(Priority::Info, msg);
}

/// A line already worded for the operator (the boot path's, which carry their
/// own `vaultguard: `): only the priority is added, under the journal.
pub fn say(priority: Priority, text: &str) {
    eprintln!("{}", tagged(stderr_is_journal(), priority, text));
}

/// [`say`] on stdout (the `--test` report).
pub fn say_stdout(priority: Priority, text: &str) {
    println!("{}", tagged(stdout_is_journal(), priority, text));
}

fn line(journal: bool, priority: Priority, msg: &str) -> String {
    if journal {
        tagged(true, priority, msg)
    } else {
        format!("vaultguard: {msg}")
    }
}

/// Every line of `text` tagged: journald reads the prefix per line.
fn tagged(journal: bool, priority: Priority, text: &str) -> String {
    if !journal {
        return text.to_string();
    }
    let p = priority as u8;
    text.lines()
        .map(|l| format!("<{p}>{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_dev_colon_ino() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        for bad in ["", "8", "8:", ":1", "a:1", "8:1:2", "-1:2"] {
            assert_eq!(parse_journal_stream(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn journal_lines_carry_the_priority_others_the_name() {
        assert_eq!(line(true, Priority::Error, "bad"), "<3>bad");
        assert_eq!(line(false, Priority::Error, "bad"), "vaultguard: bad");
        assert_eq!(
            tagged(true, Priority::Warning, "vaultguard: a\nvaultguard: b"),
            "<4>vaultguard: a\n<4>vaultguard: b"
        );
        assert_eq!(
            tagged(false, Priority::Info, "vaultguard: a"),
            "vaultguard: a"
        );
        assert_eq!(Priority::Debug as u8, 7);
    }

    #[test]
    fn only_the_named_stream_is_the_journal() {
        let f = tempfile::tempfile().unwrap();
        let st = rustix::fs::fstat(&f).unwrap();
        let other = tempfile::tempfile().unwrap();
        // The variable is process-wide; this is the only test that sets it.
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        assert!(is_journal(&f));
        assert!(!is_journal(&other));
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!is_journal(&f));
    }
}
