//! The normalised storage spec the backends consume, and how an engine configuration becomes one.

use std::path::PathBuf;

use serde::Serialize;

use crate::backend::{Backend, Device, StorageKind};
use crate::engine::{EngineConfig, Loaded, NixlPath};
use crate::error::{Error, Result, Warnings};
use crate::secret::BackendParams;

const GIB: f64 = (1u64 << 30) as f64;

/// The `cache_policy` values a static pool evicts by at store time.
const STATIC_CACHE_POLICIES: [&str; 4] = ["LRU", "LFU", "FIFO", "MRU"];

/// Facts about the running process that a configuration file cannot know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deployment {
    /// Global worker (rank) id: the GPU too, unless [`Deployment::gpu_id`] is set.
    pub worker_id: u32,
    /// Worker id on this node: picks the endpoint from `nixl_endpoint_list`.
    pub local_worker_id: u32,
    /// The GPU this worker drives, when it is not the global worker id (LMCache's default):
    /// picks the device of `cuda` and the folder for `by_gpu` sharding.
    pub gpu_id: Option<u32>,
    /// Bytes of one KV chunk (one page), when the model is known.
    pub chunk_bytes: Option<u64>,
    /// Whether this process is the scheduler (no LocalCPUBackend pool there).
    pub scheduler_role: bool,
}

impl Deployment {
    /// Worker 0 of one, chunk size unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the global and local worker ids.
    pub fn with_worker(mut self, worker_id: u32, local_worker_id: u32) -> Self {
        self.worker_id = worker_id;
        self.local_worker_id = local_worker_id;
        self
    }

    /// Sets the GPU this worker drives.
    pub fn with_gpu(mut self, gpu_id: u32) -> Self {
        self.gpu_id = Some(gpu_id);
        self
    }

    /// The GPU this worker drives: the one set, else the global worker id.
    pub fn gpu(&self) -> u32 {
        self.gpu_id.unwrap_or(self.worker_id)
    }

    /// Sets the bytes of one KV chunk.
    pub fn with_chunk_bytes(mut self, chunk_bytes: u64) -> Self {
        self.chunk_bytes = Some(chunk_bytes);
        self
    }

    /// Marks the process as the scheduler.
    pub fn with_scheduler_role(mut self, scheduler: bool) -> Self {
        self.scheduler_role = scheduler;
        self
    }
}

/// Static slot pool or dynamic per-key storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Mode {
    /// `pool_size` slots opened and registered once.
    Static {
        /// Slots (files or objects).
        pool_size: u64,
    },
    /// One file or object per key, registered per operation.
    Dynamic,
}

/// How existence checks use local knowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceCache {
    /// Every check asks storage.
    Off,
    /// Known keys are answered locally; unknown ones ask storage.
    On,
    /// Only local knowledge counts: unknown keys are misses (false negatives by design).
    Only,
}

/// NIXL agent thread synchronisation (`NIXL_THREAD_SYNC_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SyncMode {
    /// No locking inside NIXL.
    None,
    /// One lock around every call (the default).
    Strict,
    /// Reader/writer lock.
    Rw,
    /// NIXL's own default, which is NONE.
    Default,
}

impl SyncMode {
    fn parse(value: &str) -> Option<SyncMode> {
        match value.trim().to_ascii_uppercase().as_str() {
            "NONE" => Some(SyncMode::None),
            "STRICT" => Some(SyncMode::Strict),
            "RW" => Some(SyncMode::Rw),
            "DEFAULT" => Some(SyncMode::Default),
            _ => None,
        }
    }
}

/// How a dynamic store over files lays its chunks out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One file per key, published by rename (LMCache's layout; the one for folders shared
    /// between processes).
    Files,
    /// Chunks appended to large preallocated segment files, one writer per folder.
    Segments,
}

impl Layout {
    /// `files` or `segments`.
    pub fn parse(value: &str) -> Option<Layout> {
        match value.trim().to_ascii_lowercase().as_str() {
            "files" => Some(Layout::Files),
            "segments" => Some(Layout::Segments),
            _ => None,
        }
    }
}

