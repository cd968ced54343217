//! `kv-bench`: KV chunk put/get throughput of each engine, next to a raw baseline on the same
//! folder in the same run, reported as ratios (absolute figures on a shared machine move too much
//! to compare across runs).
//!
//! `cargo xtask bench` runs it in release mode and writes the table to `target/bench/latest.md`.
//! Arguments: `[--quick] [--rounds N] [--only ENGINE,...] [--dir DIR] [--out FILE]`.
#![forbid(unsafe_code)]

mod engines;
mod extras;

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};

use crate::engines::{Engine, Series, Workload};

/// Interleaved rounds per workload unless `--rounds` says otherwise (`--quick`: 2).
const ROUNDS: usize = 5;

struct Args {
    quick: bool,
    rounds: Option<usize>,
    /// Only these engines (by their enum name, lowercase), when given.
    only: Option<Vec<String>>,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        rounds: None,
        only: None,
        dir: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--rounds" => {
                let n: usize = it
                    .next()
                    .context("--rounds needs a number")?
                    .parse()
                    .context("--rounds needs a whole number")?;
                ensure!(n > 0, "--rounds must be at least 1");
                args.rounds = Some(n);
            }
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
                "unknown argument {other}; use [--quick] [--rounds N] [--only ENGINE,...] [--dir DIR] [--out FILE]"
            ),
        }
    }
    Ok(args)
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Per-round ratios of `a` over `b` (rounds run interleaved, so round `r` of both saw the same
/// machine): "median (min–max)".
fn paired(a: &[f64], b: &[f64]) -> String {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    let (low, high) = ratios
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    format!("{:.2}x ({low:.2}–{high:.2})", median(&ratios))
}

/// The throughput table of one workload: every figure the median over rounds, every ratio the
/// median of per-round ratios to the raw figure of the same round: fio on one file for the
/// one-file engines, fio on a fresh file per chunk for the per-key rows. A row that did not run
/// interleaved with its raw figure (NIXL's Python API, or any row when fio is missing) gets a
/// ratio of medians, marked †.
fn table(workload: &Workload, series: &[Series]) -> String {
    let mut out = String::new();
    let find = |engine| series.iter().find(|s| s.engine == engine);
    let one_file_raw = find(Engine::Fio).or_else(|| find(Engine::RawPwrite));
    let fresh_raw = find(Engine::FioFreshFiles);
    for s in series {
        let (put, get) = (median(&s.put_gbps), median(&s.get_gbps));
        let (paired_raw, unpaired_raw) = if Engine::ONE_FILE.contains(&s.engine) {
            (one_file_raw, None)
        } else if matches!(
            s.engine,
            Engine::FioFreshFiles | Engine::FileStore | Engine::Adapter
        ) {
            (fresh_raw, one_file_raw)
        } else {
            (None, fresh_raw.or(one_file_raw))
        };
        let (put_ratio, get_ratio) = match (paired_raw, unpaired_raw) {
            (Some(raw), _) => (
                paired(&s.put_gbps, &raw.put_gbps),
                paired(&s.get_gbps, &raw.get_gbps),
            ),
            (None, Some(raw)) => (
                format!("{:.2}x †", put / median(&raw.put_gbps)),
                format!("{:.2}x †", get / median(&raw.get_gbps)),
            ),
            (None, None) => ("-".to_owned(), "-".to_owned()),
        };
        let chunks = if Engine::ONE_FILE.contains(&s.engine) {
            workload.chunks
        } else {
            workload.resident_only().chunks
        };
        out.push_str(&format!(
            "| {chunks} x {} KiB | {} | {} | {put:.2} | {get:.2} | {put_ratio} | {get_ratio} |\n",
            workload.chunk_bytes >> 10,
            s.engine.label(),
            s.put_gbps.len(),
        ));
    }
    out
}

/// The adapter's own cost: its throughput over that of the store it runs on, round by round.
fn adapter_overhead(workload: &Workload, series: &[Series]) -> String {
    let find = |engine| series.iter().find(|s| s.engine == engine);
    match (find(Engine::FileStore), find(Engine::Adapter)) {
        (Some(store), Some(adapter)) => format!(
            "- {} x {} KiB, {} rounds: adapter / file store = put {}, get {}\n",
            workload.chunks,
            workload.chunk_bytes >> 10,
            store.put_gbps.len(),
            paired(&adapter.put_gbps, &store.put_gbps),
            paired(&adapter.get_gbps, &store.get_gbps),
        ),
        _ => String::new(),
    }
}

/// Whether `--only` (when given) names `engine`.
fn wanted(args: &Args, engine: Engine) -> bool {
    args.only
        .as_ref()
        .is_none_or(|only| only.contains(&format!("{engine:?}").to_ascii_lowercase()))
}

/// Every wanted engine on one workload.
fn measure(args: &Args, workload: &Workload, dir: &std::path::Path) -> Result<Vec<Series>> {
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { ROUNDS });
    let available = |engine: Engine| {
        let ok = engine.available();
        if !ok {
            eprintln!(
                "bench: {} not installed; skipped (cargo xtask setup installs it)",
                engine.label()
            );
        }
        ok
    };
    let size = format!("{} x {} KiB", workload.chunks, workload.chunk_bytes >> 10);
    let one_file: Vec<_> = Engine::ONE_FILE
        .into_iter()
        .filter(|&e| wanted(args, e) && available(e))
        .collect();
    let mut series = Vec::new();
    if !one_file.is_empty() {
        eprintln!(
            "bench: {size}, {rounds} interleaved rounds of {}",
            one_file
                .iter()
                .map(|e| e.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        series.extend(engines::one_file_rounds(workload, dir, &one_file, rounds)?);
    }
    let per_key = workload.resident_only();
    let per_key_size = format!("{} x {} KiB", per_key.chunks, per_key.chunk_bytes >> 10);
    if wanted(args, Engine::FileStore) || wanted(args, Engine::Adapter) {
        eprintln!(
            "bench: {per_key_size}, {rounds} interleaved rounds of the file store and the adapter"
        );
        series.extend(engines::per_key_rounds(&per_key, dir, rounds)?);
    }
    if wanted(args, Engine::NixlPython) && available(Engine::NixlPython) {
        eprintln!("bench: {per_key_size}, {rounds} passes of NIXL's Python API");
        series.push(engines::python_rounds(&per_key, dir, rounds)?);
    }
    Ok(series)
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
        Workload::new(256 / scale, 32 << 20),
        Workload::new(4096 / scale, 256 << 10),
    ];
    let mut throughput = String::from(
        "| chunks | engine | rounds | put GB/s | get GB/s | put vs raw | get vs raw |\n|---|---|---|---|---|---|---|\n",
    );
    let mut overhead = String::new();
    for workload in &workloads {
        let series = measure(&args, workload, &dir)?;
        throughput.push_str(&table(workload, &series));
        overhead.push_str(&adapter_overhead(&workload.resident_only(), &series));
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
        "# kv-bench\n\nO_DIRECT, one folder ({}). The one-file engines share one preallocated file and run in interleaved rounds (each round: every engine writes every chunk, then reads it back and verifies it; the order rotates from round to round). Each GB/s figure is the median over rounds; each ratio is the median of the per-round ratios to the raw figure of the same round (lowest and highest in brackets): fio (io_uring, queue depth 32), or single-threaded pwrite/pread where fio is missing. The per-key rows (a file per chunk) run after, on as many chunks as stay in host memory at once (1 GiB), in their own interleaved rounds with fio writing a fresh file per chunk, their raw figure (writing into newly allocated space costs the file system more than overwriting one file). NIXL's Python API runs on its own: its ratios (†) are ratios of medians.\n\n{}\n## Adapter overhead\n\nThe adapter and the file store it runs on, interleaved rounds (order alternating), per-round ratios: median (lowest–highest).\n\n{}\n## Lookups\n\n`batched_contains` over {lookups} keys, presence cache on (adapter index path): {:.1} M keys/s\n\n## Object stores (moto S3 on 127.0.0.1, one pass)\n\n{}\n## Transfer channel (sender to receiver, loopback, one pass)\n\n| chunks | NIXL channel (UCX) GB/s | raw TCP copy GB/s | channel vs TCP |\n|---|---|---|---|\n{}",
        dir.display(),
        throughput,
        overhead,
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
