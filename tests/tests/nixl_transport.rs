//! What only the NIXL transport has: plugins, and a clear refusal of unknown ones.

use nixl_core::{Error, NixlConfig, NixlTransport};

#[test]
fn plugin_listing_includes_posix_with_dram_and_file() {
    let plugins = nixl_core::plugins().unwrap_or_else(|err| panic!("{err}"));
    let posix = plugins
        .iter()
        .find(|p| p.name == "POSIX")
        .expect("POSIX plugin");
    assert!(posix.memory_types.iter().any(|m| m == "DRAM"), "{posix:?}");
    assert!(posix.memory_types.iter().any(|m| m == "FILE"), "{posix:?}");
    assert!(plugins.iter().any(|p| p.name == "OBJ"));
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
