//! `nixl_store_dynamic`: one file or object per key, capacity reserved before writing, lazy
//! recovery after a restart, presence cache, optional background puts.

use std::collections::HashSet;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kv_config::PresenceCache;
use pinned_alloc::Page;

use crate::adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::keys::ChunkKey;
use crate::storage::ChunkStorage;

/// Options of a [`DynamicAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DynamicOptions {
    /// The backend's name, for status reports.
    pub backend: String,
    /// Capacity in bytes; `None` for unlimited (object stores).
    pub capacity_bytes: Option<u64>,
    /// How existence checks use local knowledge.
    pub presence_cache: PresenceCache,
    /// Keep data on close.
    pub persist: bool,
    /// Depth of the background put queue (`nixl_async_put`); 0 disables it.
    pub async_queue: usize,
}

impl DynamicOptions {
    /// Unlimited, no presence cache, persistent, synchronous.
    pub fn new(backend: impl Into<String>) -> Self {
        Self {
            backend: backend.into(),
            capacity_bytes: None,
            presence_cache: PresenceCache::Off,
            persist: true,
            async_queue: 0,
        }
    }

    /// Sets the capacity.
    pub fn with_capacity(mut self, bytes: Option<u64>) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// Sets the presence cache mode.
    pub fn with_presence_cache(mut self, mode: PresenceCache) -> Self {
        self.presence_cache = mode;
        self
    }

    /// Keeps or deletes data on close.
    pub fn with_persist(mut self, persist: bool) -> Self {
        self.persist = persist;
        self
    }

    /// Enables background puts with a queue of `depth` batches.
    pub fn with_async_queue(mut self, depth: usize) -> Self {
        self.async_queue = depth;
        self
    }
}

#[derive(Debug, Default)]
struct State {
    index: Index,
    /// Keys known to exist in storage (presence cache), beyond the index.
    present: HashSet<ChunkKey>,
    closed: bool,
}

struct Shared {
    storage: Box<dyn ChunkStorage>,
    options: DynamicOptions,
    state: Mutex<State>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicAdapter")
            .field("storage", &self.storage)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

struct AsyncJob {
    keys: Vec<ChunkKey>,
    pages: Vec<Page>,
}

/// The dynamic adapter.
#[derive(Debug)]
pub struct DynamicAdapter {
    shared: Arc<Shared>,
    queue: Mutex<Option<(SyncSender<AsyncJob>, JoinHandle<()>)>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn capacity(&self) -> u64 {
        self.options.capacity_bytes.unwrap_or(0)
    }

    /// Phase 1 of a store: skip what is stored or in flight, reserve capacity key by key and stop
    /// at the first key that does not fit (the reference's behaviour: earlier keys still go).
    /// `claimed`: the keys were marked in flight by this very task (background puts), so the
    /// marks are not someone else's write.
    fn reserve(
        &self,
        keys: &[ChunkKey],
        pages: &[&Page],
        claimed: bool,
    ) -> (Vec<Option<KeyOutcome>>, Vec<usize>) {
        let mut state = self.state();
        let mut outcomes: Vec<Option<KeyOutcome>> = (0..keys.len()).map(|_| None).collect();
        let mut reserved = Vec::new();
        let mut reserved_bytes = 0u64;
        let mut full = false;
        for (i, (key, page)) in keys.iter().zip(pages).enumerate() {
            if state.closed {
                outcomes[i] = Some(KeyOutcome::Failed(Error::Closed));
                continue;
            }
            if state.index.contains(key) || (!claimed && state.index.inflight.contains(key)) {
                outcomes[i] = Some(KeyOutcome::AlreadyPresent);
                continue;
            }
            let size = page.len() as u64;
            if let Some(capacity) = self.options.capacity_bytes {
                let used = state.index.used() + reserved_bytes;
                if full || used + size > capacity {
                    if !full {
                        tracing::warn!(key = ?key, used, size, capacity, "Storage capacity exceeded, skipping store");
                    }
                    full = true;
                    outcomes[i] = Some(KeyOutcome::Failed(Error::CapacityExceeded {
                        used,
                        size,
                        capacity,
                    }));
                    continue;
                }
            }
            reserved_bytes += size;
            state.index.inflight.insert(key.clone());
            reserved.push(i);
        }
        (outcomes, reserved)
    }

