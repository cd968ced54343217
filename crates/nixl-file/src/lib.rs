//! File backends over [`nixl_core::Transport`]: NIXL's POSIX, GDS, GDS_MT and HF3FS plugins.
//!
//! This first layer opens the files chunks live in: optionally with `O_DIRECT`, and
//! preallocated, because small `O_DIRECT` writes that grow a fresh file are several times slower
//! than writes into allocated space.
#![deny(unsafe_op_in_unsafe_fn)]

mod error;
mod open;
#[cfg(target_os = "linux")]
mod uring;

pub use error::{Error, Result};
pub use open::{FileOptions, open_storage_file};
#[cfg(target_os = "linux")]
pub use uring::{UringConfig, UringTransport};
