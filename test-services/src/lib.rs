//! Test servers on 127.0.0.1, started and stopped by the tests (and the benchmark) themselves:
//! moto's S3 server and Azurite's blob service, as installed by `cargo xtask setup` under
//! `target/test-services/`.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Azurite's well-known development account (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development key (public, documented by Microsoft).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn services_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-services")
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// One HTTP/1.1 request without a body; returns the status code.
pub fn http_status(host: &str, method: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {response:?}")))
}

fn wait_until_up(host: &str, child: &mut Child, what: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start with {status}");
        }
        if TcpStream::connect(host).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {host} within 30 s");
}

static BUCKETS: AtomicU32 = AtomicU32::new(0);

fn fresh_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        BUCKETS.fetch_add(1, Ordering::Relaxed)
    )
}

/// An S3 endpoint with a fresh bucket: moto's server started for the test, or the endpoint in
/// `KV_TEST_S3_ENDPOINT` (a real MinIO or Ceph, credentials from `KV_TEST_S3_ACCESS_KEY` /
/// `KV_TEST_S3_SECRET_KEY`, bucket from `KV_TEST_S3_BUCKET`).
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket of this test.
    pub bucket: String,
    /// Access key.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
}

impl S3Server {
    /// Like [`start`](S3Server::start), but an error instead of a panic when moto is missing.
    pub fn try_start() -> Result<Self, String> {
        if std::env::var("KV_TEST_S3_ENDPOINT").is_err()
            && !services_dir().join("venv/bin/moto_server").exists()
        {
            return Err("moto's S3 server is not installed: run `cargo xtask setup`".to_owned());
        }
        std::panic::catch_unwind(Self::start)
            .map_err(|_| "moto's S3 server did not start".to_owned())
    }

    /// Starts moto (or uses `KV_TEST_S3_ENDPOINT`) and creates a fresh bucket.
    pub fn start() -> Self {
        if let Ok(endpoint) = std::env::var("KV_TEST_S3_ENDPOINT") {
            return Self {
                child: None,
                port: 0,
                endpoint,
                bucket: std::env::var("KV_TEST_S3_BUCKET").expect("KV_TEST_S3_BUCKET"),
                access_key: std::env::var("KV_TEST_S3_ACCESS_KEY").unwrap_or_default(),
                secret_key: std::env::var("KV_TEST_S3_SECRET_KEY").unwrap_or_default(),
            };
        }
        let moto = services_dir().join("venv/bin/moto_server");
        assert!(
            moto.exists(),
            "moto's S3 server is not installed at {}: run `cargo xtask setup`",
            moto.display()
        );
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let child = Self::spawn_moto(port);
        let bucket = fresh_name("kv");
        let status = http_status(&host, "PUT", &format!("/{bucket}")).expect("creating the bucket");
        assert_eq!(status, 200, "moto refused to create bucket {bucket}");
        Self {
            child: Some(child),
            port,
            endpoint: format!("http://{host}"),
            bucket,
            access_key: "testing".to_owned(),
            secret_key: "testing".to_owned(),
        }
    }

    fn spawn_moto(port: u16) -> Child {
        let moto = services_dir().join("venv/bin/moto_server");
        let host = format!("127.0.0.1:{port}");
        let mut child = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        wait_until_up(&host, &mut child, "moto_server");
        child
    }

    /// Restarts the server on the same port: moto keeps everything in memory, so the bucket
    /// and its objects are gone, as after a crash of a storage node.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(Self::spawn_moto(self.port));
    }

    /// Creates the bucket again (after a restart).
    pub fn create_bucket(&self) -> u16 {
        let host = self.endpoint.trim_start_matches("http://");
        http_status(host, "PUT", &format!("/{}", self.bucket)).expect("creating the bucket")
    }

    /// NIXL's OBJ plugin configured for this endpoint and bucket.
    pub fn nixl_config(&self) -> nixl_core::NixlConfig {
        nixl_core::NixlConfig::new("OBJ")
            .with_param("endpoint_override", &self.endpoint)
            .with_param("scheme", "http")
            .with_param("bucket", &self.bucket)
            .with_param("access_key", &self.access_key)
            .with_param("secret_key", &self.secret_key)
            .with_param("region", "us-east-1")
    }

    /// Stops the server (to test an endpoint that went away).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Azurite's blob service with a fresh container.
#[derive(Debug)]
pub struct AzuriteServer {
    child: Option<Child>,
    _data: tempfile::TempDir,
    /// `http://127.0.0.1:PORT/devstoreaccount1`.
    pub blob_endpoint: String,
    /// The container of this test.
    pub container: String,
}

impl AzuriteServer {
    /// Starts Azurite (in memory, telemetry off) and creates a fresh container.
    pub fn start() -> Self {
        let azurite = services_dir().join("azurite/node_modules/.bin/azurite-blob");
        assert!(
            azurite.exists(),
            "Azurite is not installed at {}: run `cargo xtask setup`",
            azurite.display()
        );
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(&azurite)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args([
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--loose",
            ])
            .current_dir(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting azurite-blob");
        wait_until_up(&host, &mut child, "azurite-blob");
        let blob_endpoint = format!("http://{host}/{AZURITE_ACCOUNT}");
        let container = fresh_name("kv");
        let python = services_dir().join("venv/bin/python");
        let created = Command::new(&python)
            .args([
                "-c",
                "import sys; from azure.storage.blob import BlobServiceClient as C; \
                 C.from_connection_string(sys.argv[1]).create_container(sys.argv[2])",
            ])
            .arg(Self::connection_string_for(&blob_endpoint))
            .arg(&container)
            .output()
            .expect("running the container-creation script");
        assert!(
            created.status.success(),
            "creating container {container}: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        Self {
            child: Some(child),
            _data: data,
            blob_endpoint,
            container,
        }
    }

    fn connection_string_for(blob_endpoint: &str) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={blob_endpoint};"
        )
    }

    /// The connection string NIXL's AZURE_BLOB plugin needs.
    pub fn connection_string(&self) -> String {
        Self::connection_string_for(&self.blob_endpoint)
    }

    /// NIXL's AZURE_BLOB plugin configured for this container.
    pub fn nixl_config(&self) -> nixl_core::NixlConfig {
        nixl_core::NixlConfig::new("AZURE_BLOB")
            .with_param("connection_string", self.connection_string())
            .with_param("container_name", &self.container)
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
