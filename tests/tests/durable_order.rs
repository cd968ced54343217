//! `backend_params.durable` as a user sets it, through the factory: under strace, every
//! payload `fdatasync`ed before the rename that publishes it, the folder `fsync`ed after the
//! renames, once per batch. The test re-runs itself under strace as the storing child.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kv_l2_adapter::test_utils::{fill, key};
use kv_l2_adapter::{AdapterContext, AdapterFactory, Engine};
use pinned_alloc::{Page, PoolConfig};

const TEST: &str = "durable_puts_sync_each_payload_before_its_rename_and_the_folder_once_per_batch";
const CHILD_DIR: &str = "KV_TEST_DURABLE_DIR";
const BATCHES: [usize; 2] = [3, 2];
/// Bytes of one chunk (not a multiple of 4 KiB, so that padding is exercised).
const CHUNK: usize = 8 * 1024 + 100;

/// The child: a durable dynamic store built from its `--l2-adapter` JSON, two batches.
fn store_batches(dir: &Path) {
    let chunks: usize = BATCHES.iter().sum();
    let memory = PoolConfig::new(CHUNK, (2 * chunks * CHUNK.next_multiple_of(4096)) as u64)
        .build()
        .unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","max_capacity_gb":"1","durable":"true"}}}}"#,
        dir.display()
    );
    let context = AdapterContext::new(Arc::clone(&memory)).with_engine(Engine::Native);
    let adapter = AdapterFactory::new()
        .build(&[json], &context)
        .unwrap()
        .remove(0)
        .1;
    let mut next = 0u32;
    for size in BATCHES {
        let keys: Vec<_> = (next..next + size as u32).map(|i| key(i, None)).collect();
        let pages: Vec<Page> = (next..next + size as u32)
            .map(|i| {
                let mut page = memory.allocate().unwrap();
                fill(i, &mut page);
                page
            })
            .collect();
        let refs: Vec<&Page> = pages.iter().collect();
        assert!(adapter.store(&keys, &refs).is_successful());
        let mut back: Vec<Page> = (0..size).map(|_| memory.allocate().unwrap()).collect();
        let mut targets: Vec<&mut Page> = back.iter_mut().collect();
        assert!(adapter.load(&keys, &mut targets).iter().all(|hit| *hit));
        for (page, original) in back.iter().zip(&pages) {
            assert!(page.as_slice() == original.as_slice());
        }
        next += size as u32;
    }
    adapter.close().unwrap();
}

#[derive(Debug, PartialEq)]
enum Event {
    /// `fdatasync` of the file then at this path.
    DataSync(PathBuf),
    /// `fsync` of this file or folder.
    Sync(PathBuf),
    /// A rename, from and to.
    Rename(PathBuf, PathBuf),
}

/// The events of an `strace -f -y` log: a call's own line (an unfinished call counts where it
/// starts; its `resumed` line is skipped).
fn events(log: &str) -> Vec<Event> {
    let mut events = Vec::new();
    for line in log.lines() {
        let Some(call) = line.split_once(' ').map(|(_, rest)| rest.trim_start()) else {
            continue;
        };
        let fd_path = || {
            let start = call.find('<')? + 1;
            Some(PathBuf::from(
                &call[start..start + call[start..].find(">)")?],
            ))
        };
        if call.starts_with("fdatasync(") {
            events.extend(fd_path().map(Event::DataSync));
        } else if call.starts_with("fsync(") {
            events.extend(fd_path().map(Event::Sync));
        } else if call.starts_with("rename") {
            let quoted: Vec<&str> = call.split('"').skip(1).step_by(2).collect();
            if let [from, to, ..] = quoted.as_slice() {
                events.push(Event::Rename(PathBuf::from(from), PathBuf::from(to)));
            }
        }
    }
    events
}

#[test]
fn durable_puts_sync_each_payload_before_its_rename_and_the_folder_once_per_batch() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        store_batches(Path::new(&dir));
        return;
    }
    if let Err(err) = Command::new("strace").arg("-V").output() {
        panic!("strace cannot run ({err}): `cargo xtask setup` installs it");
    }
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().canonicalize().unwrap();
    let log_path = folder.join("strace.log");
    let output = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "signal=none", "-e"])
        .arg("trace=fdatasync,fsync,rename,renameat,renameat2")
        .arg("-o")
        .arg(&log_path)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, &folder)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(output.status.success(), "child failed:\n{stderr}");
    let events = events(&log);
    let mut publishes = 0;
    let mut folder_syncs_after = Vec::new();
    for (at, event) in events.iter().enumerate() {
        match event {
            Event::Rename(from, to) if to.parent() == Some(folder.as_path()) => {
                publishes += 1;
                assert!(
                    events[..at].contains(&Event::DataSync(from.clone())),
                    "{from:?} renamed before its data was synced:\n{log}"
                );
            }
            Event::Sync(path) if *path == folder => folder_syncs_after.push(publishes),
            _ => {}
        }
    }
    assert_eq!(publishes, BATCHES.iter().sum::<usize>(), "{log}");
    // After the 3 renames of the first batch, and after the 2 of the second: once each.
    assert_eq!(
        folder_syncs_after,
        vec![3, 5],
        "folder syncs, by renames before them:\n{log}"
    );
}
