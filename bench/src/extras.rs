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

/// The object rows, in the order [`objects`] reports them.
pub(crate) const OBJECT_ROWS: [&str; 3] = [
    "raw NIXL OBJ (one batch)",
    "object store (nixl-obj)",
    "plain S3 client (object_store)",
];

/// Raw NIXL OBJ (one batch), the object store, and a plain S3 client of the same bytes (the
/// `object_store` crate, every object in flight at once), `chunks` objects of `chunk_bytes`
/// against one SeaweedFS, in `rounds` interleaved rounds: per row, (put, get) GB/s of each
/// round. Every read is checked byte for byte.
pub(crate) fn objects(
    chunks: usize,
    chunk_bytes: usize,
    rounds: usize,
) -> Result<Vec<Vec<(f64, f64)>>> {
    let server = S3Server::try_start().map_err(anyhow::Error::msg)?;
    let transport = s3_transport(&server)?;
    let pool = PoolConfig::new(chunk_bytes, (2 * chunks * chunk_bytes) as u64).build()?;
    let _memory = transport.register_pool(&pool)?;
    let bytes = (chunks * chunk_bytes) as f64;
    let rate = |started: Instant| bytes / started.elapsed().as_secs_f64() / 1e9;
    let mut sources = pool.allocate_batch(chunks)?;
    for (i, page) in sources.iter_mut().enumerate() {
        fill(i, page);
    }
    let mut targets = pool.allocate_batch(chunks)?;
    let same = |targets: &[Page]| {
        sources
            .iter()
            .zip(targets)
            .all(|(s, t)| s.as_slice() == t.as_slice())
    };
    // As the builder opens it: with the client that deletes, lists and asks for presence.
    let params: std::collections::BTreeMap<String, String> = [
        ("endpoint_override", server.endpoint.as_str()),
        ("scheme", "http"),
        ("bucket", &server.bucket),
        ("access_key", &server.access_key),
        ("secret_key", &server.secret_key),
        ("region", "us-east-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let store = ObjectStore::open(
        Arc::clone(&transport),
        ObjectConfig::new(chunk_bytes).with_max_batch(chunks.min(16)),
    )?
    .with_control(nixl_obj::ObjectControl::s3(&params)?);
    let keys: Vec<Vec<u8>> = (0..chunks).map(|i| key(i).canonical()).collect();
    let client = PlainS3::new(&server)?;
    let mut figures = vec![Vec::with_capacity(rounds); OBJECT_ROWS.len()];
    for round in 0..rounds {
        // Fresh names every round, as a store of new keys writes.
        let base = 1_000_000 + (round * chunks) as u64;
        let registrations = (0..chunks)
            .map(|i| transport.register_object(base + i as u64, chunk_bytes))
            .collect::<nixl_core::Result<Vec<_>>>()?;
        let writes: Vec<_> = sources
            .iter()
            .zip(&registrations)
            .map(|(p, r)| (p, StorageExtent::new(r.dev_id(), 0)))
            .collect();
        let started = Instant::now();
        transport.write_pages(&writes, PageView::Exact)?;
        let raw_put = rate(started);
        let mut reads: Vec<_> = targets
            .iter_mut()
            .zip(&registrations)
            .map(|(p, r)| (p, StorageExtent::new(r.dev_id(), 0)))
            .collect();
        let started = Instant::now();
        transport.read_pages(&mut reads, PageView::Exact)?;
        let raw_get = rate(started);
        drop(reads);
        ensure!(same(&targets), "raw OBJ read back wrong bytes");
        drop(registrations);
        figures[0].push((raw_put, raw_get));

        let round_keys: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| [k.as_slice(), &(round as u64).to_be_bytes()].concat())
            .collect();
        let items: Vec<_> = round_keys.iter().map(Vec::as_slice).zip(&sources).collect();
        let started = Instant::now();
        for result in store.put(&items) {
            result?;
        }
        let store_put = rate(started);
        for page in targets.iter_mut() {
            page.as_mut_slice().fill(0);
        }
        let mut items: Vec<_> = round_keys
            .iter()
            .map(Vec::as_slice)
            .zip(targets.iter_mut())
            .collect();
        let started = Instant::now();
        for result in store.get(&mut items) {
            ensure!(result?, "object store lost a chunk");
        }
        let store_get = rate(started);
        ensure!(same(&targets), "object store read back wrong bytes");
        figures[1].push((store_put, store_get));

        let names: Vec<String> = (0..chunks).map(|i| format!("plain-{round}-{i}")).collect();
        let started = Instant::now();
        client.put_all(&names, &sources)?;
        let plain_put = rate(started);
        let started = Instant::now();
        let read = client.get_all(&names)?;
        let plain_get = rate(started);
        ensure!(
            read.iter()
                .zip(&sources)
                .all(|(r, s)| r[..] == s.as_slice()[..]),
            "the plain S3 client read back wrong bytes"
        );
        figures[2].push((plain_put, plain_get));
    }
    Ok(figures)
}

