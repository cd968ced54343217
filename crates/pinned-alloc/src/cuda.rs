//! CUDA memory for NIXL staging (feature `cuda`): page-locked registration of a host pool, and
//! device buffers carved into chunk-sized slots for `nixl_buffer_device: cuda`.
//!
//! The driver is loaded at run time (cudarc's `dynamic-loading`), so the feature builds and runs
//! on machines without CUDA; every entry point then returns [`Error::CudaUnavailable`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_queue::ArrayQueue;
use cudarc::driver::{CudaContext, DriverError, result, sys};

use crate::error::{Error, Result};
use crate::pool::{Page, PagePool};
use crate::region::MemoryRegion;

fn cuda_error(operation: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |err| Error::Cuda {
        operation,
        status: format!("{:?}", err.0),
    }
}

/// Opens the primary context of `device`, after checking that a driver is there at all.
fn context(device: u32) -> Result<Arc<CudaContext>> {
    // SAFETY: `is_culib_present` only tries to open the driver library by its known names.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::CudaUnavailable {
            reason: "libcuda.so (the NVIDIA driver) was not found".to_owned(),
        });
    }
    let count = CudaContext::device_count().map_err(|err| Error::CudaUnavailable {
        reason: format!("the driver did not initialise: {:?}", err.0),
    })?;
    if device as i32 >= count {
        return Err(Error::CudaUnavailable {
            reason: format!("device cuda:{device} asked for, {count} present"),
        });
    }
    CudaContext::new(device as usize).map_err(cuda_error("create context"))
}

/// Whether a CUDA driver with at least one device is usable here.
pub fn cuda_available() -> Result<()> {
    context(0).map(drop)
}

/// A host pool registered as CUDA page-locked memory; unregistered on drop.
pub struct CudaPinned {
    pool: Arc<PagePool>,
    ctx: Arc<CudaContext>,
}

impl fmt::Debug for CudaPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaPinned")
            .field("pool", &self.pool)
            .field("device", &self.ctx.ordinal())
            .finish()
    }
}

impl PagePool {
    /// Registers the whole pool as CUDA pinned memory (`cuMemHostRegister`, portable across
    /// contexts), so GPU copies to and from its pages run at full DMA speed.
    pub fn register_cuda_pinned(self: &Arc<Self>, device: u32) -> Result<CudaPinned> {
        let ctx = context(device)?;
        ctx.bind_to_thread().map_err(cuda_error("bind context"))?;
        // SAFETY: the range is the pool's own mapping (MemoryRegion contract), which stays mapped
        // while `CudaPinned` holds an Arc of the pool; it is unregistered before that Arc drops.
        unsafe {
            sys::cuMemHostRegister_v2(
                self.base().as_ptr().cast(),
                MemoryRegion::len(self.as_ref()),
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result()
        .map_err(cuda_error("register host memory"))?;
        Ok(CudaPinned {
            pool: Arc::clone(self),
            ctx,
        })
    }
}

impl Drop for CudaPinned {
    fn drop(&mut self) {
        if let Err(err) = self.ctx.bind_to_thread() {
            tracing::error!(status = ?err.0, "cannot bind CUDA context to unregister the page pool");
            return;
        }
        // SAFETY: the same address was registered in `register_cuda_pinned` and the pool (and so
        // the mapping) is still alive: `self.pool` is dropped after this call.
        let status = unsafe { sys::cuMemHostUnregister(self.pool.base().as_ptr().cast()) };
        if let Err(err) = status.result() {
            tracing::error!(status = ?err.0, "cuMemHostUnregister of the page pool failed");
        }
    }
}

/// One GPU staging buffer of whole chunks, handed out one chunk-sized slot at a time.
pub struct DeviceBufferPool {
    ctx: Arc<CudaContext>,
    base: sys::CUdeviceptr,
    bytes: u64,
    chunk_bytes: u64,
    free: ArrayQueue<u32>,
}

impl fmt::Debug for DeviceBufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBufferPool")
            .field("device", &self.ctx.ordinal())
            .field("bytes", &self.bytes)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("free", &self.free.len())
            .finish()
    }
}

