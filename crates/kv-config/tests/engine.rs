//! LMCache engine configuration: loading layers and every NIXL storage rule.
#![expect(
    clippy::result_large_err,
    reason = "figment::Jail closures must return figment::Error, which is large"
)]

use std::path::PathBuf;

use figment::Jail;
use kv_config::{
    Backend, ConfigLoader, Deployment, Device, EngineConfig, Error, Loaded, Mode, PresenceCache,
    StorageKind, StorageSpec, SyncMode, Warning,
};

const POSIX_STATIC: &str = "
chunk_size: 256
nixl_buffer_device: cpu
local_cpu_use_hugepages: true
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 64
  nixl_path: /mnt/nixl/cache/
  use_direct_io: true
";

fn load_yaml(yaml: &str) -> Result<Loaded<EngineConfig>, Error> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmcache.yaml");
    std::fs::write(&path, yaml).unwrap();
    ConfigLoader::new().with_file(&path).load()
}

fn spec_of(yaml: &str, deployment: Deployment) -> Result<Loaded<StorageSpec>, Error> {
    load_yaml(yaml)?.value.storage_spec(&deployment)
}

fn spec(yaml: &str) -> StorageSpec {
    spec_of(yaml, Deployment::new())
        .unwrap_or_else(|e| panic!("{e}"))
        .value
}

/// The errors of an invalid config, flattened.
fn errors(yaml: &str, deployment: Deployment) -> Vec<String> {
    let err = spec_of(yaml, deployment).expect_err("config must be rejected");
    err.violations().iter().map(|e| format!("{e:?}")).collect()
}

fn has(errors: &[String], variant: &str) -> bool {
    errors.iter().any(|e| e.starts_with(variant))
}

#[test]
fn seed_posix_example_normalises() {
    let spec = spec(POSIX_STATIC);
    assert_eq!(spec.backend, Backend::Posix);
    assert_eq!(spec.kind, StorageKind::File);
    assert_eq!(spec.mode, Mode::Static { pool_size: 64 });
    assert_eq!(spec.path, Some(PathBuf::from("/mnt/nixl/cache/")));
    assert_eq!(spec.buffer_device, Device::Cpu);
    assert_eq!(
        spec.buffer_bytes,
        Some(5 << 30),
        "max_local_cpu_size defaults to 5 GiB"
    );
    assert!(spec.hugepages);
    assert!(spec.use_direct_io);
    assert_eq!(spec.sync_mode, SyncMode::Strict);
    assert!(spec.progress_thread);
    assert_eq!(spec.presence_cache, PresenceCache::Off);
}

#[test]
fn seed_multipath_example_without_buffer_size_shards_by_worker() {
    let yaml = "
nixl_buffer_device: cpu
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 64
  nixl_path:
    - /mnt/nixl/cache0/
    - /mnt/nixl/cache1/
    - /mnt/nixl/cache2/
  nixl_path_sharding: by_gpu
  use_direct_io: True
";
    let spec = spec_of(yaml, Deployment::new().with_worker(4, 0))
        .unwrap()
        .value;
    assert_eq!(
        spec.path,
        Some(PathBuf::from("/mnt/nixl/cache1/")),
        "4 % 3 = 1"
    );
    assert_eq!(spec.all_paths.len(), 3);
}

#[test]
fn comma_separated_path_string_is_sharded_too() {
    let yaml = POSIX_STATIC.replace("/mnt/nixl/cache/", "/a, /b");
    let spec = spec_of(&yaml, Deployment::new().with_worker(1, 1))
        .unwrap()
        .value;
    assert_eq!(spec.path, Some(PathBuf::from("/b")));
}

#[test]
fn seed_multipath_example_with_cpu_buffer_size_is_rejected_by_v5() {
    let yaml = "
nixl_buffer_size: 1073741824
nixl_buffer_device: cpu
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 64
  nixl_path: [/mnt/a, /mnt/b]
";
    let errors = errors(yaml, Deployment::new());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(has(&errors, "BufferSizeInCpuMode"));
}

