//! The file-backend suite: dynamic and static stores through any transport.

use std::path::Path;
use std::sync::Arc;

use nixl_core::{Transport, TransportExt};
use nixl_file::{
    DynamicConfig, DynamicFileStore, Error, FileKey, SegmentConfig, SegmentStore, StaticConfig,
    StaticFilePool,
};
use pinned_alloc::{Page, PagePool, PoolConfig};

use crate::fill_chunk;

/// Bytes of one chunk in these tests (not a multiple of 4 KiB on purpose: padding is exercised).
pub const CHUNK: usize = 64 * 1024 + 100;

/// The key of chunk `i` of a test model.
pub fn key(i: usize) -> FileKey {
    FileKey {
        model: "org/test-model".to_owned(),
        kv_rank: 1,
        group_id: 0,
        chunk_hash: (i as u64).to_be_bytes().to_vec(),
        cache_salt: None,
    }
}

/// A registered pool of `pages` chunk pages, kept registered while the value lives.
pub struct Memory {
    /// The pool.
    pub pool: Arc<PagePool>,
    _registration: nixl_core::Registration,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").field("pool", &self.pool).finish()
    }
}

impl Memory {
    /// A pool of `pages` pages of [`CHUNK`] bytes, registered with `transport`.
    pub fn new(transport: &Arc<dyn Transport>, pages: usize) -> Self {
        let pool = PoolConfig::new(CHUNK, (pages * CHUNK.next_multiple_of(4096)) as u64)
            .build()
            .unwrap();
        let registration = transport.register_pool(&pool).unwrap();
        Self {
            pool,
            _registration: registration,
        }
    }

    /// Pages filled with the content of chunks `indices`.
    pub fn filled(&self, indices: impl IntoIterator<Item = usize>) -> Vec<Page> {
        indices
            .into_iter()
            .map(|i| {
                let mut page = self.pool.allocate().unwrap();
                fill_chunk(i, page.as_mut_slice());
                page
            })
            .collect()
    }
}

/// Opens a dynamic store in `dir`.
pub fn dynamic(
    transport: &Arc<dyn Transport>,
    dir: &Path,
    direct_io: bool,
    shard: bool,
) -> DynamicFileStore {
    DynamicFileStore::open(
        Arc::clone(transport),
        DynamicConfig::new(dir)
            .with_direct_io(direct_io)
            .with_shard_dirs(shard)
            .with_max_open_files(16),
    )
    .unwrap()
}

/// What the suite's put and get helpers need of a store: per-key files and segments alike.
pub trait SuiteStore {
    /// Stores every page under its key; one result per item.
    fn put(&self, items: &[(&FileKey, &Page)]) -> Vec<nixl_file::Result<u64>>;
    /// Loads every key into its page; one hit or miss per item.
    fn get(&self, items: &mut [(&FileKey, &mut Page)]) -> Vec<nixl_file::Result<bool>>;
}

impl SuiteStore for DynamicFileStore {
    fn put(&self, items: &[(&FileKey, &Page)]) -> Vec<nixl_file::Result<u64>> {
        DynamicFileStore::put(self, items)
    }

    fn get(&self, items: &mut [(&FileKey, &mut Page)]) -> Vec<nixl_file::Result<bool>> {
        DynamicFileStore::get(self, items)
    }
}

impl SuiteStore for SegmentStore {
    fn put(&self, items: &[(&FileKey, &Page)]) -> Vec<nixl_file::Result<u64>> {
        SegmentStore::put(self, items)
    }

    fn get(&self, items: &mut [(&FileKey, &mut Page)]) -> Vec<nixl_file::Result<bool>> {
        SegmentStore::get(self, items)
    }
}

/// Stores chunks `indices`; every put must succeed.
pub fn put_all(store: &impl SuiteStore, memory: &Memory, indices: &[usize]) {
    let pairs: Vec<(usize, usize)> = indices.iter().map(|&i| (i, i)).collect();
    put_as(store, memory, &pairs);
}

