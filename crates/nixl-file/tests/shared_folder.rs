//! Two processes on one folder: a store opening in one never deletes the other's in-flight
//! writes (the test re-runs itself as the writing child).
#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Fixture, key};
use nixl_file::{DynamicConfig, FileKey};

const TEST: &str = "a_store_opening_keeps_another_processs_in_flight_writes";
const WRITER_DIR: &str = "NIXL_FILE_TEST_WRITER_DIR";
/// Keys per batch: their temporaries exist from the first create to the last rename.
const BATCH: usize = 32;

fn writer_key(i: usize) -> FileKey {
    FileKey {
        chunk_hash: vec![i as u8, 0x5a],
        ..key("org/writer", None)
    }
}

/// The child: stores batches for a while; every put must succeed and every key load exact.
fn write_for_a_while(dir: &Path) {
    let fixture = Fixture::new(BATCH);
    let store = fixture.open(DynamicConfig::new(dir));
    let keys: Vec<FileKey> = (0..BATCH).map(writer_key).collect();
    let started = Instant::now();
    let mut round = 0u8;
    while started.elapsed() < Duration::from_secs(2) {
        round = round.wrapping_add(1);
        let pages: Vec<_> = (0..BATCH).map(|i| fixture.page(round ^ i as u8)).collect();
        let items: Vec<_> = keys.iter().zip(&pages).collect();
        for (i, result) in store.put(&items).into_iter().enumerate() {
            if let Err(err) = result {
                panic!("round {round}: put of key {i} lost: {err}");
            }
        }
    }
    for (i, key) in keys.iter().enumerate() {
        assert!(
            fixture.get(&store, key, round ^ i as u8).unwrap(),
            "key {i}"
        );
    }
}

#[test]
fn a_store_opening_keeps_another_processs_in_flight_writes() {
    if let Some(dir) = std::env::var_os(WRITER_DIR) {
        write_for_a_while(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(WRITER_DIR, dir.path())
        .spawn()
        .unwrap();
    let fixture = Fixture::new(1);
    let (mut opens, mut in_flight) = (0, 0);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let temporaries = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .count();
        in_flight += usize::from(temporaries > 0);
        drop(fixture.open(DynamicConfig::new(dir.path())));
        opens += 1;
    };
    assert!(
        status.success(),
        "the writer lost writes to {opens} opens of another process's store"
    );
    assert!(
        in_flight > 0,
        "no write was in flight during any of {opens} opens: nothing was tested"
    );
}
