//! The `--l2-adapter` JSON form.

use std::path::PathBuf;

use kv_config::{
    AdapterRegistry, Backend, Error, EvictionPolicy, Loaded, Mode, StorageKind, Warning,
};

fn parse(values: &[&str]) -> Result<Loaded<Vec<kv_config::AdapterSpec>>, Error> {
    AdapterRegistry::new().parse(values)
}

fn messages(values: &[&str]) -> Vec<String> {
    parse(values)
        .expect_err("must be rejected")
        .violations()
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn documented_static_example() {
    let specs = parse(&[r#"{"type":"nixl_store","backend":"POSIX","backend_params":{"file_path":"/data/lmcache/l2","use_direct_io":"false"},"pool_size":64}"#])
        .unwrap()
        .value;
    let storage = specs[0].storage.as_ref().unwrap();
    assert_eq!(storage.backend, Backend::Posix);
    assert_eq!(storage.mode, Mode::Static { pool_size: 64 });
    assert_eq!(storage.path, Some(PathBuf::from("/data/lmcache/l2")));
    assert!(!storage.use_direct_io);
    assert!(
        storage.backend_params.expose().is_empty(),
        "our own keys are not plugin params"
    );
    assert!(specs[0].persist_enabled);
    assert!(!specs[0].shared);
    assert_eq!(specs[0].eviction, None);
}

#[test]
fn documented_dynamic_example_with_eviction() {
    let specs = parse(&[r#"{"type":"nixl_store_dynamic","backend":"GDS","backend_params":{"file_path":"/data/nvme/l2","use_direct_io":"true","max_capacity_gb":"50","shard_dirs":"true"},"eviction":{"eviction_policy":"LRU","trigger_watermark":0.9,"eviction_ratio":0.1},"persist_enabled":false}"#])
        .unwrap()
        .value;
    let spec = &specs[0];
    let storage = spec.storage.as_ref().unwrap();
    assert_eq!(storage.mode, Mode::Dynamic);
    assert_eq!(storage.capacity_bytes, Some(50 << 30));
    assert!(storage.use_direct_io);
    assert!(storage.shard_dirs);
    assert!(!storage.persist);
    let eviction = spec.eviction.unwrap();
    assert_eq!(eviction.policy, EvictionPolicy::Lru);
    assert_eq!(eviction.trigger_watermark, 0.9);
    assert_eq!(eviction.eviction_ratio, 0.1);
}

#[test]
fn object_dynamic_needs_no_file_parameters_and_has_no_capacity() {
    let specs = parse(&[
        r#"{"type":"nixl_store_dynamic","backend":"OBJ","backend_params":{"bucket":"kv","secret_key":"s3cr3t-value"}}"#,
        r#"{"type":"nixl_store_dynamic","backend":"AZURE_BLOB","backend_params":{"account_url":"https://a","container_name":"c"}}"#,
    ])
    .unwrap()
    .value;
    let obj = specs[0].storage.as_ref().unwrap();
    assert_eq!(obj.kind, StorageKind::Object);
    assert_eq!(obj.capacity_bytes, None);
    assert_eq!(obj.backend_params.get("bucket"), Some("kv"));
    let printed = format!(
        "{:?} {}",
        specs[0],
        serde_json::to_string(&specs[0]).unwrap()
    );
    assert!(!printed.contains("s3cr3t-value"), "{printed}");
    assert_eq!(specs[1].index, 1, "order is kept");
}

#[test]
fn json_shape_errors_carry_the_flag_position() {
    let errors = messages(&[
        "{not json",
        "[1,2]",
        r#"{"backend":"POSIX"}"#,
        r#"{"type":"redis"}"#,
    ]);
    assert!(
        errors[0].starts_with("Invalid JSON for --l2-adapter #0"),
        "{errors:?}"
    );
    assert_eq!(
        errors[1],
        "--l2-adapter #1: expected a JSON object, got array"
    );
    assert_eq!(errors[2], "--l2-adapter #2: missing 'type' field");
    assert_eq!(
        errors[3],
        "--l2-adapter #3: unknown adapter type \"redis\". Known: nixl_store, nixl_store_dynamic"
    );
}

#[test]
fn static_field_rules_are_all_reported() {
    let errors = messages(&[
        r#"{"type":"nixl_store","backend":"DOCA_MEMOS","backend_params":"x","pool_size":0}"#,
    ]);
    assert!(
        errors.iter().any(|e| e.contains(
            "backend must be one of GDS, GDS_MT, POSIX, HF3FS, OBJ, AZURE_BLOB, got \"DOCA_MEMOS\""
        )),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("backend_params must be a dict")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("pool_size must be a positive integer")),
        "{errors:?}"
    );
}

#[test]
fn file_backends_need_file_path_and_use_direct_io_in_static_mode() {
    let errors =
        messages(&[r#"{"type":"nixl_store","backend":"POSIX","backend_params":{},"pool_size":4}"#]);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("'file_path'"));
    assert!(errors[1].contains("'use_direct_io'"));
    let bad_flag = messages(&[
        r#"{"type":"nixl_store","backend":"POSIX","backend_params":{"file_path":"/x","use_direct_io":"maybe"},"pool_size":4}"#,
    ]);
    assert!(
        bad_flag[0].contains("backend_params.use_direct_io"),
        "{bad_flag:?}"
    );
}

#[test]
fn dynamic_file_backends_need_positive_capacity() {
    for capacity in [
        "",
        r#","max_capacity_gb":"0""#,
        r#","max_capacity_gb":"lots""#,
    ] {
        let json = format!(
            r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"/x"{capacity}}}}}"#
        );
        let errors = messages(&[&json]);
        assert!(
            errors.iter().any(|e| e.contains("max_capacity_gb")),
            "{json}: {errors:?}"
        );
    }
}

#[test]
fn eviction_rules() {
    let with = |eviction: &str| {
        format!(
            r#"{{"type":"nixl_store","backend":"OBJ","backend_params":{{"bucket":"b"}},"pool_size":4,"eviction":{eviction}}}"#
        )
    };
    let errors = messages(&[&with(r#"{"eviction_policy":"ARC"}"#)]);
    assert!(
        errors[0].contains(
            "eviction.eviction_policy must be 'LRU', 'IsolatedLRU', or 'noop', got \"ARC\""
        ),
        "{errors:?}"
    );
    let errors = messages(&[&with(r#"{"eviction_policy":"LRU","trigger_watermark":0}"#)]);
    assert!(
        errors[0].contains("eviction.trigger_watermark: must be a number in (0, 1]"),
        "{errors:?}"
    );
    let errors = messages(&[&with(r#"{"eviction_policy":"noop","eviction_ratio":1.5}"#)]);
    assert!(
        errors[0].contains("eviction.eviction_ratio: must be a number in [0, 1]"),
        "{errors:?}"
    );
    let ok = parse(&[&with(
        r#"{"eviction_policy":"IsolatedLRU","trigger_watermark":1,"eviction_ratio":0}"#,
    )])
    .unwrap();
    let eviction = ok.value[0].eviction.unwrap();
    assert_eq!(eviction.policy, EvictionPolicy::IsolatedLru);
    assert_eq!(
        (eviction.trigger_watermark, eviction.eviction_ratio),
        (1.0, 0.0)
    );
}

#[test]
fn common_key_types_and_serde_shape() {
    let errors = messages(&[
        r#"{"type":"nixl_store","backend":"OBJ","pool_size":1,"shared":"yes","persist_enabled":1,"serde":{"level":3}}"#,
    ]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("shared: expected true or false")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("persist_enabled: expected true or false")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("'serde' dict must include a 'type' field")),
        "{errors:?}"
    );
}

#[test]
fn errors_of_several_adapters_are_reported_together() {
    let err = parse(&[
        r#"{"type":"nixl_store","backend":"POSIX","pool_size":1}"#,
        r#"{"type":"nixl_store_dynamic","backend":"NOPE"}"#,
    ])
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("--l2-adapter #0"), "{text}");
    assert!(text.contains("--l2-adapter #1"), "{text}");
}

#[test]
fn file_size_must_be_whole_pages() {
    let specs = parse(&[r#"{"type":"nixl_store","backend":"POSIX","backend_params":{"file_path":"/x","use_direct_io":"true","file_size":"8192"},"pool_size":2}"#]).unwrap().value;
    let storage = specs[0].storage.as_ref().unwrap();
    assert_eq!(storage.file_size, Some(8192));
    assert!(storage.check_page_size(4096).is_ok());
    assert!(matches!(
        storage.check_page_size(3000),
        Err(Error::FileSizeNotPageMultiple {
            file_size: 8192,
            page_size: 3000
        })
    ));
}

#[test]
fn unknown_adapter_keys_warn() {
    let Loaded { warnings, .. } =
        parse(&[r#"{"type":"nixl_store","backend":"OBJ","pool_size":1,"poolsize":2}"#]).unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| matches!(w, Warning::UnknownKey { key, .. } if key == "poolsize"))
    );
}

fn check_redis(obj: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    match obj.get("url").and_then(|u| u.as_str()) {
        Some(url) if url.starts_with("redis://") => Ok(()),
        _ => Err("url must be a redis:// URL".to_owned()),
    }
}

#[test]
fn downstream_types_register_once_and_are_validated() {
    let mut registry = AdapterRegistry::new();
    registry.register("redis", check_redis).unwrap();
    assert!(matches!(
        registry.register("redis", check_redis),
        Err(Error::DuplicateAdapterType(name)) if name == "redis"
    ));
    assert!(matches!(
        registry.register("nixl_store", check_redis),
        Err(Error::DuplicateAdapterType(_))
    ));
    let specs = registry
        .parse(&[r#"{"type":"redis","url":"redis://127.0.0.1:6379","shared":true}"#])
        .unwrap()
        .value;
    assert_eq!(specs[0].type_name, "redis");
    assert!(specs[0].shared);
    assert!(specs[0].storage.is_none());
    assert_eq!(specs[0].params.expose()["url"], "redis://127.0.0.1:6379");
    let err = registry
        .parse(&[r#"{"type":"redis","url":"http://x"}"#])
        .unwrap_err();
    assert!(
        err.to_string().contains("url must be a redis:// URL"),
        "{err}"
    );
}

#[test]
fn durable_applies_to_dynamic_files_and_is_refused_elsewhere() {
    let dynamic = |durable: &str| {
        format!(
            r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"/data/l2","max_capacity_gb":"1","durable":{durable}}}}}"#
        )
    };
    for (value, expected) in [(r#""true""#, true), ("false", false)] {
        let specs = parse(&[&dynamic(value)]).unwrap().value;
        assert_eq!(specs[0].storage.as_ref().unwrap().durable, expected);
    }
    let unset = parse(&[r#"{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{"file_path":"/data/l2","max_capacity_gb":"1"}}"#])
        .unwrap()
        .value;
    assert!(
        !unset[0].storage.as_ref().unwrap().durable,
        "off by default"
    );
    for refused in [
        r#"{"type":"nixl_store","backend":"POSIX","backend_params":{"file_path":"/data/l2","use_direct_io":"false","durable":"true"},"pool_size":4}"#,
        r#"{"type":"nixl_store_dynamic","backend":"OBJ","backend_params":{"bucket":"b","durable":"true"}}"#,
    ] {
        let errors = messages(&[refused]);
        assert!(
            errors.iter().any(|e| e.contains("backend_params.durable")),
            "{errors:?}"
        );
    }
    let errors = messages(&[&dynamic(r#""sometimes""#)]);
    assert!(
        errors.iter().any(|e| e.contains("backend_params.durable")),
        "{errors:?}"
    );
}

/// A key the chosen adapter type or backend would not use is refused by name, never ignored.
#[test]
fn keys_the_adapter_would_ignore_are_refused_by_name() {
    let posix_static = r#""type":"nixl_store","backend":"POSIX","pool_size":4"#;
    let posix_dynamic = r#""type":"nixl_store_dynamic","backend":"POSIX""#;
    let cases = [
        (
            format!(r#"{{{posix_dynamic},"pool_size":4,"backend_params":{{"file_path":"/x","max_capacity_gb":"1"}}}}"#),
            "pool_size",
        ),
        (
            format!(r#"{{{posix_static},"backend_params":{{"file_path":"/x","use_direct_io":"false","shard_dirs":"true"}}}}"#),
            "backend_params.shard_dirs",
        ),
        (
            format!(r#"{{{posix_static},"backend_params":{{"file_path":"/x","use_direct_io":"false","max_capacity_gb":"1"}}}}"#),
            "backend_params.max_capacity_gb",
        ),
        (
            format!(r#"{{{posix_dynamic},"backend_params":{{"file_path":"/x","max_capacity_gb":"1","file_size":"8192"}}}}"#),
            "backend_params.file_size",
        ),
        (
            r#"{"type":"nixl_store_dynamic","backend":"OBJ","backend_params":{"bucket":"b","file_path":"/x"}}"#.to_owned(),
            "backend_params.file_path",
        ),
        (
            r#"{"type":"nixl_store_dynamic","backend":"OBJ","backend_params":{"bucket":"b","use_direct_io":"true"}}"#.to_owned(),
            "backend_params.use_direct_io",
        ),
        (
            format!(r#"{{{posix_static},"persist_enabled":false,"backend_params":{{"file_path":"/x","use_direct_io":"false"}}}}"#),
            "persist_enabled",
        ),
        (
            format!(r#"{{{posix_dynamic},"shared":true,"persist_enabled":false,"backend_params":{{"file_path":"/x","max_capacity_gb":"1"}}}}"#),
            "persist_enabled",
        ),
        (
            format!(r#"{{{posix_dynamic},"serde":{{"type":"naive"}},"backend_params":{{"file_path":"/x","max_capacity_gb":"1"}}}}"#),
            "serde",
        ),
    ];
    for (json, key) in &cases {
        let all = messages(&[json.as_str()]);
        assert!(
            all.iter().any(|m| m.contains(key)),
            "{json}: expected an error naming {key}, got {all:?}"
        );
    }
    // The same adapters without the misplaced key are accepted.
    parse(&[&format!(r#"{{{posix_dynamic},"shared":true,"backend_params":{{"file_path":"/x","max_capacity_gb":"1"}}}}"#)]).unwrap();
}

/// Watermark eviction on a dynamic object store with no capacity is refused: usage is unknown,
/// and IsolatedLRU would evict everything every pass.
#[test]
fn eviction_without_a_capacity_is_refused_for_objects() {
    for policy in ["LRU", "IsolatedLRU"] {
        let json = format!(
            r#"{{"type":"nixl_store_dynamic","backend":"OBJ","backend_params":{{"bucket":"b"}},"eviction":{{"eviction_policy":"{policy}"}}}}"#
        );
        let all = messages(&[json.as_str()]);
        assert!(
            all.iter()
                .any(|m| m.contains("eviction") && m.contains("max_capacity_gb")),
            "{policy}: {all:?}"
        );
    }
    parse(&[r#"{"type":"nixl_store_dynamic","backend":"OBJ","backend_params":{"bucket":"b"},"eviction":{"eviction_policy":"noop"}}"#]).unwrap();
}

/// `layout` picks segments (the default over POSIX, GDS, GDS_MT) or per-key files (the default
/// over HF3FS and with `shard_dirs`) for a dynamic store over files, with `segment_size_mb`;
/// anywhere else, or with a value it does not know, it is refused by name.
#[test]
fn layout_and_segment_size_apply_to_dynamic_files() {
    let dynamic = |params: &str| {
        format!(
            r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"/x","max_capacity_gb":"1"{params}}}}}"#
        )
    };
    let spec = |json: &str| parse(&[json]).unwrap().value.remove(0).storage.unwrap();
    assert_eq!(spec(&dynamic("")).layout, kv_config::Layout::Segments);
    assert_eq!(
        spec(&dynamic(r#","layout":"files""#)).layout,
        kv_config::Layout::Files
    );
    assert_eq!(
        spec(&dynamic(r#","shard_dirs":"true""#)).layout,
        kv_config::Layout::Files,
        "shard_dirs are folders of the files layout"
    );
    let hf3fs = r#"{"type":"nixl_store_dynamic","backend":"HF3FS","backend_params":{"file_path":"/x","max_capacity_gb":"1"}}"#;
    assert_eq!(spec(hf3fs).layout, kv_config::Layout::Files);
    let shared = r#"{"type":"nixl_store_dynamic","backend":"POSIX","shared":true,"backend_params":{"file_path":"/x","max_capacity_gb":"1"}}"#;
    assert_eq!(
        spec(shared).layout,
        kv_config::Layout::Files,
        "shared folders have several writers"
    );
    assert!(!spec(&dynamic("")).layout_given);
    assert!(spec(&dynamic(r#","layout":"segments""#)).layout_given);
    let segments = spec(&dynamic(r#","layout":"segments","segment_size_mb":"64""#));
    assert_eq!(segments.layout, kv_config::Layout::Segments);
    assert_eq!(segments.segment_bytes, Some(64 << 20));
    assert!(
        !segments.backend_params.expose().contains_key("layout"),
        "layout is ours, not the plugin's"
    );
    for (json, key) in [
        (dynamic(r#","layout":"blocks""#), "backend_params.layout"),
        (
            dynamic(r#","layout":"files","segment_size_mb":"64""#),
            "backend_params.segment_size_mb",
        ),
        (dynamic(r#","layout":"segments","shard_dirs":"true""#), "backend_params.shard_dirs"),
        (
            r#"{"type":"nixl_store","backend":"POSIX","pool_size":2,"backend_params":{"file_path":"/x","use_direct_io":"false","layout":"segments"}}"#.to_owned(),
            "backend_params.layout",
        ),
        (
            r#"{"type":"nixl_store_dynamic","backend":"HF3FS","backend_params":{"file_path":"/x","max_capacity_gb":"1","layout":"segments"}}"#.to_owned(),
            "backend_params.layout",
        ),
        (
            r#"{"type":"nixl_store_dynamic","backend":"POSIX","shared":true,"backend_params":{"file_path":"/x","max_capacity_gb":"1","layout":"segments"}}"#.to_owned(),
            "backend_params.layout",
        ),
    ] {
        let all = messages(&[json.as_str()]);
        assert!(all.iter().any(|m| m.contains(key)), "{json}: {all:?}");
    }
}
