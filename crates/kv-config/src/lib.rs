//! Configuration of the KV storage tier: LMCache YAML and `LMCACHE_*` environment variables,
//! the `--l2-adapter` JSON form and SGLang HiCache settings, validated into one normalised
//! storage spec. This crate depends on nothing hardware-related.
#![forbid(unsafe_code)]
