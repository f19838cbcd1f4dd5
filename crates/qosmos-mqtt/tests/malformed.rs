//! One test per "malformed packet" and "protocol error" rule the decoder enforces, each
//! checking the typed error and the reason code it is sent as.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::BytesMut;
use qosmos_mqtt::topic::TopicError;
use qosmos_mqtt::*;

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// A packet: first byte, then the body with its remaining length.
fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn s(text: &[u8]) -> Vec<u8> {
    let mut v = (text.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(text);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Decodes `bytes` as sent by a client to a server already connected at `v`.
fn to_server(v: ProtocolVersion, bytes: &[u8]) -> Result<Packet, DecodeError> {
    let mut d = Decoder::new(Role::Server, None);
    let mut c = BytesMut::new();
    encode_packet(&Packet::Connect(Box::new(Connect::new(v, "c"))), v, &mut c).unwrap();
    d.decode(&mut c).unwrap().unwrap();
    let mut b = BytesMut::from(bytes);
    let p = d
        .decode(&mut b)?
        .ok_or(DecodeError::UnexpectedEnd("test: incomplete"))?;
    assert!(b.is_empty(), "left over bytes");
    Ok(p)
}

/// Decodes `bytes` as sent by a server to a client at `v`.
fn to_client(v: ProtocolVersion, bytes: &[u8]) -> Result<Packet, DecodeError> {
    decode_packet(bytes, Role::Client, Some(v))
}

/// Decodes `bytes` as the first packet a server receives.
fn first(bytes: &[u8]) -> Result<Packet, DecodeError> {
    decode_packet(bytes, Role::Server, None)
}

fn connect_body(level: u8, flags: u8, props: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut b = cat(&[&s(b"MQTT"), &[level, flags, 0, 60]]);
    if level == 5 {
        b.extend_from_slice(props);
    }
    b.extend_from_slice(&s(b"cid"));
    b.extend_from_slice(rest);
    b
}

#[track_caller]
fn assert_err(r: Result<Packet, DecodeError>, expected: DecodeError, code: ReasonCode) {
    let e = r.expect_err("the decoder accepted a packet the specification forbids");
    assert_eq!(e, expected);
    assert_eq!(e.reason_code(), code, "{e}");
}

const MALFORMED: ReasonCode = ReasonCode::MALFORMED_PACKET;
const PROTOCOL: ReasonCode = ReasonCode::PROTOCOL_ERROR;

// ---- fixed header ----

#[test]
fn reserved_packet_type_0() {
    assert_err(
        to_server(V5, &[0x00, 0x00]),
        DecodeError::ReservedPacketType(0),
        MALFORMED,
    );
}

#[test]
fn auth_does_not_exist_in_311() {
    assert_err(
        to_server(V3, &[0xF0, 0x00]),
        DecodeError::ReservedPacketType(15),
        MALFORMED,
    );
}

#[test]
fn reserved_flags_must_match() {
    for (first, t) in [
        (0x60u8, PacketType::PubRel), // PUBREL must be 0110 0010
        (0x80, PacketType::Subscribe),
        (0xA0, PacketType::Unsubscribe),
        (0x41, PacketType::PubAck),
        (0xC1, PacketType::PingReq),
        (0xE8, PacketType::Disconnect),
    ] {
        let flags = first & 0x0F;
        assert_err(
            to_server(V5, &pkt(first, &[0, 1])),
            DecodeError::InvalidFixedHeaderFlags {
                packet_type: t,
                flags,
            },
            MALFORMED,
        );
    }
    assert_err(
        first(&pkt(0x11, &connect_body(4, 2, &[], &[]))),
        DecodeError::InvalidFixedHeaderFlags {
            packet_type: PacketType::Connect,
            flags: 1,
        },
        MALFORMED,
    );
}

#[test]
fn remaining_length_over_four_bytes() {
    assert_err(
        to_server(V3, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        DecodeError::MalformedVariableInteger,
        MALFORMED,
    );
}

#[test]
fn remaining_length_not_minimal() {
    assert_err(
        to_server(V3, &[0xC0, 0x80, 0x00]),
        DecodeError::MalformedVariableInteger,
        MALFORMED,
    );
}

#[test]
fn maximum_packet_size_is_enforced_before_the_body_arrives() {
    let mut d = Decoder::new(Role::Client, Some(V5));
    d.set_max_packet_size(1024);
    // Only the fixed header of a 1 MiB PUBLISH: refused without waiting for the body.
    let mut b = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x40][..]);
    let e = d.decode(&mut b).unwrap_err();
    assert_eq!(
        e,
        DecodeError::PacketTooLarge {
            size: 4 + 1_048_576,
            max: 1024
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PACKET_TOO_LARGE);
}

#[test]
fn first_packet_must_be_connect() {
    assert_err(
        first(&[0xC0, 0x00]),
        DecodeError::ExpectedConnect(PacketType::PingReq),
        PROTOCOL,
    );
}

#[test]
fn second_connect_is_a_protocol_error() {
    let c = pkt(0x10, &connect_body(5, 2, &[0], &[]));
    assert_err(to_server(V5, &c), DecodeError::SecondConnect, PROTOCOL);
}

#[test]
fn packets_in_the_wrong_direction() {
    assert_err(
        to_server(V5, &pkt(0x20, &[0, 0, 0])),
        DecodeError::WrongDirection(PacketType::ConnAck),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0x90, &[0, 1, 0, 0])),
        DecodeError::WrongDirection(PacketType::SubAck),
        PROTOCOL,
    );
    assert_err(
        to_server(V3, &[0xD0, 0x00]),
        DecodeError::WrongDirection(PacketType::PingResp),
        PROTOCOL,
    );
    assert_err(
        to_client(V5, &[0xC0, 0x00]),
        DecodeError::WrongDirection(PacketType::PingReq),
        PROTOCOL,
    );
    assert_err(
        to_client(V5, &pkt(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0]]))),
        DecodeError::WrongDirection(PacketType::Subscribe),
        PROTOCOL,
    );
}

