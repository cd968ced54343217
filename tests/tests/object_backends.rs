//! Object stores through NIXL OBJ (SeaweedFS) and AZURE_BLOB (Azurite), servers started by the
//! tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_config::{ConfigLoader, Deployment};
use kv_integration_tests::fill_chunk;
use kv_integration_tests::services::{AzuriteServer, S3Server};
use kv_l2_adapter::{Engine, StoreBuilder};
use nixl_core::{NixlConfig, NixlTransport, PageView, StorageExtent, Transport, TransportExt};
use nixl_obj::{ObjectConfig, ObjectStore, StaticObjectPool, object_id};
use pinned_alloc::{Page, PagePool, PoolConfig};

const CHUNK: usize = 128 << 10;

fn key(i: usize) -> Vec<u8> {
    format!("org/model\u{0}1\u{0}0\u{0}{i:016x}\u{0}").into_bytes()
}

fn s3(server: &S3Server) -> NixlConfig {
    server.nixl_config()
}

fn azure(server: &AzuriteServer) -> NixlConfig {
    server.nixl_config()
}

fn transport(config: NixlConfig) -> Arc<dyn Transport> {
    Arc::new(NixlTransport::new(config).unwrap_or_else(|err| panic!("{err}")))
}

struct Rig {
    store: ObjectStore,
    pool: Arc<PagePool>,
    _memory: nixl_core::Registration,
    transport: Arc<dyn Transport>,
}

fn rig(config: NixlConfig) -> Rig {
    let transport = transport(config);
    let pool = PoolConfig::new(CHUNK, 32 * CHUNK as u64).build().unwrap();
    let memory = transport.register_pool(&pool).unwrap();
    let store = ObjectStore::open(
        Arc::clone(&transport),
        ObjectConfig::new(CHUNK).with_max_batch(8),
    )
    .unwrap();
    Rig {
        store,
        pool,
        _memory: memory,
        transport,
    }
}

impl Rig {
    fn put(&self, indices: &[usize]) -> Vec<Result<u64, nixl_obj::Error>> {
        let keys: Vec<Vec<u8>> = indices.iter().map(|&i| key(i)).collect();
        let pages: Vec<Page> = indices
            .iter()
            .map(|&i| {
                let mut page = self.pool.allocate().unwrap();
                fill_chunk(i, page.as_mut_slice());
                page
            })
            .collect();
        let items: Vec<_> = keys.iter().map(Vec::as_slice).zip(&pages).collect();
        self.store.put(&items)
    }

    /// Loads `indices`: a hit must carry its key's bytes.
    fn try_get(&self, indices: &[usize]) -> Vec<Result<bool, nixl_obj::Error>> {
        let keys: Vec<Vec<u8>> = indices.iter().map(|&i| key(i)).collect();
        let mut pages: Vec<Page> = indices
            .iter()
            .map(|_| self.pool.allocate().unwrap())
            .collect();
        let mut items: Vec<_> = keys
            .iter()
            .map(Vec::as_slice)
            .zip(pages.iter_mut())
            .collect();
        let results = self.store.get(&mut items);
        let mut expected = vec![0u8; CHUNK];
        results
            .into_iter()
            .zip(indices)
            .zip(&pages)
            .map(|((r, &i), page)| {
                if r.as_ref().is_ok_and(|&hit| hit) {
                    fill_chunk(i, &mut expected);
                    assert!(
                        page.as_slice() == &expected[..],
                        "object {i} loaded wrong bytes"
                    );
                }
                r
            })
            .collect()
    }

    fn get(&self, indices: &[usize]) -> Vec<bool> {
        self.try_get(indices)
            .into_iter()
            .zip(indices)
            .map(|(r, i)| r.unwrap_or_else(|e| panic!("get {i}: {e}")))
            .collect()
    }
}

