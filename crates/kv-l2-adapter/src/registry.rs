//! Building adapters from configuration: the two NIXL types, and any type a downstream crate
//! registers.

use std::collections::BTreeMap;
use std::sync::Arc;

use kv_config::{
    AdapterRegistry, AdapterSpec, AdapterValidator, Layout, Mode, StorageKind, StorageSpec,
};
#[cfg(feature = "nixl")]
use nixl_core::{NixlConfig, NixlTransport};
use nixl_core::{Registration, Transport, TransportExt};
use nixl_file::{
    DynamicConfig, DynamicFileStore, SegmentConfig, SegmentStore, StaticConfig, StaticFilePool,
    UringConfig, UringTransport,
};
use nixl_obj::{ObjectConfig, ObjectStore, StaticObjectPool};
use pinned_alloc::{Page, PagePool};

use crate::adapter::{EvictionReport, L2Adapter, Status, StoreReport, Usage};
use crate::dynamic::{DynamicAdapter, DynamicOptions};
use crate::error::{Error, Result};
use crate::keys::ChunkKey;
use crate::static_adapter::StaticAdapter;
use crate::storage::Objects;

/// Which engine moves the bytes of file backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Engine {
    /// NIXL when its runtime is installed (and the crate is built with feature `nixl`), else
    /// the native io_uring engine (POSIX only).
    #[default]
    Auto,
    /// NIXL only (feature `nixl`; refused without it).
    Nixl,
    /// The native io_uring engine (POSIX file storage only).
    Native,
}

/// What every adapter is built against: the L1 page pool its pages come from, and the engine.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdapterContext {
    /// The page pool (one page per chunk) registered once with each adapter's transport.
    pub memory: Arc<PagePool>,
    /// The engine for file backends.
    pub engine: Engine,
    /// Open storage to read only: a segment store opens beside a live writer, takes no lock
    /// and creates nothing; stores and deletes are refused.
    pub read_only: bool,
    /// Whether configured eviction runs: the builder sets it (see
    /// [`with_eviction`](crate::StoreBuilder::with_eviction)), which also runs the eviction
    /// controller. Off (the default here), a dynamic store never evicts to make room for a
    /// background put either.
    pub evicting: bool,
    /// The global worker id: the ranks of one instance share one `nixl_path`, and a segment
    /// store takes one writer per folder, so worker `N > 0` keeps its segments in
    /// `worker-N/` under it (see [`segment_folders`]).
    pub worker_id: u32,
    /// The adapter's place among the tiers of its store, which labels its metrics.
    pub(crate) tier: usize,
}

impl AdapterContext {
    /// Pages from `memory`, engine chosen automatically.
    pub fn new(memory: Arc<PagePool>) -> Self {
        Self {
            memory,
            engine: Engine::Auto,
            read_only: false,
            evicting: false,
            worker_id: 0,
            tier: 0,
        }
    }

    /// The same context for the tier at `index` of a store.
    pub(crate) fn at_tier(mut self, index: usize) -> Self {
        self.tier = index;
        self
    }

    /// Chooses the engine.
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// Opens storage to read only.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Lets configured eviction run, or not.
    pub fn with_eviction(mut self, evicting: bool) -> Self {
        self.evicting = evicting;
        self
    }

    /// Sets the global worker id.
    pub fn with_worker(mut self, worker_id: u32) -> Self {
        self.worker_id = worker_id;
        self
    }
}

/// The NIXL agent and backend configuration a storage spec asks for.
#[cfg(feature = "nixl")]
pub fn nixl_config_for(spec: &StorageSpec) -> NixlConfig {
    let mut config = NixlConfig::new(spec.backend.plugin_name())
        .with_progress_thread(spec.progress_thread)
        .with_thread_sync(match spec.sync_mode {
            // NIXL's DEFAULT is NONE (no locking inside NIXL); the transport then serialises
            // agent calls itself.
            kv_config::SyncMode::None | kv_config::SyncMode::Default => nixl_core::ThreadSync::None,
            kv_config::SyncMode::Rw => nixl_core::ThreadSync::ReadWrite,
            _ => nixl_core::ThreadSync::Strict,
        });
    for (key, value) in spec.backend_params.expose() {
        config = config.with_param(key, value);
    }
    config
}

