//! The conformance kit (feature `test-utils`): checks any [`L2Adapter`] can run against itself.
//! Each function panics with a message naming the broken rule.
//!
//! The adapter must store chunks of the pool's page size and start empty.

use std::sync::Arc;

use pinned_alloc::{Page, PagePool};

use crate::adapter::L2Adapter;
use crate::keys::{ChunkKey, ObjectKey};

/// The key of chunk `i` of the kit's model, in salt `salt`.
pub fn key(i: u32, salt: Option<&str>) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: "conformance/model".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: i.to_be_bytes().to_vec(),
        cache_salt: salt.map(str::to_owned),
    })
}

/// Content of chunk `i`: every byte depends on `i` and its position.
pub fn fill(i: u32, page: &mut Page) {
    let seed = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (n, byte) in page.as_mut_slice().iter_mut().enumerate() {
        *byte = (seed.wrapping_mul(n as u64 + 1) >> 29) as u8;
    }
}

fn filled(pool: &Arc<PagePool>, indices: &[u32]) -> Vec<Page> {
    indices
        .iter()
        .map(|&i| {
            let mut page = pool.allocate().expect("a free page for the kit");
            fill(i, &mut page);
            page
        })
        .collect()
}

/// Stores chunks `indices`, asserting every key ends up stored.
pub fn store(adapter: &dyn L2Adapter, pool: &Arc<PagePool>, indices: &[u32]) {
    let keys: Vec<ChunkKey> = indices.iter().map(|&i| key(i, None)).collect();
    let pages = filled(pool, indices);
    let refs: Vec<&Page> = pages.iter().collect();
    let report = adapter.store(&keys, &refs);
    assert!(
        report.is_successful(),
        "store of {indices:?} failed: {report:?}"
    );
}

/// Loads chunks `indices`; per key, whether it loaded with exactly the stored bytes.
pub fn load(adapter: &dyn L2Adapter, pool: &Arc<PagePool>, indices: &[u32]) -> Vec<bool> {
    let keys: Vec<ChunkKey> = indices.iter().map(|&i| key(i, None)).collect();
    let mut pages: Vec<Page> = indices
        .iter()
        .map(|_| pool.allocate().expect("a free page for the kit"))
        .collect();
    let mut refs: Vec<&mut Page> = pages.iter_mut().collect();
    let loaded = adapter.load(&keys, &mut refs);
    let mut expected = pool.allocate().expect("a free page for the kit");
    loaded
        .into_iter()
        .zip(indices)
        .zip(&pages)
        .map(|((ok, &i), page)| {
            if ok {
                fill(i, &mut expected);
                assert_eq!(
                    page.len(),
                    expected.len(),
                    "chunk {i} loaded with the wrong length"
                );
                assert!(
                    page.as_slice() == expected.as_slice(),
                    "chunk {i} loaded wrong bytes"
                );
            }
            ok
        })
        .collect()
}

/// Store, lookup, load round trip; absent keys miss.
pub fn round_trip(adapter: &dyn L2Adapter, pool: &Arc<PagePool>) {
    store(adapter, pool, &[1, 2, 3]);
    let keys = [key(1, None), key(9, None), key(3, None)];
    assert_eq!(
        adapter.lookup_and_pin(&keys),
        vec![true, false, true],
        "lookup"
    );
    adapter.unlock(&keys);
    assert_eq!(
        load(adapter, pool, &[3, 1, 2]),
        vec![true, true, true],
        "load"
    );
    let again = adapter.store(&[key(1, None)], &[&filled(pool, &[1])[0]]);
    assert!(
        again.is_successful() && again.bytes() == 0,
        "a stored key is not written twice"
    );
}

/// `batched_contains` counts leading hits only.
pub fn prefix_contains(adapter: &dyn L2Adapter, pool: &Arc<PagePool>) {
    store(adapter, pool, &[10, 11, 13]);
    let keys: Vec<ChunkKey> = [10, 11, 12, 13].iter().map(|&i| key(i, None)).collect();
    assert_eq!(adapter.batched_contains(&keys), 2, "prefix semantics");
    assert_eq!(adapter.batched_contains(&keys[2..]), 0);
    assert_eq!(adapter.batched_contains(&[]), 0);
}

/// Delete skips pinned keys; unlock makes them deletable; usage follows exactly.
pub fn pinned_keys_survive_delete(adapter: &dyn L2Adapter, pool: &Arc<PagePool>) {
    store(adapter, pool, &[20, 21]);
    let used = adapter.usage().used_bytes;
    let (a, b) = (key(20, None), key(21, None));
    assert_eq!(adapter.lookup_and_pin(std::slice::from_ref(&a)), vec![true]);
    assert_eq!(
        adapter.delete(&[a.clone(), b.clone()]),
        1,
        "the pinned key stays"
    );
    assert_eq!(
        adapter.lookup_and_pin(std::slice::from_ref(&b)),
        vec![false]
    );
    let per_chunk = pool.page_bytes() as u64;
    assert_eq!(
        adapter.usage().used_bytes,
        used - per_chunk,
        "usage is exact"
    );
    adapter.unlock(std::slice::from_ref(&a));
    adapter.unlock(std::slice::from_ref(&a));
    assert_eq!(adapter.delete(std::slice::from_ref(&a)), 1);
    assert_eq!(load(adapter, pool, &[20]), vec![false], "deleted keys miss");
}

/// An LRU pass evicts the oldest unpinned keys and reports pinned ones as skipped.
pub fn lru_eviction(adapter: &dyn L2Adapter, pool: &Arc<PagePool>) {
    store(adapter, pool, &[30, 31, 32, 33]);
    let oldest = key(30, None);
    assert_eq!(
        adapter.lookup_and_pin(std::slice::from_ref(&oldest)),
        vec![true]
    );
    adapter.lookup_and_pin(&[key(31, None)]);
    adapter.unlock(&[key(31, None)]);
    let report = adapter.evict(0.5, None);
    assert!(report.evicted >= 1, "an LRU pass evicts: {report:?}");
    assert_eq!(
        adapter.lookup_and_pin(std::slice::from_ref(&oldest)),
        vec![true],
        "pinned survives"
    );
    adapter.unlock(&[oldest.clone(), oldest]);
    assert!(adapter.usage().used_bytes > 0);
}

/// Runs every check, each on its own keys.
pub fn run_all(adapter: &dyn L2Adapter, pool: &Arc<PagePool>) {
    round_trip(adapter, pool);
    prefix_contains(adapter, pool);
    pinned_keys_survive_delete(adapter, pool);
    lru_eviction(adapter, pool);
    assert!(adapter.status().is_healthy);
}
