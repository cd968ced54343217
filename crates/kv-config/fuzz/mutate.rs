//! A small mutational fuzzer over kv-config's text entry points (YAML engine configuration,
//! `--l2-adapter` JSON, SGLang environment). It runs on the stable toolchain, which cargo-fuzz
//! does not: inputs are seeds from `corpus/` mutated by byte flips, token insertions, deletions,
//! duplications and splices, and every input goes through parsing and validation. A panic
//! anywhere is a bug.

use std::panic::{AssertUnwindSafe, catch_unwind};

use kv_config::{AdapterRegistry, ConfigLoader, Deployment, HiCacheConfig};

const TOKENS: &[&str] = &[
    "\n",
    ": ",
    "- ",
    "  ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    ",",
    "~",
    "null",
    "true",
    "false",
    "-1",
    "0",
    "1e309",
    "18446744073709551616",
    "nan",
    "&a ",
    "*a",
    "!!binary ",
    "? ",
    "#",
    "extra_config",
    "nixl_backend",
    "nixl_pool_size",
    "nixl_path",
    "nixl_buffer_device",
    "nixl_buffer_size",
    "cuda:",
    "cpu",
    "OBJ",
    "POSIX",
    "GDS",
    "DOCA_MEMOS",
    "nixl_endpoint_list",
    "http://",
    "max_local_cpu_size",
    "\"type\"",
    "nixl_store",
    "nixl_store_dynamic",
    "backend_params",
    "eviction",
    "max_capacity_gb",
    "\u{0}",
    "\u{feff}",
    "é",
];

/// xorshift64*: deterministic for a seed, no dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

pub(crate) fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                data.splice(at..at, token.iter().copied());
            }
            2 if !data.is_empty() => {
                let end = (at + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            3 if !data.is_empty() => {
                let start = rng.below(data.len());
                let end = (start + rng.below(64)).min(data.len());
                let piece = data[start..end].to_vec();
                data.splice(at..at, piece);
            }
            4 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len());
                let at = at.min(data.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                let i = rng.below(data.len().max(1));
                if i < data.len() {
                    data[i] = rng.next() as u8;
                }
            }
        }
    }
    data
}

/// Runs one input through every entry point; returns false if anything panicked.
pub(crate) fn exercise(input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input).into_owned();
    catch_unwind(AssertUnwindSafe(|| {
        if let Ok(loaded) = ConfigLoader::new()
            .with_yaml("fuzz.yaml", text.clone())
            .load()
        {
            for deployment in [
                Deployment::new(),
                Deployment::new()
                    .with_worker(7, 3)
                    .with_chunk_bytes(3 << 20),
                Deployment::new()
                    .with_chunk_bytes(1)
                    .with_scheduler_role(true),
            ] {
                let _ = loaded.value.storage_spec(&deployment);
            }
        }
        let _ = ConfigLoader::new()
            .with_env([
                ("LMCACHE_EXTRA_CONFIG", text.as_str()),
                ("LMCACHE_NIXL_BACKENDS", text.as_str()),
            ])
            .load()
            .map(|l| l.value.storage_spec(&Deployment::new()));
        if let Ok(specs) = AdapterRegistry::new().parse(&[text.as_str()]) {
            for spec in specs.value {
                if let Some(storage) = spec.storage {
                    let _ = storage.check_page_size(4096);
                }
            }
        }
        let _ = HiCacheConfig::from_env([
            ("SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR", text.clone()),
            ("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN", text.clone()),
        ]);
    }))
    .is_ok()
}

pub(crate) fn load_corpus(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|p| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}
