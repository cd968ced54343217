//! `UringTransport`: the native engine. It implements nixl-core's [`Transport`] over io_uring,
//! needs no NIXL, and serves as the embedded default and as a yardstick for NIXL's POSIX plugin.
//!
//! Every batch is a set of reads or writes at file offsets; up to `queue_depth` run at once, and
//! short completions are resubmitted for the rest. Registered memory and files are also
//! registered with each ring (see `fixed`), so transfers run as fixed-buffer operations on fixed
//! files. Buffers are checked against the registration table before any submission, and an SQE
//! is only ever pushed for a buffer that stays borrowed (blocking calls) or owned (submitted
//! batches) until its completion has been reaped.

mod fixed;

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};
use nixl_core::{
    Direction, Error, PageBatch, PendingTransfer, Registration, RegistrationTable, Result,
    StorageExtent, StorageName, TableEntry, Transport,
};
use pinned_alloc::{MemoryRegion, Page};

use self::fixed::{Ring, Slots};

/// Largest single submission; longer extents continue through the short-I/O path.
const MAX_SQE_BYTES: usize = 1 << 30;

/// Configuration of a [`UringTransport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UringConfig {
    /// Operations in flight per batch (ring size).
    pub queue_depth: u32,
    /// How long one batch may take before it fails.
    pub timeout: Duration,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            queue_depth: 64,
            timeout: Duration::from_secs(120),
        }
    }
}

impl UringConfig {
    /// Sets the queue depth.
    pub fn with_queue_depth(mut self, depth: u32) -> Self {
        self.queue_depth = depth.max(1);
        self
    }

    /// How long one batch may take before it fails with a timeout; entries still in the kernel
    /// after as long again are abandoned with their memory.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

struct Inner {
    config: UringConfig,
    table: RegistrationTable,
    /// Idle rings, reused across batches (creating one costs a few system calls). Locked before
    /// `slots` wherever both are held.
    rings: Mutex<Vec<Ring>>,
    /// What every ring should have registered.
    slots: Mutex<Slots>,
    /// Rings abandoned to the kernel, each with what it had registered.
    abandoned: std::sync::atomic::AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn take_ring(&self) -> Result<Ring> {
        let abandoned = self.abandoned.load(std::sync::atomic::Ordering::Relaxed);
        if abandoned >= nixl_core::MAX_ABANDONED_REQUESTS {
            return Err(Error::TooManyAbandoned { abandoned });
        }
        let idle = lock(&self.rings).pop();
        let slots = lock(&self.slots);
        match idle {
            Some(mut ring) => {
                ring.sync(&slots);
                Ok(ring)
            }
            None => {
                Ring::new(self.config.queue_depth.next_power_of_two(), &slots).map_err(|source| {
                    Error::Io {
                        operation: "creating an io_uring",
                        path: "io_uring".into(),
                        source,
                    }
                })
            }
        }
    }

    /// Takes the ring back, letting go of the slots that changed while it was busy.
    fn give_ring(&self, mut ring: Ring) {
        let mut rings = lock(&self.rings);
        ring.sync(&lock(&self.slots));
        rings.push(ring);
    }

    /// Changes the slot tables and brings the idle rings in line, so that nothing unregistered
    /// stays pinned or open in them.
    fn release(&self, change: impl FnOnce(&mut Slots)) {
        let mut rings = lock(&self.rings);
        let mut slots = lock(&self.slots);
        change(&mut slots);
        for ring in rings.iter_mut() {
            ring.sync(&slots);
        }
    }
}

/// The native io_uring engine.
#[derive(Clone)]
pub struct UringTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for UringTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl UringTransport {
    pub fn new(config: UringConfig) -> Result<Self> {
        let inner = Inner {
            config,
            table: RegistrationTable::new(),
            rings: Mutex::new(Vec::new()),
            slots: Mutex::new(Slots::new()),
            abandoned: std::sync::atomic::AtomicUsize::new(0),
        };
        let ring = inner.take_ring()?;
        inner.give_ring(ring);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }
}

/// What a registration holds in the rings' slot tables.
#[derive(Debug)]
enum Fixed {
    Buffers(Vec<u16>),
    File(RawFd),
}

/// Forgets the table entry and the slots, then lets go of what it kept alive.
struct Guard<T: Send + Sync + 'static> {
    inner: Arc<Inner>,
    entry: TableEntry,
    fixed: Fixed,
    _keep_alive: T,
}

