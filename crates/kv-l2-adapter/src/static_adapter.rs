//! `nixl_store`: a fixed pool of slots registered once; when it is full, unpinned keys chosen by
//! the cache policy (LMCache's `cache_policy`: LRU, LFU, FIFO, MRU) make room at store time, and
//! a batch nothing can make room for is refused. A partial last chunk is stored only with
//! `save_unfull_chunk`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kv_config::StorageSpec;
use nixl_file::StaticFilePool;
use nixl_obj::StaticObjectPool;
use pinned_alloc::Page;

use crate::adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage, page_of};
use crate::error::{Error, Result};
use crate::index::{Entry, Index};
use crate::keys::ChunkKey;

/// Which unpinned key a full pool gives up first at store time (LMCache's `cache_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum CachePolicy {
    /// The least recently used (stored, looked up or loaded).
    #[default]
    Lru,
    /// The least often loaded; among equals, the least recently used.
    Lfu,
    /// The first stored, however it has been used since.
    Fifo,
    /// The most recently used.
    Mru,
}

impl CachePolicy {
    /// The values `cache_policy` accepts.
    const ACCEPTED: &str = "LRU, LFU, FIFO, MRU";
}

impl FromStr for CachePolicy {
    type Err = Error;

    /// LMCache's policy names, spelt as it spells them.
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "LRU" => Ok(Self::Lru),
            "LFU" => Ok(Self::Lfu),
            "FIFO" => Ok(Self::Fifo),
            "MRU" => Ok(Self::Mru),
            other => Err(Error::Config(kv_config::Error::InvalidSetting {
                key: "cache_policy".to_owned(),
                message: format!(
                    "{other:?} is not an eviction policy of the static pool; accepted: {}",
                    Self::ACCEPTED
                ),
            })),
        }
    }
}

/// The settings of a [`StaticAdapter`] beyond its slots; the defaults are LMCache's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct StaticOptions {
    /// Store-time eviction.
    pub(crate) policy: CachePolicy,
    /// Store a page shorter than a slot (a partial last chunk) under its true length; when
    /// off, such a page is refused.
    pub(crate) save_unfull_chunk: bool,
}

impl StaticOptions {
    /// The options a storage spec asks for; an unknown `cache_policy` is an error.
    pub(crate) fn from_spec(spec: &StorageSpec) -> Result<Self> {
        Ok(Self {
            policy: spec.cache_policy.parse()?,
            save_unfull_chunk: spec.save_unfull_chunk,
        })
    }
}

/// Slots under a [`StaticAdapter`].
///
/// # Contract
///
/// - `write` MUST store, beside each page, a header naming the key, the length and a checksum;
///   `read` MUST answer `false` for a slot whose header or payload does not check out against
///   the key and the page's length (a stale, torn or reassigned slot), never `true`.
/// - An `Err` fails the whole batch: every item in it counts as not written, or not loaded.
pub trait SlotStorage: Send + Sync + Debug + 'static {
    /// Slots in the pool.
    fn slots(&self) -> usize;

    /// Writes each page, under the header of its key (canonical bytes), into its slot, as one
    /// batch.
    fn write(&self, items: &[(&[u8], &Page, u32)]) -> Result<()>;

    /// Reads each slot into its page, as one batch; per item whether the slot held that key's
    /// chunk of the page's length, intact.
    fn read(&self, items: &mut [(&[u8], &mut Page, u32)]) -> Result<Vec<bool>>;
}

impl SlotStorage for StaticFilePool {
    fn slots(&self) -> usize {
        self.total_slots()
    }

    fn write(&self, items: &[(&[u8], &Page, u32)]) -> Result<()> {
        Ok(StaticFilePool::write(self, items)?)
    }

    fn read(&self, items: &mut [(&[u8], &mut Page, u32)]) -> Result<Vec<bool>> {
        Ok(StaticFilePool::read(self, items)?)
    }
}

impl SlotStorage for StaticObjectPool {
    fn slots(&self) -> usize {
        self.len()
    }

