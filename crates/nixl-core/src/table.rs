//! The registrations a transport holds, checked before every transfer so that no engine is ever
//! handed memory or storage it was not given.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// One row of a [`RegistrationTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// A host memory range, by its table id.
    Memory(u64),
    /// A storage device id (file descriptor or object id).
    Storage(u64),
}

#[derive(Debug, Default)]
struct Rows {
    next_id: u64,
    /// Table id → (start address, length).
    memory: HashMap<u64, (usize, usize)>,
    /// Device id → live registrations of it.
    storage: HashMap<u64, usize>,
}

/// Live memory and storage registrations of one transport.
#[derive(Debug, Default)]
pub struct RegistrationTable {
    rows: Mutex<Rows>,
}

impl RegistrationTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn rows(&self) -> MutexGuard<'_, Rows> {
        self.rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a host memory range.
    pub fn add_memory(&self, base: usize, len: usize) -> TableEntry {
        let mut rows = self.rows();
        let id = rows.next_id;
        rows.next_id += 1;
        rows.memory.insert(id, (base, len));
        TableEntry::Memory(id)
    }

    /// Records a storage device id; with `exclusive`, refuses one that is already live (object
    /// ids must be unique among live registrations).
    pub fn add_storage(&self, dev_id: u64, exclusive: bool) -> Result<TableEntry> {
        let mut rows = self.rows();
        let count = rows.storage.entry(dev_id).or_insert(0);
        if exclusive && *count > 0 {
            return Err(Error::DeviceIdInUse { dev_id });
        }
        *count += 1;
        Ok(TableEntry::Storage(dev_id))
    }

    /// Forgets one entry.
    pub fn remove(&self, entry: TableEntry) {
        let mut rows = self.rows();
        match entry {
            TableEntry::Memory(id) => {
                rows.memory.remove(&id);
            }
            TableEntry::Storage(dev_id) => {
                if let Some(count) = rows.storage.get_mut(&dev_id) {
                    *count -= 1;
                    if *count == 0 {
                        rows.storage.remove(&dev_id);
                    }
                }
            }
        }
    }

    /// Checks a batch of `(address, length, device id)`: every buffer must lie inside one
    /// registered range and every device id must be live.
    pub fn check(&self, batch: impl IntoIterator<Item = (usize, usize, u64)>) -> Result<()> {
        let rows = self.rows();
        for (addr, len, dev_id) in batch {
            let inside = rows.memory.values().any(|&(start, size)| {
                addr >= start && addr.checked_add(len).is_some_and(|end| end <= start + size)
            });
            if !inside {
                return Err(Error::UnregisteredMemory { addr, len });
            }
            if !rows.storage.contains_key(&dev_id) {
                return Err(Error::UnregisteredStorage { dev_id });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_must_lie_wholly_inside_a_live_range() {
        let table = RegistrationTable::new();
        let memory = table.add_memory(0x1000, 0x1000);
        table.add_storage(5, false).unwrap();
        assert!(table.check([(0x1000, 0x1000, 5)]).is_ok());
        assert!(matches!(
            table.check([(0x1800, 0x1000, 5)]),
            Err(Error::UnregisteredMemory { addr: 0x1800, .. })
        ));
        assert!(matches!(
            table.check([(usize::MAX - 1, 4, 5)]),
            Err(Error::UnregisteredMemory { .. })
        ));
        assert!(matches!(
            table.check([(0x1000, 16, 6)]),
            Err(Error::UnregisteredStorage { dev_id: 6 })
        ));
        table.remove(memory);
        assert!(table.check([(0x1000, 16, 5)]).is_err());
    }

    #[test]
    fn exclusive_ids_are_unique_while_live_and_reusable_after() {
        let table = RegistrationTable::new();
        let first = table.add_storage(9, true).unwrap();
        assert!(matches!(
            table.add_storage(9, true),
            Err(Error::DeviceIdInUse { dev_id: 9 })
        ));
        table.remove(first);
        assert!(table.add_storage(9, true).is_ok());
        let shared = table.add_storage(3, false).unwrap();
        table.add_storage(3, false).unwrap();
        table.remove(shared);
        table.add_memory(0, 64);
        assert!(
            table.check([(0, 8, 3)]).is_ok(),
            "one of two registrations of 3 is still live"
        );
    }
}
