//! The L2 adapters: the conformance kit on every backend, and the behaviours around it.

use std::sync::Arc;
use std::time::Duration;

use kv_config::{AdapterSpec, ConfigLoader, Deployment, PresenceCache};
use kv_integration_tests::services::{AzuriteServer, S3Server};
use kv_l2_adapter::test_utils::{self, key, load, store};
use kv_l2_adapter::{
    AdapterContext, AdapterFactory, DynamicAdapter, DynamicOptions, Engine, EvictionController,
    KeyOutcome, L2Adapter, build_storage,
};
use pinned_alloc::{PagePool, PoolConfig};

const CHUNK: usize = 64 << 10;

fn memory() -> Arc<PagePool> {
    PoolConfig::new(CHUNK, 64 * CHUNK as u64).build().unwrap()
}

fn build(json: &str, engine: Engine, pool: &Arc<PagePool>) -> Arc<dyn L2Adapter> {
    let context = AdapterContext::new(Arc::clone(pool)).with_engine(engine);
    let mut built = AdapterFactory::new()
        .build(&[json], &context)
        .unwrap_or_else(|err| panic!("{err}"));
    built.remove(0).1
}

fn file_json(kind: &str, dir: &std::path::Path, extra: &str) -> String {
    match kind {
        "nixl_store" => format!(
            r#"{{"type":"nixl_store","backend":"POSIX","backend_params":{{"file_path":"{}","use_direct_io":"true"}},"pool_size":32{extra}}}"#,
            dir.display()
        ),
        _ => format!(
            r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","use_direct_io":"true","max_capacity_gb":"1"}}{extra}}}"#,
            dir.display()
        ),
    }
}

macro_rules! conformance_on_files {
    ($name:ident, $kind:literal, $engine:expr) => {
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let pool = memory();
            let adapter = build(&file_json($kind, dir.path(), ""), $engine, &pool);
            test_utils::run_all(adapter.as_ref(), &pool);
        }
    };
}

conformance_on_files!(static_nixl_posix, "nixl_store", Engine::Nixl);
conformance_on_files!(static_native, "nixl_store", Engine::Native);
conformance_on_files!(dynamic_nixl_posix, "nixl_store_dynamic", Engine::Nixl);
conformance_on_files!(dynamic_native, "nixl_store_dynamic", Engine::Native);

fn s3_json(server: &S3Server, kind: &str) -> String {
    let pool = if kind == "nixl_store" {
        r#","pool_size":16"#
    } else {
        ""
    };
    format!(
        r#"{{"type":"{kind}","backend":"OBJ","backend_params":{{"bucket":"{}","endpoint_override":"{}","scheme":"http","region":"us-east-1","access_key":"{}","secret_key":"{}"}}{pool}}}"#,
        server.bucket, server.endpoint, server.access_key, server.secret_key
    )
}

#[test]
fn dynamic_on_seaweedfs() {
    let server = S3Server::start();
    let pool = memory();
    let adapter = build(&s3_json(&server, "nixl_store_dynamic"), Engine::Nixl, &pool);
    // Deletes reach the bucket (through the object client), so every check runs.
    test_utils::run_all(adapter.as_ref(), &pool);
    assert_eq!(
        adapter.usage().fraction(),
        -1.0,
        "object stores have no known capacity"
    );
}

#[test]
fn static_on_seaweedfs() {
    let server = S3Server::start();
    let pool = memory();
    let adapter = build(&s3_json(&server, "nixl_store"), Engine::Nixl, &pool);
    test_utils::run_all(adapter.as_ref(), &pool);
}

#[test]
fn dynamic_on_azurite() {
    let server = AzuriteServer::start();
    let pool = memory();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"AZURE_BLOB","backend_params":{{"connection_string":"{}","container_name":"{}"}}}}"#,
        server.connection_string(),
        server.container
    );
    let adapter = build(&json, Engine::Nixl, &pool);
    test_utils::run_all(adapter.as_ref(), &pool);
}

