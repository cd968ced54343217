//! `nixl_store_dynamic`: one file or object per key, capacity reserved before writing, lazy
//! recovery after a restart, presence cache, optional background puts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kv_config::PresenceCache;
use pinned_alloc::{Page, PagePool};

use crate::adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage, page_of};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::keys::ChunkKey;
use crate::storage::ChunkStorage;

/// How long a store waits for a key that is being deleted or recovered.
const KEY_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Options of a [`DynamicAdapter`].
#[derive(Debug, Clone)]
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
    /// Depth of the background put queue (`nixl_async_put`), in batches; 0 disables it.
    pub async_queue: usize,
    /// Where [`store`](L2Adapter::store) copies pages it queues: the L1 pool the transport
    /// registered. Without it `store` writes synchronously (only
    /// [`store_async`](DynamicAdapter::store_async), which hands over its pages, queues).
    /// Queued batches hold at most a quarter of its pages (at least one) at a time: past that,
    /// `store` writes in the caller, so the engine keeps the rest of its pool.
    pub staging: Option<Arc<PagePool>>,
    /// Evict the oldest keys (a whole unit of space, see [`ChunkStorage::space_units`]) and
    /// write again when storage refuses a queued put for want of room, by this policy: a
    /// background put has no caller to retry it. Under IsolatedLRU only keys of the refused
    /// key's salt go. `None` (or noop): the refusal is logged and the key is not stored.
    pub evict_when_full: Option<kv_config::EvictionPolicy>,
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
            staging: None,
            evict_when_full: None,
        }
    }

    /// Evicts by `policy` to make room for background puts that storage refused (see
    /// [`evict_when_full`](DynamicOptions::evict_when_full)).
    pub fn with_evict_when_full(mut self, policy: Option<kv_config::EvictionPolicy>) -> Self {
        self.evict_when_full = policy.filter(|p| *p != kv_config::EvictionPolicy::Noop);
        self
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

    /// The pool `store` takes staging pages from for background puts.
    pub fn with_staging(mut self, pool: Arc<PagePool>) -> Self {
        self.staging = Some(pool);
        self
    }
}

/// Eviction passes a background put runs before it gives up on a key storage refused for room.
const BACKGROUND_ROOM_PASSES: usize = 8;

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
    /// Bytes reserved by stores from `reserve` to the end of their write, queued ones included,
    /// and by deletes until storage has dropped them: the capacity counts them, so batches in
    /// flight together never overcommit it.
    reserved: u64,
    closed: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            index: Index::default(),
            present: Presence::new(PRESENCE_LIMIT),
            busy: HashSet::new(),
            reserved: 0,
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
    /// Staging pages held by queued or writing batches, and at most how many may be.
    staging: Arc<StagingBudget>,
    /// Held for an eviction pass.
    evicting: Mutex<()>,
    /// Where evictions are counted, once the builder has named the tier.
    metrics: std::sync::OnceLock<Arc<crate::telemetry::TierMetrics>>,
}

/// How many staging pages queued batches hold, against a cap: a quarter of the L1 pool, so
/// background puts never take the pages the engine needs (the queue's depth bounds batches,
/// not pages: one large batch would otherwise hold as many pages as it has keys).
#[derive(Debug)]
struct StagingBudget {
    in_use: AtomicUsize,
    cap: usize,
}

impl StagingBudget {
    /// The cap for a pool of `total` pages: a quarter, at least one.
    fn for_pool(total: usize) -> Self {
        Self {
            in_use: AtomicUsize::new(0),
            cap: (total / 4).max(1),
        }
    }

    /// Takes `n` pages of the budget, or `None` when they would pass the cap.
    fn take(self: &Arc<Self>, n: usize) -> Option<StagingPermit> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&after| after <= self.cap)
            })
            .ok()?;
        Some(StagingPermit {
            budget: Arc::clone(self),
            pages: n,
        })
    }
}

/// Staging pages taken from the budget; given back when the job holding them is dropped.
#[derive(Debug)]
struct StagingPermit {
    budget: Arc<StagingBudget>,
    pages: usize,
}

impl Drop for StagingPermit {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.pages, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicAdapter")
            .field("storage", &self.storage)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A reserved batch for the background thread, its pages owned (staged copies or handed over).
struct AsyncJob {
    keys: Vec<ChunkKey>,
    pages: Vec<Page>,
    /// The staging budget the pages hold (none for pages handed over by `store_async`).
    _permit: Option<StagingPermit>,
}

impl AsyncJob {
    fn items(&self) -> Vec<(&ChunkKey, &Page)> {
        self.keys.iter().zip(&self.pages).collect()
    }
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

    /// Bytes stored and reserved, keys, pins.
    fn usage(&self) -> Usage {
        let state = self.state();
        let mut usage = state.index.usage(self.capacity());
        usage.used_bytes += state.reserved;
        usage
    }

