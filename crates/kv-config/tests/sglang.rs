//! SGLang HiCache settings and automatic backend selection.

use std::path::PathBuf;

use kv_config::{Backend, Error, HiCacheConfig, PluginChoice};

fn from(vars: &[(&str, &str)]) -> Result<HiCacheConfig, Error> {
    HiCacheConfig::from_env(vars.iter().map(|&(k, v)| (k, v.to_owned()))).map(|l| l.value)
}

#[test]
fn defaults() {
    let config = from(&[]).unwrap();
    assert_eq!(
        config.storage_dirs,
        vec![PathBuf::from("/tmp/hicache_storage")]
    );
    assert_eq!(config.plugin, PluginChoice::Auto);
    assert!(config.use_direct_io);
}

#[test]
fn dirs_plugin_and_direct_io_from_env() {
    let config = from(&[
        ("SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR", "/mnt/a, /mnt/b"),
        ("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN", "3FS"),
        ("SGLANG_HICACHE_NIXL_USE_DIRECT_IO", "false"),
    ])
    .unwrap();
    assert_eq!(
        config.storage_dirs,
        vec![PathBuf::from("/mnt/a"), PathBuf::from("/mnt/b")]
    );
    assert_eq!(config.plugin, PluginChoice::Named(Backend::Hf3fs));
    assert!(!config.use_direct_io);
}

#[test]
fn duplicate_dirs_and_unknown_plugins_are_rejected() {
    let err = from(&[
        (
            "SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR",
            "/mnt/a,/mnt/./a/",
        ),
        ("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN", "NVMEOF"),
    ])
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("listed twice"), "{text}");
    assert!(text.contains("unknown plugin \"NVMEOF\""), "{text}");
}

#[test]
fn auto_priority_is_3fs_posix_gds_mt_gds_obj() {
    let config = from(&[]).unwrap();
    let pick = |available: &[&str]| config.select_backend(available).ok();
    assert_eq!(
        pick(&["OBJ", "GDS", "POSIX", "HF3FS"]),
        Some(Backend::Hf3fs)
    );
    assert_eq!(
        pick(&["OBJ", "GDS", "GDS_MT", "POSIX", "UCX"]),
        Some(Backend::Posix)
    );
    assert_eq!(pick(&["OBJ", "GDS", "GDS_MT"]), Some(Backend::GdsMt));
    assert_eq!(pick(&["OBJ", "GDS"]), Some(Backend::Gds));
    assert_eq!(pick(&["UCX", "OBJ"]), Some(Backend::Obj));
    assert_eq!(pick(&["UCX"]), None);
}

#[test]
fn a_named_plugin_must_be_available() {
    let config = from(&[("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN", "GDS_MT")]).unwrap();
    assert_eq!(
        config.select_backend(&["GDS_MT", "POSIX"]).unwrap(),
        Backend::GdsMt
    );
    let err = config.select_backend(&["POSIX"]).unwrap_err();
    assert!(err.to_string().contains("GDS_MT is not available"), "{err}");
}