impl<T: Send + Sync + 'static> fmt::Debug for Guard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringRegistration")
            .field("entry", &self.entry)
            .field("fixed", &self.fixed)
            .finish()
    }
}

impl<T: Send + Sync + 'static> Drop for Guard<T> {
    fn drop(&mut self) {
        self.inner.table.remove(self.entry);
        self.inner.release(|slots| match &self.fixed {
            Fixed::Buffers(taken) => slots.remove_memory(taken),
            Fixed::File(fd) => slots.remove_file(*fd),
        });
    }
}

/// One extent of a batch.
#[derive(Debug, Clone, Copy)]
struct Op {
    fd: i32,
    addr: usize,
    len: usize,
    offset: u64,
    done: usize,
    /// The ring's buffer slot holding `addr..addr + len`, when registered.
    buffer_slot: Option<u16>,
    /// The ring's file slot of `fd`, when registered.
    file_slot: Option<u32>,
}

/// Marks the user data of a cancellation entry, apart from the op indices of transfers.
const CANCEL_TAG: u64 = 1 << 63;

/// The longest single wait for completions, so that deadlines are checked while waiting.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// How long dropping an unfinished batch waits (then cancels, then abandons) at most.
const DROP_WAIT: Duration = Duration::from_secs(2);

/// Between two looks at the completion queue, on kernels whose waits take no timeout (before
/// 5.11, no `IORING_FEAT_EXT_ARG`), and after a failed submission.
const POLL_PAUSE: Duration = Duration::from_micros(200);

/// The state of one batch on one ring.
struct Run {
    write: bool,
    ops: Vec<Op>,
    /// Indices of ops with bytes left to submit, in order.
    queue: std::collections::VecDeque<usize>,
    /// Which ops have an entry in the kernel now (at most one each).
    flying: Vec<bool>,
    /// Which ops a cancellation was sent for.
    cancel_sent: Vec<bool>,
    in_flight: usize,
    error: Option<Error>,
    /// Past this the run fails with a timeout and cancels what is in flight.
    deadline: Instant,
    /// Past this, entries the kernel has not let go of are abandoned with their memory.
    give_up: Instant,
    timeout: Duration,
    cancelled: bool,
    /// The kernel may still access this run's buffers: its ring and memory are retired.
    abandoned: bool,
    /// Leases on every registration the run names, held until the kernel is done with them.
    leases: Vec<(nixl_core::TableEntry, nixl_core::Lease)>,
}

impl Run {
    /// A run of `ops` on `ring`, each using the ring's registered buffer and file where it has them.
    /// A run fails with a timeout after `timeout`; entries still in the kernel another
    /// `timeout` later (cancelled but not let go) are abandoned.
    fn new(
        write: bool,
        mut ops: Vec<Op>,
        timeout: Duration,
        ring: &Ring,
        leases: Vec<(nixl_core::TableEntry, nixl_core::Lease)>,
    ) -> Self {
        for op in &mut ops {
            op.buffer_slot = ring.buffer_slot(op.addr, op.len);
            op.file_slot = ring.file_slot(op.fd);
        }
        let queue = (0..ops.len()).collect();
        let now = Instant::now();
        Self {
            write,
            flying: vec![false; ops.len()],
            cancel_sent: vec![false; ops.len()],
            ops,
            queue,
            in_flight: 0,
            error: None,
            deadline: now + timeout,
            give_up: now + timeout * 2,
            timeout,
            cancelled: false,
            abandoned: false,
            leases,
        }
    }

    fn finished(&self) -> bool {
        self.abandoned || (self.in_flight == 0 && (self.queue.is_empty() || self.error.is_some()))
    }

    /// Brings the deadlines forward to at most `wait` from now (a transfer being dropped).
    fn expedite(&mut self, wait: Duration) {
        let now = Instant::now();
        self.deadline = self.deadline.min(now + wait / 2);
        self.give_up = self.give_up.min(now + wait);
    }

