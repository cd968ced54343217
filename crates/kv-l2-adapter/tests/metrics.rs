//! Every metric the README documents moves as a store/lookup/load/delete/evict sequence says,
//! on a store built from `--l2-adapter` JSON through `StoreBuilder`, with a recorder installed.

use std::path::Path;
use std::time::Duration;

use kv_l2_adapter::{ChunkKey, Engine, KeyOutcome, ObjectKey, Store, StoreBuilder};
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use pinned_alloc::Page;

const CHUNK: usize = 64 << 10;

fn key(i: u32, salt: Option<&str>) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: "metrics/model".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: i.to_be_bytes().to_vec(),
        cache_salt: salt.map(str::to_owned),
    })
}

fn fill(i: u32, page: &mut Page) {
    for (n, byte) in page.as_mut_slice().iter_mut().enumerate() {
        *byte = (n as u32)
            .wrapping_mul(31)
            .wrapping_add(i.wrapping_mul(7919)) as u8;
    }
}

/// A dynamic POSIX store of per-key files in `dir` with room for 8 chunks, from an LMCache
/// YAML, with `nixl_async_put` as given.
fn build(dir: &Path, async_put: bool) -> Store {
    let gb = (8 * CHUNK) as f64 / (1u64 << 30) as f64;
    let yaml = format!(
        "chunk_size: 256\nnixl_buffer_device: cpu\nmax_local_cpu_size: 0.05\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n  nixl_pool_size: 0\n  nixl_path: {}\n  nixl_layout: files\n  nixl_max_capacity_gb: {gb}\n  nixl_async_put: {async_put}\n",
        dir.join("kv").display()
    );
    let engine = kv_config::ConfigLoader::new()
        .with_yaml("metrics.yaml", yaml)
        .load()
        .unwrap_or_else(|err| panic!("{err}"))
        .value;
    StoreBuilder::from_lmcache(engine)
        .with_chunk_bytes(CHUNK)
        .with_engine(Engine::Native)
        .build()
        .unwrap_or_else(|err| panic!("{err}"))
}