/// Rounds a requested buffer size up to whole chunks, as LMCache does for `nixl_buffer_size`.
pub fn round_to_chunks(requested: u64, chunk_bytes: u64) -> Result<u64> {
    if chunk_bytes == 0 {
        return Err(Error::ZeroPageSize);
    }
    let chunks = requested.div_ceil(chunk_bytes).max(1);
    if u32::try_from(chunks).is_err() {
        return Err(Error::TooManyPages {
            pages: chunks,
            max: u64::from(u32::MAX),
        });
    }
    Ok(chunks * chunk_bytes)
}

impl DeviceBufferPool {
    /// Allocates `requested` bytes (rounded up to whole chunks) on `device`.
    pub fn new(device: u32, requested: u64, chunk_bytes: u64) -> Result<Arc<Self>> {
        let bytes = round_to_chunks(requested, chunk_bytes)?;
        if bytes != requested {
            tracing::warn!(
                requested,
                chunk_bytes,
                bytes,
                "nixl_buffer_size is not a multiple of the chunk size; rounded up"
            );
        }
        let ctx = context(device)?;
        ctx.bind_to_thread().map_err(cuda_error("bind context"))?;
        let len = usize::try_from(bytes).map_err(|_| Error::TooManyPages {
            pages: bytes / chunk_bytes,
            max: u64::from(u32::MAX),
        })?;
        // SAFETY: the context of `device` is bound to this thread; the allocation is freed in Drop
        // with the same context bound.
        let base =
            unsafe { result::malloc_sync(len) }.map_err(cuda_error("allocate device memory"))?;
        let slots = (bytes / chunk_bytes) as usize;
        let free = ArrayQueue::new(slots);
        for slot in 0..slots {
            // The queue holds exactly `slots` entries; slots fit in u32 (checked above).
            let _ = free.push(slot as u32);
        }
        Ok(Arc::new(Self {
            ctx,
            base,
            bytes,
            chunk_bytes,
            free,
        }))
    }

    /// The device address of the buffer, for registration as VRAM.
    pub fn device_ptr(&self) -> u64 {
        self.base
    }

    /// Bytes of the buffer.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether the buffer is empty (never: it holds at least one chunk).
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The GPU ordinal.
    pub fn device(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Takes one chunk-sized slot, or `None` when all are in use.
    pub fn allocate(self: &Arc<Self>) -> Option<DeviceSlot> {
        let index = self.free.pop()?;
        Some(DeviceSlot {
            pool: Arc::clone(self),
            index,
            abandoned: AtomicBool::new(false),
        })
    }
}

impl Drop for DeviceBufferPool {
    fn drop(&mut self) {
        if let Err(err) = self.ctx.bind_to_thread() {
            tracing::error!(status = ?err.0, "cannot bind CUDA context to free the device buffer");
            return;
        }
        // SAFETY: `base` came from malloc_sync in `new` under this context and is freed once.
        if let Err(err) = unsafe { result::free_sync(self.base) } {
            tracing::error!(status = ?err.0, "freeing the device buffer failed");
        }
    }
}

/// One chunk of a [`DeviceBufferPool`]; returned to the pool on drop.
pub struct DeviceSlot {
    pool: Arc<DeviceBufferPool>,
    index: u32,
    abandoned: AtomicBool,
}

impl fmt::Debug for DeviceSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSlot")
            .field("index", &self.index)
            .finish()
    }
}

impl DeviceSlot {
    /// Device address of the slot.
    pub fn device_ptr(&self) -> u64 {
        self.pool.base + u64::from(self.index) * self.pool.chunk_bytes
    }

    /// Bytes of the slot (one chunk).
    pub fn len(&self) -> u64 {
        self.pool.chunk_bytes
    }

    /// Whether the slot is empty (never).
    pub fn is_empty(&self) -> bool {
        self.pool.chunk_bytes == 0
    }
}

