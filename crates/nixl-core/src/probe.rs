//! Whether a folder accepts `O_DIRECT`: backends use it to fall back to buffered I/O.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use pinned_alloc::{LockMode, PAGE_ALIGN, PoolConfig};

use crate::error::{Error, Result};

fn direct_io_cache() -> &'static Mutex<HashMap<PathBuf, bool>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether `dir` accepts `O_DIRECT` for real: open, an aligned 4 KiB write and read back. Some
/// file systems refuse at `open` (tmpfs), others accept the flag and fail the first write (XFS
/// with odd geometry), so both are tried. The answer is remembered per folder.
pub fn direct_io_supported(dir: &Path) -> Result<bool> {
    let key = fs::canonicalize(dir).map_err(|source| Error::Io {
        operation: "resolving",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut cache = direct_io_cache()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&known) = cache.get(&key) {
        return Ok(known);
    }
    let supported = try_direct_io(&key)?;
    if !supported {
        tracing::warn!(
            folder = %key.display(),
            "O_DIRECT is not supported here; falling back to buffered I/O for this folder"
        );
    }
    cache.insert(key, supported);
    Ok(supported)
}

fn refuses_direct_io(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM)
    )
}

fn try_direct_io(dir: &Path) -> Result<bool> {
    let path = dir.join(format!(".kv-direct-io-probe-{}", std::process::id()));
    let io_error = |operation: &'static str| {
        let path = path.clone();
        move |source| Error::Io {
            operation,
            path,
            source,
        }
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(file) => file,
        Err(err) if refuses_direct_io(&err) => return Ok(false),
        Err(err) => return Err(io_error("opening")(err)),
    };
    let pool = PoolConfig::new(PAGE_ALIGN, PAGE_ALIGN as u64)
        .with_lock(LockMode::Off)
        .build()
        .map_err(|err| Error::Failed(format!("probe buffer: {err}")))?;
    let mut page = pool
        .allocate()
        .ok_or_else(|| Error::Failed("probe buffer: no page".to_owned()))?;
    page.as_mut_slice().fill(0x5A);
    let outcome = file
        .write_all_at(page.as_slice(), 0)
        .and_then(|()| file.read_exact_at(page.as_mut_slice(), 0));
    drop(file);
    let _ = fs::remove_file(&path);
    match outcome {
        Ok(()) => Ok(page.as_slice().iter().all(|&b| b == 0x5A)),
        Err(err) if refuses_direct_io(&err) => Ok(false),
        Err(err) => Err(io_error("probing O_DIRECT on")(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workspace lives on a local disk file system (ext4 or XFS here and in CI), which
    /// supports O_DIRECT.
    #[test]
    fn a_disk_folder_accepts_direct_io_and_the_answer_is_remembered() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(direct_io_supported(dir.path()).unwrap());
        let key = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(direct_io_cache().lock().unwrap().get(&key), Some(&true));
        assert!(direct_io_supported(dir.path()).unwrap());
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "the probe leaves no file behind"
        );
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_it() {
        let err = direct_io_supported(Path::new("/no/such/folder")).unwrap_err();
        assert!(err.to_string().contains("/no/such/folder"), "{err}");
    }
}
