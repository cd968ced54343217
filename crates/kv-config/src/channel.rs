//! The transfer channel between instances (disaggregated prefill and P2P sharing): LMCache's
//! `enable_pd`, `pd_*` keys (the deprecated `nixl_peer_*` names are applied with a warning by the
//! loader), `nixl_receiver_port` and `transfer_channel`.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::engine::{EngineConfig, Loaded};
use crate::error::{Error, Result, Warnings};

/// Which side of the channel this instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PdRole {
    /// Prefill: sends KV.
    Sender,
    /// Decode: receives KV.
    Receiver,
}

/// The channel implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// NIXL over UCX.
    Nixl,
    /// In process, for tests.
    MockMemory,
}

/// A validated channel configuration. `Debug` and `Serialize` print its secret as
/// `<redacted>`; only [`ChannelSpec::secret`] gives it, for the channel.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ChannelSpec {
    /// `nixl` or `mock_memory`.
    pub kind: ChannelKind,
    /// Sender or receiver.
    pub role: PdRole,
    /// The receiver's host.
    pub peer_host: String,
    /// The receiver's side-channel port (the first `pd_peer_init_port`, or
    /// `nixl_receiver_port`).
    pub port: u16,
    /// Ports for allocation requests, when configured apart.
    pub alloc_ports: Vec<u16>,
    /// Every side-channel port, one per worker (`pd_peer_init_port` as a list); see
    /// [`ChannelSpec::port_for`].
    pub init_ports: Vec<u16>,
    /// NIXL backends for the channel (`nixl_backends`), empty when not set.
    pub backends: Vec<String>,
    /// The PD proxy to notify (`pd_proxy_host`, `pd_proxy_port`), when configured.
    pub proxy: Option<(String, u16)>,
    /// Bytes of the transfer buffer.
    pub buffer_bytes: u64,
    /// Device of the transfer buffer.
    pub buffer_device: String,
    /// The shared secret both ends of the channel prove they hold (`pd_secret`).
    #[serde(serialize_with = "redacted")]
    secret: Option<String>,
}

fn redacted<S: Serializer>(secret: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    secret.as_ref().map(|_| REDACTED).serialize(serializer)
}

const REDACTED: &str = "<redacted>";

impl fmt::Debug for ChannelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelSpec")
            .field("kind", &self.kind)
            .field("role", &self.role)
            .field("peer_host", &self.peer_host)
            .field("port", &self.port)
            .field("alloc_ports", &self.alloc_ports)
            .field("init_ports", &self.init_ports)
            .field("backends", &self.backends)
            .field("proxy", &self.proxy)
            .field("buffer_bytes", &self.buffer_bytes)
            .field("buffer_device", &self.buffer_device)
            .field("secret", &self.secret.as_ref().map(|_| REDACTED))
            .finish()
    }
}

impl ChannelSpec {
    /// The side-channel port of worker `worker_id` (the global rank): LMCache gives worker
    /// *i* `pd_peer_init_port[i]`, so two workers never share one. `None` when the list has no
    /// port for that worker.
    pub fn port_for(&self, worker_id: u32) -> Option<u16> {
        self.init_ports.get(worker_id as usize).copied()
    }

    /// Sets the channel secret; an empty one is none.
    pub fn with_secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into()).filter(|secret| !secret.is_empty());
        self
    }

    /// The channel secret, for handing to the channel: never for printing.
    pub fn secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> Error {
    Error::Channel {
        key,
        message: message.into(),
    }
}

impl EngineConfig {
    /// Validates the channel keys (every problem at once) and normalises them.
    pub fn channel_spec(&self) -> Result<Loaded<ChannelSpec>> {
        let mut errors = Vec::new();
        let warnings = Warnings::default();
        if !self.enable_pd {
            errors.push(invalid(
                "enable_pd",
                "the transfer channel needs enable_pd: true",
            ));
        }
        if self.enable_p2p {
            errors.push(invalid(
                "enable_p2p",
                "enable_pd requires enable_p2p: false",
            ));
        }
        let role = match self.pd_role.as_deref() {
            Some("sender") | Some("prefiller") => Some(PdRole::Sender),
            Some("receiver") | Some("decoder") => Some(PdRole::Receiver),
            Some(other) => {
                errors.push(invalid(
                    "pd_role",
                    format!("{other:?} is not sender or receiver"),
                ));
                None
            }
            None => {
                errors.push(invalid(
                    "pd_role",
                    "required: sender (prefill) or receiver (decode)",
                ));
                None
            }
        };
        let kind = match self.transfer_channel.as_deref() {
            None | Some("nixl") => Some(ChannelKind::Nixl),
            Some("mock_memory") => Some(ChannelKind::MockMemory),
            Some(other) => {
                errors.push(invalid(
                    "transfer_channel",
                    format!("{other:?} is not nixl or mock_memory"),
                ));
                None
            }
        };
        let buffer_bytes = match self.pd_buffer_size {
            Some(n) if n > 0 => n,
            _ => {
                errors.push(invalid(
                    "pd_buffer_size",
                    "required: the transfer buffer in bytes (> 0)",
                ));
                0
            }
        };
        let buffer_device = self.pd_buffer_device.clone().unwrap_or_else(|| {
            errors.push(invalid("pd_buffer_device", "required: cpu or cuda"));
            String::new()
        });
        let peer_host = self.pd_peer_host.clone().unwrap_or_else(|| {
            if role == Some(PdRole::Sender) {
                errors.push(invalid(
                    "pd_peer_host",
                    "required for the sender: the receiver's host",
                ));
            }
            "0.0.0.0".to_owned()
        });
        let port = self
            .pd_peer_init_port
            .as_ref()
            .and_then(|ports| ports.first().copied())
            .or(self.nixl_receiver_port)
            .unwrap_or_else(|| {
                errors.push(invalid(
                    "pd_peer_init_port",
                    "required: the receiver's side-channel port (or nixl_receiver_port)",
                ));
                0
            });
        Error::from_list(errors)?;
        let (Some(role), Some(kind)) = (role, kind) else {
            return Err(invalid("pd_role", "required"));
        };
        Ok(Loaded {
            value: ChannelSpec {
                kind,
                role,
                peer_host,
                port,
                alloc_ports: self.pd_peer_alloc_port.clone().unwrap_or_default(),
                init_ports: self
                    .pd_peer_init_port
                    .clone()
                    .filter(|ports| !ports.is_empty())
                    .unwrap_or_else(|| vec![port]),
                backends: self.nixl_backends.clone().unwrap_or_default(),
                proxy: match (&self.pd_proxy_host, self.pd_proxy_port) {
                    (None, None) => None,
                    (host, port) => {
                        Some((host.clone().unwrap_or_default(), port.unwrap_or_default()))
                    }
                },
                buffer_bytes,
                buffer_device,
                secret: self
                    .pd_secret
                    .as_ref()
                    .map(|secret| secret.expose().to_owned())
                    .filter(|secret| !secret.is_empty()),
            },
            warnings: warnings.0,
        })
    }
}