/// Stores, per `(key, content)` pair, the content of chunk `content` under key `key`; every
/// put must succeed.
pub fn put_as(store: &impl SuiteStore, memory: &Memory, pairs: &[(usize, usize)]) {
    let pages = memory.filled(pairs.iter().map(|&(_, content)| content));
    let keys: Vec<FileKey> = pairs.iter().map(|&(i, _)| key(i)).collect();
    let items: Vec<_> = keys.iter().zip(&pages).collect();
    for (i, result) in store.put(&items).into_iter().enumerate() {
        assert_eq!(result.unwrap(), CHUNK as u64, "put of chunk {}", pairs[i].0);
    }
}

/// Loads chunks `indices`: `true` a hit with exact bytes, `false` a miss (wrong bytes panic).
pub fn get_all(store: &impl SuiteStore, memory: &Memory, indices: &[usize]) -> Vec<bool> {
    let pairs: Vec<(usize, usize)> = indices.iter().map(|&i| (i, i)).collect();
    get_as(store, memory, &pairs)
}

/// Loads keys `key` of `(key, content)` pairs: `true` a hit holding exactly chunk `content`'s
/// bytes, `false` a miss; a hit with any other bytes (a stale version among them) panics.
pub fn get_as(store: &impl SuiteStore, memory: &Memory, pairs: &[(usize, usize)]) -> Vec<bool> {
    let keys: Vec<FileKey> = pairs.iter().map(|&(i, _)| key(i)).collect();
    let mut pages: Vec<Page> = (0..pairs.len())
        .map(|_| memory.pool.allocate().unwrap())
        .collect();
    let mut items: Vec<_> = keys.iter().zip(pages.iter_mut()).collect();
    let results = store.get(&mut items);
    let mut expected = vec![0u8; CHUNK];
    results
        .into_iter()
        .zip(pairs)
        .zip(&pages)
        .map(|((result, &(i, content)), page)| {
            let hit = result.unwrap_or_else(|e| panic!("get of chunk {i} failed: {e}"));
            if hit {
                fill_chunk(content, &mut expected);
                assert!(
                    page.as_slice() == &expected[..],
                    "chunk {i} loaded wrong bytes (want chunk {content}'s)"
                );
            }
            hit
        })
        .collect()
}

/// Dynamic round trip with scattered keys, misses for absent keys, O_DIRECT on or off.
pub fn dynamic_round_trip(transport: Arc<dyn Transport>, direct_io: bool, shard: bool) {
    let dir = tempfile::tempdir().unwrap();
    let memory = Memory::new(&transport, 96);
    let store = dynamic(&transport, dir.path(), direct_io, shard);
    let stored: Vec<usize> = (0..40).map(|i| i * 3).collect();
    put_all(&store, &memory, &stored);
    assert_eq!(get_all(&store, &memory, &stored), vec![true; 40]);
    assert_eq!(
        get_all(&store, &memory, &[1, 0, 2]),
        vec![false, true, false]
    );
    assert!(store.contains(&key(3)).unwrap());
    assert!(!store.contains(&key(4)).unwrap());
    assert_eq!(store.stored_size(&key(3)).unwrap(), Some(CHUNK as u64));
    assert_eq!(store.list().unwrap().len(), 40);
    assert!(store.delete(&key(3)).unwrap());
    assert!(!store.delete(&key(3)).unwrap());
    assert_eq!(get_all(&store, &memory, &[3]), vec![false]);
    if shard {
        let first = store.path_of(&key(0)).unwrap();
        assert_eq!(
            first.parent().unwrap().parent().unwrap().parent().unwrap(),
            dir.path()
        );
    }
}

