//! Dynamic mode: one file per key, opened and registered per operation, published atomically,
//! and found again after a restart.
//!
//! Layout of a chunk file: a 4 KiB header (format version, full key, payload length, checksums)
//! then the payload, padded to 4 KiB. A write goes to a temporary,
//! `<name>.tmp.<pid>.<store nonce>.<n>`, and is renamed into place only once complete, so a
//! process killed mid-write leaves at worst a temporary file, which the next
//! [`DynamicFileStore::open`] removes. Every key's file name ends in `.bin` and no temporary's
//! does, so no key (whatever its model or salt hold) is ever taken for a temporary. The writer
//! holds an exclusive `flock` on its temporary until the rename, so stores of other processes
//! sharing the folder leave live writes alone. A file that is torn, truncated, foreign or
//! corrupted reads as a miss with a warning, never as data.
//!
//! With [`DynamicConfig::durable`], each payload is `fdatasync`ed before the rename that
//! publishes it and each folder is `fsync`ed once per [`put`](DynamicFileStore::put), so a key
//! reported stored survives a power loss. Without it (the default) a power loss can leave a
//! published name whose data never reached the disk; the header check makes such a file a miss.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
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
use crate::open::{lock, open_to_inspect, preallocate, process_gone, sync_dir, try_lock};
use nixl_core::header::{self, HEADER_BYTES, MAX_KEY_BYTES, Refusal};

const TEMP_MARKER: &str = ".tmp.";
/// Deleted chunk files wait here to be reused as the next temporaries: creating a file costs an
/// inode allocation, which ext4 makes slow under create/delete churn (eviction), and a fallocate.
const RECYCLE_DIR: &str = ".recycle";
/// Bytes of spare files kept for reuse unless [`DynamicConfig::recycle_bytes`] says otherwise;
/// deletes beyond it unlink.
pub const DEFAULT_RECYCLE_BYTES: u64 = 1 << 30;
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
    /// Survive power loss: `fdatasync` every file before the rename that publishes it, and
    /// `fsync` every folder written to once per [`put`](DynamicFileStore::put). Off by default,
    /// as in LMCache, whose stores never sync: a cache may lose entries in a crash, and the
    /// header check keeps what a crash tears from being served either way.
    pub durable: bool,
    /// Most bytes of deleted files kept in the recycle folder to become later files (0: every
    /// delete unlinks). They are disk space the store holds beyond its chunks, so a layer that
    /// bounds the disk counts them against its capacity.
    pub recycle_bytes: u64,
}

impl DynamicConfig {
    /// Buffered, flat, at most 64 open files, not durable, [`DEFAULT_RECYCLE_BYTES`] of spares.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            direct_io: false,
            shard_dirs: false,
            max_open_files: 64,
            durable: false,
            recycle_bytes: DEFAULT_RECYCLE_BYTES,
        }
    }

    /// Bounds the spare files kept for reuse (see [`recycle_bytes`](DynamicConfig::recycle_bytes)).
    pub fn with_recycle_bytes(mut self, bytes: u64) -> Self {
        self.recycle_bytes = bytes;
        self
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

    /// Syncs data and folders so that stored keys survive a power loss (see
    /// [`durable`](DynamicConfig::durable)).
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
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
    durable: bool,
    headers: Arc<PagePool>,
    _headers_registration: Registration,
    made_dirs: Mutex<HashSet<PathBuf>>,
    /// Goes into the names of this store's temporaries and spare files: pids alone collide
    /// between containers sharing a folder.
    nonce: u64,
    temp_seq: AtomicU64,
    /// Files in the recycle folder, ready to become temporaries.
    recycled: Mutex<Recycled>,
    recycle_bytes: u64,
}

/// The spare files of the recycle folder, with their sizes.
#[derive(Debug, Default)]
struct Recycled {
    files: Vec<(PathBuf, u64)>,
    bytes: u64,
}

