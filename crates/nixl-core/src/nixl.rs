//! [`Transport`] over the real NIXL library.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nixl_sys::{
    Agent, AgentConfig, Backend, MemType, NixlDescriptor, OptArgs, RegDescList, RegistrationHandle,
    XferDescList, XferOp, XferRequest, XferStatus,
};
use pinned_alloc::{MemoryRegion, Page};

/// The longest sleep between two status polls: short enough that a batch finishing in well under
/// a millisecond is seen at once, long enough that a waiting thread uses almost no CPU.
const MAX_POLL_PAUSE: Duration = Duration::from_micros(50);

/// How long dropping an unfinished transfer waits for it; then the transport adopts it and its
/// pages, and finishes it later (the caller is not held up).
const DROP_WAIT: Duration = Duration::from_secs(2);

/// Failed requests held for their grace period at most; past this, new transfers are refused
/// until some expire, rather than memory held without bound.
const MAX_HELD_FAILURES: usize = 1024;

use crate::error::{Error, NixlStatus, Result};
use crate::runtime::NixlRuntime;
use crate::table::{Lease, RegistrationTable, TableEntry};
use crate::transport::{
    Direction, PageBatch, PendingTransfer, Registration, StorageExtent, StorageName, Transport,
};
use crate::transport::{FAILED_REQUEST_GRACE, MAX_ABANDONED_REQUESTS};

/// One local buffer of a batch: address, length, and where it goes in storage.
#[cfg(feature = "cuda")]
type HostOrDeviceDesc = (usize, usize, StorageExtent);

/// Host memory: NIXL's DRAM, device 0.
const HOST: (MemType, u64) = (MemType::Dram, 0);

/// Plugins whose storage is objects (NIXL memory type OBJ) rather than files.
const OBJECT_PLUGINS: &[&str] = &["OBJ", "AZURE_BLOB", "DOCA_MEMOS"];

/// How the NIXL agent synchronises calls from several threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ThreadSync {
    /// No locking inside NIXL: the transport then serialises every agent call itself, since it
    /// is shared between threads.
    None,
    /// One lock around every agent call.
    #[default]
    Strict,
    /// A reader/writer lock: transfers in parallel, registrations exclusive.
    ReadWrite,
}

impl From<ThreadSync> for nixl_sys::ThreadSync {
    fn from(sync: ThreadSync) -> Self {
        match sync {
            ThreadSync::None => nixl_sys::ThreadSync::None,
            ThreadSync::Strict => nixl_sys::ThreadSync::Strict,
            ThreadSync::ReadWrite => nixl_sys::ThreadSync::Rw,
        }
    }
}

/// Configuration of a [`NixlTransport`].
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NixlConfig {
    /// Agent name; must be unique among agents that talk to each other.
    pub agent_name: String,
    /// NIXL plugin to create one backend of (`POSIX`, `GDS_MT`, `OBJ`, …).
    pub backend: String,
    /// Parameters passed to the plugin, over its defaults (`nixl_backend_params`).
    pub backend_params: BTreeMap<String, String>,
    /// Thread synchronisation inside the agent.
    pub thread_sync: ThreadSync,
    /// Whether NIXL runs its own progress thread (`nixl_enable_prog_thread`).
    pub progress_thread: bool,
    /// How long one batch may take before it fails with [`Error::Timeout`].
    pub timeout: Duration,
}

impl fmt::Debug for NixlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Backend params may carry credentials (secret_key, connection_string): print keys only.
        f.debug_struct("NixlConfig")
            .field("agent_name", &self.agent_name)
            .field("backend", &self.backend)
            .field(
                "backend_params",
                &self.backend_params.keys().collect::<Vec<_>>(),
            )
            .field("thread_sync", &self.thread_sync)
            .field("progress_thread", &self.progress_thread)
            .field("timeout", &self.timeout)
            .finish()
    }
}

static AGENT_SEQ: AtomicU64 = AtomicU64::new(0);

impl NixlConfig {
    /// One backend of `plugin` with its default parameters, under a process-unique agent name.
    pub fn new(plugin: impl Into<String>) -> Self {
        Self {
            agent_name: format!(
                "kv-{}-{}",
                std::process::id(),
                AGENT_SEQ.fetch_add(1, Ordering::Relaxed)
            ),
            backend: plugin.into(),
            backend_params: BTreeMap::new(),
            thread_sync: ThreadSync::default(),
            progress_thread: false,
            timeout: Duration::from_secs(120),
        }
    }

