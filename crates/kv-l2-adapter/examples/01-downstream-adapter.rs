//! A downstream adapter type: an in-memory tier registered beside `nixl_store` and
//! `nixl_store_dynamic`, built from `--l2-adapter` JSON, and used through the same API.
//!
//! `cargo run -p kv-l2-adapter --example 01-downstream-adapter`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kv_config::AdapterSpec;
use kv_l2_adapter::{
    AdapterContext, AdapterFactory, ChunkKey, EvictionReport, KeyOutcome, L2Adapter, ObjectKey,
    Result, Status, StoreReport, Usage,
};
use pinned_alloc::{Page, PoolConfig};

/// Chunks kept in process memory, up to `max_chunks`.
#[derive(Debug)]
struct MemoryTier {
    max_chunks: usize,
    chunks: Mutex<HashMap<ChunkKey, (Vec<u8>, u32)>>,
}

impl L2Adapter for MemoryTier {
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        let mut chunks = self.chunks.lock().unwrap();
        let outcomes = keys
            .iter()
            .zip(pages)
            .map(|(key, page)| {
                if chunks.contains_key(key) {
                    KeyOutcome::AlreadyPresent
                } else if chunks.len() >= self.max_chunks {
                    KeyOutcome::Failed(kv_l2_adapter::Error::Registry("memory tier full".into()))
                } else {
                    chunks.insert(key.clone(), (page.as_slice().to_vec(), 0));
                    KeyOutcome::Stored {
                        bytes: page.len() as u64,
                    }
                }
            })
            .collect();
        report(outcomes)
    }

    fn lookup_and_pin(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let mut chunks = self.chunks.lock().unwrap();
        keys.iter()
            .map(|k| chunks.get_mut(k).map(|(_, pins)| *pins += 1).is_some())
            .collect()
    }

    fn unlock(&self, keys: &[ChunkKey]) {
        let mut chunks = self.chunks.lock().unwrap();
        for key in keys {
            if let Some((_, pins)) = chunks.get_mut(key) {
                *pins = pins.saturating_sub(1);
            }
        }
    }

    fn load(&self, keys: &[ChunkKey], pages: &mut [&mut Page]) -> Vec<bool> {
        let chunks = self.chunks.lock().unwrap();
        keys.iter()
            .zip(pages.iter_mut())
            .map(|(key, page)| match chunks.get(key) {
                Some((bytes, _)) if bytes.len() <= page.capacity() => {
                    page.set_len(bytes.len());
                    page.as_mut_slice().copy_from_slice(bytes);
                    true
                }
                _ => false,
            })
            .collect()
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        let mut chunks = self.chunks.lock().unwrap();
        let mut deleted = 0;
        for key in keys {
            if chunks.get(key).is_some_and(|(_, pins)| *pins == 0) {
                chunks.remove(key);
                deleted += 1;
            }
        }
        deleted
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        let chunks = self.chunks.lock().unwrap();
        keys.iter().take_while(|k| chunks.contains_key(*k)).count()
    }

    fn stored_size(&self, key: &ChunkKey) -> Option<u64> {
        let chunks = self.chunks.lock().unwrap();
        chunks.get(key).map(|(bytes, _)| bytes.len() as u64)
    }

    fn usage(&self) -> Usage {
        let chunks = self.chunks.lock().unwrap();
        let mut usage = Usage::default();
        usage.used_bytes = chunks.values().map(|(b, _)| b.len() as u64).sum();
        usage.keys = chunks.len();
        usage.pinned = chunks.values().filter(|(_, p)| *p > 0).count();
        usage
    }

    fn evict(&self, _ratio: f64, _salt: Option<&str>) -> EvictionReport {
        EvictionReport::default()
    }

    fn status(&self) -> Status {
        let usage = self.usage();
        Status::new("memory_tier", "DRAM", usage.keys, usage.pinned)
    }

    fn close(&self) -> Result<()> {
        Ok(())
    }
}

fn report(keys: Vec<KeyOutcome>) -> StoreReport {
    StoreReport::new(keys)
}

fn validate(obj: &serde_json::Map<String, serde_json::Value>) -> std::result::Result<(), String> {
    match obj.get("max_chunks").and_then(serde_json::Value::as_u64) {
        Some(n) if n > 0 => Ok(()),
        _ => Err("max_chunks must be a positive integer".to_owned()),
    }
}

fn construct(spec: &AdapterSpec, _context: &AdapterContext) -> Result<Arc<dyn L2Adapter>> {
    let max_chunks = spec.params.expose()["max_chunks"].as_u64().unwrap_or(1) as usize;
    Ok(Arc::new(MemoryTier {
        max_chunks,
        chunks: Mutex::new(HashMap::new()),
    }))
}

fn main() -> Result<()> {
    let mut factory = AdapterFactory::new();
    factory.register("memory_tier", validate, construct)?;
    println!("adapter types: {}", factory.known().join(", "));

    let pool = PoolConfig::new(4096, 16 * 4096).build()?;
    let context = AdapterContext::new(Arc::clone(&pool));
    let (_, tier) = factory
        .build(&[r#"{"type":"memory_tier","max_chunks":8}"#], &context)?
        .remove(0);

    let keys: Vec<ChunkKey> = (0u32..3)
        .map(|i| {
            ChunkKey::from(ObjectKey {
                model: "example/model".to_owned(),
                kv_rank: 0,
                group_id: 0,
                chunk_hash: i.to_be_bytes().to_vec(),
                cache_salt: None,
            })
        })
        .collect();
    let mut pages = pool.allocate_batch(3)?;
    for (i, page) in pages.iter_mut().enumerate() {
        page.as_mut_slice().fill(i as u8 + 1);
    }
    let refs: Vec<&Page> = pages.iter().collect();
    let stored = tier.store(&keys, &refs);
    assert!(stored.is_successful());
    assert_eq!(tier.batched_contains(&keys), 3);

    let mut back = pool.allocate_batch(1)?.remove(0);
    assert_eq!(tier.load(&keys[1..2], &mut [&mut back]), vec![true]);
    assert!(back.as_slice().iter().all(|&b| b == 2));
    println!(
        "memory_tier: stored {} bytes in {} chunks, loaded one back intact",
        stored.bytes(),
        tier.usage().keys
    );
    Ok(())
}
