//! `nixl_store`: a fixed pool of slots registered once; when it is full, the least recently used
//! unpinned keys make room at store time, and a batch nothing can make room for is refused.

use std::fmt::Debug;
use std::sync::{Mutex, MutexGuard};

use nixl_file::StaticFilePool;
use nixl_obj::StaticObjectPool;
use pinned_alloc::Page;

use crate::adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::keys::ChunkKey;

/// Slots under a [`StaticAdapter`].
pub trait SlotStorage: Send + Sync + Debug + 'static {
    /// Slots in the pool.
    fn slots(&self) -> usize;

    /// Writes each page into its slot, as one batch.
    fn write(&self, items: &[(&Page, u32)]) -> Result<()>;

    /// Reads each slot into its page, as one batch.
    fn read(&self, items: &mut [(&mut Page, u32)]) -> Result<()>;
}

impl SlotStorage for StaticFilePool {
    fn slots(&self) -> usize {
        self.total_slots()
    }

    fn write(&self, items: &[(&Page, u32)]) -> Result<()> {
        Ok(StaticFilePool::write(self, items)?)
    }

    fn read(&self, items: &mut [(&mut Page, u32)]) -> Result<()> {
        Ok(StaticFilePool::read(self, items)?)
    }
}

impl SlotStorage for StaticObjectPool {
    fn slots(&self) -> usize {
        self.len()
    }

    fn write(&self, items: &[(&Page, u32)]) -> Result<()> {
        Ok(StaticObjectPool::write(self, items)?)
    }

    fn read(&self, items: &mut [(&mut Page, u32)]) -> Result<()> {
        Ok(StaticObjectPool::read(self, items)?)
    }
}

#[derive(Debug)]
struct State {
    index: Index,
    /// Free slots; the last pushed is taken first.
    free: Vec<u32>,
    closed: bool,
}

/// The static adapter.
#[derive(Debug)]
pub struct StaticAdapter {
    storage: Box<dyn SlotStorage>,
    backend: String,
    slot_bytes: u64,
    state: Mutex<State>,
}

