use std::io;
use std::path::PathBuf;

use crate::key::FileKey;

/// Errors of the file backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A storage file could not be opened.
    #[error("opening {path} (O_DIRECT: {direct_io}) failed: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Whether O_DIRECT was asked for.
        direct_io: bool,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Space for a storage file could not be allocated.
    #[error("allocating {bytes} bytes for {path} failed: {source}")]
    Preallocate {
        /// The file.
        path: PathBuf,
        /// Bytes asked for.
        bytes: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Any other file-system operation failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What we were doing.
        operation: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// An operation on one key failed: names the key and its file, and keeps the cause (which,
    /// for a failed batch, every key of the batch shares).
    #[error("{operation} {key} at {path} failed: {source}")]
    Key {
        /// What was done to the key (`storing`, `loading`, `deleting`, …).
        operation: &'static str,
        /// The key (boxed: it would make every `Result` of this crate several times larger).
        key: Box<FileKey>,
        /// The key's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<Error>,
    },

    /// A key that cannot name a file safely (path separators, NUL, `..`, too long, …).
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },

    /// The transport failed the transfer (the whole batch counts as failed).
    #[error("transfer failed: {0}")]
    Transport(#[from] nixl_core::Error),

    /// The batch this key was part of failed as a whole; every key in it shares the cause.
    #[error("the batch failed: {0}")]
    Batch(#[source] std::sync::Arc<nixl_core::Error>),

    /// The configuration cannot work.
    #[error("invalid file backend configuration: {0}")]
    Config(String),

    /// No header page came free in time (too many concurrent batches for the header pool).
    #[error("no header buffer became free within {0:?}")]
    Busy(std::time::Duration),

    /// No segment can take the chunk: every segment holds live data (or loads in flight).
    /// Delete (evict) keys, then try again.
    #[error(
        "no space for {key}: {needed} bytes wanted, every segment of the {capacity}-byte store          holds live data; evict keys to free a segment"
    )]
    NoSpace {
        /// The key that did not fit (boxed, as in [`Error::Key`]).
        key: Box<FileKey>,
        /// Bytes on disk it needs, header included.
        needed: u64,
        /// The store's capacity in bytes.
        capacity: u64,
    },

    /// The file system had no room to make a segment file: the disk holds less than the
    /// configured capacity.
    #[error(
        "no space for {key}: the file system of {} is full, so segment file {} ({needed} bytes) \
         cannot be made; evict keys to reuse a segment, or lower max_capacity_gb to what the disk \
         holds",
        path.parent().unwrap_or(path).display(),
        path.display()
    )]
    DiskFull {
        /// The key that did not fit (boxed, as in [`Error::Key`]).
        key: Box<FileKey>,
        /// The segment file that could not be made.
        path: PathBuf,
        /// Bytes the segment file needs.
        needed: u64,
    },

    /// A chunk larger than a segment can hold.
    #[error("{key} is {bytes} bytes: more than a segment of {segment_bytes} bytes holds")]
    EntryTooLarge {
        /// The key.
        key: Box<FileKey>,
        /// Its payload bytes.
        bytes: u64,
        /// Bytes of one segment.
        segment_bytes: u64,
    },

    /// Another segment store writes to this folder.
    #[error(
        "{folder} is locked by another segment store (pid {}): a folder has one writer; use \
         per-key files (`layout: files`) for folders shared between processes",
        holder.map_or_else(|| "unknown".to_owned(), |pid| pid.to_string())
    )]
    FolderLocked {
        /// The folder.
        folder: PathBuf,
        /// The pid written in its lock file by the holder, if readable.
        holder: Option<u32>,
    },

    /// A segment file on disk was written with another segment size than the configured one;
    /// opening refuses rather than resize it and lose its entries.
    #[error(
        "{path} is a segment of {bytes} bytes, the configuration asks for segments of \
         {segment_bytes}: restore the segment size it was written with, or remove the segment \
         files to drop their entries"
    )]
    SegmentSize {
        /// The segment file.
        path: PathBuf,
        /// Bytes of a segment, as its own segment header records.
        bytes: u64,
        /// Bytes of a segment, as configured.
        segment_bytes: u64,
    },

    /// A segment file lies beyond the configured capacity; opening refuses rather than delete
    /// its entries.
    #[error(
        "{path} is segment {id}, beyond the {segments} segments max_capacity_gb ({capacity_bytes} \
         bytes) allows: raise max_capacity_gb to keep its entries, or remove the file to drop them"
    )]
    BeyondCapacity {
        /// The segment file.
        path: PathBuf,
        /// Its segment number.
        id: usize,
        /// Segments the configured capacity holds.
        segments: usize,
        /// The configured capacity in bytes.
        capacity_bytes: u64,
    },

    /// A wait inside the store ran out of time (for example, for entries reserved before this
    /// one in its segment to be written).
    #[error("{operation} did not finish within {waited:?}")]
    Timeout {
        /// What was waited for.
        operation: &'static str,
        /// How long.
        waited: std::time::Duration,
    },

    /// A write to a store opened read-only.
    #[error("{operation} refused: the store was opened read-only")]
    ReadOnly {
        /// What was refused.
        operation: &'static str,
    },
}

impl Error {
    pub(crate) fn io(
        operation: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io {
            operation,
            path,
            source,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
