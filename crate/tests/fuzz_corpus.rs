//! Replays the committed fuzz seed corpus (`fuzz/corpus/<target>/`) through the same entry points as the fuzz
//! targets: a short smoke run of the fuzzers' checks on every `scripts/test`.
#![cfg(not(target_arch = "wasm32"))]

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
    {
        let data = std::fs::read(entry.path()).unwrap();
        if std::env::var_os("VRAMFIT_FUZZ_VERBOSE").is_some() {
            eprintln!("{}", entry.path().display());
        }
        run(&data);
        n += 1;
    }
    n
}

#[test]
fn seed_corpus_replays_without_a_panic() {
    assert!(replay("estimate", vramfit::fuzzing::estimate_from_bytes) >= 1);
    assert!(replay("nanogpt_config", vramfit::fuzzing::nanogpt_config) >= 3);
    assert!(replay("hf_config", vramfit::fuzzing::hf_config) >= 2);
    assert!(replay("url_state", vramfit::fuzzing::url_state) >= 2);
    assert!(replay("snapshot", vramfit::fuzzing::snapshot) >= 4);
}
