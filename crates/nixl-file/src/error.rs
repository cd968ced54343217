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
