//! The inspection and data commands: config check, put, get, contains, rm, ls, stat, evict.

use std::path::{Path, PathBuf};

use kv_config::{AdapterRegistry, ConfigLoader, Deployment};
use kv_l2_adapter::ChunkKey;
use serde_json::json;

use crate::exit::{CliError, CliResult};
use crate::store::{Access, StoreArgs, parse_key};

/// `kvl2 config check`: the normalised spec (secrets redacted), or every error with its key.
pub(crate) fn config_check(configs: &[PathBuf], adapters: &[String]) -> CliResult<()> {
    if configs.is_empty() && adapters.is_empty() {
        return Err(CliError::usage("give --config FILE or --l2-adapter JSON"));
    }
    let mut report = Vec::new();
    let mut errors = Vec::new();
    for path in configs {
        let result = ConfigLoader::new()
            .with_file(path)
            .load()
            .and_then(|loaded| {
                let mut warnings = loaded.warnings;
                let spec = loaded.value.storage_spec(&Deployment::new())?;
                warnings.extend(spec.warnings);
                Ok((spec.value, warnings))
            });
        match result {
            Ok((spec, warnings)) => report.push(json!({
                "source": path.display().to_string(),
                "spec": spec,
                "warnings": warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
            Err(err) => errors.push(format!("{}: {err}", path.display())),
        }
    }
    if !adapters.is_empty() {
        match AdapterRegistry::new().parse(adapters) {
            Ok(loaded) => {
                for spec in loaded.value {
                    report.push(json!({ "source": format!("--l2-adapter #{}", spec.index), "adapter": spec }));
                }
                for warning in loaded.warnings {
                    eprintln!("kvl2: warning: {warning}");
                }
            }
            Err(err) => errors.push(err.to_string()),
        }
    }
    if !errors.is_empty() {
        return Err(CliError::usage(errors.join("\n")));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(())
}

/// `kvl2 put KEY FILE`.
pub(crate) fn put(store: &StoreArgs, key: &str, file: &Path) -> CliResult<()> {
    let key = parse_key(key)?;
    let data = std::fs::read(file)
        .map_err(|e| CliError::usage(format!("reading {}: {e}", file.display())))?;
    if data.is_empty() || data.len() > store.chunk_bytes {
        return Err(CliError::usage(format!(
            "{} is {} bytes; a chunk must be 1 to {} bytes (--chunk-bytes)",
            file.display(),
            data.len(),
            store.chunk_bytes
        )));
    }
    let opened = store.open(1, Access::Write)?;
    let mut page = opened
        .pool
        .allocate()
        .ok_or_else(|| CliError::storage("no free page"))?;
    page.set_len(data.len());
    page.as_mut_slice().copy_from_slice(&data);
    let report = opened.adapter.store(&[key], &[&page]);
    if let Some(kv_l2_adapter::KeyOutcome::Failed(err)) = report.keys.first() {
        return Err(CliError::storage(err));
    }
    println!("{}", json!({ "stored": true, "bytes": data.len() }));
    opened.adapter.close().map_err(CliError::storage)
}

/// `kvl2 get KEY OUT`.
pub(crate) fn get(store: &StoreArgs, key: &str, out: &Path) -> CliResult<()> {
    let text = key;
    let key = parse_key(key)?;
    let opened = store.open(1, Access::Read)?;
    let size = opened
        .adapter
        .stored_size(&key)
        .ok_or_else(|| CliError::miss(format!("{text}: not stored")))?;
    if size as usize > store.chunk_bytes {
        return Err(CliError::usage(format!(
            "{text} holds {size} bytes; raise --chunk-bytes to at least that"
        )));
    }
    let mut page = opened
        .pool
        .allocate()
        .ok_or_else(|| CliError::storage("no free page"))?;
    page.set_len(size as usize);
    if !opened.adapter.load(&[key], &mut [&mut page])[0] {
        return Err(CliError::miss(format!("{text}: not stored or unreadable")));
    }
    std::fs::write(out, page.as_slice())
        .map_err(|e| CliError::storage(format!("writing {}: {e}", out.display())))?;
    println!("{}", json!({ "loaded": true, "bytes": size }));
    Ok(())
}

fn keys_of(texts: &[String]) -> CliResult<Vec<ChunkKey>> {
    if texts.is_empty() {
        return Err(CliError::usage("give at least one KEY"));
    }
    texts.iter().map(|t| parse_key(t)).collect()
}

/// `kvl2 contains KEY...`: leading-hit count and per-key bits.
pub(crate) fn contains(store: &StoreArgs, texts: &[String]) -> CliResult<()> {
    let keys = keys_of(texts)?;
    let opened = store.open(1, Access::Read)?;
    let bits = opened.adapter.lookup_and_pin(&keys);
    opened.adapter.unlock(&keys);
    let leading = opened.adapter.batched_contains(&keys);
    println!("{}", json!({ "leading_hits": leading, "present": bits }));
    if bits.iter().all(|b| *b) {
        Ok(())
    } else {
        Err(CliError::miss(""))
    }
}

/// `kvl2 rm KEY...`.
pub(crate) fn rm(store: &StoreArgs, texts: &[String]) -> CliResult<()> {
    let keys = keys_of(texts)?;
    let opened = store.open(1, Access::Write)?;
    // Deletion acts on what the adapter knows; a lookup first recovers keys stored by others.
    opened.adapter.lookup_and_pin(&keys);
    opened.adapter.unlock(&keys);
    let deleted = opened.adapter.delete(&keys);
    println!("{}", json!({ "deleted": deleted }));
    if deleted == keys.len() {
        Ok(())
    } else {
        Err(CliError::miss(format!(
            "{} of {} keys were not stored",
            keys.len() - deleted,
            keys.len()
        )))
    }
}

/// `kvl2 ls`: one JSON line per chunk of a dynamic store (files, segments or objects).
pub(crate) fn ls(store: &StoreArgs) -> CliResult<()> {
    let opened = store.open(1, Access::Read)?;
    let Some(chunks) = opened.stored_chunks()? else {
        return Err(CliError::usage(
            "ls lists dynamic stores (--dir, or nixl_store_dynamic on a file or object backend)",
        ));
    };
    for chunk in chunks {
        println!(
            "{}",
            json!({
                "model": chunk.key.model,
                "kv_rank": chunk.key.kv_rank,
                "group_id": chunk.key.group_id,
                "chunk_hash": chunk.key.chunk_hash.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                "cache_salt": chunk.key.cache_salt,
                "bytes": chunk.bytes,
                "path": chunk.place,
            })
        );
    }
    Ok(())
}

/// `kvl2 stat --json`: the metrics the store reports, read once through a recorder of this
/// command's own.
fn stat_metrics(store: &StoreArgs) -> CliResult<()> {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || -> CliResult<()> {
        let opened = store.open(1, Access::Read)?;
        opened.adapter.usage();
        Ok(())
    })?;
    let mut figures: Vec<serde_json::Value> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, value) = match value {
                DebugValue::Counter(n) => ("counter", json!(n)),
                DebugValue::Gauge(g) => ("gauge", json!(g.into_inner())),
                DebugValue::Histogram(samples) => ("histogram", json!(samples.len())),
            };
            let labels: serde_json::Map<String, serde_json::Value> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), json!(l.value())))
                .collect();
            json!({ "name": key.key().name(), "type": kind, "labels": labels, "value": value })
        })
        .collect();
    figures.sort_by_key(|f| f.to_string());
    println!("{}", json!({ "metrics": figures }));
    Ok(())
}