    fn store(&self, keys: &[ChunkKey], pages: &[&Page], claimed: bool) -> StoreReport {
        let (mut outcomes, reserved) = self.reserve(keys, pages, claimed);
        let items: Vec<_> = reserved.iter().map(|&i| (&keys[i], pages[i])).collect();
        let results = if items.is_empty() {
            Vec::new()
        } else {
            self.storage.put(&items)
        };
        {
            let mut state = self.state();
            for (&i, result) in reserved.iter().zip(results) {
                let key = &keys[i];
                state.index.inflight.remove(key);
                outcomes[i] = Some(match result {
                    Ok(bytes) => {
                        state.index.insert(key.clone(), bytes, 0);
                        if self.options.presence_cache != PresenceCache::Off {
                            state.present.insert(key.clone());
                        }
                        KeyOutcome::Stored { bytes }
                    }
                    Err(err) => KeyOutcome::Failed(err),
                });
            }
        }
        StoreReport::already_present_unless(outcomes)
    }

    /// Lazy recovery: keys on storage but not in the index (after a restart) join it, within
    /// capacity; returns which of `keys` are now indexed.
    fn recover(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let sizes: Vec<Option<u64>> = keys
            .iter()
            .map(|k| self.storage.stored_size(k).ok().flatten())
            .collect();
        let mut state = self.state();
        keys.iter()
            .zip(sizes)
            .map(|(key, size)| {
                if state.index.contains(key) {
                    return true;
                }
                let Some(size) = size else { return false };
                if state.index.inflight.contains(key) {
                    return false;
                }
                if let Some(capacity) = self.options.capacity_bytes {
                    if state.index.used() + size > capacity {
                        tracing::debug!(key = ?key, "recovered key does not fit the capacity");
                        return false;
                    }
                }
                state.index.insert(key.clone(), size, 0);
                true
            })
            .collect()
    }
}

fn spawn_async(shared: Arc<Shared>, depth: usize) -> (SyncSender<AsyncJob>, JoinHandle<()>) {
    let (tx, rx) = sync_channel::<AsyncJob>(depth);
    let handle = std::thread::Builder::new()
        .name("kv-l2-async-put".to_owned())
        .spawn(move || {
            for job in rx {
                let pages: Vec<&Page> = job.pages.iter().collect();
                let report = shared.store(&job.keys, &pages, true);
                {
                    let mut state = shared.state();
                    for key in &job.keys {
                        state.index.inflight.remove(key);
                    }
                }
                for (key, outcome) in job.keys.iter().zip(&report.keys) {
                    if let KeyOutcome::Failed(err) = outcome {
                        tracing::warn!(key = ?key, error = %err, "background put failed");
                    }
                }
            }
        })
        .expect("spawning the background put thread");
    (tx, handle)
}

impl DynamicAdapter {
    /// An adapter over `storage`.
    pub fn new(storage: Box<dyn ChunkStorage>, options: DynamicOptions) -> Self {
        let depth = options.async_queue;
        let shared = Arc::new(Shared {
            storage,
            options,
            state: Mutex::new(State::default()),
        });
        let queue = (depth > 0).then(|| spawn_async(Arc::clone(&shared), depth));
        Self {
            shared,
            queue: Mutex::new(queue),
        }
    }

    /// Queues a store in the background (`nixl_async_put`): the keys count as in flight, hence
    /// absent, until written. Blocks while the queue is full.
    pub fn store_async(&self, keys: Vec<ChunkKey>, pages: Vec<Page>) -> Result<()> {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let Some((tx, _)) = queue.as_ref() else {
            let refs: Vec<&Page> = pages.iter().collect();
            self.shared.store(&keys, &refs, false);
            return Ok(());
        };
        {
            let mut state = self.shared.state();
            if state.closed {
                return Err(Error::Closed);
            }
            for key in &keys {
                state.index.inflight.insert(key.clone());
            }
        }
        let sender = tx.clone();
        drop(queue);
        let job = AsyncJob { keys, pages };
        let keys_on_failure = job.keys.clone();
        if sender.send(job).is_err() {
            let mut state = self.shared.state();
            for key in &keys_on_failure {
                state.index.inflight.remove(key);
            }
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Waits for the background queue to drain (its thread ends); later puts run in the caller.
    pub fn flush(&self) {
        let taken = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, handle)) = taken {
            drop(tx);
            if handle.join().is_err() {
                tracing::error!("the background put thread panicked");
            }
        }
    }
}

impl L2Adapter for DynamicAdapter {
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        self.shared.store(keys, pages, false)
    }

    fn lookup_and_pin(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let mode = self.shared.options.presence_cache;
        let mut hits = vec![false; keys.len()];
        let mut misses = Vec::new();
        {
            let mut state = self.shared.state();
            for (i, key) in keys.iter().enumerate() {
                if state.index.inflight.contains(key) {
                    continue;
                }
                if state.index.pin(key) {
                    state.index.touch(key);
                    hits[i] = true;
                } else {
                    misses.push(i);
                }
            }
        }
        if misses.is_empty() || mode == PresenceCache::Only {
            return hits;
        }
        let missing: Vec<ChunkKey> = misses.iter().map(|&i| keys[i].clone()).collect();
        let recovered = self.shared.recover(&missing);
        let mut state = self.shared.state();
        for (&i, found) in misses.iter().zip(recovered) {
            if found && state.index.pin(&keys[i]) {
                hits[i] = true;
                if mode != PresenceCache::Off {
                    state.present.insert(keys[i].clone());
                }
            }
        }
        hits
    }

