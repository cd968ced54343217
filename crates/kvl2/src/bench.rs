//! `kvl2 bench`: a KV offload round trip through NIXL's POSIX plugin.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Args;
use nixl_core::{NixlConfig, NixlTransport, StorageExtent, Transport};
use nixl_file::{FileOptions, UringConfig, UringTransport, open_storage_file};
use pinned_alloc::{MemoryRegion, Page, PoolConfig};

/// Options of `kvl2 bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Chunks to store and load.
    #[arg(long, default_value_t = 32)]
    chunks: usize,
    /// Bytes per chunk (32 MiB is one 256-token chunk of Llama-3.1-8B in bf16).
    #[arg(long, default_value_t = 32 << 20)]
    chunk_bytes: usize,
    /// Folder for the chunk file (default: a fresh temporary folder, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Use buffered I/O instead of O_DIRECT.
    #[arg(long)]
    buffered: bool,
    /// Engine: `auto` (NIXL POSIX when the NIXL runtime is installed, else the native io_uring
    /// engine), `nixl` or `uring`.
    #[arg(long, default_value = "auto")]
    engine: String,
}

/// The engine asked for; `auto` prefers NIXL and falls back to the native engine, saying why.
fn engine(name: &str) -> Result<(Box<dyn Transport>, String)> {
    let uring = || -> Result<(Box<dyn Transport>, String)> {
        Ok((
            Box::new(UringTransport::new(UringConfig::default())?),
            "native io_uring (nixl-file)".to_owned(),
        ))
    };
    match name {
        "nixl" => Ok((
            Box::new(NixlTransport::new(NixlConfig::new("POSIX"))?),
            "NIXL POSIX".to_owned(),
        )),
        "uring" => uring(),
        "auto" => match NixlTransport::new(NixlConfig::new("POSIX")) {
            Ok(nixl) => Ok((Box::new(nixl), "NIXL POSIX".to_owned())),
            Err(err) => {
                eprintln!("kvl2: NIXL unavailable ({err}); using the native io_uring engine");
                uring()
            }
        },
        other => anyhow::bail!("unknown engine {other:?}: use auto, nixl or uring"),
    }
}

fn fill(chunk: usize, page: &mut Page) {
    let seed = (chunk as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, word) in page.as_mut_slice().chunks_mut(8).enumerate() {
        let value = seed ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        word.copy_from_slice(&value.to_le_bytes()[..word.len()]);
    }
}

fn gb_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

pub(crate) fn run(args: &BenchArgs) -> Result<()> {
    ensure!(args.chunks > 0, "--chunks must be at least 1");
    ensure!(
        args.chunk_bytes > 0 && args.chunk_bytes % 4096 == 0,
        "--chunk-bytes must be a positive multiple of 4096 (O_DIRECT alignment)"
    );
    let temp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("creating a temporary folder")?;
            temp.path().to_path_buf()
        }
    };
    let total = (args.chunks * args.chunk_bytes) as u64;
    let direct_io = !args.buffered;

    let (transport, engine_label) = engine(&args.engine)?;
    let pool = PoolConfig::new(args.chunk_bytes, 2 * total).build()?;
    let _memory = transport.register_memory(Arc::clone(&pool) as Arc<dyn MemoryRegion>)?;
    let path = dir.join("kvl2-bench.chunks");
    let file = Arc::new(open_storage_file(
        &path,
        FileOptions::new()
            .with_direct_io(direct_io)
            .with_preallocate(total),
    )?);
    let storage = transport.register_file(Arc::clone(&file))?;
    let extent = |i: usize| StorageExtent::new(storage.dev_id(), (i * args.chunk_bytes) as u64);

    let mut sources = pool.allocate_batch(args.chunks)?;
    for (i, page) in sources.iter_mut().enumerate() {
        fill(i, page);
    }
    let writes: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, page)| (page.as_slice(), extent(i)))
        .collect();
    let started = Instant::now();
    transport.write(&writes)?;
    let put_seconds = started.elapsed().as_secs_f64();

    let mut targets = pool.allocate_batch(args.chunks)?;
    let mut reads: Vec<_> = targets
        .iter_mut()
        .enumerate()
        .map(|(i, page)| (page.as_mut_slice(), extent(i)))
        .collect();
    let started = Instant::now();
    transport.read(&mut reads)?;
    let get_seconds = started.elapsed().as_secs_f64();
    drop(reads);

    for (i, (source, target)) in sources.iter().zip(&targets).enumerate() {
        ensure!(
            source.as_slice() == target.as_slice(),
            "chunk {i} read back differs from what was written"
        );
    }
    drop(storage);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;

    println!("engine     {engine_label} (O_DIRECT: {direct_io})");
    println!(
        "chunks     {} x {} KiB = {:.2} GB",
        args.chunks,
        args.chunk_bytes >> 10,
        total as f64 / 1e9
    );
    println!("put        {:.2} GB/s", gb_per_s(total, put_seconds));
    println!("get        {:.2} GB/s", gb_per_s(total, get_seconds));
    println!("verified   {} chunks byte for byte", args.chunks);
    Ok(())
}