    /// Asks the kernel to cancel every entry in flight that no cancellation was sent for yet.
    /// What does not fit in the submission queue now is sent at a later call.
    fn cancel_in_flight(&mut self, ring: &mut IoUring) {
        self.cancelled = true;
        for index in 0..self.ops.len() {
            if !self.flying[index] || self.cancel_sent[index] {
                continue;
            }
            let cancel = opcode::AsyncCancel::new(index as u64)
                .build()
                .user_data(CANCEL_TAG | index as u64);
            // SAFETY: a cancellation entry names no memory; it only carries user data.
            let pushed = unsafe { ring.submission().push(&cancel) }.is_ok()
                || (ring.submit().is_ok()
                    // SAFETY: as above.
                    && unsafe { ring.submission().push(&cancel) }.is_ok());
            if !pushed {
                break;
            }
            self.cancel_sent[index] = true;
        }
        if let Err(err) = ring.submit() {
            tracing::warn!(error = %err, "submitting io_uring cancellations failed; retried");
        }
    }

    /// Checks the deadlines: past the first, fail and cancel; past the second, abandon.
    fn check_deadlines(&mut self, ring: &mut IoUring) {
        let now = Instant::now();
        if now >= self.deadline {
            if !self.cancelled {
                self.fail(Error::Timeout {
                    descriptors: self.ops.len(),
                    timeout: self.timeout,
                });
            }
            self.cancel_in_flight(ring);
        }
        if now >= self.give_up && self.in_flight > 0 {
            tracing::error!(
                in_flight = self.in_flight,
                error = ?self.error,
                "io_uring entries neither completed nor cancelled: their memory is retired for good"
            );
            // Whatever failed first, the run ends because time ran out with entries still in the
            // kernel: callers retire what it names for good on a timeout.
            self.error = Some(Error::Timeout {
                descriptors: self.ops.len(),
                timeout: self.timeout,
            });
            self.abandoned = true;
        }
    }