/// `kvl2 stat`: usage, capacity, counts (`--json`: the store's metrics).
pub(crate) fn stat(store: &StoreArgs, as_metrics: bool) -> CliResult<()> {
    if as_metrics {
        return stat_metrics(store);
    }
    let opened = store.open(1, Access::Read)?;
    let usage = opened.adapter.usage();
    let status = opened.adapter.status();
    let on_disk = match opened.stored_chunks()? {
        Some(chunks) => json!({
            "chunks": chunks.len(),
            "bytes": chunks.iter().map(|c| c.bytes).sum::<u64>(),
        }),
        None => serde_json::Value::Null,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "type": status.adapter_type,
            "backend": status.backend,
            "healthy": status.is_healthy,
            "indexed_keys": usage.keys,
            "pinned_keys": usage.pinned,
            "used_bytes": usage.used_bytes,
            "capacity_bytes": usage.capacity_bytes,
            "usage_fraction": usage.fraction(),
            "on_disk": on_disk,
        }))
        .unwrap_or_default()
    );
    Ok(())
}

/// `kvl2 evict`: one LRU pass now.
pub(crate) fn evict(store: &StoreArgs, ratio: f64) -> CliResult<()> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(CliError::usage("--ratio must be in [0, 1]"));
    }
    let opened = store.open(1, Access::Write)?;
    if !opened.persists {
        // Its recovery below looks every stored chunk up, and a store that does not persist
        // deletes what it looked up when it closes: the pass would empty the store.
        return Err(CliError::usage(
            "evict does not run on a store with persist_enabled: false (closing it would delete              every chunk the pass looks at)",
        ));
    }
    if opened.folder.is_some() || opened.lists_objects() {
        // A fresh process knows nothing yet: recover what is stored so LRU can see it.
        let chunks = opened.stored_chunks()?.unwrap_or_default();
        let keys: Vec<ChunkKey> = chunks
            .into_iter()
            .map(|c| ChunkKey::from_file_key(c.key))
            .collect();
        opened.adapter.lookup_and_pin(&keys);
        opened.adapter.unlock(&keys);
    }
    let evicting = crate::store::working("evicting");
    let report = opened.adapter.evict(ratio, None);
    evicting.finish_and_clear();
    println!(
        "{}",
        json!({ "evicted": report.evicted, "freed_bytes": report.freed_bytes, "skipped_pinned": report.skipped_pinned })
    );
    Ok(())
}
