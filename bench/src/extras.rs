//! The parts of the benchmark that are not one-file throughput: the adapter's lookup rate, and
//! object stores (SeaweedFS's S3 gateway on 127.0.0.1) next to the raw NIXL OBJ plugin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use kv_l2_adapter::{ChunkKey, ChunkStorage, DynamicAdapter, DynamicOptions, L2Adapter, ObjectKey};
use kv_test_services::S3Server;
use nixl_core::{NixlTransport, PageView, StorageExtent, Transport, TransportExt};
use nixl_obj::{ObjectConfig, ObjectStore};
use pinned_alloc::{Page, PoolConfig};

/// Keys that exist, and nothing else: the lookup benchmark measures the adapter's own index and
/// presence-cache path, which never reaches storage when every key is known.
#[derive(Debug, Default)]
struct KnownKeys {
    sizes: Mutex<HashMap<ChunkKey, u64>>,
}

impl ChunkStorage for KnownKeys {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn put(&self, items: &[(&ChunkKey, &Page)]) -> Vec<kv_l2_adapter::Result<u64>> {
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        items
            .iter()
            .map(|(k, p)| {
                sizes.insert((*k).clone(), p.len() as u64);
                Ok(p.len() as u64)
            })
            .collect()
    }

    fn get(&self, items: &mut [(&ChunkKey, &mut Page)]) -> Vec<kv_l2_adapter::Result<bool>> {
        items.iter().map(|_| Ok(false)).collect()
    }

    fn contains(&self, keys: &[&ChunkKey]) -> kv_l2_adapter::Result<Vec<bool>> {
        let sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        Ok(keys.iter().map(|k| sizes.contains_key(*k)).collect())
    }

    fn stored_size(&self, key: &ChunkKey) -> kv_l2_adapter::Result<Option<u64>> {
        Ok(self
            .sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied())
    }

    fn delete(&self, key: &ChunkKey) -> kv_l2_adapter::Result<bool> {
        Ok(self
            .sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .is_some())
    }
}

fn key(i: usize) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: "meta-llama/Llama-3.1-8B".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: (i as u64).to_be_bytes().to_vec(),
        cache_salt: None,
    })
}

/// `batched_contains` over `n` known keys, with the presence cache on: keys per second.
pub(crate) fn lookup_rate(n: usize) -> Result<f64> {
    let adapter = DynamicAdapter::new(
        Box::<KnownKeys>::default(),
        DynamicOptions::new("memory").with_presence_cache(kv_config::PresenceCache::On),
    );
    let pool = PoolConfig::new(4096, 1024 * 4096).build()?;
    let pages = pool.allocate_batch(1024)?;
    let keys: Vec<ChunkKey> = (0..n).map(key).collect();
    for batch in keys.chunks(1024) {
        let refs: Vec<&Page> = pages.iter().take(batch.len()).collect();
        ensure!(
            adapter.store(batch, &refs).is_successful(),
            "storing the lookup keys"
        );
    }
    let started = Instant::now();
    let mut looked_up = 0usize;
    while started.elapsed() < Duration::from_millis(500) {
        ensure!(
            adapter.batched_contains(&keys) == n,
            "every key must be found"
        );
        looked_up += n;
    }
    Ok(looked_up as f64 / started.elapsed().as_secs_f64())
}

fn s3_transport(server: &S3Server) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(NixlTransport::new(server.nixl_config())?))
}

fn fill(i: usize, page: &mut Page) {
    for (n, b) in page.as_mut_slice().iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) ^ n.wrapping_mul(7)) as u8;
    }
}

