//! Runs the unit and integration tests of the crates that contain `unsafe` under valgrind's
//! memcheck (miri and the sanitizers need a nightly toolchain; valgrind works on stable builds).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::system::cargo_bin;

/// The crates with `unsafe` whose tests need no NIXL runtime to mean something under memcheck.
const PACKAGES: &[&str] = &["pinned-alloc", "nixl-file"];

/// The test executables cargo builds for `package`, from its JSON messages.
fn test_binaries(root: &Path, package: &str) -> Result<Vec<PathBuf>> {
    let output = Command::new(cargo_bin())
        .args([
            "test",
            "--no-run",
            "--message-format=json",
            "--package",
            package,
        ])
        .current_dir(root)
        .output()
        .context("building the tests")?;
    if !output.status.success() {
        bail!("building the tests of {package} failed");
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("\"test\":true"))
        .filter_map(|line| {
            let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + line[start..].find('"')?;
            Some(PathBuf::from(&line[start..end]))
        })
        .collect())
}

pub(crate) fn run(root: &Path) -> Result<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        bail!("valgrind is not installed (apt-get install valgrind)");
    }
    for package in PACKAGES {
        for binary in test_binaries(root, package)? {
            println!("memcheck: {}", binary.display());
            run_valgrind(&binary)?;
        }
    }
    println!("memcheck: no invalid access, no use of uninitialised memory, no definite leak");
    Ok(())
}

fn run_valgrind(binary: &Path) -> Result<()> {
    crate::system::run(
        Command::new("valgrind")
            .args([
                "--quiet",
                "--error-exitcode=99",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--show-possibly-lost=no",
            ])
            .arg(binary)
            .arg("--test-threads=1"),
    )
}
