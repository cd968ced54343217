//! `cargo xtask stress`: tries to make the store lose data, serve wrong data, wedge, or write
//! outside its folders. Prints a summary table; exits non-zero if anything was lost or wrong.
//!
//! `kv_stress [--short]`: the short form (CI) runs every section with smaller counts.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kv_integration_tests::{Rng, file_suite, uring};
use kv_l2_adapter::test_utils::{fill, key};
use kv_l2_adapter::{
    AdapterContext, AdapterFactory, ChunkKey, Engine, KeyOutcome, L2Adapter, ObjectKey,
};
use pinned_alloc::{Page, PagePool, PoolConfig};

/// The adapter torture, shared with `tests/adapter_torture.rs`.
#[path = "../../tests/torture/mod.rs"]
mod torture;

/// A tool built beside this one (`cargo xtask stress` builds them all).
fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    ensure!(
        path.exists(),
        "{} is missing: run `cargo xtask stress`",
        path.display()
    );
    Ok(path)
}
const KVL2_SECRET: &str = "S3cr3t-Do-Not-Print-4711";

/// One part of the run, recording its rows in the summary.
type Section = Box<dyn FnOnce(&mut Summary) -> Result<()>>;

#[derive(Default)]
struct Summary {
    rows: Vec<(String, String, bool)>,
}

impl Summary {
    fn add(&mut self, section: &str, detail: String, ok: bool) {
        println!(
            "{:<14} {:<4} {detail}",
            section,
            if ok { "ok" } else { "FAIL" }
        );
        self.rows.push((section.to_owned(), detail, ok));
    }
}

fn pool(chunk: usize, pages: usize) -> Result<Arc<PagePool>> {
    Ok(PoolConfig::new(chunk, (pages * chunk.next_multiple_of(4096)) as u64).build()?)
}

fn adapter_json(dir: &Path, extra: &str) -> String {
    format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","layout":"files","use_direct_io":"true","max_capacity_gb":"64"}}{extra}}}"#,
        dir.display()
    )
}

fn adapter(dir: &Path, pool: &Arc<PagePool>, extra: &str) -> Result<Arc<dyn L2Adapter>> {
    let context = AdapterContext::new(Arc::clone(pool)).with_engine(Engine::Native);
    Ok(AdapterFactory::new()
        .build(&[adapter_json(dir, extra)], &context)?
        .remove(0)
        .1)
}

/// Kills writing children at random moments; every key a fresh process finds loads exactly.
fn crash(kills: u64, summary: &mut Summary) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut verified = 0;
    for kill in 0..kills {
        let engine = if kill % 10 == 9 { "nixl" } else { "uring" };
        let mut child = Command::new(sibling("kv_file_worker")?)
            .args(["write-loop", dir.path().to_str().context("path")?, engine])
            .arg((rng.below(64)).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(20 + rng.below(100)));
        child.kill()?;
        child.wait()?;
        let transport = uring();
        let memory = file_suite::Memory::new(&transport, 8);
        let store = file_suite::dynamic(&transport, dir.path(), true, false);
        for i in 0..64 {
            if store.contains(&file_suite::key(i))? {
                ensure!(
                    file_suite::get_all(&store, &memory, &[i]) == vec![true],
                    "key {i} present after kill {kill} but not loadable"
                );
                verified += 1;
            }
        }
        let leftovers = std::fs::read_dir(dir.path())?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .count();
        ensure!(
            leftovers == 0,
            "{leftovers} temporary files survived reopening"
        );
    }
    summary.add(
        "crash",
        format!("{kills} SIGKILLs survived, {verified} present keys verified byte-exact"),
        verified > 0,
    );
    Ok(())
}