#[test]
fn pingreq_with_a_body() {
    assert_err(
        to_server(V3, &[0xC0, 0x01, 0x00]),
        DecodeError::TrailingBytes(PacketType::PingReq, 1),
        MALFORMED,
    );
    assert_err(
        to_client(V5, &[0xD0, 0x01, 0x00]),
        DecodeError::TrailingBytes(PacketType::PingResp, 1),
        MALFORMED,
    );
}

#[test]
fn trailing_bytes_after_the_last_field() {
    assert_err(
        to_server(V3, &pkt(0x40, &[0, 1, 0])),
        DecodeError::TrailingBytes(PacketType::PubAck, 1),
        MALFORMED,
    );
    assert_err(
        to_server(V3, &[0xE0, 0x01, 0x00]),
        DecodeError::TrailingBytes(PacketType::Disconnect, 1),
        MALFORMED,
    );
}

#[test]
fn field_longer_than_the_packet() {
    // Topic length 10, only 3 bytes present.
    assert_err(
        to_server(V3, &pkt(0x30, &[0, 10, b'a', b'b', b'c'])),
        DecodeError::UnexpectedEnd("the topic name"),
        MALFORMED,
    );
    assert_err(
        to_server(V5, &pkt(0x40, &[0])),
        DecodeError::UnexpectedEnd("the packet identifier"),
        MALFORMED,
    );
}

// ---- strings ----

#[test]
fn invalid_utf8_in_a_string() {
    assert_err(
        to_server(V3, &pkt(0x30, &cat(&[&s(&[0xC3, 0x28]), b"x"]))),
        DecodeError::InvalidUtf8("the topic name"),
        MALFORMED,
    );
    // An encoded surrogate (U+D800) is not UTF-8 either [MQTT-1.5.4-1].
    assert_err(
        to_server(V3, &pkt(0x30, &s(&[0xED, 0xA0, 0x80]))),
        DecodeError::InvalidUtf8("the topic name"),
        MALFORMED,
    );
}

