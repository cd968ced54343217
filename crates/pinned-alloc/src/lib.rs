#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

mod error;
mod mapping;
mod pool;
mod region;

pub use error::{Error, Result};
pub use pool::{LockMode, PAGE_ALIGN, Page, PagePool, PoolConfig, PoolStats};
pub use region::MemoryRegion;
