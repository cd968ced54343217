//! The transfer channel between inference instances (disaggregated prefill → decode, P2P KV
//! sharing): a sender writes KV pages straight into pages the receiver allocated for them.
//!
//! `nixl` moves the bytes with NIXL (UCX plugin) between two agents; a small TCP side channel
//! carries agent metadata and page allocations, and NIXL notifications say a batch has landed.
//! `mock_memory` is an in-process implementation for tests of the code above.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nixl_sys::{
    Agent, AgentConfig, Backend, MemType, NotificationMap, OptArgs, RegistrationHandle,
    XferDescList, XferOp, XferStatus,
};
use pinned_alloc::{MemoryRegion, Page, PagePool};

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
        }
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

/// Side-channel message tags.
const HELLO: u8 = 1;
const ALLOC: u8 = 2;
const PLACES: u8 = 3;
const REFUSED: u8 = 4;

fn write_frame(stream: &mut TcpStream, tag: u8, body: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(tag);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)
}

/// Longest frame body a peer may announce; longer ones are refused before anything is allocated.
const MAX_FRAME_BYTES: usize = 64 << 20;

fn read_frame(stream: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too long",
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

/// A live connection: the side channel and the peer agent's name.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
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

impl NixlChannel {
    fn new(config: ChannelConfig, pool: Arc<PagePool>) -> Result<Self> {
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

    /// Exchanges agent metadata over a fresh side-channel connection.
    fn handshake(&self, mut stream: TcpStream) -> Result<Link> {
        stream
            .set_read_timeout(Some(self.config.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.config.timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(peer_error("configuring the side channel"))?;
        let metadata = self
            .agent
            .get_local_md()
            .map_err(Error::nixl("read local metadata"))?;
        write_frame(&mut stream, HELLO, &metadata).map_err(peer_error("sending metadata"))?;
        let (tag, theirs) = read_frame(&mut stream).map_err(peer_error("reading peer metadata"))?;
        if tag != HELLO {
            return Err(Error::Peer(format!(
                "unexpected message {tag} in the handshake"
            )));
        }
        let peer = self
            .agent
            .load_remote_md(&theirs)
            .map_err(Error::nixl("load peer metadata"))?;
        Ok(Link { stream, peer })
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
                Ok(stream) => return self.handshake(stream),
                Err(err) if started.elapsed() > self.config.timeout => {
                    return Err(Error::Peer(format!(
                        "receiver {address} unreachable: {err}"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn accept(&self) -> Result<Link> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| Error::Peer("a sender cannot accept".to_owned()))?;
        listener
            .set_nonblocking(true)
            .map_err(peer_error("configuring the listener"))?;
        let started = Instant::now();
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(peer_error("configuring the side channel"))?;
                    return self.handshake(stream);
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if started.elapsed() > self.config.timeout {
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
        if slot.is_none() {
            *slot = Some(match self.config.role {
                Role::Sender => self.connect()?,
                Role::Receiver => self.accept()?,
            });
        }
        let outcome = match slot.as_mut() {
            Some(link) => step(link),
            None => Err(Error::Peer("no link".to_owned())),
        };
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
            let mut request = batch.to_le_bytes().to_vec();
            for page in chunks {
                request.extend_from_slice(&(page.len() as u64).to_le_bytes());
            }
            write_frame(&mut link.stream, ALLOC, &request)
                .map_err(peer_error("asking for pages"))?;
            let (tag, body) =
                read_frame(&mut link.stream).map_err(peer_error("reading the page list"))?;
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
            let places = u64s(&body);
            if places.len() != chunks.len() {
                return Err(Error::Peer(
                    "receiver answered for another batch size".to_owned(),
                ));
            }
            let mut local =
                XferDescList::new(MemType::Dram).map_err(Error::nixl("build descriptors"))?;
            let mut remote =
                XferDescList::new(MemType::Dram).map_err(Error::nixl("build descriptors"))?;
            for (page, place) in chunks.iter().zip(&places) {
                local.add_desc(page.as_slice().as_ptr() as usize, page.len(), 0);
                remote.add_desc(*place as usize, page.len(), 0);
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
                    Ok(XferStatus::Success) => return Ok(()),
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
        })
    }

    fn receive(&self) -> Result<Vec<Page>> {
        if self.config.role != Role::Receiver {
            return Err(Error::Peer("a sender cannot receive".to_owned()));
        }
        self.with_link(|link| {
            let (tag, body) =
                read_frame(&mut link.stream).map_err(peer_error("waiting for a batch"))?;
            if tag != ALLOC || body.len() < 8 {
                return Err(Error::Peer(format!("unexpected message {tag}")));
            }
            let values = u64s(&body);
            let batch = values[0];
            let sizes = &values[1..];
            let mut pages = match self.pool.allocate_batch(sizes.len()) {
                Ok(pages) => pages,
                Err(err) => {
                    let _ = write_frame(&mut link.stream, REFUSED, err.to_string().as_bytes());
                    return Err(Error::Failed(format!("receiver pool: {err}")));
                }
            };
            let mut places = Vec::with_capacity(sizes.len() * 8);
            for (page, &size) in pages.iter_mut().zip(sizes) {
                if size as usize > page.capacity() {
                    let _ = write_frame(&mut link.stream, REFUSED, b"chunk larger than a page");
                    return Err(Error::Peer(format!(
                        "a chunk of {size} bytes does not fit a page"
                    )));
                }
                page.set_len(size as usize);
                places.extend_from_slice(&(page.as_mut_slice().as_mut_ptr() as u64).to_le_bytes());
            }
            write_frame(&mut link.stream, PLACES, &places)
                .map_err(peer_error("sending the page list"))?;
            let expected = format!("kv-batch-{batch}");
            let started = Instant::now();
            let mut notifications = NotificationMap::new().map_err(Error::nixl("notifications"))?;
            loop {
                self.agent
                    .get_notifications(&mut notifications, None)
                    .map_err(Error::nixl("notifications"))?;
                let arrived = notifications
                    .take_notifs()
                    .map_err(Error::nixl("notifications"))?
                    .get(&link.peer)
                    .is_some_and(|messages| messages.contains(&expected));
                if arrived {
                    return Ok(pages);
                }
                if Self::peer_closed(&link.stream) || started.elapsed() > self.config.timeout {
                    // The sender may still write into them: retired for good.
                    pages.iter().for_each(Page::abandon);
                    return Err(Error::Peer("the sender went away mid-transfer".to_owned()));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        })
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
}
