//! Opening the store a command works on: `--config` (LMCache YAML), `--l2-adapter` (JSON) or
//! `--dir` (the embedded default: a dynamic POSIX store in that folder).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use kv_config::{ConfigLoader, Deployment};
use kv_l2_adapter::{
    AdapterContext, AdapterFactory, CacheEngineKey, ChunkKey, Engine, L2Adapter, PageKey,
    build_storage,
};
use pinned_alloc::{PagePool, PoolConfig};

use crate::exit::{CliError, CliResult};

/// Where the store is and how to reach it.
#[derive(Debug, Args, Clone)]
pub(crate) struct StoreArgs {
    /// An LMCache configuration file (YAML with extra_config.enable_nixl_storage).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// An --l2-adapter JSON object (nixl_store or nixl_store_dynamic); the first is used.
    #[arg(long = "l2-adapter", value_name = "JSON")]
    pub(crate) l2_adapter: Vec<String>,
    /// The embedded default: a dynamic POSIX store in this folder.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// Engine for file storage: auto (NIXL if installed, else native io_uring), nixl, uring.
    #[arg(long, default_value = "auto")]
    pub(crate) engine: String,
    /// Largest chunk, in bytes (the page size of the staging pool).
    #[arg(long, default_value_t = 32 << 20)]
    pub(crate) chunk_bytes: usize,
}

pub(crate) struct Opened {
    pub(crate) adapter: Arc<dyn L2Adapter>,
    pub(crate) pool: Arc<PagePool>,
    /// The folder of a file-based dynamic store, for listing.
    pub(crate) folder: Option<PathBuf>,
}

fn engine(name: &str) -> CliResult<Engine> {
    match name {
        "auto" => Ok(Engine::Auto),
        "nixl" => Ok(Engine::Nixl),
        "uring" | "native" => Ok(Engine::Native),
        other => Err(CliError::usage(format!(
            "unknown engine {other:?}: use auto, nixl or uring"
        ))),
    }
}

/// The `--l2-adapter` JSON of the embedded default store in `dir`.
pub(crate) fn default_adapter_json(dir: &std::path::Path) -> String {
    serde_json::json!({
        "type": "nixl_store_dynamic",
        "backend": "POSIX",
        "backend_params": {
            "file_path": dir.display().to_string(),
            "use_direct_io": "true",
            "max_capacity_gb": "1024",
        },
    })
    .to_string()
}

impl StoreArgs {
    /// Opens the store with a staging pool of `pages` pages.
    pub(crate) fn open(&self, pages: usize) -> CliResult<Opened> {
        if self.chunk_bytes == 0 {
            return Err(CliError::usage("--chunk-bytes must be positive"));
        }
        let pool = PoolConfig::new(
            self.chunk_bytes,
            (pages.max(1) * self.chunk_bytes.next_multiple_of(4096)) as u64,
        )
        .build()
        .map_err(CliError::storage)?;
        let context = AdapterContext::new(Arc::clone(&pool)).with_engine(engine(&self.engine)?);
        let given = [
            self.config.is_some(),
            !self.l2_adapter.is_empty(),
            self.dir.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            return Err(CliError::usage(
                "name the store with exactly one of --config FILE, --l2-adapter JSON or --dir DIR",
            ));
        }
        if let Some(path) = &self.config {
            let engine = ConfigLoader::new()
                .with_file(path)
                .load()
                .map_err(CliError::config)?
                .value;
            let spec = engine
                .storage_spec(&Deployment::new())
                .map_err(CliError::config)?
                .value;
            let folder = (spec.mode == kv_config::Mode::Dynamic)
                .then(|| spec.path.clone())
                .flatten();
            let adapter = build_storage(&spec, &context).map_err(CliError::from_adapter)?;
            return Ok(Opened {
                adapter,
                pool,
                folder,
            });
        }
        let json = match &self.dir {
            Some(dir) => default_adapter_json(dir),
            None => self.l2_adapter[0].clone(),
        };
        let spec = kv_config::AdapterRegistry::new()
            .parse(&[json.as_str()])
            .map_err(CliError::config)?
            .value
            .remove(0);
        let folder = spec
            .storage
            .as_ref()
            .filter(|s| s.mode == kv_config::Mode::Dynamic)
            .and_then(|s| s.path.clone());
        let mut built = AdapterFactory::new()
            .build(&[json], &context)
            .map_err(CliError::from_adapter)?;
        Ok(Opened {
            adapter: built.remove(0).1,
            pool,
            folder,
        })
    }
}

/// A key on the command line: LMCache's canonical `model@ws@worker@hash_hex@dtype[@k%v]`, or
/// any other string as an SGLang-style page key of model `kvl2`.
pub(crate) fn parse_key(text: &str) -> CliResult<ChunkKey> {
    if text.is_empty() {
        return Err(CliError::usage("a key cannot be empty"));
    }
    let key = match text.parse::<CacheEngineKey>() {
        Ok(key) => ChunkKey::from(&key),
        Err(_) => ChunkKey::from(&PageKey {
            key: text.to_owned(),
            model: "kvl2".to_owned(),
            tp_rank: 0,
            tp_size: 1,
        }),
    };
    key.file_key()
        .validate()
        .map_err(|e| CliError::usage(format!("key {text:?}: {e}")))?;
    Ok(key)
}
