//! Dynamic mode: one file per key, opened and registered per operation, published atomically,
//! and found again after a restart.
//!
//! Layout of a chunk file: a 4 KiB header (format version, full key, payload length, checksums)
//! then the payload, padded to 4 KiB. A write goes to `<name>.tmp.<pid>.<n>` and is renamed into
//! place only once complete, so a process killed mid-write leaves at worst a temporary file,
//! which the next [`DynamicFileStore::open`] removes. A file that is torn, truncated, foreign or
//! corrupted reads as a miss with a warning, never as data.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixl_core::{PageView, Registration, StorageExtent, Transport, TransportExt};
use pinned_alloc::{LockMode, MemoryRegion, PAGE_ALIGN, Page, PagePool, PoolConfig};

use crate::error::{Error, Result};
use crate::key::FileKey;
use crate::open::preallocate;
use nixl_core::header::{self, HEADER_BYTES, MAX_KEY_BYTES};

const TEMP_MARKER: &str = ".tmp.";
/// Deleted chunk files wait here to be reused as the next temporaries: creating a file costs an
/// inode allocation, which ext4 makes slow under create/delete churn (eviction), and a fallocate.
const RECYCLE_DIR: &str = ".recycle";
/// Most files kept for reuse; deletes beyond this unlink.
const MAX_RECYCLED: usize = 4096;
const HEADER_WAIT: Duration = Duration::from_secs(30);

/// Configuration of a [`DynamicFileStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DynamicConfig {
    /// The folder the chunk files live in.
    pub root: PathBuf,
    /// Open files with `O_DIRECT` (falls back to buffered I/O where the folder refuses it).
    pub direct_io: bool,
    /// Spread files over `hh/hh/` sub-folders from the chunk hash.
    pub shard_dirs: bool,
    /// Most files open at once; larger batches are processed in pieces of this size.
    pub max_open_files: usize,
}

impl DynamicConfig {
    /// Buffered, flat, at most 64 open files.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            direct_io: false,
            shard_dirs: false,
            max_open_files: 64,
        }
    }

    /// Asks for `O_DIRECT`.
    pub fn with_direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }

    /// Spreads files over two levels of hex sub-folders.
    pub fn with_shard_dirs(mut self, shard_dirs: bool) -> Self {
        self.shard_dirs = shard_dirs;
        self
    }

    /// Bounds the files open at once.
    pub fn with_max_open_files(mut self, max: usize) -> Self {
        self.max_open_files = max.max(1);
        self
    }
}

/// One chunk file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredChunk {
    /// The key in its header.
    pub key: FileKey,
    /// Payload bytes.
    pub payload_len: u64,
    /// The file.
    pub path: PathBuf,
}

/// Chunk files in one folder, through any [`Transport`].
#[derive(Debug)]
pub struct DynamicFileStore {
    transport: Arc<dyn Transport>,
    root: PathBuf,
    direct_io: bool,
    shard_dirs: bool,
    max_open_files: usize,
    headers: Arc<PagePool>,
    _headers_registration: Registration,
    made_dirs: Mutex<HashSet<PathBuf>>,
    temp_seq: AtomicU64,
    /// Files in the recycle folder, ready to become temporaries.
    recycled: Mutex<Vec<PathBuf>>,
}

/// One file of a batch in progress.
struct Open {
    index: usize,
    path: PathBuf,
    temp: Option<PathBuf>,
    registration: Registration,
    header: Page,
}

impl DynamicFileStore {
    /// Opens the store: creates the folder, settles `O_DIRECT` for it, removes temporaries left
    /// by a crash, and registers its header buffers with the transport.
    pub fn open(transport: Arc<dyn Transport>, config: DynamicConfig) -> Result<Self> {
        fs::create_dir_all(&config.root).map_err(Error::io("creating", &config.root))?;
        let direct_io = config.direct_io
            && nixl_core::direct_io_supported(&config.root).map_err(Error::Transport)?;
        let header_pages = (config.max_open_files.max(1) * 4) as u64;
        let headers = PoolConfig::new(HEADER_BYTES, header_pages * HEADER_BYTES as u64)
            .with_lock(LockMode::BestEffort)
            .build()
            .map_err(|e| Error::Config(format!("header buffers: {e}")))?;
        let registration =
            transport.register_memory(Arc::clone(&headers) as Arc<dyn MemoryRegion>)?;
        let store = Self {
            transport,
            root: config.root,
            direct_io,
            shard_dirs: config.shard_dirs,
            max_open_files: config.max_open_files.max(1),
            headers,
            _headers_registration: registration,
            made_dirs: Mutex::new(HashSet::new()),
            temp_seq: AtomicU64::new(0),
            recycled: Mutex::new(Vec::new()),
        };
        store.adopt_recycled()?;
        let removed = store.remove_temporaries()?;
        if removed > 0 {
            tracing::warn!(
                folder = %store.root.display(),
                removed,
                "removed temporary files left by an interrupted write"
            );
        }
        Ok(store)
    }

