//! The transfer channel between inference instances (disaggregated prefill → decode, P2P KV
//! sharing): a sender writes KV pages straight into pages the receiver allocated for them.
//!
//! `nixl` moves the bytes with NIXL (UCX plugin) between two agents; a small TCP side channel
//! carries agent metadata and page allocations, and NIXL notifications say a batch has landed.
//! `mock_memory` is an in-process implementation for tests of the code above.
//!
//! The side channel lets in only its peer: both ends prove they hold the channel secret at
//! connect, every later frame is authenticated under a key bound to that connection (see
//! `session`), and agent metadata is exchanged, and loaded, only after that proof. A receiver
//! drops a peer that fails the handshake, sends a malformed or oversized frame, or names pages
//! it was not given, logs why, and goes on serving the next one. Without a secret the
//! receiver listens on loopback only.
//!
//! An authenticated peer is trusted with the receiver's registered pool: NIXL registers it
//! whole, so the secret, not the page list, is what keeps strangers' writes out of it.

mod session;

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Read;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nixl_sys::{
    Agent, AgentConfig, Backend, MemType, NotificationMap, OptArgs, RegistrationHandle,
    XferDescList, XferOp, XferStatus,
};
use pinned_alloc::{MemoryRegion, Page, PagePool};

use self::session::{Deadline, Session, WireError};
use crate::error::{Error, Result};
use crate::nixl::Descriptor;
use crate::runtime::NixlRuntime;

/// Which side of the channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends KV (prefill).
    Sender,
    /// Receives KV (decode).
    Receiver,
}

/// The channel implementation (`transfer_channel` in LMCache's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelType {
    /// NIXL over UCX, with a TCP side channel.
    Nixl,
    /// In-process, for tests.
    MockMemory,
}

/// Configuration of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelConfig {
    /// `nixl` or `mock_memory`.
    pub channel_type: ChannelType,
    /// Sender or receiver.
    pub role: Role,
    /// The receiver's host: where the sender connects, where the receiver listens.
    pub host: String,
    /// The receiver's side-channel port (`pd_peer_init_port` / `nixl_receiver_port`).
    pub port: u16,
    /// How long one step (connect, allocation, batch) may take before it fails.
    pub timeout: Duration,
    /// The shared secret both ends prove they hold (`pd_secret`); never printed.
    secret: Option<ChannelSecret>,
}

/// The channel's shared secret: `Debug` prints `<redacted>`, never its bytes.
#[derive(Clone, PartialEq, Eq)]
struct ChannelSecret(Vec<u8>);

impl Debug for ChannelSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl ChannelConfig {
    /// A channel of `channel_type` for `role`, with the receiver at `host:port`.
    pub fn new(channel_type: ChannelType, role: Role, host: impl Into<String>, port: u16) -> Self {
        Self {
            channel_type,
            role,
            host: host.into(),
            port,
            timeout: Duration::from_secs(30),
            secret: None,
        }
    }

    /// Sets the shared secret (at least 16 bytes) that both ends of a `nixl` channel must
    /// hold. Without one, a receiver listens on loopback only.
    pub fn with_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(ChannelSecret(secret.into()));
        self
    }

    /// Sets the step timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// One end of a KV transfer channel.
///
/// # Contract
///
/// - [`send`](Channel::send) returns once the receiver holds every chunk, or fails; it never
///   hangs past the configured timeout, also when the peer dies.
/// - [`receive`](Channel::receive) returns one batch in the order it was sent, in pages of the
///   receiver's own pool, each narrowed to its chunk's length.
/// - After an error the next call reconnects.
/// - A receiver drops a peer that fails the handshake or breaks the protocol, logs why, and
///   waits for the next one within the same timeout; pages it handed to a dropped peer are
///   retired for good (see `pinned_alloc::Page::abandon`), no other page is touched.
pub trait Channel: Send + Sync + Debug {
    /// Sends one batch of chunks (pages of the sender's pool).
    fn send(&self, chunks: &[&Page]) -> Result<()>;

    /// Waits for the next batch.
    fn receive(&self) -> Result<Vec<Page>>;
}

/// Creates one end of a channel over `pool` (registered once for NIXL channels).
pub fn create_channel(config: ChannelConfig, pool: Arc<PagePool>) -> Result<Box<dyn Channel>> {
    match config.channel_type {
        ChannelType::MockMemory => Ok(Box::new(MockChannel::new(config, pool))),
        ChannelType::Nixl => Ok(Box::new(NixlChannel::new(config, pool)?)),
    }
}

type MockBatch = Vec<Vec<u8>>;

