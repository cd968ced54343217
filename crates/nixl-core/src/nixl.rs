//! [`Transport`] over the real NIXL library.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixl_sys::{
    Agent, AgentConfig, Backend, MemType, NixlDescriptor, OptArgs, RegDescList, RegistrationHandle,
    XferDescList, XferOp, XferRequest, XferStatus,
};
use pinned_alloc::{MemoryRegion, Quarantine};

/// The longest sleep between two status polls: short enough that a batch finishing in well under
/// a millisecond is seen at once, long enough that a waiting thread uses almost no CPU.
const MAX_POLL_PAUSE: Duration = Duration::from_micros(50);

/// How long the pages of a failed batch stay out of their pool.
const FAILED_PAGE_GRACE: Duration = Duration::from_secs(60);

use crate::error::{Error, NixlStatus, Result};
use crate::runtime::NixlRuntime;
use crate::table::{RegistrationTable, TableEntry};
use crate::transport::{
    Direction, PageBatch, PendingTransfer, Registration, StorageExtent, StorageName, Transport,
};

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
    /// No locking inside NIXL; the caller serialises.
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
    /// Registered host memory, to quarantine when a transfer fails.
    live_regions: Mutex<Vec<(TableEntry, Arc<dyn MemoryRegion>)>>,
    /// Base addresses of regions kept mapped for good because a failed transfer may still touch
    /// them.
    pinned_for_good: Mutex<std::collections::HashSet<usize>>,
    /// Pages of failed submitted batches, held back from their pool for a grace period.
    held_pages: Quarantine,
    /// GPU buffers registered as VRAM, kept allocated for good if a transfer on them fails.
    #[cfg(feature = "cuda")]
    device_pools: Mutex<Vec<Arc<pinned_alloc::DeviceBufferPool>>>,
}

