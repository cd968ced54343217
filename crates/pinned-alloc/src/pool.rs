//! The page pool: fixed-size pages carved from one mapping, handed out one per object.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::error::{Error, Result};
use crate::mapping::{HUGEPAGE_BYTES, Mapping};
use crate::region::MemoryRegion;

/// Every page starts on this boundary (the `O_DIRECT` alignment).
pub const PAGE_ALIGN: usize = 4096;

/// Whether the pool's memory is locked with `mlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LockMode {
    /// Do not lock.
    Off,
    /// Lock where permitted; warn and go on unlocked otherwise.
    #[default]
    BestEffort,
    /// Fail pool creation when the memory cannot be locked.
    Required,
}

/// The shape of a model's KV cache, which fixes the bytes of one chunk (one page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Transformer layers.
    pub layers: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Bytes of one element (2 for bf16/fp16, 1 for fp8).
    pub dtype_bytes: u32,
    /// Whether K and V are stored separately (2) or as one latent (MLA: 1).
    pub kv_tensors: u32,
}

impl KvShape {
    /// A multi-head-attention shape (K and V tensors).
    pub fn new(layers: u32, kv_heads: u32, head_dim: u32, dtype_bytes: u32) -> Self {
        Self {
            layers,
            kv_heads,
            head_dim,
            dtype_bytes,
            kv_tensors: 2,
        }
    }

    /// Bytes of the KV of `tokens` tokens: one chunk of `chunk_size` tokens is one page.
    pub fn chunk_bytes(&self, tokens: u32) -> u64 {
        [
            self.kv_tensors,
            self.layers,
            tokens,
            self.kv_heads,
            self.head_dim,
            self.dtype_bytes,
        ]
        .iter()
        .map(|&n| u64::from(n))
        .product()
    }
}

/// Configuration of a [`PagePool`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Bytes of one page: one KV chunk. Rounded up to a multiple of 4 KiB for the page stride.
    pub page_bytes: usize,
    /// Bytes of the whole pool; rounded down to whole pages.
    pub capacity_bytes: u64,
    /// Back the pool with 2 MiB hugepages (`MAP_HUGETLB`).
    pub hugepages: bool,
    /// Whether to `mlock` the pool.
    pub lock: LockMode,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            page_bytes: 256 << 10,
            capacity_bytes: 64 << 20,
            hugepages: false,
            lock: LockMode::BestEffort,
        }
    }
}

impl PoolConfig {
    /// A pool of `capacity_bytes` in pages of `page_bytes`.
    pub fn new(page_bytes: usize, capacity_bytes: u64) -> Self {
        Self {
            page_bytes,
            capacity_bytes,
            ..Self::default()
        }
    }

    /// A pool of `capacity_bytes` in pages of one chunk of `chunk_tokens` tokens of `shape`.
    pub fn for_chunks(shape: KvShape, chunk_tokens: u32, capacity_bytes: u64) -> Result<Self> {
        let bytes = shape.chunk_bytes(chunk_tokens);
        let page_bytes = usize::try_from(bytes).map_err(|_| Error::TooManyPages {
            pages: bytes,
            max: usize::MAX as u64,
        })?;
        Ok(Self::new(page_bytes, capacity_bytes))
    }

    /// Back the pool with 2 MiB hugepages.
    pub fn with_hugepages(mut self, hugepages: bool) -> Self {
        self.hugepages = hugepages;
        self
    }

    /// Choose whether the pool is locked in memory.
    pub fn with_lock(mut self, lock: LockMode) -> Self {
        self.lock = lock;
        self
    }

    /// The distance between two pages: `page_bytes` rounded up to 4 KiB.
    pub fn page_stride(&self) -> usize {
        self.page_bytes.next_multiple_of(PAGE_ALIGN)
    }

    /// How many whole pages the capacity holds.
    pub fn page_count(&self) -> Result<usize> {
        if self.page_bytes == 0 {
            return Err(Error::ZeroPageSize);
        }
        let stride = self.page_stride() as u64;
        let pages = self.capacity_bytes / stride;
        if pages == 0 {
            return Err(Error::CapacityBelowOnePage {
                capacity_bytes: self.capacity_bytes,
                page_bytes: self.page_stride(),
            });
        }
        let max = u64::from(u32::MAX);
        if pages > max {
            return Err(Error::TooManyPages { pages, max });
        }
        if self.capacity_bytes % stride != 0 {
            tracing::warn!(
                capacity_bytes = self.capacity_bytes,
                page_bytes = stride,
                usable_bytes = pages * stride,
                "pool capacity is not a whole number of pages; rounding down"
            );
        }
        usize::try_from(pages).map_err(|_| Error::TooManyPages { pages, max })
    }