/// L2 eviction policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EvictionPolicy {
    /// Least recently used, over the whole adapter.
    #[serde(rename = "LRU")]
    Lru,
    /// LRU within a quota per cache salt.
    #[serde(rename = "IsolatedLRU")]
    IsolatedLru,
    /// Never evict.
    #[serde(rename = "noop")]
    Noop,
}

/// When and how much an adapter evicts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[non_exhaustive]
pub struct EvictionSpec {
    /// The policy.
    pub policy: EvictionPolicy,
    /// Usage fraction at which eviction starts, in (0, 1].
    pub trigger_watermark: f64,
    /// Fraction of keys evicted per pass, in [0, 1].
    pub eviction_ratio: f64,
}

/// One storage tier, normalised: what a backend needs to open itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StorageSpec {
    /// The NIXL plugin.
    pub backend: Backend,
    /// Files or objects.
    pub kind: StorageKind,
    /// Static pool or dynamic per-key storage.
    #[serde(flatten)]
    pub mode: Mode,
    /// The folder this worker uses (file backends).
    pub path: Option<PathBuf>,
    /// Every configured folder (sharding candidates).
    pub all_paths: Vec<PathBuf>,
    /// Plugin parameters, endpoint resolution applied (credentials redacted when printed).
    pub backend_params: BackendParams,
    /// Where the staging buffer lives.
    pub buffer_device: Device,
    /// Bytes of the staging buffer: the shared CPU pool (rounded down to whole chunks) or the
    /// GPU buffer (rounded up to whole chunks). `None` when it is not this spec's to size.
    pub buffer_bytes: Option<u64>,
    /// 2 MiB hugepages for the CPU pool.
    pub hugepages: bool,
    /// `O_DIRECT` for file backends.
    pub use_direct_io: bool,
    /// Presence cache mode.
    pub presence_cache: PresenceCache,
    /// Background writes.
    pub async_put: bool,
    /// NIXL progress thread.
    pub progress_thread: bool,
    /// NIXL thread synchronisation.
    pub sync_mode: SyncMode,
    /// Partial chunks are stored (static mode only).
    pub save_unfull_chunk: bool,
    /// Static-mode eviction at store time.
    pub cache_policy: String,
    /// Capacity limit in bytes (dynamic adapters), `None` when unlimited or unknown.
    pub capacity_bytes: Option<u64>,
    /// Two-level hex sub-folders for dynamic files.
    pub shard_dirs: bool,
    /// Sync each chunk's data before publishing it and its folder once per batch (dynamic
    /// mode over files; `backend_params.durable`).
    pub durable: bool,
    /// How a dynamic store over files lays chunks out (`layout` / `nixl_layout`).
    pub layout: Layout,
    /// Whether the configuration named the layout. A default one yields to what the folder
    /// holds: a folder of per-key files from before segments were the default stays files.
    pub layout_given: bool,
    /// Bytes per segment file when [`Layout::Segments`] (`segment_size_mb` /
    /// `nixl_segment_size_mb`); `None` for the store's default.
    pub segment_bytes: Option<u64>,
    /// Bytes per static file (several page slots per file).
    pub file_size: Option<u64>,
    /// Keep data on close (`persist_enabled`).
    pub persist: bool,
    /// Watermark eviction, when configured.
    pub eviction: Option<EvictionSpec>,
    /// Shared between instances.
    pub shared: bool,
}

impl StorageSpec {
    pub(crate) fn new(backend: Backend, mode: Mode) -> Self {
        Self {
            backend,
            kind: backend.kind(),
            mode,
            path: None,
            all_paths: Vec::new(),
            backend_params: BackendParams::new(),
            buffer_device: Device::Cpu,
            buffer_bytes: None,
            hugepages: false,
            use_direct_io: false,
            presence_cache: PresenceCache::Off,
            async_put: false,
            progress_thread: true,
            sync_mode: SyncMode::Strict,
            save_unfull_chunk: false,
            cache_policy: "LRU".to_owned(),
            capacity_bytes: None,
            shard_dirs: false,
            durable: false,
            layout: Layout::Files,
            layout_given: false,
            segment_bytes: None,
            file_size: None,
            persist: true,
            eviction: None,
            shared: false,
        }
    }