/// Raw NIXL OBJ and the object store, `chunks` objects of `chunk_bytes`: (label, put, get) GB/s.
pub(crate) fn objects(chunks: usize, chunk_bytes: usize) -> Result<Vec<(&'static str, f64, f64)>> {
    let server = S3Server::try_start().map_err(anyhow::Error::msg)?;
    let transport = s3_transport(&server)?;
    let pool = PoolConfig::new(chunk_bytes, (2 * chunks * chunk_bytes) as u64).build()?;
    let _memory = transport.register_pool(&pool)?;
    let bytes = (chunks * chunk_bytes) as f64;
    let mut sources = pool.allocate_batch(chunks)?;
    for (i, page) in sources.iter_mut().enumerate() {
        fill(i, page);
    }

    let registrations = (0..chunks)
        .map(|i| transport.register_object(1_000_000 + i as u64, chunk_bytes))
        .collect::<nixl_core::Result<Vec<_>>>()?;
    let writes: Vec<_> = sources
        .iter()
        .zip(&registrations)
        .map(|(p, r)| (p, StorageExtent::new(r.dev_id(), 0)))
        .collect();
    let started = Instant::now();
    transport.write_pages(&writes, PageView::Exact)?;
    let raw_put = bytes / started.elapsed().as_secs_f64() / 1e9;
    let mut targets = pool.allocate_batch(chunks)?;
    let mut reads: Vec<_> = targets
        .iter_mut()
        .zip(&registrations)
        .map(|(p, r)| (p, StorageExtent::new(r.dev_id(), 0)))
        .collect();
    let started = Instant::now();
    transport.read_pages(&mut reads, PageView::Exact)?;
    let raw_get = bytes / started.elapsed().as_secs_f64() / 1e9;
    drop(reads);
    ensure!(
        sources
            .iter()
            .zip(&targets)
            .all(|(s, t)| s.as_slice() == t.as_slice()),
        "raw OBJ read back wrong bytes"
    );
    drop(registrations);

    let store = ObjectStore::open(
        Arc::clone(&transport),
        ObjectConfig::new(chunk_bytes).with_max_batch(chunks.min(16)),
    )?;
    let keys: Vec<Vec<u8>> = (0..chunks).map(|i| key(i).canonical()).collect();
    let items: Vec<_> = keys.iter().map(Vec::as_slice).zip(&sources).collect();
    let started = Instant::now();
    for result in store.put(&items) {
        result?;
    }
    let store_put = bytes / started.elapsed().as_secs_f64() / 1e9;
    let mut items: Vec<_> = keys
        .iter()
        .map(Vec::as_slice)
        .zip(targets.iter_mut())
        .collect();
    let started = Instant::now();
    for result in store.get(&mut items) {
        ensure!(result?, "object store lost a chunk");
    }
    let store_get = bytes / started.elapsed().as_secs_f64() / 1e9;
    ensure!(
        sources
            .iter()
            .zip(&targets)
            .all(|(s, t)| s.as_slice() == t.as_slice()),
        "object store read back wrong bytes"
    );
    Ok(vec![
        ("raw NIXL OBJ (one batch)", raw_put, raw_get),
        ("object store (nixl-obj)", store_put, store_get),
    ])
}

/// KV pages from a sender to a receiver over the NIXL channel (UCX, loopback), next to a raw
/// TCP copy of the same bytes: (channel GB/s, TCP GB/s). Both ends live in this process, in two
/// NIXL agents that talk over UCX's TCP transport.
pub(crate) fn channel(chunks: usize, chunk_bytes: usize, batch: usize) -> Result<(f64, f64)> {
    use std::io::{Read, Write};

    use nixl_core::{ChannelConfig, ChannelType, Role, create_channel};

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let receiver_pool = PoolConfig::new(chunk_bytes, (2 * batch * chunk_bytes) as u64).build()?;
    let receiver = create_channel(
        ChannelConfig::new(ChannelType::Nixl, Role::Receiver, "127.0.0.1", port),
        receiver_pool,
    )?;
    let batches = chunks / batch;
    let receiving = std::thread::spawn(move || -> Result<()> {
        for _ in 0..batches {
            drop(receiver.receive()?);
        }
        Ok(())
    });
    let pool = PoolConfig::new(chunk_bytes, (batch * chunk_bytes) as u64).build()?;
    let sender = create_channel(
        ChannelConfig::new(ChannelType::Nixl, Role::Sender, "127.0.0.1", port),
        Arc::clone(&pool),
    )?;
    let mut pages = pool.allocate_batch(batch)?;
    for (i, page) in pages.iter_mut().enumerate() {
        fill(i, page);
    }
    let refs: Vec<&Page> = pages.iter().collect();
    let started = Instant::now();
    for _ in 0..batches {
        sender.send(&refs)?;
    }
    let channel_seconds = started.elapsed().as_secs_f64();
    receiving
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))??;

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let total = batches * batch * chunk_bytes;
    let reading = std::thread::spawn(move || -> Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; chunk_bytes];
        let mut left = total;
        while left > 0 {
            let n = stream.read(&mut buffer[..chunk_bytes.min(left)])?;
            ensure!(n > 0, "the TCP sender closed early");
            left -= n;
        }
        Ok(())
    });
    let mut stream = std::net::TcpStream::connect(address)?;
    let started = Instant::now();
    for _ in 0..batches {
        for page in &pages {
            stream.write_all(page.as_slice())?;
        }
    }
    stream.flush()?;
    reading
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP reader panicked"))??;
    let tcp_seconds = started.elapsed().as_secs_f64();
    let bytes = total as f64;
    Ok((bytes / channel_seconds / 1e9, bytes / tcp_seconds / 1e9))
}
