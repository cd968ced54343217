use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// How a storage file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FileOptions {
    /// Open with `O_DIRECT`: buffers, offsets and lengths must then be 4 KiB aligned.
    pub direct_io: bool,
    /// Allocate this many bytes up front (`fallocate`), so writes do not grow the file.
    pub preallocate: u64,
}

impl FileOptions {
    /// Buffered, not preallocated.
    pub fn new() -> Self {
        Self::default()
    }

    /// Open with or without `O_DIRECT`.
    pub fn with_direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }

    /// Allocate `bytes` up front.
    pub fn with_preallocate(mut self, bytes: u64) -> Self {
        self.preallocate = bytes;
        self
    }
}

/// Opens (creating if needed) a file for reading and writing chunks.
pub fn open_storage_file(path: &Path, options: FileOptions) -> Result<File> {
    let mut open = OpenOptions::new();
    open.read(true).write(true).create(true).truncate(false);
    if options.direct_io {
        open.custom_flags(libc::O_DIRECT);
    }
    let file = open.open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        direct_io: options.direct_io,
        source,
    })?;
    if options.preallocate > 0 {
        preallocate(&file, options.preallocate).map_err(|source| Error::Preallocate {
            path: path.to_path_buf(),
            bytes: options.preallocate,
            source,
        })?;
    }
    Ok(file)
}

pub(crate) fn preallocate(file: &File, bytes: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size exceeds off_t"))?;
    // SAFETY: the descriptor belongs to `file`, which is borrowed for the whole call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // Some file systems (tmpfs on old kernels, network mounts) cannot preallocate; a sparse
        // file of the right length still works, only slower for O_DIRECT growth.
        return file.set_len(bytes);
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preallocates_the_requested_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks.bin");
        let file = open_storage_file(&path, FileOptions::new().with_preallocate(1 << 20)).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn open_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-folder").join("chunks.bin");
        let err = open_storage_file(&path, FileOptions::new()).unwrap_err();
        assert!(err.to_string().contains("missing-folder"), "{err}");
    }
}
