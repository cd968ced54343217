//! The one way from configuration to a running store: an LMCache engine configuration, a list
//! of `--l2-adapter` JSON values or SGLang's HiCache settings, plus the deployment, become the
//! page pool sized and backed as configured, the adapters, and the eviction controller running
//! for them. [`open_channel`](crate::open_channel) (feature `channel`) does the same for the
//! transfer channel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_config::{
    Deployment, EngineConfig, EvictionPolicy, EvictionSpec, HiCacheConfig, StorageSpec, Warning,
};
#[cfg(feature = "nixl")]
use nixl_core::NixlTransport;
use pinned_alloc::{KvShape, Page, PagePool, PoolConfig};

use crate::adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage};
use crate::error::{Error, Result};
use crate::eviction::{EvictionController, EvictionKick, Pass, eviction_pass};
use crate::hicache::HiCache;
use crate::keys::ChunkKey;
use crate::registry::{AdapterContext, AdapterFactory, Engine, build_storage};

/// Pages of the L1 pool when the configuration does not size it (`--l2-adapter`, HiCache).
pub const DEFAULT_POOL_PAGES: u64 = 64;

/// LMCache's eviction controller checks every second; a store that finds its adapter over the
/// watermark wakes it at once.
pub const DEFAULT_EVICTION_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Source {
    Lmcache(Box<EngineConfig>),
    L2Adapters(Vec<String>),
    HiCache(HiCacheConfig),
}

/// Builds a [`Store`] from configuration.
#[derive(Debug)]
pub struct StoreBuilder {
    source: Source,
    deployment: Deployment,
    engine: Engine,
    factory: AdapterFactory,
    chunk_bytes: Option<usize>,
    kv_shape: Option<KvShape>,
    pool_bytes: Option<u64>,
    eviction_interval: Duration,
    evicting: bool,
    read_only: bool,
}

impl StoreBuilder {
    fn new(source: Source) -> Self {
        Self {
            source,
            deployment: Deployment::new(),
            engine: Engine::Auto,
            factory: AdapterFactory::new(),
            chunk_bytes: None,
            kv_shape: None,
            pool_bytes: None,
            eviction_interval: DEFAULT_EVICTION_INTERVAL,
            evicting: true,
            read_only: false,
        }
    }

    /// An LMCache engine configuration (YAML and `LMCACHE_*` env, loaded by
    /// [`kv_config::ConfigLoader`]) with `extra_config.enable_nixl_storage`.
    pub fn from_lmcache(config: EngineConfig) -> Self {
        Self::new(Source::Lmcache(Box::new(config)))
    }

    /// `--l2-adapter` JSON values, in order: one tier each.
    pub fn from_l2_adapters<S: Into<String>>(values: impl IntoIterator<Item = S>) -> Self {
        Self::new(Source::L2Adapters(
            values.into_iter().map(Into::into).collect(),
        ))
    }

    /// SGLang's HiCache NIXL settings: the plugin by its priority among those installed (or as
    /// named), over the folder this worker's GPU picks.
    pub fn from_hicache(config: HiCacheConfig) -> Self {
        Self::new(Source::HiCache(config))
    }

    /// Who this process is: worker ids, GPU, chunk size.
    pub fn with_deployment(mut self, deployment: Deployment) -> Self {
        self.deployment = deployment;
        self
    }

    /// The engine for file storage.
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// The adapter types `--l2-adapter` can build, downstream ones included.
    pub fn with_factory(mut self, factory: AdapterFactory) -> Self {
        self.factory = factory;
        self
    }

    /// Bytes of one chunk (a page of the pool), when the deployment does not say.
    pub fn with_chunk_bytes(mut self, chunk_bytes: usize) -> Self {
        self.chunk_bytes = Some(chunk_bytes);
        self
    }

