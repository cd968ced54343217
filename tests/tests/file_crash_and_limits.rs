//! Atomic publish under SIGKILL (per-key files, and segments through the L2 adapter), and many
//! keys under a small open-file limit, in child processes, through both engines.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kv_integration_tests::{Rng, file_suite, nixl_posix, uring};

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

/// What key `i` may hold once the writer of generation `generation` has said `op` about it,
/// given what it could hold before (`None` for absent): a delete that began may have left the
/// old version or nothing; one that returned left nothing, unless the store that follows it
/// landed; a store reported `Stored` left the new version only; a refused one, nothing.
fn after(allowed: &mut Vec<Option<usize>>, op: &str, generation: usize) {
    match op {
        "d" if allowed.contains(&None) => {}
        "d" => allowed.push(None),
        "D" => *allowed = vec![None, Some(generation)],
        "S" => *allowed = vec![Some(generation)],
        "F" => *allowed = vec![None],
        other => panic!("the writer said {other:?}"),
    }
}

/// Reopens the store through the builder and loads every key: per key, the generation whose
/// content it loaded (`None` a miss); bytes of no generation in `candidates[i]` panic.
fn found_after(
    dir: &std::path::Path,
    engine: &str,
    candidates: &[Vec<Option<usize>>],
    kill: u64,
) -> Vec<Option<usize>> {
    let store = file_suite::crash_store(dir, engine)
        .unwrap_or_else(|err| panic!("kill {kill}: reopening through the builder: {err}"));
    let adapter = store.adapter();
    let mut found = vec![None; file_suite::CRASH_KEYS];
    let mut expected = vec![0u8; file_suite::CRASH_CHUNK];
    let indices: Vec<usize> = (0..file_suite::CRASH_KEYS).collect();
    for piece in indices.chunks(16) {
        let keys: Vec<_> = piece.iter().map(|&i| file_suite::crash_key(i)).collect();
        let pinned = adapter.lookup_and_pin(&keys);
        let hits: Vec<usize> = (0..piece.len()).filter(|&j| pinned[j]).collect();
        let hit_keys: Vec<_> = hits.iter().map(|&j| keys[j].clone()).collect();
        let mut pages: Vec<_> = hits
            .iter()
            .map(|_| store.pool().allocate().unwrap())
            .collect();
        let mut refs: Vec<_> = pages.iter_mut().collect();
        let loaded = adapter.load(&hit_keys, &mut refs);
        adapter.unlock(&hit_keys);
        for ((&j, ok), page) in hits.iter().zip(loaded).zip(&pages) {
            if !ok {
                continue;
            }
            let i = piece[j];
            let generation = candidates[i].iter().flatten().copied().find(|&g| {
                file_suite::crash_fill(i, g, &mut expected);
                page.as_slice() == expected.as_slice()
            });
            if generation.is_none() {
                let stale = (1..=kill as usize + 1).find(|&g| {
                    file_suite::crash_fill(i, g, &mut expected);
                    page.as_slice() == expected.as_slice()
                });
                panic!(
                    "kill {kill}: key {i} loaded wrong bytes: allowed {:?}, the bytes are {}",
                    candidates[i],
                    stale.map_or("of no generation".to_owned(), |g| format!(
                        "generation {g}'s"
                    ))
                );
            }
            found[i] = generation;
        }
    }
    store.close().unwrap();
    found
}

/// SIGKILLs a writer that stores through the L2 adapter on segments (opened with
/// `StoreBuilder`, as a user does) at pseudo-random moments, `kills` times; each round
/// overwrites keys with its own generation's content. After each kill the store reopens through
/// the builder and every key holds what the writer's reports allow: a key reported `Stored` is
/// present and byte-exact in this round's version, a key the round did not touch is as the last
/// reopen found it, a deleted key never brings its old version back, and nothing loads wrong
/// (a stale version included).
fn killed_adapter_writers_on_segments_lose_nothing_reported(engine: &str, kills: u64) {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut truth: Vec<Option<usize>> = vec![None; file_suite::CRASH_KEYS];
    let mut next = 0usize;
    let (mut reported, mut checked_hits, mut failed) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    for kill in 0..kills {
        let generation = kill as usize + 1;
        let log = logs.path().join(format!("child-{kill}.stderr"));
        let mut child = Command::new(WORKER)
            .args(["segment-adapter-loop", dir.path().to_str().unwrap(), engine])
            .args([next.to_string(), generation.to_string()])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Mostly mid-stream, after a few reported stores and a few hundred microseconds more;
        // one round in eight early (while the writer opens, or at its first writes).
        let mut lines = Vec::new();
        if rng.below(8) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
        } else {
            let wanted = 1 + rng.below(24) as usize;
            let mut stored = 0;
            while stored < wanted {
                match rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(line) => {
                        stored += usize::from(line.starts_with("S "));
                        lines.push(line);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = child.kill();
                        panic!("kill {kill}: the writer reported nothing for 20 s");
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            std::thread::sleep(Duration::from_micros(rng.below(1500)));
        }
        // The writer may have ended by itself already: its status says so below.
        let _ = child.kill();
        let status = child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        assert!(
            status.code().is_none(),
            "kill {kill}: the writer ended by itself ({status}): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let mut candidates: Vec<Vec<Option<usize>>> = truth.iter().map(|&t| vec![t]).collect();
        let mut said: Vec<Option<&str>> = vec![None; file_suite::CRASH_KEYS];
        for line in &lines {
            let mut words = line.split(' ');
            let (Some(op), Some(Ok(i))) = (words.next(), words.next().map(str::parse::<usize>))
            else {
                panic!("kill {kill}: the writer said {line:?}");
            };
            next += usize::from(op == "d");
            reported += usize::from(op == "S");
            failed += usize::from(op == "F");
            after(&mut candidates[i], op, generation);
            said[i] = Some(line);
        }
        let found = found_after(dir.path(), engine, &candidates, kill);
        for i in 0..file_suite::CRASH_KEYS {
            assert!(
                candidates[i].contains(&found[i]),
                "kill {kill}: key {i} is {} after the writer last said {:?} (before: {:?}); \
                 allowed {:?}",
                found[i].map_or("absent".to_owned(), |g| format!("generation {g}")),
                said[i],
                truth[i],
                candidates[i]
            );
            checked_hits += usize::from(found[i].is_some());
        }
        truth = found;
    }
    eprintln!(
        "{engine}: {kills} kills in {:.1} s: {reported} stores reported, {checked_hits} hits \
         checked byte-exact, {failed} refused",
        started.elapsed().as_secs_f64()
    );
    assert!(reported > 0, "the writer must have reported stores");
    assert!(
        checked_hits > 0,
        "the reopened stores must have served hits"
    );
    assert_eq!(failed, 0, "stores refused with room for every key");
}

#[test]
fn sigkill_through_the_adapter_on_segments_uring() {
    killed_adapter_writers_on_segments_lose_nothing_reported("uring", 200);
}

#[test]
fn sigkill_through_the_adapter_on_segments_nixl_posix() {
    killed_adapter_writers_on_segments_lose_nothing_reported("nixl", 200);
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
