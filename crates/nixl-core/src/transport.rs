//! The transport contract every storage engine implements.

use std::fmt::Debug;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use pinned_alloc::{MemoryRegion, Page, PagePool};

use crate::error::Result;

/// How long a request that NIXL reported failed, and the memory it named, are kept out of use:
/// NIXL's status says failed while the plugin may go on using the buffers (seen with NIXL OBJ
/// against a missing bucket: the AWS SDK retried `PutObject`, reading the batch's memory, after
/// the status came back as an error).
pub const FAILED_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Abandoned requests (each keeps its memory and storage for good) after which the transport
/// refuses new transfers: a backend that keeps failing that way would otherwise leak without
/// bound.
pub const MAX_ABANDONED_REQUESTS: usize = 256;

/// Where one chunk lives in storage: the registered device id (a file descriptor for file
/// backends, the object id for object backends) and the byte offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StorageExtent {
    /// Device id of a live storage registration ([`Registration::dev_id`]).
    pub dev_id: u64,
    /// Byte offset inside the storage item.
    pub offset: u64,
}

impl StorageExtent {
    /// The extent at `offset` of the storage item registered as `dev_id`.
    pub fn new(dev_id: u64, offset: u64) -> Self {
        Self { dev_id, offset }
    }
}

/// Which way a batch moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host pages to storage.
    Write,
    /// Storage to host pages.
    Read,
}

/// A storage item whose existence can be queried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageName<'a> {
    /// A file, by path.
    File(&'a Path),
    /// An object, by its 64-bit id (the object name is its decimal form).
    Object(u64),
}

/// A batch of pages with their extents, owned by a transfer while it is in flight.
pub type PageBatch = Vec<(Page, StorageExtent)>;

/// A live registration of memory or storage. Dropping it deregisters.
#[derive(Debug)]
pub struct Registration {
    dev_id: u64,
    _guard: Box<dyn Debug + Send + Sync>,
}

impl Registration {
    /// Wraps an implementation's guard, whose `Drop` deregisters. For implementers of
    /// [`Transport`].
    pub fn new(dev_id: u64, guard: Box<dyn Debug + Send + Sync>) -> Self {
        Self {
            dev_id,
            _guard: guard,
        }
    }

    /// The device id transfers name this registration by.
    pub fn dev_id(&self) -> u64 {
        self.dev_id
    }
}

/// A submitted batch. It owns the batch's pages until the transfer is over, so no page can be
/// reused while the engine may still touch it.
///
/// # Contract
///
/// - [`poll`](PendingTransfer::poll) MUST NOT block; `Ok(true)` means the whole batch completed.
/// - An error covers the whole batch: callers treat every chunk in it as missing.
/// - Dropping an unfinished transfer MUST NOT return its pages to their pool while the engine
///   may still access them: implementations wait (bounded) and otherwise keep the pages out of
///   circulation.
/// - After a failure, an engine that may still be touching the pages (a storage SDK retrying in
///   the background) keeps them: [`wait`](PendingTransfer::wait) then gives back fewer pages,
///   or none, and the engine lets them return to their pool once that is safe.
pub trait PendingTransfer: Send + Debug {
    /// Whether the batch is complete; an error when it failed.
    fn poll(&mut self) -> Result<bool>;

    /// Blocks until the batch is over and gives the pages back with its status.
    fn wait(self: Box<Self>) -> (PageBatch, Result<()>);
}