fn mock_endpoints() -> &'static Mutex<HashMap<u16, SyncSender<MockBatch>>> {
    static ENDPOINTS: OnceLock<Mutex<HashMap<u16, SyncSender<MockBatch>>>> = OnceLock::new();
    ENDPOINTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The in-process channel: batches are copied through a queue keyed by port.
#[derive(Debug)]
struct MockChannel {
    config: ChannelConfig,
    pool: Arc<PagePool>,
    inbox: Option<Mutex<Receiver<MockBatch>>>,
}

impl MockChannel {
    fn new(config: ChannelConfig, pool: Arc<PagePool>) -> Self {
        let inbox = (config.role == Role::Receiver).then(|| {
            let (tx, rx) = sync_channel(16);
            mock_endpoints()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(config.port, tx);
            Mutex::new(rx)
        });
        Self {
            config,
            pool,
            inbox,
        }
    }
}

impl Channel for MockChannel {
    fn send(&self, chunks: &[&Page]) -> Result<()> {
        let peer = mock_endpoints()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.config.port)
            .cloned()
            .ok_or_else(|| Error::Peer(format!("no mock receiver on port {}", self.config.port)))?;
        peer.send(chunks.iter().map(|p| p.as_slice().to_vec()).collect())
            .map_err(|_| Error::Peer("the mock receiver is gone".to_owned()))
    }

    fn receive(&self) -> Result<Vec<Page>> {
        let inbox = self
            .inbox
            .as_ref()
            .ok_or_else(|| Error::Peer("a sender cannot receive".to_owned()))?;
        let batch = inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(self.config.timeout)
            .map_err(|_| Error::Peer("no batch arrived in time".to_owned()))?;
        let mut pages = self
            .pool
            .allocate_batch(batch.len())
            .map_err(|e| Error::Failed(format!("receiver pool: {e}")))?;
        for (page, bytes) in pages.iter_mut().zip(&batch) {
            page.set_len(bytes.len());
            page.as_mut_slice().copy_from_slice(bytes);
        }
        Ok(pages)
    }
}

impl Drop for MockChannel {
    fn drop(&mut self) {
        if self.inbox.is_some() {
            mock_endpoints()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.config.port);
        }
    }
}

/// Side-channel message tags after the handshake (the handshake's own are in `session`).
const ALLOC: u8 = 2;
const PLACES: u8 = 3;
const REFUSED: u8 = 4;
const METADATA: u8 = 7;
const DONE: u8 = 8;

/// How long a fresh connection has to prove it holds the secret: a silent or slow stranger
/// holds the listener no longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest channel secret accepted: a short one could be guessed offline from a captured
/// handshake.
const MIN_SECRET_BYTES: usize = 16;

fn encode_frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(tag);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Longest frame body an authenticated peer may announce; longer ones are refused before
/// anything is allocated.
const MAX_FRAME_BYTES: usize = 64 << 20;

fn read_frame(stream: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    read_frame_up_to(stream, MAX_FRAME_BYTES)
}

/// Reads one frame whose body is at most `limit` bytes; a longer announced body is refused as
/// invalid before it is allocated or waited for.
fn read_frame_up_to(stream: &mut impl Read, limit: usize) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes announced, at most {limit} accepted"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn u64s(body: &[u8]) -> Vec<u64> {
    body.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

fn peer_error(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Peer(format!("{what}: {err}"))
}

fn wire_error(what: &str) -> impl FnOnce(WireError) -> Error + '_ {
    move |err| Error::Peer(format!("{what}: {err}"))
}

/// Why a connection's step failed on the receiver.
#[derive(Debug)]
enum Fault {
    /// The peer closed the connection between batches.
    Gone(String),
    /// No batch came before the deadline: the sender is idle, not hostile; its link stays.
    Idle,
    /// The peer broke the protocol or failed to prove itself: dropped, the next one served.
    Peer(String),
    /// This end failed; the caller hears of it.
    Local(Error),
}

impl Fault {
    fn wire(what: &str) -> impl FnOnce(WireError) -> Fault + '_ {
        move |err| match err {
            WireError::Io { ref source, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                Fault::Gone(format!("{what}: {err}"))
            }
            err => Fault::Peer(format!("{what}: {err}")),
        }
    }
}

/// One batch a sender asks the receiver to place: its number and the bytes of each chunk.
#[derive(Debug, PartialEq, Eq)]
struct PlacementRequest {
    batch: u64,
    sizes: Vec<usize>,
}