#[cfg(feature = "nixl")]
fn nixl(spec: &StorageSpec, _asked: bool) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(NixlTransport::new(nixl_config_for(spec))?))
}

/// Without feature `nixl`: the refusal, naming what asked for NIXL (`asked`: the engine was
/// chosen; otherwise the backend runs only on NIXL).
#[cfg(not(feature = "nixl"))]
fn nixl(spec: &StorageSpec, asked: bool) -> Result<Arc<dyn Transport>> {
    const HOW: &str = "run `cargo xtask setup`, then build with the `nixl` feature";
    Err(if asked {
        Error::Setting {
            key: "engine".to_owned(),
            message: format!(
                "nixl: this build has no NIXL ({HOW}); POSIX files also run on the native \
                 io_uring engine"
            ),
        }
    } else {
        Error::Setting {
            key: "backend".to_owned(),
            message: format!(
                "{} runs only on NIXL, and this build has no NIXL ({HOW})",
                spec.backend
            ),
        }
    })
}

/// Transfers the native engine keeps in flight: a segment store's batch of 128 chunks is 256 of
/// them (header and payload). With `cargo xtask bench --chunk-kib 256 --only
/// 'adapter-native[layout=segments]'` (calls of 64 chunks), the ring of 64 gave 0.37x put /
/// 0.72x get of fio in the same run, 512 gave 0.48x / 0.80x; 1024 no more.
const NATIVE_QUEUE_DEPTH: u32 = 512;

/// The transport for a spec, and a label saying which engine it is.
pub fn transport_for(spec: &StorageSpec, engine: Engine) -> Result<(Arc<dyn Transport>, String)> {
    let native_ok = spec.backend == kv_config::Backend::Posix;
    let native = || -> Result<(Arc<dyn Transport>, String)> {
        Ok((
            Arc::new(UringTransport::new(
                UringConfig::default().with_queue_depth(NATIVE_QUEUE_DEPTH),
            )?),
            "native io_uring".to_owned(),
        ))
    };
    let label = format!("NIXL {}", spec.backend);
    match engine {
        Engine::Nixl => Ok((nixl(spec, true)?, label)),
        Engine::Native if native_ok => native(),
        Engine::Native => Err(Error::Registry(format!(
            "the native engine stores POSIX files only, not {}",
            spec.backend
        ))),
        Engine::Auto if !cfg!(feature = "nixl") && native_ok => native(),
        Engine::Auto => match nixl(spec, false) {
            Ok(transport) => Ok((transport, label)),
            Err(Error::Transport(err @ nixl_core::Error::RuntimeNotFound { .. })) if native_ok => {
                tracing::warn!(error = %err, "NIXL is not installed; using the native io_uring engine");
                native()
            }
            Err(err) => Err(err),
        },
    }
}

/// An adapter with the L1 memory registration it needs kept alive beside it.
#[derive(Debug)]
struct Registered {
    adapter: Box<dyn L2Adapter>,
    _memory: Registration,
}

#[deny(clippy::missing_trait_methods)]
impl L2Adapter for Registered {
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        self.adapter.store(keys, pages)
    }

    fn lookup_and_pin(&self, keys: &[ChunkKey]) -> Vec<bool> {
        self.adapter.lookup_and_pin(keys)
    }

    fn unlock(&self, keys: &[ChunkKey]) {
        self.adapter.unlock(keys)
    }

    fn load(&self, keys: &[ChunkKey], pages: &mut [&mut Page]) -> Vec<bool> {
        self.adapter.load(keys, pages)
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        self.adapter.delete(keys)
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        self.adapter.batched_contains(keys)
    }

    fn stored_size(&self, key: &ChunkKey) -> Option<u64> {
        self.adapter.stored_size(key)
    }

    fn usage(&self) -> Usage {
        self.adapter.usage()
    }

    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        self.adapter.evict(ratio, salt)
    }

    fn status(&self) -> Status {
        self.adapter.status()
    }

    fn close(&self) -> Result<()> {
        self.adapter.close()
    }
}