    /// Sets one backend parameter.
    pub fn with_param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.backend_params.insert(key.into(), value.into());
        self
    }

    /// Sets the agent's thread synchronisation.
    pub fn with_thread_sync(mut self, sync: ThreadSync) -> Self {
        self.thread_sync = sync;
        self
    }

    /// Enables or disables NIXL's progress thread.
    pub fn with_progress_thread(mut self, enabled: bool) -> Self {
        self.progress_thread = enabled;
        self
    }

    /// Sets the time one batch may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

struct Shared {
    agent: Agent,
    backend: Backend,
    config: NixlConfig,
    storage_mem: MemType,
    table: RegistrationTable,
    /// Held around every agent call when the agent itself does not synchronise
    /// ([`ThreadSync::None`]).
    serial: Option<Mutex<()>>,
    /// Requests abandoned to the plugin so far.
    abandoned: AtomicUsize,
    /// Failed requests and the pages they named, kept until their grace period ends (oldest
    /// first).
    held: Mutex<std::collections::VecDeque<(Instant, Held)>>,
    /// Transfers dropped unfinished, with their pages and the time they may take at most:
    /// polled at each later post, finished or abandoned then.
    adopted: Mutex<Vec<(Instant, Posted, Vec<Page>)>>,
}

/// A request posted to NIXL with a lease on every registration it names.
struct Posted {
    request: XferRequest,
    /// Dropped after the request: the registrations outlive its release.
    leases: Vec<(TableEntry, Lease)>,
    descriptors: usize,
}

/// What a failed transfer left behind, held out of use for its grace period.
enum Held {
    /// The request (never released under a plugin that may still use it) and the leases that
    /// keep its memory registered and its files open.
    Request(XferRequest, Vec<Lease>),
    /// The pages the batch named.
    Pages(Vec<Page>),
}

impl Shared {
    /// The agent-call lock, where the agent does not lock itself.
    fn serial(&self) -> Option<MutexGuard<'_, ()>> {
        self.serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Ends a request that did not succeed, NIXL having handed it to the plugin.
    ///
    /// - One that ran out of time may still be running: it is [abandoned](Shared::abandon) for
    ///   good, and the caller gets [`Error::Abandoned`].
    /// - One NIXL reports failed may still have parts running: the POSIX plugin reports the
    ///   first failed completion while the batch's other I/Os are in flight, and an object
    ///   plugin's SDK goes on retrying (reading or writing the batch's memory). The request, its
    ///   memory registrations and its files are held for [`FAILED_REQUEST_GRACE`], and the
    ///   caller gets [`Error::Abandoned`] and must retire the memory ([`Transport::retire`]).
    ///   Object registrations are let go at once, so a retry may register the same object id:
    ///   an id names an object, unlike a file descriptor, which a later file may reuse.
    fn fail(&self, posted: Posted, cause: Error) -> Error {
        if cause.is_timeout() {
            return self.abandon(posted, cause);
        }
        tracing::warn!(
            backend = %self.config.backend,
            descriptors = posted.descriptors,
            error = %cause,
            "NIXL transfer failed; its request and memory are held out of use for a grace period"
        );
        let descriptors = posted.descriptors;
        let objects = self.storage_mem == MemType::Object;
        let (released, kept): (Vec<_>, Vec<_>) = posted
            .leases
            .into_iter()
            .partition(|(entry, _)| objects && matches!(entry, TableEntry::Storage(..)));
        let kept = kept.into_iter().map(|(_, lease)| lease).collect();
        self.hold(Held::Request(posted.request, kept));
        // Outside the custody lock: the last lease of a dropped registration deregisters.
        drop(released);
        Error::Abandoned {
            descriptors,
            cause: Box::new(cause),
        }
    }

    /// Holds what a failed transfer left behind, and releases what has served its grace period.
    fn hold(&self, held: Held) {
        let now = Instant::now();
        let expired = {
            let mut list = self.held.lock().unwrap_or_else(|p| p.into_inner());
            list.push_back((now, held));
            expired_of(&mut list, now)
        };
        self.release_held(expired);
    }

    /// Whether the custody list has room for another failure (after releasing what expired).
    /// How many failed and adopted transfers are held, after releasing what is over; `Err` with
    /// that count when there is no room for another.
    fn has_room(&self) -> std::result::Result<(), usize> {
        let adopted = self.reap_adopted();
        let now = Instant::now();
        let (expired, requests) = {
            let mut list = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let expired = expired_of(&mut list, now);
            let requests = list
                .iter()
                .filter(|(_, held)| matches!(held, Held::Request(..)))
                .count();
            (expired, requests)
        };
        self.release_held(expired);
        let held = requests + adopted;
        if held < MAX_HELD_FAILURES {
            Ok(())
        } else {
            Err(held)
        }
    }