    /// Whether files are opened with `O_DIRECT` (after the folder's fallback).
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// The folder of the store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `key` is stored.
    pub fn path_of(&self, key: &FileKey) -> Result<PathBuf> {
        key.validate()?;
        if key.canonical().len() > MAX_KEY_BYTES {
            return Err(Error::InvalidKey {
                reason: "key longer than a header holds".to_owned(),
            });
        }
        Ok(self.root.join(key.relative_path(self.shard_dirs)))
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        let mut made = self
            .made_dirs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !made.contains(parent) {
            fs::create_dir_all(parent).map_err(Error::io("creating", parent))?;
            made.insert(parent.to_path_buf());
        }
        Ok(())
    }

    /// Files left in the recycle folder (by this store's earlier life, or a crashed one) are
    /// reused like any other; a rename makes a file ours, so two stores never share one.
    fn adopt_recycled(&self) -> Result<()> {
        let folder = self.root.join(RECYCLE_DIR);
        let mut found: Vec<PathBuf> = match fs::read_dir(&folder) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Io {
                    operation: "listing",
                    path: folder,
                    source,
                });
            }
        };
        for extra in found.drain(MAX_RECYCLED.min(found.len())..) {
            let _ = fs::remove_file(extra);
        }
        *self.recycled.lock().unwrap_or_else(|p| p.into_inner()) = found;
        Ok(())
    }

    /// A recycled file renamed to `temp`, if one is left.
    fn reuse_recycled(&self, temp: &Path) -> bool {
        loop {
            let Some(file) = self
                .recycled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
            else {
                return false;
            };
            if fs::rename(&file, temp).is_ok() {
                return true;
            }
        }
    }

    fn open_options(&self, write: bool) -> OpenOptions {
        let mut options = OpenOptions::new();
        options.read(true);
        if write {
            // Temporaries have fresh names, or are recycled files rewritten whole: no truncation.
            options.write(true).create(true).truncate(false).mode(0o644);
        }
        if self.direct_io {
            options.custom_flags(libc::O_DIRECT);
        }
        options
    }

    /// Header buffers for the files of `range`; waits while other batches hold them all, and
    /// marks every item of the range busy when none come free in time.
    fn header_pages<T>(
        &self,
        range: std::ops::Range<usize>,
        results: &mut [Result<T>],
    ) -> Option<Vec<Page>> {
        let n = range.len();
        let started = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            if let Ok(pages) = self.headers.allocate_batch(n) {
                return Some(pages);
            }
            if started.elapsed() > HEADER_WAIT {
                for index in range {
                    results[index] = Err(Error::Busy(HEADER_WAIT));
                }
                return None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Stores every page under its key. One result per item: the bytes stored, or why not.
    /// A key is visible only once its file is complete.
    pub fn put(&self, items: &[(&FileKey, &Page)]) -> Vec<Result<u64>> {
        let mut results: Vec<Result<u64>> = (0..items.len()).map(|_| Ok(0)).collect();
        for start in (0..items.len()).step_by(self.max_open_files) {
            let end = (start + self.max_open_files).min(items.len());
            self.put_piece(items, start..end, &mut results);
        }
        results
    }

    fn put_piece(
        &self,
        items: &[(&FileKey, &Page)],
        range: std::ops::Range<usize>,
        results: &mut [Result<u64>],
    ) {
        let Some(headers) = self.header_pages(range.clone(), results) else {
            return;
        };
        let mut open = Vec::new();
        for (index, header) in range.zip(headers) {
            let (key, page) = items[index];
            match self.create_temp(index, key, page, header) {
                Ok(file) => open.push(file),
                Err(err) => results[index] = Err(err),
            }
        }
        if open.is_empty() {
            return;
        }
        let mut batch = Vec::with_capacity(open.len() * 2);
        for file in &open {
            let page = items[file.index].1;
            let dev_id = file.registration.dev_id();
            batch.push((&file.header, StorageExtent::new(dev_id, 0)));
            batch.push((page, StorageExtent::new(dev_id, HEADER_BYTES as u64)));
        }
        let outcome = self
            .transport
            .write_pages(&batch, PageView::Padded)
            .map_err(Arc::new);
        drop(batch);
        for file in open {
            let Open {
                index,
                path,
                temp,
                registration,
                header,
            } = file;
            drop(registration);
            drop(header);
            let Some(temp) = temp else { continue };
            results[index] = match &outcome {
                Ok(()) => fs::rename(&temp, &path)
                    .map(|()| items[index].1.len() as u64)
                    .map_err(Error::io("publishing", &path)),
                Err(err) => Err(Error::Batch(Arc::clone(err))),
            };
            if results[index].is_err() {
                let _ = fs::remove_file(&temp);
            }
        }
    }

    fn create_temp(
        &self,
        index: usize,
        key: &FileKey,
        page: &Page,
        mut header: Page,
    ) -> Result<Open> {
        let path = self.path_of(key)?;
        self.ensure_parent(&path)?;
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let mut temp = path.clone().into_os_string();
        temp.push(format!("{TEMP_MARKER}{}.{seq}", std::process::id()));
        let temp = PathBuf::from(temp);
        header::write(header.as_mut_slice(), &key.canonical(), page.as_slice());
        let reused = self.reuse_recycled(&temp);
        let file = self
            .open_options(true)
            .open(&temp)
            .map_err(|source| Error::Open {
                path: temp.clone(),
                direct_io: self.direct_io,
                source,
            })?;
        let total = (HEADER_BYTES + page.io_slice().len()) as u64;
        let sized = if reused {
            // A recycled file is rewritten whole; only its length may need to change.
            file.metadata().and_then(|m| {
                if m.len() == total {
                    Ok(())
                } else {
                    file.set_len(total)
                }
            })
        } else {
            Ok(())
        };
        let registered = sized
            .and_then(|()| preallocate(&file, total))
            .map_err(|source| Error::Preallocate {
                path: temp.clone(),
                bytes: total,
                source,
            })
            .and_then(|()| Ok(self.transport.register_file(Arc::new(file))?));
        match registered {
            Ok(registration) => Ok(Open {
                index,
                path,
                temp: Some(temp),
                registration,
                header,
            }),
            Err(err) => {
                let _ = fs::remove_file(&temp);
                Err(err)
            }
        }
    }

    /// Loads every key into its page (whose length is the expected payload size). One result
    /// per item: `Ok(true)` loaded and verified, `Ok(false)` a miss (absent, or a file that does
    /// not check out, with a warning), `Err` when the transfer itself failed.
    pub fn get(&self, items: &mut [(&FileKey, &mut Page)]) -> Vec<Result<bool>> {
        let mut results: Vec<Result<bool>> = (0..items.len()).map(|_| Ok(false)).collect();
        for start in (0..items.len()).step_by(self.max_open_files) {
            let end = (start + self.max_open_files).min(items.len());
            self.get_piece(items, start..end, &mut results);
        }
        results
    }

    fn open_existing(
        &self,
        index: usize,
        key: &FileKey,
        expected: u64,
        header: Page,
    ) -> Result<Option<Open>> {
        let path = self.path_of(key)?;
        let file = match self.open_options(false).open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Open {
                    path,
                    direct_io: self.direct_io,
                    source,
                });
            }
        };
        let size = file
            .metadata()
            .map_err(Error::io("reading the size of", &path))?
            .len();
        let padded = expected.next_multiple_of(PAGE_ALIGN as u64);
        if size != HEADER_BYTES as u64 + padded {
            tracing::warn!(
                file = %path.display(),
                size,
                expected = HEADER_BYTES as u64 + padded,
                "chunk file has the wrong size (truncated or foreign); treated as a miss"
            );
            return Ok(None);
        }
        let registration = self.transport.register_file(Arc::new(file))?;
        Ok(Some(Open {
            index,
            path,
            temp: None,
            registration,
            header,
        }))
    }

    fn get_piece(
        &self,
        items: &mut [(&FileKey, &mut Page)],
        range: std::ops::Range<usize>,
        results: &mut [Result<bool>],
    ) {
        let Some(headers) = self.header_pages(range.clone(), results) else {
            return;
        };
        let mut open = Vec::new();
        for (index, header) in range.zip(headers) {
            let (key, page) = &items[index];
            match self.open_existing(index, key, page.len() as u64, header) {
                Ok(Some(file)) => open.push(file),
                Ok(None) => results[index] = Ok(false),
                Err(err) => results[index] = Err(err),
            }
        }
        if open.is_empty() {
            return;
        }
        let outcome = {
            let mut pages: Vec<Option<&mut Page>> =
                items.iter_mut().map(|(_, p)| Some(&mut **p)).collect();
            let mut batch = Vec::with_capacity(open.len() * 2);
            for file in &mut open {
                let dev_id = file.registration.dev_id();
                batch.push((&mut file.header, StorageExtent::new(dev_id, 0)));
                if let Some(page) = pages[file.index].take() {
                    batch.push((page, StorageExtent::new(dev_id, HEADER_BYTES as u64)));
                }
            }
            self.transport
                .read_pages(&mut batch, PageView::Padded)
                .map_err(Arc::new)
        };
        for file in open {
            let index = file.index;
            results[index] = match &outcome {
                Err(err) => Err(Error::Batch(Arc::clone(err))),
                Ok(()) => {
                    let (key, page) = &items[index];
                    let verdict =
                        header::check(file.header.as_slice(), &key.canonical(), page.len() as u64)
                            .and_then(|checksum| header::verify_payload(page.as_slice(), checksum));
                    match verdict {
                        Ok(()) => Ok(true),
                        Err(refusal) => {
                            tracing::warn!(
                                file = %file.path.display(),
                                reason = %refusal,
                                "chunk file refused; treated as a miss"
                            );
                            Ok(false)
                        }
                    }
                }
            };
        }
    }

    /// Whether a file for `key` exists (a `stat`; its content is checked when loaded).
    pub fn contains(&self, key: &FileKey) -> Result<bool> {
        let path = self.path_of(key)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Io {
                operation: "checking",
                path,
                source,
            }),
        }
    }

    /// The payload size recorded for `key`, if its file exists and its header checks out.
    pub fn stored_size(&self, key: &FileKey) -> Result<Option<u64>> {
        let path = self.path_of(key)?;
        let Some(header) = read_header(&path)? else {
            return Ok(None);
        };
        match header::parse(&header) {
            Ok((stored_key, len, _)) if stored_key == key.canonical() => Ok(Some(len)),
            _ => Ok(None),
        }
    }

    /// Removes `key`'s file; `false` if there was none. The file is kept for reuse (renamed into
    /// the recycle folder, where no key reaches it) while fewer than a few thousand wait there.
    pub fn delete(&self, key: &FileKey) -> Result<bool> {
        let path = self.path_of(key)?;
        {
            let mut recycled = self.recycled.lock().unwrap_or_else(|p| p.into_inner());
            if recycled.len() < MAX_RECYCLED {
                let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
                let spare = self
                    .root
                    .join(RECYCLE_DIR)
                    .join(format!("{}-{seq}.bin", std::process::id()));
                self.ensure_parent(&spare)?;
                match fs::rename(&path, &spare) {
                    Ok(()) => {
                        recycled.push(spare);
                        return Ok(true);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        tracing::debug!(file = %path.display(), "file already deleted");
                        return Ok(false);
                    }
                    Err(_) => {}
                }
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(file = %path.display(), "file already deleted");
                Ok(false)
            }
            Err(source) => Err(Error::Io {
                operation: "deleting",
                path,
                source,
            }),
        }
    }

    fn files(&self) -> Result<Vec<PathBuf>> {
        chunk_files(&self.root)
    }

    /// Removes the temporary files of interrupted writes; returns how many.
    pub fn remove_temporaries(&self) -> Result<usize> {
        let mut removed = 0;
        for path in self.files()? {
            let is_temp = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains(TEMP_MARKER));
            if is_temp && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Every chunk file whose header checks out and whose size matches it (foreign and truncated
    /// files are skipped; payload checksums are verified when a chunk is loaded).
    pub fn list(&self) -> Result<Vec<StoredChunk>> {
        list_dir(&self.root)
    }
}

impl Drop for DynamicFileStore {
    /// Spare files are space, not data: give it back when the store closes.
    fn drop(&mut self) {
        for file in self
            .recycled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = fs::remove_file(file);
        }
    }
}