impl PlacementRequest {
    /// Checks an `ALLOC` body against the pool before anything is allocated.
    fn parse(
        body: &[u8],
        pool_pages: usize,
        page_bytes: usize,
    ) -> std::result::Result<Self, String> {
        if body.len() < 16 || body.len() % 8 != 0 {
            return Err(format!(
                "a page request of {} bytes is malformed",
                body.len()
            ));
        }
        let values = u64s(body);
        let sizes = &values[1..];
        if sizes.len() > pool_pages {
            return Err(format!(
                "asked for {} pages, the pool has {pool_pages}",
                sizes.len()
            ));
        }
        if let Some(size) = sizes.iter().find(|&&size| size > page_bytes as u64) {
            return Err(format!(
                "a chunk of {size} bytes does not fit a page of {page_bytes}"
            ));
        }
        Ok(Self {
            batch: values[0],
            sizes: sizes.iter().map(|&size| size as usize).collect(),
        })
    }
}

/// The `DONE` body that completes `batch` in `pages`: the batch and the index of each page.
fn completion(batch: u64, indices: impl Iterator<Item = u64>) -> Vec<u8> {
    std::iter::once(batch)
        .chain(indices)
        .flat_map(u64::to_le_bytes)
        .collect()
}

/// A live, authenticated connection: the side channel, its session and the peer agent's name.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    session: Session,
    peer: String,
}

/// NIXL (UCX) channel end.
struct NixlChannel {
    config: ChannelConfig,
    agent: Agent,
    backend: Backend,
    pool: Arc<PagePool>,
    _registration: RegistrationHandle,
    listener: Option<TcpListener>,
    link: Mutex<Option<Link>>,
    next_batch: Mutex<u64>,
}

impl Debug for NixlChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixlChannel")
            .field("config", &self.config)
            .field("agent", &self.agent.name())
            .finish_non_exhaustive()
    }
}

static CHANNEL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Refuses a secret too short to resist guessing, and a receiver without a secret that would
/// listen beyond loopback, where any process that reaches the port could push KV into it.
fn check_exposure(config: &ChannelConfig) -> Result<()> {
    let endpoint = || format!("{}:{}", config.host, config.port).into();
    match &config.secret {
        Some(secret) if secret.0.len() < MIN_SECRET_BYTES => Err(Error::Io {
            operation: "configuring the channel secret of",
            path: endpoint(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the secret is {} bytes; use at least {MIN_SECRET_BYTES} (for example 32 \
                     random bytes, hex-encoded)",
                    secret.0.len()
                ),
            ),
        }),
        Some(_) => Ok(()),
        None if config.role == Role::Sender => Ok(()),
        None => {
            let loopback = (config.host.as_str(), config.port)
                .to_socket_addrs()
                .map(|addresses| addresses.collect::<Vec<_>>())
                .is_ok_and(|addresses| {
                    !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback())
                });
            if loopback {
                return Ok(());
            }
            Err(Error::Io {
                operation: "listening on",
                path: endpoint(),
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "a channel without a secret listens on loopback only, since any process \
                     that reaches the port could push KV into this instance: set pd_secret (or \
                     LMCACHE_PD_SECRET) to the same value on both ends, or listen on 127.0.0.1",
                ),
            })
        }
    }
}

