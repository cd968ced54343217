//! The in-memory index shared by the adapters: entries, LRU order, pins, per-salt bytes.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::adapter::Usage;
use crate::keys::ChunkKey;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) size: u64,
    pub(crate) pins: u32,
    tick: u64,
    /// Which insertion this is: a key deleted and stored again gets a new id, so a caller that
    /// looked at the entry earlier can tell it is not the same one.
    pub(crate) id: u64,
    /// Where a static adapter keeps it; unused by dynamic adapters.
    pub(crate) slot: u32,
    /// Found in storage at open and neither stored nor looked up since: a store that does not
    /// persist leaves it, as LMCache leaves files it never looked up.
    adopted: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    entries: HashMap<ChunkKey, Entry>,
    lru: BTreeMap<u64, ChunkKey>,
    next_tick: u64,
    used: u64,
    by_salt: BTreeMap<String, u64>,
    /// Entries with at least one pin, kept as they change so `usage` walks no entries.
    pinned: usize,
    /// Keys being written: never reported present.
    pub(crate) inflight: HashSet<ChunkKey>,
}

fn salt_of(key: &ChunkKey) -> String {
    key.cache_salt().unwrap_or_default().to_owned()
}

impl Index {
    pub(crate) fn get(&self, key: &ChunkKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub(crate) fn contains(&self, key: &ChunkKey) -> bool {
        self.entries.contains_key(key)
    }

    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// Marks a key most recently used.
    pub(crate) fn touch(&mut self, key: &ChunkKey) {
        let tick = self.next_tick;
        if let Some(entry) = self.entries.get_mut(key) {
            self.lru.remove(&entry.tick);
            entry.tick = tick;
            entry.adopted = false;
            self.lru.insert(tick, key.clone());
            self.next_tick += 1;
        }
    }

    /// Inserts a key (most recently used), accounting its bytes.
    pub(crate) fn insert(&mut self, key: ChunkKey, size: u64, slot: u32) {
        if self.entries.contains_key(&key) {
            self.touch(&key);
            return;
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        self.used += size;
        *self.by_salt.entry(salt_of(&key)).or_insert(0) += size;
        self.lru.insert(tick, key.clone());
        self.entries.insert(
            key,
            Entry {
                size,
                pins: 0,
                tick,
                id: tick,
                slot,
                adopted: false,
            },
        );
    }

    /// Marks a key found at open as used here (stored or looked up again), so a store that
    /// does not persist deletes it on close.
    pub(crate) fn claim(&mut self, key: &ChunkKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.adopted = false;
        }
    }

    /// Inserts a key found in storage at open (least recently used of those inserted so far).
    pub(crate) fn insert_adopted(&mut self, key: ChunkKey, size: u64) {
        if self.entries.contains_key(&key) {
            return;
        }
        self.insert(key.clone(), size, 0);
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.adopted = true;
        }
    }

    /// Removes a key, releasing its bytes.
    pub(crate) fn remove(&mut self, key: &ChunkKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        if entry.pins > 0 {
            self.pinned -= 1;
        }
        self.lru.remove(&entry.tick);
        self.used = self.used.saturating_sub(entry.size);
        let salt = salt_of(key);
        if let Some(bytes) = self.by_salt.get_mut(&salt) {
            *bytes = bytes.saturating_sub(entry.size);
            if *bytes == 0 {
                self.by_salt.remove(&salt);
            }
        }
        Some(entry)
    }

    pub(crate) fn pin(&mut self, key: &ChunkKey) -> bool {
        match self.entries.get_mut(key) {
            Some(entry) => {
                if entry.pins == 0 {
                    self.pinned += 1;
                }
                entry.pins += 1;
                true
            }
            None => false,
        }
    }

