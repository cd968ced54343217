//! Static mode: `pool_size` files opened and registered once, each holding one or more page-sized
//! slots, handed out by a slot allocator. Nothing is reopened per operation. What happens when
//! every slot is taken (evict or refuse) is the adapter's decision.
//!
//! Layout of a slot: the 4 KiB chunk header (full key, payload length, checksums, as in dynamic
//! files) and then the payload, rounded up to 4 KiB. The header goes out in the same batch as
//! the payload, from a small registered header pool, and is checked on every read: a slot that
//! was never written, torn, or now holds another key reads as a miss, never as data.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use nixl_core::header::{self, HEADER_BYTES, MAX_KEY_BYTES};
use nixl_core::{PageView, Registration, StorageExtent, Transport, TransportExt};
use pinned_alloc::{LockMode, PAGE_ALIGN, Page, PagePool, PoolConfig};

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
    /// Bytes of one slot (one chunk); rounded up to 4 KiB on disk, after a 4 KiB header.
    pub slot_bytes: usize,
    /// Payload bytes of each file; a whole number of slots (`slot_bytes` rounded up to 4 KiB).
    /// Each slot also carries its 4 KiB header, so the file is that much longer per slot.
    /// `None`: one slot per file.
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

/// Items per transfer batch; a longer call goes as several batches.
const MAX_BATCH: usize = 64;
/// Header buffers: room for a few batches at once.
const HEADER_PAGES: u64 = 4 * MAX_BATCH as u64;
/// How long a batch waits for header buffers held by other batches.
const HEADER_WAIT: Duration = Duration::from_secs(30);

/// Pre-opened, pre-registered files carved into slots.
#[derive(Debug)]
pub struct StaticFilePool {
    transport: Arc<dyn Transport>,
    files: Vec<Registration>,
    slots_per_file: u64,
    /// Bytes of one slot on disk: header and payload rounded up to 4 KiB.
    stride: u64,
    slot_bytes: usize,
    free: ArrayQueue<SlotId>,
    total: usize,
    direct_io: bool,
    headers: Arc<PagePool>,
    _headers_registration: Registration,
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
        let payload = config.slot_bytes.next_multiple_of(PAGE_ALIGN) as u64;
        let stride = HEADER_BYTES as u64 + payload;
        let payload_per_file = config.file_size.unwrap_or(payload);
        if payload_per_file == 0 || payload_per_file % payload != 0 {
            return Err(Error::Config(format!(
                "file_size ({payload_per_file}) must be a positive multiple of page_size \
                 ({payload})"
            )));
        }
        let slots_per_file = payload_per_file / payload;
        let file_size = slots_per_file * stride;
        let total = config.pool_size as u64 * slots_per_file;
        if total > u64::from(u32::MAX) {
            return Err(Error::Config(format!(
                "{total} slots exceed the supported 2^32"
            )));
        }
        fs::create_dir_all(&config.root).map_err(Error::io("creating", &config.root))?;
        let headers = PoolConfig::new(HEADER_BYTES, HEADER_PAGES * HEADER_BYTES as u64)
            .with_lock(LockMode::BestEffort)
            .build()
            .map_err(|e| Error::Config(format!("header buffers: {e}")))?;
        let headers_registration = transport.register_pool(&headers)?;
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
            slot_bytes: config.slot_bytes,
            free,
            total: total as usize,
            direct_io,
            headers,
            _headers_registration: headers_registration,
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

    /// Where slot `slot` lives (its header; the payload follows it). Slot ids come from
    /// callers, so one outside the pool is an error, not an index out of bounds.
    pub fn extent(&self, slot: SlotId) -> Result<StorageExtent> {
        let file = (u64::from(slot) / self.slots_per_file) as usize;
        let offset = (u64::from(slot) % self.slots_per_file) * self.stride;
        let registration = self.files.get(file).ok_or_else(|| {
            Error::Config(format!(
                "slot {slot} is outside the pool of {} slots",
                self.total
            ))
        })?;
        Ok(StorageExtent::new(registration.dev_id(), offset))
    }

