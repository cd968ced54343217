//! Two threads hammering one pool: no page is ever handed out twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pinned_alloc::{Error, LockMode, PoolConfig};

#[test]
fn no_page_is_ever_handed_out_twice_under_two_threads() {
    const PAGES: u64 = 64;
    let pool = PoolConfig::new(4096, 4096 * PAGES)
        .with_lock(LockMode::Off)
        .build()
        .unwrap();
    let checked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_millis(1500);
    let workers: Vec<_> = (1..=2u64)
        .map(|thread_id| {
            let pool = Arc::clone(&pool);
            let checked = Arc::clone(&checked);
            std::thread::spawn(move || {
                let mut round = 0u64;
                while Instant::now() < deadline {
                    round += 1;
                    let want = 1 + (round % 24) as usize;
                    let Ok(mut pages) = pool.allocate_batch(want) else {
                        continue;
                    };
                    let stamp = (thread_id << 48) | round;
                    for page in &mut pages {
                        page.as_mut_slice().fill(0);
                        page.as_mut_slice()[..8].copy_from_slice(&stamp.to_le_bytes());
                        let last = page.len() - 8;
                        page.as_mut_slice()[last..].copy_from_slice(&stamp.to_le_bytes());
                    }
                    std::thread::yield_now();
                    for page in &pages {
                        let slice = page.as_slice();
                        let head = u64::from_le_bytes(slice[..8].try_into().unwrap());
                        let tail = u64::from_le_bytes(slice[slice.len() - 8..].try_into().unwrap());
                        assert_eq!(
                            head,
                            stamp,
                            "page {} written by another owner",
                            page.index()
                        );
                        assert_eq!(
                            tail,
                            stamp,
                            "page {} written by another owner",
                            page.index()
                        );
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a worker saw a page owned twice");
    }
    assert!(
        checked.load(Ordering::Relaxed) > 1000,
        "the stress must actually run"
    );
    let stats = pool.stats();
    assert_eq!(stats.free, stats.total, "every page came back");
    assert!(stats.high_water <= stats.total);
}

#[test]
fn exhausted_pool_answers_at_once_instead_of_blocking() {
    let pool = PoolConfig::new(4096, 4096 * 4)
        .with_lock(LockMode::Off)
        .build()
        .unwrap();
    let _all = pool.allocate_batch(4).unwrap();
    let started = Instant::now();
    for _ in 0..1000 {
        assert!(pool.allocate().is_none());
        assert!(matches!(
            pool.allocate_batch(1),
            Err(Error::Exhausted { .. })
        ));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn hugepage_pool_fails_with_counts_when_none_are_reserved() {
    let sysfs = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    let free: u64 = std::fs::read_to_string(sysfs)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let result = PoolConfig::new(2 << 20, 8 << 20)
        .with_hugepages(true)
        .with_lock(LockMode::Off)
        .build();
    if free >= 4 {
        let pool = result.expect("4 free hugepages must map");
        assert_eq!(pool.stats().total, 4);
        return;
    }
    match result {
        Err(Error::Hugepages {
            needed,
            free: reported,
            ..
        }) => {
            assert_eq!(needed, 4);
            assert_eq!(reported, free);
        }
        other => panic!("expected a hugepage error, got {other:?}"),
    }
}
