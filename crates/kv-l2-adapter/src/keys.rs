//! The keys our users hand us: LMCache's `CacheEngineKey` and MP `ObjectKey`, SGLang page keys.
//! Every one becomes a [`ChunkKey`], whose storage identity is a [`FileKey`].

use std::fmt;

use nixl_file::FileKey;

/// LMCache's in-process key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheEngineKey {
    /// Model name.
    pub model: String,
    /// Tensor-parallel world size.
    pub world_size: u32,
    /// Worker (rank) id.
    pub worker_id: u32,
    /// Chunk hash.
    pub chunk_hash: u64,
    /// KV dtype as LMCache spells it (`bfloat16`, `half`, …).
    pub dtype: String,
    /// `lmcache.tag.*` request tags, in order.
    pub tags: Vec<(String, String)>,
}

impl fmt::Display for CacheEngineKey {
    /// `model@world_size@worker_id@hash_hex@dtype[@k%v…]`, LMCache's canonical string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}@{}@{:x}@{}",
            self.model, self.world_size, self.worker_id, self.chunk_hash, self.dtype
        )?;
        for (k, v) in &self.tags {
            write!(f, "@{k}%{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for CacheEngineKey {
    type Err = String;

    /// Parses LMCache's canonical string, `model@world_size@worker_id@hash_hex@dtype[@k%v…]`.
    /// The model name may itself contain `@`: the last four fixed fields are taken from the
    /// right of the tags.
    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('@').collect();
        let tag_count = parts.iter().rev().take_while(|p| p.contains('%')).count();
        let fixed = &parts[..parts.len() - tag_count];
        if fixed.len() < 5 {
            return Err(format!(
                "{text:?} is not model@world_size@worker_id@hash_hex@dtype"
            ));
        }
        let n = fixed.len();
        let number = |field: &str, what: &str| -> Result<u32, String> {
            field
                .parse()
                .map_err(|_| format!("{what} {field:?} in {text:?} is not a number"))
        };
        let tags = parts[parts.len() - tag_count..]
            .iter()
            .filter_map(|t| t.split_once('%'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(CacheEngineKey {
            model: fixed[..n - 4].join("@"),
            world_size: number(fixed[n - 4], "world size")?,
            worker_id: number(fixed[n - 3], "worker id")?,
            chunk_hash: u64::from_str_radix(fixed[n - 2], 16)
                .map_err(|_| format!("chunk hash {:?} in {text:?} is not hex", fixed[n - 2]))?,
            dtype: fixed[n - 1].to_owned(),
            tags,
        })
    }
}

/// LMCache's multi-process key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    /// Model name.
    pub model: String,
    /// KV rank.
    pub kv_rank: u32,
    /// Object (layer) group.
    pub group_id: u32,
    /// Chunk hash bytes.
    pub chunk_hash: Vec<u8>,
    /// Tenant salt.
    pub cache_salt: Option<String>,
}

/// The key of one stored chunk, whatever form it came in.
///
/// It carries a 64-bit digest of its canonical form, computed once: index and presence lookups
/// hash those 8 bytes instead of the model name and hash bytes every time (equality still
/// compares every field).
#[derive(Debug, Clone)]
pub struct ChunkKey {
    key: FileKey,
    digest: u64,
}

impl PartialEq for ChunkKey {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.key == other.key
    }
}

impl Eq for ChunkKey {}

impl std::hash::Hash for ChunkKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

impl ChunkKey {
    fn new(key: FileKey) -> Self {
        let digest = xxhash_rust::xxh3::xxh3_64(&key.canonical());
        Self { key, digest }
    }

    /// A key found in storage (a file's header), as it was stored.
    pub fn from_file_key(key: FileKey) -> Self {
        Self::new(key)
    }

    /// The storage identity (file name, object id, header key).
    pub fn file_key(&self) -> &FileKey {
        &self.key
    }

    /// The tenant salt, for per-salt accounting and isolation.
    pub fn cache_salt(&self) -> Option<&str> {
        self.key.cache_salt.as_deref()
    }