impl NixlChannel {
    fn new(config: ChannelConfig, pool: Arc<PagePool>) -> Result<Self> {
        check_exposure(&config)?;
        NixlRuntime::load()?;
        let role = match config.role {
            Role::Sender => "send",
            Role::Receiver => "recv",
        };
        let name = format!(
            "kv-{role}-{}-{}",
            std::process::id(),
            CHANNEL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let agent_config = AgentConfig {
            enable_prog_thread: true,
            thread_sync: nixl_sys::ThreadSync::Strict,
            ..AgentConfig::default()
        };
        let agent =
            Agent::new_configured(&name, &agent_config).map_err(Error::nixl("create agent"))?;
        let (_mems, params) = agent
            .get_plugin_params("UCX")
            .map_err(Error::nixl("read UCX parameters"))?;
        let backend = agent
            .create_backend("UCX", &params)
            .map_err(Error::nixl("create UCX backend"))?;
        let region = Descriptor {
            addr: pool.base().as_ptr() as usize,
            len: MemoryRegion::len(pool.as_ref()),
            dev_id: 0,
            mem_type: MemType::Dram,
        };
        let mut opt = OptArgs::new().map_err(Error::nixl("create optional arguments"))?;
        opt.add_backend(&backend)
            .map_err(Error::nixl("select backend"))?;
        let registration = agent
            .register_memory(&region, Some(&opt))
            .map_err(Error::nixl("register the channel pool"))?;
        let listener = match config.role {
            Role::Receiver => Some(
                TcpListener::bind((config.host.as_str(), config.port)).map_err(|source| {
                    Error::Io {
                        operation: "listening on",
                        path: format!("{}:{}", config.host, config.port).into(),
                        source,
                    }
                })?,
            ),
            Role::Sender => None,
        };
        Ok(Self {
            config,
            agent,
            backend,
            pool,
            _registration: registration,
            listener,
            link: Mutex::new(None),
            next_batch: Mutex::new(0),
        })
    }

    /// The secret both ends prove they hold; empty when none is configured.
    fn secret(&self) -> &[u8] {
        self.config.secret.as_ref().map_or(&[], |secret| &secret.0)
    }

    fn opt_args(&self, notification: Option<&[u8]>) -> Result<OptArgs> {
        let mut opt = OptArgs::new().map_err(Error::nixl("create optional arguments"))?;
        opt.add_backend(&self.backend)
            .map_err(Error::nixl("select backend"))?;
        if let Some(message) = notification {
            opt.set_notification_message(message)
                .map_err(Error::nixl("set notification"))?;
            opt.set_has_notification(true)
                .map_err(Error::nixl("set notification"))?;
        }
        Ok(opt)
    }

    /// The sender's side of a fresh connection: proves the secret, checks the receiver's
    /// proof, then exchanges agent metadata inside the session.
    fn open_as_sender(&self, stream: TcpStream) -> Result<Link> {
        stream
            .set_nodelay(true)
            .map_err(peer_error("configuring the side channel"))?;
        let mut io = Deadline::new(&stream, Instant::now() + self.config.timeout);
        let mut session = Session::connect(&mut io, self.secret())
            .map_err(wire_error("handshake with the receiver"))?;
        let metadata = self
            .agent
            .get_local_md()
            .map_err(Error::nixl("read local metadata"))?;
        session
            .send(&mut io, METADATA, &metadata)
            .map_err(wire_error("sending metadata"))?;
        let (tag, theirs) = session
            .receive(&mut io)
            .map_err(wire_error("reading the receiver's metadata"))?;
        if tag != METADATA {
            return Err(Error::Peer(format!(
                "unexpected message {tag} in the handshake"
            )));
        }
        let peer = self
            .agent
            .load_remote_md(&theirs)
            .map_err(Error::nixl("load peer metadata"))?;
        Ok(Link {
            stream,
            session,
            peer,
        })
    }

    /// The receiver's side of a fresh connection: the peer proves the secret within
    /// [`HANDSHAKE_TIMEOUT`] before anything else, and its metadata is loaded only then.
    fn admit(&self, stream: TcpStream) -> std::result::Result<Link, Fault> {
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|err| Fault::Peer(format!("configuring its connection: {err}")))?;
        let proving = Instant::now() + HANDSHAKE_TIMEOUT.min(self.config.timeout);
        let mut session = Session::accept(&mut Deadline::new(&stream, proving), self.secret())
            .map_err(|err| Fault::Peer(format!("handshake failed: {err}")))?;
        let mut io = Deadline::new(&stream, Instant::now() + self.config.timeout);
        let (tag, theirs) = session
            .receive(&mut io)
            .map_err(|err| Fault::Peer(format!("reading its metadata: {err}")))?;
        if tag != METADATA {
            return Err(Fault::Peer(format!(
                "message {tag} where its metadata was due"
            )));
        }
        let peer = self
            .agent
            .load_remote_md(&theirs)
            .map_err(|err| Fault::Peer(format!("its metadata does not load: {err:?}")))?;
        let sent = self
            .agent
            .get_local_md()
            .map_err(|err| Fault::Local(Error::nixl("read local metadata")(err)))
            .and_then(|metadata| {
                session
                    .send(&mut io, METADATA, &metadata)
                    .map_err(|err| Fault::Peer(format!("sending metadata: {err}")))
            });
        if let Err(fault) = sent {
            let _ = self.agent.invalidate_remote_md(&peer);
            return Err(fault);
        }
        Ok(Link {
            stream,
            session,
            peer,
        })
    }

