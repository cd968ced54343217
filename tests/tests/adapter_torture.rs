//! Eight threads torture each adapter on a pool of a few slots (see `torture/mod.rs`): no hit
//! may carry another key's bytes, and a pinned key must load. `kv_stress` runs the same with a
//! million operations per adapter.

mod torture;

use kv_l2_adapter::Engine;
use torture::{Plan, Storage};

const OPERATIONS: u64 = 6_000;
/// Fewer over S3: the server on loopback (SeaweedFS) answers each request in about a millisecond.
const OBJECT_OPERATIONS: u64 = 2_000;

fn tortured(kind: &'static str, storage: Storage, engine: Engine) {
    let operations = match storage {
        Storage::Files | Storage::Segments => OPERATIONS,
        Storage::S3 => OBJECT_OPERATIONS,
    };
    let plan = Plan {
        kind,
        storage,
        engine,
        slots: 6,
        chunk: 128 << 10,
        operations,
    };
    let tally = torture::run(&plan).unwrap_or_else(|err| panic!("{}: {err:#}", plan.label()));
    eprintln!("{}: {tally:?}", plan.label());
    assert_eq!(tally.operations, operations, "{}", plan.label());
    assert!(
        tally.hits > 0,
        "{}: nothing ever loaded: {tally:?}",
        plan.label()
    );
    assert_eq!(
        tally.wrong,
        0,
        "{}: another key's bytes served: {tally:?}",
        plan.label()
    );
    assert_eq!(
        tally.pinned_misses,
        0,
        "{}: a pinned key failed to load: {tally:?}",
        plan.label()
    );
}

#[test]
fn static_native_serves_only_its_own_bytes() {
    tortured("nixl_store", Storage::Files, Engine::Native);
}

#[test]
fn static_nixl_posix_serves_only_its_own_bytes() {
    tortured("nixl_store", Storage::Files, Engine::Nixl);
}

#[test]
fn dynamic_native_serves_only_its_own_bytes() {
    tortured("nixl_store_dynamic", Storage::Files, Engine::Native);
}

#[test]
fn dynamic_nixl_posix_serves_only_its_own_bytes() {
    tortured("nixl_store_dynamic", Storage::Files, Engine::Nixl);
}

#[test]
fn static_s3_objects_serve_only_their_own_bytes() {
    tortured("nixl_store", Storage::S3, Engine::Nixl);
}

#[test]
fn dynamic_s3_objects_serve_only_their_own_bytes() {
    tortured("nixl_store_dynamic", Storage::S3, Engine::Nixl);
}

#[test]
fn dynamic_segments_native_serve_only_their_own_bytes() {
    tortured("nixl_store_dynamic", Storage::Segments, Engine::Native);
}

#[test]
fn dynamic_segments_nixl_posix_serve_only_their_own_bytes() {
    tortured("nixl_store_dynamic", Storage::Segments, Engine::Nixl);
}