/// With room for one chunk, storing two: the first is stored, the second refused, usage exact.
#[test]
fn capacity_refusal_mid_batch() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let gb = CHUNK as f64 / (1u64 << 30) as f64;
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","max_capacity_gb":"{gb}"}}}}"#,
        dir.path().display()
    );
    let adapter = build(&json, Engine::Native, &pool);
    let mut pages = pool.allocate_batch(2).unwrap();
    test_utils::fill(1, &mut pages[0]);
    test_utils::fill(2, &mut pages[1]);
    let report = adapter.store(&[key(1, None), key(2, None)], &[&pages[0], &pages[1]]);
    assert!(!report.is_successful());
    assert!(matches!(report.keys[0], KeyOutcome::Stored { bytes } if bytes == CHUNK as u64));
    assert!(matches!(
        report.keys[1],
        KeyOutcome::Failed(kv_l2_adapter::Error::CapacityExceeded { .. })
    ));
    assert_eq!(adapter.usage().used_bytes, CHUNK as u64);
    assert_eq!(
        adapter.lookup_and_pin(&[key(1, None), key(2, None)]),
        vec![true, false]
    );
}

/// After a restart a store with a capacity indexes what is stored at open, so usage counts it
/// at once; lookups find the data again.
#[test]
fn restart_recovery_restores_usage() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let json = file_json("nixl_store_dynamic", dir.path(), "");
    let before = {
        let adapter = build(&json, Engine::Native, &pool);
        store(adapter.as_ref(), &pool, &[1, 2, 3]);
        adapter.usage().used_bytes
    };
    let adapter = build(&json, Engine::Native, &pool);
    assert_eq!(
        adapter.usage().used_bytes,
        before,
        "stored chunks are counted at open"
    );
    let keys = [key(1, None), key(2, None), key(3, None), key(4, None)];
    assert_eq!(adapter.lookup_and_pin(&keys), vec![true, true, true, false]);
    assert_eq!(adapter.usage().used_bytes, before);
    adapter.unlock(&keys);
    assert_eq!(load(adapter.as_ref(), &pool, &[2]), vec![true]);
}

/// `persist_enabled: false` deletes what the adapter indexed when it closes.
#[test]
fn persist_off_deletes_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let json = file_json(
        "nixl_store_dynamic",
        dir.path(),
        r#","persist_enabled":false"#,
    );
    {
        let adapter = build(&json, Engine::Native, &pool);
        store(adapter.as_ref(), &pool, &[1, 2]);
        adapter.close().unwrap();
        assert!(!adapter.status().is_healthy);
    }
    let kept = build(
        &file_json("nixl_store_dynamic", dir.path(), ""),
        Engine::Native,
        &pool,
    );
    assert_eq!(
        kept.lookup_and_pin(&[key(1, None), key(2, None)]),
        vec![false, false]
    );
}

/// Watermark eviction on the controller's thread brings usage under the mark, pinned keys stay.
#[test]
fn watermark_eviction_brings_usage_under_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let gb = (10 * CHUNK) as f64 / (1u64 << 30) as f64;
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","max_capacity_gb":"{gb}"}},"eviction":{{"eviction_policy":"LRU","trigger_watermark":0.5,"eviction_ratio":0.3}}}}"#,
        dir.path().display()
    );
    let context = AdapterContext::new(Arc::clone(&pool)).with_engine(Engine::Native);
    let (spec, adapter): (AdapterSpec, _) = AdapterFactory::new()
        .build(&[json.as_str()], &context)
        .unwrap()
        .remove(0);
    store(adapter.as_ref(), &pool, &[0, 1, 2, 3, 4, 5, 6, 7, 8]);
    let pinned = key(0, None);
    adapter.lookup_and_pin(std::slice::from_ref(&pinned));
    assert!(adapter.usage().fraction() >= 0.5);
    let controller = EvictionController::spawn(
        vec![(Arc::clone(&adapter), spec.eviction.unwrap())],
        Duration::from_millis(20),
    )
    .unwrap();
    let started = std::time::Instant::now();
    while adapter.usage().fraction() >= 0.5 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(controller);
    assert!(
        adapter.usage().fraction() < 0.5,
        "usage {}",
        adapter.usage().fraction()
    );
    assert_eq!(
        adapter.lookup_and_pin(std::slice::from_ref(&pinned)),
        vec![true]
    );
}