    /// Checks what needs the L1 page size: `file_size` must be a whole number of pages.
    pub fn check_page_size(&self, page_size: u64) -> Result<()> {
        match self.file_size {
            Some(file_size) if page_size == 0 || file_size % page_size != 0 => {
                Err(Error::FileSizeNotPageMultiple {
                    file_size,
                    page_size,
                })
            }
            _ => Ok(()),
        }
    }
}

/// The folders of a static pool: a string is read as comma-separated, as LMCache's sharder does.
fn split_paths(path: &NixlPath, warnings: &mut Warnings) -> Vec<String> {
    match path {
        NixlPath::One(csv) => csv
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
        NixlPath::Many(list) => {
            if list.iter().any(|p| p.contains(',')) {
                warnings.note(
                    "nixl_path entries contain commas; each list entry is taken as one folder",
                );
            }
            list.iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        }
    }
}

impl EngineConfig {
    /// Validates every NIXL storage rule at once and normalises the result.
    ///
    /// All violations are reported together ([`Error::Multiple`]); warnings (deprecations,
    /// ignored settings, rounding) come back with the spec.
    pub fn storage_spec(&self, deployment: &Deployment) -> Result<Loaded<StorageSpec>> {
        let extra = &self.extra_config;
        if !extra.enable_nixl_storage {
            return Err(Error::NixlStorageDisabled);
        }
        let mut errors = Vec::new();
        let mut warnings = Warnings::default();

        let backend = match extra.nixl_backend.as_deref() {
            None => {
                errors.push(Error::MissingBackend);
                None
            }
            Some(name) => match name.parse::<Backend>() {
                Ok(backend) => Some(backend),
                Err(()) => {
                    errors.push(Error::UnknownBackend {
                        backend: name.to_owned(),
                        supported: Backend::list(&Backend::ALL),
                    });
                    None
                }
            },
        };
        if extra.nixl_pool_size.is_none() {
            errors.push(Error::MissingPoolSize);
        }
        let mode = match extra.nixl_pool_size {
            Some(0) => Mode::Dynamic,
            Some(pool_size) => Mode::Static { pool_size },
            None => Mode::Dynamic,
        };
        if extra.nixl_presence_cache_only && !extra.nixl_presence_cache {
            errors.push(Error::PresenceCacheOnlyWithoutCache);
        }

        let device = match self.nixl_buffer_device.as_deref() {
            None => {
                errors.push(Error::MissingBufferDevice);
                None
            }
            Some(text) => match Device::parse(text, deployment.gpu()) {
                Some(device) => Some(device),
                None => {
                    errors.push(Error::InvalidBufferDevice {
                        device: text.to_owned(),
                    });
                    None
                }
            },
        };

        let mut buffer_bytes = None;
        let mut hugepages = self.local_cpu_use_hugepages;
        match device {
            Some(Device::Cpu) => {
                if self.nixl_buffer_size.is_some() {
                    errors.push(Error::BufferSizeInCpuMode);
                }
                if self.max_local_cpu_size <= 0.0 {
                    errors.push(Error::CpuModeWithoutPool);
                } else {
                    buffer_bytes =
                        self.cpu_pool_bytes(deployment.chunk_bytes, &mut errors, &mut warnings);
                }
                if self.enable_p2p {
                    errors.push(Error::P2pWithCpuMode);
                }
                if deployment.scheduler_role {
                    errors.push(Error::CpuModeInSchedulerRole);
                }
                if let Some(deprecated) = extra.nixl_use_hugepages {
                    if self.user_set("local_cpu_use_hugepages")
                        && deprecated != self.local_cpu_use_hugepages
                    {
                        errors.push(Error::HugepageConflict {
                            deprecated,
                            current: self.local_cpu_use_hugepages,
                        });
                    } else {
                        warnings.push(crate::Warning::Deprecated {
                            deprecated: "extra_config.nixl_use_hugepages".to_owned(),
                            current: "local_cpu_use_hugepages".to_owned(),
                        });
                        hugepages = deprecated;
                    }
                }
            }
            Some(gpu @ Device::Cuda(_)) => {
                match self.nixl_buffer_size {
                    None => errors.push(Error::MissingBufferSize {
                        device: gpu.to_string(),
                    }),
                    Some(size) => {
                        buffer_bytes = Some(round_up_to_chunks(
                            size,
                            deployment.chunk_bytes,
                            &mut warnings,
                        ));
                    }
                }
                if extra.nixl_use_hugepages.is_some() {
                    warnings.note(format!(
                        "extra_config.nixl_use_hugepages is deprecated and has no effect for \
                         nixl_buffer_device={gpu}; remove it"
                    ));
                }
                if hugepages {
                    warnings
                        .note("Hugepages are not supported for GPU memory allocation; disabled");
                    hugepages = false;
                }
            }
            None => {}
        }

        if let (Some(backend), Some(device)) = (backend, device) {
            if !backend.supports_device(device) {
                errors.push(Error::BackendDeviceMismatch {
                    backend: backend.to_string(),
                    device: device.to_string(),
                    allowed: backend.allowed_devices(),
                });
            }
        }

        let mut save_unfull_chunk = self.save_unfull_chunk;
        let forced_by = [
            ("enable_blending", self.enable_blending),
            ("enable_pd", self.enable_pd),
        ]
        .into_iter()
        .find_map(|(key, on)| on.then_some(key));
        if let Some(key) = forced_by {
            if !save_unfull_chunk {
                warnings.note(format!("{key} forces save_unfull_chunk to true"));
            }
            save_unfull_chunk = true;
        }
        if mode == Mode::Dynamic && extra.nixl_pool_size.is_some() && save_unfull_chunk {
            errors.push(Error::UnfullChunkInDynamicMode {
                forced_by: forced_by.filter(|_| !self.save_unfull_chunk),
            });
        }

        if extra.nixl_path_sharding != "by_gpu" {
            errors.push(Error::InvalidPathSharding {
                strategy: extra.nixl_path_sharding.clone(),
            });
        }
        let mut path = None;
        let mut all_paths = Vec::new();
        if let Some(backend) = backend.filter(|b| b.kind() == StorageKind::File) {
            match (&extra.nixl_path, mode) {
                (None, _) => errors.push(Error::MissingPath {
                    backend: backend.to_string(),
                }),
                (Some(NixlPath::Many(list)), Mode::Dynamic) if list.len() > 1 => {
                    errors.push(Error::MultiplePathsInDynamicMode)
                }
                (Some(NixlPath::Many(list)), Mode::Dynamic) => {
                    all_paths = list.iter().map(PathBuf::from).collect();
                    path = all_paths.first().cloned();
                }
                (Some(NixlPath::One(single)), Mode::Dynamic) => {
                    path = Some(PathBuf::from(single));
                    all_paths = vec![PathBuf::from(single)];
                }
                (Some(configured), Mode::Static { .. }) => {
                    let folders = split_paths(configured, &mut warnings);
                    if folders.is_empty() {
                        errors.push(Error::EmptyPath);
                    } else {
                        let index = deployment.gpu() as usize % folders.len();
                        path = Some(PathBuf::from(&folders[index]));
                        all_paths = folders.into_iter().map(PathBuf::from).collect();
                    }
                }
            }
        }

        let mut backend_params = extra.nixl_backend_params.clone();
        match extra.nixl_endpoint_list.as_deref() {
            None => {}
            Some([]) => errors.push(Error::EmptyEndpointList),
            Some(endpoints) if backend == Some(Backend::Obj) => {
                let endpoint = &endpoints[deployment.local_worker_id as usize % endpoints.len()];
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    errors.push(Error::InvalidEndpoint {
                        endpoint: endpoint.clone(),
                    });
                } else {
                    if let Some(old) = backend_params.get("endpoint_override") {
                        warnings.note(format!(
                            "nixl_endpoint_list is set; ignoring nixl_backend_params.endpoint_override ({old})"
                        ));
                    }
                    tracing::info!(
                        worker = deployment.local_worker_id,
                        endpoint = %endpoint,
                        endpoints = endpoints.len(),
                        "worker using endpoint from nixl_endpoint_list"
                    );
                    backend_params.insert("endpoint_override", endpoint.clone());
                }
            }
            Some(_) => errors.push(Error::InvalidSetting {
                key: "extra_config.nixl_endpoint_list".to_owned(),
                message: format!(
                    "applies to the OBJ backend only, not {}",
                    backend.map_or_else(|| "this backend".to_owned(), |b| b.to_string())
                ),
            }),
        }

