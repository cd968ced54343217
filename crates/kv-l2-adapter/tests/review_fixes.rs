//! Fixes found by review, through the entry point a user calls (`StoreBuilder` from
//! `--l2-adapter` JSON, the native engine over POSIX files).

use std::path::Path;
use std::time::Duration;

use kv_l2_adapter::{ChunkKey, Engine, KeyOutcome, ObjectKey, Store, StoreBuilder};
use pinned_alloc::Page;

const CHUNK: usize = 64 << 10;

fn key(i: u32) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: "review/model".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: i.to_be_bytes().to_vec(),
        cache_salt: None,
    })
}

fn fill(i: u32, page: &mut Page) {
    for (n, byte) in page.as_mut_slice().iter_mut().enumerate() {
        *byte = (n as u32)
            .wrapping_mul(31)
            .wrapping_add(i.wrapping_mul(7919)) as u8;
    }
}

/// A dynamic POSIX store of per-key files in `dir` with room for `chunks` chunks, no eviction.
fn dynamic(dir: &Path, chunks: usize) -> Store {
    let gb = (chunks * CHUNK) as f64 / (1u64 << 30) as f64;
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{gb}","layout":"files"}}}}"#,
        dir.display()
    );
    StoreBuilder::from_l2_adapters([json])
        .with_chunk_bytes(CHUNK)
        .with_engine(Engine::Native)
        .build()
        .unwrap_or_else(|err| panic!("{err}"))
}

/// Reopening a folder holding more than the capacity, without eviction, indexes only the
/// newest chunks that fit: usage stays within capacity and stores go on once room is made.
#[test]
fn reopening_a_folder_over_capacity_without_eviction_stays_within_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = dynamic(dir.path(), 8);
        let adapter = store.adapter();
        let mut page = store.pool().allocate().unwrap();
        for i in 0..8 {
            fill(i, &mut page);
            let report = adapter.store(&[key(i)], &[&page]);
            assert!(report.is_successful(), "{report:?}");
            // Distinct modification times: the oldest-first order is the store order.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let store = dynamic(dir.path(), 4);
    let adapter = store.adapter();
    let usage = adapter.usage();
    assert_eq!(usage.capacity_bytes, 4 * CHUNK as u64);
    assert!(
        usage.used_bytes <= usage.capacity_bytes,
        "{} bytes used of {}",
        usage.used_bytes,
        usage.capacity_bytes
    );
    assert_eq!(usage.keys, 4, "{usage:?}");
    let newest: Vec<ChunkKey> = (4..8).map(key).collect();
    assert_eq!(
        adapter.batched_contains(&newest),
        4,
        "the newest are indexed"
    );
    assert_eq!(adapter.delete(&[key(7)]), 1);
    let mut page = store.pool().allocate().unwrap();
    fill(100, &mut page);
    let report = adapter.store(&[key(100)], &[&page]);
    assert!(
        matches!(report.keys[0], KeyOutcome::Stored { .. }),
        "room made is room: {report:?}"
    );
}
