//! The segment store: round trips, restarts (index rebuilt from headers), deletes and
//! overwrites across restarts, torn entries, exact capacity and segment reuse, one writer per
//! folder, read-only opens beside a writer, 8 threads at once, and SIGKILLed writers (the test
//! re-runs itself as the writing child). On the native io_uring engine, and on NIXL's POSIX
//! plugin when the NIXL runtime is installed (`cargo xtask setup`); without it the NIXL tests
//! say so on stderr, and fail instead when `KV_REQUIRE_NIXL=1`.
#![cfg(target_os = "linux")]

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nixl_core::{NixlConfig, NixlTransport, Registration, StorageExtent, Transport, TransportExt};
use nixl_file::{Error, FileKey, SegmentConfig, SegmentStore, UringConfig, UringTransport};
use pinned_alloc::{PAGE_ALIGN, Page, PagePool, PoolConfig};

/// Bytes of a full chunk (not a multiple of 4 KiB, so that padding is exercised).
const CHUNK: usize = 8 * 1024 + 100;
/// One entry on disk: its header and the chunk padded to 4 KiB.
const ENTRY: u64 = 4096 + 12 * 1024;
/// A segment of four full entries after its header.
const SEGMENT: u64 = 4096 + 4 * ENTRY;

fn uring() -> Arc<dyn Transport> {
    Arc::new(UringTransport::new(UringConfig::default()).unwrap())
}

/// NIXL's POSIX plugin, or `None` (said on stderr) when the runtime is missing.
fn nixl() -> Option<Arc<dyn Transport>> {
    match NixlTransport::new(NixlConfig::new("POSIX")) {
        Ok(transport) => Some(Arc::new(transport)),
        Err(err) if std::env::var_os("KV_REQUIRE_NIXL").is_none() => {
            eprintln!("SKIPPED on NIXL POSIX: {err} (KV_REQUIRE_NIXL=1 makes this a failure)");
            None
        }
        Err(err) => panic!("NIXL POSIX required: {err}"),
    }
}

struct Fixture {
    transport: Arc<dyn Transport>,
    pool: Arc<PagePool>,
    _registration: Registration,
}

impl Fixture {
    fn new(transport: Arc<dyn Transport>, pages: usize) -> Self {
        let pool = PoolConfig::new(CHUNK, (pages * CHUNK.next_multiple_of(PAGE_ALIGN)) as u64)
            .build()
            .unwrap();
        let registration = transport.register_pool(&pool).unwrap();
        Self {
            transport,
            pool,
            _registration: registration,
        }
    }

    fn open(&self, config: SegmentConfig) -> SegmentStore {
        SegmentStore::open(Arc::clone(&self.transport), config).unwrap()
    }

    /// The page of chunk `i` (version `v`): `len_of(i)` bytes, every byte depending on both.
    fn page(&self, i: usize, v: u8) -> Page {
        let mut page = self.pool.allocate().unwrap();
        page.set_len(len_of(i));
        fill(i, v, page.as_mut_slice());
        page
    }

    fn put(&self, store: &SegmentStore, keys: &[usize], v: u8) -> Vec<Result<u64, Error>> {
        let pages: Vec<Page> = keys.iter().map(|&i| self.page(i, v)).collect();
        let keys: Vec<FileKey> = keys.iter().map(|&i| key(i)).collect();
        let items: Vec<_> = keys.iter().zip(&pages).collect();
        store.put(&items)
    }

    /// Per key: `Some(true)` a hit whose every byte is version `v`'s, `Some(false)` a hit with
    /// other bytes, `None` a miss.
    fn check(&self, store: &SegmentStore, keys: &[usize], v: u8) -> Vec<Option<bool>> {
        keys.chunks(8)
            .flat_map(|piece| self.check_piece(store, piece, v))
            .collect()
    }

    fn check_piece(&self, store: &SegmentStore, keys: &[usize], v: u8) -> Vec<Option<bool>> {
        let mut pages: Vec<Page> = keys
            .iter()
            .map(|_| {
                let mut page = self.pool.allocate().unwrap();
                page.as_mut_slice().fill(0xEE);
                page
            })
            .collect();
        let ks: Vec<FileKey> = keys.iter().map(|&i| key(i)).collect();
        let mut items: Vec<_> = ks.iter().zip(pages.iter_mut()).collect();
        let hits = store.get(&mut items);
        drop(items);
        hits.into_iter()
            .zip(keys.iter().zip(&pages))
            .map(|(hit, (&i, page))| {
                hit.unwrap().then(|| {
                    let mut want = vec![0u8; len_of(i)];
                    fill(i, v, &mut want);
                    page.as_slice() == want.as_slice()
                })
            })
            .collect()
    }

    fn all_exact(&self, store: &SegmentStore, keys: &[usize], v: u8) {
        for (i, verdict) in keys.iter().zip(self.check(store, keys, v)) {
            assert_eq!(verdict, Some(true), "key {i} (version {v})");
        }
    }
}

/// Every third chunk is partial; lengths vary, some are whole 4 KiB blocks.
fn len_of(i: usize) -> usize {
    match i % 3 {
        0 => CHUNK,
        1 => 4096,
        _ => 1 + (i * 977) % CHUNK,
    }
}

fn fill(i: usize, v: u8, buf: &mut [u8]) {
    let mut state = ((i as u64) << 8 | u64::from(v))
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for word in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
}

fn key(i: usize) -> FileKey {
    FileKey {
        model: "org/segment-test".to_owned(),
        kv_rank: 1,
        group_id: (i % 3) as u32,
        chunk_hash: (i as u64).to_be_bytes().to_vec(),
        cache_salt: (i % 5 == 0).then(|| "tenant".to_owned()),
    }
}

