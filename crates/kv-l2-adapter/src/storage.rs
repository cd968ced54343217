//! What the dynamic adapter stores through: per-key files or objects.

use std::fmt::Debug;

use nixl_file::{DynamicFileStore, FileKey, SegmentStore};
use nixl_obj::ObjectStore;
use pinned_alloc::Page;

use crate::error::{Error, Result};
use crate::keys::ChunkKey;

/// Per-key storage under a [`DynamicAdapter`](crate::DynamicAdapter).
///
/// # Contract
///
/// - `put` MUST make a key visible only once its data is complete.
/// - `get` MUST answer `Ok(false)` (never `Ok(true)`) for data that does not check out.
pub trait ChunkStorage: Send + Sync + Debug + 'static {
    /// `file` or `object`.
    fn kind(&self) -> &'static str;

    /// Stores pages; one result per item.
    fn put(&self, items: &[(&ChunkKey, &Page)]) -> Vec<Result<u64>>;

    /// Loads pages; one result per item.
    fn get(&self, items: &mut [(&ChunkKey, &mut Page)]) -> Vec<Result<bool>>;

    /// Whether each key is stored.
    fn contains(&self, keys: &[&ChunkKey]) -> Result<Vec<bool>>;

    /// The stored size of a key, if stored (recovery after a restart).
    fn stored_size(&self, key: &ChunkKey) -> Result<Option<u64>>;

    /// Removes a key; `false` when there was nothing to remove (or the backend cannot delete).
    fn delete(&self, key: &ChunkKey) -> Result<bool>;

    /// Where keys give their space back together, the unit of each key (`None` for a key not
    /// stored): a segment store reuses a segment only once every key in it is gone, so
    /// eviction takes whole units. `None` (the default) for storage where each key's space
    /// comes back on its own delete.
    fn space_units(&self, keys: &[&ChunkKey]) -> Option<Vec<Option<u32>>> {
        let _ = keys;
        None
    }
}

/// A file store's call on `(ChunkKey, page)` items, made on their file keys.
fn by_file_key<T>(
    items: &[(&ChunkKey, &Page)],
    call: impl FnOnce(&[(&FileKey, &Page)]) -> Vec<nixl_file::Result<T>>,
) -> Vec<Result<T>> {
    let items: Vec<_> = items.iter().map(|(k, p)| (k.file_key(), *p)).collect();
    call(&items)
        .into_iter()
        .map(|r| r.map_err(Error::from))
        .collect()
}

/// [`by_file_key`] for calls that fill the pages.
fn by_file_key_mut<T>(
    items: &mut [(&ChunkKey, &mut Page)],
    call: impl FnOnce(&mut [(&FileKey, &mut Page)]) -> Vec<nixl_file::Result<T>>,
) -> Vec<Result<T>> {
    let mut items: Vec<_> = items
        .iter_mut()
        .map(|(k, p)| (k.file_key(), &mut **p))
        .collect();
    call(&mut items)
        .into_iter()
        .map(|r| r.map_err(Error::from))
        .collect()
}

impl ChunkStorage for DynamicFileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn put(&self, items: &[(&ChunkKey, &Page)]) -> Vec<Result<u64>> {
        by_file_key(items, |items| DynamicFileStore::put(self, items))
    }

    fn get(&self, items: &mut [(&ChunkKey, &mut Page)]) -> Vec<Result<bool>> {
        by_file_key_mut(items, |items| DynamicFileStore::get(self, items))
    }

    fn contains(&self, keys: &[&ChunkKey]) -> Result<Vec<bool>> {
        keys.iter()
            .map(|k| DynamicFileStore::contains(self, k.file_key()).map_err(Error::from))
            .collect()
    }

    fn stored_size(&self, key: &ChunkKey) -> Result<Option<u64>> {
        Ok(DynamicFileStore::stored_size(self, key.file_key())?)
    }

    fn delete(&self, key: &ChunkKey) -> Result<bool> {
        Ok(DynamicFileStore::delete(self, key.file_key())?)
    }
}

