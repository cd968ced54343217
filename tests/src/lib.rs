//! Shared helpers of the integration tests.
#![forbid(unsafe_code)]

use std::sync::Arc;

use nixl_core::{NixlConfig, NixlTransport, Transport};
use nixl_file::{UringConfig, UringTransport};

/// The test servers, shared with the benchmark.
pub use kv_test_services as services;

pub mod file_suite;
pub mod suite;

/// Deterministic, chunk-specific content: every byte depends on the chunk index and its position,
/// so a chunk read from the wrong place or a stale page never compares equal.
pub fn fill_chunk(chunk: usize, buf: &mut [u8]) {
    let mut state = (chunk as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for word in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

/// NIXL's POSIX plugin; a missing runtime fails with the message naming `cargo xtask setup`.
pub fn nixl_posix() -> Arc<dyn Transport> {
    Arc::new(NixlTransport::new(NixlConfig::new("POSIX")).unwrap_or_else(|err| panic!("{err}")))
}

/// The native io_uring engine.
pub fn uring() -> Arc<dyn Transport> {
    Arc::new(UringTransport::new(UringConfig::default()).unwrap_or_else(|err| panic!("{err}")))
}

/// NIXL with any plugin (GDS, GDS_MT, HF3FS: the hardware-gated suites).
pub fn nixl_plugin(plugin: &str) -> Arc<dyn Transport> {
    Arc::new(NixlTransport::new(NixlConfig::new(plugin)).unwrap_or_else(|err| panic!("{err}")))
}

/// A small xorshift generator: the same seed gives the same run, so a failure can be replayed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