impl DeviceSlot {
    /// The GPU this slot lives on.
    pub fn device(&self) -> usize {
        self.pool.device()
    }

    /// Retires the slot for good: a transfer that timed out or failed may still read or write
    /// it. From now on its copies fail with [`Error::Retired`], dropping it does not return it
    /// to its pool, and the pool's allocation is never freed. Idempotent.
    pub fn abandon(&self) {
        if self.abandoned.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            index = self.index,
            "device slot abandoned: a transfer may still access it, so it is retired for good"
        );
        // The transfer may touch the allocation at any later time: it is never freed.
        std::mem::forget(Arc::clone(&self.pool));
    }

    /// Whether the slot was [abandoned](DeviceSlot::abandon).
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Copies `page` (at most one chunk) into the start of this slot (host → device).
    pub fn copy_from_host(&mut self, page: &Page) -> Result<()> {
        self.check_fits(page.len())?;
        self.pool
            .ctx
            .bind_to_thread()
            .map_err(cuda_error("bind context"))?;
        // SAFETY: the slot spans `chunk_bytes` bytes of a live device allocation (the pool is
        // kept alive by `self.pool`) and `page.len() <= chunk_bytes` was checked above.
        unsafe { result::memcpy_htod_sync(self.device_ptr(), page.as_slice()) }
            .map_err(cuda_error("copy host to device"))
    }

    /// Copies the start of this slot into `page`, `page.len()` bytes (device → host).
    pub fn copy_to_host(&self, page: &mut Page) -> Result<()> {
        self.check_fits(page.len())?;
        self.pool
            .ctx
            .bind_to_thread()
            .map_err(cuda_error("bind context"))?;
        // SAFETY: as in `copy_from_host`; the page is borrowed mutably for the whole copy.
        unsafe { result::memcpy_dtoh_sync(page.as_mut_slice(), self.device_ptr()) }
            .map_err(cuda_error("copy device to host"))
    }

    fn check_fits(&self, len: usize) -> Result<()> {
        if self.is_abandoned() {
            return Err(Error::Retired { index: self.index });
        }
        if len as u64 > self.pool.chunk_bytes {
            return Err(Error::Exhausted {
                requested: len,
                free: self.pool.chunk_bytes as usize,
                total: self.pool.chunk_bytes as usize,
            });
        }
        Ok(())
    }
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        if self.is_abandoned() {
            return;
        }
        if self.pool.free.push(self.index).is_err() {
            tracing::error!(
                index = self.index,
                "device slot returned to a full free list"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_size_rounds_up_to_whole_chunks() {
        assert_eq!(round_to_chunks(100, 64).unwrap(), 128);
        assert_eq!(round_to_chunks(128, 64).unwrap(), 128);
        assert_eq!(round_to_chunks(0, 64).unwrap(), 64, "at least one chunk");
        assert!(matches!(round_to_chunks(1, 0), Err(Error::ZeroPageSize)));
    }

    /// Without a driver every entry point says so, typed, instead of panicking; with one, the
    /// same calls succeed.
    #[test]
    fn entry_points_follow_driver_presence() {
        let pool = crate::PoolConfig::new(4096, 8192).build().unwrap();
        if cuda_available().is_ok() {
            let pinned = pool.register_cuda_pinned(0).unwrap();
            drop(pinned);
            let device = DeviceBufferPool::new(0, 100_000, 4096).unwrap();
            assert_eq!(device.len(), 102_400);
            let slots: Vec<_> = std::iter::from_fn(|| device.allocate()).collect();
            assert_eq!(slots.len(), 25);
            assert_eq!(slots[1].device_ptr() - slots[0].device_ptr(), 4096);
            return;
        }
        assert!(matches!(
            cuda_available(),
            Err(Error::CudaUnavailable { .. })
        ));
        let err = pool.register_cuda_pinned(0).unwrap_err();
        assert!(err.to_string().starts_with("CUDA not available"), "{err}");
        assert!(matches!(
            DeviceBufferPool::new(0, 1 << 20, 4096),
            Err(Error::CudaUnavailable { .. })
        ));
    }
}