#[test]
fn seed_obj_examples_keep_credentials_and_redact_them() {
    let yaml = "
chunk_size: 256
nixl_buffer_device: cpu
max_local_cpu_size: 1
extra_config:
  enable_nixl_storage: true
  nixl_backend: OBJ
  nixl_pool_size: 0
  nixl_presence_cache: False
  nixl_async_put: False
  nixl_backend_params:
    access_key: AKIAIOSFODNN7EXAMPLE
    secret_key: wJalrXUtnFEMIK7MDENG
    bucket: kv
    region: us-east-1
    endpoint_override: https://url-to-object-storage
";
    let spec = spec(yaml);
    assert_eq!(spec.mode, Mode::Dynamic);
    assert_eq!(spec.kind, StorageKind::Object);
    assert_eq!(spec.path, None, "object backends use no folder");
    assert_eq!(spec.buffer_bytes, Some(1 << 30));
    assert_eq!(
        spec.backend_params.expose()["secret_key"],
        "wJalrXUtnFEMIK7MDENG"
    );
    let printed = format!("{spec:?} {}", serde_json::to_string(&spec).unwrap());
    assert!(!printed.contains("wJalrXUtnFEMIK7MDENG"), "{printed}");
    assert!(!printed.contains("AKIAIOSFODNN7EXAMPLE"), "{printed}");
    assert!(printed.contains("us-east-1"));
}

#[test]
fn endpoint_list_picks_by_local_worker_and_overrides_endpoint_override() {
    let yaml = "
nixl_buffer_device: cpu
extra_config:
  enable_nixl_storage: true
  nixl_backend: OBJ
  nixl_pool_size: 64
  nixl_endpoint_list:
    - https://node-0.object-storage:9021
    - https://node-1.object-storage:9021
    - https://node-2.object-storage:9021
  nixl_backend_params:
    bucket: kv
    endpoint_override: http://old:9000
";
    let loaded = load_yaml(yaml).unwrap().value;
    let Loaded { value, warnings } = loaded
        .storage_spec(&Deployment::new().with_worker(7, 5))
        .unwrap();
    assert_eq!(
        value.backend_params.get("endpoint_override"),
        Some("https://node-2.object-storage:9021"),
        "5 % 3 = 2"
    );
    assert!(warnings.iter().any(|w| {
        w.to_string()
            .contains("ignoring nixl_backend_params.endpoint_override")
    }));
    assert_eq!(
        loaded
            .extra_config
            .nixl_backend_params
            .get("endpoint_override"),
        Some("http://old:9000"),
        "the user's params are never mutated"
    );
}

#[test]
fn endpoint_list_rules() {
    let base = "
nixl_buffer_device: cpu
extra_config:
  enable_nixl_storage: true
  nixl_backend: BACKEND
  nixl_pool_size: 4
  nixl_path: /tmp/x
  nixl_endpoint_list: LIST
";
    let obj = |list: &str| base.replace("BACKEND", "OBJ").replace("LIST", list);
    assert!(has(
        &errors(&obj("[]"), Deployment::new()),
        "EmptyEndpointList"
    ));
    assert!(has(
        &errors(&obj("[s3.example.com]"), Deployment::new()),
        "InvalidEndpoint"
    ));
    let posix_empty = base.replace("BACKEND", "POSIX").replace("LIST", "[]");
    assert!(
        has(
            &errors(&posix_empty, Deployment::new()),
            "EmptyEndpointList"
        ),
        "an empty list is an error for every backend"
    );
    let posix = base
        .replace("BACKEND", "POSIX")
        .replace("LIST", "[http://a]");
    // LMCache ignores the list for other backends; here a list that would do nothing is refused.
    let messages = errors(&posix, Deployment::new());
    assert!(
        messages
            .iter()
            .any(|m| m.contains("extra_config.nixl_endpoint_list") && m.contains("OBJ")),
        "{messages:?}"
    );
}

#[test]
fn every_missing_key_is_reported_at_once() {
    let yaml = "
extra_config:
  enable_nixl_storage: true
  nixl_presence_cache_only: true
";
    let errors = errors(yaml, Deployment::new());
    for variant in [
        "MissingBackend",
        "MissingPoolSize",
        "PresenceCacheOnlyWithoutCache",
        "MissingBufferDevice",
    ] {
        assert!(has(&errors, variant), "{variant} missing from {errors:?}");
    }
    assert_eq!(errors.len(), 4, "{errors:?}");
}

