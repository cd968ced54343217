//! The `--l2-adapter` JSON form: one JSON object per flag, in order, each with a `type`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::backend::{Backend, StorageKind};
use crate::engine::Loaded;
use crate::error::{Error, Result, Warnings};
use crate::secret::{BackendParams, is_secret_key, scalar_to_string};
use crate::spec::{EvictionPolicy, EvictionSpec, Layout, Mode, StorageSpec};

/// The static-pool adapter type.
pub const NIXL_STORE: &str = "nixl_store";
/// The dynamic per-key adapter type.
pub const NIXL_STORE_DYNAMIC: &str = "nixl_store_dynamic";

const L2_BACKENDS: [Backend; 6] = [
    Backend::Gds,
    Backend::GdsMt,
    Backend::Posix,
    Backend::Hf3fs,
    Backend::Obj,
    Backend::AzureBlob,
];
const COMMON_KEYS: &[&str] = &["type", "shared", "eviction", "persist_enabled", "serde"];
const NIXL_KEYS: &[&str] = &["backend", "backend_params", "pool_size"];
/// `backend_params` entries this crate consumes; the rest go to the NIXL plugin.
const OWN_PARAMS: &[&str] = &[
    "file_path",
    "use_direct_io",
    "file_size",
    "max_capacity_gb",
    "shard_dirs",
    "durable",
    "layout",
    "segment_size_mb",
];

/// Checks the JSON object of a downstream adapter type; returns what is wrong, in words.
pub type AdapterValidator = fn(&Map<String, Value>) -> std::result::Result<(), String>;

#[derive(Clone, Copy)]
enum AdapterType {
    NixlStore,
    NixlStoreDynamic,
    Custom(AdapterValidator),
}

/// The adapter types `--l2-adapter` accepts: the two NIXL types, plus any registered by
/// downstream crates.
#[derive(Clone)]
pub struct AdapterRegistry {
    types: BTreeMap<String, AdapterType>,
}

impl fmt::Debug for AdapterRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdapterRegistry")
            .field("types", &self.known())
            .finish()
    }
}

impl Default for AdapterRegistry {
    fn default() -> Self {
        Self::new()
    }
}

/// An adapter's own JSON, kept for downstream types (credentials redacted when printed).
#[derive(Clone, PartialEq, Default)]
pub struct AdapterParams(Map<String, Value>);

impl AdapterParams {
    /// The real JSON object, credentials included.
    pub fn expose(&self) -> &Map<String, Value> {
        &self.0
    }

    fn redacted(&self) -> Value {
        fn redact(value: &Value) -> Value {
            match value {
                Value::Object(map) => Value::Object(
                    map.iter()
                        .map(|(k, v)| {
                            let shown = if is_secret_key(k) && !v.is_object() {
                                Value::from("<redacted>")
                            } else {
                                redact(v)
                            };
                            (k.clone(), shown)
                        })
                        .collect(),
                ),
                Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
                other => other.clone(),
            }
        }
        redact(&Value::Object(self.0.clone()))
    }
}

impl fmt::Debug for AdapterParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl Serialize for AdapterParams {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(serializer)
    }
}

/// One `--l2-adapter`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct AdapterSpec {
    /// Position among the `--l2-adapter` flags.
    pub index: usize,
    /// The adapter type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Shared between instances.
    pub shared: bool,
    /// Watermark eviction; `None` means this adapter is never evicted from.
    pub eviction: Option<EvictionSpec>,
    /// Keep data on close.
    pub persist_enabled: bool,
    /// The normalised storage spec, for the NIXL types.
    pub storage: Option<StorageSpec>,
    /// The adapter's whole JSON object.
    pub params: AdapterParams,
}

struct Ctx<'a> {
    index: usize,
    type_name: &'a str,
    errors: Vec<Error>,
}

impl Ctx<'_> {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(Error::AdapterField {
            index: self.index,
            type_name: self.type_name.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        });
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn bool_field(ctx: &mut Ctx<'_>, obj: &Map<String, Value>, key: &str, default: bool) -> bool {
    match obj.get(key) {
        None => default,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            ctx.fail(key, format!("expected true or false, got {other}"));
            default
        }
    }
}

/// A `"true"`/`"false"` string parameter (booleans accepted too).
fn flag_param(ctx: &mut Ctx<'_>, params: &Map<String, Value>, key: &str) -> Option<bool> {
    let value = params.get(key)?;
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        other => {
            ctx.fail(
                &format!("backend_params.{key}"),
                format!("expected \"true\" or \"false\", got {other}"),
            );
            None
        }
    }
}

