//! Segment mode: a few large preallocated segment files, opened and registered with the
//! transport once, into which chunks are appended. No file is opened, created, registered or
//! renamed per key; a batch of puts goes out as one transfer; capacity is exact, because the
//! segment files are all the store ever has on disk.
//!
//! # On-disk format
//!
//! Every configured folder holds `segments.lock` (the writer's `flock`, with its pid in it) and
//! its share of the segment files `seg-NNNNNN.kvseg`: segment `i` is made in folder
//! `i % folders` (round-robin striping), and found at open in whichever configured folder holds
//! it, so folders may be reordered or added. A segment file is
//! [`SegmentConfig::segment_bytes`] long and made of 4 KiB blocks:
//!
//! - block 0, the segment header: written each time the segment is (re)started, it carries a
//!   random 64-bit *salt* and a generation number;
//! - from block 1 on, entries, back to back: a 4 KiB entry header, then the payload padded to
//!   4 KiB.
//!
//! Every header (segment or entry) is nixl-core's chunk header ([`nixl_core::header`]: magic,
//! version, payload length, xxh3 payload checksum, xxh3 header checksum) whose key field starts
//! with this module's 48-byte *frame*: magic `KVL2SEG1`, kind (data, erased, segment), the
//! segment's salt, the sequence number, the entry's length on disk, and an FNV-1a checksum of
//! the frame itself. The full key ([`FileKey::canonical`]) follows the frame. The frame lies in
//! the block's first 512-byte sector, so a header torn at a sector boundary still tells how long
//! its entry is.
//!
//! # Recovery
//!
//! [`SegmentStore::open`] reads headers only: per segment, its header, then entry headers from
//! block 1, jumping by each frame's length, until a frame that does not check out or carries
//! another salt (bytes of an older generation, or never written). An entry whose frame checks
//! out but whose full header does not (torn, foreign) is skipped with a warning. Of several
//! entries of one key the newest sequence number wins; the writer erases the others (a failed
//! erase is a warning: the next open settles them again).
//!
//! Opening never deletes data: a segment whose own header records another size than the
//! configured one is refused ([`Error::SegmentSize`]), and so is a segment file beyond the
//! configured capacity ([`Error::BeyondCapacity`]).
//!
//! A segment with a write that timed out (it may still land), a failed write whose space could
//! not be marked, or a failed segment-header write is *poisoned*: sealed and never reused in
//! this process; what was written before the failure is still served.
//!
//! For that walk to reach every entry, a `put` returns only once every entry reserved before
//! its own in the same segment is written (or, when its transfer failed, replaced by an erased
//! header of the same length): the written prefix of a segment never has a hole. With
//! [`SegmentConfig::durable`] the segment files are `fdatasync`ed before a `put` or `delete`
//! returns.
//!
//! # Deletes and overwrites
//!
//! A delete rewrites the entry's header in place as an *erased* header of the same length, and
//! an overwrite does the same to the version it replaces, once the new one is written. So at
//! most one entry per key checks out on disk (two only for an overwrite a crash interrupted,
//! which the next open settles: newest wins), and no tombstone has to outlive anything. A
//! segment whose live bytes reach zero holds only erased entries and is reused by writing a new
//! segment header (a new salt), which retires all of its old entries at once.
//!
//! # Space
//!
//! The segment count is `capacity_bytes / segment_bytes`. A segment's file is made (created,
//! preallocated, registered) when the segment first takes entries, so a store takes disk space
//! as it fills and never more than its capacity; opening one opens only the files already
//! there. Appends go to one open segment; a full one is sealed. The next segment is a sealed
//! one without live bytes, loads or erases in flight if there is one, else a new file; when
//! there is none, `put` fails with [`Error::NoSpace`] (or [`Error::DiskFull`] when the file
//! system had no room for a new file): the layer above evicts by its policy
//! ([`delete`](SegmentStore::delete), with [`list`](SegmentStore::list) giving each key's write
//! order and segment) and tries again. Segments found at open are sealed, never appended to.
//!
//! # Readers
//!
//! A load counts itself on its segment, which is not reused while the count is not zero, and
//! verifies the header it reads back (frame, salt, sequence, key, length) and the payload
//! checksum: whatever does not check out is a miss (its page left empty), and leaves the index
//! (the writer also erases it), so that it no longer pins its segment.
//! [`SegmentStore::open_read_only`] works
//! beside a live writer on the same folders: its index is the one found at open, and since the
//! writer may reuse segments meanwhile, its loads rely on that verification alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nixl_core::header::{self, HEADER_BYTES, MAX_KEY_BYTES};
use nixl_core::{PageView, Registration, StorageExtent, Transport, TransportExt};
use pinned_alloc::{LockMode, PAGE_ALIGN, Page, PagePool, PoolConfig};

use crate::error::{Error, Result};
use crate::key::FileKey;
use crate::open::{FileOptions, open_storage_file, try_lock};

/// Default bytes of one segment file: 256 MiB of payload plus 64 KiB of header room.
///
/// At the default 32 MiB chunks (llama-3.1-8b, 256 tokens) exactly eight chunks with their 4 KiB
/// headers fit (a plain 256 MiB would hold seven and waste 12.5%), and at 256 KiB chunks about
/// 1 000, wasting at most one chunk's tail (0.1%). Space comes back a segment at a time, so the
/// reclaim unit is 0.2% of a 128 GiB store, which then needs 512 files, each registered once:
/// few enough for io_uring's fixed-file table and NIXL's registrations. Smaller segments would
/// waste more of each at 32 MiB chunks; larger ones would free space more coarsely.
pub const DEFAULT_SEGMENT_BYTES: u64 = (256 << 20) + (64 << 10);
/// Default capacity: 16 default segments (about 4 GiB).
pub const DEFAULT_CAPACITY_BYTES: u64 = 16 * DEFAULT_SEGMENT_BYTES;

const BLOCK: u64 = HEADER_BYTES as u64;
/// Where the key field of nixl-core's header starts, and with it this module's frame.
const FRAME_AT: usize = HEADER_BYTES - MAX_KEY_BYTES;
const FRAME_BYTES: usize = 48;
const FRAME_MAGIC: &[u8; 8] = b"KVL2SEG1";
/// Longest canonical key an entry header holds.
const MAX_SEGMENT_KEY: usize = MAX_KEY_BYTES - FRAME_BYTES;
const LOCK_FILE: &str = "segments.lock";
/// Items per transfer batch; a longer call goes as several batches, one after another. 128: a
/// 32k-token request's chunks (LMCache's 256-token chunks) in one transfer; 256 measured no
/// faster at 256 KiB chunks.
const MAX_BATCH: usize = 128;
/// Header buffers: room for several batches at once.
const HEADER_PAGES: u64 = 8 * MAX_BATCH as u64;
/// How long a batch waits for header buffers held by other batches.
const HEADER_WAIT: Duration = Duration::from_secs(30);
/// How long a `put` waits for the entries reserved before its own in its segment to be written.
const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// Header pages retired by timed-out transfers after which the header pool is replaced.
const REPLACE_HEADERS_AT: usize = MAX_BATCH;
/// Threads that read headers at open: each walks one segment's chain of headers (one
/// synchronous 4 KiB read per entry), so more threads keep more reads in flight.
const SCAN_THREADS: usize = 32;
/// How often a recovery that takes long says how far it has got.
const SCAN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// What a header block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A chunk's entry header.
    Data = 1,
    /// An entry deleted or replaced: only its length counts.
    Erased = 2,
    /// A segment header (block 0).
    Segment = 3,
}

/// The frame at the start of every header's key field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    kind: Kind,
    /// The segment's salt: entries of an older generation carry another.
    salt: u64,
    /// Entries: the sequence number. Segment headers: the generation.
    seq: u64,
    /// Entries: bytes on disk, header included. Segment headers: the segment's bytes.
    len: u64,
}