#[test]
fn storage_disabled_is_its_own_error() {
    let err = spec_of("chunk_size: 256\n", Deployment::new()).unwrap_err();
    assert!(matches!(err, Error::NixlStorageDisabled));
}

#[test]
fn cpu_mode_rules_v5_v6_v7_v16() {
    let yaml = "
nixl_buffer_device: cpu
nixl_buffer_size: 1024
max_local_cpu_size: 0
enable_p2p: true
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 4
  nixl_path: /tmp/x
";
    let errors = errors(yaml, Deployment::new().with_scheduler_role(true));
    for variant in [
        "BufferSizeInCpuMode",
        "CpuModeWithoutPool",
        "P2pWithCpuMode",
        "CpuModeInSchedulerRole",
    ] {
        assert!(has(&errors, variant), "{variant} missing from {errors:?}");
    }
}

#[test]
fn gpu_mode_needs_a_buffer_size_v8_and_rounds_it_up() {
    let yaml = "
nixl_buffer_device: cuda
extra_config:
  enable_nixl_storage: true
  nixl_backend: GDS_MT
  nixl_pool_size: 4
  nixl_path: /tmp/x
";
    assert!(has(&errors(yaml, Deployment::new()), "MissingBufferSize"));
    let sized = yaml.replace(
        "nixl_buffer_device: cuda",
        "nixl_buffer_device: cuda\nnixl_buffer_size: 100",
    );
    let Loaded { value, warnings } = spec_of(
        &sized,
        Deployment::new().with_worker(3, 3).with_chunk_bytes(64),
    )
    .unwrap();
    assert_eq!(
        value.buffer_device,
        Device::Cuda(3),
        "cuda means the worker's GPU"
    );
    assert_eq!(value.buffer_bytes, Some(128));
    assert!(
        warnings
            .iter()
            .any(|w| w.to_string().contains("auto aligned to 128"))
    );
}

#[test]
fn cpu_pool_rounds_down_to_chunks_and_refuses_less_than_one() {
    let yaml = "
nixl_buffer_device: cpu
max_local_cpu_size: 1
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 4
  nixl_path: /tmp/x
";
    let chunk = 3 << 20;
    let Loaded { value, warnings } =
        spec_of(yaml, Deployment::new().with_chunk_bytes(chunk)).unwrap();
    assert_eq!(value.buffer_bytes, Some((1 << 30) / chunk * chunk));
    assert!(
        warnings
            .iter()
            .any(|w| w.to_string().contains("rounding down"))
    );
    let errors = errors(yaml, Deployment::new().with_chunk_bytes(2 << 30));
    assert!(has(&errors, "CpuPoolBelowOneChunk"), "{errors:?}");
}

#[test]
fn backend_device_matrix_v13() {
    for (backend, device, ok) in [
        ("POSIX", "cuda", false),
        ("HF3FS", "cuda:1", false),
        ("AZURE_BLOB", "cuda", false),
        ("DOCA_MEMOS", "cuda:0", false),
        ("DOCA_MEMOS", "cpu", true),
        ("GDS", "cuda", true),
        ("OBJ", "cuda:2", true),
    ] {
        let size = if device == "cpu" {
            ""
        } else {
            "nixl_buffer_size: 4096\n"
        };
        let yaml = format!(
            "nixl_buffer_device: {device}\n{size}extra_config:\n  enable_nixl_storage: true\n  nixl_backend: {backend}\n  nixl_pool_size: 1\n  nixl_path: /tmp/x\n"
        );
        let result = spec_of(&yaml, Deployment::new());
        assert_eq!(result.is_ok(), ok, "{backend} on {device}: {result:?}");
        if !ok {
            assert!(has(
                &errors(&yaml, Deployment::new()),
                "BackendDeviceMismatch"
            ));
        }
    }
}