    fn unlock(&self, keys: &[ChunkKey]) {
        let mut state = self.shared.state();
        for key in keys {
            state.index.unpin(key);
        }
    }

    fn load(&self, keys: &[ChunkKey], pages: &mut [&mut Page]) -> Vec<bool> {
        let mut items: Vec<_> = keys
            .iter()
            .zip(pages.iter_mut().map(|p| &mut **p))
            .collect();
        let results = self.shared.storage.get(&mut items);
        let mut state = self.shared.state();
        keys.iter()
            .zip(results)
            .map(|(key, result)| match result {
                Ok(true) => {
                    state.index.touch(key);
                    true
                }
                Ok(false) => {
                    // Gone or damaged on storage: it is no longer ours to report.
                    state.present.remove(key);
                    if state.index.get(key).is_some_and(|e| e.pins == 0) {
                        state.index.remove(key);
                    }
                    false
                }
                Err(err) => {
                    tracing::warn!(key = ?key, error = %err, "load failed");
                    state.present.remove(key);
                    false
                }
            })
            .collect()
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        let removed = {
            let mut state = self.shared.state();
            let removed = state.index.remove_unpinned(keys);
            for (key, _) in &removed {
                state.present.remove(key);
            }
            removed
        };
        for (key, _) in &removed {
            if let Err(err) = self.shared.storage.delete(key) {
                tracing::warn!(key = ?key, error = %err, "deleting from storage failed");
            }
        }
        removed.len()
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        let mode = self.shared.options.presence_cache;
        let mut count = 0;
        {
            let state = self.shared.state();
            let writing = !state.index.inflight.is_empty();
            for key in keys {
                if writing && state.index.inflight.contains(key) {
                    return count;
                }
                let known = state.index.contains(key)
                    || (mode != PresenceCache::Off && state.present.contains(key));
                if !known {
                    break;
                }
                count += 1;
            }
        }
        if count == keys.len() || mode == PresenceCache::Only {
            return count;
        }
        let rest: Vec<&ChunkKey> = keys[count..].iter().collect();
        let found = match self.shared.storage.contains(&rest) {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, "batched existence query failed");
                return count;
            }
        };
        let mut state = self.shared.state();
        for (key, present) in rest.iter().zip(found) {
            if !present || state.index.inflight.contains(*key) {
                break;
            }
            if mode != PresenceCache::Off {
                state.present.insert((*key).clone());
            }
            count += 1;
        }
        count
    }

    fn stored_size(&self, key: &ChunkKey) -> Option<u64> {
        if let Some(entry) = self.shared.state().index.get(key) {
            return Some(entry.size);
        }
        if self.shared.state().index.inflight.contains(key) {
            return None;
        }
        self.shared.storage.stored_size(key).ok().flatten()
    }

    fn usage(&self) -> Usage {
        self.shared.state().index.usage(self.shared.capacity())
    }

    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        let (candidates, skipped_pinned) =
            self.shared.state().index.eviction_candidates(ratio, salt);
        let before = self.shared.state().index.used();
        let evicted = self.delete(&candidates);
        EvictionReport {
            evicted,
            freed_bytes: before.saturating_sub(self.shared.state().index.used()),
            skipped_pinned,
        }
    }

    fn status(&self) -> Status {
        let state = self.shared.state();
        let usage = state.index.usage(self.shared.capacity());
        Status {
            is_healthy: !state.closed,
            adapter_type: kv_config::NIXL_STORE_DYNAMIC.to_owned(),
            backend: self.shared.options.backend.clone(),
            stored_object_count: usage.keys,
            pinned_object_count: usage.pinned,
        }
    }

    fn close(&self) -> Result<()> {
        self.flush();
        let keys = {
            let mut state = self.shared.state();
            if state.closed {
                return Ok(());
            }
            state.closed = true;
            if self.shared.options.persist {
                return Ok(());
            }
            state.index.keys()
        };
        for key in &keys {
            if let Err(err) = self.shared.storage.delete(key) {
                tracing::warn!(key = ?key, error = %err, "deleting on close failed");
            }
            self.shared.state().index.remove(key);
        }
        Ok(())
    }
}

impl Drop for DynamicAdapter {
    fn drop(&mut self) {
        if let Err(err) = self.close() {
            tracing::warn!(error = %err, "closing the dynamic adapter failed");
        }
    }
}
