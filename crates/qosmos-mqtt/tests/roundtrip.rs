//! Property tests: every packet the encoder writes, the strict decoder reads back unchanged,
//! under both protocol versions, whole and fed in arbitrary pieces.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use qosmos_mqtt::properties::PropertyContext;
use qosmos_mqtt::*;

fn text() -> impl Strategy<Value = MqttStr> {
    "[a-zA-Z0-9 é漢/_-]{0,12}".prop_map(MqttStr::from)
}

fn topic_name() -> impl Strategy<Value = MqttStr> {
    "[a-z0-9$]{1,6}(/[a-z0-9]{0,6}){0,3}".prop_map(MqttStr::from)
}

fn topic_filter() -> impl Strategy<Value = MqttStr> {
    let level = prop_oneof![Just("+".to_string()), "[a-z0-9]{0,5}"];
    (
        prop::collection::vec(level, 1..4),
        any::<bool>(),
        prop::option::of("[a-z]{1,4}"),
    )
        .prop_map(|(levels, hash, share)| {
            let mut f = levels.join("/");
            if f.is_empty() {
                f.push('a');
            }
            if hash {
                f.push_str("/#");
            }
            match share {
                Some(g) => MqttStr::from(format!("$share/{g}/{f}")),
                None => MqttStr::from(f),
            }
        })
}

fn binary() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn pid() -> impl Strategy<Value = PacketId> {
    (1u16..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
}

/// A valid property for `ctx`, chosen among all that may appear there.
fn property(ctx: PropertyContext) -> BoxedStrategy<Property> {
    let all: Vec<BoxedStrategy<Property>> = vec![
        Just(Property::PayloadFormatIndicator(0)).boxed(),
        any::<u32>()
            .prop_map(Property::MessageExpiryInterval)
            .boxed(),
        text().prop_map(Property::ContentType).boxed(),
        topic_name().prop_map(Property::ResponseTopic).boxed(),
        binary().prop_map(Property::CorrelationData).boxed(),
        (1u32..=268_435_455)
            .prop_map(Property::SubscriptionIdentifier)
            .boxed(),
        any::<u32>()
            .prop_map(Property::SessionExpiryInterval)
            .boxed(),
        text().prop_map(Property::AssignedClientIdentifier).boxed(),
        any::<u16>().prop_map(Property::ServerKeepAlive).boxed(),
        text().prop_map(Property::AuthenticationMethod).boxed(),
        (0u8..=1)
            .prop_map(Property::RequestProblemInformation)
            .boxed(),
        any::<u32>().prop_map(Property::WillDelayInterval).boxed(),
        (0u8..=1)
            .prop_map(Property::RequestResponseInformation)
            .boxed(),
        text().prop_map(Property::ResponseInformation).boxed(),
        text().prop_map(Property::ServerReference).boxed(),
        text().prop_map(Property::ReasonString).boxed(),
        (1u16..).prop_map(Property::ReceiveMaximum).boxed(),
        any::<u16>().prop_map(Property::TopicAliasMaximum).boxed(),
        (1u16..).prop_map(Property::TopicAlias).boxed(),
        (0u8..=1).prop_map(Property::MaximumQoS).boxed(),
        (0u8..=1).prop_map(Property::RetainAvailable).boxed(),
        (text(), text())
            .prop_map(|(k, v)| Property::UserProperty(k, v))
            .boxed(),
        (1u32..).prop_map(Property::MaximumPacketSize).boxed(),
        (0u8..=1)
            .prop_map(Property::WildcardSubscriptionAvailable)
            .boxed(),
        (0u8..=1)
            .prop_map(Property::SubscriptionIdentifierAvailable)
            .boxed(),
        (0u8..=1)
            .prop_map(Property::SharedSubscriptionAvailable)
            .boxed(),
    ];
    // Authentication Data needs a method; it is added in `properties` below.
    let fitting: Vec<_> = all
        .into_iter()
        .filter(|s| {
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            let p = s.new_tree(&mut runner).unwrap().current();
            p.id().allowed_in(ctx)
        })
        .collect();
    proptest::strategy::Union::new(fitting).boxed()
}

fn properties(ctx: PropertyContext) -> impl Strategy<Value = Properties> {
    (
        prop::collection::vec(property(ctx), 0..5),
        prop::option::of(binary()),
    )
        .prop_map(move |(list, auth_data)| {
            let mut props = Properties::new();
            let mut seen = std::collections::HashSet::new();
            for p in list {
                let id = p.id();
                if id.repeatable_in(ctx) || seen.insert(id) {
                    props.push(p);
                }
            }
            if let Some(d) = auth_data
                && PropertyId::AuthenticationData.allowed_in(ctx)
            {
                if props.authentication_method().is_none() {
                    props.set_authentication_method("SCRAM-SHA-1");
                }
                props.set_authentication_data(d);
            }
            props
        })
}

fn props_for(v: ProtocolVersion, ctx: PropertyContext) -> BoxedStrategy<Properties> {
    match v {
        ProtocolVersion::V5 => properties(ctx).boxed(),
        ProtocolVersion::V311 => Just(Properties::new()).boxed(),
    }
}

fn connect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        props_for(v, PropertyContext::Will),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        prop::option::of(will),
        prop::option::of(text()),
        prop::option::of(binary()),
        props_for(v, PropertyContext::Connect),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // 3.1.1 allows a password only with a user name.
                let password = if v == ProtocolVersion::V311 && username.is_none() {
                    None
                } else {
                    password
                };
                Packet::Connect(Box::new(Connect {
                    protocol: v,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

fn connack(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let codes: Vec<u8> = match v {
        ProtocolVersion::V5 => vec![0x00, 0x80, 0x81, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x9F],
        ProtocolVersion::V311 => vec![0x00, 0x84, 0x85, 0x88, 0x86, 0x87],
    };
    (
        any::<bool>(),
        prop::sample::select(codes),
        props_for(v, PropertyContext::ConnAck),
    )
        .prop_map(|(sp, code, properties)| {
            let reason_code = ReasonCode(code);
            Packet::ConnAck(ConnAck {
                session_present: sp && reason_code.is_success(),
                reason_code,
                properties,
            })
        })
}

fn publish(v: ProtocolVersion, from_server: bool) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        pid(),
        binary(),
        props_for(v, PropertyContext::Publish),
    )
        .prop_map(
            move |(dup, qos, retain, topic, id, payload, mut properties)| {
                if !from_server {
                    properties.remove(PropertyId::SubscriptionIdentifier);
                }
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    packet_id: if qos0 { None } else { Some(id) },
                    payload,
                    properties,
                })
            },
        )
}

