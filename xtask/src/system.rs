//! Running commands and installing system packages.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cargo ARGS` in the workspace root, failing on a non-zero exit.
pub(crate) fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(Command::new(cargo_bin()).args(args).current_dir(root))
}

pub(crate) fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Runs a command with inherited output, failing with the command line on a non-zero exit.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn libclang_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        let mut llvm: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("llvm-"))
            })
            .map(|p| p.join("lib"))
            .collect();
        llvm.sort();
        dirs.extend(llvm);
    }
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/local/lib",
        ]
        .map(PathBuf::from),
    );
    dirs
}

/// `libclang.so`, `libclang.so.N` or `libclang-N.so`, as bindgen's clang-sys looks for; not
/// `libclang-cpp`, which is another library.
fn is_libclang(name: &str) -> bool {
    name == "libclang.so"
        || name.starts_with("libclang.so.")
        || (name.starts_with("libclang-")
            && !name.starts_with("libclang-cpp")
            && name.contains(".so"))
}

fn find_libclang() -> Option<PathBuf> {
    libclang_dirs().into_iter().find_map(|dir| {
        std::fs::read_dir(&dir).ok()?.flatten().find_map(|entry| {
            is_libclang(&entry.file_name().to_string_lossy()).then(|| entry.path())
        })
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Whether this process may install Debian packages (root, apt-get present).
fn can_apt_install() -> bool {
    Path::new("/usr/bin/apt-get").exists() && is_root()
}

/// Installs a Debian package with apt-get, when this process may.
fn apt_install(package: &str) -> Result<()> {
    if !can_apt_install() {
        bail!("cannot install {package}: apt-get as root is not available here");
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// fio is the raw baseline of `cargo xtask bench`; without it the bench falls back to plain
/// pwrite/pread, so failing to install it is a warning, not an error.
pub(crate) fn ensure_fio() {
    let installed = || {
        Command::new("fio")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if installed() {
        return;
    }
    println!("fio not found: installing it with apt-get (the benchmark baseline)");
    if let Err(err) = apt_install("fio") {
        println!("warning: {err:#}; cargo xtask bench will compare against pwrite/pread instead");
    }
}

/// bindgen (in nixl-sys's build) needs libclang: install Debian's libclang-dev when missing.
/// strace, which the durability test runs the store under to see its syncs and renames.
pub(crate) fn ensure_strace() -> Result<()> {
    if Path::new("/usr/bin/strace").exists() {
        return Ok(());
    }
    if !can_apt_install() {
        bail!(
            "strace not found (the durability test traces the store's syncs): install it, for example `sudo apt-get install strace`"
        );
    }
    println!("strace not found: installing it with apt-get");
    apt_install("strace")
}

pub(crate) fn ensure_libclang() -> Result<()> {
    if let Some(lib) = find_libclang() {
        println!("libclang: {}", lib.display());
        return Ok(());
    }
    if !can_apt_install() {
        bail!(
            "libclang not found (needed by bindgen to build nixl-sys): install it, for example \
             `sudo apt-get install libclang-dev`, or set LIBCLANG_PATH to the folder holding libclang.so"
        );
    }
    println!("libclang not found: installing libclang-dev with apt-get");
    apt_install("libclang-dev")?;
    match find_libclang() {
        Some(lib) => {
            println!("libclang: {}", lib.display());
            Ok(())
        }
        None => bail!(
            "libclang-dev installed but no libclang.so found in {:?}",
            libclang_dirs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::is_libclang;

    #[test]
    fn recognises_libclang_names_but_not_libclang_cpp() {
        assert!(is_libclang("libclang.so"));
        assert!(is_libclang("libclang.so.14"));
        assert!(is_libclang("libclang-14.so.1"));
        assert!(!is_libclang("libclang-cpp.so.14"));
        assert!(!is_libclang("libclangBasic.a"));
    }
}