    /// Brings the usage gauges up to date after work no caller waits for (an eviction pass, a
    /// background put).
    fn refresh_gauges(&self) {
        if let Some(metrics) = self.metrics.get() {
            metrics.usage(&self.usage());
        }
    }

    /// Removes unpinned `keys` from the index and from storage; how many went.
    fn delete(&self, keys: &[ChunkKey]) -> usize {
        // The keys leave the index and stay busy until their storage is gone: a store of one
        // waits, so its fresh file is never the one deleted, and no recovery re-indexes it.
        // Their bytes stay reserved until then too: the disk still holds them.
        let (removed, deleting) = {
            let mut state = self.state();
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
            let deleting: u64 = removed.iter().map(|(_, entry)| entry.size).sum();
            state.reserved += deleting;
            (removed, deleting)
        };
        let mut kept = Vec::new();
        for (key, entry) in &removed {
            if let Err(err) = self.storage.delete(key) {
                // Still on storage: it stays indexed and counted, and a later pass tries again.
                tracing::warn!(key = ?key, error = %err, "deleting from storage failed; the key stays");
                kept.push((key.clone(), entry.size));
            }
        }
        let mut state = self.state();
        state.reserved = state.reserved.saturating_sub(deleting);
        for (key, size) in &kept {
            state.index.insert(key.clone(), *size, 0);
        }
        self.settle(&mut state, removed.iter().map(|(key, _)| key));
        removed.len() - kept.len()
    }

    /// An LRU pass over `ratio` of the keys (of `salt` when given), in whole units of space;
    /// one pass at a time (the controller's and a background put's never interleave).
    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        let _one_pass = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
        let (candidates, skipped_pinned) = {
            let state = self.state();
            let (candidates, skipped) = state.index.eviction_candidates(ratio, salt);
            (self.whole_units(&state.index, candidates, salt), skipped)
        };
        let before = self.state().index.used();
        let evicted = self.delete(&candidates);
        let report = EvictionReport {
            evicted,
            freed_bytes: before.saturating_sub(self.state().index.used()),
            skipped_pinned,
        };
        if let Some(metrics) = self.metrics.get() {
            metrics.evicted(&report);
        }
        self.refresh_gauges();
        report
    }

    /// [`write`](Shared::write), and where storage refused keys for want of room and
    /// [`DynamicOptions::evict_when_full`] is set, the oldest unit of space evicted and the
    /// refused keys written again, a few times at most.
    fn write_making_room(&self, items: &[(&ChunkKey, &Page)]) -> Vec<KeyOutcome> {
        let mut outcomes = self.write(items);
        let Some(policy) = self.options.evict_when_full else {
            return outcomes;
        };
        for _ in 0..BACKGROUND_ROOM_PASSES {
            let refused: Vec<usize> = (0..outcomes.len())
                .filter(|&i| outcomes[i].is_refused_for_room())
                .collect();
            let Some(&first) = refused.first() else {
                break;
            };
            let salt = (policy == kv_config::EvictionPolicy::IsolatedLru)
                .then(|| items[first].0.cache_salt().unwrap_or_default());
            if self.evict(f64::MIN_POSITIVE, salt).evicted == 0 {
                break;
            }
            let keys: Vec<ChunkKey> = refused.iter().map(|&i| items[i].0.clone()).collect();
            let pages: Vec<&Page> = refused.iter().map(|&i| items[i].1).collect();
            let (settled, reserved) = self.reserve(&keys, &pages);
            let again: Vec<(&ChunkKey, &Page)> =
                reserved.iter().map(|&j| (&keys[j], pages[j])).collect();
            let written = self.write(&again);
            for (j, outcome) in settled.into_iter().enumerate() {
                if let Some(outcome) = outcome {
                    outcomes[refused[j]] = outcome;
                }
            }
            for (&j, outcome) in reserved.iter().zip(written) {
                outcomes[refused[j]] = outcome;
            }
        }
        outcomes
    }

