//! Static mode (`nixl_store`) honours the LMCache settings `save_unfull_chunk` and
//! `cache_policy`, built the way a user builds it: from an LMCache YAML, on the native engine
//! over POSIX files.

use std::path::Path;
use std::sync::Arc;

use kv_config::{ConfigLoader, Deployment};
use kv_l2_adapter::{
    AdapterContext, ChunkKey, Engine, Error, KeyOutcome, L2Adapter, ObjectKey, build_storage,
};
use pinned_alloc::{Page, PagePool, PoolConfig};

const CHUNK: usize = 4096;

fn memory() -> Arc<PagePool> {
    PoolConfig::new(CHUNK, 16 * CHUNK as u64)
        .build()
        .expect("a page pool")
}

/// The static store an LMCache YAML describes: `pool_size` slots in `dir`, with `top` added
/// to the top-level keys.
fn build(
    dir: &Path,
    pool_size: u32,
    top: &str,
    pool: &Arc<PagePool>,
) -> kv_l2_adapter::Result<Arc<dyn L2Adapter>> {
    let yaml = format!(
        "nixl_buffer_device: cpu\n{top}extra_config:\n  enable_nixl_storage: true\n  \
         nixl_backend: POSIX\n  nixl_pool_size: {pool_size}\n  nixl_path: {}\n",
        dir.display()
    );
    let engine = ConfigLoader::new()
        .with_yaml("lmcache.yaml", yaml)
        .load()
        .expect("the YAML loads")
        .value;
    let spec = engine.storage_spec(&Deployment::new())?.value;
    build_storage(
        &spec,
        &AdapterContext::new(Arc::clone(pool)).with_engine(Engine::Native),
    )
}

fn key(i: u32) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: "static/settings".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: i.to_be_bytes().to_vec(),
        cache_salt: None,
    })
}

/// A page of `len` bytes whose content depends on `i`.
fn page(pool: &Arc<PagePool>, i: u32, len: usize) -> Page {
    let mut page = pool.allocate().expect("a free page");
    page.set_len(len);
    for (n, byte) in page.as_mut_slice().iter_mut().enumerate() {
        *byte = (n as u32).wrapping_mul(31).wrapping_add(i) as u8;
    }
    page
}

fn store(adapter: &dyn L2Adapter, pool: &Arc<PagePool>, i: u32) {
    let report = adapter.store(&[key(i)], &[&page(pool, i, CHUNK)]);
    assert!(report.is_successful(), "store of {i}: {report:?}");
}

/// Loads key `i` into a full-length page; the page if it loaded.
fn load(adapter: &dyn L2Adapter, pool: &Arc<PagePool>, i: u32) -> Option<Page> {
    let mut target = pool.allocate().expect("a free page");
    adapter.load(&[key(i)], &mut [&mut target])[0].then_some(target)
}

#[test]
fn save_unfull_chunk_on_stores_a_partial_chunk_with_its_true_length() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let adapter = build(dir.path(), 4, "save_unfull_chunk: true\n", &pool).unwrap();
    let partial = page(&pool, 7, 1000);
    let report = adapter.store(&[key(7)], &[&partial]);
    assert!(
        matches!(report.keys[0], KeyOutcome::Stored { bytes: 1000 }),
        "{report:?}"
    );
    assert_eq!(adapter.stored_size(&key(7)), Some(1000));
    let loaded = load(adapter.as_ref(), &pool, 7).expect("the partial chunk loads");
    assert_eq!(
        loaded.len(),
        1000,
        "loaded with its true length, not a slot's"
    );
    assert!(loaded.as_slice() == partial.as_slice(), "the same bytes");
}