    /// Waits for at least `want` completions, at most until the next deadline.
    fn wait(&mut self, ring: &mut IoUring, want: usize) -> std::io::Result<()> {
        if want == 0 {
            return ring.submit().map(|_| ());
        }
        let next = if self.cancelled {
            self.give_up
        } else {
            self.deadline
        };
        let left = next.saturating_duration_since(Instant::now()).min(MAX_WAIT);
        if !ring.params().is_feature_ext_arg() {
            ring.submit()?;
            if ring.completion().is_empty() {
                std::thread::sleep(left.min(POLL_PAUSE));
            }
            return Ok(());
        }
        let ts = types::Timespec::from(left.max(Duration::from_micros(1)));
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(want, &args) {
            Err(err) if err.raw_os_error() == Some(libc::ETIME) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn fail(&mut self, err: Error) {
        if self.error.is_none() {
            self.error = Some(err);
        }
    }

    /// Submits what fits, reaps what completed; with `block`, waits for at least one completion
    /// when nothing else can be done. Returns whether the batch is over.
    fn pump(&mut self, ring: &mut Ring, block: bool) -> bool {
        let ring = &mut ring.io;
        loop {
            while self.error.is_none() && (self.in_flight as u32) < ring.params().sq_entries() {
                let Some(index) = self.queue.pop_front() else {
                    break;
                };
                let op = self.ops[index];
                let len = (op.len - op.done).min(MAX_SQE_BYTES) as u32;
                let addr = op.addr + op.done;
                let offset = op.offset + op.done as u64;
                // The file operand is a fixed slot or a plain descriptor, two distinct types.
                macro_rules! entry {
                    ($fd:expr) => {
                        match (self.write, op.buffer_slot) {
                            (true, Some(slot)) => {
                                opcode::WriteFixed::new($fd, addr as *const u8, len, slot)
                                    .offset(offset)
                                    .build()
                            }
                            (true, None) => opcode::Write::new($fd, addr as *const u8, len)
                                .offset(offset)
                                .build(),
                            (false, Some(slot)) => {
                                opcode::ReadFixed::new($fd, addr as *mut u8, len, slot)
                                    .offset(offset)
                                    .build()
                            }
                            (false, None) => opcode::Read::new($fd, addr as *mut u8, len)
                                .offset(offset)
                                .build(),
                        }
                    };
                }
                let entry = match op.file_slot {
                    Some(slot) => entry!(types::Fixed(slot)),
                    None => entry!(types::Fd(op.fd)),
                }
                .user_data(index as u64);
                // SAFETY: `addr..addr+len` lies in registered memory (checked against the table
                // before the run was built) and stays borrowed or owned by the caller of this
                // run until `finished()`. That requires every pushed entry to have completed, or
                // else the run to be abandoned: its ring and leases are then leaked
                // (`Run::retire`) and its memory retired for good (`Error::Abandoned`).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    self.queue.push_front(index);
                    break;
                }
                self.flying[index] = true;
                self.in_flight += 1;
            }
            if self.finished() {
                return true;
            }
            let want = usize::from(block && self.in_flight > 0);
            if let Err(source) = self.wait(ring, want) {
                if source.raw_os_error() != Some(libc::EINTR) {
                    self.fail(Error::Io {
                        operation: "submitting to io_uring",
                        path: "io_uring".into(),
                        source,
                    });
                    // Entries the kernel has not taken stay queued for the next submission.
                    std::thread::sleep(POLL_PAUSE);
                }
            }
            let mut reaped = 0;
            let completions: Vec<(u64, i32)> = ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result()))
                .collect();
            for (user_data, result) in completions {
                reaped += 1;
                if user_data & CANCEL_TAG != 0 {
                    continue;
                }
                self.in_flight -= 1;
                let index = user_data as usize;
                self.flying[index] = false;
                self.complete(index, result);
            }
            if self.finished() {
                return true;
            }
            self.check_deadlines(ring);
            if self.finished() {
                return true;
            }
            if !block && reaped == 0 {
                return false;
            }
        }
    }

    fn complete(&mut self, index: usize, result: i32) {
        let op = self.ops[index];
        if result <= 0 {
            let source = if result == 0 {
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
            } else {
                std::io::Error::from_raw_os_error(-result)
            };
            self.fail(Error::Io {
                operation: if self.write { "writing" } else { "reading" },
                path: format!(
                    "{} at offset {}",
                    describe_fd(op.fd),
                    op.offset + op.done as u64
                )
                .into(),
                source,
            });
            return;
        }
        self.ops[index].done += result as usize;
        if self.ops[index].done < op.len {
            self.queue.push_back(index);
        }
    }

    /// The batch's status; an abandoned run's error says the memory was kept by the kernel.
    fn outcome(&mut self) -> Result<()> {
        let err = self.error.take();
        match err {
            Some(cause) if self.abandoned => Err(Error::Abandoned {
                descriptors: self.ops.len(),
                cause: Box::new(cause),
            }),
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Ends the run: a ring the kernel may still use, and the leases of what it names, are
    /// leaked for good (the kernel keeps writing into or reading from them). A ring that was
    /// sent cancellations is closed rather than reused, since a cancellation still queued or in
    /// the kernel would name the next run's entries. Otherwise the ring goes back to the pool.
    /// The leases are let go in both of those cases.
    fn retire(&mut self, inner: &Inner, ring: Ring) {
        if self.abandoned {
            inner
                .abandoned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::mem::forget(ring);
            std::mem::forget(std::mem::take(&mut self.leases));
        } else if self.cancelled {
            // Every transfer entry completed: only cancellations, naming no memory, remain.
            drop(ring);
            self.leases.clear();
        } else {
            inner.give_ring(ring);
            self.leases.clear();
        }
    }
}

/// A descriptor as an error names it: the file's path where /proc tells it.
fn describe_fd(fd: i32) -> String {
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(path) => format!("{} (fd {fd})", path.display()),
        Err(_) => format!("fd {fd}"),
    }
}

impl UringTransport {
    /// A registration whose guard transfers lease while they run.
    fn registration<T: Send + Sync + 'static>(&self, dev_id: u64, guard: Guard<T>) -> Registration {
        let entry = guard.entry;
        let guard = Arc::new(guard);
        let lease: nixl_core::Lease = guard.clone();
        self.inner.table.attach(entry, Arc::downgrade(&lease));
        Registration::new(dev_id, Box::new(guard))
    }

    fn run_blocking(&self, write: bool, ops: Vec<Op>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let leases = self
            .inner
            .table
            .check(ops.iter().map(|op| (op.addr, op.len, op.fd as u64)))?;
        let mut ring = self.inner.take_ring()?;
        let mut run = Run::new(write, ops, self.inner.config.timeout, &ring, leases);
        while !run.pump(&mut ring, true) {}
        run.retire(&self.inner, ring);
        run.outcome()
    }
}

fn ops_of(batch: impl Iterator<Item = (usize, usize, StorageExtent)>) -> Result<Vec<Op>> {
    batch
        .map(|(addr, len, extent)| {
            let fd = i32::try_from(extent.dev_id).map_err(|_| Error::UnregisteredStorage {
                dev_id: extent.dev_id,
            })?;
            Ok(Op {
                fd,
                addr,
                len,
                offset: extent.offset,
                done: 0,
                buffer_slot: None,
                file_slot: None,
            })
        })
        .collect()
}

