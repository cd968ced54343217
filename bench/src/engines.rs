//! The engines measured, each doing the same work: write N chunks to N slots of one
//! preallocated O_DIRECT file, then read them back, verifying the bytes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use nixl_core::{NixlConfig, NixlTransport, StorageExtent, Transport};
use nixl_file::{FileOptions, UringConfig, UringTransport, open_storage_file};
use pinned_alloc::{MemoryRegion, Page, PagePool, PoolConfig};

const PASSES: usize = 3;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    pub(crate) chunks: usize,
    pub(crate) chunk_bytes: usize,
}

impl Workload {
    pub(crate) fn new(chunks: usize, chunk_bytes: usize) -> Self {
        Self {
            chunks: chunks.max(1),
            chunk_bytes,
        }
    }

    fn bytes(&self) -> u64 {
        (self.chunks * self.chunk_bytes) as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// fio with io_uring, O_DIRECT, queue depth 32: the raw figure everything is compared to.
    Fio,
    /// One `pwrite`/`pread` per chunk on an O_DIRECT file, one thread.
    RawPwrite,
    /// NIXL's POSIX plugin through nixl-core, one batched request per pass.
    NixlPosix,
    /// The native io_uring engine of nixl-file, one batched request per pass.
    Uring,
    /// The dynamic file store alone (nixl-file over NIXL POSIX): the backend the adapter runs
    /// on, so the adapter's own overhead is the ratio of the two rows.
    FileStore,
    /// The full L2 adapter (`nixl_store_dynamic` over NIXL POSIX): a file per chunk with a
    /// checked header, atomic publish, batches of 8.
    Adapter,
    /// NIXL's own Python API driven the way LMCache drives it (`benches/nixl_lmcache_style.py`).
    NixlPython,
}

pub(crate) struct Measurement {
    pub(crate) engine: Engine,
    pub(crate) put_gbps: f64,
    pub(crate) get_gbps: f64,
}

fn fill(chunk: usize, page: &mut Page) {
    let seed = (chunk as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
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
        let pool = PoolConfig::new(workload.chunk_bytes, 2 * workload.bytes()).build()?;
        let mut sources = pool.allocate_batch(workload.chunks)?;
        for (i, page) in sources.iter_mut().enumerate() {
            fill(i, page);
        }
        let targets = pool.allocate_batch(workload.chunks)?;
        Ok(Self {
            pool,
            sources,
            targets,
        })
    }

    fn verify(&mut self) -> Result<()> {
        for (i, (s, t)) in self.sources.iter().zip(&self.targets).enumerate() {
            ensure!(s.as_slice() == t.as_slice(), "chunk {i} read back differs");
        }
        for page in &mut self.targets {
            page.as_mut_slice().fill(0);
        }
        Ok(())
    }
}

impl Engine {
    /// Every engine that is measured on its own (`FileStore` also yields the `Adapter` row).
    pub(crate) const ALL: [Engine; 6] = [
        Engine::Fio,
        Engine::RawPwrite,
        Engine::NixlPosix,
        Engine::Uring,
        Engine::FileStore,
        Engine::NixlPython,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Engine::Fio => "fio io_uring QD32 (raw)",
            Engine::RawPwrite => "pwrite/pread, 1 thread",
            Engine::NixlPosix => "NIXL POSIX (nixl-core)",
            Engine::Uring => "native io_uring (nixl-file)",
            Engine::FileStore => "dynamic file store (NIXL POSIX)",
            Engine::Adapter => "L2 adapter, dynamic (NIXL POSIX)",
            Engine::NixlPython => "NIXL Python API, LMCache-style",
        }
    }

    /// Whether this engine can run here (fio must be installed).
    pub(crate) fn available(self) -> bool {
        match self {
            Engine::Fio => fio_installed(),
            Engine::NixlPython => python_ready(),
            _ => true,
        }
    }

    /// Measures this engine; the file store also yields the adapter row (their passes run
    /// interleaved).
    pub(crate) fn measure(self, workload: &Workload, dir: &Path) -> Result<Vec<Measurement>> {
        let row = |engine, (put_gbps, get_gbps)| Measurement {
            engine,
            put_gbps,
            get_gbps,
        };
        match self {
            Engine::FileStore => {
                let (store, adapter) = file_store_and_adapter(workload, dir)?;
                return Ok(vec![
                    row(Engine::FileStore, store),
                    row(Engine::Adapter, adapter),
                ]);
            }
            Engine::NixlPython => return Ok(vec![row(self, python(workload, dir)?)]),
            _ => {}
        }
        let path = dir.join(format!("bench-{self:?}.chunks"));
        let file = open_storage_file(
            &path,
            FileOptions::new()
                .with_direct_io(true)
                .with_preallocate(workload.bytes()),
        )?;
        let mut buffers = Buffers::new(workload)?;
        let result = match self {
            Engine::Fio => fio(workload, &path),
            Engine::RawPwrite => raw(workload, &file, &mut buffers),
            Engine::NixlPosix => transport(
                workload,
                file,
                &mut buffers,
                Arc::new(NixlTransport::new(NixlConfig::new("POSIX"))?),
            ),
            Engine::Uring => transport(
                workload,
                file,
                &mut buffers,
                Arc::new(UringTransport::new(UringConfig::default())?),
            ),
            Engine::FileStore | Engine::Adapter | Engine::NixlPython => unreachable_engine(self),
        };
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        Ok(vec![row(self, result?)])
    }
}

