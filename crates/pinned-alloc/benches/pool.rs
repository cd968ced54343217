//! Page pool costs: one allocate+free, and an all-or-nothing batch of 64, single-threaded and
//! with a second thread hammering the same pool.
//! Targets (issue 4): allocate+free < 100 ns median, `allocate_batch(64)` < 2 µs.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use pinned_alloc::{LockMode, PoolConfig};

fn pool_benches(c: &mut Criterion) {
    let pool = PoolConfig::new(4096, 4096 * 1024)
        .with_lock(LockMode::Off)
        .build()
        .unwrap();
    c.bench_function("allocate+free one page", |b| {
        b.iter(|| drop(black_box(pool.allocate().unwrap())))
    });
    c.bench_function("allocate_batch(64)+free", |b| {
        b.iter(|| drop(black_box(pool.allocate_batch(64).unwrap())))
    });

    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let pool = Arc::clone(&pool);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                drop(black_box(pool.allocate_batch(8)));
            }
        })
    };
    c.bench_function("allocate+free one page, contended", |b| {
        b.iter(|| drop(black_box(pool.allocate())))
    });
    stop.store(true, Ordering::Relaxed);
    let _ = hammer.join();
}

criterion_group!(benches, pool_benches);
criterion_main!(benches);