fn round_trip_restart_and_foreign(make: &dyn Fn() -> NixlConfig) {
    {
        let rig = rig(make());
        for result in rig.put(&(0..12).collect::<Vec<_>>()) {
            assert_eq!(result.unwrap(), CHUNK as u64);
        }
        assert_eq!(rig.get(&[0, 5, 11, 12]), vec![true, true, true, false]);
        let contains = rig
            .store
            .contains(&[key(3).as_slice(), key(40).as_slice()])
            .unwrap();
        assert_eq!(contains, vec![true, false]);
    }
    let rig = rig(make());
    assert_eq!(
        rig.get(&[1, 2, 3]),
        vec![true, true, true],
        "found again after a restart"
    );

    // A foreign object under key 20's name, and a too-short one under key 21's: misses, and
    // their batch neighbours still load.
    let mut foreign = rig.pool.allocate().unwrap();
    foreign.as_mut_slice().fill(0x42);
    let mut short = rig.pool.allocate().unwrap();
    short.set_len(100);
    for (i, page) in [(20, &foreign), (21, &short)] {
        let registration = rig
            .transport
            .register_object(object_id(&key(i)), page.len())
            .unwrap();
        rig.transport
            .write_pages(
                &[(page, StorageExtent::new(registration.dev_id(), 0))],
                PageView::Exact,
            )
            .unwrap();
    }
    assert_eq!(rig.get(&[4, 20, 21, 6]), vec![true, false, false, true]);
}

#[test]
fn s3_dynamic_objects() {
    let server = S3Server::start();
    round_trip_restart_and_foreign(&|| s3(&server));
}

#[test]
fn azure_dynamic_blobs() {
    let server = AzuriteServer::start();
    round_trip_restart_and_foreign(&|| azure(&server));
}

fn static_pool(config: NixlConfig) {
    let transport = transport(config);
    let pool = PoolConfig::new(CHUNK, 8 * CHUNK as u64).build().unwrap();
    let _memory = transport.register_pool(&pool).unwrap();
    let slots = StaticObjectPool::open(Arc::clone(&transport), 4, CHUNK).unwrap();
    assert_eq!(slots.len(), 4);
    let mut pages = pool.allocate_batch(4).unwrap();
    for (i, page) in pages.iter_mut().enumerate() {
        fill_chunk(i, page.as_mut_slice());
    }
    let names: Vec<Vec<u8>> = (0..4).map(|i| format!("slot-{i}").into_bytes()).collect();
    let writes: Vec<_> = names
        .iter()
        .zip(&pages)
        .zip(0u32..)
        .map(|((name, page), slot)| (name.as_slice(), page, slot))
        .collect();
    slots.write(&writes).unwrap();
    let mut targets = pool.allocate_batch(4).unwrap();
    let mut reads: Vec<_> = names
        .iter()
        .rev()
        .zip(targets.iter_mut())
        .zip([3u32, 2, 1, 0])
        .map(|((name, page), slot)| (name.as_slice(), page, slot))
        .collect();
    assert_eq!(slots.read(&mut reads).unwrap(), vec![true; 4]);
    for (target, source) in targets.iter().zip(pages.iter().rev()) {
        assert!(target.as_slice() == source.as_slice());
    }
}

#[test]
fn s3_static_pool() {
    let server = S3Server::start();
    static_pool(s3(&server));
}

#[test]
fn azure_static_pool() {
    let server = AzuriteServer::start();
    static_pool(azure(&server));
}

