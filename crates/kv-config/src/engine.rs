//! LMCache's engine configuration: a YAML file, `LMCACHE_*` environment variables and explicit
//! overrides, merged in that order of priority (later wins) over the defaults.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use figment::providers::{Format, Yaml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result, Warning, Warnings};
use crate::secret::{BackendParams, Secret, scalar_to_string};

/// The environment variable naming the YAML file, read by [`ConfigLoader::with_process_env`].
pub const CONFIG_FILE_VAR: &str = "LMCACHE_CONFIG_FILE";
const ENV_PREFIX: &str = "LMCACHE_";

/// `nixl_path`: one folder, or a list of folders for `by_gpu` sharding (static mode only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NixlPath {
    /// A single string (may hold several comma-separated folders, as LMCache's sharder reads it).
    One(String),
    /// A YAML list.
    Many(Vec<String>),
}

/// The `extra_config` section, where LMCache keeps the NIXL storage settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ExtraConfig {
    /// Turns NIXL storage on.
    pub enable_nixl_storage: bool,
    /// GDS, GDS_MT, POSIX, HF3FS, OBJ, AZURE_BLOB or DOCA_MEMOS.
    pub nixl_backend: Option<String>,
    /// Slots of the static pool; 0 selects dynamic mode.
    pub nixl_pool_size: Option<u64>,
    /// Storage folder(s) for file backends.
    #[serde(deserialize_with = "nixl_path")]
    pub nixl_path: Option<NixlPath>,
    /// How one of several folders is picked: only `by_gpu`.
    pub nixl_path_sharding: String,
    /// Open files with `O_DIRECT`.
    pub use_direct_io: bool,
    /// Plugin parameters (credentials redacted when printed).
    #[serde(deserialize_with = "backend_params")]
    pub nixl_backend_params: BackendParams,
    /// Keep an in-memory set of keys known to exist (dynamic mode).
    pub nixl_presence_cache: bool,
    /// Trust only the presence cache for existence checks (dynamic mode).
    pub nixl_presence_cache_only: bool,
    /// Write in the background (dynamic mode).
    pub nixl_async_put: bool,
    /// S3 endpoints, one chosen per worker (OBJ only).
    pub nixl_endpoint_list: Option<Vec<String>>,
    /// Run NIXL's progress thread.
    pub nixl_enable_prog_thread: bool,
    /// Suffix of `NIXL_THREAD_SYNC_*`: NONE, STRICT, RW, DEFAULT.
    pub nixl_sync_mode: Option<String>,
    /// Deprecated: use `local_cpu_use_hugepages`.
    pub nixl_use_hugepages: Option<bool>,
    /// Capacity of a dynamic store in GiB (ours: LMCache's in-process dynamic mode has none;
    /// the `--l2-adapter` JSON spells it `backend_params.max_capacity_gb`).
    pub nixl_max_capacity_gb: Option<f64>,
    /// Watermark eviction, the `--l2-adapter` `eviction` object (ours: LMCache's in-process
    /// backend has no L2 eviction).
    pub nixl_eviction: Option<serde_json::Value>,
    /// `segments` or `files` for a dynamic store over files (ours; the `--l2-adapter` JSON
    /// spells it `backend_params.layout`).
    pub nixl_layout: Option<String>,
    /// MiB per segment file with `nixl_layout: segments` (ours).
    pub nixl_segment_size_mb: Option<f64>,
}

impl Default for ExtraConfig {
    fn default() -> Self {
        Self {
            enable_nixl_storage: false,
            nixl_backend: None,
            nixl_pool_size: None,
            nixl_path: None,
            nixl_path_sharding: "by_gpu".to_owned(),
            use_direct_io: false,
            nixl_backend_params: BackendParams::new(),
            nixl_presence_cache: false,
            nixl_presence_cache_only: false,
            nixl_async_put: false,
            nixl_endpoint_list: None,
            nixl_enable_prog_thread: true,
            nixl_sync_mode: None,
            nixl_use_hugepages: None,
            nixl_max_capacity_gb: None,
            nixl_eviction: None,
            nixl_layout: None,
            nixl_segment_size_mb: None,
        }
    }
}

