//! A HiCache-style facade: SGLang's storage calls (`set`, `get`, `exists` and their batch forms)
//! over any [`L2Adapter`].

use std::sync::Arc;

use pinned_alloc::Page;

use crate::adapter::L2Adapter;
use crate::keys::{ChunkKey, PageKey};

/// SGLang's view of an L2 store, for one model and tensor-parallel rank.
#[derive(Debug, Clone)]
pub struct HiCache {
    adapter: Arc<dyn L2Adapter>,
    model: String,
    tp_rank: u32,
    tp_size: u32,
}

impl HiCache {
    /// A facade over `adapter`, with keys scoped to `model` and this rank.
    pub fn new(
        adapter: Arc<dyn L2Adapter>,
        model: impl Into<String>,
        tp_rank: u32,
        tp_size: u32,
    ) -> Self {
        Self {
            adapter,
            model: model.into(),
            tp_rank,
            tp_size,
        }
    }

    fn key(&self, key: &str) -> ChunkKey {
        ChunkKey::from(&PageKey {
            key: key.to_owned(),
            model: self.model.clone(),
            tp_rank: self.tp_rank,
            tp_size: self.tp_size,
        })
    }

    fn keys(&self, keys: &[&str]) -> Vec<ChunkKey> {
        keys.iter().map(|k| self.key(k)).collect()
    }

    /// Stores one page; whether it is stored afterwards.
    pub fn set(&self, key: &str, page: &Page) -> bool {
        self.batch_set(&[key], &[page])[0]
    }

    /// Stores pages; per key, whether it is stored afterwards.
    pub fn batch_set(&self, keys: &[&str], pages: &[&Page]) -> Vec<bool> {
        self.adapter
            .store(&self.keys(keys), pages)
            .keys
            .iter()
            .map(|k| k.is_stored())
            .collect()
    }

    /// Loads one page; whether it loaded.
    pub fn get(&self, key: &str, page: &mut Page) -> bool {
        self.batch_get(&[key], &mut [page])[0]
    }

    /// Loads pages; per key, whether it loaded.
    ///
    /// Each key is pinned for the load (lookup, load, unlock), so neither eviction nor a delete
    /// can take its slot or file while it is read.
    pub fn batch_get(&self, keys: &[&str], pages: &mut [&mut Page]) -> Vec<bool> {
        let keys = self.keys(keys);
        let pinned = self.adapter.lookup_and_pin(&keys);
        let mut found = vec![false; keys.len()];
        let held: Vec<usize> = (0..keys.len().min(pages.len()))
            .filter(|&i| pinned[i])
            .collect();
        if !held.is_empty() {
            let wanted: Vec<ChunkKey> = held.iter().map(|&i| keys[i].clone()).collect();
            let mut targets: Vec<&mut Page> = pages
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| pinned.get(*i).copied().unwrap_or(false))
                .map(|(_, page)| &mut **page)
                .collect();
            for (&i, ok) in held.iter().zip(self.adapter.load(&wanted, &mut targets)) {
                found[i] = ok;
            }
        }
        let locked: Vec<ChunkKey> = keys
            .into_iter()
            .zip(pinned)
            .filter_map(|(key, pin)| pin.then_some(key))
            .collect();
        self.adapter.unlock(&locked);
        found
    }

    /// Whether one page is stored.
    pub fn exists(&self, key: &str) -> bool {
        self.batch_exists(&[key]) == 1
    }

    /// How many pages, from the first, are stored (SGLang's prefix semantics).
    pub fn batch_exists(&self, keys: &[&str]) -> usize {
        self.adapter.batched_contains(&self.keys(keys))
    }
}