impl Shared {
    /// After a failed request, a plugin may still be working on some of its descriptors (a
    /// storage SDK retrying in the background, seen with NIXL OBJ against a missing bucket).
    /// The request handle is never released under it (which also keeps the agent alive), and
    /// every registered region stays mapped for the rest of the process: a bounded leak that only
    /// failures pay, instead of a use-after-unmap.
    fn quarantine(&self, request: XferRequest) {
        std::mem::forget(request);
        let live = self.live_regions.lock().unwrap_or_else(|p| p.into_inner());
        let mut pinned = self
            .pinned_for_good
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (_, region) in live.iter() {
            if pinned.insert(region.base().as_ptr() as usize) {
                std::mem::forget(Arc::clone(region));
            }
        }
        #[cfg(feature = "cuda")]
        for pool in self
            .device_pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if pinned.insert(pool.device_ptr() as usize) {
                std::mem::forget(Arc::clone(pool));
            }
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
            if let Err(err) = handle.deregister() {
                tracing::warn!(entry = ?self.entry, error = %err, "NIXL deregistration failed");
            }
        }
        self.shared.table.remove(self.entry);
        self.shared
            .live_regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(entry, _)| *entry != self.entry);
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
        let (_mems, mut params) = agent
            .get_plugin_params(&config.backend)
            .map_err(Error::nixl("read plugin parameters"))?;
        for (key, value) in &config.backend_params {
            params
                .set(key, value)
                .map_err(Error::nixl("set plugin parameter"))?;
        }
        let backend = agent
            .create_backend(&config.backend, &params)
            .map_err(Error::nixl("create backend"))?;
        tracing::debug!(agent = %config.agent_name, backend = %config.backend, "NIXL backend ready");
        let storage_mem = if OBJECT_PLUGINS.contains(&config.backend.as_str()) {
            MemType::Object
        } else {
            MemType::File
        };
        Ok(Self {
            shared: Arc::new(Shared {
                agent,
                backend,
                config,
                storage_mem,
                table: RegistrationTable::new(),
                live_regions: Mutex::new(Vec::new()),
                pinned_for_good: Mutex::new(std::collections::HashSet::new()),
                held_pages: Quarantine::new(FAILED_PAGE_GRACE),
                #[cfg(feature = "cuda")]
                device_pools: Mutex::new(Vec::new()),
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
        let guard = Guard {
            handle: Some(handle),
            shared: Arc::clone(&self.shared),
            entry,
            _keep_alive: keep_alive,
        };
        Ok(Registration::new(dev_id, Box::new(guard)))
    }

    /// Checks the batch, builds one request for all of it and posts it.
    fn post(
        &self,
        op: XferOp,
        batch: &[(usize, usize, StorageExtent)],
        local_memory: (MemType, u64),
    ) -> Result<Option<XferRequest>> {
        if batch.is_empty() {
            return Ok(None);
        }
        self.shared.table.check(
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
        let request = agent
            .create_xfer_req(
                op,
                &local,
                &remote,
                &self.shared.config.agent_name,
                Some(&opt_args),
            )
            .map_err(Error::nixl("create transfer request"))?;
        // Completed at once or still in progress: the status poll answers either way.
        agent
            .post_xfer_req(&request, Some(&opt_args))
            .map_err(Error::nixl("post transfer"))?;
        Ok(Some(request))
    }

    /// Posts the batch and waits for it.
    fn transfer(
        &self,
        op: XferOp,
        batch: &[(usize, usize, StorageExtent)],
        local_memory: (MemType, u64),
    ) -> Result<()> {
        let Some(request) = self.post(op, batch, local_memory)? else {
            return Ok(());
        };
        let outcome = wait_request(&self.shared, &request, batch.len());
        if outcome.is_err() {
            self.shared.quarantine(request);
        }
        outcome
    }
}

/// One status check: `Ok(true)` when done.
fn poll_request(shared: &Shared, request: &XferRequest) -> Result<bool> {
    match shared
        .agent
        .get_xfer_status(request)
        .map_err(Error::nixl("transfer"))?
    {
        XferStatus::Success => Ok(true),
        XferStatus::InProgress => Ok(false),
    }
}

/// Polls for completion with a growing back-off, so a waiting thread does not burn a core.
fn wait_request(shared: &Shared, request: &XferRequest, descriptors: usize) -> Result<()> {
    let started = Instant::now();
    let timeout = shared.config.timeout;
    let mut pause = Duration::from_micros(2);
    let mut polls = 0u32;
    loop {
        if poll_request(shared, request)? {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(Error::Timeout {
                descriptors,
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

/// A batch in flight, owning its pages.
struct NixlPending {
    shared: Arc<Shared>,
    request: Option<XferRequest>,
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
        self.state = match outcome {
            Ok(()) => State::Succeeded,
            Err(err) => {
                // The plugin may still touch these pages: hold them back from their pool for a
                // grace period rather than hand them to another chunk now.
                if let Some(request) = self.request.take() {
                    self.shared.quarantine(request);
                    if let Some(pages) = self.pages.take() {
                        tracing::warn!(
                            pages = pages.len(),
                            error = %err,
                            "transfer failed; its pages are held back from the pool for a while"
                        );
                        self.shared
                            .held_pages
                            .hold(pages.into_iter().map(|(p, _)| p).collect());
                    }
                }
                State::Failed(Some(err))
            }
        };
    }

    /// Waits (bounded by the transport's timeout) until the batch is over.
    fn settle(&mut self) {
        if matches!(self.state, State::InFlight) {
            let descriptors = self.pages.as_ref().map_or(0, Vec::len);
            let outcome = match &self.request {
                Some(request) => wait_request(&self.shared, request, descriptors),
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
            let outcome = match &self.request {
                None => Ok(()),
                Some(request) => match poll_request(&self.shared, request) {
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
        self.settle();
        let status = self.status();
        (self.pages.take().unwrap_or_default(), status)
    }
}

impl Drop for NixlPending {
    fn drop(&mut self) {
        self.settle();
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
        self.shared
            .device_pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&pool));
        self.register(descriptor, entry, pool)
    }

    fn device_batch<'a>(
        slots: impl Iterator<Item = (&'a pinned_alloc::DeviceSlot, StorageExtent)>,
    ) -> Result<(Vec<HostOrDeviceDesc>, u64)> {
        let mut device = None;
        let mut descs = Vec::new();
        for (slot, extent) in slots {
            let this = slot.device() as u64;
            if *device.get_or_insert(this) != this {
                return Err(Error::Failed("one batch must stay on one GPU".to_owned()));
            }
            descs.push((slot.device_ptr() as usize, slot.len() as usize, extent));
        }
        Ok((descs, device.unwrap_or(0)))
    }

    /// Writes GPU slots to storage, as one batch.
    pub fn write_device(&self, batch: &[(&pinned_alloc::DeviceSlot, StorageExtent)]) -> Result<()> {
        let (descs, device) = Self::device_batch(batch.iter().map(|(s, e)| (*s, *e)))?;
        self.transfer(XferOp::Write, &descs, (MemType::Vram, device))
    }

    /// Reads storage into GPU slots, as one batch.
    pub fn read_device(
        &self,
        batch: &mut [(&mut pinned_alloc::DeviceSlot, StorageExtent)],
    ) -> Result<()> {
        let (descs, device) = Self::device_batch(batch.iter().map(|(s, e)| (&**s, *e)))?;
        self.transfer(XferOp::Read, &descs, (MemType::Vram, device))
    }
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
        self.shared
            .live_regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((entry, Arc::clone(&region)));
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
        let (request, state) = match self.post(op, &descs, HOST) {
            Ok(request) => (request, State::InFlight),
            Err(err) => (None, State::Failed(Some(err))),
        };
        Box::new(NixlPending {
            shared: Arc::clone(&self.shared),
            request,
            pages: Some(batch),
            state,
        })
    }

    fn exists(&self, items: &[StorageName<'_>]) -> Result<Vec<bool>> {
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

    fn write(&self, batch: &[(&[u8], StorageExtent)]) -> Result<()> {
        let descs: Vec<_> = batch
            .iter()
            .map(|(buf, extent)| (buf.as_ptr() as usize, buf.len(), *extent))
            .collect();
        self.transfer(XferOp::Write, &descs, HOST)
    }

    fn read(&self, batch: &mut [(&mut [u8], StorageExtent)]) -> Result<()> {
        let descs: Vec<_> = batch
            .iter_mut()
            .map(|(buf, extent)| (buf.as_mut_ptr() as usize, buf.len(), *extent))
            .collect();
        self.transfer(XferOp::Read, &descs, HOST)
    }
}