impl ChunkStorage for SegmentStore {
    fn kind(&self) -> &'static str {
        "segment"
    }

    fn put(&self, items: &[(&ChunkKey, &Page)]) -> Vec<Result<u64>> {
        by_file_key(items, |items| SegmentStore::put(self, items))
    }

    fn get(&self, items: &mut [(&ChunkKey, &mut Page)]) -> Vec<Result<bool>> {
        by_file_key_mut(items, |items| SegmentStore::get(self, items))
    }

    fn contains(&self, keys: &[&ChunkKey]) -> Result<Vec<bool>> {
        Ok(keys
            .iter()
            .map(|k| SegmentStore::contains(self, k.file_key()))
            .collect())
    }

    fn stored_size(&self, key: &ChunkKey) -> Result<Option<u64>> {
        Ok(SegmentStore::stored_size(self, key.file_key()))
    }

    fn delete(&self, key: &ChunkKey) -> Result<bool> {
        Ok(SegmentStore::delete(self, key.file_key())?)
    }

    fn space_units(&self, keys: &[&ChunkKey]) -> Option<Vec<Option<u32>>> {
        let keys: Vec<&nixl_file::FileKey> = keys.iter().map(|k| k.file_key()).collect();
        Some(self.segments_of(&keys))
    }
}

/// An object store and the chunk size its objects hold (objects have no size query).
#[derive(Debug)]
pub struct Objects {
    /// The store.
    pub store: ObjectStore,
    /// Payload bytes of one object.
    pub chunk_bytes: u64,
}

/// The chunk keys of a bucket's listing, in its order, each with its object; an object whose
/// header key is not a chunk key is skipped with a warning.
#[cfg(feature = "nixl")]
pub(crate) fn chunks_listed(
    listed: Vec<nixl_obj::ListedObject>,
) -> impl Iterator<Item = (ChunkKey, nixl_obj::ListedObject)> {
    listed
        .into_iter()
        .filter_map(|object| match FileKey::from_canonical(&object.key) {
            Ok(key) => Some((ChunkKey::from_file_key(key), object)),
            Err(err) => {
                tracing::warn!(object = object.id, error = %err, "object of a foreign key; skipped");
                None
            }
        })
}

impl Objects {
    /// The chunks the bucket holds, oldest first, as `(key, payload bytes)`; empty where the
    /// store has no client that lists.
    pub(crate) fn stored_oldest_first(&self) -> Result<Vec<(ChunkKey, u64)>> {
        #[cfg(feature = "nixl")]
        if let Some(listed) = self.store.list()? {
            return Ok(chunks_listed(listed)
                .map(|(key, object)| (key, object.payload_len))
                .collect());
        }
        Ok(Vec::new())
    }
}

impl ChunkStorage for Objects {
    fn kind(&self) -> &'static str {
        "object"
    }

    fn put(&self, items: &[(&ChunkKey, &Page)]) -> Vec<Result<u64>> {
        let keys: Vec<Vec<u8>> = items.iter().map(|(k, _)| k.canonical()).collect();
        let items: Vec<_> = keys
            .iter()
            .map(Vec::as_slice)
            .zip(items.iter().map(|(_, p)| *p))
            .collect();
        self.store
            .put(&items)
            .into_iter()
            .map(|r| r.map_err(Error::from))
            .collect()
    }

    fn get(&self, items: &mut [(&ChunkKey, &mut Page)]) -> Vec<Result<bool>> {
        let keys: Vec<Vec<u8>> = items.iter().map(|(k, _)| k.canonical()).collect();
        let mut items: Vec<_> = keys
            .iter()
            .map(Vec::as_slice)
            .zip(items.iter_mut().map(|(_, p)| &mut **p))
            .collect();
        self.store
            .get(&mut items)
            .into_iter()
            .map(|r| r.map_err(Error::from))
            .collect()
    }

    fn contains(&self, keys: &[&ChunkKey]) -> Result<Vec<bool>> {
        let canonical: Vec<Vec<u8>> = keys.iter().map(|k| k.canonical()).collect();
        let refs: Vec<&[u8]> = canonical.iter().map(Vec::as_slice).collect();
        Ok(self.store.contains(&refs)?)
    }

    fn stored_size(&self, key: &ChunkKey) -> Result<Option<u64>> {
        Ok(self.contains(&[key])?[0].then_some(self.chunk_bytes))
    }

    fn delete(&self, key: &ChunkKey) -> Result<bool> {
        Ok(self.store.delete(&key.canonical())?)
    }
}