/// Data written by one store instance is found by the next (restart).
pub fn restart_recovery(make: &dyn Fn() -> Arc<dyn Transport>) {
    let dir = tempfile::tempdir().unwrap();
    {
        let transport = make();
        let memory = Memory::new(&transport, 16);
        let store = dynamic(&transport, dir.path(), true, true);
        put_all(&store, &memory, &[5, 6, 7]);
    }
    let transport = make();
    let memory = Memory::new(&transport, 16);
    let store = dynamic(&transport, dir.path(), true, true);
    assert_eq!(
        get_all(&store, &memory, &[5, 6, 7, 8]),
        vec![true, true, true, false]
    );
    let mut listed: Vec<FileKey> = store.list().unwrap().into_iter().map(|c| c.key).collect();
    listed.sort_by(|a, b| a.chunk_hash.cmp(&b.chunk_hash));
    assert_eq!(listed, vec![key(5), key(6), key(7)]);
}

/// Flipped, truncated, swapped, foreign and zeroed files read as misses; the store stays usable.
pub fn corruption_reads_as_miss(transport: Arc<dyn Transport>) {
    let dir = tempfile::tempdir().unwrap();
    let memory = Memory::new(&transport, 32);
    let store = dynamic(&transport, dir.path(), false, false);
    put_all(&store, &memory, &[0, 1, 2, 3, 4, 5]);
    let path = |i: usize| store.path_of(&key(i)).unwrap();

    let mut bytes = std::fs::read(path(0)).unwrap();
    bytes[4096 + 1234] ^= 0x40;
    std::fs::write(path(0), &bytes).unwrap();

    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path(1))
        .unwrap();
    file.set_len(4096 + 512).unwrap();

    std::fs::copy(path(3), path(2)).unwrap();

    std::fs::write(
        path(4),
        vec![0x42u8; std::fs::metadata(path(4)).unwrap().len() as usize],
    )
    .unwrap();

    let mut zero_header = std::fs::read(path(5)).unwrap();
    zero_header[..4096].fill(0);
    std::fs::write(path(5), &zero_header).unwrap();

    std::fs::write(dir.path().join("notes.txt"), b"someone else's file").unwrap();

    assert_eq!(
        get_all(&store, &memory, &[0, 1, 2, 3, 4, 5]),
        vec![false, false, false, true, false, false]
    );
    assert_eq!(
        store.stored_size(&key(2)).unwrap(),
        None,
        "a swapped file holds another key"
    );
    put_all(&store, &memory, &[0, 2]);
    assert_eq!(
        get_all(&store, &memory, &[0, 2]),
        vec![true, true],
        "healthy after damage"
    );
    assert_eq!(
        store.list().unwrap().len(),
        3,
        "foreign and damaged files are not listed"
    );
}

/// Keys that would leave the folder, or are no valid keys at all.
pub fn hostile_keys() -> Vec<FileKey> {
    vec![
        FileKey {
            model: "../escape".to_owned(),
            ..key(0)
        },
        FileKey {
            model: "/etc/passwd".to_owned(),
            ..key(0)
        },
        FileKey {
            model: "a\0b".to_owned(),
            ..key(0)
        },
        FileKey {
            cache_salt: Some("../../x".to_owned()),
            ..key(0)
        },
        FileKey {
            model: "m".repeat(4096),
            ..key(0)
        },
        FileKey {
            chunk_hash: Vec::new(),
            ..key(0)
        },
    ]
}