/// A submitted batch: owns its pages and its ring until every completion is reaped.
struct UringPending {
    inner: Arc<Inner>,
    ring: Option<Ring>,
    run: Option<Run>,
    pages: Option<PageBatch>,
    failed: Option<Error>,
}

impl fmt::Debug for UringPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringPending")
            .field("pages", &self.pages.as_ref().map_or(0, Vec::len))
            .finish_non_exhaustive()
    }
}

impl UringPending {
    /// Drives the run to its end and gives the ring back; returns the batch status.
    fn settle(&mut self, block: bool) -> Result<bool> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        let (Some(ring), Some(run)) = (self.ring.as_mut(), self.run.as_mut()) else {
            return Ok(true);
        };
        if !run.pump(ring, block) {
            return Ok(false);
        }
        let outcome = run.outcome();
        if let Some(ring) = self.ring.take() {
            run.retire(&self.inner, ring);
        }
        if run.abandoned {
            if let Some(pages) = self.pages.take() {
                pages.iter().for_each(|(page, _)| page.abandon());
            }
        }
        self.run = None;
        outcome.map(|()| true)
    }
}

impl PendingTransfer for UringPending {
    fn poll(&mut self) -> Result<bool> {
        self.settle(false)
    }

    fn wait(mut self: Box<Self>) -> (PageBatch, Result<()>) {
        let status = loop {
            match self.settle(true) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(err) => break Err(err),
            }
        };
        (self.pages.take().unwrap_or_default(), status)
    }
}

impl Drop for UringPending {
    fn drop(&mut self) {
        // Every submitted entry must complete before the pages can go back to their pool; past a
        // short wait, entries are cancelled and, failing that, abandoned with their pages.
        if let Some(run) = self.run.as_mut() {
            run.expedite(DROP_WAIT);
        }
        while self.run.is_some() {
            if let Err(err) = self.settle(true) {
                tracing::debug!(error = %err, "dropped io_uring batch ended in error");
            }
        }
    }
}

impl Transport for UringTransport {
    fn backend(&self) -> &str {
        "URING"
    }

    fn register_memory(&self, region: Arc<dyn MemoryRegion>) -> Result<Registration> {
        let entry = self
            .inner
            .table
            .add_memory(region.base().as_ptr() as usize, region.len());
        let taken = lock(&self.inner.slots).add_memory(&region);
        Ok(self.registration(
            0,
            Guard {
                inner: Arc::clone(&self.inner),
                entry,
                fixed: Fixed::Buffers(taken),
                _keep_alive: region,
            },
        ))
    }

    fn register_file(&self, file: Arc<File>) -> Result<Registration> {
        let fd = file.as_raw_fd();
        let entry = self.inner.table.add_storage(fd as u64, false)?;
        lock(&self.inner.slots).add_file(&file);
        Ok(self.registration(
            fd as u64,
            Guard {
                inner: Arc::clone(&self.inner),
                entry,
                fixed: Fixed::File(fd),
                _keep_alive: file,
            },
        ))
    }

    fn register_object(&self, _object_id: u64, _len: usize) -> Result<Registration> {
        Err(Error::WrongStorageKind {
            backend: "URING".to_owned(),
            wanted: "objects",
        })
    }

    unsafe fn write(&self, batch: &[(&[u8], StorageExtent)]) -> Result<()> {
        let ops = ops_of(
            batch
                .iter()
                .map(|(b, e)| (b.as_ptr() as usize, b.len(), *e)),
        )?;
        self.run_blocking(true, ops)
    }

    unsafe fn read(&self, batch: &mut [(&mut [u8], StorageExtent)]) -> Result<()> {
        let ops = ops_of(
            batch
                .iter_mut()
                .map(|(b, e)| (b.as_mut_ptr() as usize, b.len(), *e)),
        )?;
        self.run_blocking(false, ops)
    }

