//! Static mode: `pool_size` object slots registered once, written whole, read by range.
//!
//! Each slot object is the 4 KiB chunk header (full key, payload length, checksums) followed by
//! the payload, as dynamic objects are: a slot never written, torn, or now holding another key
//! reads as a miss, never as data. Objects are written whole, so a write copies header and
//! payload into one registered staging buffer; reads are ranged, the header into a registered
//! header buffer and the payload straight into the caller's page.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use nixl_core::header::{self, HEADER_BYTES, MAX_KEY_BYTES};
use nixl_core::{
    Direction, PageBatch, PageView, Registration, StorageExtent, Transport, TransportExt,
};
use pinned_alloc::{LockMode, Page, PagePool, PoolConfig};

use crate::error::{Error, Result};

/// Items per transfer batch; a longer call goes as several batches.
const MAX_BATCH: usize = 16;
/// Staging and header buffers: room for a few batches at once.
const BUFFERS: u64 = 4 * MAX_BATCH as u64;
/// How long a batch waits for buffers held by other batches.
const BUFFER_WAIT: Duration = Duration::from_secs(30);

/// A pool of objects whose ids are this process's own: a random 32-bit prefix and the slot index
/// (the reference names static objects per process too; nothing survives a restart).
#[derive(Debug)]
pub struct StaticObjectPool {
    transport: Arc<dyn Transport>,
    slots: Vec<Registration>,
    slot_bytes: usize,
    /// Header + payload, contiguous: objects are written and read whole, so the caller's pages
    /// are never handed to the plugin (whose SDK may go on using a failed batch's memory).
    staging: Arc<PagePool>,
    _registration: Registration,
}

/// The error of a batch whose buffers did not come free in time.
fn no_buffer(err: pinned_alloc::Error) -> Error {
    Error::Config(format!(
        "no slot buffer came free within {BUFFER_WAIT:?}: {err}"
    ))
}

impl StaticObjectPool {
    /// Registers `pool_size` objects of a header and `slot_bytes` each, and the buffers that
    /// stage them.
    pub fn open(transport: Arc<dyn Transport>, pool_size: u32, slot_bytes: usize) -> Result<Self> {
        if pool_size == 0 || slot_bytes == 0 {
            return Err(Error::Config(
                "pool_size and the slot size must both be positive".to_owned(),
            ));
        }
        let object_bytes = HEADER_BYTES + slot_bytes;
        let staging = PoolConfig::new(
            object_bytes,
            BUFFERS * object_bytes.next_multiple_of(4096) as u64,
        )
        .with_lock(LockMode::BestEffort)
        .build()
        .map_err(|e| Error::Config(format!("staging buffers: {e}")))?;
        let registration = transport.register_pool(&staging)?;
        let prefix = (RandomState::new().build_hasher().finish() >> 32) << 32;
        let slots = (0..pool_size)
            .map(|i| transport.register_object(prefix | u64::from(i), object_bytes))
            .collect::<nixl_core::Result<Vec<_>>>()?;
        Ok(Self {
            transport,
            slots,
            slot_bytes,
            staging,
            _registration: registration,
        })
    }

    /// Slots in the pool.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the pool has no slot (never: it holds at least one).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The object of `slot`, checked: the key and length must fit it.
    fn extent(&self, key: &[u8], len: usize, slot: u32) -> Result<StorageExtent> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(Error::InvalidKey(format!(
                "a slot key must be 1 to {MAX_KEY_BYTES} bytes, got {}",
                key.len()
            )));
        }
        if len > self.slot_bytes {
            return Err(Error::Config(format!(
                "a chunk of {len} bytes does not fit slots of {} (slot {slot})",
                self.slot_bytes
            )));
        }
        self.slots
            .get(slot as usize)
            .map(|r| StorageExtent::new(r.dev_id(), 0))
            .ok_or_else(|| Error::Config(format!("slot {slot} is outside the pool")))
    }

    /// Writes each page, after the header of its key (canonical bytes), as the whole object of
    /// its slot. An error fails every item of the call.
    pub fn write(&self, items: &[(&[u8], &Page, u32)]) -> Result<()> {
        for piece in items.chunks(MAX_BATCH) {
            let mut staging = self
                .staging
                .allocate_batch_within(piece.len(), BUFFER_WAIT)
                .map_err(no_buffer)?;
            let mut extents = Vec::with_capacity(piece.len());
            for ((key, page, slot), buffer) in piece.iter().zip(staging.iter_mut()) {
                extents.push(self.extent(key, page.len(), *slot)?);
                buffer.set_len(HEADER_BYTES + page.len());
                let (head, body) = buffer.as_mut_slice().split_at_mut(HEADER_BYTES);
                header::write(head, key, page.as_slice())
                    .map_err(|refusal| Error::InvalidKey(refusal.to_string()))?;
                body.copy_from_slice(page.as_slice());
            }
            // The batch owns the staging buffers: after a failure the transport keeps those the
            // plugin may still read, and they come back to the pool once it can no longer.
            let batch: PageBatch = staging.into_iter().zip(extents).collect();
            if let (_, Err(err)) = self.transport.submit(Direction::Write, batch).wait() {
                nixl_core::count_failed_transfer(Direction::Write);
                return Err(Error::Batch(Arc::new(err)));
            }
        }
        Ok(())
    }

    /// Reads each slot into its page (whose length is the payload expected); per item whether
    /// the slot's header names that key and length and the payload matches its checksum.
    /// An error fails every item of the call.
    pub fn read(&self, items: &mut [(&[u8], &mut Page, u32)]) -> Result<Vec<bool>> {
        let mut verdicts = Vec::with_capacity(items.len());
        for piece in items.chunks_mut(MAX_BATCH) {
            let mut staging = self
                .staging
                .allocate_batch_within(piece.len(), BUFFER_WAIT)
                .map_err(no_buffer)?;
            let mut batch = Vec::with_capacity(piece.len());
            for ((key, page, slot), buffer) in piece.iter().zip(staging.iter_mut()) {
                let extent = self.extent(key, page.len(), *slot)?;
                buffer.set_len(HEADER_BYTES + page.len());
                batch.push((buffer, extent));
            }
            let read = self.transport.read_pages(&mut batch, PageView::Exact);
            drop(batch);
            if let Err(err) = read {
                return Err(Error::Batch(Arc::new(err)));
            }
            for ((key, page, slot), buffer) in piece.iter_mut().zip(&staging) {
                let (head, body) = buffer.as_slice().split_at(HEADER_BYTES);
                let verdict = header::verify(head, key, body);
                match &verdict {
                    Ok(()) => page.as_mut_slice().copy_from_slice(body),
                    Err(refusal) => {
                        tracing::debug!(slot, %refusal, "static object slot read as a miss")
                    }
                }
                verdicts.push(verdict.is_ok());
            }
        }
        Ok(verdicts)
    }
}
