//! The `kvl2` binary, driven as a user would: every subcommand, bad input, exit codes.

use std::path::Path;
use std::process::{Command, Output};

const KVL2: &str = env!("CARGO_BIN_EXE_kvl2");

fn kvl2(args: &[&str]) -> Output {
    Command::new(KVL2)
        .args(args)
        .output()
        .expect("running kvl2")
}

fn kvl2_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(KVL2);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("running kvl2")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exit code")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_str(stdout(output).trim())
        .unwrap_or_else(|e| panic!("{e}: {}", stdout(output)))
}

fn dir_args(dir: &Path) -> Vec<String> {
    vec![
        "--dir".into(),
        dir.display().to_string(),
        "--chunk-bytes".into(),
        "1048576".into(),
    ]
}

fn run(cmd: &str, dir: &Path, rest: &[&str]) -> Output {
    let mut args: Vec<String> = vec![cmd.to_owned()];
    args.extend(dir_args(dir));
    args.extend(rest.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kvl2(&refs)
}

#[test]
fn put_get_contains_rm_ls_stat_evict_round_trip() {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("chunk.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let key = "org/model@1@0@abc123@bfloat16";

    let put = run("put", store.path(), &[key, input.to_str().unwrap()]);
    assert_eq!(code(&put), 0, "{}", stderr(&put));
    assert_eq!(json(&put)["bytes"], 300_000);

    let out = work.path().join("back.bin");
    let get = run("get", store.path(), &[key, out.to_str().unwrap()]);
    assert_eq!(code(&get), 0, "{}", stderr(&get));
    assert_eq!(std::fs::read(&out).unwrap(), data, "bytes come back intact");

    let contains = run("contains", store.path(), &[key, "missing-page", key]);
    assert_eq!(code(&contains), 1, "a missing key is a miss");
    let answer = json(&contains);
    assert_eq!(answer["leading_hits"], 1);
    assert_eq!(answer["present"], serde_json::json!([true, false, true]));

    let ls = run("ls", store.path(), &[]);
    assert_eq!(code(&ls), 0, "{}", stderr(&ls));
    let listed: Vec<serde_json::Value> = stdout(&ls)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["model"], "org/model");
    assert_eq!(listed[0]["bytes"], 300_000);

    let stat = run("stat", store.path(), &[]);
    assert_eq!(code(&stat), 0);
    let stat: serde_json::Value = serde_json::from_str(&stdout(&stat)).unwrap();
    assert_eq!(stat["on_disk"]["chunks"], 1);
    assert_eq!(stat["type"], "nixl_store_dynamic");

    let evict = run("evict", store.path(), &["--ratio", "1"]);
    assert_eq!(code(&evict), 0, "{}", stderr(&evict));
    assert_eq!(json(&evict)["evicted"], 1);

    let gone = run("get", store.path(), &[key, out.to_str().unwrap()]);
    assert_eq!(code(&gone), 1, "evicted keys miss");

    run("put", store.path(), &["page-a", input.to_str().unwrap()]);
    let rm = run("rm", store.path(), &["page-a", "page-b"]);
    assert_eq!(code(&rm), 1, "one of two keys was not there");
    assert_eq!(json(&rm)["deleted"], 1);
}

#[test]
fn get_of_an_unknown_key_is_a_miss() {
    let store = tempfile::tempdir().unwrap();
    let out = store.path().join("out");
    let get = run(
        "get",
        store.path(),
        &["never-stored", out.to_str().unwrap()],
    );
    assert_eq!(code(&get), 1);
    assert!(stderr(&get).contains("not stored"), "{}", stderr(&get));
}

#[test]
fn bad_usage_exits_2() {
    let store = tempfile::tempdir().unwrap();
    let missing = run("put", store.path(), &["k", "/no/such/input"]);
    assert_eq!(code(&missing), 2);
    assert!(
        stderr(&missing).contains("/no/such/input"),
        "{}",
        stderr(&missing)
    );

    let no_store = kvl2(&["stat"]);
    assert_eq!(code(&no_store), 2);
    assert!(stderr(&no_store).contains("--dir"), "{}", stderr(&no_store));

    let hostile = run("contains", store.path(), &["../../etc/passwd@1@0@1@bf16"]);
    assert_eq!(code(&hostile), 2, "{}", stderr(&hostile));

    assert_eq!(code(&kvl2(&["no-such-command"])), 2);
    assert_eq!(code(&kvl2(&["bench", "--model", "gpt-9"])), 2);
}

#[test]
fn config_check_prints_the_redacted_spec_or_every_error() {
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good.yaml");
    std::fs::write(
        &good,
        "nixl_buffer_device: cpu\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: OBJ\n  nixl_pool_size: 0\n  nixl_backend_params:\n    bucket: kv\n    secret_key: TOPSECRET123\n",
    )
    .unwrap();
    let ok = kvl2(&["config", "check", "--config", good.to_str().unwrap()]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    let text = stdout(&ok);
    assert!(text.contains("\"backend\": \"OBJ\""), "{text}");
    assert!(
        !text.contains("TOPSECRET123"),
        "secrets are redacted: {text}"
    );
    assert!(!stderr(&ok).contains("TOPSECRET123"));

    let bad = work.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "extra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n",
    )
    .unwrap();
    let err = kvl2(&["config", "check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code(&err), 2);
    let text = stderr(&err);
    assert!(text.contains("nixl_pool_size"), "{text}");
    assert!(text.contains("nixl_buffer_device"), "{text}");

    let corrupt = work.path().join("corrupt.yaml");
    std::fs::write(&corrupt, "extra_config: [unclosed\n").unwrap();
    let err = kvl2(&["config", "check", "--config", corrupt.to_str().unwrap()]);
    assert_eq!(code(&err), 2);
    assert!(stderr(&err).contains("corrupt.yaml"), "{}", stderr(&err));

    let adapter = kvl2(&[
        "config",
        "check",
        "--l2-adapter",
        r#"{"type":"nixl_store","backend":"POSIX"}"#,
    ]);
    assert_eq!(code(&adapter), 2);
    assert!(
        stderr(&adapter).contains("pool_size"),
        "{}",
        stderr(&adapter)
    );
}

#[test]
fn without_a_nixl_runtime_nixl_fails_clearly_and_bench_falls_back() {
    let empty = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let env = [("NIXL_LIB_DIR", empty.path().to_str().unwrap())];
    let mut args = vec!["stat".to_owned(), "--engine".into(), "nixl".into()];
    args.extend(dir_args(store.path()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let nixl = kvl2_env(&refs, &env);
    // Built with NIXL, its runtime is missing; built without, NIXL is. Either way the message
    // says how to get it.
    assert_eq!(code(&nixl), 3, "{}", stderr(&nixl));
    assert!(
        stderr(&nixl).contains("cargo xtask setup"),
        "{}",
        stderr(&nixl)
    );

    let bench = kvl2_env(
        &[
            "bench",
            "--chunk-bytes",
            "1048576",
            "--chunks",
            "4",
            "--json",
            "--dir",
            store.path().to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(code(&bench), 0, "{}", stderr(&bench));
    let result = json(&bench);
    assert_eq!(result["engine"], "native io_uring");
    assert_eq!(result["verified_chunks"], 4);
}

#[test]
fn bench_runs_end_to_end_and_reports_json() {
    let bench = kvl2(&[
        "bench",
        "--chunk-bytes",
        "262144",
        "--chunks",
        "16",
        "--batch",
        "4",
        "--json",
    ]);
    assert_eq!(code(&bench), 0, "{}", stderr(&bench));
    let result = json(&bench);
    for field in [
        "put_gbps",
        "get_gbps",
        "lookups_per_s",
        "put_batch_ms_p99",
        "cpu_seconds_per_gb",
    ] {
        assert!(result[field].as_f64().unwrap() > 0.0, "{field}: {result}");
    }
    assert_eq!(result["verified_chunks"], 16);
}

/// `--worker-id` and `--gpu` say which worker this is: `by_gpu` sharding puts the chunks of
/// GPU 2 (by default the GPU of worker 2) under the third of three folders.
#[test]
fn worker_id_and_gpu_pick_the_by_gpu_folder() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("chunk.bin");
    std::fs::write(&input, vec![7u8; 65536]).unwrap();
    for flags in [["--worker-id", "2"], ["--gpu", "2"]] {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let list = dirs
            .iter()
            .map(|d| d.path().display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let config = work.path().join("static.yaml");
        std::fs::write(
            &config,
            format!(
                "nixl_buffer_device: cpu\nmax_local_cpu_size: 0.01\nextra_config:\n  enable_nixl_storage: true\n  nixl_backend: POSIX\n  nixl_pool_size: 2\n  nixl_path: \"{list}\"\n"
            ),
        )
        .unwrap();
        let config = config.display().to_string();
        let put = kvl2(&[
            "put",
            "--config",
            &config,
            "--engine",
            "uring",
            "--chunk-bytes",
            "65536",
            flags[0],
            flags[1],
            "page-1",
            input.to_str().unwrap(),
        ]);
        assert_eq!(code(&put), 0, "{flags:?}: {}", stderr(&put));
        let count = |d: &tempfile::TempDir| std::fs::read_dir(d.path()).unwrap().count();
        assert_eq!(
            (count(&dirs[0]), count(&dirs[1])),
            (0, 0),
            "{flags:?}: nothing under the first two folders"
        );
        assert!(
            count(&dirs[2]) > 0,
            "{flags:?}: the slots are under the third"
        );
    }
}

/// `kvl2 put` in a loop, one process per put, against a store with room for 4 chunks and LRU
/// eviction, per-key files and segments: every put is accepted, and the folder never holds
/// more than the capacity, since each process counts what the earlier ones stored.
#[test]
fn put_in_a_loop_keeps_accepting_past_capacity_and_stays_within_it() {
    for layout in ["files", "segments"] {
        put_in_a_loop(layout);
    }
}

fn put_in_a_loop(layout: &str) {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let chunk = 65536;
    let capacity = 4 * chunk as u64;
    let capacity_gb = capacity as f64 / (1u64 << 30) as f64;
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"{capacity_gb}","layout":"{layout}"}},"eviction":{{"eviction_policy":"LRU","trigger_watermark":0.75,"eviction_ratio":0.5}}}}"#,
        store.path().display()
    );
    let input = work.path().join("chunk.bin");
    std::fs::write(&input, vec![3u8; chunk]).unwrap();
    for i in 0..12 {
        let key = format!("page-{i}");
        let put = kvl2(&[
            "put",
            "--l2-adapter",
            &json,
            "--engine",
            "uring",
            "--chunk-bytes",
            &chunk.to_string(),
            &key,
            input.to_str().unwrap(),
        ]);
        assert_eq!(code(&put), 0, "{layout}: put {i}: {}", stderr(&put));
        // Counted on disk, not through the store (opening one to list must not be what keeps
        // the folder within capacity).
        let files: Vec<(String, u64)> = std::fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().len())
            })
            .collect();
        if layout == "files" {
            let stored = files
                .iter()
                .filter(|(name, _)| name.ends_with(".bin"))
                .count();
            assert!(
                stored <= 4,
                "after put {i}: {stored} chunks stored in room for 4"
            );
        } else {
            let bytes: u64 = files
                .iter()
                .filter(|(name, _)| name.ends_with(".kvseg"))
                .map(|(_, len)| len)
                .sum();
            assert!(
                bytes > 0 && bytes <= capacity,
                "after put {i}: {bytes} bytes of segments"
            );
        }
    }
    let get = kvl2(&[
        "get",
        "--l2-adapter",
        &json,
        "--engine",
        "uring",
        "--chunk-bytes",
        &chunk.to_string(),
        "page-11",
        work.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(code(&get), 0, "the newest chunk is kept: {}", stderr(&get));
}

/// `put`, `get`, `ls` and `stat` on a segment store (`layout: segments`): chunks land in
/// segment files, not a file per key, and listing reads them back from the segment headers.
#[test]
fn segment_layout_round_trips_and_lists() {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"type":"nixl_store_dynamic","backend":"POSIX","backend_params":{{"file_path":"{}","max_capacity_gb":"0.01","layout":"segments","segment_size_mb":"2"}}}}"#,
        store.path().display()
    );
    let common = [
        "--l2-adapter",
        json.as_str(),
        "--engine",
        "uring",
        "--chunk-bytes",
        "65536",
    ];
    let input = work.path().join("chunk.bin");
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let run = |command: &[&str]| {
        let mut args = vec![command[0]];
        args.extend(common);
        args.extend(&command[1..]);
        kvl2(&args)
    };
    let put = run(&["put", "page-1", input.to_str().unwrap()]);
    assert_eq!(code(&put), 0, "{}", stderr(&put));
    let out = work.path().join("out.bin");
    let get = run(&["get", "page-1", out.to_str().unwrap()]);
    assert_eq!(code(&get), 0, "{}", stderr(&get));
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let ls = run(&["ls"]);
    assert_eq!(code(&ls), 0, "{}", stderr(&ls));
    let listed: Vec<serde_json::Value> = stdout(&ls)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["bytes"], 50_000);
    assert!(listed[0]["path"].as_str().unwrap().starts_with("segment "));
    let stat: serde_json::Value = serde_json::from_str(&stdout(&run(&["stat"]))).unwrap();
    assert_eq!(stat["on_disk"]["chunks"], 1);
    assert!(
        std::fs::read_dir(store.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".bin")),
        "no file per key"
    );
}