/// Damages files in every way we know; each damaged key is a miss, the rest still load.
fn corruption(summary: &mut Summary) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let transport = uring();
    let memory = file_suite::Memory::new(&transport, 64);
    let store = file_suite::dynamic(&transport, dir.path(), false, false);
    let keys: Vec<usize> = (0..48).collect();
    file_suite::put_all(&store, &memory, &keys);
    let path = |i: usize| store.path_of(&file_suite::key(i));
    let mut damaged = Vec::new();
    for (n, i) in (0..40).step_by(5).enumerate() {
        let p = path(i)?;
        let mut bytes = std::fs::read(&p)?;
        match n % 8 {
            0 => bytes[4096 + 77] ^= 1,
            1 => bytes[200] ^= 0x80,
            2 => bytes.truncate(bytes.len() / 2),
            3 => bytes = std::fs::read(path(i + 1)?)?,
            4 => bytes.fill(0),
            5 => bytes = b"not a chunk".to_vec(),
            6 => bytes.truncate(4096),
            _ => {
                let last_payload_byte = 4096 + file_suite::CHUNK - 1;
                bytes[last_payload_byte] ^= 0xff;
            }
        }
        std::fs::write(&p, &bytes)?;
        damaged.push(i);
    }
    std::fs::write(dir.path().join("random.bin"), vec![7u8; 70_000])?;
    let results = file_suite::get_all(&store, &memory, &keys);
    let mut detected = 0;
    for (i, hit) in results.into_iter().enumerate() {
        if damaged.contains(&i) {
            ensure!(!hit, "damaged key {i} read as data");
            detected += 1;
        } else {
            ensure!(hit, "undamaged key {i} was lost");
        }
    }
    summary.add(
        "corruption",
        format!(
            "{detected} of {} damaged files detected, {} intact keys served",
            damaged.len(),
            keys.len() - damaged.len()
        ),
        detected == damaged.len(),
    );
    Ok(())
}

/// A small tmpfs fills up: typed errors per key, exact accounting, stored data intact, recovery.
fn full_disk(summary: &mut Summary) -> Result<()> {
    let mount = tempfile::tempdir()?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mount.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        summary.add(
            "full disk",
            "SKIPPED: cannot mount a tmpfs here (needs root)".to_owned(),
            true,
        );
        return Ok(());
    }
    let outcome = (|| -> Result<(usize, usize)> {
        let chunk = 256 << 10;
        let pool = pool(chunk, 8)?;
        let store = adapter(mount.path(), &pool, "")?;
        let mut stored = Vec::new();
        let mut refused = 0;
        for i in 0..24u32 {
            let mut page = pool.allocate().context("page")?;
            fill(i, &mut page);
            let report = store.store(&[key(i, None)], &[&page]);
            match &report.keys[0] {
                KeyOutcome::Stored { .. } => stored.push(i),
                KeyOutcome::Failed(_) => refused += 1,
                _ => bail!("a fresh key was reported present"),
            }
        }
        ensure!(refused > 0, "a 4 MiB file system must fill up");
        ensure!(
            store.usage().used_bytes == stored.len() as u64 * chunk as u64,
            "accounting after a full disk is exact"
        );
        let keys: Vec<ChunkKey> = stored.iter().map(|&i| key(i, None)).collect();
        let mut pages = pool.allocate_batch(1)?;
        for (i, k) in stored.iter().zip(&keys) {
            let ok = store.load(std::slice::from_ref(k), &mut [&mut pages[0]])[0];
            let mut expected = pool.allocate().context("page")?;
            fill(*i, &mut expected);
            ensure!(
                ok && pages[0].as_slice() == expected.as_slice(),
                "stored key {i} damaged by the full disk"
            );
        }
        ensure!(store.delete(&keys[..2]) == 2, "deleting frees space");
        let mut page = pool.allocate().context("page")?;
        fill(100, &mut page);
        ensure!(
            store.store(&[key(100, None)], &[&page]).is_successful(),
            "stores recover when space returns"
        );
        Ok((stored.len(), refused))
    })();
    let _ = Command::new("umount").arg(mount.path()).status();
    let (stored, refused) = outcome?;
    summary.add(
        "full disk",
        format!(
            "{stored} stored, {refused} refused with typed errors, accounting exact, recovered"
        ),
        true,
    );
    Ok(())
}

