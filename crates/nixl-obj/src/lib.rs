//! Object backends over [`nixl_core::Transport`]: NIXL's OBJ (S3), AZURE_BLOB and DOCA_MEMOS
//! plugins.
//!
//! - Naming: NIXL (through `nixl-sys` 1.5.2) names an object by the decimal form of its device
//!   id, so every key gets a stable 64-bit id from SHA-256 of its canonical form
//!   ([`object_id`]). The full key travels in a header inside the object, so a 64-bit collision
//!   or a foreign object reads as a miss. DOCA_MEMOS wants 128-bit hex names
//!   ([`doca_memos_name`]); that backend stays behind its hardware gate.
//! - [`ObjectStore`]: dynamic mode, one object per key, registered per operation with ids that
//!   are never shared by two live registrations (NIXL issue 1794).
//! - [`StaticObjectPool`]: static mode, `pool_size` slots registered once.
//!
//! Objects are written whole (the plugins refuse writes at an offset), so a store copies header
//! and payload into one staging buffer; reads are ranged and land in the caller's page directly.
//! NIXL's plugins can neither delete nor list objects. With feature `control`, an
//! `ObjectControl` (the `object_store` crate's S3 and Azure clients, built from the plugin's
//! own parameters) does both, so eviction frees space in the bucket and a store's usage can be
//! read back from what the bucket holds; without it, [`ObjectStore::delete`] removes nothing.
#![forbid(unsafe_code)]

#[cfg(feature = "control")]
mod control;
mod error;
mod naming;
mod pool;
mod store;

#[cfg(feature = "control")]
pub use control::{CONTROL_TIMEOUT, LIST_TIMEOUT, ListedObject, ObjectControl};
pub use error::{Error, Result};
pub use naming::{doca_memos_name, object_id, static_doca_memos_name};
pub use pool::StaticObjectPool;
pub use store::{ObjectConfig, ObjectStore};
