#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

mod error;
mod nixl;
mod runtime;
mod transport;

pub use error::{Error, NixlStatus, Result};
pub use nixl::{NixlConfig, NixlTransport, ThreadSync};
pub use runtime::{NixlRuntime, RuntimeLocator};
pub use transport::{Registration, StorageExtent, Transport};