/// Many keys under `ulimit -n 256`, and an exhausted page pool under load.
fn limits(keys: usize, summary: &mut Summary) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let worker = sibling("kv_file_worker")?;
    let script = format!(
        "ulimit -n 256 && exec '{}' many-keys '{}' uring {keys} 4096",
        worker.display(),
        dir.path().display()
    );
    let output = Command::new("sh").args(["-c", &script]).output()?;
    ensure!(
        output.status.success(),
        "many keys under ulimit -n 256: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pool = pool(4096, 16)?;
    let errors = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..500 {
                    match pool.allocate_batch(6) {
                        Ok(pages) => {
                            std::thread::sleep(Duration::from_micros(200));
                            drop(pages);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    ensure!(
        started.elapsed() < Duration::from_secs(30),
        "pool exhaustion must not stall"
    );
    ensure!(
        errors.load(Ordering::Relaxed) > 0,
        "4 threads wanting 24 of 16 pages must see refusals"
    );
    ensure!(pool.stats().free == 16, "every page came back");
    summary.add(
        "limits",
        format!(
            "{keys} keys with 256 fds; exhausted pool answered {} times with errors, no deadlock",
            errors.load(Ordering::Relaxed)
        ),
        true,
    );
    Ok(())
}

/// Eight threads on overlapping keys: no panic, no wrong data, pinned keys survive eviction.
fn concurrency(seconds: u64, summary: &mut Summary) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chunk = 64 << 10;
    let pool = pool(chunk, 128)?;
    let store = adapter(dir.path(), &pool, "")?;
    let pinned: Vec<ChunkKey> = (1000..1004).map(|i| key(i, None)).collect();
    for (i, k) in (1000u32..).zip(&pinned) {
        let mut page = pool.allocate().context("page")?;
        fill(i, &mut page);
        ensure!(
            store
                .store(std::slice::from_ref(k), &[&page])
                .is_successful()
        );
    }
    ensure!(store.lookup_and_pin(&pinned).iter().all(|h| *h));
    let stop = AtomicBool::new(false);
    let operations = AtomicUsize::new(0);
    let wrong = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for thread in 0..8u64 {
            let (store, pool, stop, operations, wrong) =
                (&store, &pool, &stop, &operations, &wrong);
            scope.spawn(move || {
                let mut rng = Rng(0xA5A5_0000 + thread);
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.below(48) as u32;
                    let k = key(i, None);
                    match rng.below(5) {
                        0 => {
                            if let Some(mut page) = pool.allocate() {
                                fill(i, &mut page);
                                store.store(&[k], &[&page]);
                            }
                        }
                        1 => {
                            if store.lookup_and_pin(std::slice::from_ref(&k))[0] {
                                store.unlock(&[k]);
                            }
                        }
                        2 => {
                            if let Some(mut page) = pool.allocate() {
                                if store.load(std::slice::from_ref(&k), &mut [&mut page])[0] {
                                    let mut expected =
                                        pool.allocate().unwrap_or_else(|| page_fallback(pool));
                                    fill(i, &mut expected);
                                    if page.as_slice() != expected.as_slice() {
                                        wrong.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        3 => {
                            store.delete(&[k]);
                        }
                        _ => {
                            store.evict(0.3, None);
                        }
                    }
                    operations.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    let survivors = store.lookup_and_pin(&pinned);
    ensure!(survivors.iter().all(|h| *h), "a pinned key was evicted");
    ensure!(wrong.load(Ordering::Relaxed) == 0, "wrong data served");
    let usage = store.usage();
    ensure!(
        usage.used_bytes == usage.keys as u64 * chunk as u64,
        "usage matches the index"
    );
    summary.add(
        "concurrency",
        format!(
            "8 threads, {} operations in {seconds} s, 0 wrong, 4 pinned keys survived eviction",
            operations.load(Ordering::Relaxed)
        ),
        true,
    );
    Ok(())
}

/// Eight threads on pools of six slots, per adapter and backend (files on both engines, objects
/// on a real S3 server through NIXL OBJ): store, load without a pin,
/// lookup-and-pin / load / unlock, delete, eviction and HiCache get on overlapping keys, every
/// byte of every hit compared. A row fails on any wrong byte or pinned miss.
fn torture_rows(operations: u64, summary: &mut Summary) -> Result<()> {
    use torture::Storage;
    let backends = [
        (Storage::Files, Engine::Native),
        (Storage::Files, Engine::Nixl),
        (Storage::S3, Engine::Nixl),
        (Storage::Segments, Engine::Native),
        (Storage::Segments, Engine::Nixl),
    ];
    for kind in ["nixl_store", "nixl_store_dynamic"] {
        for (storage, engine) in backends {
            if storage == Storage::Segments && kind == "nixl_store" {
                continue;
            }
            let plan = torture::Plan {
                kind,
                storage,
                engine,
                slots: 6,
                chunk: 16 << 10,
                // A tenth over S3: the loopback server answers each request in about a
                // millisecond.
                operations: match storage {
                    Storage::Files | Storage::Segments => operations,
                    Storage::S3 => operations / 10,
                },
            };
            match torture::run(&plan) {
                Ok(tally) => summary.add(
                    "torture",
                    format!(
                        "{}: {} operations, {} hits, wrong: {}, pinned misses: {}",
                        plan.label(),
                        tally.operations,
                        tally.hits,
                        tally.wrong,
                        tally.pinned_misses
                    ),
                    tally.wrong == 0 && tally.pinned_misses == 0 && tally.hits > 0,
                ),
                Err(err) => summary.add("torture", format!("{}: {err:#}", plan.label()), false),
            }
        }
    }
    Ok(())
}

fn page_fallback(pool: &Arc<PagePool>) -> Page {
    loop {
        if let Some(page) = pool.allocate() {
            return page;
        }
        std::thread::yield_now();
    }
}

fn tenant_key(model: &str, i: u32) -> ChunkKey {
    ChunkKey::from(ObjectKey {
        model: model.to_owned(),
        kv_rank: 0,
        group_id: 0,
        chunk_hash: i.to_be_bytes().to_vec(),
        cache_salt: None,
    })
}

/// Two tenants in one folder: neither sees nor deletes the other's data.
fn multi_tenant(summary: &mut Summary) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = pool(64 << 10, 32)?;
    let a = adapter(dir.path(), &pool, r#","persist_enabled":false"#)?;
    let b = adapter(dir.path(), &pool, "")?;
    let mut page = pool.allocate().context("page")?;
    for i in 0..8 {
        fill(i, &mut page);
        ensure!(
            a.store(&[tenant_key("tenant/a", i)], &[&page])
                .is_successful()
        );
        fill(100 + i, &mut page);
        ensure!(
            b.store(&[tenant_key("tenant/b", i)], &[&page])
                .is_successful()
        );
    }
    let b_keys: Vec<ChunkKey> = (0..8).map(|i| tenant_key("tenant/b", i)).collect();
    ensure!(
        a.batched_contains(&b_keys) == 8,
        "shared folder: A may see B's files exist"
    );
    a.evict(1.0, None);
    a.delete(&b_keys);
    a.close()?;
    ensure!(
        b.lookup_and_pin(&b_keys).iter().all(|h| *h),
        "A deleted B's data"
    );
    b.unlock(&b_keys);
    for (i, k) in (0u32..).zip(&b_keys) {
        ensure!(b.load(std::slice::from_ref(k), &mut [&mut page])[0]);
        let mut expected = pool.allocate().context("page")?;
        fill(100 + i, &mut expected);
        ensure!(page.as_slice() == expected.as_slice(), "B's data changed");
    }
    let a_keys: Vec<ChunkKey> = (0..8).map(|i| tenant_key("tenant/a", i)).collect();
    ensure!(
        b.batched_contains(&a_keys) == 0,
        "A's data (persist off) is gone"
    );
    summary.add(
        "multi-tenant",
        "two models in one folder: evict, delete and close of one never touched the other"
            .to_owned(),
        true,
    );
    Ok(())
}

/// Hostile keys and inputs: rejected, nothing written outside the folder, nothing panics.
fn hostile(iterations: usize, summary: &mut Summary) -> Result<()> {
    let parent = tempfile::tempdir()?;
    let dir = parent.path().join("store");
    let pool = pool(4096, 8)?;
    let store = adapter(&dir, &pool, "")?;
    let page = pool.allocate().context("page")?;
    let long = "m".repeat(4096);
    let models = [
        "../up",
        "/abs/olute",
        "a\0b",
        "..",
        "a/../../b",
        long.as_str(),
        "",
    ];
    let mut tried = 0;
    for model in models {
        let report = store.store(&[tenant_key(model, 1)], &[&page]);
        ensure!(
            !report.is_successful(),
            "hostile model {model:?} was stored"
        );
        tried += 1;
    }
    let outside: Vec<PathBuf> = std::fs::read_dir(parent.path())?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(
        outside == vec![dir.clone()],
        "something was written outside the store: {outside:?}"
    );
    let mut rng = Rng(0xDEAD_BEEF);
    for _ in 0..iterations {
        let len = rng.below(8192) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let parsed = std::panic::catch_unwind(|| {
            let _ = nixl_core::header::parse(&bytes);
            let _ = nixl_core::header::check(&bytes, b"k", 10);
            let text = String::from_utf8_lossy(&bytes);
            let _ = kv_config::AdapterRegistry::new().parse(&[text.as_ref()]);
            let _ = kv_config::ConfigLoader::new()
                .with_yaml("fuzz.yaml", text.to_string())
                .load();
        });
        ensure!(parsed.is_ok(), "a parser panicked on random input");
        tried += 1;
    }
    summary.add(
        "hostile input",
        format!("{tried} hostile keys and random inputs rejected without a panic"),
        true,
    );
    Ok(())
}

/// The channel secret of the hostile-peer rounds.
const CHANNEL_SECRET: &str = "kv-stress-channel-secret-93b1d7";

/// Hostile peers on the transfer channel (two processes over NIXL UCX): a wrong secret, random
/// bytes, a truncated frame, a frame announcing 4 GiB and a replayed handshake are each
/// refused, and the receiver then gets every chunk of an honest sender intact.
fn hostile_peers(rounds: usize, summary: &mut Summary) -> Result<()> {
    let peer = sibling("kv_channel_peer")?;
    let spawn = |args: &[&str]| {
        Command::new(&peer)
            .args(args)
            .env("LMCACHE_PD_SECRET", CHANNEL_SECRET)
            .env("UCX_TLS", "tcp,self,sm")
            // UCX's ib modules load libnl, whose destructor crashes at exit without InfiniBand.
            .env("UCX_MODULES", "^ib,rdmacm")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut refused = 0;
    for round in 0..rounds {
        let port = kv_integration_tests::services::free_port().to_string();
        let shape = [port.as_str(), "65536", "4", "3"];
        let receiver = spawn(&[&["receive"][..], &shape].concat())?;
        let attacker = spawn(&[&["attack", "all"][..], &shape].concat())?;
        let attacked = attacker.wait_with_output()?;
        let received = receiver.wait_with_output()?;
        let text = |output: &std::process::Output| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        };
        let (attacker_text, receiver_text) = (text(&attacked), text(&received));
        ensure!(
            attacked.status.success() && received.status.success(),
            "round {round}: attacker: {attacker_text}; receiver: {receiver_text}"
        );
        ensure!(
            receiver_text.contains("ok 12"),
            "round {round}: the receiver lost chunks: {receiver_text}"
        );
        ensure!(
            !attacker_text.contains(CHANNEL_SECRET) && !receiver_text.contains(CHANNEL_SECRET),
            "round {round}: the channel secret was printed"
        );
        refused += attacker_text
            .lines()
            .filter(|line| line.starts_with("refused "))
            .count();
    }
    summary.add(
        "hostile peers",
        format!(
            "{refused} hostile channel peers refused in {rounds} round(s) (wrong secret, random \
             bytes, truncated frame, 4 GiB frame, replayed handshake); every honest chunk intact"
        ),
        true,
    );
    Ok(())
}

/// Secrets never appear in printed configs or logs, even at trace level.
fn secrets(summary: &mut Summary) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("secret.yaml");
    std::fs::write(
        &config,
        format!(
            "nixl_buffer_device: cpu\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: OBJ\n  nixl_pool_size: 0\n  nixl_backend_params:\n    bucket: b\n    access_key: AK-{KVL2_SECRET}\n    secret_key: {KVL2_SECRET}\n    session_token: T-{KVL2_SECRET}\n"
        ),
    )?;
    let kvl2 = sibling("kvl2")?;
    let output = Command::new(&kvl2)
        .args(["config", "check", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .output()?;
    ensure!(
        output.status.success(),
        "config check failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        !printed.contains(KVL2_SECRET),
        "a secret leaked into output or logs"
    );
    summary.add(
        "secrets",
        "access key, secret key and session token redacted in output and trace logs".to_owned(),
        true,
    );
    Ok(())
}

fn main() -> Result<()> {
    let short = std::env::args().any(|a| a == "--short");
    let mut summary = Summary::default();
    let (kills, keys, seconds, iterations, tortures, peer_rounds) = if short {
        (20, 10_000, 3, 2_000, 20_000, 1)
    } else {
        (200, 100_000, 20, 50_000, 1_000_000, 5)
    };
    let sections: Vec<(&str, Section)> = vec![
        ("crash", Box::new(move |s| crash(kills, s))),
        ("corruption", Box::new(corruption)),
        ("full disk", Box::new(full_disk)),
        ("limits", Box::new(move |s| limits(keys, s))),
        ("concurrency", Box::new(move |s| concurrency(seconds, s))),
        ("torture", Box::new(move |s| torture_rows(tortures, s))),
        ("multi-tenant", Box::new(multi_tenant)),
        ("hostile input", Box::new(move |s| hostile(iterations, s))),
        (
            "hostile peers",
            Box::new(move |s| hostile_peers(peer_rounds, s)),
        ),
        ("secrets", Box::new(secrets)),
    ];
    for (name, section) in sections {
        if let Err(err) = section(&mut summary) {
            summary.add(name, format!("{err:#}"), false);
        }
    }
    let failed = summary.rows.iter().filter(|(_, _, ok)| !ok).count();
    println!("\n| section | result | detail |\n|---|---|---|");
    for (section, detail, ok) in &summary.rows {
        println!(
            "| {section} | {} | {detail} |",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    if failed == 0 {
        println!("\ndata lost: 0, wrong data served: 0");
    }
    println!(
        "stress: {} passed, {failed} failed",
        summary.rows.len() - failed
    );
    if failed > 0 {
        bail!("{failed} stress sections failed");
    }
    Ok(())
}
