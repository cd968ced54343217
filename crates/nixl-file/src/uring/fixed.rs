//! Registered ("fixed") buffers and files of the io_uring engine.
//!
//! The kernel pins a registered buffer once and keeps a reference to a registered file, so a
//! fixed operation skips the per-I/O page pinning and file lookup that dominate small O_DIRECT
//! transfers. The engine keeps one table of slots; each ring mirrors it and is brought up to date
//! whenever it is taken from or given back to the pool, so a run only names slots that match the
//! registrations live when it started. A ring's mirror holds the region or file of every slot
//! the kernel has for it, which keeps that memory mapped and that descriptor open until the ring
//! lets the slot go. Whatever cannot be registered (tables full, a kernel without sparse tables,
//! memory the kernel will not pin) runs as a plain operation.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::IoUring;
use pinned_alloc::MemoryRegion;

/// The kernel refuses registered buffers longer than 1 GiB; larger regions take several slots.
const MAX_FIXED_BUFFER: usize = 1 << 30;
/// Buffer slots per ring (the kernel allows 16 384).
const BUFFER_SLOTS: usize = 1024;
/// File slots per ring, at most the open-file limit (the kernel refuses more).
const FILE_SLOTS: usize = 4096;

/// One registered buffer: a piece of a region.
#[derive(Clone)]
struct BufferSlot {
    id: u64,
    addr: usize,
    len: usize,
    /// Keeps the memory mapped while a slot names it.
    _region: Arc<dyn MemoryRegion>,
}

/// One registered file, with the number of live registrations of its descriptor.
#[derive(Clone)]
struct FileSlot {
    id: u64,
    file: Arc<File>,
    registrations: usize,
}

/// An entry of a slot table, known by an id unique across both tables.
trait Entry: Clone {
    fn id(&self) -> u64;
}

impl Entry for BufferSlot {
    fn id(&self) -> u64 {
        self.id
    }
}

impl Entry for FileSlot {
    fn id(&self) -> u64 {
        self.id
    }
}

/// Brings one of a ring's tables (`mine`, what the kernel holds) in line with the engine's
/// (`wanted`). `set` asks the kernel for slot `index` to hold an entry, or nothing. An entry the
/// kernel refuses is recorded in `refused` and not offered again; its slot is cleared, and stays
/// as it was if even clearing fails, so the mirror never claims less than the kernel holds.
fn sync_table<T: Entry>(
    mine: &mut [Option<T>],
    wanted: &[Option<T>],
    refused: &mut HashSet<u64>,
    refusals: &mut u64,
    kind: &str,
    mut set: impl FnMut(u32, Option<&T>) -> std::io::Result<()>,
) {
    for (index, (have, want)) in mine.iter_mut().zip(wanted).enumerate() {
        let want_id = want.as_ref().map(T::id);
        if have.as_ref().map(T::id) == want_id
            || (have.is_none() && want_id.is_some_and(|id| refused.contains(&id)))
        {
            continue;
        }
        match set(index as u32, want.as_ref()) {
            Ok(()) => *have = want.clone(),
            Err(err) => {
                *refusals += 1;
                tracing::debug!(slot = index, kind, error = %err, refusals = *refusals, "io_uring refused a registration; it runs unregistered");
                refused.extend(want_id);
                if set(index as u32, None).is_ok() {
                    *have = None;
                }
            }
        }
    }
}

/// The engine's slot tables: what every ring should have registered.
pub(super) struct Slots {
    /// Bumped on every change, so an up-to-date ring skips the comparison.
    version: u64,
    next_id: u64,
    buffers: Vec<Option<BufferSlot>>,
    files: Vec<Option<FileSlot>>,
    file_index: HashMap<RawFd, u32>,
}