/// Moves KV chunks between registered host memory and registered storage.
///
/// # Contract
///
/// - Implementations MUST refuse (with an error, never undefined behaviour) a transfer whose
///   host buffer does not lie wholly inside memory registered with
///   [`register_memory`](Transport::register_memory), or whose [`StorageExtent::dev_id`] is not
///   a live storage registration.
/// - [`write`](Transport::write) and [`read`](Transport::read) MUST NOT return before the whole
///   batch is complete or has failed. They return [`Error::Abandoned`](crate::Error::Abandoned)
///   exactly when the engine may still access the buffers (a batch that ran out of time and
///   that the engine did not let go of); every other return means it no longer does. Safe callers use
///   [`TransportExt::write_pages`] and [`TransportExt::read_pages`], which retire abandoned pages.
/// - A submitted batch holds every registration it names until it is over: dropping a
///   [`Registration`] while a transfer uses it defers the deregistration (and the closing of the
///   file) until the engine is done.
/// - A failed batch MUST be reported as an error for the whole batch: callers treat every chunk
///   in it as missing, never as present.
/// - Dropping a [`Registration`] MUST deregister it, and MUST keep the memory or storage it
///   covers alive until then.
/// - Two live object registrations MUST NOT share a device id.
pub trait Transport: Send + Sync + Debug + 'static {
    /// Name of the storage backend (`POSIX`, `GDS_MT`, `OBJ`, …).
    fn backend(&self) -> &str;

    /// Registers a host memory region once; transfers may then use any buffer inside it.
    fn register_memory(&self, region: Arc<dyn MemoryRegion>) -> Result<Registration>;

    /// Registers an open file as storage; its device id is the file descriptor.
    fn register_file(&self, file: Arc<File>) -> Result<Registration>;

    /// Registers the object named by `object_id` (in decimal), `len` bytes long.
    fn register_object(&self, object_id: u64, len: usize) -> Result<Registration>;

    /// Writes every buffer to its extent, as one batch, and waits for it (at most the
    /// transport's timeout).
    ///
    /// # Safety
    ///
    /// When this returns an error for which
    /// [`memory_abandoned`](crate::Error::memory_abandoned) is true, the engine may go on reading
    /// the buffers at any later time: the caller MUST keep their memory mapped, and MUST NOT
    /// write to it or hand it to anyone who would, for the rest of the process.
    unsafe fn write(&self, batch: &[(&[u8], StorageExtent)]) -> Result<()>;

    /// Reads every extent into its buffer, as one batch, and waits for it (at most the
    /// transport's timeout).
    ///
    /// # Safety
    ///
    /// When this returns an error for which
    /// [`memory_abandoned`](crate::Error::memory_abandoned) is true, the engine may go on writing
    /// the buffers at any later time: the caller MUST keep their memory mapped, and MUST NOT read,
    /// write or reuse it, for the rest of the process.
    unsafe fn read(&self, batch: &mut [(&mut [u8], StorageExtent)]) -> Result<()>;

    /// Starts one batch without waiting; a batch that cannot start comes back as a pending
    /// transfer that has already failed.
    fn submit(&self, direction: Direction, batch: PageBatch) -> Box<dyn PendingTransfer>;

    /// Whether each storage item exists, in order.
    fn exists(&self, items: &[StorageName<'_>]) -> Result<Vec<bool>>;

    /// Takes the pages of a batch that ended in [`Error::Abandoned`](crate::Error::Abandoned)
    /// (handed over by [`Page::surrender`]) and MUST keep them out of use for as long as the
    /// engine may still access them: for good when that cannot be known.
    fn retire(&self, pages: Vec<Page>, failure: &crate::Error);
}

/// Which bytes of a page a transfer moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageView {
    /// The page's view ([`Page::as_slice`]): exactly its chunk's bytes.
    Exact,
    /// The view rounded up to whole 4 KiB blocks ([`Page::io_slice`]), as `O_DIRECT` needs.
    Padded,
}

/// Conveniences over any [`Transport`], for callers (implementers never override them).
pub trait TransportExt: Transport {
    /// Registers a page pool, the usual host memory of a transport.
    fn register_pool(&self, pool: &Arc<PagePool>) -> Result<Registration> {
        self.register_memory(Arc::clone(pool) as Arc<dyn MemoryRegion>)
    }