/// The LMCache engine keys this crate reads (unknown keys are warned about and ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Tokens per KV chunk.
    pub chunk_size: u32,
    /// Whether LocalCPUBackend serves as a hot cache (it is always the staging pool in CPU mode).
    pub local_cpu: bool,
    /// GiB of the LocalCPUBackend pinned pool, shared with NIXL in CPU mode.
    pub max_local_cpu_size: f64,
    /// Back the pinned pool with 2 MiB hugepages.
    pub local_cpu_use_hugepages: bool,
    /// Store partial last chunks (static mode only).
    pub save_unfull_chunk: bool,
    /// P2P KV sharing.
    pub enable_p2p: bool,
    /// Disaggregated prefill.
    pub enable_pd: bool,
    /// CacheBlend.
    pub enable_blending: bool,
    /// Asynchronous loading.
    pub enable_async_loading: bool,
    /// Static-mode eviction policy (LRU, LFU, FIFO, MRU, …).
    pub cache_policy: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub nixl_buffer_device: Option<String>,
    /// Bytes of the GPU staging buffer (GPU mode only).
    pub nixl_buffer_size: Option<u64>,
    /// Transfer-channel backends (P2P / PD), not storage.
    pub nixl_backends: Option<Vec<String>>,
    /// NIXL receiver port (replaces the deprecated `nixl_peer_port`).
    pub nixl_receiver_port: Option<u16>,
    /// `sender` or `receiver` (prefill or decode).
    pub pd_role: Option<String>,
    /// Bytes of the PD transfer buffer.
    pub pd_buffer_size: Option<u64>,
    /// Device of the PD transfer buffer.
    pub pd_buffer_device: Option<String>,
    /// Host of the PD peer.
    pub pd_peer_host: Option<String>,
    /// The shared secret both ends of the transfer channel prove they hold (ours; also
    /// `LMCACHE_PD_SECRET`). Without one the receiver listens on loopback only.
    pub pd_secret: Option<Secret>,
    /// Initialisation port(s) of the PD peer.
    #[serde(deserialize_with = "ports")]
    pub pd_peer_init_port: Option<Vec<u16>>,
    /// Allocation port(s) of the PD peer.
    #[serde(deserialize_with = "ports")]
    pub pd_peer_alloc_port: Option<Vec<u16>>,
    /// Host of the PD proxy.
    pub pd_proxy_host: Option<String>,
    /// Port of the PD proxy.
    pub pd_proxy_port: Option<u16>,
    /// Transfer channel type: `nixl` or `mock_memory`.
    pub transfer_channel: Option<String>,
    /// Backend-specific settings, NIXL storage among them.
    pub extra_config: ExtraConfig,
    /// Top-level keys set by a file, the environment or an override (not by defaults).
    #[serde(skip)]
    user_set: BTreeSet<String>,
}

impl EngineConfig {
    /// Whether `key` was set by a file, the environment or an override.
    pub fn user_set(&self, key: &str) -> bool {
        self.user_set.contains(key)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            chunk_size: 256,
            local_cpu: true,
            max_local_cpu_size: 5.0,
            local_cpu_use_hugepages: false,
            save_unfull_chunk: false,
            enable_p2p: false,
            enable_pd: false,
            enable_blending: false,
            enable_async_loading: false,
            cache_policy: "LRU".to_owned(),
            nixl_buffer_device: None,
            nixl_buffer_size: None,
            nixl_backends: None,
            nixl_receiver_port: None,
            pd_role: None,
            pd_buffer_size: None,
            pd_buffer_device: None,
            pd_peer_host: None,
            pd_secret: None,
            pd_peer_init_port: None,
            pd_peer_alloc_port: None,
            pd_proxy_host: None,
            pd_proxy_port: None,
            transfer_channel: None,
            extra_config: ExtraConfig::default(),
            user_set: BTreeSet::new(),
        }
    }
}

