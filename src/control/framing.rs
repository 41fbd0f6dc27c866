//! Per-connection input buffer: newline framing with a hard line limit, and no
//! un-wiped copies of what passed through it.
//!
//! A request line may hold a passphrase, so the buffer never lets `Vec` reallocate
//! behind its back (the old allocation would be freed unwiped): it grows by copying
//! into a new allocation and wiping the old one, wipes each line once it has been
//! handled, and wipes its whole capacity on drop. Reads go straight into the buffer,
//! never through a stack array. This module does no I/O policy (timeouts, limits on
//! connections); the supervisor's event loop owns those.

use super::protocol::MAX_LINE;
use std::io;
use std::os::fd::AsFd;
use zeroize::Zeroize;

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 4096;

/// Never hold more than one maximal line plus its newline and one read's slack.
const HARD_CAP: usize = MAX_LINE + 1 + READ_CHUNK;

pub struct LineBuffer {
    buf: Vec<u8>,
}

/// A complete line was found, or the connection sent more than the limit without
/// a newline.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed<R> {
    Line(R),
    TooLong,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer::new()
    }
}

impl LineBuffer {
    pub fn new() -> Self {
        LineBuffer { buf: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Make room for `extra` more bytes without a reallocation that skips the wipe.
    fn reserve(&mut self, extra: usize) {
        let need = self.buf.len() + extra;
        if need <= self.buf.capacity() {
            return;
        }
        let cap = need.max(self.buf.capacity() * 2).clamp(256, HARD_CAP);
        let mut fresh = Vec::with_capacity(cap.max(need));
        fresh.extend_from_slice(&self.buf);
        wipe_vec(&mut self.buf);
        self.buf = fresh;
    }

    /// Append bytes (used by tests and by callers that already hold data).
    pub fn extend(&mut self, data: &[u8]) {
        self.reserve(data.len());
        self.buf.extend_from_slice(data);
    }

    /// One `read(2)` from `fd` into the buffer. `Ok(0)` is end of file.
    pub fn read_from(&mut self, fd: impl AsFd) -> io::Result<usize> {
        let room = HARD_CAP.saturating_sub(self.buf.len()).min(READ_CHUNK);
        if room == 0 {
            // The caller checks for an overlong line before reading again.
            return Err(io::Error::other("line buffer full"));
        }
        self.reserve(room);
        let old = self.buf.len();
        self.buf.resize(old + room, 0);
        let got = match rustix::io::read(fd, &mut self.buf[old..]) {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(old);
                return Err(e.into());
            }
        };
        self.buf.truncate(old + got);
        Ok(got)
    }

    /// Hand the next complete line (without `\n` or a trailing `\r`) to `f`, then
    /// wipe it from the buffer. `None` when no full line is buffered yet.
    pub fn next_line<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<Framed<R>> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(nl) if nl > MAX_LINE => Some(Framed::TooLong),
            Some(nl) => {
                let line = &self.buf[..nl];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let r = f(line);
                self.consume(nl + 1);
                Some(Framed::Line(r))
            }
            None if self.buf.len() > MAX_LINE => Some(Framed::TooLong),
            None => None,
        }
    }

    /// Wipe the first `n` bytes and move the rest to the front.
    fn consume(&mut self, n: usize) {
        let len = self.buf.len();
        self.buf[..n].zeroize();
        self.buf.copy_within(n..len, 0);
        self.buf[len - n..].zeroize();
        self.buf.truncate(len - n);
    }

    /// Wipe everything (on a closed or failed connection).
    pub fn clear(&mut self) {
        self.buf.zeroize();
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        wipe_vec(&mut self.buf);
    }
}

/// Wipe a vector's whole capacity, not just its length.
fn wipe_vec(v: &mut Vec<u8>) {
    let cap = v.capacity();
    v.resize(cap, 0);
    v.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(b: &mut LineBuffer) -> Vec<Framed<Vec<u8>>> {
        let mut out = Vec::new();
        while let Some(l) = b.next_line(|l| l.to_vec()) {
            let stop = l == Framed::TooLong;
            out.push(l);
            if stop {
                break;
            }
        }
        out
    }

    #[test]
    fn splits_pipelined_and_partial_lines() {
        let mut b = LineBuffer::new();
        b.extend(b"{\"cmd\":\"status\"}\r\n{\"cmd\":\"lock\"}\n{\"cmd\":");
        assert_eq!(
            lines(&mut b),
            vec![
                Framed::Line(b"{\"cmd\":\"status\"}".to_vec()),
                Framed::Line(b"{\"cmd\":\"lock\"}".to_vec())
            ]
        );
        assert_eq!(b.len(), 7);
        b.extend(b"\"keepalive\"}\n");
        assert_eq!(
            lines(&mut b),
            vec![Framed::Line(b"{\"cmd\":\"keepalive\"}".to_vec())]
        );
        assert!(b.is_empty());
    }

    #[test]
    fn limit_is_enforced_with_and_without_newline() {
        let mut b = LineBuffer::new();
        b.extend(&vec![b'x'; MAX_LINE]);
        assert!(lines(&mut b).is_empty(), "exactly the limit is still fine");
        b.extend(b"\n");
        assert_eq!(lines(&mut b).len(), 1);
        b.extend(&vec![b'x'; MAX_LINE + 1]);
        assert_eq!(lines(&mut b), vec![Framed::TooLong]);
        let mut b = LineBuffer::new();
        let mut long = vec![b'x'; MAX_LINE + 1];
        long.push(b'\n');
        b.extend(&long);
        assert_eq!(lines(&mut b), vec![Framed::TooLong]);
    }

    #[test]
    fn handled_lines_are_wiped_in_place() {
        let mut b = LineBuffer::new();
        b.extend(b"secret-line\nrest");
        b.next_line(|_| ()).unwrap();
        // The storage past the live bytes holds zeros, not the old line.
        let live = b.buf.len();
        // SAFETY: the first 16 bytes of the allocation were written by `extend` and
        // the buffer has not reallocated since; reading them is reading initialised
        // memory that the Vec still owns.
        let spare = unsafe { std::slice::from_raw_parts(b.buf.as_ptr(), 16) };
        assert_eq!(&spare[..live], b"rest");
        assert!(spare[live..].iter().all(|&x| x == 0));
    }

    #[test]
    fn reads_from_a_socket() {
        let (a, c) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::io::Write;
        (&c).write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        drop(c);
        let mut b = LineBuffer::new();
        assert_eq!(b.read_from(&a).unwrap(), 17);
        assert_eq!(b.read_from(&a).unwrap(), 0);
        assert_eq!(lines(&mut b).len(), 1);
    }
}
