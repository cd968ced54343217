//! Settings take effect through the one public builder (`StoreBuilder`), from the configuration
//! a user writes: each test fails if its setting stops changing what the store does.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kv_config::{ConfigLoader, Deployment, EngineConfig, HiCacheConfig};
use kv_integration_tests::services::free_port;
use kv_l2_adapter::test_utils::{fill, key};
use kv_l2_adapter::{Engine, L2Adapter, Store, StoreBuilder, nixl_config_for};

const CHUNK: usize = 256 << 10;
/// Room for 8 chunks of 256 KiB, in GiB.
const EIGHT_CHUNKS_GB: f64 = (8 * CHUNK) as f64 / (1u64 << 30) as f64;

fn lmcache(yaml: &str) -> EngineConfig {
    ConfigLoader::new()
        .with_yaml("lmcache.yaml", yaml.to_owned())
        .load()
        .unwrap_or_else(|err| panic!("{err}"))
        .value
}

fn dynamic_yaml(dir: &Path, extra: &str) -> String {
    format!(
        "chunk_size: 256\nnixl_buffer_device: cpu\nmax_local_cpu_size: 0.0625\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n  nixl_pool_size: 0\n  nixl_path: {}\n{extra}",
        dir.display()
    )
}

fn built(builder: StoreBuilder) -> Store {
    builder
        .with_engine(Engine::Native)
        .with_chunk_bytes(CHUNK)
        .build()
        .unwrap_or_else(|err| panic!("{err}"))
}

/// 1 000 consecutive stores of fresh keys into room for 8: at most a few refused while eviction
/// catches up, and usage never past capacity.
fn keeps_accepting_past_capacity(store: &Store) {
    let adapter = store.adapter();
    let mut page = store.pool().allocate().unwrap();
    let mut refused = 0;
    for i in 0..1_000u32 {
        fill(i, &mut page);
        let report = adapter.store(&[key(i, None)], &[&page]);
        if !report.keys[0].is_stored() {
            refused += 1;
        }
        let usage = adapter.usage();
        assert!(
            usage.used_bytes <= usage.capacity_bytes,
            "store {i}: {} bytes used of {}",
            usage.used_bytes,
            usage.capacity_bytes
        );
    }
    assert!(refused <= 3, "{refused} of 1000 stores refused");
    assert!(adapter.usage().keys > 0);
    // The newest key is served, byte for byte.
    let mut out = store.pool().allocate().unwrap();
    assert!(adapter.lookup_and_pin(&[key(999, None)])[0]);
    assert!(adapter.load(&[key(999, None)], &mut [&mut out])[0]);
    adapter.unlock(&[key(999, None)]);
    assert_eq!(out.as_slice(), page.as_slice());
}

#[test]
fn l2_adapter_json_with_capacity_and_lru_evicts_instead_of_refusing() {
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{EIGHT_CHUNKS_GB}"}},"eviction":{{"eviction_policy":"LRU","trigger_watermark":0.5,"eviction_ratio":0.5}}}}"#,
        dir.path().display()
    );
    let store = built(StoreBuilder::from_l2_adapters([json]));
    assert!(store.tiers()[0].eviction().is_some());
    keeps_accepting_past_capacity(&store);
}

#[test]
fn lmcache_yaml_with_capacity_and_lru_evicts_instead_of_refusing() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dynamic_yaml(
        dir.path(),
        &format!(
            "  nixl_max_capacity_gb: {EIGHT_CHUNKS_GB}\n  nixl_eviction: {{eviction_policy: LRU, trigger_watermark: 0.5, eviction_ratio: 0.5}}\n"
        ),
    );
    let store = built(StoreBuilder::from_lmcache(lmcache(&yaml)));
    keeps_accepting_past_capacity(&store);
}

/// The controller runs on its own too: a store left over the watermark is brought under it
/// without another store.
#[test]
fn the_eviction_controller_brings_usage_under_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dynamic_yaml(
        dir.path(),
        &format!(
            "  nixl_max_capacity_gb: {}\n  nixl_eviction: {{eviction_policy: LRU, trigger_watermark: 0.5, eviction_ratio: 0.5}}\n",
            EIGHT_CHUNKS_GB * 2.0
        ),
    );
    let store = built(
        StoreBuilder::from_lmcache(lmcache(&yaml)).with_eviction_interval(Duration::from_secs(60)),
    );
    let adapter = store.adapter();
    let mut page = store.pool().allocate().unwrap();
    for i in 0..12u32 {
        fill(i, &mut page);
        assert!(adapter.store(&[key(i, None)], &[&page]).keys[0].is_stored());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while adapter.usage().fraction() >= 0.5 {
        assert!(
            std::time::Instant::now() < deadline,
            "usage stayed at {}",
            adapter.usage().fraction()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn eviction_without_a_capacity_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dynamic_yaml(
        dir.path(),
        "  nixl_eviction: {eviction_policy: IsolatedLRU}\n",
    );
    let err = StoreBuilder::from_lmcache(lmcache(&yaml))
        .with_chunk_bytes(CHUNK)
        .with_engine(Engine::Native)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("extra_config.nixl_eviction"), "{err}");
    assert!(err.contains("nixl_max_capacity_gb"), "{err}");
}

#[test]
fn by_gpu_sharding_puts_gpu_2_under_the_third_path() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let list = dirs
        .iter()
        .map(|d| d.path().display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let yaml = format!(
        "nixl_buffer_device: cpu\nmax_local_cpu_size: 0.0625\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n  nixl_pool_size: 4\n  nixl_path: \"{list}\"\n"
    );
    let store = built(
        StoreBuilder::from_lmcache(lmcache(&yaml))
            .with_deployment(Deployment::new().with_worker(0, 0).with_gpu(2)),
    );
    let mut page = store.pool().allocate().unwrap();
    fill(7, &mut page);
    assert!(store.adapter().store(&[key(7, None)], &[&page]).keys[0].is_stored());
    let files = |dir: &tempfile::TempDir| std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(
        dirs.iter().map(files).collect::<Vec<_>>()[..2],
        [0, 0],
        "GPU 2 writes nothing under the first two paths"
    );
    assert!(
        files(&dirs[2]) > 0,
        "GPU 2's slots are under the third path"
    );
}

#[test]
fn hugepages_on_a_machine_without_them_fail_with_the_sysctl_to_run() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let free: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "local_cpu_use_hugepages: true\n{}",
        dynamic_yaml(dir.path(), "")
    );
    let built = StoreBuilder::from_lmcache(lmcache(&yaml))
        .with_chunk_bytes(CHUNK)
        .with_engine(Engine::Native)
        .build();
    // 64 MiB of pool: 32 hugepages of 2 MiB.
    if free >= 32 {
        let store = built.unwrap_or_else(|err| panic!("{err}"));
        assert!(store.pool().stats().total > 0);
    } else {
        let err = built.unwrap_err().to_string();
        assert!(err.contains("sysctl -w vm.nr_hugepages="), "{err}");
        assert!(err.contains("needs 32 hugepages"), "{err}");
    }
}