    /// The model's KV shape: with an LMCache configuration, one chunk is `chunk_size` tokens
    /// of it (explicit chunk bytes, from the builder or the deployment, take precedence).
    pub fn with_kv_shape(mut self, shape: KvShape) -> Self {
        self.kv_shape = Some(shape);
        self
    }

    /// Bytes of the L1 pool where the configuration does not size it (`--l2-adapter`, HiCache,
    /// or an LMCache GPU-mode host pool); an LMCache CPU-mode pool is `max_local_cpu_size`.
    pub fn with_pool_bytes(mut self, pool_bytes: u64) -> Self {
        self.pool_bytes = Some(pool_bytes);
        self
    }

    /// Whether configured eviction runs (the default). Off for a store opened only to read or
    /// list, which should never delete what it finds.
    pub fn with_eviction(mut self, evicting: bool) -> Self {
        self.evicting = evicting;
        self
    }

    /// Opens storage to read only (and so without eviction): a segment store beside a live
    /// writer, verifying every load; stores and deletes are refused.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self.evicting = false;
        self
    }

    /// How often the eviction controller checks usage when nothing wakes it.
    pub fn with_eviction_interval(mut self, interval: Duration) -> Self {
        self.eviction_interval = interval;
        self
    }

    fn chunk_bytes(&self) -> Result<usize> {
        let from_shape = match (&self.source, self.kv_shape) {
            (Source::Lmcache(config), Some(shape)) => {
                usize::try_from(shape.chunk_bytes(config.chunk_size)).ok()
            }
            _ => None,
        };
        let chunk = self
            .chunk_bytes
            .or(self.deployment.chunk_bytes.map(|c| c as usize))
            .or(from_shape)
            .filter(|&c| c > 0);
        chunk.ok_or_else(|| Error::Setting {
            key: "chunk_bytes".to_owned(),
            message: "the bytes of one KV chunk are needed to size the page pool: set them \
                      on the deployment or the builder, or give the KV shape (with chunk_size)"
                .to_owned(),
        })
    }

    fn pool(
        &self,
        chunk: usize,
        configured: Option<u64>,
        hugepages: bool,
    ) -> Result<Arc<PagePool>> {
        let stride = chunk.next_multiple_of(4096) as u64;
        let bytes = configured
            .or(self.pool_bytes)
            .unwrap_or(DEFAULT_POOL_PAGES * stride);
        Ok(PoolConfig::new(chunk, bytes)
            .with_hugepages(hugepages)
            .build()?)
    }

    /// Validates the configuration, sizes the pool, opens every tier and starts eviction.
    pub fn build(self) -> Result<Store> {
        let chunk = self.chunk_bytes()?;
        let deployment = self.deployment.with_chunk_bytes(chunk as u64);
        let mut warnings = Vec::new();
        let (pool, specs) = match &self.source {
            Source::Lmcache(config) => {
                let loaded = config.storage_spec(&deployment)?;
                warnings.extend(loaded.warnings);
                let spec = loaded.value;
                let host_bytes = if spec.buffer_device.is_cpu() {
                    spec.buffer_bytes
                } else {
                    None
                };
                let pool = self.pool(chunk, host_bytes, spec.hugepages)?;
                (
                    pool,
                    vec![(format!("NixlStorageBackend ({})", spec.backend), spec)],
                )
            }
            Source::L2Adapters(values) => {
                let pool = self.pool(chunk, None, false)?;
                let context = AdapterContext::new(Arc::clone(&pool))
                    .with_engine(self.engine)
                    .with_read_only(self.read_only)
                    .with_eviction(self.evicting)
                    .with_worker(deployment.worker_id);
                let (built, parsed_warnings) = self.factory.build_loaded(values, &context)?;
                warnings.extend(parsed_warnings);
                let tiers = built
                    .into_iter()
                    .map(|(spec, adapter)| {
                        let name = format!("--l2-adapter #{} ({})", spec.index, spec.type_name);
                        Tier::new(name, adapter, spec.eviction, spec.storage)
                    })
                    .collect();
                return Store::start(
                    pool,
                    tiers,
                    warnings,
                    (self.eviction_interval, self.evicting),
                    deployment.worker_id,
                );
            }
            Source::HiCache(config) => {
                let backend = hicache_backend(config, self.engine)?;
                let spec = config.storage_spec(backend, &deployment);
                let pool = self.pool(chunk, None, false)?;
                (pool, vec![(format!("HiCache ({backend})"), spec)])
            }
        };
        let context = AdapterContext::new(Arc::clone(&pool))
            .with_engine(self.engine)
            .with_read_only(self.read_only)
            .with_eviction(self.evicting)
            .with_worker(deployment.worker_id);
        let mut tiers = Vec::new();
        for (index, (name, spec)) in specs.into_iter().enumerate() {
            let adapter = build_storage(&spec, &context.clone().at_tier(index))?;
            tiers.push(Tier::new(name, adapter, spec.eviction, Some(spec)));
        }
        Store::start(
            pool,
            tiers,
            warnings,
            (self.eviction_interval, self.evicting),
            deployment.worker_id,
        )
    }
}

