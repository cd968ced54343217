//! The adapter contract, as LMCache's L2 adapter interface defines it, in blocking form.

use std::collections::BTreeMap;
use std::fmt::Debug;

use pinned_alloc::Page;

use crate::error::Result;
use crate::keys::ChunkKey;

/// What happened to one key of a store.
#[derive(Debug)]
#[non_exhaustive]
pub enum KeyOutcome {
    /// Written now.
    Stored {
        /// Bytes written.
        bytes: u64,
    },
    /// Accepted for a background write (`nixl_async_put`), capacity reserved: the key stays
    /// absent to lookups until written. A failure then is logged with the key, which stays
    /// absent.
    Queued {
        /// Bytes to be written.
        bytes: u64,
    },
    /// Already stored (or being stored by another task): nothing written.
    AlreadyPresent,
    /// Not written, and why (capacity, a failed batch, a bad key).
    Failed(crate::error::Error),
}

impl KeyOutcome {
    /// Whether the key is stored after this call, or accepted to be ([`KeyOutcome::Queued`]).
    pub fn is_stored(&self) -> bool {
        !matches!(self, KeyOutcome::Failed(_))
    }

    /// Whether the key was refused for want of room: the adapter's capacity, a full static
    /// pool, no free segment, or a full disk. Eviction can make room for it.
    pub fn is_refused_for_room(&self) -> bool {
        matches!(
            self,
            KeyOutcome::Failed(
                crate::error::Error::CapacityExceeded { .. }
                    | crate::error::Error::PoolFull { .. }
                    | crate::error::Error::File(
                        nixl_file::Error::NoSpace { .. } | nixl_file::Error::DiskFull { .. }
                    )
            )
        )
    }
}

/// The page of key `i` of a store, or the outcome of a key that has none (more keys than
/// pages) or whose page was retired by a failed transfer.
pub(crate) fn page_of<'a>(
    keys: &[ChunkKey],
    pages: &[&'a Page],
    i: usize,
) -> std::result::Result<&'a Page, KeyOutcome> {
    let key = || keys[i].clone();
    match pages.get(i) {
        None => Err(KeyOutcome::Failed(crate::error::Error::LengthMismatch {
            key: key(),
            keys: keys.len(),
            pages: pages.len(),
        })),
        Some(page) if page.is_abandoned() => {
            Err(KeyOutcome::Failed(crate::error::Error::PageRetired {
                key: key(),
            }))
        }
        Some(page) => Ok(page),
    }
}

/// The result of one store task: per key, plus the task's verdict as LMCache reports it.
#[derive(Debug)]
#[non_exhaustive]
pub struct StoreReport {
    /// One outcome per key, in order.
    pub keys: Vec<KeyOutcome>,
}

impl StoreReport {
    /// A report of these outcomes, one per key in order (for implementers of [`L2Adapter`]).
    pub fn new(keys: Vec<KeyOutcome>) -> Self {
        Self { keys }
    }

    /// A report of outcomes decided per key, where a key left undecided was already present.
    pub(crate) fn already_present_unless(outcomes: Vec<Option<KeyOutcome>>) -> Self {
        Self::new(
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or(KeyOutcome::AlreadyPresent))
                .collect(),
        )
    }

    /// Bytes written by this task.
    pub fn bytes(&self) -> u64 {
        self.keys
            .iter()
            .map(|k| match k {
                KeyOutcome::Stored { bytes } => *bytes,
                _ => 0,
            })
            .sum()
    }

    /// Whether every key is stored (LMCache's `L2StoreResult.is_successful()`).
    pub fn is_successful(&self) -> bool {
        self.keys.iter().all(KeyOutcome::is_stored)
    }
}

