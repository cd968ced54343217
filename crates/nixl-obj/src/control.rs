//! Deleting and listing objects. NIXL's object plugins move data but can neither delete nor
//! list, so these go through the `object_store` crate, built from the same backend parameters
//! the plugin takes; the data path stays NIXL's.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use nixl_core::header::{self, HEADER_BYTES};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore as _, ObjectStoreExt as _, RetryConfig};

use crate::error::{Error, Result};

/// How long one control call (a delete, an existence query) may take in all.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long listing a bucket and reading every object's header may take: a large bucket holds
/// millions of objects (each request is still bounded by the client's own timeout).
pub const LIST_TIMEOUT: Duration = Duration::from_secs(3600);
/// Requests in flight at once for existence queries and for the header reads of a listing.
const HEADER_READS_IN_FLIGHT: usize = 32;

/// One chunk object found in a bucket or container, read from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListedObject {
    /// The object id (its name is the decimal form).
    pub id: u64,
    /// The canonical key its header carries.
    pub key: Vec<u8>,
    /// Payload bytes its header announces.
    pub payload_len: u64,
    /// When the store last wrote it.
    pub written: SystemTime,
}

/// Deletes and lists the chunk objects of one bucket (OBJ) or container (AZURE_BLOB).
pub struct ObjectControl {
    store: Arc<dyn object_store::ObjectStore>,
    /// Where requests run: the crate's clients are asynchronous, our callers are not.
    runtime: Option<tokio::runtime::Runtime>,
    /// `s3://bucket` or `azure://container`, for errors and logs.
    target: String,
}

impl fmt::Debug for ObjectControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectControl")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectControl {
    fn drop(&mut self) {
        // Never wait for a request still running against a store that stopped answering.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn client_options(allow_http: bool, ca_bundle: Option<&str>) -> Result<ClientOptions> {
    let mut options = ClientOptions::new()
        .with_allow_http(allow_http)
        .with_timeout(CONTROL_TIMEOUT / 3)
        .with_connect_timeout(Duration::from_secs(5));
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Config(format!("ca_bundle {path}: cannot be read: {e}")))?;
        for certificate in object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::Config(format!("ca_bundle {path}: {e}")))?
        {
            options = options.with_root_certificate(certificate);
        }
    }
    Ok(options)
}

/// The object names of `ids` (their decimal form, as NIXL names them).
fn paths(ids: &[u64]) -> Vec<Path> {
    ids.iter().map(|id| Path::from(id.to_string())).collect()
}

fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 2,
        retry_timeout: CONTROL_TIMEOUT / 2,
        ..RetryConfig::default()
    }
}

