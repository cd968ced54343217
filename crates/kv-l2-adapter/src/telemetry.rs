//! Metrics (through the `metrics` facade: the embedder installs the recorder and exporter) and
//! a `tracing` span per batch, for every tier a [`StoreBuilder`](crate::StoreBuilder) builds.
//! Each metric is documented in this crate's README. Handles are registered once, when the
//! store is built, so with no recorder installed each figure costs one call to a no-op.

use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Label};
use pinned_alloc::Page;

use crate::adapter::{EvictionReport, KeyOutcome, L2Adapter, Status, StoreReport, Usage};
use crate::error::{Error, Result};
use crate::keys::ChunkKey;

/// What every metric of one tier is labelled with: never a key, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Labels {
    /// `nixl_store`, `nixl_store_dynamic`, or a downstream type.
    pub(crate) adapter: String,
    /// `POSIX`, `OBJ`, …
    pub(crate) backend: String,
    /// `segments`, `files`, `objects`, `pool`, or `custom`.
    pub(crate) layout: String,
    /// The tier's place in its store (`0` for the first), so that two tiers alike keep
    /// their own series.
    pub(crate) tier: String,
}

impl Labels {
    /// The labels of a tier built from `spec` for worker `worker_id`.
    pub(crate) fn of_spec(spec: &kv_config::StorageSpec, worker_id: u32) -> Self {
        let (adapter, layout) = match (spec.mode, spec.kind) {
            (kv_config::Mode::Static { .. }, _) => ("nixl_store", "pool"),
            (kv_config::Mode::Dynamic, kv_config::StorageKind::Object) => {
                ("nixl_store_dynamic", "objects")
            }
            (kv_config::Mode::Dynamic, _) => (
                "nixl_store_dynamic",
                match crate::registry::layout_in_use(spec, worker_id) {
                    kv_config::Layout::Segments => "segments",
                    _ => "files",
                },
            ),
        };
        Self {
            adapter: adapter.to_owned(),
            backend: spec.backend.plugin_name().to_owned(),
            layout: layout.to_owned(),
            tier: "0".to_owned(),
        }
    }

    /// The labels of a tier of a downstream type, from what it says of itself.
    pub(crate) fn of_status(status: &Status) -> Self {
        Self {
            adapter: status.adapter_type.clone(),
            backend: status.backend.clone(),
            layout: "custom".to_owned(),
            tier: "0".to_owned(),
        }
    }

    /// The same labels for the tier at `index` of its store.
    pub(crate) fn at_tier(mut self, index: usize) -> Self {
        self.tier = index.to_string();
        self
    }

    fn to_vec(&self) -> Vec<Label> {
        vec![
            Label::new("adapter", self.adapter.clone()),
            Label::new("backend", self.backend.clone()),
            Label::new("layout", self.layout.clone()),
            Label::new("tier", self.tier.clone()),
        ]
    }
}

/// Why a key was not stored, as the `reason` label of `kv_l2_refusals_total`.
fn refusal_reason(error: &Error) -> &'static str {
    match error {
        Error::CapacityExceeded { .. } => "capacity",
        Error::PoolFull { .. } => "pool_full",
        Error::File(nixl_file::Error::DiskFull { .. }) => "disk_full",
        Error::File(nixl_file::Error::NoSpace { .. }) => "no_space",
        Error::KeyBusy { .. } | Error::Busy { .. } => "busy",
        Error::Closed => "closed",
        Error::UnfullChunk { .. } | Error::LengthMismatch { .. } | Error::PageSize { .. } => {
            "invalid"
        }
        Error::PageRetired { .. } => "page_retired",
        Error::Batch { .. } | Error::Transport(_) | Error::Object(_) | Error::File(_) => "transfer",
        _ => "other",
    }
}

const REFUSAL_REASONS: [&str; 10] = [
    "capacity",
    "pool_full",
    "disk_full",
    "no_space",
    "busy",
    "closed",
    "invalid",
    "page_retired",
    "transfer",
    "other",
];

const OPERATIONS: [&str; 5] = ["store", "lookup", "load", "delete", "evict"];

/// Keys asked for, found and not found, by lookups or by loads.
#[derive(Debug)]
struct HitCounters {
    keys: Counter,
    hits: Counter,
    misses: Counter,
}

impl HitCounters {
    /// Counts one call's answers; how many were hits.
    fn count(&self, answers: &[bool]) -> u64 {
        let found = answers.iter().filter(|hit| **hit).count() as u64;
        self.keys.increment(answers.len() as u64);
        self.hits.increment(found);
        self.misses.increment(answers.len() as u64 - found);
        found
    }
}

