//! `nixl_async_put` through the entry point a user calls: an LMCache YAML, loaded and validated
//! by `kv_config`, built by `build_storage`, on the native engine over POSIX files.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_config::{ConfigLoader, Deployment};
use kv_l2_adapter::{
    AdapterContext, ChunkKey, Engine, KeyOutcome, L2Adapter, ObjectKey, build_storage,
};
use pinned_alloc::{LockMode, Page, PagePool, PoolConfig};

const PAGE: usize = 64 << 10;

/// A dynamic POSIX store of per-key files in `dir` (so that what reached the disk can be
/// counted file by file), `nixl_async_put` as given, over `pool`.
fn open(dir: &Path, async_put: bool, pool: &Arc<PagePool>) -> Arc<dyn L2Adapter> {
    let data = dir.join("kv");
    let yaml = format!(
        "
chunk_size: 256
nixl_buffer_device: cpu
max_local_cpu_size: 0.01
save_unfull_chunk: false
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 0
  nixl_path: {}
  nixl_async_put: {async_put}
  nixl_layout: files
",
        data.display()
    );
    let file = dir.join(format!("lmcache-{async_put}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let engine = ConfigLoader::new()
        .with_file(&file)
        .load()
        .unwrap_or_else(|e| panic!("{e}"))
        .value;
    let spec = engine
        .storage_spec(&Deployment::new())
        .unwrap_or_else(|e| panic!("{e}"))
        .value;
    assert_eq!(spec.async_put, async_put, "the YAML key reaches the spec");
    let context = AdapterContext::new(Arc::clone(pool)).with_engine(Engine::Native);
    build_storage(&spec, &context).unwrap_or_else(|e| panic!("{e}"))
}

fn pool(pages: u64) -> Arc<PagePool> {
    PoolConfig::new(PAGE, PAGE as u64 * pages)
        .with_lock(LockMode::Off)
        .build()
        .unwrap()
}

fn key(i: u32) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: "async/model".to_owned(),
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

fn filled(pool: &Arc<PagePool>, indices: &[u32]) -> Vec<Page> {
    indices
        .iter()
        .map(|&i| {
            let mut page = pool.allocate().expect("a free page");
            fill(i, &mut page);
            page
        })
        .collect()
}

/// Chunk files published in the store's folder.
fn chunk_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("kv"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".bin"))
                .count()
        })
        .unwrap_or(0)
}

/// Whether every key loads back with the bytes of its chunk.
fn loads_back(adapter: &dyn L2Adapter, pool: &Arc<PagePool>, indices: &[u32]) -> bool {
    let keys: Vec<ChunkKey> = indices.iter().map(|&i| key(i)).collect();
    let mut pages: Vec<Page> = indices.iter().map(|_| pool.allocate().unwrap()).collect();
    let mut refs: Vec<&mut Page> = pages.iter_mut().collect();
    let found = adapter.load(&keys, &mut refs);
    let mut expected = pool.allocate().unwrap();
    found.iter().all(|&ok| ok)
        && indices.iter().zip(&pages).all(|(&i, page)| {
            fill(i, &mut expected);
            page.as_slice() == expected.as_slice()
        })
}

