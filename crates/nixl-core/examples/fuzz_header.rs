//! Fuzzes the on-disk chunk header parser for a while, on stable Rust: valid headers with
//! mutations (bit flips, truncation, length-field edits, random splices) and random bytes.
//!
//! `cargo run --release -p nixl-core --example fuzz_header -- [SECONDS] [SEED]`
//! (`cargo xtask fuzz` runs it). Exits 1 on a panic, or if a mutated header is accepted for a
//! key or payload other than the one it was written for.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use nixl_core::header::{self, HEADER_BYTES};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_1234);
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    let mut accepted_mutants = 0u64;
    while Instant::now() < deadline {
        runs += 1;
        let key: Vec<u8> = (0..1 + rng.below(200)).map(|_| rng.next() as u8).collect();
        let payload: Vec<u8> = (0..rng.below(5000)).map(|_| rng.next() as u8).collect();
        let mut bytes = vec![0u8; HEADER_BYTES];
        header::write(&mut bytes, &key, &payload).expect("keys of at most 200 bytes fit a header");
        let original = bytes.clone();
        let mutated = match rng.below(5) {
            0 => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
                true
            }
            1 => {
                bytes.truncate(rng.below(HEADER_BYTES));
                true
            }
            2 => {
                let at = 8 + 4 * rng.below(3);
                bytes[at] = rng.next() as u8;
                true
            }
            3 => {
                bytes = (0..rng.below(2 * HEADER_BYTES))
                    .map(|_| rng.next() as u8)
                    .collect();
                true
            }
            _ => false,
        } && bytes != original;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let _ = header::parse(&bytes);
            header::verify(&bytes, &key, &payload).is_ok()
        }));
        match outcome {
            Err(_) => {
                eprintln!("panic on input {runs} (seed {seed}): {bytes:?}");
                std::process::exit(1);
            }
            Ok(true) if mutated => accepted_mutants += 1,
            Ok(false) if !mutated => {
                eprintln!("an intact header was refused (input {runs}, seed {seed})");
                std::process::exit(1);
            }
            Ok(_) => {}
        }
    }
    if accepted_mutants > 0 {
        eprintln!(
            "{accepted_mutants} changed headers were accepted for their original key and payload"
        );
        std::process::exit(1);
    }
    println!(
        "fuzz_header: {runs} inputs in {seconds} s (seed {seed}), no panic, every changed header refused"
    );
}