/// How an environment value is converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Float,
    Str,
    List,
    Json,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Bool => "a boolean (true/false/1/0)",
            Kind::Int => "an integer",
            Kind::Float => "a number",
            Kind::Str => "a string",
            Kind::List => "a list (JSON array or comma-separated)",
            Kind::Json => "a JSON object",
        }
    }
}

/// Every top-level key this crate knows, with its environment conversion.
const KEYS: &[(&str, Kind)] = &[
    ("chunk_size", Kind::Int),
    ("local_cpu", Kind::Bool),
    ("max_local_cpu_size", Kind::Float),
    ("local_cpu_use_hugepages", Kind::Bool),
    ("save_unfull_chunk", Kind::Bool),
    ("enable_p2p", Kind::Bool),
    ("enable_pd", Kind::Bool),
    ("enable_blending", Kind::Bool),
    ("enable_async_loading", Kind::Bool),
    ("cache_policy", Kind::Str),
    ("nixl_buffer_device", Kind::Str),
    ("nixl_buffer_size", Kind::Int),
    ("nixl_backends", Kind::List),
    ("nixl_receiver_port", Kind::Int),
    ("pd_role", Kind::Str),
    ("pd_buffer_size", Kind::Int),
    ("pd_buffer_device", Kind::Str),
    ("pd_peer_host", Kind::Str),
    ("pd_secret", Kind::Str),
    ("pd_peer_init_port", Kind::List),
    ("pd_peer_alloc_port", Kind::List),
    ("pd_proxy_host", Kind::Str),
    ("pd_proxy_port", Kind::Int),
    ("transfer_channel", Kind::Str),
    ("extra_config", Kind::Json),
];

/// Keys of the rest of LMCache's engine configuration: accepted silently, not used here.
const OTHER_LMCACHE_KEYS: &[&str] = &[
    "local_disk",
    "max_local_disk_size",
    "remote_url",
    "remote_serde",
    "use_layerwise",
    "blend_special_str",
    "enable_controller",
    "lmcache_instance_id",
    "controller_pull_url",
    "controller_reply_url",
    "lmcache_worker_ports",
    "p2p_host",
    "p2p_init_ports",
    "p2p_lookup_ports",
    "pd_proxy_port",
    "numa_mode",
    "external_lookup_client",
    "enable_scheduler_bypass_lookup",
    "use_mla",
    "min_retrieve_tokens",
    "save_decode_cache",
    "py_enable_gc",
    "cache_salt",
    "internal_api_server_enabled",
    "internal_api_server_port_start",
    "log_level",
];

/// Deprecated names, applied under their current name with a warning.
///
/// LMCache remaps a key through its alias table only when the key is also on its deprecated
/// list, so `nixl_peer_host` and friends are dropped there as unknown. We accept them instead,
/// because users still have configs with those names and silently losing a peer address is
/// worse than a warning. `nixl_buffer_size` is deliberately *not* remapped to `pd_buffer_size`:
/// it is a live storage key with its own meaning, exactly as LMCache ends up treating it.
const ALIASES: &[(&str, &str)] = &[
    ("nixl_peer_host", "pd_peer_host"),
    ("nixl_peer_init_port", "pd_peer_init_port"),
    ("nixl_peer_alloc_port", "pd_peer_alloc_port"),
    ("nixl_proxy_host", "pd_proxy_host"),
    ("nixl_proxy_port", "pd_proxy_port"),
    ("nixl_role", "pd_role"),
    ("nixl_peer_port", "nixl_receiver_port"),
    ("enable_xpyd", "enable_pd"),
];

fn kind_of(key: &str) -> Option<Kind> {
    KEYS.iter().find(|(k, _)| *k == key).map(|&(_, kind)| kind)
}

/// A loaded value together with the warnings met while loading it.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    /// The value.
    pub value: T,
    /// Deprecated or unknown keys, ignored values, rounding.
    pub warnings: Vec<Warning>,
}

