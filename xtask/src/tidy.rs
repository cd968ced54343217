//! Workspace rules checked as tests, as rust-analyzer's tidy does.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::workspace_root;

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
