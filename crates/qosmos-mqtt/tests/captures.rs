//! Decodes packets captured from independent implementations (paho-mqtt and Mosquitto, see
//! `tests/captures/README.md`): every one must be accepted, and must survive re-encoding.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::BytesMut;
use qosmos_mqtt::*;
use std::collections::BTreeSet;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn check(file: &str, version: ProtocolVersion) -> BTreeSet<String> {
    let text = std::fs::read_to_string(format!(
        "{}/tests/captures/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut seen = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [source, direction, name, bytes] = parts[..] else {
            panic!("bad line {line}")
        };
        let bytes = hex(bytes);
        let role = if direction == "c2s" {
            Role::Server
        } else {
            Role::Client
        };
        let start = if name == "CONNECT" {
            None
        } else {
            Some(version)
        };
        let packet = decode_packet(&bytes, role, start)
            .unwrap_or_else(|e| panic!("{source} {direction} {name} refused: {e}\n{line}"));
        assert_eq!(packet.packet_type().name(), name, "{line}");
        let mut again = BytesMut::new();
        encode_packet(&packet, version, &mut again).unwrap();
        // Fields with one encoding must come back byte for byte; short forms of
        // acknowledgements may legitimately differ.
        if matches!(
            packet,
            Packet::Connect(_) | Packet::Publish(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_)
        ) {
            assert_eq!(again.to_vec(), bytes, "{line}");
        }
        assert_eq!(
            decode_packet(&again, role, start).unwrap(),
            packet,
            "{line}"
        );
        seen.insert(name.to_string());
    }
    seen
}

const ALL: [&str; 14] = [
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
];

#[test]
fn every_v311_capture_decodes() {
    let seen = check("v311.txt", ProtocolVersion::V311);
    for t in ALL {
        assert!(seen.contains(t), "no 3.1.1 {t} captured");
    }
}

#[test]
fn every_v5_capture_decodes() {
    let seen = check("v5.txt", ProtocolVersion::V5);
    for t in ALL.iter().chain(&["AUTH"]) {
        assert!(seen.contains(*t), "no 5.0 {t} captured");
    }
}
