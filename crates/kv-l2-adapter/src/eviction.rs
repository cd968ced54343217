//! The eviction controller: one thread, every interval, checks each adapter's usage against its
//! watermark and runs an eviction pass where it is over (LRU, IsolatedLRU per cache salt, noop).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kv_config::{EvictionPolicy, EvictionSpec};

use crate::adapter::{EvictionReport, L2Adapter};

/// One pass over one adapter; returns what it evicted.
pub fn eviction_pass(adapter: &dyn L2Adapter, spec: &EvictionSpec) -> EvictionReport {
    let usage = adapter.usage();
    match spec.policy {
        EvictionPolicy::Noop => EvictionReport::default(),
        EvictionPolicy::Lru => {
            let fraction = usage.fraction();
            if fraction < 0.0 || fraction < spec.trigger_watermark {
                return EvictionReport::default();
            }
            tracing::info!(
                usage = fraction,
                watermark = spec.trigger_watermark,
                "L2 usage above watermark; triggering eviction"
            );
            adapter.evict(spec.eviction_ratio, None)
        }
        EvictionPolicy::IsolatedLru => {
            // Each salt gets an equal share of the capacity; a salt over its watermark evicts
            // only its own keys, so one tenant cannot push another out.
            let salts = usage.bytes_by_salt.len().max(1) as u64;
            let quota = usage.capacity_bytes / salts;
            let mut total = EvictionReport::default();
            for (salt, bytes) in &usage.bytes_by_salt {
                let over = quota == 0 || *bytes as f64 >= spec.trigger_watermark * quota as f64;
                if !over {
                    continue;
                }
                let ratio = if quota == 0 { 1.0 } else { spec.eviction_ratio };
                let report = adapter.evict(ratio, Some(salt));
                total.evicted += report.evicted;
                total.freed_bytes += report.freed_bytes;
                total.skipped_pinned += report.skipped_pinned;
            }
            total
        }
    }
}

/// What the controller's thread waits on.
#[derive(Debug, Default)]
struct Signal {
    stopped: bool,
    /// A store found an adapter at or over its watermark: run a pass now, not at the interval.
    kicked: bool,
}

type SharedSignal = Arc<(Mutex<Signal>, Condvar)>;

/// One adapter's pass, as the controller runs it.
pub(crate) type Pass = Box<dyn Fn() -> EvictionReport + Send>;

/// Runs [`eviction_pass`] over every adapter on its own thread until dropped.
#[derive(Debug)]
pub struct EvictionController {
    signal: SharedSignal,
    thread: Option<JoinHandle<()>>,
}

/// Wakes an [`EvictionController`] for a pass before its interval ends.
#[derive(Debug, Clone, Default)]
pub(crate) struct EvictionKick(SharedSignal);

impl EvictionKick {
    pub(crate) fn kick(&self) {
        let (lock, wake) = &*self.0;
        lock.lock().unwrap_or_else(|p| p.into_inner()).kicked = true;
        wake.notify_all();
    }
}

impl EvictionController {
    /// Starts the thread; it checks every `interval` (LMCache: one second). The first pass runs
    /// after one interval, so opening a store never evicts by itself.
    pub fn spawn(
        adapters: Vec<(Arc<dyn L2Adapter>, EvictionSpec)>,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let passes = adapters
            .into_iter()
            .map(|(adapter, spec)| Box::new(move || eviction_pass(adapter.as_ref(), &spec)) as Pass)
            .collect();
        Self::spawn_passes(EvictionKick::default(), passes, interval)
    }

    /// Starts the thread over `passes`, woken early by `kick`.
    pub(crate) fn spawn_passes(
        kick: EvictionKick,
        passes: Vec<Pass>,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let signal = kick.0;
        let shared = Arc::clone(&signal);
        let thread = std::thread::Builder::new()
            .name("kv-l2-eviction".to_owned())
            .spawn(move || {
                let (lock, wake) = &*shared;
                let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if !state.stopped && !state.kicked {
                        state = wake
                            .wait_timeout(state, interval)
                            .map(|(guard, _)| guard)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    if state.stopped {
                        break;
                    }
                    state.kicked = false;
                    drop(state);
                    for pass in &passes {
                        let report = pass();
                        if report.evicted > 0 || report.skipped_pinned > 0 {
                            tracing::debug!(?report, "eviction pass");
                        }
                    }
                    state = lock.lock().unwrap_or_else(|p| p.into_inner());
                }
            })?;
        Ok(Self {
            signal,
            thread: Some(thread),
        })
    }
}

impl Drop for EvictionController {
    fn drop(&mut self) {
        let (lock, wake) = &*self.signal;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stopped = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the eviction thread panicked");
            }
        }
    }
}