/// One file of a batch in progress.
struct Open {
    index: usize,
    path: PathBuf,
    temp: Option<PathBuf>,
    /// Kept open past the registration: a temporary stays locked (in flight) until renamed.
    file: Arc<File>,
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
            durable: config.durable,
            headers,
            _headers_registration: registration,
            made_dirs: Mutex::new(HashSet::new()),
            nonce: store_nonce(),
            temp_seq: AtomicU64::new(0),
            recycled: Mutex::new(Recycled::default()),
            recycle_bytes: config.recycle_bytes,
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
            if self.durable {
                // A new folder survives a power loss only once the folder holding it is synced.
                for folder in parent
                    .ancestors()
                    .skip(1)
                    .take_while(|f| f.starts_with(&self.root))
                {
                    sync_dir(folder).map_err(Error::io("syncing", folder))?;
                }
            }
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
        let mut kept = Recycled::default();
        for path in found.drain(..) {
            let len = fs::metadata(&path).map_or(0, |m| m.len());
            if kept.bytes + len <= self.recycle_bytes {
                kept.bytes += len;
                kept.files.push((path, len));
            } else {
                let _ = fs::remove_file(path);
            }
        }
        *self.recycled.lock().unwrap_or_else(|p| p.into_inner()) = kept;
        Ok(())
    }

    /// A recycled file, open and locked, renamed to `temp`, if one is left. It is locked before
    /// the rename, so it bears a temporary's name only while locked: a store opening meanwhile
    /// sees a live write, never an abandoned one. Of two stores claiming one spare, the one that
    /// takes the lock renames it; the other moves on.
    fn reuse_recycled(&self, temp: &Path) -> Option<File> {
        loop {
            let spare = {
                let mut recycled = self.recycled.lock().unwrap_or_else(|p| p.into_inner());
                let (spare, len) = recycled.files.pop()?;
                recycled.bytes = recycled.bytes.saturating_sub(len);
                spare
            };
            // Never create: a spare already taken must not come back as an empty file.
            let Ok(file) = self.open_options(true).create(false).open(&spare) else {
                continue;
            };
            match try_lock(&file) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => tracing::debug!(
                    file = %spare.display(),
                    error = %err,
                    "the file system refuses locks; the write is not marked in flight"
                ),
            }
            if fs::rename(&spare, temp).is_ok() {
                return Some(file);
            }
        }
    }

    /// A fresh file named `temp` (a name no one else uses), locked. Between the create and the
    /// lock it is empty, which is why an opening store removes an unlocked empty temporary only
    /// once its writer's pid is gone.
    fn create_fresh(&self, temp: &Path) -> Result<File> {
        let file = self
            .open_options(true)
            .create_new(true)
            .open(temp)
            .map_err(|source| Error::Open {
                path: temp.to_path_buf(),
                direct_io: self.direct_io,
                source,
            })?;
        // Waits only for an opening store that is looking at this file right now.
        if let Err(err) = lock(&file) {
            tracing::debug!(
                file = %temp.display(),
                error = %err,
                "the file system refuses locks; the write is not marked in flight"
            );
        }
        Ok(file)
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
        match self.headers.allocate_batch_within(range.len(), HEADER_WAIT) {
            Ok(pages) => Some(pages),
            Err(_) => {
                for index in range {
                    results[index] = Err(Error::Busy(HEADER_WAIT));
                }
                None
            }
        }
    }

    /// Stores every page under its key. One result per item: the bytes stored, or why not.
    /// A key is visible only once its file is complete.
    /// Errors name the key and its file.
    pub fn put(&self, items: &[(&FileKey, &Page)]) -> Vec<Result<u64>> {
        let mut results: Vec<Result<u64>> = (0..items.len()).map(|_| Ok(0)).collect();
        let mut published = BTreeMap::new();
        for start in (0..items.len()).step_by(self.max_open_files) {
            let end = (start + self.max_open_files).min(items.len());
            self.put_piece(items, start..end, &mut results, &mut published);
        }
        sync_folders(published, &mut results);
        results
            .into_iter()
            .zip(items)
            .map(|(result, (key, _))| result.map_err(|err| self.keyed("storing", key, err)))
            .collect()
    }

    /// `published` gathers, when durable, the folders this piece renamed files into and the
    /// items of each, to sync every folder once for the whole [`put`](Self::put).
    fn put_piece(
        &self,
        items: &[(&FileKey, &Page)],
        range: std::ops::Range<usize>,
        results: &mut [Result<u64>],
        published: &mut BTreeMap<PathBuf, Vec<usize>>,
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
                file,
                registration,
                header,
            } = file;
            drop(registration);
            drop(header);
            let Some(temp) = temp else { continue };
            results[index] = match &outcome {
                Ok(()) => self
                    .publish(&file, &temp, &path)
                    .map(|()| items[index].1.len() as u64),
                Err(err) => Err(Error::Batch(Arc::clone(err))),
            };
            if results[index].is_err() {
                let _ = fs::remove_file(&temp);
            } else if let Some(folder) = path.parent().filter(|_| self.durable) {
                published
                    .entry(folder.to_path_buf())
                    .or_default()
                    .push(index);
            }
            // Only now, renamed or removed, does the temporary stop being locked (in flight).
            drop(file);
        }
    }

    /// Renames a written temporary into place, its data synced first when durable.
    fn publish(&self, file: &File, temp: &Path, path: &Path) -> Result<()> {
        if self.durable {
            file.sync_data().map_err(Error::io("syncing", temp))?;
        }
        fs::rename(temp, path).map_err(Error::io("publishing", path))
    }

    /// `err`, met doing `operation` to `key`, with the key and its file named (an invalid key
    /// has no file, and its error already says what is wrong with it).
    fn keyed(&self, operation: &'static str, key: &FileKey, err: Error) -> Error {
        match err {
            Error::InvalidKey { .. } => err,
            source => Error::Key {
                operation,
                key: Box::new(key.clone()),
                path: self.root.join(key.relative_path(self.shard_dirs)),
                source: Box::new(source),
            },
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
        temp.push(format!(
            "{TEMP_MARKER}{}.{:016x}.{seq}",
            std::process::id(),
            self.nonce
        ));
        let temp = PathBuf::from(temp);
        header::write(header.as_mut_slice(), &key.canonical(), page.as_slice()).map_err(
            |refusal| Error::InvalidKey {
                reason: refusal.to_string(),
            },
        )?;
        let (file, reused) = match self.reuse_recycled(&temp) {
            Some(file) => (file, true),
            None => (self.create_fresh(&temp)?, false),
        };
        let file = Arc::new(file);
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
            .and_then(|()| Ok(self.transport.register_file(Arc::clone(&file))?));
        match registered {
            Ok(registration) => Ok(Open {
                index,
                path,
                temp: Some(temp),
                file,
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
    /// not check out, with a warning), `Err` when the transfer itself failed, naming the key and
    /// its file.
    pub fn get(&self, items: &mut [(&FileKey, &mut Page)]) -> Vec<Result<bool>> {
        let mut results: Vec<Result<bool>> = (0..items.len()).map(|_| Ok(false)).collect();
        for start in (0..items.len()).step_by(self.max_open_files) {
            let end = (start + self.max_open_files).min(items.len());
            self.get_piece(items, start..end, &mut results);
        }
        results
            .into_iter()
            .zip(items.iter())
            .map(|(result, (key, _))| result.map_err(|err| self.keyed("loading", key, err)))
            .collect()
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
        let file = Arc::new(file);
        let registration = self.transport.register_file(Arc::clone(&file))?;
        Ok(Some(Open {
            index,
            path,
            temp: None,
            file,
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
                        header::verify(file.header.as_slice(), &key.canonical(), page.as_slice());
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

    /// Whether `key` is stored: its file exists, its header checks out (magic, header checksum,
    /// the key itself) and its size matches the header, so that a file torn by a power loss
    /// reads as absent. One 4 KiB read; the payload checksum is verified when the chunk is
    /// loaded.
    pub fn contains(&self, key: &FileKey) -> Result<bool> {
        Ok(self.stored_size(key)?.is_some())
    }

    /// The payload size recorded for `key`, if its file exists, its header checks out and its
    /// size matches the header (as [`contains`](Self::contains) checks).
    pub fn stored_size(&self, key: &FileKey) -> Result<Option<u64>> {
        self.checked_size(key)
            .map_err(|err| self.keyed("checking", key, err))
    }

    fn checked_size(&self, key: &FileKey) -> Result<Option<u64>> {
        let path = self.path_of(key)?;
        let Some((header, file_len)) = read_header(&path)? else {
            return Ok(None);
        };
        let refusal = match header::parse(&header) {
            Err(refusal) => refusal.to_string(),
            Ok((stored_key, _, _)) if stored_key != key.canonical().as_slice() => {
                Refusal::ForeignKey.to_string()
            }
            Ok((_, len, _)) if file_len != file_len_for(len) => format!(
                "{file_len} bytes long, but its header announces {len} payload bytes (torn or \
                 truncated)"
            ),
            Ok((_, len, _)) => return Ok(Some(len)),
        };
        tracing::warn!(
            file = %path.display(),
            reason = %refusal,
            "chunk file refused; treated as absent"
        );
        Ok(None)
    }

    /// Removes `key`'s file; `false` if there was none. The file is kept for reuse (renamed into
    /// the recycle folder, where no key reaches it) while the spares stay within
    /// [`DynamicConfig::recycle_bytes`].
    pub fn delete(&self, key: &FileKey) -> Result<bool> {
        self.delete_file(key)
            .map_err(|err| self.keyed("deleting", key, err))
    }

    fn delete_file(&self, key: &FileKey) -> Result<bool> {
        let path = self.path_of(key)?;
        {
            let len = fs::metadata(&path).map_or(u64::MAX, |m| m.len());
            let mut recycled = self.recycled.lock().unwrap_or_else(|p| p.into_inner());
            if recycled.bytes.saturating_add(len) <= self.recycle_bytes {
                let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
                let spare = self.root.join(RECYCLE_DIR).join(format!(
                    "{}-{:016x}-{seq}.bin",
                    std::process::id(),
                    self.nonce
                ));
                self.ensure_parent(&spare)?;
                match fs::rename(&path, &spare) {
                    Ok(()) => {
                        recycled.bytes += len;
                        recycled.files.push((spare, len));
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

    /// Removes the temporary files of interrupted writes, those whose writer is gone; returns
    /// how many. Temporaries that other live stores (of this process or another) are writing
    /// stay, and so does every key's file.
    pub fn remove_temporaries(&self) -> Result<usize> {
        let mut removed = 0;
        let mut releasing = Vec::new();
        for path in self.files()? {
            let Some(pid) = path.file_name().and_then(temp_owner) else {
                continue;
            };
            match temporary(&path, pid) {
                Ok(Temporary::Abandoned) => removed += usize::from(fs::remove_file(&path).is_ok()),
                Ok(Temporary::Live) => {}
                Ok(Temporary::Releasing) => releasing.push((path, pid)),
                Err(err) => tracing::warn!(
                    file = %path.display(),
                    error = %err,
                    "cannot tell whether the writer of this temporary is alive; kept"
                ),
            }
        }
        let deadline = Instant::now() + RELEASE_WAIT;
        while !releasing.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            releasing.retain(|(path, pid)| match temporary(path, *pid) {
                Ok(Temporary::Abandoned) => {
                    removed += usize::from(fs::remove_file(path).is_ok());
                    false
                }
                Ok(Temporary::Releasing) => true,
                Ok(Temporary::Live) | Err(_) => false,
            });
        }
        for (path, pid) in releasing {
            tracing::warn!(
                file = %path.display(),
                pid,
                "temporary still locked though its writer's pid is gone (a writer in another pid \
                 namespace?); kept"
            );
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
        for (file, _) in self
            .recycled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .files
            .drain(..)
        {
            let _ = fs::remove_file(file);
        }
    }
}

/// A random number per store; no OS call is needed: `RandomState` is seeded from the OS once
/// per thread and differs per instance, and the clock and pid set processes further apart.
fn store_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// The writer's pid in the name of a temporary (`<key's file name>.tmp.<pid>[.<hex>…]`), or
/// `None` for any other name. Every key's file name ends in `.bin` and no temporary's does, so
/// no key's name is taken for a temporary, whatever its model or salt contain.
fn temp_owner(name: &OsStr) -> Option<u32> {
    let name = name.to_str()?;
    if name.ends_with(".bin") {
        return None;
    }
    let (base, suffix) = name.rsplit_once(TEMP_MARKER)?;
    if !base.ends_with(".bin") {
        return None;
    }
    let mut fields = suffix.split('.');
    let pid = fields
        .next()
        .filter(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()?;
    fields
        .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(pid)
}

/// What an opening store may do with a temporary.
enum Temporary {
    /// Its writer is gone: remove it.
    Abandoned,
    /// Its writer may be alive (or it is gone already): leave it.
    Live,
    /// Locked, though no process has the pid in its name: a killed writer whose io_uring ring
    /// the kernel has not torn down yet still holds the file, and lets go shortly; or a live
    /// writer in another pid namespace, which never does. Wait a little, then leave it.
    Releasing,
}

/// How long an opening store waits for the locks of dead writers to go.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// The state of the temporary at `path`, named for writer `pid`. Its writer holds its lock from
/// before the file has any data until it is renamed or removed, so a lock we can take means the
/// writer is gone, unless the file is still empty: then it may have been created a moment ago
/// and not be locked yet, and it goes only once the pid is gone too.
fn temporary(path: &Path, pid: u32) -> std::io::Result<Temporary> {
    let file = match open_to_inspect(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Temporary::Live),
        Err(err) => return Err(err),
    };
    if !try_lock(&file)? {
        return Ok(if process_gone(pid) {
            Temporary::Releasing
        } else {
            Temporary::Live
        });
    }
    Ok(if file.metadata()?.len() > 0 || process_gone(pid) {
        Temporary::Abandoned
    } else {
        Temporary::Live
    })
}

/// Syncs every folder of `published` once; the items renamed into a folder that fails to sync
/// are reported failed (their files are whole, but might not survive a power loss).
fn sync_folders(published: BTreeMap<PathBuf, Vec<usize>>, results: &mut [Result<u64>]) {
    for (folder, indices) in published {
        if let Err(err) = sync_dir(&folder) {
            for index in indices {
                let source = match err.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(err.kind(), err.to_string()),
                };
                results[index] = Err(Error::Io {
                    operation: "syncing",
                    path: folder.clone(),
                    source,
                });
            }
        }
    }
}

/// The length of a chunk file whose payload is `payload_len` bytes.
fn file_len_for(payload_len: u64) -> u64 {
    (HEADER_BYTES as u64).saturating_add(payload_len.next_multiple_of(PAGE_ALIGN as u64))
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
/// needed): every file whose header checks out, whose name is its key's and whose size matches
/// its header. Anything else (foreign, torn, renamed, crafted) is skipped with a warning that
/// names the file; temporaries are skipped silently.
pub fn list_dir(root: &Path) -> Result<Vec<StoredChunk>> {
    let mut chunks = Vec::new();
    for path in chunk_files(root)? {
        if path.file_name().and_then(temp_owner).is_some() {
            continue;
        }
        match stored_chunk(&path) {
            Ok(chunk) => chunks.push(chunk),
            Err(reason) => tracing::warn!(
                file = %path.display(),
                %reason,
                "not a chunk file; skipped"
            ),
        }
    }
    chunks.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(chunks)
}

/// The chunk in the file at `path`, or why it is not one (for the warning).
fn stored_chunk(path: &Path) -> std::result::Result<StoredChunk, String> {
    let (header, file_len) = read_header(path)
        .map_err(|err| err.to_string())?
        .ok_or("shorter than a chunk header")?;
    let (stored_key, payload_len, _) = header::parse(&header).map_err(|r| r.to_string())?;
    let key = FileKey::from_canonical(stored_key).map_err(|err| err.to_string())?;
    if path.file_name() != Some(OsStr::new(&key.file_name())) {
        return Err(format!(
            "its header holds {key}, whose file has another name"
        ));
    }
    if file_len != file_len_for(payload_len) {
        return Err(format!(
            "{file_len} bytes long, but its header announces {payload_len} payload bytes"
        ));
    }
    Ok(StoredChunk {
        key,
        payload_len,
        path: path.to_path_buf(),
    })
}

/// The first 4 KiB of a regular file through buffered I/O and the file's length, or `None` when
/// it is absent, shorter, or not a regular file.
fn read_header(path: &Path) -> Result<Option<(Vec<u8>, u64)>> {
    use std::io::Read;
    let mut file = match open_to_inspect(path) {
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
    let meta = file
        .metadata()
        .map_err(Error::io("reading the size of", path))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let mut header = vec![0u8; HEADER_BYTES];
    match file.read_exact(&mut header) {
        Ok(()) => Ok(Some((header, meta.len()))),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(source) => Err(Error::Io {
            operation: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::key::tests::Rng;
    use crate::uring::{UringConfig, UringTransport};
    use nixl_core::TransportExt;

    /// Not a multiple of 4 KiB, so that padding is exercised.
    const CHUNK: usize = 8 * 1024 + 100;

    struct Fixture {
        transport: Arc<dyn Transport>,
        pool: Arc<PagePool>,
        _registration: Registration,
    }

    impl Fixture {
        fn new() -> Self {
            let transport: Arc<dyn Transport> =
                Arc::new(UringTransport::new(UringConfig::default()).unwrap());
            let pool = PoolConfig::new(CHUNK, 16 * CHUNK.next_multiple_of(PAGE_ALIGN) as u64)
                .build()
                .unwrap();
            let registration = transport.register_pool(&pool).unwrap();
            Self {
                transport,
                pool,
                _registration: registration,
            }
        }

        fn open(
            &self,
            dir: &Path,
            config: impl Fn(DynamicConfig) -> DynamicConfig,
        ) -> DynamicFileStore {
            DynamicFileStore::open(Arc::clone(&self.transport), config(DynamicConfig::new(dir)))
                .unwrap()
        }

        fn page(&self, fill: u8) -> Page {
            let mut page = self.pool.allocate().unwrap();
            page.as_mut_slice().fill(fill);
            page
        }

        /// `Ok(true)` only when every byte is the one stored.
        fn get(&self, store: &DynamicFileStore, key: &FileKey, fill: u8) -> Result<bool> {
            let mut page = self.page(!fill);
            let hit = store.get(&mut [(key, &mut page)]).remove(0)?;
            Ok(hit && page.as_slice().iter().all(|&b| b == fill))
        }
    }

    fn key(model: &str, salt: Option<&str>) -> FileKey {
        FileKey {
            model: model.to_owned(),
            kv_rank: 1,
            group_id: 2,
            chunk_hash: vec![0xde, 0xad, 0xbe, 0xef],
            cache_salt: salt.map(str::to_owned),
        }
    }

    #[test]
    fn an_in_flight_temporary_survives_another_store_opening_and_goes_once_abandoned() {
        let fixture = Fixture::new();
        let dir = tempfile::tempdir().unwrap();
        let writer = fixture.open(dir.path(), |c| c);
        let k = key("org/m", None);
        let page = fixture.page(7);
        let header = writer.headers.allocate().unwrap();
        let open = writer.create_temp(0, &k, &page, header).unwrap();
        let temp = open.temp.clone().unwrap();
        assert_eq!(
            temp_owner(temp.file_name().unwrap()),
            Some(std::process::id())
        );

        let other = fixture.open(dir.path(), |c| c);
        assert_ne!(other.nonce, writer.nonce);
        assert!(temp.exists(), "another store's open removed a live write");
        assert_eq!(other.remove_temporaries().unwrap(), 0);
        writer.publish(&open.file, &temp, &open.path).unwrap();
        assert!(
            open.path.exists() && !temp.exists(),
            "the live write published"
        );
        drop(open);
        assert_eq!(
            other.stored_size(&k).unwrap(),
            None,
            "no transfer ran: its header is zeros, so it reads as absent"
        );

        // A writer that dies leaves its temporary unlocked: the next open removes it.
        let header = writer.headers.allocate().unwrap();
        let open = writer.create_temp(0, &k, &page, header).unwrap();
        let temp = open.temp.clone().unwrap();
        drop(open);
        assert!(temp.exists());
        assert_eq!(other.remove_temporaries().unwrap(), 1);
        assert!(!temp.exists());
    }

    /// A writer in another pid namespace has a pid this process cannot see: its lock alone
    /// keeps its temporary (after a short wait, for killed writers whose ring lets go late).
    #[test]
    fn a_locked_temporary_stays_though_its_pid_is_unknown_here() {
        let fixture = Fixture::new();
        let dir = tempfile::tempdir().unwrap();
        let temp = dir
            .path()
            .join(format!("m_00000001_2_ab.bin{TEMP_MARKER}{}.0.1", u32::MAX));
        fs::write(&temp, b"partial").unwrap();
        let holder = File::open(&temp).unwrap();
        assert!(try_lock(&holder).unwrap());
        let store = fixture.open(dir.path(), |c| c);
        assert!(temp.exists(), "a locked temporary was removed");
        drop(holder);
        assert_eq!(store.remove_temporaries().unwrap(), 1, "unlocked, it goes");
    }

    #[test]
    fn durable_stores_round_trip_and_survive_a_reopen() {
        let fixture = Fixture::new();
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<FileKey> = (0..5u8)
            .map(|i| FileKey {
                chunk_hash: vec![i, i],
                ..key("org/durable", None)
            })
            .collect();
        let store = fixture.open(dir.path(), |c| c.with_durable(true).with_shard_dirs(true));
        let pages: Vec<Page> = (0..5).map(|i| fixture.page(i)).collect();
        let items: Vec<_> = keys.iter().zip(&pages).collect();
        for result in store.put(&items) {
            assert_eq!(result.unwrap(), CHUNK as u64);
        }
        drop(store);
        let store = fixture.open(dir.path(), |c| c.with_durable(true).with_shard_dirs(true));
        for (i, k) in keys.iter().enumerate() {
            assert!(fixture.get(&store, k, i as u8).unwrap(), "{k}");
        }
    }

    /// 200 000 names: no key's file name is taken for a temporary, every temporary's name gives
    /// back its writer's pid, and no name, however mangled, panics the parser.
    #[test]
    fn temporary_and_key_names_never_mix_and_never_panic() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for round in 0..200_000u32 {
            let key = rng.key();
            let name = key.file_name();
            assert_eq!(
                temp_owner(OsStr::new(&name)),
                None,
                "{name:?} read as a temporary"
            );
            let pid = rng.next() as u32;
            let temp = format!(
                "{name}{TEMP_MARKER}{pid}.{:016x}.{}",
                rng.next(),
                rng.next() % 1000
            );
            assert_eq!(temp_owner(OsStr::new(&temp)), Some(pid), "{temp:?}");
            let mut mangled = if round % 2 == 0 { temp } else { name }.into_bytes();
            rng.mutate(&mut mangled);
            let mangled: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(mangled);
            let _ = std::panic::catch_unwind(|| temp_owner(&mangled))
                .unwrap_or_else(|_| panic!("temp_owner panicked on {mangled:?}"));
        }
    }

    /// Files with crafted headers (valid checksums around mutated keys, non-ASCII hex, lengths
    /// that lie) and crafted names: `list_dir` never panics, and lists only files whose header,
    /// name and size agree.
    #[test]
    fn crafted_files_never_panic_list_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(0xC0FF_EE00_D15E_A5E5);
        // The finding: a well-formed header whose key has a multi-byte character in its hash.
        let mut crafted = vec![0u8; HEADER_BYTES];
        header::write(&mut crafted, "m\x001\x000\x00\u{20ac}a\x00".as_bytes(), &[]).unwrap();
        fs::write(dir.path().join("m_00000001_0_e282aca.bin"), &crafted).unwrap();
        assert!(list_dir(dir.path()).unwrap().is_empty());
        for round in 0..40 {
            for i in 0..50 {
                let key = rng.key();
                let mut canonical = key.canonical();
                if rng.below(3) > 0 {
                    rng.mutate(&mut canonical);
                }
                canonical.truncate(MAX_KEY_BYTES);
                let payload_len = rng.below(3 * PAGE_ALIGN);
                let mut bytes = vec![0u8; HEADER_BYTES];
                header::write(&mut bytes, &canonical, &vec![0; payload_len]).unwrap();
                if rng.below(4) == 0 {
                    rng.mutate(&mut bytes);
                }
                bytes.resize(
                    match rng.below(3) {
                        0 => file_len_for(payload_len as u64) as usize,
                        1 => bytes.len(),
                        _ => rng.below(HEADER_BYTES * 2),
                    },
                    0,
                );
                let name = match rng.below(3) {
                    0 => key.file_name(),
                    1 => format!("{}{TEMP_MARKER}1.{i}", key.file_name()),
                    _ => format!("{i}{}", rng.text(8).replace('/', "-")),
                };
                let folder = dir.path().join(round.to_string());
                fs::create_dir_all(&folder).unwrap();
                fs::write(folder.join(&name), &bytes).unwrap();
            }
            let listed = std::panic::catch_unwind(|| list_dir(dir.path()))
                .unwrap_or_else(|_| panic!("list_dir panicked in round {round}"))
                .unwrap();
            for chunk in listed {
                assert_eq!(
                    chunk.path.file_name(),
                    Some(OsStr::new(&chunk.key.file_name()))
                );
            }
        }
    }
}
