//! The channel secret travels in the channel spec and never prints.

use kv_config::{ConfigLoader, Loaded};

const SECRET: &str = "pd-secret-never-printed-7c41";

fn receiver_spec() -> kv_config::ChannelSpec {
    let yaml = "enable_pd: true\npd_role: receiver\npd_peer_host: 0.0.0.0\npd_peer_init_port: [7300]\npd_buffer_size: 4096\npd_buffer_device: cpu\n";
    let Loaded { value, .. } = ConfigLoader::new()
        .with_yaml("pd.yaml", yaml)
        .load()
        .unwrap();
    value.channel_spec().unwrap().value
}

#[test]
fn the_channel_secret_is_redacted_wherever_the_spec_is_printed() {
    let spec = receiver_spec().with_secret(SECRET);
    assert_eq!(spec.secret(), Some(SECRET));
    let printed = [format!("{spec:?}"), serde_json::to_string(&spec).unwrap()];
    for text in printed {
        assert!(!text.contains(SECRET), "the secret leaked in {text}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(
            text.contains("0.0.0.0"),
            "other settings stay visible: {text}"
        );
    }
}

#[test]
fn an_empty_secret_is_none() {
    assert_eq!(receiver_spec().secret(), None);
    assert_eq!(receiver_spec().with_secret("").secret(), None);
}

/// `pd_secret` from the YAML, or from `LMCACHE_PD_SECRET`, reaches the channel spec, and the
/// loaded configuration never prints it.
#[test]
fn pd_secret_from_the_yaml_or_the_environment_reaches_the_spec_unprinted() {
    let yaml = format!(
        "enable_pd: true\npd_role: receiver\npd_peer_host: 0.0.0.0\npd_peer_init_port: [7300]\npd_buffer_size: 4096\npd_buffer_device: cpu\npd_secret: {SECRET}\n"
    );
    let from_yaml = ConfigLoader::new()
        .with_yaml("pd.yaml", yaml)
        .load()
        .unwrap()
        .value;
    let from_env = ConfigLoader::new()
        .with_yaml(
            "pd.yaml",
            "enable_pd: true\npd_role: receiver\npd_peer_host: 0.0.0.0\npd_peer_init_port: [7300]\npd_buffer_size: 4096\npd_buffer_device: cpu\n",
        )
        .with_env([("LMCACHE_PD_SECRET", SECRET)])
        .load()
        .unwrap()
        .value;
    for engine in [from_yaml, from_env] {
        assert!(
            !format!("{engine:?}").contains(SECRET),
            "the loaded config printed it"
        );
        let spec = engine.channel_spec().unwrap().value;
        assert_eq!(spec.secret(), Some(SECRET));
    }
}
