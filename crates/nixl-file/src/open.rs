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

/// Takes the exclusive `flock` of `file` without waiting: `Ok(false)` when another open file
/// (of this process or another) holds it.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: the descriptor belongs to `file`, which is borrowed for the whole call; flock
    // touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err)
}

/// Takes the exclusive `flock` of `file`, waiting while another open file holds it.
pub(crate) fn lock(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: as in `try_lock`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether no process `pid` exists in this pid namespace (`kill(pid, 0)` fails with `ESRCH`).
/// A pid that no process can have (0, or beyond `pid_t`) is gone; `kill` would read it as a
/// process group.
pub(crate) fn process_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 delivers nothing; kill only checks that the process exists and that we
    // may signal it, and touches no memory.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Opens a file only to look at it: `O_NONBLOCK`, so that a FIFO planted under a chunk's name
/// cannot hang the caller (it has no effect on regular files).
pub(crate) fn open_to_inspect(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// `fsync` of a folder, so that the names created in it or renamed into it survive a power
/// loss.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
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

    #[test]
    fn a_lock_held_by_another_open_file_is_refused_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locked");
        let holder = open_storage_file(&path, FileOptions::new()).unwrap();
        assert!(try_lock(&holder).unwrap());
        let other = open_to_inspect(&path).unwrap();
        assert!(
            !try_lock(&other).unwrap(),
            "flock is per open file, even in one process"
        );
        drop(holder);
        assert!(try_lock(&other).unwrap());
    }

    #[test]
    fn this_process_is_alive_and_impossible_pids_are_gone() {
        assert!(!process_gone(std::process::id()));
        assert!(process_gone(0));
        assert!(process_gone(u32::MAX));
    }
}