    /// Builds the pool.
    pub fn build(self) -> Result<Arc<PagePool>> {
        PagePool::new(self)
    }
}

/// Counters of a pool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Pages in the pool.
    pub total: usize,
    /// Pages free now.
    pub free: usize,
    /// Most pages ever in use at once.
    pub high_water: usize,
    /// Pages retired for good because hardware may still access them ([`Page::abandon`]).
    pub abandoned: usize,
}

/// A pool of fixed-size, 4 KiB-aligned pages carved from one mapping.
pub struct PagePool {
    mapping: Mapping,
    stride: usize,
    page_bytes: usize,
    total: usize,
    free: ArrayQueue<u32>,
    in_use: AtomicUsize,
    high_water: AtomicUsize,
    abandoned: AtomicUsize,
    hugepages: bool,
}

impl fmt::Debug for PagePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePool")
            .field("base", &self.mapping.base())
            .field("len", &self.mapping.len())
            .field("page_bytes", &self.page_bytes)
            .field("stride", &self.stride)
            .field("total", &self.total)
            .field("free", &self.free.len())
            .field("locked", &self.mapping.is_locked())
            .field("hugepages", &self.hugepages)
            .finish()
    }
}

impl PagePool {
    /// Maps and (where asked) locks the pool described by `config`.
    pub fn new(config: PoolConfig) -> Result<Arc<Self>> {
        let total = config.page_count()?;
        let stride = config.page_stride();
        let granule = if config.hugepages {
            HUGEPAGE_BYTES
        } else {
            PAGE_ALIGN
        };
        let map_len = (total * stride).next_multiple_of(granule);
        let mapping = Mapping::new(map_len, config.hugepages, config.lock)?;
        let free = ArrayQueue::new(total);
        for index in 0..total {
            // `total` fits in u32 (checked by `page_count`) and the queue holds exactly `total`.
            let _ = free.push(index as u32);
        }
        tracing::debug!(
            pages = total,
            page_bytes = config.page_bytes,
            hugepages = config.hugepages,
            locked = mapping.is_locked(),
            "page pool ready"
        );
        Ok(Arc::new(Self {
            mapping,
            stride,
            page_bytes: config.page_bytes,
            total,
            free,
            in_use: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            hugepages: config.hugepages,
        }))
    }

    /// Bytes of one page (one chunk).
    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    /// Distance between the starts of two pages.
    pub fn page_stride(&self) -> usize {
        self.stride
    }

    /// Whether the pool is backed by 2 MiB hugepages.
    pub fn is_hugepage_backed(&self) -> bool {
        self.hugepages
    }

    /// Whether the pool's memory is locked.
    pub fn is_locked(&self) -> bool {
        self.mapping.is_locked()
    }

    /// Counters: total, free, high-water mark.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total: self.total,
            free: self.free.len(),
            high_water: self.high_water.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
        }
    }

    fn note_taken(&self, n: usize) {
        let now = self.in_use.fetch_add(n, Ordering::Relaxed) + n;
        self.high_water.fetch_max(now, Ordering::Relaxed);
    }

    fn page(self: &Arc<Self>, index: u32) -> Page {
        Page {
            pool: Arc::clone(self),
            index,
            len: self.page_bytes,
            abandoned: AtomicBool::new(false),
        }
    }

    /// Takes one page, or `None` when the pool is exhausted. Never blocks.
    pub fn allocate(self: &Arc<Self>) -> Option<Page> {
        let index = self.free.pop()?;
        self.note_taken(1);
        Some(self.page(index))
    }

    /// Takes `n` pages or none at all. Never blocks.
    pub fn allocate_batch(self: &Arc<Self>, n: usize) -> Result<Vec<Page>> {
        let mut pages = Vec::with_capacity(n);
        for _ in 0..n {
            match self.free.pop() {
                Some(index) => {
                    self.note_taken(1);
                    pages.push(self.page(index));
                }
                None => {
                    let free = self.free.len() + pages.len();
                    drop(pages);
                    return Err(Error::Exhausted {
                        requested: n,
                        free,
                        total: self.total,
                    });
                }
            }
        }
        Ok(pages)
    }

    /// Takes `n` pages or none, waiting (with a growing pause, up to 2 ms) for up to `wait` while
    /// the pool has fewer free: for buffers that other batches in flight give back soon.
    pub fn allocate_batch_within(self: &Arc<Self>, n: usize, wait: Duration) -> Result<Vec<Page>> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            match self.allocate_batch(n) {
                Ok(pages) => return Ok(pages),
                Err(err) if started.elapsed() >= wait => return Err(err),
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(2));
                }
            }
        }
    }

    fn release(&self, index: u32) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        if self.free.push(index).is_err() {
            // Unreachable while the free-list invariant holds; logging beats panicking in Drop.
            tracing::error!(index, "page returned to a full free list");
        }
    }
}

