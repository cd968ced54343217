//! `kvl2 bench`: simulates KV offload for a model: stores chunks through the L2 adapter, looks
//! them up, loads them back, verifies every byte, and reports throughput and latency.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kv_l2_adapter::{ChunkKey, KeyOutcome, ObjectKey};
use pinned_alloc::{KvShape, Page};
use serde_json::json;

use crate::exit::{CliError, CliResult};
use crate::store::{Access, StoreArgs};

/// Tokens per chunk (LMCache's default `chunk_size`).
const CHUNK_TOKENS: u32 = 256;

/// Model presets: KV shape of one token.
const PRESETS: &[(&str, KvShape)] = &[
    (
        "llama-3.1-8b",
        KvShape {
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
            kv_tensors: 2,
        },
    ),
    (
        "qwen3-8b",
        KvShape {
            layers: 36,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
            kv_tensors: 2,
        },
    ),
    (
        "llama-3.1-70b",
        KvShape {
            layers: 80,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
            kv_tensors: 2,
        },
    ),
];

/// Options of `kvl2 bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Model preset: llama-3.1-8b (32 MiB chunks), qwen3-8b, llama-3.1-70b.
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    /// Bytes per chunk, overriding the model preset.
    #[arg(long)]
    chunk_bytes: Option<usize>,
    /// Chunks to store and load.
    #[arg(long, default_value_t = 32)]
    chunks: usize,
    /// Chunks per store / load call.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Folder of the store (default: a fresh temporary folder, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Engine: auto (NIXL if built with feature `nixl` and installed, else native io_uring),
    /// nixl, uring.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// Store layout: segments (preallocated segment files, sized to the run) or files (one
    /// file per chunk, LMCache's layout).
    #[arg(long, default_value = "segments")]
    layout: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Serve the store's metrics in the Prometheus text format on this address (for example
    /// 127.0.0.1:9464; path /metrics) while the bench runs.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// With --metrics: keep serving this many seconds after the run, so a scraper sees the
    /// final figures.
    #[arg(long, value_name = "SECS", default_value_t = 0, requires = "metrics")]
    metrics_linger: u64,
}

fn word(chunk: usize, i: usize) -> u64 {
    ((chunk as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

fn fill(chunk: usize, page: &mut Page) {
    for (i, bytes) in page.as_mut_slice().chunks_mut(8).enumerate() {
        bytes.copy_from_slice(&word(chunk, i).to_le_bytes()[..bytes.len()]);
    }
}

fn verify(chunk: usize, page: &Page) -> bool {
    page.as_slice()
        .chunks(8)
        .enumerate()
        .all(|(i, bytes)| bytes == &word(chunk, i).to_le_bytes()[..bytes.len()])
}

fn key(i: usize) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: "kvl2-bench".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: (i as u64).to_be_bytes().to_vec(),
        cache_salt: None,
    })
}

/// User + system CPU seconds of this process, from /proc (USER_HZ is 100 on Linux). Only the
/// store and load calls are counted, not filling and verifying the test data.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / 100.0)
        })
        .unwrap_or(0.0)
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1e3
}

