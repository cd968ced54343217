//! The engines measured, and the one-file group. The one-file engines (fio, pwrite, NIXL POSIX,
//! native io_uring) share one preallocated O_DIRECT file and run in interleaved rounds: each
//! round every engine writes all chunks and reads them back (verifying the bytes) in an order
//! that rotates from round to round, so a slow spell of the machine weighs on all of them alike.
//! Ratios are taken per round against fio's best queue depth in the same round, and reported as
//! the median over rounds.
//!
//! Every timed pass also records the bytes the block device under the folder saw (see
//! [`fio::Device`]): reads served by the page cache, or by the holes and unwritten extents of a
//! preallocated file, show as a device share far below 1.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nixl_core::{
    NixlConfig, NixlTransport, PageView, Registration, StorageExtent, Transport, TransportExt,
};
use nixl_file::{FileOptions, UringConfig, UringTransport, open_storage_file};
use pinned_alloc::{MemoryRegion, Page, PagePool, PoolConfig};

use crate::fio::{self, Device};

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

    pub(crate) fn bytes(&self) -> u64 {
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
    /// fio with io_uring, O_DIRECT, swept over queue depths 32 / 128 / 256, the best per
    /// direction: the raw figure everything is compared to.
    Fio,
    /// One `pwrite`/`pread` per chunk on an O_DIRECT file, one thread.
    RawPwrite,
    /// NIXL's POSIX plugin through nixl-core, one batched request for the put.
    NixlPosix,
    /// The native io_uring engine of nixl-file, one batched request for the put.
    Uring,
    /// fio writing a fresh file per chunk, then reading them (best queue depth): what
    /// allocating a file per chunk costs the file system, next to the one-file figure.
    FioFreshFiles,
    /// The dynamic file store alone (nixl-file over NIXL POSIX): the backend the per-key
    /// adapter runs on, so the adapter's own overhead is the ratio of the two rows.
    FileStore,
    /// An L2 adapter built from `--l2-adapter` JSON through `kv_l2_adapter::StoreBuilder`
    /// (one row per [`crate::per_key::AdapterSpec`]).
    Adapter,
    /// NIXL's own Python API driven the way LMCache's dynamic store drives it
    /// (`benches/nixl_lmcache_style.py`), fresh files every pass.
    NixlPython,
}

impl Engine {
    /// The engines that share one file and run in interleaved rounds.
    pub(crate) const ONE_FILE: [Engine; 4] = [
        Engine::Fio,
        Engine::RawPwrite,
        Engine::NixlPosix,
        Engine::Uring,
    ];

    /// The name `--only` selects it by.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Engine::Fio => "fio",
            Engine::RawPwrite => "rawpwrite",
            Engine::NixlPosix => "nixlposix",
            Engine::Uring => "uring",
            Engine::FioFreshFiles => "fiofreshfiles",
            Engine::FileStore => "filestore",
            Engine::Adapter => "adapter",
            Engine::NixlPython => "nixlpython",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Engine::Fio => "fio io_uring, best QD of 32/128/256 (raw)",
            Engine::RawPwrite => "pwrite/pread, 1 thread",
            Engine::NixlPosix => "NIXL POSIX (nixl-core)",
            Engine::Uring => "native io_uring (nixl-file)",
            Engine::FioFreshFiles => "fio io_uring, best QD, a fresh file per chunk",
            Engine::FileStore => "dynamic file store (NIXL POSIX)",
            Engine::Adapter => "L2 adapter",
            Engine::NixlPython => "NIXL Python API, LMCache-style, fresh files",
        }
    }

    /// Whether this engine can run here (fio and NIXL's Python package must be installed).
    pub(crate) fn available(self) -> bool {
        match self {
            Engine::Fio | Engine::FioFreshFiles => fio::installed(),
            Engine::NixlPython => crate::per_key::python_ready(),
            _ => true,
        }
    }
}

/// What one pass measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Figures {
    pub(crate) put: f64,
    pub(crate) get: f64,
    /// Bytes the block device saw written / read during the timed put / get, over the bytes
    /// stored / loaded (NaN where the counters cannot be read).
    pub(crate) device_put: f64,
    pub(crate) device_get: f64,
    /// fio's sweep, for its rows.
    pub(crate) sweep: Option<fio::Sweep>,
}

impl Figures {
    /// fio's figures: the best queue depth per direction.
    pub(crate) fn from_sweep(sweep: fio::Sweep) -> Self {
        let (write, read) = (sweep.best_write(), sweep.best_read());
        Self {
            put: write.write,
            get: read.read,
            device_put: write.device_write,
            device_get: read.device_read,
            sweep: Some(sweep),
        }
    }
}

/// A row's figures, one per round.
#[derive(Debug)]
pub(crate) struct Series {
    pub(crate) engine: Engine,
    /// Its `--only` name and its label in the report.
    pub(crate) name: String,
    pub(crate) label: String,
    pub(crate) rounds: Vec<Figures>,
}

impl Series {
    pub(crate) fn new(engine: Engine) -> Self {
        Self::named(engine, engine.name(), engine.label())
    }

    pub(crate) fn named(engine: Engine, name: &str, label: &str) -> Self {
        Self {
            engine,
            name: name.to_owned(),
            label: label.to_owned(),
            rounds: Vec::new(),
        }
    }

