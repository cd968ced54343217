use std::io;
use std::path::PathBuf;

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
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
