//! The registrations a transport holds, checked before every transfer so that no engine is ever
//! handed memory or storage it was not given. A check hands back a lease on every registration
//! the batch names: the transfer holds them until it is over, so a registration dropped while a
//! transfer is in flight (a file closed, memory unmapped, a descriptor number reused for another
//! file) is only torn down once the engine is done with it.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::{Error, Result};

/// What keeps one registration alive while a transfer names it.
pub type Lease = Arc<dyn Any + Send + Sync>;

/// One row of a [`RegistrationTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableEntry {
    /// A host memory range, by its table id.
    Memory(u64),
    /// A storage device id (file descriptor or object id), and the table id of this registration
    /// of it.
    Storage(u64, u64),
}

/// A row's lease: `None` until the registration is complete ([`RegistrationTable::attach`]).
type Slot = Option<Weak<dyn Any + Send + Sync>>;

#[derive(Debug, Default)]
struct Rows {
    next_id: u64,
    /// Table id → (start address, length, lease).
    memory: HashMap<u64, (usize, usize, Slot)>,
    /// Device id → live registrations of it (table id, lease).
    storage: HashMap<u64, Vec<(u64, Slot)>>,
}

impl Rows {
    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

fn upgrade(slot: &Slot) -> Option<Lease> {
    slot.as_ref().and_then(Weak::upgrade)
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

    /// Records a host memory range; transfers may use it once a lease is
    /// [attached](RegistrationTable::attach).
    pub fn add_memory(&self, base: usize, len: usize) -> TableEntry {
        let mut rows = self.rows();
        let id = rows.next_id();
        rows.memory.insert(id, (base, len, None));
        TableEntry::Memory(id)
    }

    /// Records a storage device id; with `exclusive`, refuses one that is already recorded
    /// (object ids must be unique among live registrations).
    pub fn add_storage(&self, dev_id: u64, exclusive: bool) -> Result<TableEntry> {
        let mut rows = self.rows();
        if exclusive && rows.storage.get(&dev_id).is_some_and(|r| !r.is_empty()) {
            return Err(Error::DeviceIdInUse { dev_id });
        }
        let id = rows.next_id();
        rows.storage.entry(dev_id).or_default().push((id, None));
        Ok(TableEntry::Storage(dev_id, id))
    }

    /// Makes an entry usable by transfers: `lease` is what a transfer naming the entry holds
    /// until it is over.
    pub fn attach(&self, entry: TableEntry, lease: Weak<dyn Any + Send + Sync>) {
        let mut rows = self.rows();
        let slot = match entry {
            TableEntry::Memory(id) => rows.memory.get_mut(&id).map(|row| &mut row.2),
            TableEntry::Storage(dev_id, id) => rows
                .storage
                .get_mut(&dev_id)
                .and_then(|regs| regs.iter_mut().find(|(i, _)| *i == id))
                .map(|row| &mut row.1),
        };
        if let Some(slot) = slot {
            *slot = Some(lease);
        }
    }

    /// Forgets one entry.
    pub fn remove(&self, entry: TableEntry) {
        let mut rows = self.rows();
        match entry {
            TableEntry::Memory(id) => {
                rows.memory.remove(&id);
            }
            TableEntry::Storage(dev_id, id) => {
                if let Some(regs) = rows.storage.get_mut(&dev_id) {
                    regs.retain(|(i, _)| *i != id);
                    if regs.is_empty() {
                        rows.storage.remove(&dev_id);
                    }
                }
            }
        }
    }

    /// Checks a batch of `(address, length, device id)`: every buffer must lie inside one live
    /// registered range and every device id must be live. Returns a lease on each registration
    /// the batch names, taken in the same step as the check, with the entry it is for.
    pub fn check(
        &self,
        batch: impl IntoIterator<Item = (usize, usize, u64)>,
    ) -> Result<Vec<(TableEntry, Lease)>> {
        // Declared before the lock so that, on an early return, the lock is let go first: the
        // last lease of a registration dropped meanwhile removes its row, taking the lock.
        let mut named: HashMap<TableEntry, Lease> = HashMap::new();
        let rows = self.rows();
        for (addr, len, dev_id) in batch {
            let memory = rows.memory.iter().find_map(|(&id, (start, size, slot))| {
                let inside =
                    addr >= *start && addr.checked_add(len).is_some_and(|end| end <= start + size);
                inside.then(|| upgrade(slot).map(|l| (id, l))).flatten()
            });
            let Some((id, lease)) = memory else {
                return Err(Error::UnregisteredMemory { addr, len });
            };
            named.entry(TableEntry::Memory(id)).or_insert(lease);
            let storage = rows.storage.get(&dev_id).and_then(|regs| {
                regs.iter()
                    .find_map(|(id, slot)| upgrade(slot).map(|l| (*id, l)))
            });
            let Some((id, lease)) = storage else {
                return Err(Error::UnregisteredStorage { dev_id });
            };
            named
                .entry(TableEntry::Storage(dev_id, id))
                .or_insert(lease);
        }
        Ok(named.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(table: &RegistrationTable, entry: TableEntry) -> Lease {
        let lease: Lease = Arc::new(entry);
        table.attach(entry, Arc::downgrade(&lease));
        lease
    }

    #[test]
    fn buffers_must_lie_wholly_inside_a_live_range() {
        let table = RegistrationTable::new();
        let memory = table.add_memory(0x1000, 0x1000);
        let _memory_lease = live(&table, memory);
        let storage = table.add_storage(5, false).unwrap();
        let _storage_lease = live(&table, storage);
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
        let _first = live(&table, first);
        assert!(matches!(
            table.add_storage(9, true),
            Err(Error::DeviceIdInUse { dev_id: 9 })
        ));
        table.remove(first);
        assert!(table.add_storage(9, true).is_ok());
        let shared = table.add_storage(3, false).unwrap();
        let _shared = live(&table, shared);
        let other = table.add_storage(3, false).unwrap();
        let _other = live(&table, other);
        table.remove(shared);
        let memory = table.add_memory(0, 64);
        let _memory = live(&table, memory);
        assert!(
            table.check([(0, 8, 3)]).is_ok(),
            "one of two registrations of 3 is still live"
        );
    }

    #[test]
    fn a_check_leases_what_it_names_and_refuses_what_is_not_attached() {
        let table = RegistrationTable::new();
        let memory = table.add_memory(0x1000, 0x1000);
        let storage = table.add_storage(7, false).unwrap();
        assert!(
            table.check([(0x1000, 16, 7)]).is_err(),
            "a registration still being made is not usable"
        );
        let memory_lease = live(&table, memory);
        let storage_lease = live(&table, storage);
        let leases = table.check([(0x1000, 16, 7), (0x1010, 16, 7)]).unwrap();
        assert_eq!(leases.len(), 2, "one lease per registration named");
        drop(storage_lease);
        assert_eq!(
            leases
                .iter()
                .filter(|(entry, l)| *entry == storage
                    && l.downcast_ref::<TableEntry>() == Some(&storage))
                .count(),
            1,
            "the transfer's lease keeps the dropped registration alive"
        );
        drop(leases);
        assert!(matches!(
            table.check([(0x1000, 16, 7)]),
            Err(Error::UnregisteredStorage { dev_id: 7 })
        ));
        drop(memory_lease);
    }
}
