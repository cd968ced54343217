//! Fuzzes the parsers of what a dynamic store's folder holds, on stable Rust, for a while:
//! stored keys (`FileKey::from_canonical`) from random bytes and from valid keys with mutations
//! (multi-byte characters spliced into the hash, signs, separators, bit flips, cuts), and
//! `list_dir` over folders of files with such keys in well-formed headers, mangled headers and
//! mangled names (temporaries among them).
//!
//! `cargo run --release -p nixl-file --example fuzz_names -- [SECONDS] [SEED]`. Exits 1 on a
//! panic, when a changed key is accepted in a spelling other than its canonical one, or when
//! `list_dir` lists a file that is not its key's.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use nixl_core::header::{self, HEADER_BYTES, MAX_KEY_BYTES};
use nixl_file::{FileKey, list_dir};

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

    fn text(&mut self, max_parts: usize) -> String {
        const PARTS: [&str; 11] = [
            "a", "Z", "0", "f", "-", "_", ".", ".tmp.", "\u{e9}", "\u{20ac}", "\u{65e5}",
        ];
        (0..1 + self.below(max_parts))
            .map(|_| PARTS[self.below(PARTS.len())])
            .collect()
    }

    fn key(&mut self) -> FileKey {
        FileKey {
            model: format!("org/{}", self.text(12)),
            kv_rank: self.next() as u32 >> self.below(32),
            group_id: self.next() as u32 >> self.below(32),
            chunk_hash: (0..1 + self.below(32)).map(|_| self.next() as u8).collect(),
            cache_salt: (self.below(2) == 0).then(|| self.text(6)),
        }
    }

    fn mutate(&mut self, bytes: &mut Vec<u8>) {
        const SNIPPETS: [&[u8]; 9] = [
            "\u{20ac}a".as_bytes(),
            "a\u{20ac}".as_bytes(),
            "\u{e9}".as_bytes(),
            b"+",
            b"\0",
            b"FF",
            b"\xff\xfe",
            b".tmp.1.2",
            b".bin",
        ];
        let at = self.below(bytes.len() + 1);
        match self.below(4) {
            0 if !bytes.is_empty() => {
                let i = self.below(bytes.len());
                bytes[i] ^= 1 << self.below(8);
            }
            1 => bytes.truncate(at),
            2 if at < bytes.len() => {
                let end = (at + 1 + self.below(4)).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => {
                let snippet = SNIPPETS[self.below(SNIPPETS.len())];
                bytes.splice(at..at, snippet.iter().copied());
            }
        }
    }
}

fn fail(message: String) -> ! {
    eprintln!("{message}");
    std::process::exit(1);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_4321);
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let folder = tempfile::tempdir().unwrap_or_else(|e| fail(format!("temporary folder: {e}")));
    let (mut keys, mut files, mut listed) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..10_000 {
            keys += 1;
            let mut bytes = if rng.below(8) == 0 {
                (0..rng.below(80)).map(|_| rng.next() as u8).collect()
            } else {
                rng.key().canonical()
            };
            for _ in 0..rng.below(3) {
                rng.mutate(&mut bytes);
            }
            match catch_unwind(|| FileKey::from_canonical(&bytes)) {
                Err(_) => fail(format!(
                    "from_canonical panicked (seed {seed}): {:?}",
                    String::from_utf8_lossy(&bytes)
                )),
                Ok(Ok(key)) if key.canonical() != bytes => fail(format!(
                    "accepted a non-canonical spelling (seed {seed}): {:?}",
                    String::from_utf8_lossy(&bytes)
                )),
                Ok(_) => {}
            }
        }
        let round = folder.path().join(files.to_string());
        if let Err(err) = std::fs::create_dir(&round) {
            fail(format!("creating {}: {err}", round.display()));
        }
        for i in 0..100 {
            files += 1;
            let key = rng.key();
            let mut stored = key.canonical();
            if rng.below(2) == 0 {
                rng.mutate(&mut stored);
            }
            stored.truncate(MAX_KEY_BYTES);
            let payload = vec![0u8; rng.below(3 * 4096)];
            let mut bytes = vec![0u8; HEADER_BYTES];
            header::write(&mut bytes, &stored, &payload).expect("a key cut to MAX_KEY_BYTES fits");
            if rng.below(4) == 0 {
                rng.mutate(&mut bytes);
            }
            bytes.resize(HEADER_BYTES + payload.len().next_multiple_of(4096), 0);
            // Mangled names get a unique prefix; a key's own name may repeat (then replaced).
            let name = if rng.below(2) == 0 {
                let mut name = key.file_name().into_bytes();
                rng.mutate(&mut name);
                let name = String::from_utf8_lossy(&name).replace(['/', '\0'], "-");
                format!("{i}{name}")
            } else {
                key.file_name()
            };
            if let Err(err) = std::fs::write(round.join(&name), &bytes) {
                fail(format!("writing {name:?}: {err}"));
            }
        }
        match catch_unwind(AssertUnwindSafe(|| list_dir(&round))) {
            Err(_) => fail(format!(
                "list_dir panicked (seed {seed}) on {}",
                round.display()
            )),
            Ok(Err(err)) => fail(format!("list_dir failed: {err}")),
            Ok(Ok(chunks)) => {
                listed += chunks.len() as u64;
                if let Some(wrong) = chunks
                    .iter()
                    .find(|c| c.path.file_name() != Some(c.key.file_name().as_ref()))
                {
                    fail(format!("listed a file that is not its key's: {wrong:?}"));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&round);
    }
    println!(
        "fuzz_names: {keys} stored keys and {files} files ({listed} listed) in {seconds} s \
         (seed {seed}), no panic"
    );
}
