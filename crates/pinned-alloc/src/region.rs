use std::fmt::Debug;
use std::ptr::NonNull;

/// A contiguous range of memory that a transport may register once and then move data into and
/// out of.
///
/// # Safety
///
/// Implementers guarantee that `base()..base() + len()` is one valid, readable and writable
/// allocation that stays mapped, at the same address, for as long as the implementing value is
/// alive. Transports rely on this to keep a registration (and in-flight transfers) pointing at
/// live memory while they hold the value in an `Arc`.
pub unsafe trait MemoryRegion: Send + Sync + Debug + 'static {
    /// First byte of the region.
    fn base(&self) -> NonNull<u8>;

    /// Length of the region in bytes.
    fn len(&self) -> usize;

    /// Whether the region is empty (never true for a page pool).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `ptr..ptr + len` lies wholly inside this region.
    fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.base().as_ptr() as usize;
        let addr = ptr as usize;
        addr >= start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= start + self.len())
    }
}
