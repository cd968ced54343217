//! The concurrency torture of the L2 adapters, shared by `tests/adapter_torture.rs` (a few
//! thousand operations) and the `kv_stress` binary (a million per adapter): eight threads on a
//! pool of a few slots mix store, load without a pin, lookup-and-pin / load / unlock, delete,
//! eviction and HiCache batch set/get on overlapping keys, and every byte of every hit is
//! compared with the content derived from its key. A pool much smaller than the key set keeps
//! slots and files changing hands all the time, which is where a reader can be served another
//! key's bytes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use kv_integration_tests::Rng;
use kv_integration_tests::services::S3Server;
use kv_l2_adapter::test_utils::{fill, key};
use kv_l2_adapter::{AdapterContext, AdapterFactory, ChunkKey, Engine, HiCache, L2Adapter};
use pinned_alloc::{Page, PagePool, PoolConfig};

/// LMCache-style keys the threads fight over.
const KEYS: u32 = 12;
/// HiCache page keys, through the facade, over the same adapter.
const PAGE_KEYS: u32 = 6;
/// Content seeds of the HiCache keys, far from the LMCache ones.
const PAGE_SEED: u32 = 1_000_000;
const THREADS: u64 = 8;

/// Where a torture run keeps its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// Files in a fresh folder (POSIX, or the native engine).
    Files,
    /// Objects in a fresh bucket of a real S3 server on loopback, through NIXL OBJ.
    S3,
    /// Segment files in a fresh folder (`layout: segments`; dynamic adapters only).
    Segments,
}

/// One torture run's shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// `nixl_store` or `nixl_store_dynamic`.
    pub(crate) kind: &'static str,
    /// Files or objects.
    pub(crate) storage: Storage,
    /// Which engine moves the bytes.
    pub(crate) engine: Engine,
    /// Slots of the static pool; chunks the dynamic capacity holds.
    pub(crate) slots: u32,
    /// Bytes of one chunk.
    pub(crate) chunk: usize,
    /// Operations over all threads.
    pub(crate) operations: u64,
}

impl Plan {
    /// The row label: adapter type and engine.
    pub(crate) fn label(&self) -> String {
        let engine = match (self.storage, self.engine) {
            (Storage::S3, _) => "NIXL OBJ (S3)",
            (Storage::Files, Engine::Native) => "native io_uring",
            (Storage::Files, Engine::Nixl) => "NIXL POSIX",
            (Storage::Files, _) => "auto",
            (Storage::Segments, Engine::Nixl) => "segments, NIXL POSIX",
            (Storage::Segments, _) => "segments, native io_uring",
        };
        format!("{} {engine}", self.kind)
    }
}

/// What one run saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Operations done.
    pub(crate) operations: u64,
    /// Loads that reported a hit, pinned or not, HiCache included.
    pub(crate) hits: u64,
    /// Hits whose bytes (or length) were not the key's.
    pub(crate) wrong: u64,
    /// Keys that `lookup_and_pin` reported present and the load that followed missed.
    pub(crate) pinned_misses: u64,
}

#[derive(Default)]
struct Counters {
    operations: AtomicU64,
    hits: AtomicU64,
    wrong: AtomicU64,
    pinned_misses: AtomicU64,
}

/// The `--l2-adapter` JSON of a plan's adapter over objects of `server`'s bucket.
fn s3_json(plan: &Plan, server: &S3Server) -> String {
    let pool = if plan.kind == "nixl_store" {
        format!(r#","pool_size":{}"#, plan.slots)
    } else {
        String::new()
    };
    format!(
        r#"{{"type":"{}","backend":"OBJ","backend_params":{{"bucket":"{}","endpoint_override":"{}","scheme":"http","region":"us-east-1","access_key":"{}","secret_key":"{}"}}{pool}}}"#,
        plan.kind, server.bucket, server.endpoint, server.access_key, server.secret_key
    )
}

/// The `--l2-adapter` JSON of a plan's adapter over files in `dir`.
fn json(plan: &Plan, dir: &Path) -> String {
    match plan.kind {
        "nixl_store" => format!(
            r#"{{"type":"nixl_store","backend":"POSIX","backend_params":{{"file_path":"{}","use_direct_io":"true"}},"pool_size":{}}}"#,
            dir.display(),
            plan.slots
        ),
        _ => {
            let gb = (u64::from(plan.slots) * plan.chunk as u64) as f64 / (1u64 << 30) as f64;
            format!(
                r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","use_direct_io":"true","max_capacity_gb":"{gb}"}}}}"#,
                dir.display()
            )
        }
    }
}

/// The `--l2-adapter` JSON of a dynamic adapter over segments in `dir`: two segments of the
/// smallest size (1 MiB), so that keys come and go and segments are reused, and the 64 KiB the
/// folder's lock file and extent blocks take beside them.
fn segments_json(dir: &Path) -> String {
    let gb = (2.0 + 1.0 / 16.0) / 1024.0;
    format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","use_direct_io":"true","max_capacity_gb":"{gb}","layout":"segments","segment_size_mb":"1"}}}}"#,
        dir.display()
    )
}