/// GPU staging (`nixl_buffer_device: cuda`) moves chunks between storage and GPU memory, which
/// the page-based adapters do not do: refuse it by name rather than stage through host memory
/// silently.
fn check_device(spec: &StorageSpec) -> Result<()> {
    if spec.buffer_device.is_cpu() {
        return Ok(());
    }
    Err(Error::Setting {
        key: "nixl_buffer_device".to_owned(),
        message: format!(
            "{} staging is not served by this store's host-page adapters; use \
             nixl_buffer_device: cpu (the shared host pool of max_local_cpu_size)",
            spec.buffer_device
        ),
    })
}

/// What the pool and backend must be for the spec, checked before anything is opened: a
/// setting the given pool or backend cannot honour is refused by name.
fn check_context(spec: &StorageSpec, context: &AdapterContext) -> Result<()> {
    check_device(spec)?;
    if spec.hugepages && !context.memory.is_hugepage_backed() {
        return Err(Error::Setting {
            key: "local_cpu_use_hugepages".to_owned(),
            message: "the page pool given is not backed by hugepages; build it with \
                      PoolConfig::with_hugepages(true), or let StoreBuilder build it"
                .to_owned(),
        });
    }
    if spec.backend == kv_config::Backend::DocaMemos {
        return Err(Error::Setting {
            key: "nixl_backend".to_owned(),
            message: "DOCA_MEMOS: its 128-bit object names are not wired to the object store, \
                      and the nixl-cu12 wheel ships no DOCA_MEMOS plugin"
                .to_owned(),
        });
    }
    Ok(())
}

