//! Shared helpers of the integration tests.
#![forbid(unsafe_code)]

use std::sync::Arc;

use nixl_core::{NixlConfig, NixlTransport, Transport};
use nixl_file::{UringConfig, UringTransport};

pub mod file_suite;
pub mod services;
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