        let sync_mode = match extra.nixl_sync_mode.as_deref() {
            None => SyncMode::Strict,
            Some(text) => SyncMode::parse(text).unwrap_or_else(|| {
                errors.push(Error::InvalidSyncMode {
                    mode: text.to_owned(),
                });
                SyncMode::Strict
            }),
        };

        let capacity_bytes = match extra.nixl_max_capacity_gb {
            None => None,
            Some(_) if mode != Mode::Dynamic => {
                errors.push(Error::InvalidSetting {
                    key: "extra_config.nixl_max_capacity_gb".to_owned(),
                    message: "applies to dynamic mode (nixl_pool_size: 0); a static pool holds \
                              nixl_pool_size chunks"
                        .to_owned(),
                });
                None
            }
            Some(gb) if gb.is_finite() && gb > 0.0 => Some((gb * GIB) as u64),
            Some(gb) => {
                errors.push(Error::InvalidSetting {
                    key: "extra_config.nixl_max_capacity_gb".to_owned(),
                    message: format!("must be a positive number of GiB, got {gb}"),
                });
                None
            }
        };
        // The engine's own settings, not the store's: said once, so nobody believes they act here.
        for (key, effect) in [
            (
                "local_cpu",
                "the engine's hot-cache switch; this store's pool only stages chunks, as LMCache's does with local_cpu: false",
            ),
            (
                "enable_async_loading",
                "the engine's loading mode; this store loads per call, blocking or submitted (AsyncAdapter)",
            ),
        ] {
            if self.user_set(key) {
                warnings.note(format!("{key} has no effect on the NIXL store: {effect}"));
            }
        }
        if matches!(mode, Mode::Static { .. }) {
            for (key, on) in [
                ("extra_config.nixl_async_put", extra.nixl_async_put),
                (
                    "extra_config.nixl_presence_cache",
                    extra.nixl_presence_cache,
                ),
            ] {
                if on {
                    errors.push(Error::InvalidSetting {
                        key: key.to_owned(),
                        message: "applies to dynamic mode (nixl_pool_size: 0); a static pool \
                                  writes in the caller and keeps every key in memory"
                            .to_owned(),
                    });
                }
            }
        }
        match mode {
            Mode::Static { .. } if !STATIC_CACHE_POLICIES.contains(&self.cache_policy.as_str()) => {
                errors.push(Error::InvalidSetting {
                    key: "cache_policy".to_owned(),
                    message: format!(
                        "{:?} is not a static-pool policy; use one of {}",
                        self.cache_policy,
                        STATIC_CACHE_POLICIES.join(", ")
                    ),
                })
            }
            Mode::Dynamic if self.user_set("cache_policy") && self.cache_policy != "LRU" => errors
                .push(Error::InvalidSetting {
                    key: "cache_policy".to_owned(),
                    message: format!(
                        "{:?} applies to static pools (nixl_pool_size > 0); a dynamic store \
                         evicts by extra_config.nixl_eviction",
                        self.cache_policy
                    ),
                }),
            _ => {}
        }
        let layout = extra
            .nixl_layout
            .as_deref()
            .map(|text| Layout::parse(text).ok_or(text));
        let layout = match layout {
            None => None,
            Some(Ok(layout)) => Some(layout),
            Some(Err(text)) => {
                errors.push(Error::InvalidSetting {
                    key: "extra_config.nixl_layout".to_owned(),
                    message: format!("expected segments or files, got {text:?}"),
                });
                None
            }
        };
        let layout = crate::l2::layout_rules(
            backend,
            mode,
            layout,
            extra.nixl_segment_size_mb,
            false,
            false,
            &mut |key, message| {
                errors.push(Error::InvalidSetting {
                    key: format!("extra_config.nixl_{key}"),
                    message,
                })
            },
        );
        let eviction = extra.nixl_eviction.as_ref().and_then(|value| {
            crate::l2::parse_eviction(value, "extra_config.nixl_eviction", &mut |key, message| {
                errors.push(Error::InvalidSetting { key, message })
            })
        });