    /// Writes pages to their extents, as one batch, and waits for it. Pages the engine may still
    /// read after an error are [abandoned](Page::abandon) for good: they show nothing from then
    /// on and never return to their pool. Owners of pages that want them back once the engine
    /// is done use [`submit`](Transport::submit), which owns them.
    fn write_pages(&self, batch: &[(&Page, StorageExtent)], view: PageView) -> Result<()> {
        let buffers: Vec<(&[u8], StorageExtent)> = batch
            .iter()
            .map(|(page, extent)| (view_of(page, view), *extent))
            .collect();
        let bytes = buffers.iter().map(|(b, _)| b.len()).sum();
        let outcome = traced(Direction::Write, buffers.len(), bytes, || {
            // SAFETY: on an abandoning error every page of the batch is abandoned below: no
            // view of its memory is handed out again and it never returns to its pool, which
            // stays mapped. For good, not for a grace period: the caller may still hold slices
            // borrowed from these shared pages, which a later owner of the memory would alias.
            unsafe { self.write(&buffers) }
        });
        if outcome.as_ref().is_err_and(crate::Error::memory_abandoned) {
            batch.iter().for_each(|(page, _)| page.abandon());
        }
        outcome
    }

    /// Reads extents into pages, as one batch, and waits for it. Pages the engine may still
    /// write after an error are [surrendered](Page::surrender) to the transport, which keeps
    /// them out of use while it may (the exclusive borrow ends with this call, so no view of
    /// them outlives it): the caller's pages show nothing from then on.
    fn read_pages(&self, batch: &mut [(&mut Page, StorageExtent)], view: PageView) -> Result<()> {
        let mut buffers: Vec<(&mut [u8], StorageExtent)> = batch
            .iter_mut()
            .map(|(page, extent)| {
                let buffer = match view {
                    PageView::Exact => page.as_mut_slice(),
                    PageView::Padded => page.io_slice_mut(),
                };
                (buffer, *extent)
            })
            .collect();
        let bytes = buffers.iter().map(|(b, _)| b.len()).sum();
        let pages = buffers.len();
        let outcome = traced(Direction::Read, pages, bytes, || {
            // SAFETY: as in `write_pages`; the buffers' borrows end before the pages are handed
            // over, and a handed-over page never shows its memory again.
            unsafe { self.read(&mut buffers) }
        });
        drop(buffers);
        if let Err(err) = &outcome {
            if err.memory_abandoned() {
                let held = batch
                    .iter()
                    .filter_map(|(page, _)| page.surrender())
                    .collect();
                self.retire(held, err);
            }
        }
        outcome
    }
}

/// Runs one transfer of `pages` pages and `bytes` bytes under its `kv_l2.transfer` span, says
/// how long it took, and counts it in `kv_l2_failed_transfers_total` if it failed.
fn traced(
    direction: Direction,
    pages: usize,
    bytes: usize,
    transfer: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let _span = tracing::debug_span!(
        "kv_l2.transfer",
        direction = direction_label(direction),
        pages,
        bytes
    )
    .entered();
    let started = std::time::Instant::now();
    let outcome = transfer();
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        ok = outcome.is_ok(),
        "transfer done"
    );
    if outcome.is_err() {
        count_failed_transfer(direction);
    }
    outcome
}

/// Counts one failed batch in `kv_l2_failed_transfers_total{direction}`: the transfer helpers
/// here do it themselves; callers that wait on [`Transport::submit`] call it on a failure.
pub fn count_failed_transfer(direction: Direction) {
    metrics::counter!("kv_l2_failed_transfers_total", "direction" => direction_label(direction))
        .increment(1);
}

/// `read` or `write`, as spans and metrics name a direction.
fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::Read => "read",
        Direction::Write => "write",
    }
}

fn view_of(page: &Page, view: PageView) -> &[u8] {
    match view {
        PageView::Exact => page.as_slice(),
        PageView::Padded => page.io_slice(),
    }
}

impl<T: Transport + ?Sized> TransportExt for T {}