/// Pages each thread keeps: one filled page per key it may store, two to load into.
fn pages_per_thread() -> usize {
    (KEYS + PAGE_KEYS) as usize + 2
}

/// Builds the plan's adapter through the public factory and tortures it.
pub(crate) fn run(plan: &Plan) -> Result<Tally> {
    let dir = tempfile::tempdir()?;
    let pages = THREADS as usize * pages_per_thread();
    let memory = PoolConfig::new(
        plan.chunk,
        (pages * plan.chunk.next_multiple_of(4096)) as u64,
    )
    .build()?;
    let context = AdapterContext::new(Arc::clone(&memory)).with_engine(plan.engine);
    let server = match plan.storage {
        Storage::S3 => Some(S3Server::try_start().map_err(anyhow::Error::msg)?),
        Storage::Files | Storage::Segments => None,
    };
    let config = match (&server, plan.storage) {
        (Some(server), _) => s3_json(plan, server),
        (None, Storage::Segments) => segments_json(dir.path()),
        (None, _) => json(plan, dir.path()),
    };
    let adapter = AdapterFactory::new()
        .build(&[config], &context)?
        .remove(0)
        .1;
    let tally = torture(&adapter, &memory, plan)?;
    adapter.close()?;
    Ok(tally)
}

/// The bytes key `seed` holds.
fn expected(memory: &Arc<PagePool>, seed: u32) -> Result<Vec<u8>> {
    let mut page = memory
        .allocate()
        .context("a page for the expected content")?;
    fill(seed, &mut page);
    Ok(page.as_slice().to_vec())
}

fn torture(adapter: &Arc<dyn L2Adapter>, memory: &Arc<PagePool>, plan: &Plan) -> Result<Tally> {
    let mut contents = Vec::new();
    for i in 0..KEYS {
        contents.push(expected(memory, i)?);
    }
    let mut page_contents = Vec::new();
    for i in 0..PAGE_KEYS {
        page_contents.push(expected(memory, PAGE_SEED + i)?);
    }
    let hicache = HiCache::new(Arc::clone(adapter), "torture/model", 0, 1);
    let counters = Counters::default();
    let per_thread = plan.operations.div_ceil(THREADS);
    std::thread::scope(|scope| -> Result<()> {
        let mut workers = Vec::new();
        for thread in 0..THREADS {
            let mut owned = memory.allocate_batch(pages_per_thread())?;
            let loads = owned.split_off((KEYS + PAGE_KEYS) as usize);
            for (i, page) in owned.iter_mut().enumerate() {
                let i = i as u32;
                fill(if i < KEYS { i } else { PAGE_SEED + i - KEYS }, page);
            }
            let worker = Worker {
                adapter: adapter.as_ref(),
                hicache: &hicache,
                contents: &contents,
                page_contents: &page_contents,
                counters: &counters,
                stored: owned,
                loads,
                chunk: plan.chunk,
                rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (thread + 1).wrapping_mul(0xA5A5_A5A5)),
            };
            workers.push(scope.spawn(move || worker.run(per_thread)));
        }
        for worker in workers {
            if worker.join().is_err() {
                anyhow::bail!("a torture thread panicked");
            }
        }
        Ok(())
    })?;
    leak_check(adapter, memory, plan)?;
    Ok(Tally {
        operations: counters.operations.into_inner(),
        hits: counters.hits.into_inner(),
        wrong: counters.wrong.into_inner(),
        pinned_misses: counters.pinned_misses.into_inner(),
    })
}

/// Every slot (or byte of capacity) came back: with everything evicted, the index is empty and
/// a batch filling the whole pool is stored.
fn leak_check(adapter: &Arc<dyn L2Adapter>, memory: &Arc<PagePool>, plan: &Plan) -> Result<()> {
    adapter.evict(1.0, None);
    let usage = adapter.usage();
    anyhow::ensure!(
        usage.keys == 0 && usage.used_bytes == 0,
        "after evicting everything: {usage:?}"
    );
    let mut pages = memory.allocate_batch(plan.slots as usize)?;
    let keys: Vec<ChunkKey> = (0..plan.slots).map(|i| key(KEYS + i, None)).collect();
    for (i, page) in (KEYS..).zip(pages.iter_mut()) {
        fill(i, page);
    }
    let refs: Vec<&Page> = pages.iter().collect();
    let report = adapter.store(&keys, &refs);
    anyhow::ensure!(
        report.bytes() == u64::from(plan.slots) * plan.chunk as u64,
        "slots or capacity leaked: a batch filling the pool was refused: {report:?}"
    );
    Ok(())
}

