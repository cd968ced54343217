//! The per-key group: rows that store one key per chunk (the dynamic file store, the L2
//! adapters, NIXL's Python API driven LMCache's way), `--batch` chunks per call (default
//! [`DEFAULT_BATCH`]), on as many chunks as stay in host memory at once, in interleaved rounds
//! with their raw figure: fio on one preallocated file of the same bytes at its best queue
//! depth, run whenever another row of the group is. fio writing a fresh file per chunk runs
//! beside them too, to show what allocating a file per key costs the file system, and the
//! adapter over segments driven by [`THREADS`] threads at once (`concurrent`,
//! `concurrent-native`), each storing and loading its own keys through one adapter.
//!
//! The L2-adapter rows build their store from `--l2-adapter` JSON through the public
//! [`kv_l2_adapter::StoreBuilder`], as a user's process does: a row for another store layout is
//! one more [`AdapterSpec`] (or `--adapter-params '{"layout":"segments"}'` on the command line).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nixl_core::{NixlConfig, NixlTransport, Transport, TransportExt};
use nixl_file::{FileOptions, open_storage_file};
use pinned_alloc::{Page, PagePool, PoolConfig};
use serde_json::{Map, Value};

use crate::engines::{DeviceTally, Engine, Figures, Series, Workload, device_share, fill, gbps};
use crate::fio::{self, Device};

/// Chunks per store or load call unless `--batch` says otherwise: a request's worth, as LMCache
/// calls its storage. LMCache's `store` hands the storage manager every chunk of a request's
/// new tokens in one `batched_put`, and a retrieve loads a request's hit prefix in one call; at
/// its default `chunk_size` of 256 tokens, requests of 8k to 32k tokens make 32 to 128 chunks
/// per call, and 64 is a 16k-token request, the middle of that range (and one transfer of the
/// segment store, whose batches hold at most 128 entries). A workload with fewer chunks stores
/// them all in one call (32 MiB chunks: 32).
pub(crate) const DEFAULT_BATCH: usize = 64;

/// Threads of the concurrent rows, each storing and loading its own keys through one adapter.
pub(crate) const THREADS: usize = 8;

/// Passes of NIXL's Python API so far in this process: each names its files after its own
/// number, so no pass writes a file name an earlier one used.
static PYTHON_PASSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One L2-adapter row: `{"type":"nixl_store_dynamic","backend":"POSIX", "backend_params":
/// {file_path, use_direct_io: true, max_capacity_gb, ..params}}` on `engine`.
#[derive(Debug, Clone)]
pub(crate) struct AdapterSpec {
    /// Its `--only` name (`adapter`, `adapter-native`, ...).
    pub(crate) name: String,
    pub(crate) label: String,
    pub(crate) engine: kv_l2_adapter::Engine,
    /// Backend params beside the folder, O_DIRECT and capacity, e.g. `{"layout":"segments"}`;
    /// none: per-key files.
    pub(crate) params: Map<String, Value>,
}

impl AdapterSpec {
    /// Per-key files (`layout` absent) and segments (`layout: segments`), each over NIXL POSIX
    /// and over the native engine.
    pub(crate) fn defaults() -> Vec<Self> {
        let mut specs = Self::pair(&Map::new());
        specs.extend(Self::segments());
        specs
    }

    /// `layout: segments` over NIXL POSIX and over the native engine.
    pub(crate) fn segments() -> Vec<Self> {
        let mut params = Map::new();
        params.insert("layout".into(), "segments".into());
        Self::pair(&params)
    }