/// Builds the adapter a storage spec describes (from the engine configuration or a
/// `nixl_store*` `--l2-adapter`), without its eviction: [`StoreBuilder`](crate::StoreBuilder)
/// runs that.
pub fn build_storage(spec: &StorageSpec, context: &AdapterContext) -> Result<Arc<dyn L2Adapter>> {
    check_context(spec, context)?;
    let page_bytes = context.memory.page_bytes();
    spec.check_page_size(page_bytes.next_multiple_of(4096) as u64)?;
    let (transport, label) = transport_for(spec, context.engine)?;
    let memory = transport.register_pool(&context.memory)?;
    let path = || {
        spec.path.clone().ok_or_else(|| {
            Error::Config(kv_config::Error::MissingPath {
                backend: spec.backend.to_string(),
            })
        })
    };
    let tier_metrics = || {
        Arc::new(crate::telemetry::TierMetrics::new(
            &crate::telemetry::Labels::of_spec(spec, context.worker_id).at_tier(context.tier),
        ))
    };
    let adapter: Box<dyn L2Adapter> = match (spec.mode, spec.kind) {
        (Mode::Dynamic, kind) => {
            let segments = (kind == StorageKind::File
                && layout_in_use(spec, context.worker_id) == Layout::Segments)
                .then(|| open_segments(spec, &transport, page_bytes, context))
                .transpose()?;
            // A segment holds whole entries (a header block and the padded payload) after its
            // own header block: the payload it can take is what the adapter counts against.
            let segment_capacity = segments.as_ref().map(|store| {
                let usage = store.usage();
                let block = nixl_core::header::HEADER_BYTES as u64;
                let entry = block + (page_bytes as u64).next_multiple_of(block);
                let per_segment = usage.segment_bytes.saturating_sub(block) / entry;
                usage.segments as u64 * per_segment * page_bytes as u64
            });
            let found_in_segments = segments.as_ref().map(|store| {
                store
                    .list()
                    .into_iter()
                    .map(|chunk| (ChunkKey::from_file_key(chunk.key), chunk.payload_len))
                    .collect::<Vec<_>>()
            });
            // Per-key files keep deleted files for reuse; under a capacity, those spares take
            // a sixteenth of it (whole files) and the chunks the rest (their payload bytes, as
            // LMCache counts them; each file also has its 4 KiB header).
            let file_bytes = nixl_core::header::HEADER_BYTES as u64
                + (page_bytes as u64).next_multiple_of(nixl_core::header::HEADER_BYTES as u64);
            let spare_bytes = (kind == StorageKind::File && segments.is_none())
                .then_some(spec.capacity_bytes)
                .flatten()
                .map(|capacity| capacity / 16 / file_bytes * file_bytes);
            // What a bucket already holds counts against the capacity, as files on disk do.
            let mut found_in_bucket: Option<Vec<(ChunkKey, u64)>> = None;
            let storage: Box<dyn crate::storage::ChunkStorage> = match (kind, segments) {
                (StorageKind::File, Some(store)) => Box::new(store),
                (StorageKind::File, None) => Box::new(DynamicFileStore::open(
                    Arc::clone(&transport),
                    DynamicConfig::new(path()?)
                        .with_direct_io(spec.use_direct_io)
                        .with_shard_dirs(spec.shard_dirs)
                        .with_durable(spec.durable)
                        .with_recycle_bytes(
                            spare_bytes.unwrap_or(nixl_file::DEFAULT_RECYCLE_BYTES),
                        ),
                )?),
                (StorageKind::Object, _) => {
                    let objects = open_objects(spec, &transport, page_bytes)?;
                    if spec.capacity_bytes.is_some() || spec.eviction.is_some() {
                        found_in_bucket = Some(objects.stored_oldest_first()?);
                    }
                    Box::new(objects)
                }
            };
            let mut options = DynamicOptions::new(label)
                .with_capacity(segment_capacity.or_else(|| {
                    let spares = spare_bytes.unwrap_or(0);
                    spec.capacity_bytes.map(|capacity| capacity - spares)
                }))
                .with_presence_cache(spec.presence_cache)
                .with_evict_when_full(
                    spec.eviction
                        .as_ref()
                        .filter(|_| context.evicting && !context.read_only)
                        .map(|e| e.policy),
                )
                // A reader never deletes what it did not write.
                .with_persist(spec.persist || context.read_only);
            if spec.async_put {
                // Staging pages come from the registered L1 pool, so the transport can write
                // them; at most a quarter of it stages queued puts, and 8 batches wait at most.
                options = options
                    .with_async_queue(8)
                    .with_staging(Arc::clone(&context.memory));
            }
            let adapter = DynamicAdapter::new(storage, options);
            adapter.count_evictions_in(tier_metrics());
            if let Some(found) = found_in_bucket {
                let adopted = adapter.adopt_stored(found, spec.eviction.is_some());
                if adopted > 0 {
                    tracing::info!(backend = %spec.backend, chunks = adopted, "indexed the chunks the bucket already holds");
                }
            } else if let Some(found) = found_in_segments {
                // A segment store's index is rebuilt from its headers at open: oldest first.
                adapter.adopt_stored(found, spec.eviction.is_some());
            } else if kind == StorageKind::File
                && (spec.capacity_bytes.is_some() || spec.eviction.is_some())
            {
                let folder = path()?;
                let found = stored_oldest_first(&folder)?;
                let adopted = adapter.adopt_stored(found, spec.eviction.is_some());
                if adopted > 0 {
                    tracing::info!(folder = %folder.display(), chunks = adopted, "indexed the chunks already stored");
                }
            }
            Box::new(adapter)
        }
        (Mode::Static { pool_size }, StorageKind::File) => {
            // Checked before the pool files are created.
            let options = crate::static_adapter::StaticOptions::from_spec(spec)?;
            let mut config = StaticConfig::new(path()?, pool_size as usize, page_bytes)
                .with_direct_io(spec.use_direct_io);
            if let Some(file_size) = spec.file_size {
                config = config.with_file_size(file_size);
            }
            let pool = StaticFilePool::open(Arc::clone(&transport), config)?;
            let adapter =
                StaticAdapter::with_options(Box::new(pool), label, page_bytes as u64, options);
            adapter.count_evictions_in(tier_metrics());
            Box::new(adapter)
        }
        (Mode::Static { pool_size }, StorageKind::Object) => {
            // Checked before the pool objects are registered.
            let options = crate::static_adapter::StaticOptions::from_spec(spec)?;
            let slots = u32::try_from(pool_size).map_err(|_| {
                Error::Registry(format!("pool_size {pool_size} exceeds 2^32 object slots"))
            })?;
            let pool = StaticObjectPool::open(Arc::clone(&transport), slots, page_bytes)?;
            let adapter =
                StaticAdapter::with_options(Box::new(pool), label, page_bytes as u64, options);
            adapter.count_evictions_in(tier_metrics());
            Box::new(adapter)
        }
    };
    Ok(Arc::new(Registered {
        adapter,
        _memory: memory,
    }))
}