/// The handles of one tier's metrics.
#[derive(Debug)]
pub(crate) struct TierMetrics {
    stored_keys: Counter,
    queued_keys: Counter,
    present_keys: Counter,
    failed_keys: Counter,
    stored_bytes: Counter,
    refusals: Vec<(&'static str, Counter)>,
    lookups: HitCounters,
    loads: HitCounters,
    loaded_bytes: Counter,
    deleted_keys: Counter,
    evicted_keys: Counter,
    evicted_bytes: Counter,
    used_bytes: Gauge,
    capacity_bytes: Gauge,
    stored_count: Gauge,
    pinned_keys: Gauge,
    inflight_batches: Gauge,
    queued_puts: Gauge,
    batch_seconds: Vec<Histogram>,
}

impl TierMetrics {
    pub(crate) fn new(labels: &Labels) -> Self {
        let base = labels.to_vec();
        let with = |key: &'static str, value: &'static str| {
            let mut labels = base.clone();
            labels.push(Label::new(key, value));
            labels
        };
        let outcome = |value| metrics::counter!("kv_l2_store_keys_total", with("outcome", value));
        Self {
            stored_keys: outcome("stored"),
            queued_keys: outcome("queued"),
            present_keys: outcome("already_present"),
            failed_keys: outcome("failed"),
            stored_bytes: metrics::counter!("kv_l2_store_bytes_total", base.clone()),
            refusals: REFUSAL_REASONS
                .iter()
                .map(|&reason| {
                    (
                        reason,
                        metrics::counter!("kv_l2_refusals_total", with("reason", reason)),
                    )
                })
                .collect(),
            lookups: HitCounters {
                keys: metrics::counter!("kv_l2_lookup_keys_total", base.clone()),
                hits: metrics::counter!("kv_l2_lookup_hits_total", base.clone()),
                misses: metrics::counter!("kv_l2_lookup_misses_total", base.clone()),
            },
            loads: HitCounters {
                keys: metrics::counter!("kv_l2_load_keys_total", base.clone()),
                hits: metrics::counter!("kv_l2_load_hits_total", base.clone()),
                misses: metrics::counter!("kv_l2_load_misses_total", base.clone()),
            },
            loaded_bytes: metrics::counter!("kv_l2_load_bytes_total", base.clone()),
            deleted_keys: metrics::counter!("kv_l2_deleted_keys_total", base.clone()),
            evicted_keys: metrics::counter!("kv_l2_evicted_keys_total", base.clone()),
            evicted_bytes: metrics::counter!("kv_l2_evicted_bytes_total", base.clone()),
            used_bytes: metrics::gauge!("kv_l2_used_bytes", base.clone()),
            capacity_bytes: metrics::gauge!("kv_l2_capacity_bytes", base.clone()),
            stored_count: metrics::gauge!("kv_l2_stored_keys", base.clone()),
            pinned_keys: metrics::gauge!("kv_l2_pinned_keys", base.clone()),
            inflight_batches: metrics::gauge!("kv_l2_inflight_batches", base.clone()),
            queued_puts: metrics::gauge!("kv_l2_queued_puts", base.clone()),
            batch_seconds: OPERATIONS
                .iter()
                .map(|&operation| {
                    metrics::histogram!("kv_l2_batch_seconds", with("operation", operation))
                })
                .collect(),
        }
    }

    fn batch(&self, operation: &str) -> &Histogram {
        let i = OPERATIONS.iter().position(|o| *o == operation).unwrap_or(0);
        &self.batch_seconds[i]
    }

    /// Moves the count of chunks waiting in the background put queue by `change`.
    pub(crate) fn queued_puts(&self, change: f64) {
        self.queued_puts.increment(change);
    }

    /// Counts what an eviction pass (the controller's, a store's, a background put's or the
    /// caller's) removed.
    pub(crate) fn evicted(&self, report: &EvictionReport) {
        self.evicted_keys.increment(report.evicted as u64);
        self.evicted_bytes.increment(report.freed_bytes);
    }

    /// Counts how the background writes of queued keys ended: those that failed count again,
    /// as `failed` with their reason (they were counted `queued` when accepted).
    pub(crate) fn background_outcomes(&self, outcomes: &[KeyOutcome]) {
        for outcome in outcomes {
            if let KeyOutcome::Failed(error) = outcome {
                self.failed(error);
            }
        }
    }

    fn failed(&self, error: &Error) {
        self.failed_keys.increment(1);
        let reason = refusal_reason(error);
        if let Some((_, counter)) = self.refusals.iter().find(|(r, _)| *r == reason) {
            counter.increment(1);
        }
    }

    fn store_report(&self, report: &StoreReport) {
        for outcome in &report.keys {
            match outcome {
                KeyOutcome::Stored { bytes } => {
                    self.stored_keys.increment(1);
                    self.stored_bytes.increment(*bytes);
                }
                KeyOutcome::Queued { bytes } => {
                    self.queued_keys.increment(1);
                    self.stored_bytes.increment(*bytes);
                }
                KeyOutcome::AlreadyPresent => self.present_keys.increment(1),
                KeyOutcome::Failed(error) => self.failed(error),
            }
        }
    }

