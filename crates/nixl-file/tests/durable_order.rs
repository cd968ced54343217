//! With `durable` on, the order of operations under strace: every payload `fdatasync`ed before
//! the rename that publishes it, the folder `fsync`ed after the renames, once per batch. The
//! test re-runs itself under strace as the storing child.
#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{CHUNK, Fixture, key};
use nixl_file::{DynamicConfig, FileKey};

const TEST: &str = "durable_puts_sync_each_payload_before_its_rename_and_the_folder_once_per_batch";
const CHILD_DIR: &str = "NIXL_FILE_TEST_DURABLE_DIR";
const BATCHES: [usize; 2] = [3, 2];

/// The child: two durable batches into a flat folder.
fn store_batches(dir: &Path) {
    let fixture = Fixture::new(BATCHES.iter().sum());
    let store = fixture.open(DynamicConfig::new(dir).with_durable(true));
    let mut next = 0u8;
    for size in BATCHES {
        let keys: Vec<FileKey> = (0..size)
            .map(|i| FileKey {
                chunk_hash: vec![next + i as u8],
                ..key("org/durable", None)
            })
            .collect();
        let pages: Vec<_> = (0..size).map(|i| fixture.page(next + i as u8)).collect();
        let items: Vec<_> = keys.iter().zip(&pages).collect();
        for result in store.put(&items) {
            assert_eq!(result.unwrap(), CHUNK as u64);
        }
        for (i, key) in keys.iter().enumerate() {
            assert!(fixture.get(&store, key, next + i as u8).unwrap(), "{key:?}");
        }
        next += size as u8;
    }
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
        eprintln!(
            "SKIPPED {TEST}: strace cannot run ({err}); install it (apt-get install -y strace) \
             to check the order of syncs and renames"
        );
        return;
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
    if !output.status.success() && log.is_empty() && stderr.contains("Operation not permitted") {
        eprintln!("SKIPPED {TEST}: this machine forbids ptrace, so strace cannot trace: {stderr}");
        return;
    }
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
