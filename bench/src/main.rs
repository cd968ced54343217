//! `kv-bench`: KV chunk put/get throughput of each engine, next to a raw baseline on the same
//! folder in the same run, reported as ratios (absolute figures on a shared machine move too much
//! to compare across runs).
//!
//! `cargo xtask bench` runs it in release mode and writes the table to `target/bench/latest.md`.
//! Arguments: `[--quick] [--dir DIR] [--out FILE]`.
#![forbid(unsafe_code)]

mod engines;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::engines::{Engine, Measurement, Workload};

struct Args {
    quick: bool,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        dir: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--dir" => args.dir = Some(it.next().context("--dir needs a folder")?.into()),
            "--out" => args.out = Some(it.next().context("--out needs a file")?.into()),
            "--bench" => {}
            other => bail!("unknown argument {other}; use [--quick] [--dir DIR] [--out FILE]"),
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
            measurements.push(engine.measure(&workload, &dir)?);
        }
        rows.push((workload, measurements));
    }
    let report = format!(
        "# kv-bench\n\nO_DIRECT, preallocated files, one folder ({}), each figure the best of 3 passes.\nRatios are to the raw figure of the same bytes in the same run: fio (io_uring, queue depth 32), or single-threaded pwrite/pread where fio is missing.\n\n{}",
        dir.display(),
        table(&rows)
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
