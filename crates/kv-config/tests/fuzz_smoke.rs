//! A bounded, deterministic run of the config fuzzer: thousands of mutated YAML, JSON and
//! environment inputs must all be rejected or accepted without a panic.

#[path = "../fuzz/mutate.rs"]
mod mutate;

#[test]
fn mutated_inputs_never_panic() {
    let corpus =
        mutate::load_corpus(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"));
    assert!(corpus.len() >= 5, "the corpus must hold the seeds");
    let mut rng = mutate::Rng::new(0x5EED);
    for run in 0..3000 {
        let input = mutate::mutate(&mut rng, &corpus);
        assert!(
            mutate::exercise(&input),
            "input {run} panicked: {:?}",
            String::from_utf8_lossy(&input)
        );
    }
}

#[test]
fn every_seed_is_exercised_as_is() {
    let corpus =
        mutate::load_corpus(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"));
    for seed in &corpus {
        assert!(mutate::exercise(seed));
    }
}