#[test]
fn null_character_in_a_string() {
    assert_err(
        to_server(V3, &pkt(0x30, &s(b"a\0b"))),
        DecodeError::NullCharacter("the topic name"),
        MALFORMED,
    );
    let body = cat(&[&s(b"MQTT"), &[4, 2, 0, 60], &s(b"c\0d")]);
    assert_err(
        first(&pkt(0x10, &body)),
        DecodeError::NullCharacter("the client identifier"),
        MALFORMED,
    );
}

// ---- CONNECT ----

#[test]
fn connect_protocol_name() {
    let body = cat(&[&s(b"MQTX"), &[4, 2, 0, 60], &s(b"c")]);
    assert_err(
        first(&pkt(0x10, &body)),
        DecodeError::InvalidProtocolName,
        MALFORMED,
    );
}

#[test]
fn connect_unsupported_protocol_level() {
    for level in [3u8, 6, 0] {
        let body = cat(&[&s(b"MQTT"), &[level, 2, 0, 60], &s(b"c")]);
        assert_err(
            first(&pkt(0x10, &body)),
            DecodeError::UnsupportedProtocolVersion(level),
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        );
    }
    // MQTT 3.1 ("MQIsdp", level 3) is answered the same way.
    let body = cat(&[&s(b"MQIsdp"), &[3, 2, 0, 60], &s(b"c")]);
    assert_err(
        first(&pkt(0x10, &body)),
        DecodeError::UnsupportedProtocolVersion(3),
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
    );
}

#[test]
fn connect_reserved_flag() {
    assert_err(
        first(&pkt(0x10, &connect_body(4, 0b11, &[], &[]))),
        DecodeError::ConnectReservedFlag,
        MALFORMED,
    );
}

#[test]
fn connect_will_flags_without_will() {
    assert_err(
        first(&pkt(0x10, &connect_body(4, 0b0000_1010, &[], &[]))),
        DecodeError::WillFlagsWithoutWill,
        MALFORMED,
    );
    assert_err(
        first(&pkt(0x10, &connect_body(5, 0b0010_0010, &[0], &[]))),
        DecodeError::WillFlagsWithoutWill,
        MALFORMED,
    );
}

#[test]
fn connect_will_qos_3() {
    let will = cat(&[&s(b"w"), &s(b"bye")]);
    assert_err(
        first(&pkt(0x10, &connect_body(4, 0b0001_1110, &[], &will))),
        DecodeError::InvalidQoS("the will flags"),
        MALFORMED,
    );
}

#[test]
fn connect_will_topic_with_wildcard() {
    let will = cat(&[&s(b"w/#"), &s(b"bye")]);
    assert_err(
        first(&pkt(0x10, &connect_body(4, 0b0000_0110, &[], &will))),
        DecodeError::InvalidTopicName(TopicError::WildcardInName),
        ReasonCode::TOPIC_NAME_INVALID,
    );
}

#[test]
fn connect_password_without_username_in_311() {
    assert_err(
        first(&pkt(0x10, &connect_body(4, 0b0100_0010, &[], &s(b"pw")))),
        DecodeError::PasswordWithoutUsername,
        MALFORMED,
    );
    // MQTT 5.0 allows it.
    assert!(first(&pkt(0x10, &connect_body(5, 0b0100_0010, &[0], &s(b"pw")))).is_ok());
}

// ---- PUBLISH ----

#[test]
fn publish_qos_3() {
    assert_err(
        to_server(V3, &pkt(0x36, &cat(&[&s(b"t"), &[0, 1]]))),
        DecodeError::InvalidQoS("PUBLISH"),
        MALFORMED,
    );
}

