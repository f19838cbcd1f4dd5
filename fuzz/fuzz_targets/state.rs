//! The QoS state machines on an in-memory link that drops, duplicates and reorders packets
//! and reconnects, as scripted by the input; panics when exactly-once or at-least-once breaks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qosmos_mqtt::state::fuzz_exchange(data));
