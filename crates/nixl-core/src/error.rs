use std::io;
use std::path::PathBuf;

/// The status NIXL returned for a failed call, kept intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NixlStatus {
    /// `NIXL_ERR_INVALID_PARAM`.
    InvalidParam,
    /// `NIXL_ERR_BACKEND`: the plugin failed the operation.
    Backend,
    /// `NIXL_ERR_NOT_FOUND`.
    NotFound,
    /// Any other failure the binding reports (its message is kept).
    Other(&'static str),
}

impl NixlStatus {
    /// Whether retrying the same call may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, NixlStatus::Backend)
    }
}

impl std::fmt::Display for NixlStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NixlStatus::InvalidParam => f.write_str("invalid parameter"),
            NixlStatus::Backend => f.write_str("backend error"),
            NixlStatus::NotFound => f.write_str("not found"),
            NixlStatus::Other(what) => f.write_str(what),
        }
    }
}

#[cfg(feature = "nixl")]
impl From<&nixl_sys::NixlError> for NixlStatus {
    fn from(err: &nixl_sys::NixlError) -> Self {
        use nixl_sys::NixlError as E;
        match err {
            E::InvalidParam | E::StringConversionError(_) => NixlStatus::InvalidParam,
            E::BackendError => NixlStatus::Backend,
            E::NotFound => NixlStatus::NotFound,
            E::FailedToCreateXferRequest => NixlStatus::Other("failed to create transfer request"),
            E::FailedToCreateBackend => NixlStatus::Other("failed to create backend"),
            E::RegDescListCreationFailed | E::RegDescAddFailed => {
                NixlStatus::Other("failed to build registration descriptors")
            }
            _ => NixlStatus::Other("unexpected NIXL binding error"),
        }
    }
}

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `libnixl_capi.so` was found nowhere.
    #[error(
        "NIXL runtime not found: no libnixl_capi.so in {searched:?}; run `cargo xtask setup` to \
         install it (from the PyPI wheel nixl-cu12), or set NIXL_LIB_DIR to the folder that holds it"
    )]
    RuntimeNotFound {
        /// Every folder looked in, in order.
        searched: Vec<PathBuf>,
    },

    /// The library was found but could not be loaded.
    #[error("loading the NIXL runtime {path} failed: {reason}")]
    RuntimeLoad {
        /// The library file.
        path: PathBuf,
        /// What the dynamic loader said.
        reason: String,
    },

    /// The requested plugin is not among those NIXL found.
    #[error("NIXL plugin {plugin} is not available; available plugins: {available:?}")]
    PluginUnavailable {
        /// The plugin asked for.
        plugin: String,
        /// The plugins NIXL listed.
        available: Vec<String>,
    },

    /// A NIXL call failed.
    #[error("NIXL {operation} failed: {status}")]
    Nixl {
        /// What we were doing.
        operation: &'static str,
        /// NIXL's status.
        status: NixlStatus,
    },

    /// A buffer handed to a transfer does not lie inside any live registration.
    #[error("buffer at {addr:#x} ({len} bytes) is not inside registered memory")]
    UnregisteredMemory {
        /// Start address of the buffer.
        addr: usize,
        /// Length of the buffer.
        len: usize,
    },

    /// A transfer names a storage device id that is not registered.
    #[error("storage device id {dev_id} is not registered with this transport")]
    UnregisteredStorage {
        /// The device id (a file descriptor for file backends).
        dev_id: u64,
    },

    /// Another live registration already uses this object id (NIXL issue 1794: the OBJ plugin
    /// maps device ids to objects without reference counting).
    #[error("object id {dev_id} is already registered; ids of live registrations must be unique")]
    DeviceIdInUse {
        /// The object id.
        dev_id: u64,
    },

    /// A file operation on an object backend, or the reverse.
    #[error("backend {backend} does not store {wanted}")]
    WrongStorageKind {
        /// The backend.
        backend: String,
        /// What was asked for.
        wanted: &'static str,
    },

    /// The peer of a transfer channel is unreachable, refused, or went away.
    #[error("channel peer: {0}")]
    Peer(String),

    /// A transfer failed for a reason outside NIXL's own status.
    #[error("transfer failed: {0}")]
    Failed(String),

    /// A transfer batch did not complete in time.
    #[error("transfer of {descriptors} descriptors did not complete within {timeout:?}")]
    Timeout {
        /// Descriptors in the batch.
        descriptors: usize,
        /// The time allowed.
        timeout: std::time::Duration,
    },

    /// A batch failed or timed out while the engine may still be reading or writing its
    /// buffers: the engine was left with them, and they must never be reused (the page-based
    /// calls retire the pages themselves, see `pinned_alloc::Page::abandon`).
    #[error(
        "{cause}; the engine may still access the batch's {descriptors} buffers, so they are retired for good"
    )]
    Abandoned {
        /// Descriptors in the batch.
        descriptors: usize,
        /// What went wrong.
        #[source]
        cause: Box<Error>,
    },

    /// So many requests were abandoned to the engine that the transport stops taking new ones
    /// rather than leak further.
    #[error(
        "{abandoned} transfers were abandoned to a backend that never finished them; this transport takes no more (restart the process)"
    )]
    TooManyAbandoned {
        /// Requests abandoned so far.
        abandoned: usize,
    },

    /// So many failed or dropped transfers are held (their memory kept out of use while the
    /// plugin may still touch it) that new ones wait until some are let go.
    #[error(
        "{held} failed or unfinished transfers are held until the plugin can no longer touch their memory (up to {grace:?} each); retry later"
    )]
    FailuresHeld {
        /// Transfers held at most.
        held: usize,
        /// How long a failed one is held.
        grace: std::time::Duration,
    },

    /// An I/O error outside NIXL (opening files, probing folders).
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
}

impl Error {
    /// Whether the engine may still access the buffers of the batch this error ended: they must
    /// then never be reused.
    pub fn memory_abandoned(&self) -> bool {
        matches!(self, Error::Abandoned { .. })
    }

    /// Whether the batch ran out of time (directly or as the cause of an abandonment).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Abandoned { cause, .. } => cause.is_timeout(),
            _ => false,
        }
    }

    #[cfg(feature = "nixl")]
    pub(crate) fn nixl(operation: &'static str) -> impl FnOnce(nixl_sys::NixlError) -> Error {
        move |err| Error::Nixl {
            operation,
            status: NixlStatus::from(&err),
        }
    }
}

/// Whether a transfer error ran out of time, anywhere in its chain of causes: an engine may
/// then go on using the storage it was writing for good (a failure it reported lasts at most
/// [`FAILED_REQUEST_GRACE`](crate::FAILED_REQUEST_GRACE)).
pub fn timed_out_within(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        let own = err
            .downcast_ref::<Error>()
            .or_else(|| err.downcast_ref::<std::sync::Arc<Error>>().map(|a| &**a));
        if own.is_some_and(Error::is_timeout) {
            return true;
        }
        next = err.source();
    }
    false
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
