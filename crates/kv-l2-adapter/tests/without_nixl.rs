//! A build without feature `nixl` (what a machine with only Rust builds): what needs NIXL is
//! refused by name, saying how to get it, and POSIX files run on the native engine. With the
//! feature these tests are not compiled (the integration tests cover that build).
#![cfg(not(feature = "nixl"))]

use kv_config::HiCacheConfig;
use kv_l2_adapter::{ChunkKey, Engine, ObjectKey, StoreBuilder};

const CHUNK: usize = 64 << 10;

fn error_of(builder: StoreBuilder) -> String {
    builder
        .with_chunk_bytes(CHUNK)
        .build()
        .map(|_| ())
        .expect_err("refused without NIXL")
        .to_string()
}

fn dynamic_json(dir: &std::path::Path, backend: &str, params: &str) -> String {
    format!(
        r#"{{"type":"nixl_store_dynamic","backend":"{backend}","backend_params":{{"file_path":"{}","max_capacity_gb":"0.0625"{params}}}}}"#,
        dir.display()
    )
}

#[test]
fn posix_runs_on_the_native_engine_and_nixl_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let json = dynamic_json(dir.path(), "POSIX", "");
    let store = StoreBuilder::from_l2_adapters([json.clone()])
        .with_chunk_bytes(CHUNK)
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    let key = ChunkKey::from(ObjectKey {
        model: "no-nixl/model".to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: vec![1],
        cache_salt: None,
    });
    let mut page = store.pool().allocate().unwrap();
    page.as_mut_slice().fill(7);
    assert!(
        store
            .adapter()
            .store(std::slice::from_ref(&key), &[&page])
            .is_successful()
    );
    let mut back = store.pool().allocate().unwrap();
    assert!(store.adapter().lookup_and_pin(std::slice::from_ref(&key))[0]);
    assert!(
        store
            .adapter()
            .load(std::slice::from_ref(&key), &mut [&mut back])[0]
    );
    store.adapter().unlock(std::slice::from_ref(&key));
    assert_eq!(back.as_slice(), page.as_slice());
    assert!(store.tiers()[0].spec().is_some());
    drop(store);
    let err = error_of(StoreBuilder::from_l2_adapters([json]).with_engine(Engine::Nixl));
    assert!(
        err.contains("engine") && err.contains("cargo xtask setup") && err.contains("`nixl`"),
        "{err}"
    );
}

#[test]
fn a_backend_that_runs_only_on_nixl_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = error_of(StoreBuilder::from_l2_adapters([dynamic_json(
        dir.path(),
        "GDS",
        "",
    )]));
    assert!(
        err.contains("GDS runs only on NIXL") && err.contains("cargo xtask setup"),
        "{err}"
    );
}

#[test]
fn hicache_naming_another_plugin_says_this_build_has_no_nixl() {
    let dir = tempfile::tempdir().unwrap();
    let config = HiCacheConfig::from_env([
        (
            "SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR",
            dir.path().to_str().unwrap(),
        ),
        ("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN", "GDS"),
    ])
    .unwrap()
    .value;
    let err = error_of(StoreBuilder::from_hicache(config));
    assert!(
        err.contains("SGLANG_HICACHE_NIXL_BACKEND_PLUGIN")
            && err.contains("this build has no NIXL"),
        "{err}"
    );
}