/// One layer of configuration as a figment provider, named for error messages.
struct Layer {
    name: String,
    source: Option<Source>,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let metadata = Metadata::named(self.name.clone());
        match &self.source {
            Some(source) => metadata.source(source.clone()),
            None => metadata,
        }
    }

    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Builds the engine configuration from its layers.
#[derive(Debug, Clone, Default)]
pub struct ConfigLoader {
    file: Option<PathBuf>,
    yaml: Option<(String, String)>,
    env: Vec<(String, String)>,
    overrides: BTreeMap<String, serde_json::Value>,
}

impl ConfigLoader {
    /// No file, no environment, no overrides: the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads this YAML file (an empty file is an empty configuration).
    pub fn with_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Reads YAML text in place of a file; `name` stands for the file in messages.
    pub fn with_yaml(mut self, name: impl Into<String>, text: impl Into<String>) -> Self {
        self.yaml = Some((name.into(), text.into()));
        self
    }

    /// Uses these `(name, value)` pairs as the environment; only `LMCACHE_<KEY>` names of known
    /// keys are read.
    pub fn with_env<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Uses the process environment, and takes the file from `LMCACHE_CONFIG_FILE` unless one
    /// was given.
    pub fn with_process_env(mut self) -> Self {
        if self.file.is_none() {
            self.file = std::env::var_os(CONFIG_FILE_VAR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from);
        }
        self.with_env(std::env::vars())
    }

    /// Sets one key last, over file and environment.
    pub fn with_override(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.overrides.insert(key.into(), value);
        self
    }

    fn file_layer(path: &Path, warnings: &mut Warnings) -> Result<Layer> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        let mut layer = Self::yaml_layer(&path.display().to_string(), &text, warnings)?;
        layer.source = Some(Source::File(path.to_path_buf()));
        Ok(layer)
    }

    fn yaml_layer(name: &str, text: &str, warnings: &mut Warnings) -> Result<Layer> {
        let mut dict = if text.trim().is_empty() {
            Dict::new()
        } else {
            let mut data = Yaml::string(text)
                .data()
                .map_err(|e| figment::Error::from(format!("{name}: {e}")))?;
            data.remove(&Profile::Default).unwrap_or_default()
        };
        let name = format!("YAML file {name}");
        normalise_layer(&mut dict, &name, warnings)?;
        Ok(Layer {
            name,
            source: None,
            dict,
        })
    }

    fn env_layer(&self, warnings: &mut Warnings) -> Result<Layer> {
        let mut dict = Dict::new();
        let aliases = ALIASES.iter().map(|&(old, new)| (old, kind_of(new)));
        let known = KEYS.iter().map(|&(k, kind)| (k, Some(kind)));
        for (key, kind) in known.chain(aliases) {
            let variable = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase());
            let Some((_, raw)) = self.env.iter().rev().find(|(name, _)| *name == variable) else {
                continue;
            };
            let Some(kind) = kind else { continue };
            match convert_env(raw, kind) {
                Some(value) => {
                    dict.insert(key.to_owned(), value);
                }
                None => warnings.push(Warning::UnparsableEnv {
                    variable,
                    expected: kind.name(),
                }),
            }
        }
        let name = "environment (LMCACHE_*)".to_owned();
        normalise_layer(&mut dict, &name, warnings)?;
        Ok(Layer {
            name,
            source: None,
            dict,
        })
    }

    fn override_layer(&self, warnings: &mut Warnings) -> Result<Layer> {
        let mut dict = Dict::new();
        for (key, value) in &self.overrides {
            let value = Value::serialize(value)
                .map_err(|e| figment::Error::from(format!("override {key}: {e}")))?;
            dict.insert(key.clone(), value);
        }
        let name = "overrides".to_owned();
        normalise_layer(&mut dict, &name, warnings)?;
        Ok(Layer {
            name,
            source: None,
            dict,
        })
    }

    /// File, environment and overrides, in that order; `extra_config` given by a later layer
    /// replaces the whole dictionary of earlier ones, as LMCache does.
    fn layers(&self, warnings: &mut Warnings) -> Result<Vec<Layer>> {
        let mut layers = Vec::new();
        if let Some(path) = &self.file {
            layers.push(Self::file_layer(path, warnings)?);
        }
        if let Some((name, text)) = &self.yaml {
            layers.push(Self::yaml_layer(name, text, warnings)?);
        }
        layers.push(self.env_layer(warnings)?);
        layers.push(self.override_layer(warnings)?);
        if let Some(last) = layers
            .iter()
            .rposition(|layer| layer.dict.contains_key("extra_config"))
        {
            for layer in &mut layers[..last] {
                layer.dict.remove("extra_config");
            }
        }
        Ok(layers)
    }

    /// The merged layers over the defaults, each later layer winning.
    pub fn figment(&self) -> Result<Loaded<Figment>> {
        let mut warnings = Warnings::default();
        let layers = self.layers(&mut warnings)?;
        Ok(Loaded {
            value: layers.into_iter().fold(Figment::new(), Figment::merge),
            warnings: warnings.0,
        })
    }

    /// Loads and type-checks the configuration. Rule validation happens when a spec is built
    /// from it ([`EngineConfig::storage_spec`]).
    pub fn load(&self) -> Result<Loaded<EngineConfig>> {
        let mut warnings = Warnings::default();
        let layers = self.layers(&mut warnings)?;
        let user_set = layers
            .iter()
            .flat_map(|layer| layer.dict.keys().cloned())
            .collect();
        let figment = layers.into_iter().fold(Figment::new(), Figment::merge);
        let mut config: EngineConfig = figment.extract()?;
        config.user_set = user_set;
        Ok(Loaded {
            value: config,
            warnings: warnings.0,
        })
    }
}