    /// The canonical bytes stored in headers and hashed into object ids.
    pub fn canonical(&self) -> Vec<u8> {
        self.key.canonical()
    }
}

impl From<ObjectKey> for ChunkKey {
    fn from(key: ObjectKey) -> Self {
        ChunkKey::new(FileKey {
            model: key.model,
            kv_rank: key.kv_rank,
            group_id: key.group_id,
            chunk_hash: key.chunk_hash,
            cache_salt: key.cache_salt,
        })
    }
}

impl From<&CacheEngineKey> for ChunkKey {
    /// The rank is the worker id; world size, dtype and tags go into the salt field so two keys
    /// that differ in any of them never share storage (LMCache's presence cache keyed only the
    /// hash; we keep the whole identity).
    fn from(key: &CacheEngineKey) -> Self {
        let mut qualifier = format!("ws{}-{}", key.world_size, key.dtype);
        for (k, v) in &key.tags {
            qualifier.push_str(&format!("-{k}={v}"));
        }
        ChunkKey::new(FileKey {
            model: key.model.clone(),
            kv_rank: key.worker_id,
            group_id: 0,
            chunk_hash: key.chunk_hash.to_be_bytes().to_vec(),
            cache_salt: Some(qualifier),
        })
    }
}

/// An SGLang HiCache page key (a prefix hash string), scoped to a model and a TP rank so ranks
/// never overwrite each other (SGLang PR #10969).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    /// The page's prefix hash, as HiCache supplies it.
    pub key: String,
    /// Model name.
    pub model: String,
    /// Tensor-parallel rank.
    pub tp_rank: u32,
    /// Tensor-parallel size.
    pub tp_size: u32,
}

impl From<&PageKey> for ChunkKey {
    fn from(key: &PageKey) -> Self {
        ChunkKey::new(FileKey {
            model: key.model.clone(),
            kv_rank: key.tp_rank,
            group_id: key.tp_size,
            chunk_hash: key.key.as_bytes().to_vec(),
            cache_salt: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_engine_key_prints_like_lmcache() {
        let key = CacheEngineKey {
            model: "org/test_model".to_owned(),
            world_size: 1,
            worker_id: 0,
            chunk_hash: 0,
            dtype: "bfloat16".to_owned(),
            tags: Vec::new(),
        };
        assert_eq!(key.to_string(), "org/test_model@1@0@0@bfloat16");
        let tagged = CacheEngineKey {
            chunk_hash: 0xabc,
            tags: vec![("user".to_owned(), "u1".to_owned())],
            ..key
        };
        assert_eq!(
            tagged.to_string(),
            "org/test_model@1@0@abc@bfloat16@user%u1"
        );
    }

    #[test]
    fn canonical_strings_parse_back() {
        for text in [
            "org/test_model@1@0@0@bfloat16",
            "org/test_model@2@1@deadbeef@half@user%u1@lora%a",
            "odd@model@4@3@ff@fp8_e4m3fn",
        ] {
            let key: CacheEngineKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
        assert!("model@x@0@0@bf16".parse::<CacheEngineKey>().is_err());
        assert!("model@1@0@zz@bf16".parse::<CacheEngineKey>().is_err());
        assert!("not-a-key".parse::<CacheEngineKey>().is_err());
    }

    #[test]
    fn keys_differing_in_dtype_never_share_storage() {
        let a = CacheEngineKey {
            model: "m".to_owned(),
            world_size: 2,
            worker_id: 1,
            chunk_hash: 7,
            dtype: "bfloat16".to_owned(),
            tags: Vec::new(),
        };
        let b = CacheEngineKey {
            dtype: "half".to_owned(),
            ..a.clone()
        };
        assert_ne!(
            ChunkKey::from(&a).canonical(),
            ChunkKey::from(&b).canonical()
        );
        assert_ne!(
            ChunkKey::from(&a).file_key().file_name(),
            ChunkKey::from(&b).file_key().file_name()
        );
    }
}
