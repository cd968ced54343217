//! `nixl_store_dynamic`: one file or object per key, capacity reserved before writing, lazy
//! recovery after a restart, presence cache, optional background puts.

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kv_config::PresenceCache;
use pinned_alloc::Page;

use crate::adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage, page_of};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::keys::ChunkKey;
use crate::storage::ChunkStorage;

/// How long a store waits for a key that is being deleted or recovered.
const KEY_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Keys the presence cache remembers at most. Past that the oldest insertions are forgotten
/// first: a forgotten key costs one storage query (or, presence-cache-only, reads as a miss),
/// never a wrong answer.
const PRESENCE_LIMIT: usize = 1 << 20;

/// Keys known to exist in storage beyond the index, bounded: insertion order is kept, and the
/// oldest go when the limit is passed. A key removed and inserted again may be forgotten
/// early (its old place in the order still counts), which only costs a lookup.
#[derive(Debug)]
struct Presence {
    keys: HashSet<ChunkKey>,
    order: VecDeque<ChunkKey>,
    limit: usize,
}

impl Presence {
    fn new(limit: usize) -> Self {
        Self {
            keys: HashSet::new(),
            order: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    fn insert(&mut self, key: ChunkKey) {
        if self.keys.contains(&key) {
            return;
        }
        self.keys.insert(key.clone());
        self.order.push_back(key);
        while self.order.len() > self.limit {
            if let Some(oldest) = self.order.pop_front() {
                self.keys.remove(&oldest);
            }
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        self.keys.remove(key);
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.keys.contains(key)
    }
}

#[derive(Debug)]
struct State {
    index: Index,
    /// Keys known to exist in storage (presence cache), beyond the index.
    present: Presence,
    /// Keys whose storage is being deleted or looked at for recovery. Index and storage change
    /// together per key: while a key is here, lookups miss it, deletes and recoveries leave it
    /// alone, and stores of it wait (a store racing the delete would otherwise have its fresh
    /// file deleted, and a recovery could index a file a delete is removing).
    busy: HashSet<ChunkKey>,
    closed: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            index: Index::default(),
            present: Presence::new(PRESENCE_LIMIT),
            busy: HashSet::new(),
            closed: false,
        }
    }
}

struct Shared {
    storage: Box<dyn ChunkStorage>,
    options: DynamicOptions,
    state: Mutex<State>,
    /// Signalled whenever keys leave `State::busy`.
    settled: Condvar,
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