// SAFETY: the pool's mapping is created once in `PagePool::new` and unmapped only when the pool
// is dropped, so `base()..base()+len()` stays valid for as long as the pool value lives.
unsafe impl MemoryRegion for PagePool {
    fn base(&self) -> NonNull<u8> {
        self.mapping.base()
    }

    fn len(&self) -> usize {
        self.mapping.len()
    }
}

/// One page of a [`PagePool`], owned exclusively until dropped, when it returns to the pool.
///
/// A page may be narrowed to a shorter view ([`Page::set_len`]) for a partial ("unfull") chunk;
/// it still occupies a whole page of the pool.
///
/// A page that hardware may still be accessing after a failed or timed-out transfer is
/// [abandoned](Page::abandon): from then on it shows no bytes, and its memory never returns to
/// the pool nor is unmapped, so nothing can observe or reuse what the engine may still touch.
pub struct Page {
    pool: Arc<PagePool>,
    index: u32,
    len: usize,
    abandoned: AtomicBool,
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("index", &self.index)
            .field("len", &self.len)
            .field("abandoned", &self.is_abandoned())
            .finish()
    }
}

impl Page {
    /// Index of the page in its pool.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Byte offset of the page from the pool's base.
    pub fn offset(&self) -> usize {
        self.index as usize * self.pool.stride
    }

    /// Bytes in the current view; 0 once abandoned.
    pub fn len(&self) -> usize {
        if self.is_abandoned() { 0 } else { self.len }
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands the page over: this handle becomes an empty husk (every view empty, its drop does
    /// nothing), and the returned handle owns the page's memory instead. For an engine that
    /// may still access the memory after a failed transfer: it keeps the returned page until it
    /// can no longer touch it. `None` if this handle was already handed over or abandoned.
    pub fn surrender(&self) -> Option<Page> {
        if self.abandoned.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Page {
            pool: Arc::clone(&self.pool),
            index: self.index,
            len: self.len,
            abandoned: AtomicBool::new(false),
        })
    }

    /// Retires the page for good: an engine may still read or write its memory at any later
    /// time. This handle becomes an empty husk as with [`surrender`](Page::surrender), the memory
    /// never returns to the pool, and the pool's mapping is never unmapped. Counted in
    /// [`PoolStats::abandoned`]. Idempotent.
    pub fn abandon(&self) {
        if let Some(owner) = self.surrender() {
            owner.abandon_owned();
        }
    }

    /// Retires an owned page for good (see [`abandon`](Page::abandon)).
    pub fn abandon_owned(self) {
        self.pool.abandoned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            index = self.index,
            bytes = self.pool.page_bytes,
            "page abandoned: an engine may still access it, so it is retired for good"
        );
        // Never dropped: the index never returns to the free list, and the pool reference it
        // holds keeps the mapping for the rest of the process.
        std::mem::forget(self);
    }

    /// Whether the page was [abandoned](Page::abandon).
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Bytes of a full page.
    pub fn capacity(&self) -> usize {
        self.pool.page_bytes
    }

    /// Narrows (or widens, up to the capacity) the view, for partial chunks.
    /// Returns the new length, clamped to the capacity.
    pub fn set_len(&mut self, len: usize) -> usize {
        self.len = len.min(self.pool.page_bytes);
        self.len
    }

    /// The view rounded up to whole 4 KiB blocks, as `O_DIRECT` transfers need. The bytes past
    /// [`len`](Page::len) are this page's own padding (pages are 4 KiB apart), never another's.
    pub fn io_slice(&self) -> &[u8] {
        let len = self.io_len();
        // SAFETY: `io_len() <= stride`: `len <= page_bytes`, rounded up to 4 KiB, never exceeds
        // the stride (page_bytes rounded up to 4 KiB). The rest as in `as_slice`.
        unsafe { std::slice::from_raw_parts(self.start(), len) }
    }