/// Keys that would leave the folder are refused and write nothing anywhere.
pub fn hostile_keys_rejected(transport: Arc<dyn Transport>) {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let memory = Memory::new(&transport, 8);
    let store = dynamic(&transport, &dir, false, false);
    let hostile = hostile_keys();
    let pages = memory.filled(0..hostile.len());
    let items: Vec<_> = hostile.iter().zip(&pages).collect();
    for result in store.put(&items) {
        assert!(
            matches!(result, Err(Error::InvalidKey { .. })),
            "{result:?}"
        );
    }
    let mut outside: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    outside.sort();
    assert_eq!(outside, vec![std::ffi::OsString::from("store")]);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

/// Temporaries of an interrupted write are removed when a store opens.
pub fn temporaries_removed_at_open(transport: Arc<dyn Transport>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x_00000001_0_00.bin.tmp.999.1"), b"partial").unwrap();
    std::fs::create_dir_all(dir.path().join("ab/cd")).unwrap();
    std::fs::write(dir.path().join("ab/cd/y.bin.tmp.999.2"), b"partial").unwrap();
    let store = dynamic(&transport, dir.path(), false, true);
    assert_eq!(
        store.remove_temporaries().unwrap(),
        0,
        "already removed at open"
    );
    assert!(!dir.path().join("ab/cd/y.bin.tmp.999.2").exists());
}

/// A static pool of files with several slots each: round trip, all-or-nothing slots.
pub fn static_pool(transport: Arc<dyn Transport>, direct_io: bool) {
    let dir = tempfile::tempdir().unwrap();
    let memory = Memory::new(&transport, 24);
    let slot = CHUNK.next_multiple_of(4096) as u64;
    let pool = StaticFilePool::open(
        Arc::clone(&transport),
        StaticConfig::new(dir.path(), 3, CHUNK)
            .with_file_size(4 * slot)
            .with_direct_io(direct_io),
    )
    .unwrap();
    assert_eq!(pool.total_slots(), 12);
    assert!(pool.allocate(13).is_none());
    assert_eq!(pool.free_slots(), 12, "a refused allocation keeps nothing");
    let slots = pool.allocate(12).unwrap();
    let pages = memory.filled(0..12);
    let names: Vec<Vec<u8>> = (0..12).map(|i| format!("slot-{i}").into_bytes()).collect();
    let items: Vec<_> = names
        .iter()
        .zip(&pages)
        .zip(slots.iter().copied())
        .map(|((name, page), slot)| (name.as_slice(), page, slot))
        .collect();
    pool.write(&items).unwrap();
    let mut targets: Vec<Page> = (0..12).map(|_| memory.pool.allocate().unwrap()).collect();
    let mut reads: Vec<_> = names
        .iter()
        .zip(targets.iter_mut())
        .zip(slots.iter().copied())
        .map(|((name, page), slot)| (name.as_slice(), page, slot))
        .collect();
    assert_eq!(pool.read(&mut reads).unwrap(), vec![true; 12]);
    let mut expected = vec![0u8; CHUNK];
    for (i, page) in targets.iter().enumerate() {
        fill_chunk(i, &mut expected);
        assert!(page.as_slice() == &expected[..], "slot chunk {i}");
    }
    pool.release(slots);
    assert_eq!(pool.free_slots(), 12);
    assert!(matches!(
        StaticFilePool::open(
            Arc::clone(&transport),
            StaticConfig::new(dir.path(), 1, CHUNK).with_file_size(slot + 1)
        ),
        Err(Error::Config(_))
    ));
}

/// Deleted files are reused for the next writes (no new inode), never readable as data, and
/// given back when the store closes.
pub fn deleted_files_are_recycled(transport: Arc<dyn Transport>) {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let memory = Memory::new(&transport, 16);
    let store = dynamic(&transport, dir.path(), true, false);
    put_all(&store, &memory, &[1, 2]);
    let inode = std::fs::metadata(store.path_of(&key(1)).unwrap())
        .unwrap()
        .ino();
    assert!(store.delete(&key(1)).unwrap());
    assert_eq!(
        get_all(&store, &memory, &[1, 2]),
        vec![false, true],
        "a deleted key misses"
    );
    assert_eq!(
        store.list().unwrap().len(),
        1,
        "recycled files are not listed"
    );
    put_all(&store, &memory, &[3]);
    let reused = std::fs::metadata(store.path_of(&key(3)).unwrap())
        .unwrap()
        .ino();
    assert_eq!(reused, inode, "the deleted file was reused");
    assert_eq!(get_all(&store, &memory, &[3, 1]), vec![true, false]);
    assert!(store.delete(&key(2)).unwrap());
    drop(store);
    let spare = std::fs::read_dir(dir.path().join(".recycle"))
        .unwrap()
        .count();
    assert_eq!(spare, 0, "spare files are removed when the store closes");
}

/// Bytes of one segment file in the segment rows: 14 entries of [`CHUNK`] after its header.
pub const SEGMENT_BYTES: u64 = 1 << 20;

/// Entries of [`CHUNK`] bytes one segment of [`SEGMENT_BYTES`] holds (a 4 KiB header each,
/// the payload padded to 4 KiB, after the segment's own 4 KiB header).
pub const ENTRIES_PER_SEGMENT: usize =
    ((SEGMENT_BYTES - 4096) / (4096 + CHUNK.next_multiple_of(4096) as u64)) as usize;

/// Opens a segment store of `segments` segments of [`SEGMENT_BYTES`] in `dir`.
pub fn segments(
    transport: &Arc<dyn Transport>,
    dir: &Path,
    direct_io: bool,
    segments: u64,
) -> SegmentStore {
    SegmentStore::open(
        Arc::clone(transport),
        SegmentConfig::new([dir])
            .with_segment_bytes(SEGMENT_BYTES)
            .with_capacity_bytes(segments * SEGMENT_BYTES)
            .with_direct_io(direct_io),
    )
    .unwrap_or_else(|err| panic!("opening the segment store in {}: {err}", dir.display()))
}

/// The keys a segment store lists, oldest write first.
pub fn listed_in_write_order(store: &SegmentStore) -> Vec<usize> {
    let mut listed = store.list();
    listed.sort_by_key(|chunk| chunk.seq);
    listed
        .into_iter()
        .map(|chunk| u64::from_be_bytes(chunk.key.chunk_hash.try_into().unwrap()) as usize)
        .collect()
}

/// The segment files in `dir`, sorted.
pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvseg"))
        .collect();
    files.sort();
    files
}