fn dynamic_over_files(
    dir: &std::path::Path,
    options: DynamicOptions,
    pool: &Arc<PagePool>,
) -> (DynamicAdapter, nixl_core::Registration) {
    use nixl_core::TransportExt;
    let transport: Arc<dyn nixl_core::Transport> = kv_integration_tests::uring();
    let registration = transport.register_pool(pool).unwrap();
    let store =
        nixl_file::DynamicFileStore::open(transport, nixl_file::DynamicConfig::new(dir)).unwrap();
    (DynamicAdapter::new(Box::new(store), options), registration)
}

/// Presence-cache-only: keys not known locally are misses even when stored (by design).
#[test]
fn presence_cache_only_gives_false_negatives() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    {
        let (writer, _reg) = dynamic_over_files(dir.path(), DynamicOptions::new("URING"), &pool);
        store(&writer, &pool, &[1, 2]);
    }
    let (only, _reg) = dynamic_over_files(
        dir.path(),
        DynamicOptions::new("URING").with_presence_cache(PresenceCache::Only),
        &pool,
    );
    assert_eq!(
        only.batched_contains(&[key(1, None)]),
        0,
        "unknown locally: a miss"
    );
    assert_eq!(only.lookup_and_pin(&[key(1, None)]), vec![false]);
    store(&only, &pool, &[3]);
    assert_eq!(
        only.batched_contains(&[key(3, None)]),
        1,
        "what it stored itself it knows"
    );
    let (on, _reg) = dynamic_over_files(
        dir.path(),
        DynamicOptions::new("URING").with_presence_cache(PresenceCache::On),
        &pool,
    );
    assert_eq!(
        on.batched_contains(&[key(1, None), key(2, None), key(3, None)]),
        3
    );
}

/// Background puts: a key is absent while queued or being written, present once flushed.
#[test]
fn async_put_visibility() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let (adapter, _reg) = dynamic_over_files(
        dir.path(),
        DynamicOptions::new("URING").with_async_queue(4),
        &pool,
    );
    let mut pages = pool.allocate_batch(8).unwrap();
    for (i, page) in pages.iter_mut().enumerate() {
        test_utils::fill(i as u32, page);
    }
    let keys: Vec<_> = (0..8).map(|i| key(i, None)).collect();
    adapter.store_async(keys.clone(), pages).unwrap();
    let seen = adapter.batched_contains(&keys);
    assert!(
        seen == 0 || seen == 8,
        "a batch is never partly visible mid-write: {seen}"
    );
    adapter.flush();
    assert_eq!(adapter.batched_contains(&keys), 8);
    assert_eq!(load(&adapter, &pool, &[0, 7]), vec![true, true]);
}

fn check_memory(obj: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    match obj.get("max_chunks").and_then(|v| v.as_u64()) {
        Some(n) if n > 0 => Ok(()),
        _ => Err("max_chunks must be a positive integer".to_owned()),
    }
}

fn build_memory(
    _spec: &AdapterSpec,
    context: &AdapterContext,
) -> kv_l2_adapter::Result<Arc<dyn L2Adapter>> {
    let dir = tempfile::tempdir().unwrap().keep();
    let json = file_json("nixl_store", &dir, "");
    let spec = kv_config::AdapterRegistry::new()
        .parse(&[json])
        .unwrap()
        .value
        .remove(0);
    build_storage(spec.storage.as_ref().unwrap(), context)
}