fn config(dir: &Path, segments: u64) -> SegmentConfig {
    SegmentConfig::new([dir])
        .with_segment_bytes(SEGMENT)
        .with_capacity_bytes(segments * SEGMENT)
}

fn segment_files(dirs: &[&Path]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| fs::read_dir(d).unwrap().flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "kvseg"))
        .collect();
    files.sort();
    files
}

/// Offsets of the entry headers in a segment file (blocks whose frame magic is ours, past the
/// segment header).
fn entry_offsets(path: &Path) -> Vec<u64> {
    let bytes = fs::read(path).unwrap();
    (4096..bytes.len())
        .step_by(4096)
        .filter(|&at| &bytes[at + 40..at + 48] == b"KVL2SEG1")
        .map(|at| at as u64)
        .collect()
}

fn round_trip(transport: Arc<dyn Transport>) {
    let fixture = Fixture::new(transport, 128);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 80));
    let keys: Vec<usize> = (0..300).collect();
    for batch in keys.chunks(50) {
        for (i, result) in batch.iter().zip(fixture.put(&store, batch, 1)) {
            assert_eq!(result.unwrap(), len_of(*i) as u64, "key {i}");
        }
    }
    for batch in keys.chunks(50) {
        fixture.all_exact(&store, batch, 1);
    }
    for &i in &keys {
        assert_eq!(store.stored_size(&key(i)), Some(len_of(i) as u64));
        assert!(store.contains(&key(i)));
    }
    assert!(!store.contains(&key(10_000)));
    assert_eq!(fixture.check(&store, &[10_000], 1), vec![None]);
    let listed = store.list();
    assert_eq!(listed.len(), keys.len());
    assert!(
        listed.windows(2).all(|w| w[0].seq < w[1].seq),
        "write order"
    );
    let usage = store.usage();
    assert_eq!(usage.keys, keys.len());
    assert_eq!(usage.capacity_bytes, 80 * SEGMENT);
}

#[test]
fn many_keys_round_trip_uring() {
    round_trip(uring());
}

#[test]
fn many_keys_round_trip_nixl_posix() {
    if let Some(transport) = nixl() {
        round_trip(transport);
    }
}

#[test]
fn direct_io_round_trip_and_reopen() {
    let fixture = Fixture::new(uring(), 64);
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<usize> = (0..40).collect();
    let store = fixture.open(
        config(dir.path(), 16)
            .with_direct_io(true)
            .with_durable(true),
    );
    assert!(fixture.put(&store, &keys, 3).iter().all(Result::is_ok));
    fixture.all_exact(&store, &keys, 3);
    drop(store);
    let store = fixture.open(config(dir.path(), 16).with_direct_io(true));
    fixture.all_exact(&store, &keys, 3);
}

fn reopen_deletes_and_overwrites(transport: Arc<dyn Transport>) {
    let fixture = Fixture::new(transport, 64);
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<usize> = (0..60).collect();
    let store = fixture.open(config(dir.path(), 40));
    assert!(fixture.put(&store, &keys, 1).iter().all(Result::is_ok));
    let before = store.list();
    drop(store);

    let store = fixture.open(config(dir.path(), 40));
    assert_eq!(
        store.list(),
        before,
        "the index rebuilt from headers is the one written"
    );
    fixture.all_exact(&store, &keys, 1);
    let (gone, kept): (Vec<usize>, Vec<usize>) = keys.iter().partition(|&&i| i % 4 == 0);
    for &i in &gone {
        assert!(store.delete(&key(i)).unwrap());
    }
    assert!(
        !store.delete(&key(gone[0])).unwrap(),
        "a second delete finds nothing"
    );
    let rewritten: Vec<usize> = kept.iter().copied().filter(|i| i % 3 == 0).collect();
    assert!(fixture.put(&store, &rewritten, 2).iter().all(Result::is_ok));
    // A key rewritten, then deleted in the same run: neither version may come back.
    let dropped = rewritten[0];
    assert!(store.delete(&key(dropped)).unwrap());
    let rewritten: Vec<usize> = rewritten[1..].to_vec();
    drop(store);

    let store = fixture.open(config(dir.path(), 40));
    for &i in &gone {
        assert!(!store.contains(&key(i)), "deleted key {i} came back");
    }
    assert!(
        !store.contains(&key(dropped)),
        "an older version came back after a delete"
    );
    assert_eq!(fixture.check(&store, &gone, 1), vec![None; gone.len()]);
    fixture.all_exact(&store, &rewritten, 2);
    let untouched: Vec<usize> = kept.iter().copied().filter(|i| i % 3 != 0).collect();
    fixture.all_exact(&store, &untouched, 1);
    assert_eq!(store.usage().keys, kept.len() - 1);
    let seqs: HashMap<FileKey, u64> = store.list().into_iter().map(|c| (c.key, c.seq)).collect();
    let old = before.iter().map(|c| c.seq).max().unwrap();
    for &i in &rewritten {
        assert!(
            seqs[&key(i)] > old,
            "a rewrite is newer than every first write"
        );
    }
}

#[test]
fn reopen_restores_keys_deletes_and_overwrites_uring() {
    reopen_deletes_and_overwrites(uring());
}

#[test]
fn reopen_restores_keys_deletes_and_overwrites_nixl_posix() {
    if let Some(transport) = nixl() {
        reopen_deletes_and_overwrites(transport);
    }
}

/// Two valid versions of one key, as a crash between an overwrite and the erase of the old
/// version leaves them: the newest wins, and the open erases the other.
/// Key 0 written twice in a store of 4 segments under `dir`, then the first version put back
/// on disk, as if the erase that the overwrite made had never happened.
fn leave_a_stale_duplicate(fixture: &Fixture, dir: &Path) {
    let store = fixture.open(config(dir, 4));
    fixture.put(&store, &[0], 1).remove(0).unwrap();
    let files = segment_files(&[dir]);
    let first = entry_offsets(&files[0])[0];
    let saved = fs::read(&files[0]).unwrap()[first as usize..(first + ENTRY) as usize].to_vec();
    fixture.put(&store, &[0], 2).remove(0).unwrap();
    drop(store);
    OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .write_all_at(&saved, first)
        .unwrap();
}

