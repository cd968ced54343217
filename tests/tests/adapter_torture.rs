//! Eight threads torture each adapter on a pool of a few slots (see `torture/mod.rs`): no hit
//! may carry another key's bytes, and a pinned key must load. `kv_stress` runs the same with a
//! million operations per adapter.

mod torture;

use kv_l2_adapter::Engine;
use torture::Plan;

const OPERATIONS: u64 = 6_000;

fn tortured(kind: &'static str, engine: Engine) {
    let plan = Plan {
        kind,
        engine,
        slots: 6,
        chunk: 128 << 10,
        operations: OPERATIONS,
    };
    let tally = torture::run(&plan).unwrap_or_else(|err| panic!("{}: {err:#}", plan.label()));
    eprintln!("{}: {tally:?}", plan.label());
    assert_eq!(tally.operations, OPERATIONS, "{}", plan.label());
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
    tortured("nixl_store", Engine::Native);
}

#[test]
fn static_nixl_posix_serves_only_its_own_bytes() {
    tortured("nixl_store", Engine::Nixl);
}

#[test]
fn dynamic_native_serves_only_its_own_bytes() {
    tortured("nixl_store_dynamic", Engine::Native);
}

#[test]
fn dynamic_nixl_posix_serves_only_its_own_bytes() {
    tortured("nixl_store_dynamic", Engine::Nixl);
}