    pub(crate) fn put_gbps(&self) -> Vec<f64> {
        self.rounds.iter().map(|f| f.put).collect()
    }

    pub(crate) fn get_gbps(&self) -> Vec<f64> {
        self.rounds.iter().map(|f| f.get).collect()
    }
}

/// Rows measured together in interleaved rounds, against the raw row among them.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) title: &'static str,
    pub(crate) workload: Workload,
    pub(crate) series: Vec<Series>,
}

/// Deterministic contents of one page, different for every seed.
pub(crate) fn fill(seed: u64, page: &mut Page) {
    let seed = (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, word) in page.as_mut_slice().chunks_mut(8).enumerate() {
        let value = seed ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        word.copy_from_slice(&value.to_le_bytes()[..word.len()]);
    }
}

pub(crate) fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds.max(1e-9) / 1e9
}

/// Device bytes over `bytes` asked (NaN without counters).
pub(crate) fn device_share(moved: Option<u64>, bytes: u64) -> f64 {
    moved.map_or(f64::NAN, |m| m as f64 / bytes as f64)
}

/// Counts a device's bytes over timed sections that are not contiguous.
#[derive(Debug)]
pub(crate) struct DeviceTally<'a> {
    device: Option<&'a Device>,
    start: Option<fio::Counters>,
    read: Option<u64>,
    written: Option<u64>,
}

impl<'a> DeviceTally<'a> {
    pub(crate) fn new(device: Option<&'a Device>) -> Self {
        Self {
            device,
            start: None,
            read: device.map(|_| 0),
            written: device.map(|_| 0),
        }
    }

    pub(crate) fn start(&mut self) {
        self.start = self.device.and_then(Device::counters);
    }

    pub(crate) fn stop(&mut self) {
        let now = self.device.and_then(Device::counters);
        match (self.start.take(), now) {
            (Some(start), Some(now)) => {
                let (read, written) = start.since(now);
                self.read = self.read.map(|r| r + read);
                self.written = self.written.map(|w| w + written);
            }
            _ => (self.read, self.written) = (None, None),
        }
    }

    pub(crate) fn read(&self) -> Option<u64> {
        self.read
    }

    pub(crate) fn written(&self) -> Option<u64> {
        self.written
    }
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
    Fio(PathBuf),
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

    /// Writes every chunk, then reads every chunk back and verifies it.
    fn pass(
        &self,
        workload: &Workload,
        buffers: &mut Buffers,
        seed: u64,
        device: Option<&Device>,
    ) -> Result<Figures> {
        if let Self::Fio(path) = self {
            let layout = [
                "--fallocate=none".to_owned(),
                format!("--filename={}", path.display()),
            ];
            let sweep = fio::sweep(&layout, workload.chunk_bytes, workload.bytes(), device)?;
            return Ok(Figures::from_sweep(sweep));
        }
        buffers.refill(seed);
        let size = workload.chunk_bytes as u64;
        let resident = workload.resident();
        let mut tally = DeviceTally::new(device);
        tally.start();
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
        tally.stop();
        let written = tally.written();
        let mut tally = DeviceTally::new(device);
        let mut reading = Duration::ZERO;
        for first in (0..workload.chunks).step_by(resident) {
            let count = resident.min(workload.chunks - first);
            tally.start();
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
            tally.stop();
            buffers.verify(first, count)?;
        }
        Ok(Figures {
            put,
            get: gbps(workload.bytes(), reading.as_secs_f64()),
            device_put: device_share(written, workload.bytes()),
            device_get: device_share(tally.read(), workload.bytes()),
            sweep: None,
        })
    }
}

/// Runs `engines` (one-file engines only) in `rounds` interleaved rounds over one shared file.
pub(crate) fn one_file_rounds(
    workload: &Workload,
    dir: &Path,
    engines: &[Engine],
    rounds: usize,
    device: Option<&Device>,
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
                .pass(workload, &mut buffers, seed, device)
                .with_context(|| format!("{} in round {round}", engines[index].label()))?;
            series[index].rounds.push(figures);
        }
    }
    drop(runners);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::per_key::{AdapterSpec, per_key_rounds};

    /// A tiny run of every engine: the bench works end to end, cycles through its resident
    /// pages, verifies what it reads and leaves nothing behind.
    #[test]
    fn every_engine_runs_and_verifies_a_tiny_workload() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let device = Device::of(dir.path());
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
            let mut series =
                one_file_rounds(&workload, dir.path(), &one_file, 2, device.as_ref()).unwrap();
            let wanted = |_: &str| true;
            series.extend(
                per_key_rounds(
                    &workload.resident_only(),
                    crate::per_key::DEFAULT_BATCH,
                    dir.path(),
                    2,
                    &AdapterSpec::defaults(),
                    &wanted,
                    device.as_ref(),
                )
                .unwrap(),
            );
            assert!(series.len() >= one_file.len() + 3);
            for s in &series {
                assert_eq!(s.rounds.len(), 2, "{}", s.label);
                assert!(
                    s.rounds.iter().all(|f| f.put > 0.0 && f.get > 0.0),
                    "{}",
                    s.label
                );
            }
        }
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "bench files removed"
        );
    }
}
