//! The first end-to-end proof: real NIXL, POSIX plugin, one batched request of 64 chunks to
//! scattered offsets of one file, read back and compared byte for byte.

use std::sync::Arc;

use kv_integration_tests::fill_chunk;
use nixl_core::{NixlConfig, NixlTransport, PageView, StorageExtent, Transport, TransportExt};
use nixl_file::{FileOptions, open_storage_file};
use pinned_alloc::{MemoryRegion, PAGE_ALIGN, PoolConfig};

const CHUNKS: usize = 64;
const CHUNK_BYTES: usize = 256 << 10;
/// Slots in the file; chunks go to a scattered subset of them.
const FILE_SLOTS: u64 = 4 * CHUNKS as u64;

fn transport() -> NixlTransport {
    // Display, not Debug: a missing runtime must read "run `cargo xtask setup`".
    let available = NixlTransport::available_plugins().unwrap_or_else(|err| panic!("{err}"));
    assert!(
        available.iter().any(|p| p == "POSIX"),
        "POSIX plugin missing from {available:?}"
    );
    NixlTransport::new(NixlConfig::new("POSIX")).unwrap_or_else(|err| panic!("{err}"))
}

/// A permutation of slots: chunk i goes to slot (i * 37 + 11) mod FILE_SLOTS, never in order.
fn scattered_slot(chunk: usize) -> u64 {
    (chunk as u64 * 37 + 11) % FILE_SLOTS
}

fn round_trip(direct_io: bool) {
    let transport = transport();
    let pool = PoolConfig::new(CHUNK_BYTES, (2 * CHUNKS * CHUNK_BYTES) as u64)
        .build()
        .unwrap();
    let _memory = transport
        .register_memory(Arc::clone(&pool) as Arc<dyn MemoryRegion>)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let options = FileOptions::new()
        .with_direct_io(direct_io)
        .with_preallocate(FILE_SLOTS * CHUNK_BYTES as u64);
    let file = Arc::new(open_storage_file(&dir.path().join("chunks.bin"), options).unwrap());
    let storage = transport.register_file(Arc::clone(&file)).unwrap();

    let mut sources = pool.allocate_batch(CHUNKS).unwrap();
    for (i, page) in sources.iter_mut().enumerate() {
        assert_eq!(page.as_slice().as_ptr() as usize % PAGE_ALIGN, 0);
        fill_chunk(i, page.as_mut_slice());
    }
    let writes: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, page)| {
            let offset = scattered_slot(i) * CHUNK_BYTES as u64;
            (page, StorageExtent::new(storage.dev_id(), offset))
        })
        .collect();
    transport.write_pages(&writes, PageView::Exact).unwrap();

    let mut targets = pool.allocate_batch(CHUNKS).unwrap();
    for page in &mut targets {
        page.as_mut_slice().fill(0xAA);
    }
    let mut reads: Vec<_> = targets
        .iter_mut()
        .enumerate()
        .map(|(i, page)| {
            let offset = scattered_slot(i) * CHUNK_BYTES as u64;
            (page, StorageExtent::new(storage.dev_id(), offset))
        })
        .collect();
    transport.read_pages(&mut reads, PageView::Exact).unwrap();
    drop(reads);

    for (i, (source, target)) in sources.iter().zip(&targets).enumerate() {
        assert!(
            source.as_slice() == target.as_slice(),
            "chunk {i} differs after the round trip (direct_io: {direct_io})"
        );
    }
}

#[test]
fn posix_batched_round_trip_of_64_chunks() {
    round_trip(false);
}

#[test]
fn posix_batched_round_trip_of_64_chunks_with_o_direct() {
    round_trip(true);
}
