//! The transport refuses, with typed errors, transfers that would touch memory or storage it
//! does not hold a registration for.

use std::sync::Arc;

use nixl_core::{Error, NixlConfig, NixlTransport, StorageExtent, Transport};
use nixl_file::{FileOptions, open_storage_file};
use pinned_alloc::{MemoryRegion, PoolConfig};

const CHUNK: usize = 64 << 10;

fn posix() -> NixlTransport {
    NixlTransport::new(NixlConfig::new("POSIX")).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn buffer_outside_registered_memory_is_refused() {
    let transport = posix();
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(open_storage_file(&dir.path().join("f"), FileOptions::new()).unwrap());
    let storage = transport.register_file(file).unwrap();
    let heap = vec![7u8; CHUNK];
    let err = transport
        .write(&[(&heap[..], StorageExtent::new(storage.dev_id(), 0))])
        .unwrap_err();
    assert!(
        matches!(err, Error::UnregisteredMemory { len: CHUNK, .. }),
        "{err:?}"
    );
}

#[test]
fn unregistered_file_descriptor_is_refused() {
    let transport = posix();
    let pool = PoolConfig::new(CHUNK, 4 * CHUNK as u64).build().unwrap();
    let _memory = transport
        .register_memory(Arc::clone(&pool) as Arc<dyn MemoryRegion>)
        .unwrap();
    let page = pool.allocate().unwrap();
    let err = transport
        .write(&[(page.as_slice(), StorageExtent::new(987_654, 0))])
        .unwrap_err();
    assert!(
        matches!(err, Error::UnregisteredStorage { dev_id: 987_654 }),
        "{err:?}"
    );
}

#[test]
fn dropping_a_registration_deregisters_it() {
    let transport = posix();
    let pool = PoolConfig::new(CHUNK, 4 * CHUNK as u64).build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(open_storage_file(&dir.path().join("f"), FileOptions::new()).unwrap());
    let storage = transport.register_file(file).unwrap();
    let memory = transport
        .register_memory(Arc::clone(&pool) as Arc<dyn MemoryRegion>)
        .unwrap();
    let page = pool.allocate().unwrap();
    let extent = StorageExtent::new(storage.dev_id(), 0);
    transport.write(&[(page.as_slice(), extent)]).unwrap();
    drop(memory);
    let err = transport.write(&[(page.as_slice(), extent)]).unwrap_err();
    assert!(matches!(err, Error::UnregisteredMemory { .. }), "{err:?}");
}

#[test]
fn an_unknown_plugin_lists_the_available_ones() {
    let err = NixlTransport::new(NixlConfig::new("NO_SUCH_PLUGIN")).unwrap_err();
    match err {
        Error::PluginUnavailable { plugin, available } => {
            assert_eq!(plugin, "NO_SUCH_PLUGIN");
            assert!(available.iter().any(|p| p == "POSIX"), "{available:?}");
        }
        other => panic!("expected PluginUnavailable, got {other}"),
    }
}
