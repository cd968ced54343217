//! Storage that never answers (a FIFO nobody writes to): a transfer against it ends with a
//! timeout within twice its deadline, the process exits promptly, and the memory of that
//! transfer is never handed out again while the engine may still write into it.

use std::fs::OpenOptions;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{
    Direction, NixlConfig, NixlTransport, PageView, StorageExtent, Transport, TransportExt,
};
use nixl_file::{UringConfig, UringTransport};
use pinned_alloc::{MemoryRegion, PoolConfig};

const PAGE: usize = 64 << 10;
const DEADLINE: Duration = Duration::from_millis(400);
/// Scheduling slack on a loaded 2-core machine, on top of the contract's twice the deadline.
const SLACK: Duration = Duration::from_millis(500);

fn fifo(dir: &std::path::Path) -> std::fs::File {
    let path = dir.join("never-answers");
    let made = Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("running mkfifo");
    assert!(made.success(), "mkfifo {} failed", path.display());
    // Read and write: opening does not wait for a writer, and reads wait for data for ever.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap()
}

/// Two stuck reads, blocking and submitted. `kept_by_engine`: whether the engine keeps the
/// memory past the deadline (it cannot cancel), or lets go of it once cancelled.
fn stuck_reads(transport: Arc<dyn Transport>, kept_by_engine: bool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = PoolConfig::new(PAGE, (4 * PAGE) as u64).build().unwrap();
    let _memory = transport
        .register_memory(Arc::clone(&pool) as Arc<dyn MemoryRegion>)
        .unwrap();
    let storage = transport.register_file(Arc::new(fifo(dir.path()))).unwrap();
    let extent = StorageExtent::new(storage.dev_id(), 0);
    let kept = usize::from(kept_by_engine);

    let mut page = pool.allocate().unwrap();
    let started = Instant::now();
    let err = transport
        .read_pages(&mut [(&mut page, extent)], PageView::Exact)
        .unwrap_err();
    let took = started.elapsed();
    assert!(err.is_timeout(), "expected a timeout, got: {err}");
    assert!(took < 2 * DEADLINE + SLACK, "took {took:?}");
    assert_eq!(err.memory_abandoned(), kept_by_engine, "{err}");
    assert_eq!(page.is_abandoned(), kept_by_engine);
    assert_eq!(page.as_slice().is_empty(), kept_by_engine);
    drop(page);
    let stats = pool.stats();
    assert_eq!((stats.abandoned, stats.free), (kept, 4 - kept), "{stats:?}");

    // The submitted form: the batch owns its pages, and gives back only those the engine let go.
    let batch = vec![(pool.allocate().unwrap(), extent)];
    let started = Instant::now();
    let (pages, status) = transport.submit(Direction::Read, batch).wait();
    let took = started.elapsed();
    let err = status.unwrap_err();
    assert!(err.is_timeout(), "expected a timeout, got: {err}");
    assert!(took < 2 * DEADLINE + SLACK, "took {took:?}");
    assert_eq!(err.memory_abandoned(), kept_by_engine, "{err}");
    assert_eq!(
        pages.len(),
        1 - kept,
        "only pages the engine let go come back"
    );
    drop(pages);
    // Whatever the engine still holds is never handed out again.
    let rest = pool.allocate_batch(4 - 2 * kept).unwrap();
    assert!(pool.allocate().is_none());
    drop(rest);
}

#[test]
fn native_engine_stuck_read_times_out_and_keeps_its_memory() {
    let engine = UringTransport::new(UringConfig::default().with_timeout(DEADLINE)).unwrap();
    // A read of a FIFO waits on a poll the kernel cancels at once.
    stuck_reads(Arc::new(engine), false);
}

/// NIXL's POSIX plugin with its engine left to us: io_uring, whose submit returns on storage
/// that never answers (libaio's `io_submit` blocks inside `post_xfer_req`), so the deadline acts.
/// NIXL cannot cancel, so the memory stays with the request.
#[test]
fn nixl_posix_stuck_read_times_out_and_keeps_its_memory() {
    let transport = NixlTransport::new(NixlConfig::new("POSIX").with_timeout(DEADLINE))
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        transport
            .config()
            .backend_params
            .get("use_uring")
            .map(String::as_str),
        Some("true"),
        "the engine chosen is reported in the configuration"
    );
    stuck_reads(Arc::new(transport), true);
}

/// The test process ends promptly after the stuck transfers, nothing joining a stuck thread.
#[test]
fn a_process_with_stuck_transfers_exits_promptly() {
    let exe = std::env::current_exe().unwrap();
    for test in [
        "native_engine_stuck_read_times_out_and_keeps_its_memory",
        "nixl_posix_stuck_read_times_out_and_keeps_its_memory",
    ] {
        let started = Instant::now();
        let mut child = Command::new(&exe)
            .args(["--exact", test, "--test-threads=1"])
            .spawn()
            .unwrap();
        let limit = 4 * DEADLINE + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("{test}: the process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{test} failed in the child process");
    }
}

/// An engine the user only switched off chooses nothing: io_uring is still ours to pick.
#[test]
fn nixl_posix_with_libaio_switched_off_still_gets_io_uring() {
    let transport = NixlTransport::new(NixlConfig::new("POSIX").with_param("use_aio", "false"))
        .unwrap_or_else(|err| panic!("{err}"));
    let params = &transport.config().backend_params;
    assert_eq!(params.get("use_uring").map(String::as_str), Some("true"));
}

/// A POSIX engine the user chose is kept as given, never replaced by ours.
#[test]
fn nixl_posix_keeps_the_engine_the_user_chose() {
    let transport = NixlTransport::new(NixlConfig::new("POSIX").with_param("use_aio", "true"))
        .unwrap_or_else(|err| panic!("{err}"));
    let params = &transport.config().backend_params;
    assert_eq!(params.get("use_aio").map(String::as_str), Some("true"));
    assert_eq!(params.get("use_uring"), None, "{params:?}");
}
