//! The engines measured. The one-file engines (fio, pwrite, NIXL POSIX, native io_uring) share
//! one preallocated O_DIRECT file and run in interleaved rounds: each round every engine writes
//! all chunks and reads them back (verifying the bytes) in an order that rotates from round to
//! round, so a slow spell of the machine weighs on all of them alike. Ratios are taken per round
//! against the baseline's figure in the same round, and reported as the median over rounds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nixl_core::{
    NixlConfig, NixlTransport, PageView, Registration, StorageExtent, Transport, TransportExt,
};
use nixl_file::{FileOptions, UringConfig, UringTransport, open_storage_file};
use pinned_alloc::{MemoryRegion, Page, PagePool, PoolConfig};

/// Host memory the one-file engines move chunks from and to: larger workloads cycle through it.
const RESIDENT_BYTES: usize = 1 << 30;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    pub(crate) chunks: usize,
    pub(crate) chunk_bytes: usize,
    resident_bytes: usize,
}

impl Workload {
    pub(crate) fn new(chunks: usize, chunk_bytes: usize) -> Self {
        Self {
            chunks: chunks.max(1),
            chunk_bytes,
            resident_bytes: RESIDENT_BYTES,
        }
    }

    fn bytes(&self) -> u64 {
        (self.chunks * self.chunk_bytes) as u64
    }

    /// Chunks held in host memory at once: chunk `i` is written from source page
    /// `i % resident` and read back in batches of `resident`.
    pub(crate) fn resident(&self) -> usize {
        self.chunks
            .min(self.resident_bytes / self.chunk_bytes.max(1))
            .max(1)
    }

    /// The same chunk size, only as many chunks as stay resident (the per-key rows, which
    /// create a file per chunk).
    pub(crate) fn resident_only(&self) -> Self {
        Self::new(self.resident(), self.chunk_bytes)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// fio with io_uring, O_DIRECT, queue depth 32: the raw figure everything is compared to.
    Fio,
    /// One `pwrite`/`pread` per chunk on an O_DIRECT file, one thread.
    RawPwrite,
    /// NIXL's POSIX plugin through nixl-core, one batched request for the put.
    NixlPosix,
    /// The native io_uring engine of nixl-file, one batched request for the put.
    Uring,
    /// fio writing a fresh file per chunk, then reading them: the raw figure for the per-key rows.
    FioFreshFiles,
    /// The dynamic file store alone (nixl-file over NIXL POSIX): the backend the adapter runs
    /// on, so the adapter's own overhead is the ratio of the two rows.
    FileStore,
    /// The full L2 adapter (`nixl_store_dynamic` over NIXL POSIX): a file per chunk with a
    /// checked header, atomic publish, batches of 8.
    Adapter,
    /// NIXL's own Python API driven the way LMCache drives it (`benches/nixl_lmcache_style.py`).
    NixlPython,
}

/// An engine's figures, one per round.
pub(crate) struct Series {
    pub(crate) engine: Engine,
    pub(crate) put_gbps: Vec<f64>,
    pub(crate) get_gbps: Vec<f64>,
}

impl Series {
    fn new(engine: Engine) -> Self {
        Self {
            engine,
            put_gbps: Vec::new(),
            get_gbps: Vec::new(),
        }
    }

    fn push(&mut self, (put, get): (f64, f64)) {
        self.put_gbps.push(put);
        self.get_gbps.push(get);
    }
}

/// Deterministic contents of one page, different for every seed.
fn fill(seed: u64, page: &mut Page) {
    let seed = (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, word) in page.as_mut_slice().chunks_mut(8).enumerate() {
        let value = seed ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        word.copy_from_slice(&value.to_le_bytes()[..word.len()]);
    }
}

fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds.max(1e-9) / 1e9
}

struct Buffers {
    pool: Arc<PagePool>,
    sources: Vec<Page>,
    targets: Vec<Page>,
}

impl Buffers {
    fn new(workload: &Workload) -> Result<Self> {
        let resident = workload.resident();
        let pool = PoolConfig::new(
            workload.chunk_bytes,
            (2 * resident * workload.chunk_bytes) as u64,
        )
        .build()?;
        let sources = pool.allocate_batch(resident)?;
        let targets = pool.allocate_batch(resident)?;
        Ok(Self {
            pool,
            sources,
            targets,
        })
    }

