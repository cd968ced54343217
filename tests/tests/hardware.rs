//! Suites that need hardware: they run under `cargo xtask hw-test`, which detects what is present
//! and says why it skips the rest. Plain `cargo test` lists them as ignored, with the reason.

use kv_integration_tests::{file_suite, nixl_plugin};

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