/// Bytes in use and where.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Usage {
    /// Bytes stored, and bytes of writes in flight (queued background puts among them): what
    /// capacity and eviction must count.
    pub used_bytes: u64,
    /// Capacity, 0 when unknown or unlimited (object stores).
    pub capacity_bytes: u64,
    /// Bytes per cache salt (`""` for unsalted keys).
    pub bytes_by_salt: BTreeMap<String, u64>,
    /// Keys stored.
    pub keys: usize,
    /// Keys pinned.
    pub pinned: usize,
}

impl Usage {
    /// `used / capacity`, or -1.0 when the capacity is unknown (LMCache's convention).
    pub fn fraction(&self) -> f64 {
        if self.capacity_bytes == 0 {
            -1.0
        } else {
            self.used_bytes as f64 / self.capacity_bytes as f64
        }
    }

    /// Whether global eviction means anything here (a known capacity).
    pub fn supports_global_eviction(&self) -> bool {
        self.capacity_bytes > 0
    }
}

/// Health and identity, for `report_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Whether the adapter serves requests.
    pub is_healthy: bool,
    /// `nixl_store`, `nixl_store_dynamic`, or a downstream type.
    pub adapter_type: String,
    /// The storage backend (`POSIX`, `OBJ`, …).
    pub backend: String,
    /// Keys stored.
    pub stored_object_count: usize,
    /// Keys pinned.
    pub pinned_object_count: usize,
}

impl Status {
    /// A healthy adapter's status (for implementers of [`L2Adapter`]).
    pub fn new(
        adapter_type: impl Into<String>,
        backend: impl Into<String>,
        stored_object_count: usize,
        pinned_object_count: usize,
    ) -> Self {
        Self {
            is_healthy: true,
            adapter_type: adapter_type.into(),
            backend: backend.into(),
            stored_object_count,
            pinned_object_count,
        }
    }
}

/// What one eviction pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct EvictionReport {
    /// Keys deleted.
    pub evicted: usize,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Candidates skipped because they were pinned.
    pub skipped_pinned: usize,
}

/// An L2 store of KV chunks.
///
/// # Contract
///
/// - A key MUST NOT be reported present (by [`lookup_and_pin`](L2Adapter::lookup_and_pin) or
///   [`batched_contains`](L2Adapter::batched_contains)) before its data is completely stored,
///   nor after a failed store of it.
/// - [`load`](L2Adapter::load) MUST NOT report success for data that does not check out.
/// - [`delete`](L2Adapter::delete) and eviction MUST skip pinned keys.
/// - Usage MUST never go negative and MUST match what is indexed plus what is being written.
/// - Every method is safe to call from several threads at once.
pub trait L2Adapter: Send + Sync + Debug + 'static {
    /// Stores pages under keys, in order; per-key outcomes.
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport;

    /// Which keys are present; each hit is pinned until [`unlock`](L2Adapter::unlock).
    fn lookup_and_pin(&self, keys: &[ChunkKey]) -> Vec<bool>;

    /// Releases one pin of each key; unknown keys are ignored.
    fn unlock(&self, keys: &[ChunkKey]);

    /// Loads keys into pages (each page's length is the expected chunk size); per-key success.
    fn load(&self, keys: &[ChunkKey], pages: &mut [&mut Page]) -> Vec<bool>;

    /// Deletes keys, skipping pinned ones; returns how many were deleted.
    fn delete(&self, keys: &[ChunkKey]) -> usize;

    /// How many keys, from the first, are present (prefix semantics).
    fn batched_contains(&self, keys: &[ChunkKey]) -> usize;

    /// The stored size of a key, if present: how long a page must be to load it.
    fn stored_size(&self, key: &ChunkKey) -> Option<u64>;

    /// Bytes in use.
    fn usage(&self) -> Usage;

    /// One LRU pass: deletes the least recently used `ratio` of the keys (of `salt` only, when
    /// given), skipping pinned ones.
    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport;

    /// Health and counts.
    fn status(&self) -> Status;

    /// Finishes background work and, without persistence, deletes what this adapter stored.
    fn close(&self) -> Result<()>;
}