/// Renames deprecated keys (conflicts are errors) and warns about unknown ones.
fn normalise_layer(dict: &mut Dict, source: &str, warnings: &mut Warnings) -> Result<()> {
    let mut errors = Vec::new();
    for &(old, new) in ALIASES {
        let Some(value) = dict.remove(old) else {
            continue;
        };
        match dict.get(new) {
            Some(current) if current != &value => errors.push(Error::AliasConflict {
                deprecated: old.to_owned(),
                current: new.to_owned(),
            }),
            _ => {
                warnings.push(Warning::Deprecated {
                    deprecated: old.to_owned(),
                    current: new.to_owned(),
                });
                dict.insert(new.to_owned(), value);
            }
        }
    }
    let unknown: Vec<String> = dict
        .keys()
        .filter(|k| kind_of(k).is_none() && !OTHER_LMCACHE_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    for key in unknown {
        dict.remove(&key);
        warnings.push(Warning::UnknownKey {
            key,
            source: source.to_owned(),
        });
    }
    // Other LMCache backends keep their settings in extra_config too; a `nixl` key this crate
    // does not know is a typo or an old spelling (`nixl_file_pool_size`), never silently ignored.
    if let Some(Value::Dict(_, extra)) = dict.get("extra_config") {
        for key in extra.keys() {
            if key.starts_with("nixl") && !EXTRA_CONFIG_KEYS.contains(&key.as_str()) {
                warnings.push(Warning::UnknownKey {
                    key: format!("extra_config.{key}"),
                    source: source.to_owned(),
                });
            }
        }
    }
    Error::from_list(errors)
}

/// The `extra_config` keys [`ExtraConfig`] reads.
const EXTRA_CONFIG_KEYS: &[&str] = &[
    "enable_nixl_storage",
    "nixl_backend",
    "nixl_pool_size",
    "nixl_path",
    "nixl_path_sharding",
    "use_direct_io",
    "nixl_backend_params",
    "nixl_presence_cache",
    "nixl_presence_cache_only",
    "nixl_async_put",
    "nixl_endpoint_list",
    "nixl_enable_prog_thread",
    "nixl_sync_mode",
    "nixl_use_hugepages",
    "nixl_max_capacity_gb",
    "nixl_eviction",
    "nixl_layout",
    "nixl_segment_size_mb",
];

/// Strips surrounding white space and one layer of matching quotes.
fn unquote(raw: &str) -> &str {
    let trimmed = raw.trim();
    for quote in ['"', '\''] {
        if let Some(inner) = trimmed
            .strip_prefix(quote)
            .and_then(|s| s.strip_suffix(quote))
        {
            return inner.trim();
        }
    }
    trimmed
}

fn convert_env(raw: &str, kind: Kind) -> Option<Value> {
    let text = unquote(raw);
    match kind {
        Kind::Bool => match text.to_ascii_lowercase().as_str() {
            "true" | "1" => Some(Value::from(true)),
            "false" | "0" => Some(Value::from(false)),
            _ => None,
        },
        Kind::Int => text.parse::<i64>().ok().map(Value::from),
        Kind::Float => text.parse::<f64>().ok().map(Value::from),
        Kind::Str => Some(Value::from(text.to_owned())),
        Kind::List => {
            if text.starts_with('[') {
                let list: serde_json::Value = serde_json::from_str(text).ok()?;
                list.is_array().then(|| Value::serialize(&list).ok())?
            } else {
                let items: Vec<Value> = text
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| match s.parse::<i64>() {
                        Ok(n) => Value::from(n),
                        Err(_) => Value::from(s.to_owned()),
                    })
                    .collect();
                Some(Value::from(items))
            }
        }
        Kind::Json => {
            let object: serde_json::Value = serde_json::from_str(text).ok()?;
            object.is_object().then(|| Value::serialize(&object).ok())?
        }
    }
}