#[test]
fn publish_dup_at_qos_0() {
    assert_err(
        to_server(V5, &pkt(0x38, &cat(&[&s(b"t"), &[0]]))),
        DecodeError::DupOnQoS0,
        MALFORMED,
    );
}

#[test]
fn packet_identifier_zero() {
    assert_err(
        to_server(V3, &pkt(0x32, &cat(&[&s(b"t"), &[0, 0]]))),
        DecodeError::ZeroPacketId(PacketType::Publish),
        PROTOCOL,
    );
    assert_err(
        to_server(V3, &pkt(0x82, &cat(&[&[0, 0], &s(b"t"), &[0]]))),
        DecodeError::ZeroPacketId(PacketType::Subscribe),
        PROTOCOL,
    );
    assert_err(
        to_server(V3, &pkt(0xA2, &cat(&[&[0, 0], &s(b"t")]))),
        DecodeError::ZeroPacketId(PacketType::Unsubscribe),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0x40, &[0, 0])),
        DecodeError::ZeroPacketId(PacketType::PubAck),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0x62, &[0, 0])),
        DecodeError::ZeroPacketId(PacketType::PubRel),
        PROTOCOL,
    );
}

#[test]
fn wildcards_in_a_topic_name() {
    for t in [&b"a/+"[..], b"#", b"a/b#"] {
        assert_err(
            to_server(V3, &pkt(0x30, &s(t))),
            DecodeError::InvalidTopicName(TopicError::WildcardInName),
            ReasonCode::TOPIC_NAME_INVALID,
        );
    }
}

#[test]
fn empty_topic_name() {
    assert_err(
        to_server(V3, &pkt(0x30, &s(b""))),
        DecodeError::InvalidTopicName(TopicError::Empty),
        ReasonCode::TOPIC_NAME_INVALID,
    );
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b""), &[0]]))),
        DecodeError::InvalidTopicName(TopicError::Empty),
        ReasonCode::TOPIC_NAME_INVALID,
    );
    // With a topic alias it is how 5.0 saves bytes.
    assert!(to_server(V5, &pkt(0x30, &cat(&[&s(b""), &[3, 0x23, 0, 1]]))).is_ok());
}

#[test]
fn topic_alias_zero() {
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b"t"), &[3, 0x23, 0, 0]]))),
        DecodeError::ZeroTopicAlias,
        ReasonCode::TOPIC_ALIAS_INVALID,
    );
}

#[test]
fn subscription_identifier_from_a_client() {
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b"t"), &[2, 0x0B, 1]]))),
        DecodeError::PropertyNotAllowed(
            PropertyId::SubscriptionIdentifier,
            "a PUBLISH from a client",
        ),
        MALFORMED,
    );
    // A server may send several.
    let p = to_client(V5, &pkt(0x30, &cat(&[&s(b"t"), &[4, 0x0B, 1, 0x0B, 7]]))).unwrap();
    let Packet::Publish(p) = p else { panic!() };
    assert_eq!(
        p.properties.subscription_identifiers().collect::<Vec<_>>(),
        vec![1, 7]
    );
}

#[test]
fn payload_format_indicator_utf8_checked() {
    assert_err(
        to_server(
            V5,
            &pkt(0x30, &cat(&[&s(b"t"), &[2, 0x01, 1], &[0xFF, 0xFE]])),
        ),
        DecodeError::PayloadFormatInvalid,
        ReasonCode::PAYLOAD_FORMAT_INVALID,
    );
    assert!(
        to_server(
            V5,
            &pkt(0x30, &cat(&[&s(b"t"), &[2, 0x01, 1], "ok ✓".as_bytes()]))
        )
        .is_ok()
    );
}

// ---- SUBSCRIBE / UNSUBSCRIBE ----