#[test]
fn max_local_cpu_size_sizes_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let store = built(StoreBuilder::from_lmcache(lmcache(&dynamic_yaml(
        dir.path(),
        "",
    ))));
    // 0.0625 GiB in chunks of 256 KiB.
    assert_eq!(store.pool().stats().total, 256);
}

#[test]
fn sync_mode_and_progress_thread_reach_the_nixl_agent() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, expected) in [
        ("DEFAULT", nixl_core::ThreadSync::None),
        ("NONE", nixl_core::ThreadSync::None),
        ("RW", nixl_core::ThreadSync::ReadWrite),
        ("STRICT", nixl_core::ThreadSync::Strict),
    ] {
        let yaml = dynamic_yaml(
            dir.path(),
            &format!("  nixl_sync_mode: {mode}\n  nixl_enable_prog_thread: false\n"),
        );
        let store = built(StoreBuilder::from_lmcache(lmcache(&yaml)));
        let config = nixl_config_for(store.tiers()[0].spec().unwrap());
        assert_eq!(config.thread_sync, expected, "nixl_sync_mode: {mode}");
        assert!(!config.progress_thread);
    }
}

#[test]
fn gpu_staging_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "nixl_buffer_device: cuda\nnixl_buffer_size: 1048576\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: GDS\n  nixl_pool_size: 0\n  nixl_path: {}\n",
        dir.path().display()
    );
    let err = StoreBuilder::from_lmcache(lmcache(&yaml))
        .with_chunk_bytes(CHUNK)
        .with_engine(Engine::Nixl)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("nixl_buffer_device"), "{err}");
}

#[test]
fn hicache_env_builds_a_store_in_the_folder_of_its_gpu() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let list = format!("{},{}", dirs[0].path().display(), dirs[1].path().display());
    let config = HiCacheConfig::from_env([
        ("SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR", list.as_str()),
        ("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN", "POSIX"),
        ("SGLANG_HICACHE_NIXL_USE_DIRECT_IO", "false"),
    ])
    .unwrap()
    .value;
    let store = built(
        StoreBuilder::from_hicache(config)
            .with_deployment(Deployment::new().with_worker(0, 0).with_gpu(1)),
    );
    let spec = store.tiers()[0].spec().unwrap();
    assert!(
        !spec.use_direct_io,
        "SGLANG_HICACHE_NIXL_USE_DIRECT_IO=false"
    );
    let cache = store.hicache("org/model", 0, 1);
    let mut page = store.pool().allocate().unwrap();
    fill(3, &mut page);
    assert!(cache.set("page-3", &page));
    assert!(cache.exists("page-3"));
    let count = |dir: &tempfile::TempDir| walk(dir.path());
    assert_eq!(
        count(&dirs[0]),
        0,
        "GPU 1 writes nothing in the first folder"
    );
    assert!(
        count(&dirs[1]) > 0,
        "GPU 1's pages are in the second folder"
    );
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn closing_the_store_stops_eviction_and_closes_every_tier() {
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{EIGHT_CHUNKS_GB}"}},"eviction":{{"eviction_policy":"LRU"}}}}"#,
        dir.path().display()
    );
    let store = built(StoreBuilder::from_l2_adapters([json]));
    let adapter: Arc<dyn L2Adapter> = Arc::clone(store.adapter());
    let pool = Arc::clone(store.pool());
    store.close().unwrap();
    let page = pool.allocate().unwrap();
    let report = adapter.store(&[key(1, None)], &[&page]);
    assert!(
        matches!(
            report.keys[0],
            kv_l2_adapter::KeyOutcome::Failed(kv_l2_adapter::Error::Closed)
        ),
        "{:?}",
        report.keys[0]
    );
}

