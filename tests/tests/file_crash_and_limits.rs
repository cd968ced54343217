//! Atomic publish under SIGKILL, and many keys under a small open-file limit, in child
//! processes, through both engines.

use std::process::{Command, Stdio};
use std::time::Duration;

use kv_integration_tests::{file_suite, nixl_posix, uring};

const WORKER: &str = env!("CARGO_BIN_EXE_kv_file_worker");

/// Kills a writing child at pseudo-random moments; after each kill, every key that a fresh
/// store reports present loads byte-exact, and no temporary file survives reopening.
fn killed_writers_never_leave_data_that_is_wrong(engine: &str, kills: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut checked_hits = 0;
    for kill in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = Command::new(WORKER)
            .args(["write-loop", dir.path().to_str().unwrap(), engine])
            .arg((kill * 4).to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + rng % 120));
        child.kill().unwrap();
        child.wait().unwrap();

        let transport = if engine == "nixl" {
            nixl_posix()
        } else {
            uring()
        };
        let memory = file_suite::Memory::new(&transport, 8);
        let store = file_suite::dynamic(&transport, dir.path(), true, false);
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .count();
        assert_eq!(leftovers, 0, "temporaries removed when the store opens");
        for i in 0..64 {
            if store.contains(&file_suite::key(i)).unwrap() {
                assert_eq!(
                    file_suite::get_all(&store, &memory, &[i]),
                    vec![true],
                    "key {i} is present after kill {kill} but does not load"
                );
                checked_hits += 1;
            }
        }
    }
    assert!(checked_hits > 0, "the writer must have published something");
}

#[test]
fn sigkill_during_writes_uring() {
    killed_writers_never_leave_data_that_is_wrong("uring", 12);
}

#[test]
fn sigkill_during_writes_nixl_posix() {
    killed_writers_never_leave_data_that_is_wrong("nixl", 8);
}

fn ten_thousand_keys_under_ulimit(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "ulimit -n 256 && exec '{WORKER}' many-keys '{}' {engine} 10000 4096",
        dir.path().display()
    );
    let output = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(
        output.status.success(),
        "{engine}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok 10000");
}

#[test]
fn ten_thousand_keys_with_256_open_files_uring() {
    ten_thousand_keys_under_ulimit("uring");
}

#[test]
fn ten_thousand_keys_with_256_open_files_nixl_posix() {
    ten_thousand_keys_under_ulimit("nixl");
}