    /// New contents for the sources, so that a pass can only verify what it wrote itself.
    fn refill(&mut self, seed: u64) {
        for (i, page) in self.sources.iter_mut().enumerate() {
            fill(seed.wrapping_mul(1 << 20) + i as u64, page);
        }
    }

    /// Checks the first `count` targets against the sources, then zeroes them for the next batch.
    fn verify(&mut self, first_chunk: usize, count: usize) -> Result<()> {
        for (i, (s, t)) in self
            .sources
            .iter()
            .zip(&mut self.targets[..count])
            .enumerate()
        {
            ensure!(
                s.as_slice() == t.as_slice(),
                "chunk {} read back differs",
                first_chunk + i
            );
            t.as_mut_slice().fill(0);
        }
        Ok(())
    }
}

/// One one-file engine, ready to run passes over the shared file.
enum Runner {
    Fio(std::path::PathBuf),
    Raw(Arc<File>),
    Transport {
        transport: Arc<dyn Transport>,
        storage: Registration,
        _memory: Registration,
    },
}

impl Runner {
    fn new(engine: Engine, file: &Arc<File>, path: &Path, buffers: &Buffers) -> Result<Self> {
        let transport: Arc<dyn Transport> = match engine {
            Engine::Fio => return Ok(Self::Fio(path.to_owned())),
            Engine::RawPwrite => return Ok(Self::Raw(Arc::clone(file))),
            Engine::NixlPosix => Arc::new(NixlTransport::new(NixlConfig::new("POSIX"))?),
            Engine::Uring => Arc::new(UringTransport::new(UringConfig::default())?),
            other => anyhow::bail!("{} is not a one-file engine", other.label()),
        };
        let memory =
            transport.register_memory(Arc::clone(&buffers.pool) as Arc<dyn MemoryRegion>)?;
        let storage = transport.register_file(Arc::clone(file))?;
        Ok(Self::Transport {
            transport,
            storage,
            _memory: memory,
        })
    }

    /// Writes every chunk, then reads every chunk back and verifies it: (put, get) GB/s.
    fn pass(&self, workload: &Workload, buffers: &mut Buffers, seed: u64) -> Result<(f64, f64)> {
        if let Self::Fio(path) = self {
            return Ok((
                fio_pass(workload, path, "write")?,
                fio_pass(workload, path, "read")?,
            ));
        }
        buffers.refill(seed);
        let size = workload.chunk_bytes as u64;
        let resident = workload.resident();
        let started = Instant::now();
        match self {
            Self::Raw(file) => {
                for i in 0..workload.chunks {
                    file.write_all_at(buffers.sources[i % resident].as_slice(), i as u64 * size)?;
                }
            }
            Self::Transport {
                transport, storage, ..
            } => {
                let batch: Vec<_> = (0..workload.chunks)
                    .map(|i| {
                        (
                            &buffers.sources[i % resident],
                            StorageExtent::new(storage.dev_id(), i as u64 * size),
                        )
                    })
                    .collect();
                transport.write_pages(&batch, PageView::Exact)?;
            }
            Self::Fio(_) => {}
        }
        let put = gbps(workload.bytes(), started.elapsed().as_secs_f64());
        let mut reading = Duration::ZERO;
        for first in (0..workload.chunks).step_by(resident) {
            let count = resident.min(workload.chunks - first);
            let started = Instant::now();
            match self {
                Self::Raw(file) => {
                    for (j, page) in buffers.targets[..count].iter_mut().enumerate() {
                        file.read_exact_at(page.as_mut_slice(), (first + j) as u64 * size)?;
                    }
                }
                Self::Transport {
                    transport, storage, ..
                } => {
                    let mut batch: Vec<_> = buffers.targets[..count]
                        .iter_mut()
                        .enumerate()
                        .map(|(j, page)| {
                            (
                                page,
                                StorageExtent::new(storage.dev_id(), (first + j) as u64 * size),
                            )
                        })
                        .collect();
                    transport.read_pages(&mut batch, PageView::Exact)?;
                }
                Self::Fio(_) => {}
            }
            reading += started.elapsed();
            buffers.verify(first, count)?;
        }
        Ok((put, gbps(workload.bytes(), reading.as_secs_f64())))
    }
}

