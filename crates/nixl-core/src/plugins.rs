//! Which plugins NIXL has and which memory each handles, so that backends fail early with a
//! clear message.

use nixl_sys::Agent;

use crate::error::{Error, Result};
use crate::nixl::NixlConfig;
use crate::runtime::NixlRuntime;

/// One NIXL plugin and the memory types it moves data between.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PluginInfo {
    /// The plugin name (`POSIX`, `OBJ`, …).
    pub name: String,
    /// Memory types, as NIXL names them (`DRAM`, `VRAM`, `FILE`, `OBJ`, …).
    pub memory_types: Vec<String>,
}

/// Lists every plugin NIXL finds with the memory types it supports. A plugin whose parameters
/// cannot be read (a missing GPU or driver library) is listed with no memory types.
pub fn plugins() -> Result<Vec<PluginInfo>> {
    NixlRuntime::load()?;
    let agent =
        Agent::new(&NixlConfig::new("probe").agent_name).map_err(Error::nixl("create agent"))?;
    let names = agent
        .get_available_plugins()
        .map_err(Error::nixl("list plugins"))?;
    let mut plugins = Vec::new();
    for name in names.iter() {
        let name = name.map_err(Error::nixl("list plugins"))?.to_owned();
        let memory_types = match agent.get_plugin_params(&name) {
            Ok((mems, _params)) => mems
                .iter()
                .filter_map(|m| m.ok().map(|m| m.to_string()))
                .collect(),
            Err(err) => {
                tracing::debug!(plugin = %name, error = %err, "plugin parameters unreadable");
                Vec::new()
            }
        };
        plugins.push(PluginInfo { name, memory_types });
    }
    Ok(plugins)
}
