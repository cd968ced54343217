//! The per-key group: rows that store one key per chunk (the dynamic file store, the L2
//! adapters, NIXL's Python API driven LMCache's way), 8 chunks per call, on as many chunks as
//! stay in host memory at once, in interleaved rounds with their raw figure: fio on one
//! preallocated file of the same bytes at its best queue depth. fio writing a fresh file per
//! chunk runs beside them too, to show what allocating a file per key costs the file system.
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

/// Chunks per store or load call, as LMCache batches them.
pub(crate) const ADAPTER_BATCH: usize = 8;

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
    /// Per-key files (`layout` absent) over NIXL POSIX and over the native engine.
    pub(crate) fn defaults() -> Vec<Self> {
        Self::pair(&Map::new())
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

    /// The `--l2-adapter` JSON of this row over `folder`, with room for `bytes` of chunks (a
    /// segment store preallocates its capacity, so it is sized to the run).
    pub(crate) fn json(&self, folder: &Path, bytes: u64) -> String {
        let mut backend_params = Map::new();
        backend_params.insert("file_path".into(), folder.display().to_string().into());
        backend_params.insert("use_direct_io".into(), "true".into());
        // Two default segments of slack: the last one a run fills is partly used.
        let capacity_gb =
            (bytes + 2 * nixl_file::DEFAULT_SEGMENT_BYTES) as f64 / (1u64 << 30) as f64;
        backend_params.insert("max_capacity_gb".into(), capacity_gb.to_string().into());
        backend_params.extend(self.params.clone());
        serde_json::json!({
            "type": "nixl_store_dynamic",
            "backend": "POSIX",
            "backend_params": backend_params,
            "persist_enabled": false,
        })
        .to_string()
    }
}

/// A store driven one key per chunk, [`ADAPTER_BATCH`] chunks per call.
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
    /// A pass that times itself (fio, NIXL's Python API).
    Pass(Box<dyn FnMut() -> Result<Figures> + 'a>),
    /// A store the group drives.
    Store(Box<dyn PerKey + 'a>),
}

/// One pass of a store: every chunk stored, then loaded and verified; only the put and get
/// calls are timed.
fn store_pass(
    workload: &Workload,
    store: &mut dyn PerKey,
    seed: impl Fn(usize) -> u64,
    expected: &mut Page,
    device: Option<&Device>,
) -> Result<Figures> {
    store.open()?;
    let pool = store.pool()?;
    let (mut put_time, mut get_time) = (Duration::ZERO, Duration::ZERO);
    let mut writes = DeviceTally::new(device);
    for start in (0..workload.chunks).step_by(ADAPTER_BATCH) {
        let range = start..(start + ADAPTER_BATCH).min(workload.chunks);
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
    for start in (0..workload.chunks).step_by(ADAPTER_BATCH) {
        let range = start..(start + ADAPTER_BATCH).min(workload.chunks);
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
                    store_pass(workload, store.as_mut(), seed, &mut expected, device)
                }
            }
            .with_context(|| format!("{} in round {round}", series.label))?;
            series.rounds.push(figures);
        }
    }
    Ok(())
}

/// The per-key group on `workload`: fio on one file (the raw figure), fio on a fresh file per
/// chunk, NIXL's Python API, the file store and the adapter rows, as far as `wanted` (by
/// `--only` name) and what is installed allow.
pub(crate) fn per_key_rounds(
    workload: &Workload,
    dir: &Path,
    rounds: usize,
    adapters: &[AdapterSpec],
    wanted: &dyn Fn(&str) -> bool,
    device: Option<&Device>,
) -> Result<Vec<Series>> {
    let pool = PoolConfig::new(
        workload.chunk_bytes,
        ((2 * ADAPTER_BATCH + 1) * workload.chunk_bytes) as u64,
    )
    .build()?;
    let mut members: Vec<(Series, Member<'_>)> = Vec::new();
    let engine_wanted = |e: Engine| wanted(e.name()) && e.available();
    if engine_wanted(Engine::Fio) {
        let path = dir.join("per-key-raw.chunks");
        members.push((
            Series::new(Engine::Fio),
            Member::Pass(Box::new(move || fio_one_file(workload, &path, device))),
        ));
    }
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
            Member::Pass(Box::new(move || python(workload, dir, device))),
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
                json: spec.json(
                    &folder,
                    (workload.chunks * (workload.chunk_bytes.next_multiple_of(4096) + 4096)) as u64,
                ),
                engine: spec.engine,
                chunk_bytes: workload.chunk_bytes,
                folder,
                store: None,
            })),
        ));
    }
    interleave(workload, &mut members, rounds, device)?;
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
    json: String,
    engine: kv_l2_adapter::Engine,
    chunk_bytes: usize,
    folder: PathBuf,
    store: Option<kv_l2_adapter::Store>,
}

impl AdapterRow {
    fn adapter(&self) -> Result<&Arc<dyn kv_l2_adapter::L2Adapter>> {
        Ok(self.store.as_ref().context("adapter not open")?.adapter())
    }
}

fn adapter_key(i: usize) -> kv_l2_adapter::ChunkKey {
    kv_l2_adapter::ChunkKey::from_file_key(bench_key(i))
}

impl PerKey for AdapterRow {
    fn open(&mut self) -> Result<()> {
        let stride = self.chunk_bytes.next_multiple_of(4096) as u64;
        let store = kv_l2_adapter::StoreBuilder::from_l2_adapters([self.json.as_str()])
            .with_chunk_bytes(self.chunk_bytes)
            .with_engine(self.engine)
            .with_pool_bytes((2 * ADAPTER_BATCH as u64 + 1) * stride)
            .build()
            .with_context(|| format!("building the store of {}", self.json))?;
        self.store = Some(store);
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
/// released per batch; new file names every pass (a fresh folder per call, and the script
/// names each of its passes' files apart). The script times its own transfers and verifies
/// every chunk outside them; the device counters span the whole script.
fn python(workload: &Workload, dir: &Path, device: Option<&Device>) -> Result<Figures> {
    let folder = dir.join("python");
    std::fs::create_dir_all(&folder)?;
    let before = device.and_then(Device::counters);
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