impl StaticAdapter {
    /// An adapter over `storage`, whose slots hold `slot_bytes` each.
    pub fn new(storage: Box<dyn SlotStorage>, backend: impl Into<String>, slot_bytes: u64) -> Self {
        let free = (0..storage.slots() as u32).rev().collect();
        Self {
            storage,
            backend: backend.into(),
            slot_bytes,
            state: Mutex::new(State {
                index: Index::default(),
                free,
                closed: false,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees up to `needed` slots by evicting the least recently used unpinned keys.
    fn make_room(state: &mut State, needed: usize) {
        for key in state.index.oldest(None) {
            if state.free.len() >= needed {
                break;
            }
            for (key, entry) in state.index.remove_unpinned(std::slice::from_ref(&key)) {
                tracing::debug!(key = ?key, "evicted to make room in the static pool");
                state.free.push(entry.slot);
            }
        }
    }
}

impl L2Adapter for StaticAdapter {
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        let mut outcomes: Vec<Option<KeyOutcome>> = (0..keys.len()).map(|_| None).collect();
        let mut todo: Vec<(usize, u32)> = Vec::new();
        {
            let mut state = self.state();
            let mut fresh = Vec::new();
            for (i, (key, page)) in keys.iter().zip(pages).enumerate() {
                if state.closed {
                    outcomes[i] = Some(KeyOutcome::Failed(Error::Closed));
                } else if page.len() as u64 > self.slot_bytes {
                    outcomes[i] = Some(KeyOutcome::Failed(Error::PageSize {
                        len: page.len(),
                        chunk: self.slot_bytes as usize,
                    }));
                } else if state.index.contains(key) || state.index.inflight.contains(key) {
                    outcomes[i] = Some(KeyOutcome::AlreadyPresent);
                } else {
                    fresh.push(i);
                }
            }
            if state.free.len() < fresh.len() {
                Self::make_room(&mut state, fresh.len());
            }
            if state.free.len() < fresh.len() {
                tracing::warn!("No eviction candidates found. Backend under pressure.");
                let total = self.storage.slots();
                for &i in &fresh {
                    outcomes[i] = Some(KeyOutcome::Failed(Error::PoolFull {
                        needed: fresh.len(),
                        total,
                    }));
                }
                fresh.clear();
            }
            for i in fresh {
                let slot = state.free.pop().unwrap_or_default();
                state.index.inflight.insert(keys[i].clone());
                todo.push((i, slot));
            }
        }
        if !todo.is_empty() {
            let items: Vec<_> = todo.iter().map(|&(i, slot)| (pages[i], slot)).collect();
            let result = self.storage.write(&items).map_err(std::sync::Arc::new);
            let mut state = self.state();
            for &(i, slot) in &todo {
                state.index.inflight.remove(&keys[i]);
                outcomes[i] = Some(match &result {
                    Ok(()) => {
                        let bytes = pages[i].len() as u64;
                        state.index.insert(keys[i].clone(), bytes, slot);
                        KeyOutcome::Stored { bytes }
                    }
                    Err(err) => {
                        state.free.push(slot);
                        KeyOutcome::Failed(Error::Batch(std::sync::Arc::clone(err)))
                    }
                });
            }
        }
        StoreReport::already_present_unless(outcomes)
    }

    fn lookup_and_pin(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let mut state = self.state();
        keys.iter()
            .map(|key| {
                if state.index.inflight.contains(key) || !state.index.pin(key) {
                    return false;
                }
                state.index.touch(key);
                true
            })
            .collect()
    }

    fn unlock(&self, keys: &[ChunkKey]) {
        let mut state = self.state();
        for key in keys {
            state.index.unpin(key);
        }
    }

    fn load(&self, keys: &[ChunkKey], pages: &mut [&mut Page]) -> Vec<bool> {
        let mut found = vec![false; keys.len()];
        let mut items = Vec::new();
        {
            let mut state = self.state();
            for (i, (key, page)) in keys.iter().zip(pages.iter_mut()).enumerate() {
                if let Some(entry) = state.index.get(key).copied() {
                    page.set_len(entry.size as usize);
                    items.push((&mut **page, entry.slot));
                    found[i] = true;
                    state.index.touch(key);
                }
            }
        }
        if let Err(err) = self.storage.read(&mut items) {
            tracing::warn!(error = %err, "NIXL load task failed");
            return vec![false; keys.len()];
        }
        found
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        let mut state = self.state();
        let removed = state.index.remove_unpinned(keys);
        for (_, entry) in &removed {
            state.free.push(entry.slot);
        }
        removed.len()
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        let state = self.state();
        keys.iter()
            .take_while(|k| state.index.contains(k) && !state.index.inflight.contains(*k))
            .count()
    }

    fn stored_size(&self, key: &ChunkKey) -> Option<u64> {
        let state = self.state();
        if state.index.inflight.contains(key) {
            return None;
        }
        state.index.get(key).map(|e| e.size)
    }

    fn usage(&self) -> Usage {
        self.state()
            .index
            .usage(self.storage.slots() as u64 * self.slot_bytes)
    }

    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        let (candidates, skipped_pinned) = self.state().index.eviction_candidates(ratio, salt);
        let before = self.state().index.used();
        let evicted = self.delete(&candidates);
        EvictionReport {
            evicted,
            freed_bytes: before.saturating_sub(self.state().index.used()),
            skipped_pinned,
        }
    }

    fn status(&self) -> Status {
        let state = self.state();
        let usage = state.index.usage(0);
        Status {
            is_healthy: !state.closed,
            adapter_type: kv_config::NIXL_STORE.to_owned(),
            backend: self.backend.clone(),
            stored_object_count: usage.keys,
            pinned_object_count: usage.pinned,
        }
    }

    fn close(&self) -> Result<()> {
        self.state().closed = true;
        Ok(())
    }
}