    /// Ends the delete or recovery of `keys`: stores waiting on them go on.
    fn settle<'a>(&self, state: &mut State, keys: impl IntoIterator<Item = &'a ChunkKey>) {
        for key in keys {
            state.busy.remove(key);
        }
        self.settled.notify_all();
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
        // A key being deleted or recovered is written once that is over, never beside it; a
        // key still busy after `KEY_BUSY_WAIT` (storage stuck under the delete) fails alone.
        let deadline = std::time::Instant::now() + KEY_BUSY_WAIT;
        while keys.iter().any(|k| state.busy.contains(k)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .settled
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut outcomes: Vec<Option<KeyOutcome>> = (0..keys.len()).map(|_| None).collect();
        let mut reserved = Vec::new();
        let mut reserved_bytes = 0u64;
        let mut full = false;
        let mut batch = HashSet::new();
        for (i, key) in keys.iter().enumerate() {
            let page = match page_of(keys, pages, i) {
                Ok(page) => page,
                Err(missing) => {
                    outcomes[i] = Some(missing);
                    continue;
                }
            };
            if state.closed {
                outcomes[i] = Some(KeyOutcome::Failed(Error::Closed));
                continue;
            }
            if state.busy.contains(key) {
                outcomes[i] = Some(KeyOutcome::Failed(Error::KeyBusy {
                    key: key.clone(),
                    waited: KEY_BUSY_WAIT,
                }));
                continue;
            }
            if state.index.contains(key)
                || (!claimed && state.index.inflight.contains(key))
                || !batch.insert(key)
            {
                // A key twice in one batch is written once; the second is the first's.
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
                        key: key.clone(),
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
    /// capacity; returns which of `keys` are now indexed. Each key looked at is busy from the
    /// check to the insert, so no delete or store of it interleaves.
    fn recover(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let mut looked: Vec<usize> = Vec::new();
        {
            let mut state = self.state();
            for (i, key) in keys.iter().enumerate() {
                if !state.index.contains(key)
                    && !state.index.inflight.contains(key)
                    && state.busy.insert(key.clone())
                {
                    looked.push(i);
                }
            }
        }
        let sizes: Vec<Option<u64>> = looked
            .iter()
            .map(|&i| self.storage.stored_size(&keys[i]).ok().flatten())
            .collect();
        let mut state = self.state();
        for (&i, size) in looked.iter().zip(sizes) {
            let key = &keys[i];
            let Some(size) = size else { continue };
            if let Some(capacity) = self.options.capacity_bytes {
                if state.index.used() + size > capacity {
                    tracing::debug!(key = ?key, "recovered key does not fit the capacity");
                    continue;
                }
            }
            state.index.insert(key.clone(), size, 0);
        }
        self.settle(&mut state, looked.iter().map(|&i| &keys[i]));
        // Asked of the index itself, so a key named twice is answered alike both times.
        keys.iter().map(|k| state.index.contains(k)).collect()
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
            settled: Condvar::new(),
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
                if state.index.inflight.contains(key) || state.busy.contains(key) {
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
        // Which indexed entry each key had before the read: a miss may only drop that one, not
        // one a store made meanwhile.
        let seen: Vec<Option<u64>> = {
            let state = self.shared.state();
            keys.iter()
                .map(|k| state.index.get(k).map(|e| e.id))
                .collect()
        };
        let mut items: Vec<_> = keys
            .iter()
            .zip(pages.iter_mut().map(|p| &mut **p))
            .collect();
        let results = self.shared.storage.get(&mut items);
        drop(items);
        let mut state = self.shared.state();
        let mut found = vec![false; keys.len()];
        for ((i, key), result) in keys.iter().enumerate().zip(results) {
            match result {
                Ok(true) => {
                    state.index.touch(key);
                    found[i] = true;
                }
                Ok(false) => {
                    // Gone or damaged on storage: it is no longer ours to report.
                    state.present.remove(key);
                    let same = state
                        .index
                        .get(key)
                        .is_some_and(|e| e.pins == 0 && Some(e.id) == seen[i]);
                    if same && !state.busy.contains(key) {
                        state.index.remove(key);
                    }
                }
                Err(err) => {
                    tracing::warn!(key = ?key, error = %err, "load failed");
                    state.present.remove(key);
                }
            }
        }
        found
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        // The keys leave the index and stay busy until their storage is gone: a store of one
        // waits, so its fresh file is never the one deleted, and no recovery re-indexes it.
        let removed = {
            let mut state = self.shared.state();
            let free: Vec<ChunkKey> = keys
                .iter()
                .filter(|k| !state.busy.contains(*k))
                .cloned()
                .collect();
            let removed = state.index.remove_unpinned(&free);
            for (key, _) in &removed {
                state.present.remove(key);
                state.busy.insert(key.clone());
            }
            removed
        };
        for (key, _) in &removed {
            if let Err(err) = self.shared.storage.delete(key) {
                tracing::warn!(key = ?key, error = %err, "deleting from storage failed");
            }
        }
        let mut state = self.shared.state();
        self.shared
            .settle(&mut state, removed.iter().map(|(key, _)| key));
        removed.len()
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        let mode = self.shared.options.presence_cache;
        let mut count = 0;
        {
            let state = self.shared.state();
            let writing = !state.index.inflight.is_empty();
            for key in keys {
                if (writing && state.index.inflight.contains(key)) || state.busy.contains(key) {
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
            if !present || state.index.inflight.contains(*key) || state.busy.contains(*key) {
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
        {
            let state = self.shared.state();
            if state.busy.contains(key) {
                return None;
            }
            if let Some(entry) = state.index.get(key) {
                return Some(entry.size);
            }
            if state.index.inflight.contains(key) {
                return None;
            }
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

#[cfg(test)]
mod tests {
    use super::Presence;
    use crate::test_utils::key;

    #[test]
    fn the_presence_set_forgets_its_oldest_keys_past_its_limit() {
        let mut presence = Presence::new(2);
        for i in 0..3 {
            presence.insert(key(i, None));
        }
        assert!(!presence.contains(&key(0, None)), "the oldest is forgotten");
        assert!(presence.contains(&key(1, None)) && presence.contains(&key(2, None)));
        for i in 0..100 {
            presence.insert(key(i, None));
            presence.remove(&key(i, None));
        }
        assert!(
            presence.order.len() <= 2 && presence.keys.len() <= 2,
            "bounded"
        );
    }
}
