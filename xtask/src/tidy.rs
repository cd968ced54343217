//! Workspace rules checked as tests, as rust-analyzer's tidy does, and the dependency rule
//! `cargo xtask ci` checks with `cargo tree`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::system::cargo_bin;

/// Packages whose default features must build on a machine that has only Rust.
const NIXL_FREE_PACKAGES: &[&str] = &["kvl2", "nixl-file", "kv-l2-adapter", "kv-config"];

/// What needs libclang, a C++ compiler or the NIXL runtime to build.
const NIXL_BUILD_DEPENDENCIES: &[&str] = &["nixl-sys", "bindgen", "cc"];

/// The default feature set of [`NIXL_FREE_PACKAGES`] pulls none of
/// [`NIXL_BUILD_DEPENDENCIES`] (normal and build dependencies, as `cargo tree` resolves them).
pub(crate) fn default_features_need_no_nixl(root: &Path) -> Result<()> {
    let mut command = Command::new(cargo_bin());
    command
        .current_dir(root)
        .args(["tree", "--locked", "-e", "normal,build", "--prefix", "none"])
        .args(["--format", "{p}"]);
    for package in NIXL_FREE_PACKAGES {
        command.args(["--package", package]);
    }
    let output = command.output().context("running cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&output.stdout);
    let pulled = banned_in(&tree);
    if !pulled.is_empty() {
        bail!(
            "the default features of {} pull {}: NIXL must stay behind the `nixl` feature",
            NIXL_FREE_PACKAGES.join(", "),
            pulled.join(", ")
        );
    }
    println!(
        "tidy: the default features of {} pull none of {}",
        NIXL_FREE_PACKAGES.join(", "),
        NIXL_BUILD_DEPENDENCIES.join(", ")
    );
    Ok(())
}

/// The packages of [`NIXL_BUILD_DEPENDENCIES`] named in `cargo tree --format {p}` output.
fn banned_in(tree: &str) -> Vec<&'static str> {
    NIXL_BUILD_DEPENDENCIES
        .iter()
        .copied()
        .filter(|banned| {
            tree.lines()
                .any(|line| line.split_whitespace().next() == Some(*banned))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::banned_in;
    use crate::workspace_root;

    #[test]
    fn the_nixl_rule_reads_cargo_tree_output() {
        let tree = "kvl2 v0.1.0 (/w/crates/kvl2)\nnixl-sys v1.5.2\nbindgen v0.71.1\nccc v1.0\n";
        assert_eq!(banned_in(tree), vec!["nixl-sys", "bindgen"]);
        assert!(banned_in("kvl2 v0.1.0\nlibc v0.2.1\n").is_empty());
    }

    /// Crates allowed to contain `unsafe`: everything else must forbid it.
    const UNSAFE_CRATES: &[&str] = &["pinned-alloc", "nixl-core", "nixl-file"];

    fn crate_dirs(root: &Path) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("Cargo.toml").is_file())
            .collect();
        dirs.sort();
        dirs
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn every_package_inherits_workspace_lints_and_metadata() {
        let root = workspace_root();
        let mut manifests: Vec<PathBuf> = crate_dirs(&root)
            .into_iter()
            .map(|d| d.join("Cargo.toml"))
            .collect();
        manifests.push(root.join("xtask/Cargo.toml"));
        manifests.push(root.join("tests/Cargo.toml"));
        manifests.push(root.join("bench/Cargo.toml"));
        manifests.push(root.join("test-services/Cargo.toml"));
        for manifest in manifests {
            let text = read(&manifest);
            assert!(
                text.contains("[lints]\nworkspace = true"),
                "{} must inherit [workspace.lints]",
                manifest.display()
            );
            assert!(
                text.contains("edition.workspace = true"),
                "{} must inherit the workspace edition",
                manifest.display()
            );
        }
    }

    #[test]
    fn test_and_tool_packages_are_not_published() {
        let root = workspace_root();
        for manifest in [
            root.join("xtask/Cargo.toml"),
            root.join("tests/Cargo.toml"),
            root.join("bench/Cargo.toml"),
            root.join("test-services/Cargo.toml"),
        ] {
            assert!(
                read(&manifest).contains("publish = false"),
                "{} must set publish = false",
                manifest.display()
            );
        }
    }

    #[test]
    fn internal_dependencies_have_path_and_version() {
        let root = workspace_root();
        let workspace = read(&root.join("Cargo.toml"));
        for dir in crate_dirs(&root) {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let line = workspace
                .lines()
                .find(|l| l.starts_with(&format!("{name} = ")))
                .unwrap_or_else(|| panic!("{name} is missing from [workspace.dependencies]"));
            assert!(
                line.contains("path = ") && line.contains("version = "),
                "{name} needs both path and version in [workspace.dependencies]: {line}"
            );
        }
    }

    #[test]
    fn only_the_three_low_level_crates_may_use_unsafe() {
        let root = workspace_root();
        let mut roots: Vec<PathBuf> = crate_dirs(&root)
            .into_iter()
            .filter(|d| {
                let name = d.file_name().unwrap().to_string_lossy().into_owned();
                !UNSAFE_CRATES.contains(&name.as_str())
            })
            .flat_map(|d| [d.join("src/lib.rs"), d.join("src/main.rs")])
            .filter(|p| p.is_file())
            .collect();
        roots.push(root.join("tests/src/lib.rs"));
        roots.push(root.join("test-services/src/lib.rs"));
        roots.push(root.join("bench/src/main.rs"));
        for path in roots {
            assert!(
                read(&path).contains("#![forbid(unsafe_code)]"),
                "{} must declare #![forbid(unsafe_code)]",
                path.display()
            );
        }
    }

    #[test]
    fn kv_config_depends_on_nothing_internal_or_hardware_related() {
        let root = workspace_root();
        let manifest = read(&root.join("crates/kv-config/Cargo.toml"));
        for banned in [
            "pinned-alloc",
            "nixl-core",
            "nixl-file",
            "nixl-obj",
            "nixl-sys",
            "cudarc",
            "io-uring",
        ] {
            assert!(
                !manifest.contains(banned),
                "kv-config must not depend on {banned}"
            );
        }
    }
}