/// Where the payload of chunk `content` lies on disk: the one segment file and 4 KiB-aligned
/// offset holding exactly its bytes (found by content, not by the format).
pub fn payload_on_disk(dir: &Path, content: usize) -> (std::path::PathBuf, u64) {
    let mut want = vec![0u8; CHUNK];
    fill_chunk(content, &mut want);
    let mut found = Vec::new();
    for path in segment_files(dir) {
        let bytes = std::fs::read(&path).unwrap();
        for at in (0..bytes.len().saturating_sub(CHUNK - 1)).step_by(4096) {
            if bytes[at..at + CHUNK] == want[..] {
                found.push((path.clone(), at as u64));
            }
        }
    }
    assert_eq!(found.len(), 1, "chunk {content} on disk: {found:?}");
    found.remove(0)
}

/// Rewrites `len` bytes at `at` of `path` with what `damage` makes of them.
fn damage(path: &Path, at: u64, len: usize, damage: impl FnOnce(&mut [u8])) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, at).unwrap();
    damage(&mut bytes);
    file.write_all_at(&bytes, at).unwrap();
}

/// Segment round trip with scattered keys: misses for absent keys, an overwrite served with
/// its new bytes only, deletes, write order, and nothing on disk but segment files and the lock.
pub fn segment_round_trip(transport: Arc<dyn Transport>, direct_io: bool) {
    let dir = tempfile::tempdir().unwrap();
    let memory = Memory::new(&transport, 96);
    let store = segments(&transport, dir.path(), direct_io, 4);
    if !direct_io {
        assert!(!store.direct_io(), "buffered when asked to be");
    }
    let stored: Vec<usize> = (0..40).map(|i| i * 3).collect();
    put_all(&store, &memory, &stored);
    assert_eq!(get_all(&store, &memory, &stored), vec![true; 40]);
    assert_eq!(
        get_all(&store, &memory, &[1, 0, 2]),
        vec![false, true, false]
    );
    assert!(store.contains(&key(3)));
    assert!(!store.contains(&key(4)));
    assert_eq!(store.stored_size(&key(3)), Some(CHUNK as u64));
    assert_eq!(store.stored_size(&key(4)), None);
    assert_eq!(
        listed_in_write_order(&store),
        stored,
        "listed in write order"
    );
    put_as(&store, &memory, &[(6, 1006)]);
    assert_eq!(
        get_as(&store, &memory, &[(6, 1006)]),
        vec![true],
        "an overwrite serves its new bytes"
    );
    assert_eq!(store.list().len(), 40, "an overwrite is no new key");
    assert!(store.delete(&key(3)).unwrap());
    assert!(!store.delete(&key(3)).unwrap());
    assert_eq!(get_all(&store, &memory, &[3]), vec![false]);
    assert!(!store.contains(&key(3)));
    let usage = store.usage();
    assert_eq!(usage.keys, 39);
    assert_eq!(usage.capacity_bytes, 4 * SEGMENT_BYTES);
    assert!(usage.live_bytes + usage.dead_bytes <= usage.capacity_bytes);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.starts_with("seg-") && n.ends_with(".kvseg")))
        .collect();
    names.sort();
    assert_eq!(names, vec!["segments.lock"], "no file per key");
    let files = segment_files(dir.path());
    assert!(files.len() <= 4, "{files:?}");
    for file in &files {
        assert_eq!(std::fs::metadata(file).unwrap().len(), SEGMENT_BYTES);
    }
}