#[test]
fn an_interrupted_overwrite_resolves_to_the_newest() {
    let fixture = Fixture::new(uring(), 8);
    let dir = tempfile::tempdir().unwrap();
    leave_a_stale_duplicate(&fixture, dir.path());
    let store = fixture.open(config(dir.path(), 4));
    fixture.all_exact(&store, &[0], 2);
    store.delete(&key(0)).unwrap();
    drop(store);
    let store = fixture.open(config(dir.path(), 4));
    assert!(
        !store.contains(&key(0)),
        "the older version came back after a delete"
    );
}

#[test]
fn torn_and_foreign_entries_are_skipped_and_the_rest_survive() {
    let fixture = Fixture::new(uring(), 16);
    let dir = tempfile::tempdir().unwrap();
    // One segment large enough for all ten keys.
    let cfg = || {
        SegmentConfig::new([dir.path()])
            .with_segment_bytes(4096 + 16 * ENTRY)
            .with_capacity_bytes(4096 + 16 * ENTRY)
    };
    let store = fixture.open(cfg());
    let keys: Vec<usize> = (0..10).map(|i| i * 3).collect(); // full chunks: fixed stride
    assert!(fixture.put(&store, &keys, 1).iter().all(Result::is_ok));
    drop(store);
    let file = &segment_files(&[dir.path()])[0];
    let offsets = entry_offsets(file);
    assert_eq!(offsets.len(), keys.len());
    let handle = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    // Entry 3: its key bytes damaged, its frame intact (torn past the first sector).
    let mut block = vec![0u8; 4096];
    handle.read_exact_at(&mut block, offsets[3]).unwrap();
    block[100] ^= 0xFF;
    handle.write_all_at(&block, offsets[3]).unwrap();
    // Entry 5: its payload damaged (found at open, refused when loaded).
    handle
        .write_all_at(&[0xAB; 512], offsets[5] + 4096)
        .unwrap();
    // The last entry: its header gone altogether.
    handle.write_all_at(&[0u8; 4096], offsets[9]).unwrap();
    drop(handle);

    let store = fixture.open(cfg());
    assert!(!store.contains(&key(keys[3])), "a torn header is skipped");
    assert!(
        !store.contains(&key(keys[9])),
        "a zeroed header ends the segment"
    );
    assert_eq!(
        fixture.check(&store, &[keys[5]], 1),
        vec![None],
        "a bad payload is a miss"
    );
    let intact: Vec<usize> = [0, 1, 2, 4, 6, 7, 8].iter().map(|&j| keys[j]).collect();
    fixture.all_exact(&store, &intact, 1);
}

/// Bytes the folder's files take on disk (allocated blocks).
fn disk_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

fn capacity_and_reuse(transport: Arc<dyn Transport>) {
    let fixture = Fixture::new(transport, 32);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 3));
    // Full chunks only: four per segment, twelve in all.
    let keys: Vec<usize> = (0..13).map(|i| i * 3).collect();
    let results = fixture.put(&store, &keys, 1);
    for (i, result) in keys.iter().zip(&results).take(12) {
        assert!(result.is_ok(), "key {i}: {result:?}");
    }
    match &results[12] {
        Err(Error::NoSpace { key: k, .. }) => assert_eq!(**k, key(keys[12])),
        other => panic!("a 13th entry in 3 segments of 4: {other:?}"),
    }
    let usage = store.usage();
    assert_eq!((usage.free_segments, usage.keys), (0, 12));
    assert!(
        disk_bytes(dir.path()) <= 3 * SEGMENT + 4096,
        "beyond capacity on disk"
    );

    // Deletes spread over segments free none.
    let listed = store.list();
    let spread: Vec<usize> = (0..3).map(|s| 4 * s).collect();
    for &j in &spread {
        assert!(store.delete(&listed[j].key).unwrap());
    }
    assert!(matches!(
        fixture.put(&store, &[keys[12]], 1).remove(0),
        Err(Error::NoSpace { .. })
    ));
    // Emptying one segment frees it.
    let first = listed[1].segment;
    for chunk in listed.iter().filter(|c| c.segment == first) {
        store.delete(&chunk.key).unwrap();
    }
    assert_eq!(store.usage().free_segments, 1);
    let fresh: Vec<usize> = (100..104).map(|i| i * 3).collect();
    assert!(
        fixture.put(&store, &fresh, 4).iter().all(Result::is_ok),
        "the freed segment is reused"
    );
    assert!(matches!(
        fixture.put(&store, &[keys[12]], 1).remove(0),
        Err(Error::NoSpace { .. })
    ));
    assert!(
        disk_bytes(dir.path()) <= 3 * SEGMENT + 4096,
        "beyond capacity on disk"
    );
    assert!(
        (0..12).all(|j| listed[j].key == key(keys[j])),
        "listed in write order"
    );
    let survivors: Vec<usize> = (0..12)
        .filter(|j| listed[*j].segment != first && !spread.contains(j))
        .map(|j| keys[j])
        .collect();
    assert_eq!(survivors.len(), 6);
    fixture.all_exact(&store, &survivors, 1);
    fixture.all_exact(&store, &fresh, 4);
    drop(store);
    let store = fixture.open(config(dir.path(), 3));
    assert_eq!(
        store.usage().keys,
        10,
        "no entry of the reused segment's past came back"
    );
    fixture.all_exact(&store, &survivors, 1);
    fixture.all_exact(&store, &fresh, 4);
}