    /// Rows for `params` on both engines, named after them.
    pub(crate) fn pair(params: &Map<String, Value>) -> Vec<Self> {
        let what = if params.is_empty() {
            "files".to_owned()
        } else {
            params
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let suffix = if params.is_empty() {
            String::new()
        } else {
            format!("[{}]", what.replace(' ', ";"))
        };
        [
            (kv_l2_adapter::Engine::Nixl, "adapter", "NIXL POSIX"),
            (
                kv_l2_adapter::Engine::Native,
                "adapter-native",
                "native io_uring",
            ),
        ]
        .into_iter()
        .map(|(engine, name, engine_label)| Self {
            name: format!("{name}{suffix}"),
            label: format!("L2 adapter, {what} ({engine_label})"),
            engine,
            params: params.clone(),
        })
        .collect()
    }

    /// The `--l2-adapter` value of this row over `folder`, with room for `bytes` of chunks (a
    /// segment store preallocates its capacity, so it is sized to the run).
    pub(crate) fn sized(&self, folder: &Path, bytes: u64) -> Value {
        // Two default segments of slack: the last one a run fills is partly used.
        let capacity_gb =
            (bytes + 2 * nixl_file::DEFAULT_SEGMENT_BYTES) as f64 / (1u64 << 30) as f64;
        self.value(folder, capacity_gb)
    }

    /// The `--l2-adapter` value of this row over `folder` with `max_capacity_gb` of
    /// `capacity_gb`, O_DIRECT, no eviction, its data deleted on close.
    pub(crate) fn value(&self, folder: &Path, capacity_gb: f64) -> Value {
        let mut backend_params = Map::new();
        backend_params.insert("file_path".into(), folder.display().to_string().into());
        backend_params.insert("use_direct_io".into(), "true".into());
        backend_params.insert("max_capacity_gb".into(), capacity_gb.to_string().into());
        backend_params.extend(self.params.clone());
        serde_json::json!({
            "type": "nixl_store_dynamic",
            "backend": "POSIX",
            "backend_params": backend_params,
            "persist_enabled": false,
        })
    }

    /// A store built from `value` the way a user's process builds one, on this row's engine,
    /// with a pool of `pages` pages of `chunk_bytes`.
    pub(crate) fn build(
        &self,
        value: &Value,
        chunk_bytes: usize,
        pages: usize,
    ) -> Result<kv_l2_adapter::Store> {
        let stride = chunk_bytes.next_multiple_of(4096) as u64;
        let text = value.to_string();
        kv_l2_adapter::StoreBuilder::from_l2_adapters([text.as_str()])
            .with_chunk_bytes(chunk_bytes)
            .with_engine(self.engine)
            .with_pool_bytes(pages as u64 * stride)
            .build()
            .with_context(|| format!("building the store of {text}"))
    }
}

/// A store driven one key per chunk, `--batch` chunks per call.
trait PerKey {
    /// Starts a pass with an empty store.
    fn open(&mut self) -> Result<()>;
    /// The pool the pages it stores and loads must come from (registered with its transport).
    fn pool(&self) -> Result<Arc<PagePool>>;
    /// Stores chunks `range` from `pages`.
    fn put(&mut self, range: std::ops::Range<usize>, pages: &[Page]) -> Result<()>;
    /// Loads chunks `range` into `pages`; per chunk, whether it loaded.
    fn get(&mut self, range: std::ops::Range<usize>, pages: &mut [Page]) -> Result<Vec<bool>>;
    /// Ends the pass, deleting what it stored.
    fn close(&mut self) -> Result<()>;
}

/// A member of the per-key group's rounds.
enum Member<'a> {
    /// A pass that times itself (fio, NIXL's Python API, the concurrent rows).
    Pass(Box<dyn FnMut() -> Result<Figures> + 'a>),
    /// A store the group drives.
    Store(Box<dyn PerKey + 'a>),
}

/// One pass of a store: every chunk stored, then loaded and verified, `batch` chunks per
/// call; only the put and get calls are timed.
fn store_pass(
    workload: &Workload,
    batch: usize,
    store: &mut dyn PerKey,
    seed: impl Fn(usize) -> u64,
    expected: &mut Page,
    device: Option<&Device>,
) -> Result<Figures> {
    store.open()?;
    let pool = store.pool()?;
    let (mut put_time, mut get_time) = (Duration::ZERO, Duration::ZERO);
    let mut writes = DeviceTally::new(device);
    for start in (0..workload.chunks).step_by(batch) {
        let range = start..(start + batch).min(workload.chunks);
        let mut pages = pool.allocate_batch(range.len())?;
        for (page, i) in pages.iter_mut().zip(range.clone()) {
            fill(seed(i), page);
        }
        writes.start();
        let started = Instant::now();
        store.put(range, &pages)?;
        put_time += started.elapsed();
        writes.stop();
    }
    let mut reads = DeviceTally::new(device);
    for start in (0..workload.chunks).step_by(batch) {
        let range = start..(start + batch).min(workload.chunks);
        let mut pages = pool.allocate_batch(range.len())?;
        reads.start();
        let started = Instant::now();
        let loaded = store.get(range.clone(), &mut pages)?;
        get_time += started.elapsed();
        reads.stop();
        for ((ok, page), i) in loaded.into_iter().zip(&pages).zip(range) {
            fill(seed(i), expected);
            ensure!(
                ok && page.as_slice() == expected.as_slice(),
                "chunk {i} did not load intact"
            );
        }
    }
    store.close()?;
    Ok(Figures {
        put: gbps(workload.bytes(), put_time.as_secs_f64()),
        get: gbps(workload.bytes(), get_time.as_secs_f64()),
        device_put: device_share(writes.written(), workload.bytes()),
        device_get: device_share(reads.read(), workload.bytes()),
        sweep: None,
    })
}

/// Runs the members in interleaved rounds, the order alternating (A, B, C, then C, B, A) so that
/// the file-system state one leaves behind (ext4 slows inode allocation after many deletions)
/// weighs on all alike.
fn interleave(
    workload: &Workload,
    batch: usize,
    members: &mut [(Series, Member<'_>)],
    rounds: usize,
    device: Option<&Device>,
) -> Result<()> {
    let count = members.len();
    let verify_pool = PoolConfig::new(workload.chunk_bytes, workload.chunk_bytes as u64).build()?;
    let mut expected = verify_pool.allocate().context("a page for verification")?;
    for round in 0..rounds {
        eprintln!("bench:   round {}/{rounds}", round + 1);
        for step in 0..count {
            let index = if round % 2 == 0 {
                step
            } else {
                count - 1 - step
            };
            let (series, member) = &mut members[index];
            let figures = match member {
                Member::Pass(pass) => pass(),
                Member::Store(store) => {
                    let seed = |i: usize| (((round * count + index) << 20) | i) as u64;
                    store_pass(workload, batch, store.as_mut(), seed, &mut expected, device)
                }
            }
            .with_context(|| format!("{} in round {round}", series.label))?;
            series.rounds.push(figures);
        }
    }
    Ok(())
}

/// Bytes a segment store needs for `chunks` chunks of `chunk_bytes`: each padded to 4 KiB
/// behind its 4 KiB header.
pub(crate) fn entry_bytes(chunks: usize, chunk_bytes: usize) -> u64 {
    (chunks * (chunk_bytes.next_multiple_of(4096) + 4096)) as u64
}

/// The per-key group on `workload`, `batch` chunks per call: fio on one file (the raw figure,
/// run whenever another row is), fio on a fresh file per chunk, NIXL's Python API, the file
/// store, the adapter rows and the concurrent rows, as far as `wanted` (by `--only` name) and
/// what is installed allow.
pub(crate) fn per_key_rounds(
    workload: &Workload,
    batch: usize,
    dir: &Path,
    rounds: usize,
    adapters: &[AdapterSpec],
    wanted: &dyn Fn(&str) -> bool,
    device: Option<&Device>,
) -> Result<Vec<Series>> {
    let batch = batch.clamp(1, workload.chunks);
    let pool = PoolConfig::new(
        workload.chunk_bytes,
        ((batch + 1) * workload.chunk_bytes) as u64,
    )
    .build()?;
    let mut members: Vec<(Series, Member<'_>)> = Vec::new();
    let engine_wanted = |e: Engine| wanted(e.name()) && e.available();
    if engine_wanted(Engine::FioFreshFiles) {
        let folder = dir.join("fio-fresh");
        members.push((
            Series::new(Engine::FioFreshFiles),
            Member::Pass(Box::new(move || fio_fresh_files(workload, &folder, device))),
        ));
    }
    if engine_wanted(Engine::NixlPython) {
        members.push((
            Series::new(Engine::NixlPython),
            Member::Pass(Box::new(move || python(workload, batch, dir, device))),
        ));
    }
    if engine_wanted(Engine::FileStore) {
        let transport: Arc<dyn Transport> = Arc::new(NixlTransport::new(NixlConfig::new("POSIX"))?);
        let memory = transport.register_pool(&pool)?;
        members.push((
            Series::new(Engine::FileStore),
            Member::Store(Box::new(FileStoreRow {
                folder: dir.join("file-store"),
                transport,
                pool: Arc::clone(&pool),
                store: None,
                _memory: memory,
            })),
        ));
    }
    for (i, spec) in adapters.iter().enumerate() {
        if !wanted(&spec.name) && !wanted(Engine::Adapter.name()) {
            continue;
        }
        let folder = dir.join(format!("adapter-{i}"));
        members.push((
            Series::named(Engine::Adapter, &spec.name, &spec.label),
            Member::Store(Box::new(AdapterRow {
                value: spec.sized(&folder, entry_bytes(workload.chunks, workload.chunk_bytes)),
                spec: spec.clone(),
                chunk_bytes: workload.chunk_bytes,
                pages: batch + 1,
                folder,
                store: None,
            })),
        ));
    }
    for (i, spec) in AdapterSpec::segments().into_iter().enumerate() {
        let name = spec.name.replacen("adapter", "concurrent", 1);
        let name = name.split('[').next().unwrap_or(&name).to_owned();
        if !wanted(&name) {
            continue;
        }
        let label = spec
            .label
            .replacen(" (", &format!(", {THREADS} threads ("), 1);
        let folder = dir.join(format!("concurrent-{i}"));
        let mut passes = 0u64;
        members.push((
            Series::named(Engine::Adapter, &name, &label),
            Member::Pass(Box::new(move || {
                passes += 1;
                concurrent_pass(workload, batch, &spec, &folder, passes << 32, device)
            })),
        ));
    }
    if Engine::Fio.available() && (!members.is_empty() || wanted(Engine::Fio.name())) {
        let path = dir.join("per-key-raw.chunks");
        members.insert(
            0,
            (
                Series::new(Engine::Fio),
                Member::Pass(Box::new(move || fio_one_file(workload, &path, device))),
            ),
        );
    }
    interleave(workload, batch, &mut members, rounds, device)?;
    Ok(members.into_iter().map(|(series, _)| series).collect())
}

fn bench_key(i: usize) -> nixl_file::FileKey {
    nixl_file::FileKey {
        model: "kv-bench".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: (i as u64).to_be_bytes().to_vec(),
        cache_salt: None,
    }
}

/// The dynamic file store over NIXL POSIX, as the per-key adapter drives it.
struct FileStoreRow {
    folder: PathBuf,
    transport: Arc<dyn Transport>,
    pool: Arc<PagePool>,
    store: Option<nixl_file::DynamicFileStore>,
    _memory: nixl_core::Registration,
}

impl PerKey for FileStoreRow {
    fn open(&mut self) -> Result<()> {
        self.store = Some(nixl_file::DynamicFileStore::open(
            Arc::clone(&self.transport),
            nixl_file::DynamicConfig::new(&self.folder).with_direct_io(true),
        )?);
        Ok(())
    }

    fn pool(&self) -> Result<Arc<PagePool>> {
        Ok(Arc::clone(&self.pool))
    }

    fn put(&mut self, range: std::ops::Range<usize>, pages: &[Page]) -> Result<()> {
        let store = self.store.as_ref().context("store not open")?;
        let keys: Vec<_> = range.map(bench_key).collect();
        let items: Vec<_> = keys.iter().zip(pages).collect();
        store
            .put(&items)
            .into_iter()
            .try_for_each(|r| r.map(drop).map_err(Into::into))
    }

    fn get(&mut self, range: std::ops::Range<usize>, pages: &mut [Page]) -> Result<Vec<bool>> {
        let store = self.store.as_ref().context("store not open")?;
        let keys: Vec<_> = range.map(bench_key).collect();
        let mut items: Vec<_> = keys.iter().zip(pages.iter_mut()).collect();
        store
            .get(&mut items)
            .into_iter()
            .map(|r| r.map_err(Into::into))
            .collect()
    }

    fn close(&mut self) -> Result<()> {
        self.store = None;
        Ok(std::fs::remove_dir_all(&self.folder)?)
    }
}

/// An L2 adapter built from `--l2-adapter` JSON by [`kv_l2_adapter::StoreBuilder`], each pass
/// a fresh store over an empty folder.
struct AdapterRow {
    value: Value,
    spec: AdapterSpec,
    chunk_bytes: usize,
    /// Pages of its pool: a batch, and one to spare.
    pages: usize,
    folder: PathBuf,
    store: Option<kv_l2_adapter::Store>,
}

impl AdapterRow {
    fn adapter(&self) -> Result<&Arc<dyn kv_l2_adapter::L2Adapter>> {
        Ok(self.store.as_ref().context("adapter not open")?.adapter())
    }
}

pub(crate) fn adapter_key(i: usize) -> kv_l2_adapter::ChunkKey {
    kv_l2_adapter::ChunkKey::from_file_key(bench_key(i))
}

impl PerKey for AdapterRow {
    fn open(&mut self) -> Result<()> {
        self.store = Some(self.spec.build(&self.value, self.chunk_bytes, self.pages)?);
        Ok(())
    }

    fn pool(&self) -> Result<Arc<PagePool>> {
        Ok(Arc::clone(
            self.store.as_ref().context("adapter not open")?.pool(),
        ))
    }

    fn put(&mut self, range: std::ops::Range<usize>, pages: &[Page]) -> Result<()> {
        let keys: Vec<_> = range.map(adapter_key).collect();
        let refs: Vec<&Page> = pages.iter().collect();
        let report = self.adapter()?.store(&keys, &refs);
        ensure!(report.is_successful(), "adapter store failed: {report:?}");
        Ok(())
    }

    fn get(&mut self, range: std::ops::Range<usize>, pages: &mut [Page]) -> Result<Vec<bool>> {
        let keys: Vec<_> = range.map(adapter_key).collect();
        let mut refs: Vec<&mut Page> = pages.iter_mut().collect();
        Ok(self.adapter()?.load(&keys, &mut refs))
    }

    fn close(&mut self) -> Result<()> {
        if let Some(store) = self.store.take() {
            store.close()?;
        }
        Ok(std::fs::remove_dir_all(&self.folder)?)
    }
}

/// fio on one preallocated file of the workload's bytes, best queue depth: the group's raw
/// figure. The file is new every pass, preallocated as the one-file group's is, and fully
/// written by each depth's write before that depth reads it.
fn fio_one_file(workload: &Workload, path: &Path, device: Option<&Device>) -> Result<Figures> {
    drop(open_storage_file(
        path,
        FileOptions::new()
            .with_direct_io(true)
            .with_preallocate(workload.bytes()),
    )?);
    let layout = [
        "--fallocate=none".to_owned(),
        format!("--filename={}", path.display()),
    ];
    let sweep = fio::sweep(&layout, workload.chunk_bytes, workload.bytes(), device);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(Figures::from_sweep(sweep?))
}

/// fio writing a fresh file per chunk (created and preallocated by fio, as the store does) at
/// every queue depth, then reading them back: what allocating a file per chunk costs. Every
/// depth writes into a folder of its own, so no depth overwrites another's files.
fn fio_fresh_files(workload: &Workload, folder: &Path, device: Option<&Device>) -> Result<Figures> {
    let mut sweep = fio::Sweep::default();
    for depth in fio::QUEUE_DEPTHS {
        let folder = folder.join(format!("qd{depth}"));
        std::fs::create_dir_all(&folder)?;
        let layout = [
            format!("--directory={}", folder.display()),
            format!("--nrfiles={}", workload.chunks),
            format!("--filesize={}", workload.chunk_bytes),
            "--openfiles=64".to_owned(),
            "--fallocate=native".to_owned(),
        ];
        let one = fio::sweep_one(
            &layout,
            depth,
            workload.chunk_bytes,
            workload.bytes(),
            device,
        );
        std::fs::remove_dir_all(&folder)
            .with_context(|| format!("removing {}", folder.display()))?;
        sweep.depths.push(one?);
    }
    std::fs::remove_dir_all(folder).with_context(|| format!("removing {}", folder.display()))?;
    Ok(Figures::from_sweep(sweep))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python_bin() -> PathBuf {
    workspace().join("target/test-services/venv/bin/python")
}

pub(crate) fn python_ready() -> bool {
    Command::new(python_bin())
        .args(["-c", "import numpy, nixl_cu12._api"])
        .env("PYTHONPATH", workspace().join("target/nixl-runtime"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// NIXL's Python API, LMCache-style: one O_DIRECT file per chunk, created, registered and
/// released per batch of `batch`; new file names every pass: each call is a pass with its own
/// number in this process, which names both its folder (`python-N`) and its files
/// (`passN_chunk_I.bin`), so no pass reuses a name an earlier one wrote (and removed). The
/// script times its own transfers and verifies every chunk outside them; the device counters
/// span the whole script.
fn python(
    workload: &Workload,
    batch: usize,
    dir: &Path,
    device: Option<&Device>,
) -> Result<Figures> {
    let pass = PYTHON_PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let folder = dir.join(format!("python-{pass}"));
    std::fs::create_dir_all(&folder)?;
    let before = device.and_then(Device::counters);
    let output = Command::new(python_bin())
        .arg(workspace().join("bench/benches/nixl_lmcache_style.py"))
        .arg(&folder)
        .arg(workload.chunk_bytes.to_string())
        .arg(workload.chunks.to_string())
        .arg(batch.to_string())
        .arg("1")
        .arg("1")
        .arg(pass.to_string())
        .env("PYTHONPATH", workspace().join("target/nixl-runtime"))
        .output()
        .context("running the NIXL Python benchmark")?;
    let after = device.and_then(Device::counters);
    let _ = std::fs::remove_dir_all(&folder);
    ensure!(
        output.status.success(),
        "NIXL Python benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .context("NIXL Python benchmark output")?;
    let figure = |key: &str| {
        result[key]
            .as_f64()
            .with_context(|| format!("NIXL Python benchmark output has no {key}"))
    };
    let moved = before.zip(after).map(|(b, a)| b.since(a));
    Ok(Figures {
        put: figure("put_gbps")?,
        get: figure("get_gbps")?,
        device_put: device_share(moved.map(|m| m.1), workload.bytes()),
        device_get: device_share(moved.map(|m| m.0), workload.bytes()),
        sweep: None,
    })
}

/// One pass of `spec` over a fresh store in `folder`, driven by [`THREADS`] threads at once
/// through one adapter: each stores its own share of the chunks, `batch` per call, then every
/// thread loads its share back, and verifies it once all are done. Every page is filled (and
/// zeroed for the loads) before its phase starts; a phase lasts from the first thread's start
/// to the last thread's end, and the GB/s are all threads' bytes over that.
fn concurrent_pass(
    workload: &Workload,
    batch: usize,
    spec: &AdapterSpec,
    folder: &Path,
    seed: u64,
    device: Option<&Device>,
) -> Result<Figures> {
    let threads = THREADS.min(workload.chunks);
    let share = workload.chunks.div_ceil(threads);
    let value = spec.sized(folder, entry_bytes(workload.chunks, workload.chunk_bytes));
    let store = spec.build(&value, workload.chunk_bytes, workload.chunks + threads)?;
    let adapter = Arc::clone(store.adapter());
    let pool = Arc::clone(store.pool());
    let barrier = std::sync::Barrier::new(threads + 1);
    let (mut writes, mut reads) = (DeviceTally::new(device), DeviceTally::new(device));
    let outcomes: Vec<Result<[Instant; 4]>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let range =
                    (t * share).min(workload.chunks)..((t + 1) * share).min(workload.chunks);
                let (adapter, pool, barrier) = (&adapter, &pool, &barrier);
                let seed = |i: usize| seed | i as u64;
                scope.spawn(move || -> Result<[Instant; 4]> {
                    // Every barrier is reached whatever fails, so no thread waits for ever.
                    let mut pages = pool
                        .allocate_batch(range.len())
                        .map_err(anyhow::Error::from);
                    if let Ok(pages) = &mut pages {
                        for (page, i) in pages.iter_mut().zip(range.clone()) {
                            fill(seed(i), page);
                        }
                    }
                    barrier.wait();
                    let put_start = Instant::now();
                    let mut stored = Ok(());
                    if let Ok(pages) = &pages {
                        for (first, chunk) in range.clone().step_by(batch).zip(pages.chunks(batch))
                        {
                            let keys: Vec<_> =
                                (first..first + chunk.len()).map(adapter_key).collect();
                            let refs: Vec<&Page> = chunk.iter().collect();
                            let report = adapter.store(&keys, &refs);
                            if !report.is_successful() {
                                stored = Err(anyhow::anyhow!("adapter store failed: {report:?}"));
                                break;
                            }
                        }
                    }
                    let put_end = Instant::now();
                    barrier.wait();
                    if let Ok(pages) = &mut pages {
                        pages.iter_mut().for_each(|p| p.as_mut_slice().fill(0));
                    }
                    barrier.wait();
                    let get_start = Instant::now();
                    let mut loaded = Vec::with_capacity(range.len());
                    if let Ok(pages) = &mut pages {
                        for (first, chunk) in
                            range.clone().step_by(batch).zip(pages.chunks_mut(batch))
                        {
                            let keys: Vec<_> =
                                (first..first + chunk.len()).map(adapter_key).collect();
                            let mut refs: Vec<&mut Page> = chunk.iter_mut().collect();
                            loaded.extend(adapter.load(&keys, &mut refs));
                        }
                    }
                    let get_end = Instant::now();
                    barrier.wait();
                    let pages = pages?;
                    stored?;
                    let verify_pool =
                        PoolConfig::new(workload.chunk_bytes, workload.chunk_bytes as u64)
                            .build()?;
                    let mut expected = verify_pool.allocate().context("a page for verification")?;
                    for ((page, ok), i) in pages.iter().zip(&loaded).zip(range) {
                        fill(seed(i), &mut expected);
                        ensure!(
                            *ok && page.as_slice() == expected.as_slice(),
                            "chunk {i} did not load intact"
                        );
                    }
                    Ok([put_start, put_end, get_start, get_end])
                })
            })
            .collect();
        writes.start();
        barrier.wait();
        barrier.wait();
        writes.stop();
        reads.start();
        barrier.wait();
        barrier.wait();
        reads.stop();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked")))
            })
            .collect()
    });
    let times = outcomes.into_iter().collect::<Result<Vec<_>>>()?;
    drop(adapter);
    drop(pool);
    store.close()?;
    std::fs::remove_dir_all(folder).with_context(|| format!("removing {}", folder.display()))?;
    let span = |start: usize, end: usize| {
        let first = times.iter().map(|t| t[start]).min();
        let last = times.iter().map(|t| t[end]).max();
        first.zip(last).map_or(0.0, |(first, last)| {
            last.duration_since(first).as_secs_f64()
        })
    };
    Ok(Figures {
        put: gbps(workload.bytes(), span(0, 1)),
        get: gbps(workload.bytes(), span(2, 3)),
        device_put: device_share(writes.written(), workload.bytes()),
        device_get: device_share(reads.read(), workload.bytes()),
        sweep: None,
    })
}
