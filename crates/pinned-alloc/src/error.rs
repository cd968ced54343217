use std::io;

/// Errors of the page pool.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configured page size is zero.
    #[error("page size must be greater than zero")]
    ZeroPageSize,

    /// The pool capacity does not hold a single page.
    #[error(
        "pool capacity of {capacity_bytes} bytes is smaller than one page of {page_bytes} bytes; \
         raise max_local_cpu_size or lower chunk_size"
    )]
    CapacityBelowOnePage {
        /// Requested capacity.
        capacity_bytes: u64,
        /// Size of one page (one KV chunk, rounded up to 4 KiB).
        page_bytes: usize,
    },

    /// The pool would hold more pages than a page index can address.
    #[error("pool of {pages} pages exceeds the limit of {max} pages")]
    TooManyPages {
        /// Requested page count.
        pages: u64,
        /// Largest supported page count.
        max: u64,
    },

    /// `mmap` failed for an ordinary (4 KiB page) mapping.
    #[error("mmap of {bytes} bytes failed")]
    Map {
        /// Length of the mapping asked for.
        bytes: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// `mmap` with `MAP_HUGETLB` failed: usually too few 2 MiB hugepages are reserved.
    #[error(
        "could not map {bytes} bytes of 2 MiB hugepages: the pool needs {needed} hugepages, \
         {free} are free of {total} reserved; grow the reservation with \
         `sysctl -w vm.nr_hugepages={suggested}` (or set local_cpu_use_hugepages: false)"
    )]
    Hugepages {
        /// Length of the mapping asked for.
        bytes: usize,
        /// Hugepages the pool needs.
        needed: u64,
        /// Hugepages free now (from /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages).
        free: u64,
        /// Hugepages reserved in all.
        total: u64,
        /// A reservation that would fit this pool beside what is in use now.
        suggested: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// `mlock` failed and the configuration requires locked memory.
    #[error(
        "mlock of {bytes} bytes failed; raise `ulimit -l` (RLIMIT_MEMLOCK) or allow unlocked memory"
    )]
    Lock {
        /// Length of the mapping.
        bytes: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// No usable CUDA driver: the library is missing or no device answers.
    #[error("CUDA not available: {reason}")]
    CudaUnavailable {
        /// Why (library missing, no device, driver error).
        reason: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA {operation} failed: {status}")]
    Cuda {
        /// What we were doing.
        operation: &'static str,
        /// The driver's status name (`CUDA_ERROR_OUT_OF_MEMORY`, …).
        status: String,
    },

    /// A GPU slot retired because a transfer may still access it (`DeviceSlot::abandon`, feature `cuda`).
    #[error("device slot {index} was retired: a transfer that failed may still access it")]
    Retired {
        /// The slot's index in its pool.
        index: u32,
    },

    /// The pool has fewer free pages than were asked for.
    #[error("page pool exhausted: asked for {requested} pages, {free} free of {total}")]
    Exhausted {
        /// Pages asked for.
        requested: usize,
        /// Pages free at the time.
        free: usize,
        /// Pages in the pool.
        total: usize,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
