//! Non-blocking forms of the adapter API, as LMCache's L2 adapter interface has them: submit a
//! task, get an id at once, collect its result later (each result is handed out once). Tasks run
//! in order on one worker thread per adapter; a completion counter can be waited on.
//!
//! Bounded: at most 4096 (`MAX_OUTSTANDING`) stores, lookups and loads may be queued or finished but
//! not collected at once; a submission past that is refused with [`Error::Busy`]. Unlocks carry
//! no result and are never refused (a lost unlock would leave a key pinned for good): they wait
//! for room in the queue instead.

use std::collections::HashMap;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pinned_alloc::Page;

use crate::adapter::{L2Adapter, StoreReport};
use crate::error::{Error, Result};
use crate::keys::ChunkKey;

/// Tasks with a result that may be queued or uncollected at once, per adapter.
const MAX_OUTSTANDING: usize = 4096;

/// The id of a submitted task (monotonically increasing).
pub type TaskId = u64;

enum Task {
    Store(TaskId, Vec<ChunkKey>, Vec<Page>),
    Lookup(TaskId, Vec<ChunkKey>),
    Load(TaskId, Vec<ChunkKey>, Vec<Page>),
    Unlock(Vec<ChunkKey>),
}

/// What a finished task gave back.
#[derive(Debug)]
enum Done {
    Store(StoreReport, Vec<Page>),
    Lookup(Vec<bool>),
    Load(Vec<bool>, Vec<Page>),
}

#[derive(Debug, Default)]
struct Results {
    done: HashMap<TaskId, Done>,
    completed: u64,
    /// Tasks with a result submitted and not yet collected (queued, running or done).
    outstanding: usize,
}