#[test]
fn subscribe_without_topics() {
    assert_err(
        to_server(V3, &pkt(0x82, &[0, 1])),
        DecodeError::NoTopicFilters(PacketType::Subscribe),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0x82, &[0, 1, 0])),
        DecodeError::NoTopicFilters(PacketType::Subscribe),
        PROTOCOL,
    );
}

#[test]
fn unsubscribe_without_topics() {
    assert_err(
        to_server(V3, &pkt(0xA2, &[0, 1])),
        DecodeError::NoTopicFilters(PacketType::Unsubscribe),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0xA2, &[0, 1, 0])),
        DecodeError::NoTopicFilters(PacketType::Unsubscribe),
        PROTOCOL,
    );
}

#[test]
fn invalid_topic_filters() {
    for (f, why) in [
        (&b""[..], TopicError::Empty),
        (b"a/#/b", TopicError::MisplacedMultiLevelWildcard),
        (b"a#", TopicError::MisplacedMultiLevelWildcard),
        (b"a/b+", TopicError::MisplacedSingleLevelWildcard),
        (b"+a/b", TopicError::MisplacedSingleLevelWildcard),
        (b"$share/g", TopicError::EmptySharedFilter),
        (b"$share/g/", TopicError::EmptySharedFilter),
        (b"$share//a", TopicError::InvalidShareName),
        (b"$share/g+/a", TopicError::InvalidShareName),
    ] {
        let sub = pkt(0x82, &cat(&[&[0, 1], &s(f), &[1]]));
        assert_err(
            to_server(V3, &sub),
            DecodeError::InvalidTopicFilter(why),
            ReasonCode::TOPIC_FILTER_INVALID,
        );
        let unsub = pkt(0xA2, &cat(&[&[0, 1, 0], &s(f)]));
        assert_err(
            to_server(V5, &unsub),
            DecodeError::InvalidTopicFilter(why),
            ReasonCode::TOPIC_FILTER_INVALID,
        );
    }
}

#[test]
fn subscription_options_reserved_bits() {
    // 3.1.1: only the two QoS bits may be set.
    assert_err(
        to_server(V3, &pkt(0x82, &cat(&[&[0, 1], &s(b"t"), &[0b0000_0101]]))),
        DecodeError::InvalidSubscriptionOptions(5),
        MALFORMED,
    );
    // 5.0: bits 6 and 7 are reserved.
    assert_err(
        to_server(
            V5,
            &pkt(0x82, &cat(&[&[0, 1, 0], &s(b"t"), &[0b0100_0001]])),
        ),
        DecodeError::InvalidSubscriptionOptions(0x41),
        MALFORMED,
    );
    // 5.0: retain handling 3.
    assert_err(
        to_server(
            V5,
            &pkt(0x82, &cat(&[&[0, 1, 0], &s(b"t"), &[0b0011_0000]])),
        ),
        DecodeError::InvalidSubscriptionOptions(0x30),
        MALFORMED,
    );
}

#[test]
fn subscription_qos_3() {
    assert_err(
        to_server(V5, &pkt(0x82, &cat(&[&[0, 1, 0], &s(b"t"), &[3]]))),
        DecodeError::InvalidQoS("subscription options"),
        MALFORMED,
    );
}

#[test]
fn no_local_on_a_shared_subscription() {
    assert_err(
        to_server(
            V5,
            &pkt(0x82, &cat(&[&[0, 1, 0], &s(b"$share/g/t"), &[0b101]])),
        ),
        DecodeError::NoLocalOnSharedSubscription,
        PROTOCOL,
    );
}

#[test]
fn subscription_identifier_rules() {
    // Value 0 is a protocol error.
    assert_err(
        to_server(V5, &pkt(0x82, &cat(&[&[0, 1, 2, 0x0B, 0], &s(b"t"), &[1]]))),
        DecodeError::InvalidPropertyValue(PropertyId::SubscriptionIdentifier),
        PROTOCOL,
    );
    // SUBSCRIBE may carry only one.
    assert_err(
        to_server(
            V5,
            &pkt(0x82, &cat(&[&[0, 1, 4, 0x0B, 1, 0x0B, 2], &s(b"t"), &[1]])),
        ),
        DecodeError::DuplicateProperty(PropertyId::SubscriptionIdentifier),
        PROTOCOL,
    );
}

