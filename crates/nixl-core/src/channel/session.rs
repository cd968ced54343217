//! Who may speak on the side channel, and proof that each later frame comes from them.
//!
//! At connect both ends prove they hold the channel secret: the connecting end (the sender)
//! sends a fresh nonce, the listening end (the receiver) answers with its own, and each end
//! sends an HMAC-SHA256 over both nonces under the secret, with a label of its side so that
//! one side's proof never passes for the other's. The receiver checks the sender's proof
//! before it proves anything itself; a captured handshake replayed on a new connection fails,
//! because the receiver's nonce is new.
//!
//! Every later frame is sealed with ChaCha20-Poly1305 under a key bound to this connection and
//! direction (`HMAC(secret, "kv-channel" || sender nonce || receiver nonce || writer's side)`),
//! its nonce the per-direction sequence number and its tag the associated data: the body (agent
//! metadata, page addresses) is hidden from a listener, and a frame from another connection,
//! replayed, reordered, cut or altered fails. Every proof and tag is checked in constant time.
//!
//! Without a configured secret the key is empty: the same protocol runs, which binds frames
//! to the connection but proves nothing about the peer (the channel then listens on loopback
//! only, see `NixlChannel::new`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{encode_frame, read_frame, read_frame_up_to};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of each side's nonce.
const NONCE_BYTES: usize = 32;
/// Bytes of an HMAC-SHA256 tag.
const MAC_BYTES: usize = 32;
/// What the sender's first frame starts with: the protocol and its version.
const PROTOCOL: &[u8] = b"kv-channel/1";
/// Longest frame either side accepts before the peer is authenticated: nothing larger is
/// allocated or waited for on behalf of a stranger.
const MAX_HANDSHAKE_FRAME_BYTES: usize = 64;

/// Handshake frame tags (the frames after it use the channel's own tags).
const HELLO: u8 = 1;
const CHALLENGE: u8 = 5;
const PROOF: u8 = 6;
/// Sent unauthenticated by the receiver when it refuses a sender's proof.
const REFUSED: u8 = 4;

const SENDER_PROOF_LABEL: &[u8] = b"kv-channel sender proof";
const RECEIVER_PROOF_LABEL: &[u8] = b"kv-channel receiver proof";
const SESSION_KEY_LABEL: &[u8] = b"kv-channel";
const SENDER_SIDE: &[u8] = b"sender";
const RECEIVER_SIDE: &[u8] = b"receiver";

/// Why a handshake or an authenticated frame failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum WireError {
    /// Reading or writing the socket failed, or the peer closed it.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The system's random source failed.
    #[error("drawing a nonce: {0}")]
    Random(getrandom::Error),
    /// The peer's proof does not match the secret.
    #[error(
        "the peer does not hold the channel secret (set the same pd_secret, or \
         LMCACHE_PD_SECRET, on both ends)"
    )]
    WrongSecret,
    /// The receiver refused this end's proof.
    #[error("the receiver refused the handshake: {0}")]
    Refused(String),
    /// A frame that is not what the protocol expects at this point.
    #[error("{0}")]
    Malformed(String),
    /// An authenticated frame whose MAC does not verify.
    #[error("frame {sequence} failed authentication (altered, replayed, reordered or forged)")]
    BadMac { sequence: u64 },
}

impl WireError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> WireError {
        move |source| WireError::Io { what, source }
    }
}

/// A socket whose every read and write must finish by one instant: a peer that sends a byte
/// at a time cannot stretch a step past it.
pub(super) struct Deadline<'a> {
    stream: &'a TcpStream,
    at: Instant,
}

impl<'a> Deadline<'a> {
    pub(super) fn new(stream: &'a TcpStream, at: Instant) -> Self {
        Self { stream, at }
    }

    fn left(&self) -> io::Result<std::time::Duration> {
        self.at
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the step ran out of time"))
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.stream).flush()
    }
}

/// The authenticated state of one side-channel connection.
pub(super) struct Session {
    outgoing: ChaCha20Poly1305,
    incoming: ChaCha20Poly1305,
    sent: u64,
    received: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so the fallback (an all-zero key) is never taken.
    <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()))
}

fn proof(secret: &[u8], label: &[u8], sender_nonce: &[u8], receiver_nonce: &[u8]) -> HmacSha256 {
    let mut mac = keyed(secret);
    mac.update(label);
    mac.update(sender_nonce);
    mac.update(receiver_nonce);
    mac
}

fn nonce() -> Result<[u8; NONCE_BYTES], WireError> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(WireError::Random)?;
    Ok(nonce)
}