/// One chunk object a bucket or container holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListedObject {
    /// The key its header carries.
    pub key: ChunkKey,
    /// Payload bytes.
    pub payload_len: u64,
    /// `s3://bucket/ID` or `azure://container/ID`.
    pub place: String,
}

/// The chunk objects in the bucket (OBJ) or container (AZURE_BLOB) of a dynamic object store,
/// oldest first, read from their headers through the object client (`kvl2 ls`). Objects that
/// are not chunks are skipped with a warning naming them.
pub fn list_objects(spec: &StorageSpec) -> Result<Vec<ListedObject>> {
    #[cfg(feature = "nixl")]
    {
        let control = object_control(spec)?;
        Ok(crate::storage::chunks_listed(control.list()?)
            .map(|(key, object)| ListedObject {
                key,
                payload_len: object.payload_len,
                place: format!("{}/{}", control.target(), object.id),
            })
            .collect())
    }
    #[cfg(not(feature = "nixl"))]
    Err(Error::Setting {
        key: "nixl_backend".to_owned(),
        message: format!(
            "{}: object stores need NIXL; build with feature nixl",
            spec.backend
        ),
    })
}

/// The client that deletes and lists the objects of `spec`'s bucket or container, built from
/// the plugin's own parameters.
#[cfg(feature = "nixl")]
fn object_control(spec: &StorageSpec) -> Result<nixl_obj::ObjectControl> {
    let params = spec.backend_params.expose();
    Ok(match spec.backend {
        kv_config::Backend::Obj => nixl_obj::ObjectControl::s3(params)?,
        kv_config::Backend::AzureBlob => nixl_obj::ObjectControl::azure(params)?,
        other => {
            return Err(Error::Setting {
                key: "nixl_backend".to_owned(),
                message: format!("{other}: no client deletes or lists its objects"),
            });
        }
    })
}

/// A dynamic object store over `transport`, with the client that deletes and lists its
/// objects (built from the plugin's own parameters), so that eviction frees bucket space.
fn open_objects(
    spec: &StorageSpec,
    transport: &Arc<dyn Transport>,
    page_bytes: usize,
) -> Result<Objects> {
    let store = ObjectStore::open(Arc::clone(transport), ObjectConfig::new(page_bytes))?;
    #[cfg(feature = "nixl")]
    let store = store.with_control(object_control(spec)?);
    #[cfg(not(feature = "nixl"))]
    let _ = spec;
    Ok(Objects {
        store,
        chunk_bytes: page_bytes as u64,
    })
}

/// The folders a dynamic segment store of `worker_id` writes: the configured ones for worker
/// 0, `worker-N/` under each for worker `N`, so that the ranks of one instance, which share
/// one `nixl_path`, each have their own (a segment store takes one writer per folder).
pub fn segment_folders(spec: &StorageSpec, worker_id: u32) -> Vec<std::path::PathBuf> {
    let folders = if spec.all_paths.is_empty() {
        spec.path.iter().cloned().collect()
    } else {
        spec.all_paths.clone()
    };
    if worker_id == 0 {
        return folders;
    }
    folders
        .into_iter()
        .map(|folder| folder.join(format!("worker-{worker_id}")))
        .collect()
}

