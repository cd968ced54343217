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

    /// The inverse of [`canonical`](FileKey::canonical).
    pub fn from_canonical(bytes: &[u8]) -> Option<FileKey> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split('\0');
        let model = parts.next()?.to_owned();
        let kv_rank = parts.next()?.parse().ok()?;
        let group_id = parts.next()?.parse().ok()?;
        let hash_hex = parts.next()?;
        let salt = parts.next()?;
        if parts.next().is_some() || hash_hex.len() % 2 != 0 {
            return None;
        }
        let chunk_hash = (0..hash_hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hash_hex[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(FileKey {
            model,
            kv_rank,
            group_id,
            chunk_hash,
            cache_salt: (!salt.is_empty()).then(|| salt.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(FileKey::from_canonical(&a.canonical()), Some(a));
        let salted = key("m", Some("s"));
        assert_eq!(FileKey::from_canonical(&salted.canonical()), Some(salted));
        assert_eq!(FileKey::from_canonical(b"garbage"), None);
    }
}
