//! How a KV chunk key names its file, safely.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Longest model name accepted (file names are limited to 255 bytes).
const MAX_MODEL_BYTES: usize = 128;
const MAX_SALT_BYTES: usize = 48;
const MAX_HASH_BYTES: usize = 32;

/// The identity of one stored chunk, as LMCache's MP `ObjectKey` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Model name (`/` becomes `--` in the file name).
    pub model: String,
    /// KV rank (tensor-parallel worker).
    pub kv_rank: u32,
    /// Object group (layer group).
    pub group_id: u32,
    /// Chunk hash bytes.
    pub chunk_hash: Vec<u8>,
    /// Cache salt (tenant isolation), if any.
    pub cache_salt: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_text(what: &str, text: &str, max: usize) -> Result<()> {
    let invalid = |reason: String| Err(Error::InvalidKey { reason });
    if text.is_empty() {
        return invalid(format!("{what} is empty"));
    }
    if text.len() > max {
        return invalid(format!(
            "{what} is {} bytes long; at most {max}",
            text.len()
        ));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return invalid(format!("{what} contains the control character {c:?}"));
    }
    if text == "." || text == ".." || text.contains("/..") || text.starts_with("../") {
        return invalid(format!(
            "{what} {text:?} contains a parent-folder reference"
        ));
    }
    Ok(())
}

impl FileKey {
    /// Checks that the key can only ever name a file inside the store's folder.
    pub fn validate(&self) -> Result<()> {
        check_text("model name", &self.model, MAX_MODEL_BYTES)?;
        if self.model.starts_with('/') {
            return Err(Error::InvalidKey {
                reason: format!("model name {:?} is an absolute path", self.model),
            });
        }
        if self.chunk_hash.is_empty() || self.chunk_hash.len() > MAX_HASH_BYTES {
            return Err(Error::InvalidKey {
                reason: format!(
                    "chunk hash must be 1 to {MAX_HASH_BYTES} bytes, got {}",
                    self.chunk_hash.len()
                ),
            });
        }
        if let Some(salt) = &self.cache_salt {
            check_text("cache salt", salt, MAX_SALT_BYTES)?;
            if salt.contains('/') || salt.contains('\\') {
                return Err(Error::InvalidKey {
                    reason: format!("cache salt {salt:?} contains a path separator"),
                });
            }
        }
        Ok(())
    }

    /// `{model with / as --}_{kv_rank:08x}_{group_id:x}_{hash hex}[@salt].bin`, as LMCache's
    /// dynamic NIXL store names its files.
    pub fn file_name(&self) -> String {
        let salt = self
            .cache_salt
            .as_deref()
            .map(|s| format!("@{s}"))
            .unwrap_or_default();
        format!(
            "{}_{:08x}_{:x}_{}{salt}.bin",
            self.model.replace('/', "--"),
            self.kv_rank,
            self.group_id,
            hex(&self.chunk_hash)
        )
    }

    /// The path below the store's folder: with `shard`, inside `hh/hh/` from the hash's first two
    /// bytes (hashes shorter than two bytes are padded with zeros).
    pub fn relative_path(&self, shard: bool) -> PathBuf {
        let name = self.file_name();
        if !shard {
            return PathBuf::from(name);
        }
        let hex = format!("{:0<4}", hex(&self.chunk_hash));
        PathBuf::from(&hex[0..2]).join(&hex[2..4]).join(name)
    }

    /// An unambiguous encoding of every field, stored in the file header so that two keys whose
    /// file names collide (`a/b` and `a--b`) never read each other's data.
    pub fn canonical(&self) -> Vec<u8> {
        format!(
            "{}\0{}\0{}\0{}\0{}",
            self.model,
            self.kv_rank,
            self.group_id,
            hex(&self.chunk_hash),
            self.cache_salt.as_deref().unwrap_or("")
        )
        .into_bytes()
    }

