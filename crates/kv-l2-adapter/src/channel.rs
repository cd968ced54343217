//! The PD / P2P transfer channel from its configuration (feature `channel`): a storage-only
//! embedder does not compile it.

use std::sync::Arc;

use kv_config::{ChannelKind, ChannelSpec, Deployment, PdRole};
use nixl_core::{Channel, ChannelConfig, ChannelType, Role};
use pinned_alloc::{PagePool, PoolConfig};

use crate::error::{Error, Result};

/// One end of the transfer channel a [`ChannelSpec`] describes, with the pool of
/// `pd_buffer_size` bytes in chunks of `chunk_bytes` that it sends from or receives into.
pub fn open_channel(
    spec: &ChannelSpec,
    chunk_bytes: usize,
    deployment: &Deployment,
) -> Result<(Box<dyn Channel>, Arc<PagePool>)> {
    if !spec.backends.is_empty() && spec.backends != ["UCX"] {
        return Err(Error::Setting {
            key: "nixl_backends".to_owned(),
            message: format!(
                "{:?}: the channel runs on NIXL's UCX plugin only; use [UCX] or leave it unset",
                spec.backends
            ),
        });
    }
    if let Some((host, port)) = &spec.proxy {
        return Err(Error::Setting {
            key: "pd_proxy_host".to_owned(),
            message: format!(
                "{host}:{port}: this channel notifies no PD proxy; remove pd_proxy_host and \
                 pd_proxy_port"
            ),
        });
    }
    if spec.buffer_device != "cpu" {
        return Err(Error::Setting {
            key: "pd_buffer_device".to_owned(),
            message: format!(
                "{:?}: the channel moves host pages; use pd_buffer_device: cpu",
                spec.buffer_device
            ),
        });
    }
    if !spec.alloc_ports.is_empty() {
        return Err(Error::Setting {
            key: "pd_peer_alloc_port".to_owned(),
            message: "this channel carries allocations on the init port (pd_peer_init_port); \
                      remove pd_peer_alloc_port"
                .to_owned(),
        });
    }
    if chunk_bytes == 0 {
        return Err(Error::Setting {
            key: "chunk_bytes".to_owned(),
            message: "must be positive".to_owned(),
        });
    }
    let port = spec
        .port_for(deployment.worker_id)
        .ok_or_else(|| Error::Setting {
            key: "pd_peer_init_port".to_owned(),
            message: format!(
                "worker {} has no port: the list {:?} gives one port per worker",
                deployment.worker_id, spec.init_ports
            ),
        })?;
    let pool = PoolConfig::new(chunk_bytes, spec.buffer_bytes).build()?;
    let mut config = ChannelConfig::new(
        match spec.kind {
            ChannelKind::Nixl => ChannelType::Nixl,
            ChannelKind::MockMemory => ChannelType::MockMemory,
        },
        match spec.role {
            PdRole::Sender => Role::Sender,
            PdRole::Receiver => Role::Receiver,
        },
        spec.peer_host.clone(),
        port,
    );
    if let Some(secret) = spec.secret() {
        config = config.with_secret(secret);
    }
    let channel = nixl_core::create_channel(config, Arc::clone(&pool))?;
    Ok((channel, pool))
}