    pub(crate) fn unpin(&mut self, key: &ChunkKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            match entry.pins {
                0 => tracing::warn!(key = ?key, "unlock of a key that is not pinned"),
                1 => self.pinned -= 1,
                _ => {}
            }
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    /// The least recently used keys, oldest first, of `salt` when given.
    pub(crate) fn oldest(&self, salt: Option<&str>) -> Vec<ChunkKey> {
        self.lru
            .values()
            .filter(|k| salt.is_none_or(|s| k.cache_salt().unwrap_or_default() == s))
            .cloned()
            .collect()
    }

    pub(crate) fn usage(&self, capacity: u64) -> Usage {
        Usage {
            used_bytes: self.used,
            capacity_bytes: capacity,
            bytes_by_salt: self.by_salt.clone(),
            keys: self.entries.len(),
            pinned: self.pinned,
        }
    }

    /// Removes the unpinned ones of `keys` (pinned keys are skipped: eviction retries them on a
    /// later pass); returns what was removed.
    pub(crate) fn remove_unpinned(&mut self, keys: &[ChunkKey]) -> Vec<(ChunkKey, Entry)> {
        let mut removed = Vec::new();
        for key in keys {
            match self.entries.get(key) {
                Some(entry) if entry.pins > 0 => {
                    tracing::debug!(key = ?key, "Skipping eviction of pinned key");
                }
                Some(_) => {
                    if let Some(entry) = self.remove(key) {
                        removed.push((key.clone(), entry));
                    }
                }
                None => {}
            }
        }
        removed
    }

    /// The keys an LRU pass of `ratio` would evict (oldest first, of `salt` when given), and how
    /// many of the chosen were pinned and so are left for a later pass.
    pub(crate) fn eviction_candidates(
        &self,
        ratio: f64,
        salt: Option<&str>,
    ) -> (Vec<ChunkKey>, usize) {
        let oldest = self.oldest(salt);
        let n = eviction_count(oldest.len(), ratio);
        let (pinned, free): (Vec<_>, Vec<_>) = oldest
            .into_iter()
            .take(n)
            .partition(|k| self.entries.get(k).is_some_and(|e| e.pins > 0));
        (free, pinned.len())
    }

    /// Every entry, in no order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The keys stored or looked up since open (not those only adopted at open).
    pub(crate) fn keys_used_here(&self) -> Vec<ChunkKey> {
        self.entries
            .iter()
            .filter(|(_, entry)| !entry.adopted)
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// How many of `candidates` an LRU pass takes: `ratio` of them, at least one when `ratio > 0`.
pub(crate) fn eviction_count(candidates: usize, ratio: f64) -> usize {
    let ratio = ratio.clamp(0.0, 1.0);
    let n = (candidates as f64 * ratio) as usize;
    if ratio > 0.0 && n == 0 && candidates > 0 {
        1
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::Index;
    use crate::test_utils::key;

    /// The pinned count kept as pins change, against a walk of the entries.
    fn walked(index: &Index) -> usize {
        index.entries.values().filter(|e| e.pins > 0).count()
    }

    #[test]
    fn the_pinned_count_follows_pins_unpins_and_removals() {
        let mut index = Index::default();
        for i in 0..4 {
            index.insert(key(i, None), 10, 0);
        }
        assert!(index.pin(&key(0, None)));
        assert!(index.pin(&key(0, None)));
        assert!(index.pin(&key(1, None)));
        assert!(index.pin(&key(2, None)));
        assert!(!index.pin(&key(9, None)));
        assert_eq!(index.usage(0).pinned, 3);
        index.unpin(&key(0, None));
        assert_eq!(index.usage(0).pinned, 3, "key 0 still holds a pin");
        index.unpin(&key(0, None));
        index.unpin(&key(0, None));
        index.unpin(&key(3, None));
        assert_eq!(index.usage(0).pinned, 2);
        assert_eq!(
            index.remove_unpinned(&[key(1, None), key(3, None)]).len(),
            1
        );
        assert!(index.remove(&key(2, None)).is_some());
        assert_eq!(index.usage(0).pinned, 1);
        index.insert(key(2, None), 10, 0);
        assert_eq!(index.usage(0).pinned, 1, "a fresh entry starts unpinned");
        assert_eq!(index.usage(0).pinned, walked(&index));
        assert_eq!(index.usage(0).keys, 3);
    }
}