#[test]
fn save_unfull_chunk_off_refuses_a_partial_chunk_and_stores_full_ones() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    // The LMCache default: off.
    let adapter = build(dir.path(), 4, "", &pool).unwrap();
    let partial = page(&pool, 7, 1000);
    let full = page(&pool, 8, CHUNK);
    let report = adapter.store(&[key(7), key(8)], &[&partial, &full]);
    assert!(
        matches!(
            report.keys[0],
            KeyOutcome::Failed(Error::UnfullChunk {
                len: 1000,
                chunk: CHUNK,
                ..
            })
        ),
        "{report:?}"
    );
    if let KeyOutcome::Failed(err) = &report.keys[0] {
        assert!(err.to_string().contains("save_unfull_chunk"), "{err}");
    }
    assert!(
        matches!(report.keys[1], KeyOutcome::Stored { .. }),
        "{report:?}"
    );
    assert_eq!(adapter.lookup_and_pin(&[key(7)]), vec![false]);
    assert_eq!(adapter.stored_size(&key(7)), None);
    assert!(load(adapter.as_ref(), &pool, 7).is_none(), "nothing served");
    assert_eq!(adapter.usage().keys, 1);
}

/// Four keys stored in order 0..4, then loaded 1, 1, 3, 3, 0, 0, 2, 3, so each policy has a
/// different victim: the least recently used is 1, the first stored 0, the most recently used
/// 3, the least often loaded 2.
fn victim_after_one_overflow(policy: &str) -> u32 {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let adapter = build(dir.path(), 4, &format!("cache_policy: {policy}\n"), &pool)
        .unwrap_or_else(|err| panic!("{policy}: {err}"));
    for i in 0..4 {
        store(adapter.as_ref(), &pool, i);
    }
    for i in [1, 1, 3, 3, 0, 0, 2, 3] {
        assert!(
            load(adapter.as_ref(), &pool, i).is_some(),
            "{policy}: load {i}"
        );
    }
    store(adapter.as_ref(), &pool, 4);
    let gone: Vec<u32> = (0..4)
        .filter(|&i| adapter.stored_size(&key(i)).is_none())
        .collect();
    assert_eq!(
        gone.len(),
        1,
        "{policy}: one key makes room, gone: {gone:?}"
    );
    assert!(
        load(adapter.as_ref(), &pool, 4).is_some(),
        "{policy}: the new key"
    );
    gone[0]
}

#[test]
fn cache_policy_chooses_which_key_makes_room() {
    for (policy, victim) in [("LRU", 1), ("FIFO", 0), ("MRU", 3), ("LFU", 2)] {
        assert_eq!(victim_after_one_overflow(policy), victim, "{policy}");
    }
}

#[test]
fn pinned_keys_are_never_victims_whatever_the_policy() {
    for policy in ["LRU", "FIFO", "MRU", "LFU"] {
        let dir = tempfile::tempdir().unwrap();
        let pool = memory();
        let adapter = build(dir.path(), 3, &format!("cache_policy: {policy}\n"), &pool).unwrap();
        for i in 0..3 {
            store(adapter.as_ref(), &pool, i);
        }
        // Only key 1 is free to go, whatever order the policy prefers.
        assert_eq!(adapter.lookup_and_pin(&[key(0), key(2)]), vec![true, true]);
        store(adapter.as_ref(), &pool, 3);
        let kept: Vec<bool> = (0..4)
            .map(|i| adapter.stored_size(&key(i)).is_some())
            .collect();
        assert_eq!(kept, vec![true, false, true, true], "{policy}");
        // Everything left is pinned but key 3.
        assert_eq!(adapter.lookup_and_pin(&[key(3)]), vec![true]);
        let report = adapter.store(&[key(4)], &[&page(&pool, 4, CHUNK)]);
        assert!(
            matches!(report.keys[0], KeyOutcome::Failed(Error::PoolFull { .. })),
            "{policy}: {report:?}"
        );
    }
}

#[test]
fn an_unknown_cache_policy_is_refused_naming_the_setting_and_the_accepted_values() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    for policy in ["S3FIFO", "lru", "RANDOM"] {
        let err = build(dir.path(), 4, &format!("cache_policy: {policy}\n"), &pool)
            .expect_err("an unknown policy is refused");
        let text = err.to_string();
        assert!(
            text.contains("cache_policy") && text.contains(policy),
            "{text}"
        );
        assert!(text.contains("LRU, LFU, FIFO, MRU"), "{text}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).map_or(0, |d| d.count()),
        0,
        "refused before any pool file is created"
    );
}