    /// The inverse of [`canonical`](FileKey::canonical), for keys read back from storage: it
    /// accepts exactly the bytes `canonical` produces for a valid key (no `+1`, no upper-case
    /// hex, no second spelling of one key), and refuses anything else with the reason, never
    /// panicking, whatever the bytes.
    pub fn from_canonical(bytes: &[u8]) -> Result<FileKey> {
        let invalid = |reason: String| Error::InvalidKey {
            reason: format!("stored key: {reason}"),
        };
        let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("not UTF-8 ({e})")))?;
        let fields: Vec<&str> = text.split('\0').collect();
        let [model, kv_rank, group_id, hash_hex, salt] = fields.as_slice() else {
            return Err(invalid(format!("{} fields, expected 5", fields.len())));
        };
        let number = |what: &str, field: &str| {
            field
                .parse::<u32>()
                .map_err(|e| invalid(format!("{what} {field:?}: {e}")))
        };
        let key = FileKey {
            model: (*model).to_owned(),
            kv_rank: number("kv rank", kv_rank)?,
            group_id: number("group id", group_id)?,
            chunk_hash: unhex(hash_hex)
                .ok_or_else(|| invalid(format!("chunk hash {hash_hex:?} is not lower-case hex")))?,
            cache_salt: (!salt.is_empty()).then(|| (*salt).to_owned()),
        };
        key.validate()?;
        if key.canonical() != bytes {
            return Err(invalid("not in canonical form".to_owned()));
        }
        Ok(key)
    }
}

/// Lower-case hex digits, two per byte, by value: byte-index slicing would panic inside a
/// multi-byte character, and `from_str_radix` would accept a sign.
fn unhex(text: &str) -> Option<Vec<u8>> {
    fn nibble(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            _ => None,
        }
    }
    let digits = text.as_bytes();
    if digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// Names a key in messages and logs. Every field is shown (keys hold no secrets); text fields
