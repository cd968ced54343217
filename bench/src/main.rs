//! `kv-bench`: KV chunk put/get throughput of each engine, next to a raw baseline on the same
//! folder in the same run, reported as ratios (absolute figures on a shared machine move too much
//! to compare across runs). The raw figure is fio (io_uring, O_DIRECT) on one preallocated file,
//! swept over queue depths 32 / 128 / 256, the best per direction.
//!
//! `cargo xtask bench` runs it in release mode and writes the table to `target/bench/latest.md`
//! and one object per row to `target/bench/latest.json`. Arguments: `[--quick] [--rounds N]
//! [--only NAME,...] [--chunk-kib KIB,...] [--batch N] [--restart-chunks N]
//! [--adapter-params JSON]... [--no-extras] [--dir DIR] [--out FILE] [--json FILE]`.
//!
//! `--only` names, by group (a group's raw fio row runs whenever another of its rows does):
//! - one file: `fio`, `rawpwrite`, `nixlposix`, `uring`;
//! - per key (`--batch` chunks per call, default [`per_key::DEFAULT_BATCH`]): `fiofreshfiles`,
//!   `nixlpython`, `filestore`, `adapter` and `adapter-native` (every layout: per-key files,
//!   and `[layout=segments]`, selectable alone as `adapter[layout=segments]`), `concurrent`
//!   and `concurrent-native` ([`per_key::THREADS`] threads through one adapter over segments);
//! - segment-store scenarios: `churn`, `churn-native` (watermark eviction under sustained
//!   writes, disk usage sampled against `max_capacity_gb`) at every chunk size, and `restart`
//!   (reopen against reading everything back) at 256 KiB.
#![forbid(unsafe_code)]

mod engines;
mod extras;
mod fio;
mod per_key;
mod scenarios;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::engines::{Engine, Group, Series, Workload};
use crate::fio::Device;
use crate::per_key::AdapterSpec;

/// Interleaved rounds per workload unless `--rounds` says otherwise (`--quick`: 2).
const ROUNDS: usize = 5;

const USAGE: &str = "[--quick] [--rounds N] [--only NAME,...] [--chunk-kib KIB,...] \
     [--batch N] [--restart-chunks N] [--adapter-params JSON]... [--no-extras] [--dir DIR] \
     [--out FILE] [--json FILE]\n\
     --only names: fio rawpwrite nixlposix uring | fiofreshfiles nixlpython filestore adapter \
     adapter-native concurrent concurrent-native | churn churn-native restart";

struct Args {
    quick: bool,
    rounds: Option<usize>,
    /// Only these rows (by `--only` name: fio, rawpwrite, nixlposix, uring, fiofreshfiles,
    /// filestore, nixlpython, adapter, adapter-native, concurrent, concurrent-native, churn,
    /// churn-native, restart), when given.
    only: Option<Vec<String>>,
    /// Only these chunk sizes, in KiB, when given.
    chunk_kib: Option<Vec<usize>>,
    /// Chunks per store or load call of the per-key and scenario rows.
    batch: usize,
    /// Chunks of the restart row, when given (still at most 40% of the free disk).
    restart_chunks: Option<usize>,
    /// Extra L2-adapter rows: these backend params, on both engines.
    adapter_params: Vec<serde_json::Map<String, Value>>,
    extras: bool,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        rounds: None,
        only: None,
        chunk_kib: None,
        batch: per_key::DEFAULT_BATCH,
        restart_chunks: None,
        adapter_params: Vec::new(),
        extras: true,
        dir: None,
        out: None,
        json: None,
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
            "--chunk-kib" => {
                let list = it.next().context("--chunk-kib needs a list, e.g. 256")?;
                args.chunk_kib = Some(
                    list.split(',')
                        .map(|k| k.trim().parse().context("--chunk-kib takes whole KiB"))
                        .collect::<Result<_>>()?,
                );
            }
            "--batch" => {
                let n: usize = it
                    .next()
                    .context("--batch needs a number")?
                    .parse()
                    .context("--batch needs a whole number")?;
                ensure!(n > 0, "--batch must be at least 1");
                args.batch = n;
            }
            "--restart-chunks" => {
                let n: usize = it
                    .next()
                    .context("--restart-chunks needs a number")?
                    .parse()
                    .context("--restart-chunks needs a whole number")?;
                ensure!(n > 0, "--restart-chunks must be at least 1");
                args.restart_chunks = Some(n);
            }
            "--adapter-params" => {
                let text = it.next().context(
                    "--adapter-params needs a JSON object, e.g. '{\"layout\":\"segments\"}'",
                )?;
                match serde_json::from_str(&text).context("--adapter-params")? {
                    Value::Object(params) => args.adapter_params.push(params),
                    other => bail!("--adapter-params needs a JSON object, got {other}"),
                }
            }
            "--no-extras" => args.extras = false,
            "--dir" => args.dir = Some(it.next().context("--dir needs a folder")?.into()),
            "--out" => args.out = Some(it.next().context("--out needs a file")?.into()),
            "--json" => args.json = Some(it.next().context("--json needs a file")?.into()),
            "--bench" => {}
            "--help" | "-h" => {
                println!("kv-bench {USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; use {USAGE}"),
        }
    }
    Ok(args)
}

