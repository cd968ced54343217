//! One end of a KV transfer channel, as its own process, for the two-process channel tests.
//!
//! - `receive PORT CHUNK_BYTES BATCHES BATCH [TYPE]`: receives and verifies every chunk, prints
//!   `ok N`.
//! - `send PORT CHUNK_BYTES BATCHES BATCH [TYPE]`: sends chunks of deterministic content, prints
//!   `sent N` or the error.
//! - `attack CASE PORT CHUNK_BYTES BATCHES BATCH`: a hostile peer (`CASE`: `wrong-secret`,
//!   `random-bytes`, `truncated-frame`, `oversized-frame`, `replayed-handshake` or `all`),
//!   which checks the receiver refuses it, then sends every batch as an honest sender would;
//!   prints `refused CASE: …` for each case and `sent N`.
//!
//! `LMCACHE_PD_SECRET` is the channel secret of every end (none when unset), and
//! `KV_CHANNEL_HOST` the host the receiver listens on (127.0.0.1 when unset).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kv_integration_tests::{Rng, fill_chunk};
use nixl_core::{Channel, ChannelConfig, ChannelType, Role, create_channel};
use pinned_alloc::{PagePool, PoolConfig};

const SECRET_VAR: &str = "LMCACHE_PD_SECRET";
const HOST_VAR: &str = "KV_CHANNEL_HOST";
const CASES: [&str; 5] = [
    "wrong-secret",
    "random-bytes",
    "truncated-frame",
    "oversized-frame",
    "replayed-handshake",
];
/// How long the receiver may take to drop a hostile connection: past its handshake limit
/// (5 s), never the whole channel timeout.
const DROP_WITHIN: Duration = Duration::from_secs(10);

/// What every end of this process shares.
struct Setup {
    channel_type: ChannelType,
    chunk: usize,
    batches: usize,
    batch: usize,
    secret: Option<String>,
}

impl Setup {
    fn pool(&self) -> Result<Arc<PagePool>> {
        let pool_bytes = 2 * self.batch * self.chunk.next_multiple_of(4096);
        Ok(PoolConfig::new(self.chunk, pool_bytes as u64).build()?)
    }

    fn channel(
        &self,
        role: Role,
        host: &str,
        port: u16,
        secret: Option<&str>,
        pool: &Arc<PagePool>,
    ) -> Result<Box<dyn Channel>> {
        let mut config = ChannelConfig::new(self.channel_type, role, host, port)
            .with_timeout(Duration::from_secs(20));
        if let Some(secret) = secret {
            config = config.with_secret(secret);
        }
        Ok(create_channel(config, Arc::clone(pool))?)
    }

    /// Sends batches `first..last` to `port` as an honest sender.
    fn send(&self, port: u16, first: usize, last: usize) -> Result<()> {
        let pool = self.pool()?;
        let channel = self.channel(
            Role::Sender,
            "127.0.0.1",
            port,
            self.secret.as_deref(),
            &pool,
        )?;
        for b in first..last {
            let mut pages = pool.allocate_batch(self.batch)?;
            for (i, page) in pages.iter_mut().enumerate() {
                fill_chunk(b * self.batch + i, page.as_mut_slice());
            }
            let refs: Vec<_> = pages.iter().collect();
            channel
                .send(&refs)
                .with_context(|| format!("sending batch {b}"))?;
        }
        Ok(())
    }

    fn receive(&self, port: u16) -> Result<()> {
        let host = std::env::var(HOST_VAR).unwrap_or_else(|_| "127.0.0.1".to_owned());
        let pool = self.pool()?;
        let channel = self.channel(Role::Receiver, &host, port, self.secret.as_deref(), &pool)?;
        let mut expected = vec![0u8; self.chunk];
        for b in 0..self.batches {
            let pages = channel
                .receive()
                .with_context(|| format!("receiving batch {b}"))?;
            ensure!(
                pages.len() == self.batch,
                "batch {b} holds {} chunks",
                pages.len()
            );
            for (i, page) in pages.iter().enumerate() {
                fill_chunk(b * self.batch + i, &mut expected);
                ensure!(
                    page.as_slice() == &expected[..],
                    "chunk {} differs",
                    b * self.batch + i
                );
            }
        }
        Ok(())
    }
}