fn progress(label: &str, total: usize, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>5} [{bar:30}] {pos}/{len} chunks {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

pub(crate) fn run(args: &BenchArgs) -> CliResult<()> {
    let shape = PRESETS
        .iter()
        .find(|(name, _)| *name == args.model)
        .map(|(_, shape)| *shape)
        .ok_or_else(|| {
            let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            CliError::usage(format!(
                "unknown model {:?}; presets: {}",
                args.model,
                known.join(", ")
            ))
        })?;
    let chunk_bytes = args
        .chunk_bytes
        .unwrap_or(shape.chunk_bytes(CHUNK_TOKENS) as usize);
    if chunk_bytes == 0 || args.chunks == 0 || args.batch == 0 {
        return Err(CliError::usage(
            "--chunk-bytes, --chunks and --batch must be positive",
        ));
    }
    if let Some(addr) = args.metrics {
        // Before the store is built: its metric handles bind to the recorder installed then.
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| CliError::usage(format!("--metrics {addr}: {e}")))?;
        if !args.json {
            eprintln!("kvl2 bench: metrics on http://{addr}/metrics");
        }
    }
    let temp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().map_err(CliError::storage)?;
            temp.path().to_path_buf()
        }
    };
    let layout = kv_config::Layout::parse(&args.layout)
        .ok_or_else(|| CliError::usage("--layout must be segments or files"))?;
    // Room for every chunk of the run with its header, plus slack for the last segment.
    let stride = chunk_bytes.next_multiple_of(4096) + 4096;
    let capacity_gb = ((args.chunks + 16) * stride) as f64 / (1u64 << 30) as f64;
    let json = serde_json::json!({
        "type": "nixl_store_dynamic",
        "backend": "POSIX",
        "backend_params": {
            "file_path": dir.display().to_string(),
            "use_direct_io": "true",
            "max_capacity_gb": capacity_gb.to_string(),
            "layout": args.layout.to_ascii_lowercase(),
        },
    })
    .to_string();
    let store = StoreArgs {
        config: None,
        l2_adapter: vec![json],
        dir: None,
        engine: args.engine.clone(),
        chunk_bytes,
        worker_id: 0,
        local_worker_id: None,
        gpu: None,
    };
    let batch = args.batch.min(args.chunks);
    let opened = store.open(2 * batch, Access::Write)?;
    let adapter = &opened.adapter;
    let backend = adapter.status().backend;
    let total_bytes = (args.chunks * chunk_bytes) as u64;
    let mut cpu = 0.0;

    let mut put_latency = Vec::new();
    let mut put_time = Duration::ZERO;
    let bar = progress("put", args.chunks, args.json);
    for start in (0..args.chunks).step_by(batch) {
        let end = (start + batch).min(args.chunks);
        let mut pages = opened
            .pool
            .allocate_batch(end - start)
            .map_err(CliError::storage)?;
        for (page, i) in pages.iter_mut().zip(start..end) {
            fill(i, page);
        }
        let keys: Vec<ChunkKey> = (start..end).map(key).collect();
        let refs: Vec<&Page> = pages.iter().collect();
        let cpu_start = cpu_seconds();
        let started = Instant::now();
        let report = adapter.store(&keys, &refs);
        let took = started.elapsed();
        cpu += cpu_seconds() - cpu_start;
        for (i, outcome) in (start..end).zip(&report.keys) {
            if let KeyOutcome::Failed(err) = outcome {
                return Err(CliError::storage(format!("storing chunk {i}: {err}")));
            }
        }
        put_time += took;
        put_latency.push(took);
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();

    let keys: Vec<ChunkKey> = (0..args.chunks).map(key).collect();
    let started = Instant::now();
    let mut lookups = 0usize;
    while started.elapsed() < Duration::from_millis(200) || lookups == 0 {
        let hits = adapter.batched_contains(&keys);
        if hits != keys.len() {
            return Err(CliError::storage(format!(
                "lookup found {hits} of {} chunks",
                keys.len()
            )));
        }
        lookups += keys.len();
    }
    let lookups_per_s = lookups as f64 / started.elapsed().as_secs_f64();

    let mut get_latency = Vec::new();
    let mut get_time = Duration::ZERO;
    let bar = progress("get", args.chunks, args.json);
    for start in (0..args.chunks).step_by(batch) {
        let end = (start + batch).min(args.chunks);
        let mut pages = opened
            .pool
            .allocate_batch(end - start)
            .map_err(CliError::storage)?;
        let keys: Vec<ChunkKey> = (start..end).map(key).collect();
        let mut refs: Vec<&mut Page> = pages.iter_mut().collect();
        let cpu_start = cpu_seconds();
        let started = Instant::now();
        let loaded = adapter.load(&keys, &mut refs);
        let took = started.elapsed();
        cpu += cpu_seconds() - cpu_start;
        get_time += took;
        get_latency.push(took);
        for ((i, ok), page) in (start..end).zip(loaded).zip(&pages) {
            if !ok || !verify(i, page) {
                return Err(CliError::storage(format!(
                    "chunk {i} did not load back intact"
                )));
            }
        }
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    adapter.close().map_err(CliError::storage)?;

    let gb = total_bytes as f64 / 1e9;
    let layout_name = match layout {
        kv_config::Layout::Segments => "segments",
        _ => "files",
    };
    let result = json!({
        "engine": backend,
        "nixl_built": kv_l2_adapter::NIXL_BUILT,
        "layout": layout_name,
        "model": args.model,
        "chunk_bytes": chunk_bytes,
        "chunks": args.chunks,
        "batch": batch,
        "put_gbps": gb / put_time.as_secs_f64().max(1e-9),
        "get_gbps": gb / get_time.as_secs_f64().max(1e-9),
        "put_batch_ms_p50": percentile(&mut put_latency, 0.5),
        "put_batch_ms_p99": percentile(&mut put_latency, 0.99),
        "get_batch_ms_p50": percentile(&mut get_latency, 0.5),
        "get_batch_ms_p99": percentile(&mut get_latency, 0.99),
        "lookups_per_s": lookups_per_s,
        "cpu_seconds_per_gb": cpu / (2.0 * gb),
        "verified_chunks": args.chunks,
    });
    let linger = Duration::from_secs(if args.metrics.is_some() {
        args.metrics_linger
    } else {
        0
    });
    if args.json {
        println!("{result}");
        std::thread::sleep(linger);
        return Ok(());
    }
    let f = |k: &str| result[k].as_f64().unwrap_or(0.0);
    println!(
        "kvl2 bench: {} chunks of {} KiB ({}), {} per batch, store in {}",
        args.chunks,
        chunk_bytes >> 10,
        args.model,
        batch,
        dir.display()
    );
    println!("  engine           {backend}");
    if !kv_l2_adapter::NIXL_BUILT {
        println!(
            "                   (built without NIXL: for it, run `cargo xtask setup`, then \
             `cargo run --release -p kvl2 --features nixl -- bench`)"
        );
    }
    println!("  layout           {layout_name}");
    println!(
        "  put              {:>8.2} GB/s   batch p50 {:.1} ms, p99 {:.1} ms",
        f("put_gbps"),
        f("put_batch_ms_p50"),
        f("put_batch_ms_p99")
    );
    println!(
        "  get              {:>8.2} GB/s   batch p50 {:.1} ms, p99 {:.1} ms",
        f("get_gbps"),
        f("get_batch_ms_p50"),
        f("get_batch_ms_p99")
    );
    println!("  lookups          {:>8.0} keys/s", f("lookups_per_s"));
    println!(
        "  CPU              {:>8.3} s per GB moved",
        f("cpu_seconds_per_gb")
    );
    println!("  verified         {} chunks, byte for byte", args.chunks);
    std::thread::sleep(linger);
    Ok(())
}
