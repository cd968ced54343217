//! The segment store beyond one pass, built from `--l2-adapter` JSON through the public
//! [`kv_l2_adapter::StoreBuilder`] as a user's process builds it:
//!
//! - `churn`, `churn-native`: a store of [`CHURN_CAPACITY_GB`] with LRU watermark eviction
//!   (watermark 0.8, ratio 0.2), so that both the eviction controller and the store-time
//!   eviction run; filled to its capacity, then written [`CHURN_FILLS`] times its capacity
//!   more. Put GB/s over the churn against the first fill (target at least 0.8), and the bytes
//!   of the folder (sizes, and allocated blocks as `du` counts them), sampled throughout,
//!   against `max_capacity_gb`: exceeding it, a refused store, or a damaged or evicted newest
//!   chunk fails the bench once the report is written.
//! - `restart`: a store filled with 256 KiB chunks (up to [`RESTART_CHUNKS`], at most 40% of
//!   the disk's free space, `--restart-chunks N`), closed, then reopened (recovery reads only
//!   headers) and read back whole: reopening over reading (target at most 0.05).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kv_l2_adapter::{L2Adapter, Store};
use pinned_alloc::Page;
use serde_json::{Map, Value, json};

use crate::engines::{fill, gbps};
use crate::per_key::{AdapterSpec, adapter_key, entry_bytes};

/// `max_capacity_gb` of the churn rows' store.
pub(crate) const CHURN_CAPACITY_GB: f64 = 1.0;
/// Capacities written after the first fill.
pub(crate) const CHURN_FILLS: usize = 3;
/// Most chunks the restart row stores.
pub(crate) const RESTART_CHUNKS: usize = 100_000;
/// Most chunks the restart row stores with `--quick`.
pub(crate) const RESTART_CHUNKS_QUICK: usize = 4_096;
/// The restart row's chunks.
pub(crate) const RESTART_CHUNK_BYTES: usize = 256 << 10;
/// Share of the disk's free space the restart row may fill.
const RESTART_DISK_SHARE: f64 = 0.4;

/// One row of the scenarios' table and report.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) group: &'static str,
    pub(crate) name: String,
    pub(crate) label: String,
    pub(crate) chunk_bytes: usize,
    pub(crate) chunks: usize,
    pub(crate) rounds: usize,
    /// (median, lowest, highest) of the per-round ratios, where the row has one.
    pub(crate) put_ratio: Option<(f64, f64, f64)>,
    pub(crate) get_ratio: Option<(f64, f64, f64)>,
    /// The row's figures, as the table shows them.
    pub(crate) figures: String,
    pub(crate) target: String,
    pub(crate) met: bool,
    /// Checks that failed (bytes over the capacity, refused stores, chunks lost): the bench
    /// fails once the report is written.
    pub(crate) failures: Vec<String>,
    /// More fields of its JSON object.
    pub(crate) extra: Map<String, Value>,
}

impl Outcome {
    pub(crate) fn json(&self) -> Value {
        let mut row = json!({
            "group": self.group,
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.chunks,
            "engine": self.label,
            "name": self.name,
            "rounds": self.rounds,
            "put_ratio": self.put_ratio.map(|r| r.0),
            "get_ratio": self.get_ratio.map(|r| r.0),
            "put_ratio_range": self.put_ratio.map(|r| [r.1, r.2]),
            "get_ratio_range": self.get_ratio.map(|r| [r.1, r.2]),
            "target": self.target,
            "target_met": self.met,
            "failures": self.failures,
            "o_direct": true,
        });
        if let Value::Object(fields) = &mut row {
            fields.extend(self.extra.clone());
        }
        row
    }

