//! The transport contract every storage engine implements.

use std::fmt::Debug;
use std::fs::File;
use std::sync::Arc;

use pinned_alloc::MemoryRegion;

use crate::error::Result;

/// Where one chunk lives in storage: the registered device id (a file descriptor for file
/// backends) and the byte offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StorageExtent {
    /// Device id of a live storage registration ([`Registration::dev_id`]).
    pub dev_id: u64,
    /// Byte offset inside the storage item.
    pub offset: u64,
}

impl StorageExtent {
    /// The extent at `offset` of the storage item registered as `dev_id`.
    pub fn new(dev_id: u64, offset: u64) -> Self {
        Self { dev_id, offset }
    }
}

/// A live registration of memory or storage. Dropping it deregisters.
#[derive(Debug)]
pub struct Registration {
    dev_id: u64,
    _guard: Box<dyn Debug + Send + Sync>,
}

impl Registration {
    /// Wraps an implementation's guard, whose `Drop` deregisters. For implementers of
    /// [`Transport`].
    pub fn new(dev_id: u64, guard: Box<dyn Debug + Send + Sync>) -> Self {
        Self {
            dev_id,
            _guard: guard,
        }
    }

    /// The device id transfers name this registration by.
    pub fn dev_id(&self) -> u64 {
        self.dev_id
    }
}

/// Moves KV chunks between registered host memory and registered storage.
///
/// # Contract
///
/// - Implementations MUST refuse (with an error, never undefined behaviour) a transfer whose
///   host buffer does not lie wholly inside memory registered with [`register_memory`], or whose
///   [`StorageExtent::dev_id`] is not a live storage registration.
/// - [`write`] and [`read`] MUST NOT return before the whole batch is complete or has failed;
///   the caller's buffers stay borrowed until then.
/// - A failed batch MUST be reported as an error for the whole batch: callers treat every chunk
///   in it as missing.
/// - Dropping a [`Registration`] MUST deregister it, and MUST keep the memory or storage it
///   covers alive until then.
///
/// [`register_memory`]: Transport::register_memory
/// [`write`]: Transport::write
/// [`read`]: Transport::read
pub trait Transport: Send + Sync + Debug + 'static {
    /// Name of the storage backend (`POSIX`, `GDS_MT`, `OBJ`, …).
    fn backend(&self) -> &str;

    /// Registers a host memory region once; transfers may then use any buffer inside it.
    fn register_memory(&self, region: Arc<dyn MemoryRegion>) -> Result<Registration>;

    /// Registers an open file as storage; its device id is the file descriptor.
    fn register_file(&self, file: Arc<File>) -> Result<Registration>;

    /// Writes every buffer to its extent, as one batch.
    fn write(&self, batch: &[(&[u8], StorageExtent)]) -> Result<()>;

    /// Reads every extent into its buffer, as one batch.
    fn read(&self, batch: &mut [(&mut [u8], StorageExtent)]) -> Result<()>;
}