/// NIXL's UCX plugin, loaded in this process, pulls in libnl through UCX's InfiniBand modules,
/// whose destructor crashes at exit on machines without InfiniBand (see nixl-core's README).
/// A test that opens a NIXL channel runs itself again in a child process with those modules
/// left out, as deployments without InfiniBand should; true when this is the child.
fn in_a_child_without_ib(test: &str) -> bool {
    if std::env::var_os("UCX_MODULES").is_some() {
        return true;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("UCX_MODULES", "^ib,rdmacm")
        .env("UCX_TLS", "tcp,self,sm")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{test} in a child process: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    false
}

fn pd_yaml(role: &str, channel: &str, port: u16, extra: &str) -> String {
    format!(
        "enable_pd: true\npd_role: {role}\ntransfer_channel: {channel}\npd_buffer_size: 4194304\npd_buffer_device: cpu\npd_peer_host: 127.0.0.1\npd_peer_init_port: [{port}]\n{extra}"
    )
}

/// `pd_secret` from the LMCache YAML reaches the channel `open_channel` opens: a receiver on
/// every address (`pd_peer_host: 0.0.0.0`) opens with it, and is refused by name without it.
#[test]
fn pd_secret_from_the_yaml_lets_a_receiver_listen_beyond_loopback() {
    if !in_a_child_without_ib("pd_secret_from_the_yaml_lets_a_receiver_listen_beyond_loopback") {
        return;
    }
    let spec = |extra: &str| {
        let yaml = pd_yaml("receiver", "nixl", free_port(), extra)
            .replace("pd_peer_host: 127.0.0.1", "pd_peer_host: 0.0.0.0");
        lmcache(&yaml)
            .channel_spec()
            .unwrap_or_else(|err| panic!("{err}"))
            .value
    };
    let Err(refused) = kv_l2_adapter::open_channel(&spec(""), 64 << 10, &Deployment::new()) else {
        panic!("a receiver on 0.0.0.0 without a secret must be refused");
    };
    let refused = refused.to_string();
    assert!(refused.contains("pd_secret"), "{refused}");
    let opened = kv_l2_adapter::open_channel(
        &spec("pd_secret: a-channel-secret-from-the-yaml\n"),
        64 << 10,
        &Deployment::new(),
    );
    assert!(opened.is_ok(), "with pd_secret: {:?}", opened.err());
}

/// PD from the LMCache keys: a sender and a receiver opened from their configurations move a
/// batch over NIXL (UCX on loopback) into the receiver's pool of `pd_buffer_size` bytes.
#[test]
fn pd_keys_open_a_channel_that_moves_kv() {
    if !in_a_child_without_ib("pd_keys_open_a_channel_that_moves_kv") {
        return;
    }
    let port = free_port();
    let chunk = 64 << 10;
    let spec = |role| {
        lmcache(&pd_yaml(role, "nixl", port, ""))
            .channel_spec()
            .unwrap_or_else(|err| panic!("{err}"))
            .value
    };
    let receiver_spec = spec("receiver");
    let receiver = std::thread::spawn(move || {
        let (channel, pool) =
            kv_l2_adapter::open_channel(&receiver_spec, chunk, &Deployment::new()).unwrap();
        assert_eq!(pool.stats().total, 64, "pd_buffer_size / chunk");
        channel.receive().unwrap_or_else(|err| panic!("{err}"))
    });
    let (sender, pool) =
        kv_l2_adapter::open_channel(&spec("sender"), chunk, &Deployment::new()).unwrap();
    let mut pages = pool.allocate_batch(2).unwrap();
    for (i, page) in pages.iter_mut().enumerate() {
        kv_integration_tests::fill_chunk(i, page.as_mut_slice());
    }
    let refs: Vec<&pinned_alloc::Page> = pages.iter().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Err(err) = sender.send(&refs) {
        assert!(std::time::Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let received = receiver.join().unwrap();
    assert_eq!(received.len(), 2);
    for (sent, got) in pages.iter().zip(&received) {
        assert_eq!(sent.as_slice(), got.as_slice());
    }
}

#[test]
fn channel_settings_it_cannot_honour_are_refused_by_name() {
    let spec = lmcache(&pd_yaml(
        "sender",
        "mock_memory",
        7000,
        "pd_peer_alloc_port: [7001]\n",
    ))
    .channel_spec()
    .unwrap()
    .value;
    let err = kv_l2_adapter::open_channel(&spec, 4096, &Deployment::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pd_peer_alloc_port"), "{err}");
    let gpu = pd_yaml("sender", "mock_memory", 7000, "")
        .replace("pd_buffer_device: cpu", "pd_buffer_device: cuda");
    let spec = lmcache(&gpu).channel_spec().unwrap().value;
    let err = kv_l2_adapter::open_channel(&spec, 4096, &Deployment::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pd_buffer_device"), "{err}");
}

#[test]
fn channel_backends_and_proxy_it_does_not_use_are_refused_by_name() {
    for (extra, key) in [
        ("nixl_backends: [TCP]\n", "nixl_backends"),
        (
            "pd_proxy_host: 127.0.0.1\npd_proxy_port: 7500\n",
            "pd_proxy_host",
        ),
    ] {
        let spec = lmcache(&pd_yaml("sender", "mock_memory", 7100, extra))
            .channel_spec()
            .unwrap()
            .value;
        let err = kv_l2_adapter::open_channel(&spec, 4096, &Deployment::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
    }
    let ucx = lmcache(&pd_yaml(
        "sender",
        "mock_memory",
        7101,
        "nixl_backends: [UCX]\n",
    ))
    .channel_spec()
    .unwrap()
    .value;
    assert!(kv_l2_adapter::open_channel(&ucx, 4096, &Deployment::new()).is_ok());
}

/// `pd_peer_init_port` lists one port per worker: worker 1 talks on the second.
#[test]
fn each_worker_uses_its_own_init_port() {
    let yaml = |role| {
        pd_yaml(role, "mock_memory", 7200, "").replace(
            "pd_peer_init_port: [7200]",
            "pd_peer_init_port: [7200, 7201]",
        )
    };
    let spec = |role| lmcache(&yaml(role)).channel_spec().unwrap().value;
    let worker = |id| Deployment::new().with_worker(id, id);
    let (receiver, _pool) =
        kv_l2_adapter::open_channel(&spec("receiver"), 4096, &worker(1)).unwrap();
    let (sender, pool) = kv_l2_adapter::open_channel(&spec("sender"), 4096, &worker(1)).unwrap();
    let page = pool.allocate().unwrap();
    sender.send(&[&page]).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(receiver.receive().unwrap().len(), 1);
    let (other, pool) = kv_l2_adapter::open_channel(&spec("sender"), 4096, &worker(0)).unwrap();
    let err = other
        .send(&[&pool.allocate().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("7200"),
        "worker 0 talks on the first port: {err}"
    );
    // A worker past the list has no port of its own: refused by name, never wrapped onto
    // another worker's.
    let err = kv_l2_adapter::open_channel(&spec("sender"), 4096, &worker(2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("pd_peer_init_port"), "{err}");
}

/// `chunk_size` (tokens per chunk) with the model's KV shape sizes the pages.
#[test]
fn chunk_size_and_the_kv_shape_size_the_pages() {
    let dir = tempfile::tempdir().unwrap();
    let shape = pinned_alloc::KvShape::new(2, 2, 64, 2);
    for tokens in [16u32, 64] {
        let yaml = dynamic_yaml(dir.path(), "")
            .replace("chunk_size: 256", &format!("chunk_size: {tokens}"));
        let store = StoreBuilder::from_lmcache(lmcache(&yaml))
            .with_kv_shape(shape)
            .with_engine(Engine::Native)
            .build()
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            store.pool().page_bytes() as u64,
            shape.chunk_bytes(tokens),
            "chunk_size: {tokens}"
        );
    }
}

#[test]
fn backends_the_store_cannot_serve_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "nixl_buffer_device: cpu\nmax_local_cpu_size: 0.01\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: DOCA_MEMOS\n  nixl_pool_size: 0\n  nixl_path: {}\n",
        dir.path().display()
    );
    let err = StoreBuilder::from_lmcache(lmcache(&yaml))
        .with_chunk_bytes(CHUNK)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nixl_backend") && err.contains("DOCA_MEMOS"),
        "{err}"
    );
    let hicache = HiCacheConfig::from_env([("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN", "OBJ")])
        .unwrap()
        .value;
    let err = StoreBuilder::from_hicache(hicache)
        .with_chunk_bytes(CHUNK)
        .with_engine(Engine::Nixl)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN"), "{err}");
}

/// The lower-level `build_storage` refuses a pool that does not match the spec's hugepages.
#[test]
fn build_storage_refuses_a_pool_without_the_hugepages_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "local_cpu_use_hugepages: true\n{}",
        dynamic_yaml(dir.path(), "")
    );
    let spec = lmcache(&yaml)
        .storage_spec(&Deployment::new().with_chunk_bytes(CHUNK as u64))
        .unwrap()
        .value;
    let pool = pinned_alloc::PoolConfig::new(CHUNK, 4 * CHUNK as u64)
        .build()
        .unwrap();
    let err = kv_l2_adapter::build_storage(
        &spec,
        &kv_l2_adapter::AdapterContext::new(pool).with_engine(Engine::Native),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("local_cpu_use_hugepages"), "{err}");
}

/// The open flags of this process's descriptors on files under `dir`.
fn open_flags_under(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| {
            let fd = fd.ok()?;
            let target = std::fs::read_link(fd.path()).ok()?;
            target.starts_with(dir).then_some(())?;
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().to_str()?))
                    .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
        .collect()
}

/// `use_direct_io` opens the static pool's files with `O_DIRECT`, and without it they are not.
#[test]
fn use_direct_io_reaches_the_open_flags() {
    const O_DIRECT: u32 = 0o40000;
    for direct in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "nixl_buffer_device: cpu\nmax_local_cpu_size: 0.01\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n  nixl_pool_size: 2\n  nixl_path: {}\n  use_direct_io: {direct}\n",
            dir.path().display()
        );
        let store = built(StoreBuilder::from_lmcache(lmcache(&yaml)));
        let flags = open_flags_under(dir.path());
        assert!(!flags.is_empty(), "the pool's files are open");
        assert!(
            flags.iter().all(|f| (f & O_DIRECT != 0) == direct),
            "use_direct_io: {direct}, flags {flags:?}"
        );
        drop(store);
    }
}