    pub(crate) fn table_row(&self) -> String {
        let ratio =
            |r: Option<(f64, f64, f64)>| r.map_or_else(|| "-".to_owned(), crate::ratio_text);
        let verdict = match (self.met, self.failures.is_empty()) {
            (_, false) => format!("FAILED: {}", self.failures.join("; ")),
            (true, true) => "met".to_owned(),
            (false, true) => "missed".to_owned(),
        };
        format!(
            "| {} x {} KiB | {} | {} | {} | {} | {} | {} | {} | {verdict} |\n",
            self.chunks,
            self.chunk_bytes >> 10,
            self.group,
            self.label,
            self.rounds,
            self.figures,
            ratio(self.put_ratio),
            ratio(self.get_ratio),
            self.target,
        )
    }
}

/// Pages of `chunk_bytes` filled once from `seed`; chunk `i` is stored from one of them with
/// `i` stamped in its first 8 bytes, so that every chunk differs without refilling a page.
struct Stamped {
    pages: Vec<Page>,
}

impl Stamped {
    fn new(store: &Store, count: usize, seed: u64) -> Result<Self> {
        let mut pages = store.pool().allocate_batch(count)?;
        for page in &mut pages {
            fill(seed, page);
        }
        Ok(Self { pages })
    }

    /// Stamps chunks `first..` into the pages, in order; their keys.
    fn stamp(&mut self, first: usize) -> Vec<kv_l2_adapter::ChunkKey> {
        self.pages
            .iter_mut()
            .enumerate()
            .map(|(j, page)| {
                page.as_mut_slice()[..8].copy_from_slice(&((first + j) as u64).to_le_bytes());
                adapter_key(first + j)
            })
            .collect()
    }

    /// Stores chunks `first..first + count` from the pages (`count` at most their number);
    /// keys not stored.
    fn store(&mut self, adapter: &dyn L2Adapter, first: usize, count: usize) -> usize {
        let keys = self.stamp(first);
        let refs: Vec<&Page> = self.pages[..count].iter().collect();
        let report = adapter.store(&keys[..count], &refs);
        report.keys.iter().filter(|k| !k.is_stored()).count()
    }
}

/// Checks that `page` holds chunk `i` as [`Stamped`] wrote it over `pattern`.
fn check_stamped(page: &Page, pattern: &Page, i: usize) -> bool {
    let (bytes, expected) = (page.as_slice(), pattern.as_slice());
    bytes.len() == expected.len()
        && bytes[..8] == (i as u64).to_le_bytes()
        && bytes[8..] == expected[8..]
}

/// Bytes of the files in a folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DiskBytes {
    /// Sum of their sizes.
    size: u64,
    /// Sum of their allocated blocks (`du`), 512 bytes each.
    allocated: u64,
    /// Sum of the sizes of the segment files alone.
    segments: u64,
}

impl DiskBytes {
    /// What is in `folder` now (nothing where it cannot be read).
    fn of(folder: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(folder) else {
            return Self::default();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.metadata().ok()?, e.file_name())))
            .filter(|(m, _)| m.is_file())
            .fold(Self::default(), |sum, (m, name)| {
                let segment = name.to_string_lossy().ends_with(".kvseg");
                Self {
                    size: sum.size + m.len(),
                    allocated: sum.allocated + m.blocks() * 512,
                    segments: sum.segments + if segment { m.len() } else { 0 },
                }
            })
    }

    /// The highest of each figure.
    fn max(self, other: Self) -> Self {
        Self {
            size: self.size.max(other.size),
            allocated: self.allocated.max(other.allocated),
            segments: self.segments.max(other.segments),
        }
    }
}

/// The highest [`DiskBytes`] of a folder over a run, and the number of samples taken.
type Sampled = (DiskBytes, usize);

/// Samples [`DiskBytes`] of a folder every few milliseconds on its own thread.
struct DiskSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Sampled>>,
}

