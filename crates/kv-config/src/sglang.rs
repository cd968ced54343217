//! SGLang HiCache NIXL connector settings, from its environment variables.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::{Backend, StorageKind};
use crate::engine::Loaded;
use crate::error::{Error, Result, Warnings};
use crate::spec::{Deployment, Mode, StorageSpec};

/// Comma-separated storage folders.
pub const STORAGE_DIR_VAR: &str = "SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR";
/// The plugin to use, or `auto`.
pub const PLUGIN_VAR: &str = "SGLANG_HICACHE_NIXL_BACKEND_PLUGIN";
/// `O_DIRECT` on (the default) or off.
pub const DIRECT_IO_VAR: &str = "SGLANG_HICACHE_NIXL_USE_DIRECT_IO";
/// The folder used when none is configured.
pub const DEFAULT_STORAGE_DIR: &str = "/tmp/hicache_storage";

/// The automatic choice: the first of these that NIXL has wins (SGLang's 3FS > POSIX > GDS_MT >
/// GDS > OBJ).
pub const AUTO_PRIORITY: [Backend; 5] = [
    Backend::Hf3fs,
    Backend::Posix,
    Backend::GdsMt,
    Backend::Gds,
    Backend::Obj,
];

/// Which plugin HiCache uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PluginChoice {
    /// The first available plugin in [`AUTO_PRIORITY`].
    Auto,
    /// This one, which must be available.
    Named(Backend),
}

/// SGLang HiCache NIXL settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HiCacheConfig {
    /// Storage folders, in order, without duplicates.
    pub storage_dirs: Vec<PathBuf>,
    /// Plugin choice.
    pub plugin: PluginChoice,
    /// `O_DIRECT` for file plugins.
    pub use_direct_io: bool,
}

/// Two spellings of one folder are the same folder: resolve what exists, normalise the rest.
fn identity(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.components().collect())
}

impl HiCacheConfig {
    /// Reads the settings from `(name, value)` pairs (pass `std::env::vars()` for the process).
    pub fn from_env<I, K, V>(vars: I) -> Result<Loaded<Self>>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut dirs_value = None;
        let mut plugin_value = None;
        let mut direct_value = None;
        for (name, value) in vars {
            match name.as_ref() {
                STORAGE_DIR_VAR => dirs_value = Some(value.into()),
                PLUGIN_VAR => plugin_value = Some(value.into()),
                DIRECT_IO_VAR => direct_value = Some(value.into()),
                _ => {}
            }
        }
        let mut warnings = Warnings::default();
        let mut errors = Vec::new();

        let raw_dirs = dirs_value.unwrap_or_else(|| DEFAULT_STORAGE_DIR.to_owned());
        let mut storage_dirs: Vec<PathBuf> = Vec::new();
        for dir in raw_dirs.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            if storage_dirs
                .iter()
                .any(|seen| identity(seen) == identity(&dir))
            {
                errors.push(Error::HiCache {
                    variable: STORAGE_DIR_VAR,
                    message: format!("folder {} is listed twice", dir.display()),
                });
            } else {
                storage_dirs.push(dir);
            }
        }
        if storage_dirs.is_empty() {
            errors.push(Error::HiCache {
                variable: STORAGE_DIR_VAR,
                message: "no folder given".to_owned(),
            });
        }

        let plugin = match plugin_value.as_deref().map(str::trim) {
            None | Some("") => PluginChoice::Auto,
            Some(name) if name.eq_ignore_ascii_case("auto") => PluginChoice::Auto,
            Some(name) => match name.parse::<Backend>() {
                Ok(backend) if AUTO_PRIORITY.contains(&backend) => PluginChoice::Named(backend),
                _ => {
                    errors.push(Error::HiCache {
                        variable: PLUGIN_VAR,
                        message: format!(
                            "unknown plugin {name:?}; use auto or one of 3FS, {}",
                            Backend::list(&AUTO_PRIORITY[1..])
                        ),
                    });
                    PluginChoice::Auto
                }
            },
        };

        let use_direct_io = match direct_value.as_deref().map(str::trim) {
            None | Some("") => true,
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
            Some(other) => {
                warnings.push(crate::Warning::UnparsableEnv {
                    variable: format!("{DIRECT_IO_VAR}={other}"),
                    expected: "a boolean (true/false/1/0)",
                });
                true
            }
        };

        Error::from_list(errors)?;
        Ok(Loaded {
            value: Self {
                storage_dirs,
                plugin,
                use_direct_io,
            },
            warnings: warnings.0,
        })
    }

    /// The storage this worker uses on `backend`: one file or object per page (dynamic mode),
    /// in the folder picked by the worker's GPU among [`HiCacheConfig::storage_dirs`], as
    /// `by_gpu` sharding picks.
    pub fn storage_spec(&self, backend: Backend, deployment: &Deployment) -> StorageSpec {
        let mut spec = StorageSpec::new(backend, Mode::Dynamic);
        if backend.kind() == StorageKind::File && !self.storage_dirs.is_empty() {
            let index = deployment.gpu() as usize % self.storage_dirs.len();
            spec.path = Some(self.storage_dirs[index].clone());
            spec.all_paths = self.storage_dirs.clone();
            spec.use_direct_io = self.use_direct_io;
        }
        spec
    }

    /// The backend to create, given the plugins NIXL lists.
    pub fn select_backend<S: AsRef<str>>(&self, available: &[S]) -> Result<Backend> {
        let has = |backend: Backend| {
            available
                .iter()
                .any(|p| p.as_ref() == backend.plugin_name())
        };
        let listed = || {
            available
                .iter()
                .map(|p| p.as_ref().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.plugin {
            PluginChoice::Named(backend) if has(backend) => Ok(backend),
            PluginChoice::Named(backend) => Err(Error::HiCache {
                variable: PLUGIN_VAR,
                message: format!("plugin {backend} is not available; NIXL has: {}", listed()),
            }),
            PluginChoice::Auto => {
                AUTO_PRIORITY
                    .into_iter()
                    .find(|&b| has(b))
                    .ok_or_else(|| Error::HiCache {
                        variable: PLUGIN_VAR,
                        message: format!(
                            "no storage plugin available for auto selection; NIXL has: {}",
                            listed()
                        ),
                    })
            }
        }
    }
}