/// `nixl_presence_cache_only`: after a restart, keys the process has not seen are misses (by
/// design), while the default asks storage and finds them.
#[test]
fn presence_cache_only_answers_from_what_this_process_knows() {
    let dir = tempfile::tempdir().unwrap();
    // Per-key files: a segment store rebuilds its index at open, so it knows every key.
    let plain = dynamic_yaml(dir.path(), "  nixl_layout: files\n");
    {
        let store = built(StoreBuilder::from_lmcache(lmcache(&plain)));
        let mut page = store.pool().allocate().unwrap();
        fill(5, &mut page);
        assert!(store.adapter().store(&[key(5, None)], &[&page]).keys[0].is_stored());
    }
    let only = dynamic_yaml(
        dir.path(),
        "  nixl_layout: files\n  nixl_presence_cache: true\n  nixl_presence_cache_only: true\n",
    );
    let store = built(StoreBuilder::from_lmcache(lmcache(&only)));
    assert_eq!(store.adapter().lookup_and_pin(&[key(5, None)]), vec![false]);
    drop(store);
    let store = built(StoreBuilder::from_lmcache(lmcache(&plain)));
    assert_eq!(store.adapter().lookup_and_pin(&[key(5, None)]), vec![true]);
    store.adapter().unlock(&[key(5, None)]);
}

/// Fills a store with eviction from JSON with 12 keys of salt "a" and 4 of salt "b" into room
/// for 16, then lets the controller run; what is left per salt.
fn left_per_salt(eviction: &str) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","max_capacity_gb":"{}"}},"eviction":{eviction}}}"#,
        dir.path().display(),
        EIGHT_CHUNKS_GB * 2.0
    );
    let store = built(
        StoreBuilder::from_l2_adapters([json]).with_eviction_interval(Duration::from_millis(20)),
    );
    let adapter = store.adapter();
    // One batch, so the controller sees the store full once.
    let salt_of = |i: u32| if i < 12 { "a" } else { "b" };
    let keys: Vec<_> = (0..16u32).map(|i| key(i, Some(salt_of(i)))).collect();
    let mut pages = store.pool().allocate_batch(16).unwrap();
    for (i, page) in pages.iter_mut().enumerate() {
        fill(i as u32, page);
    }
    let refs: Vec<&pinned_alloc::Page> = pages.iter().collect();
    assert!(
        adapter
            .store(&keys, &refs)
            .keys
            .iter()
            .all(|k| k.is_stored())
    );
    std::thread::sleep(Duration::from_millis(500));
    let count = |salt: &str, range: std::ops::Range<u32>| {
        range
            .filter(|&i| adapter.stored_size(&key(i, Some(salt))).is_some())
            .count()
    };
    (count("a", 0..12), count("b", 12..16))
}