#[test]
fn capacity_is_exact_and_a_freed_segment_is_reused_uring() {
    capacity_and_reuse(uring());
}

#[test]
fn capacity_is_exact_and_a_freed_segment_is_reused_nixl_posix() {
    if let Some(transport) = nixl() {
        capacity_and_reuse(transport);
    }
}

#[test]
fn segments_stripe_over_every_folder() {
    let fixture = Fixture::new(uring(), 32);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let paths: Vec<&Path> = dirs.iter().map(|d| d.path()).collect();
    let cfg = || {
        SegmentConfig::new(paths.clone())
            .with_segment_bytes(SEGMENT)
            .with_capacity_bytes(4 * SEGMENT)
    };
    let store = fixture.open(cfg());
    let keys: Vec<usize> = (0..16).map(|i| i * 3).collect();
    assert!(fixture.put(&store, &keys, 1).iter().all(Result::is_ok));
    for dir in &paths {
        let files = segment_files(&[dir]);
        assert_eq!(files.len(), 2, "{}", dir.display());
        for file in files {
            assert_eq!(entry_offsets(&file).len(), 4, "{}", file.display());
        }
    }
    drop(store);
    let store = fixture.open(cfg());
    fixture.all_exact(&store, &keys, 1);
}

#[test]
fn a_second_writer_is_refused_with_the_holder_named() {
    let fixture = Fixture::new(uring(), 4);
    let dir = tempfile::tempdir().unwrap();
    let _writer = fixture.open(config(dir.path(), 2));
    let err =
        SegmentStore::open(Arc::clone(&fixture.transport), config(dir.path(), 2)).unwrap_err();
    match &err {
        Error::FolderLocked { folder, holder } => {
            assert_eq!(folder, dir.path());
            assert_eq!(*holder, Some(std::process::id()));
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&std::process::id().to_string()), "{text}");
    assert!(text.contains("layout: files"), "{text}");
}

fn read_only_beside_a_writer(transport: Arc<dyn Transport>) {
    let fixture = Fixture::new(transport, 32);
    let dir = tempfile::tempdir().unwrap();
    let writer = fixture.open(config(dir.path(), 3));
    let old: Vec<usize> = (0..8).map(|i| i * 3).collect();
    assert!(fixture.put(&writer, &old, 1).iter().all(Result::is_ok));
    let reader =
        SegmentStore::open_read_only(Arc::clone(&fixture.transport), config(dir.path(), 3))
            .unwrap();
    assert!(reader.is_read_only());
    fixture.all_exact(&reader, &old, 1);
    assert!(matches!(
        fixture.put(&reader, &[1], 1).remove(0),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        reader.delete(&key(0)),
        Err(Error::ReadOnly { .. })
    ));

    // The writer deletes everything and fills the reused segments with other keys, some of
    // them over the old keys' places.
    for &i in &old {
        writer.delete(&key(i)).unwrap();
    }
    let new: Vec<usize> = (50..62).map(|i| i * 3).collect();
    assert!(fixture.put(&writer, &new, 7).iter().all(Result::is_ok));
    for (i, verdict) in old.iter().zip(fixture.check(&reader, &old, 1)) {
        assert_ne!(verdict, Some(false), "key {i}: wrong bytes served");
        assert_eq!(
            verdict, None,
            "key {i} was deleted and its place reused: a miss"
        );
    }
    let late = SegmentStore::open_read_only(Arc::clone(&fixture.transport), config(dir.path(), 3))
        .unwrap();
    fixture.all_exact(&late, &new, 7);
    assert_eq!(fixture.check(&late, &old, 1), vec![None; old.len()]);
}

#[test]
fn a_read_only_open_beside_a_writer_serves_only_verified_data_uring() {
    read_only_beside_a_writer(uring());
}

#[test]
fn a_read_only_open_beside_a_writer_serves_only_verified_data_nixl_posix() {
    if let Some(transport) = nixl() {
        read_only_beside_a_writer(transport);
    }
}

#[test]
fn eight_threads_store_and_load_their_own_keys() {
    let fixture = Fixture::new(uring(), 8 * 24);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 300));
    std::thread::scope(|scope| {
        for t in 0..8usize {
            let (fixture, store) = (&fixture, &store);
            scope.spawn(move || {
                let keys: Vec<usize> = (0..40).map(|i| t * 1000 + i).collect();
                for round in 0..3u8 {
                    for batch in keys.chunks(1 + t % 4 * 5) {
                        for (i, r) in batch.iter().zip(fixture.put(store, batch, round)) {
                            assert!(r.is_ok(), "thread {t} key {i}: {r:?}");
                        }
                        fixture.all_exact(store, batch, round);
                    }
                    fixture.all_exact(store, &keys, round);
                    for &i in keys.iter().step_by(2) {
                        store.delete(&key(i)).unwrap();
                    }
                }
            });
        }
    });
    drop(store);
    let store = fixture.open(config(dir.path(), 300));
    for t in 0..8usize {
        let kept: Vec<usize> = (0..40)
            .filter(|i| i % 2 == 1)
            .map(|i| t * 1000 + i)
            .collect();
        fixture.all_exact(&store, &kept, 2);
        let gone: Vec<usize> = (0..40)
            .filter(|i| i % 2 == 0)
            .map(|i| t * 1000 + i)
            .collect();
        assert_eq!(fixture.check(&store, &gone, 2), vec![None; gone.len()]);
    }
}

const CRASH_DIR: &str = "NIXL_FILE_SEGMENT_CRASH_DIR";
const CRASH_ENGINE: &str = "NIXL_FILE_SEGMENT_CRASH_ENGINE";
const CRASH_SEGMENTS: u64 = 12;

