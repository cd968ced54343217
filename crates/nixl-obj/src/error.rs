use std::sync::Arc;
#[cfg(feature = "control")]
use std::time::Duration;

/// Errors of the object backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport failed (registration, query).
    #[error(transparent)]
    Transport(#[from] nixl_core::Error),

    /// The batch this key was part of failed as a whole; every key in it shares the cause.
    #[error("the batch failed: {0}")]
    Batch(#[source] Arc<nixl_core::Error>),

    /// A key too long for the object header.
    #[error("invalid key: {0}")]
    InvalidKey(String),

    /// The configuration cannot work.
    #[error("invalid object backend configuration: {0}")]
    Config(String),

    /// A delete or a listing failed at the store.
    #[cfg(feature = "control")]
    #[error("{target}: {source}")]
    Control {
        /// `s3://bucket` or `azure://container`.
        target: String,
        /// What the client said.
        #[source]
        source: Box<object_store::Error>,
    },

    /// A delete or a listing did not finish in time.
    #[cfg(feature = "control")]
    #[error("{target}: {what} did not finish within {after:?}")]
    ControlTimeout {
        /// `s3://bucket` or `azure://container`.
        target: String,
        /// `delete` or `list`.
        what: String,
        /// The bound it ran past.
        after: Duration,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