/// The fields of an Azure connection string (`Key=value;…`), by key.
fn connection_fields(connection: &str) -> BTreeMap<&str, &str> {
    connection
        .split(';')
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

impl ObjectControl {
    /// A client for the bucket NIXL's OBJ plugin is given by `params` (its keys: `bucket`,
    /// `endpoint_override`, `scheme`, `region`, `access_key`, `secret_key`, `session_token`,
    /// `use_virtual_addressing`, `ca_bundle`), with the plugin's environment fallbacks
    /// (`AWS_DEFAULT_BUCKET`, `AWS_ENDPOINT_OVERRIDE`, the `AWS_*` credentials).
    pub fn s3(params: &BTreeMap<String, String>) -> Result<Self> {
        let param = |key: &str| {
            params
                .get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let bucket = param("bucket")
            .map(str::to_owned)
            .or_else(|| env("AWS_DEFAULT_BUCKET"))
            .ok_or_else(|| {
                Error::Config("OBJ needs a bucket (bucket, or AWS_DEFAULT_BUCKET)".to_owned())
            })?;
        let scheme = param("scheme").unwrap_or("https");
        let endpoint = param("endpoint_override")
            .map(str::to_owned)
            .or_else(|| env("AWS_ENDPOINT_OVERRIDE"))
            .map(|endpoint| {
                if endpoint.contains("://") {
                    endpoint
                } else {
                    format!("{scheme}://{endpoint}")
                }
            });
        let allow_http = scheme == "http"
            || endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"));
        // The plugin's SDK takes the region from its default chain when none is given.
        let region = param("region")
            .map(str::to_owned)
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(region)
            .with_virtual_hosted_style_request(param("use_virtual_addressing") == Some("true"))
            .with_client_options(client_options(allow_http, param("ca_bundle"))?)
            .with_retry(retry());
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(access_key) = param("access_key") {
            builder = builder.with_access_key_id(access_key);
        }
        if let Some(secret_key) = param("secret_key") {
            builder = builder.with_secret_access_key(secret_key);
        }
        if let Some(token) = param("session_token") {
            builder = builder.with_token(token);
        }
        let target = format!("s3://{bucket}");
        let store = builder.build().map_err(|source| Error::Control {
            target: target.clone(),
            source: Box::new(source),
        })?;
        Self::with_store(Arc::new(store), target)
    }

    /// A client for the container NIXL's AZURE_BLOB plugin is given by `params`:
    /// `container_name` with `connection_string` (account, key and blob endpoint, as Azurite
    /// takes them) or `account_url` (credentials from the `AZURE_*` environment), and
    /// `ca_bundle`; the plugin's `AZURE_STORAGE_CONNECTION_STRING` and
    /// `AZURE_STORAGE_CONTAINER_NAME` fallbacks.
    pub fn azure(params: &BTreeMap<String, String>) -> Result<Self> {
        let param = |key: &str| {
            params
                .get(key)
                .cloned()
                .filter(|v| !v.is_empty())
                .or_else(|| {
                    let env = format!("AZURE_STORAGE_{}", key.to_ascii_uppercase());
                    std::env::var(env).ok().filter(|v| !v.is_empty())
                })
        };
        let container = param("container_name").ok_or_else(|| {
            Error::Config(
                "AZURE_BLOB needs a container (container_name, or AZURE_STORAGE_CONTAINER_NAME)"
                    .to_owned(),
            )
        })?;
        let ca_bundle = param("ca_bundle");
        let mut builder = MicrosoftAzureBuilder::from_env()
            .with_container_name(&container)
            .with_retry(retry());
        let mut allow_http = false;
        if let Some(connection) = param("connection_string") {
            let fields = connection_fields(&connection);
            let field = |name: &str| {
                fields.get(name).copied().ok_or_else(|| {
                    Error::Config(format!("AZURE_BLOB connection_string has no {name}"))
                })
            };
            builder = builder
                .with_account(field("AccountName")?)
                .with_access_key(field("AccountKey")?);
            if let Some(endpoint) = fields.get("BlobEndpoint") {
                allow_http = endpoint.starts_with("http://");
                builder = builder.with_endpoint((*endpoint).to_owned());
            }
        } else if let Some(url) = param("account_url") {
            // `https://ACCOUNT.blob.core.windows.net`: the account comes from the host.
            allow_http = url.starts_with("http://");
            builder = builder.with_url(url);
        }
        let builder =
            builder.with_client_options(client_options(allow_http, ca_bundle.as_deref())?);
        let target = format!("azure://{container}");
        let store = builder.build().map_err(|source| Error::Control {
            target: target.clone(),
            source: Box::new(source),
        })?;
        Self::with_store(Arc::new(store), target)
    }

    fn with_store(store: Arc<dyn object_store::ObjectStore>, target: String) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kv-object-control")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("{target}: control runtime: {e}")))?;
        Ok(Self {
            store,
            runtime: Some(runtime),
            target,
        })
    }

    /// `s3://bucket` or `azure://container`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs `work` on the control runtime and waits for it, at most `bound`. Safe
    /// from any thread, an asynchronous caller's included (it waits on a channel, not on a
    /// runtime of its own).
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        bound: Duration,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let Some(runtime) = &self.runtime else {
            return Err(Error::Config(format!("{}: control closed", self.target)));
        };
        let (done, result) = mpsc::sync_channel(1);
        let task = runtime.spawn(async move {
            let _ = done.send(work.await);
        });
        match result.recv_timeout(bound) {
            Ok(result) => result,
            Err(_) => {
                task.abort();
                Err(Error::ControlTimeout {
                    target: self.target.clone(),
                    what: what.to_owned(),
                    after: bound,
                })
            }
        }
    }

    /// Deletes the objects of `ids` in one request where the store takes bulk deletes. A name
    /// that was already gone counts as deleted.
    pub fn delete(&self, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        let target = self.target.clone();
        let paths = paths(ids);
        self.run("delete", CONTROL_TIMEOUT, async move {
            let locations = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
            let mut deleted = store.delete_stream(locations);
            while let Some(outcome) = deleted.next().await {
                match outcome {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(source) => {
                        return Err(Error::Control {
                            target,
                            source: Box::new(source),
                        });
                    }
                }
            }
            Ok(())
        })
    }

    /// Which of `ids` name an object: HEAD requests, many in flight at once (NIXL's query
    /// asks one after another).
    pub fn exists(&self, ids: &[u64]) -> Result<Vec<bool>> {
        let store = Arc::clone(&self.store);
        let target = self.target.clone();
        let paths = paths(ids);
        self.run("exists", CONTROL_TIMEOUT, async move {
            let answers = futures::stream::iter(paths.into_iter().map(|path| {
                let store = Arc::clone(&store);
                async move { store.head(&path).await }
            }))
            .buffered(HEADER_READS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await;
            answers
                .into_iter()
                .map(|answer| match answer {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(source) => Err(Error::Control {
                        target: target.clone(),
                        source: Box::new(source),
                    }),
                })
                .collect()
        })
    }

    /// Every chunk object in the bucket, oldest first: objects named by a decimal id whose
    /// header checks out. Others (foreign names, torn or foreign headers) are skipped with a
    /// warning naming them.
    pub fn list(&self) -> Result<Vec<ListedObject>> {
        let store = Arc::clone(&self.store);
        let target = self.target.clone();
        self.run("list", LIST_TIMEOUT, async move {
            let mut metas = store.list(None);
            let mut found = Vec::new();
            let mut foreign = 0usize;
            while let Some(meta) = metas.next().await {
                let meta = meta.map_err(|source| Error::Control {
                    target: target.clone(),
                    source: Box::new(source),
                })?;
                match meta.location.as_ref().parse::<u64>() {
                    Ok(id) if id.to_string() == meta.location.as_ref() => {
                        found.push((id, meta));
                        if found.len() % 100_000 == 0 {
                            tracing::info!(objects = found.len(), target = %target, "listing the bucket");
                        }
                    }
                    _ => {
                        if foreign == 0 {
                            tracing::warn!(
                                object = %meta.location,
                                target = %target,
                                "not a chunk object (not named by an id); skipped, as are any \
                                 others (counted once the listing ends)"
                            );
                        }
                        foreign += 1;
                    }
                }
            }
            if foreign > 0 {
                tracing::warn!(objects = foreign, target = %target, "objects not named by an id skipped");
            }
            let heads = futures::stream::iter(found.into_iter().map(|(id, meta)| {
                let store = Arc::clone(&store);
                async move {
                    let head = if meta.size >= HEADER_BYTES as u64 {
                        store
                            .get_range(&meta.location, 0..HEADER_BYTES as u64)
                            .await
                            .map(Some)
                    } else {
                        Ok(None)
                    };
                    (id, meta, head)
                }
            }))
            .buffer_unordered(HEADER_READS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await;
            let mut chunks = Vec::with_capacity(heads.len());
            let mut unreadable = 0usize;
            for (id, meta, head) in heads {
                let head = match head {
                    Ok(head) => head,
                    // Deleted between the listing and the read: not there any more.
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(source) => {
                        return Err(Error::Control {
                            target,
                            source: Box::new(source),
                        });
                    }
                };
                let parsed = head
                    .as_deref()
                    .map(header::parse)
                    .transpose()
                    .ok()
                    .flatten()
                    .filter(|(key, len, _)| {
                        crate::naming::object_id(key) == id
                            && HEADER_BYTES as u64 + len == meta.size
                    });
                match parsed {
                    Some((key, payload_len, _)) => chunks.push(ListedObject {
                        id,
                        key: key.to_vec(),
                        payload_len,
                        written: meta.last_modified.into(),
                    }),
                    None => {
                        if unreadable == 0 {
                            tracing::warn!(
                                object = id,
                                target = %target,
                                bytes = meta.size,
                                "object without a chunk header for its name; skipped, as are \
                                 any others (counted once the listing ends)"
                            );
                        }
                        unreadable += 1;
                    }
                }
            }
            if unreadable > 0 {
                tracing::warn!(objects = unreadable, target = %target, "objects without a chunk header skipped");
            }
            chunks.sort_by_key(|chunk| (chunk.written, chunk.id));
            Ok(chunks)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_split_on_the_first_equals() {
        let fields = connection_fields(
            "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=a2V5==;BlobEndpoint=http://127.0.0.1:1/dev;",
        );
        assert_eq!(fields["AccountKey"], "a2V5==");
        assert_eq!(fields["BlobEndpoint"], "http://127.0.0.1:1/dev");
        assert_eq!(fields.len(), 4);
    }

    #[test]
    fn a_bucket_is_required() {
        let err = ObjectControl::s3(&BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("bucket"), "{err}");
    }
}