        Error::from_list(errors)?;
        let (Some(backend), Some(device)) = (backend, device) else {
            // Both cases already pushed their own error; this only keeps the types honest.
            return Err(if backend.is_none() {
                Error::MissingBackend
            } else {
                Error::MissingBufferDevice
            });
        };
        let mut spec = StorageSpec::new(backend, mode);
        spec.path = path;
        spec.all_paths = all_paths;
        spec.backend_params = backend_params;
        spec.buffer_device = device;
        spec.buffer_bytes = buffer_bytes;
        spec.hugepages = hugepages;
        spec.use_direct_io = extra.use_direct_io;
        spec.presence_cache = match (extra.nixl_presence_cache, extra.nixl_presence_cache_only) {
            (true, true) => PresenceCache::Only,
            (true, false) => PresenceCache::On,
            _ => PresenceCache::Off,
        };
        spec.async_put = extra.nixl_async_put;
        spec.progress_thread = extra.nixl_enable_prog_thread;
        spec.sync_mode = sync_mode;
        spec.save_unfull_chunk = save_unfull_chunk;
        spec.cache_policy = self.cache_policy.clone();
        spec.capacity_bytes = capacity_bytes;
        spec.eviction = eviction;
        if let Some((layout, segment_bytes, layout_given)) = layout {
            spec.layout = layout;
            spec.layout_given = layout_given;
            spec.segment_bytes = segment_bytes;
        }
        if let Some(message) = crate::l2::eviction_without_capacity(&spec) {
            return Err(Error::InvalidSetting {
                key: "extra_config.nixl_eviction".to_owned(),
                message: format!("{message}: set extra_config.nixl_max_capacity_gb"),
            });
        }
        Ok(Loaded {
            value: spec,
            warnings: warnings.0,
        })
    }

    fn cpu_pool_bytes(
        &self,
        chunk_bytes: Option<u64>,
        errors: &mut Vec<Error>,
        warnings: &mut Warnings,
    ) -> Option<u64> {
        let pool_bytes = (self.max_local_cpu_size * GIB) as u64;
        let Some(chunk) = chunk_bytes.filter(|&c| c > 0) else {
            return Some(pool_bytes);
        };
        let aligned = pool_bytes / chunk * chunk;
        if aligned == 0 {
            errors.push(Error::CpuPoolBelowOneChunk {
                pool_bytes,
                chunk_bytes: chunk,
            });
            return None;
        }
        if aligned != pool_bytes {
            warnings.note(format!(
                "max_local_cpu_size not a multiple of chunk size; rounding down from {pool_bytes} to {aligned} bytes for NIXL shared pool"
            ));
        }
        Some(aligned)
    }
}

fn round_up_to_chunks(size: u64, chunk_bytes: Option<u64>, warnings: &mut Warnings) -> u64 {
    let Some(chunk) = chunk_bytes.filter(|&c| c > 0) else {
        return size;
    };
    let aligned = size.div_ceil(chunk) * chunk;
    if aligned != size {
        warnings.note(format!(
            "Nixl buffer size {size} is not a multiple of align bytes {chunk}, auto aligned to {aligned}"
        ));
    }
    aligned
}
