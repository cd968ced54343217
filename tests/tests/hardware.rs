//! Suites that need hardware: they run under `cargo xtask hw-test`, which detects what is present
//! and says why it skips the rest. Plain `cargo test` lists them as ignored, with the reason.

use std::sync::Arc;

use kv_integration_tests::{file_suite, fill_chunk, nixl_plugin};
use nixl_core::{NixlConfig, NixlTransport, PageView, StorageExtent, Transport, TransportExt};
use nixl_file::{FileOptions, open_storage_file};
use pinned_alloc::{DeviceBufferPool, PoolConfig};

const CHUNK: usize = 1 << 20;

/// The folder for HF3FS tests: `KV_TEST_HF3FS_DIR`, a folder on a 3FS mount.
fn hf3fs_dir() -> std::path::PathBuf {
    std::env::var_os("KV_TEST_HF3FS_DIR")
        .map(std::path::PathBuf::from)
        .expect("KV_TEST_HF3FS_DIR must name a folder on a 3FS mount")
}

#[test]
#[ignore = "needs an NVIDIA GPU with GDS (cuFile, nvidia-fs) and NIXL's GDS_MT plugin: cargo xtask hw-test"]
fn gds_mt_dynamic_round_trip() {
    file_suite::dynamic_round_trip(nixl_plugin("GDS_MT"), true, false);
}

#[test]
#[ignore = "needs an NVIDIA GPU with GDS (cuFile, nvidia-fs) and NIXL's GDS_MT plugin: cargo xtask hw-test"]
fn gds_mt_static_pool() {
    file_suite::static_pool(nixl_plugin("GDS_MT"), true);
}

#[test]
#[ignore = "needs an NVIDIA GPU with GDS (cuFile, nvidia-fs) and NIXL's GDS plugin: cargo xtask hw-test"]
fn gds_dynamic_round_trip() {
    file_suite::dynamic_round_trip(nixl_plugin("GDS"), true, false);
}

#[test]
#[ignore = "needs a 3FS mount (KV_TEST_HF3FS_DIR) and NIXL's HF3FS plugin: cargo xtask hw-test"]
fn hf3fs_dynamic_round_trip() {
    let dir = tempfile::tempdir_in(hf3fs_dir()).unwrap();
    let transport = nixl_plugin("HF3FS");
    let memory = file_suite::Memory::new(&transport, 16);
    let store = file_suite::dynamic(&transport, dir.path(), false, false);
    file_suite::put_all(&store, &memory, &[0, 1, 2]);
    assert_eq!(
        file_suite::get_all(&store, &memory, &[0, 1, 2, 3]),
        vec![true, true, true, false]
    );
}

/// GPU mode over POSIX (which moves host memory only): VRAM → host page → file → host → VRAM.
#[test]
#[ignore = "needs an NVIDIA GPU (CUDA driver): cargo xtask hw-test"]
fn gpu_vram_host_file_round_trip_through_posix() {
    let device = DeviceBufferPool::new(0, (4 * CHUNK) as u64, CHUNK as u64).unwrap();
    let host = PoolConfig::new(CHUNK, (4 * CHUNK) as u64).build().unwrap();
    let pinned = host.register_cuda_pinned(0).unwrap();
    let transport = NixlTransport::new(NixlConfig::new("POSIX")).unwrap();
    let _memory = transport.register_pool(&host).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = open_storage_file(
        &dir.path().join("vram.bin"),
        FileOptions::new().with_preallocate(CHUNK as u64),
    )
    .unwrap();
    let storage = transport.register_file(Arc::new(file)).unwrap();
    let mut source = host.allocate().unwrap();
    fill_chunk(7, source.as_mut_slice());
    let mut slot = device.allocate().unwrap();
    slot.copy_from_host(&source).unwrap();
    let mut staged = host.allocate().unwrap();
    slot.copy_to_host(&mut staged).unwrap();
    transport
        .write_pages(
            &[(&staged, StorageExtent::new(storage.dev_id(), 0))],
            PageView::Exact,
        )
        .unwrap();
    let mut back = host.allocate().unwrap();
    transport
        .read_pages(
            &mut [(&mut back, StorageExtent::new(storage.dev_id(), 0))],
            PageView::Exact,
        )
        .unwrap();
    let mut second = device.allocate().unwrap();
    second.copy_from_host(&back).unwrap();
    let mut check = host.allocate().unwrap();
    second.copy_to_host(&mut check).unwrap();
    assert!(check.as_slice() == source.as_slice());
    drop(pinned);
}

/// GPU mode over GDS_MT: VRAM slots straight to a file and back (compat mode accepted).
#[test]
#[ignore = "needs an NVIDIA GPU with GDS (cuFile) and NIXL's GDS_MT plugin: cargo xtask hw-test"]
fn vram_file_round_trip_through_gds_mt() {
    let device = DeviceBufferPool::new(0, (8 * CHUNK) as u64, CHUNK as u64).unwrap();
    let host = PoolConfig::new(CHUNK, (4 * CHUNK) as u64).build().unwrap();
    let transport = NixlTransport::new(NixlConfig::new("GDS_MT")).unwrap();
    let _vram = transport.register_device_pool(Arc::clone(&device)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = open_storage_file(
        &dir.path().join("gds.bin"),
        FileOptions::new()
            .with_direct_io(true)
            .with_preallocate((4 * CHUNK) as u64),
    )
    .unwrap();
    let storage = transport.register_file(Arc::new(file)).unwrap();
    let mut slots: Vec<_> = (0..4).map(|_| device.allocate().unwrap()).collect();
    let mut page = host.allocate().unwrap();
    for (i, slot) in slots.iter_mut().enumerate() {
        fill_chunk(i, page.as_mut_slice());
        slot.copy_from_host(&page).unwrap();
    }
    let writes: Vec<_> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| (s, StorageExtent::new(storage.dev_id(), (i * CHUNK) as u64)))
        .collect();
    transport.write_device(&writes).unwrap();
    let mut targets: Vec<_> = (0..4).map(|_| device.allocate().unwrap()).collect();
    let mut reads: Vec<_> = targets
        .iter_mut()
        .enumerate()
        .map(|(i, s)| (s, StorageExtent::new(storage.dev_id(), (i * CHUNK) as u64)))
        .collect();
    transport.read_device(&mut reads).unwrap();
    let mut expected = vec![0u8; CHUNK];
    for (i, slot) in targets.iter().enumerate() {
        slot.copy_to_host(&mut page).unwrap();
        fill_chunk(i, &mut expected);
        assert!(
            page.as_slice() == &expected[..],
            "chunk {i} differs after VRAM ↔ file"
        );
    }
}

/// A device that does not exist is a clear error, not a crash.
#[test]
#[ignore = "needs an NVIDIA GPU (CUDA driver): cargo xtask hw-test"]
fn gpu_missing_device_is_a_clear_error() {
    let err = DeviceBufferPool::new(999, CHUNK as u64, CHUNK as u64).unwrap_err();
    assert!(err.to_string().contains("cuda:999"), "{err}");
}
