//! What the dynamic-store tests share: a native io_uring transport, a registered page pool,
//! and one-key put and get.

use std::sync::Arc;

use nixl_core::{Registration, Transport, TransportExt};
use nixl_file::{DynamicConfig, DynamicFileStore, FileKey, Result, UringConfig, UringTransport};
use pinned_alloc::{PAGE_ALIGN, Page, PagePool, PoolConfig};

/// Bytes of one chunk (not a multiple of 4 KiB, so that padding is exercised).
pub(crate) const CHUNK: usize = 8 * 1024 + 100;

pub(crate) struct Fixture {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) pool: Arc<PagePool>,
    _registration: Registration,
}

impl Fixture {
    /// `pages` chunk pages, registered with a fresh native engine.
    pub(crate) fn new(pages: usize) -> Self {
        let transport: Arc<dyn Transport> =
            Arc::new(UringTransport::new(UringConfig::default()).unwrap());
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

    pub(crate) fn open(&self, config: DynamicConfig) -> DynamicFileStore {
        DynamicFileStore::open(Arc::clone(&self.transport), config).unwrap()
    }

    /// A page whose every byte is `fill`.
    pub(crate) fn page(&self, fill: u8) -> Page {
        let mut page = self.pool.allocate().unwrap();
        page.as_mut_slice().fill(fill);
        page
    }

    /// `Ok(true)` only for a hit whose every byte is `fill`.
    pub(crate) fn get(&self, store: &DynamicFileStore, key: &FileKey, fill: u8) -> Result<bool> {
        let mut page = self.page(!fill);
        let hit = store.get(&mut [(key, &mut page)]).remove(0)?;
        Ok(hit && page.as_slice().iter().all(|&b| b == fill))
    }
}

pub(crate) fn key(model: &str, salt: Option<&str>) -> FileKey {
    FileKey {
        model: model.to_owned(),
        kv_rank: 1,
        group_id: 2,
        chunk_hash: vec![0xde, 0xad, 0xbe, 0xef],
        cache_salt: salt.map(str::to_owned),
    }
}