/// LRU at watermark 0.5 evicts half of all keys; IsolatedLRU evicts only within the salt over
/// its quota; noop evicts nothing; the ratio sets how much goes per pass.
#[test]
fn eviction_policy_and_ratio_decide_what_goes() {
    let (a, b) = left_per_salt(r#"{"eviction_policy":"noop","trigger_watermark":0.5}"#);
    assert_eq!((a, b), (12, 4), "noop evicts nothing");
    let (a, b) = left_per_salt(
        r#"{"eviction_policy":"IsolatedLRU","trigger_watermark":0.9,"eviction_ratio":0.5}"#,
    );
    // Quota 8 chunks per salt: "a" (12) is over 0.9 of it, "b" (4) is not.
    assert_eq!(b, 4, "IsolatedLRU leaves the salt under its quota alone");
    assert_eq!(a, 6, "IsolatedLRU evicts half of the salt over its quota");
    let (a, b) =
        left_per_salt(r#"{"eviction_policy":"LRU","trigger_watermark":0.9,"eviction_ratio":0.25}"#);
    // 16 keys, one pass of 25 % takes the 4 oldest (all of salt "a"), leaving 0.75 < 0.9.
    assert_eq!(
        (a, b),
        (8, 4),
        "LRU with ratio 0.25 takes the oldest quarter"
    );
}

/// `file_size` carves each of the `pool_size` files into several slots (LMCache's meaning):
/// 2 files of 2 slots hold 4 keys, 2 files of one slot hold 2.
#[test]
fn file_size_carves_each_file_into_slots() {
    let stride = CHUNK.next_multiple_of(4096);
    for (file_size, held) in [(Some(2 * stride), 4), (None, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let size_param = file_size.map_or(String::new(), |b| format!(r#","file_size":"{b}""#));
        let json = format!(
            r#"{{"type":"nixl_store","backend":"POSIX","pool_size":2,"backend_params":{{"file_path":"{}","use_direct_io":"false"{size_param}}}}}"#,
            dir.path().display()
        );
        let store = built(StoreBuilder::from_l2_adapters([json]));
        assert_eq!(walk(dir.path()), 2, "pool_size files");
        let adapter = store.adapter();
        let mut page = store.pool().allocate().unwrap();
        for i in 0..4u32 {
            fill(i, &mut page);
            assert!(adapter.store(&[key(i, None)], &[&page]).keys[0].is_stored());
        }
        let kept = (0..4u32)
            .filter(|&i| adapter.stored_size(&key(i, None)).is_some())
            .count();
        assert_eq!(kept, held, "file_size {file_size:?}");
    }
}

/// `shard_dirs` puts each chunk file two hex folders down.
#[test]
fn shard_dirs_put_chunks_in_hex_subfolders() {
    for shard in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let json = format!(
            r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","max_capacity_gb":"1","shard_dirs":"{shard}"}}}}"#,
            dir.path().display()
        );
        let store = built(StoreBuilder::from_l2_adapters([json]));
        let mut page = store.pool().allocate().unwrap();
        fill(1, &mut page);
        assert!(store.adapter().store(&[key(1, None)], &[&page]).keys[0].is_stored());
        let top_level_files = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
            .count();
        assert_eq!(walk(dir.path()), 1);
        assert_eq!(top_level_files == 0, shard, "shard_dirs: {shard}");
    }
}

/// `transfer_channel` picks the implementation: the in-process mock answers a sender with no
/// receiver by name, NIXL fails to reach the receiver's side channel.
#[test]
fn transfer_channel_picks_the_implementation() {
    if !in_a_child_without_ib("transfer_channel_picks_the_implementation") {
        return;
    }
    let port = free_port();
    let error_of = |channel: &str| {
        let spec = lmcache(&pd_yaml("sender", channel, port, ""))
            .channel_spec()
            .unwrap()
            .value;
        match kv_l2_adapter::open_channel(&spec, 4096, &Deployment::new()) {
            Err(err) => err.to_string(),
            Ok((sender, pool)) => sender
                .send(&[&pool.allocate().unwrap()])
                .unwrap_err()
                .to_string(),
        }
    };
    assert!(error_of("mock_memory").contains("no mock receiver"));
    let nixl = error_of("nixl");
    assert!(
        !nixl.contains("mock") && nixl.contains(&port.to_string()),
        "NIXL's side channel names the receiver it could not reach: {nixl}"
    );
}

/// Opening a full store with eviction deletes nothing by itself: the controller's first pass
/// waits an interval (or a store's kick); a store opened without eviction never evicts.
#[test]
fn opening_a_full_store_evicts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","max_capacity_gb":"{EIGHT_CHUNKS_GB}"}},"eviction":{{"eviction_policy":"LRU","trigger_watermark":0.5}}}}"#,
        dir.path().display()
    );
    {
        let store = built(StoreBuilder::from_l2_adapters([json.clone()]).with_eviction(false));
        let mut page = store.pool().allocate().unwrap();
        for i in 0..8u32 {
            fill(i, &mut page);
            assert!(store.adapter().store(&[key(i, None)], &[&page]).keys[0].is_stored());
        }
        fill(8, &mut page);
        assert!(
            !store.adapter().store(&[key(8, None)], &[&page]).keys[0].is_stored(),
            "without eviction a full store refuses"
        );
    }
    let count = || walk(dir.path());
    let before = count();
    let store = built(
        StoreBuilder::from_l2_adapters([json]).with_eviction_interval(Duration::from_millis(300)),
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(count(), before, "nothing evicted at open");
    assert_eq!(store.adapter().usage().keys, 8);
}

/// Stores from 8 threads into a full store with eviction are accepted: passes never overlap
/// (each would evict its ratio of what the other left), and a store refused for room is
/// retried once another thread's pass has made it.
#[test]
fn concurrent_stores_into_a_full_store_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{}"}},"eviction":{{"eviction_policy":"LRU","trigger_watermark":0.5,"eviction_ratio":0.5}}}}"#,
        dir.path().display(),
        EIGHT_CHUNKS_GB * 2.0
    );
    let store = built(StoreBuilder::from_l2_adapters([json]));
    use std::sync::atomic::{AtomicUsize, Ordering};
    let refused = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..8u32 {
            let store = &store;
            let refused = &refused;
            scope.spawn(move || {
                let mut page = store.pool().allocate().unwrap();
                for i in 0..300u32 {
                    let n = t * 1000 + i;
                    fill(n, &mut page);
                    if !store.adapter().store(&[key(n, None)], &[&page]).keys[0].is_stored() {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let refused = refused.into_inner();
    assert!(refused <= 24, "{refused} of 2400 concurrent stores refused");
    let usage = store.adapter().usage();
    assert!(usage.used_bytes <= usage.capacity_bytes);
}

/// What the `--l2-adapter` values warn about reaches the store's warnings.
#[test]
fn l2_adapter_warnings_reach_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","colour":"blue","backend_params":{{"file_path":"{}","max_capacity_gb":"1"}}}}"#,
        dir.path().display()
    );
    let store = built(StoreBuilder::from_l2_adapters([json]));
    assert!(
        store
            .warnings()
            .iter()
            .any(|w| matches!(w, kv_config::Warning::UnknownKey { key, .. } if key == "colour")),
        "{:?}",
        store.warnings()
    );
}

fn segments_json(dir: &Path, capacity_gb: f64, eviction: &str) -> String {
    format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{capacity_gb}","layout":"segments","segment_size_mb":"1","use_direct_io":"true"}}{eviction}}}"#,
        dir.display()
    )
}

/// Bytes of the regular files under `dir`, as the file system counts them.
fn bytes_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// `layout: segments` through the builder, on both engines: the conformance kit, then a
/// reopen that finds every key byte-exact from the segment headers.
#[test]
fn segments_pass_the_conformance_kit_and_survive_a_reopen() {
    for engine in [Engine::Native, Engine::Nixl] {
        let dir = tempfile::tempdir().unwrap();
        let json = segments_json(dir.path(), 0.0625, "");
        {
            let store = StoreBuilder::from_l2_adapters([json.clone()])
                .with_engine(engine)
                .with_chunk_bytes(CHUNK)
                .build()
                .unwrap_or_else(|err| panic!("{engine:?}: {err}"));
            assert_eq!(
                store.tiers()[0].spec().unwrap().layout,
                kv_config::Layout::Segments
            );
            kv_l2_adapter::test_utils::run_all(store.adapter().as_ref(), store.pool());
            kv_l2_adapter::test_utils::store(
                store.adapter().as_ref(),
                store.pool(),
                &[100, 101, 102],
            );
        }
        assert!(
            std::fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".bin")),
            "no file per key"
        );
        let store = StoreBuilder::from_l2_adapters([json])
            .with_engine(engine)
            .with_chunk_bytes(CHUNK)
            .build()
            .unwrap();
        let found = kv_l2_adapter::test_utils::load(
            store.adapter().as_ref(),
            store.pool(),
            &[100, 101, 102],
        );
        assert_eq!(
            found,
            vec![true, true, true],
            "{engine:?}: found again after a reopen"
        );
    }
}

/// Churn on segments: three times the capacity written with LRU eviction on; every store is
/// accepted, the bytes on disk never pass `max_capacity_gb`, and the newest keys are served.
#[test]
fn segments_churn_past_capacity_stays_within_it() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB: 7 segments of 1 MiB, 3 chunks each (the folder keeps 64 KiB of it).
    let capacity_gb = 8.0 / 1024.0;
    let json = segments_json(
        dir.path(),
        capacity_gb,
        r#","eviction":{"eviction_policy":"LRU","trigger_watermark":0.8,"eviction_ratio":0.3}"#,
    );
    let store = built(StoreBuilder::from_l2_adapters([json]));
    let capacity = (capacity_gb * (1u64 << 30) as f64) as u64;
    let adapter = store.adapter();
    let mut page = store.pool().allocate().unwrap();
    let chunks = 3 * capacity as usize / CHUNK;
    let mut refused = 0;
    for i in 0..chunks as u32 {
        fill(i, &mut page);
        if !adapter.store(&[key(i, None)], &[&page]).keys[0].is_stored() {
            refused += 1;
        }
        assert!(
            bytes_on_disk(dir.path()) <= capacity,
            "store {i}: over capacity on disk"
        );
    }
    assert!(refused <= 3, "{refused} of {chunks} stores refused");
    let newest = chunks as u32 - 1;
    let mut out = store.pool().allocate().unwrap();
    assert!(adapter.lookup_and_pin(&[key(newest, None)])[0]);
    assert!(adapter.load(&[key(newest, None)], &mut [&mut out])[0]);
    adapter.unlock(&[key(newest, None)]);
    assert_eq!(out.as_slice(), page.as_slice());
}

