#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod mapping;
mod pool;
mod region;

#[cfg(feature = "cuda")]
pub use cuda::{CudaPinned, DeviceBufferPool, DeviceSlot, cuda_available, round_to_chunks};
pub use error::{Error, Result};
pub use pool::{KvShape, LockMode, PAGE_ALIGN, Page, PagePool, PoolConfig, PoolStats};
pub use region::MemoryRegion;
