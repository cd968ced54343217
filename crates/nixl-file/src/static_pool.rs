//! Static mode: `pool_size` files opened and registered once, each holding one or more page-sized
//! slots, handed out by a slot allocator. Nothing is reopened per operation. What happens when
//! every slot is taken (evict or refuse) is the adapter's decision.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use nixl_core::{Registration, StorageExtent, Transport};
use pinned_alloc::{PAGE_ALIGN, Page};

use crate::error::{Error, Result};
use crate::open::{FileOptions, open_storage_file};

/// Configuration of a [`StaticFilePool`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StaticConfig {
    /// The folder of the pool files.
    pub root: PathBuf,
    /// Number of files.
    pub pool_size: usize,
    /// Bytes of one slot (one chunk); rounded up to 4 KiB on disk.
    pub slot_bytes: usize,
    /// Bytes of each file; a whole number of slots. `None`: one slot per file.
    pub file_size: Option<u64>,
    /// Open the files with `O_DIRECT` (falls back to buffered where the folder refuses it).
    pub direct_io: bool,
}

impl StaticConfig {
    /// `pool_size` files of one `slot_bytes` slot each, buffered.
    pub fn new(root: impl Into<PathBuf>, pool_size: usize, slot_bytes: usize) -> Self {
        Self {
            root: root.into(),
            pool_size,
            slot_bytes,
            file_size: None,
            direct_io: false,
        }
    }

    /// Several slots per file.
    pub fn with_file_size(mut self, bytes: u64) -> Self {
        self.file_size = Some(bytes);
        self
    }

    /// Asks for `O_DIRECT`.
    pub fn with_direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }
}

/// A slot of the pool: which file and where in it.
pub type SlotId = u32;

/// Pre-opened, pre-registered files carved into slots.
#[derive(Debug)]
pub struct StaticFilePool {
    transport: Arc<dyn Transport>,
    files: Vec<Registration>,
    slots_per_file: u64,
    stride: u64,
    free: ArrayQueue<SlotId>,
    total: usize,
    direct_io: bool,
}

impl StaticFilePool {
    /// Opens (creating and preallocating) every file of the pool and registers each once.
    /// A failure part-way closes and deregisters everything opened so far.
    pub fn open(transport: Arc<dyn Transport>, config: StaticConfig) -> Result<Self> {
        if config.pool_size == 0 || config.slot_bytes == 0 {
            return Err(Error::Config(
                "pool_size and the slot size must both be positive".to_owned(),
            ));
        }
        let stride = config.slot_bytes.next_multiple_of(PAGE_ALIGN) as u64;
        let file_size = config.file_size.unwrap_or(stride);
        if file_size % stride != 0 {
            return Err(Error::Config(format!(
                "file_size ({file_size}) must be a multiple of page_size ({stride})"
            )));
        }
        let slots_per_file = file_size / stride;
        let total = config.pool_size as u64 * slots_per_file;
        if total > u64::from(u32::MAX) {
            return Err(Error::Config(format!(
                "{total} slots exceed the supported 2^32"
            )));
        }
        fs::create_dir_all(&config.root).map_err(Error::io("creating", &config.root))?;
        let direct_io = config.direct_io
            && nixl_core::direct_io_supported(&config.root).map_err(Error::Transport)?;
        let mut files = Vec::with_capacity(config.pool_size);
        for i in 0..config.pool_size {
            let path = config.root.join(format!("pool-{i:05}.bin"));
            let file = open_storage_file(
                &path,
                FileOptions::new()
                    .with_direct_io(direct_io)
                    .with_preallocate(file_size),
            )?;
            files.push(transport.register_file(Arc::new(file))?);
        }
        let free = ArrayQueue::new(total as usize);
        for slot in 0..total as SlotId {
            let _ = free.push(slot);
        }
        Ok(Self {
            transport,
            files,
            slots_per_file,
            stride,
            free,
            total: total as usize,
            direct_io,
        })
    }

    /// Slots in the pool.
    pub fn total_slots(&self) -> usize {
        self.total
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Whether the files were opened with `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Takes `n` slots, all or none.
    pub fn allocate(&self, n: usize) -> Option<Vec<SlotId>> {
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            match self.free.pop() {
                Some(slot) => slots.push(slot),
                None => {
                    self.release(slots);
                    return None;
                }
            }
        }
        Some(slots)
    }

    /// Gives slots back.
    pub fn release(&self, slots: impl IntoIterator<Item = SlotId>) {
        for slot in slots {
            if self.free.push(slot).is_err() {
                tracing::error!(slot, "slot released twice");
            }
        }
    }

    /// Where slot `slot` lives.
    pub fn extent(&self, slot: SlotId) -> StorageExtent {
        let file = (u64::from(slot) / self.slots_per_file) as usize;
        let offset = (u64::from(slot) % self.slots_per_file) * self.stride;
        StorageExtent::new(self.files[file].dev_id(), offset)
    }

    /// Writes each page into its slot, as one batch.
    pub fn write(&self, items: &[(&Page, SlotId)]) -> Result<()> {
        let batch: Vec<_> = items
            .iter()
            .map(|(page, slot)| (page.io_slice(), self.extent(*slot)))
            .collect();
        Ok(self.transport.write(&batch)?)
    }

    /// Reads each slot into its page, as one batch.
    pub fn read(&self, items: &mut [(&mut Page, SlotId)]) -> Result<()> {
        let mut batch: Vec<_> = items
            .iter_mut()
            .map(|(page, slot)| {
                let extent = self.extent(*slot);
                (page.io_slice_mut(), extent)
            })
            .collect();
        Ok(self.transport.read(&mut batch)?)
    }
}