#[test]
fn unknown_backend_and_bad_device_have_their_own_errors() {
    let yaml = "
nixl_buffer_device: gpu
extra_config:
  enable_nixl_storage: true
  nixl_backend: INVALID
  nixl_pool_size: 1
";
    let errors = errors(yaml, Deployment::new());
    assert!(has(&errors, "UnknownBackend"), "{errors:?}");
    assert!(has(&errors, "InvalidBufferDevice"), "{errors:?}");
}

#[test]
fn file_backend_needs_a_path_v14() {
    let yaml = "
nixl_buffer_device: cpu
extra_config:
  enable_nixl_storage: true
  nixl_backend: HF3FS
  nixl_pool_size: 4
";
    let errors = errors(yaml, Deployment::new());
    assert_eq!(
        errors,
        vec!["MissingPath { backend: \"HF3FS\" }".to_owned()]
    );
}

#[test]
fn dynamic_mode_rules_v12_v15_v17() {
    let yaml = "
nixl_buffer_device: cpu
save_unfull_chunk: true
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 0
  nixl_path: [/a, /b]
";
    let errors = errors(yaml, Deployment::new());
    assert!(
        has(&errors, "UnfullChunkInDynamicMode { forced_by: None }"),
        "{errors:?}"
    );
    assert!(has(&errors, "MultiplePathsInDynamicMode"), "{errors:?}");

    let forced = "
nixl_buffer_device: cpu
enable_blending: true
extra_config:
  enable_nixl_storage: true
  nixl_backend: POSIX
  nixl_pool_size: 0
  nixl_path: /a
";
    let err = spec_of(forced, Deployment::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnfullChunkInDynamicMode {
                forced_by: Some("enable_blending")
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("enable_blending"));

    let static_forced = forced.replace("nixl_pool_size: 0", "nixl_pool_size: 8");
    assert!(spec(&static_forced).save_unfull_chunk);
}

#[test]
fn hugepage_deprecation_v9_v10_v11() {
    let base = "
nixl_buffer_device: DEVICE
EXTRA_TOP
extra_config:
  enable_nixl_storage: true
  nixl_backend: GDS
  nixl_pool_size: 4
  nixl_path: /tmp/x
  nixl_use_hugepages: true
";
    let cpu = base.replace("DEVICE", "cpu").replace("EXTRA_TOP", "");
    let Loaded { value, warnings } = spec_of(&cpu, Deployment::new()).unwrap();
    assert!(value.hugepages, "V10 applies the deprecated value");
    assert!(
        warnings
            .iter()
            .any(|w| matches!(w, Warning::Deprecated { .. }))
    );

    let conflict = base
        .replace("DEVICE", "cpu")
        .replace("EXTRA_TOP", "local_cpu_use_hugepages: false");
    assert_eq!(
        errors(&conflict, Deployment::new()),
        vec!["HugepageConflict { deprecated: true, current: false }".to_owned()]
    );

    let gpu = base
        .replace("DEVICE", "cuda")
        .replace("EXTRA_TOP", "nixl_buffer_size: 4096");
    let Loaded { value, warnings } = spec_of(&gpu, Deployment::new()).unwrap();
    assert!(!value.hugepages, "V11: no effect in GPU mode");
    assert!(
        warnings
            .iter()
            .any(|w| w.to_string().contains("has no effect"))
    );
}

#[test]
fn sync_mode_and_sharding_values_are_checked() {
    let yaml = POSIX_STATIC.replace(
        "use_direct_io: true",
        "use_direct_io: true\n  nixl_sync_mode: rw\n  nixl_enable_prog_thread: false",
    );
    let spec = spec(&yaml);
    assert_eq!(spec.sync_mode, SyncMode::Rw);
    assert!(!spec.progress_thread);
    let bad = POSIX_STATIC.replace(
        "use_direct_io: true",
        "nixl_sync_mode: eventual\n  nixl_path_sharding: round_robin",
    );
    let errors = errors(&bad, Deployment::new());
    assert!(has(&errors, "InvalidSyncMode"), "{errors:?}");
    assert!(has(&errors, "InvalidPathSharding"), "{errors:?}");
}

#[test]
fn presence_cache_modes() {
    let only = POSIX_STATIC.replace(
        "nixl_pool_size: 64",
        "nixl_pool_size: 0\n  nixl_presence_cache: true\n  nixl_presence_cache_only: true\n  nixl_async_put: true",
    );
    let spec = spec(&only);
    assert_eq!(spec.presence_cache, PresenceCache::Only);
    assert!(spec.async_put);
}

#[test]
fn wrong_types_name_the_file_key_and_expected_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "chunk_size: lots\nextra_config:\n  use_direct_io: \"yes\"\n",
    )
    .unwrap();
    let err = ConfigLoader::new().with_file(&path).load().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("chunk_size"), "{text}");
    assert!(text.contains("bad.yaml"), "{text}");
    assert!(text.contains("u32") || text.contains("integer"), "{text}");
}

