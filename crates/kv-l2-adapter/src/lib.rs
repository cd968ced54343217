//! The L2 KV-chunk store that inference engines embed, with the behaviour of LMCache's NIXL
//! backend and `nixl_store` / `nixl_store_dynamic` adapters, and SGLang's HiCache connector.
//!
//! - [`L2Adapter`]: store, lookup-and-pin, unlock, load, delete, prefix `batched_contains`,
//!   usage and status; safe to call from several threads. [`AsyncAdapter`] gives the
//!   non-blocking forms: submit a task, collect its result once, by id.
//! - [`DynamicAdapter`] (`nixl_store_dynamic`): one file or object per key, capacity reserved
//!   before writing (a batch that does not fit stops at the first key that does not), lazy
//!   recovery after a restart, presence cache and presence-cache-only mode, background puts,
//!   `persist_enabled: false` deleting its data on close.
//! - [`StaticAdapter`] (`nixl_store`): a slot pool, eviction at store time by `cache_policy`
//!   (LRU, LFU, FIFO, MRU), partial chunks by `save_unfull_chunk`, batches refused when
//!   everything is pinned.
//! - [`EvictionController`]: watermark eviction (LRU, IsolatedLRU, noop) on its own thread.
//! - [`StoreBuilder`]: the one way from configuration (LMCache YAML, `--l2-adapter` JSON,
//!   SGLang env) to a running [`Store`]: pool, adapters, eviction; `open_channel` (feature
//!   `channel`) for PD/P2P.
//! - [`AdapterFactory`]: `--l2-adapter` JSON to adapters, with downstream types registered.
//! - [`HiCache`]: SGLang's `set` / `get` / `exists` and batch forms.
//!
//! Features: `nixl` makes NIXL an engine (every plugin, object stores included); without it,
//! file storage runs on the native io_uring engine and nothing needs libclang or the NIXL
//! runtime to build. `channel` adds the transfer channel.
//!
//! Keys are LMCache's [`CacheEngineKey`] and [`ObjectKey`], and SGLang's [`PageKey`]; all become
//! a [`ChunkKey`]. Unlike LMCache's presence cache (chunk hash only), the whole key counts.
#![forbid(unsafe_code)]

mod adapter;
mod builder;
#[cfg(feature = "channel")]
mod channel;
mod dynamic;
mod error;
mod eviction;
mod hicache;
mod index;
mod keys;
mod registry;
mod static_adapter;
mod storage;
mod tasks;
mod telemetry;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage};
pub use builder::{DEFAULT_EVICTION_INTERVAL, DEFAULT_POOL_PAGES, Store, StoreBuilder, Tier};
#[cfg(feature = "channel")]
pub use channel::open_channel;
pub use dynamic::{DynamicAdapter, DynamicOptions};
pub use error::{Error, Result};
pub use eviction::{EvictionController, eviction_pass};
pub use hicache::HiCache;
pub use keys::{CacheEngineKey, ChunkKey, ObjectKey, PageKey};
#[cfg(feature = "nixl")]
pub use registry::nixl_config_for;
pub use registry::{
    AdapterConstructor, AdapterContext, AdapterFactory, BuiltAdapter, Engine, ListedObject,
    build_storage, layout_in_use, list_objects, segment_folders, transport_for,
};
pub use static_adapter::{SlotStorage, StaticAdapter};
pub use storage::{ChunkStorage, Objects};
pub use tasks::{AsyncAdapter, TaskId};

/// Whether this build has NIXL as an engine (feature `nixl`).
pub const NIXL_BUILT: bool = cfg!(feature = "nixl");