/// What one store instance wrote, overwrote and deleted is what the next one finds (restart),
/// twice, on O_DIRECT.
pub fn segment_restart_recovery(make: &dyn Fn() -> Arc<dyn Transport>) {
    let dir = tempfile::tempdir().unwrap();
    // A fresh transport, memory and store over the folder: a restart.
    let reopen = || {
        let transport = make();
        let memory = Memory::new(&transport, 16);
        let store = segments(&transport, dir.path(), true, 4);
        (memory, store)
    };
    {
        let (memory, store) = reopen();
        put_all(&store, &memory, &[5, 6, 7, 8, 9]);
        put_as(&store, &memory, &[(6, 1006)]);
        assert!(store.delete(&key(7)).unwrap());
    }
    {
        let (memory, store) = reopen();
        assert_eq!(
            get_as(
                &store,
                &memory,
                &[(5, 5), (6, 1006), (7, 7), (8, 8), (9, 9), (10, 10)]
            ),
            vec![true, true, false, true, true, false],
            "the overwrite's new bytes and the delete survive a restart"
        );
        assert_eq!(listed_in_write_order(&store), vec![5, 8, 9, 6]);
        assert!(store.delete(&key(8)).unwrap());
        put_all(&store, &memory, &[11]);
    }
    let (memory, store) = reopen();
    assert_eq!(
        get_as(
            &store,
            &memory,
            &[(5, 5), (6, 1006), (7, 7), (8, 8), (9, 9), (11, 11)]
        ),
        vec![true, true, false, false, true, true],
        "a delete made after a restart survives the next one"
    );
    assert_eq!(listed_in_write_order(&store), vec![5, 9, 6, 11]);
}