impl Engine {
    /// The engines that share one file and run in interleaved rounds.
    pub(crate) const ONE_FILE: [Engine; 4] = [
        Engine::Fio,
        Engine::RawPwrite,
        Engine::NixlPosix,
        Engine::Uring,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Engine::Fio => "fio io_uring QD32 (raw)",
            Engine::RawPwrite => "pwrite/pread, 1 thread",
            Engine::NixlPosix => "NIXL POSIX (nixl-core)",
            Engine::Uring => "native io_uring (nixl-file)",
            Engine::FioFreshFiles => "fio io_uring QD32, a fresh file per chunk (raw)",
            Engine::FileStore => "dynamic file store (NIXL POSIX)",
            Engine::Adapter => "L2 adapter, dynamic (NIXL POSIX)",
            Engine::NixlPython => "NIXL Python API, LMCache-style",
        }
    }

    /// Whether this engine can run here (fio and NIXL's Python package must be installed).
    pub(crate) fn available(self) -> bool {
        match self {
            Engine::Fio | Engine::FioFreshFiles => fio_installed(),
            Engine::NixlPython => python_ready(),
            _ => true,
        }
    }
}

/// Runs `engines` (one-file engines only) in `rounds` interleaved rounds over one shared file.
pub(crate) fn one_file_rounds(
    workload: &Workload,
    dir: &Path,
    engines: &[Engine],
    rounds: usize,
) -> Result<Vec<Series>> {
    let path = dir.join("bench-one-file.chunks");
    let file = Arc::new(open_storage_file(
        &path,
        FileOptions::new()
            .with_direct_io(true)
            .with_preallocate(workload.bytes()),
    )?);
    let mut buffers = Buffers::new(workload)?;
    let runners = engines
        .iter()
        .map(|&engine| Runner::new(engine, &file, &path, &buffers))
        .collect::<Result<Vec<_>>>()?;
    let mut series: Vec<_> = engines.iter().map(|&e| Series::new(e)).collect();
    for round in 0..rounds {
        eprintln!("bench:   round {}/{rounds}", round + 1);
        for step in 0..runners.len() {
            let index = (round + step) % runners.len();
            let seed = (round * runners.len() + index) as u64;
            let figures = runners[index]
                .pass(workload, &mut buffers, seed)
                .with_context(|| format!("{} in round {round}", engines[index].label()))?;
            series[index].push(figures);
        }
    }
    drop(runners);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(series)
}

/// The file store and the adapter on it, in `rounds` interleaved rounds.
pub(crate) fn per_key_rounds(
    workload: &Workload,
    dir: &Path,
    rounds: usize,
) -> Result<Vec<Series>> {
    file_store_and_adapter(workload, dir, rounds)
}

/// NIXL's Python API, `rounds` passes.
pub(crate) fn python_rounds(workload: &Workload, dir: &Path, rounds: usize) -> Result<Series> {
    let mut series = Series::new(Engine::NixlPython);
    for _ in 0..rounds {
        series.push(python(workload, dir)?);
    }
    Ok(series)
}

const ADAPTER_BATCH: usize = 8;

/// A store driven one key per chunk, 8 chunks per call.
trait PerKey {
    /// Starts a pass with an empty store.
    fn open(&mut self) -> Result<()>;
    /// Stores chunks `range` from `pages`.
    fn put(&mut self, range: std::ops::Range<usize>, pages: &[Page]) -> Result<()>;
    /// Loads chunks `range` into `pages`; per chunk, whether it loaded.
    fn get(&mut self, range: std::ops::Range<usize>, pages: &mut [Page]) -> Result<Vec<bool>>;
    /// Ends the pass, deleting what it stored.
    fn close(&mut self) -> Result<()>;
}

/// Per-round put and get GB/s.
type Figures = (Vec<f64>, Vec<f64>);

