//! nixl-core through real NIXL: plugins, batches of 1 and 256 descriptors, asynchronous
//! submission, existence queries, failures and concurrency.

use std::fs::OpenOptions;
use std::sync::Arc;

use kv_integration_tests::fill_chunk;
use nixl_core::{
    Direction, Error, NixlConfig, NixlTransport, PageBatch, StorageExtent, StorageName, Transport,
};
use nixl_file::{FileOptions, open_storage_file};
use pinned_alloc::{MemoryRegion, PagePool, PoolConfig};

const CHUNK: usize = 64 << 10;

fn posix() -> NixlTransport {
    NixlTransport::new(NixlConfig::new("POSIX")).unwrap_or_else(|err| panic!("{err}"))
}

struct Rig {
    transport: NixlTransport,
    pool: Arc<PagePool>,
    _memory: nixl_core::Registration,
    storage: nixl_core::Registration,
    _dir: tempfile::TempDir,
}

fn rig(pages: usize, direct_io: bool) -> Rig {
    let transport = posix();
    let pool = PoolConfig::new(CHUNK, (pages * CHUNK) as u64)
        .build()
        .unwrap();
    let memory = transport
        .register_memory(Arc::clone(&pool) as Arc<dyn MemoryRegion>)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = open_storage_file(
        &dir.path().join("chunks"),
        FileOptions::new()
            .with_direct_io(direct_io)
            .with_preallocate((pages * CHUNK) as u64),
    )
    .unwrap();
    let storage = transport.register_file(Arc::new(file)).unwrap();
    Rig {
        transport,
        pool,
        _memory: memory,
        storage,
        _dir: dir,
    }
}

impl Rig {
    fn extent(&self, slot: usize) -> StorageExtent {
        StorageExtent::new(self.storage.dev_id(), (slot * CHUNK) as u64)
    }

    /// Writes `n` filled chunks to slots 0..n and reads them back through blocking batches.
    fn round_trip(&self, n: usize) {
        let mut sources = self.pool.allocate_batch(n).unwrap();
        for (i, page) in sources.iter_mut().enumerate() {
            fill_chunk(i, page.as_mut_slice());
        }
        let writes: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_slice(), self.extent(i)))
            .collect();
        self.transport.write(&writes).unwrap();
        drop(sources);
        let mut targets = self.pool.allocate_batch(n).unwrap();
        let mut reads: Vec<_> = targets
            .iter_mut()
            .enumerate()
            .map(|(i, p)| (p.as_mut_slice(), self.extent(i)))
            .collect();
        self.transport.read(&mut reads).unwrap();
        drop(reads);
        let mut expected = vec![0u8; CHUNK];
        for (i, page) in targets.iter().enumerate() {
            fill_chunk(i, &mut expected);
            assert!(page.as_slice() == &expected[..], "chunk {i} differs");
        }
    }
}

#[test]
fn plugin_listing_includes_posix_with_dram_and_file() {
    let plugins = nixl_core::plugins().unwrap_or_else(|err| panic!("{err}"));
    let posix = plugins
        .iter()
        .find(|p| p.name == "POSIX")
        .expect("POSIX plugin");
    assert!(posix.memory_types.iter().any(|m| m == "DRAM"), "{posix:?}");
    assert!(posix.memory_types.iter().any(|m| m == "FILE"), "{posix:?}");
    assert!(plugins.iter().any(|p| p.name == "OBJ"));
}

#[test]
fn one_descriptor_round_trip() {
    rig(2, false).round_trip(1);
}

#[test]
fn two_hundred_fifty_six_descriptors_in_one_request() {
    rig(512, false).round_trip(256);
}

#[test]
fn two_hundred_fifty_six_descriptors_with_o_direct() {
    rig(512, true).round_trip(256);
}

#[test]
fn submitted_batches_own_their_pages_and_give_them_back() {
    let rig = rig(16, true);
    let mut batch: PageBatch = Vec::new();
    for slot in 0..8 {
        let mut page = rig.pool.allocate().unwrap();
        fill_chunk(slot, page.as_mut_slice());
        batch.push((page, rig.extent(slot)));
    }
    assert_eq!(rig.pool.stats().free, 8);
    let mut pending = rig.transport.submit(Direction::Write, batch);
    while !pending.poll().unwrap() {
        std::thread::yield_now();
    }
    let (pages, status) = pending.wait();
    status.unwrap();
    assert_eq!(pages.len(), 8);
    drop(pages);
    assert_eq!(rig.pool.stats().free, 16);

    let batch: PageBatch = (0..8)
        .map(|slot| (rig.pool.allocate().unwrap(), rig.extent(slot)))
        .collect();
    let (pages, status) = rig.transport.submit(Direction::Read, batch).wait();
    status.unwrap();
    let mut expected = vec![0u8; CHUNK];
    for (slot, (page, extent)) in pages.iter().enumerate() {
        assert_eq!(*extent, rig.extent(slot));
        fill_chunk(slot, &mut expected);
        assert!(page.as_slice() == &expected[..], "chunk {slot} differs");
    }
}