// ---- properties ----

#[test]
fn unknown_property() {
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b"t"), &[2, 0x05, 0]]))),
        DecodeError::UnknownProperty(0x05),
        MALFORMED,
    );
}

#[test]
fn property_not_allowed_in_packet() {
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b"t"), &[4, 0x1F], &s(b"x")]))),
        DecodeError::PropertyNotAllowed(PropertyId::ReasonString, "PUBLISH"),
        MALFORMED,
    );
    assert_err(
        first(&pkt(0x10, &connect_body(5, 2, &[2, 0x24, 1], &[]))),
        DecodeError::PropertyNotAllowed(PropertyId::MaximumQoS, "CONNECT"),
        MALFORMED,
    );
}

#[test]
fn duplicate_property() {
    assert_err(
        to_server(
            V5,
            &pkt(
                0x30,
                &cat(&[&s(b"t"), &[10, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]]),
            ),
        ),
        DecodeError::DuplicateProperty(PropertyId::MessageExpiryInterval),
        PROTOCOL,
    );
    // User properties may repeat.
    assert!(
        to_server(
            V5,
            &pkt(
                0x30,
                &cat(&[
                    &s(b"t"),
                    &[12, 0x26],
                    &s(b"k"),
                    &s(b"v"),
                    &[0x26],
                    &s(b""),
                    &s(b"")
                ])
            )
        )
        .is_ok()
    );
}

#[test]
fn forbidden_property_values() {
    for (props, id) in [
        (&[3u8, 0x21, 0, 0][..], PropertyId::ReceiveMaximum),
        (&[5, 0x27, 0, 0, 0, 0], PropertyId::MaximumPacketSize),
        (&[2, 0x17, 2], PropertyId::RequestProblemInformation),
        (&[2, 0x19, 2], PropertyId::RequestResponseInformation),
    ] {
        assert_err(
            first(&pkt(0x10, &connect_body(5, 2, props, &[]))),
            DecodeError::InvalidPropertyValue(id),
            PROTOCOL,
        );
    }
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b"t"), &[2, 0x01, 2]]))),
        DecodeError::InvalidPropertyValue(PropertyId::PayloadFormatIndicator),
        PROTOCOL,
    );
    assert_err(
        to_client(V5, &pkt(0x20, &[0, 0, 2, 0x24, 2])),
        DecodeError::InvalidPropertyValue(PropertyId::MaximumQoS),
        PROTOCOL,
    );
    assert_err(
        to_client(V5, &pkt(0x20, &[0, 0, 2, 0x25, 7])),
        DecodeError::InvalidPropertyValue(PropertyId::RetainAvailable),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b"t"), &[6, 0x08], &s(b"r/#")]))),
        DecodeError::InvalidPropertyValue(PropertyId::ResponseTopic),
        PROTOCOL,
    );
}

#[test]
fn authentication_data_without_method() {
    assert_err(
        first(&pkt(0x10, &connect_body(5, 2, &[4, 0x16, 0, 1, 9], &[]))),
        DecodeError::AuthDataWithoutMethod,
        PROTOCOL,
    );
}

#[test]
fn property_length_past_the_packet() {
    assert_err(
        to_server(V5, &pkt(0x30, &cat(&[&s(b"t"), &[9, 0x01, 0]]))),
        DecodeError::UnexpectedEnd("the properties"),
        MALFORMED,
    );
}

// ---- acknowledgements ----