/// Damage on disk, made while no store is open, reads as misses in a fresh open, never as
/// wrong bytes: a flipped payload byte, flipped header bytes (checked fields, key, frame), a
/// payload holding another chunk's bytes, a payload torn at half, a truncated segment file, a
/// segment header copied from another segment, and a foreign file in the folder. Undamaged
/// entries are served, and the store takes and keeps new data afterwards.
pub fn segment_corruption_reads_as_miss(transport: Arc<dyn Transport>) {
    let dir = tempfile::tempdir().unwrap();
    let memory = Memory::new(&transport, 32);
    // Three instances, so three segments: one opened by an instance is sealed by the next.
    for batch in [&[0, 1, 2, 3, 4, 5, 6, 7, 8][..], &[20, 21, 22], &[30, 31]] {
        let store = segments(&transport, dir.path(), false, 4);
        put_all(&store, &memory, batch);
    }
    // Every place is found before any damage (a copied payload would be found twice).
    let at: std::collections::HashMap<usize, (std::path::PathBuf, u64)> =
        [0, 1, 2, 3, 4, 5, 7, 21, 30]
            .into_iter()
            .map(|i| (i, payload_on_disk(dir.path(), i)))
            .collect();
    let payload = |i: usize| at[&i].clone();
    let header = |i: usize| (at[&i].0.clone(), at[&i].1 - 4096);
    let (path, offset) = payload(0);
    damage(&path, offset + 1234, 1, |b| b[0] ^= 0x40);
    let (path, offset) = header(1);
    damage(&path, offset + 8, 1, |b| b[0] ^= 0x01);
    let mut foreign = vec![0u8; CHUNK];
    let (from, from_offset) = payload(3);
    damage(&from, from_offset, CHUNK, |b| foreign.copy_from_slice(b));
    let (path, offset) = payload(2);
    damage(&path, offset, CHUNK, |b| b.copy_from_slice(&foreign));
    let (path, offset) = header(4);
    damage(&path, offset + 100, 1, |b| b[0] ^= 0x20);
    let (path, offset) = payload(5);
    damage(&path, offset + CHUNK as u64 / 2, CHUNK / 2, |b| b.fill(0));
    // The frame of 7: the walk of its segment ends there, so 8 is not found either.
    let (path, offset) = header(7);
    damage(&path, offset + 44, 1, |b| b[0] ^= 0xFF);
    // The segment of 20..22 cut inside the payload of 21.
    let (path, offset) = payload(21);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(offset + 4096)
        .unwrap();
    // The segment of 30 and 31 gets the segment header of the segment of 0..8.
    let (first, _) = payload(3);
    let (path, _) = payload(30);
    assert_ne!(first, path);
    let mut block = vec![0u8; 4096];
    damage(&first, 0, 4096, |b| block.copy_from_slice(b));
    damage(&path, 0, 4096, |b| b.copy_from_slice(&block));
    std::fs::write(dir.path().join("notes.txt"), b"someone else's file").unwrap();

    let store = segments(&transport, dir.path(), false, 4);
    let all = [0, 1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 30, 31];
    let want = [
        false, false, false, true, false, false, true, false, false, true, false, false, false,
        false,
    ];
    assert_eq!(get_all(&store, &memory, &all), want);
    assert_eq!(
        listed_in_write_order(&store),
        vec![3, 6, 20],
        "what does not check out leaves the index"
    );
    put_all(&store, &memory, &[0, 7, 21, 30]);
    assert_eq!(
        get_all(&store, &memory, &[0, 7, 21, 30, 3]),
        vec![true; 5],
        "healthy after damage"
    );
    drop(store);
    let store = segments(&transport, dir.path(), false, 4);
    assert_eq!(get_all(&store, &memory, &all), {
        let mut want = want;
        for i in [0, 7, 10, 12] {
            want[i] = true;
        }
        want
    });
}

/// Keys that are no valid file keys are refused on segments too, and leave nothing behind.
pub fn segment_hostile_keys_rejected(transport: Arc<dyn Transport>) {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let memory = Memory::new(&transport, 16);
    let store = segments(&transport, &dir, false, 2);
    let hostile = hostile_keys();
    let pages = memory.filled(0..hostile.len());
    let items: Vec<_> = hostile.iter().zip(&pages).collect();
    for result in store.put(&items) {
        assert!(
            matches!(result, Err(Error::InvalidKey { .. })),
            "{result:?}"
        );
    }
    let mut targets: Vec<Page> = (0..hostile.len())
        .map(|_| memory.pool.allocate().unwrap())
        .collect();
    let mut reads: Vec<_> = hostile.iter().zip(targets.iter_mut()).collect();
    for result in store.get(&mut reads) {
        assert!(!matches!(result, Ok(true)), "{result:?}");
    }
    assert!(store.list().is_empty());
    assert_eq!(store.usage().keys, 0);
    drop(store);
    let mut outside: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    outside.sort();
    assert_eq!(outside, vec![std::ffi::OsString::from("store")]);
    let store = segments(&transport, &dir, false, 2);
    assert!(store.list().is_empty(), "nothing found at the next open");
}

