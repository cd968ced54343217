//! Runs the test suite and sums what every test binary reported.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::system::cargo_bin;

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub(crate) struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl std::fmt::Display for Counts {
    /// The plain closing line CI reads: `N passed, N failed, N skipped`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

impl Counts {
    /// Adds one libtest summary line: `test result: ok. 3 passed; 0 failed; 1 ignored; …`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = number.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// The packages that gate NIXL behind features, as `cargo` arguments: their default build is
/// what a machine with only Rust builds.
pub(crate) const NIXL_GATED: &[&str] = &[
    "--package",
    "kvl2",
    "--package",
    "kv-l2-adapter",
    "--package",
    "nixl-core",
];

/// The whole workspace (NIXL features included, as the integration tests ask for them), then
/// the NIXL-free default build of [`NIXL_GATED`] (the workspace build has NIXL through the
/// integration tests), then the feature-gated code that builds without its hardware
/// (pinned-alloc's `cuda`, whose tests check the typed "not available" errors).
fn suites() -> Vec<Vec<&'static str>> {
    vec![
        vec!["test", "--workspace", "--locked"],
        [&["test", "--locked"][..], NIXL_GATED].concat(),
        vec![
            "test",
            "--locked",
            "--package",
            "pinned-alloc",
            "--features",
            "cuda",
            "--lib",
        ],
    ]
}

/// Every suite, streaming its output, then one closing line with the totals.
pub(crate) fn run_suite(root: &Path, test_args: &[String]) -> Result<Counts> {
    let mut counts = Counts::default();
    let mut failures = Vec::new();
    for suite in suites() {
        if let Err(err) = run_one(root, &suite, test_args, &mut counts) {
            failures.push(err.to_string());
        }
    }
    println!("tests: {counts}");
    if !failures.is_empty() {
        bail!("test suites failed: {}", failures.join("; "));
    }
    if counts.passed == 0 {
        bail!("the test suite ran no test");
    }
    Ok(counts)
}

fn run_one(
    root: &Path,
    cargo_args: &[&str],
    test_args: &[String],
    counts: &mut Counts,
) -> Result<()> {
    let mut child = Command::new(cargo_bin())
        .args(cargo_args)
        .arg("--")
        .args(test_args)
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        counts.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed with {status}", cargo_args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn sums_libtest_summary_lines_and_ignores_others() {
        let mut counts = Counts::default();
        counts.add_line(
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.1s",
        );
        counts.add_line("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured");
        counts.add_line("running 4 tests");
        assert_eq!(
            counts,
            Counts {
                passed: 4,
                failed: 2,
                ignored: 1
            }
        );
    }
}
