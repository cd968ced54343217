//! The dynamic store after a restart and against crafted folders: keys that look like
//! temporaries, files torn by a power loss, headers made to crash parsers, errors that name
//! what failed.
#![cfg(target_os = "linux")]

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use common::{CHUNK, Fixture, key};
use nixl_core::header::{self, HEADER_BYTES};
use nixl_file::{DynamicConfig, DynamicFileStore, FileKey, Result, list_dir};

fn put(fixture: &Fixture, store: &DynamicFileStore, key: &FileKey, fill: u8) -> Result<u64> {
    let page = fixture.page(fill);
    store.put(&[(key, &page)]).remove(0)
}

#[test]
fn keys_holding_the_temporary_marker_survive_a_reopen() {
    let fixture = Fixture::new(4);
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        key("org/a.tmp.b", Some("s.tmp.1.2")),
        key("m.tmp.1", Some("a.bin.tmp.5.1")),
        key("plain", Some(".tmp.77.ab")),
    ];
    let store = fixture.open(DynamicConfig::new(dir.path()));
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(put(&fixture, &store, key, i as u8).unwrap(), CHUNK as u64);
    }
    drop(store);
    let store = fixture.open(DynamicConfig::new(dir.path()));
    for (i, key) in keys.iter().enumerate() {
        assert!(
            fixture.get(&store, key, i as u8).unwrap(),
            "{key:?} lost at reopen"
        );
    }
    assert_eq!(
        list_dir(dir.path()).unwrap().len(),
        keys.len(),
        "all listed"
    );
}

/// An empty temporary nobody has locked may be a writer between its create and its lock: it
/// stays while the pid in its name lives, and goes once that pid is gone.
#[test]
fn an_unlocked_empty_temporary_stays_while_its_pid_lives() {
    let fixture = Fixture::new(1);
    let dir = tempfile::tempdir().unwrap();
    let name = |pid: u32| format!("m_00000001_2_ab.bin.tmp.{pid}.0123456789abcdef.1");
    let live = dir.path().join(name(std::process::id()));
    let gone = dir.path().join(name(u32::MAX));
    fs::write(&live, b"").unwrap();
    fs::write(&gone, b"").unwrap();
    let _store = fixture.open(DynamicConfig::new(dir.path()));
    assert!(live.exists());
    assert!(!gone.exists());
}

#[test]
fn torn_truncated_and_copied_files_read_as_absent() {
    let fixture = Fixture::new(4);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(DynamicConfig::new(dir.path()));
    let [torn, cut, intact, copy] = ["torn", "cut", "intact", "copy"].map(|m| key(m, None));
    for k in [&torn, &cut, &intact] {
        put(&fixture, &store, k, 3).unwrap();
    }
    // What a power loss can leave without durability: the published name over zeros.
    OpenOptions::new()
        .write(true)
        .open(store.path_of(&torn).unwrap())
        .unwrap()
        .write_all_at(&[0u8; HEADER_BYTES], 0)
        .unwrap();
    let path = store.path_of(&cut).unwrap();
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    fs::copy(
        store.path_of(&intact).unwrap(),
        store.path_of(&copy).unwrap(),
    )
    .unwrap();
    let listed: Vec<FileKey> = list_dir(dir.path())
        .unwrap()
        .into_iter()
        .map(|c| c.key)
        .collect();
    assert_eq!(
        listed,
        vec![intact.clone()],
        "only the intact file is listed"
    );
    for k in [&torn, &cut, &copy] {
        assert!(!store.contains(k).unwrap(), "{k:?} reported present");
        assert_eq!(store.stored_size(k).unwrap(), None, "{k:?}");
        assert!(!fixture.get(&store, k, 3).unwrap(), "{k:?} loaded");
    }
    assert!(store.contains(&intact).unwrap());
    assert_eq!(store.stored_size(&intact).unwrap(), Some(CHUNK as u64));
}

/// The finding: a well-formed header whose key has a multi-byte character in its hash made
/// `list_dir` (and so `kvl2 ls`, `stat`, `evict`) panic.
#[test]
fn a_crafted_header_is_skipped_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for (name, key) in [
        ("m_00000001_0_e282aca.bin", "m\x001\x000\x00\u{20ac}a\x00"),
        ("m_00000001_0_0f.bin", "m\x001\x000\x00+f\x00"),
        ("m_00000001_0_ab.bin", "../m\x001\x000\x00ab\x00"),
    ] {
        let mut bytes = vec![0u8; HEADER_BYTES];
        header::write(&mut bytes, key.as_bytes(), &[]).unwrap();
        fs::write(dir.path().join(name), &bytes).unwrap();
    }
    let listed = std::panic::catch_unwind(|| list_dir(dir.path()))
        .expect("list_dir panicked")
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
}

#[test]
fn errors_of_put_get_contains_and_delete_name_the_key_and_its_file() {
    let fixture = Fixture::new(4);
    let dir = tempfile::tempdir().unwrap();
    let store = fixture.open(DynamicConfig::new(dir.path()).with_shard_dirs(true));
    let k = key("org/err-model", None);
    let path = store.path_of(&k).unwrap();
    let names_both = |err: &nixl_file::Error| {
        let text = err.to_string();
        // The model as the key has it (the file name spells `/` as `--`), and the file.
        text.contains("\"org/err-model\"") && text.contains(&path.display().to_string())
    };
    // A file where the shard folder must go.
    fs::write(dir.path().join("de"), b"").unwrap();
    let err = put(&fixture, &store, &k, 1).unwrap_err();
    assert!(names_both(&err), "put: {err}");
    fs::remove_file(dir.path().join("de")).unwrap();
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A link to itself: opening it fails.
    std::os::unix::fs::symlink(&path, &path).unwrap();
    let err = fixture.get(&store, &k, 1).unwrap_err();
    assert!(names_both(&err), "get: {err}");
    let err = store.contains(&k).unwrap_err();
    assert!(names_both(&err), "contains: {err}");
    fs::remove_file(&path).unwrap();
    put(&fixture, &store, &k, 1).unwrap();
    // A file where the recycle folder must go.
    fs::write(dir.path().join(".recycle"), b"").unwrap();
    let err = store.delete(&k).unwrap_err();
    assert!(names_both(&err), "delete: {err}");
}
