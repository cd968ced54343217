//! A child process for the crash and limit tests of the file backends.
//!
//! - `write-loop DIR ENGINE START`: stores keys in batches of 4, forever, until killed.
//! - `many-keys DIR ENGINE N CHUNK`: stores N keys of CHUNK bytes, loads and verifies them all,
//!   prints `ok N`.
//! - `segment-adapter-loop DIR ENGINE START GENERATION`: opens a dynamic store on segments
//!   through `StoreBuilder` (the `--l2-adapter` JSON of `file_suite::crash_l2_adapter`) and, until
//!   killed, overwrites keys in batches of 1 to 4, in order from START (modulo
//!   `file_suite::CRASH_KEYS`), with GENERATION's content. Per key it prints, flushed, `d I`
//!   before deleting the old version, `D I` once the delete returned, and `S I` once `store`
//!   returned `Stored` for it (`F I WHY` for any other outcome).
//!
//! ENGINE is `nixl` (NIXL POSIX) or `uring` (the native engine).
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use kv_integration_tests::{file_suite, fill_chunk, nixl_posix, uring};
use kv_l2_adapter::KeyOutcome;
use nixl_core::{Transport, TransportExt};
use nixl_file::{DynamicConfig, DynamicFileStore};
use pinned_alloc::{Page, PoolConfig};

fn engine(name: &str) -> Result<Arc<dyn Transport>> {
    match name {
        "nixl" => Ok(nixl_posix()),
        "uring" => Ok(uring()),
        other => bail!("unknown engine {other}"),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, dir, engine_name) = match args.as_slice() {
        [command, dir, engine, ..] => (command.as_str(), PathBuf::from(dir), engine.as_str()),
        _ => {
            bail!("usage: kv_file_worker write-loop|many-keys|segment-adapter-loop DIR ENGINE ...")
        }
    };
    match command {
        "segment-adapter-loop" => {
            let start: usize = args.get(3).context("START")?.parse()?;
            let generation: usize = args.get(4).context("GENERATION")?.parse()?;
            segment_adapter_loop(&dir, engine_name, start, generation)
        }
        "write-loop" => {
            let transport = engine(engine_name)?;
            let start: usize = args.get(3).context("START")?.parse()?;
            let memory = file_suite::Memory::new(&transport, 8);
            let store = file_suite::dynamic(&transport, &dir, true, false);
            let mut next = start;
            loop {
                let indices: Vec<usize> = (next..next + 4).map(|i| i % 64).collect();
                file_suite::put_all(&store, &memory, &indices);
                next += 4;
            }
        }
        "many-keys" => {
            let transport = engine(engine_name)?;
            let n: usize = args.get(3).context("N")?.parse()?;
            let chunk: usize = args.get(4).context("CHUNK")?.parse()?;
            let pool =
                PoolConfig::new(chunk, (256 * chunk.next_multiple_of(4096)) as u64).build()?;
            let _memory = transport.register_pool(&pool)?;
            let store = DynamicFileStore::open(
                Arc::clone(&transport),
                DynamicConfig::new(&dir)
                    .with_direct_io(true)
                    .with_shard_dirs(true),
            )?;
            for start in (0..n).step_by(100) {
                let end = (start + 100).min(n);
                let keys: Vec<_> = (start..end).map(file_suite::key).collect();
                let mut pages = pool.allocate_batch(end - start)?;
                for (page, i) in pages.iter_mut().zip(start..end) {
                    fill_chunk(i, page.as_mut_slice());
                }
                let items: Vec<_> = keys.iter().zip(&pages).collect();
                for (result, i) in store.put(&items).into_iter().zip(start..end) {
                    result.with_context(|| format!("put of key {i}"))?;
                }
            }
            let mut expected = vec![0u8; chunk];
            for start in (0..n).step_by(100) {
                let end = (start + 100).min(n);
                let keys: Vec<_> = (start..end).map(file_suite::key).collect();
                let mut pages = pool.allocate_batch(end - start)?;
                let mut items: Vec<_> = keys.iter().zip(pages.iter_mut()).collect();
                for (result, i) in store.get(&mut items).into_iter().zip(start..end) {
                    ensure!(
                        result.with_context(|| format!("get of key {i}"))?,
                        "key {i} missing"
                    );
                }
                for (page, i) in pages.iter().zip(start..end) {
                    fill_chunk(i, &mut expected);
                    ensure!(
                        page.as_slice() == &expected[..],
                        "key {i} loaded wrong bytes"
                    );
                }
            }
            println!("ok {n}");
            Ok(())
        }
        other => bail!("unknown command {other}"),
    }
}

/// The writer of the adapter crash test (see the module documentation); never returns `Ok`.
fn segment_adapter_loop(dir: &Path, engine: &str, start: usize, generation: usize) -> Result<()> {
    let store = file_suite::crash_store(dir, engine)?;
    let adapter = store.adapter();
    let mut out = std::io::stdout().lock();
    let mut next = start;
    loop {
        let indices: Vec<usize> = (next..next + 1 + next % 4)
            .map(|i| i % file_suite::CRASH_KEYS)
            .collect();
        next += indices.len();
        let keys: Vec<_> = indices.iter().map(|&i| file_suite::crash_key(i)).collect();
        for i in &indices {
            writeln!(out, "d {i}")?;
        }
        out.flush()?;
        adapter.delete(&keys);
        for i in &indices {
            writeln!(out, "D {i}")?;
        }
        out.flush()?;
        let pages = indices
            .iter()
            .map(|&i| {
                let mut page = store.pool().allocate().context("a free page")?;
                file_suite::crash_fill(i, generation, page.as_mut_slice());
                Ok(page)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Page> = pages.iter().collect();
        let report = adapter.store(&keys, &refs);
        for (i, outcome) in indices.iter().zip(&report.keys) {
            match outcome {
                KeyOutcome::Stored { .. } => writeln!(out, "S {i}")?,
                other => writeln!(out, "F {i} {other:?}")?,
            }
        }
        out.flush()?;
    }
}