impl Frame {
    fn encode(&self) -> [u8; FRAME_BYTES] {
        let mut out = [0u8; FRAME_BYTES];
        out[0..8].copy_from_slice(FRAME_MAGIC);
        out[8..12].copy_from_slice(&(self.kind as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.salt.to_le_bytes());
        out[24..32].copy_from_slice(&self.seq.to_le_bytes());
        out[32..40].copy_from_slice(&self.len.to_le_bytes());
        let checksum = fnv1a(&out[..40]);
        out[40..48].copy_from_slice(&checksum.to_le_bytes());
        out
    }

    /// The frame in `bytes`, if its magic and checksum check out.
    fn decode(bytes: &[u8]) -> Option<Frame> {
        let bytes = bytes.get(..FRAME_BYTES)?;
        if &bytes[0..8] != FRAME_MAGIC || u64_at(bytes, 40)? != fnv1a(&bytes[..40]) {
            return None;
        }
        let kind = match u32::from_le_bytes(bytes[8..12].try_into().ok()?) {
            1 => Kind::Data,
            2 => Kind::Erased,
            3 => Kind::Segment,
            _ => return None,
        };
        Some(Frame {
            kind,
            salt: u64_at(bytes, 16)?,
            seq: u64_at(bytes, 24)?,
            len: u64_at(bytes, 32)?,
        })
    }

    /// The frame of a header block, read without checking the rest of the header.
    fn of_block(block: &[u8]) -> Option<Frame> {
        Frame::decode(block.get(FRAME_AT..)?)
    }
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// FNV-1a, 64 bits: a checksum of the 40-byte frame against tearing (the header as a whole is
/// covered by nixl-core's xxh3 header checksum).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills a header block: nixl-core's chunk header whose key field is `frame` then `key`.
fn write_block(out: &mut [u8], frame: Frame, key: &[u8], payload: &[u8]) -> Result<()> {
    let mut field = Vec::with_capacity(FRAME_BYTES + key.len());
    field.extend_from_slice(&frame.encode());
    field.extend_from_slice(key);
    header::write(out, &field, payload).map_err(|refusal| Error::InvalidKey {
        reason: refusal.to_string(),
    })
}

/// A header block that checks out whole: its frame, key, payload length and payload checksum.
fn parse_block(block: &[u8]) -> Option<(Frame, &[u8], u64, u64)> {
    let (field, payload_len, checksum) = header::parse(block).ok()?;
    let frame = Frame::decode(field)?;
    if Frame::of_block(block) != Some(frame) {
        return None;
    }
    Some((frame, &field[FRAME_BYTES..], payload_len, checksum))
}

/// Bytes on disk of an entry whose payload is `payload` bytes.
fn entry_len(payload: u64) -> u64 {
    BLOCK + payload.next_multiple_of(BLOCK)
}

/// A fresh random salt (`RandomState` is seeded from the OS, and differs per instance).
fn random_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_usize(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

/// Configuration of a [`SegmentStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentConfig {
    /// The folders; segments are striped over them round-robin.
    pub paths: Vec<PathBuf>,
    /// Bytes of one segment file (a multiple of 4 KiB); see [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// Bytes on disk, all folders together: `capacity_bytes / segment_bytes` segments.
    pub capacity_bytes: u64,
    /// Open the segment files with `O_DIRECT` (buffered where a folder refuses it).
    pub direct_io: bool,
    /// `fdatasync` the segment files before a `put` or `delete` returns, so that what it
    /// reported survives a power loss. Off by default, as in LMCache: a SIGKILL loses nothing
    /// either way, and checksums keep what a power loss tears from being served.
    pub durable: bool,
}

impl SegmentConfig {
    /// Default segments and capacity over `paths`, buffered, not durable.
    pub fn new<P: Into<PathBuf>>(paths: impl IntoIterator<Item = P>) -> Self {
        Self {
            paths: paths.into_iter().map(Into::into).collect(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            direct_io: false,
            durable: false,
        }
    }

    /// Bytes of one segment file.
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// Bytes on disk in all.
    pub fn with_capacity_bytes(mut self, bytes: u64) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// Asks for `O_DIRECT`.
    pub fn with_direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }

    /// Syncs before returning (see [`durable`](SegmentConfig::durable)).
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    fn segments(&self) -> Result<usize> {
        if self.paths.is_empty() {
            return Err(Error::Config("a segment store needs a folder".to_owned()));
        }
        if self.segment_bytes < 2 * BLOCK || self.segment_bytes % BLOCK != 0 {
            return Err(Error::Config(format!(
                "segment_bytes ({}) must be a multiple of 4096 and at least 8192",
                self.segment_bytes
            )));
        }
        let count = self.capacity_bytes / self.segment_bytes;
        if count == 0 {
            return Err(Error::Config(format!(
                "capacity_bytes ({}) holds no segment of {} bytes",
                self.capacity_bytes, self.segment_bytes
            )));
        }
        usize::try_from(count)
            .ok()
            .filter(|&c| c <= 1_000_000)
            .ok_or_else(|| Error::Config(format!("{count} segments are too many")))
    }
}

/// One chunk of a [`SegmentStore`], as [`list`](SegmentStore::list) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentChunk {
    /// The key.
    pub key: FileKey,
    /// Payload bytes.
    pub payload_len: u64,
    /// Its sequence number: the store's write order (also across restarts).
    pub seq: u64,
    /// The segment holding it; a segment comes free once all of its chunks are deleted.
    pub segment: u32,
}

/// Space of a [`SegmentStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentUsage {
    /// Bytes on disk: every segment file.
    pub capacity_bytes: u64,
    /// Bytes of one segment.
    pub segment_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Segments that a `put` can start now (free, or holding nothing live).
    pub free_segments: usize,
    /// Bytes of live entries (headers and padded payloads).
    pub live_bytes: u64,
    /// Bytes of deleted or replaced entries, and the unusable tails of full segments: what
    /// comes back once their segments hold nothing live.
    pub dead_bytes: u64,
    /// Keys stored.
    pub keys: usize,
    /// Bytes the segment files made so far take: files are made as segments first take
    /// entries, up to `capacity_bytes`.
    pub file_bytes: u64,
}

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seg: u32,
    offset: u64,
    /// Bytes on disk, header included.
    len: u64,
    payload: u64,
    seq: u64,
    salt: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No valid header: holds nothing.
    Free,
    /// Its header is being written.
    Opening,
    /// Takes appends.
    Open,
    /// Full, or found at open: takes no appends, reused once nothing in it is live.
    Sealed,
}

#[derive(Debug)]
struct Seg {
    phase: Phase,
    salt: u64,
    /// Where the next entry goes.
    write_ptr: u64,
    /// Reservations not yet written, by offset: their end, and whether they are done.
    pending: BTreeMap<u64, (u64, bool)>,
    /// Every byte below it is a written entry (or an erased header over a failed one).
    frontier: u64,
    /// A failed write whose space could not be marked: nothing past it can be reached.
    poisoned: bool,
    live: u64,
    /// Loads, in-place erases and unpublished reservations in flight.
    pins: u32,
}

impl Seg {
    fn free() -> Self {
        Self {
            phase: Phase::Free,
            salt: 0,
            write_ptr: BLOCK,
            pending: BTreeMap::new(),
            frontier: BLOCK,
            poisoned: false,
            live: 0,
            pins: 0,
        }
    }

    fn reusable(&self) -> bool {
        if self.poisoned {
            return false;
        }
        match self.phase {
            Phase::Free => true,
            Phase::Sealed => self.live == 0 && self.pins == 0 && self.pending.is_empty(),
            Phase::Opening | Phase::Open => false,
        }
    }

    fn advance(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            let (end, done) = *entry.get();
            if !done {
                break;
            }
            entry.remove();
            self.frontier = end;
        }
        if self.pending.is_empty() {
            self.frontier = self.write_ptr;
        }
    }
}

#[derive(Debug)]
struct State {
    index: HashMap<FileKey, Loc>,
    segs: Vec<Seg>,
    open: Option<u32>,
    opening: bool,
    next_seq: u64,
}

/// One segment's file: its path always, the file itself once made.
#[derive(Debug)]
struct SegFile {
    path: PathBuf,
    /// `O_DIRECT` for this file (its folder's answer).
    direct_io: bool,
    /// Set when the segment is first opened for appends (or found at open), never unset: only
    /// segments that take entries take disk space.
    made: OnceLock<MadeFile>,
}

#[derive(Debug)]
struct MadeFile {
    file: Arc<File>,
    registration: Registration,
}

/// The device id of a segment whose file is not made yet. Registrations of files carry their
/// descriptor (never this), so a transfer naming it is refused as unregistered storage instead
/// of reaching another file. No entry can be in such a segment: entries are reserved only in
/// segments whose file is made.
const NO_FILE: u64 = u64::MAX;

impl SegFile {
    fn dev_id(&self) -> u64 {
        self.made.get().map_or(NO_FILE, |m| m.registration.dev_id())
    }

    /// `fdatasync`; nothing to do for a file not made.
    fn sync_data(&self) -> io::Result<()> {
        self.made.get().map_or(Ok(()), |m| m.file.sync_data())
    }
}

/// A reservation: where one entry of a `put` goes.
#[derive(Debug, Clone, Copy)]
struct Resv {
    seg: u32,
    offset: u64,
    len: u64,
    seq: u64,
    salt: u64,
}

/// Chunks appended to preallocated segment files, through any [`Transport`]. See the
/// module documentation of `segment.rs` for the format, recovery and space.
#[derive(Debug)]
pub struct SegmentStore {
    transport: Arc<dyn Transport>,
    files: Vec<SegFile>,
    segment_bytes: u64,
    capacity_bytes: u64,
    durable: bool,
    read_only: bool,
    direct_io: bool,
    state: Mutex<State>,
    changed: Condvar,
    /// The header buffer for segment headers: one segment opens at a time, and it must never
    /// wait for buffers that batches waiting on the opening hold. Replaced when a timed-out
    /// write retires it.
    segment_page: Mutex<Page>,
    headers: Mutex<Headers>,
    _locks: Vec<File>,
}

/// The header buffers of batches: a registered pool, replaced by a fresh one once timed-out
/// transfers have retired [`REPLACE_HEADERS_AT`] of its pages (a retired page never returns).
#[derive(Debug)]
struct Headers {
    current: Arc<PagePool>,
    /// Every registration made for header buffers: a retired page may still be in an engine's
    /// hands, so none is dropped before the store.
    registrations: Vec<Registration>,
}

