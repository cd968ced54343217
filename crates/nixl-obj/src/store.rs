//! Dynamic mode: one object per key, registered per operation.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nixl_core::header::{self, HEADER_BYTES, MAX_KEY_BYTES};
use nixl_core::{
    Direction, PageBatch, PageView, Registration, StorageExtent, StorageName, Transport,
    TransportExt,
};
use pinned_alloc::{LockMode, Page, PagePool, PoolConfig};

use crate::error::{Error, Result};
use crate::naming::object_id;

const BUFFER_WAIT: Duration = Duration::from_secs(30);
/// How long a batch waits for another batch to let go of an object id they both name.
const REGISTRATION_WAIT: Duration = Duration::from_secs(5);
/// How long a delete waits for this store's reads of the object to finish.
#[cfg(feature = "control")]
const DELETE_WAIT: Duration = Duration::from_secs(5);

/// The objects this store is reading or deleting. A read of an object that vanishes fails its
/// batch, whose staging buffers the transport then holds out of use for a grace period (the
/// plugin's SDK may still write into them): so a delete waits for this store's reads of the
/// object, and a read skips an object being deleted (a miss), instead of failing.
#[derive(Debug, Default)]
struct InUse {
    readers: HashMap<u64, usize>,
    /// Deletes in progress per object.
    deleting: HashMap<u64, usize>,
}

/// Takes one use of each of `ids` off `uses`, forgetting the objects no longer in use.
fn release(uses: &mut HashMap<u64, usize>, ids: &[u64]) {
    for id in ids {
        if let Some(count) = uses.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                uses.remove(id);
            }
        }
    }
}

/// Reads of some objects in progress: ended when dropped.
struct Reading<'a> {
    store: &'a ObjectStore,
    ids: Vec<u64>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        release(&mut self.store.in_use().readers, &self.ids);
        self.store.settled.notify_all();
    }
}

/// A delete of one object in progress: ended when dropped.
#[cfg(feature = "control")]
struct Deleting<'a> {
    store: &'a ObjectStore,
    id: u64,
}

#[cfg(feature = "control")]
impl Drop for Deleting<'_> {
    fn drop(&mut self) {
        release(&mut self.store.in_use().deleting, &[self.id]);
        self.store.settled.notify_all();
    }
}

/// Configuration of an [`ObjectStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectConfig {
    /// Bytes of one chunk (the payload of one object).
    pub chunk_bytes: usize,
    /// Objects per transfer batch; also the number of staging buffers.
    pub max_batch: usize,
}

impl ObjectConfig {
    /// Chunks of `chunk_bytes`, batches of 16.
    pub fn new(chunk_bytes: usize) -> Self {
        Self {
            chunk_bytes,
            max_batch: 16,
        }
    }

    /// Sets the batch size.
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }
}

/// Chunk objects in one bucket or container, through a NIXL object transport.
#[derive(Debug)]
pub struct ObjectStore {
    transport: Arc<dyn Transport>,
    config: ObjectConfig,
    /// Header + payload, contiguous: objects are written and read whole.
    staging: Arc<PagePool>,
    _registration: Registration,
    /// Deletes and listings, which NIXL cannot do.
    #[cfg(feature = "control")]
    control: Option<crate::control::ObjectControl>,
    in_use: Mutex<InUse>,
    /// Signalled when reads end or a delete is done.
    settled: Condvar,
}