    /// Header buffers for `n` items; waits while other batches hold them all.
    fn header_pages(&self, n: usize) -> Result<Vec<Page>> {
        self.headers
            .allocate_batch_within(n, HEADER_WAIT)
            .map_err(|_| Error::Busy(HEADER_WAIT))
    }

    /// The header and payload extents of `slot`, for a payload of `len` bytes.
    fn slot_extents(&self, key: &[u8], len: usize, slot: SlotId) -> Result<[StorageExtent; 2]> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(Error::InvalidKey {
                reason: format!("a slot key must be 1 to {MAX_KEY_BYTES} bytes"),
            });
        }
        if len > self.slot_bytes {
            return Err(Error::Config(format!(
                "a chunk of {len} bytes does not fit slots of {} (slot {slot})",
                self.slot_bytes
            )));
        }
        let head = self.extent(slot)?;
        let body = StorageExtent::new(head.dev_id, head.offset + HEADER_BYTES as u64);
        Ok([head, body])
    }

    /// Writes each page, after the header of its key (canonical bytes), into its slot.
    /// An error fails every item of the call.
    pub fn write(&self, items: &[(&[u8], &Page, SlotId)]) -> Result<()> {
        for piece in items.chunks(MAX_BATCH) {
            let mut headers = self.header_pages(piece.len())?;
            let mut extents = Vec::with_capacity(piece.len());
            for ((key, page, slot), head) in piece.iter().zip(headers.iter_mut()) {
                extents.push(self.slot_extents(key, page.len(), *slot)?);
                header::write(head.as_mut_slice(), key, page.as_slice()).map_err(|refusal| {
                    Error::InvalidKey {
                        reason: refusal.to_string(),
                    }
                })?;
            }
            let batch: Vec<_> = piece
                .iter()
                .zip(&headers)
                .zip(&extents)
                .flat_map(|(((_, page, _), head), [at_head, at_body])| {
                    [(head, *at_head), (*page, *at_body)]
                })
                .collect();
            let written = self.transport.write_pages(&batch, PageView::Padded);
            drop(batch);
            if let Err(err) = written {
                return Err(err.into());
            }
        }
        Ok(())
    }

    /// Reads each slot into its page (whose length is the payload expected); per item whether
    /// the slot's header names that key and length and the payload matches its checksum.
    /// An error fails every item of the call.
    pub fn read(&self, items: &mut [(&[u8], &mut Page, SlotId)]) -> Result<Vec<bool>> {
        let mut verdicts = Vec::with_capacity(items.len());
        for piece in items.chunks_mut(MAX_BATCH) {
            let mut headers = self.header_pages(piece.len())?;
            let mut extents = Vec::with_capacity(piece.len());
            for (key, page, slot) in piece.iter() {
                extents.push(self.slot_extents(key, page.len(), *slot)?);
            }
            let mut batch: Vec<_> = piece
                .iter_mut()
                .zip(headers.iter_mut())
                .zip(&extents)
                .flat_map(|(((_, page, _), head), [at_head, at_body])| {
                    [(head, *at_head), (&mut **page, *at_body)]
                })
                .collect();
            let read = self.transport.read_pages(&mut batch, PageView::Padded);
            drop(batch);
            if let Err(err) = read {
                return Err(err.into());
            }
            for ((key, page, slot), head) in piece.iter().zip(&headers) {
                let verdict = header::verify(head.as_slice(), key, page.as_slice());
                if let Err(refusal) = &verdict {
                    tracing::debug!(slot, %refusal, "static slot read as a miss");
                }
                verdicts.push(verdict.is_ok());
            }
        }
        Ok(verdicts)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::Arc;

    use super::{StaticConfig, StaticFilePool};
    use crate::{UringConfig, UringTransport};

    #[test]
    fn a_slot_outside_the_pool_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let transport = Arc::new(UringTransport::new(UringConfig::default()).unwrap());
        let pool = StaticFilePool::open(transport, StaticConfig::new(dir.path(), 2, 4096)).unwrap();
        assert!(pool.extent(1).is_ok());
        let err = pool.extent(2).unwrap_err();
        assert!(err.to_string().contains("slot 2"), "{err}");
    }
}