/// A recorder that keeps every figure where the test can read it without resetting it
/// (the crate's debugging recorder zeroes what it snapshots).
#[derive(Clone)]
struct Figures(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for Figures {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

impl Figures {
    fn new() -> Self {
        Self(Arc::new(Registry::atomic()))
    }

    /// The value of one metric of the files tier (plus `extra` labels): counters and gauges
    /// as numbers, histograms as their sample count.
    fn get(&self, name: &str, extra: &[(&str, &str)]) -> f64 {
        let wanted: Vec<(&str, &str)> = [
            ("adapter", "nixl_store_dynamic"),
            ("backend", "POSIX"),
            ("layout", "files"),
            ("tier", "0"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
        let matches = |key: &Key| {
            key.name() == name
                && key.labels().count() == wanted.len()
                && wanted
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
        };
        let load = std::sync::atomic::Ordering::Acquire;
        if let Some((_, c)) = self
            .0
            .get_counter_handles()
            .into_iter()
            .find(|(k, _)| matches(k))
        {
            return c.load(load) as f64;
        }
        if let Some((_, g)) = self
            .0
            .get_gauge_handles()
            .into_iter()
            .find(|(k, _)| matches(k))
        {
            return f64::from_bits(g.load(load));
        }
        if let Some((_, h)) = self
            .0
            .get_histogram_handles()
            .into_iter()
            .find(|(k, _)| matches(k))
        {
            return h.data().len() as f64;
        }
        panic!("metric {name} {extra:?} was never registered")
    }

    /// The unlabelled counter of a name (nixl-core's checksum failures), 0 before its first.
    fn plain_counter(&self, name: &str) -> u64 {
        self.0
            .get_counter_handles()
            .into_iter()
            .find(|(k, _)| k.name() == name && k.labels().count() == 0)
            .map_or(0, |(_, c)| c.load(std::sync::atomic::Ordering::Acquire))
    }
}

#[test]
fn every_documented_metric_moves_as_the_operations_say() {
    let figures = Figures::new();
    metrics::with_local_recorder(&figures, || {
        let dir = tempfile::tempdir().unwrap();
        let store = build(dir.path(), false);
        let adapter = store.adapter();
        let f = |name: &str, extra: &[(&str, &str)]| figures.get(name, extra);
        assert_eq!(f("kv_l2_capacity_bytes", &[]), (8 * CHUNK) as f64);

        let mut pages = store.pool().allocate_batch(9).unwrap();
        for (i, page) in pages.iter_mut().enumerate() {
            fill(i as u32, page);
        }
        let refs: Vec<&Page> = pages.iter().collect();
        // Nine keys into room for eight: eight stored, one refused for capacity.
        let keys: Vec<_> = (0..9).map(|i| key(i, None)).collect();
        let report = adapter.store(&keys, &refs);
        assert!(matches!(report.keys[8], KeyOutcome::Failed(_)));
        assert_eq!(f("kv_l2_store_keys_total", &[("outcome", "stored")]), 8.0);
        assert_eq!(f("kv_l2_store_keys_total", &[("outcome", "failed")]), 1.0);
        assert_eq!(f("kv_l2_refusals_total", &[("reason", "capacity")]), 1.0);
        assert_eq!(f("kv_l2_store_bytes_total", &[]), (8 * CHUNK) as f64);
        adapter.store(&keys[..1], &refs[..1]);
        assert_eq!(
            f("kv_l2_store_keys_total", &[("outcome", "already_present")]),
            1.0
        );
        // Two keys, one page: the second is refused as invalid.
        adapter.store(&[key(20, None), key(21, None)], &refs[..1]);
        assert_eq!(f("kv_l2_refusals_total", &[("reason", "invalid")]), 1.0);
        assert_eq!(f("kv_l2_used_bytes", &[]), (8 * CHUNK) as f64);
        assert_eq!(f("kv_l2_stored_keys", &[]), 8.0);

        let hits = adapter.lookup_and_pin(&[key(0, None), key(1, None), key(99, None)]);
        assert_eq!(hits, vec![true, true, false]);
        assert_eq!(f("kv_l2_lookup_keys_total", &[]), 3.0);
        assert_eq!(f("kv_l2_lookup_hits_total", &[]), 2.0);
        assert_eq!(f("kv_l2_lookup_misses_total", &[]), 1.0);
        assert_eq!(f("kv_l2_pinned_keys", &[]), 2.0);

        let mut targets = store.pool().allocate_batch(2).unwrap();
        let mut refs: Vec<&mut Page> = targets.iter_mut().collect();
        assert_eq!(adapter.load(&keys[..2], &mut refs), vec![true, true]);
        adapter.unlock(&keys[..2]);
        assert_eq!(f("kv_l2_pinned_keys", &[]), 0.0);
        assert_eq!(f("kv_l2_load_keys_total", &[]), 2.0);
        assert_eq!(f("kv_l2_load_hits_total", &[]), 2.0);
        assert_eq!(f("kv_l2_load_bytes_total", &[]), (2 * CHUNK) as f64);

        // Every chunk file damaged in its payload: a load then misses on its checksum.
        for entry in walk(dir.path()) {
            let mut bytes = std::fs::read(&entry).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&entry, bytes).unwrap();
        }
        let checksums = figures.plain_counter("kv_l2_checksum_failures_total");
        let mut one = store.pool().allocate().unwrap();
        assert_eq!(adapter.load(&keys[2..3], &mut [&mut one]), vec![false]);
        assert_eq!(f("kv_l2_load_misses_total", &[]), 1.0);
        assert_eq!(
            figures.plain_counter("kv_l2_checksum_failures_total"),
            checksums + 1
        );

        assert_eq!(adapter.delete(&keys[3..4]), 1);
        assert_eq!(f("kv_l2_deleted_keys_total", &[]), 1.0);
        let report = adapter.evict(0.5, None);
        assert!(report.evicted > 0);
        assert_eq!(f("kv_l2_evicted_keys_total", &[]), report.evicted as f64);
        assert_eq!(
            f("kv_l2_evicted_bytes_total", &[]),
            report.freed_bytes as f64
        );
        let usage = adapter.usage();
        assert_eq!(f("kv_l2_used_bytes", &[]), usage.used_bytes as f64);
        assert_eq!(f("kv_l2_stored_keys", &[]), usage.keys as f64);

        for (operation, at_least) in [
            ("store", 3.0),
            ("lookup", 1.0),
            ("load", 2.0),
            ("delete", 1.0),
            ("evict", 1.0),
        ] {
            let samples = f("kv_l2_batch_seconds", &[("operation", operation)]);
            assert!(samples >= at_least, "{operation}: {samples} batch samples");
        }
        assert_eq!(f("kv_l2_inflight_batches", &[]), 0.0);
        assert_eq!(f("kv_l2_queued_puts", &[]), 0.0);
        store.close().unwrap();
    });
}

/// Background puts: the queue gauge counts chunks queued and comes back to zero once they are
/// written, and the outcome counter says `queued`.
#[test]
fn queued_puts_are_counted_until_written() {
    let figures = Figures::new();
    metrics::with_local_recorder(&figures, || {
        let dir = tempfile::tempdir().unwrap();
        let store = build(dir.path(), true);
        let adapter = store.adapter();
        let mut pages = store.pool().allocate_batch(4).unwrap();
        for (i, page) in pages.iter_mut().enumerate() {
            fill(i as u32, page);
        }
        let refs: Vec<&Page> = pages.iter().collect();
        let keys: Vec<_> = (0..4).map(|i| key(i, None)).collect();
        let report = adapter.store(&keys, &refs);
        assert!(
            report
                .keys
                .iter()
                .all(|k| matches!(k, KeyOutcome::Queued { .. }))
        );
        let f = |name: &str, extra: &[(&str, &str)]| figures.get(name, extra);
        assert_eq!(f("kv_l2_store_keys_total", &[("outcome", "queued")]), 4.0);
        let started = std::time::Instant::now();
        while f("kv_l2_queued_puts", &[]) != 0.0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the queue never drained"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        store.close().unwrap();
        assert_eq!(f("kv_l2_queued_puts", &[]), 0.0);
    });
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "bin") {
            files.push(path);
        }
    }
    files
}