#[test]
fn malformed_yaml_names_the_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, "extra_config:\n  nixl_backend: [POSIX\n").unwrap();
    let text = ConfigLoader::new()
        .with_file(&path)
        .load()
        .unwrap_err()
        .to_string();
    assert!(text.contains("broken.yaml"), "{text}");
    assert!(text.contains("line"), "{text}");
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let err = ConfigLoader::new()
        .with_file("/no/such/lmcache.yaml")
        .load()
        .unwrap_err();
    assert!(matches!(err, Error::File { .. }));
    assert!(err.to_string().contains("/no/such/lmcache.yaml"));
}

#[test]
fn empty_file_is_the_defaults() {
    let loaded = load_yaml("").unwrap().value;
    assert_eq!(loaded, EngineConfig::default());
}

#[test]
fn nested_backend_params_are_rejected_with_the_key() {
    let yaml = POSIX_STATIC.replace(
        "use_direct_io: true",
        "nixl_backend_params:\n    use_uring: true\n    nested: {a: 1}",
    );
    let text = load_yaml(&yaml).unwrap_err().to_string();
    assert!(text.contains("nixl_backend_params.nested"), "{text}");
}

#[test]
fn scalar_backend_params_become_strings() {
    let yaml = POSIX_STATIC.replace(
        "use_direct_io: true",
        "nixl_backend_params:\n    use_uring: true\n    ios_pool_size: 64",
    );
    let spec = spec(&yaml);
    assert_eq!(spec.backend_params.get("use_uring"), Some("true"));
    assert_eq!(spec.backend_params.get("ios_pool_size"), Some("64"));
}

#[test]
fn unknown_keys_warn_with_key_and_source_and_are_ignored() {
    let yaml = format!("{POSIX_STATIC}nixl_file_pool_size: 8\n");
    let Loaded { warnings, .. } = load_yaml(&yaml).unwrap();
    let warning = warnings
        .iter()
        .find_map(|w| match w {
            Warning::UnknownKey { key, source } => Some((key.clone(), source.clone())),
            _ => None,
        })
        .expect("unknown key warning");
    assert_eq!(warning.0, "nixl_file_pool_size");
    assert!(warning.1.contains("lmcache.yaml"), "{}", warning.1);
}

#[test]
fn deprecated_peer_names_are_applied_with_a_warning() {
    let yaml = "nixl_peer_host: 10.0.0.2\nnixl_peer_init_port: 7300\nnixl_peer_port: 7400\nnixl_buffer_size: 4096\n";
    let Loaded { value, warnings } = load_yaml(yaml).unwrap();
    assert_eq!(value.pd_peer_host.as_deref(), Some("10.0.0.2"));
    assert_eq!(value.pd_peer_init_port, Some(vec![7300]));
    assert_eq!(value.nixl_receiver_port, Some(7400));
    assert_eq!(
        value.nixl_buffer_size,
        Some(4096),
        "never remapped to pd_buffer_size"
    );
    assert_eq!(value.pd_buffer_size, None);
    let deprecated = warnings
        .iter()
        .filter(|w| matches!(w, Warning::Deprecated { .. }))
        .count();
    assert_eq!(deprecated, 3);
}