/// Polls until every key is visible to lookups (and unpins them), failing past ten seconds.
fn wait_visible(adapter: &dyn L2Adapter, keys: &[ChunkKey]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hits = adapter.lookup_and_pin(keys);
        let pinned: Vec<ChunkKey> = keys
            .iter()
            .zip(&hits)
            .filter(|(_, hit)| **hit)
            .map(|(k, _)| k.clone())
            .collect();
        adapter.unlock(&pinned);
        if pinned.len() == keys.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queued keys never showed: {hits:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn async_put_queues_the_store_and_the_keys_show_once_written() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(16);
    let adapter = open(dir.path(), true, &pool);
    let indices = [1, 2, 3, 4];
    let keys: Vec<ChunkKey> = indices.iter().map(|&i| key(i)).collect();
    let mut pages = filled(&pool, &indices);
    let refs: Vec<&Page> = pages.iter().collect();
    let report = adapter.store(&keys, &refs);
    assert!(
        report
            .keys
            .iter()
            .all(|o| matches!(o, KeyOutcome::Queued { bytes } if *bytes == PAGE as u64)),
        "accepted for a background write, not reported written: {report:?}"
    );
    assert!(report.is_successful());
    assert_eq!(report.bytes(), 0, "nothing is written yet by this call");
    // The store copied the pages: the caller may reuse them at once.
    for (page, i) in pages.iter_mut().zip(100..) {
        fill(i, page);
    }
    wait_visible(&*adapter, &keys);
    assert_eq!(
        chunk_files(dir.path()),
        indices.len(),
        "visible means on disk"
    );
    assert!(
        loads_back(&*adapter, &pool, &indices),
        "the bytes given to store"
    );
    adapter.close().unwrap();
}

#[test]
fn without_async_put_a_store_is_written_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(16);
    let adapter = open(dir.path(), false, &pool);
    let indices = [1, 2, 3];
    let keys: Vec<ChunkKey> = indices.iter().map(|&i| key(i)).collect();
    let pages = filled(&pool, &indices);
    let refs: Vec<&Page> = pages.iter().collect();
    let report = adapter.store(&keys, &refs);
    assert!(
        report
            .keys
            .iter()
            .all(|o| matches!(o, KeyOutcome::Stored { bytes } if *bytes == PAGE as u64)),
        "{report:?}"
    );
    assert_eq!(
        adapter.lookup_and_pin(&keys),
        vec![true; 3],
        "visible at once"
    );
    adapter.unlock(&keys);
    assert_eq!(chunk_files(dir.path()), indices.len());
    assert!(loads_back(&*adapter, &pool, &indices));
}

#[test]
fn with_no_staging_page_free_async_put_writes_in_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(8);
    let adapter = open(dir.path(), true, &pool);
    let source = filled(&pool, &[1]);
    // The rest of the L1 pool is the engine's: none is left to stage a copy in.
    let held: Vec<Page> = std::iter::from_fn(|| pool.allocate()).collect();
    assert_eq!(pool.stats().free, 0);
    let report = adapter.store(&[key(1)], &[&source[0]]);
    assert!(
        matches!(report.keys[..], [KeyOutcome::Stored { bytes }] if bytes == PAGE as u64),
        "written synchronously rather than refused or queued: {report:?}"
    );
    assert_eq!(
        adapter.lookup_and_pin(&[key(1)]),
        vec![true],
        "visible at once"
    );
    adapter.unlock(&[key(1)]);
    assert_eq!(chunk_files(dir.path()), 1);
    drop(held);
    let more = filled(&pool, &[2]);
    let report = adapter.store(&[key(2)], &[&more[0]]);
    assert!(
        matches!(report.keys[..], [KeyOutcome::Queued { .. }]),
        "with pages free again, stores queue again: {report:?}"
    );
    wait_visible(&*adapter, &[key(2)]);
    assert!(loads_back(&*adapter, &pool, &[1, 2]));
}

#[test]
fn close_writes_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(16);
    let indices = [1, 2, 3, 4, 5, 6];
    let keys: Vec<ChunkKey> = indices.iter().map(|&i| key(i)).collect();
    {
        let adapter = open(dir.path(), true, &pool);
        for &i in &indices {
            let page = filled(&pool, &[i]);
            assert!(adapter.store(&[key(i)], &[&page[0]]).is_successful());
        }
        adapter.close().unwrap();
        assert_eq!(
            chunk_files(dir.path()),
            indices.len(),
            "closed with all written"
        );
    }
    let reopened = open(dir.path(), false, &pool);
    assert_eq!(reopened.lookup_and_pin(&keys), vec![true; indices.len()]);
    reopened.unlock(&keys);
    assert!(loads_back(&*reopened, &pool, &indices));
}
