use std::sync::Arc;

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
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