fn number_param(ctx: &mut Ctx<'_>, params: &Map<String, Value>, key: &str) -> Option<f64> {
    let value = params.get(key)?;
    let parsed = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    if parsed.is_none() {
        ctx.fail(
            &format!("backend_params.{key}"),
            format!("expected a number, got {value}"),
        );
    }
    parsed.filter(|n| n.is_finite())
}

fn eviction(ctx: &mut Ctx<'_>, obj: &Map<String, Value>) -> Option<EvictionSpec> {
    let value = obj.get("eviction")?;
    parse_eviction(value, "eviction", &mut |key, message| {
        ctx.fail(&key, message)
    })
}

/// An eviction object (`eviction_policy`, `trigger_watermark`, `eviction_ratio`) as LMCache's
/// `EvictionConfig` reads it; each problem goes to `fail` with its key under `prefix`.
pub(crate) fn parse_eviction(
    value: &Value,
    prefix: &str,
    fail: &mut dyn FnMut(String, String),
) -> Option<EvictionSpec> {
    let Value::Object(eviction) = value else {
        fail(
            prefix.to_owned(),
            format!("expected an object, got {}", json_type(value)),
        );
        return None;
    };
    let policy = match eviction.get("eviction_policy").and_then(Value::as_str) {
        Some("LRU") => Some(EvictionPolicy::Lru),
        Some("IsolatedLRU") => Some(EvictionPolicy::IsolatedLru),
        Some("noop") => Some(EvictionPolicy::Noop),
        _ => {
            fail(
                format!("{prefix}.eviction_policy"),
                format!(
                    "{prefix}.eviction_policy must be 'LRU', 'IsolatedLRU', or 'noop', got {}",
                    eviction.get("eviction_policy").unwrap_or(&Value::Null)
                ),
            );
            None
        }
    };
    let mut fraction = |key: &str, default: f64, min_exclusive: bool| -> f64 {
        match eviction.get(key) {
            None => default,
            Some(value) => match value.as_f64() {
                Some(v) if (if min_exclusive { v > 0.0 } else { v >= 0.0 }) && v <= 1.0 => v,
                _ => {
                    let range = if min_exclusive { "(0, 1]" } else { "[0, 1]" };
                    fail(
                        format!("{prefix}.{key}"),
                        format!("must be a number in {range}, got {value}"),
                    );
                    default
                }
            },
        }
    };
    let trigger_watermark = fraction("trigger_watermark", 0.8, true);
    let eviction_ratio = fraction("eviction_ratio", 0.2, false);
    policy.map(|policy| EvictionSpec {
        policy,
        trigger_watermark,
        eviction_ratio,
    })
}

/// The layout of a dynamic store over files, its segment size, and whether the configuration
/// named the layout; `fail` gets each problem with the key (`layout`, `segment_size_mb`,
/// `shard_dirs`). Segments serve POSIX, GDS and GDS_MT, and are their default; HF3FS is a
/// shared file system, and a store `shared` between instances has several writers per folder:
/// there one file per key is the layout.
pub(crate) fn layout_rules(
    backend: Option<Backend>,
    mode: Mode,
    layout: Option<Layout>,
    segment_mb: Option<f64>,
    shard_dirs: bool,
    shared: bool,
    fail: &mut dyn FnMut(&str, String),
) -> Option<(Layout, Option<u64>, bool)> {
    let backend = backend?;
    let dynamic_files = mode == Mode::Dynamic && backend.kind() == StorageKind::File;
    // Segments where one process writes a folder (POSIX, GDS, GDS_MT); one file per key on
    // HF3FS, a shared file system, for a store `shared` between instances, and where
    // `shard_dirs` asks for the files layout's folders.
    let chosen = layout.unwrap_or(
        if dynamic_files && backend != Backend::Hf3fs && !shard_dirs && !shared {
            Layout::Segments
        } else {
            Layout::Files
        },
    );
    if layout.is_some() && !dynamic_files {
        fail("layout", "applies to dynamic stores over files".to_owned());
    }
    if chosen == Layout::Segments && backend == Backend::Hf3fs {
        fail(
            "layout",
            "HF3FS is a shared file system: segments take one writer per folder; use files"
                .to_owned(),
        );
    }
    if chosen == Layout::Segments && shared {
        fail(
            "layout",
            "segments take one writer per folder; a store shared between instances (shared: \
             true) uses files"
                .to_owned(),
        );
    }
    if chosen == Layout::Segments && shard_dirs {
        fail(
            "shard_dirs",
            "applies to the files layout (segments make no file per key)".to_owned(),
        );
    }
    let segment_bytes = match segment_mb {
        None => None,
        Some(_) if chosen != Layout::Segments => {
            fail("segment_size_mb", "applies to layout: segments".to_owned());
            None
        }
        Some(mb) if mb.is_finite() && mb >= 1.0 => Some((mb * (1u64 << 20) as f64) as u64),
        Some(mb) => {
            fail(
                "segment_size_mb",
                format!("must be a number of MiB, at least 1, got {mb}"),
            );
            None
        }
    };
    Some((chosen, segment_bytes, layout.is_some()))
}