/// The YAML spelling: `nixl_layout: segments` builds a segment store.
#[test]
fn nixl_layout_segments_from_the_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dynamic_yaml(
        dir.path(),
        "  nixl_max_capacity_gb: 0.01\n  nixl_layout: segments\n  nixl_segment_size_mb: 2\n",
    );
    let store = built(StoreBuilder::from_lmcache(lmcache(&yaml)));
    let mut page = store.pool().allocate().unwrap();
    fill(1, &mut page);
    assert!(store.adapter().store(&[key(1, None)], &[&page]).keys[0].is_stored());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".kvseg")), "{names:?}");
    assert!(names.iter().any(|n| n == "segments.lock"), "{names:?}");
}

/// One writer per folder: a second writing store is refused, naming the folder's holder; a
/// read-only store opens beside the writer and serves what it can verify.
#[test]
fn segments_take_one_writer_and_readers_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let json = segments_json(dir.path(), 0.0625, "");
    let writer = built(StoreBuilder::from_l2_adapters([json.clone()]));
    kv_l2_adapter::test_utils::store(writer.adapter().as_ref(), writer.pool(), &[7, 8]);
    let err = StoreBuilder::from_l2_adapters([json.clone()])
        .with_engine(Engine::Native)
        .with_chunk_bytes(CHUNK)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&std::process::id().to_string()),
        "names the holder: {err}"
    );
    assert!(
        err.contains("layout: files"),
        "says what shared folders use: {err}"
    );
    let reader = built(StoreBuilder::from_l2_adapters([json]).read_only());
    let found =
        kv_l2_adapter::test_utils::load(reader.adapter().as_ref(), reader.pool(), &[7, 8, 9]);
    assert_eq!(found, vec![true, true, false]);
    let mut page = reader.pool().allocate().unwrap();
    fill(10, &mut page);
    assert!(
        !reader.adapter().store(&[key(10, None)], &[&page]).keys[0].is_stored(),
        "a reader stores nothing"
    );
}

/// A changed capacity keeps the segment size the folder already has, so what is stored
/// survives it.
#[test]
fn segments_survive_a_changed_capacity() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = built(StoreBuilder::from_l2_adapters([segments_json_auto(
            dir.path(),
            0.03125,
        )]));
        kv_l2_adapter::test_utils::store(store.adapter().as_ref(), store.pool(), &[1, 2]);
    }
    let store = built(StoreBuilder::from_l2_adapters([segments_json_auto(
        dir.path(),
        0.0625,
    )]));
    let found = kv_l2_adapter::test_utils::load(store.adapter().as_ref(), store.pool(), &[1, 2]);
    assert_eq!(found, vec![true, true]);
}

/// Segments without `segment_size_mb`: the store picks the size.
fn segments_json_auto(dir: &Path, capacity_gb: f64) -> String {
    format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{capacity_gb}","layout":"segments"}}}}"#,
        dir.display()
    )
}

/// Keys `0, 3, 6, …` that are still stored, marked most recently used: with three chunks to a
/// segment and one key per store, one key in every segment.
fn touch_every_third(adapter: &dyn L2Adapter, below: u32) {
    let hot: Vec<_> = (0..below).step_by(3).map(|i| key(i, None)).collect();
    let found = adapter.lookup_and_pin(&hot);
    let pinned: Vec<_> = hot
        .into_iter()
        .zip(found)
        .filter(|(_, found)| *found)
        .map(|(key, _)| key)
        .collect();
    adapter.unlock(&pinned);
}

