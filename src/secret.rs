//! Secret buffers and process hardening.
//!
//! Every secret in the process (sealed secret, volume key, passphrase, PIN) lives in
//! a [`SecretBytes`]: a fixed-capacity, mlock'ed buffer that is zeroized before its
//! memory is released and that has no `Debug`/`Display` which could print it. This
//! module never logs, stores or compares secrets in a way that leaks timing.

use std::fmt;
use zeroize::Zeroize;

/// A secret byte string. Its capacity is fixed at creation so the buffer is never
/// reallocated (which would leave an un-wiped copy behind).
pub struct SecretBytes {
    buf: Vec<u8>,
    locked: bool,
}

impl SecretBytes {
    /// An empty secret that can grow up to `cap` bytes without reallocating.
    pub fn with_capacity(cap: usize) -> SecretBytes {
        let buf = Vec::with_capacity(cap.max(1));
        let locked = lock_region(buf.as_ptr(), buf.capacity());
        SecretBytes { buf, locked }
    }

    /// Copy `bytes` into a new secret. The caller still owns (and must wipe) its copy.
    pub fn from_slice(bytes: &[u8]) -> SecretBytes {
        let mut s = SecretBytes::with_capacity(bytes.len());
        s.buf.extend_from_slice(bytes);
        s
    }

    /// Take ownership of `v`; its buffer is locked and will be wiped on drop.
    pub fn from_vec(v: Vec<u8>) -> SecretBytes {
        let locked = lock_region(v.as_ptr(), v.capacity());
        SecretBytes { buf: v, locked }
    }

    /// A secret of `len` zero bytes, to be filled in place (e.g. by a C library).
    pub fn zeroed(len: usize) -> SecretBytes {
        let mut s = SecretBytes::with_capacity(len);
        s.buf.resize(len, 0);
        s
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Append one byte; refuses (returns false) instead of reallocating.
    pub fn push(&mut self, b: u8) -> bool {
        if self.buf.len() == self.buf.capacity() {
            return false;
        }
        self.buf.push(b);
        true
    }

    /// Drop the last byte (wiping it).
    pub fn pop(&mut self) -> bool {
        match self.buf.last_mut() {
            Some(last) => {
                *last = 0;
                self.buf.pop();
                true
            }
            None => false,
        }
    }

    /// Shorten to `len` bytes, wiping what is cut off.
    pub fn truncate(&mut self, len: usize) {
        if len < self.buf.len() {
            self.buf[len..].zeroize();
            self.buf.truncate(len);
        }
    }

    /// Compare with another secret in time independent of where they differ.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        if self.buf.len() != other.len() {
            return false;
        }
        let diff = self
            .buf
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        SecretBytes::from_slice(&self.buf)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // Wipe the whole capacity: bytes past len may hold earlier contents.
        let cap = self.buf.capacity();
        self.buf.resize(cap, 0);
        self.buf.zeroize();
        if self.locked {
            unlock_region(self.buf.as_ptr(), cap);
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.buf.len())
    }
}

fn lock_region(ptr: *const u8, len: usize) -> bool {
    if len == 0 {
        return false;
    }
    // SAFETY: the range is one live allocation owned by the caller; mlock does not
    // read or write it. Failure (RLIMIT_MEMLOCK) is tolerated: the buffer is still
    // wiped on drop, and core dumps are disabled by `harden_process`.
    unsafe { rustix::mm::mlock(ptr as *mut std::ffi::c_void, len).is_ok() }
}

fn unlock_region(ptr: *const u8, len: usize) {
    // SAFETY: same allocation that `lock_region` locked, still live here.
    let _ = unsafe { rustix::mm::munlock(ptr as *mut std::ffi::c_void, len) };
}

/// Keep secrets out of core dumps and away from ptrace by other users: no core
/// files, not dumpable. Called first thing by every command that handles a secret.
pub fn harden_process() {
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    );
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
}

/// Read-only mappings of this program's own file (code and constants), from
/// /proc/self/maps: `(address, length)`.
fn own_image_mappings() -> Vec<(usize, usize)> {
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if perms.starts_with("rw") || exe.as_deref() != Some(std::path::Path::new(path)) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            Some((a, b - a))
        })
        .collect()
}

/// Hand the program's code and constants back to the page cache: for a process
/// about to sleep for hours, what start-up touched need not stay resident; pages
/// it runs later come back on first use, one at a time (no read-ahead or
/// fault-around, which would map up to 64 KiB around each: the binary is 5.5 MiB
/// and the supervisor's steady state uses a small part of it).
pub fn release_image_pages() {
    use rustix::mm::{madvise, Advice};
    for (addr, len) in own_image_mappings() {
        let addr = addr as *mut std::ffi::c_void;
        // SAFETY: advice on mappings this process owns; the pages are clean
        // file-backed ones and fault back in unchanged.
        let _ = unsafe { madvise(addr, len, Advice::Random) };
        let _ = unsafe { madvise(addr, len, Advice::LinuxPageOut) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_print_the_secret() {
        let s = SecretBytes::from_slice(b"hunter2");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("7 bytes"));
    }

    #[test]
    fn push_refuses_to_reallocate() {
        let mut s = SecretBytes::with_capacity(2);
        let cap = s.capacity();
        for _ in 0..cap {
            assert!(s.push(b'x'));
        }
        assert!(!s.push(b'y'));
        assert_eq!(s.len(), cap);
        assert!(s.pop());
        assert_eq!(s.len(), cap - 1);
    }

    #[test]
    fn constant_time_compare() {
        let s = SecretBytes::from_slice(b"abc");
        assert!(s.ct_eq(b"abc"));
        assert!(!s.ct_eq(b"abd"));
        assert!(!s.ct_eq(b"ab"));
    }

    #[test]
    fn harden_makes_process_undumpable() {
        // Run in a child so the test harness itself is unaffected.
        let pid = unsafe { libc_fork() };
        if pid == 0 {
            harden_process();
            let ok = rustix::process::dumpable_behavior().ok()
                == Some(rustix::process::DumpableBehavior::NotDumpable)
                && rustix::process::getrlimit(rustix::process::Resource::Core).current == Some(0);
            std::process::exit(if ok { 0 } else { 1 });
        }
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0)
        );
    }

    unsafe fn libc_fork() -> i32 {
        // SAFETY: the child only calls async-signal-safe syscalls and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => 0,
            nix::unistd::ForkResult::Parent { child } => child.as_raw(),
        }
    }
}