/// SGLang's choice of plugin: the one named, or the first of its priority list NIXL has. With
/// NIXL absent and the native engine allowed, POSIX on the native engine.
fn hicache_backend(config: &HiCacheConfig, engine: Engine) -> Result<kv_config::Backend> {
    #[cfg(feature = "nixl")]
    let available = match (engine, NixlTransport::available_plugins()) {
        (Engine::Native, _) => vec!["POSIX".to_owned()],
        (_, Ok(plugins)) => plugins,
        (Engine::Auto, Err(err @ nixl_core::Error::RuntimeNotFound { .. })) => {
            tracing::warn!(error = %err, "NIXL is not installed; HiCache uses POSIX on the native engine");
            vec!["POSIX".to_owned()]
        }
        (_, Err(err)) => return Err(err.into()),
    };
    // Without NIXL, POSIX on the native engine is all there is (`Engine::Nixl` is refused when
    // the storage opens).
    #[cfg(not(feature = "nixl"))]
    let available = {
        let _ = engine;
        vec!["POSIX".to_owned()]
    };
    #[cfg(feature = "nixl")]
    let backend = config.select_backend(&available)?;
    #[cfg(not(feature = "nixl"))]
    let backend = config
        .select_backend(&available)
        .map_err(|err| Error::Setting {
            key: kv_config::PLUGIN_VAR.to_owned(),
            message: format!(
                "{err}: this build has no NIXL, so POSIX on the native engine is the one plugin \
                 (run `cargo xtask setup`, then build with the `nixl` feature)"
            ),
        })?;
    if backend.kind() == kv_config::StorageKind::Object {
        return Err(Error::Setting {
            key: kv_config::PLUGIN_VAR.to_owned(),
            message: format!(
                "{backend}: SGLang's HiCache settings name no bucket or credentials for an \
                 object store; use a file plugin, or an --l2-adapter nixl_store_dynamic over {backend}"
            ),
        });
    }
    Ok(backend)
}

/// One storage tier of a [`Store`].
#[derive(Debug)]
pub struct Tier {
    name: String,
    adapter: Arc<dyn L2Adapter>,
    eviction: Option<EvictionSpec>,
    spec: Option<StorageSpec>,
}

impl Tier {
    fn new(
        name: String,
        adapter: Arc<dyn L2Adapter>,
        eviction: Option<EvictionSpec>,
        spec: Option<StorageSpec>,
    ) -> Self {
        Self {
            name,
            adapter,
            eviction,
            spec,
        }
    }

    /// Where it came from (`--l2-adapter #0 (nixl_store_dynamic)`, `NixlStorageBackend (POSIX)`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The adapter; with eviction configured, a store that finds it full evicts first.
    pub fn adapter(&self) -> &Arc<dyn L2Adapter> {
        &self.adapter
    }

