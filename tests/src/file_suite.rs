//! The file-backend suite: dynamic and static stores through any transport.

use std::path::Path;
use std::sync::Arc;

use nixl_core::{Transport, TransportExt};
use nixl_file::{DynamicConfig, DynamicFileStore, Error, FileKey, StaticConfig, StaticFilePool};
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

/// Stores chunks `indices`; every put must succeed.
pub fn put_all(store: &DynamicFileStore, memory: &Memory, indices: &[usize]) {
    let pages = memory.filled(indices.iter().copied());
    let keys: Vec<FileKey> = indices.iter().map(|&i| key(i)).collect();
    let items: Vec<_> = keys.iter().zip(&pages).collect();
    for (i, result) in store.put(&items).into_iter().enumerate() {
        assert_eq!(result.unwrap(), CHUNK as u64, "put of chunk {}", indices[i]);
    }
}

/// Loads chunks `indices`: `Some(true)` hit with exact bytes, `Some(false)` miss.
pub fn get_all(store: &DynamicFileStore, memory: &Memory, indices: &[usize]) -> Vec<bool> {
    let keys: Vec<FileKey> = indices.iter().map(|&i| key(i)).collect();
    let mut pages: Vec<Page> = (0..indices.len())
        .map(|_| memory.pool.allocate().unwrap())
        .collect();
    let mut items: Vec<_> = keys.iter().zip(pages.iter_mut()).collect();
    let results = store.get(&mut items);
    let mut expected = vec![0u8; CHUNK];
    results
        .into_iter()
        .zip(indices)
        .zip(&pages)
        .map(|((result, &i), page)| {
            let hit = result.unwrap_or_else(|e| panic!("get of chunk {i} failed: {e}"));
            if hit {
                fill_chunk(i, &mut expected);
                assert!(
                    page.as_slice() == &expected[..],
                    "chunk {i} loaded wrong bytes"
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

/// Keys that would leave the folder are refused and write nothing anywhere.
pub fn hostile_keys_rejected(transport: Arc<dyn Transport>) {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let memory = Memory::new(&transport, 8);
    let store = dynamic(&transport, &dir, false, false);
    let hostile = [
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
    ];
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
