//! Fuzzes kv-config's YAML, JSON and environment entry points for a while, on stable Rust.
//!
//! `cargo run --release -p kv-config --example fuzz_config -- [SECONDS] [SEED]`
//! (`cargo xtask fuzz` runs it for ten minutes). A panicking input is written to
//! `target/fuzz-crashes/` and the run exits with status 1.

#[path = "../fuzz/mutate.rs"]
mod mutate;

use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = mutate::load_corpus(&root.join("fuzz/corpus"));
    let mut rng = mutate::Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs: u64 = 0;
    while Instant::now() < deadline {
        let input = mutate::mutate(&mut rng, &corpus);
        runs += 1;
        if !mutate::exercise(&input) {
            let dir = root.join("../../target/fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{seed}-{runs}"));
            let _ = std::fs::write(&path, &input);
            eprintln!(
                "panic on input {runs} (seed {seed}); saved to {}",
                path.display()
            );
            std::process::exit(1);
        }
    }
    println!("fuzz_config: {runs} inputs in {seconds} s (seed {seed}), no panic");
}