    fn write(&self, items: &[(&[u8], &Page, u32)]) -> Result<()> {
        Ok(StaticObjectPool::write(self, items)?)
    }

    fn read(&self, items: &mut [(&[u8], &mut Page, u32)]) -> Result<Vec<bool>> {
        Ok(StaticObjectPool::read(self, items)?)
    }
}

#[derive(Debug)]
struct State {
    index: Index,
    /// Free slots; the last pushed is taken first.
    free: Vec<u32>,
    /// Loads in flight per slot. A slot with readers is never handed to another key: the
    /// readers would get that key's bytes.
    readers: HashMap<u32, u32>,
    /// Slots freed (deleted, evicted) while loads of them were in flight; each returns to
    /// `free` when its last reader ends.
    draining: HashSet<u32>,
    /// Slots whose write failed, with when: the engine may go on writing into them for
    /// [`nixl_core::FAILED_REQUEST_GRACE`], after which they return to `free`.
    quarantined: VecDeque<(Instant, u32)>,
    /// Slots whose write timed out: the engine may write into them at any time, for good.
    retired: usize,
    /// Loads of each key, for LFU only (empty under the other policies).
    loads: HashMap<ChunkKey, u64>,
    closed: bool,
}

impl State {
    /// Gives a slot back: to the free list, or to the draining set while loads read it.
    fn release(&mut self, slot: u32) {
        if self.readers.contains_key(&slot) {
            self.draining.insert(slot);
        } else {
            self.free.push(slot);
        }
    }

    /// Drops what is kept beside removed index entries and gives their slots back.
    fn forget(&mut self, removed: &[(ChunkKey, Entry)]) {
        for (key, entry) in removed {
            self.loads.remove(key);
            self.release(entry.slot);
        }
    }

    /// Every indexed key, in the order `policy` gives them up.
    fn victims(&self, policy: CachePolicy) -> Vec<ChunkKey> {
        let mut keys = self.index.oldest(None);
        match policy {
            CachePolicy::Lru => {}
            CachePolicy::Mru => keys.reverse(),
            // Entry ids count insertions, so they order keys by when they were stored.
            CachePolicy::Fifo => keys.sort_by_key(|k| self.index.get(k).map_or(0, |e| e.id)),
            // A stable sort keeps LRU order among keys loaded equally often.
            CachePolicy::Lfu => keys.sort_by_key(|k| self.loads.get(k).copied().unwrap_or(0)),
        }
        keys
    }

    /// Whether `key`'s slot is being read (loads in flight): such a key is never a victim, at
    /// store time or in a watermark pass. Its slot would not come free before the reads end,
    /// so evicting it would only lose the key.
    fn read_now(&self, key: &ChunkKey) -> bool {
        self.index
            .get(key)
            .is_some_and(|e| self.readers.contains_key(&e.slot))
    }

    /// Takes back the quarantined slots whose grace period has passed.
    fn reclaim(&mut self) {
        let now = Instant::now();
        while let Some(&(since, slot)) = self.quarantined.front() {
            if now.duration_since(since) < nixl_core::FAILED_REQUEST_GRACE {
                break;
            }
            self.quarantined.pop_front();
            self.release(slot);
        }
    }

    /// One load of `slot` ended.
    fn end_read(&mut self, slot: u32) {
        let Some(count) = self.readers.get_mut(&slot) else {
            tracing::error!(slot, "a load ended on a slot that had no reader");
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.readers.remove(&slot);
            if self.draining.remove(&slot) {
                self.free.push(slot);
            }
        }
    }
}

/// The static adapter.
#[derive(Debug)]
pub struct StaticAdapter {
    storage: Box<dyn SlotStorage>,
    backend: String,
    slot_bytes: u64,
    options: StaticOptions,
    state: Mutex<State>,
    /// Where evictions are counted, once the builder has named the tier.
    metrics: std::sync::OnceLock<std::sync::Arc<crate::telemetry::TierMetrics>>,
}