impl Slots {
    pub(super) fn new() -> Self {
        Self {
            version: 0,
            next_id: 1,
            buffers: vec![None; BUFFER_SLOTS],
            files: vec![None; file_slot_count()],
            file_index: HashMap::new(),
        }
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn changed(&mut self) {
        self.version += 1;
    }

    /// Gives the region buffer slots, 1 GiB pieces from its base; returns the slots taken
    /// (fewer, or none, when the table is full: the rest runs as plain operations).
    pub(super) fn add_memory(&mut self, region: &Arc<dyn MemoryRegion>) -> Vec<u16> {
        let base = region.base().as_ptr() as usize;
        let mut taken = Vec::new();
        let mut offset = 0;
        while offset < region.len() {
            let Some(slot) = self.buffers.iter().position(Option::is_none) else {
                tracing::debug!(
                    slots = BUFFER_SLOTS,
                    "io_uring buffer table full; the rest of the region runs unregistered"
                );
                break;
            };
            let len = (region.len() - offset).min(MAX_FIXED_BUFFER);
            self.buffers[slot] = Some(BufferSlot {
                id: self.take_id(),
                addr: base + offset,
                len,
                _region: Arc::clone(region),
            });
            taken.push(slot as u16);
            offset += len;
        }
        self.changed();
        taken
    }

    pub(super) fn remove_memory(&mut self, slots: &[u16]) {
        for &slot in slots {
            self.buffers[usize::from(slot)] = None;
        }
        self.changed();
    }

    /// Gives the file a slot, or counts one more registration of it.
    pub(super) fn add_file(&mut self, file: &Arc<File>) {
        let fd = file.as_raw_fd();
        if let Some(&slot) = self.file_index.get(&fd) {
            if let Some(entry) = &mut self.files[slot as usize] {
                entry.registrations += 1;
                return;
            }
        }
        let Some(slot) = self.files.iter().position(Option::is_none) else {
            tracing::debug!(
                slots = self.files.len(),
                "io_uring file table full; the file runs unregistered"
            );
            return;
        };
        self.files[slot] = Some(FileSlot {
            id: self.take_id(),
            file: Arc::clone(file),
            registrations: 1,
        });
        self.file_index.insert(fd, slot as u32);
        self.changed();
    }

    /// Counts one registration of `fd` less; the last one frees its slot.
    pub(super) fn remove_file(&mut self, fd: RawFd) {
        let Some(&slot) = self.file_index.get(&fd) else {
            return;
        };
        let entry = &mut self.files[slot as usize];
        if let Some(file) = entry {
            file.registrations -= 1;
            if file.registrations > 0 {
                return;
            }
        }
        *entry = None;
        self.file_index.remove(&fd);
        self.changed();
    }
}

/// The open-file limit caps a ring's file table.
fn file_slot_count() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed `limit`.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let cap = if known {
        usize::try_from(limit.rlim_cur).unwrap_or(FILE_SLOTS)
    } else {
        0
    };
    FILE_SLOTS.min(cap)
}

/// A ring and the slots the kernel has registered for it.
pub(super) struct Ring {
    pub(super) io: IoUring,
    /// The `Slots::version` this ring was last brought in line with.
    version: Option<u64>,
    /// `None` when the kernel gave this ring no buffer table.
    buffers: Option<Vec<Option<BufferSlot>>>,
    files: Option<Vec<Option<FileSlot>>>,
    /// Occupied buffer slots: (slot, start, length), for lookups.
    live_buffers: Vec<(u16, usize, usize)>,
    live_files: HashMap<RawFd, u32>,
    /// Slot ids the kernel refused for this ring: not asked again (pinning a large region only
    /// to be refused, at every change of the tables, would cost more than it saves).
    refused: HashSet<u64>,
    /// Refusals so far, for the log.
    refusals: u64,
}

impl Ring {
    /// A ring with sparse buffer and file tables sized like `slots`, in step with them.
    pub(super) fn new(entries: u32, slots: &Slots) -> std::io::Result<Self> {
        let io = IoUring::new(entries)?;
        let buffers = match io.submitter().register_buffers_sparse(BUFFER_SLOTS as u32) {
            Ok(()) => Some(vec![None; BUFFER_SLOTS]),
            Err(err) => {
                tracing::debug!(error = %err, "io_uring buffer table refused; plain reads and writes");
                None
            }
        };
        let files = match slots.files.len() {
            0 => None,
            count => match io.submitter().register_files_sparse(count as u32) {
                Ok(()) => Some(vec![None; count]),
                Err(err) => {
                    tracing::debug!(error = %err, "io_uring file table refused; descriptors used as they are");
                    None
                }
            },
        };
        let mut ring = Self {
            io,
            version: None,
            buffers,
            files,
            live_buffers: Vec::new(),
            live_files: HashMap::new(),
            refused: HashSet::new(),
            refusals: 0,
        };
        ring.sync(slots);
        Ok(ring)
    }