/// The `object_store` crate's S3 client on the test server: a baseline of what the cluster
/// serves to an ordinary client, every object in flight at once.
struct PlainS3 {
    store: Arc<dyn object_store::ObjectStore>,
    runtime: tokio::runtime::Runtime,
}

impl PlainS3 {
    fn new(server: &S3Server) -> Result<Self> {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&server.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&server.bucket)
            .with_region("us-east-1")
            .with_access_key_id(&server.access_key)
            .with_secret_access_key(&server.secret_key)
            .build()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Self {
            store: Arc::new(store),
            runtime,
        })
    }

    fn put_all(&self, names: &[String], pages: &[Page]) -> Result<()> {
        use object_store::ObjectStoreExt as _;
        let puts = names.iter().zip(pages).map(|(name, page)| {
            let store = Arc::clone(&self.store);
            let path = object_store::path::Path::from(name.as_str());
            let payload = object_store::PutPayload::from(page.as_slice().to_vec());
            async move { store.put(&path, payload).await }
        });
        self.runtime.block_on(async {
            for done in futures::future::join_all(puts).await {
                done?;
            }
            Ok(())
        })
    }

    fn get_all(&self, names: &[String]) -> Result<Vec<Vec<u8>>> {
        use object_store::ObjectStoreExt as _;
        let gets = names.iter().map(|name| {
            let store = Arc::clone(&self.store);
            let path = object_store::path::Path::from(name.as_str());
            async move { store.get(&path).await?.bytes().await }
        });
        self.runtime.block_on(async {
            let mut read = Vec::with_capacity(names.len());
            for done in futures::future::join_all(gets).await {
                read.push(done?.to_vec());
            }
            Ok(read)
        })
    }
}

/// The secret of the authenticated channel rows (any 16 bytes or more will do).
const BENCH_CHANNEL_SECRET: &str = "kv-bench-channel-secret";

/// KV pages from a sender to a receiver over the NIXL channel (UCX, loopback), without and
/// with the shared secret (a handshake, then a MAC on every frame), next to a raw TCP copy of
/// the same bytes, in `rounds` interleaved rounds: per round, (channel, authenticated channel,
/// TCP) GB/s. Both ends live in this process, in two NIXL agents that talk over UCX's TCP
/// transport.
pub(crate) fn channel(
    chunks: usize,
    chunk_bytes: usize,
    batch: usize,
    rounds: usize,
) -> Result<Vec<(f64, f64, f64)>> {
    (0..rounds)
        .map(|_| {
            Ok((
                channel_pass(chunks, chunk_bytes, batch, None)?,
                channel_pass(chunks, chunk_bytes, batch, Some(BENCH_CHANNEL_SECRET))?,
                tcp_copy(chunks, chunk_bytes, batch)?,
            ))
        })
        .collect()
}

/// One pass over the channel: GB/s.
fn channel_pass(
    chunks: usize,
    chunk_bytes: usize,
    batch: usize,
    secret: Option<&str>,
) -> Result<f64> {
    use nixl_core::{ChannelConfig, ChannelType, Role, create_channel};

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = |role| {
        let config = ChannelConfig::new(ChannelType::Nixl, role, "127.0.0.1", port);
        match secret {
            Some(secret) => config.with_secret(secret),
            None => config,
        }
    };
    let receiver_pool = PoolConfig::new(chunk_bytes, (2 * batch * chunk_bytes) as u64).build()?;
    let receiver = create_channel(config(Role::Receiver), receiver_pool)?;
    let batches = chunks / batch;
    let receiving = std::thread::spawn(move || -> Result<()> {
        for _ in 0..batches {
            drop(receiver.receive()?);
        }
        Ok(())
    });
    let pool = PoolConfig::new(chunk_bytes, (batch * chunk_bytes) as u64).build()?;
    let sender = create_channel(config(Role::Sender), Arc::clone(&pool))?;
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
    Ok((batches * batch * chunk_bytes) as f64 / channel_seconds / 1e9)
}

/// The same bytes as [`channel_pass`] over one plain TCP connection on loopback: GB/s.
fn tcp_copy(chunks: usize, chunk_bytes: usize, batch: usize) -> Result<f64> {
    use std::io::{Read, Write};

    let batches = chunks / batch;
    let pool = PoolConfig::new(chunk_bytes, (batch * chunk_bytes) as u64).build()?;
    let mut pages = pool.allocate_batch(batch)?;
    for (i, page) in pages.iter_mut().enumerate() {
        fill(i, page);
    }
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
    Ok(total as f64 / tcp_seconds / 1e9)
}