    fn connect(&self) -> Result<Link> {
        let address = (self.config.host.as_str(), self.config.port)
            .to_socket_addrs()
            .map_err(peer_error("resolving the receiver"))?
            .next()
            .ok_or_else(|| Error::Peer(format!("{} does not resolve", self.config.host)))?;
        let started = Instant::now();
        loop {
            match TcpStream::connect_timeout(&address, self.config.timeout) {
                Ok(stream) => return self.open_as_sender(stream),
                Err(err) if started.elapsed() > self.config.timeout => {
                    return Err(Error::Peer(format!(
                        "receiver {address} unreachable: {err}"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Waits until `deadline` for a sender that proves the secret; every other connection is
    /// dropped with its reason logged.
    fn accept(&self, deadline: Instant) -> Result<Link> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| Error::Peer("a sender cannot accept".to_owned()))?;
        listener
            .set_nonblocking(true)
            .map_err(peer_error("configuring the listener"))?;
        loop {
            match listener.accept() {
                Ok((stream, address)) => match self.admit(stream) {
                    Ok(link) => {
                        tracing::debug!(%address, peer = %link.peer, "channel sender admitted");
                        return Ok(link);
                    }
                    Err(Fault::Local(err)) => return Err(err),
                    Err(Fault::Peer(reason) | Fault::Gone(reason)) => {
                        tracing::warn!(%address, "refused a channel connection: {reason}");
                        if Instant::now() > deadline {
                            return Err(Error::Peer("no sender connected in time".to_owned()));
                        }
                    }
                    Err(Fault::Idle) => {
                        tracing::warn!(%address, "refused a channel connection: it stayed silent");
                    }
                },
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(Error::Peer("no sender connected in time".to_owned()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => return Err(peer_error("accepting the sender")(err)),
            }
        }
    }

    /// Runs `step` on the live link, connecting first; any failure drops the link so the next
    /// call reconnects.
    fn with_link<T>(&self, step: impl FnOnce(&mut Link) -> Result<T>) -> Result<T> {
        let mut slot = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let link = match slot.as_mut() {
            Some(link) => link,
            None => slot.insert(self.connect()?),
        };
        let outcome = step(link);
        if outcome.is_err() {
            if let Some(link) = slot.take() {
                let _ = self.agent.invalidate_remote_md(&link.peer);
            }
        }
        outcome
    }

    /// Whether the peer closed the side channel (it died or went away).
    fn peer_closed(stream: &TcpStream) -> bool {
        let mut probe = [0u8; 1];
        if stream.set_nonblocking(true).is_err() {
            return true;
        }
        let closed = matches!(stream.peek(&mut probe), Ok(0))
            || matches!(stream.peek(&mut probe), Err(ref e) if e.kind() != std::io::ErrorKind::WouldBlock);
        let _ = stream.set_nonblocking(false);
        closed
    }

    /// Best effort: tells the sender why its batch is refused.
    fn refuse(link: &mut Link, reason: &str) {
        let at = Instant::now() + HANDSHAKE_TIMEOUT;
        let _ = link.session.send(
            &mut Deadline::new(&link.stream, at),
            REFUSED,
            reason.as_bytes(),
        );
    }

    /// Places one batch of the peer on `link` into fresh pages and waits until it landed.
    fn receive_batch(
        &self,
        link: &mut Link,
        deadline: Instant,
    ) -> std::result::Result<Vec<Page>, Fault> {
        let (tag, body) = link
            .session
            .receive(&mut Deadline::new(&link.stream, deadline))
            .map_err(|err| match &err {
                WireError::Io { source, .. }
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) && Instant::now() >= deadline =>
                {
                    Fault::Idle
                }
                _ => Fault::wire("waiting for a batch")(err),
            })?;
        if tag != ALLOC {
            return Err(Fault::Peer(format!("message {tag} where a batch was due")));
        }
        let stats = self.pool.stats();
        let request = PlacementRequest::parse(&body, stats.total, self.pool.page_bytes()).map_err(
            |reason| {
                Self::refuse(link, &reason);
                Fault::Peer(reason)
            },
        )?;
        let mut pages = match self.pool.allocate_batch(request.sizes.len()) {
            Ok(pages) => pages,
            Err(err) => {
                Self::refuse(link, &err.to_string());
                return Err(Fault::Local(Error::Failed(format!("receiver pool: {err}"))));
            }
        };
        let mut places = Vec::with_capacity(pages.len() * 16);
        for (page, &size) in pages.iter_mut().zip(&request.sizes) {
            page.set_len(size);
            places.extend_from_slice(&(page.index() as u64).to_le_bytes());
            places.extend_from_slice(&(page.as_mut_slice().as_mut_ptr() as u64).to_le_bytes());
        }
        // From here the peer may hold the pages' addresses: on any failure they are retired
        // for good, as its engine may still write into them.
        let retire = |pages: &[Page], reason: String| {
            pages.iter().for_each(Page::abandon);
            Fault::Peer(reason)
        };
        let step = Instant::now() + self.config.timeout;
        if let Err(err) = link
            .session
            .send(&mut Deadline::new(&link.stream, step), PLACES, &places)
        {
            return Err(retire(&pages, format!("sending the page list: {err}")));
        }
        let expected = completion(request.batch, pages.iter().map(|p| p.index() as u64));
        match link.session.receive(&mut Deadline::new(&link.stream, step)) {
            Ok((DONE, named)) if named == expected => {}
            Ok((DONE, _)) => {
                return Err(retire(
                    &pages,
                    format!(
                        "the completion of batch {} names pages it was not given",
                        request.batch
                    ),
                ));
            }
            Ok((tag, _)) => {
                return Err(retire(
                    &pages,
                    format!(
                        "message {tag} where the completion of batch {} was due",
                        request.batch
                    ),
                ));
            }
            Err(err) => {
                return Err(retire(
                    &pages,
                    format!("the sender went away mid-transfer: {err}"),
                ));
            }
        }
        let landed = format!("kv-batch-{}", request.batch);
        let mut notifications = NotificationMap::new()
            .map_err(|err| Fault::Local(Error::nixl("notifications")(err)))?;
        loop {
            let arrived = self
                .agent
                .get_notifications(&mut notifications, None)
                .and_then(|()| notifications.take_notifs())
                .map(|all| {
                    all.get(&link.peer)
                        .is_some_and(|messages| messages.contains(&landed))
                });
            match arrived {
                Ok(true) => return Ok(pages),
                Ok(false) if Instant::now() <= step => {}
                Ok(false) => {
                    return Err(retire(
                        &pages,
                        format!(
                            "batch {} was announced complete but never landed",
                            request.batch
                        ),
                    ));
                }
                Err(err) => {
                    pages.iter().for_each(Page::abandon);
                    return Err(Fault::Local(Error::nixl("notifications")(err)));
                }
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Channel for NixlChannel {
    fn send(&self, chunks: &[&Page]) -> Result<()> {
        if self.config.role != Role::Sender {
            return Err(Error::Peer("a receiver cannot send".to_owned()));
        }
        for page in chunks {
            if !self.pool.contains(page.as_slice().as_ptr(), page.len()) {
                return Err(Error::UnregisteredMemory {
                    addr: page.as_slice().as_ptr() as usize,
                    len: page.len(),
                });
            }
        }
        let batch = {
            let mut next = self.next_batch.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        self.with_link(|link| {
            let mut io = Deadline::new(&link.stream, Instant::now() + self.config.timeout);
            let mut request = batch.to_le_bytes().to_vec();
            for page in chunks {
                request.extend_from_slice(&(page.len() as u64).to_le_bytes());
            }
            link.session
                .send(&mut io, ALLOC, &request)
                .map_err(wire_error("asking for pages"))?;
            let (tag, body) = link
                .session
                .receive(&mut io)
                .map_err(wire_error("reading the page list"))?;
            match tag {
                PLACES => {}
                REFUSED => {
                    return Err(Error::Peer(format!(
                        "receiver refused the batch: {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
                other => return Err(Error::Peer(format!("unexpected message {other}"))),
            }
            if body.len() != chunks.len() * 16 {
                return Err(Error::Peer(
                    "receiver answered for another batch size".to_owned(),
                ));
            }
            let places = u64s(&body);
            let (indices, addresses): (Vec<u64>, Vec<u64>) = places
                .chunks_exact(2)
                .map(|pair| (pair[0], pair[1]))
                .unzip();
            let mut local =
                XferDescList::new(MemType::Dram).map_err(Error::nixl("build descriptors"))?;
            let mut remote =
                XferDescList::new(MemType::Dram).map_err(Error::nixl("build descriptors"))?;
            for (page, address) in chunks.iter().zip(&addresses) {
                local.add_desc(page.as_slice().as_ptr() as usize, page.len(), 0);
                remote.add_desc(*address as usize, page.len(), 0);
            }
            let tag = format!("kv-batch-{batch}");
            let opt = self.opt_args(Some(tag.as_bytes()))?;
            let request = self
                .agent
                .create_xfer_req(XferOp::Write, &local, &remote, &link.peer, Some(&opt))
                .map_err(Error::nixl("create transfer request"))?;
            self.agent
                .post_xfer_req(&request, Some(&opt))
                .map_err(Error::nixl("post transfer"))?;
            let started = Instant::now();
            loop {
                match self.agent.get_xfer_status(&request) {
                    Ok(XferStatus::Success) => break,
                    Ok(XferStatus::InProgress) => {}
                    Err(err) => {
                        std::mem::forget(request);
                        return Err(Error::nixl("transfer")(err));
                    }
                }
                if Self::peer_closed(&link.stream) || started.elapsed() > self.config.timeout {
                    // The plugin may still be working on this request: never release it.
                    std::mem::forget(request);
                    return Err(Error::Peer(
                        "the receiver went away mid-transfer".to_owned(),
                    ));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            drop(request);
            let mut io = Deadline::new(&link.stream, Instant::now() + self.config.timeout);
            link.session
                .send(&mut io, DONE, &completion(batch, indices.into_iter()))
                .map_err(wire_error("announcing the batch complete"))
        })
    }

    fn receive(&self) -> Result<Vec<Page>> {
        if self.config.role != Role::Receiver {
            return Err(Error::Peer("a sender cannot receive".to_owned()));
        }
        let deadline = Instant::now() + self.config.timeout;
        let mut slot = self.link.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let link = match slot.as_mut() {
                Some(link) => link,
                None => slot.insert(self.accept(deadline)?),
            };
            let fault = match self.receive_batch(link, deadline) {
                Ok(pages) => return Ok(pages),
                Err(fault) => fault,
            };
            if matches!(fault, Fault::Idle) {
                // The sender stays connected for its next batch.
                return Err(Error::Peer(
                    "no batch came from the channel sender in time".to_owned(),
                ));
            }
            let peer = slot.take().map(|link| {
                let _ = self.agent.invalidate_remote_md(&link.peer);
                link.peer
            });
            let reason = match fault {
                Fault::Local(err) => return Err(err),
                Fault::Idle => "no batch in time".to_owned(),
                Fault::Gone(reason) => {
                    tracing::debug!(?peer, "the channel sender went away: {reason}");
                    reason
                }
                Fault::Peer(reason) => {
                    tracing::warn!(?peer, "dropped the channel sender: {reason}");
                    reason
                }
            };
            if Instant::now() > deadline {
                return Err(Error::Peer(reason));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_FRAME_BYTES, read_frame, u64s};

    /// Random byte streams, and valid frames cut or with a random announced length: reading a
    /// frame and decoding its numbers never panics, never allocates past the limit, and gives
    /// back every whole frame as it was sent.
    #[test]
    fn frames_from_any_bytes_never_panic() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..100_000u32 {
            if round % 2 == 0 {
                let bytes: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
                if let Ok((_, body)) = read_frame(&mut bytes.as_slice()) {
                    assert!(body.len() <= MAX_FRAME_BYTES);
                    assert_eq!(&bytes[5..5 + body.len()], &body[..]);
                }
                continue;
            }
            let tag = (next() % 8) as u8;
            let body: Vec<u8> = (0..next() % 40).map(|_| next() as u8).collect();
            let announced = match next() % 4 {
                0 => u32::MAX,
                1 => next() as u32 % 64,
                _ => body.len() as u32,
            };
            let mut frame = vec![tag];
            frame.extend_from_slice(&announced.to_le_bytes());
            frame.extend_from_slice(&body);
            let cut = (next() % 3) as usize * usize::from(next() % 2 == 0);
            frame.truncate(frame.len() - cut.min(frame.len()));
            let outcome = read_frame(&mut frame.as_slice());
            let available = frame.len().saturating_sub(5);
            match outcome {
                Ok((got_tag, got)) => {
                    assert!(
                        (announced as usize) <= available,
                        "read past the bytes given"
                    );
                    assert_eq!(
                        (got_tag, &got[..]),
                        (tag, &frame[5..5 + announced as usize])
                    );
                    assert_eq!(u64s(&got).len(), got.len() / 8);
                }
                Err(err) => assert!(
                    announced as usize > available || frame.len() < 5,
                    "a whole frame refused: {err}"
                ),
            }
        }
    }

    /// A frame announcing more than the limit is refused as invalid at once, its body never
    /// allocated nor waited for.
    #[test]
    fn an_oversized_frame_is_refused_before_its_body() {
        for announced in [MAX_FRAME_BYTES as u32 + 1, u32::MAX] {
            let mut frame = vec![1u8];
            frame.extend_from_slice(&announced.to_le_bytes());
            let err = read_frame(&mut frame.as_slice()).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        }
    }

    /// A receiver without a secret listens on loopback only and says how to set one; a secret
    /// too short is refused; the secret never prints.
    #[test]
    fn without_a_secret_only_loopback_is_served() {
        use super::{ChannelConfig, ChannelType, Role, check_exposure};
        let receiver =
            |host: &str| ChannelConfig::new(ChannelType::Nixl, Role::Receiver, host, 7000);
        for host in ["127.0.0.1", "localhost", "::1"] {
            check_exposure(&receiver(host)).unwrap();
        }
        for host in ["0.0.0.0", "::", "192.0.2.1"] {
            let err = check_exposure(&receiver(host)).unwrap_err().to_string();
            assert!(
                err.contains("pd_secret") && err.contains("LMCACHE_PD_SECRET"),
                "{err}"
            );
        }
        let secret = "correct-horse-battery-staple-42";
        let open = receiver("0.0.0.0").with_secret(secret);
        check_exposure(&open).unwrap();
        assert!(!format!("{open:?}").contains(secret), "{open:?}");
        let err = check_exposure(&receiver("0.0.0.0").with_secret("short")).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
    }

    /// The wire checks of a page request, before anything is allocated.
    #[test]
    fn page_requests_beyond_the_pool_or_a_page_are_refused() {
        use super::PlacementRequest;
        let body = |values: &[u64]| {
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        assert_eq!(
            PlacementRequest::parse(&body(&[7, 4096, 10]), 4, 4096),
            Ok(PlacementRequest {
                batch: 7,
                sizes: vec![4096, 10]
            })
        );
        for bad in [
            body(&[7]),
            body(&[7, 4097]),
            body(&[7, 1, 1, 1, 1, 1]),
            vec![0u8; 17],
        ] {
            assert!(PlacementRequest::parse(&bad, 4, 4096).is_err(), "{bad:?}");
        }
    }

    /// Real NIXL (UCX) on loopback, both ends in this process.
    mod nixl_peers {
        use std::io::Write;
        use std::net::TcpListener;
        use std::sync::{Arc, Mutex, OnceLock};
        use std::time::Duration;

        use pinned_alloc::{PagePool, PoolConfig};

        use super::super::{
            ALLOC, Channel, ChannelConfig, ChannelType, DONE, Deadline, NixlChannel, PLACES, Role,
            completion, u64s,
        };

        const SECRET: &str = "the-secret-both-ends-share-0123";
        const PAGE: usize = 4096;

        /// Everything logged by any test of this binary, at trace level.
        fn logs() -> &'static Mutex<Vec<u8>> {
            static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
            let logs = LOGS.get_or_init(|| Mutex::new(Vec::new()));
            static INSTALLED: OnceLock<()> = OnceLock::new();
            INSTALLED.get_or_init(|| {
                let _ = tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::TRACE)
                    .with_ansi(false)
                    .with_writer(|| LogWriter)
                    .try_init();
            });
            logs
        }

        struct LogWriter;

        impl Write for LogWriter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                logs()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }

            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        fn logged() -> String {
            String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
        }

        fn free_port() -> u16 {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap()
        }

        fn end(role: Role, port: u16, pool: &Arc<PagePool>) -> NixlChannel {
            let config = ChannelConfig::new(ChannelType::Nixl, role, "127.0.0.1", port)
                .with_timeout(Duration::from_secs(10))
                .with_secret(SECRET);
            NixlChannel::new(config, Arc::clone(pool)).unwrap_or_else(|err| panic!("{err}"))
        }

        fn pool() -> Arc<PagePool> {
            PoolConfig::new(PAGE, 16 * PAGE as u64).build().unwrap()
        }

        /// A peer that proves the secret, is given two pages, then announces a batch in other
        /// pages (one the receiver holds) is dropped with the reason logged, and the next,
        /// honest sender's batch arrives whole. The secret is in no log line, at trace level.
        #[test]
        fn a_peer_naming_pages_it_was_not_given_is_dropped_and_the_next_served() {
            logs();
            let port = free_port();
            let receiver_pool = pool();
            let receiver = end(Role::Receiver, port, &receiver_pool);
            let held = receiver_pool.allocate().unwrap();
            std::thread::scope(|scope| {
                let receiving = scope.spawn(|| receiver.receive());

                let hostile = end(Role::Sender, port, &pool());
                let mut link = hostile.connect().unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let mut io = Deadline::new(&link.stream, deadline);
                let request: Vec<u8> = [1u64, PAGE as u64, PAGE as u64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                link.session.send(&mut io, ALLOC, &request).unwrap();
                let (tag, places) = link.session.receive(&mut io).unwrap();
                assert_eq!(tag, PLACES);
                let given: Vec<u64> = u64s(&places).chunks_exact(2).map(|p| p[0]).collect();
                let not_given = [held.index() as u64, given[1]];
                assert!(!given.contains(&not_given[0]));
                link.session
                    .send(&mut io, DONE, &completion(1, not_given.into_iter()))
                    .unwrap();
                let dropped = link.session.receive(&mut io);
                assert!(
                    dropped.is_err(),
                    "the receiver kept the hostile peer: {dropped:?}"
                );

                let sender_pool = pool();
                let sender = end(Role::Sender, port, &sender_pool);
                let mut pages = sender_pool.allocate_batch(2).unwrap();
                for (i, page) in pages.iter_mut().enumerate() {
                    page.as_mut_slice().fill(i as u8 + 1);
                }
                sender.send(&[&pages[0], &pages[1]]).unwrap();
                let received = receiving.join().unwrap().unwrap();
                assert_eq!(received.len(), 2);
                for (i, page) in received.iter().enumerate() {
                    assert!(
                        page.as_slice().iter().all(|&b| b == i as u8 + 1),
                        "page {i}"
                    );
                }
            });
            let logged = logged();
            assert!(
                logged.contains("names pages it was not given"),
                "no reason logged: {logged}"
            );
            assert!(!logged.contains(SECRET), "the secret was logged");
        }
    }
}
