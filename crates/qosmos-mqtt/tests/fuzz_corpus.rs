//! Replays the fuzz corpus (`fuzz/corpus/*`) through the same entry points the fuzz targets
//! use, so every `cargo test` re-checks what the fuzzer found, with or without cargo-fuzz.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            out.push(std::fs::read(e.unwrap().path()).unwrap());
        }
    }
    out
}

#[test]
fn decode_corpus() {
    let inputs = corpus("decode");
    assert!(!inputs.is_empty(), "fuzz/corpus/decode is empty");
    for input in inputs {
        qosmos_mqtt::fuzz::decode(&input);
    }
}

#[test]
fn state_corpus() {
    let inputs = corpus("state");
    assert!(!inputs.is_empty(), "fuzz/corpus/state is empty");
    for input in inputs {
        qosmos_mqtt::state::fuzz_exchange(&input);
    }
}