/// The child of the crash tests (does nothing unless started by one): stores keys from its
/// start number on, forever, evicting the oldest when the store is full, and reports each put
/// (`P i`) once it returned `Ok`, each delete before (`d i`) and after (`D i`).
#[test]
fn segment_crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
    let transport = match std::env::var(CRASH_ENGINE).as_deref() {
        Ok("nixl") => nixl().expect("the parent checked NIXL"),
        _ => uring(),
    };
    let start: usize = std::env::var("NIXL_FILE_SEGMENT_CRASH_START")
        .unwrap()
        .parse()
        .unwrap();
    let fixture = Fixture::new(transport, 16);
    let store = fixture.open(config(Path::new(&dir), CRASH_SEGMENTS));
    let mut next = start;
    loop {
        let batch: Vec<usize> = (next..next + 1 + next % 5).collect();
        next += batch.len();
        for (i, result) in batch.iter().zip(fixture.put(&store, &batch, 9)) {
            match result {
                Ok(_) => println!("P {i}"),
                Err(Error::NoSpace { .. }) => {
                    for chunk in store.list().into_iter().take(6) {
                        let victim =
                            u64::from_be_bytes(chunk.key.chunk_hash.clone().try_into().unwrap());
                        println!("d {victim}");
                        store.delete(&chunk.key).unwrap();
                        println!("D {victim}");
                    }
                }
                Err(err) => panic!("key {i}: {err}"),
            }
        }
    }
}

/// Kills a writing child at pseudo-random moments; after each kill, every key whose put was
/// reported `Ok` (and not deleted since) is present and byte-exact, every key whose delete was
/// reported is absent, and nothing present is wrong.
fn killed_writers_lose_nothing_reported(engine: &str, kills: usize) {
    let transport = if engine == "nixl" {
        match nixl() {
            Some(t) => t,
            None => return,
        }
    } else {
        uring()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut stored: HashSet<usize> = HashSet::new();
    let mut deleting: HashSet<usize> = HashSet::new();
    let mut deleted: HashSet<usize> = HashSet::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut start = 0;
    for kill in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "segment_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_DIR, dir.path())
            .env(CRASH_ENGINE, engine)
            .env("NIXL_FILE_SEGMENT_CRASH_START", start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(150 + rng % 250));
        child.kill().unwrap();
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            let Some((op, i)) = line.split_once(' ') else {
                continue;
            };
            let Ok(i) = i.parse::<usize>() else { continue };
            match op {
                "P" => {
                    stored.insert(i);
                }
                "d" => {
                    deleting.insert(i);
                }
                "D" => {
                    deleted.insert(i);
                    stored.remove(&i);
                }
                _ => {}
            }
            start = start.max(i + 1);
        }
        start += 10; // past any put in flight

        let fixture = Fixture::new(Arc::clone(&transport), 16);
        let store = fixture.open(config(dir.path(), CRASH_SEGMENTS));
        let sure: Vec<usize> = stored
            .iter()
            .copied()
            .filter(|i| !deleting.contains(i))
            .collect();
        for batch in sure.chunks(16) {
            for (i, verdict) in batch.iter().zip(fixture.check(&store, batch, 9)) {
                assert_eq!(verdict, Some(true), "kill {kill}: key {i}, reported stored");
            }
        }
        for &i in &deleted {
            assert!(
                !store.contains(&key(i)),
                "kill {kill}: key {i}, reported deleted"
            );
        }
        let present: Vec<usize> = store
            .list()
            .iter()
            .map(|c| u64::from_be_bytes(c.key.chunk_hash.clone().try_into().unwrap()) as usize)
            .collect();
        let mut verified = HashSet::new();
        for batch in present.chunks(16) {
            for (i, verdict) in batch.iter().zip(fixture.check(&store, batch, 9)) {
                assert_ne!(
                    verdict,
                    Some(false),
                    "kill {kill}: key {i} holds wrong bytes"
                );
                // An entry torn by the kill (its header written, not its payload) is a miss,
                // and the load drops it from the store.
                if verdict == Some(true) {
                    verified.insert(*i);
                }
            }
        }
        // What the reopened store holds now is the truth the next child starts from.
        stored = verified;
        deleting.clear();
    }
    assert!(
        stored.len() + deleted.len() > 20,
        "the writer must have stored something"
    );
}

#[test]
fn sigkilled_writers_lose_nothing_reported_uring() {
    killed_writers_lose_nothing_reported("uring", 20);
}

#[test]
fn sigkilled_writers_lose_nothing_reported_nixl_posix() {
    killed_writers_lose_nothing_reported("nixl", 6);
}

/// Put and get GB/s of 256 KiB chunks in batches of 64, O_DIRECT, on the native engine; prints
/// the figures (a probe, not a benchmark: see `cargo xtask bench`).
#[test]
#[ignore = "throughput probe: cargo test --release -p nixl-file --test segment_store -- --ignored --nocapture throughput"]
fn throughput_probe() {
    const BYTES: usize = 256 << 10;
    const KEYS: usize = 4096;
    let transport = uring();
    let pool = PoolConfig::new(BYTES, 64 * BYTES as u64).build().unwrap();
    let _registration = transport.register_pool(&pool).unwrap();
    let dir = tempfile::tempdir_in(std::env::var_os("KV_PROBE_DIR").unwrap_or(".".into())).unwrap();
    let store = SegmentStore::open(
        Arc::clone(&transport),
        SegmentConfig::new([dir.path()])
            .with_capacity_bytes(6 << 30)
            .with_direct_io(true),
    )
    .unwrap();
    let keys: Vec<FileKey> = (0..KEYS).map(key).collect();
    let mut pages = pool.allocate_batch(64).unwrap();
    for (i, page) in pages.iter_mut().enumerate() {
        fill(i, 1, page.as_mut_slice());
    }
    let started = std::time::Instant::now();
    for batch in keys.chunks(64) {
        let items: Vec<_> = batch.iter().zip(&pages).collect();
        assert!(store.put(&items).iter().all(Result::is_ok));
    }
    let put = started.elapsed();
    let started = std::time::Instant::now();
    for batch in keys.chunks(64) {
        let mut items: Vec<_> = batch.iter().zip(pages.iter_mut()).collect();
        assert!(store.get(&mut items).into_iter().all(|r| r.unwrap()));
    }
    let get = started.elapsed();
    drop(store);
    let started = std::time::Instant::now();
    let store = SegmentStore::open(
        Arc::clone(&transport),
        SegmentConfig::new([dir.path()])
            .with_capacity_bytes(6 << 30)
            .with_direct_io(true),
    )
    .unwrap();
    let reopen = started.elapsed();
    assert_eq!(store.usage().keys, KEYS);
    let gb = (KEYS * BYTES) as f64 / 1e9;
    eprintln!(
        "{KEYS} x 256 KiB, direct {}: put {:.2} GB/s, get {:.2} GB/s, reopen (headers only) {:?}",
        store.direct_io(),
        gb / put.as_secs_f64(),
        gb / get.as_secs_f64(),
        reopen
    );
}