/// The layout a dynamic store over files of `worker_id` opens with: the spec's, except that a
/// default of segments yields to a folder of per-key chunk files holding no segments (a
/// store written before segments were the default stays files, so what it holds is still
/// served and counted).
pub fn layout_in_use(spec: &StorageSpec, worker_id: u32) -> Layout {
    if spec.layout_given || spec.layout == Layout::Files {
        return spec.layout;
    }
    let has = |folder: &std::path::Path, suffix: &str| {
        std::fs::read_dir(folder).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(suffix))
        })
    };
    let chunk_files = spec
        .path
        .as_deref()
        .is_some_and(|folder| has(folder, ".bin"));
    let found = chunk_files
        && !segment_folders(spec, worker_id)
            .iter()
            .any(|folder| has(folder, ".kvseg"));
    if !found {
        return Layout::Segments;
    }
    tracing::info!(
        folder = ?spec.path,
        "the folder holds per-key chunk files: opening it with layout files (set layout to \
         segments, after emptying it, for segments)"
    );
    Layout::Files
}

/// Bytes of a segment store's capacity left, per folder, to its lock file and the file system's
/// extent blocks of its segment files.
const FOLDER_OVERHEAD_BYTES: u64 = 64 << 10;

/// The segment store of a dynamic spec over files with `layout: segments`, over its
/// [`segment_folders`], sized by its capacity (or, without one, by the disk's free space).
fn open_segments(
    spec: &StorageSpec,
    transport: &Arc<dyn Transport>,
    page_bytes: usize,
    context: &AdapterContext,
) -> Result<SegmentStore> {
    let read_only = context.read_only;
    let folders = segment_folders(spec, context.worker_id);
    // Without a capacity, what the disk holds: segment files are made as they fill, so the
    // store takes space only as it grows (LMCache's per-key files are unbounded the same way).
    let capacity = match spec.capacity_bytes {
        Some(bytes) => bytes,
        None => {
            let room = nixl_file::segment_room(&folders)?;
            tracing::info!(
                capacity = room,
                folders = ?folders,
                "no max_capacity_gb: segments may fill what the disk has free"
            );
            room
        }
    };
    // The folder's lock file and the file system's extent blocks count too: the segment files
    // get the rest, so that the folder as `du` counts it stays within the capacity.
    let capacity =
        capacity.saturating_sub(FOLDER_OVERHEAD_BYTES.saturating_mul(folders.len() as u64));
    let mut config = SegmentConfig::new(folders.clone())
        .with_capacity_bytes(capacity)
        .with_direct_io(spec.use_direct_io)
        .with_durable(spec.durable);
    let block = nixl_core::header::HEADER_BYTES as u64;
    let one_chunk = 2 * block + (page_bytes as u64).next_multiple_of(block);
    let segment_bytes = match (spec.segment_bytes, existing_segment_bytes(&folders)) {
        (Some(bytes), _) => bytes,
        // The size the folder already has: a changed capacity must never change the segment
        // size under stored data.
        (None, Some(bytes)) => bytes,
        // A small store gets four segments rather than none of the default size, each still
        // holding a whole chunk after its header block.
        (None, None) => nixl_file::DEFAULT_SEGMENT_BYTES
            .min(capacity / 4 / block * block)
            .max(one_chunk),
    };
    if segment_bytes < one_chunk {
        return Err(Error::Setting {
            key: "segment_size_mb".to_owned(),
            message: format!(
                "segments of {segment_bytes} bytes hold no chunk of {page_bytes} bytes with its \
                 header; they need at least {one_chunk}"
            ),
        });
    }
    config = config.with_segment_bytes(segment_bytes);
    let store = if read_only {
        SegmentStore::open_read_only(Arc::clone(transport), config)?
    } else {
        SegmentStore::open(Arc::clone(transport), config)?
    };
    Ok(store)
}

