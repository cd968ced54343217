//! One anonymous mapping: the raw `mmap`/`mlock`/`munmap` layer under the pool.

use std::io;
use std::path::Path;
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::pool::LockMode;

pub(crate) const HUGEPAGE_BYTES: usize = 2 << 20;
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    locked: bool,
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is tied to the thread
// that created it, and all access to its bytes goes through `Page`, whose exclusivity is
// established by the pool's free list.
unsafe impl Send for Mapping {}
// SAFETY: `Mapping` itself exposes only its address and length (immutable after creation).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes (already rounded to the page granularity of the mapping).
    pub(crate) fn new(len: usize, hugepages: bool, lock: LockMode) -> Result<Self> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if hugepages {
            flags |= libc::MAP_HUGETLB;
        }
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
        // existing memory; the result is checked against MAP_FAILED below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            return Err(if hugepages {
                hugepage_error(len, source, Path::new(HUGEPAGES_SYSFS))
            } else {
                Error::Map { bytes: len, source }
            });
        }
        let base = NonNull::new(addr.cast::<u8>()).ok_or_else(|| Error::Map {
            bytes: len,
            source: io::Error::other("mmap returned a null address"),
        })?;
        let mut mapping = Mapping {
            base,
            len,
            locked: false,
        };
        mapping.lock(lock)?;
        Ok(mapping)
    }

    fn lock(&mut self, lock: LockMode) -> Result<()> {
        if lock == LockMode::Off {
            return Ok(());
        }
        // SAFETY: `base..base+len` is the mapping created in `new` and still owned by `self`.
        let rc = unsafe { libc::mlock(self.base.as_ptr().cast(), self.len) };
        if rc == 0 {
            self.locked = true;
            return Ok(());
        }
        let source = io::Error::last_os_error();
        match lock {
            LockMode::Required => Err(Error::Lock {
                bytes: self.len,
                source,
            }),
            _ => {
                tracing::warn!(
                    bytes = self.len,
                    error = %source,
                    "mlock failed; the page pool stays unlocked (raise `ulimit -l` to lock it)"
                );
                Ok(())
            }
        }
    }

    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is the mapping this value created; every `Page` holds an `Arc`
        // of the pool that owns this mapping, so no page can outlive it.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::error!(
                bytes = self.len,
                error = %io::Error::last_os_error(),
                "munmap of the page pool failed"
            );
        }
    }
}

fn read_count(dir: &Path, name: &str) -> u64 {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Builds the hugepage error with the counts a person needs to fix the reservation.
pub(crate) fn hugepage_error(bytes: usize, source: io::Error, sysfs: &Path) -> Error {
    let needed = bytes.div_ceil(HUGEPAGE_BYTES) as u64;
    let free = read_count(sysfs, "free_hugepages");
    let total = read_count(sysfs, "nr_hugepages");
    let in_use = total.saturating_sub(free);
    Error::Hugepages {
        bytes,
        needed,
        free,
        total,
        suggested: in_use + needed,
        source,
    }
}
