//! Helpers for the unit tests.

use std::path::Path;

/// A fresh directory under the system's temporary directory (from the `tempfile`
/// crate), removed when dropped.
pub struct TmpDir(tempfile::TempDir);

impl TmpDir {
    pub fn new(tag: &str) -> TmpDir {
        TmpDir(
            tempfile::Builder::new()
                .prefix(&format!("vg-{tag}-"))
                .tempdir()
                .expect("a temporary directory"),
        )
    }
}

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}