    fn submit(&self, direction: Direction, mut batch: PageBatch) -> Box<dyn PendingTransfer> {
        let write = direction == Direction::Write;
        let spans: Vec<_> = batch
            .iter_mut()
            .map(|(page, extent)| {
                (
                    page.as_mut_slice().as_mut_ptr() as usize,
                    page.len(),
                    *extent,
                )
            })
            .collect();
        let prepared = ops_of(spans.into_iter()).and_then(|ops| {
            let leases = self
                .inner
                .table
                .check(ops.iter().map(|op| (op.addr, op.len, op.fd as u64)))?;
            let ring = self.inner.take_ring()?;
            let run = Run::new(write, ops, self.inner.config.timeout, &ring, leases);
            Ok((ring, run))
        });
        let (ring, run, failed) = match prepared {
            Ok((ring, run)) => (Some(ring), Some(run), None),
            Err(err) => (None, None, Some(err)),
        };
        let mut pending = UringPending {
            inner: Arc::clone(&self.inner),
            ring,
            run,
            pages: Some(batch),
            failed,
        };
        if let (Some(ring), Some(run)) = (pending.ring.as_mut(), pending.run.as_mut()) {
            run.pump(ring, false);
        }
        Box::new(pending)
    }

    fn retire(&self, pages: Vec<Page>, _failure: &Error) {
        // This engine abandons a batch only when the kernel has not let go of it in time: it
        // may go on using the pages for good.
        pages.into_iter().for_each(Page::abandon_owned);
    }