fn nixl_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NixlPath>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(NixlPath::One(s))),
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                serde_json::Value::String(s) => Ok(s),
                other => Err(serde::de::Error::custom(format!(
                    "expected a folder path (string) in the nixl_path list, found {other}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|list| Some(NixlPath::Many(list))),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected a folder path or a list of folder paths, found {other}"
        ))),
    }
}

fn backend_params<'de, D: Deserializer<'de>>(d: D) -> Result<BackendParams, D::Error> {
    let map = Option::<BTreeMap<String, serde_json::Value>>::deserialize(d)?.unwrap_or_default();
    let mut params = BackendParams::new();
    for (key, value) in map {
        let text = scalar_to_string(&value).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "nixl_backend_params.{key}: expected a string, number or boolean, found {value}"
            ))
        })?;
        params.insert(key, text);
    }
    Ok(params)
}

fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u16>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u16),
        Many(Vec<u16>),
    }
    let parsed = Option::<serde_json::Value>::deserialize(d)?;
    match parsed {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => match serde_json::from_value::<OneOrMany>(value.clone()) {
            Ok(OneOrMany::One(port)) => Ok(Some(vec![port])),
            Ok(OneOrMany::Many(ports)) => Ok(Some(ports)),
            Err(_) => Err(serde::de::Error::custom(format!(
                "expected a port (0-65535) or a list of ports, found {value}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_unquoted_and_converted() {
        assert_eq!(unquote("  'abc' "), "abc");
        assert_eq!(unquote("\"x\""), "x");
        assert_eq!(unquote("'mismatched\""), "'mismatched\"");
        assert_eq!(convert_env("1", Kind::Bool), Some(Value::from(true)));
        assert_eq!(convert_env("TRUE", Kind::Bool), Some(Value::from(true)));
        assert_eq!(convert_env("yes", Kind::Bool), None);
        assert_eq!(convert_env("'512'", Kind::Int), Some(Value::from(512i64)));
        assert_eq!(convert_env("abc", Kind::Int), None);
        assert_eq!(
            convert_env("[1, 2]", Kind::Json),
            None,
            "extra_config must be an object"
        );
    }
}
