use std::sync::Arc;

use crate::keys::ChunkKey;

/// Errors of the L2 adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot build an adapter.
    #[error("configuration: {0}")]
    Config(#[from] kv_config::Error),

    /// A file backend failed.
    #[error(transparent)]
    File(#[from] nixl_file::Error),

    /// An object backend failed.
    #[error(transparent)]
    Object(#[from] nixl_obj::Error),

    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] nixl_core::Error),

    /// The page pool failed.
    #[error(transparent)]
    Memory(#[from] pinned_alloc::Error),

    /// A static pool is full and nothing in it can be evicted (everything is pinned).
    #[error(
        "no slot for {key:?}: the static pool is full ({total} slots) and no unpinned key can be \
         evicted for a batch of {needed}; unlock keys or grow nixl_pool_size"
    )]
    PoolFull {
        /// The key refused.
        key: ChunkKey,
        /// Slots needed.
        needed: usize,
        /// Slots in the pool.
        total: usize,
    },

    /// Storing this key would exceed the configured capacity.
    #[error(
        "storage capacity exceeded for {key:?}: {used} + {size} bytes > {capacity} bytes \
         (max_capacity_gb)"
    )]
    CapacityExceeded {
        /// The key refused.
        key: ChunkKey,
        /// Bytes in use.
        used: u64,
        /// Bytes of this key.
        size: u64,
        /// The capacity.
        capacity: u64,
    },

    /// The batch this key was in failed as a whole.
    #[error("the batch with {key:?} failed: {source}")]
    Batch {
        /// The key of this outcome.
        key: ChunkKey,
        /// What failed the batch, shared by every key in it.
        #[source]
        source: Arc<Error>,
    },

    /// A store was given a different number of keys and pages.
    #[error("{key:?} has no page: a store of {keys} keys came with {pages} pages")]
    LengthMismatch {
        /// A key without a page.
        key: ChunkKey,
        /// Keys in the call.
        keys: usize,
        /// Pages in the call.
        pages: usize,
    },

    /// A page retired after a failed transfer (`Page::abandon`, `Page::surrender`): it shows
    /// no bytes, so storing it would store an empty chunk under the key.
    #[error("the page for key {key:?} was retired after a failed transfer and holds no data")]
    PageRetired {
        /// The key it was to be stored under.
        key: ChunkKey,
    },

    /// A page that does not fit the adapter's chunks.
    #[error("page of {len} bytes does not fit chunks of {chunk} bytes")]
    PageSize {
        /// The page's length.
        len: usize,
        /// The adapter's chunk size.
        chunk: usize,
    },

    /// A partial chunk for a static pool that does not store them.
    #[error(
        "{key:?} is a partial chunk ({len} of {chunk} bytes) and save_unfull_chunk is off; \
         not stored"
    )]
    UnfullChunk {
        /// The key.
        key: ChunkKey,
        /// The page's length.
        len: usize,
        /// The pool's chunk size.
        chunk: usize,
    },

    /// Too many submitted tasks whose results were not collected yet.
    #[error(
        "{limit} submitted tasks are still queued or uncollected; collect results before \
         submitting more"
    )]
    Busy {
        /// Tasks allowed outstanding at once.
        limit: usize,
    },

    /// A key stayed busy (being deleted or recovered) past the time a store waits for it: the
    /// storage under it is slow or stuck.
    #[error("key {key:?} is still being deleted or recovered after {waited:?}; not stored")]
    KeyBusy {
        /// The key.
        key: ChunkKey,
        /// How long the store waited.
        waited: std::time::Duration,
    },

    /// An adapter type is registered twice, or not at all.
    #[error("{0}")]
    Registry(String),

    /// A setting cannot take effect here (a missing feature, a missing size); names the key.
    #[error("{key}: {message}")]
    Setting {
        /// The key, as the user wrote it.
        key: String,
        /// Why, and what to do.
        message: String,
    },

    /// The adapter was closed.
    #[error("the adapter is closed")]
    Closed,
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