    /// Takes over a transfer dropped while still running, with its pages: it is finished by a
    /// later call (see [`reap_adopted`](Shared::reap_adopted)) within the transport's timeout.
    fn adopt(&self, posted: Posted, pages: Vec<Page>) {
        let deadline = Instant::now() + self.config.timeout;
        self.adopted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((deadline, posted, pages));
    }

    /// Finishes the adopted transfers that are over: their pages go back to their pool (or are
    /// retired as any failed batch's), and those past their time are abandoned. Returns how
    /// many are still running.
    fn reap_adopted(&self) -> usize {
        let adopted = std::mem::take(&mut *self.adopted.lock().unwrap_or_else(|p| p.into_inner()));
        let mut running = Vec::new();
        for (deadline, posted, pages) in adopted {
            let outcome = match poll_request(self, &posted.request) {
                Ok(true) => Ok(()),
                Ok(false) if Instant::now() < deadline => {
                    running.push((deadline, posted, pages));
                    continue;
                }
                Ok(false) => Err(Error::Timeout {
                    descriptors: posted.descriptors,
                    timeout: self.config.timeout,
                }),
                Err(err) => Err(err),
            };
            match outcome {
                Ok(()) => release(self, posted),
                Err(err) => {
                    let err = self.fail(posted, err);
                    if err.memory_abandoned() {
                        self.retire(pages, &err);
                        continue;
                    }
                }
            }
        }
        let still = running.len();
        self.adopted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(running);
        still
    }

    /// Releases held requests (under the agent-call lock), then their leases and pages (outside
    /// it: the last lease of a dropped registration deregisters, which takes that lock).
    fn release_held(&self, expired: Vec<Held>) {
        for held in expired {
            match held {
                Held::Request(request, leases) => {
                    {
                        let _serial = self.serial();
                        drop(request);
                    }
                    drop(leases);
                }
                Held::Pages(pages) => drop(pages),
            }
        }
    }

    /// After a timed-out request, the plugin may still be working on some of its
    /// descriptors (a storage SDK retrying in the background, seen with NIXL OBJ against a
    /// missing bucket), and NIXL cannot say when it stops. The request is never released under
    /// it (releasing an active request frees what the plugin still uses), and the registrations
    /// it names stay registered, mapped and open for the rest of the process: a leak that only
    /// failures pay, counted and bounded by [`MAX_ABANDONED_REQUESTS`], instead of a
    /// use-after-free. Returns the error for the caller, which must retire the batch's memory.
    fn abandon(&self, posted: Posted, cause: Error) -> Error {
        let count = self.abandoned.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(
            backend = %self.config.backend,
            descriptors = posted.descriptors,
            abandoned_requests = count,
            error = %cause,
            "NIXL request abandoned: its memory and storage are retired for good"
        );
        let descriptors = posted.descriptors;
        std::mem::forget(posted);
        Error::Abandoned {
            descriptors,
            cause: Box::new(cause),
        }
    }

    fn opt_args(&self) -> Result<OptArgs> {
        let mut args = OptArgs::new().map_err(Error::nixl("create optional arguments"))?;
        args.add_backend(&self.backend)
            .map_err(Error::nixl("select backend"))?;
        Ok(args)
    }
}

/// A [`Transport`] over one NIXL agent with one backend.
#[derive(Clone)]
pub struct NixlTransport {
    shared: Arc<Shared>,
}

impl fmt::Debug for NixlTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NixlTransport")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// A descriptor handed to `Agent::register_memory`.
#[derive(Debug)]
pub(crate) struct Descriptor {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    pub(crate) dev_id: u64,
    pub(crate) mem_type: MemType,
}

impl nixl_sys::MemoryRegion for Descriptor {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.addr as *const u8
    }

    fn size(&self) -> usize {
        self.len
    }
}

impl NixlDescriptor for Descriptor {
    fn mem_type(&self) -> MemType {
        self.mem_type
    }

    fn device_id(&self) -> u64 {
        self.dev_id
    }
}

/// Deregisters from NIXL, then forgets the table entry, then lets go of what it kept alive.
struct Guard<T: Send + Sync + 'static> {
    handle: Option<RegistrationHandle>,
    shared: Arc<Shared>,
    entry: TableEntry,
    _keep_alive: T,
}

impl<T: Send + Sync + 'static> fmt::Debug for Guard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NixlRegistration")
            .field("entry", &self.entry)
            .finish()
    }
}