/// Waits until the receiver closes `stream`, reading whatever it sends; fails if it keeps the
/// connection open past [`DROP_WITHIN`].
fn dropped_by_receiver(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = DROP_WITHIN
            .checked_sub(started.elapsed())
            .filter(|left| !left.is_zero())
            .context("the receiver kept a hostile connection open")?;
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(answer),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("the receiver kept a hostile connection open for {DROP_WITHIN:?}")
            }
            // Reset: the receiver closed with our bytes unread.
            Err(_) => return Ok(answer),
        }
    }
}

fn connect(port: u16) -> Result<TcpStream> {
    let started = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => return Ok(stream),
            Err(err) if started.elapsed() > Duration::from_secs(20) => {
                return Err(err).context("the receiver never listened");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Writes `bytes` to a fresh connection (a refusal mid-write is no failure) and waits until the
/// receiver drops it; `hold` keeps this end open meanwhile, as a stalled peer would.
fn hostile_bytes(port: u16, bytes: &[u8], hold: bool) -> Result<(Vec<u8>, Duration)> {
    let mut stream = connect(port)?;
    let started = Instant::now();
    let _ = stream.write_all(bytes);
    if !hold {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let answer = dropped_by_receiver(&mut stream)?;
    Ok((answer, started.elapsed()))
}

/// The head of a frame: its tag and the body length it announces.
fn frame_head(tag: u8, announced: u32) -> Vec<u8> {
    let mut head = vec![tag];
    head.extend_from_slice(&announced.to_le_bytes());
    head
}

/// Tags of the frames in `bytes`, as far as they are whole.
fn frame_tags(mut bytes: &[u8]) -> Vec<u8> {
    let mut tags = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        tags.push(bytes[0]);
        bytes = bytes.get(5 + len..).unwrap_or_default();
    }
    tags
}

/// Forwards one connection from a port of its own to the receiver, keeping every byte the
/// sender wrote.
struct Recorder {
    port: u16,
    written: Arc<Mutex<Vec<u8>>>,
    forwarding: std::thread::JoinHandle<Result<()>>,
}

impl Recorder {
    fn start(receiver_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let written = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&written);
        let forwarding = std::thread::spawn(move || -> Result<()> {
            let (client, _) = listener.accept()?;
            let server = connect(receiver_port)?;
            let (mut from_client, mut to_server) = (client.try_clone()?, server.try_clone()?);
            let upstream = std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = from_client.read(&mut buf) {
                    if n == 0 || to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    record
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
                let _ = to_server.shutdown(Shutdown::Write);
            });
            let (mut from_server, mut to_client) = (server, client);
            let _ = std::io::copy(&mut from_server, &mut to_client);
            let _ = to_client.shutdown(Shutdown::Write);
            upstream
                .join()
                .map_err(|_| anyhow::anyhow!("the recorder panicked"))?;
            Ok(())
        });
        Ok(Self {
            port,
            written,
            forwarding,
        })
    }

    fn finish(self) -> Result<Vec<u8>> {
        self.forwarding
            .join()
            .map_err(|_| anyhow::anyhow!("the recorder panicked"))??;
        Ok(std::mem::take(
            &mut *self.written.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// Runs one hostile case against the receiver at `port`, sending batches `*next..` honestly
/// where the case needs an honest connection; says how the receiver refused it.
fn attack(case: &str, setup: &Setup, port: u16, next: &mut usize) -> Result<String> {
    match case {
        "wrong-secret" => {
            let wrong = format!(
                "not-{}",
                setup.secret.as_deref().unwrap_or("the-channel-secret")
            );
            let pool = setup.pool()?;
            let channel = setup.channel(Role::Sender, "127.0.0.1", port, Some(&wrong), &pool)?;
            let mut pages = pool.allocate_batch(setup.batch)?;
            for page in &mut pages {
                page.as_mut_slice().fill(0xEE);
            }
            let refs: Vec<_> = pages.iter().collect();
            match channel.send(&refs) {
                Ok(()) => bail!("a sender with the wrong secret was let in"),
                Err(err) => {
                    let text = err.to_string();
                    ensure!(
                        text.contains("secret"),
                        "refused, but not for the secret: {text}"
                    );
                    Ok(text)
                }
            }
        }
        "random-bytes" => {
            let mut rng = Rng(0x5EED_0BAD_F00D);
            let bytes: Vec<u8> = (0..8192).map(|_| rng.next_u64() as u8).collect();
            let (answer, took) = hostile_bytes(port, &bytes, false)?;
            ensure!(
                answer.is_empty(),
                "the receiver answered random bytes: {answer:?}"
            );
            Ok(format!("dropped after {took:?}"))
        }
        "truncated-frame" => {
            let mut frame = frame_head(1, 44);
            frame.extend_from_slice(b"kv-chan");
            let (answer, took) = hostile_bytes(port, &frame, true)?;
            ensure!(
                answer.is_empty(),
                "the receiver answered a cut frame: {answer:?}"
            );
            Ok(format!("dropped after {took:?}"))
        }
        "oversized-frame" => {
            let (answer, took) = hostile_bytes(port, &frame_head(1, u32::MAX), true)?;
            ensure!(
                answer.is_empty(),
                "the receiver answered a 4 GiB frame: {answer:?}"
            );
            ensure!(
                took < Duration::from_secs(3),
                "a 4 GiB frame was waited for ({took:?}), not refused at once"
            );
            Ok(format!("dropped after {took:?}"))
        }
        "replayed-handshake" => {
            ensure!(
                setup.batches - *next >= 2,
                "replayed-handshake needs two batches left: one recorded, one after the replay"
            );
            let recorder = Recorder::start(port)?;
            setup.send(recorder.port, *next, *next + 1)?;
            *next += 1;
            let captured = recorder.finish()?;
            let (answer, took) = hostile_bytes(port, &captured, true)?;
            let tags = frame_tags(&answer);
            // A challenge, then at most a refusal: never the receiver's proof (6) or metadata.
            ensure!(
                tags.first() == Some(&5) && tags[1..].iter().all(|&tag| tag == 4),
                "the receiver answered a replayed handshake with frames {tags:?}"
            );
            Ok(format!(
                "{} recorded bytes replayed, answered {tags:?}, dropped after {took:?}",
                captured.len()
            ))
        }
        other => bail!("unknown case {other}; cases: {CASES:?} or all"),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, case, rest) = match args.split_first() {
        Some((mode, rest)) if mode == "attack" => match rest.split_first() {
            Some((case, rest)) => (mode.as_str(), Some(case.as_str()), rest),
            None => bail!("usage: kv_channel_peer attack CASE PORT CHUNK_BYTES BATCHES BATCH"),
        },
        Some((mode, rest)) => (mode.as_str(), None, rest),
        None => bail!(
            "usage: kv_channel_peer send|receive PORT CHUNK_BYTES BATCHES BATCH [nixl|mock_memory]"
        ),
    };
    let [port, chunk, batches, batch, rest @ ..] = rest else {
        bail!(
            "usage: kv_channel_peer send|receive PORT CHUNK_BYTES BATCHES BATCH [nixl|mock_memory]"
        );
    };
    let port: u16 = port.parse()?;
    let setup = Setup {
        channel_type: match rest.first().map(String::as_str) {
            None | Some("nixl") => ChannelType::Nixl,
            Some("mock_memory") => ChannelType::MockMemory,
            Some(other) => bail!("unknown channel type {other}"),
        },
        chunk: chunk.parse()?,
        batches: batches.parse()?,
        batch: batch.parse()?,
        secret: std::env::var(SECRET_VAR).ok().filter(|s| !s.is_empty()),
    };
    let total = setup.batches * setup.batch;
    match (mode, case) {
        ("send", _) => {
            setup.send(port, 0, setup.batches)?;
            println!("sent {total}");
        }
        ("receive", _) => {
            setup.receive(port)?;
            println!("ok {total}");
        }
        ("attack", Some(case)) => {
            let cases: Vec<&str> = match case {
                "all" => CASES.to_vec(),
                one => vec![one],
            };
            let mut next = 0;
            for case in cases {
                let how = attack(case, &setup, port, &mut next)
                    .with_context(|| format!("hostile case {case}"))?;
                println!("refused {case}: {how}");
            }
            setup.send(port, next, setup.batches)?;
            println!("sent {total}");
        }
        (other, _) => bail!("unknown mode {other}"),
    }
    Ok(())
}