#[test]
fn deprecated_and_current_names_with_different_values_conflict() {
    let err = load_yaml("nixl_peer_host: a\npd_peer_host: b\n").unwrap_err();
    assert!(matches!(err, Error::AliasConflict { .. }), "{err:?}");
    assert!(load_yaml("nixl_peer_host: a\npd_peer_host: a\n").is_ok());
}

#[test]
fn env_overrides_file_and_extra_config_replaces_the_dict() {
    Jail::expect_with(|jail| {
        jail.create_file("lmcache.yaml", POSIX_STATIC)?;
        jail.set_env("LMCACHE_CONFIG_FILE", "lmcache.yaml");
        jail.set_env("LMCACHE_CHUNK_SIZE", "'512'");
        jail.set_env("LMCACHE_LOCAL_CPU", "0");
        jail.set_env("LMCACHE_MAX_LOCAL_CPU_SIZE", "2.5");
        jail.set_env(
            "LMCACHE_EXTRA_CONFIG",
            r#"{"enable_nixl_storage": true, "nixl_backend": "GDS_MT", "nixl_pool_size": 0, "nixl_path": "/nvme"}"#,
        );
        let config = ConfigLoader::new().with_process_env().load().unwrap().value;
        assert_eq!(config.chunk_size, 512);
        assert!(!config.local_cpu);
        assert_eq!(config.max_local_cpu_size, 2.5);
        let extra = &config.extra_config;
        assert_eq!(extra.nixl_backend.as_deref(), Some("GDS_MT"));
        assert_eq!(extra.nixl_pool_size, Some(0));
        assert!(
            !extra.use_direct_io,
            "env extra_config replaces the file's dict: use_direct_io falls back to its default"
        );
        assert_eq!(
            config.nixl_buffer_device.as_deref(),
            Some("cpu"),
            "file keys stay"
        );
        Ok(())
    });
}

#[test]
fn unparsable_env_values_warn_and_keep_the_previous_value() {
    Jail::expect_with(|jail| {
        jail.create_file("c.yaml", "chunk_size: 128\n")?;
        jail.set_env("LMCACHE_CHUNK_SIZE", "many");
        jail.set_env("LMCACHE_EXTRA_CONFIG", "{not json");
        jail.set_env("LMCACHE_ENABLE_P2P", "perhaps");
        let Loaded { value, warnings } = ConfigLoader::new()
            .with_file("c.yaml")
            .with_process_env()
            .load()
            .unwrap();
        assert_eq!(value.chunk_size, 128);
        assert!(!value.enable_p2p);
        let unparsable: Vec<_> = warnings
            .iter()
            .filter_map(|w| match w {
                Warning::UnparsableEnv { variable, .. } => Some(variable.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            unparsable,
            [
                "LMCACHE_CHUNK_SIZE",
                "LMCACHE_ENABLE_P2P",
                "LMCACHE_EXTRA_CONFIG"
            ]
        );
        Ok(())
    });
}

#[test]
fn overrides_win_over_env() {
    Jail::expect_with(|jail| {
        jail.set_env("LMCACHE_CHUNK_SIZE", "512");
        let config = ConfigLoader::new()
            .with_process_env()
            .with_override("chunk_size", serde_json::json!(1024))
            .load()
            .unwrap()
            .value;
        assert_eq!(config.chunk_size, 1024);
        Ok(())
    });
}

#[test]
fn channel_keys_load_with_deprecated_names_and_validate() {
    let yaml = "enable_pd: true\npd_role: sender\nnixl_peer_host: 10.1.2.3\nnixl_peer_init_port: [7300]\npd_peer_alloc_port: 7400\npd_buffer_size: 1073741824\npd_buffer_device: cpu\ntransfer_channel: nixl\n";
    let Loaded { value, warnings } = load_yaml(yaml).unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| matches!(w, Warning::Deprecated { .. }))
    );
    let spec = value.channel_spec().unwrap().value;
    assert_eq!(spec.role, kv_config::PdRole::Sender);
    assert_eq!(spec.kind, kv_config::ChannelKind::Nixl);
    assert_eq!(spec.peer_host, "10.1.2.3");
    assert_eq!(spec.port, 7300);
    assert_eq!(spec.alloc_ports, vec![7400]);

    let receiver = load_yaml("enable_pd: true\npd_role: receiver\nnixl_receiver_port: 7500\npd_buffer_size: 4096\npd_buffer_device: cpu\n")
        .unwrap()
        .value
        .channel_spec()
        .unwrap()
        .value;
    assert_eq!(
        receiver.port, 7500,
        "nixl_receiver_port serves when no init port is set"
    );

    let err = load_yaml("enable_p2p: true\npd_role: prefill\ntransfer_channel: carrier-pigeon\n")
        .unwrap()
        .value
        .channel_spec()
        .unwrap_err();
    let text = err.to_string();
    for key in [
        "enable_pd",
        "enable_p2p",
        "pd_role",
        "transfer_channel",
        "pd_buffer_size",
        "pd_buffer_device",
        "pd_peer_init_port",
    ] {
        assert!(text.contains(key), "{key} missing from {text}");
    }
}