impl DiskSampler {
    fn start(folder: &Path) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, folder) = (Arc::clone(&stop), folder.to_owned());
        let thread = std::thread::Builder::new()
            .name("kv-bench-du".to_owned())
            .spawn(move || {
                let (mut most, mut samples) = (DiskBytes::default(), 0);
                loop {
                    let done = flag.load(Ordering::Relaxed);
                    most = most.max(DiskBytes::of(&folder));
                    samples += 1;
                    if done {
                        return (most, samples);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// The highest figures seen, and the number of samples (none if the thread failed).
    fn finish(mut self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for DiskSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What one churn round measured.
#[derive(Debug)]
struct ChurnRound {
    fill: f64,
    churn: f64,
    refused: usize,
    /// Chunks of the newest batch that loaded damaged, plus one when the newest is missing.
    lost: usize,
    /// Chunks of the newest batch no longer stored.
    newest_missing: usize,
    most: DiskBytes,
    samples: usize,
    evicted_keys: usize,
}

/// The churn row of `spec` (over segments) at `chunk_bytes`, `rounds` rounds, each on a fresh
/// store in `dir`.
pub(crate) fn churn(
    spec: &AdapterSpec,
    name: &str,
    chunk_bytes: usize,
    batch: usize,
    rounds: usize,
    dir: &Path,
) -> Result<Outcome> {
    let folder = dir.join(name);
    let limit = (CHURN_CAPACITY_GB * (1u64 << 30) as f64) as u64;
    let mut value = spec.value(&folder, CHURN_CAPACITY_GB);
    value["eviction"] = json!({
        "eviction_policy": "LRU",
        "trigger_watermark": 0.8,
        "eviction_ratio": 0.2,
    });
    let mut done = Vec::new();
    let mut chunks = 0;
    // The pool holds what a call uses (see `churn_round`), not an unclamped `--batch`.
    let batch = batch.clamp(1, (limit / chunk_bytes as u64 / 4).max(1) as usize);
    for round in 0..rounds {
        eprintln!("bench:   {name} round {}/{rounds}", round + 1);
        let store = spec.build(&value, chunk_bytes, 2 * batch + 1)?;
        let outcome = churn_round(&store, &folder, chunk_bytes, batch, round as u64);
        let closed = store.close();
        let removed = std::fs::remove_dir_all(&folder);
        let (round, fill_chunks) = outcome?;
        closed?;
        removed.with_context(|| format!("removing {}", folder.display()))?;
        chunks = fill_chunks;
        done.push(round);
    }
    let fill: Vec<f64> = done.iter().map(|r| r.fill).collect();
    let churned: Vec<f64> = done.iter().map(|r| r.churn).collect();
    let ratio = crate::paired(&churned, &fill);
    let most = done.iter().fold(DiskBytes::default(), |m, r| m.max(r.most));
    let samples: usize = done.iter().map(|r| r.samples).sum();
    let refused: usize = done.iter().map(|r| r.refused).sum();
    let lost: usize = done.iter().map(|r| r.lost).sum();
    let mut failures = Vec::new();
    if samples == 0 {
        failures.push("the disk usage was never sampled".to_owned());
    }
    if most.size > limit || most.allocated > limit {
        failures.push(format!(
            "folder reached {} bytes ({} allocated; segment files {}), over max_capacity_gb {CHURN_CAPACITY_GB} = {limit}",
            most.size, most.allocated, most.segments
        ));
    }
    if refused > 0 {
        failures.push(format!("{refused} keys refused"));
    }
    if lost > 0 {
        failures.push(format!(
            "{lost} of the newest chunks loaded damaged or the newest was evicted"
        ));
    }
    let median = crate::median;
    let mut extra = Map::new();
    extra.insert("max_capacity_bytes".into(), limit.into());
    extra.insert("max_folder_bytes".into(), most.size.into());
    extra.insert("max_allocated_bytes".into(), most.allocated.into());
    extra.insert("max_segment_file_bytes".into(), most.segments.into());
    extra.insert("disk_samples".into(), samples.into());
    extra.insert("fill_put_gbps".into(), median(&fill).into());
    extra.insert("churn_put_gbps".into(), median(&churned).into());
    extra.insert(
        "churn_bytes".into(),
        (CHURN_FILLS * chunks * chunk_bytes).into(),
    );
    extra.insert("refused_keys".into(), refused.into());
    extra.insert(
        "newest_batch_missing".into(),
        done.iter()
            .map(|r| r.newest_missing)
            .collect::<Vec<_>>()
            .into(),
    );
    extra.insert(
        "calls_of_chunks".into(),
        batch.clamp(1, (chunks / 4).max(1)).into(),
    );
    extra.insert(
        "evicted_keys".into(),
        done.iter()
            .map(|r| r.evicted_keys)
            .collect::<Vec<_>>()
            .into(),
    );
    Ok(Outcome {
        group: "churn",
        name: name.to_owned(),
        label: format!(
            "{}, {CHURN_CAPACITY_GB} GiB, LRU 0.8/0.2, fill then {CHURN_FILLS}x more",
            spec.label
        ),
        chunk_bytes,
        chunks,
        rounds,
        put_ratio: Some(ratio),
        get_ratio: None,
        figures: format!(
            "fill {:.2} GB/s, churn {:.2} GB/s; folder at most {} of {limit} bytes ({} allocated, {} samples)",
            median(&fill),
            median(&churned),
            most.size,
            most.allocated,
            samples,
        ),
        target: "put churn / fill >= 0.8".to_owned(),
        met: ratio.0 >= 0.8,
        failures,
        extra,
    })
}

/// One churn round on a fresh store: the round's figures, and the chunks of one fill.
fn churn_round(
    store: &Store,
    folder: &Path,
    chunk_bytes: usize,
    batch: usize,
    seed: u64,
) -> Result<(ChurnRound, usize)> {
    let adapter = store.adapter().as_ref();
    let capacity = adapter.usage().capacity_bytes;
    let fill_chunks = (capacity / chunk_bytes as u64) as usize;
    ensure!(
        fill_chunks > 0,
        "a churn store of {capacity} bytes holds no chunk"
    );
    // A call of at most a quarter of the capacity, so that the store-time eviction (a ratio of
    // the keys per pass) makes room for it within the call.
    let batch = batch.clamp(1, (fill_chunks / 4).max(1));
    let mut pages = Stamped::new(store, batch, seed)?;
    let sampler = DiskSampler::start(folder)?;
    let mut refused = 0;
    let mut timed = |from: usize, to: usize, refused: &mut usize| {
        let mut took = Duration::ZERO;
        for first in (from..to).step_by(batch) {
            let count = batch.min(to - first);
            let started = Instant::now();
            *refused += pages.store(adapter, first, count);
            took += started.elapsed();
        }
        gbps(((to - from) * chunk_bytes) as u64, took.as_secs_f64())
    };
    let fill_gbps = timed(0, fill_chunks, &mut refused);
    let total = (1 + CHURN_FILLS) * fill_chunks;
    let churn = timed(fill_chunks, total, &mut refused);
    let (most, samples) = sampler.finish();
    // The newest batch: whatever of it loads must be intact, and LRU must have kept the newest
    // chunk (watermark passes may have evicted the older ones of a batch).
    let first = total - batch.min(total);
    let keys: Vec<_> = (first..total).map(adapter_key).collect();
    let mut targets = store.pool().allocate_batch(keys.len())?;
    let mut refs: Vec<&mut Page> = targets.iter_mut().collect();
    let loaded = adapter.load(&keys, &mut refs);
    let mut pattern = store.pool().allocate().context("a page for verification")?;
    fill(seed, &mut pattern);
    let damaged = loaded
        .iter()
        .zip(&targets)
        .enumerate()
        .filter(|(j, (ok, page))| **ok && !check_stamped(page, &pattern, first + j))
        .count();
    let newest_missing = loaded.iter().filter(|ok| !**ok).count();
    let lost = damaged + usize::from(loaded.last() != Some(&true));
    let evicted_keys = total - adapter.usage().keys;
    Ok((
        ChurnRound {
            fill: fill_gbps,
            churn,
            refused,
            lost,
            newest_missing,
            most,
            samples,
            evicted_keys,
        },
        fill_chunks,
    ))
}

/// Free bytes of the file system under `dir`, from `df`.
fn free_bytes(dir: &Path) -> Result<u64> {
    let output = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .context("running df")?;
    ensure!(output.status.success(), "df failed on {}", dir.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("reading df's free bytes")
}

/// The chunks the restart row stores: `asked` (or [`RESTART_CHUNKS`], [`RESTART_CHUNKS_QUICK`]
/// with `quick`), at most 40% of the free space under `dir` now.
pub(crate) fn restart_chunks(dir: &Path, asked: Option<usize>, quick: bool) -> Result<usize> {
    let most = if quick {
        RESTART_CHUNKS_QUICK
    } else {
        RESTART_CHUNKS
    };
    let room = (free_bytes(dir)? as f64 * RESTART_DISK_SHARE) as u64;
    let fit = (room / entry_bytes(1, RESTART_CHUNK_BYTES)) as usize;
    Ok(asked.unwrap_or(most).min(fit))
}

/// The restart row of `spec` (over segments): `chunks` chunks of [`RESTART_CHUNK_BYTES`]
/// stored, the store closed (its data kept), then reopened `reopens` times (at least 2), timed,
/// with every chunk read back and verified once, timed, between the first two.
pub(crate) fn restart(
    spec: &AdapterSpec,
    chunks: usize,
    batch: usize,
    reopens: usize,
    dir: &Path,
) -> Result<Outcome> {
    ensure!(chunks > 0, "no room on the disk for the restart row");
    let folder = dir.join("restart");
    let outcome = restart_in(spec, chunks, batch, reopens.max(2), &folder);
    let removed = std::fs::remove_dir_all(&folder);
    let outcome = outcome?;
    removed.with_context(|| format!("removing {}", folder.display()))?;
    Ok(outcome)
}

fn restart_in(
    spec: &AdapterSpec,
    chunks: usize,
    batch: usize,
    reopens: usize,
    folder: &Path,
) -> Result<Outcome> {
    let chunk_bytes = RESTART_CHUNK_BYTES;
    let batch = batch.clamp(1, chunks);
    let bytes = entry_bytes(chunks, chunk_bytes);
    let mut value = spec.sized(folder, bytes);
    value["persist_enabled"] = true.into();
    let seed = 7;
    eprintln!(
        "bench: restart: storing {chunks} x {} KiB ({:.1} GB on disk)",
        chunk_bytes >> 10,
        bytes as f64 / 1e9
    );
    let started = Instant::now();
    let store = spec.build(&value, chunk_bytes, 2 * batch + 1)?;
    let first_open = started.elapsed().as_secs_f64();
    let mut pages = Stamped::new(&store, batch, seed)?;
    let started = Instant::now();
    let mut refused = 0;
    for first in (0..chunks).step_by(batch) {
        refused += pages.store(store.adapter().as_ref(), first, batch.min(chunks - first));
    }
    let fill_gbps = gbps(
        (chunks * chunk_bytes) as u64,
        started.elapsed().as_secs_f64(),
    );
    drop(pages);
    store.close()?;
    ensure!(
        refused == 0,
        "restart: {refused} keys refused while filling"
    );
    // Opening a store costs something before any recovery (the NIXL agent and plugin, the page
    // pool, the eviction thread): each reopen is paired with an open of the same store over an
    // empty folder, and the recovery is the difference.
    let empty_folder = folder.with_extension("empty");
    let empty_value = spec.sized(&empty_folder, bytes);
    let mut empty_seconds = Vec::new();
    let mut reopen_seconds = Vec::new();
    let mut read_seconds = f64::NAN;
    let mut lost = 0;
    let mut recovered = Vec::new();
    for round in 0..reopens {
        eprintln!("bench:   restart: reopen {}/{reopens}", round + 1);
        let started = Instant::now();
        let empty = spec.build(&empty_value, chunk_bytes, 2 * batch + 1)?;
        empty_seconds.push(started.elapsed().as_secs_f64());
        empty.close()?;
        std::fs::remove_dir_all(&empty_folder)
            .with_context(|| format!("removing {}", empty_folder.display()))?;
        let started = Instant::now();
        let store = spec.build(&value, chunk_bytes, 2 * batch + 1)?;
        reopen_seconds.push(started.elapsed().as_secs_f64());
        let adapter = store.adapter().as_ref();
        recovered.push(adapter.usage().keys);
        if round == 0 {
            let mut pattern = store.pool().allocate().context("a page for verification")?;
            fill(seed, &mut pattern);
            let mut targets = store.pool().allocate_batch(batch)?;
            let mut took = Duration::ZERO;
            for first in (0..chunks).step_by(batch) {
                let count = batch.min(chunks - first);
                let keys: Vec<_> = (first..first + count).map(adapter_key).collect();
                let mut refs: Vec<&mut Page> = targets[..count].iter_mut().collect();
                let started = Instant::now();
                let loaded = adapter.load(&keys, &mut refs);
                took += started.elapsed();
                lost += loaded
                    .iter()
                    .zip(&targets)
                    .enumerate()
                    .filter(|(j, (ok, page))| !**ok || !check_stamped(page, &pattern, first + j))
                    .count();
            }
            read_seconds = took.as_secs_f64();
        }
        store.close()?;
    }
    let reopen = crate::median(&reopen_seconds);
    let recovery_seconds: Vec<f64> = reopen_seconds
        .iter()
        .zip(&empty_seconds)
        .map(|(full, empty)| (full - empty).max(0.0))
        .collect();
    let recovery = crate::median(&recovery_seconds);
    let ratio = recovery / read_seconds;
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!(
            "{lost} chunks did not load intact after the reopen"
        ));
    }
    if recovered.iter().any(|&k| k != chunks) {
        failures.push(format!("reopens found {recovered:?} keys, {chunks} stored"));
    }
    let mut extra = Map::new();
    extra.insert("first_open_seconds".into(), first_open.into());
    extra.insert("fill_put_gbps".into(), fill_gbps.into());
    extra.insert("reopen_seconds".into(), reopen_seconds.clone().into());
    extra.insert("empty_open_seconds".into(), empty_seconds.clone().into());
    extra.insert("recovery_seconds".into(), recovery_seconds.clone().into());
    extra.insert("read_seconds".into(), read_seconds.into());
    extra.insert(
        "read_gbps".into(),
        gbps((chunks * chunk_bytes) as u64, read_seconds).into(),
    );
    extra.insert("recovery_over_read".into(), ratio.into());
    extra.insert("recovered_keys".into(), recovered.clone().into());
    extra.insert("disk_bytes".into(), bytes.into());
    Ok(Outcome {
        group: "restart",
        name: "restart".to_owned(),
        label: spec.label.clone(),
        chunk_bytes,
        chunks,
        rounds: reopen_seconds.len(),
        put_ratio: None,
        get_ratio: None,
        figures: format!(
            "reopen {reopen:.3} s (median of {:?}; recovery {recovery:.3} s beyond opening an empty store), read all {read_seconds:.2} s ({:.2} GB/s): recovery / read = {ratio:.3}",
            reopen_seconds
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>(),
            gbps((chunks * chunk_bytes) as u64, read_seconds),
        ),
        target: "recovery / read <= 0.05".to_owned(),
        met: ratio <= 0.05,
        failures,
        extra,
    })
}