/// A registered pool of `pages` header buffers.
fn header_pool(transport: &dyn Transport, pages: u64) -> Result<(Arc<PagePool>, Registration)> {
    let pool = PoolConfig::new(HEADER_BYTES, pages * BLOCK)
        .with_lock(LockMode::BestEffort)
        .build()
        .map_err(|e| Error::Config(format!("header buffers: {e}")))?;
    let registration = transport.register_pool(&pool)?;
    Ok((pool, registration))
}

/// Whether a failed transfer may have left the engine with its buffers, or with a write that
/// may still land: its segments are then never reused in this process.
fn timed_out(err: &nixl_core::Error) -> bool {
    err.memory_abandoned() || err.is_timeout()
}

/// The reservations of one `put` batch: until they are marked ([`Reserved::marked`]), dropping
/// them (a panic) poisons their segments, so that later entries there fail instead of waiting
/// for them for ever; their pins go when they are released or dropped.
struct Reserved<'a> {
    store: &'a SegmentStore,
    resvs: Vec<Resv>,
    marked: bool,
}

impl Reserved<'_> {
    fn release(mut self) {
        self.unpin();
    }

    fn unpin(&mut self) {
        let segs: Vec<u32> = self.resvs.drain(..).map(|r| r.seg).collect();
        if !segs.is_empty() {
            self.store.unpin_segments(&segs);
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if !self.marked && !self.resvs.is_empty() {
            tracing::error!(
                entries = self.resvs.len(),
                "a put ended before its reservations were written or marked; their segments \
                 take no more entries"
            );
            self.store
                .poison(self.resvs.iter().map(|r| r.seg).collect::<Vec<_>>());
        }
        self.unpin();
    }
}

/// What scanning one segment found.
#[derive(Debug)]
struct Scan {
    salt: u64,
    generation: u64,
    /// The highest sequence number of every frame of this generation the walk read, erased
    /// ones included.
    max_seq: u64,
    end: u64,
    records: Vec<(FileKey, Loc)>,
}

impl SegmentStore {
    /// Opens the store as its folders' one writer: takes each folder's lock (refusing, with
    /// [`Error::FolderLocked`], a folder another store holds), opens and registers the segment
    /// files already there (the others are made as segments first take entries), and rebuilds
    /// the index from the headers on disk.
    pub fn open(transport: Arc<dyn Transport>, config: SegmentConfig) -> Result<Self> {
        let count = config.segments()?;
        let folders = unique(&config.paths);
        let mut locks = Vec::with_capacity(folders.len());
        let mut direct = HashMap::new();
        for folder in &folders {
            fs::create_dir_all(folder).map_err(Error::io("creating", folder))?;
            locks.push(lock_folder(folder)?);
            remove_half_made(folder);
            let supported = config.direct_io
                && nixl_core::direct_io_supported(folder).map_err(Error::Transport)?;
            direct.insert(folder.clone(), supported);
        }
        // Each segment is wherever a configured folder holds it (folders may have been
        // reordered or added since it was made); only missing ones are made, in their folder.
        // Nothing found is ever removed or resized away: a file that does not fit this
        // configuration is refused, naming it.
        let mut found: HashMap<usize, PathBuf> = HashMap::new();
        for folder in &folders {
            for (id, path) in segment_files(folder)? {
                if id >= count {
                    return Err(Error::BeyondCapacity {
                        path,
                        id,
                        segments: count,
                        capacity_bytes: config.capacity_bytes,
                    });
                }
                if let Some(other) = found.insert(id, path.clone()) {
                    return Err(Error::Config(format!(
                        "segment {id} is in two folders, {} and {}: remove the stale copy",
                        other.display(),
                        path.display()
                    )));
                }
            }
        }
        let paths: Vec<PathBuf> = (0..count)
            .map(|id| {
                found
                    .remove(&id)
                    .unwrap_or_else(|| segment_path(&config.paths, id))
            })
            .collect();
        for path in &paths {
            check_segment_size(path, config.segment_bytes)?;
        }
        warn_if_short_of_room(&config, &paths)?;
        let folder_direct = |path: &Path| {
            path.parent()
                .and_then(|folder| direct.get(folder))
                .copied()
                .unwrap_or(false)
        };
        // Only the segment files already there are opened now; the others are made when their
        // segment first takes entries.
        let mut files = Vec::with_capacity(count);
        let mut all_direct = true;
        for path in paths {
            let direct_io = folder_direct(&path);
            all_direct &= direct_io;
            if !path.exists() {
                files.push((path, direct_io, None));
                continue;
            }
            let file = open_storage_file(
                &path,
                FileOptions::new()
                    .with_direct_io(direct_io)
                    .with_preallocate(config.segment_bytes),
            )?;
            let len = file
                .metadata()
                .map_err(Error::io("reading the size of", &path))?
                .len();
            if len != config.segment_bytes {
                // Its segment header, if any, records the configured size (checked above): the
                // file was cut short or grown. Bytes past its end read as zeros, which end the
                // walk; nothing before is lost.
                tracing::warn!(
                    file = %path.display(),
                    len,
                    segment_bytes = config.segment_bytes,
                    "segment file of another length than its segment; set to its segment's"
                );
                file.set_len(config.segment_bytes)
                    .map_err(Error::io("resizing", &path))?;
            }
            files.push((path, direct_io, Some(Arc::new(file))));
        }
        let present: Vec<usize> = (0..files.len()).filter(|&i| files[i].2.is_some()).collect();
        let found_scans = scan_all(
            present.iter().map(|&i| files[i].0.clone()).collect(),
            Some(config.segment_bytes),
        );
        let mut scans: Vec<Option<Scan>> = (0..files.len()).map(|_| None).collect();
        for (id, scan) in present.into_iter().zip(found_scans) {
            scans[id] = scan;
        }
        let store = Self::assemble(transport, files, scans, &config, false, all_direct, locks)?;
        Ok(store)
    }

    /// Opens the store to read only, beside a live writer or none: takes no lock, creates
    /// nothing, and rebuilds the index from the headers of every segment file found in the
    /// folders. Its loads verify every header and payload against the index; what does not
    /// check out (a segment the writer has reused since) is a miss. `put` and `delete` are
    /// refused with [`Error::ReadOnly`].
    pub fn open_read_only(transport: Arc<dyn Transport>, config: SegmentConfig) -> Result<Self> {
        if config.paths.is_empty() {
            return Err(Error::Config("a segment store needs a folder".to_owned()));
        }
        let mut found = Vec::new();
        for folder in unique(&config.paths) {
            found.extend(segment_files(&folder)?);
        }
        found.sort();
        let mut files = Vec::with_capacity(found.len());
        let mut all_direct = config.direct_io;
        for (_, path) in found {
            let (file, direct_io) = open_for_reading(&path, config.direct_io)?;
            all_direct &= direct_io;
            files.push((path, direct_io, Some(Arc::new(file))));
        }
        let scans = scan_all(files.iter().map(|(path, ..)| path.clone()).collect(), None);
        Self::assemble(
            transport,
            files,
            scans,
            &config,
            true,
            all_direct,
            Vec::new(),
        )
    }

