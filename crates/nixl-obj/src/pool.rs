//! Static mode: `pool_size` object slots registered once, written whole, read by range.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use nixl_core::{Registration, StorageExtent, Transport};
use pinned_alloc::Page;

use crate::error::{Error, Result};

/// A pool of objects whose ids are this process's own: a random 32-bit prefix and the slot index
/// (the reference names static objects per process too; nothing survives a restart).
#[derive(Debug)]
pub struct StaticObjectPool {
    transport: Arc<dyn Transport>,
    slots: Vec<Registration>,
    slot_bytes: usize,
}

impl StaticObjectPool {
    /// Registers `pool_size` objects of `slot_bytes` each.
    pub fn open(transport: Arc<dyn Transport>, pool_size: u32, slot_bytes: usize) -> Result<Self> {
        if pool_size == 0 || slot_bytes == 0 {
            return Err(Error::Config(
                "pool_size and the slot size must both be positive".to_owned(),
            ));
        }
        let prefix = (RandomState::new().build_hasher().finish() >> 32) << 32;
        let slots = (0..pool_size)
            .map(|i| transport.register_object(prefix | u64::from(i), slot_bytes))
            .collect::<nixl_core::Result<Vec<_>>>()?;
        Ok(Self {
            transport,
            slots,
            slot_bytes,
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

    fn extent(&self, slot: u32) -> Result<StorageExtent> {
        self.slots
            .get(slot as usize)
            .map(|r| StorageExtent::new(r.dev_id(), 0))
            .ok_or_else(|| Error::Config(format!("slot {slot} is outside the pool")))
    }

    /// Writes each page as the whole object of its slot, in one batch.
    pub fn write(&self, items: &[(&Page, u32)]) -> Result<()> {
        let batch = items
            .iter()
            .map(|(page, slot)| {
                if page.len() > self.slot_bytes {
                    return Err(Error::Config(format!(
                        "a chunk of {} bytes does not fit slots of {}",
                        page.len(),
                        self.slot_bytes
                    )));
                }
                Ok((page.as_slice(), self.extent(*slot)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.transport.write(&batch)?)
    }

    /// Reads each slot into its page, in one batch.
    pub fn read(&self, items: &mut [(&mut Page, u32)]) -> Result<()> {
        let mut batch = Vec::with_capacity(items.len());
        for (page, slot) in items.iter_mut() {
            let extent = self.extent(*slot)?;
            batch.push((page.as_mut_slice(), extent));
        }
        Ok(self.transport.read(&mut batch)?)
    }
}
