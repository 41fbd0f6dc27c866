//! Replacing a small file so that a reader sees the old content or the new, never
//! a mix, and a crash leaves one of the two: the state file, the lockout counters,
//! the boot hint. Shared by the boot path and the supervisor, which import nothing
//! else of each other.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Replace `path` with `data`: temporary file in the same directory (created with
/// `dir_mode` if missing), explicit `mode` regardless of umask, fsync, rename,
/// fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, dir_mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)?;
        // mkdir applies the umask: a state directory readers cannot enter (umask
        // 077) is as wrong as one others can write.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_with_the_exact_mode_and_leaves_no_temporary() {
        let dir = crate::testutil::TmpDir::new("atomic");
        let p = dir.join("sub").join("f.json");
        write_atomic(&p, b"one", 0o644, 0o700).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o644);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        write_atomic(&p, b"x", 0o600, 0o700).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_new_directory_gets_its_mode_whatever_the_umask() {
        let dir = crate::testutil::TmpDir::new("atomic-umask");
        let p = dir.join("run").join("state.json");
        // The umask is per process and the test harness is threaded: in a child.
        // SAFETY: the child only makes system calls and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
                let code = i32::from(write_atomic(&p, b"{}", 0o644, 0o755).is_err());
                // SAFETY: _exit skips the parent's atexit handlers and buffers.
                unsafe { nix::libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(p.parent().unwrap()), 0o755);
        assert_eq!(mode(&p), 0o644);
    }
}