struct Worker<'a> {
    adapter: &'a dyn L2Adapter,
    hicache: &'a HiCache,
    contents: &'a [Vec<u8>],
    page_contents: &'a [Vec<u8>],
    counters: &'a Counters,
    /// Page `i < KEYS` holds key `i`'s content, then the HiCache keys'.
    stored: Vec<Page>,
    loads: Vec<Page>,
    chunk: usize,
    rng: Rng,
}

fn page_key(i: u32) -> String {
    format!("page-{i}")
}

impl Worker<'_> {
    /// One or two distinct key indices below `n`.
    fn pick(&mut self, n: u32) -> Vec<u32> {
        let first = self.rng.below(u64::from(n)) as u32;
        if self.rng.below(2) == 0 {
            return vec![first];
        }
        let second = (first + 1 + self.rng.below(u64::from(n) - 1) as u32) % n;
        vec![first, second]
    }

    /// Counts a hit and whether its bytes are the expected ones.
    fn check(&self, page: &Page, expected: &[u8]) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        if page.len() != self.chunk || page.as_slice() != expected {
            self.counters.wrong.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn load(&mut self, picked: &[u32], pinned: bool) {
        let keys: Vec<ChunkKey> = picked.iter().map(|&i| key(i, None)).collect();
        let wanted = if pinned {
            self.adapter.lookup_and_pin(&keys)
        } else {
            vec![true; keys.len()]
        };
        for page in &mut self.loads {
            page.set_len(self.chunk);
        }
        let mut refs: Vec<&mut Page> = self.loads.iter_mut().take(keys.len()).collect();
        let found = self.adapter.load(&keys, &mut refs);
        for (n, &i) in picked.iter().enumerate() {
            if found[n] {
                self.check(&self.loads[n], &self.contents[i as usize]);
            } else if pinned && wanted[n] {
                self.counters.pinned_misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        if pinned {
            let held: Vec<ChunkKey> = keys
                .into_iter()
                .zip(wanted)
                .filter_map(|(k, hit)| hit.then_some(k))
                .collect();
            self.adapter.unlock(&held);
        }
    }

    fn hicache_get(&mut self, picked: &[u32]) {
        let names: Vec<String> = picked.iter().map(|&i| page_key(i)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for page in &mut self.loads {
            page.set_len(self.chunk);
        }
        let mut refs: Vec<&mut Page> = self.loads.iter_mut().take(names.len()).collect();
        let found = self.hicache.batch_get(&names, &mut refs);
        for (n, &i) in picked.iter().enumerate() {
            if found[n] {
                self.check(&self.loads[n], &self.page_contents[i as usize]);
            }
        }
    }

    fn run(mut self, operations: u64) {
        for _ in 0..operations {
            match self.rng.below(20) {
                0..=5 => {
                    let picked = self.pick(KEYS);
                    let keys: Vec<ChunkKey> = picked.iter().map(|&i| key(i, None)).collect();
                    let pages: Vec<&Page> =
                        picked.iter().map(|&i| &self.stored[i as usize]).collect();
                    self.adapter.store(&keys, &pages);
                }
                6..=9 => {
                    let picked = self.pick(KEYS);
                    self.load(&picked, false);
                }
                10..=12 => {
                    let picked = self.pick(KEYS);
                    self.load(&picked, true);
                }
                13..=14 => {
                    let picked = self.pick(KEYS);
                    let keys: Vec<ChunkKey> = picked.iter().map(|&i| key(i, None)).collect();
                    self.adapter.delete(&keys);
                }
                15 => {
                    self.adapter.evict(0.25, None);
                }
                16 => {
                    let picked = self.pick(PAGE_KEYS);
                    let names: Vec<String> = picked.iter().map(|&i| page_key(i)).collect();
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let pages: Vec<&Page> = picked
                        .iter()
                        .map(|&i| &self.stored[(KEYS + i) as usize])
                        .collect();
                    self.hicache.batch_set(&names, &pages);
                }
                _ => {
                    let picked = self.pick(PAGE_KEYS);
                    self.hicache_get(&picked);
                }
            }
            self.counters.operations.fetch_add(1, Ordering::Relaxed);
        }
    }
}