/// Watermark eviction needs a capacity to measure usage against: without one, LRU would never
/// run and IsolatedLRU (a quota of zero per salt) would evict everything every pass.
pub(crate) fn eviction_without_capacity(spec: &StorageSpec) -> Option<String> {
    let eviction = spec.eviction?;
    let capacity_known = spec.capacity_bytes.is_some() || matches!(spec.mode, Mode::Static { .. });
    (eviction.policy != EvictionPolicy::Noop && !capacity_known).then(|| {
        format!(
            "eviction policy {:?} needs a capacity (max_capacity_gb) to measure usage against",
            eviction.policy
        )
    })
}

fn check_serde(ctx: &mut Ctx<'_>, obj: &Map<String, Value>) {
    match obj.get("serde") {
        None => {}
        Some(Value::Object(serde)) if serde.contains_key("type") => {}
        Some(Value::Object(_)) => ctx.fail("serde", "'serde' dict must include a 'type' field"),
        Some(other) => ctx.fail(
            "serde",
            format!("'serde' must be a dict, got {}", json_type(other)),
        ),
    }
}

fn nixl_storage(
    ctx: &mut Ctx<'_>,
    obj: &Map<String, Value>,
    dynamic: bool,
    shared: bool,
) -> Option<StorageSpec> {
    let backend = match obj.get("backend") {
        Some(Value::String(name)) => match name.parse::<Backend>() {
            Ok(b) if L2_BACKENDS.contains(&b) && name != "3FS" => Some(b),
            _ => {
                ctx.fail(
                    "backend",
                    format!(
                        "backend must be one of {}, got {name:?}",
                        Backend::list(&L2_BACKENDS)
                    ),
                );
                None
            }
        },
        other => {
            ctx.fail(
                "backend",
                format!(
                    "backend must be one of {}, got {}",
                    Backend::list(&L2_BACKENDS),
                    other.map_or("nothing".to_owned(), Value::to_string)
                ),
            );
            None
        }
    };
    let empty = Map::new();
    let params = match obj.get("backend_params") {
        None => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => {
            ctx.fail(
                "backend_params",
                format!(
                    "backend_params must be a dict of string key-value pairs, got {}",
                    json_type(other)
                ),
            );
            &empty
        }
    };
    let mut plugin_params = BackendParams::new();
    for (key, value) in params {
        if OWN_PARAMS.contains(&key.as_str()) {
            continue;
        }
        match scalar_to_string(value) {
            Some(text) => plugin_params.insert(key.clone(), text),
            None => ctx.fail(
                &format!("backend_params.{key}"),
                "backend_params must be a dict of string key-value pairs",
            ),
        }
    }

    let mode = if dynamic {
        if obj.contains_key("pool_size") {
            ctx.fail(
                "pool_size",
                format!(
                    "applies to {NIXL_STORE} only; {NIXL_STORE_DYNAMIC} is sized by max_capacity_gb"
                ),
            );
        }
        Mode::Dynamic
    } else {
        match obj.get("pool_size").and_then(Value::as_u64) {
            Some(n) if n > 0 => Mode::Static { pool_size: n },
            _ => {
                ctx.fail("pool_size", "pool_size must be a positive integer");
                Mode::Static { pool_size: 0 }
            }
        }
    };

    let is_file = backend.is_some_and(|b| b.kind() == StorageKind::File);
    let file_path = match params.get("file_path") {
        Some(Value::String(p)) if !p.trim().is_empty() => Some(PathBuf::from(p)),
        Some(other) => {
            ctx.fail(
                "backend_params.file_path",
                format!("expected a folder path, got {other}"),
            );
            None
        }
        None if is_file => {
            ctx.fail(
                "backend_params.file_path",
                format!(
                    "backend_params must include 'file_path' for file-based backend {:?}",
                    backend.map(|b| b.to_string()).unwrap_or_default()
                ),
            );
            None
        }
        None => None,
    };
    let use_direct_io = flag_param(ctx, params, "use_direct_io");
    if is_file && !dynamic && !params.contains_key("use_direct_io") {
        ctx.fail(
            "backend_params.use_direct_io",
            format!(
                "backend_params must include 'use_direct_io' for file-based backend {:?}",
                backend.map(|b| b.to_string()).unwrap_or_default()
            ),
        );
    }
    let shard_dirs = flag_param(ctx, params, "shard_dirs").unwrap_or(false);
    if shard_dirs && !dynamic {
        ctx.fail(
            "backend_params.shard_dirs",
            format!("applies to {NIXL_STORE_DYNAMIC} only"),
        );
    }
    if backend.is_some() && !is_file {
        for key in ["file_path", "use_direct_io", "file_size", "shard_dirs"] {
            if params.contains_key(key) {
                ctx.fail(
                    &format!("backend_params.{key}"),
                    "applies to file backends only",
                );
            }
        }
    }
    if dynamic && params.contains_key("file_size") {
        ctx.fail(
            "backend_params.file_size",
            format!("applies to {NIXL_STORE} only (slots per static file)"),
        );
    }
    if !dynamic && params.contains_key("max_capacity_gb") {
        ctx.fail(
            "backend_params.max_capacity_gb",
            format!(
                "applies to {NIXL_STORE_DYNAMIC} only; a {NIXL_STORE} pool holds pool_size chunks"
            ),
        );
    }

    let durable = flag_param(ctx, params, "durable").unwrap_or(false);
    if durable && !(dynamic && is_file) {
        ctx.fail(
            "backend_params.durable",
            format!("applies to {NIXL_STORE_DYNAMIC} over a file backend only"),
        );
    }

    let file_size = match params.get("file_size") {
        None => None,
        Some(value) => {
            let parsed = match value {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            match parsed {
                Some(n) if n > 0 => Some(n),
                _ => {
                    ctx.fail(
                        "backend_params.file_size",
                        format!("expected a positive number of bytes, got {value}"),
                    );
                    None
                }
            }
        }
    };

    let capacity_gb = number_param(ctx, params, "max_capacity_gb");
    let capacity_bytes = match capacity_gb {
        Some(gb) if gb > 0.0 => Some((gb * (1u64 << 30) as f64) as u64),
        _ if dynamic && is_file => {
            ctx.fail(
                "backend_params.max_capacity_gb",
                "backend_params must include a positive 'max_capacity_gb'",
            );
            None
        }
        _ => None,
    };

    let layout = match params.get("layout") {
        None => None,
        Some(value) => {
            let parsed = value.as_str().and_then(Layout::parse);
            if parsed.is_none() {
                ctx.fail(
                    "backend_params.layout",
                    format!("expected \"segments\" or \"files\", got {value}"),
                );
            }
            parsed
        }
    };
    let segment_mb = number_param(ctx, params, "segment_size_mb");
    let (layout, segment_bytes, layout_given) = match layout_rules(
        backend,
        mode,
        layout,
        segment_mb,
        shard_dirs,
        shared,
        &mut |key, message| ctx.fail(&format!("backend_params.{key}"), message),
    ) {
        Some(chosen) => chosen,
        None => (Layout::Files, None, false),
    };

    let backend = backend?;
    let mut spec = StorageSpec::new(backend, mode);
    spec.layout = layout;
    spec.layout_given = layout_given;
    spec.segment_bytes = segment_bytes;
    spec.path = file_path.clone();
    spec.all_paths = file_path.into_iter().collect();
    spec.backend_params = plugin_params;
    spec.use_direct_io = use_direct_io.unwrap_or(false);
    spec.shard_dirs = dynamic && shard_dirs;
    spec.durable = durable;
    spec.file_size = file_size;
    spec.capacity_bytes = capacity_bytes;
    Some(spec)
}

impl AdapterRegistry {
    /// The two NIXL adapter types.
    pub fn new() -> Self {
        let mut types = BTreeMap::new();
        types.insert(NIXL_STORE.to_owned(), AdapterType::NixlStore);
        types.insert(NIXL_STORE_DYNAMIC.to_owned(), AdapterType::NixlStoreDynamic);
        Self { types }
    }

    /// Registers a downstream adapter type with the check for its JSON object.
    pub fn register(&mut self, type_name: &str, validator: AdapterValidator) -> Result<()> {
        if self.types.contains_key(type_name) {
            return Err(Error::DuplicateAdapterType(type_name.to_owned()));
        }
        self.types
            .insert(type_name.to_owned(), AdapterType::Custom(validator));
        Ok(())
    }

    /// The registered type names, sorted.
    pub fn known(&self) -> Vec<&str> {
        self.types.keys().map(String::as_str).collect()
    }

    /// Parses every `--l2-adapter` value, in order, reporting every error of every adapter.
    pub fn parse<S: AsRef<str>>(&self, values: &[S]) -> Result<Loaded<Vec<AdapterSpec>>> {
        let mut warnings = Warnings::default();
        let mut errors = Vec::new();
        let mut specs = Vec::new();
        for (index, text) in values.iter().enumerate() {
            match self.parse_one(index, text.as_ref(), &mut warnings) {
                Ok(spec) => specs.push(spec),
                Err(err) => errors.push(err),
            }
        }
        Error::from_list(errors)?;
        Ok(Loaded {
            value: specs,
            warnings: warnings.0,
        })
    }

    fn parse_one(&self, index: usize, text: &str, warnings: &mut Warnings) -> Result<AdapterSpec> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::AdapterJson {
            index,
            message: e.to_string(),
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::AdapterNotObject {
                index,
                found: json_type(&value),
            });
        };
        let type_name = match obj.get("type") {
            Some(Value::String(t)) => t.clone(),
            _ => return Err(Error::AdapterMissingType { index }),
        };
        let Some(&kind) = self.types.get(&type_name) else {
            return Err(Error::UnknownAdapterType {
                index,
                type_name,
                known: self.known().join(", "),
            });
        };
        let mut ctx = Ctx {
            index,
            type_name: &type_name,
            errors: Vec::new(),
        };
        let shared = bool_field(&mut ctx, &obj, "shared", false);
        let persist_enabled = bool_field(&mut ctx, &obj, "persist_enabled", true);
        let eviction = eviction(&mut ctx, &obj);
        check_serde(&mut ctx, &obj);
        let storage = match kind {
            AdapterType::NixlStore | AdapterType::NixlStoreDynamic => {
                let dynamic = matches!(kind, AdapterType::NixlStoreDynamic);
                for key in obj.keys() {
                    if !COMMON_KEYS.contains(&key.as_str()) && !NIXL_KEYS.contains(&key.as_str()) {
                        warnings.push(crate::Warning::UnknownKey {
                            key: key.clone(),
                            source: format!("--l2-adapter #{index} ({type_name})"),
                        });
                    }
                }
                if !persist_enabled && !dynamic {
                    ctx.fail(
                        "persist_enabled",
                        format!("applies to {NIXL_STORE_DYNAMIC} only: a {NIXL_STORE} pool's files are its slots"),
                    );
                }
                if shared && !persist_enabled {
                    ctx.fail(
                        "persist_enabled",
                        "false would delete on close what other instances share (shared: true)",
                    );
                }
                if obj.contains_key("serde") {
                    ctx.fail(
                        "serde",
                        "not supported: chunks are stored as their raw bytes under a checked header",
                    );
                }
                let storage = nixl_storage(&mut ctx, &obj, dynamic, shared).map(|mut spec| {
                    spec.persist = persist_enabled;
                    spec.eviction = eviction;
                    spec.shared = shared;
                    spec
                });
                if let Some(message) = storage.as_ref().and_then(eviction_without_capacity) {
                    ctx.fail("eviction", message);
                }
                storage
            }
            AdapterType::Custom(validator) => {
                if let Err(message) = validator(&obj) {
                    ctx.fail("(adapter)", message);
                }
                None
            }
        };
        let Ctx { errors, .. } = ctx;
        Error::from_list(errors)?;
        Ok(AdapterSpec {
            index,
            type_name,
            shared,
            eviction,
            persist_enabled,
            storage,
            params: AdapterParams(obj),
        })
    }
}
