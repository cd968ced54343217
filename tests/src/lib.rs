//! Shared helpers of the integration tests.
#![forbid(unsafe_code)]

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