type Hook = Arc<dyn Fn(&[(&[u8], StorageExtent)]) -> Option<nixl_core::Error> + Send + Sync>;

/// The native engine, with a hook that may fail (or panic in) a write batch before it runs.
#[derive(Clone)]
struct Faulty {
    inner: Arc<dyn Transport>,
    hook: Arc<std::sync::Mutex<Option<Hook>>>,
}

impl std::fmt::Debug for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faulty")
    }
}

impl Faulty {
    fn new() -> Self {
        Self {
            inner: uring(),
            hook: Arc::default(),
        }
    }

    fn set(
        &self,
        hook: impl Fn(&[(&[u8], StorageExtent)]) -> Option<nixl_core::Error> + Send + Sync + 'static,
    ) {
        *self.hook.lock().unwrap() = Some(Arc::new(hook));
    }

    fn clear(&self) {
        *self.hook.lock().unwrap() = None;
    }
}

impl Transport for Faulty {
    fn backend(&self) -> &str {
        self.inner.backend()
    }
    fn register_memory(
        &self,
        region: Arc<dyn pinned_alloc::MemoryRegion>,
    ) -> nixl_core::Result<Registration> {
        self.inner.register_memory(region)
    }
    fn register_file(&self, file: Arc<std::fs::File>) -> nixl_core::Result<Registration> {
        self.inner.register_file(file)
    }
    fn register_object(&self, object_id: u64, len: usize) -> nixl_core::Result<Registration> {
        self.inner.register_object(object_id, len)
    }
    unsafe fn write(&self, batch: &[(&[u8], StorageExtent)]) -> nixl_core::Result<()> {
        let hook = self.hook.lock().unwrap().clone();
        if let Some(err) = hook.and_then(|hook| hook(batch)) {
            return Err(err);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.write(batch) }
    }
    unsafe fn read(&self, batch: &mut [(&mut [u8], StorageExtent)]) -> nixl_core::Result<()> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.read(batch) }
    }
    fn submit(
        &self,
        direction: nixl_core::Direction,
        batch: nixl_core::PageBatch,
    ) -> Box<dyn nixl_core::PendingTransfer> {
        self.inner.submit(direction, batch)
    }
    fn exists(&self, items: &[nixl_core::StorageName<'_>]) -> nixl_core::Result<Vec<bool>> {
        self.inner.exists(items)
    }
    fn retire(&self, pages: Vec<Page>, failure: &nixl_core::Error) {
        self.inner.retire(pages, failure)
    }
}

/// A timed-out batch that the engine kept (its pages are retired for good).
fn abandoned(descriptors: usize) -> nixl_core::Error {
    nixl_core::Error::Abandoned {
        descriptors,
        cause: Box::new(nixl_core::Error::Timeout {
            descriptors,
            timeout: Duration::from_millis(1),
        }),
    }
}

/// The frame kind of a header block (1 data, 2 erased, 3 segment), if it has our frame.
fn kind_of(block: &[u8]) -> Option<u32> {
    (block.len() >= 52 && &block[40..48] == b"KVL2SEG1")
        .then(|| u32::from_le_bytes(block[48..52].try_into().unwrap()))
}

fn faulty_fixture(pages: usize) -> (Faulty, Fixture) {
    let faulty = Faulty::new();
    let fixture = Fixture::new(Arc::new(faulty.clone()), pages);
    (faulty, fixture)
}

#[test]
fn a_timed_out_segment_header_write_poisons_only_its_segment() {
    let (faulty, fixture) = faulty_fixture(16);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 4));
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = Arc::clone(&fired);
    faulty.set(move |batch| {
        (kind_of(batch[0].0) == Some(3) && !once.swap(true, std::sync::atomic::Ordering::SeqCst))
            .then(|| abandoned(batch.len()))
    });
    assert!(fixture.put(&store, &[0], 1)[0].is_err());
    assert!(fired.load(std::sync::atomic::Ordering::SeqCst));
    let keys = [3, 6, 9, 12];
    for (i, r) in keys.iter().zip(fixture.put(&store, &keys, 1)) {
        assert!(r.is_ok(), "key {i} after a timed-out segment header: {r:?}");
    }
    fixture.all_exact(&store, &keys, 1);
}