impl StaticAdapter {
    /// An adapter over `storage`, whose slots hold `slot_bytes` each: LRU eviction, partial
    /// chunks refused (LMCache's defaults).
    pub fn new(storage: Box<dyn SlotStorage>, backend: impl Into<String>, slot_bytes: u64) -> Self {
        Self::with_options(storage, backend, slot_bytes, StaticOptions::default())
    }

    /// An adapter over `storage` with these options.
    pub(crate) fn with_options(
        storage: Box<dyn SlotStorage>,
        backend: impl Into<String>,
        slot_bytes: u64,
        options: StaticOptions,
    ) -> Self {
        let free = (0..storage.slots() as u32).rev().collect();
        Self {
            storage,
            backend: backend.into(),
            slot_bytes,
            options,
            state: Mutex::new(State {
                index: Index::default(),
                free,
                readers: HashMap::new(),
                draining: HashSet::new(),
                quarantined: VecDeque::new(),
                retired: 0,
                loads: HashMap::new(),
                closed: false,
            }),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// Counts this adapter's evictions (watermark passes and the cache policy's victims).
    pub(crate) fn count_evictions_in(
        &self,
        metrics: std::sync::Arc<crate::telemetry::TierMetrics>,
    ) {
        let _ = self.metrics.set(metrics);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees slots until `needed` are free by evicting unpinned keys in the cache policy's
    /// order, passing over keys being read ([`State::read_now`]). Evicts nothing when even
    /// every such key would not make room: the batch is refused whole, and evicting first
    /// would lose keys for nothing.
    fn make_room(&self, state: &mut State, needed: usize) {
        let evictable = state
            .index
            .entries()
            .filter(|e| e.pins == 0 && !state.readers.contains_key(&e.slot))
            .count();
        if state.free.len() + evictable < needed {
            return;
        }
        for key in state.victims(self.options.policy) {
            if state.free.len() >= needed {
                break;
            }
            if state.read_now(&key) {
                continue;
            }
            let removed = state.index.remove_unpinned(std::slice::from_ref(&key));
            for (key, _) in &removed {
                tracing::debug!(
                    key = ?key,
                    policy = ?self.options.policy,
                    "evicted to make room in the static pool"
                );
            }
            if let Some(metrics) = self.metrics.get() {
                metrics.evicted(&EvictionReport {
                    evicted: removed.len(),
                    freed_bytes: removed.iter().map(|(_, e)| e.size).sum(),
                    skipped_pinned: 0,
                });
            }
            state.forget(&removed);
        }
    }
}

impl L2Adapter for StaticAdapter {
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        let mut outcomes: Vec<Option<KeyOutcome>> = (0..keys.len()).map(|_| None).collect();
        let mut todo: Vec<(usize, u32)> = Vec::new();
        {
            let mut state = self.state();
            state.reclaim();
            let mut fresh = Vec::new();
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
                } else if page.len() as u64 > self.slot_bytes {
                    outcomes[i] = Some(KeyOutcome::Failed(Error::PageSize {
                        len: page.len(),
                        chunk: self.slot_bytes as usize,
                    }));
                } else if !self.options.save_unfull_chunk && (page.len() as u64) < self.slot_bytes {
                    // LMCache never stores a partial last chunk unless save_unfull_chunk is on;
                    // refused, never padded into a full one.
                    tracing::debug!(
                        key = ?key,
                        len = page.len(),
                        "partial chunk not stored: save_unfull_chunk is off"
                    );
                    outcomes[i] = Some(KeyOutcome::Failed(Error::UnfullChunk {
                        key: key.clone(),
                        len: page.len(),
                        chunk: self.slot_bytes as usize,
                    }));
                } else if state.index.contains(key)
                    || state.index.inflight.contains(key)
                    || !batch.insert(key)
                {
                    // A key twice in one batch is written once; the second is the first's.
                    outcomes[i] = Some(KeyOutcome::AlreadyPresent);
                } else {
                    fresh.push(i);
                }
            }
            if state.free.len() < fresh.len() {
                self.make_room(&mut state, fresh.len());
            }
            if state.free.len() < fresh.len() {
                tracing::warn!("No eviction candidates found. Backend under pressure.");
                let total = self.storage.slots();
                for &i in &fresh {
                    outcomes[i] = Some(KeyOutcome::Failed(Error::PoolFull {
                        key: keys[i].clone(),
                        needed: fresh.len(),
                        total,
                    }));
                }
                fresh.clear();
            }
            for i in fresh {
                let Some(slot) = state.free.pop() else {
                    break;
                };
                state.index.inflight.insert(keys[i].clone());
                todo.push((i, slot));
            }
        }
        if !todo.is_empty() {
            let canonical: Vec<Vec<u8>> = todo.iter().map(|&(i, _)| keys[i].canonical()).collect();
            let items: Vec<_> = todo
                .iter()
                .zip(&canonical)
                .map(|(&(i, slot), key)| (key.as_slice(), pages[i], slot))
                .collect();
            let result = self.storage.write(&items).map_err(Arc::new);
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
                        // The engine may still be writing into this slot: not reused while it
                        // may, for good after a timeout.
                        if nixl_core::timed_out_within(&**err) {
                            state.retired += 1;
                            tracing::error!(
                                key = ?keys[i],
                                slot,
                                retired = state.retired,
                                error = %err,
                                "static slot write timed out; the slot is retired for good"
                            );
                        } else {
                            state.quarantined.push_back((Instant::now(), slot));
                            tracing::warn!(
                                key = ?keys[i],
                                slot,
                                error = %err,
                                "static slot write failed; the slot is quarantined for a while"
                            );
                        }
                        KeyOutcome::Failed(Error::Batch {
                            key: keys[i].clone(),
                            source: Arc::clone(err),
                        })
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
        // (index, slot) of every key indexed now; each slot counts a reader until the read ends.
        let mut taken: Vec<(usize, u32)> = Vec::new();
        {
            let mut state = self.state();
            for (i, (key, page)) in keys.iter().zip(pages.iter_mut()).enumerate() {
                if let Some(entry) = state.index.get(key).copied() {
                    page.set_len(entry.size as usize);
                    *state.readers.entry(entry.slot).or_insert(0) += 1;
                    taken.push((i, entry.slot));
                    state.index.touch(key);
                    if self.options.policy == CachePolicy::Lfu {
                        *state.loads.entry(key.clone()).or_insert(0) += 1;
                    }
                }
            }
        }
        if taken.is_empty() {
            return found;
        }
        let canonical: Vec<Vec<u8>> = taken.iter().map(|&(i, _)| keys[i].canonical()).collect();
        let mut wanted = taken.iter().peekable();
        let mut items = Vec::with_capacity(taken.len());
        for (i, page) in pages.iter_mut().enumerate() {
            if let Some(&(_, slot)) = wanted.next_if(|(at, _)| *at == i) {
                items.push((canonical[items.len()].as_slice(), &mut **page, slot));
            }
        }
        let result = self.storage.read(&mut items);
        drop(items);
        let mut state = self.state();
        for &(_, slot) in &taken {
            state.end_read(slot);
        }
        match result {
            Ok(verdicts) => {
                for (&(i, slot), ok) in taken.iter().zip(verdicts) {
                    found[i] = ok;
                    if ok {
                        continue;
                    }
                    // No slot is reassigned under a load, so a refusal is damage: drop the key
                    // (unless pinned) so its slot is written afresh.
                    tracing::warn!(key = ?keys[i], slot, "static slot does not check out; a miss");
                    let same = state.index.get(&keys[i]).is_some_and(|e| e.slot == slot);
                    if same {
                        let removed = state.index.remove_unpinned(&keys[i..=i]);
                        state.forget(&removed);
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "NIXL load task failed"),
        }
        found
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        let mut state = self.state();
        let removed = state.index.remove_unpinned(keys);
        state.forget(&removed);
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

    /// A watermark pass. A candidate being read is passed over like a pinned one (and counted
    /// in `skipped_pinned`): evicting it would lose it while its slot stays busy.
    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        let mut state = self.state();
        let (candidates, pinned) = state.index.eviction_candidates(ratio, salt);
        let (read_now, free): (Vec<_>, Vec<_>) =
            candidates.into_iter().partition(|k| state.read_now(k));
        let before = state.index.used();
        let removed = state.index.remove_unpinned(&free);
        state.forget(&removed);
        let report = EvictionReport {
            evicted: removed.len(),
            freed_bytes: before.saturating_sub(state.index.used()),
            skipped_pinned: pinned + read_now.len(),
        };
        if let Some(metrics) = self.metrics.get() {
            metrics.evicted(&report);
            metrics.usage(
                &state
                    .index
                    .usage(self.storage.slots() as u64 * self.slot_bytes),
            );
        }
        report
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use pinned_alloc::{Page, PagePool, PoolConfig};

    use super::{CachePolicy, SlotStorage, StaticAdapter, StaticOptions};
    use crate::adapter::{KeyOutcome, L2Adapter};
    use crate::error::{Error, Result};
    use crate::test_utils::{fill, key};

    /// The key a slot was written under, and its bytes.
    type Slot = (Vec<u8>, Vec<u8>);

    /// Slots in memory, each holding the key it was written under beside the bytes.
    #[derive(Debug, Default)]
    struct Memory {
        slots: Mutex<HashMap<u32, Slot>>,
    }

    impl SlotStorage for Arc<Memory> {
        fn slots(&self) -> usize {
            2
        }

        fn write(&self, items: &[(&[u8], &Page, u32)]) -> Result<()> {
            let mut slots = self.slots.lock().unwrap();
            for (key, page, slot) in items {
                slots.insert(*slot, (key.to_vec(), page.as_slice().to_vec()));
            }
            Ok(())
        }

        fn read(&self, items: &mut [(&[u8], &mut Page, u32)]) -> Result<Vec<bool>> {
            let slots = self.slots.lock().unwrap();
            Ok(items
                .iter_mut()
                .map(|(key, page, slot)| match slots.get(slot) {
                    Some((stored, bytes)) if stored == key && bytes.len() == page.len() => {
                        page.as_mut_slice().copy_from_slice(bytes);
                        true
                    }
                    _ => false,
                })
                .collect())
        }
    }

    fn pages() -> Arc<PagePool> {
        PoolConfig::new(4096, 8 * 4096).build().unwrap()
    }

    /// Memory slots whose reads wait, once `entered` is set, for a word on `release`.
    #[derive(Debug, Default)]
    struct Gated {
        memory: Arc<Memory>,
        entered: Mutex<Option<std::sync::mpsc::Sender<()>>>,
        release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl SlotStorage for Arc<Gated> {
        fn slots(&self) -> usize {
            self.memory.slots()
        }

        fn write(&self, items: &[(&[u8], &Page, u32)]) -> Result<()> {
            self.memory.write(items)
        }

        fn read(&self, items: &mut [(&[u8], &mut Page, u32)]) -> Result<Vec<bool>> {
            if let Some(entered) = self.entered.lock().unwrap().take() {
                entered.send(()).unwrap();
                let release = self.release.lock().unwrap().take().unwrap();
                release.recv().unwrap();
            }
            self.memory.read(items)
        }
    }

    #[test]
    fn a_key_being_read_is_not_evicted_to_make_room() {
        let pool = pages();
        let storage = Arc::new(Gated::default());
        // MRU picks the key just loaded first; it must be passed over while its read runs.
        let options = StaticOptions {
            policy: CachePolicy::Mru,
            ..StaticOptions::default()
        };
        let adapter = Arc::new(StaticAdapter::with_options(
            Box::new(Arc::clone(&storage)),
            "gated",
            4096,
            options,
        ));
        let batch: Vec<_> = (1..=3)
            .map(|i| {
                let mut page = pool.allocate().unwrap();
                fill(i, &mut page);
                page
            })
            .collect();
        for (i, page) in (1..).zip(&batch[..2]) {
            let report = adapter.store(&[key(i, None)], &[page]);
            assert!(report.is_successful(), "{report:?}");
        }
        let (entered, in_read) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel();
        *storage.entered.lock().unwrap() = Some(entered);
        *storage.release.lock().unwrap() = Some(released);
        let reader = {
            let adapter = Arc::clone(&adapter);
            let mut target = pool.allocate().unwrap();
            std::thread::spawn(move || adapter.load(&[key(1, None)], &mut [&mut target]))
        };
        in_read.recv().unwrap();
        let report = adapter.store(&[key(3, None)], &[&batch[2]]);
        release.send(()).unwrap();
        assert_eq!(reader.join().unwrap(), vec![true]);
        assert!(report.is_successful(), "key 2 makes room: {report:?}");
        assert!(
            adapter.stored_size(&key(1, None)).is_some(),
            "key 1 was being read"
        );
        assert!(adapter.stored_size(&key(2, None)).is_none());
    }

    #[test]
    fn a_watermark_pass_passes_over_a_key_being_read() {
        let pool = pages();
        let storage = Arc::new(Gated::default());
        let adapter = Arc::new(StaticAdapter::new(
            Box::new(Arc::clone(&storage)),
            "gated",
            4096,
        ));
        for i in 1..=2 {
            let mut page = pool.allocate().unwrap();
            fill(i, &mut page);
            assert!(adapter.store(&[key(i, None)], &[&page]).is_successful());
        }
        let (entered, in_read) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel();
        *storage.entered.lock().unwrap() = Some(entered);
        *storage.release.lock().unwrap() = Some(released);
        let reader = {
            let adapter = Arc::clone(&adapter);
            let mut target = pool.allocate().unwrap();
            std::thread::spawn(move || adapter.load(&[key(1, None)], &mut [&mut target]))
        };
        in_read.recv().unwrap();
        let report = adapter.evict(1.0, None);
        release.send(()).unwrap();
        assert_eq!(reader.join().unwrap(), vec![true]);
        assert_eq!(report.evicted, 1, "{report:?}");
        assert_eq!(report.skipped_pinned, 1, "{report:?}");
        assert!(
            adapter.stored_size(&key(1, None)).is_some(),
            "key 1 was being read"
        );
        assert!(adapter.stored_size(&key(2, None)).is_none());
    }

    #[test]
    fn a_batch_that_cannot_fit_evicts_nothing() {
        let pool = pages();
        let adapter = StaticAdapter::new(Box::new(Arc::new(Memory::default())), "memory", 4096);
        let batch: Vec<_> = (1..=4)
            .map(|i| {
                let mut page = pool.allocate().unwrap();
                fill(i, &mut page);
                page
            })
            .collect();
        for (i, page) in (1..).zip(&batch[..2]) {
            assert!(adapter.store(&[key(i, None)], &[page]).is_successful());
        }
        assert_eq!(adapter.lookup_and_pin(&[key(1, None)]), vec![true]);
        // Two slots, one pinned: two new keys cannot fit, whatever is evicted.
        let report = adapter.store(&[key(3, None), key(4, None)], &[&batch[2], &batch[3]]);
        assert!(
            report
                .keys
                .iter()
                .all(|k| matches!(k, KeyOutcome::Failed(Error::PoolFull { .. }))),
            "{report:?}"
        );
        assert!(
            adapter.stored_size(&key(2, None)).is_some(),
            "key 2 is not lost for a batch refused anyway"
        );
        adapter.unlock(&[key(1, None)]);
        let report = adapter.store(&[key(3, None), key(4, None)], &[&batch[2], &batch[3]]);
        assert!(report.is_successful(), "both evictable now: {report:?}");
    }

    /// Two slots whose writes fail while `failure` holds an error to fail with.
    #[derive(Debug, Default)]
    struct Failing {
        failure: Mutex<Option<fn() -> nixl_core::Error>>,
    }

    impl SlotStorage for Arc<Failing> {
        fn slots(&self) -> usize {
            2
        }

        fn write(&self, _items: &[(&[u8], &Page, u32)]) -> Result<()> {
            match *self.failure.lock().unwrap() {
                Some(failure) => Err(Error::Transport(failure())),
                None => Ok(()),
            }
        }

        fn read(&self, items: &mut [(&[u8], &mut Page, u32)]) -> Result<Vec<bool>> {
            Ok(vec![false; items.len()])
        }
    }

    #[test]
    fn a_slot_whose_write_failed_or_timed_out_is_not_handed_out_again() {
        let reported = || nixl_core::Error::Failed("the plugin said no".to_owned());
        let timed_out = || nixl_core::Error::Timeout {
            descriptors: 1,
            timeout: std::time::Duration::from_secs(1),
        };
        for failure in [reported as fn() -> nixl_core::Error, timed_out] {
            let pool = pages();
            let storage = Arc::new(Failing::default());
            let adapter = StaticAdapter::new(Box::new(Arc::clone(&storage)), "failing", 4096);
            let batch: Vec<_> = (0..2).map(|_| pool.allocate().unwrap()).collect();
            *storage.failure.lock().unwrap() = Some(failure);
            assert!(!adapter.store(&[key(1, None)], &[&batch[0]]).is_successful());
            *storage.failure.lock().unwrap() = None;
            let report = adapter.store(&[key(2, None), key(3, None)], &[&batch[0], &batch[1]]);
            assert!(
                report.keys.iter().all(|k| !k.is_stored()),
                "only one slot is free while the other may still be written: {report:?}"
            );
            assert!(adapter.store(&[key(2, None)], &[&batch[0]]).is_successful());
        }
    }

    #[test]
    fn a_retired_page_is_refused_not_stored_empty() {
        let pool = pages();
        let adapter = StaticAdapter::new(Box::new(Arc::new(Memory::default())), "memory", 4096);
        let mut page = pool.allocate().unwrap();
        fill(1, &mut page);
        page.abandon();
        let report = adapter.store(&[key(1, None)], &[&page]);
        assert!(
            matches!(
                &report.keys[0],
                KeyOutcome::Failed(Error::PageRetired { .. })
            ),
            "{report:?}"
        );
        assert_eq!(adapter.lookup_and_pin(&[key(1, None)]), vec![false]);
    }

    #[test]
    fn keys_without_pages_fail_with_a_length_mismatch() {
        let pool = pages();
        let adapter = StaticAdapter::new(Box::new(Arc::new(Memory::default())), "memory", 4096);
        let mut page = pool.allocate().unwrap();
        fill(1, &mut page);
        let report = adapter.store(&[key(1, None), key(2, None)], &[&page]);
        assert!(matches!(report.keys[0], KeyOutcome::Stored { .. }));
        assert!(
            matches!(
                &report.keys[1],
                KeyOutcome::Failed(Error::LengthMismatch {
                    keys: 2,
                    pages: 1,
                    ..
                })
            ),
            "{report:?}"
        );
        assert_eq!(adapter.lookup_and_pin(&[key(2, None)]), vec![false]);
    }

    #[test]
    fn a_slot_that_holds_another_key_reads_as_a_miss_and_is_dropped() {
        let pool = pages();
        let memory = Arc::new(Memory::default());
        let adapter = StaticAdapter::new(Box::new(Arc::clone(&memory)), "memory", 4096);
        let mut page = pool.allocate().unwrap();
        fill(1, &mut page);
        assert!(adapter.store(&[key(1, None)], &[&page]).is_successful());
        for (stored, _) in memory.slots.lock().unwrap().values_mut() {
            *stored = key(9, None).canonical();
        }
        let mut target = pool.allocate().unwrap();
        assert_eq!(
            adapter.load(&[key(1, None)], &mut [&mut target]),
            vec![false]
        );
        assert_eq!(adapter.usage().keys, 0, "a damaged slot is not kept");
        let two: Vec<_> = (0..2).map(|_| pool.allocate().unwrap()).collect();
        let report = adapter.store(&[key(3, None), key(4, None)], &[&two[0], &two[1]]);
        assert!(report.is_successful(), "its slot is free again: {report:?}");
    }
}
