//! The 4 KiB header at the start of every dynamic chunk file or object: format version, the full
//! key, the payload length and checksums. Storage whose header does not check out is a miss,
//! never data.

use xxhash_rust::xxh3::xxh3_64;

/// Bytes reserved for the header; the payload starts here, O_DIRECT-aligned.
pub const HEADER_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"KVL2CHNK";
const VERSION: u32 = 1;
/// magic, version, key length, payload length, payload checksum, header checksum.
const FIXED: usize = 8 + 4 + 4 + 8 + 8 + 8;
/// Longest key a header holds.
pub const MAX_KEY_BYTES: usize = HEADER_BYTES - FIXED;

/// Why a header was refused (logged with the file's or object's name).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a chunk header at all.
    Magic,
    /// A format version this build does not read.
    Version(u32),
    /// The header itself is torn or corrupted.
    HeaderChecksum,
    /// The key length field is out of range.
    KeyLength,
    /// The header holds another key.
    ForeignKey,
    /// The payload length differs from the one expected.
    PayloadLength {
        /// Length in the header.
        stored: u64,
        /// Length expected.
        expected: u64,
    },
    /// The payload is torn or corrupted.
    PayloadChecksum,
    /// The buffer given to [`write()`] is shorter than [`HEADER_BYTES`].
    BufferTooShort {
        /// Its length.
        len: usize,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Magic => f.write_str("not a KV chunk file"),
            Refusal::Version(v) => write!(f, "unknown format version {v}"),
            Refusal::HeaderChecksum => f.write_str("header checksum mismatch (torn or corrupted)"),
            Refusal::KeyLength => f.write_str("key length out of range"),
            Refusal::ForeignKey => f.write_str("file holds another key"),
            Refusal::PayloadLength { stored, expected } => {
                write!(f, "payload is {stored} bytes, expected {expected}")
            }
            Refusal::PayloadChecksum => {
                f.write_str("payload checksum mismatch (torn or corrupted)")
            }
            Refusal::BufferTooShort { len } => {
                write!(
                    f,
                    "a header needs {HEADER_BYTES} bytes, the buffer has {len}"
                )
            }
        }
    }
}

/// Fills `out` (at least [`HEADER_BYTES`]) with the header of `payload` stored under `key`;
/// refuses a key longer than [`MAX_KEY_BYTES`] or a buffer too short, writing nothing.
pub fn write(out: &mut [u8], key: &[u8], payload: &[u8]) -> Result<(), Refusal> {
    if key.len() > MAX_KEY_BYTES {
        return Err(Refusal::KeyLength);
    }
    if out.len() < HEADER_BYTES {
        return Err(Refusal::BufferTooShort { len: out.len() });
    }
    out[..HEADER_BYTES].fill(0);
    out[0..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(key.len() as u32).to_le_bytes());
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[24..32].copy_from_slice(&xxh3_64(payload).to_le_bytes());
    out[FIXED..FIXED + key.len()].copy_from_slice(key);
    let checksum = header_checksum(out);
    out[32..40].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}

fn header_checksum(header: &[u8]) -> u64 {
    let mut copy = [0u8; HEADER_BYTES];
    copy.copy_from_slice(&header[..HEADER_BYTES]);
    copy[32..40].fill(0);
    xxh3_64(&copy)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
}

/// Checks a header read back: the key it carries and the payload length it announces.
/// Returns the payload checksum to verify once the payload is in memory.
pub fn check(header: &[u8], key: &[u8], payload_len: u64) -> Result<u64, Refusal> {
    let (stored_key, stored_len, checksum) = parse(header)?;
    if stored_key != key {
        return Err(Refusal::ForeignKey);
    }
    if stored_len != payload_len {
        return Err(Refusal::PayloadLength {
            stored: stored_len,
            expected: payload_len,
        });
    }
    Ok(checksum)
}

/// Parses a header: `(key, payload length, payload checksum)`.
pub fn parse(header: &[u8]) -> Result<(&[u8], u64, u64), Refusal> {
    if header.len() < HEADER_BYTES || &header[0..8] != MAGIC {
        return Err(Refusal::Magic);
    }
    let version = u32_at(header, 8);
    if version != VERSION {
        return Err(Refusal::Version(version));
    }
    if u64_at(header, 32) != header_checksum(header) {
        return Err(Refusal::HeaderChecksum);
    }
    let key_len = u32_at(header, 12) as usize;
    if key_len > MAX_KEY_BYTES {
        return Err(Refusal::KeyLength);
    }
    Ok((
        &header[FIXED..FIXED + key_len],
        u64_at(header, 16),
        u64_at(header, 24),
    ))
}

/// Checks a chunk read back: its header holds `key` and announces `payload`'s length, and the
/// payload matches its checksum ([`check`], then [`verify_payload`]).
pub fn verify(header: &[u8], key: &[u8], payload: &[u8]) -> Result<(), Refusal> {
    let checksum = check(header, key, payload.len() as u64)?;
    verify_payload(payload, checksum)
}

/// Verifies the payload against the checksum from [`check`].
pub fn verify_payload(payload: &[u8], checksum: u64) -> Result<(), Refusal> {
    let _span = tracing::trace_span!("kv_l2.checksum", bytes = payload.len()).entered();
    if xxh3_64(payload) == checksum {
        Ok(())
    } else {
        metrics::counter!("kv_l2_checksum_failures_total").increment(1);
        Err(Refusal::PayloadChecksum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut header = vec![0u8; HEADER_BYTES];
        write(&mut header, b"model\x001\x000\x00ab\x00", b"payload bytes").unwrap();
        header
    }

    #[test]
    fn write_refuses_a_long_key_or_a_short_buffer_and_writes_nothing() {
        let mut header = vec![7u8; HEADER_BYTES];
        let long = vec![b'k'; MAX_KEY_BYTES + 1];
        assert_eq!(write(&mut header, &long, b""), Err(Refusal::KeyLength));
        assert!(header.iter().all(|&b| b == 7));
        let mut short = vec![0u8; HEADER_BYTES - 1];
        assert_eq!(
            write(&mut short, b"k", b""),
            Err(Refusal::BufferTooShort {
                len: HEADER_BYTES - 1
            })
        );
        assert!(write(&mut header, &long[..MAX_KEY_BYTES], b"").is_ok());
    }

    #[test]
    fn a_written_header_checks_out() {
        let header = sample();
        let checksum = check(&header, b"model\x001\x000\x00ab\x00", 13).unwrap();
        assert!(verify_payload(b"payload bytes", checksum).is_ok());
        assert_eq!(
            verify_payload(b"payload bytez", checksum),
            Err(Refusal::PayloadChecksum)
        );
    }

    #[test]
    fn every_kind_of_damage_is_refused() {
        let key = b"model\x001\x000\x00ab\x00";
        assert_eq!(check(&sample(), b"other", 13), Err(Refusal::ForeignKey));
        assert!(matches!(
            check(&sample(), key, 14),
            Err(Refusal::PayloadLength { .. })
        ));
        let mut flipped = sample();
        flipped[100] ^= 1;
        assert_eq!(check(&flipped, key, 13), Err(Refusal::HeaderChecksum));
        let mut foreign = sample();
        foreign[0] = b'X';
        assert_eq!(check(&foreign, key, 13), Err(Refusal::Magic));
        assert_eq!(check(&[0u8; 10], key, 13), Err(Refusal::Magic));
        let zeros = vec![0u8; HEADER_BYTES];
        assert_eq!(
            check(&zeros, key, 13),
            Err(Refusal::Magic),
            "a torn file of zeros"
        );
    }
}