#[test]
fn a_failing_segment_file_does_not_block_new_segments() {
    let (faulty, fixture) = faulty_fixture(16);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 4));
    let bad = Arc::new(std::sync::Mutex::new(None::<u64>));
    let seen = Arc::clone(&bad);
    faulty.set(move |batch| {
        if kind_of(batch[0].0) != Some(3) {
            return None;
        }
        let mut bad = seen.lock().unwrap();
        let dev = *bad.get_or_insert(batch[0].1.dev_id);
        (dev == batch[0].1.dev_id).then(|| nixl_core::Error::Failed("EIO".to_owned()))
    });
    assert!(
        fixture.put(&store, &[0], 1)[0].is_err(),
        "the first segment fails"
    );
    for (i, r) in [3, 6].iter().zip(fixture.put(&store, &[3, 6], 1)) {
        assert!(r.is_ok(), "key {i}: another segment takes it: {r:?}");
    }
    fixture.all_exact(&store, &[3, 6], 1);
}

#[test]
fn timed_out_batches_do_not_exhaust_header_buffers() {
    let (faulty, fixture) = faulty_fixture(80);
    let dir = tempfile::tempdir().unwrap();
    // A segment holds 64 empty entries: each timed-out batch poisons one.
    let cfg = SegmentConfig::new([dir.path()])
        .with_segment_bytes(4096 * 65)
        .with_capacity_bytes(4096 * 65 * 12);
    let store = fixture.open(cfg);
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(9));
    let counter = Arc::clone(&left);
    faulty.set(move |batch| {
        (kind_of(batch[0].0) == Some(1)
            && counter
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok())
        .then(|| abandoned(batch.len()))
    });
    let empty = fixture.pool.allocate().map(|mut p| {
        p.set_len(0);
        p
    });
    let empty = empty.unwrap();
    for round in 0..9 {
        let keys: Vec<FileKey> = (0..64).map(|i| key(10_000 + round * 64 + i)).collect();
        let items: Vec<_> = keys.iter().map(|k| (k, &empty)).collect();
        assert!(
            store.put(&items).iter().all(Result::is_err),
            "round {round}"
        );
    }
    assert_eq!(left.load(std::sync::atomic::Ordering::SeqCst), 0);
    let started = std::time::Instant::now();
    let keys = [3, 6, 9];
    for (i, r) in keys.iter().zip(fixture.put(&store, &keys, 1)) {
        assert!(r.is_ok(), "key {i} after 576 retired header pages: {r:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    fixture.all_exact(&store, &keys, 1);
}

#[test]
fn a_refused_entry_leaves_the_index_and_frees_its_segment() {
    let fixture = Fixture::new(uring(), 16);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 2));
    let keys = [0, 3, 6, 9]; // four full chunks: one segment, sealed by the fifth
    assert!(fixture.put(&store, &keys, 1).iter().all(Result::is_ok));
    assert!(fixture.put(&store, &[12], 1)[0].is_ok());
    assert_eq!(store.usage().free_segments, 0);
    let file = segment_files(&[dir.path()])
        .into_iter()
        .find(|f| entry_offsets(f).len() == 4)
        .unwrap();
    let first = entry_offsets(&file)[0];
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(&[0xAB; 512], first + 4096)
        .unwrap();
    // A miss leaves the page empty, whether absent or refused.
    for k in [0usize, 10_000] {
        let mut page = fixture.pool.allocate().unwrap();
        let key = key(k);
        let mut items = [(&key, &mut page)];
        assert!(!store.get(&mut items)[0].as_ref().unwrap());
        assert_eq!(page.len(), 0, "key {k}: a miss leaves len 0");
    }
    assert!(!store.contains(&key(0)), "a refused entry leaves the index");
    for &i in &keys[1..] {
        assert!(store.delete(&key(i)).unwrap());
    }
    assert_eq!(
        store.usage().free_segments,
        1,
        "the refused entry pins nothing"
    );
    drop(store);
    let store = fixture.open(config(dir.path(), 2));
    assert!(!store.contains(&key(0)), "erased on disk");
}

#[test]
fn a_failed_erase_on_delete_leaves_the_key_gone() {
    let (faulty, fixture) = faulty_fixture(16);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 2));
    assert!(fixture.put(&store, &[0, 3], 1).iter().all(Result::is_ok));
    faulty.set(|batch| {
        (kind_of(batch[0].0) == Some(2)).then(|| nixl_core::Error::Failed("EIO".to_owned()))
    });
    assert!(store.delete(&key(0)).is_err());
    assert!(
        !store.contains(&key(0)),
        "gone for the caller and the store"
    );
    assert_eq!(store.usage().keys, 1);
    assert!(!store.delete(&key(0)).unwrap());
}

#[test]
fn a_panic_during_a_put_does_not_hang_later_puts() {
    let (faulty, fixture) = faulty_fixture(16);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 4));
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = Arc::clone(&fired);
    faulty.set(move |batch| {
        if kind_of(batch[0].0) == Some(1) && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("injected panic inside a write");
        }
        None
    });
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fixture.put(&store, &[0], 1);
    }));
    assert!(panicked.is_err());
    faulty.clear();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _ = tx.send(fixture.put(&store, &[3], 1).remove(0).is_ok());
        });
        let outcome = rx.recv_timeout(Duration::from_secs(20));
        if outcome.is_err() {
            // Hung: leave the test process rather than wait for ever.
            eprintln!("a put after a panic hung");
            std::process::exit(101);
        }
        assert_eq!(outcome, Ok(true));
    });
    fixture.all_exact(&store, &[3], 1);
}