/// LRU over segments with a hot key in every segment: eviction frees whole segments (the one
/// holding the oldest key, hot key and all), so a store that needs room evicts about one
/// segment's worth, where evicting the oldest keys one by one would take every cold key in the
/// store before any segment came free.
#[test]
fn a_hot_key_in_every_segment_does_not_stop_eviction() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB: 15 segments of 1 MiB, 3 chunks each (the folder keeps 64 KiB of it).
    let capacity_gb = 16.0 / 1024.0;
    let json = segments_json(
        dir.path(),
        capacity_gb,
        r#","eviction":{"eviction_policy":"LRU","trigger_watermark":0.95,"eviction_ratio":0.1}"#,
    );
    let store = built(StoreBuilder::from_l2_adapters([json]));
    let capacity = (capacity_gb * (1u64 << 30) as f64) as u64;
    let adapter = store.adapter();
    let mut page = store.pool().allocate().unwrap();
    let mut refused = Vec::new();
    let mut fewest = usize::MAX;
    for i in 0..200u32 {
        fill(i, &mut page);
        let report = adapter.store(&[key(i, None)], &[&page]);
        if !report.keys[0].is_stored() {
            refused.push((i, format!("{:?}", report.keys[0])));
        }
        touch_every_third(adapter.as_ref(), i + 1);
        if i >= 45 {
            fewest = fewest.min(adapter.usage().keys);
        }
        assert!(
            bytes_on_disk(dir.path()) <= capacity,
            "store {i}: over capacity on disk"
        );
    }
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert!(
        fewest >= 36,
        "once full, at most a fifth of the 45 chunks is ever evicted at once: {fewest} left"
    );
    let newest = kv_l2_adapter::test_utils::load(adapter.as_ref(), store.pool(), &[197, 198, 199]);
    assert_eq!(newest, vec![true, true, true]);
}

/// Segment files are made as segments fill: a store whose capacity is far beyond the disk
/// opens at once, takes one segment's file for its first chunk, and none more on a reopen.
#[test]
fn segments_take_disk_space_as_they_fill() {
    let dir = tempfile::tempdir().unwrap();
    let segment_files = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".kvseg")
            })
            .count()
    };
    // 1 PiB of capacity in 1 MiB segments would be 10^9 files: refused by name; 512 GiB is not.
    let json = segments_json(dir.path(), 512.0, "");
    {
        let store = built(StoreBuilder::from_l2_adapters([json.clone()]));
        assert_eq!(segment_files(), 0, "opening makes no segment file");
        kv_l2_adapter::test_utils::store(store.adapter().as_ref(), store.pool(), &[1]);
        assert_eq!(segment_files(), 1, "the first chunk makes one");
        kv_l2_adapter::test_utils::store(store.adapter().as_ref(), store.pool(), &[2, 3, 4]);
        assert_eq!(segment_files(), 2, "three chunks to a segment");
        assert!(bytes_on_disk(dir.path()) <= 2 * (1 << 20) + 64 * 1024);
    }
    let store = built(StoreBuilder::from_l2_adapters([json]));
    assert_eq!(segment_files(), 2, "a reopen makes none");
    let found =
        kv_l2_adapter::test_utils::load(store.adapter().as_ref(), store.pool(), &[1, 2, 3, 4]);
    assert_eq!(found, vec![true; 4]);
}

/// Runs `test` again in a child whose `KV_SMALL_DISK` folder is a 6 MiB tmpfs, in its own user
/// and mount namespaces (`unshare -rm`); true when this is the child.
fn on_a_small_disk(test: &str) -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("KV_SMALL_DISK") {
        return Some(dir.into());
    }
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "mount -t tmpfs -o size=6m tmpfs '{}' && exec '{}' --exact {test} --test-threads=1 --nocapture",
        dir.path().display(),
        std::env::current_exe().unwrap().display()
    );
    let output = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("KV_SMALL_DISK", dir.path())
        .output()
        .unwrap_or_else(|err| panic!("{test} needs unshare(1) (util-linux): {err}"));
    assert!(
        output.status.success(),
        "{test} on a 6 MiB tmpfs in a child (it needs user and mount namespaces, `unshare -rm`, \
         to make a small file system): {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    None
}

/// A capacity beyond what the disk holds: on a 6 MiB file system and 64 MiB of capacity, LRU
/// eviction keeps every store accepted once the disk is full (it reuses the segments it made),
/// and without eviction the refusal names the full file system.
#[test]
fn a_full_disk_below_capacity_evicts_or_refuses_by_name() {
    let Some(dir) = on_a_small_disk("a_full_disk_below_capacity_evicts_or_refuses_by_name") else {
        return;
    };
    let evicting = dir.join("evicting");
    std::fs::create_dir(&evicting).unwrap();
    let json = segments_json(
        &evicting,
        64.0 / 1024.0,
        r#","eviction":{"eviction_policy":"LRU","trigger_watermark":0.8,"eviction_ratio":0.2}"#,
    );
    {
        let store = built(StoreBuilder::from_l2_adapters([json]));
        let adapter = store.adapter();
        let mut page = store.pool().allocate().unwrap();
        for i in 0..40u32 {
            fill(i, &mut page);
            let report = adapter.store(&[key(i, None)], &[&page]);
            assert!(report.keys[0].is_stored(), "store {i}: {report:?}");
        }
        let found = kv_l2_adapter::test_utils::load(adapter.as_ref(), store.pool(), &[38, 39]);
        assert_eq!(found, vec![true, true]);
    }
    std::fs::remove_dir_all(&evicting).unwrap();

    let refusing = dir.join("refusing");
    std::fs::create_dir(&refusing).unwrap();
    let store = built(StoreBuilder::from_l2_adapters([segments_json(
        &refusing,
        64.0 / 1024.0,
        "",
    )]));
    let adapter = store.adapter();
    let mut page = store.pool().allocate().unwrap();
    let refusal = (0..40u32).find_map(|i| {
        fill(i, &mut page);
        let report = adapter.store(&[key(i, None)], &[&page]);
        (!report.keys[0].is_stored()).then(|| format!("{:?}", report.keys[0]))
    });
    let refusal = refusal.expect("a 6 MiB disk cannot take 40 chunks of 256 KiB");
    assert!(refusal.contains("DiskFull"), "{refusal}");
    assert!(
        refusal.contains(&refusing.display().to_string()),
        "{refusal}"
    );
}

/// Bytes the file system holds for `dir` and everything below it (files renamed or removed
/// during the walk are skipped).
fn bytes_below(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            Some(if meta.is_dir() {
                bytes_below(&entry.path())
            } else {
                meta.blocks() * 512
            })
        })
        .sum()
}