/// The shared cause of a failure that fails every item of a batch.
fn batch_cause(err: Error) -> Arc<nixl_core::Error> {
    Arc::new(match err {
        Error::Transport(inner) => inner,
        other => nixl_core::Error::Failed(other.to_string()),
    })
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::InvalidKey(format!(
            "a key must be 1 to {MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

impl ObjectStore {
    /// Creates the staging buffers and registers them once.
    pub fn open(transport: Arc<dyn Transport>, config: ObjectConfig) -> Result<Self> {
        if config.chunk_bytes == 0 {
            return Err(Error::Config("chunk size must be positive".to_owned()));
        }
        let batch = config.max_batch.max(1) as u64;
        let object_bytes = HEADER_BYTES + config.chunk_bytes;
        // Twice a batch: after a failed batch, whose buffers the transport holds out of use for
        // a while, its keys are retried one by one.
        let staging = PoolConfig::new(
            object_bytes,
            2 * batch * object_bytes.next_multiple_of(4096) as u64,
        )
        .with_lock(LockMode::BestEffort)
        .build()
        .map_err(|e| Error::Config(format!("staging buffers: {e}")))?;
        let registration = transport.register_pool(&staging)?;
        Ok(Self {
            transport,
            config,
            staging,
            _registration: registration,
            #[cfg(feature = "control")]
            control: None,
            in_use: Mutex::default(),
            settled: Condvar::new(),
        })
    }

    fn in_use(&self) -> MutexGuard<'_, InUse> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts reading the objects of `keys`: whether each may be read (`false` for one being
    /// deleted, which reads as a miss), and the guard that ends the reads.
    fn begin_reads(&self, keys: &[&[u8]]) -> (Vec<bool>, Reading<'_>) {
        let mut in_use = self.in_use();
        let mut readable = Vec::with_capacity(keys.len());
        let mut ids = Vec::with_capacity(keys.len());
        for key in keys {
            let id = object_id(key);
            let free = !in_use.deleting.contains_key(&id);
            if free {
                *in_use.readers.entry(id).or_insert(0) += 1;
                ids.push(id);
            }
            readable.push(free);
        }
        (readable, Reading { store: self, ids })
    }

    /// Deletes and lists through `control` (a client of the same bucket or container): without
    /// one, [`delete`](ObjectStore::delete) removes nothing and [`list`](ObjectStore::list)
    /// knows nothing.
    #[cfg(feature = "control")]
    pub fn with_control(mut self, control: crate::control::ObjectControl) -> Self {
        self.control = Some(control);
        self
    }

    /// The object id (and name, in decimal) of a key.
    pub fn id_of(key: &[u8]) -> u64 {
        object_id(key)
    }

    /// Stores every page under its key (canonical key bytes). One result per item.
    pub fn put(&self, items: &[(&[u8], &Page)]) -> Vec<Result<u64>> {
        let mut results: Vec<Result<u64>> = Vec::with_capacity(items.len());
        for piece in items.chunks(self.config.max_batch) {
            results.extend(self.put_piece(piece));
        }
        results
    }

    fn put_piece(&self, piece: &[(&[u8], &Page)]) -> Vec<Result<u64>> {
        let Ok(mut staging) = self.staging.allocate_batch_within(piece.len(), BUFFER_WAIT) else {
            return piece
                .iter()
                .map(|_| Err(Error::Config("no staging buffer came free".to_owned())))
                .collect();
        };
        let mut results: Vec<Result<u64>> = Vec::with_capacity(piece.len());
        let mut ready = Vec::new();
        for ((key, page), buffer) in piece.iter().zip(staging.iter_mut()) {
            let prepared = check_key(key).and_then(|()| {
                if page.len() > self.config.chunk_bytes {
                    return Err(Error::Config(format!(
                        "a chunk of {} bytes does not fit objects of {}",
                        page.len(),
                        self.config.chunk_bytes
                    )));
                }
                buffer.set_len(HEADER_BYTES + page.len());
                let (head, body) = buffer.as_mut_slice().split_at_mut(HEADER_BYTES);
                header::write(head, key, page.as_slice())
                    .map_err(|refusal| Error::InvalidKey(refusal.to_string()))?;
                body.copy_from_slice(page.as_slice());
                Ok((object_id(key), buffer.len()))
            });
            match prepared {
                Ok(object) => {
                    ready.push((results.len(), object));
                    results.push(Ok(page.len() as u64));
                }
                Err(err) => results.push(Err(err)),
            }
        }
        if ready.is_empty() {
            return results;
        }
        let objects: Vec<(u64, usize)> = ready.iter().map(|(_, object)| *object).collect();
        let registrations = match self.register_all(&objects) {
            Ok(registrations) => registrations,
            Err(err) => {
                let err = batch_cause(err);
                for (i, _) in &ready {
                    results[*i] = Err(Error::Batch(Arc::clone(&err)));
                }
                return results;
            }
        };
        let mut staging: Vec<Option<Page>> = staging.into_iter().map(Some).collect();
        let batch: PageBatch = ready
            .iter()
            .zip(&registrations)
            .filter_map(|((i, _), r)| {
                Some((staging[*i].take()?, StorageExtent::new(r.dev_id(), 0)))
            })
            .collect();
        // The batch owns the staging buffers: after a failure the transport keeps those the
        // plugin may still read, and they come back to the pool once it can no longer.
        if let (_, Err(err)) = self.transport.submit(Direction::Write, batch).wait() {
            nixl_core::count_failed_transfer(Direction::Write);
            let err = Arc::new(err);
            for (i, _) in &ready {
                results[*i] = Err(Error::Batch(Arc::clone(&err)));
            }
        }
        results
    }

    /// Registers each `(object id, length)`, in the order given. NIXL's OBJ plugin keeps one
    /// registration per id (NIXL issue 1794), so two batches naming the same object, two loads
    /// of one key from two threads, take turns: each waits, up to [`REGISTRATION_WAIT`], while
    /// another holds the id. Ids are taken in ascending order, so two batches never wait on
    /// each other in a cycle; an id named twice in one batch is refused at once.
    fn register_all(&self, objects: &[(u64, usize)]) -> Result<Vec<Registration>> {
        let mut order: Vec<usize> = (0..objects.len()).collect();
        order.sort_by_key(|&i| objects[i].0);
        let mut taken: Vec<Option<Registration>> = (0..objects.len()).map(|_| None).collect();
        let mut previous = None;
        for i in order {
            let (id, len) = objects[i];
            if previous == Some(id) {
                return Err(nixl_core::Error::DeviceIdInUse { dev_id: id }.into());
            }
            previous = Some(id);
            let started = std::time::Instant::now();
            let mut pause = Duration::from_micros(20);
            taken[i] = Some(loop {
                match self.transport.register_object(id, len) {
                    Err(nixl_core::Error::DeviceIdInUse { .. })
                        if started.elapsed() < REGISTRATION_WAIT =>
                    {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(2));
                    }
                    other => break other?,
                }
            });
        }
        Ok(taken.into_iter().flatten().collect())
    }

    /// Which keys have an object: an S3 HEAD (or blob properties query) per key, all in flight
    /// at once through the control client where there is one, else NIXL's batched query.
    pub fn contains(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        #[cfg(feature = "control")]
        if let Some(control) = &self.control {
            let ids: Vec<u64> = keys.iter().map(|k| object_id(k)).collect();
            match control.exists(&ids) {
                Ok(found) => return Ok(found),
                // NIXL's own query, which the plugin answers with its own configuration.
                Err(err) => tracing::warn!(
                    target = control.target(),
                    error = %err,
                    "existence query through the object client failed; asking NIXL"
                ),
            }
        }
        let names: Vec<StorageName<'_>> = keys
            .iter()
            .map(|k| StorageName::Object(object_id(k)))
            .collect();
        Ok(self.transport.exists(&names)?)
    }

    /// Loads every key into its page (whose length is the expected payload size). One result per
    /// item: `Ok(true)` loaded and verified, `Ok(false)` a miss (absent, foreign, damaged),
    /// `Err` when the store could not be read.
    pub fn get(&self, items: &mut [(&[u8], &mut Page)]) -> Vec<Result<bool>> {
        let mut results: Vec<Result<bool>> = Vec::with_capacity(items.len());
        for piece in items.chunks_mut(self.config.max_batch) {
            results.extend(self.get_piece(piece));
        }
        results
    }

    fn get_piece(&self, piece: &mut [(&[u8], &mut Page)]) -> Vec<Result<bool>> {
        let keys: Vec<&[u8]> = piece.iter().map(|(k, _)| *k).collect();
        // From before the existence query to the end of the read: no delete of ours in between.
        let (readable, _reading) = self.begin_reads(&keys);
        let present = match self.contains(&keys) {
            Ok(present) => present
                .into_iter()
                .zip(&readable)
                .map(|(p, r)| p && *r)
                .collect::<Vec<_>>(),
            Err(err) => {
                let err = batch_cause(err);
                return piece
                    .iter()
                    .map(|_| Err(Error::Batch(Arc::clone(&err))))
                    .collect();
            }
        };
        let wanted: Vec<usize> = (0..piece.len()).filter(|&i| present[i]).collect();
        let mut results: Vec<Result<bool>> = (0..piece.len()).map(|_| Ok(false)).collect();
        if wanted.is_empty() {
            return results;
        }
        let outcome = self.read_verified(piece, &wanted);
        match outcome {
            Ok(verdicts) => {
                for (i, verdict) in wanted.iter().zip(verdicts) {
                    results[*i] = Ok(verdict);
                }
            }
            // Only a failed transfer is worth isolating; a refusal (no buffer, a registration
            // that stayed busy, transfers held) would refuse each key alike.
            Err(Error::Batch(cause)) if wanted.len() > 1 && cause.memory_abandoned() => {
                // Something in the batch failed (a short foreign object, a vanished one): isolate
                // each key so one bad object cannot fail its neighbours.
                for &i in &wanted {
                    results[i] = Ok(self.read_verified(piece, &[i]).is_ok_and(|v| v[0]));
                }
            }
            Err(err) => {
                // The object was there a moment ago (HEAD answered) but cannot be read as a
                // chunk: a short or damaged object, or one that just vanished. A miss is safe.
                tracing::warn!(
                    object = object_id(piece[wanted[0]].0),
                    error = %err,
                    "object present but unreadable; treated as a miss"
                );
            }
        }
        results
    }

    /// Reads the objects of `which` whole (header and payload) into staging buffers, in one
    /// batch, verifies them and copies the payloads that check out into the caller's pages. The
    /// caller's pages are never handed to the plugin, so a failed batch (after which the plugin
    /// may still write into what it was given) costs staging buffers, held out of use by the
    /// transport, and leaves the caller's pages free for a retry.
    fn read_verified(
        &self,
        piece: &mut [(&[u8], &mut Page)],
        which: &[usize],
    ) -> Result<Vec<bool>> {
        let Ok(mut staging) = self.staging.allocate_batch_within(which.len(), BUFFER_WAIT) else {
            return Err(Error::Config("no staging buffer came free".to_owned()));
        };
        let mut objects = Vec::with_capacity(which.len());
        for (&i, buffer) in which.iter().zip(staging.iter_mut()) {
            let (key, page) = &piece[i];
            buffer.set_len(HEADER_BYTES + page.len());
            objects.push((object_id(key), buffer.len()));
        }
        let registrations = self.register_all(&objects)?;
        let mut batch: Vec<_> = staging
            .iter_mut()
            .zip(&registrations)
            .map(|(buffer, r)| (buffer, StorageExtent::new(r.dev_id(), 0)))
            .collect();
        if let Err(err) = self.transport.read_pages(&mut batch, PageView::Exact) {
            return Err(Error::Batch(Arc::new(err)));
        }
        drop(batch);
        Ok(which
            .iter()
            .zip(&staging)
            .map(|(&i, buffer)| {
                let (key, page) = &mut piece[i];
                let (head, body) = buffer.as_slice().split_at(HEADER_BYTES);
                let verdict = header::verify(head, key, body);
                match &verdict {
                    Ok(()) => page.as_mut_slice().copy_from_slice(body),
                    Err(refusal) => tracing::warn!(
                        object = object_id(key),
                        reason = %refusal,
                        "object refused; treated as a miss"
                    ),
                }
                verdict.is_ok()
            })
            .collect())
    }

    /// Deletes a key's object. `Ok(false)` where this store has no control client (NIXL's
    /// plugins cannot delete: retention is then the bucket's lifecycle rules).
    pub fn delete(&self, key: &[u8]) -> Result<bool> {
        #[cfg(feature = "control")]
        if let Some(control) = &self.control {
            let id = object_id(key);
            let _deleting = self.begin_delete(id);
            control.delete(&[id])?;
            return Ok(true);
        }
        tracing::debug!(
            object = object_id(key),
            "no object control client: delete removes nothing"
        );
        Ok(false)
    }

    /// Marks `id` being deleted (new reads of it are refused) until the guard returned is
    /// dropped, and waits until this store's reads of it have ended, or for [`DELETE_WAIT`]
    /// with a warning: a read that long is stuck, and may then fail.
    #[cfg(feature = "control")]
    fn begin_delete(&self, id: u64) -> Deleting<'_> {
        let deadline = std::time::Instant::now() + DELETE_WAIT;
        let mut in_use = self.in_use();
        *in_use.deleting.entry(id).or_insert(0) += 1;
        while in_use.readers.contains_key(&id) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(object = id, "deleting an object still being read");
                break;
            }
            in_use = self
                .settled
                .wait_timeout(in_use, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Deleting { store: self, id }
    }

    /// The chunk objects in the bucket, oldest first, read from their headers; `None` where
    /// this store has no control client.
    #[cfg(feature = "control")]
    pub fn list(&self) -> Result<Option<Vec<crate::control::ListedObject>>> {
        self.control.as_ref().map(|c| c.list()).transpose()
    }
}