#[test]
fn opening_with_another_layout_refuses_and_keeps_every_key() {
    let fixture = Fixture::new(uring(), 32);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = (dirs[0].path(), dirs[1].path());
    let cfg = |paths: Vec<&Path>, segments: u64, bytes: u64| {
        SegmentConfig::new(paths)
            .with_segment_bytes(bytes)
            .with_capacity_bytes(segments * bytes)
    };
    let store = fixture.open(cfg(vec![a, b], 4, SEGMENT));
    let keys: Vec<usize> = (0..16).map(|i| i * 3).collect();
    assert!(fixture.put(&store, &keys, 1).iter().all(Result::is_ok));
    drop(store);

    let other = SEGMENT + 4 * ENTRY;
    match SegmentStore::open(Arc::clone(&fixture.transport), cfg(vec![a, b], 4, other)) {
        Err(Error::SegmentSize {
            path,
            bytes,
            segment_bytes,
        }) => {
            assert_eq!((bytes, segment_bytes), (SEGMENT, other));
            assert!(path.ends_with("seg-000000.kvseg"), "{}", path.display());
        }
        other => panic!("another segment size: {other:?}"),
    }
    match SegmentStore::open(Arc::clone(&fixture.transport), cfg(vec![a, b], 2, SEGMENT)) {
        Err(err @ Error::BeyondCapacity { .. }) => {
            assert!(err.to_string().contains("max_capacity_gb"), "{err}");
        }
        other => panic!("a smaller capacity: {other:?}"),
    }
    // Folders reordered, and one added: every segment is found where it is.
    let c = tempfile::tempdir().unwrap();
    let store = fixture.open(cfg(vec![b, c.path(), a], 6, SEGMENT));
    fixture.all_exact(&store, &keys, 1);
    drop(store);
    let store = fixture.open(cfg(vec![a, b, c.path()], 6, SEGMENT));
    fixture.all_exact(&store, &keys, 1);
}

#[test]
fn a_failed_erase_of_a_stale_duplicate_does_not_abort_the_open() {
    let (faulty, fixture) = faulty_fixture(8);
    let dir = tempfile::tempdir().unwrap();
    leave_a_stale_duplicate(&fixture, dir.path());
    faulty.set(|batch| {
        (kind_of(batch[0].0) == Some(2)).then(|| nixl_core::Error::Failed("EIO".to_owned()))
    });
    let store = SegmentStore::open(Arc::clone(&fixture.transport), config(dir.path(), 4))
        .expect("a failed erase of a stale version is not fatal");
    fixture.all_exact(&store, &[0], 2);
}

#[test]
fn sequence_numbers_stay_above_erased_entries_after_a_restart() {
    let fixture = Fixture::new(uring(), 16);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(config(dir.path(), 4));
    assert!(
        fixture
            .put(&store, &[0, 3, 6, 9], 1)
            .iter()
            .all(Result::is_ok)
    );
    let newest = store.list().iter().map(|c| c.seq).max().unwrap();
    // The two newest go: the live entries' numbers alone would give the next segment header
    // and entry theirs.
    assert!(store.delete(&key(6)).unwrap());
    assert!(store.delete(&key(9)).unwrap());
    drop(store);
    let store = fixture.open(config(dir.path(), 4));
    fixture.put(&store, &[12], 1).remove(0).unwrap();
    let seq = store.list().iter().find(|c| c.key == key(12)).unwrap().seq;
    assert!(
        seq > newest,
        "{seq} reuses a sequence number up to {newest}"
    );
}

/// Seven batches of 64 fail at once, holding all but 63 header pages of the store (512, one
/// kept for segment headers): marking their space reuses their own pages instead of waiting
/// for more.
#[test]
fn failed_batches_mark_their_space_with_their_own_header_pages() {
    let (faulty, fixture) = faulty_fixture(8);
    let dir = tempfile::tempdir().unwrap();
    let cfg = SegmentConfig::new([dir.path()])
        .with_segment_bytes(4096 * 65)
        .with_capacity_bytes(4096 * 65 * 12);
    let store = fixture.open(cfg);
    let arrived = Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
    let gate = Arc::clone(&arrived);
    faulty.set(move |batch| {
        if kind_of(batch[0].0) != Some(1) {
            return None;
        }
        // Every batch holds its header pages until all seven failed (or 5 s passed).
        let (count, all) = &*gate;
        let mut count = count.lock().unwrap();
        *count += 1;
        all.notify_all();
        let _ = all
            .wait_timeout_while(count, Duration::from_secs(5), |n| *n < 7)
            .unwrap();
        Some(nixl_core::Error::Failed("EIO".to_owned()))
    });
    let mut empty = fixture.pool.allocate().unwrap();
    empty.set_len(0);
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for t in 0..7 {
            let (store, empty) = (&store, &empty);
            scope.spawn(move || {
                let keys: Vec<FileKey> = (0..64).map(|i| key(20_000 + t * 64 + i)).collect();
                let items: Vec<_> = keys.iter().map(|k| (k, empty)).collect();
                for r in store.put(&items) {
                    assert!(matches!(r, Err(Error::Key { .. })), "{r:?}");
                }
            });
        }
    });
    assert_eq!(*arrived.0.lock().unwrap(), 7);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "marking waited for header pages: {:?}",
        started.elapsed()
    );
    faulty.clear();
    assert!(fixture.put(&store, &[3], 1)[0].is_ok());
    fixture.all_exact(&store, &[3], 1);
}

/// Segment files are made whole under a temporary name and renamed into place: what a crash
/// leaves half-made is removed when the store opens, never taken for a segment, and segments
/// are made only as they take entries.
#[test]
fn half_made_segment_files_are_removed_at_open() {
    let fixture = Fixture::new(uring(), 8);
    let dir = tempfile::tempdir().unwrap();
    let half = dir.path().join("seg-000000.kvseg.making");
    std::fs::write(&half, b"torn").unwrap();
    let store = fixture.open(config(dir.path(), 8));
    assert!(!half.exists(), "the half-made file is gone");
    assert!(
        segment_files(&[dir.path()]).is_empty(),
        "no segment made yet"
    );
    assert_eq!(store.usage().file_bytes, 0);
    for result in fixture.put(&store, &[1, 2], 1) {
        result.unwrap();
    }
    let made = segment_files(&[dir.path()]);
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(std::fs::metadata(&made[0]).unwrap().len(), SEGMENT);
    assert_eq!(store.usage().file_bytes, SEGMENT);
}
