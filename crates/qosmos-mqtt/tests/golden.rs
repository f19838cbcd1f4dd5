//! Byte vectors given in the MQTT 3.1.1 and 5.0 specifications.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::{Bytes, BytesMut};
use qosmos_mqtt::*;

fn encode(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_packet(p, v, &mut b).unwrap();
    b.to_vec()
}

/// 3.1.1 section 3.1.2.10, figure 3.6: the CONNECT variable header example: protocol name,
/// level 4, flags 0xCE (user name, password, will QoS 1, will, clean session), keep alive 10.
#[test]
fn v311_connect_variable_header_example() {
    let mut c = Connect::new(ProtocolVersion::V311, "c");
    c.keep_alive = 10;
    c.will = Some(LastWill {
        topic: "w".into(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::new(),
    });
    c.username = Some("u".into());
    c.password = Some(Bytes::from_static(b"p"));
    let wire = encode(&Packet::Connect(Box::new(c.clone())), ProtocolVersion::V311);
    assert_eq!(
        &wire[2..12],
        &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A]
    );
    assert_eq!(
        decode_packet(&wire, Role::Server, None).unwrap(),
        Packet::Connect(Box::new(c))
    );
}

/// 5.0 section 3.1.2.12, figure 3-6: the CONNECT variable header example with properties
/// length 5 and Session Expiry Interval 10.
#[test]
fn v5_connect_variable_header_example() {
    let mut c = Connect::new(ProtocolVersion::V5, "c");
    c.keep_alive = 10;
    c.will = Some(LastWill {
        topic: "w".into(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::new(),
    });
    c.username = Some("u".into());
    c.password = Some(Bytes::from_static(b"p"));
    c.properties.set_session_expiry_interval(10);
    let wire = encode(&Packet::Connect(Box::new(c.clone())), ProtocolVersion::V5);
    assert_eq!(
        &wire[2..18],
        &[
            0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xCE, 0x00, 0x0A, 0x05, 0x11, 0x00, 0x00,
            0x00, 0x0A
        ]
    );
    assert_eq!(
        decode_packet(&wire, Role::Server, None).unwrap(),
        Packet::Connect(Box::new(c))
    );
}

/// 3.1.1 section 3.3.2.3, figure 3.11: PUBLISH variable header for topic "a/b", packet id 10.
#[test]
fn v311_publish_variable_header_example() {
    let mut p = Publish::new("a/b", Bytes::new());
    p.qos = QoS::AtLeastOnce;
    p.packet_id = PacketId::new(10);
    let wire = encode(&Packet::Publish(p.clone()), ProtocolVersion::V311);
    assert_eq!(wire, [0x32, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A]);
    assert_eq!(
        decode_packet(&wire, Role::Client, Some(ProtocolVersion::V311)).unwrap(),
        Packet::Publish(p)
    );
}

/// 5.0 section 3.3.2.3, figure 3-9: the same with a property length of 0.
#[test]
fn v5_publish_variable_header_example() {
    let mut p = Publish::new("a/b", Bytes::new());
    p.qos = QoS::AtLeastOnce;
    p.packet_id = PacketId::new(10);
    let wire = encode(&Packet::Publish(p.clone()), ProtocolVersion::V5);
    assert_eq!(
        wire,
        [0x32, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, 0x00]
    );
    assert_eq!(
        decode_packet(&wire, Role::Client, Some(ProtocolVersion::V5)).unwrap(),
        Packet::Publish(p)
    );
}

/// Both specifications' UTF-8 example (1.5.3 / 1.5.4): "A𪛔" is 0x00 0x05 0x41 0xF0 0xAA 0x9B 0x94.
#[test]
fn utf8_string_example() {
    let p = Publish::new("A\u{2A6D4}", Bytes::new());
    let wire = encode(&Packet::Publish(p.clone()), ProtocolVersion::V311);
    assert_eq!(&wire[2..], &[0x00, 0x05, 0x41, 0xF0, 0xAA, 0x9B, 0x94]);
    assert_eq!(
        decode_packet(&wire, Role::Server, Some(ProtocolVersion::V311)).unwrap(),
        Packet::Publish(p)
    );
}

/// 3.1.1 section 2.2.3, table 2.4 / 5.0 section 1.5.5, table 1-1: remaining length sizes.
#[test]
fn remaining_length_table() {
    for (payload, header) in [
        (0usize, 2usize),
        (127, 2),
        (128, 3),
        (16_383, 3),
        (16_384, 4),
        (2_097_151, 4),
        (2_097_152, 5),
    ] {
        // Topic "t" takes 3 bytes of the remaining length.
        let p = Packet::Publish(Publish::new(
            "t",
            Bytes::from(vec![7u8; payload.saturating_sub(3)]),
        ));
        let wire = encode(&p, ProtocolVersion::V311);
        let remaining = 3 + payload.saturating_sub(3);
        assert_eq!(
            wire.len() - remaining,
            header,
            "remaining length {remaining}"
        );
    }
}

#[test]
fn fixed_packets() {
    assert_eq!(
        encode(&Packet::PingReq, ProtocolVersion::V311),
        [0xC0, 0x00]
    );
    assert_eq!(encode(&Packet::PingResp, ProtocolVersion::V5), [0xD0, 0x00]);
    assert_eq!(
        encode(
            &Packet::Disconnect(Disconnect::default()),
            ProtocolVersion::V311
        ),
        [0xE0, 0x00]
    );
    // 5.0: a normal disconnection without properties may leave out the reason code (3.14.2.1).
    assert_eq!(
        encode(
            &Packet::Disconnect(Disconnect::default()),
            ProtocolVersion::V5
        ),
        [0xE0, 0x00]
    );
    let id = PacketId::new(0x1234).unwrap();
    assert_eq!(
        encode(&Packet::PubRel(PubRel::new(id)), ProtocolVersion::V311),
        [0x62, 0x02, 0x12, 0x34]
    );
    // 5.0: success with no properties may leave out the reason code (3.4.2.1).
    assert_eq!(
        encode(&Packet::PubAck(PubAck::new(id)), ProtocolVersion::V5),
        [0x40, 0x02, 0x12, 0x34]
    );
    let mut rec = PubRec::new(id);
    rec.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    assert_eq!(
        encode(&Packet::PubRec(rec), ProtocolVersion::V5),
        [0x50, 0x03, 0x12, 0x34, 0x10]
    );
    // A 3.1.1 CONNACK refusing the client identifier is return code 2.
    let ack = ConnAck {
        session_present: false,
        reason_code: ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        properties: Properties::new(),
    };
    assert_eq!(
        encode(&Packet::ConnAck(ack), ProtocolVersion::V311),
        [0x20, 0x02, 0x00, 0x02]
    );
    // A 3.1.1 SUBACK failure is 0x80 whatever 5.0 code the broker chose.
    let sub = SubAck {
        packet_id: id,
        reason_codes: vec![ReasonCode::GRANTED_QOS_2, ReasonCode::NOT_AUTHORIZED],
        properties: Properties::new(),
    };
    assert_eq!(
        encode(&Packet::SubAck(sub), ProtocolVersion::V311),
        [0x90, 0x04, 0x12, 0x34, 0x02, 0x80]
    );
}