    fn exists(&self, items: &[StorageName<'_>]) -> Result<Vec<bool>> {
        items
            .iter()
            .map(|item| match item {
                StorageName::File(path) => Ok(path.exists()),
                StorageName::Object(_) => Err(Error::WrongStorageKind {
                    backend: "URING".to_owned(),
                    wanted: "objects",
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use nixl_core::{PageView, TransportExt};
    use pinned_alloc::PoolConfig;

    use super::*;

    fn idle_rings_hold_nothing(engine: &UringTransport) -> bool {
        lock(&engine.inner.rings)
            .iter()
            .all(|ring| ring.registered() == (0, 0))
    }

    /// A FIFO opened for reading and writing: reads of it wait for data for ever.
    fn never_answers(dir: &std::path::Path) -> File {
        let path = dir.join("never-answers");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        File::options().read(true).write(true).open(&path).unwrap()
    }

    /// Entries the kernel does not let go of by the second deadline abandon the run: the error
    /// says so, the ring is not reused, and the registrations the run names stay alive though
    /// the caller dropped them.
    #[test]
    fn a_run_the_kernel_does_not_let_go_of_is_abandoned_with_its_memory() {
        let timeout = Duration::from_millis(100);
        let engine = UringTransport::new(UringConfig::default().with_timeout(timeout)).unwrap();
        let pool = PoolConfig::new(64 << 10, 2 * (64 << 10)).build().unwrap();
        let memory = engine.register_pool(&pool).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let storage = engine
            .register_file(Arc::new(never_answers(dir.path())))
            .unwrap();
        let fd = storage.dev_id();
        let mut page = pool.allocate().unwrap();
        let span = (page.as_mut_slice().as_mut_ptr() as usize, page.len());
        let ops = ops_of([(span.0, span.1, StorageExtent::new(fd, 0))].into_iter()).unwrap();
        let leases = engine.inner.table.check([(span.0, span.1, fd)]).unwrap();
        let mut ring = engine.inner.take_ring().unwrap();
        let mut run = Run::new(false, ops, timeout, &ring, leases);
        // Every cancellation counts as sent and is never answered, as on a stuck mount.
        run.cancel_sent.fill(true);
        drop((memory, storage));
        let started = Instant::now();
        while !run.pump(&mut ring, true) {}
        assert!(run.abandoned);
        assert!(started.elapsed() < 2 * timeout + Duration::from_millis(500));
        run.retire(&engine.inner, ring);
        let err = run.outcome().unwrap_err();
        assert!(err.memory_abandoned() && err.is_timeout(), "{err}");
        // The kernel may still write into the page: retired, as `Transport::retire` does.
        page.abandon();
        assert!(
            lock(&engine.inner.rings).is_empty(),
            "the abandoned ring is not reused"
        );
        assert_eq!(
            engine
                .inner
                .abandoned
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert!(
            engine.inner.table.check([(span.0, span.1, fd)]).is_ok(),
            "the registrations the kernel may still use outlive the caller's handles"
        );
    }

    /// Registered memory and files reach every ring as fixed slots, transfers through them move
    /// the right bytes, and unregistering lets the idle rings drop them.
    #[test]
    fn registered_memory_and_files_become_fixed_slots_until_unregistered() {
        let engine = UringTransport::new(UringConfig::default()).unwrap();
        let pool = PoolConfig::new(64 << 10, 1 << 20).build().unwrap();
        let memory = engine.register_pool(&pool).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("chunks"))
                .unwrap(),
        );
        let storage = engine.register_file(Arc::clone(&file)).unwrap();

        let mut pages = pool.allocate_batch(2).unwrap();
        {
            let ring = engine.inner.take_ring().unwrap();
            for page in &pages {
                let addr = page.as_slice().as_ptr() as usize;
                assert!(ring.buffer_slot(addr, page.len()).is_some());
            }
            assert!(ring.file_slot(file.as_raw_fd()).is_some());
            engine.inner.give_ring(ring);
        }

        pages[0].as_mut_slice().fill(0xA5);
        pages[1].as_mut_slice().fill(0x5A);
        let extent = |i: u64| StorageExtent::new(storage.dev_id(), i * (64 << 10));
        engine
            .write_pages(
                &[(&pages[0], extent(1)), (&pages[1], extent(0))],
                PageView::Exact,
            )
            .unwrap();
        let mut on_disk = vec![0u8; 128 << 10];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(on_disk[..64 << 10].iter().all(|&b| b == 0x5A));
        assert!(on_disk[64 << 10..].iter().all(|&b| b == 0xA5));
        let (first, second) = pages.split_at_mut(1);
        engine
            .read_pages(
                &mut [(&mut first[0], extent(0)), (&mut second[0], extent(1))],
                PageView::Exact,
            )
            .unwrap();
        assert!(pages[0].as_slice().iter().all(|&b| b == 0x5A));
        assert!(pages[1].as_slice().iter().all(|&b| b == 0xA5));

        assert!(!idle_rings_hold_nothing(&engine));
        drop(storage);
        drop(memory);
        assert!(idle_rings_hold_nothing(&engine));
        assert_eq!(Arc::strong_count(&file), 1, "no ring keeps the file open");
    }

    /// A ring busy with a run while its file is unregistered keeps the file open until the run
    /// ends, then lets it go when it is given back.
    #[test]
    fn a_busy_ring_lets_go_of_unregistered_files_when_given_back() {
        let engine = UringTransport::new(UringConfig::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(File::create(dir.path().join("chunks")).unwrap());
        let storage = engine.register_file(Arc::clone(&file)).unwrap();
        let busy = engine.inner.take_ring().unwrap();
        assert!(busy.file_slot(file.as_raw_fd()).is_some());
        drop(storage);
        assert_eq!(
            Arc::strong_count(&file),
            2,
            "the busy ring still names the file"
        );
        engine.inner.give_ring(busy);
        assert_eq!(Arc::strong_count(&file), 1);
        assert!(idle_rings_hold_nothing(&engine));
    }

    /// A file the kernel will not take as a fixed file (an io_uring descriptor) is remembered as
    /// refused, runs plain, and is not offered again when the tables change.
    #[test]
    fn a_refused_registration_runs_plain_and_is_not_retried() {
        let engine = UringTransport::new(UringConfig::default()).unwrap();
        let other_ring = io_uring::IoUring::new(2).unwrap();
        // SAFETY: `dup` returns a new descriptor that nothing else owns (or -1, checked).
        let duplicate = unsafe { libc::dup(other_ring.as_raw_fd()) };
        assert!(duplicate >= 0);
        // SAFETY: `duplicate` is an open descriptor owned by nothing else.
        let refusable =
            Arc::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(duplicate) });
        let refused_registration = engine.register_file(Arc::clone(&refusable)).unwrap();
        let ring = engine.inner.take_ring().unwrap();
        assert_eq!(ring.file_slot(refusable.as_raw_fd()), None);
        assert_eq!(ring.refused(), (1, 1));
        engine.inner.give_ring(ring);

        let dir = tempfile::tempdir().unwrap();
        let plain = Arc::new(File::create(dir.path().join("chunks")).unwrap());
        let _accepted = engine.register_file(Arc::clone(&plain)).unwrap();
        let ring = engine.inner.take_ring().unwrap();
        assert!(ring.file_slot(plain.as_raw_fd()).is_some());
        assert_eq!(ring.file_slot(refusable.as_raw_fd()), None);
        assert_eq!(
            ring.refused(),
            (1, 1),
            "the refused file was not offered again"
        );
        engine.inner.give_ring(ring);
        drop(refused_registration);
        assert!(
            lock(&engine.inner.rings)
                .iter()
                .all(|ring| ring.refused().0 == 0)
        );
    }
}
