//! The decoder on arbitrary bytes, both roles and versions; every accepted packet must
//! round-trip. The checks live in `qosmos_mqtt::fuzz` so `cargo test` replays the corpus too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qosmos_mqtt::fuzz::decode(data));