/// The size of the segment files already in `folders`, if any.
fn existing_segment_bytes(folders: &[std::path::PathBuf]) -> Option<u64> {
    folders.iter().find_map(|folder| {
        std::fs::read_dir(folder).ok()?.find_map(|entry| {
            let entry = entry.ok()?;
            let is_segment = entry.file_name().to_string_lossy().ends_with(".kvseg");
            // A file cut short outside the store (segment files are made whole) says nothing.
            is_segment
                .then(|| entry.metadata().ok().map(|m| m.len()))?
                .filter(|&len| len > 0)
        })
    })
}

/// The chunks under `folder`, least recently written first (by modification time).
fn stored_oldest_first(folder: &std::path::Path) -> Result<Vec<(ChunkKey, u64)>> {
    let mut chunks: Vec<_> = nixl_file::list_dir(folder)?
        .into_iter()
        .map(|chunk| {
            let written = std::fs::metadata(&chunk.path)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            (
                written,
                ChunkKey::from_file_key(chunk.key),
                chunk.payload_len,
            )
        })
        .collect();
    chunks.sort_by_key(|(written, _, _)| *written);
    Ok(chunks
        .into_iter()
        .map(|(_, key, bytes)| (key, bytes))
        .collect())
}

/// One built `--l2-adapter` value: its spec and the adapter.
pub type BuiltAdapter = (AdapterSpec, Arc<dyn L2Adapter>);

/// Builds an adapter of a downstream type from its validated `--l2-adapter` spec.
pub type AdapterConstructor = fn(&AdapterSpec, &AdapterContext) -> Result<Arc<dyn L2Adapter>>;

/// The adapter types `--l2-adapter` can build.
#[derive(Debug, Clone)]
pub struct AdapterFactory {
    json: AdapterRegistry,
    constructors: BTreeMap<String, AdapterConstructor>,
}

impl Default for AdapterFactory {
    fn default() -> Self {
        Self::new()
    }
}

impl AdapterFactory {
    /// `nixl_store` and `nixl_store_dynamic`.
    pub fn new() -> Self {
        Self {
            json: AdapterRegistry::new(),
            constructors: BTreeMap::new(),
        }
    }

    /// Registers a downstream adapter type: how its JSON is checked and how it is built.
    pub fn register(
        &mut self,
        type_name: &str,
        validator: AdapterValidator,
        constructor: AdapterConstructor,
    ) -> Result<()> {
        self.json.register(type_name, validator)?;
        self.constructors.insert(type_name.to_owned(), constructor);
        Ok(())
    }

    /// The registered type names.
    pub fn known(&self) -> Vec<&str> {
        self.json.known()
    }

    /// Validates every `--l2-adapter` value (all errors at once), then builds them in order.
    ///
    /// The adapters come without their `eviction` (it is in each [`AdapterSpec`], for the
    /// caller to run): [`StoreBuilder`](crate::StoreBuilder) runs it.
    pub fn build<S: AsRef<str>>(
        &self,
        values: &[S],
        context: &AdapterContext,
    ) -> Result<Vec<BuiltAdapter>> {
        Ok(self.build_loaded(values, context)?.0)
    }

    /// [`AdapterFactory::build`], with the configuration's warnings.
    pub(crate) fn build_loaded<S: AsRef<str>>(
        &self,
        values: &[S],
        context: &AdapterContext,
    ) -> Result<(Vec<BuiltAdapter>, Vec<kv_config::Warning>)> {
        let loaded = self.json.parse(values)?;
        let warnings = loaded.warnings;
        let built = loaded
            .value
            .into_iter()
            .enumerate()
            .map(|(tier, spec)| {
                let adapter = match (&spec.storage, self.constructors.get(&spec.type_name)) {
                    (Some(storage), _) => build_storage(storage, &context.clone().at_tier(tier))?,
                    (None, Some(constructor)) => constructor(&spec, context)?,
                    (None, None) => {
                        return Err(Error::Registry(format!(
                            "no constructor for adapter type {:?}",
                            spec.type_name
                        )));
                    }
                };
                Ok((spec, adapter))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((built, warnings))
    }
}