    /// Brings the kernel's tables for this ring in line with `slots`. A slot the kernel refuses
    /// stays empty, and operations on it run plain.
    pub(super) fn sync(&mut self, slots: &Slots) {
        if self.version == Some(slots.version) {
            return;
        }
        self.version = Some(slots.version);
        let io = &self.io;
        if let Some(mine) = &mut self.buffers {
            sync_table(
                mine,
                &slots.buffers,
                &mut self.refused,
                &mut self.refusals,
                "buffer",
                |index, slot| {
                    let iovec = libc::iovec {
                        iov_base: slot
                            .map_or(std::ptr::null_mut(), |b| b.addr as *mut libc::c_void),
                        iov_len: slot.map_or(0, |b| b.len),
                    };
                    // SAFETY: a non-empty iovec lies inside the slot's `_region` (a piece of its
                    // `base..base + len`, which `MemoryRegion` guarantees mapped while the region
                    // lives), and the mirror keeps that `Arc` until the kernel has let the slot
                    // go (a later update replacing it, or the ring closing). An empty iovec only
                    // clears the slot.
                    unsafe {
                        io.submitter()
                            .register_buffers_update(index, &[iovec], None)
                    }
                },
            );
            self.live_buffers = mine
                .iter()
                .enumerate()
                .filter_map(|(index, slot)| {
                    let slot = slot.as_ref()?;
                    let current = slots.buffers[index].as_ref()?;
                    (current.id == slot.id).then_some((index as u16, slot.addr, slot.len))
                })
                .collect();
        }
        if let Some(mine) = &mut self.files {
            sync_table(
                mine,
                &slots.files,
                &mut self.refused,
                &mut self.refusals,
                "file",
                |index, slot| {
                    let fd = slot.map_or(-1, |f| f.file.as_raw_fd());
                    io.submitter().register_files_update(index, &[fd]).map(drop)
                },
            );
            self.live_files = mine
                .iter()
                .enumerate()
                .filter_map(|(index, slot)| {
                    let slot = slot.as_ref()?;
                    let current = slots.files[index].as_ref()?;
                    (current.id == slot.id).then(|| (slot.file.as_raw_fd(), index as u32))
                })
                .collect();
        }
        if !self.refused.is_empty() {
            let live: HashSet<u64> = slots
                .buffers
                .iter()
                .flatten()
                .map(|b| b.id)
                .chain(slots.files.iter().flatten().map(|f| f.id))
                .collect();
            self.refused.retain(|id| live.contains(id));
        }
    }

    /// Live registrations the kernel refused for this ring, and refusals so far.
    #[cfg(test)]
    pub(super) fn refused(&self) -> (usize, u64) {
        (self.refused.len(), self.refusals)
    }

    /// The buffer slot wholly holding `addr..addr + len`, if any.
    pub(super) fn buffer_slot(&self, addr: usize, len: usize) -> Option<u16> {
        self.live_buffers
            .iter()
            .find(|&&(_, start, size)| {
                addr >= start && addr.checked_add(len).is_some_and(|end| end <= start + size)
            })
            .map(|&(slot, _, _)| slot)
    }

    /// How many buffers and files the kernel holds for this ring.
    #[cfg(test)]
    pub(super) fn registered(&self) -> (usize, usize) {
        fn count<T>(slots: Option<&Vec<Option<T>>>) -> usize {
            slots.map_or(0, |s| s.iter().flatten().count())
        }
        (count(self.buffers.as_ref()), count(self.files.as_ref()))
    }

    /// The file slot of descriptor `fd`, if registered.
    pub(super) fn file_slot(&self, fd: RawFd) -> Option<u32> {
        self.live_files.get(&fd).copied()
    }
}