/// `cache_policy` picks a static pool's victims: an unknown policy, or a policy for a dynamic
/// store (which evicts by `nixl_eviction`), is refused by name rather than ignored.
#[test]
fn cache_policy_is_checked_against_the_mode_it_applies_to() {
    let static_s3fifo = format!("cache_policy: S3FIFO\n{POSIX_STATIC}");
    let messages = errors(&static_s3fifo, Deployment::new());
    assert!(
        messages
            .iter()
            .any(|m| m.contains("cache_policy") && m.contains("LFU")),
        "{messages:?}"
    );
    for policy in ["LRU", "LFU", "FIFO", "MRU"] {
        let yaml = format!("cache_policy: {policy}\n{POSIX_STATIC}");
        assert_eq!(spec(&yaml).cache_policy, policy);
    }
    let dynamic_lfu = format!(
        "cache_policy: LFU\n{}",
        POSIX_STATIC.replace("nixl_pool_size: 64", "nixl_pool_size: 0")
    );
    let messages = errors(&dynamic_lfu, Deployment::new());
    assert!(
        messages
            .iter()
            .any(|m| m.contains("cache_policy") && m.contains("nixl_eviction")),
        "{messages:?}"
    );
}

/// A dynamic store's capacity and eviction from the YAML: `nixl_max_capacity_gb` and
/// `nixl_eviction` reach the spec; a capacity for a static pool is refused by name.
#[test]
fn nixl_max_capacity_and_eviction_reach_the_spec() {
    let dynamic = POSIX_STATIC.replace("nixl_pool_size: 64", "nixl_pool_size: 0");
    let yaml = format!(
        "{dynamic}  nixl_max_capacity_gb: 2\n  nixl_eviction: {{eviction_policy: LRU, trigger_watermark: 0.7}}\n"
    );
    let spec = spec(&yaml);
    assert_eq!(spec.capacity_bytes, Some(2 << 30));
    let eviction = spec.eviction.unwrap();
    assert_eq!(eviction.trigger_watermark, 0.7);
    assert_eq!(eviction.eviction_ratio, 0.2);
    let bad = format!("{dynamic}  nixl_eviction: {{eviction_policy: ARC}}\n");
    let messages = errors(&bad, Deployment::new());
    assert!(
        messages
            .iter()
            .any(|m| m.contains("extra_config.nixl_eviction.eviction_policy")),
        "{messages:?}"
    );
    let static_capacity = format!("{POSIX_STATIC}  nixl_max_capacity_gb: 2\n");
    let messages = errors(&static_capacity, Deployment::new());
    assert!(
        messages
            .iter()
            .any(|m| m.contains("extra_config.nixl_max_capacity_gb")),
        "{messages:?}"
    );
}

/// Dynamic-only keys on a static pool are refused by name, not ignored.
#[test]
fn dynamic_only_keys_are_refused_for_a_static_pool() {
    for key in ["nixl_async_put", "nixl_presence_cache"] {
        let yaml = format!("{POSIX_STATIC}  {key}: true\n");
        let messages = errors(&yaml, Deployment::new());
        assert!(
            messages
                .iter()
                .any(|m| m.contains(&format!("extra_config.{key}")) && m.contains("dynamic")),
            "{key}: {messages:?}"
        );
    }
}

