use std::fmt;
use std::path::PathBuf;

/// Every way a configuration can be wrong. Each rule of the reference has its own variant, which
/// names the key(s) at fault and the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Several problems at once: a configuration reports all of them, not just the first.
    #[error("{} configuration errors:\n{}", .0.len(), list(.0))]
    Multiple(Vec<Error>),

    /// A file, environment variable or value could not be read or has the wrong type.
    #[error("{0}")]
    Parse(Box<figment::Error>),

    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A storage spec was asked for, but `extra_config.enable_nixl_storage` is not true.
    #[error("NIXL storage is not enabled: set extra_config.enable_nixl_storage: true")]
    NixlStorageDisabled,

    /// V1: `extra_config.nixl_backend` is missing.
    #[error(
        "extra_config.nixl_backend is required: one of GDS, GDS_MT, POSIX, HF3FS, OBJ, AZURE_BLOB, DOCA_MEMOS"
    )]
    MissingBackend,

    /// `extra_config.nixl_backend` names no known backend.
    #[error("extra_config.nixl_backend {backend:?} is not supported; supported: {supported}")]
    UnknownBackend {
        /// The value given.
        backend: String,
        /// The backends accepted here.
        supported: String,
    },

    /// V2: `extra_config.nixl_pool_size` is missing.
    #[error(
        "extra_config.nixl_pool_size is required: a positive number of slots (static mode) or 0 (dynamic mode)"
    )]
    MissingPoolSize,

    /// V3: presence-cache-only mode without the presence cache.
    #[error("nixl_presence_cache must be true when nixl_presence_cache_only is true")]
    PresenceCacheOnlyWithoutCache,

    /// V4: `nixl_buffer_device` is missing.
    #[error("nixl_buffer_device is required when NIXL storage is enabled: \"cpu\" or \"cuda\"")]
    MissingBufferDevice,

    /// `nixl_buffer_device` is neither `cpu`, `cuda` nor `cuda:N`.
    #[error("nixl_buffer_device {device:?} is not valid: use \"cpu\", \"cuda\" or \"cuda:N\"")]
    InvalidBufferDevice {
        /// The value given.
        device: String,
    },

    /// V5: a buffer size in CPU mode.
    #[error(
        "nixl_buffer_size must not be set when nixl_buffer_device='cpu'. In CPU mode NIXL shares \
         LocalCPUBackend's pinned pool, which is sized by max_local_cpu_size."
    )]
    BufferSizeInCpuMode,

    /// V6: CPU mode with no CPU pool.
    #[error(
        "nixl_buffer_device='cpu' requires max_local_cpu_size > 0 (LocalCPUBackend's pinned pool \
         is the NIXL staging buffer)."
    )]
    CpuModeWithoutPool,

    /// The CPU pool does not hold one chunk.
    #[error(
        "max_local_cpu_size ({pool_bytes} bytes) is smaller than one chunk ({chunk_bytes} bytes); \
         cannot initialize NIXL CPU shared pool"
    )]
    CpuPoolBelowOneChunk {
        /// Bytes of `max_local_cpu_size`.
        pool_bytes: u64,
        /// Bytes of one KV chunk.
        chunk_bytes: u64,
    },

    /// V7: P2P together with NIXL CPU mode.
    #[error(
        "enable_p2p=True together with enable_nixl_storage=True + nixl_buffer_device='cpu' has not \
         been validated end-to-end: use enable_p2p with nixl_buffer_device='cuda', or disable enable_p2p"
    )]
    P2pWithCpuMode,

    /// V8: GPU mode without a buffer size.
    #[error(
        "nixl_buffer_size is required when nixl_buffer_device={device:?} (GPU staging buffer, in bytes)"
    )]
    MissingBufferSize {
        /// The device configured.
        device: String,
    },

    /// V9: the deprecated hugepage key contradicts the current one.
    #[error(
        "Conflicting hugepage settings: extra_config.nixl_use_hugepages={deprecated} vs \
         local_cpu_use_hugepages={current}. extra_config.nixl_use_hugepages is deprecated; remove \
         it and set local_cpu_use_hugepages only."
    )]
    HugepageConflict {
        /// `extra_config.nixl_use_hugepages`.
        deprecated: bool,
        /// `local_cpu_use_hugepages`.
        current: bool,
    },

    /// V12 (and V17): `save_unfull_chunk` in dynamic mode.
    #[error(
        "save_unfull_chunk should be set to False when using dynamic storage (nixl_pool_size: 0){}",
        forced_by.map(|k| format!("; it was forced on by {k}, which cannot be combined with dynamic NIXL storage")).unwrap_or_default()
    )]
    UnfullChunkInDynamicMode {
        /// The key that forced `save_unfull_chunk` on (`enable_blending`, `enable_pd`), if any.
        forced_by: Option<&'static str>,
    },

    /// V13: a backend used with a device it does not support.
    #[error(
        "Invalid NIXL backend & device combination: {backend} does not support nixl_buffer_device={device:?} (allowed: {allowed})"
    )]
    BackendDeviceMismatch {
        /// The backend.
        backend: String,
        /// The device.
        device: String,
        /// The devices the backend accepts.
        allowed: &'static str,
    },

    /// V14: a file backend without a path.
    #[error("nixl_path must be provided for {backend} backend")]
    MissingPath {
        /// The backend.
        backend: String,
    },

    /// V15: several paths in dynamic mode.
    #[error(
        "dynamic mode (nixl_pool_size=0) does not support multiple nixl_path entries; provide a \
         single path string. Path sharding across multiple paths is only available for static pools."
    )]
    MultiplePathsInDynamicMode,

    /// V16: NIXL CPU mode in the scheduler role.
    #[error(
        "nixl_buffer_device='cpu' is not supported in the scheduler role: the shared LocalCPUBackend \
         pool is not created for the scheduler. Use nixl_buffer_device='cuda', or disable \
         enable_scheduler_bypass_lookup."
    )]
    CpuModeInSchedulerRole,

    /// `nixl_endpoint_list` is present but empty.
    #[error("nixl_endpoint_list is set but empty")]
    EmptyEndpointList,

    /// An endpoint is not an http(s) URL.
    #[error(
        "nixl_endpoint_list entry {endpoint:?} is not a valid URL (must start with 'http://' or 'https://')"
    )]
    InvalidEndpoint {
        /// The entry.
        endpoint: String,
    },

    /// `nixl_sync_mode` names no NIXL thread-sync mode.
    #[error(
        "Invalid nixl_sync_mode {mode:?}. Valid values are the suffixes of NIXL_THREAD_SYNC_*: NONE, STRICT, RW, DEFAULT"
    )]
    InvalidSyncMode {
        /// The value given.
        mode: String,
    },

    /// A storage key of the engine configuration has a value this store cannot honour.
    #[error("{key}: {message}")]
    InvalidSetting {
        /// The key, as the user wrote it (`extra_config.nixl_max_capacity_gb`, `cache_policy`).
        key: String,
        /// What is wrong and what is accepted.
        message: String,
    },

    /// `nixl_path_sharding` is not `by_gpu`.
    #[error("Unsupported path sharding strategy {strategy:?}. Supported: by_gpu")]
    InvalidPathSharding {
        /// The value given.
        strategy: String,
    },

    /// `nixl_path` is empty.
    #[error("nixl_path: at least one path must be provided")]
    EmptyPath,

    /// The same key was given under its deprecated and its current name, with different values.
    #[error(
        "{deprecated} is a deprecated name of {current}, and both are set to different values; keep {current} only"
    )]
    AliasConflict {
        /// The deprecated name.
        deprecated: String,
        /// The current name.
        current: String,
    },

    /// A `--l2-adapter` value is not JSON.
    #[error("Invalid JSON for --l2-adapter #{index}: {message}")]
    AdapterJson {
        /// Position of the flag (0-based, as the reference counts).
        index: usize,
        /// The parser's message (line and column).
        message: String,
    },

    /// A `--l2-adapter` value is not a JSON object.
    #[error("--l2-adapter #{index}: expected a JSON object, got {found}")]
    AdapterNotObject {
        /// Position of the flag.
        index: usize,
        /// The JSON type found.
        found: &'static str,
    },

    /// A `--l2-adapter` object without `type`.
    #[error("--l2-adapter #{index}: missing 'type' field")]
    AdapterMissingType {
        /// Position of the flag.
        index: usize,
    },

    /// A `--l2-adapter` of an unregistered type.
    #[error("--l2-adapter #{index}: unknown adapter type {type_name:?}. Known: {known}")]
    UnknownAdapterType {
        /// Position of the flag.
        index: usize,
        /// The type given.
        type_name: String,
        /// The registered types.
        known: String,
    },

    /// A field of a `--l2-adapter` object is missing or wrong.
    #[error("--l2-adapter #{index} ({type_name:?}): {key}: {message}")]
    AdapterField {
        /// Position of the flag.
        index: usize,
        /// The adapter type.
        type_name: String,
        /// The key at fault (dotted path).
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// An adapter type was registered twice.
    #[error("L2 adapter type already registered: {0}")]
    DuplicateAdapterType(String),

    /// `file_size` is not a whole number of pages.
    #[error("file_size ({file_size}) must be a multiple of page_size ({page_size})")]
    FileSizeNotPageMultiple {
        /// `backend_params.file_size`.
        file_size: u64,
        /// The L1 page size.
        page_size: u64,
    },

    /// A transfer-channel key is missing or wrong.
    #[error("{key}: {message}")]
    Channel {
        /// The key at fault.
        key: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A SGLang HiCache setting is wrong.
    #[error("{variable}: {message}")]
    HiCache {
        /// The environment variable or setting.
        variable: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn list(errors: &[Error]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    /// Wraps a list of errors: none → `Ok`, one → that error, more → [`Error::Multiple`].
    pub(crate) fn from_list(mut errors: Vec<Error>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Multiple(errors)),
        }
    }

    /// Every individual error, with [`Error::Multiple`] flattened.
    pub fn violations(&self) -> Vec<&Error> {
        match self {
            Error::Multiple(errors) => errors.iter().flat_map(Error::violations).collect(),
            other => vec![other],
        }
    }
}

impl From<figment::Error> for Error {
    fn from(err: figment::Error) -> Self {
        Error::Parse(Box::new(err))
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Something accepted but worth a person's attention: deprecated names, ignored keys, rounding.
/// Every warning is also logged with `tracing` when produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// A key that no definition knows; it is ignored.
    UnknownKey {
        /// The key.
        key: String,
        /// Where it came from (file, environment, overrides).
        source: String,
    },
    /// A deprecated key, applied under its current name.
    Deprecated {
        /// The old name.
        deprecated: String,
        /// The current name.
        current: String,
    },
    /// An environment variable whose value could not be converted; the previous value stays.
    UnparsableEnv {
        /// The variable.
        variable: String,
        /// The expected type.
        expected: &'static str,
    },
    /// Anything else, in words.
    Note(String),
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::UnknownKey { key, source } => {
                write!(
                    f,
                    "Unknown configuration key: {key} (source: {source}); ignored"
                )
            }
            Warning::Deprecated {
                deprecated,
                current,
            } => write!(
                f,
                "{deprecated} is deprecated; use {current} (value applied to {current})"
            ),
            Warning::UnparsableEnv { variable, expected } => {
                write!(
                    f,
                    "Failed to parse {variable} as {expected}; keeping the previous value"
                )
            }
            Warning::Note(text) => f.write_str(text),
        }
    }
}

/// Collects warnings and logs each one as it is added.
#[derive(Debug, Default)]
pub(crate) struct Warnings(pub(crate) Vec<Warning>);

impl Warnings {
    pub(crate) fn push(&mut self, warning: Warning) {
        tracing::warn!("{warning}");
        self.0.push(warning);
    }

    pub(crate) fn note(&mut self, text: impl Into<String>) {
        self.push(Warning::Note(text.into()));
    }
}
