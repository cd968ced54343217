//! The L2 KV-chunk store that inference engines embed: store, lookup and pin, unlock, load and
//! delete over any backend, with eviction, a presence cache, async put and persistence.
#![forbid(unsafe_code)]