/// Runs the stores' passes, and the raw fresh-file pass when given, in interleaved rounds, the
/// order alternating (A, B, then B, A) so that the file-system state one leaves behind (ext4
/// slows inode allocation after many deletions) weighs on all alike. Only put and get calls are
/// timed; every chunk is verified. Figures per store, then the raw pass's.
fn per_key_passes(
    workload: &Workload,
    pool: &Arc<PagePool>,
    stores: &mut [&mut dyn PerKey],
    mut raw: Option<&mut dyn FnMut() -> Result<(f64, f64)>>,
    rounds: usize,
) -> Result<(Vec<Figures>, Figures)> {
    let count = stores.len() + usize::from(raw.is_some());
    let mut figures = vec![(Vec::new(), Vec::new()); count];
    let mut expected = pool.allocate().context("a page for verification")?;
    for round in 0..rounds {
        eprintln!("bench:   round {}/{rounds}", round + 1);
        for step in 0..count {
            let index = if round % 2 == 0 {
                step
            } else {
                count - 1 - step
            };
            let Some(store) = stores.get_mut(index) else {
                if let Some(raw) = raw.as_mut() {
                    let (put, get) = raw()?;
                    figures[index].0.push(put);
                    figures[index].1.push(get);
                }
                continue;
            };
            let seed = |i: usize| (((round * count + index) << 20) | i) as u64;
            store.open()?;
            let (mut put_time, mut get_time) = (Duration::ZERO, Duration::ZERO);
            for start in (0..workload.chunks).step_by(ADAPTER_BATCH) {
                let range = start..(start + ADAPTER_BATCH).min(workload.chunks);
                let mut pages = pool.allocate_batch(range.len())?;
                for (page, i) in pages.iter_mut().zip(range.clone()) {
                    fill(seed(i), page);
                }
                let started = Instant::now();
                store.put(range, &pages)?;
                put_time += started.elapsed();
            }
            for start in (0..workload.chunks).step_by(ADAPTER_BATCH) {
                let range = start..(start + ADAPTER_BATCH).min(workload.chunks);
                let mut pages = pool.allocate_batch(range.len())?;
                let started = Instant::now();
                let loaded = store.get(range.clone(), &mut pages)?;
                get_time += started.elapsed();
                for ((ok, page), i) in loaded.into_iter().zip(&pages).zip(range) {
                    fill(seed(i), &mut expected);
                    ensure!(
                        ok && page.as_slice() == expected.as_slice(),
                        "chunk {i} did not load intact"
                    );
                }
            }
            store.close()?;
            figures[index]
                .0
                .push(gbps(workload.bytes(), put_time.as_secs_f64()));
            figures[index]
                .1
                .push(gbps(workload.bytes(), get_time.as_secs_f64()));
        }
    }
    let raw_figures = if raw.is_some() {
        figures.pop().unwrap_or_default()
    } else {
        Default::default()
    };
    Ok((figures, raw_figures))
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

/// The dynamic file store over NIXL POSIX, as the adapter drives it.
struct FileStoreRow {
    folder: std::path::PathBuf,
    transport: Arc<dyn Transport>,
    store: Option<nixl_file::DynamicFileStore>,
}

impl PerKey for FileStoreRow {
    fn open(&mut self) -> Result<()> {
        self.store = Some(nixl_file::DynamicFileStore::open(
            Arc::clone(&self.transport),
            nixl_file::DynamicConfig::new(&self.folder).with_direct_io(true),
        )?);
        Ok(())
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

/// The L2 adapter (`nixl_store_dynamic` over NIXL POSIX, persist off).
struct AdapterRow {
    json: String,
    context: kv_l2_adapter::AdapterContext,
    folder: std::path::PathBuf,
    adapter: Option<Arc<dyn kv_l2_adapter::L2Adapter>>,
}

fn adapter_key(i: usize) -> kv_l2_adapter::ChunkKey {
    kv_l2_adapter::ChunkKey::from_file_key(bench_key(i))
}

impl PerKey for AdapterRow {
    fn open(&mut self) -> Result<()> {
        let built =
            kv_l2_adapter::AdapterFactory::new().build(&[self.json.as_str()], &self.context)?;
        self.adapter = built.into_iter().next().map(|(_, adapter)| adapter);
        Ok(())
    }

    fn put(&mut self, range: std::ops::Range<usize>, pages: &[Page]) -> Result<()> {
        let adapter = self.adapter.as_ref().context("adapter not open")?;
        let keys: Vec<_> = range.map(adapter_key).collect();
        let refs: Vec<&Page> = pages.iter().collect();
        let report = adapter.store(&keys, &refs);
        ensure!(report.is_successful(), "adapter store failed: {report:?}");
        Ok(())
    }

    fn get(&mut self, range: std::ops::Range<usize>, pages: &mut [Page]) -> Result<Vec<bool>> {
        let adapter = self.adapter.as_ref().context("adapter not open")?;
        let keys: Vec<_> = range.map(adapter_key).collect();
        let mut refs: Vec<&mut Page> = pages.iter_mut().collect();
        Ok(adapter.load(&keys, &mut refs))
    }

    fn close(&mut self) -> Result<()> {
        if let Some(adapter) = self.adapter.take() {
            adapter.close()?;
        }
        Ok(std::fs::remove_dir_all(&self.folder)?)
    }
}

/// The dynamic file store and the adapter on it, passes interleaved.
fn file_store_and_adapter(workload: &Workload, dir: &Path, rounds: usize) -> Result<Vec<Series>> {
    use nixl_core::TransportExt;
    let pool = PoolConfig::new(
        workload.chunk_bytes,
        ((2 * ADAPTER_BATCH + 1) * workload.chunk_bytes) as u64,
    )
    .build()?;
    let transport: Arc<dyn Transport> = Arc::new(NixlTransport::new(NixlConfig::new("POSIX"))?);
    let _memory = transport.register_pool(&pool)?;
    let mut store = FileStoreRow {
        folder: dir.join("file-store"),
        transport,
        store: None,
    };
    let folder = dir.join("adapter");
    let mut adapter = AdapterRow {
        json: serde_json::json!({
            "type": "nixl_store_dynamic",
            "backend": "POSIX",
            "backend_params": {
                "file_path": folder.display().to_string(),
                "use_direct_io": "true",
                "max_capacity_gb": "1024",
            },
            "persist_enabled": false,
        })
        .to_string(),
        context: kv_l2_adapter::AdapterContext::new(Arc::clone(&pool))
            .with_engine(kv_l2_adapter::Engine::Nixl),
        folder,
        adapter: None,
    };
    let mut fio = || fio_fresh_files(workload, &dir.join("fio-fresh"));
    let raw: Option<&mut dyn FnMut() -> Result<(f64, f64)>> = if fio_installed() {
        Some(&mut fio)
    } else {
        None
    };
    let with_raw = raw.is_some();
    let (figures, raw_figures) = per_key_passes(
        workload,
        &pool,
        &mut [&mut store, &mut adapter],
        raw,
        rounds,
    )?;
    let mut series: Vec<_> = [Engine::FileStore, Engine::Adapter]
        .into_iter()
        .zip(figures)
        .map(|(engine, (put_gbps, get_gbps))| Series {
            engine,
            put_gbps,
            get_gbps,
        })
        .collect();
    if with_raw {
        series.insert(
            0,
            Series {
                engine: Engine::FioFreshFiles,
                put_gbps: raw_figures.0,
                get_gbps: raw_figures.1,
            },
        );
    }
    Ok(series)
}

/// fio writing a fresh file per chunk (created and preallocated by fio, as the store does) at
/// queue depth 32, then reading them back: the raw figure for the per-key rows, since writing
/// into newly allocated space costs the file system more than overwriting.
fn fio_fresh_files(workload: &Workload, folder: &Path) -> Result<(f64, f64)> {
    std::fs::create_dir_all(folder)?;
    let layout = [
        format!("--directory={}", folder.display()),
        format!("--nrfiles={}", workload.chunks),
        format!("--filesize={}", workload.chunk_bytes),
        "--openfiles=64".to_owned(),
        "--fallocate=native".to_owned(),
    ];
    let figures = fio_run(workload, &layout, "write")
        .and_then(|put| Ok((put, fio_run(workload, &layout, "read")?)));
    std::fs::remove_dir_all(folder).with_context(|| format!("removing {}", folder.display()))?;
    figures
}

fn workspace() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python_bin() -> std::path::PathBuf {
    workspace().join("target/test-services/venv/bin/python")
}

fn python_ready() -> bool {
    Command::new(python_bin())
        .args(["-c", "import numpy, nixl_cu12._api"])
        .env("PYTHONPATH", workspace().join("target/nixl-runtime"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// NIXL's Python API, LMCache-style: one file per chunk, registered per chunk.
fn python(workload: &Workload, dir: &Path) -> Result<(f64, f64)> {
    let folder = dir.join("python");
    std::fs::create_dir_all(&folder)?;
    let output = Command::new(python_bin())
        .arg(workspace().join("bench/benches/nixl_lmcache_style.py"))
        .arg(&folder)
        .arg(workload.chunk_bytes.to_string())
        .arg(workload.chunks.to_string())
        .arg(ADAPTER_BATCH.to_string())
        .arg("1")
        .arg("1")
        .env("PYTHONPATH", workspace().join("target/nixl-runtime"))
        .output()
        .context("running the NIXL Python benchmark")?;
    ensure!(
        output.status.success(),
        "NIXL Python benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&folder);
    let result: serde_json::Value = serde_json::from_slice(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .as_bytes(),
    )
    .context("NIXL Python benchmark output")?;
    Ok((
        result["put_gbps"].as_f64().unwrap_or(0.0),
        result["get_gbps"].as_f64().unwrap_or(0.0),
    ))
}

fn fio_installed() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One fio pass over the file: `rw` is `write` or `read`; returns GB/s.
fn fio_pass(workload: &Workload, path: &Path, rw: &str) -> Result<f64> {
    fio_run(
        workload,
        &[
            "--fallocate=none".to_owned(),
            format!("--filename={}", path.display()),
        ],
        rw,
    )
}

/// One fio pass (io_uring, O_DIRECT, queue depth 32) over the files `layout` names; GB/s.
fn fio_run(workload: &Workload, layout: &[String], rw: &str) -> Result<f64> {
    let output = Command::new("fio")
        .args([
            "--name=kv",
            "--ioengine=io_uring",
            "--direct=1",
            "--iodepth=32",
            "--output-format=json",
        ])
        .args(layout)
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", workload.chunk_bytes))
        .arg(format!("--size={}", workload.bytes()))
        .output()
        .context("running fio")?;
    ensure!(
        output.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = String::from_utf8_lossy(&output.stdout);
    let key = "\"bw_bytes\" : ";
    let section = json
        .find(&format!("\"{rw}\" : {{"))
        .context("fio output has no section for the pass")?;
    let start = json[section..]
        .find(key)
        .context("fio output has no bw_bytes")?
        + section
        + key.len();
    let end = start
        + json[start..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(0);
    let bytes_per_second: f64 = json[start..end].parse().context("fio bw_bytes")?;
    Ok(bytes_per_second / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny run of every engine: the bench works end to end, cycles through its resident
    /// pages, verifies what it reads and leaves nothing behind.
    #[test]
    fn every_engine_runs_and_verifies_a_tiny_workload() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let cycling = Workload {
            resident_bytes: 4 << 20,
            ..Workload::new(10, 1 << 20)
        };
        assert_eq!(cycling.resident(), 4);
        for workload in [cycling, Workload::new(16, 64 << 10)] {
            let one_file: Vec<_> = Engine::ONE_FILE
                .into_iter()
                .filter(|e| e.available())
                .collect();
            let mut series = one_file_rounds(&workload, dir.path(), &one_file, 2).unwrap();
            series.extend(per_key_rounds(&workload.resident_only(), dir.path(), 2).unwrap());
            if Engine::NixlPython.available() {
                series.push(python_rounds(&workload.resident_only(), dir.path(), 1).unwrap());
            }
            assert!(series.len() >= one_file.len() + 2);
            for s in &series {
                assert!(!s.put_gbps.is_empty(), "{}", s.engine.label());
                assert!(
                    s.put_gbps.iter().chain(&s.get_gbps).all(|&g| g > 0.0),
                    "{}",
                    s.engine.label()
                );
            }
        }
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "bench files removed"
        );
    }
}