/// An unknown `nixl` key inside `extra_config` (a typo, an old spelling) is warned about by
/// name, from a file and from the environment alike.
#[test]
fn unknown_nixl_keys_in_extra_config_are_warned_about() {
    let yaml = format!(
        "{POSIX_STATIC}  nixl_file_pool_size: 8\n  nixl_presense_cache: true\n  s3_other_backend: 1\n"
    );
    let warnings = load_yaml(&yaml).unwrap().warnings;
    for key in [
        "extra_config.nixl_file_pool_size",
        "extra_config.nixl_presense_cache",
    ] {
        assert!(
            warnings
                .iter()
                .any(|w| matches!(w, Warning::UnknownKey { key: k, .. } if k == key)),
            "{key}: {warnings:?}"
        );
    }
    assert!(
        !warnings
            .iter()
            .any(|w| w.to_string().contains("s3_other_backend")),
        "other backends' extra_config keys are theirs: {warnings:?}"
    );
    assert!(
        !warnings
            .iter()
            .any(|w| w.to_string().contains("nixl_pool_size)")),
        "{warnings:?}"
    );
    let env = ConfigLoader::new()
        .with_env([(
            "LMCACHE_EXTRA_CONFIG",
            r#"{"enable_nixl_storage": true, "nixl_pool_sise": 4}"#,
        )])
        .load()
        .unwrap()
        .warnings;
    assert!(
        env.iter()
            .any(|w| w.to_string().contains("extra_config.nixl_pool_sise")),
        "{env:?}"
    );
}

/// The engine's own keys are said to have no effect on the store, when set.
#[test]
fn engine_side_keys_are_said_to_have_no_effect_here() {
    let yaml = format!("local_cpu: false\nenable_async_loading: true\n{POSIX_STATIC}");
    let warnings = spec_of(&yaml, Deployment::new()).unwrap().warnings;
    for key in ["local_cpu", "enable_async_loading"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.to_string().starts_with(&format!("{key} has no effect"))),
            "{key}: {warnings:?}"
        );
    }
    let quiet = spec_of(POSIX_STATIC, Deployment::new()).unwrap().warnings;
    assert!(
        !quiet
            .iter()
            .any(|w| w.to_string().contains("has no effect")),
        "{quiet:?}"
    );
}

/// `enable_pd` forces partial chunks to be stored; a non-positive capacity is refused by name.
#[test]
fn enable_pd_forces_unfull_chunks_and_capacity_must_be_positive() {
    let forced = spec(&format!("enable_pd: true\n{POSIX_STATIC}"));
    assert!(
        forced.save_unfull_chunk,
        "enable_pd forces save_unfull_chunk"
    );
    assert!(!spec(POSIX_STATIC).save_unfull_chunk);
    let dynamic = POSIX_STATIC.replace("nixl_pool_size: 64", "nixl_pool_size: 0");
    for gb in ["0", "-1"] {
        let messages = errors(
            &format!("{dynamic}  nixl_max_capacity_gb: {gb}\n"),
            Deployment::new(),
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("extra_config.nixl_max_capacity_gb")),
            "{gb}: {messages:?}"
        );
    }
}

/// The YAML spelling of the layout: `nixl_layout`, `nixl_segment_size_mb`.
#[test]
fn nixl_layout_from_the_yaml() {
    let dynamic = POSIX_STATIC.replace("nixl_pool_size: 64", "nixl_pool_size: 0");
    let spec = spec(&format!(
        "{dynamic}  nixl_layout: segments\n  nixl_segment_size_mb: 128\n"
    ));
    assert_eq!(spec.layout, kv_config::Layout::Segments);
    assert_eq!(spec.segment_bytes, Some(128 << 20));
    let messages = errors(
        &format!("{POSIX_STATIC}  nixl_layout: segments\n"),
        Deployment::new(),
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("extra_config.nixl_layout")),
        "{messages:?}"
    );
    let messages = errors(
        &format!("{dynamic}  nixl_layout: blocks\n"),
        Deployment::new(),
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("extra_config.nixl_layout")),
        "{messages:?}"
    );
}