/// Every file below `root`, two levels of shard folders deep (the recycle folder is not data).
fn chunk_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut folders = vec![(root.to_path_buf(), 0)];
    while let Some((folder, depth)) = folders.pop() {
        let entries = match fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(Error::Io {
                    operation: "listing",
                    path: folder,
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() && entry.file_name() == RECYCLE_DIR => {}
                Ok(kind) if kind.is_dir() && depth < 2 => folders.push((path, depth + 1)),
                Ok(kind) if kind.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    Ok(files)
}

/// The chunk files of a dynamic store's folder, without opening the store (no transport
/// needed): every file whose header checks out and whose size matches it.
pub fn list_dir(root: &Path) -> Result<Vec<StoredChunk>> {
    let mut chunks = Vec::new();
    for path in chunk_files(root)? {
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(TEMP_MARKER))
        {
            continue;
        }
        let Some(header) = read_header(&path)? else {
            continue;
        };
        if let Ok((key, payload_len, _)) = header::parse(&header) {
            let expected = HEADER_BYTES as u64 + payload_len.next_multiple_of(PAGE_ALIGN as u64);
            let whole = fs::metadata(&path).is_ok_and(|m| m.len() == expected);
            if let Some(key) = FileKey::from_canonical(key).filter(|_| whole) {
                chunks.push(StoredChunk {
                    key,
                    payload_len,
                    path,
                });
            }
        }
    }
    chunks.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(chunks)
}

/// The first 4 KiB of a file through buffered I/O, or `None` when it is absent or shorter.
fn read_header(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                operation: "opening",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut header = vec![0u8; HEADER_BYTES];
    match file.read_exact(&mut header) {
        Ok(()) => Ok(Some(header)),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(source) => Err(Error::Io {
            operation: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}