/// A full store refuses with `NoSpace` at exactly its capacity; a segment whose keys are all
/// deleted takes new ones, and the files on disk never grow.
pub fn segment_space_is_reused(transport: Arc<dyn Transport>) {
    let dir = tempfile::tempdir().unwrap();
    let memory = Memory::new(&transport, 8);
    let store = segments(&transport, dir.path(), true, 2);
    let fits = 2 * ENTRIES_PER_SEGMENT;
    for i in 0..fits {
        put_all(&store, &memory, &[i]);
    }
    let page = memory.filled([fits]);
    let refused = store.put(&[(&key(fits), &page[0])]);
    assert!(
        matches!(refused[0], Err(Error::NoSpace { .. })),
        "{refused:?}"
    );
    drop(page);
    let first = store.list().iter().map(|c| c.segment).min().unwrap();
    let freed: Vec<usize> = {
        let mut listed = store.list();
        listed.retain(|c| c.segment == first);
        listed
            .into_iter()
            .map(|c| u64::from_be_bytes(c.key.chunk_hash.try_into().unwrap()) as usize)
            .collect()
    };
    assert_eq!(freed.len(), ENTRIES_PER_SEGMENT);
    for &i in &freed {
        assert!(store.delete(&key(i)).unwrap());
    }
    let fresh: Vec<usize> = (fits..fits + freed.len()).collect();
    for &i in &fresh {
        put_all(&store, &memory, &[i]);
    }
    for &i in &freed {
        assert_eq!(get_all(&store, &memory, &[i]), vec![false], "deleted {i}");
    }
    let kept: Vec<usize> = (0..fits + freed.len())
        .filter(|i| !freed.contains(i))
        .collect();
    for piece in kept.chunks(8) {
        assert_eq!(get_all(&store, &memory, piece), vec![true; piece.len()]);
    }
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!(on_disk, 2 * SEGMENT_BYTES, "capacity is exact");
}

/// Keys the adapter crash test writes over and over.
pub const CRASH_KEYS: usize = 96;

/// Bytes of one chunk in the adapter crash test: 42 entries to a segment of 1 MiB.
pub const CRASH_CHUNK: usize = 16 * 1024 + 100;

/// The `--l2-adapter` JSON of the adapter crash test: a dynamic store on segments of 1 MiB,
/// 48 MiB, O_DIRECT, no eviction (every key the writer was told is stored must stay), room for
/// [`CRASH_KEYS`] however fragmented the restarts leave the segments.
pub fn crash_l2_adapter(dir: &Path) -> String {
    let capacity_gb = 48.0 / 1024.0;
    format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{capacity_gb}","layout":"segments","segment_size_mb":"1","use_direct_io":"true"}}}}"#,
        dir.display()
    )
}

/// Opens the crash test's store the way a user does: `StoreBuilder` from the `--l2-adapter`
/// JSON, on `engine` (`nixl`: NIXL POSIX, `uring`: the native engine).
pub fn crash_store(dir: &Path, engine: &str) -> kv_l2_adapter::Result<kv_l2_adapter::Store> {
    let engine = match engine {
        "nixl" => kv_l2_adapter::Engine::Nixl,
        "uring" => kv_l2_adapter::Engine::Native,
        other => panic!("unknown engine {other}"),
    };
    kv_l2_adapter::StoreBuilder::from_l2_adapters([crash_l2_adapter(dir)])
        .with_engine(engine)
        .with_chunk_bytes(CRASH_CHUNK)
        .with_pool_bytes(32 * CRASH_CHUNK.next_multiple_of(4096) as u64)
        .build()
}

/// Key `i` of the adapter crash test.
pub fn crash_key(i: usize) -> kv_l2_adapter::ChunkKey {
    kv_l2_adapter::test_utils::key(i as u32, None)
}

/// The content of key `i` as written by the writer of generation `generation`: a version
/// another generation wrote never compares equal.
pub fn crash_fill(i: usize, generation: usize, buf: &mut [u8]) {
    fill_chunk((generation << 20) | i, buf);
}