/// Per-key files under churn: the deleted files kept for reuse count against
/// `max_capacity_gb`, so chunk files and spares together stay within it (each chunk file also
/// has its 4 KiB header, which LMCache does not count either), and evicting everything gives
/// the disk back but for a sixteenth of the capacity kept as spares.
#[test]
fn per_key_files_and_their_spares_stay_within_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = 32;
    let capacity = (chunks * CHUNK) as u64;
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","max_capacity_gb":"{}"}},"eviction":{{"eviction_policy":"LRU","trigger_watermark":0.8,"eviction_ratio":0.25}}}}"#,
        dir.path().display(),
        capacity as f64 / (1u64 << 30) as f64
    );
    let store = built(StoreBuilder::from_l2_adapters([json]));
    let adapter = store.adapter();
    let mut page = store.pool().allocate().unwrap();
    let headers = chunks as u64 * 4096;
    for i in 0..200u32 {
        fill(i, &mut page);
        let report = adapter.store(&[key(i, None)], &[&page]);
        assert!(report.keys[0].is_stored(), "store {i}: {report:?}");
        let on_disk = bytes_below(dir.path());
        assert!(
            on_disk <= capacity + headers,
            "store {i}: {on_disk} bytes on disk, capacity {capacity}"
        );
    }
    adapter.evict(1.0, None);
    assert_eq!(adapter.usage().keys, 0);
    let left = bytes_below(dir.path());
    assert!(
        left <= capacity / 16 + 2 * 4096,
        "{left} bytes left on disk once everything is evicted, capacity {capacity}"
    );
}

/// Waits up to ten seconds for `keys` to be visible (a queued put is once it is written).
fn visible_soon(adapter: &dyn L2Adapter, keys: &[kv_l2_adapter::ChunkKey]) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if adapter.batched_contains(keys) == keys.len() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// `nixl_async_put` on segments with eviction: a queued put that finds every segment holding
/// live data (usage under the watermark, so no pass runs) evicts the oldest segment and is
/// written, where it would otherwise be dropped with only a log line.
#[test]
fn a_queued_put_refused_for_room_evicts_and_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dynamic_yaml(
        dir.path(),
        "  nixl_async_put: true\n  nixl_layout: segments\n  nixl_segment_size_mb: 1\n  nixl_max_capacity_gb: 0.00396728515625\n  nixl_eviction:\n    eviction_policy: LRU\n    trigger_watermark: 0.95\n    eviction_ratio: 0.1\n",
    );
    let store = built(StoreBuilder::from_lmcache(lmcache(&yaml)));
    let adapter = store.adapter();
    let mut page = store.pool().allocate().unwrap();
    let keys: Vec<_> = (0..13u32).map(|i| key(i, None)).collect();
    let mut put = |i: usize| {
        fill(i as u32, &mut page);
        let report = adapter.store(&keys[i..=i], &[&page]);
        assert!(
            matches!(report.keys[0], kv_l2_adapter::KeyOutcome::Queued { .. }),
            "written in the background: {report:?}"
        );
        visible_soon(adapter.as_ref(), &keys[i..=i])
    };
    // Four segments of three chunks (4 MiB and the folder's 64 KiB): 0-2, 3-5, 6-8, then 9,
    // 10; usage stays under the mark.
    for i in 0..11 {
        assert!(put(i), "key {i} written");
    }
    assert_eq!(
        adapter.delete(&[key(0, None), key(3, None), key(6, None)]),
        3
    );
    assert!(put(11), "the last segment's last chunk");
    // Every segment holds live data now: the next chunk needs a segment freed.
    assert!(put(12), "the queued put was written");
    let loaded = kv_l2_adapter::test_utils::load(adapter.as_ref(), store.pool(), &[12, 11]);
    assert_eq!(
        loaded,
        vec![true, true],
        "the newest stay; the oldest segment went"
    );
}

/// The ranks of one instance share one `nixl_path` (LMCache's dynamic mode has no path per
/// worker): on segments, worker 0 writes the folder and worker `N` its `worker-N/`, so both
/// open at once, each serving its own keys, and each finds them again after a reopen.
#[test]
fn workers_sharing_one_nixl_path_get_their_own_segments() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dynamic_yaml(dir.path(), "  nixl_max_capacity_gb: 0.0625\n");
    let open = |worker: u32| {
        let store = built(
            StoreBuilder::from_lmcache(lmcache(&yaml))
                .with_deployment(Deployment::new().with_worker(worker, worker)),
        );
        assert_eq!(
            store.tiers()[0].spec().unwrap().layout,
            kv_config::Layout::Segments,
            "segments are the default"
        );
        store
    };
    {
        let (zero, one) = (open(0), open(1));
        kv_l2_adapter::test_utils::store(zero.adapter().as_ref(), zero.pool(), &[1, 2]);
        kv_l2_adapter::test_utils::store(one.adapter().as_ref(), one.pool(), &[3]);
    }
    let has_segments = |folder: &Path| {
        std::fs::read_dir(folder)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".kvseg"))
    };
    assert!(has_segments(dir.path()) && has_segments(&dir.path().join("worker-1")));
    let (zero, one) = (open(0), open(1));
    let found = |store: &Store, keys: &[u32]| {
        kv_l2_adapter::test_utils::load(store.adapter().as_ref(), store.pool(), keys)
    };
    assert_eq!(found(&zero, &[1, 2, 3]), vec![true, true, false]);
    assert_eq!(found(&one, &[3, 1]), vec![true, false]);
}

/// A folder of per-key files written before segments were the default opens as files when
/// the configuration names no layout: what it holds is still served, and new chunks join it.
#[test]
fn a_folder_of_per_key_files_stays_files_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let json = |layout: &str| {
        format!(
            r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"0.0625"{layout}}}}}"#,
            dir.path().display()
        )
    };
    {
        let store = built(StoreBuilder::from_l2_adapters([json(
            r#","layout":"files""#,
        )]));
        kv_l2_adapter::test_utils::store(store.adapter().as_ref(), store.pool(), &[1, 2]);
    }
    let store = built(StoreBuilder::from_l2_adapters([json("")]));
    let found = kv_l2_adapter::test_utils::load(store.adapter().as_ref(), store.pool(), &[1, 2]);
    assert_eq!(found, vec![true, true]);
    kv_l2_adapter::test_utils::store(store.adapter().as_ref(), store.pool(), &[3]);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".kvseg")), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".bin")).count(),
        3,
        "{names:?}"
    );
}
