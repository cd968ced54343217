//! Finding and loading `libnixl_capi.so` before the first NIXL call.
//!
//! `nixl-sys` (feature `stub-api`) opens the library lazily by its bare name and aborts the
//! process when that fails. Loading it here first, by absolute path and with `RTLD_GLOBAL`, makes
//! the stub's later `dlopen("libnixl_capi.so")` return our handle (the library's SONAME is that
//! name), and turns "not installed" into a typed error.

use std::ffi::{CStr, CString, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

const CAPI_LIB: &str = "libnixl_capi.so";
/// Where `cargo xtask setup` installs the runtime, baked in from `.cargo/config.toml`.
const XTASK_RUNTIME_DIR: Option<&str> = option_env!("KV_NIXL_RUNTIME_DIR");
const SYSTEM_DIRS: &[&str] = &[
    "/opt/nvidia/nvda_nixl/lib/x86_64-linux-gnu",
    "/opt/nvidia/nvda_nixl/lib64",
    "/opt/nvidia/nvda_nixl/lib",
    "/usr/local/nixl/lib/x86_64-linux-gnu",
    "/usr/local/nixl/lib",
];

/// The ordered list of folders searched for `libnixl_capi.so`.
#[derive(Debug, Clone, Default)]
pub struct RuntimeLocator {
    dirs: Vec<PathBuf>,
    loader_path: bool,
}

impl RuntimeLocator {
    /// An empty locator: searches nothing until folders are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// The standard order: the runtime installed by `cargo xtask setup`, the system folders,
    /// then the dynamic loader's own search path (`LD_LIBRARY_PATH`, ld.so.cache).
    ///
    /// An explicit `NIXL_LIB_DIR` replaces all of them: a folder named on purpose that holds no
    /// runtime is an error to report, not a reason to load some other runtime silently.
    pub fn standard() -> Self {
        if let Some(dir) = std::env::var_os("NIXL_LIB_DIR").filter(|d| !d.is_empty()) {
            return Self::new().with_dir(dir);
        }
        let mut locator = Self::new();
        if let Some(dir) = XTASK_RUNTIME_DIR {
            locator = locator.with_dir(dir);
        }
        for dir in SYSTEM_DIRS {
            locator = locator.with_dir(dir);
        }
        locator.with_loader_path(true)
    }

    /// Adds a folder to search, after those already added.
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dirs.push(dir.into());
        self
    }

    /// Whether to fall back to the loader's search path when no folder holds the library.
    pub fn with_loader_path(mut self, enabled: bool) -> Self {
        self.loader_path = enabled;
        self
    }

    /// The folders searched, in order.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The first folder's `libnixl_capi.so` that exists, without loading it.
    pub fn locate(&self) -> Result<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join(CAPI_LIB))
            .find(|lib| lib.is_file())
            .ok_or_else(|| self.not_found())
    }

    fn not_found(&self) -> Error {
        Error::RuntimeNotFound {
            searched: self.dirs.clone(),
        }
    }
}

/// The loaded NIXL runtime: at most one per process, kept loaded for the life of the process.
#[derive(Debug)]
pub struct NixlRuntime {
    library: PathBuf,
}

static LOADED: OnceLock<NixlRuntime> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

impl NixlRuntime {
    /// Loads the runtime from the [standard](RuntimeLocator::standard) locations, once.
    pub fn load() -> Result<&'static NixlRuntime> {
        Self::load_with(&RuntimeLocator::standard())
    }

    /// Loads the runtime found by `locator`; when a runtime is already loaded, returns it.
    pub fn load_with(locator: &RuntimeLocator) -> Result<&'static NixlRuntime> {
        if let Some(runtime) = LOADED.get() {
            return Ok(runtime);
        }
        let _guard = LOADING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(runtime) = LOADED.get() {
            return Ok(runtime);
        }
        let library = match locator.locate() {
            Ok(path) => {
                dlopen_global(Some(&path))?;
                path
            }
            Err(not_found) if locator.loader_path => dlopen_global(None).map_err(|_| not_found)?,
            Err(not_found) => return Err(not_found),
        };
        tracing::debug!(library = %library.display(), "NIXL runtime loaded");
        Ok(LOADED.get_or_init(|| NixlRuntime { library }))
    }

    /// The runtime already loaded in this process, if any.
    pub fn get() -> Option<&'static NixlRuntime> {
        LOADED.get()
    }

    /// Path of the loaded `libnixl_capi.so`.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// The folder NIXL loads plugins from: `NIXL_PLUGIN_DIR` when set, else `plugins/` beside
    /// the library.
    pub fn plugin_dir(&self) -> PathBuf {
        match std::env::var_os("NIXL_PLUGIN_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => self
                .library
                .parent()
                .map_or_else(|| PathBuf::from("plugins"), |dir| dir.join("plugins")),
        }
    }
}