    /// The padded view, writable.
    pub fn io_slice_mut(&mut self) -> &mut [u8] {
        let len = self.io_len();
        // SAFETY: as in `io_slice`; `&mut self` makes this the only live view of the page.
        unsafe { std::slice::from_raw_parts_mut(self.start(), len) }
    }

    fn io_len(&self) -> usize {
        self.len().next_multiple_of(PAGE_ALIGN)
    }

    /// The pool this page belongs to.
    pub fn pool(&self) -> &Arc<PagePool> {
        &self.pool
    }

    fn start(&self) -> *mut u8 {
        // SAFETY: `index < total` (it came from the free list, filled with 0..total), so the
        // offset is inside the mapping of `total * stride` bytes or more.
        unsafe { self.pool.mapping.base().as_ptr().add(self.offset()) }
    }

    /// The bytes of the current view.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `start()..start()+len` lies inside this page (len <= page_bytes <= stride), the
        // mapping outlives `self` (we hold an Arc of the pool), and no other `Page` covers these
        // bytes because an index is owned by at most one `Page` at a time.
        unsafe { std::slice::from_raw_parts(self.start(), self.len()) }
    }

    /// The bytes of the current view, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only live view of the page.
        unsafe { std::slice::from_raw_parts_mut(self.start(), self.len()) }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        if !self.is_abandoned() {
            self.pool.release(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(page_bytes: usize, pages: u64) -> Arc<PagePool> {
        PoolConfig::new(
            page_bytes,
            page_bytes.next_multiple_of(PAGE_ALIGN) as u64 * pages,
        )
        .with_lock(LockMode::Off)
        .build()
        .unwrap()
    }

    #[test]
    fn an_abandoned_page_shows_nothing_and_never_returns_to_the_pool() {
        let pool = pool(8192, 2);
        let mut page = pool.allocate().unwrap();
        page.as_mut_slice().fill(7);
        page.abandon();
        page.abandon();
        assert!(page.as_slice().is_empty() && page.io_slice().is_empty());
        assert!(page.as_mut_slice().is_empty() && page.io_slice_mut().is_empty());
        assert_eq!(page.len(), 0);
        drop(page);
        assert_eq!(
            pool.stats().free,
            1,
            "the abandoned page stays out of circulation"
        );
        assert_eq!(pool.stats().abandoned, 1);
        let other = pool.allocate().unwrap();
        assert!(pool.allocate().is_none());
        drop(other);
        assert_eq!(pool.stats().free, 1);
    }

    #[test]
    fn a_surrendered_page_is_a_husk_and_its_new_owner_returns_it() {
        let pool = pool(8192, 2);
        let mut page = pool.allocate().unwrap();
        page.as_mut_slice().fill(9);
        let owner = page.surrender().unwrap();
        assert!(page.surrender().is_none(), "handed over once");
        assert!(page.as_mut_slice().is_empty() && page.is_abandoned());
        assert!(owner.as_slice().iter().all(|&b| b == 9) && owner.len() == 8192);
        drop(page);
        assert_eq!(pool.stats().free, 1, "the husk gives nothing back");
        drop(owner);
        assert_eq!(pool.stats().free, 2, "the owner does");
        assert_eq!(pool.stats().abandoned, 0);
    }

    #[test]
    fn llama_8b_chunk_is_32_mib() {
        let shape = KvShape::new(32, 8, 128, 2);
        assert_eq!(shape.chunk_bytes(256), 32 << 20);
        let config = PoolConfig::for_chunks(shape, 256, 5 << 30).unwrap();
        assert_eq!(config.page_count().unwrap(), 160);
    }

    #[test]
    fn capacity_rounds_down_to_whole_pages() {
        let config = PoolConfig::new(8192, 8192 * 3 + 100);
        assert_eq!(config.page_count().unwrap(), 3);
    }

    #[test]
    fn capacity_below_one_page_is_an_error() {
        let err = PoolConfig::new(1 << 20, 4096).page_count().unwrap_err();
        assert!(matches!(
            err,
            Error::CapacityBelowOnePage {
                capacity_bytes: 4096,
                page_bytes: 1_048_576
            }
        ));
    }

    #[test]
    fn zero_page_size_is_an_error() {
        assert!(matches!(
            PoolConfig::new(0, 1 << 20).page_count(),
            Err(Error::ZeroPageSize)
        ));
    }

    #[test]
    fn every_page_is_4k_aligned_even_for_odd_chunk_sizes() {
        let pool = pool(5000, 8);
        assert_eq!(pool.page_stride(), 8192);
        let pages = pool.allocate_batch(8).unwrap();
        for page in &pages {
            assert_eq!(page.as_slice().as_ptr() as usize % PAGE_ALIGN, 0);
            assert_eq!(page.len(), 5000);
        }
        let mut offsets: Vec<_> = pages.iter().map(Page::offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), 8, "pages must not overlap");
    }

    #[test]
    fn exhaustion_returns_none_and_pages_come_back_on_drop() {
        let pool = pool(4096, 2);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert!(pool.allocate().is_none());
        assert_eq!(pool.stats().free, 0);
        drop(a);
        assert_eq!(pool.stats().free, 1);
        assert!(pool.allocate().is_some());
        drop(b);
        assert_eq!(
            pool.stats(),
            PoolStats {
                total: 2,
                free: 2,
                high_water: 2,
                abandoned: 0,
            }
        );
    }

    #[test]
    fn a_batch_within_a_wait_takes_pages_given_back_meanwhile() {
        let pool = pool(4096, 2);
        let held = pool.allocate_batch(2).unwrap();
        let short = Duration::from_millis(20);
        assert!(matches!(
            pool.allocate_batch_within(1, short),
            Err(Error::Exhausted { requested: 1, .. })
        ));
        let giver = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(held);
        });
        let pages = pool
            .allocate_batch_within(2, Duration::from_secs(5))
            .unwrap();
        assert_eq!(pages.len(), 2);
        giver.join().unwrap();
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let pool = pool(4096, 4);
        let held = pool.allocate().unwrap();
        let err = pool.allocate_batch(4).unwrap_err();
        assert!(matches!(
            err,
            Error::Exhausted {
                requested: 4,
                free: 3,
                total: 4
            }
        ));
        assert_eq!(pool.stats().free, 3, "a refused batch keeps no page");
        assert_eq!(pool.allocate_batch(3).unwrap().len(), 3);
        drop(held);
    }

    #[test]
    fn unfull_chunk_narrows_the_view_but_uses_a_whole_page() {
        let pool = pool(4096, 2);
        let mut page = pool.allocate().unwrap();
        assert_eq!(page.set_len(1000), 1000);
        assert_eq!(page.as_mut_slice().len(), 1000);
        assert_eq!(page.capacity(), 4096);
        assert_eq!(pool.stats().free, 1);
        assert_eq!(
            page.set_len(1 << 20),
            4096,
            "a view never grows past the page"
        );
    }

    #[test]
    fn io_slices_pad_to_4k_within_the_page() {
        let pool = pool(5000, 2);
        let mut pages = pool.allocate_batch(2).unwrap();
        assert_eq!(pages[0].io_slice().len(), 8192);
        pages[0].io_slice_mut().fill(1);
        pages[1].io_slice_mut().fill(2);
        assert!(
            pages[0].io_slice().iter().all(|&b| b == 1),
            "padding never overlaps"
        );
        pages[0].set_len(100);
        assert_eq!(pages[0].io_slice().len(), 4096);
    }

    #[test]
    fn pages_live_inside_the_registered_region() {
        let pool = pool(4096, 4);
        let page = pool.allocate().unwrap();
        let slice = page.as_slice();
        assert!(pool.contains(slice.as_ptr(), slice.len()));
        assert!(!pool.contains(slice.as_ptr(), pool.len() + 1));
    }

    #[test]
    fn hugepage_error_says_how_many_pages_are_needed_and_free() {
        let sysfs = tempfile::tempdir().unwrap();
        std::fs::write(sysfs.path().join("nr_hugepages"), "10\n").unwrap();
        std::fs::write(sysfs.path().join("free_hugepages"), "3\n").unwrap();
        let err = crate::mapping::hugepage_error(
            5 * HUGEPAGE_BYTES,
            std::io::Error::from_raw_os_error(libc::ENOMEM),
            sysfs.path(),
        );
        let text = err.to_string();
        assert!(text.contains("needs 5 hugepages"), "{text}");
        assert!(text.contains("3 are free of 10"), "{text}");
        assert!(text.contains("vm.nr_hugepages=12"), "{text}");
    }
}