/// A downstream type registers once, is validated, and builds beside the NIXL types.
#[test]
fn registry_builds_downstream_types() {
    let pool = memory();
    let mut factory = AdapterFactory::new();
    factory
        .register("my_tier", check_memory, build_memory)
        .unwrap();
    assert!(
        factory
            .register("my_tier", check_memory, build_memory)
            .is_err()
    );
    let context = AdapterContext::new(Arc::clone(&pool)).with_engine(Engine::Native);
    let err = factory
        .build(&[r#"{"type":"my_tier"}"#], &context)
        .unwrap_err();
    assert!(err.to_string().contains("max_chunks"), "{err}");
    let built = factory
        .build(&[r#"{"type":"my_tier","max_chunks":4}"#], &context)
        .unwrap();
    assert_eq!(built[0].0.type_name, "my_tier");
    test_utils::round_trip(built[0].1.as_ref(), &pool);
}

/// The engine configuration (LMCache YAML) builds the same adapters.
#[test]
fn engine_config_builds_a_dynamic_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let yaml = format!(
        "nixl_buffer_device: cpu\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n  nixl_pool_size: 0\n  nixl_path: {}\n  nixl_presence_cache: true\n",
        dir.path().display()
    );
    let engine = ConfigLoader::new()
        .with_yaml("lmcache.yaml", yaml)
        .load()
        .unwrap()
        .value;
    let spec = engine.storage_spec(&Deployment::new()).unwrap().value;
    let adapter = build_storage(&spec, &AdapterContext::new(Arc::clone(&pool))).unwrap();
    test_utils::round_trip(adapter.as_ref(), &pool);
}

/// The non-blocking forms: task ids, results handed out once, pages returned with them.
#[test]
fn submitted_tasks_complete_and_hand_results_out_once() {
    use kv_l2_adapter::AsyncAdapter;
    let dir = tempfile::tempdir().unwrap();
    let pool = memory();
    let tasks = AsyncAdapter::new(build(
        &file_json("nixl_store_dynamic", dir.path(), ""),
        Engine::Native,
        &pool,
    ));
    let mut pages = pool.allocate_batch(3).unwrap();
    for (i, page) in pages.iter_mut().enumerate() {
        test_utils::fill(i as u32, page);
    }
    let keys: Vec<_> = (0..3).map(|i| key(i, None)).collect();
    let store = tasks.submit_store(keys.clone(), pages).unwrap();
    let lookup = tasks
        .submit_lookup_and_lock(vec![key(0, None), key(7, None)])
        .unwrap();
    assert!(lookup > store, "ids increase");
    assert_eq!(tasks.wait_completed(2, Duration::from_secs(30)), 2);
    let stored = tasks.pop_completed_store_tasks();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].1.is_successful());
    assert_eq!(stored[0].2.len(), 3, "pages come back");
    assert!(
        tasks.pop_completed_store_tasks().is_empty(),
        "handed out once"
    );
    assert_eq!(
        tasks.query_lookup_and_lock_result(lookup),
        Some(vec![true, false])
    );
    assert_eq!(
        tasks.query_lookup_and_lock_result(lookup),
        None,
        "handed out once"
    );
    tasks.submit_unlock(vec![key(0, None)]);
    let load = tasks
        .submit_load(keys, pool.allocate_batch(3).unwrap())
        .unwrap();
    tasks.wait_completed(3, Duration::from_secs(30));
    let (bits, pages) = tasks.query_load_result(load).unwrap();
    assert_eq!(bits, vec![true, true, true]);
    let mut expected = pool.allocate().unwrap();
    for (i, page) in pages.iter().enumerate() {
        test_utils::fill(i as u32, &mut expected);
        assert!(page.as_slice() == expected.as_slice());
    }
    assert_eq!(
        tasks.query_lookup_and_lock_result(9999),
        None,
        "unknown ids"
    );
    tasks.shutdown();
}
