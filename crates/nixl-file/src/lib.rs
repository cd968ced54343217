//! File backends over any [`nixl_core::Transport`]: NIXL's POSIX, GDS, GDS_MT and HF3FS plugins,
//! or the native io_uring engine ([`UringTransport`]) where NIXL is not installed.
//!
//! - [`StaticFilePool`]: `pool_size` files opened and registered once, carved into page slots.
//! - [`DynamicFileStore`]: one file per key ([`FileKey`]), atomic publish, a checked header, found
//!   again after a restart (`layout: files`, the layout for folders shared between processes).
//! - [`SegmentStore`]: chunks appended to preallocated segment files, registered once, under
//!   checked headers with sequence numbers; the index is rebuilt from the headers at open,
//!   capacity is exact, and one writer holds each folder (`layout: segments`).
//! - [`SegmentStore`]: chunks appended to preallocated segment files registered once, an index
//!   rebuilt from headers at open, exact capacity, space reclaimed by segment.
//!
//! Files are preallocated, because small `O_DIRECT` writes that grow a fresh file are several
//! times slower than writes into allocated space, and `O_DIRECT` falls back to buffered I/O per
//! folder where the file system refuses it.
//!
//! # Safety
//!
//! The io_uring engine hands the kernel raw buffer addresses. It checks every buffer against its
//! registration table first, and keeps each buffer borrowed (blocking calls) or owned (submitted
//! batches) until the completion of every entry that names it has been reaped. Registered memory
//! and files are also registered with the kernel (fixed buffers and files, so the kernel pins
//! pages once instead of per I/O); each ring holds the region or file of every slot it has until
//! the kernel has let the slot go.
#![deny(unsafe_op_in_unsafe_fn)]

mod dynamic;
mod error;
mod key;
mod open;
mod segment;
mod static_pool;
#[cfg(target_os = "linux")]
mod uring;

pub use dynamic::{DEFAULT_RECYCLE_BYTES, DynamicConfig, DynamicFileStore, StoredChunk, list_dir};
pub use error::{Error, Result};
pub use key::FileKey;
pub use open::{FileOptions, open_storage_file};
pub use segment::{
    DEFAULT_CAPACITY_BYTES, DEFAULT_SEGMENT_BYTES, SegmentChunk, SegmentConfig, SegmentStore,
    SegmentUsage, segment_room,
};
pub use static_pool::{SlotId, StaticConfig, StaticFilePool};
#[cfg(target_os = "linux")]
pub use uring::{UringConfig, UringTransport};
