//! fio, the raw figure every row is compared to, and the block-device counters that show where a
//! pass's bytes came from.
//!
//! fio runs with io_uring, O_DIRECT (`--direct=1`) and registered buffers, and is swept over queue depths 32, 128 and
//! 256: the raw figure of each direction is the best depth's (on a virtual disk fio at depth 256
//! reads 256 KiB blocks 1.6x faster than at 32, and the engines keep whole batches in flight, so
//! one fixed depth understates the disk). Its figures come from its JSON report, parsed with
//! serde_json.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// The queue depths fio is swept over; the raw figure of each direction is the best of them.
pub(crate) const QUEUE_DEPTHS: [u32; 3] = [32, 128, 256];

pub(crate) fn installed() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One queue depth of a sweep: GB/s each way, and the share of the bytes asked that the block
/// device saw (NaN where its counters cannot be read).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Depth {
    pub(crate) depth: u32,
    pub(crate) write: f64,
    pub(crate) read: f64,
    pub(crate) device_write: f64,
    pub(crate) device_read: f64,
}

/// One sweep: at every queue depth fio writes the files `layout` names, then reads them back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sweep {
    /// In [`QUEUE_DEPTHS`] order.
    pub(crate) depths: Vec<Depth>,
}

impl Sweep {
    /// The depth with the best write figure.
    pub(crate) fn best_write(&self) -> Depth {
        self.best(|d| d.write)
    }

    /// The depth with the best read figure.
    pub(crate) fn best_read(&self) -> Depth {
        self.best(|d| d.read)
    }

    fn best(&self, figure: impl Fn(&Depth) -> f64) -> Depth {
        self.depths
            .iter()
            .copied()
            .max_by(|a, b| figure(a).total_cmp(&figure(b)))
            .unwrap_or(Depth {
                depth: 0,
                write: f64::NAN,
                read: f64::NAN,
                device_write: f64::NAN,
                device_read: f64::NAN,
            })
    }
}

/// fio over `layout` (its `--filename` or `--directory`/`--nrfiles` options) at every queue
/// depth: write `bytes` in blocks of `block`, then read them back. Each read reads what the
/// write just before it wrote.
pub(crate) fn sweep(
    layout: &[String],
    block: usize,
    bytes: u64,
    device: Option<&Device>,
) -> Result<Sweep> {
    let depths = QUEUE_DEPTHS
        .into_iter()
        .map(|depth| sweep_one(layout, depth, block, bytes, device))
        .collect::<Result<_>>()?;
    Ok(Sweep { depths })
}

/// One depth of a sweep: fio writes `bytes` over `layout`, then reads them back.
pub(crate) fn sweep_one(
    layout: &[String],
    depth: u32,
    block: usize,
    bytes: u64,
    device: Option<&Device>,
) -> Result<Depth> {
    let share = |moved: u64| moved as f64 / bytes as f64;
    let before = device.and_then(Device::counters);
    let write = run(layout, "write", depth, block, bytes)?;
    let middle = device.and_then(Device::counters);
    let read = run(layout, "read", depth, block, bytes)?;
    let after = device.and_then(Device::counters);
    let (device_write, device_read) = match (before, middle, after) {
        (Some(b), Some(m), Some(a)) => (share(b.since(m).1), share(m.since(a).0)),
        _ => (f64::NAN, f64::NAN),
    };
    Ok(Depth {
        depth,
        write,
        read,
        device_write,
        device_read,
    })
}