fn pub_response(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v == ProtocolVersion::V5;
    (
        0u8..4,
        pid(),
        prop::sample::select(vec![0x00u8, 0x10, 0x80, 0x87, 0x97]),
        props_for(v, PropertyContext::PubResponse),
    )
        .prop_map(move |(kind, packet_id, code, properties)| {
            let ack_code = ReasonCode(if v5 { code } else { 0 });
            let rel_code = ReasonCode(if v5 && code == 0x80 { 0x92 } else { 0 });
            match kind {
                0 => Packet::PubAck(PubAck {
                    packet_id,
                    reason_code: ack_code,
                    properties,
                }),
                1 => Packet::PubRec(PubRec {
                    packet_id,
                    reason_code: ack_code,
                    properties,
                }),
                2 => Packet::PubRel(PubRel {
                    packet_id,
                    reason_code: rel_code,
                    properties,
                }),
                _ => Packet::PubComp(PubComp {
                    packet_id,
                    reason_code: rel_code,
                    properties,
                }),
            }
        })
}

fn subscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v == ProtocolVersion::V5;
    let sub = (topic_filter(), qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(
        move |(filter, qos, nl, rap, rh)| {
            let options = if v5 {
                SubscriptionOptions {
                    qos,
                    no_local: nl && !filter.starts_with("$share/"),
                    retain_as_published: rap,
                    retain_handling: match rh {
                        0 => RetainHandling::SendAtSubscribe,
                        1 => RetainHandling::SendIfNew,
                        _ => RetainHandling::DoNotSend,
                    },
                }
            } else {
                SubscriptionOptions::with_qos(qos)
            };
            Subscription { filter, options }
        },
    );
    (
        pid(),
        prop::collection::vec(sub, 1..5),
        props_for(v, PropertyContext::Subscribe),
    )
        .prop_map(|(packet_id, subscriptions, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions,
                properties,
            })
        })
}

fn suback(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let codes: Vec<u8> = match v {
        ProtocolVersion::V5 => vec![
            0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
        ],
        ProtocolVersion::V311 => vec![0, 1, 2, 0x80],
    };
    (
        pid(),
        prop::collection::vec(prop::sample::select(codes), 1..5),
        props_for(v, PropertyContext::SubAck),
    )
        .prop_map(|(packet_id, codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reason_codes: codes.into_iter().map(ReasonCode).collect(),
                properties,
            })
        })
}

fn unsubscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        pid(),
        prop::collection::vec(topic_filter(), 1..5),
        props_for(v, PropertyContext::Unsubscribe),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn unsuback(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v == ProtocolVersion::V5;
    (
        pid(),
        prop::collection::vec(
            prop::sample::select(vec![0u8, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]),
            1..5,
        ),
        props_for(v, PropertyContext::UnsubAck),
    )
        .prop_map(move |(packet_id, codes, properties)| {
            let reason_codes = if v5 {
                codes.into_iter().map(ReasonCode).collect()
            } else {
                Vec::new()
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reason_codes,
                properties,
            })
        })
}