impl<T: Send + Sync + 'static> Drop for Guard<T> {
    fn drop(&mut self) {
        if let Some(mut handle) = self.handle.take() {
            let _serial = self.shared.serial();
            if let Err(err) = handle.deregister() {
                tracing::warn!(entry = ?self.entry, error = %err, "NIXL deregistration failed");
            }
        }
        self.shared.table.remove(self.entry);
    }
}

impl NixlTransport {
    /// Loads the NIXL runtime (see [`NixlRuntime::load`]), creates an agent and one backend.
    pub fn new(config: NixlConfig) -> Result<Self> {
        NixlRuntime::load()?;
        Self::with_loaded_runtime(config)
    }

    fn with_loaded_runtime(config: NixlConfig) -> Result<Self> {
        let agent_config = AgentConfig {
            enable_prog_thread: config.progress_thread,
            thread_sync: config.thread_sync.into(),
            ..AgentConfig::default()
        };
        let agent = Agent::new_configured(&config.agent_name, &agent_config)
            .map_err(Error::nixl("create agent"))?;
        let available = plugins_of(&agent)?;
        if !available.iter().any(|p| p == &config.backend) {
            return Err(Error::PluginUnavailable {
                plugin: config.backend.clone(),
                available,
            });
        }
        let (backend, config) = create_backend(&agent, config)?;
        tracing::debug!(agent = %config.agent_name, backend = %config.backend, "NIXL backend ready");
        let storage_mem = if OBJECT_PLUGINS.contains(&config.backend.as_str()) {
            MemType::Object
        } else {
            MemType::File
        };
        let serial = (config.thread_sync == ThreadSync::None).then(|| Mutex::new(()));
        Ok(Self {
            shared: Arc::new(Shared {
                agent,
                backend,
                config,
                storage_mem,
                table: RegistrationTable::new(),
                serial,
                abandoned: AtomicUsize::new(0),
                held: Mutex::new(std::collections::VecDeque::new()),
                adopted: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The plugins NIXL finds, loading the runtime first if needed.
    pub fn available_plugins() -> Result<Vec<String>> {
        NixlRuntime::load()?;
        let agent = Agent::new(&NixlConfig::new("probe").agent_name)
            .map_err(Error::nixl("create agent"))?;
        plugins_of(&agent)
    }

    /// The configuration this transport was built with.
    pub fn config(&self) -> &NixlConfig {
        &self.shared.config
    }

    /// Records the entry first (so two racing registrations of one object id cannot both pass),
    /// then registers with NIXL, undoing the entry if NIXL refuses.
    fn register(
        &self,
        descriptor: Descriptor,
        entry: TableEntry,
        keep_alive: impl Send + Sync + 'static,
    ) -> Result<Registration> {
        let dev_id = descriptor.dev_id;
        let registered = self.shared.opt_args().and_then(|opt_args| {
            let _serial = self.shared.serial();
            self.shared
                .agent
                .register_memory(&descriptor, Some(&opt_args))
                .map_err(Error::nixl("register memory"))
        });
        let handle = match registered {
            Ok(handle) => handle,
            Err(err) => {
                self.shared.table.remove(entry);
                return Err(err);
            }
        };
        let guard = Arc::new(Guard {
            handle: Some(handle),
            shared: Arc::clone(&self.shared),
            entry,
            _keep_alive: keep_alive,
        });
        let lease: Arc<dyn std::any::Any + Send + Sync> = guard.clone();
        self.shared.table.attach(entry, Arc::downgrade(&lease));
        Ok(Registration::new(dev_id, Box::new(guard)))
    }

    /// Checks the batch, builds one request for all of it and posts it. The request holds a
    /// lease on every registration it names, taken in the same step as the check. An error
    /// is either one from before anything was handed to NIXL, or [`Error::Abandoned`].
    fn post(
        &self,
        op: XferOp,
        batch: &[(usize, usize, StorageExtent)],
        local_memory: (MemType, u64),
    ) -> Result<Option<Posted>> {
        if batch.is_empty() {
            return Ok(None);
        }
        let abandoned = self.shared.abandoned.load(Ordering::Relaxed);
        if abandoned >= MAX_ABANDONED_REQUESTS {
            return Err(Error::TooManyAbandoned { abandoned });
        }
        if let Err(held) = self.shared.has_room() {
            return Err(Error::FailuresHeld {
                held,
                grace: FAILED_REQUEST_GRACE,
            });
        }
        let leases = self.shared.table.check(
            batch
                .iter()
                .map(|&(addr, len, extent)| (addr, len, extent.dev_id)),
        )?;
        let invalid = |_| Error::Nixl {
            operation: "build descriptors",
            status: NixlStatus::InvalidParam,
        };
        let (local_type, local_device) = local_memory;
        let mut local = XferDescList::new(local_type).map_err(Error::nixl("build descriptors"))?;
        let mut remote =
            XferDescList::new(self.shared.storage_mem).map_err(Error::nixl("build descriptors"))?;
        for &(addr, len, extent) in batch {
            local.add_desc(addr, len, local_device);
            remote.add_desc(
                usize::try_from(extent.offset).map_err(invalid)?,
                len,
                extent.dev_id,
            );
        }
        let agent = &self.shared.agent;
        let opt_args = self.shared.opt_args()?;
        let _serial = self.shared.serial();
        let request = agent
            .create_xfer_req(
                op,
                &local,
                &remote,
                &self.shared.config.agent_name,
                Some(&opt_args),
            )
            .map_err(Error::nixl("create transfer request"))?;
        let posted = Posted {
            request,
            leases,
            descriptors: batch.len(),
        };
        // Completed at once or still in progress: the status poll answers either way. A failed
        // post may have handed part of the batch to the plugin: held as any failed request.
        if let Err(err) = agent.post_xfer_req(&posted.request, Some(&opt_args)) {
            drop(_serial);
            return Err(self.shared.fail(posted, Error::nixl("post transfer")(err)));
        }
        Ok(Some(posted))
    }

    /// Posts the batch and waits for it.
    fn transfer(
        &self,
        op: XferOp,
        batch: &[(usize, usize, StorageExtent)],
        local_memory: (MemType, u64),
    ) -> Result<()> {
        let Some(posted) = self.post(op, batch, local_memory)? else {
            return Ok(());
        };
        match wait_request(&self.shared, &posted, self.shared.config.timeout) {
            Ok(()) => {
                release(&self.shared, posted);
                Ok(())
            }
            Err(err) => Err(self.shared.fail(posted, err)),
        }
    }
}

/// Takes from the front of the custody list what has served its grace period.
fn expired_of(list: &mut std::collections::VecDeque<(Instant, Held)>, now: Instant) -> Vec<Held> {
    let mut expired = Vec::new();
    while list
        .front()
        .is_some_and(|(since, _)| now.duration_since(*since) >= FAILED_REQUEST_GRACE)
    {
        expired.extend(list.pop_front().map(|(_, held)| held));
    }
    expired
}

impl Shared {
    /// Keeps the pages of an abandoned batch out of use: for good after a timeout, for the
    /// grace period after a failure NIXL reported.
    fn retire(&self, pages: Vec<Page>, failure: &Error) {
        if failure.is_timeout() {
            pages.into_iter().for_each(Page::abandon_owned);
        } else if !pages.is_empty() {
            self.hold(Held::Pages(pages));
        }
    }
}

/// Releases a finished request, then its leases (outside the agent-call lock: the last lease
/// of a dropped registration deregisters, which takes that lock itself).
fn release(shared: &Shared, posted: Posted) {
    let Posted {
        request, leases, ..
    } = posted;
    {
        let _serial = shared.serial();
        drop(request);
    }
    drop(leases);
}

/// One status check: `Ok(true)` when done.
fn poll_request(shared: &Shared, request: &XferRequest) -> Result<bool> {
    let _serial = shared.serial();
    match shared
        .agent
        .get_xfer_status(request)
        .map_err(Error::nixl("transfer"))?
    {
        XferStatus::Success => Ok(true),
        XferStatus::InProgress => Ok(false),
    }
}

/// Polls for completion, for at most `timeout`, with a growing back-off, so a waiting thread
/// does not burn a core.
fn wait_request(shared: &Shared, posted: &Posted, timeout: Duration) -> Result<()> {
    let request = &posted.request;
    let started = Instant::now();
    let mut pause = Duration::from_micros(2);
    let mut polls = 0u32;
    loop {
        if poll_request(shared, request)? {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(Error::Timeout {
                descriptors: posted.descriptors,
                timeout,
            });
        }
        polls += 1;
        if polls < 16 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }
}

/// Where a submitted batch stands.
#[derive(Debug)]
enum State {
    InFlight,
    Succeeded,
    /// Failed; the error is handed out once.
    Failed(Option<Error>),
}

/// A batch in flight, owning its pages and, through its request, a lease on every registration
/// it names.
struct NixlPending {
    shared: Arc<Shared>,
    posted: Option<Posted>,
    pages: Option<PageBatch>,
    state: State,
}

impl fmt::Debug for NixlPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NixlPending")
            .field("pages", &self.pages.as_ref().map_or(0, Vec::len))
            .field("state", &self.state)
            .finish()
    }
}

impl NixlPending {
    fn finish(&mut self, outcome: Result<()>) {
        let posted = self.posted.take();
        self.state = match (outcome, posted) {
            (Ok(()), posted) => {
                if let Some(posted) = posted {
                    release(&self.shared, posted);
                }
                State::Succeeded
            }
            (Err(err), Some(posted)) => {
                let err = self.shared.fail(posted, err);
                // The plugin may still touch these pages: they are kept out of use.
                if err.memory_abandoned() {
                    if let Some(pages) = self.pages.take() {
                        let pages = pages.into_iter().map(|(page, _)| page).collect();
                        self.shared.retire(pages, &err);
                    }
                }
                State::Failed(Some(err))
            }
            (Err(err), None) => State::Failed(Some(err)),
        };
    }

    /// Waits, for at most `timeout`, until the batch is over.
    fn settle(&mut self, timeout: Duration) {
        if matches!(self.state, State::InFlight) {
            let outcome = match &self.posted {
                Some(posted) => wait_request(&self.shared, posted, timeout),
                None => Ok(()),
            };
            self.finish(outcome);
        }
    }

    fn status(&mut self) -> Result<()> {
        match &mut self.state {
            State::InFlight | State::Succeeded => Ok(()),
            State::Failed(err) => Err(err
                .take()
                .unwrap_or_else(|| Error::Failed("the batch failed (reported before)".to_owned()))),
        }
    }
}

impl PendingTransfer for NixlPending {
    fn poll(&mut self) -> Result<bool> {
        if matches!(self.state, State::InFlight) {
            let outcome = match &self.posted {
                None => Ok(()),
                Some(posted) => match poll_request(&self.shared, &posted.request) {
                    Ok(false) => return Ok(false),
                    Ok(true) => Ok(()),
                    Err(err) => Err(err),
                },
            };
            self.finish(outcome);
        }
        self.status().map(|()| true)
    }

    fn wait(mut self: Box<Self>) -> (PageBatch, Result<()>) {
        let timeout = self.shared.config.timeout;
        self.settle(timeout);
        let status = self.status();
        (self.pages.take().unwrap_or_default(), status)
    }
}

impl Drop for NixlPending {
    fn drop(&mut self) {
        // Bounded: a transfer still running after a short wait is adopted by the transport,
        // with its pages, rather than the caller held up or the pages abandoned.
        if let (State::InFlight, Some(posted)) = (&self.state, &self.posted) {
            match wait_request(
                &self.shared,
                posted,
                DROP_WAIT.min(self.shared.config.timeout),
            ) {
                Err(err) if err.is_timeout() => {
                    if let Some(posted) = self.posted.take() {
                        let pages = self.pages.take().unwrap_or_default();
                        self.shared
                            .adopt(posted, pages.into_iter().map(|(page, _)| page).collect());
                    }
                    return;
                }
                outcome => self.finish(outcome),
            }
        }
        if let State::Failed(Some(err)) = &self.state {
            tracing::debug!(error = %err, "dropped transfer ended in error");
        }
    }
}

#[cfg(feature = "cuda")]
impl NixlTransport {
    /// Registers a GPU staging buffer once, as VRAM on its device (`nixl_buffer_device: cuda`);
    /// its slots can then be moved to and from storage directly (GDS, GDS_MT, OBJ).
    pub fn register_device_pool(
        &self,
        pool: Arc<pinned_alloc::DeviceBufferPool>,
    ) -> Result<Registration> {
        let addr = pool.device_ptr() as usize;
        let len = usize::try_from(pool.len()).map_err(|_| Error::UnregisteredMemory {
            addr,
            len: usize::MAX,
        })?;
        let descriptor = Descriptor {
            addr,
            len,
            dev_id: pool.device() as u64,
            mem_type: MemType::Vram,
        };
        let entry = self.shared.table.add_memory(addr, len);
        self.register(descriptor, entry, pool)
    }

    fn device_batch<'a>(
        slots: impl Iterator<Item = (&'a pinned_alloc::DeviceSlot, StorageExtent)>,
    ) -> Result<(Vec<HostOrDeviceDesc>, u64)> {
        let mut device = None;
        let mut descs = Vec::new();
        for (slot, extent) in slots {
            if slot.is_abandoned() {
                return Err(Error::Failed(
                    "a retired device slot (abandoned by a failed transfer) cannot move data"
                        .to_owned(),
                ));
            }
            let this = slot.device() as u64;
            if *device.get_or_insert(this) != this {
                return Err(Error::Failed("one batch must stay on one GPU".to_owned()));
            }
            descs.push((slot.device_ptr() as usize, slot.len() as usize, extent));
        }
        Ok((descs, device.unwrap_or(0)))
    }

    /// Writes GPU slots to storage, as one batch. Slots the plugin may still read after an
    /// error are [abandoned](pinned_alloc::DeviceSlot::abandon).
    pub fn write_device(&self, batch: &[(&pinned_alloc::DeviceSlot, StorageExtent)]) -> Result<()> {
        let (descs, device) = Self::device_batch(batch.iter().map(|(s, e)| (*s, *e)))?;
        let outcome = self.transfer(XferOp::Write, &descs, (MemType::Vram, device));
        if outcome.as_ref().is_err_and(Error::memory_abandoned) {
            batch.iter().for_each(|(slot, _)| slot.abandon());
        }
        outcome
    }

    /// Reads storage into GPU slots, as one batch. Slots the plugin may still write after an
    /// error are [abandoned](pinned_alloc::DeviceSlot::abandon).
    pub fn read_device(
        &self,
        batch: &mut [(&mut pinned_alloc::DeviceSlot, StorageExtent)],
    ) -> Result<()> {
        let (descs, device) = Self::device_batch(batch.iter().map(|(s, e)| (&**s, *e)))?;
        let outcome = self.transfer(XferOp::Read, &descs, (MemType::Vram, device));
        if outcome.as_ref().is_err_and(Error::memory_abandoned) {
            batch.iter().for_each(|(slot, _)| slot.abandon());
        }
        outcome
    }
}

/// The POSIX plugin's I/O engine switches.
const POSIX_IO_ENGINES: [&str; 3] = ["use_uring", "use_aio", "use_posix_aio"];

/// Whether a plugin parameter's text means on, as NIXL's POSIX plugin reads it.
fn is_on(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes" | "on"
    )
}

/// Creates the configured backend. A POSIX backend whose engine is not chosen gets io_uring:
/// with libaio (the plugin's default) `io_submit` can block inside `post_xfer_req` on storage
/// that never answers, beyond any deadline of ours, while io_uring's submit returns and the
/// request times out. Where io_uring is refused (a container's seccomp profile), the plugin's
/// default is used, with a warning. The returned configuration names the engine chosen.
fn create_backend(agent: &Agent, config: NixlConfig) -> Result<(Backend, NixlConfig)> {
    // An engine switched off (`use_aio: false`) chooses nothing; only one switched on does.
    let engine_unset = config.backend == "POSIX"
        && !POSIX_IO_ENGINES.iter().any(|key| {
            config
                .backend_params
                .get(*key)
                .is_some_and(|value| is_on(value))
        });
    if engine_unset {
        let with_uring = config.clone().with_param("use_uring", "true");
        match create_backend_as_given(agent, &with_uring) {
            Ok(backend) => return Ok((backend, with_uring)),
            Err(err) => tracing::warn!(
                error = %err,
                "NIXL POSIX refused io_uring; using its default engine (libaio), under which a \
                 transfer to storage that never answers can block past its timeout"
            ),
        }
    }
    let backend = create_backend_as_given(agent, &config)?;
    Ok((backend, config))
}

fn create_backend_as_given(agent: &Agent, config: &NixlConfig) -> Result<Backend> {
    let (_mems, mut params) = agent
        .get_plugin_params(&config.backend)
        .map_err(Error::nixl("read plugin parameters"))?;
    for (key, value) in &config.backend_params {
        params
            .set(key, value)
            .map_err(Error::nixl("set plugin parameter"))?;
    }
    agent
        .create_backend(&config.backend, &params)
        .map_err(Error::nixl("create backend"))
}

fn plugins_of(agent: &Agent) -> Result<Vec<String>> {
    let list = agent
        .get_available_plugins()
        .map_err(Error::nixl("list plugins"))?;
    list.iter()
        .map(|name| name.map(str::to_owned).map_err(Error::nixl("list plugins")))
        .collect()
}

impl Transport for NixlTransport {
    fn backend(&self) -> &str {
        &self.shared.config.backend
    }

    fn register_memory(&self, region: Arc<dyn MemoryRegion>) -> Result<Registration> {
        let addr = region.base().as_ptr() as usize;
        let len = region.len();
        let descriptor = Descriptor {
            addr,
            len,
            dev_id: 0,
            mem_type: MemType::Dram,
        };
        let entry = self.shared.table.add_memory(addr, len);
        self.register(descriptor, entry, region)
    }

    fn register_file(&self, file: Arc<File>) -> Result<Registration> {
        if self.shared.storage_mem != MemType::File {
            return Err(Error::WrongStorageKind {
                backend: self.shared.config.backend.clone(),
                wanted: "files",
            });
        }
        let fd = file.as_raw_fd();
        let dev_id = u64::try_from(fd).map_err(|_| Error::UnregisteredStorage { dev_id: 0 })?;
        let descriptor = Descriptor {
            addr: 0,
            len: 0,
            dev_id,
            mem_type: MemType::File,
        };
        let entry = self.shared.table.add_storage(dev_id, false)?;
        self.register(descriptor, entry, file)
    }

    fn register_object(&self, object_id: u64, len: usize) -> Result<Registration> {
        if self.shared.storage_mem != MemType::Object {
            return Err(Error::WrongStorageKind {
                backend: self.shared.config.backend.clone(),
                wanted: "objects",
            });
        }
        let descriptor = Descriptor {
            addr: 0,
            len,
            dev_id: object_id,
            mem_type: MemType::Object,
        };
        let entry = self.shared.table.add_storage(object_id, true)?;
        self.register(descriptor, entry, ())
    }

    fn submit(&self, direction: Direction, mut batch: PageBatch) -> Box<dyn PendingTransfer> {
        let (op, descs): (XferOp, Vec<_>) = match direction {
            Direction::Write => (
                XferOp::Write,
                batch
                    .iter()
                    .map(|(page, extent)| (page.as_slice().as_ptr() as usize, page.len(), *extent))
                    .collect(),
            ),
            Direction::Read => (
                XferOp::Read,
                batch
                    .iter_mut()
                    .map(|(page, extent)| {
                        (
                            page.as_mut_slice().as_mut_ptr() as usize,
                            page.len(),
                            *extent,
                        )
                    })
                    .collect(),
            ),
        };
        let (posted, state) = match self.post(op, &descs, HOST) {
            Ok(posted) => (posted, State::InFlight),
            Err(err) if err.memory_abandoned() => {
                let pages = std::mem::take(&mut batch)
                    .into_iter()
                    .map(|(p, _)| p)
                    .collect();
                self.shared.retire(pages, &err);
                (None, State::Failed(Some(err)))
            }
            Err(err) => (None, State::Failed(Some(err))),
        };
        Box::new(NixlPending {
            shared: Arc::clone(&self.shared),
            posted,
            pages: Some(batch),
            state,
        })
    }

    fn retire(&self, pages: Vec<Page>, failure: &Error) {
        self.shared.retire(pages, failure);
    }

    fn exists(&self, items: &[StorageName<'_>]) -> Result<Vec<bool>> {
        // Callers that wait for buffers an adopted transfer holds query existence before they
        // post: finish what is over here too.
        self.shared.reap_adopted();
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut descs =
            RegDescList::new(self.shared.storage_mem).map_err(Error::nixl("build query"))?;
        for item in items {
            match (item, self.shared.storage_mem) {
                (StorageName::File(path), MemType::File) => {
                    descs.add_desc_with_meta(0, 0, 0, path.as_os_str().as_bytes());
                }
                (StorageName::Object(id), MemType::Object) => {
                    descs.add_desc_with_meta(0, 0, 0, id.to_string().as_bytes());
                }
                _ => {
                    return Err(Error::WrongStorageKind {
                        backend: self.shared.config.backend.clone(),
                        wanted: match item {
                            StorageName::File(_) => "files",
                            StorageName::Object(_) => "objects",
                        },
                    });
                }
            }
        }
        let opt_args = self.shared.opt_args()?;
        let _serial = self.shared.serial();
        let responses = self
            .shared
            .agent
            .query_mem(&descs, Some(&opt_args))
            .map_err(Error::nixl("query storage"))?;
        let found: Vec<bool> = responses
            .iter()
            .map_err(Error::nixl("query storage"))?
            .map(|response| response.has_value().map_err(Error::nixl("query storage")))
            .collect::<Result<_>>()?;
        if found.len() != items.len() {
            return Err(Error::Failed(format!(
                "NIXL answered {} of {} existence queries",
                found.len(),
                items.len()
            )));
        }
        Ok(found)
    }

    unsafe fn write(&self, batch: &[(&[u8], StorageExtent)]) -> Result<()> {
        let descs: Vec<_> = batch
            .iter()
            .map(|(buf, extent)| (buf.as_ptr() as usize, buf.len(), *extent))
            .collect();
        self.transfer(XferOp::Write, &descs, HOST)
    }

    unsafe fn read(&self, batch: &mut [(&mut [u8], StorageExtent)]) -> Result<()> {
        let descs: Vec<_> = batch
            .iter_mut()
            .map(|(buf, extent)| (buf.as_mut_ptr() as usize, buf.len(), *extent))
            .collect();
        self.transfer(XferOp::Read, &descs, HOST)
    }
}