    pub(crate) fn usage(&self, usage: &Usage) {
        self.used_bytes.set(usage.used_bytes as f64);
        self.capacity_bytes.set(usage.capacity_bytes as f64);
        self.stored_count.set(usage.keys as f64);
        self.pinned_keys.set(usage.pinned as f64);
    }
}

/// One call counted in `kv_l2_inflight_batches` until dropped, a panic's unwinding included.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn start(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A tier with its metrics and spans: what the caller sees, so a key retried after an
/// eviction counts once, with its final outcome.
#[derive(Debug)]
pub(crate) struct Instrumented {
    inner: Arc<dyn L2Adapter>,
    metrics: Arc<TierMetrics>,
    labels: Labels,
}

impl Instrumented {
    pub(crate) fn new(
        inner: Arc<dyn L2Adapter>,
        metrics: Arc<TierMetrics>,
        labels: Labels,
    ) -> Self {
        let instrumented = Self {
            inner,
            metrics,
            labels,
        };
        instrumented.metrics.usage(&instrumented.inner.usage());
        instrumented
    }

    /// Runs one batch under its span, timed, counted in flight; `finish` records its outcome
    /// and returns what the span's `outcome` field says.
    fn batch<T>(
        &self,
        operation: &'static str,
        keys: usize,
        run: impl FnOnce() -> T,
        finish: impl FnOnce(&T) -> String,
    ) -> T {
        let span = tracing::debug_span!(
            "kv_l2.batch",
            operation,
            keys,
            adapter = %self.labels.adapter,
            backend = %self.labels.backend,
            layout = %self.labels.layout,
            outcome = tracing::field::Empty,
        );
        let _entered = span.enter();
        let in_flight = InFlight::start(&self.metrics.inflight_batches);
        let started = Instant::now();
        let result = run();
        let seconds = started.elapsed().as_secs_f64();
        drop(in_flight);
        self.metrics.batch(operation).record(seconds);
        let outcome = finish(&result);
        span.record("outcome", outcome.as_str());
        tracing::debug!(seconds, "batch done");
        result
    }

    fn after_change(&self) {
        self.metrics.usage(&self.inner.usage());
    }
}

#[deny(clippy::missing_trait_methods)]
impl L2Adapter for Instrumented {
    fn store(&self, keys: &[ChunkKey], pages: &[&Page]) -> StoreReport {
        let report = self.batch(
            "store",
            keys.len(),
            || self.inner.store(keys, pages),
            |report| {
                self.metrics.store_report(report);
                let failed = report.keys.iter().filter(|k| !k.is_stored()).count();
                format!("{} bytes, {failed} failed", report.bytes())
            },
        );
        self.after_change();
        report
    }

    fn lookup_and_pin(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let hits = self.batch(
            "lookup",
            keys.len(),
            || self.inner.lookup_and_pin(keys),
            |hits| format!("{} hits", self.metrics.lookups.count(hits)),
        );
        self.after_change();
        hits
    }

    fn unlock(&self, keys: &[ChunkKey]) {
        self.inner.unlock(keys);
        self.after_change();
    }

    fn load(&self, keys: &[ChunkKey], pages: &mut [&mut Page]) -> Vec<bool> {
        // Counted after the load: a store narrows each page it fills to the chunk's length.
        let (hits, _) = self.batch(
            "load",
            keys.len(),
            || {
                let hits = self.inner.load(keys, pages);
                let bytes: u64 = hits
                    .iter()
                    .zip(pages.iter())
                    .filter(|(hit, _)| **hit)
                    .map(|(_, page)| page.len() as u64)
                    .sum();
                (hits, bytes)
            },
            |(hits, bytes)| {
                let found = self.metrics.loads.count(hits);
                self.metrics.loaded_bytes.increment(*bytes);
                format!("{found} hits, {bytes} bytes")
            },
        );
        hits
    }

    fn delete(&self, keys: &[ChunkKey]) -> usize {
        let deleted = self.batch(
            "delete",
            keys.len(),
            || self.inner.delete(keys),
            |deleted| {
                self.metrics.deleted_keys.increment(*deleted as u64);
                format!("{deleted} deleted")
            },
        );
        self.after_change();
        deleted
    }

    fn batched_contains(&self, keys: &[ChunkKey]) -> usize {
        self.inner.batched_contains(keys)
    }

    fn stored_size(&self, key: &ChunkKey) -> Option<u64> {
        self.inner.stored_size(key)
    }

    fn usage(&self) -> Usage {
        let usage = self.inner.usage();
        self.metrics.usage(&usage);
        usage
    }

    fn evict(&self, ratio: f64, salt: Option<&str>) -> EvictionReport {
        // The adapter counts what it evicts (on every path, its own included).
        let report = self.batch(
            "evict",
            0,
            || self.inner.evict(ratio, salt),
            |report| format!("{} evicted, {} bytes", report.evicted, report.freed_bytes),
        );
        self.after_change();
        report
    }

    fn status(&self) -> Status {
        self.inner.status()
    }

    fn close(&self) -> Result<()> {
        let closed = self.inner.close();
        self.after_change();
        closed
    }
}