/// are quoted and escaped, so a hostile model name cannot forge log lines.
impl std::fmt::Display for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} rank {} group {} hash {}",
            self.model,
            self.kv_rank,
            self.group_id,
            hex(&self.chunk_hash)
        )?;
        if let Some(salt) = &self.cache_salt {
            write!(f, " salt {salt:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn key(model: &str, salt: Option<&str>) -> FileKey {
        FileKey {
            model: model.to_owned(),
            kv_rank: 3,
            group_id: 10,
            chunk_hash: vec![0xde, 0xad, 0xbe, 0xef],
            cache_salt: salt.map(str::to_owned),
        }
    }

    #[test]
    fn names_follow_the_reference_layout() {
        let k = key("meta-llama/Llama-3.1-8B", Some("tenant1"));
        assert_eq!(
            k.file_name(),
            "meta-llama--Llama-3.1-8B_00000003_a_deadbeef@tenant1.bin"
        );
        assert_eq!(
            k.relative_path(true),
            PathBuf::from("de/ad/meta-llama--Llama-3.1-8B_00000003_a_deadbeef@tenant1.bin")
        );
    }

    #[test]
    fn hostile_keys_are_rejected() {
        for (model, salt) in [
            ("../etc/passwd", None),
            ("/abs/path", None),
            ("a/../b", None),
            ("..", None),
            ("nul\0byte", None),
            ("ok", Some("../up")),
            ("ok", Some("a/b")),
            ("ok", Some("new\nline")),
            ("", None),
        ] {
            assert!(
                matches!(key(model, salt).validate(), Err(Error::InvalidKey { .. })),
                "{model:?} / {salt:?} must be rejected"
            );
        }
        let long = "m".repeat(4096);
        assert!(
            key(&long, None).validate().is_err(),
            "4 KiB names are rejected"
        );
        assert!(key("org/model", Some("s")).validate().is_ok());
    }

    #[test]
    fn canonical_form_round_trips_and_tells_colliding_names_apart() {
        let a = key("a/b", None);
        let b = key("a--b", None);
        assert_eq!(a.file_name(), b.file_name());
        assert_ne!(a.canonical(), b.canonical());
        assert_eq!(FileKey::from_canonical(&a.canonical()).unwrap(), a);
        let salted = key("m", Some("s"));
        assert_eq!(
            FileKey::from_canonical(&salted.canonical()).unwrap(),
            salted
        );
        assert!(FileKey::from_canonical(b"garbage").is_err());
    }

    #[test]
    fn stored_keys_in_another_spelling_or_invalid_are_refused() {
        for bytes in [
            &b"m\x00+1\x000\x00ab\x00"[..],
            b"m\x0001\x000\x00ab\x00",
            b"m\x001\x000\x00AB\x00",
            b"m\x001\x000\x00+a\x00",
            b"m\x001\x000\x00\xe2\x82\xaca\x00",
            b"../up\x001\x000\x00ab\x00",
            b"m\x001\x000\x00\x00",
            b"m\x001\x000\x00ab\x00s\x00extra",
        ] {
            assert!(
                FileKey::from_canonical(bytes).is_err(),
                "{:?} must be refused",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn display_names_every_field_escaped() {
        let mut k = key("org/m\nfake log line", Some("t"));
        k.chunk_hash = vec![0, 0xab];
        assert_eq!(
            k.to_string(),
            r#""org/m\nfake log line" rank 3 group 10 hash 00ab salt "t""#
        );
    }

    /// A small xorshift generator: the fuzz loops below are reproducible from their seed.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        /// Text mixing ASCII, the temporary marker and multi-byte characters, which byte-index
        /// parsers slice in half.
        pub(crate) fn text(&mut self, max_parts: usize) -> String {
            const PARTS: [&str; 12] = [
                "a", "Z", "0", "f", "-", "_", ".", ".tmp.", "\u{e9}", "\u{20ac}", "\u{65e5}", "/",
            ];
            (0..1 + self.below(max_parts))
                .map(|_| PARTS[self.below(PARTS.len())])
                .collect()
        }

        pub(crate) fn key(&mut self) -> FileKey {
            let model = self.text(12).trim_start_matches('/').to_owned();
            FileKey {
                model: if model.is_empty() {
                    "m".to_owned()
                } else {
                    model
                },
                kv_rank: self.next() as u32 >> self.below(32),
                group_id: self.next() as u32 >> self.below(32),
                chunk_hash: (0..1 + self.below(32)).map(|_| self.next() as u8).collect(),
                cache_salt: (self.below(2) == 0).then(|| self.text(6).replace('/', "-")),
            }
        }

        /// `bytes` changed once: a bit flip, a cut, an insertion that may split a character or
        /// add a sign, a field separator or upper-case hex, or a removal.
        pub(crate) fn mutate(&mut self, bytes: &mut Vec<u8>) {
            const SNIPPETS: [&[u8]; 10] = [
                "\u{20ac}a".as_bytes(),
                "a\u{20ac}".as_bytes(),
                "\u{e9}".as_bytes(),
                b"+",
                b"-1",
                b"\0",
                b"FF",
                b"\xff\xfe",
                b"00",
                b"@",
            ];
            let at = self.below(bytes.len() + 1);
            match self.below(4) {
                0 if !bytes.is_empty() => {
                    let i = self.below(bytes.len());
                    bytes[i] ^= 1 << self.below(8);
                }
                1 => bytes.truncate(at),
                2 if at < bytes.len() => {
                    let end = (at + 1 + self.below(4)).min(bytes.len());
                    bytes.drain(at..end);
                }
                _ => {
                    let snippet = SNIPPETS[self.below(SNIPPETS.len())];
                    bytes.splice(at..at, snippet.iter().copied());
                }
            }
        }
    }

    /// 200 000 inputs (random bytes, random valid keys mutated once or twice, and untouched
    /// ones): the parser never panics, gives back every untouched key, and accepts a changed
    /// input only if it is itself the exact encoding of the key it returns.
    #[test]
    fn parsing_stored_keys_never_panics() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..200_000 {
            let (bytes, original) = match rng.below(4) {
                0 => {
                    let bytes: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
                    (bytes, None)
                }
                1 => {
                    let key = rng.key();
                    (key.canonical(), Some(key))
                }
                _ => {
                    let mut bytes = rng.key().canonical();
                    for _ in 0..1 + rng.below(2) {
                        rng.mutate(&mut bytes);
                    }
                    (bytes, None)
                }
            };
            let parsed = std::panic::catch_unwind(|| FileKey::from_canonical(&bytes))
                .unwrap_or_else(|_| {
                    panic!(
                        "from_canonical panicked on input {round}: {:?}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
            match (parsed, original) {
                (Ok(parsed), Some(original)) => assert_eq!(parsed, original),
                (Err(err), Some(original)) => {
                    if original.validate().is_ok() {
                        panic!("valid key {original} refused: {err}");
                    }
                }
                (Ok(parsed), None) => assert_eq!(parsed.canonical(), bytes, "input {round}"),
                (Err(_), None) => {}
            }
        }
    }
}
