//! `kv-bench`: KV chunk put/get throughput of each engine, next to a raw baseline on the same
//! folder in the same run, reported as ratios (absolute figures on a shared machine move too much
//! to compare across runs).
//!
//! `cargo xtask bench` runs it in release mode and writes the table to `target/bench/latest.md`.
//! Arguments: `[--quick] [--dir DIR] [--out FILE]`.
#![forbid(unsafe_code)]

mod engines;
mod extras;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::engines::{Engine, Measurement, Workload};

struct Args {
    quick: bool,
    /// Only these engines (by their enum name, lowercase), when given.
    only: Option<Vec<String>>,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        only: None,
        dir: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--only" => {
                let list = it.next().context("--only needs a list, e.g. fio,uring")?;
                args.only = Some(
                    list.split(',')
                        .map(|e| e.trim().to_ascii_lowercase())
                        .collect(),
                );
            }
            "--dir" => args.dir = Some(it.next().context("--dir needs a folder")?.into()),
            "--out" => args.out = Some(it.next().context("--out needs a file")?.into()),
            "--bench" => {}
            other => bail!(
                "unknown argument {other}; use [--quick] [--only ENGINE,...] [--dir DIR] [--out FILE]"
            ),
        }
    }
    Ok(args)
}

fn table(rows: &[(Workload, Vec<Measurement>)]) -> String {
    let mut out = String::from(
        "| chunk | engine | put GB/s | get GB/s | put vs raw | get vs raw |\n|---|---|---|---|---|---|\n",
    );
    for (workload, measurements) in rows {
        let baseline = [Engine::Fio, Engine::RawPwrite]
            .into_iter()
            .find_map(|engine| measurements.iter().find(|m| m.engine == engine));
        let Some(raw) = baseline else {
            continue;
        };
        for m in measurements {
            out.push_str(&format!(
                "| {} x {} KiB | {} | {:.2} | {:.2} | {:.2}x | {:.2}x |\n",
                workload.chunks,
                workload.chunk_bytes >> 10,
                m.engine.label(),
                m.put_gbps,
                m.get_gbps,
                m.put_gbps / raw.put_gbps,
                m.get_gbps / raw.get_gbps,
            ));
        }
    }
    out
}

/// The adapter's own cost: its throughput over that of the store it runs on, same run.
fn adapter_overhead(rows: &[(Workload, Vec<Measurement>)]) -> String {
    let mut out = String::new();
    for (workload, measurements) in rows {
        let find = |engine| measurements.iter().find(|m| m.engine == engine);
        if let (Some(store), Some(adapter)) = (find(Engine::FileStore), find(Engine::Adapter)) {
            out.push_str(&format!(
                "- {} x {} KiB: adapter / file store = put {:.2}x, get {:.2}x\n",
                workload.chunks,
                workload.chunk_bytes >> 10,
                adapter.put_gbps / store.put_gbps,
                adapter.get_gbps / store.get_gbps
            ));
        }
    }
    out
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let temp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            let base = std::env::current_dir()?.join("target/bench");
            std::fs::create_dir_all(&base)?;
            temp = tempfile_in(&base)?;
            temp.clone()
        }
    };
    let scale = if args.quick { 16 } else { 1 };
    let workloads = [
        Workload::new(32 / scale.min(8), 32 << 20),
        Workload::new(4096 / scale, 256 << 10),
    ];
    let mut rows = Vec::new();
    for workload in workloads {
        let mut measurements = Vec::new();
        for engine in Engine::ALL {
            let wanted = args
                .only
                .as_ref()
                .is_none_or(|only| only.contains(&format!("{engine:?}").to_ascii_lowercase()));
            if !wanted {
                continue;
            }
            if !engine.available() {
                eprintln!(
                    "bench: {} not installed; skipped (cargo xtask setup installs it)",
                    engine.label()
                );
                continue;
            }
            eprintln!(
                "bench: {} x {} KiB through {}",
                workload.chunks,
                workload.chunk_bytes >> 10,
                engine.label()
            );
            measurements.extend(engine.measure(&workload, &dir)?);
        }
        rows.push((workload, measurements));
    }
    let lookups = 100_000;
    eprintln!("bench: batched_contains over {lookups} keys");
    let rate = extras::lookup_rate(lookups)?;
    let (object_chunks, object_bytes) = if args.quick {
        (4, 4 << 20)
    } else {
        (8, 32 << 20)
    };
    let mut object_table = String::from(
        "| chunk | engine | put GB/s | get GB/s | put vs raw | get vs raw |\n|---|---|---|---|---|---|\n",
    );
    for (chunks, chunk_bytes) in [(object_chunks, object_bytes), (64, 256 << 10)] {
        eprintln!(
            "bench: {chunks} x {} KiB objects through moto",
            chunk_bytes >> 10
        );
        match extras::objects(chunks, chunk_bytes) {
            Ok(rows) => {
                let (raw_put, raw_get) = (rows[0].1, rows[0].2);
                for (label, put, get) in rows {
                    object_table.push_str(&format!(
                        "| {chunks} x {} KiB | {label} | {put:.3} | {get:.3} | {:.2}x | {:.2}x |\n",
                        chunk_bytes >> 10,
                        put / raw_put,
                        get / raw_get
                    ));
                }
            }
            Err(err) => object_table.push_str(&format!(
                "| {chunks} x {} KiB | skipped: {err:#} | | | | |\n",
                chunk_bytes >> 10
            )),
        }
    }
    let (channel_chunks, channel_bytes) = if args.quick {
        (16, 4 << 20)
    } else {
        (64, 32 << 20)
    };
    eprintln!(
        "bench: {channel_chunks} x {} KiB through the NIXL channel",
        channel_bytes >> 10
    );
    let channel = match extras::channel(channel_chunks, channel_bytes, 4) {
        Ok((nixl, tcp)) => format!(
            "| {channel_chunks} x {} KiB | {nixl:.2} | {tcp:.2} | {:.2}x |\n",
            channel_bytes >> 10,
            nixl / tcp
        ),
        Err(err) => format!(
            "| {channel_chunks} x {} KiB | skipped: {err:#} | | |\n",
            channel_bytes >> 10
        ),
    };
    let report = format!(
        "# kv-bench\n\nO_DIRECT, preallocated files, one folder ({}), each figure the best of 3 passes.\nRatios are to the raw figure of the same bytes in the same run: fio (io_uring, queue depth 32), or single-threaded pwrite/pread where fio is missing.\n\n{}\n## Adapter overhead\n\n{}\n## Lookups\n\n`batched_contains` over {lookups} keys, presence cache on (adapter index path): {:.1} M keys/s\n\n## Object stores (moto S3 on 127.0.0.1, one pass)\n\n{}\n## Transfer channel (sender to receiver, loopback, one pass)\n\n| chunks | NIXL channel (UCX) GB/s | raw TCP copy GB/s | channel vs TCP |\n|---|---|---|---|\n{}",
        dir.display(),
        table(&rows),
        adapter_overhead(&rows),
        rate / 1e6,
        object_table,
        channel
    );
    println!("{report}");
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn tempfile_in(base: &std::path::Path) -> Result<PathBuf> {
    let dir = base.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