fn dlerror_message() -> String {
    // SAFETY: dlerror returns null or a pointer to a NUL-terminated string owned by the loader,
    // valid until the next dl* call on this thread; we copy it out at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dynamic loader error".to_owned()
    } else {
        // SAFETY: non-null, NUL-terminated, see above.
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Opens the library (by path, or by bare name through the loader's search path) with
/// `RTLD_GLOBAL` and never closes it. Returns the path of the file loaded.
fn dlopen_global(path: Option<&Path>) -> Result<PathBuf> {
    let name = match path {
        Some(path) => CString::new(path.as_os_str().as_bytes()),
        None => CString::new(CAPI_LIB),
    }
    .map_err(|_| Error::RuntimeLoad {
        path: path.map_or_else(|| PathBuf::from(CAPI_LIB), Path::to_path_buf),
        reason: "path contains a NUL byte".to_owned(),
    })?;
    // SAFETY: `name` is a valid C string; loading runs the library's constructors, which is the
    // point. The handle is intentionally never closed: nixl-sys holds function pointers into it
    // for the life of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(Error::RuntimeLoad {
            path: path.map_or_else(|| PathBuf::from(CAPI_LIB), Path::to_path_buf),
            reason: dlerror_message(),
        });
    }
    match path {
        Some(path) => Ok(path.to_path_buf()),
        None => Ok(loaded_path(handle).unwrap_or_else(|| PathBuf::from(CAPI_LIB))),
    }
}

/// Where the loader found the library, from the address of one of its symbols.
fn loaded_path(handle: *mut c_void) -> Option<PathBuf> {
    let symbol = c"nixl_capi_create_agent";
    // SAFETY: `handle` is a live handle from dlopen (never closed) and `symbol` a C string.
    let addr = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
    if addr.is_null() {
        return None;
    }
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `addr` is an address inside a loaded object; dladdr fills `info` on success.
    let rc = unsafe { libc::dladdr(addr, info.as_mut_ptr()) };
    if rc == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so `info` is initialised.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname points at the loader's NUL-terminated copy of the object's path.
    let fname = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(fname.to_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_reports_every_folder_searched_and_names_setup() {
        let empty = tempfile::tempdir().unwrap();
        let missing = empty.path().join("does-not-exist");
        let locator = RuntimeLocator::new()
            .with_dir(empty.path())
            .with_dir(&missing);
        let err = locator.locate().unwrap_err();
        match &err {
            Error::RuntimeNotFound { searched } => {
                assert_eq!(searched, &vec![empty.path().to_path_buf(), missing]);
            }
            other => panic!("expected RuntimeNotFound, got {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains("cargo xtask setup"), "{message}");
        assert!(message.contains("NIXL_LIB_DIR"), "{message}");
    }

    #[test]
    fn locate_takes_the_first_folder_holding_the_library() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        std::fs::write(second.path().join(CAPI_LIB), b"").unwrap();
        let third = tempfile::tempdir().unwrap();
        std::fs::write(third.path().join(CAPI_LIB), b"").unwrap();
        let locator = RuntimeLocator::new()
            .with_dir(first.path())
            .with_dir(second.path())
            .with_dir(third.path());
        assert_eq!(locator.locate().unwrap(), second.path().join(CAPI_LIB));
    }

    #[test]
    fn a_folder_named_like_the_library_is_not_the_library() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(CAPI_LIB)).unwrap();
        let locator = RuntimeLocator::new().with_dir(dir.path());
        assert!(matches!(
            locator.locate(),
            Err(Error::RuntimeNotFound { .. })
        ));
    }
}