/// The middle value (the mean of the two middle ones for an even count); NaN values are left
/// out, and none left is NaN.
fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Per-round ratios of `a` over `b` (rounds run interleaved, so round `r` of both saw the same
/// machine): (median, lowest, highest).
fn paired(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    let (low, high) = ratios
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    (median(&ratios), low, high)
}

fn ratio_text((median, low, high): (f64, f64, f64)) -> String {
    format!("{median:.2}x ({low:.2}–{high:.2})")
}

fn share_text(share: f64) -> String {
    if share.is_nan() {
        "n/a".to_owned()
    } else {
        format!("{share:.2}")
    }
}

/// The raw row of a group: fio, or pwrite/pread where fio is missing.
fn raw_of(group: &Group) -> Option<&Series> {
    let find = |engine| group.series.iter().find(|s| s.engine == engine);
    find(Engine::Fio).or_else(|| find(Engine::RawPwrite))
}

/// A row's figures against its group's raw row, as the JSON report holds them.
fn row_json(group: &Group, s: &Series) -> Value {
    let raw = raw_of(group);
    let (put, get) = (s.put_gbps(), s.get_gbps());
    let ratios = raw.map(|raw| (paired(&put, &raw.put_gbps()), paired(&get, &raw.get_gbps())));
    let device =
        |f: fn(&engines::Figures) -> f64| median(&s.rounds.iter().map(f).collect::<Vec<_>>());
    let mut row = json!({
        "group": group.title,
        "chunk_bytes": group.workload.chunk_bytes,
        "chunks": group.workload.chunks,
        "engine": s.label,
        "name": s.name,
        "put_ratio": ratios.map(|r| r.0.0),
        "get_ratio": ratios.map(|r| r.1.0),
        "put_ratio_range": ratios.map(|r| [r.0.1, r.0.2]),
        "get_ratio_range": ratios.map(|r| [r.1.1, r.1.2]),
        "put_gbps": median(&put),
        "get_gbps": median(&get),
        "raw_engine": raw.map(|r| r.label.clone()),
        "raw_put_gbps": raw.map(|r| median(&r.put_gbps())),
        "raw_get_gbps": raw.map(|r| median(&r.get_gbps())),
        "rounds": s.rounds.len(),
        "o_direct": true,
        "device_put_share": device(|f| f.device_put),
        "device_get_share": device(|f| f.device_get),
    });
    let sweeps: Vec<_> = s.rounds.iter().filter_map(|f| f.sweep.as_ref()).collect();
    if !sweeps.is_empty() {
        row["fio_best_qd_put"] = sweeps.iter().map(|w| w.best_write().depth).collect();
        row["fio_best_qd_get"] = sweeps.iter().map(|w| w.best_read().depth).collect();
        row["fio_sweep"] = fio::QUEUE_DEPTHS
            .iter()
            .enumerate()
            .map(|(i, &depth)| {
                let at = |f: fn(&fio::Depth) -> f64| {
                    median(
                        &sweeps
                            .iter()
                            .filter_map(|w| w.depths.get(i).map(f))
                            .collect::<Vec<_>>(),
                    )
                };
                json!({
                    "qd": depth,
                    "write_gbps": at(|d| d.write),
                    "read_gbps": at(|d| d.read),
                    "device_write_share": at(|d| d.device_write),
                    "device_read_share": at(|d| d.device_read),
                })
            })
            .collect();
    }
    row
}

/// The throughput table of one group: every figure the median over rounds, every ratio the
/// median of per-round ratios to the group's raw figure in the same round.
fn table(group: &Group) -> String {
    let raw = raw_of(group);
    let mut out = String::new();
    for s in &group.series {
        let (put, get) = (s.put_gbps(), s.get_gbps());
        let (put_ratio, get_ratio) = match raw {
            Some(raw) => (
                ratio_text(paired(&put, &raw.put_gbps())),
                ratio_text(paired(&get, &raw.get_gbps())),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let device_put = median(&s.rounds.iter().map(|f| f.device_put).collect::<Vec<_>>());
        let device_get = median(&s.rounds.iter().map(|f| f.device_get).collect::<Vec<_>>());
        let sweeps: Vec<_> = s.rounds.iter().filter_map(|f| f.sweep.as_ref()).collect();
        let label = if sweeps.is_empty() {
            s.label.clone()
        } else {
            let depths = |f: fn(&fio::Sweep) -> u32| {
                sweeps
                    .iter()
                    .map(|w| f(w).to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            };
            format!(
                "{} [best QD per round: write {}, read {}]",
                s.label,
                depths(|w| w.best_write().depth),
                depths(|w| w.best_read().depth)
            )
        };
        out.push_str(&format!(
            "| {} x {} KiB | {} | {label} | {} | {:.2} | {:.2} | {put_ratio} | {get_ratio} | {} / {} |\n",
            group.workload.chunks,
            group.workload.chunk_bytes >> 10,
            group.title,
            s.rounds.len(),
            median(&put),
            median(&get),
            share_text(device_put),
            share_text(device_get),
        ));
    }
    out
}

/// fio's figure at every queue depth, medians over rounds, for every group that ran it.
fn sweep_table(groups: &[Group]) -> String {
    let mut out = String::new();
    for group in groups {
        for s in &group.series {
            let sweeps: Vec<_> = s.rounds.iter().filter_map(|f| f.sweep.as_ref()).collect();
            if sweeps.is_empty() {
                continue;
            }
            for (i, depth) in fio::QUEUE_DEPTHS.iter().enumerate() {
                let at = |f: fn(&fio::Depth) -> f64| {
                    median(
                        &sweeps
                            .iter()
                            .filter_map(|w| w.depths.get(i).map(f))
                            .collect::<Vec<_>>(),
                    )
                };
                out.push_str(&format!(
                    "| {} x {} KiB | {} | {} | {depth} | {:.2} | {:.2} | {} / {} |\n",
                    group.workload.chunks,
                    group.workload.chunk_bytes >> 10,
                    group.title,
                    s.label,
                    at(|d| d.write),
                    at(|d| d.read),
                    share_text(at(|d| d.device_write)),
                    share_text(at(|d| d.device_read)),
                ));
            }
        }
    }
    out
}

/// The adapter's own cost: its throughput over that of the store it runs on, round by round.
fn adapter_overhead(group: &Group) -> String {
    let store = group.series.iter().find(|s| s.engine == Engine::FileStore);
    let adapter = group
        .series
        .iter()
        .find(|s| s.engine == Engine::Adapter && s.name == "adapter");
    match (store, adapter) {
        (Some(store), Some(adapter)) => format!(
            "- {} x {} KiB, {} rounds: per-key adapter (NIXL POSIX) / file store = put {}, get {}\n",
            group.workload.chunks,
            group.workload.chunk_bytes >> 10,
            store.rounds.len(),
            ratio_text(paired(&adapter.put_gbps(), &store.put_gbps())),
            ratio_text(paired(&adapter.get_gbps(), &store.get_gbps())),
        ),
        _ => String::new(),
    }
}

/// Whether `--only` (when given) names the row: by its name, or by its name before `[`.
fn wanted(args: &Args, name: &str) -> bool {
    let base = name.split('[').next().unwrap_or(name);
    args.only
        .as_ref()
        .is_none_or(|only| only.iter().any(|o| o == name || o == base))
}

/// Every wanted engine on one workload: the one-file group, then the per-key group.
fn measure(
    args: &Args,
    workload: &Workload,
    dir: &Path,
    adapters: &[AdapterSpec],
    device: Option<&Device>,
) -> Result<Vec<Group>> {
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
    // The raw row runs whenever another row of the group does: the ratios need it.
    let mut one_file: Vec<_> = Engine::ONE_FILE
        .into_iter()
        .filter(|&e| e != Engine::Fio && wanted(args, e.name()) && available(e))
        .collect();
    if (!one_file.is_empty() || wanted(args, Engine::Fio.name())) && available(Engine::Fio) {
        one_file.insert(0, Engine::Fio);
    }
    let mut groups = Vec::new();
    if !one_file.is_empty() {
        eprintln!(
            "bench: {size}, {rounds} interleaved rounds of {}",
            one_file
                .iter()
                .map(|e| e.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        groups.push(Group {
            title: "one file",
            workload: *workload,
            series: engines::one_file_rounds(workload, dir, &one_file, rounds, device)?,
        });
    }
    let per_key = workload.resident_only();
    eprintln!(
        "bench: {} x {} KiB, {rounds} interleaved rounds of the per-key rows, {} chunks per call",
        per_key.chunks,
        per_key.chunk_bytes >> 10,
        args.batch.min(per_key.chunks)
    );
    let series = per_key::per_key_rounds(
        &per_key,
        args.batch,
        dir,
        rounds,
        adapters,
        &|name| wanted(args, name),
        device,
    )?;
    if !series.is_empty() {
        groups.push(Group {
            title: "per key",
            workload: per_key,
            series,
        });
    }
    Ok(groups)
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
    let device = Device::of(&dir);
    let scale = if args.quick { 16 } else { 1 };
    let workloads: Vec<_> = [
        Workload::new(256 / scale, 32 << 20),
        Workload::new(4096 / scale, 256 << 10),
    ]
    .into_iter()
    .filter(|w| {
        args.chunk_kib
            .as_ref()
            .is_none_or(|sizes| sizes.contains(&(w.chunk_bytes >> 10)))
    })
    .collect();
    let mut adapters = AdapterSpec::defaults();
    for params in &args.adapter_params {
        for spec in AdapterSpec::pair(params) {
            if !adapters.iter().any(|a| a.name == spec.name) {
                adapters.push(spec);
            }
        }
    }
    let mut groups = Vec::new();
    let mut outcomes = Vec::new();
    for workload in &workloads {
        groups.extend(measure(&args, workload, &dir, &adapters, device.as_ref())?);
        outcomes.extend(churn_rows(&args, workload.chunk_bytes, &dir)?);
    }
    if workloads
        .iter()
        .any(|w| w.chunk_bytes == scenarios::RESTART_CHUNK_BYTES)
        && wanted(&args, "restart")
    {
        let chunks = scenarios::restart_chunks(&dir, args.restart_chunks, args.quick)?;
        let reopens = if args.quick { 2 } else { 3 };
        outcomes.push(scenarios::restart(
            &AdapterSpec::segments()[0],
            chunks,
            args.batch,
            reopens,
            &dir,
        )?);
    }
    let mut throughput = String::from(
        "| chunks | group | engine | rounds | put GB/s | get GB/s | put vs raw | get vs raw | device share put / get |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut overhead = String::new();
    let mut rows = Vec::new();
    for group in &groups {
        throughput.push_str(&table(group));
        overhead.push_str(&adapter_overhead(group));
        rows.extend(group.series.iter().map(|s| row_json(group, s)));
    }
    let mut scenario_table = String::from(
        "| chunks | scenario | engine | rounds | figures | put ratio | get ratio | target | verdict |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for outcome in &outcomes {
        scenario_table.push_str(&outcome.table_row());
        rows.push(outcome.json());
    }
    let sweeps = sweep_table(&groups);
    let extras = if args.extras {
        extras_report(&args)?
    } else {
        String::new()
    };
    let device_name = device
        .as_ref()
        .map_or_else(|| "no block-device counters".to_owned(), Device::name);
    let report = format!(
        "# kv-bench\n\nO_DIRECT is in effect for every row: fio runs with `--direct=1`, every engine and store opens its files with O_DIRECT, and NIXL's Python API opens its files with O_DIRECT too. One folder ({}, device {device_name}). Each row writes every chunk, then reads it back and verifies it; the \"device share\" column is the bytes the block device counted during the timed put / get over the bytes moved (from /sys/dev/block/…/stat; 1.00 means every byte went to and came from the device, not the page cache or the holes of a preallocated file).\n\nRows are measured in groups of interleaved rounds. The one-file group (fio, pwrite, NIXL POSIX, native io_uring) shares one preallocated file, every engine writing all of it before reading it back; the order rotates from round to round. The per-key group (a file or key per chunk, {} chunks per call, or all of a workload's chunks where it has fewer; the concurrent rows: {} threads through one adapter, each with its own keys) runs on as many chunks as stay in host memory at once (1 GiB), the order alternating, with fio on one preallocated file of the same bytes as its raw figure, and fio on a fresh file per chunk beside it. Each GB/s figure is the median over rounds; each ratio is the median of the per-round ratios to the raw figure of the same round of the same group (lowest and highest in brackets): fio (io_uring, O_DIRECT) swept over queue depths {:?}, the best depth per direction, or single-threaded pwrite/pread where fio is missing.\n\n{}\n## Segment store: churn and restart\n\nBuilt from `--l2-adapter` JSON through `StoreBuilder`. Churn: a store of `max_capacity_gb` {} with LRU watermark eviction (`trigger_watermark` 0.8, `eviction_ratio` 0.2), filled to its capacity, then written {}x its capacity more with new keys, every round a fresh store; the put ratio is the churn's GB/s over the first fill's, per round; the folder's bytes (sum of file sizes, and of allocated blocks) are sampled every 5 ms throughout and must never exceed `max_capacity_gb`, every store must succeed, whatever of the newest batch still loads must be intact and the newest chunk must be there; calls are of `--batch` chunks, at most a quarter of the capacity. Restart: a store filled with 256 KiB chunks (at most 40% of the free disk), closed with its data kept, then reopened (recovery reads only headers) and read back whole; the ratio is the median reopen time over the time to read every chunk back.\n\n{}\n## fio by queue depth\n\nMedians over rounds; device share write / read.\n\n| chunks | group | fio | QD | write GB/s | read GB/s | device share |\n|---|---|---|---|---|---|---|\n{}\n## Adapter overhead\n\nThe per-key adapter and the file store it runs on, interleaved rounds, per-round ratios: median (lowest–highest).\n\n{}\n{}",
        dir.display(),
        args.batch,
        per_key::THREADS,
        fio::QUEUE_DEPTHS,
        throughput,
        scenarios::CHURN_CAPACITY_GB,
        scenarios::CHURN_FILLS,
        scenario_table,
        sweeps,
        overhead,
        extras,
    );
    println!("{report}");
    if let Some(out) = &args.out {
        write(out, &report)?;
    }
    if let Some(out) = &args.json {
        write(out, &serde_json::to_string_pretty(&rows)?)?;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let failed: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.failures.iter().map(move |f| format!("{}: {f}", o.name)))
        .collect();
    ensure!(failed.is_empty(), "checks failed: {}", failed.join("; "));
    Ok(())
}

/// The churn rows wanted at `chunk_bytes`.
fn churn_rows(args: &Args, chunk_bytes: usize, dir: &Path) -> Result<Vec<scenarios::Outcome>> {
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 3 });
    let mut outcomes = Vec::new();
    for (spec, name) in AdapterSpec::segments()
        .iter()
        .zip(["churn", "churn-native"])
    {
        if wanted(args, name) {
            eprintln!(
                "bench: {name}, {} KiB chunks, {rounds} rounds",
                chunk_bytes >> 10
            );
            outcomes.push(scenarios::churn(
                spec,
                name,
                chunk_bytes,
                args.batch,
                rounds,
                dir,
            )?);
        }
    }
    Ok(outcomes)
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Lookups, object stores and the transfer channel.
fn extras_report(args: &Args) -> Result<String> {
    let lookups = 100_000;
    eprintln!("bench: batched_contains over {lookups} keys");
    let rate = extras::lookup_rate(lookups)?;
    let (object_chunks, object_bytes, object_rounds) = if args.quick {
        (4, 4 << 20, 1)
    } else {
        (8, 32 << 20, 5)
    };
    let mut object_table = String::from(
        "| chunk | engine | put GB/s | get GB/s | put vs raw | get vs raw |\n|---|---|---|---|---|---|\n",
    );
    for (chunks, chunk_bytes) in [(object_chunks, object_bytes), (64, 256 << 10)] {
        eprintln!(
            "bench: {chunks} x {} KiB objects through SeaweedFS",
            chunk_bytes >> 10
        );
        match extras::objects(chunks, chunk_bytes, object_rounds) {
            Ok(figures) => {
                let raw = &figures[0];
                for (label, rounds) in extras::OBJECT_ROWS.iter().zip(&figures) {
                    let puts: Vec<f64> = rounds.iter().map(|f| f.0).collect();
                    let gets: Vec<f64> = rounds.iter().map(|f| f.1).collect();
                    let raw_puts: Vec<f64> = raw.iter().map(|f| f.0).collect();
                    let raw_gets: Vec<f64> = raw.iter().map(|f| f.1).collect();
                    let put_ratio = paired(&puts, &raw_puts);
                    let get_ratio = paired(&gets, &raw_gets);
                    object_table.push_str(&format!(
                        "| {chunks} x {} KiB | {label} | {:.3} | {:.3} | {} | {} |\n",
                        chunk_bytes >> 10,
                        median(&puts),
                        median(&gets),
                        ratio_text(put_ratio),
                        ratio_text(get_ratio),
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
    let channel_rounds = if args.quick { 1 } else { 3 };
    let channel = match extras::channel(channel_chunks, channel_bytes, 4, channel_rounds) {
        Ok(rounds) => {
            let plain: Vec<f64> = rounds.iter().map(|r| r.0).collect();
            let signed: Vec<f64> = rounds.iter().map(|r| r.1).collect();
            let tcp: Vec<f64> = rounds.iter().map(|r| r.2).collect();
            format!(
                "| {channel_chunks} x {} KiB | {:.2} | {:.2} | {:.2} | {} | {} |\n",
                channel_bytes >> 10,
                median(&plain),
                median(&signed),
                median(&tcp),
                ratio_text(paired(&plain, &tcp)),
                ratio_text(paired(&signed, &plain)),
            )
        }
        Err(err) => format!(
            "| {channel_chunks} x {} KiB | skipped: {err:#} | | | | |\n",
            channel_bytes >> 10
        ),
    };
    Ok(format!(
        "## Lookups\n\n`batched_contains` over {lookups} keys, presence cache on (adapter index path): {:.1} M keys/s\n\n## Object stores (SeaweedFS S3 on 127.0.0.1: medians of interleaved rounds, ratios to raw NIXL OBJ of the same round)\n\n{object_table}\n## Transfer channel (sender to receiver, loopback: medians of interleaved rounds)\n\n| chunks | NIXL channel (UCX) GB/s | with pd_secret GB/s | raw TCP copy GB/s | channel vs TCP | with secret vs without |\n|---|---|---|---|---|---|\n{channel}",
        rate / 1e6,
    ))
}

/// This run's folder under `base`, after removing what earlier runs that ended early (an error,
/// a panic, Ctrl-C) left there: `run-PID` folders whose process is gone.
fn tempfile_in(base: &Path) -> Result<PathBuf> {
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
                continue;
            };
            let gone = pid.parse::<u32>().is_ok_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            });
            if gone {
                eprintln!(
                    "bench: removing {} left by an earlier run",
                    entry.path().display()
                );
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
