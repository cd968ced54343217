//! The transport conformance suite: every engine (NIXL POSIX, the native io_uring engine) must
//! pass the same functions.

use std::fs::OpenOptions;
use std::sync::Arc;

use nixl_core::{
    Direction, Error, PageBatch, PageView, Registration, StorageExtent, StorageName, Transport,
    TransportExt,
};
use nixl_file::{FileOptions, open_storage_file};
use pinned_alloc::{MemoryRegion, PagePool, PoolConfig};

use crate::fill_chunk;

/// Bytes of one chunk in these tests.
pub const CHUNK: usize = 64 << 10;

/// A transport with a registered pool and one registered, preallocated file.
#[derive(Debug)]
pub struct Rig {
    /// The engine under test.
    pub transport: Arc<dyn Transport>,
    /// The registered page pool.
    pub pool: Arc<PagePool>,
    _memory: Registration,
    /// The registered file.
    pub storage: Registration,
    /// The folder holding the file.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// `pages` pages of [`CHUNK`] bytes, and a file of as many slots.
    pub fn new(transport: Arc<dyn Transport>, pages: usize, direct_io: bool) -> Self {
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
        Self {
            transport,
            pool,
            _memory: memory,
            storage,
            dir,
        }
    }

    /// The extent of slot `slot` of the file.
    pub fn extent(&self, slot: usize) -> StorageExtent {
        StorageExtent::new(self.storage.dev_id(), (slot * CHUNK) as u64)
    }
}

/// Writes `n` chunks to scattered slots in one blocking batch, reads them back, compares.
pub fn round_trip(transport: Arc<dyn Transport>, n: usize, direct_io: bool) {
    let rig = Rig::new(transport, 2 * n + 1, direct_io);
    let slot = |i: usize| (i * 7 + 3) % (2 * n + 1);
    let mut sources = rig.pool.allocate_batch(n).unwrap();
    for (i, page) in sources.iter_mut().enumerate() {
        fill_chunk(i, page.as_mut_slice());
    }
    let writes: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, p)| (p, rig.extent(slot(i))))
        .collect();
    rig.transport.write_pages(&writes, PageView::Exact).unwrap();
    drop(sources);
    let mut targets = rig.pool.allocate_batch(n).unwrap();
    let mut reads: Vec<_> = targets
        .iter_mut()
        .enumerate()
        .map(|(i, p)| (p, rig.extent(slot(i))))
        .collect();
    rig.transport
        .read_pages(&mut reads, PageView::Exact)
        .unwrap();
    drop(reads);
    let mut expected = vec![0u8; CHUNK];
    for (i, page) in targets.iter().enumerate() {
        fill_chunk(i, &mut expected);
        assert!(page.as_slice() == &expected[..], "chunk {i} differs");
    }
}

/// Submitted batches own their pages and give them back, written and read intact.
pub fn submitted_batches(transport: Arc<dyn Transport>) {
    let rig = Rig::new(transport, 16, true);
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

/// A batch naming unregistered storage fails as a whole and returns its pages.
pub fn unstartable_batch(transport: Arc<dyn Transport>) {
    let rig = Rig::new(transport, 4, false);
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

/// Buffers outside registered memory and unregistered descriptors are refused, typed; dropping
/// a registration deregisters it.
pub fn refusals(transport: Arc<dyn Transport>) {
    let rig = Rig::new(transport, 4, false);
    let unregistered = PoolConfig::new(CHUNK, CHUNK as u64).build().unwrap();
    let outside = unregistered.allocate().unwrap();
    let err = rig
        .transport
        .write_pages(&[(&outside, rig.extent(0))], PageView::Exact)
        .unwrap_err();
    assert!(
        matches!(err, Error::UnregisteredMemory { len: CHUNK, .. }),
        "{err:?}"
    );
    let page = rig.pool.allocate().unwrap();
    let err = rig
        .transport
        .write_pages(&[(&page, StorageExtent::new(987_654, 0))], PageView::Exact)
        .unwrap_err();
    assert!(
        matches!(err, Error::UnregisteredStorage { dev_id: 987_654 }),
        "{err:?}"
    );
    let Rig {
        transport,
        _memory,
        storage,
        ..
    } = rig;
    let extent = StorageExtent::new(storage.dev_id(), 0);
    transport
        .write_pages(&[(&page, extent)], PageView::Exact)
        .unwrap();
    drop(_memory);
    let err = transport
        .write_pages(&[(&page, extent)], PageView::Exact)
        .unwrap_err();
    assert!(matches!(err, Error::UnregisteredMemory { .. }), "{err:?}");
}

/// A transfer the OS refuses (reading a write-only file) is an error, not a hang or abort.
pub fn failing_transfer(transport: Arc<dyn Transport>) {
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
        .read_pages(
            &mut [(&mut page, StorageExtent::new(storage.dev_id(), 0))],
            PageView::Exact,
        )
        .unwrap_err();
    assert!(
        !matches!(
            err,
            Error::UnregisteredMemory { .. } | Error::UnregisteredStorage { .. }
        ),
        "the engine itself must fail the read: {err:?}"
    );
}

/// Existence answers per file, in order.
pub fn existence(transport: Arc<dyn Transport>) {
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
        transport.register_object(7, CHUNK),
        Err(Error::WrongStorageKind { .. })
    ));
}

/// Two threads submitting batches through one transport.
pub fn two_threads(transport: Arc<dyn Transport>) {
    let rig = Arc::new(Rig::new(transport, 128, true));
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