/// One fio job (io_uring, O_DIRECT, registered buffers) over the files `layout` names; GB/s.
///
/// The queue depth is capped at the job's number of blocks: no more I/Os than that can be in
/// flight, and fio allocates and registers `depth` buffers of `block` bytes whatever the job's
/// size (256 x 32 MiB is 8 GiB of pinned buffers, 25 s of setup for a 1 GiB job).
pub(crate) fn run(
    layout: &[String],
    rw: &str,
    depth: u32,
    block: usize,
    bytes: u64,
) -> Result<f64> {
    let output = Command::new("fio")
        .args([
            "--name=kv",
            "--ioengine=io_uring",
            "--direct=1",
            // Registered buffers, as the native engine's ReadFixed / WriteFixed use: without
            // them fio pins every block's pages per I/O, which at 256 KiB costs it reads.
            "--fixedbufs",
            "--output-format=json",
        ])
        .arg(format!(
            "--iodepth={}",
            u64::from(depth).min((bytes / block.max(1) as u64).max(1))
        ))
        .args(layout)
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={block}"))
        .arg(format!("--size={bytes}"))
        .output()
        .context("running fio")?;
    ensure!(
        output.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // fio may print notes before its report; the report is the JSON object that follows.
    let start = output
        .stdout
        .iter()
        .position(|&b| b == b'{')
        .context("fio printed no JSON report")?;
    let report: Value =
        serde_json::from_slice(&output.stdout[start..]).context("parsing fio's JSON report")?;
    gbps(&report, rw, bytes)
}

/// The bandwidth of direction `rw` (`read` or `write`) over every job of a fio JSON report, in
/// GB/s, after checking that every job succeeded, ran with O_DIRECT and moved `bytes` in all.
pub(crate) fn gbps(report: &Value, rw: &str, bytes: u64) -> Result<f64> {
    let jobs = report["jobs"]
        .as_array()
        .filter(|jobs| !jobs.is_empty())
        .context("fio's report has no jobs")?;
    let (mut moved, mut bandwidth) = (0u64, 0f64);
    for job in jobs {
        let name = job["jobname"].as_str().unwrap_or("?");
        ensure!(
            job["error"].as_i64() == Some(0),
            "fio job {name} failed: error {}",
            job["error"]
        );
        let direct = &job["job options"]["direct"];
        ensure!(
            direct.as_str() == Some("1"),
            "fio job {name} ran without O_DIRECT ({direct})"
        );
        let section = &job[rw];
        moved += section["io_bytes"]
            .as_u64()
            .with_context(|| format!("fio job {name}: no {rw}.io_bytes"))?;
        bandwidth += section["bw_bytes"]
            .as_f64()
            .with_context(|| format!("fio job {name}: no {rw}.bw_bytes"))?;
    }
    ensure!(
        moved == bytes,
        "fio moved {moved} bytes in its {rw} pass, {bytes} asked"
    );
    Ok(bandwidth / 1e9)
}

/// The byte counters of the block device a folder lives on (`/sys/dev/block/MAJ:MIN/stat`).
/// Taken around a timed pass they show whether its bytes went to the device: a pass served by
/// the page cache, or by holes and unwritten extents of a preallocated file, reads (next to)
/// nothing from it.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    stat: PathBuf,
}

/// Bytes read and written by a device since boot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters {
    read: u64,
    written: u64,
}

impl Counters {
    /// Bytes (read, written) between `self` and a later `now`.
    pub(crate) fn since(self, now: Counters) -> (u64, u64) {
        (
            now.read.saturating_sub(self.read),
            now.written.saturating_sub(self.written),
        )
    }
}

impl Device {
    /// The device under `dir`, when it is a block device with counters (not tmpfs or overlay).
    pub(crate) fn of(dir: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(dir).ok()?.dev();
        // glibc's encoding of dev_t (gnu_dev_major / gnu_dev_minor).
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let stat = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/stat"));
        let device = Self { stat };
        device.counters().map(|_| device)
    }

    /// The device's name (`vda`, `nvme0n1p2`).
    pub(crate) fn name(&self) -> String {
        std::fs::canonicalize(self.stat.parent().unwrap_or(&self.stat))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| self.stat.display().to_string())
    }

    /// The counters now: fields 3 and 7 of the stat file are sectors of 512 bytes read and
    /// written (Documentation/block/stat.rst).
    pub(crate) fn counters(&self) -> Option<Counters> {
        let text = std::fs::read_to_string(&self.stat).ok()?;
        let fields: Vec<u64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some(Counters {
            read: *fields.get(2)? * 512,
            written: *fields.get(6)? * 512,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fio 3.33's report, trimmed to what is read.
    const REPORT: &str = r#"{
      "fio version" : "fio-3.33",
      "jobs" : [
        {
          "jobname" : "kv",
          "error" : 0,
          "job options" : { "name" : "kv", "ioengine" : "io_uring", "direct" : "1", "rw" : "read" },
          "read" : { "io_bytes" : 1073741824, "bw_bytes" : 1604995252, "iops" : 6122.6 },
          "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0 }
        }
      ]
    }"#;

    #[test]
    fn bandwidth_comes_from_the_json_report() {
        let report: Value = serde_json::from_str(REPORT).unwrap();
        let read = gbps(&report, "read", 1 << 30).unwrap();
        assert!((read - 1.604995252).abs() < 1e-9);
        assert!(
            gbps(&report, "read", 1 << 20).is_err(),
            "short pass refused"
        );
        assert!(
            gbps(&report, "write", 1 << 30).is_err(),
            "wrong direction refused"
        );
    }

    #[test]
    fn failed_or_buffered_jobs_are_refused() {
        let failed = REPORT.replace("\"error\" : 0", "\"error\" : 5");
        let buffered = REPORT.replace("\"direct\" : \"1\"", "\"direct\" : \"0\"");
        for text in [failed, buffered] {
            let report: Value = serde_json::from_str(&text).unwrap();
            assert!(gbps(&report, "read", 1 << 30).is_err());
        }
    }

    #[test]
    fn best_depth_per_direction() {
        let depth = |depth, write, read| Depth {
            depth,
            write,
            read,
            device_write: 1.0,
            device_read: 1.0,
        };
        let sweep = Sweep {
            depths: vec![
                depth(32, 2.0, 0.5),
                depth(128, 2.5, 0.8),
                depth(256, 2.4, 0.9),
            ],
        };
        assert_eq!(sweep.best_write().depth, 128);
        assert_eq!(sweep.best_read().depth, 256);
    }
}
