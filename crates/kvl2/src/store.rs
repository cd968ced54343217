//! Opening the store a command works on: `--config` (LMCache YAML), `--l2-adapter` (JSON) or
//! `--dir` (the embedded default: a dynamic POSIX store in that folder).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use kv_config::{ConfigLoader, Deployment, Layout, StorageKind};
use kv_l2_adapter::{CacheEngineKey, ChunkKey, Engine, L2Adapter, PageKey, Store, StoreBuilder};
use nixl_core::Transport;
use nixl_file::{FileKey, SegmentConfig, SegmentStore, UringConfig, UringTransport};
use pinned_alloc::PagePool;

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
    /// Engine for file storage: auto (NIXL if built with feature `nixl` and installed, else native io_uring), nixl, uring.
    #[arg(long, default_value = "auto")]
    pub(crate) engine: String,
    /// Largest chunk, in bytes (the page size of the staging pool).
    #[arg(long, default_value_t = 32 << 20)]
    pub(crate) chunk_bytes: usize,
    /// Global worker (rank) id: picks the folder of `by_gpu` sharding and the GPU of `cuda`.
    #[arg(long, default_value_t = 0)]
    pub(crate) worker_id: u32,
    /// Worker id on this node, picking the endpoint of `nixl_endpoint_list` (default: --worker-id).
    #[arg(long, value_name = "ID")]
    pub(crate) local_worker_id: Option<u32>,
    /// The GPU this worker drives, when it is not its worker id.
    #[arg(long, value_name = "ID")]
    pub(crate) gpu: Option<u32>,
}

pub(crate) struct Opened {
    pub(crate) adapter: Arc<dyn L2Adapter>,
    pub(crate) pool: Arc<PagePool>,
    /// The folder of a file-based dynamic store, for listing.
    pub(crate) folder: Option<PathBuf>,
    /// The folders of a segment store (`layout: segments`), for listing.
    segments: Option<Vec<PathBuf>>,
    /// The spec of a dynamic object store, for listing its bucket.
    objects: Option<kv_config::StorageSpec>,
    /// Whether the store keeps its chunks when it closes (`persist_enabled`).
    pub(crate) persists: bool,
    /// The running store (its eviction controller among it), kept for as long as the command runs.
    _store: Store,
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

/// The `--l2-adapter` JSON of the embedded default store in `dir`: segments (the default
/// layout) holding at most what the disk has room for now, beside the segments `worker_id`
/// already has there (not rounded to whole GiB, which could fall below them).
pub(crate) fn default_adapter_json(dir: &std::path::Path, worker_id: u32) -> String {
    let folder = if worker_id == 0 {
        dir.to_path_buf()
    } else {
        dir.join(format!("worker-{worker_id}"))
    };
    let room_gb =
        nixl_file::segment_room(&[folder]).map_or(1.0, |bytes| bytes as f64 / (1u64 << 30) as f64);
    serde_json::json!({
        "type": "nixl_store_dynamic",
        "backend": "POSIX",
        "backend_params": {
            "file_path": dir.display().to_string(),
            "use_direct_io": "true",
            "max_capacity_gb": room_gb.to_string(),
        },
    })
    .to_string()
}

/// A spinner with `message` on standard error while long work runs; drawn only when standard
/// error is a terminal (indicatif hides it otherwise).
pub(crate) fn working(message: &'static str) -> indicatif::ProgressBar {
    let spinner = indicatif::ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner
}

/// What a command does to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads or lists only: storage opens read-only (a segment store beside a live writer) and
    /// configured eviction does not run, so opening deletes nothing.
    Read,
    /// Writes: configured eviction runs.
    Write,
}