fn write_plain(stream: &mut impl Write, tag: u8, body: &[u8]) -> Result<(), WireError> {
    stream
        .write_all(&encode_frame(tag, body))
        .map_err(WireError::io("writing a handshake frame"))
}

/// Reads one handshake frame, which must be `expected` with a body of `len` bytes.
fn read_plain(stream: &mut impl Read, expected: u8, len: usize) -> Result<Vec<u8>, WireError> {
    let (tag, body) = read_frame_up_to(stream, MAX_HANDSHAKE_FRAME_BYTES)
        .map_err(WireError::io("reading a handshake frame"))?;
    if tag == REFUSED && expected != HELLO {
        return Err(WireError::Refused(
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    if tag != expected || body.len() != len {
        return Err(WireError::Malformed(format!(
            "handshake frame {tag} of {} bytes where frame {expected} of {len} was due",
            body.len()
        )));
    }
    Ok(body)
}

impl Session {
    fn new(secret: &[u8], sender_nonce: &[u8], receiver_nonce: &[u8], sender: bool) -> Self {
        let key = |side: &[u8]| {
            let mut mac = keyed(secret);
            mac.update(SESSION_KEY_LABEL);
            mac.update(sender_nonce);
            mac.update(receiver_nonce);
            mac.update(side);
            ChaCha20Poly1305::new(&mac.finalize().into_bytes())
        };
        let (mine, theirs) = if sender {
            (SENDER_SIDE, RECEIVER_SIDE)
        } else {
            (RECEIVER_SIDE, SENDER_SIDE)
        };
        Self {
            outgoing: key(mine),
            incoming: key(theirs),
            sent: 0,
            received: 0,
        }
    }

    /// The connecting end's handshake: proves the secret, then checks the receiver's proof.
    pub(super) fn connect(
        stream: &mut (impl Read + Write),
        secret: &[u8],
    ) -> Result<Self, WireError> {
        let sender_nonce = nonce()?;
        write_plain(stream, HELLO, &[PROTOCOL, &sender_nonce].concat())?;
        let receiver_nonce = read_plain(stream, CHALLENGE, NONCE_BYTES)?;
        let mine = proof(secret, SENDER_PROOF_LABEL, &sender_nonce, &receiver_nonce);
        write_plain(stream, PROOF, &mine.finalize().into_bytes())?;
        let theirs = read_plain(stream, PROOF, MAC_BYTES)?;
        proof(secret, RECEIVER_PROOF_LABEL, &sender_nonce, &receiver_nonce)
            .verify_slice(&theirs)
            .map_err(|_| WireError::WrongSecret)?;
        Ok(Self::new(secret, &sender_nonce, &receiver_nonce, true))
    }

    /// The listening end's handshake: checks the sender's proof over a fresh nonce before it
    /// proves anything itself.
    pub(super) fn accept(
        stream: &mut (impl Read + Write),
        secret: &[u8],
    ) -> Result<Self, WireError> {
        let hello = read_plain(stream, HELLO, PROTOCOL.len() + NONCE_BYTES)?;
        let (protocol, sender_nonce) = hello.split_at(PROTOCOL.len());
        if protocol != PROTOCOL {
            return Err(WireError::Malformed(
                "the peer speaks another protocol".to_owned(),
            ));
        }
        let receiver_nonce = nonce()?;
        write_plain(stream, CHALLENGE, &receiver_nonce)?;
        let theirs = read_plain(stream, PROOF, MAC_BYTES)?;
        if proof(secret, SENDER_PROOF_LABEL, sender_nonce, &receiver_nonce)
            .verify_slice(&theirs)
            .is_err()
        {
            // Best effort: the sender learns why, a stranger learns nothing it could use.
            let _ = write_plain(stream, REFUSED, b"the channel secret does not match");
            return Err(WireError::WrongSecret);
        }
        let mine = proof(secret, RECEIVER_PROOF_LABEL, sender_nonce, &receiver_nonce);
        write_plain(stream, PROOF, &mine.finalize().into_bytes())?;
        Ok(Self::new(secret, sender_nonce, &receiver_nonce, false))
    }

    /// The AEAD nonce of frame `sequence` of one direction: each key seals each number once.
    fn frame_nonce(sequence: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&sequence.to_le_bytes());
        nonce.into()
    }

    /// Sends one sealed frame.
    pub(super) fn send(
        &mut self,
        stream: &mut impl Write,
        tag: u8,
        body: &[u8],
    ) -> Result<(), WireError> {
        let sealed = self
            .outgoing
            .encrypt(
                &Self::frame_nonce(self.sent),
                Payload {
                    msg: body,
                    aad: &[tag],
                },
            )
            .map_err(|_| WireError::Malformed("a frame too large to seal".to_owned()))?;
        stream
            .write_all(&encode_frame(tag, &sealed))
            .map_err(WireError::io("writing a frame"))?;
        self.sent += 1;
        Ok(())
    }

    /// Reads one sealed frame (at most `MAX_FRAME_BYTES`, its tag included).
    pub(super) fn receive(&mut self, stream: &mut impl Read) -> Result<(u8, Vec<u8>), WireError> {
        let (tag, sealed) = read_frame(stream).map_err(WireError::io("reading a frame"))?;
        let body = self
            .incoming
            .decrypt(
                &Self::frame_nonce(self.received),
                Payload {
                    msg: &sealed,
                    aad: &[tag],
                },
            )
            .map_err(|_| WireError::BadMac {
                sequence: self.received,
            })?;
        self.received += 1;
        Ok((tag, body))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::{
        CHALLENGE, Deadline, HELLO, MAC_BYTES, NONCE_BYTES, PROOF, PROTOCOL, RECEIVER_PROOF_LABEL,
        Session, WireError, proof, read_plain, write_plain,
    };
    use hmac::Mac;

    const SECRET: &[u8] = b"a-channel-secret-of-some-length";

    /// A connected pair of loopback sockets: (connecting end, accepted end).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn handshake(
        sender_secret: &'static [u8],
        receiver_secret: &'static [u8],
    ) -> (
        Result<Session, WireError>,
        Result<Session, WireError>,
        TcpStream,
        TcpStream,
    ) {
        let (client, server) = pair();
        let accepting = {
            let server = server.try_clone().unwrap();
            thread::spawn(move || {
                Session::accept(&mut Deadline::new(&server, soon()), receiver_secret)
            })
        };
        let connected = Session::connect(&mut Deadline::new(&client, soon()), sender_secret);
        (connected, accepting.join().unwrap(), client, server)
    }

    #[test]
    fn both_ends_with_the_secret_exchange_frames_both_ways() {
        let (sender, receiver, client, server) = handshake(SECRET, SECRET);
        let (mut sender, mut receiver) = (sender.unwrap(), receiver.unwrap());
        for round in 0..3u8 {
            sender.send(&mut &client, 2, &[round; 100]).unwrap();
            assert_eq!(
                receiver.receive(&mut &server).unwrap(),
                (2, vec![round; 100])
            );
            receiver.send(&mut &server, 3, &[round]).unwrap();
            assert_eq!(sender.receive(&mut &client).unwrap(), (3, vec![round]));
        }
    }

    #[test]
    fn a_wrong_secret_fails_on_both_ends() {
        let (sender, receiver, _client, _server) =
            handshake(b"not-the-channel-secret-at-all", SECRET);
        assert!(
            matches!(receiver, Err(WireError::WrongSecret)),
            "{receiver:?}"
        );
        assert!(matches!(sender, Err(WireError::Refused(_))), "{sender:?}");
    }

    /// A receiver that answers without checking, with a proof under another secret, is caught
    /// by the sender before anything else is sent.
    #[test]
    fn a_receiver_without_the_secret_is_caught_by_the_sender() {
        let (client, server) = pair();
        let impostor = thread::spawn(move || {
            let mut io = Deadline::new(&server, soon());
            let hello = read_plain(&mut io, HELLO, PROTOCOL.len() + NONCE_BYTES)?;
            let receiver_nonce = [7u8; NONCE_BYTES];
            write_plain(&mut io, CHALLENGE, &receiver_nonce)?;
            read_plain(&mut io, PROOF, MAC_BYTES)?;
            let forged = proof(
                b"another-secret-entirely-000000",
                RECEIVER_PROOF_LABEL,
                &hello[PROTOCOL.len()..],
                &receiver_nonce,
            );
            write_plain(&mut io, PROOF, &forged.finalize().into_bytes())
        });
        let sender = Session::connect(&mut Deadline::new(&client, soon()), SECRET);
        impostor.join().unwrap().unwrap();
        assert!(matches!(sender, Err(WireError::WrongSecret)), "{sender:?}");
    }

    /// Writes through to the socket, keeping every byte written.
    struct Recorder<'a> {
        stream: &'a TcpStream,
        written: &'a mut Vec<u8>,
    }

    impl Read for Recorder<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            (&mut &*self.stream).read(buf)
        }
    }

    impl Write for Recorder<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = (&mut &*self.stream).write(buf)?;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Everything a real sender wrote on one connection, written again on a new one, fails:
    /// the receiver's nonce is new.
    #[test]
    fn a_replayed_handshake_fails() {
        let (client, server) = pair();
        let accepting = thread::spawn(move || {
            let mut receiver = Session::accept(&mut Deadline::new(&server, soon()), SECRET)?;
            receiver.receive(&mut &server)
        });
        let mut written = Vec::new();
        let mut recorder = Recorder {
            stream: &client,
            written: &mut written,
        };
        let mut sender = Session::connect(&mut recorder, SECRET).unwrap();
        sender.send(&mut recorder, 2, b"metadata").unwrap();
        assert_eq!(
            accepting.join().unwrap().unwrap(),
            (2, b"metadata".to_vec())
        );

        let (attacker, victim) = pair();
        let receiving =
            thread::spawn(move || Session::accept(&mut Deadline::new(&victim, soon()), SECRET));
        let _ = (&attacker).write_all(&written);
        let outcome = receiving.join().unwrap();
        assert!(
            matches!(outcome, Err(WireError::WrongSecret)),
            "{outcome:?}"
        );
    }

    fn sessions() -> (Session, Session) {
        let (sender, receiver, _client, _server) = handshake(SECRET, SECRET);
        (sender.unwrap(), receiver.unwrap())
    }

    /// A frame altered in flight, replayed, or taken out of order fails its MAC.
    #[test]
    fn altered_replayed_and_reordered_frames_fail() {
        let (mut sender, mut receiver) = sessions();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        sender.send(&mut first, 2, b"first").unwrap();
        sender.send(&mut second, 2, b"second").unwrap();
        for at in [0, 3, 6, first.len() - 1] {
            let mut altered = first.clone();
            altered[at] ^= 1;
            let err = receiver.receive(&mut altered.as_slice()).unwrap_err();
            assert!(
                matches!(
                    err,
                    WireError::BadMac { sequence: 0 } | WireError::Io { .. }
                ),
                "byte {at}: {err:?}"
            );
        }
        assert_eq!(receiver.receive(&mut first.as_slice()).unwrap().1, b"first");
        let err = receiver.receive(&mut first.as_slice()).unwrap_err();
        assert!(
            matches!(err, WireError::BadMac { sequence: 1 }),
            "replay: {err:?}"
        );

        let (mut sender, mut receiver) = sessions();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        sender.send(&mut first, 2, b"first").unwrap();
        sender.send(&mut second, 2, b"second").unwrap();
        let err = receiver.receive(&mut second.as_slice()).unwrap_err();
        assert!(
            matches!(err, WireError::BadMac { sequence: 0 }),
            "reordered: {err:?}"
        );
    }

    /// What a frame carries (agent metadata, page addresses) is hidden from a listener: the
    /// body is nowhere in the bytes on the wire, and the peer reads it back.
    #[test]
    fn a_frame_body_is_sealed_on_the_wire() {
        let (mut sender, mut receiver) = sessions();
        let body = b"agent metadata and page addresses 0x7f00deadbeef";
        let mut wire = Vec::new();
        sender.send(&mut wire, 2, body).unwrap();
        assert!(
            !wire.windows(8).any(|w| body.windows(8).any(|b| b == w)),
            "the body travels in clear"
        );
        assert_eq!(receiver.receive(&mut wire.as_slice()).unwrap().1, body);
    }

    /// A frame of one connection fails on another, even between the same two secrets.
    #[test]
    fn a_frame_from_another_connection_fails() {
        let (mut sender, _) = sessions();
        let (_, mut receiver) = sessions();
        let mut frame = Vec::new();
        sender.send(&mut frame, 2, b"batch").unwrap();
        let err = receiver.receive(&mut frame.as_slice()).unwrap_err();
        assert!(matches!(err, WireError::BadMac { sequence: 0 }), "{err:?}");
    }

    /// Before the peer is authenticated a frame may not announce more than a few bytes: a
    /// stranger announcing 1 MiB or 4 GiB is refused at once, nothing allocated or waited for.
    #[test]
    fn a_stranger_cannot_announce_a_large_frame() {
        for announced in [1u32 << 20, u32::MAX] {
            let (client, server) = pair();
            let accepting =
                thread::spawn(move || Session::accept(&mut Deadline::new(&server, soon()), SECRET));
            let mut frame = vec![HELLO];
            frame.extend_from_slice(&announced.to_le_bytes());
            let _ = (&client).write_all(&frame);
            let err = accepting.join().unwrap().unwrap_err();
            assert!(
                matches!(&err, WireError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData),
                "{announced}: {err:?}"
            );
        }
    }

    /// A stranger that sends nothing holds the listening end only until the deadline.
    #[test]
    fn a_silent_stranger_is_dropped_at_the_deadline() {
        let (_client, server) = pair();
        let started = Instant::now();
        let err = Session::accept(
            &mut Deadline::new(&server, Instant::now() + Duration::from_millis(300)),
            SECRET,
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{err:?}");
    }
}