/// An adapter driven through submitted tasks.
#[derive(Debug)]
pub struct AsyncAdapter {
    adapter: Arc<dyn L2Adapter>,
    tasks: Mutex<Option<SyncSender<Task>>>,
    next_id: Mutex<TaskId>,
    results: Arc<(Mutex<Results>, Condvar)>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl AsyncAdapter {
    /// Starts the worker thread for `adapter`.
    pub fn new(adapter: Arc<dyn L2Adapter>) -> Self {
        // Room for every task with a result, and as many unlocks beside them.
        let (tx, rx) = sync_channel::<Task>(2 * MAX_OUTSTANDING);
        let results: Arc<(Mutex<Results>, Condvar)> = Arc::default();
        let worker = {
            let adapter = Arc::clone(&adapter);
            let results = Arc::clone(&results);
            std::thread::Builder::new()
                .name("kv-l2-tasks".to_owned())
                .spawn(move || {
                    for task in rx {
                        let finished = match task {
                            Task::Store(id, keys, pages) => {
                                let refs: Vec<&Page> = pages.iter().collect();
                                let report = adapter.store(&keys, &refs);
                                Some((id, Done::Store(report, pages)))
                            }
                            Task::Lookup(id, keys) => {
                                Some((id, Done::Lookup(adapter.lookup_and_pin(&keys))))
                            }
                            Task::Load(id, keys, mut pages) => {
                                let mut refs: Vec<&mut Page> = pages.iter_mut().collect();
                                let loaded = adapter.load(&keys, &mut refs);
                                Some((id, Done::Load(loaded, pages)))
                            }
                            Task::Unlock(keys) => {
                                adapter.unlock(&keys);
                                None
                            }
                        };
                        if let Some((id, done)) = finished {
                            let (lock, wake) = &*results;
                            let mut results = lock.lock().unwrap_or_else(|p| p.into_inner());
                            results.done.insert(id, done);
                            results.completed += 1;
                            wake.notify_all();
                        }
                    }
                })
                .expect("spawning the adapter task thread")
        };
        Self {
            adapter,
            tasks: Mutex::new(Some(tx)),
            next_id: Mutex::new(0),
            results,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// The adapter underneath, for the blocking calls.
    pub fn adapter(&self) -> &Arc<dyn L2Adapter> {
        &self.adapter
    }

    fn send(&self, task: Task) {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = tasks.as_ref() {
            let tx = tx.clone();
            drop(tasks);
            if tx.send(task).is_err() {
                tracing::error!("the adapter task thread is gone; task dropped");
            }
        }
    }

    /// Queues a task with a result, unless `MAX_OUTSTANDING` are queued or uncollected.
    fn submit(&self, make: impl FnOnce(TaskId) -> Task) -> Result<TaskId> {
        {
            let (lock, _) = &*self.results;
            let mut results = lock.lock().unwrap_or_else(|p| p.into_inner());
            if results.outstanding >= MAX_OUTSTANDING {
                return Err(Error::Busy {
                    limit: MAX_OUTSTANDING,
                });
            }
            results.outstanding += 1;
        }
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        self.send(make(id));
        Ok(id)
    }

    /// Stores `pages` under `keys`; the pages come back with the result.
    pub fn submit_store(&self, keys: Vec<ChunkKey>, pages: Vec<Page>) -> Result<TaskId> {
        self.submit(|id| Task::Store(id, keys, pages))
    }

    /// Looks keys up and pins the hits.
    pub fn submit_lookup_and_lock(&self, keys: Vec<ChunkKey>) -> Result<TaskId> {
        self.submit(|id| Task::Lookup(id, keys))
    }

    /// Loads keys into `pages`; the pages come back with the result.
    pub fn submit_load(&self, keys: Vec<ChunkKey>, pages: Vec<Page>) -> Result<TaskId> {
        self.submit(|id| Task::Load(id, keys, pages))
    }

    /// Releases pins, fire and forget; waits while the queue is full.
    pub fn submit_unlock(&self, keys: Vec<ChunkKey>) {
        self.send(Task::Unlock(keys));
    }

    fn take(&self, id: TaskId) -> Option<Done> {
        let (lock, _) = &*self.results;
        let mut results = lock.lock().unwrap_or_else(|p| p.into_inner());
        let done = results.done.remove(&id)?;
        results.outstanding = results.outstanding.saturating_sub(1);
        Some(done)
    }

    /// Every finished store task (handed out once), with its pages.
    pub fn pop_completed_store_tasks(&self) -> Vec<(TaskId, StoreReport, Vec<Page>)> {
        let (lock, _) = &*self.results;
        let mut results = lock.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<TaskId> = results
            .done
            .iter()
            .filter(|(_, d)| matches!(d, Done::Store(..)))
            .map(|(id, _)| *id)
            .collect();
        let mut finished: Vec<_> = ids
            .into_iter()
            .filter_map(|id| match results.done.remove(&id) {
                Some(Done::Store(report, pages)) => Some((id, report, pages)),
                _ => None,
            })
            .collect();
        results.outstanding = results.outstanding.saturating_sub(finished.len());
        finished.sort_by_key(|(id, _, _)| *id);
        finished
    }

    /// The result of a lookup task, once (`None` while pending, or for unknown ids).
    pub fn query_lookup_and_lock_result(&self, id: TaskId) -> Option<Vec<bool>> {
        match self.take(id)? {
            Done::Lookup(bits) => Some(bits),
            other => {
                self.put_back(id, other);
                None
            }
        }
    }

    /// The result of a load task, once, with its pages.
    pub fn query_load_result(&self, id: TaskId) -> Option<(Vec<bool>, Vec<Page>)> {
        match self.take(id)? {
            Done::Load(bits, pages) => Some((bits, pages)),
            other => {
                self.put_back(id, other);
                None
            }
        }
    }

    fn put_back(&self, id: TaskId, done: Done) {
        let (lock, _) = &*self.results;
        let mut results = lock.lock().unwrap_or_else(|p| p.into_inner());
        results.done.insert(id, done);
        results.outstanding += 1;
    }

    /// Waits until at least `count` tasks (stores, lookups, loads) have completed, or `timeout`
    /// passes; returns the number completed.
    pub fn wait_completed(&self, count: u64, timeout: Duration) -> u64 {
        let (lock, wake) = &*self.results;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = wake
            .wait_timeout_while(guard, timeout, |r| r.completed < count)
            .unwrap_or_else(|p| p.into_inner());
        guard.completed
    }

    /// Finishes the queued tasks and stops the worker.
    pub fn shutdown(&self) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(worker) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if worker.join().is_err() {
                tracing::error!("the adapter task thread panicked");
            }
        }
    }
}

impl Drop for AsyncAdapter {
    fn drop(&mut self) {
        self.shutdown();
    }
}
