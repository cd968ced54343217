#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "channel")]
mod channel;
mod error;
pub mod header;
#[cfg(feature = "nixl")]
mod nixl;
#[cfg(feature = "nixl")]
mod plugins;
mod probe;
mod runtime;
mod table;
mod transport;

#[cfg(feature = "channel")]
pub use channel::{Channel, ChannelConfig, ChannelType, Role, create_channel};
pub use error::{Error, NixlStatus, Result, timed_out_within};
#[cfg(feature = "nixl")]
pub use nixl::{NixlConfig, NixlTransport, ThreadSync};
#[cfg(feature = "nixl")]
pub use plugins::{PluginInfo, plugins};
pub use probe::direct_io_supported;
pub use runtime::{NixlRuntime, RuntimeLocator};
pub use table::{Lease, RegistrationTable, TableEntry};
pub use transport::{
    Direction, FAILED_REQUEST_GRACE, MAX_ABANDONED_REQUESTS, PageBatch, PageView, PendingTransfer,
    Registration, StorageExtent, StorageName, Transport, TransportExt, count_failed_transfer,
};
