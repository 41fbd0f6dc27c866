//! The optional activity file (`vault.activity_file`, the appliance's
//! `/run/secure-ai/last-activity`): a newer mtime counts as activity. Watched with
//! inotify on its directory, so the file may be created, replaced or touched at
//! any time; if the directory itself does not exist yet, its parent is watched
//! until it appears. This module never reads the file's content and never polls.

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub struct ActivityWatch {
    inotify: Inotify,
    file: PathBuf,
    name: OsString,
    dir: PathBuf,
    dir_name: Option<OsString>,
    /// Set while the directory is missing and its parent is watched instead.
    waiting_for_dir: Option<WatchDescriptor>,
    last_mtime: Option<SystemTime>,
}

const FILE_EVENTS: AddWatchFlags = AddWatchFlags::IN_ATTRIB
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_MOVED_TO);

impl ActivityWatch {
    pub fn new(file: &Path) -> Result<ActivityWatch, String> {
        let name = file
            .file_name()
            .ok_or_else(|| format!("{}: not a file path", file.display()))?
            .to_os_string();
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("inotify: {e}"))?;
        let mut w = ActivityWatch {
            inotify,
            file: file.to_path_buf(),
            name,
            dir_name: dir.file_name().map(|n| n.to_os_string()),
            dir,
            waiting_for_dir: None,
            last_mtime: None,
        };
        w.last_mtime = w.mtime();
        w.watch_dir()?;
        Ok(w)
    }

    fn watch_dir(&mut self) -> Result<(), String> {
        match self.inotify.add_watch(&self.dir, FILE_EVENTS) {
            Ok(_) => {
                self.waiting_for_dir = None;
                Ok(())
            }
            Err(nix::errno::Errno::ENOENT) => {
                let parent = self
                    .dir
                    .parent()
                    .ok_or_else(|| format!("{}: no parent to watch", self.dir.display()))?;
                let wd = self
                    .inotify
                    .add_watch(
                        parent,
                        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
                    )
                    .map_err(|e| format!("cannot watch {}: {e}", parent.display()))?;
                self.waiting_for_dir = Some(wd);
                Ok(())
            }
            Err(e) => Err(format!("cannot watch {}: {e}", self.dir.display())),
        }
    }

    fn mtime(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.file).ok()?.modified().ok()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Drain pending events; true if the file's mtime moved forward.
    pub fn drain(&mut self) -> bool {
        let mut relevant = false;
        let mut dir_appeared = false;
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                if Some(ev.wd) == self.waiting_for_dir {
                    dir_appeared |= ev.name.as_ref() == self.dir_name.as_ref();
                } else if ev.name.as_deref() == Some(self.name.as_os_str()) {
                    relevant = true;
                }
            }
        }
        if dir_appeared {
            if let Some(wd) = self.waiting_for_dir.take() {
                let _ = self.inotify.rm_watch(wd);
            }
            if let Err(e) = self.watch_dir() {
                super::log_warn(&format!("activity file: {e}"));
            }
            relevant = true;
        }
        if !relevant {
            return false;
        }
        let now = self.mtime();
        let advanced = match (now, self.last_mtime) {
            (Some(n), Some(l)) => n > l,
            (Some(_), None) => true,
            _ => false,
        };
        if advanced {
            self.last_mtime = now;
        }
        advanced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_readable(w: &ActivityWatch) -> bool {
        let fd = w.fd();
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let t = rustix::time::Timespec {
            tv_sec: 5,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&t)).unwrap_or(0) > 0
    }

    fn touch(p: &Path, secs: u64) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn newer_mtime_is_activity_and_older_is_not() {
        let dir = crate::testutil::TmpDir::new("activity");
        let file = dir.join("run").join("last-activity");
        // The directory does not exist yet: the parent is watched until it does.
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = ActivityWatch::new(&file).unwrap();
        assert!(!w.drain());
        std::fs::create_dir(dir.join("run")).unwrap();
        assert!(wait_readable(&w));
        w.drain();
        touch(&file, 1_000_000);
        assert!(wait_readable(&w));
        assert!(w.drain(), "created file counts");
        touch(&file, 2_000_000);
        assert!(wait_readable(&w));
        assert!(w.drain(), "newer mtime counts");
        touch(&file, 1_500_000);
        assert!(wait_readable(&w));
        assert!(!w.drain(), "older mtime does not count");
        // Other files in the directory are ignored.
        touch(&dir.join("run").join("other"), 3_000_000);
        assert!(wait_readable(&w));
        assert!(!w.drain());
    }
}