    /// Its watermark eviction, if any.
    pub fn eviction(&self) -> Option<&EvictionSpec> {
        self.eviction.as_ref()
    }

    /// The storage spec it was built from (NIXL types).
    pub fn spec(&self) -> Option<&StorageSpec> {
        self.spec.as_ref()
    }
}

/// A running store: the page pool, its tiers, and the eviction controller serving them.
///
/// Dropping it stops the controller first, then lets go of the tiers (each closes when its
/// last handle goes); [`Store::close`] also closes every tier, in order, and reports failures.
#[derive(Debug)]
pub struct Store {
    // Field order is drop order: the controller stops before the tiers it evicts from go.
    eviction: Option<EvictionController>,
    tiers: Vec<Tier>,
    pool: Arc<PagePool>,
    warnings: Vec<Warning>,
}

impl Store {
    fn start(
        pool: Arc<PagePool>,
        mut tiers: Vec<Tier>,
        warnings: Vec<Warning>,
        (interval, evicting): (Duration, bool),
        worker_id: u32,
    ) -> Result<Store> {
        if tiers.is_empty() {
            return Err(Error::Setting {
                key: "--l2-adapter".to_owned(),
                message: "no adapter given".to_owned(),
            });
        }
        let kick = EvictionKick::default();
        let mut passes: Vec<Pass> = Vec::new();
        if evicting {
            for tier in &mut tiers {
                let Some(spec) = tier.eviction else { continue };
                let wrapped = Arc::new(Evicting {
                    inner: Arc::clone(&tier.adapter),
                    spec,
                    kick: kick.clone(),
                    passes: Mutex::new(()),
                });
                let for_controller = Arc::clone(&wrapped);
                passes.push(Box::new(move || for_controller.pass()));
                tier.adapter = wrapped;
            }
        }
        // Outermost, so a key retried after an eviction counts once, with its final outcome.
        for (index, tier) in tiers.iter_mut().enumerate() {
            let labels = match &tier.spec {
                Some(spec) => crate::telemetry::Labels::of_spec(spec, worker_id),
                None => crate::telemetry::Labels::of_status(&tier.adapter.status()),
            }
            .at_tier(index);
            let metrics = Arc::new(crate::telemetry::TierMetrics::new(&labels));
            tier.adapter = Arc::new(crate::telemetry::Instrumented::new(
                Arc::clone(&tier.adapter),
                metrics,
                labels,
            ));
        }
        let eviction = if passes.is_empty() {
            None
        } else {
            Some(
                EvictionController::spawn_passes(kick, passes, interval).map_err(|err| {
                    Error::Setting {
                        key: "eviction".to_owned(),
                        message: format!("the eviction thread could not start: {err}"),
                    }
                })?,
            )
        };
        Ok(Store {
            eviction,
            tiers,
            pool,
            warnings,
        })
    }

    /// The L1 page pool every tier is registered with: pages to store from and load into.
    pub fn pool(&self) -> &Arc<PagePool> {
        &self.pool
    }

    /// The first tier's adapter.
    pub fn adapter(&self) -> &Arc<dyn L2Adapter> {
        &self.tiers[0].adapter
    }

    /// Every tier, in configuration order.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// SGLang's calls over the first tier, for `model` and this tensor-parallel rank.
    pub fn hicache(&self, model: impl Into<String>, tp_rank: u32, tp_size: u32) -> HiCache {
        HiCache::new(Arc::clone(self.adapter()), model, tp_rank, tp_size)
    }