    fn assemble(
        transport: Arc<dyn Transport>,
        files: Vec<(PathBuf, bool, Option<Arc<File>>)>,
        scans: Vec<Option<Scan>>,
        config: &SegmentConfig,
        read_only: bool,
        direct_io: bool,
        locks: Vec<File>,
    ) -> Result<Self> {
        let (headers, headers_registration) = header_pool(&*transport, HEADER_PAGES)?;
        let segment_page = headers
            .allocate()
            .ok_or_else(|| Error::Config("header buffers: no page".to_owned()))?;
        let mut registered = Vec::with_capacity(files.len());
        for (path, direct_io, file) in files {
            let made = OnceLock::new();
            if let Some(file) = file {
                let registration = transport.register_file(Arc::clone(&file))?;
                let _ = made.set(MadeFile { file, registration });
            }
            registered.push(SegFile {
                path,
                direct_io,
                made,
            });
        }
        let mut segs: Vec<Seg> = (0..registered.len()).map(|_| Seg::free()).collect();
        let mut index: HashMap<FileKey, Loc> = HashMap::new();
        let mut stale = Vec::new();
        let mut next_seq = 1;
        for (id, scan) in scans.into_iter().enumerate() {
            let Some(scan) = scan else { continue };
            let seg = &mut segs[id];
            seg.phase = Phase::Sealed;
            seg.salt = scan.salt;
            seg.write_ptr = scan.end;
            seg.frontier = scan.end;
            next_seq = next_seq
                .max(scan.generation.saturating_add(1))
                .max(scan.max_seq.saturating_add(1));
            for (key, mut loc) in scan.records {
                loc.seg = id as u32;
                next_seq = next_seq.max(loc.seq.saturating_add(1));
                match index.get(&key) {
                    Some(old) if old.seq > loc.seq => stale.push(loc),
                    _ => {
                        if let Some(old) = index.insert(key, loc) {
                            stale.push(old);
                        }
                    }
                }
            }
        }
        for loc in index.values() {
            segs[loc.seg as usize].live += loc.len;
        }
        let store = Self {
            transport,
            files: registered,
            segment_bytes: config.segment_bytes,
            capacity_bytes: config.capacity_bytes,
            durable: config.durable,
            read_only,
            direct_io,
            state: Mutex::new(State {
                index,
                segs,
                open: None,
                opening: false,
                next_seq,
            }),
            changed: Condvar::new(),
            segment_page: Mutex::new(segment_page),
            headers: Mutex::new(Headers {
                current: headers,
                registrations: vec![headers_registration],
            }),
            _locks: locks,
        };
        if !read_only && !stale.is_empty() {
            tracing::warn!(
                entries = stale.len(),
                "older versions of keys left by an interrupted overwrite; erased"
            );
            if let Err(err) = store.erase(&stale) {
                // Not fatal: the newest version is the one indexed, and the next open settles
                // the duplicates again.
                tracing::warn!(
                    error = %err,
                    "erasing older versions failed; they are settled again at the next open"
                );
            }
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the segment files are opened with `O_DIRECT` (after the folders' fallback).
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Whether this store was opened with [`open_read_only`](Self::open_read_only).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn extent(&self, seg: u32, offset: u64) -> StorageExtent {
        StorageExtent::new(self.files[seg as usize].dev_id(), offset)
    }

    fn key_error(
        &self,
        operation: &'static str,
        key: &FileKey,
        seg: Option<u32>,
        err: Error,
    ) -> Error {
        match err {
            Error::InvalidKey { .. }
            | Error::NoSpace { .. }
            | Error::DiskFull { .. }
            | Error::ReadOnly { .. } => err,
            source => Error::Key {
                operation,
                key: Box::new(key.clone()),
                path: seg
                    .and_then(|s| self.files.get(s as usize))
                    .map(|f| f.path.clone())
                    .unwrap_or_default(),
                source: Box::new(source),
            },
        }
    }

    fn checked_key(&self, key: &FileKey) -> Result<Vec<u8>> {
        key.validate()?;
        let canonical = key.canonical();
        if canonical.len() > MAX_SEGMENT_KEY {
            return Err(Error::InvalidKey {
                reason: format!("a segment key is at most {MAX_SEGMENT_KEY} bytes"),
            });
        }
        Ok(canonical)
    }

    /// Stores every page under its key, appended to the open segment (a batch as one transfer).
    /// One result per item: the bytes stored, or why not ([`Error::NoSpace`] when no segment
    /// can take it: evict, then try again). A key is visible, and `Ok`, only once its bytes are
    /// written, with every entry before it in its segment (synced, when durable).
    pub fn put(&self, items: &[(&FileKey, &Page)]) -> Vec<Result<u64>> {
        if self.read_only {
            return items
                .iter()
                .map(|_| Err(Error::ReadOnly { operation: "put" }))
                .collect();
        }
        let mut results: Vec<Result<u64>> = (0..items.len()).map(|_| Ok(0)).collect();
        for start in (0..items.len()).step_by(MAX_BATCH) {
            let end = (start + MAX_BATCH).min(items.len());
            self.put_piece(&items[start..end], &mut results[start..end]);
        }
        results
    }

    fn put_piece(&self, items: &[(&FileKey, &Page)], results: &mut [Result<u64>]) {
        let mut wanted = Vec::with_capacity(items.len());
        for (i, (key, page)) in items.iter().enumerate() {
            let checked = self.checked_key(key).and_then(|canonical| {
                let len = entry_len(page.len() as u64);
                if len > self.segment_bytes - BLOCK {
                    return Err(Error::EntryTooLarge {
                        key: Box::new((*key).clone()),
                        bytes: page.len() as u64,
                        segment_bytes: self.segment_bytes,
                    });
                }
                Ok((canonical, len))
            });
            match checked {
                Ok(found) => wanted.push((i, found)),
                Err(err) => results[i] = Err(err),
            }
        }
        if wanted.is_empty() {
            return;
        }
        let mut heads = match self.header_batch(wanted.len()) {
            Ok(pages) => pages,
            Err(_) => {
                for (i, _) in wanted {
                    results[i] = Err(Error::Busy(HEADER_WAIT));
                }
                return;
            }
        };
        let mut reserved = Reserved {
            store: self,
            resvs: Vec::with_capacity(wanted.len()),
            marked: false,
        };
        // Per placed item: its index, its reservation, its header page, whether its payload goes.
        let mut placed = Vec::with_capacity(wanted.len());
        for (j, (i, (canonical, len))) in wanted.into_iter().enumerate() {
            let (key, page) = items[i];
            let resv = match self.reserve(key, len) {
                Ok(resv) => resv,
                Err(err) => {
                    results[i] = Err(err);
                    continue;
                }
            };
            reserved.resvs.push(resv);
            let head = &mut heads[j];
            let frame = Frame {
                kind: Kind::Data,
                salt: resv.salt,
                seq: resv.seq,
                len,
            };
            if let Err(err) = write_block(head.as_mut_slice(), frame, &canonical, page.as_slice()) {
                // Cannot happen (the key was checked); mark the space rather than leave a hole.
                results[i] = Err(err);
                let _ = write_block(
                    head.as_mut_slice(),
                    Frame {
                        kind: Kind::Erased,
                        ..frame
                    },
                    &[],
                    &[],
                );
                placed.push((i, resv, j, false));
                continue;
            }
            placed.push((i, resv, j, true));
        }
        if placed.is_empty() {
            return;
        }
        let mut batch = Vec::with_capacity(placed.len() * 2);
        for (i, resv, j, with_payload) in &placed {
            batch.push((&heads[*j], self.extent(resv.seg, resv.offset)));
            let page = items[*i].1;
            if *with_payload && !page.is_empty() {
                batch.push((page, self.extent(resv.seg, resv.offset + BLOCK)));
            }
        }
        let written = self.transport.write_pages(&batch, PageView::Padded);
        drop(batch);
        let resvs: Vec<(usize, Resv, bool)> =
            placed.iter().map(|(i, r, _, ok)| (*i, *r, *ok)).collect();
        let marked = match &written {
            Ok(()) => true,
            Err(err) if timed_out(err) => {
                // The write may still land: marking its space now could be overwritten by it,
                // and reusing its segments could have it land in a later generation.
                if err.memory_abandoned() {
                    self.replace_headers();
                }
                false
            }
            Err(_) => {
                let mut pages: Vec<&mut Page> = Vec::with_capacity(placed.len());
                let mut taken = vec![false; heads.len()];
                for (_, _, j, _) in &placed {
                    taken[*j] = true;
                }
                for (page, taken) in heads.iter_mut().zip(taken) {
                    if taken {
                        pages.push(page);
                    }
                }
                self.mark_failed(pages, &resvs.iter().map(|(_, r, _)| *r).collect::<Vec<_>>())
            }
        };
        drop(placed);
        drop(heads);
        let mut st = self.lock();
        for (_, resv, _) in &resvs {
            let seg = &mut st.segs[resv.seg as usize];
            if marked {
                if let Some(pending) = seg.pending.get_mut(&resv.offset) {
                    pending.1 = true;
                }
                seg.advance();
            } else {
                seg.poisoned = true;
            }
        }
        if !marked {
            for (_, resv, _) in &resvs {
                if st.open == Some(resv.seg) {
                    st.open = None;
                    st.segs[resv.seg as usize].phase = Phase::Sealed;
                }
            }
        }
        reserved.marked = true;
        self.changed.notify_all();
        // Each reservation pins its segment until it is published (or failed): a segment whose
        // live bytes are still zero must not be reused under an entry being stored.
        if let Err(err) = written {
            drop(st);
            reserved.release();
            let err = Arc::new(err);
            for (i, _, _) in &resvs {
                if results[*i].is_ok() {
                    results[*i] = Err(self.key_error(
                        "storing",
                        items[*i].0,
                        None,
                        Error::Batch(Arc::clone(&err)),
                    ));
                }
            }
            return;
        }
        // Wait until every entry before ours in its segment is written: only then can a
        // restart's walk over the segment reach ours.
        let deadline = Instant::now() + COMMIT_WAIT;
        let mut done = Vec::with_capacity(resvs.len());
        for (i, resv, ok) in resvs {
            if !ok {
                continue;
            }
            loop {
                let seg = &st.segs[resv.seg as usize];
                if seg.frontier >= resv.offset + resv.len {
                    done.push((i, resv));
                    break;
                }
                if seg.poisoned {
                    results[i] = Err(self.key_error(
                        "storing",
                        items[i].0,
                        Some(resv.seg),
                        Error::Io {
                            operation: "completing",
                            path: self.files[resv.seg as usize].path.clone(),
                            source: io::Error::other(
                                "an earlier write in this segment failed and could not be marked",
                            ),
                        },
                    ));
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    results[i] = Err(self.key_error(
                        "storing",
                        items[i].0,
                        Some(resv.seg),
                        Error::Timeout {
                            operation: "writing the entries reserved before it in its segment",
                            waited: COMMIT_WAIT,
                        },
                    ));
                    break;
                }
                st = self
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        drop(st);
        if self.durable {
            let segs: HashSet<u32> = done.iter().map(|(_, r)| r.seg).collect();
            for seg in segs {
                let file = &self.files[seg as usize];
                if let Err(source) = file.sync_data() {
                    let code = source.raw_os_error();
                    for (i, r) in &done {
                        if r.seg == seg {
                            results[*i] = Err(self.key_error(
                                "storing",
                                items[*i].0,
                                Some(seg),
                                Error::Io {
                                    operation: "syncing",
                                    path: file.path.clone(),
                                    source: code.map_or_else(
                                        || io::Error::other(source.to_string()),
                                        io::Error::from_raw_os_error,
                                    ),
                                },
                            ));
                        }
                    }
                }
            }
        }
        let mut superseded = Vec::new();
        {
            let mut st = self.lock();
            for (i, resv) in &done {
                if results[*i].is_err() {
                    continue;
                }
                let (key, page) = items[*i];
                let loc = Loc {
                    seg: resv.seg,
                    offset: resv.offset,
                    len: resv.len,
                    payload: page.len() as u64,
                    seq: resv.seq,
                    salt: resv.salt,
                };
                let loser = match st.index.get(key).copied() {
                    Some(newer) if newer.seq > loc.seq => loc,
                    old => {
                        st.index.insert(key.clone(), loc);
                        st.segs[loc.seg as usize].live += loc.len;
                        match old {
                            Some(old) => {
                                st.segs[old.seg as usize].live -= old.len;
                                old
                            }
                            None => {
                                results[*i] = Ok(page.len() as u64);
                                continue;
                            }
                        }
                    }
                };
                st.segs[loser.seg as usize].pins += 1;
                superseded.push(loser);
                results[*i] = Ok(page.len() as u64);
            }
        }
        reserved.release();
        if !superseded.is_empty() {
            if let Err(err) = self.erase(&superseded) {
                tracing::error!(
                    error = %err,
                    "erasing replaced versions failed: after a restart, deleting such a key may \
                     bring back an older version"
                );
            }
            self.unpin(&superseded);
        }
    }

    /// Reserves `len` bytes in the open segment, opening (or reusing) one when it is full.
    fn reserve(&self, key: &FileKey, len: u64) -> Result<Resv> {
        let mut st = self.lock();
        loop {
            if let Some(open) = st.open {
                let seq = st.next_seq;
                let seg = &mut st.segs[open as usize];
                if !seg.poisoned && seg.write_ptr + len <= self.segment_bytes {
                    let offset = seg.write_ptr;
                    seg.write_ptr += len;
                    seg.pending.insert(offset, (offset + len, false));
                    seg.pins += 1;
                    let salt = seg.salt;
                    st.next_seq += 1;
                    return Ok(Resv {
                        seg: open,
                        offset,
                        len,
                        seq,
                        salt,
                    });
                }
                seg.phase = Phase::Sealed;
                st.open = None;
            }
            if st.opening {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // A segment whose file is made before one that would take new disk space.
            let reusable = st
                .segs
                .iter()
                .enumerate()
                .filter(|(_, seg)| seg.reusable())
                .min_by_key(|(id, _)| (self.files[*id].made.get().is_none(), *id));
            let Some((id, _)) = reusable else {
                return Err(Error::NoSpace {
                    key: Box::new(key.clone()),
                    needed: len,
                    capacity: self.capacity_bytes,
                });
            };
            let salt = random_salt();
            let generation = st.next_seq;
            st.next_seq += 1;
            st.opening = true;
            st.segs[id].phase = Phase::Opening;
            drop(st);
            let made = self.make_file(id, key, len);
            let written = made
                .is_ok()
                .then(|| self.write_segment_header(id as u32, salt, generation));
            st = self.lock();
            st.opening = false;
            self.changed.notify_all();
            if let Err(err) = made {
                // Nothing was written: the segment stays free, to be made when there is room.
                st.segs[id].phase = Phase::Free;
                return Err(err);
            }
            match written.unwrap_or(Ok(())) {
                Ok(()) => {
                    let seg = &mut st.segs[id];
                    *seg = Seg::free();
                    seg.phase = Phase::Open;
                    seg.salt = salt;
                    st.open = Some(id as u32);
                }
                Err(err) => {
                    // Its old header may still stand: holding only erased entries, it is
                    // empty either way. It is not tried again in this process: a file that
                    // fails its header write must not stop every later segment from opening,
                    // and a timed-out one may still land.
                    tracing::warn!(
                        file = %self.files[id].path.display(),
                        error = %err,
                        "writing a segment header failed; the segment is not used again"
                    );
                    st.segs[id].phase = Phase::Sealed;
                    st.segs[id].poisoned = true;
                    return Err(err);
                }
            }
        }
    }

    /// Creates, preallocates and registers segment `id`'s file the first time the segment
    /// opens. The file is made whole under a temporary name, then renamed into place, so a crash
    /// never leaves a short segment file. A file system without room for it and its reserve
    /// ([`disk_reserve`]) is [`Error::DiskFull`] for `key`, and leaves no file behind.
    fn make_file(&self, id: usize, key: &FileKey, needed: u64) -> Result<()> {
        let seg = &self.files[id];
        if seg.made.get().is_some() {
            return Ok(());
        }
        let folder = seg.path.parent().unwrap_or(Path::new("."));
        let full = || Error::DiskFull {
            key: Box::new(key.clone()),
            path: seg.path.clone(),
            needed: self.segment_bytes.max(needed),
        };
        let (free, reserve) = disk_room(folder)?;
        if free < self.segment_bytes.saturating_add(reserve) {
            return Err(full());
        }
        let temporary = making_path(&seg.path);
        let made = open_storage_file(
            &temporary,
            FileOptions::new()
                .with_direct_io(seg.direct_io)
                .with_preallocate(self.segment_bytes),
        )
        .and_then(|file| {
            fs::rename(&temporary, &seg.path).map_err(Error::io("renaming", &temporary))?;
            let file = Arc::new(file);
            let registration = self.transport.register_file(Arc::clone(&file))?;
            Ok(MadeFile { file, registration })
        });
        match made {
            Ok(made) => {
                // Only one segment opens at a time (`State::opening`), so nothing raced this.
                let _ = seg.made.set(made);
                Ok(())
            }
            Err(err) => {
                // Neither name existed (every file found at open is made): both go again.
                for path in [&temporary, &seg.path] {
                    if let Err(remove) = fs::remove_file(path) {
                        if remove.kind() != io::ErrorKind::NotFound {
                            tracing::warn!(
                                file = %path.display(),
                                error = %remove,
                                "removing a segment file that could not be made failed"
                            );
                        }
                    }
                }
                if disk_full(&err) {
                    return Err(full());
                }
                Err(err)
            }
        }
    }

    fn write_segment_header(&self, seg: u32, salt: u64, generation: u64) -> Result<()> {
        let mut page = self.segment_page.lock().unwrap_or_else(|p| p.into_inner());
        if page.is_abandoned() {
            // A timed-out write retired it: a fresh page, in its own pool, so that opening a
            // segment still never waits for pages that batches hold.
            let (pool, registration) = header_pool(&*self.transport, 1)?;
            *page = pool
                .allocate()
                .ok_or_else(|| Error::Config("header buffers: no page".to_owned()))?;
            self.headers_lock().registrations.push(registration);
        }
        let frame = Frame {
            kind: Kind::Segment,
            salt,
            seq: generation,
            len: self.segment_bytes,
        };
        write_block(page.as_mut_slice(), frame, &[], &[])?;
        self.transport
            .write_pages(&[(&*page, self.extent(seg, 0))], PageView::Padded)
            .inspect_err(|err| {
                if timed_out(err) {
                    tracing::error!(
                        file = %self.files[seg as usize].path.display(),
                        "a segment header write timed out; the segment is not used again"
                    );
                }
            })?;
        if self.durable {
            let file = &self.files[seg as usize];
            file.sync_data().map_err(Error::io("syncing", &file.path))?;
        }
        Ok(())
    }

    /// Writes erased headers over failed reservations, so that the walk of a restart passes
    /// them; `false` when even that failed.
    fn mark_failed(&self, pages: Vec<&mut Page>, resvs: &[Resv]) -> bool {
        let locs: Vec<Loc> = resvs
            .iter()
            .map(|r| Loc {
                seg: r.seg,
                offset: r.offset,
                len: r.len,
                payload: 0,
                seq: r.seq,
                salt: r.salt,
            })
            .collect();
        // The batch's own header pages: asking the pool for more while holding them could
        // exhaust it when several failed batches mark at once.
        match self.erase_into(pages, &locs) {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(
                    error = %err,
                    "a failed write could not be marked; its segments take no more entries"
                );
                false
            }
        }
    }

    /// Rewrites the headers of `locs` as erased headers of the same length.
    fn erase(&self, locs: &[Loc]) -> Result<()> {
        for piece in locs.chunks(MAX_BATCH) {
            let mut pages = self
                .header_batch(piece.len())
                .map_err(|_| Error::Busy(HEADER_WAIT))?;
            self.erase_into(pages.iter_mut().collect(), piece)?;
        }
        Ok(())
    }

    /// [`erase`](Self::erase) with header pages at hand, one per entry (at most a batch).
    fn erase_into(&self, pages: Vec<&mut Page>, locs: &[Loc]) -> Result<()> {
        debug_assert!(pages.len() >= locs.len() && locs.len() <= MAX_BATCH);
        let mut pages = pages;
        for (page, loc) in pages.iter_mut().zip(locs) {
            let frame = Frame {
                kind: Kind::Erased,
                salt: loc.salt,
                seq: loc.seq,
                len: loc.len,
            };
            write_block(page.as_mut_slice(), frame, &[], &[])?;
        }
        let batch: Vec<_> = pages
            .iter()
            .zip(locs)
            .map(|(page, loc)| (&**page, self.extent(loc.seg, loc.offset)))
            .collect();
        if let Err(err) = self.transport.write_pages(&batch, PageView::Padded) {
            if timed_out(&err) {
                // The erased headers may still land, over whatever a reuse would write there.
                self.poison(locs.iter().map(|l| l.seg).collect::<Vec<_>>());
            }
            if err.memory_abandoned() {
                self.replace_headers();
            }
            return Err(err.into());
        }
        if self.durable {
            let segs: HashSet<u32> = locs.iter().map(|l| l.seg).collect();
            for seg in segs {
                let file = &self.files[seg as usize];
                file.sync_data().map_err(Error::io("syncing", &file.path))?;
            }
        }
        Ok(())
    }

    fn headers_lock(&self) -> MutexGuard<'_, Headers> {
        self.headers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` header pages of the current pool, waiting at most [`HEADER_WAIT`].
    fn header_batch(&self, n: usize) -> pinned_alloc::Result<Vec<Page>> {
        let pool = Arc::clone(&self.headers_lock().current);
        pool.allocate_batch_within(n, HEADER_WAIT)
    }

    /// After a transfer retired header pages: replaces the header pool by a fresh one once
    /// [`REPLACE_HEADERS_AT`] of its pages are gone for good. Pages out of the old pool go back
    /// to it; it and its registration stay for the life of the store.
    fn replace_headers(&self) {
        let mut headers = self.headers_lock();
        let retired = headers.current.stats().abandoned;
        if retired < REPLACE_HEADERS_AT {
            return;
        }
        match header_pool(&*self.transport, HEADER_PAGES) {
            Ok((pool, registration)) => {
                tracing::warn!(
                    retired,
                    "header buffers retired by timed-out transfers; the header pool is replaced"
                );
                headers.current = pool;
                headers.registrations.push(registration);
            }
            Err(err) => tracing::error!(
                error = %err,
                retired,
                "replacing retired header buffers failed; fewer remain"
            ),
        }
    }

    /// Takes segments out of use for the rest of the process (a write to them may still land,
    /// or their written prefix has a hole): sealed, never reused; entries before the hole are
    /// still served.
    fn poison(&self, segs: Vec<u32>) {
        let mut st = self.lock();
        for seg in segs {
            st.segs[seg as usize].poisoned = true;
            if st.open == Some(seg) {
                st.open = None;
            }
            st.segs[seg as usize].phase = Phase::Sealed;
        }
        self.changed.notify_all();
    }

    fn unpin_segments(&self, segs: &[u32]) {
        let mut st = self.lock();
        for &seg in segs {
            let seg = &mut st.segs[seg as usize];
            seg.pins = seg.pins.saturating_sub(1);
        }
        self.changed.notify_all();
    }

    fn unpin(&self, locs: &[Loc]) {
        let mut st = self.lock();
        for loc in locs {
            let seg = &mut st.segs[loc.seg as usize];
            seg.pins = seg.pins.saturating_sub(1);
        }
        self.changed.notify_all();
    }

    /// Loads every key into its page, whose length becomes the stored length (a page too small
    /// for it is an error). One result per item: `Ok(true)` loaded and verified, `Ok(false)` a
    /// miss (absent, or an entry that does not check out, with a warning), `Err` when the
    /// transfer itself failed.
    pub fn get(&self, items: &mut [(&FileKey, &mut Page)]) -> Vec<Result<bool>> {
        let mut results: Vec<Result<bool>> = (0..items.len()).map(|_| Ok(false)).collect();
        for start in (0..items.len()).step_by(MAX_BATCH) {
            let end = (start + MAX_BATCH).min(items.len());
            self.get_piece(&mut items[start..end], &mut results[start..end]);
        }
        results
    }

    fn get_piece(&self, items: &mut [(&FileKey, &mut Page)], results: &mut [Result<bool>]) {
        let mut found = Vec::new();
        {
            let mut st = self.lock();
            for (i, (key, page)) in items.iter_mut().enumerate() {
                let Some(loc) = st.index.get(*key).copied() else {
                    page.set_len(0);
                    continue;
                };
                if (page.capacity() as u64) < loc.payload {
                    page.set_len(0);
                    results[i] = Err(self.key_error(
                        "loading",
                        key,
                        Some(loc.seg),
                        Error::Config(format!(
                            "a page of {} bytes cannot hold the {} bytes stored",
                            page.capacity(),
                            loc.payload
                        )),
                    ));
                    continue;
                }
                st.segs[loc.seg as usize].pins += 1;
                found.push((i, loc));
            }
        }
        if found.is_empty() {
            return;
        }
        let locs: Vec<Loc> = found.iter().map(|(_, l)| *l).collect();
        let mut heads = match self.header_batch(found.len()) {
            Ok(pages) => pages,
            Err(_) => {
                for (i, _) in &found {
                    results[*i] = Err(Error::Busy(HEADER_WAIT));
                    items[*i].1.set_len(0);
                }
                self.unpin(&locs);
                return;
            }
        };
        let outcome = {
            let mut pages: Vec<Option<&mut Page>> =
                items.iter_mut().map(|(_, p)| Some(&mut **p)).collect();
            let mut batch = Vec::with_capacity(found.len() * 2);
            for ((i, loc), head) in found.iter().zip(heads.iter_mut()) {
                batch.push((head, self.extent(loc.seg, loc.offset)));
                if let Some(page) = pages[*i].take() {
                    page.set_len(loc.payload as usize);
                    if loc.payload > 0 {
                        batch.push((page, self.extent(loc.seg, loc.offset + BLOCK)));
                    }
                }
            }
            self.transport
                .read_pages(&mut batch, PageView::Padded)
                .map_err(Arc::new)
        };
        self.unpin(&locs);
        if outcome.as_ref().is_err_and(|err| err.memory_abandoned()) {
            self.replace_headers();
        }
        let mut refused = Vec::new();
        for ((i, loc), head) in found.iter().zip(&heads) {
            let (key, page) = &mut items[*i];
            results[*i] = match &outcome {
                Err(err) => Err(self.key_error(
                    "loading",
                    key,
                    Some(loc.seg),
                    Error::Batch(Arc::clone(err)),
                )),
                Ok(()) => match verify(head.as_slice(), key, loc, page.as_slice()) {
                    Ok(()) => Ok(true),
                    Err(reason) => {
                        tracing::warn!(
                            file = %self.files[loc.seg as usize].path.display(),
                            offset = loc.offset,
                            %reason,
                            "segment entry refused; treated as a miss, and dropped"
                        );
                        refused.push(((*key).clone(), *loc));
                        Ok(false)
                    }
                },
            };
            if !matches!(results[*i], Ok(true)) {
                page.set_len(0);
            }
        }
        drop(heads);
        if !refused.is_empty() {
            self.drop_refused(refused);
        }
    }

    /// Drops entries that failed verification on load from the index (where the index still
    /// points at them), so that they no longer count as live nor pin their segment, and erases
    /// them on disk, best effort (the segment's reuse retires them anyway).
    fn drop_refused(&self, refused: Vec<(FileKey, Loc)>) {
        let mut gone = Vec::new();
        {
            let mut st = self.lock();
            for (key, loc) in refused {
                if st.index.get(&key) != Some(&loc) {
                    continue;
                }
                st.index.remove(&key);
                let seg = &mut st.segs[loc.seg as usize];
                seg.live = seg.live.saturating_sub(loc.len);
                if !self.read_only {
                    seg.pins += 1;
                    gone.push(loc);
                }
            }
        }
        if gone.is_empty() {
            return;
        }
        if let Err(err) = self.erase(&gone) {
            tracing::warn!(
                error = %err,
                entries = gone.len(),
                "erasing refused entries failed; their segments' reuse retires them"
            );
        }
        self.unpin(&gone);
    }

    /// Whether `key` is in the index (its payload checksum is verified when it is loaded).
    pub fn contains(&self, key: &FileKey) -> bool {
        self.lock().index.contains_key(key)
    }

    /// The segment holding each key, `None` for a key not stored: keys that share a segment
    /// give its space back together (see [`SegmentChunk::segment`]).
    pub fn segments_of(&self, keys: &[&FileKey]) -> Vec<Option<u32>> {
        let st = self.lock();
        keys.iter()
            .map(|key| st.index.get(*key).map(|loc| loc.seg))
            .collect()
    }

    /// The payload size stored for `key`, if any.
    pub fn stored_size(&self, key: &FileKey) -> Option<u64> {
        self.lock().index.get(key).map(|loc| loc.payload)
    }

    /// Deletes `key`: its entry's header is rewritten as an erased header (synced, when
    /// durable), so the delete survives a restart, and its bytes count as dead until its
    /// segment is reused. `false` if it was not stored.
    pub fn delete(&self, key: &FileKey) -> Result<bool> {
        if self.read_only {
            return Err(Error::ReadOnly {
                operation: "delete",
            });
        }
        let loc = {
            let mut st = self.lock();
            let Some(loc) = st.index.remove(key) else {
                return Ok(false);
            };
            let seg = &mut st.segs[loc.seg as usize];
            seg.live -= loc.len;
            seg.pins += 1;
            loc
        };
        let erased = self.erase(&[loc]);
        if let Err(err) = &erased {
            // Gone from the index all the same (the caller treats the key as gone; kept live,
            // it would pin its segment for ever): the segment's reuse retires the entry, and
            // until then only a restart may bring it back.
            tracing::warn!(
                file = %self.files[loc.seg as usize].path.display(),
                offset = loc.offset,
                error = %err,
                "erasing a deleted entry failed; it is dropped from the index, and a restart \
                 before its segment is reused may bring it back"
            );
        }
        self.unpin(&[loc]);
        erased
            .map(|()| true)
            .map_err(|err| self.key_error("deleting", key, Some(loc.seg), err))
    }

    /// Every stored chunk, oldest write first: the order for the layer above to rebuild its
    /// LRU after a restart.
    pub fn list(&self) -> Vec<SegmentChunk> {
        let st = self.lock();
        let mut chunks: Vec<SegmentChunk> = st
            .index
            .iter()
            .map(|(key, loc)| SegmentChunk {
                key: key.clone(),
                payload_len: loc.payload,
                seq: loc.seq,
                segment: loc.seg,
            })
            .collect();
        chunks.sort_by_key(|c| c.seq);
        chunks
    }

    /// Space now.
    pub fn usage(&self) -> SegmentUsage {
        let st = self.lock();
        let mut live = 0;
        let mut dead = 0;
        let mut free = 0;
        for seg in &st.segs {
            live += seg.live;
            if seg.reusable() {
                free += 1;
            }
            match seg.phase {
                Phase::Free => {}
                Phase::Opening | Phase::Open => {
                    dead += seg.write_ptr.saturating_sub(BLOCK + seg.live);
                }
                Phase::Sealed => {
                    dead += self.segment_bytes.saturating_sub(BLOCK + seg.live);
                }
            }
        }
        let made = self.files.iter().filter(|f| f.made.get().is_some()).count() as u64;
        SegmentUsage {
            file_bytes: made * self.segment_bytes,
            capacity_bytes: st.segs.len() as u64 * self.segment_bytes,
            segment_bytes: self.segment_bytes,
            segments: st.segs.len(),
            free_segments: free,
            live_bytes: live,
            dead_bytes: dead,
            keys: st.index.len(),
        }
    }
}

/// Checks an entry read back against the index: the frame, salt, sequence, key, lengths, and the
/// payload checksum.
fn verify(
    block: &[u8],
    key: &FileKey,
    loc: &Loc,
    payload: &[u8],
) -> std::result::Result<(), String> {
    let (frame, stored_key, payload_len, checksum) =
        parse_block(block).ok_or("the header does not check out (torn, erased or reused)")?;
    if frame.kind != Kind::Data
        || frame.salt != loc.salt
        || frame.seq != loc.seq
        || frame.len != loc.len
    {
        return Err("the entry was erased, or its segment reused".to_owned());
    }
    if stored_key != key.canonical().as_slice() {
        return Err("the entry holds another key".to_owned());
    }
    if payload_len != loc.payload || payload.len() as u64 != loc.payload {
        return Err(format!(
            "the entry holds {payload_len} bytes, the index {}",
            loc.payload
        ));
    }
    header::verify_payload(payload, checksum).map_err(|r| r.to_string())
}

/// Warns when the folders have no room for the whole capacity: segment files are made as
/// they are needed, so the store works until the disk is full, then refuses puts with
/// [`Error::DiskFull`] (the layer above evicts and reuses the segments it has).
fn warn_if_short_of_room(config: &SegmentConfig, paths: &[PathBuf]) -> Result<()> {
    let mut needed: HashMap<PathBuf, u64> = HashMap::new();
    for path in paths {
        let have = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let folder = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        *needed.entry(folder).or_default() += config.segment_bytes.saturating_sub(have);
    }
    for (folder, bytes) in needed {
        let free = free_bytes(&folder)?;
        if bytes > free {
            tracing::warn!(
                folder = %folder.display(),
                needed = bytes,
                free,
                capacity = config.capacity_bytes,
                "the capacity is more than this folder has free: once the disk is full, puts \
                 evict or are refused; lower max_capacity_gb to what the disk holds"
            );
        }
    }
    Ok(())
}

/// Where a segment file is made before it is renamed into place: a name
/// [`segment_files`] does not list.
fn making_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".making");
    PathBuf::from(name)
}

/// Removes the half-made segment files of a crash in `folder` (see [`making_path`]).
fn remove_half_made(folder: &Path) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("seg-") && name.ends_with(".kvseg.making") {
            tracing::warn!(file = %entry.path().display(), "removing a half-made segment file");
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Free bytes on the file system of `folder`, and what a new segment file must leave free
/// there: a twentieth of the file system, at most 1 GiB, so that a capacity beyond the disk
/// never fills it to the last byte.
fn disk_room(folder: &Path) -> Result<(u64, u64)> {
    let (free, total) = space_of(folder)?;
    Ok((free, (total / 20).min(1 << 30)))
}

/// Whether making a file failed for want of space on its file system.
fn disk_full(err: &Error) -> bool {
    let source = match err {
        Error::Open { source, .. } | Error::Preallocate { source, .. } => source,
        _ => return false,
    };
    matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// What a segment store may hold in `paths`: the segment files already there, and the free
/// space of each file system under them (counted once), less a twentieth of it left to others.
/// A store opened without a capacity gets this.
pub fn segment_room(paths: &[PathBuf]) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut existing = 0;
    let mut devices = HashSet::new();
    let mut free = 0u64;
    for folder in unique(paths) {
        for (_, path) in segment_files(&folder)? {
            existing += fs::metadata(&path).map_or(0, |m| m.len());
        }
        let probe = if folder.exists() {
            folder.clone()
        } else {
            folder
                .ancestors()
                .find(|a| a.exists())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        };
        let device = fs::metadata(&probe)
            .map_err(Error::io("reading", &probe))?
            .dev();
        if devices.insert(device) {
            free = free.saturating_add(free_bytes(&probe)?);
        }
    }
    Ok(existing.saturating_add(free - free / 20))
}

/// Bytes an unprivileged writer may still allocate on the file system holding `folder`.
fn free_bytes(folder: &Path) -> Result<u64> {
    space_of(folder).map(|(free, _)| free)
}

/// Bytes an unprivileged writer may still allocate on the file system holding `folder`, and
/// the size of that file system.
fn space_of(folder: &Path) -> Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(folder.as_os_str().as_bytes())
        .map_err(|_| Error::Config(format!("{} contains a NUL byte", folder.display())))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `name` is a NUL-terminated path that outlives the call, and `stats` points to
    // writable memory of the size statvfs fills; it is read only after statvfs succeeded.
    let rc = unsafe { libc::statvfs(name.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io("querying the free space of", folder)(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: statvfs returned 0, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    Ok((
        stats.f_bavail.saturating_mul(stats.f_frsize),
        stats.f_blocks.saturating_mul(stats.f_frsize),
    ))
}

fn unique(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    paths
        .iter()
        .filter(|p| seen.insert((*p).clone()))
        .cloned()
        .collect()
}

fn segment_path(paths: &[PathBuf], id: usize) -> PathBuf {
    paths[id % paths.len()].join(format!("seg-{id:06}.kvseg"))
}

/// The segment files in `folder`, with their ids.
fn segment_files(folder: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let entries = match fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Io {
                operation: "listing",
                path: folder.to_path_buf(),
                source,
            });
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("seg-"))
            .and_then(|n| n.strip_suffix(".kvseg"))
            .filter(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            found.push((id, entry.path()));
        }
    }
    Ok(found)
}

/// Takes the writer's lock of `folder` and writes our pid into it.
fn lock_folder(folder: &Path) -> Result<File> {
    let path = folder.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io("opening", &path))?;
    if !try_lock(&file).map_err(Error::io("locking", &path))? {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        return Err(Error::FolderLocked {
            folder: folder.to_path_buf(),
            holder: text.trim().parse().ok(),
        });
    }
    file.set_len(0).map_err(Error::io("writing", &path))?;
    file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
        .map_err(Error::io("writing", &path))?;
    file.flush().map_err(Error::io("writing", &path))?;
    Ok(file)
}

/// Opens a file to read, with `O_DIRECT` when asked and the file system allows it; returns
/// whether it did.
fn open_for_reading(path: &Path, direct_io: bool) -> Result<(File, bool)> {
    if direct_io {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => return Ok((file, true)),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(Error::Open {
                    path: path.to_path_buf(),
                    direct_io,
                    source,
                });
            }
        }
    }
    let file = File::open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        direct_io: false,
        source,
    })?;
    Ok((file, false))
}

/// Refuses a segment file whose own segment header records another segment size than
/// `segment_bytes` (resizing it would lose its entries). A file without a valid segment header
/// holds nothing, and a missing one is made later.
fn check_segment_size(path: &Path, segment_bytes: u64) -> Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Open {
                path: path.to_path_buf(),
                direct_io: false,
                source,
            });
        }
    };
    let mut block = vec![0u8; HEADER_BYTES];
    match file.read_exact_at(&mut block, 0) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                operation: "reading the segment header of",
                path: path.to_path_buf(),
                source,
            });
        }
    }
    match parse_block(&block) {
        Some((head, key, _, _))
            if head.kind == Kind::Segment && key.is_empty() && head.len != segment_bytes =>
        {
            Err(Error::SegmentSize {
                path: path.to_path_buf(),
                bytes: head.len,
                segment_bytes,
            })
        }
        _ => Ok(()),
    }
}

/// Scans every segment, a few at a time; an unreadable segment is empty, with a warning.
fn scan_all(paths: Vec<PathBuf>, segment_bytes: Option<u64>) -> Vec<Option<Scan>> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    // Progress of a long recovery, every few seconds, as a log line (a library prints nothing).
    let reported = Mutex::new(std::time::Instant::now());
    let slots: Vec<Mutex<Option<Scan>>> = paths.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..SCAN_THREADS.min(paths.len()) {
            scope.spawn(|| {
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = paths.get(id) else { break };
                    let scan = match scan_segment(path, segment_bytes) {
                        Ok(scan) => scan,
                        Err(err) => {
                            tracing::warn!(
                                file = %path.display(),
                                error = %err,
                                "segment unreadable; its entries are not served"
                            );
                            None
                        }
                    };
                    *slots[id].lock().unwrap_or_else(|p| p.into_inner()) = scan;
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Ok(mut last) = reported.try_lock() {
                        if last.elapsed() >= SCAN_PROGRESS_EVERY {
                            *last = std::time::Instant::now();
                            tracing::info!(
                                segments = finished,
                                of = paths.len(),
                                "recovering the segment index from headers"
                            );
                        }
                    }
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| slot.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

/// Reads the headers of one segment: `None` when it has no valid segment header.
fn scan_segment(path: &Path, segment_bytes: Option<u64>) -> io::Result<Option<Scan>> {
    let (file, direct) = open_for_reading(path, true).map_err(io::Error::other)?;
    let len = file.metadata()?.len();
    let mut buffer = vec![0u8; 2 * HEADER_BYTES];
    let at = buffer.as_ptr().align_offset(PAGE_ALIGN);
    let block = &mut buffer[at..at + HEADER_BYTES];
    let mut file = Some(file);
    let mut direct = direct;
    let mut read = |block: &mut [u8], offset: u64| -> io::Result<bool> {
        loop {
            let Some(handle) = file.as_ref() else {
                return Err(io::Error::other("segment file not open"));
            };
            match handle.read_exact_at(block, offset) {
                Ok(()) => return Ok(true),
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                // Some file systems accept O_DIRECT at open and refuse it at read time.
                Err(err) if direct && err.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(
                        file = %path.display(),
                        "O_DIRECT read refused; reading the headers buffered"
                    );
                    file = Some(File::open(path)?);
                    direct = false;
                }
                Err(err) => return Err(err),
            }
        }
    };
    if !read(block, 0)? {
        return Ok(None);
    }
    let Some((head, key, _, _)) = parse_block(block) else {
        return Ok(None);
    };
    if head.kind != Kind::Segment
        || !key.is_empty()
        || head.len != len
        || segment_bytes.is_some_and(|b| b != len)
    {
        tracing::warn!(file = %path.display(), "segment header of another layout; segment dropped");
        return Ok(None);
    }
    let mut records = Vec::new();
    let mut max_seq = head.seq;
    let mut offset = BLOCK;
    while offset + BLOCK <= len {
        if !read(block, offset)? {
            break;
        }
        let Some(frame) = Frame::of_block(block) else {
            break;
        };
        if frame.salt == head.salt {
            max_seq = max_seq.max(frame.seq);
        }
        if frame.salt != head.salt
            || frame.kind == Kind::Segment
            || frame.len < BLOCK
            || frame.len % BLOCK != 0
            || frame.len > len - offset
        {
            break;
        }
        if frame.kind == Kind::Data {
            match entry(block, frame) {
                Ok((key, payload)) => records.push((
                    key,
                    Loc {
                        seg: 0,
                        offset,
                        len: frame.len,
                        payload,
                        seq: frame.seq,
                        salt: frame.salt,
                    },
                )),
                Err(reason) => tracing::warn!(
                    file = %path.display(),
                    offset,
                    %reason,
                    "torn or foreign segment entry; skipped"
                ),
            }
        }
        offset += frame.len;
    }
    Ok(Some(Scan {
        salt: head.salt,
        generation: head.seq,
        max_seq,
        end: offset,
        records,
    }))
}

/// The key and payload length of a data entry's header whose frame checked out.
fn entry(block: &[u8], frame: Frame) -> std::result::Result<(FileKey, u64), String> {
    let (full, key, payload, _) =
        parse_block(block).ok_or("its header checksum does not check out")?;
    entry_of(frame, full, key, payload)
}

/// [`entry`] once the header parsed: `full` its frame, `key` its key, `payload` the payload
/// length it claims (any value: a header can check out and still lie).
fn entry_of(
    frame: Frame,
    full: Frame,
    key: &[u8],
    payload: u64,
) -> std::result::Result<(FileKey, u64), String> {
    if full != frame {
        return Err("its frame and header disagree".to_owned());
    }
    entry_fits(payload, frame.len)?;
    let key = FileKey::from_canonical(key).map_err(|e| e.to_string())?;
    Ok((key, payload))
}

/// Whether `payload` bytes, padded, exactly fill an entry of `len` bytes (header included),
/// without overflow whatever the header claims.
fn entry_fits(payload: u64, len: u64) -> std::result::Result<(), String> {
    let room = len
        .checked_sub(BLOCK)
        .ok_or_else(|| format!("an entry of {len} bytes has no room for its header"))?;
    if payload > room {
        return Err(format!(
            "{payload} payload bytes do not fit an entry of {len}"
        ));
    }
    // `payload <= len - 4096`: rounding it up to 4 KiB cannot overflow.
    if entry_len(payload) != len {
        return Err(format!(
            "{payload} payload bytes do not fill an entry of {len}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_damage() {
        let frame = Frame {
            kind: Kind::Data,
            salt: 7,
            seq: 9,
            len: 8192,
        };
        let bytes = frame.encode();
        assert_eq!(Frame::decode(&bytes), Some(frame));
        for i in 0..FRAME_BYTES {
            let mut damaged = bytes;
            damaged[i] ^= 0x10;
            assert_eq!(Frame::decode(&damaged), None, "byte {i}");
        }
        assert_eq!(Frame::decode(&bytes[..10]), None);
    }

    #[test]
    fn a_block_holds_frame_key_and_checksum() {
        let mut block = vec![0u8; HEADER_BYTES];
        let frame = Frame {
            kind: Kind::Data,
            salt: 1,
            seq: 2,
            len: entry_len(5),
        };
        write_block(&mut block, frame, b"key", b"hello").unwrap();
        let (parsed, key, len, checksum) = parse_block(&block).unwrap();
        assert_eq!((parsed, key, len), (frame, &b"key"[..], 5));
        assert!(header::verify_payload(b"hello", checksum).is_ok());
        assert_eq!(Frame::of_block(&block), Some(frame));
        block[FRAME_AT + FRAME_BYTES] ^= 1;
        assert!(parse_block(&block).is_none(), "the key is covered");
        assert_eq!(
            Frame::of_block(&block),
            Some(frame),
            "the frame alone still reads"
        );
    }

    #[test]
    fn crafted_blocks_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; HEADER_BYTES];
        let frame = Frame {
            kind: Kind::Data,
            salt: 1,
            seq: 2,
            len: 4096,
        };
        for round in 0..20_000 {
            write_block(&mut block, frame, b"m\x001\x000\x00ab\x00", &[]).unwrap();
            for _ in 0..(round % 8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state as usize) % (FRAME_AT + FRAME_BYTES + 16);
                block[at] = (state >> 32) as u8;
            }
            if round % 3 == 0 {
                // A payload length anywhere, up to u64::MAX.
                let claimed = state.rotate_left(round as u32 % 64) | (u64::MAX << (round % 61));
                block[16..24].copy_from_slice(&claimed.to_le_bytes());
            }
            if round % 2 == 0 {
                // Recompute the frame's checksum, so that damage past it reaches the parsing.
                let at = FRAME_AT;
                let checksum = fnv1a(&block[at..at + 40]);
                block[at + 40..at + 48].copy_from_slice(&checksum.to_le_bytes());
            }
            if let Some(frame) = Frame::of_block(&block) {
                let _ = entry(&block, frame);
                // As if the header checksum had been recomputed too (nixl-core's xxh3 is not
                // at hand here): the fields as they stand, through the same checks.
                let key_len = (u32::from_le_bytes(block[12..16].try_into().unwrap()) as usize)
                    .min(MAX_KEY_BYTES);
                let field = &block[FRAME_AT..FRAME_AT + key_len];
                if let Some(full) = Frame::decode(field) {
                    let payload = u64_at(&block, 16).unwrap();
                    let _ = entry_of(frame, full, &field[FRAME_BYTES..], payload);
                }
            }
        }
    }

    #[test]
    fn a_header_claiming_a_huge_payload_is_refused_not_wrapped() {
        let frame = Frame {
            kind: Kind::Data,
            salt: 1,
            seq: 2,
            len: 8192,
        };
        for payload in [u64::MAX, u64::MAX - 4095, u64::MAX - 8191, 4097, 8192] {
            let refused = entry_of(frame, frame, b"m\x001\x000\x00ab\x00", payload);
            assert!(refused.is_err(), "{payload}");
        }
        assert!(entry_fits(4096, 8192).is_ok());
        assert!(entry_fits(0, 4096).is_ok());
        assert!(entry_fits(0, 0).is_err());
        assert!(entry_fits(u64::MAX, u64::MAX).is_err());
    }
}