/// A bucket that does not exist (the server creates none on upload): every write fails typed
/// in bounded time, and nothing is found in it.
#[test]
fn missing_bucket_fails_typed_in_bounded_time() {
    let server = S3Server::start();
    let rig = rig(s3(&server)
        .with_param("bucket", "kv-no-such-bucket")
        .with_timeout(Duration::from_secs(30)));
    let started = Instant::now();
    for result in rig.put(&[0, 1]) {
        assert!(
            matches!(result, Err(nixl_obj::Error::Batch(_))),
            "nothing may be stored in a missing bucket: {result:?}"
        );
    }
    let found = rig.store.contains(&[key(0).as_slice(), key(1).as_slice()]);
    assert!(
        found.is_err() || found.as_ref().is_ok_and(|f| f == &vec![false, false]),
        "a missing bucket holds nothing: {found:?}"
    );
    for result in rig.try_get(&[0, 1]) {
        assert!(!matches!(result, Ok(true)), "a hit in a missing bucket");
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// Requests are signed and the server checks them: a store with a wrong secret key stores
/// nothing and loads nothing, not even what the right key stored, each refused with a typed
/// error (not a miss) in bounded time.
#[test]
fn wrong_s3_secret_fails_typed() {
    let server = S3Server::start();
    let good = rig(s3(&server));
    for result in good.put(&[0]) {
        result.unwrap();
    }
    let bad = rig(s3(&server)
        .with_param("secret_key", format!("{}-wrong", server.secret_key))
        .with_timeout(Duration::from_secs(30)));
    let started = Instant::now();
    for result in bad.put(&[1]) {
        assert!(
            matches!(result, Err(nixl_obj::Error::Batch(_))),
            "a write with a wrong secret key must be refused: {result:?}"
        );
    }
    // Refused, not absent: the key stored with the right secret is not reported missing.
    let found = bad.store.contains(&[key(0).as_slice()]);
    assert!(
        matches!(found, Err(nixl_obj::Error::Transport(_))),
        "a lookup with a wrong secret key must fail: {found:?}"
    );
    for result in bad.try_get(&[0]) {
        assert!(
            matches!(result, Err(nixl_obj::Error::Batch(_))),
            "a load with a wrong secret key must fail: {result:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        good.get(&[0, 1]),
        vec![true, false],
        "the refused write left nothing"
    );
}

#[test]
fn server_down_fails_per_batch_in_bounded_time_and_reports_nothing_present() {
    let mut server = S3Server::start();
    let rig = rig(s3(&server).with_timeout(Duration::from_secs(30)));
    for result in rig.put(&[0]) {
        result.unwrap();
    }
    server.stop();
    let started = Instant::now();
    for result in rig.put(&[1, 2]) {
        assert!(
            result.is_err(),
            "a write to a stopped server cannot succeed"
        );
    }
    let found = rig.store.contains(&[key(0).as_slice()]);
    assert!(
        found.is_err() || found.as_ref().is_ok_and(|f| f == &vec![false]),
        "a stopped server reports nothing present: {found:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn wrong_azure_key_fails_typed() {
    let server = AzuriteServer::start();
    let bad = server
        .connection_string()
        .replace("AccountKey=Eby8", "AccountKey=AAAA");
    let rig = rig(azure(&server).with_param("connection_string", bad));
    for result in rig.put(&[0]) {
        assert!(
            matches!(result, Err(nixl_obj::Error::Batch(_))),
            "{result:?}"
        );
    }
}

/// Two S3 servers in `nixl_endpoint_list`, two workers: each worker's objects land on its own
/// endpoint, as kv-config resolves it.
#[test]
fn endpoint_list_picks_the_endpoint_of_the_local_worker() {
    let servers = [S3Server::start(), S3Server::start()];
    let bucket = &servers[0].bucket;
    // The second server needs the same bucket (both take the same keys).
    servers[1].create_bucket(bucket);
    // Three endpoints over two servers: worker 4 takes the second (4 % 3), worker 3 the first.
    let yaml = format!(
        "nixl_buffer_device: cpu\nmax_local_cpu_size: 0.01\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: OBJ\n  nixl_pool_size: 0\n  nixl_endpoint_list: [{a}, {b}, {a}]\n  nixl_backend_params:\n    bucket: {bucket}\n    scheme: http\n    region: us-east-1\n    access_key: {access}\n    secret_key: {secret}\n",
        a = servers[0].endpoint,
        b = servers[1].endpoint,
        access = servers[0].access_key,
        secret = servers[0].secret_key,
    );
    let engine = ConfigLoader::new()
        .with_yaml("endpoints.yaml", yaml)
        .load()
        .unwrap()
        .value;
    for worker in [4u32, 3] {
        let store = StoreBuilder::from_lmcache(engine.clone())
            .with_deployment(Deployment::new().with_worker(worker, worker))
            .with_chunk_bytes(CHUNK)
            .with_engine(Engine::Nixl)
            .build()
            .unwrap_or_else(|err| panic!("{err}"));
        let mut page = store.pool().allocate().unwrap();
        kv_l2_adapter::test_utils::fill(worker, &mut page);
        let report = store
            .adapter()
            .store(&[kv_l2_adapter::test_utils::key(worker, None)], &[&page]);
        assert!(report.keys[0].is_stored(), "{:?}", report.keys[0]);
        store.close().unwrap();
    }
    let on = |server: &S3Server, worker: u32| {
        let key = kv_l2_adapter::test_utils::key(worker, None);
        let rig = rig(s3(server).with_param("bucket", bucket));
        rig.store.contains(&[key.canonical().as_slice()]).unwrap()[0]
    };
    assert!(
        on(&servers[1], 4) && !on(&servers[0], 4),
        "worker 4 of 3 endpoints uses the second"
    );
    assert!(
        on(&servers[0], 3) && !on(&servers[1], 3),
        "worker 3 uses the first"
    );
}

/// The server is killed mid-run and started again on the same ports and data: writes in between
/// fail typed, then what it acknowledged before is served again (a real store persists) and
/// nothing unwritten is reported present.
#[test]
fn server_restart_mid_run() {
    let mut server = S3Server::start();
    let rig = rig(s3(&server).with_timeout(Duration::from_secs(30)));
    for result in rig.put(&[0]) {
        result.unwrap();
    }
    server.stop();
    for result in rig.put(&[1]) {
        assert!(result.is_err(), "the server is down: the write must fail");
    }
    server.restart();
    let found = rig
        .store
        .contains(&[key(0).as_slice(), key(1).as_slice()])
        .unwrap();
    assert_eq!(
        found,
        vec![true, false],
        "the acknowledged key is back, the refused one is not"
    );
    for result in rig.put(&[2]) {
        result.unwrap();
    }
    assert_eq!(rig.get(&[2, 0, 1]), vec![true, true, false]);
}

/// A dynamic OBJ store with room for 8 chunks, from `--l2-adapter` JSON, evicting by LRU
/// (the controller's passes every `interval`).
fn object_store_every(server: &S3Server, extra: &str, interval: Duration) -> kv_l2_adapter::Store {
    let room_gb = (8 * CHUNK) as f64 / (1u64 << 30) as f64;
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"OBJ","backend_params":{{"endpoint_override":"{}","scheme":"http","region":"us-east-1","bucket":"{}","access_key":"{}","secret_key":"{}","max_capacity_gb":"{room_gb}"}},"eviction":{{"eviction_policy":"LRU","trigger_watermark":0.75,"eviction_ratio":0.5}}{extra}}}"#,
        server.endpoint, server.bucket, server.access_key, server.secret_key,
    );
    StoreBuilder::from_l2_adapters([json])
        .with_chunk_bytes(CHUNK)
        .with_engine(Engine::Nixl)
        .with_eviction_interval(interval)
        .build()
        .unwrap_or_else(|err| panic!("{err}"))
}

/// [`object_store_every`] 20 ms.
fn evicting_object_store(server: &S3Server, extra: &str) -> kv_l2_adapter::Store {
    object_store_every(server, extra, Duration::from_millis(20))
}

/// The ids of the chunk objects the bucket holds, as the filer lists them.
fn ids_in_bucket(server: &S3Server) -> Vec<u64> {
    let mut ids: Vec<u64> = server
        .objects()
        .into_iter()
        .map(|(name, bytes)| {
            assert_eq!(
                bytes,
                (4096 + CHUNK) as u64,
                "object {name}: header and chunk"
            );
            name.parse()
                .unwrap_or_else(|_| panic!("object {name} is not named by an id"))
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Eviction on an object store deletes objects: 40 chunks stored one by one into room for 8
/// leave at most 8 objects in the bucket, the very ones the store counts; a store opened again
/// counts what the bucket holds, and serves it byte-exact.
#[test]
fn eviction_on_an_object_store_frees_bucket_space() {
    use kv_l2_adapter::test_utils::{fill, key};
    let server = S3Server::start();
    let store = evicting_object_store(&server, "");
    let mut page = store.pool().allocate().unwrap();
    for i in 0..40u32 {
        fill(i, &mut page);
        let report = store.adapter().store(&[key(i, None)], &[&page]);
        assert!(report.keys[0].is_stored(), "key {i}: {:?}", report.keys[0]);
    }
    std::thread::sleep(Duration::from_millis(200));
    let kept: Vec<u32> = (0..40u32)
        .filter(|&i| store.adapter().stored_size(&key(i, None)).is_some())
        .collect();
    let mut expected: Vec<u64> = kept
        .iter()
        .map(|&i| object_id(&key(i, None).canonical()))
        .collect();
    expected.sort_unstable();
    assert!(kept.len() <= 8, "room for 8, {} counted", kept.len());
    assert!(kept.contains(&39), "the newest key stays");
    assert_eq!(
        ids_in_bucket(&server),
        expected,
        "the bucket holds what the store counts"
    );
    let usage = store.adapter().usage();
    assert_eq!(usage.used_bytes, (kept.len() * CHUNK) as u64);
    store.close().unwrap();

    // Reopened with its controller idle, so what it counts at open is not evicted meanwhile.
    let store = object_store_every(&server, "", Duration::from_secs(3600));
    let usage = store.adapter().usage();
    assert_eq!(
        (usage.keys, usage.used_bytes),
        (kept.len(), (kept.len() * CHUNK) as u64),
        "a store opened again counts what the bucket holds"
    );
    let keys: Vec<_> = kept.iter().map(|&i| key(i, None)).collect();
    let mut pages = store.pool().allocate_batch(keys.len()).unwrap();
    assert!(store.adapter().lookup_and_pin(&keys).iter().all(|&hit| hit));
    let mut targets: Vec<&mut Page> = pages.iter_mut().collect();
    assert!(
        store
            .adapter()
            .load(&keys, &mut targets)
            .iter()
            .all(|&hit| hit)
    );
    store.adapter().unlock(&keys);
    for (&i, page) in kept.iter().zip(&pages) {
        let mut expected = store.pool().allocate().unwrap();
        fill(i, &mut expected);
        assert!(
            page.as_slice() == expected.as_slice(),
            "key {i} read back wrong bytes"
        );
    }
}

/// `persist_enabled: false` on an object store: what it wrote is deleted from the bucket when
/// it closes, and only that (an object another writer left stays).
#[test]
fn an_object_store_that_does_not_persist_empties_what_it_wrote() {
    use kv_l2_adapter::test_utils::{fill, key};
    let server = S3Server::start();
    let other = rig(s3(&server));
    for result in other.put(&[7]) {
        result.unwrap();
    }
    let store = evicting_object_store(&server, r#","persist_enabled":false"#);
    let mut page = store.pool().allocate().unwrap();
    for i in 0..3u32 {
        fill(i, &mut page);
        assert!(store.adapter().store(&[key(i, None)], &[&page]).keys[0].is_stored());
    }
    assert_eq!(ids_in_bucket(&server).len(), 4);
    store.close().unwrap();
    assert_eq!(
        ids_in_bucket(&server),
        vec![object_id(&self::key(7))],
        "only the other writer's object stays"
    );
}

/// What `kvl2 ls` lists for an object store: the chunks in the bucket, read from their
/// headers, oldest first; an object that is not a chunk (raw bytes under an id) is skipped.
#[test]
fn listing_a_bucket_reads_chunk_headers_and_skips_the_rest() {
    use kv_l2_adapter::test_utils::{fill, key};
    let server = S3Server::start();
    let store = evicting_object_store(&server, "");
    let mut page = store.pool().allocate().unwrap();
    for i in [3u32, 1, 2] {
        fill(i, &mut page);
        assert!(store.adapter().store(&[key(i, None)], &[&page]).keys[0].is_stored());
        // Last-modified times are kept to the second.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let raw = rig(s3(&server));
    let foreign = raw.transport.register_object(12_345, CHUNK).unwrap();
    let mut bytes = raw.pool.allocate().unwrap();
    fill_chunk(99, bytes.as_mut_slice());
    raw.transport
        .write_pages(
            &[(&bytes, StorageExtent::new(foreign.dev_id(), 0))],
            PageView::Exact,
        )
        .unwrap();
    let spec = store.tiers()[0].spec().unwrap();
    let listed = kv_l2_adapter::list_objects(spec).unwrap();
    let keys: Vec<_> = listed.iter().map(|o| o.key.clone()).collect();
    assert_eq!(
        keys,
        vec![key(3, None), key(1, None), key(2, None)],
        "oldest first"
    );
    assert!(listed.iter().all(|o| o.payload_len == CHUNK as u64));
    let id = object_id(&key(3, None).canonical());
    assert_eq!(listed[0].place, format!("s3://{}/{id}", server.bucket));
    assert_eq!(server.objects().len(), 4, "the raw object is in the bucket");
}

/// A write that fails at the store (the server is down) is counted in
/// `kv_l2_failed_transfers_total{direction="write"}`.
#[test]
fn a_failed_transfer_is_counted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut server = S3Server::start();
    metrics::with_local_recorder(&recorder, || {
        let rig = rig(s3(&server).with_timeout(Duration::from_secs(30)));
        server.stop();
        for result in rig.put(&[1]) {
            assert!(result.is_err(), "the server is down: the write must fail");
        }
    });
    let failed: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key().name() == "kv_l2_failed_transfers_total"
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "direction" && l.value() == "write")
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum();
    assert_eq!(failed, 1, "one failed batch");
}