    /// What the configuration warned about (deprecations, ignored values, rounding).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Stops eviction, then closes every tier in order; the first failure is returned after
    /// all were tried.
    pub fn close(mut self) -> Result<()> {
        drop(self.eviction.take());
        let mut first = None;
        for tier in &self.tiers {
            if let Err(err) = tier.adapter.close() {
                tracing::warn!(tier = %tier.name, error = %err, "closing a tier failed");
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Eviction passes a store runs in the caller before it reports a key refused for room.
const MAX_EVICTION_RETRIES: usize = 8;

/// An adapter with watermark eviction: a store that leaves it at or over the watermark wakes
/// the controller, and keys refused for want of room are retried once after an eviction pass
/// run in the caller, so a full store keeps accepting instead of refusing until the next tick.
#[derive(Debug)]
struct Evicting {
    inner: Arc<dyn L2Adapter>,
    spec: EvictionSpec,
    kick: EvictionKick,
    /// Held for a whole pass, by the controller and by stores alike, so passes never overlap
    /// (each would evict its ratio of what the other left).
    passes: Mutex<()>,
}

impl Evicting {
    fn pass(&self) -> EvictionReport {
        let _one_at_a_time = self.passes.lock().unwrap_or_else(|p| p.into_inner());
        eviction_pass(self.inner.as_ref(), &self.spec)
    }

    /// A pass for a store refused for room: the watermark pass, or, where storage is full below
    /// the watermark (segments free space a segment at a time), the policy's ratio anyway.
    fn make_room(&self) -> EvictionReport {
        let report = eviction_pass(self.inner.as_ref(), &self.spec);
        if report.evicted > 0 || self.spec.policy == EvictionPolicy::Noop {
            return report;
        }
        self.inner
            .evict(self.spec.eviction_ratio.max(f64::MIN_POSITIVE), None)
    }

    /// Stores the refused keys again; whether any is still refused.
    fn retry(&self, keys: &[ChunkKey], pages: &[&Page], report: &mut StoreReport) -> bool {
        let refused: Vec<usize> = report
            .keys
            .iter()
            .enumerate()
            .filter(|(i, outcome)| *i < pages.len() && outcome.is_refused_for_room())
            .map(|(i, _)| i)
            .collect();
        if refused.is_empty() {
            return false;
        }
        let retry_keys: Vec<ChunkKey> = refused.iter().map(|&i| keys[i].clone()).collect();
        let retry_pages: Vec<&Page> = refused.iter().map(|&i| pages[i]).collect();
        let retried = self.inner.store(&retry_keys, &retry_pages);
        for (&i, outcome) in refused.iter().zip(retried.keys) {
            report.keys[i] = outcome;
        }
        report.keys.iter().any(KeyOutcome::is_refused_for_room)
    }
}

#[deny(clippy::missing_trait_methods)]
impl L2Adapter for Evicting {
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        let mut report = self.inner.store(keys, pages);
        if report.keys.iter().any(KeyOutcome::is_refused_for_room) {
            // Under the pass lock: first retry (another thread's pass may have made room), then
            // evict and retry, a few passes at most (segments free space a segment at a time).
            let _one_at_a_time = self.passes.lock().unwrap_or_else(|p| p.into_inner());
            let mut still_refused = self.retry(keys, pages, &mut report);
            for _ in 0..MAX_EVICTION_RETRIES {
                if !still_refused || self.make_room().evicted == 0 {
                    break;
                }
                still_refused = self.retry(keys, pages, &mut report);
            }
        }
        if self.inner.usage().fraction() >= self.spec.trigger_watermark {
            self.kick.kick();
        }
        report
    }

    fn lookup_and_pin(&self, keys: &[ChunkKey]) -> Vec<bool> {
        self.inner.lookup_and_pin(keys)
    }

    fn unlock(&self, keys: &[ChunkKey]) {
        self.inner.unlock(keys)
    }

    fn load(&self, keys: &[ChunkKey], pages: &mut [&mut Page]) -> Vec<bool> {
        self.inner.load(keys, pages)
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        self.inner.delete(keys)
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        self.inner.batched_contains(keys)
    }

    fn stored_size(&self, key: &ChunkKey) -> Option<u64> {
        self.inner.stored_size(key)
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }

    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        self.inner.evict(ratio, salt)
    }

    fn status(&self) -> Status {
        self.inner.status()
    }

    fn close(&self) -> Result<()> {
        self.inner.close()
    }
}