/// GET `path` from `addr` over plain HTTP/1.0: the body, or `None` while nothing answers.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_owned())
}

/// `kvl2 bench --metrics` serves the Prometheus text format over HTTP on loopback while it
/// runs (and `--metrics-linger` after): scraped, parsed, and the figures of the run are there.
#[test]
fn bench_serves_its_metrics_in_the_prometheus_format() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(KVL2)
        .args([
            "bench",
            "--engine",
            "uring",
            "--chunk-bytes",
            "65536",
            "--chunks",
            "16",
            "--batch",
            "4",
            "--json",
            "--metrics",
            &addr,
            "--metrics-linger",
            "20",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let value = |scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .next()
    };
    let scrape = loop {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no complete scrape within 60 s"
        );
        if let Some(body) = http_get(&addr, "/metrics") {
            let lines = body.lines().map(|l| Ok(l.to_owned()));
            let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
            if value(&scrape, "kv_l2_load_hits_total", &[]) == Some(16.0) {
                break scrape;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let tier = [
        ("adapter", "nixl_store_dynamic"),
        ("backend", "POSIX"),
        ("layout", "segments"),
    ];
    let stored = [tier.as_slice(), &[("outcome", "stored")]].concat();
    assert_eq!(
        value(&scrape, "kv_l2_store_keys_total", &stored),
        Some(16.0)
    );
    assert_eq!(
        value(&scrape, "kv_l2_store_bytes_total", &tier),
        Some((16 * 65536) as f64)
    );
    assert_eq!(
        value(&scrape, "kv_l2_load_bytes_total", &tier),
        Some((16 * 65536) as f64)
    );
    assert!(
        scrape.samples.iter().any(
            |s| s.metric == "kv_l2_batch_seconds" && s.labels.get("operation") == Some("store")
        ),
        "the batch latency of stores is served"
    );
}

/// Long work shows progress only on a terminal: with standard error captured, opening a store
/// and evicting print nothing there.
#[test]
fn progress_is_not_printed_when_stderr_is_not_a_terminal() {
    let store = tempfile::tempdir().unwrap();
    let data = store.path().join("chunk");
    std::fs::write(&data, vec![7u8; 4096]).unwrap();
    let put = run(
        "put",
        store.path(),
        &["m@1@0@ab@bf16", &data.display().to_string()],
    );
    assert_eq!(code(&put), 0, "{}", stderr(&put));
    for command in ["stat", "evict"] {
        let out = run(command, store.path(), &[]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stderr(&out).is_empty(),
            "{command} printed to a captured stderr: {:?}",
            stderr(&out)
        );
    }
}