/// Best of the passes for put and get, verifying after every get.
fn passes(
    workload: &Workload,
    buffers: &mut Buffers,
    mut put: impl FnMut(&Buffers) -> Result<()>,
    mut get: impl FnMut(&mut Buffers) -> Result<()>,
) -> Result<(f64, f64)> {
    let (mut best_put, mut best_get) = (0f64, 0f64);
    for _ in 0..PASSES {
        let started = Instant::now();
        put(buffers)?;
        best_put = best_put.max(gbps(workload.bytes(), started.elapsed().as_secs_f64()));
        let started = Instant::now();
        get(buffers)?;
        best_get = best_get.max(gbps(workload.bytes(), started.elapsed().as_secs_f64()));
        buffers.verify()?;
    }
    Ok((best_put, best_get))
}

fn unreachable_engine(engine: Engine) -> Result<(f64, f64)> {
    anyhow::bail!("{} is measured per key, not on one file", engine.label())
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

/// Runs the stores' passes interleaved (A, B, A, B, …) so that the file-system state one leaves
/// behind (ext4 slows inode allocation after many deletions) weighs on both alike. Only put and
/// get calls are timed; every chunk is verified. Returns the best (put, get) GB/s of each.
fn per_key_passes(
    workload: &Workload,
    pool: &Arc<PagePool>,
    stores: &mut [&mut dyn PerKey],
) -> Result<Vec<(f64, f64)>> {
    let mut best = vec![(0f64, 0f64); stores.len()];
    let mut expected = pool.allocate().context("a page for verification")?;
    for _ in 0..PASSES {
        for (store, best) in stores.iter_mut().zip(best.iter_mut()) {
            store.open()?;
            let (mut put_time, mut get_time) =
                (std::time::Duration::ZERO, std::time::Duration::ZERO);
            for start in (0..workload.chunks).step_by(ADAPTER_BATCH) {
                let range = start..(start + ADAPTER_BATCH).min(workload.chunks);
                let mut pages = pool.allocate_batch(range.len())?;
                for (page, i) in pages.iter_mut().zip(range.clone()) {
                    fill(i, page);
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
                    fill(i, &mut expected);
                    ensure!(
                        ok && page.as_slice() == expected.as_slice(),
                        "chunk {i} did not load intact"
                    );
                }
            }
            store.close()?;
            best.0 = best.0.max(gbps(workload.bytes(), put_time.as_secs_f64()));
            best.1 = best.1.max(gbps(workload.bytes(), get_time.as_secs_f64()));
        }
    }
    Ok(best)
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

/// The dynamic file store and the adapter on it, passes interleaved: (store, adapter) GB/s.
fn file_store_and_adapter(workload: &Workload, dir: &Path) -> Result<((f64, f64), (f64, f64))> {
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
    let best = per_key_passes(workload, &pool, &mut [&mut store, &mut adapter])?;
    Ok((best[0], best[1]))
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
        .arg(PASSES.to_string())
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

/// One fio pass over the file: `rw` is `write` or `read`; returns bytes per second.
fn fio_pass(workload: &Workload, path: &Path, rw: &str) -> Result<f64> {
    let output = Command::new("fio")
        .args([
            "--name=kv",
            "--ioengine=io_uring",
            "--direct=1",
            "--iodepth=32",
            "--output-format=json",
            "--fallocate=none",
        ])
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", workload.chunk_bytes))
        .arg(format!("--size={}", workload.bytes()))
        .arg(format!("--filename={}", path.display()))
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

fn fio(workload: &Workload, path: &Path) -> Result<(f64, f64)> {
    let (mut best_put, mut best_get) = (0f64, 0f64);
    for _ in 0..PASSES {
        best_put = best_put.max(fio_pass(workload, path, "write")?);
        best_get = best_get.max(fio_pass(workload, path, "read")?);
    }
    Ok((best_put, best_get))
}

fn raw(workload: &Workload, file: &File, buffers: &mut Buffers) -> Result<(f64, f64)> {
    let size = workload.chunk_bytes as u64;
    passes(
        workload,
        buffers,
        |b| {
            for (i, page) in b.sources.iter().enumerate() {
                file.write_all_at(page.as_slice(), i as u64 * size)?;
            }
            Ok(())
        },
        |b| {
            for (i, page) in b.targets.iter_mut().enumerate() {
                file.read_exact_at(page.as_mut_slice(), i as u64 * size)?;
            }
            Ok(())
        },
    )
}

fn transport(
    workload: &Workload,
    file: File,
    buffers: &mut Buffers,
    transport: Arc<dyn Transport>,
) -> Result<(f64, f64)> {
    let _memory = transport.register_memory(Arc::clone(&buffers.pool) as Arc<dyn MemoryRegion>)?;
    let storage = transport.register_file(Arc::new(file))?;
    let extent = |i: usize| StorageExtent::new(storage.dev_id(), (i * workload.chunk_bytes) as u64);
    passes(
        workload,
        buffers,
        |b| {
            let batch: Vec<_> = b
                .sources
                .iter()
                .enumerate()
                .map(|(i, p)| (p.as_slice(), extent(i)))
                .collect();
            Ok(transport.write(&batch)?)
        },
        |b| {
            let mut batch: Vec<_> = b
                .targets
                .iter_mut()
                .enumerate()
                .map(|(i, p)| (p.as_mut_slice(), extent(i)))
                .collect();
            Ok(transport.read(&mut batch)?)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny run of every engine: the bench works end to end and verifies what it reads.
    #[test]
    fn every_engine_runs_and_verifies_a_tiny_workload() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        for workload in [Workload::new(2, 1 << 20), Workload::new(16, 64 << 10)] {
            for engine in Engine::ALL.into_iter().filter(|e| e.available()) {
                for m in engine.measure(&workload, dir.path()).unwrap() {
                    assert!(m.put_gbps > 0.0 && m.get_gbps > 0.0, "{}", m.engine.label());
                }
            }
        }
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "bench files removed"
        );
    }
}
