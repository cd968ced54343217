#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

mod channel;
mod error;
pub mod header;
mod nixl;
mod probe;
mod runtime;
mod table;
mod transport;

pub use channel::{Channel, ChannelConfig, ChannelType, Role, create_channel};
pub use error::{Error, NixlStatus, Result, timed_out_within};
pub use nixl::{
    FAILED_REQUEST_GRACE, MAX_ABANDONED_REQUESTS, NixlConfig, NixlTransport, ThreadSync,
};
pub use probe::{PluginInfo, direct_io_supported, plugins};
pub use runtime::{NixlRuntime, RuntimeLocator};
pub use table::{Lease, RegistrationTable, TableEntry};
pub use transport::{
    Direction, PageBatch, PageView, PendingTransfer, Registration, StorageExtent, StorageName,
    Transport, TransportExt,
};
