//! Storage backends, buffer devices and which go together.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A NIXL storage plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "&'static str")]
#[non_exhaustive]
pub enum Backend {
    /// NVIDIA GPUDirect Storage.
    Gds,
    /// GPUDirect Storage, multi-threaded.
    GdsMt,
    /// POSIX file I/O (io_uring, libaio or POSIX AIO).
    Posix,
    /// DeepSeek 3FS through its USRBIO interface.
    Hf3fs,
    /// S3-compatible object stores.
    Obj,
    /// Azure Blob Storage.
    AzureBlob,
    /// NVIDIA DOCA Memos (128-bit hex object names).
    DocaMemos,
}

/// Whether a backend stores files or objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Files under a folder (NIXL memory type FILE).
    File,
    /// Objects in a bucket or container (NIXL memory type OBJ).
    Object,
}

impl Backend {
    /// Every backend, in the reference's order.
    pub const ALL: [Backend; 7] = [
        Backend::Gds,
        Backend::GdsMt,
        Backend::Posix,
        Backend::Hf3fs,
        Backend::Obj,
        Backend::AzureBlob,
        Backend::DocaMemos,
    ];

    /// The NIXL plugin name.
    pub fn plugin_name(self) -> &'static str {
        match self {
            Backend::Gds => "GDS",
            Backend::GdsMt => "GDS_MT",
            Backend::Posix => "POSIX",
            Backend::Hf3fs => "HF3FS",
            Backend::Obj => "OBJ",
            Backend::AzureBlob => "AZURE_BLOB",
            Backend::DocaMemos => "DOCA_MEMOS",
        }
    }

    /// Files or objects.
    pub fn kind(self) -> StorageKind {
        match self {
            Backend::Gds | Backend::GdsMt | Backend::Posix | Backend::Hf3fs => StorageKind::File,
            Backend::Obj | Backend::AzureBlob | Backend::DocaMemos => StorageKind::Object,
        }
    }

    /// Whether the backend can move data straight from GPU memory (the backend × device matrix).
    pub fn supports_cuda(self) -> bool {
        matches!(self, Backend::Gds | Backend::GdsMt | Backend::Obj)
    }

    /// The devices allowed, in words, for error messages.
    pub(crate) fn allowed_devices(self) -> &'static str {
        if self.supports_cuda() {
            "cpu, cuda"
        } else {
            "cpu"
        }
    }

    /// Whether `device` is allowed with this backend.
    pub fn supports_device(self, device: Device) -> bool {
        match device {
            Device::Cpu => true,
            Device::Cuda(_) => self.supports_cuda(),
        }
    }

    pub(crate) fn list(backends: &[Backend]) -> String {
        backends
            .iter()
            .map(|b| b.plugin_name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plugin_name())
    }
}

impl From<Backend> for &'static str {
    fn from(backend: Backend) -> Self {
        backend.plugin_name()
    }
}

impl FromStr for Backend {
    type Err = ();

    /// Plugin names as NIXL spells them; `3FS` (SGLang's spelling) is accepted for HF3FS.
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "3FS" => Ok(Backend::Hf3fs),
            _ => Backend::ALL
                .into_iter()
                .find(|b| b.plugin_name() == s)
                .ok_or(()),
        }
    }
}

/// Where NIXL's staging buffer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory: the shared pinned page pool.
    Cpu,
    /// GPU memory on the given device.
    Cuda(u32),
}

impl Device {
    /// Parses `cpu`, `cuda` (the worker's own GPU, as `cuda:<worker_id>`) or `cuda:N`.
    pub fn parse(value: &str, worker_id: u32) -> Option<Device> {
        match value.trim() {
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda(worker_id)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda),
        }
    }

    /// Whether this is host memory.
    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_matches_the_reference() {
        let cuda = Device::Cuda(0);
        assert!(Backend::DocaMemos.supports_device(Device::Cpu));
        assert!(!Backend::DocaMemos.supports_device(cuda));
        assert!(!Backend::Posix.supports_device(cuda));
        assert!(!Backend::Hf3fs.supports_device(cuda));
        assert!(!Backend::AzureBlob.supports_device(cuda));
        for backend in [Backend::Gds, Backend::GdsMt, Backend::Obj] {
            assert!(backend.supports_device(cuda));
            assert!(backend.supports_device(Device::Cpu));
        }
        assert!("INVALID".parse::<Backend>().is_err());
    }

    #[test]
    fn devices_parse_with_the_worker_id() {
        assert_eq!(Device::parse("cpu", 3), Some(Device::Cpu));
        assert_eq!(Device::parse("cuda", 3), Some(Device::Cuda(3)));
        assert_eq!(Device::parse("cuda:1", 3), Some(Device::Cuda(1)));
        assert_eq!(Device::parse("cuda:", 3), None);
        assert_eq!(Device::parse("gpu", 3), None);
    }

    #[test]
    fn plugin_names_round_trip_and_3fs_is_hf3fs() {
        for backend in Backend::ALL {
            assert_eq!(backend.plugin_name().parse::<Backend>(), Ok(backend));
        }
        assert_eq!("3FS".parse::<Backend>(), Ok(Backend::Hf3fs));
    }
}