fn disconnect(v: ProtocolVersion, from_server: bool) -> impl Strategy<Value = Packet> {
    let v5 = v == ProtocolVersion::V5;
    let codes: Vec<u8> = if from_server {
        vec![0x00, 0x81, 0x82, 0x8B, 0x8D, 0x8E, 0x93, 0x9C]
    } else {
        vec![0x00, 0x04, 0x80, 0x81, 0x99]
    };
    (
        prop::sample::select(codes),
        props_for(v, PropertyContext::Disconnect),
    )
        .prop_map(move |(code, mut properties)| {
            if from_server {
                properties.remove(PropertyId::SessionExpiryInterval);
            }
            if v5 {
                Packet::Disconnect(Disconnect {
                    reason_code: ReasonCode(code),
                    properties,
                })
            } else {
                Packet::Disconnect(Disconnect::default())
            }
        })
}

fn auth() -> impl Strategy<Value = Packet> {
    (
        prop::sample::select(vec![0x00u8, 0x18, 0x19]),
        properties(PropertyContext::Auth),
    )
        .prop_map(|(code, properties)| {
            Packet::Auth(Auth {
                reason_code: ReasonCode(code),
                properties,
            })
        })
}

/// Packets a client sends, decoded by a server.
fn client_packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut s = vec![
        publish(v, false).boxed(),
        pub_response(v).boxed(),
        subscribe(v).boxed(),
        unsubscribe(v).boxed(),
        Just(Packet::PingReq).boxed(),
        disconnect(v, false).boxed(),
    ];
    if v == ProtocolVersion::V5 {
        s.push(auth().boxed());
    }
    proptest::strategy::Union::new(s).boxed()
}

/// Packets a server sends, decoded by a client.
fn server_packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut s = vec![
        connack(v).boxed(),
        publish(v, true).boxed(),
        pub_response(v).boxed(),
        suback(v).boxed(),
        unsuback(v).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v, true).boxed(),
    ];
    if v == ProtocolVersion::V5 {
        s.push(auth().boxed());
    }
    proptest::strategy::Union::new(s).boxed()
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(ProtocolVersion::V311), Just(ProtocolVersion::V5)]
}

/// Encodes the packets back to back, then decodes them from pieces cut at `cuts`.
fn roundtrip(
    first: Option<Packet>,
    packets: Vec<Packet>,
    role: Role,
    v: ProtocolVersion,
    cuts: Vec<usize>,
) {
    let mut wire = BytesMut::new();
    let all: Vec<Packet> = first.into_iter().chain(packets).collect();
    for p in &all {
        let n = encode_packet(p, v, &mut wire).unwrap();
        assert_eq!(n, encoded_len(p, v).unwrap());
    }
    let wire = wire.freeze();
    let mut decoder = Decoder::new(role, if role == Role::Server { None } else { Some(v) });
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut cuts = cuts;
    cuts.push(wire.len());
    for cut in cuts {
        let cut = cut.min(wire.len()).max(pos);
        buf.extend_from_slice(&wire[pos..cut]);
        pos = cut;
        while let Some(p) = decoder.decode(&mut buf).unwrap() {
            out.push(p);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(out, all);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn client_to_server(
        (v, c, ps) in version().prop_flat_map(|v| (Just(v), connect(v), prop::collection::vec(client_packet(v), 0..6))),
        cuts in prop::collection::vec(0usize..400, 0..8),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        roundtrip(Some(c), ps, Role::Server, v, cuts);
    }

    #[test]
    fn server_to_client(ps in version().prop_flat_map(|v| (Just(v), prop::collection::vec(server_packet(v), 1..6))), cuts in prop::collection::vec(0usize..400, 0..8)) {
        let (v, ps) = ps;
        let mut cuts = cuts;
        cuts.sort_unstable();
        roundtrip(None, ps, Role::Client, v, cuts);
    }

    #[test]
    fn encode_publish_writes_what_encode_packet_does(
        (v, p) in version().prop_flat_map(|v| (Just(v), publish(v, true))),
    ) {
        let Packet::Publish(publish) = &p else { unreachable!("a PUBLISH strategy") };
        let mut by_packet = BytesMut::new();
        let mut by_ref = BytesMut::new();
        let n = encode_packet(&p, v, &mut by_packet).unwrap();
        prop_assert_eq!(encode_publish(publish, v, &mut by_ref).unwrap(), n);
        prop_assert_eq!(by_ref, by_packet);
    }

    #[test]
    fn every_client_packet_v311(c in connect(ProtocolVersion::V311), ps in prop::collection::vec(client_packet(ProtocolVersion::V311), 1..6)) {
        roundtrip(Some(c), ps, Role::Server, ProtocolVersion::V311, vec![]);
    }

    #[test]
    fn every_client_packet_v5(c in connect(ProtocolVersion::V5), ps in prop::collection::vec(client_packet(ProtocolVersion::V5), 1..6)) {
        roundtrip(Some(c), ps, Role::Server, ProtocolVersion::V5, vec![]);
    }
}