impl StoreArgs {
    /// Opens the store through the public builder, with a staging pool of `pages` pages where
    /// the configuration does not size it (an LMCache CPU-mode pool is `max_local_cpu_size`).
    pub(crate) fn open(&self, pages: usize, access: Access) -> CliResult<Opened> {
        if self.chunk_bytes == 0 {
            return Err(CliError::usage("--chunk-bytes must be positive"));
        }
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
        let local_worker = self.local_worker_id.unwrap_or(self.worker_id);
        let mut deployment = Deployment::new()
            .with_worker(self.worker_id, local_worker)
            .with_chunk_bytes(self.chunk_bytes as u64);
        if let Some(gpu) = self.gpu {
            deployment = deployment.with_gpu(gpu);
        }
        let builder = if let Some(path) = &self.config {
            let config = ConfigLoader::new()
                .with_file(path)
                .load()
                .map_err(CliError::config)?
                .value;
            StoreBuilder::from_lmcache(config)
        } else {
            let values = match &self.dir {
                Some(dir) => vec![default_adapter_json(dir, self.worker_id)],
                None => self.l2_adapter.clone(),
            };
            StoreBuilder::from_l2_adapters(values)
        };
        let builder = match access {
            Access::Read => builder.read_only(),
            Access::Write => builder,
        };
        // Opening a large store reads every chunk header back: say so while it runs.
        let opening = working("opening the store (indexing what it holds)");
        let store = builder
            .with_deployment(deployment)
            .with_engine(engine(&self.engine)?)
            .with_pool_bytes((pages.max(1) * self.chunk_bytes.next_multiple_of(4096)) as u64)
            .build()
            .map_err(CliError::from_adapter);
        opening.finish_and_clear();
        let store = store?;
        let dynamic_files = store.tiers()[0]
            .spec()
            .filter(|spec| spec.mode == kv_config::Mode::Dynamic && spec.kind == StorageKind::File);
        let in_use =
            |spec: &&kv_config::StorageSpec| kv_l2_adapter::layout_in_use(spec, self.worker_id);
        let segments = dynamic_files
            .filter(|spec| in_use(spec) == Layout::Segments)
            .map(|spec| kv_l2_adapter::segment_folders(spec, self.worker_id));
        let folder = dynamic_files
            .filter(|spec| in_use(spec) == Layout::Files)
            .and_then(|spec| spec.path.clone());
        let objects = store.tiers()[0]
            .spec()
            .filter(|spec| {
                spec.mode == kv_config::Mode::Dynamic && spec.kind == StorageKind::Object
            })
            .cloned();
        Ok(Opened {
            adapter: Arc::clone(store.adapter()),
            pool: Arc::clone(store.pool()),
            folder,
            segments,
            objects,
            persists: store.tiers()[0].spec().is_none_or(|spec| spec.persist),
            _store: store,
        })
    }
}

/// One chunk found in storage, for `ls` and `stat`.
pub(crate) struct Listed {
    pub(crate) key: FileKey,
    pub(crate) bytes: u64,
    /// The file, or the segment, holding it.
    pub(crate) place: String,
}

impl Opened {
    /// Whether this is a dynamic object store, whose bucket [`stored_chunks`] lists.
    ///
    /// [`stored_chunks`]: Opened::stored_chunks
    pub(crate) fn lists_objects(&self) -> bool {
        self.objects.is_some()
    }

    /// The chunks of a dynamic store, read from their headers: on disk (files; segments through
    /// a read-only open beside the store's writer) or in its bucket (objects); `None` for
    /// static pools.
    pub(crate) fn stored_chunks(&self) -> CliResult<Option<Vec<Listed>>> {
        if let Some(spec) = &self.objects {
            return list_objects(spec).map(Some);
        }
        if let Some(folder) = &self.folder {
            let chunks = nixl_file::list_dir(folder).map_err(CliError::storage)?;
            return Ok(Some(
                chunks
                    .into_iter()
                    .map(|c| Listed {
                        key: c.key,
                        bytes: c.payload_len,
                        place: c.path.display().to_string(),
                    })
                    .collect(),
            ));
        }
        let Some(folders) = &self.segments else {
            return Ok(None);
        };
        let transport: Arc<dyn Transport> =
            Arc::new(UringTransport::new(UringConfig::default()).map_err(CliError::storage)?);
        let reader = SegmentStore::open_read_only(transport, SegmentConfig::new(folders.clone()))
            .map_err(CliError::storage)?;
        Ok(Some(
            reader
                .list()
                .into_iter()
                .map(|c| Listed {
                    key: c.key,
                    bytes: c.payload_len,
                    place: format!("segment {}", c.segment),
                })
                .collect(),
        ))
    }
}

/// The chunk objects in the bucket of `spec`, oldest first.
fn list_objects(spec: &kv_config::StorageSpec) -> CliResult<Vec<Listed>> {
    let objects = kv_l2_adapter::list_objects(spec).map_err(CliError::from_adapter)?;
    Ok(objects
        .into_iter()
        .map(|object| Listed {
            key: object.key.file_key().clone(),
            bytes: object.payload_len,
            place: object.place,
        })
        .collect())
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