#[test]
fn invalid_reason_codes() {
    assert_err(
        to_server(V5, &pkt(0x40, &[0, 1, 0x05])),
        DecodeError::InvalidReasonCode(PacketType::PubAck, 0x05),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0x62, &[0, 1, 0x10])),
        DecodeError::InvalidReasonCode(PacketType::PubRel, 0x10),
        PROTOCOL,
    );
    assert_err(
        to_client(V3, &pkt(0x90, &[0, 1, 0x03])),
        DecodeError::InvalidReasonCode(PacketType::SubAck, 0x03),
        PROTOCOL,
    );
    assert_err(
        to_client(V3, &pkt(0x20, &[0, 6])),
        DecodeError::InvalidReasonCode(PacketType::ConnAck, 6),
        PROTOCOL,
    );
    assert_err(
        to_client(V5, &pkt(0x20, &[0, 0x01, 0])),
        DecodeError::InvalidReasonCode(PacketType::ConnAck, 1),
        PROTOCOL,
    );
    assert_err(
        to_client(V5, &pkt(0xB0, &[0, 1, 0, 0x02])),
        DecodeError::InvalidReasonCode(PacketType::UnsubAck, 2),
        PROTOCOL,
    );
    // A client may not send "Server shutting down".
    assert_err(
        to_server(V5, &pkt(0xE0, &[0x8B])),
        DecodeError::InvalidReasonCode(PacketType::Disconnect, 0x8B),
        PROTOCOL,
    );
    assert_err(
        to_server(V5, &pkt(0xF0, &[0x01])),
        DecodeError::InvalidReasonCode(PacketType::Auth, 0x01),
        PROTOCOL,
    );
}

#[test]
fn connack_flags() {
    assert_err(
        to_client(V3, &pkt(0x20, &[0x02, 0])),
        DecodeError::InvalidConnAckFlags(2),
        MALFORMED,
    );
    // Session present with a refusal [MQTT-3.2.2-4].
    assert_err(
        to_client(V3, &pkt(0x20, &[0x01, 5])),
        DecodeError::InvalidConnAckFlags(1),
        MALFORMED,
    );
}

#[test]
fn server_disconnect_with_session_expiry() {
    assert_err(
        to_client(V5, &pkt(0xE0, &[0x8B, 5, 0x11, 0, 0, 0, 1])),
        DecodeError::PropertyNotAllowed(
            PropertyId::SessionExpiryInterval,
            "a DISCONNECT from a server",
        ),
        MALFORMED,
    );
}

#[test]
fn short_forms_are_accepted() {
    // 5.0 PUBACK with only a packet id, with a reason code and no property length, DISCONNECT
    // with no body: all well formed.
    assert!(
        matches!(to_server(V5, &pkt(0x40, &[0, 1])).unwrap(), Packet::PubAck(a) if a.reason_code == ReasonCode::SUCCESS)
    );
    assert!(
        matches!(to_server(V5, &pkt(0x40, &[0, 1, 0x10])).unwrap(), Packet::PubAck(a) if a.reason_code == ReasonCode::NO_MATCHING_SUBSCRIBERS)
    );
    assert!(
        matches!(to_server(V5, &[0xE0, 0]).unwrap(), Packet::Disconnect(d) if d.reason_code == ReasonCode::NORMAL_DISCONNECTION)
    );
}

#[test]
fn errors_never_panic_on_any_prefix_of_any_packet() {
    // Every prefix of a valid packet is either "need more" or a clean error, never a panic.
    let mut wire = BytesMut::new();
    let mut c = Connect::new(V5, "cid");
    c.properties.set_session_expiry_interval(60);
    c.username = Some("u".into());
    c.password = Some(bytes::Bytes::from_static(b"p"));
    encode_packet(&Packet::Connect(Box::new(c)), V5, &mut wire).unwrap();
    for n in 0..wire.len() {
        let mut d = Decoder::new(Role::Server, None);
        let mut b = BytesMut::from(&wire[..n]);
        assert_eq!(d.decode(&mut b).unwrap(), None);
    }
}