#[test]
fn a_batch_that_cannot_start_fails_as_a_whole_and_returns_its_pages() {
    let rig = rig(4, false);
    let batch: PageBatch = (0..2)
        .map(|slot| {
            (
                rig.pool.allocate().unwrap(),
                StorageExtent::new(424_242, slot),
            )
        })
        .collect();
    let mut pending = rig.transport.submit(Direction::Write, batch);
    assert!(matches!(
        pending.poll(),
        Err(Error::UnregisteredStorage { dev_id: 424_242 })
    ));
    let (pages, _) = pending.wait();
    assert_eq!(pages.len(), 2, "pages come back to the caller");
}

#[test]
fn a_failing_transfer_is_a_typed_error_with_nixl_status() {
    let transport = posix();
    let pool = PoolConfig::new(CHUNK, (2 * CHUNK) as u64).build().unwrap();
    let _memory = transport
        .register_memory(Arc::clone(&pool) as Arc<dyn MemoryRegion>)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("write-only");
    std::fs::write(&path, vec![0u8; CHUNK]).unwrap();
    let write_only = OpenOptions::new().write(true).open(&path).unwrap();
    let storage = transport.register_file(Arc::new(write_only)).unwrap();
    let mut page = pool.allocate().unwrap();
    let err = transport
        .read(&mut [(page.as_mut_slice(), StorageExtent::new(storage.dev_id(), 0))])
        .unwrap_err();
    assert!(matches!(err, Error::Nixl { .. }), "{err:?}");
}

#[test]
fn existence_queries_answer_per_file_in_order() {
    let transport = posix();
    let dir = tempfile::tempdir().unwrap();
    let present = dir.path().join("present.bin");
    std::fs::write(&present, b"kv").unwrap();
    let missing = dir.path().join("missing.bin");
    let answers = transport
        .exists(&[
            StorageName::File(&present),
            StorageName::File(&missing),
            StorageName::File(&present),
        ])
        .unwrap();
    assert_eq!(answers, vec![true, false, true]);
    assert!(transport.exists(&[]).unwrap().is_empty());
    assert!(matches!(
        transport.exists(&[StorageName::Object(7)]),
        Err(Error::WrongStorageKind { .. })
    ));
    assert!(matches!(
        transport.register_object(7, CHUNK),
        Err(Error::WrongStorageKind { .. })
    ));
}

#[test]
fn two_threads_submit_batches_through_one_transport() {
    let rig = Arc::new(rig(128, true));
    let workers: Vec<_> = (0..2usize)
        .map(|thread| {
            let rig = Arc::clone(&rig);
            std::thread::spawn(move || {
                for round in 0..20usize {
                    let base = thread * 32;
                    let mut pages = rig.pool.allocate_batch(16).unwrap();
                    for (i, page) in pages.iter_mut().enumerate() {
                        fill_chunk(1000 * thread + round * 16 + i, page.as_mut_slice());
                    }
                    let batch: PageBatch = pages
                        .into_iter()
                        .enumerate()
                        .map(|(i, page)| (page, rig.extent(base + i)))
                        .collect();
                    let (written, status) = rig.transport.submit(Direction::Write, batch).wait();
                    status.unwrap();
                    let back: PageBatch = written
                        .into_iter()
                        .map(|(mut page, extent)| {
                            page.as_mut_slice().fill(0);
                            (page, extent)
                        })
                        .collect();
                    let (read, status) = rig.transport.submit(Direction::Read, back).wait();
                    status.unwrap();
                    let mut expected = vec![0u8; CHUNK];
                    for (i, (page, _)) in read.iter().enumerate() {
                        fill_chunk(1000 * thread + round * 16 + i, &mut expected);
                        assert!(
                            page.as_slice() == &expected[..],
                            "thread {thread} round {round} chunk {i}"
                        );
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker failed");
    }
}
