//! Configuration of the KV storage tier, validated into one normalised [`StorageSpec`].
//!
//! Three ways in, as our users configure NIXL storage today:
//!
//! - LMCache's engine configuration: a YAML file, overridden by `LMCACHE_<KEY>` environment
//!   variables, then by explicit overrides ([`ConfigLoader`]), turned into a spec by
//!   [`EngineConfig::storage_spec`], which checks every rule at once (V1–V17 of the reference,
//!   the backend × device matrix, endpoint lists, path sharding).
//! - The `--l2-adapter` JSON form of LMCache's MP mode ([`AdapterRegistry::parse`]), with the
//!   `nixl_store` and `nixl_store_dynamic` types and any type downstream crates register.
//! - SGLang HiCache's environment ([`HiCacheConfig::from_env`]) and its automatic backend
//!   priority.
//!
//! Credentials in backend parameters are redacted in `Debug`, `Display` and serialised output.
//! This crate depends on nothing hardware-related.
//!
//! # Deprecated names
//!
//! `nixl_peer_host`, `nixl_peer_init_port`, `nixl_peer_alloc_port`, `nixl_proxy_host`,
//! `nixl_proxy_port`, `nixl_role` and `enable_xpyd` are applied under their `pd_*` names with a
//! warning, and `nixl_peer_port` under `nixl_receiver_port`. LMCache itself drops most of these
//! as unknown keys (it remaps only names that are also on its deprecated list); we accept them
//! because silently losing a peer address is worse. `nixl_buffer_size` is never remapped: it is
//! the GPU staging-buffer size of NIXL storage. Setting a deprecated and a current name to
//! different values is an error.
#![forbid(unsafe_code)]

mod backend;
mod channel;
mod engine;
mod error;
mod l2;
mod secret;
mod sglang;
mod spec;

pub use backend::{Backend, Device, StorageKind};
pub use channel::{ChannelKind, ChannelSpec, PdRole};
pub use engine::{CONFIG_FILE_VAR, ConfigLoader, EngineConfig, ExtraConfig, Loaded, NixlPath};
pub use error::{Error, Result, Warning};
pub use l2::{
    AdapterParams, AdapterRegistry, AdapterSpec, AdapterValidator, NIXL_STORE, NIXL_STORE_DYNAMIC,
};
pub use secret::{BackendParams, Secret, is_secret_key};
pub use sglang::{
    AUTO_PRIORITY, DEFAULT_STORAGE_DIR, DIRECT_IO_VAR, HiCacheConfig, PLUGIN_VAR, PluginChoice,
    STORAGE_DIR_VAR,
};
pub use spec::{
    Deployment, EvictionPolicy, EvictionSpec, Layout, Mode, PresenceCache, StorageSpec, SyncMode,
};
