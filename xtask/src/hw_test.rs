//! `cargo xtask hw-test`: detects the hardware the gated suites need, runs those it can with
//! `--ignored --test-threads=1`, and prints every suite as ran or skipped, with the reason.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::system::cargo_bin;

struct Suite {
    name: &'static str,
    /// `cargo test` arguments selecting it.
    args: &'static [&'static str],
    /// What it needs, checked in order; the first missing one is the reason to skip.
    needs: &'static [Need],
}

#[derive(Clone, Copy)]
enum Need {
    NvidiaDriver,
    CuFile,
    NvidiaFs,
    Plugin(&'static str),
    Hf3fsMount,
}

impl Need {
    fn check(self, root: &Path) -> Result<(), String> {
        let lib = |names: &[&str]| {
            let cache = Command::new("ldconfig")
                .arg("-p")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            names.iter().any(|n| cache.contains(n))
        };
        match self {
            Need::NvidiaDriver => (Path::new("/dev/nvidiactl").exists() && lib(&["libcuda.so"]))
                .then_some(())
                .ok_or_else(|| "no NVIDIA driver (/dev/nvidiactl and libcuda.so)".to_owned()),
            Need::CuFile => lib(&["libcufile.so"]).then_some(()).ok_or_else(|| {
                "no cuFile library (libcufile.so, from the CUDA toolkit's GDS)".to_owned()
            }),
            Need::NvidiaFs => Path::new("/proc/driver/nvidia-fs")
                .exists()
                .then_some(())
                .ok_or_else(|| {
                    "nvidia-fs kernel module not loaded (GDS runs in compat mode only)".to_owned()
                }),
            Need::Plugin(name) => root
                .join(format!(
                    "target/nixl-runtime/.nixl_cu12.mesonpy.libs/plugins/libplugin_{name}.so"
                ))
                .exists()
                .then_some(())
                .ok_or_else(|| {
                    format!("NIXL has no {name} plugin here (the nixl-cu12 wheel ships none)")
                }),
            Need::Hf3fsMount => std::env::var_os("KV_TEST_HF3FS_DIR")
                .filter(|d| Path::new(d).is_dir())
                .map(drop)
                .ok_or_else(|| {
                    "no 3FS mount (set KV_TEST_HF3FS_DIR to a folder on one)".to_owned()
                }),
        }
    }
}

const SUITES: &[Suite] = &[
    Suite {
        name: "CUDA pinned pool + device buffers",
        args: &[
            "--package",
            "pinned-alloc",
            "--features",
            "cuda",
            "--lib",
            "cuda",
        ],
        needs: &[Need::NvidiaDriver],
    },
    Suite {
        name: "GPU mode (VRAM, host, files)",
        args: &[
            "--package",
            "kv-integration-tests",
            "--test",
            "hardware",
            "gpu_",
        ],
        needs: &[Need::NvidiaDriver],
    },
    Suite {
        name: "VRAM to file through GDS_MT",
        args: &[
            "--package",
            "kv-integration-tests",
            "--test",
            "hardware",
            "vram_file",
        ],
        needs: &[Need::NvidiaDriver, Need::CuFile, Need::Plugin("GDS_MT")],
    },
    Suite {
        name: "GDS_MT file backends",
        args: &[
            "--package",
            "kv-integration-tests",
            "--test",
            "hardware",
            "gds_mt",
        ],
        needs: &[Need::NvidiaDriver, Need::CuFile, Need::Plugin("GDS_MT")],
    },
    Suite {
        name: "GDS file backends",
        args: &[
            "--package",
            "kv-integration-tests",
            "--test",
            "hardware",
            "gds_dynamic",
        ],
        needs: &[
            Need::NvidiaDriver,
            Need::CuFile,
            Need::NvidiaFs,
            Need::Plugin("GDS"),
        ],
    },
    Suite {
        name: "HF3FS file backends",
        args: &[
            "--package",
            "kv-integration-tests",
            "--test",
            "hardware",
            "hf3fs",
        ],
        needs: &[Need::Hf3fsMount, Need::Plugin("HF3FS")],
    },
];

pub(crate) fn run(root: &Path) -> Result<()> {
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for suite in SUITES {
        let missing = suite.needs.iter().find_map(|need| need.check(root).err());
        let verdict = match missing {
            Some(reason) => format!("skipped: {reason}"),
            None => {
                let status = Command::new(cargo_bin())
                    .arg("test")
                    .args(suite.args)
                    .args(["--", "--include-ignored", "--test-threads=1"])
                    .current_dir(root)
                    .status()?;
                if status.success() {
                    "ran: passed".to_owned()
                } else {
                    failed.push(suite.name);
                    format!("ran: FAILED ({status})")
                }
            }
        };
        rows.push((suite.name, verdict));
    }
    println!("\n| hardware suite | result |\n|---|---|");
    for (name, verdict) in &rows {
        println!("| {name} | {verdict} |");
    }
    if !failed.is_empty() {
        bail!("hardware suites failed: {}", failed.join(", "));
    }
    Ok(())
}