    /// LRU `candidates` (oldest first) grown to whole units of space where the storage frees
    /// space by unit (segments): the units of the oldest candidates, each with every key in
    /// it, until they hold at least the candidates' bytes. Otherwise one hot key in every
    /// segment would keep any segment from coming free however many cold keys LRU evicted. A
    /// unit holding a key this pass may not take (pinned, or of another salt under IsolatedLRU)
    /// could not come free: there only the candidate itself goes, as plain LRU.
    fn whole_units(
        &self,
        index: &Index,
        candidates: Vec<ChunkKey>,
        salt: Option<&str>,
    ) -> Vec<ChunkKey> {
        if candidates.is_empty() || self.storage.space_units(&[]).is_none() {
            return candidates;
        }
        let keys = index.oldest(None);
        let refs: Vec<&ChunkKey> = keys.iter().collect();
        let Some(units) = self.storage.space_units(&refs) else {
            return candidates;
        };
        let bytes = |key: &ChunkKey| index.get(key).map_or(0, |e| e.size);
        let mut members: HashMap<u32, Vec<&ChunkKey>> = HashMap::new();
        let mut held: HashSet<u32> = HashSet::new();
        let mut unit_of: HashMap<&ChunkKey, u32> = HashMap::new();
        for (key, unit) in refs.iter().zip(units) {
            let Some(unit) = unit else { continue };
            unit_of.insert(key, unit);
            let takeable = index.get(key).is_some_and(|e| e.pins == 0)
                && salt.is_none_or(|s| key.cache_salt().unwrap_or_default() == s);
            if takeable {
                members.entry(unit).or_default().push(key);
            } else {
                held.insert(unit);
            }
        }
        let target: u64 = candidates.iter().map(&bytes).sum();
        let mut chosen = HashSet::new();
        let mut victims = Vec::new();
        let mut freed = 0;
        for key in &candidates {
            if freed >= target {
                break;
            }
            match unit_of.get(key) {
                Some(unit) if chosen.contains(unit) => {}
                Some(unit) if !held.contains(unit) => {
                    chosen.insert(*unit);
                    for member in members.get(unit).into_iter().flatten() {
                        freed += bytes(member);
                        victims.push((*member).clone());
                    }
                }
                _ => {
                    freed += bytes(key);
                    victims.push(key.clone());
                }
            }
        }
        victims
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
    /// The reserved keys are in flight until [`write`](Shared::write) finishes them.
    fn reserve(&self, keys: &[ChunkKey], pages: &[&Page]) -> (Vec<Option<KeyOutcome>>, Vec<usize>) {
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
            if state.index.contains(key) || state.index.inflight.contains(key) || !batch.insert(key)
            {
                // A key twice in one batch is written once; the second is the first's.
                state.index.claim(key);
                outcomes[i] = Some(KeyOutcome::AlreadyPresent);
                continue;
            }
            let size = page.len() as u64;
            if let Some(capacity) = self.options.capacity_bytes {
                let used = state.index.used() + state.reserved;
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
            state.reserved += size;
            state.index.inflight.insert(key.clone());
            reserved.push(i);
        }
        (outcomes, reserved)
    }

    /// Phase 2: writes reserved keys, then under one lock releases their reservations and
    /// indexes what was written, so a batch never shows partly written.
    fn write(&self, items: &[(&ChunkKey, &Page)]) -> Vec<KeyOutcome> {
        if items.is_empty() {
            return Vec::new();
        }
        // Sized before the put: a page retired by a failed transfer reads as empty after it.
        let sizes: Vec<u64> = items.iter().map(|(_, page)| page.len() as u64).collect();
        let mut results = self.storage.put(items).into_iter();
        let mut state = self.state();
        items
            .iter()
            .zip(sizes)
            .map(|((key, _), size)| {
                state.index.inflight.remove(*key);
                state.reserved = state.reserved.saturating_sub(size);
                // A storage that answers fewer results must not leave keys in flight forever.
                let result = results.next().unwrap_or_else(|| {
                    Err(Error::Registry(format!(
                        "{} storage gave no result for {key:?}",
                        self.storage.kind()
                    )))
                });
                match result {
                    Ok(bytes) => {
                        state.index.insert((*key).clone(), bytes, 0);
                        if self.options.presence_cache != PresenceCache::Off {
                            state.present.insert((*key).clone());
                        }
                        KeyOutcome::Stored { bytes }
                    }
                    Err(err) => KeyOutcome::Failed(err),
                }
            })
            .collect()
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

/// The background put thread, or `None` (puts then run in the caller) when none can start.
fn spawn_async(
    shared: Arc<Shared>,
    depth: usize,
) -> Option<(SyncSender<AsyncJob>, JoinHandle<()>)> {
    let (tx, rx) = sync_channel::<AsyncJob>(depth);
    let spawned = std::thread::Builder::new()
        .name("kv-l2-async-put".to_owned())
        .spawn(move || {
            for job in rx {
                let items = job.items();
                let _span =
                    tracing::debug_span!("kv_l2.background_put", keys = items.len()).entered();
                let outcomes = shared.write_making_room(&items);
                for ((key, _), outcome) in items.iter().zip(&outcomes) {
                    if let KeyOutcome::Failed(err) = outcome {
                        tracing::warn!(key = ?key, error = %err, "background put failed");
                    }
                }
                if let Some(metrics) = shared.metrics.get() {
                    metrics.queued_puts(-(items.len() as f64));
                    metrics.background_outcomes(&outcomes);
                }
                shared.refresh_gauges();
            }
        });
    match spawned {
        Ok(handle) => Some((tx, handle)),
        Err(err) => {
            tracing::warn!(error = %err, "no background put thread; stores write synchronously");
            None
        }
    }
}

impl DynamicAdapter {
    /// Indexes chunks found in storage at open, oldest first, so capacity and eviction count
    /// what earlier processes left (lazy recovery alone would leave them unaccounted: a store
    /// reopened per command would grow without bound). Returns how many keys joined the index.
    ///
    /// With eviction configured (`evicting`) every chunk is adopted: usage may start above
    /// capacity, and the eviction controller brings it down. Without it nothing would, and
    /// every store would be refused for good, so only the newest chunks that fit the capacity
    /// are adopted; the rest stay on storage for lazy recovery, with a warning.
    pub(crate) fn adopt_stored(
        &self,
        chunks: impl IntoIterator<Item = (ChunkKey, u64)>,
        evicting: bool,
    ) -> usize {
        let mut state = self.shared.state();
        let mut fresh: Vec<(ChunkKey, u64)> = Vec::new();
        let mut seen = HashSet::new();
        for (key, bytes) in chunks {
            if !state.index.contains(&key)
                && !state.index.inflight.contains(&key)
                && seen.insert(key.clone())
            {
                fresh.push((key, bytes));
            }
        }
        let start = match self.shared.options.capacity_bytes {
            Some(capacity) if !evicting => {
                // Newest first, stopping at the first chunk that does not fit.
                let mut room = capacity.saturating_sub(state.index.used() + state.reserved);
                let mut start = fresh.len();
                while let Some(i) = start.checked_sub(1) {
                    let Some(left) = room.checked_sub(fresh[i].1) else {
                        break;
                    };
                    room = left;
                    start = i;
                }
                if start > 0 {
                    let bytes: u64 = fresh[..start].iter().map(|(_, b)| b).sum();
                    tracing::warn!(
                        chunks = start,
                        bytes,
                        capacity,
                        "chunks on storage beyond max_capacity_gb are not indexed (no eviction \
                         is configured); they are left to lazy recovery"
                    );
                }
                start
            }
            _ => 0,
        };
        let adopted = fresh.len() - start;
        // Oldest first, so the LRU order is the storage's.
        for (key, bytes) in fresh.drain(start..) {
            state.index.insert_adopted(key, bytes);
        }
        adopted
    }

    /// Counts this adapter's evictions (every pass, a background put's included) in `metrics`.
    pub(crate) fn count_evictions_in(&self, metrics: Arc<crate::telemetry::TierMetrics>) {
        let _ = self.shared.metrics.set(metrics);
    }

    /// An adapter over `storage`.
    pub fn new(storage: Box<dyn ChunkStorage>, options: DynamicOptions) -> Self {
        let depth = options.async_queue;
        let staging_pages = options
            .staging
            .as_ref()
            .map_or(0, |pool| pool.stats().total);
        let shared = Arc::new(Shared {
            storage,
            options,
            state: Mutex::new(State::default()),
            settled: Condvar::new(),
            staging: Arc::new(StagingBudget::for_pool(staging_pages)),
            evicting: Mutex::new(()),
            metrics: std::sync::OnceLock::new(),
        });
        let queue = if depth > 0 {
            spawn_async(Arc::clone(&shared), depth)
        } else {
            None
        };
        Self {
            shared,
            queue: Mutex::new(queue),
        }
    }

    /// Stores pages it is handed, in the background when the queue is on: as
    /// [`store`](L2Adapter::store), without the copy. `Err(Closed)` once closed.
    pub fn store_async(&self, keys: Vec<ChunkKey>, pages: Vec<Page>) -> Result<StoreReport> {
        if self.shared.state().closed {
            return Err(Error::Closed);
        }
        let refs: Vec<&Page> = pages.iter().collect();
        let (mut outcomes, reserved) = self.shared.reserve(&keys, &refs);
        drop(refs);
        let mut pages: Vec<Option<Page>> = pages.into_iter().map(Some).collect();
        // `reserve` reserves only keys that have a page, each index once: nothing is filtered.
        let (job_keys, job_pages) = reserved
            .iter()
            .filter_map(|&i| Some((keys[i].clone(), pages[i].take()?)))
            .unzip();
        let job = AsyncJob {
            keys: job_keys,
            pages: job_pages,
            _permit: None,
        };
        match self.sender() {
            Some(tx) if !reserved.is_empty() => self.submit(tx, &reserved, job, &mut outcomes),
            _ => Self::record(&reserved, self.shared.write(&job.items()), &mut outcomes),
        }
        Ok(StoreReport::already_present_unless(outcomes))
    }

    /// The background queue, while it runs.
    fn sender(&self) -> Option<SyncSender<AsyncJob>> {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.as_ref().map(|(tx, _)| tx.clone())
    }

    /// Copies the reserved pages into pages of the staging pool, or `None` (the caller writes
    /// them itself) when there is no pool, it is short of free pages, queued batches already
    /// hold the staging cap (a quarter of the pool), or a page is longer than the pool's. Never
    /// waits for pages: they are the L1 pool's, which the engine needs too.
    fn stage(&self, keys: &[ChunkKey], pages: &[&Page], reserved: &[usize]) -> Option<AsyncJob> {
        let pool = self.shared.options.staging.as_ref()?;
        let permit = self.shared.staging.take(reserved.len())?;
        let mut staged = pool.allocate_batch(reserved.len()).ok()?;
        for (copy, &i) in staged.iter_mut().zip(reserved) {
            let source = pages[i].as_slice();
            if copy.set_len(source.len()) != source.len() {
                return None;
            }
            copy.as_mut_slice().copy_from_slice(source);
        }
        Some(AsyncJob {
            keys: reserved.iter().map(|&i| keys[i].clone()).collect(),
            pages: staged,
            _permit: Some(permit),
        })
    }

    /// Queues a reserved job (its keys `reserved` of the batch), or writes it right here when
    /// the queue is full or gone (flushed, closed). A full queue writes in the caller rather
    /// than blocking: waiting would take as long as writing, the caller's own write slows it
    /// just as much (back-pressure), and the queue never holds more than its depth.
    fn submit(
        &self,
        tx: SyncSender<AsyncJob>,
        reserved: &[usize],
        job: AsyncJob,
        outcomes: &mut [Option<KeyOutcome>],
    ) {
        let sizes: Vec<u64> = job.pages.iter().map(|p| p.len() as u64).collect();
        // Counted before it is sent: the writer may take it off the queue at once.
        if let Some(metrics) = self.shared.metrics.get() {
            metrics.queued_puts(sizes.len() as f64);
        }
        let sent = tx.try_send(job);
        // Not held through a write here: a flush waits for every sender to go.
        drop(tx);
        match sent {
            Ok(()) => {
                for (&i, bytes) in reserved.iter().zip(sizes) {
                    outcomes[i] = Some(KeyOutcome::Queued { bytes });
                }
            }
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                if let Some(metrics) = self.shared.metrics.get() {
                    metrics.queued_puts(-(job.pages.len() as f64));
                }
                Self::record(reserved, self.shared.write(&job.items()), outcomes);
            }
        }
    }

    /// Puts the outcomes of the reserved keys in their places of the batch.
    fn record(reserved: &[usize], written: Vec<KeyOutcome>, outcomes: &mut [Option<KeyOutcome>]) {
        for (&i, outcome) in reserved.iter().zip(written) {
            outcomes[i] = Some(outcome);
        }
    }

    /// Waits for the background queue to drain (its thread ends); later puts run in the caller.
    /// Bounded: at most the queue's depth plus one batch are left, each write bounded by the
    /// transport's own timeout; and a store racing this holds the queue only to try a send.
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
    /// With the background queue on, copies the pages to staging pages and returns before they
    /// are written ([`KeyOutcome::Queued`]); when no staging page is free or the queue is full,
    /// writes them here instead ([`KeyOutcome::Stored`]).
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        let (mut outcomes, reserved) = self.shared.reserve(keys, pages);
        if reserved.is_empty() {
            return StoreReport::already_present_unless(outcomes);
        }
        let staged = self
            .sender()
            .and_then(|tx| Some((tx, self.stage(keys, pages, &reserved)?)));
        match staged {
            Some((tx, job)) => self.submit(tx, &reserved, job, &mut outcomes),
            None => {
                let items: Vec<_> = reserved.iter().map(|&i| (&keys[i], pages[i])).collect();
                Self::record(&reserved, self.shared.write(&items), &mut outcomes);
            }
        }
        StoreReport::already_present_unless(outcomes)
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
        self.shared.delete(keys)
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        let mode = self.shared.options.presence_cache;
        let mut count = 0;
        {
            let mut state = self.shared.state();
            let writing = !state.index.inflight.is_empty();
            for key in keys {
                if (writing && state.index.inflight.contains(key)) || state.busy.contains(key) {
                    return count;
                }
                state.index.claim(key);
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

    /// `used_bytes` counts the bytes of batches in flight (reserved, queued background puts
    /// included) beside the indexed ones: the capacity already counts them, so the watermark
    /// and eviction must too, or they would see room that stores are refused. `keys`,
    /// `pinned` and `bytes_by_salt` count indexed keys only.
    fn usage(&self) -> Usage {
        self.shared.usage()
    }

    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        self.shared.evict(ratio, salt)
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
        // Queued writes finish first (none is dropped unseen); without persistence they are
        // then deleted with the rest.
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
            // As LMCache: what this process stored or looked up, not what it only found.
            state.index.keys_used_here()
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
    use std::collections::HashMap;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use pinned_alloc::{LockMode, Page, PagePool, PoolConfig};

    use super::{DynamicAdapter, DynamicOptions, Presence};
    use crate::adapter::{KeyOutcome, L2Adapter};
    use crate::error::{Error, Result};
    use crate::keys::ChunkKey;
    use crate::storage::ChunkStorage;
    use crate::test_utils::{fill, key};

    const PAGE: usize = 4096;

    /// In-memory storage whose puts from the background thread wait until the gate opens (for
    /// at most ten seconds, then fail), and which fails keys it is told to.
    #[derive(Debug, Default)]
    struct Gated {
        data: Mutex<HashMap<ChunkKey, Vec<u8>>>,
        open: Mutex<bool>,
        opened: Condvar,
        /// Background puts that have begun.
        entered: Mutex<usize>,
        failing: Mutex<Vec<ChunkKey>>,
        /// Deletes fail while set, as a store that stopped answering.
        deletes_fail: Mutex<bool>,
    }

    impl Gated {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }

        fn has(&self, key: &ChunkKey) -> bool {
            self.data.lock().unwrap().contains_key(key)
        }

        fn wait_entered(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while *self.entered.lock().unwrap() < n {
                assert!(Instant::now() < deadline, "the background put never began");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    impl ChunkStorage for Arc<Gated> {
        fn kind(&self) -> &'static str {
            "gated"
        }

        fn put(&self, items: &[(&ChunkKey, &Page)]) -> Vec<Result<u64>> {
            if std::thread::current().name() == Some("kv-l2-async-put") {
                *self.entered.lock().unwrap() += 1;
                let open = self.open.lock().unwrap();
                let (open, _) = self
                    .opened
                    .wait_timeout_while(open, Duration::from_secs(10), |open| !*open)
                    .unwrap();
                if !*open {
                    return items.iter().map(|_| Err(Error::Closed)).collect();
                }
            }
            let failing = self.failing.lock().unwrap();
            let mut data = self.data.lock().unwrap();
            items
                .iter()
                .map(|(key, page)| {
                    if failing.contains(key) {
                        return Err(Error::Registry("refused".to_owned()));
                    }
                    data.insert((*key).clone(), page.as_slice().to_vec());
                    Ok(page.len() as u64)
                })
                .collect()
        }

        fn get(&self, items: &mut [(&ChunkKey, &mut Page)]) -> Vec<Result<bool>> {
            let data = self.data.lock().unwrap();
            items
                .iter_mut()
                .map(|(key, page)| match data.get(*key) {
                    Some(bytes) if bytes.len() == page.len() => {
                        page.as_mut_slice().copy_from_slice(bytes);
                        Ok(true)
                    }
                    _ => Ok(false),
                })
                .collect()
        }

        fn contains(&self, keys: &[&ChunkKey]) -> Result<Vec<bool>> {
            Ok(keys.iter().map(|k| self.has(k)).collect())
        }

        fn stored_size(&self, key: &ChunkKey) -> Result<Option<u64>> {
            Ok(self.data.lock().unwrap().get(key).map(|b| b.len() as u64))
        }

        fn delete(&self, key: &ChunkKey) -> Result<bool> {
            if *self.deletes_fail.lock().unwrap() {
                return Err(Error::Closed);
            }
            Ok(self.data.lock().unwrap().remove(key).is_some())
        }
    }

    /// A delete the storage fails leaves the key stored, indexed and counted (the bytes are
    /// still there), and a later delete removes it.
    #[test]
    fn a_failed_delete_keeps_the_key_counted() {
        let pool = pool(8);
        let storage = Arc::new(Gated::default());
        let options = DynamicOptions::new("gated").with_capacity(Some(4 * PAGE as u64));
        let adapter = DynamicAdapter::new(Box::new(Arc::clone(&storage)), options);
        for i in 0..2 {
            assert!(store_one(&adapter, &pool, i).is_stored());
        }
        *storage.deletes_fail.lock().unwrap() = true;
        assert_eq!(adapter.delete(&[key(0, None)]), 0, "nothing was deleted");
        assert_eq!(adapter.usage().used_bytes, 2 * PAGE as u64);
        assert_eq!(adapter.usage().keys, 2);
        assert!(storage.has(&key(0, None)));
        assert_eq!(adapter.stored_size(&key(0, None)), Some(PAGE as u64));
        *storage.deletes_fail.lock().unwrap() = false;
        assert_eq!(adapter.delete(&[key(0, None)]), 1);
        assert_eq!(adapter.usage().used_bytes, PAGE as u64);
    }

    fn pool(pages: u64) -> Arc<PagePool> {
        PoolConfig::new(PAGE, PAGE as u64 * pages)
            .with_lock(LockMode::Off)
            .build()
            .unwrap()
    }

    /// An adapter over gated storage with background puts (queue `depth`), staging from `pool`.
    fn gated(
        depth: usize,
        capacity_pages: Option<u64>,
        pool: &Arc<PagePool>,
    ) -> (DynamicAdapter, Arc<Gated>) {
        let storage = Arc::new(Gated::default());
        let options = DynamicOptions::new("gated")
            .with_capacity(capacity_pages.map(|n| n * PAGE as u64))
            .with_async_queue(depth)
            .with_staging(Arc::clone(pool));
        let adapter = DynamicAdapter::new(Box::new(Arc::clone(&storage)), options);
        (adapter, storage)
    }

    fn page(pool: &Arc<PagePool>, i: u32) -> Page {
        let mut page = pool.allocate().unwrap();
        fill(i, &mut page);
        page
    }

    fn store_one(adapter: &DynamicAdapter, pool: &Arc<PagePool>, i: u32) -> KeyOutcome {
        let page = page(pool, i);
        adapter.store(&[key(i, None)], &[&page]).keys.remove(0)
    }

    #[test]
    fn a_queued_store_returns_before_the_write_and_shows_once_written() {
        let pool = pool(8);
        let (adapter, storage) = gated(4, None, &pool);
        let k = key(1, None);
        let mut source = page(&pool, 1);
        let report = adapter.store(std::slice::from_ref(&k), &[&source]);
        assert!(
            matches!(report.keys[..], [KeyOutcome::Queued { bytes }] if bytes == PAGE as u64),
            "{report:?}"
        );
        assert!(report.is_successful());
        // The caller may reuse its page at once: what is written is the copy.
        fill(99, &mut source);
        storage.wait_entered(1);
        assert!(!storage.has(&k), "not written yet");
        assert_eq!(
            adapter.lookup_and_pin(std::slice::from_ref(&k)),
            vec![false]
        );
        assert_eq!(adapter.batched_contains(std::slice::from_ref(&k)), 0);
        assert_eq!(adapter.stored_size(&k), None);
        storage.open();
        let deadline = Instant::now() + Duration::from_secs(10);
        while adapter.lookup_and_pin(std::slice::from_ref(&k)) != vec![true] {
            assert!(Instant::now() < deadline, "the queued key never showed");
            std::thread::sleep(Duration::from_millis(1));
        }
        adapter.unlock(std::slice::from_ref(&k));
        let mut back = pool.allocate().unwrap();
        assert_eq!(
            adapter.load(std::slice::from_ref(&k), &mut [&mut back]),
            vec![true]
        );
        let mut expected = pool.allocate().unwrap();
        fill(1, &mut expected);
        assert!(
            back.as_slice() == expected.as_slice(),
            "the bytes given to store"
        );
        // Dropped by the background thread just after indexing.
        while pool.stats().free != 5 {
            assert!(
                Instant::now() < deadline,
                "the staging page never went back"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn capacity_counts_queued_batches() {
        let pool = pool(8);
        let (adapter, storage) = gated(4, Some(2), &pool);
        assert!(matches!(
            store_one(&adapter, &pool, 1),
            KeyOutcome::Queued { .. }
        ));
        assert!(matches!(
            store_one(&adapter, &pool, 2),
            KeyOutcome::Queued { .. }
        ));
        let third = store_one(&adapter, &pool, 3);
        assert!(
            matches!(third, KeyOutcome::Failed(Error::CapacityExceeded { .. })),
            "two queued pages fill a two-page capacity: {third:?}"
        );
        storage.open();
        adapter.flush();
        assert_eq!(adapter.usage().used_bytes, 2 * PAGE as u64);
    }

    #[test]
    fn a_full_queue_writes_in_the_caller() {
        let pool = pool(8);
        let (adapter, storage) = gated(1, None, &pool);
        assert!(matches!(
            store_one(&adapter, &pool, 1),
            KeyOutcome::Queued { .. }
        ));
        storage.wait_entered(1);
        assert!(matches!(
            store_one(&adapter, &pool, 2),
            KeyOutcome::Queued { .. }
        ));
        let third = store_one(&adapter, &pool, 3);
        assert!(
            matches!(third, KeyOutcome::Stored { .. }),
            "one batch writing, one queued: the third is written here: {third:?}"
        );
        assert_eq!(adapter.lookup_and_pin(&[key(3, None)]), vec![true]);
        adapter.unlock(&[key(3, None)]);
        storage.open();
    }

    #[test]
    fn a_failed_background_put_leaves_the_key_absent_and_frees_its_reservation() {
        let pool = pool(8);
        let (adapter, storage) = gated(4, Some(1), &pool);
        storage.failing.lock().unwrap().push(key(1, None));
        storage.open();
        assert!(matches!(
            store_one(&adapter, &pool, 1),
            KeyOutcome::Queued { .. }
        ));
        adapter.flush();
        assert_eq!(adapter.lookup_and_pin(&[key(1, None)]), vec![false]);
        assert_eq!(adapter.usage().used_bytes, 0);
        // The one-page capacity is free again.
        assert!(matches!(
            store_one(&adapter, &pool, 2),
            KeyOutcome::Stored { .. }
        ));
    }

    #[test]
    fn close_waits_for_queued_writes() {
        let pool = pool(8);
        let (adapter, storage) = gated(4, None, &pool);
        assert!(matches!(
            store_one(&adapter, &pool, 1),
            KeyOutcome::Queued { .. }
        ));
        storage.wait_entered(1);
        let opener = {
            let storage = Arc::clone(&storage);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                storage.open();
            })
        };
        adapter.close().unwrap();
        assert!(
            storage.has(&key(1, None)),
            "close returned before the queued write"
        );
        opener.join().unwrap();
    }

    #[test]
    fn usage_counts_queued_bytes() {
        let pool = pool(8);
        let (adapter, storage) = gated(4, Some(4), &pool);
        assert!(matches!(
            store_one(&adapter, &pool, 1),
            KeyOutcome::Queued { .. }
        ));
        storage.wait_entered(1);
        let usage = adapter.usage();
        assert_eq!(
            usage.used_bytes, PAGE as u64,
            "a queued page holds capacity, so usage shows it: {usage:?}"
        );
        assert!((usage.fraction() - 0.25).abs() < 1e-9, "{usage:?}");
        assert_eq!(usage.keys, 0, "not indexed until written");
        storage.open();
        adapter.flush();
        assert_eq!(adapter.usage().used_bytes, PAGE as u64, "counted once");
    }

    #[test]
    fn staging_holds_at_most_a_quarter_of_the_pool() {
        // Eight pages: two may be staged at a time.
        let pool = pool(8);
        let (adapter, storage) = gated(8, None, &pool);
        let three: Vec<Page> = (1..=3).map(|i| page(&pool, i)).collect();
        let refs: Vec<&Page> = three.iter().collect();
        let keys: Vec<ChunkKey> = (1..=3).map(|i| key(i, None)).collect();
        let report = adapter.store(&keys, &refs);
        assert!(
            report
                .keys
                .iter()
                .all(|k| matches!(k, KeyOutcome::Stored { .. })),
            "three pages pass the two-page cap: written here: {report:?}"
        );
        assert_eq!(pool.stats().free, 5, "no staging page taken");
        drop(three);
        let two: Vec<Page> = (4..=5).map(|i| page(&pool, i)).collect();
        let refs: Vec<&Page> = two.iter().collect();
        let keys: Vec<ChunkKey> = (4..=5).map(|i| key(i, None)).collect();
        let report = adapter.store(&keys, &refs);
        assert!(
            report
                .keys
                .iter()
                .all(|k| matches!(k, KeyOutcome::Queued { .. })),
            "two pages fit the cap: {report:?}"
        );
        drop(two);
        storage.wait_entered(1);
        let sixth = store_one(&adapter, &pool, 6);
        assert!(
            matches!(sixth, KeyOutcome::Stored { .. }),
            "the queued batch holds the cap: {sixth:?}"
        );
        assert!(pool.stats().free >= 6, "{:?}", pool.stats());
        storage.open();
        adapter.flush();
        assert_eq!(pool.stats().free, 8, "staging pages went back");
        let again = store_one(&adapter, &pool, 7);
        assert!(
            matches!(again, KeyOutcome::Stored { .. }),
            "flushed: no queue any more: {again:?}"
        );
    }

    /// A synchronous adapter over in-memory storage with a capacity of `pages`.
    fn bounded(pages: u64) -> DynamicAdapter {
        let options = DynamicOptions::new("gated").with_capacity(Some(pages * PAGE as u64));
        DynamicAdapter::new(Box::new(Arc::new(Gated::default())), options)
    }

    fn found(n: u32) -> Vec<(ChunkKey, u64)> {
        (0..n).map(|i| (key(i, None), PAGE as u64)).collect()
    }

    #[test]
    fn adopting_without_eviction_keeps_the_newest_that_fit() {
        let pool = pool(2);
        let adapter = bounded(4);
        assert_eq!(adapter.adopt_stored(found(8), false), 4);
        let usage = adapter.usage();
        assert_eq!(usage.used_bytes, 4 * PAGE as u64, "{usage:?}");
        let indexed: Vec<ChunkKey> = (4..8).map(|i| key(i, None)).collect();
        assert_eq!(adapter.batched_contains(&indexed), 4, "the newest four");
        // Room made by a delete is room: the store is not refused for good.
        assert_eq!(adapter.delete(&[key(7, None)]), 1);
        assert!(matches!(
            store_one(&adapter, &pool, 9),
            KeyOutcome::Stored { .. }
        ));
    }

    #[test]
    fn adopting_with_eviction_takes_everything() {
        let adapter = bounded(4);
        assert_eq!(adapter.adopt_stored(found(8), true), 8);
        assert_eq!(adapter.usage().used_bytes, 8 * PAGE as u64);
        assert_eq!(adapter.adopt_stored(found(8), true), 0, "each key once");
    }

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
