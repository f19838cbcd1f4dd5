//! Bad input at a live broker: each bad connection gets the right reason code (a 5.0
//! DISCONNECT or CONNACK; 3.1.1 has none, so a plain close) and is closed, the broker counts
//! it, and well-behaved paho clients connected throughout keep publishing and receiving at
//! QoS 2 without loss or duplicates.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use bytes::BytesMut;
use common::{RawClient, Recv, TestBroker, limits, spawn_script};
use qosmos_broker::Limits;
use qosmos_mqtt::{
    Connect, Encoder, Packet, ProtocolVersion, QoS, ReasonCode, Subscribe, Subscription,
    SubscriptionOptions,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;

fn connect_bytes(version: ProtocolVersion, id: &str) -> Vec<u8> {
    let mut c = Connect::new(version, id);
    c.keep_alive = 30;
    let mut buf = BytesMut::new();
    Encoder::new(version)
        .encode(&Packet::Connect(Box::new(c)), &mut buf)
        .unwrap();
    buf.to_vec()
}

/// A PUBLISH at QoS 0 with any bytes as its topic (the encoder would refuse bad ones).
fn raw_publish(version: ProtocolVersion, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend((topic.len() as u16).to_be_bytes());
    body.extend(topic);
    if version == V5 {
        body.push(0); // no properties
    }
    body.extend(payload);
    let mut out = vec![0x30];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

/// A 5.0 SUBSCRIBE (packet id 1, no properties) of one filter with these option bits.
fn raw_subscribe(filter: &[u8], options: u8) -> Vec<u8> {
    let mut body = vec![0x00, 0x01, 0x00];
    body.extend((filter.len() as u16).to_be_bytes());
    body.extend(filter);
    body.push(options);
    let mut out = vec![0x82, body.len() as u8];
    out.extend(body);
    out
}

/// Sends `bad` before any CONNECT; returns what the broker answered before closing.
async fn before_connect(addr: SocketAddr, version: ProtocolVersion, bad: &[u8]) -> Vec<Packet> {
    let mut c = RawClient::open(addr, version).await;
    c.send_bytes(bad).await;
    c.expect_closed().await
}

/// Connects properly at `version`, then sends `bad`; returns what came back before the close.
async fn after_connect(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
    bad: &[u8],
) -> Vec<Packet> {
    let (mut c, ack) = RawClient::connect(addr, RawClient::connect_packet(version, id, true)).await;
    assert!(ack.reason_code.is_success());
    c.send_bytes(bad).await;
    c.expect_closed().await
}

fn assert_disconnect(case: &str, seen: &[Packet], code: ReasonCode) {
    assert!(
        matches!(seen, [Packet::Disconnect(d)] if d.reason_code == code),
        "{case}: expected DISCONNECT {code:?}, saw {seen:?}"
    );
}

fn assert_connack(case: &str, seen: &[Packet], code: ReasonCode) {
    assert!(
        matches!(seen, [Packet::ConnAck(a)] if a.reason_code == code),
        "{case}: expected CONNACK {code:?}, saw {seen:?}"
    );
}

fn assert_plain_close(case: &str, seen: &[Packet]) {
    assert!(
        seen.is_empty(),
        "{case}: expected a plain close, saw {seen:?}"
    );
}

#[tokio::test]
async fn malformed_input_is_refused_and_others_are_unaffected() {
    let b = TestBroker::start(Limits {
        max_packet_size: 8192,
        connect_timeout: Duration::from_millis(500),
        ..limits()
    })
    .await;
    let a = b.addr;
    let port = b.port().to_string();

    // Well-behaved clients, one per version, publishing to themselves at QoS 2 throughout.
    let mut steady5 = spawn_script("steady.py", &[port.clone(), "5".into(), "steady-5".into()]);
    let mut steady3 = spawn_script(
        "steady.py",
        &[port.clone(), "311".into(), "steady-3".into()],
    );
    steady5.wait_event("ready").await;
    steady3.wait_event("ready").await;
    let mut refused = 0; // connections the broker must count as protocol errors

    // Before CONNECT: the version is unknown (or the CONNECT is bad), so no DISCONNECT.
    let seen = before_connect(a, V311, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_plain_close("HTTP instead of MQTT", &seen);
    refused += 1;
    let seen = before_connect(a, V311, &[0xFF, 0x00]).await;
    assert_plain_close("garbage first byte", &seen);
    refused += 1;
    let seen = before_connect(a, V311, &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
    assert_plain_close("remaining length of 5 bytes", &seen);
    refused += 1;
    // CONNECT with the reserved flag set [MQTT-3.1.2-3]: 5.0 answers CONNACK 0x81.
    for version in [V5, V311] {
        let mut bytes = connect_bytes(version, "reserved");
        bytes[9] |= 0x01; // connect flags: fixed header 2, "MQTT" 6, level 1
        let seen = before_connect(a, version, &bytes).await;
        if version == V5 {
            assert_connack(
                "5.0 CONNECT reserved flag",
                &seen,
                ReasonCode::MALFORMED_PACKET,
            );
        } else {
            assert_plain_close("3.1.1 CONNECT reserved flag", &seen);
        }
        refused += 1;
    }

    // An unknown protocol level: CONNACK return code 1 in 3.1.1 form [MQTT-3.1.2-2].
    let mut bytes = connect_bytes(V311, "level-6");
    bytes[8] = 6;
    let seen = before_connect(a, V311, &bytes).await;
    assert_connack(
        "protocol level 6",
        &seen,
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
    );
    refused += 1;
    // A 5.0 CONNECT with Receive Maximum 0 (not allowed): CONNACK 0x82.
    let mut bad = Connect::new(V5, "rm0");
    bad.properties.set_receive_maximum(0);
    let mut buf = BytesMut::new();
    qosmos_mqtt::encode_packet(&Packet::Connect(Box::new(bad)), V5, &mut buf).unwrap();
    let seen = before_connect(a, V5, &buf).await;
    assert_connack("Receive Maximum 0", &seen, ReasonCode::PROTOCOL_ERROR);
    refused += 1;

    // After a good CONNECT at 5.0: DISCONNECT with the reason code, then close.
    let cases: Vec<(&str, Vec<u8>, ReasonCode)> = vec![
        (
            "remaining length of 5 bytes",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            ReasonCode::MALFORMED_PACKET,
        ),
        (
            "PUBLISH QoS 3",
            vec![0x36, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x00],
            ReasonCode::MALFORMED_PACKET,
        ),
        (
            "PUBLISH topic with a wildcard",
            raw_publish(V5, b"a/#", b"x"),
            ReasonCode::TOPIC_NAME_INVALID,
        ),
        (
            "PUBLISH topic not UTF-8",
            raw_publish(V5, &[b'a', 0xC3, 0x28], b"x"),
            ReasonCode::MALFORMED_PACKET,
        ),
        (
            "SUBSCRIBE without filters",
            vec![0x82, 0x03, 0x00, 0x01, 0x00],
            ReasonCode::PROTOCOL_ERROR,
        ),
        (
            "packet over the maximum size",
            raw_publish(V5, b"big", &[b'x'; 10_000]),
            ReasonCode::PACKET_TOO_LARGE,
        ),
        (
            "second CONNECT",
            connect_bytes(V5, "again"),
            ReasonCode::PROTOCOL_ERROR,
        ),
        (
            "SUBSCRIBE to an invalid filter",
            raw_subscribe(b"a/#/b", 0x01),
            ReasonCode::TOPIC_FILTER_INVALID,
        ),
        (
            "No Local on a shared subscription",
            raw_subscribe(b"$share/g/t", 0x05),
            ReasonCode::PROTOCOL_ERROR,
        ),
        (
            "AUTH without enhanced authentication",
            vec![0xF0, 0x00],
            ReasonCode::PROTOCOL_ERROR,
        ),
    ];
    for (i, (case, bytes, code)) in cases.iter().enumerate() {
        let seen = after_connect(a, V5, &format!("bad5-{i}"), bytes).await;
        assert_disconnect(case, &seen, *code);
        refused += 1;
    }

    // The same at 3.1.1: closed without a word.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "PUBLISH QoS 3",
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
        ),
        (
            "PUBLISH topic with a wildcard",
            raw_publish(V311, b"a/+", b"x"),
        ),
        ("PUBLISH topic not UTF-8", raw_publish(V311, &[0xFF], b"x")),
        ("SUBSCRIBE without filters", vec![0x82, 0x02, 0x00, 0x01]),
        ("second CONNECT", connect_bytes(V311, "again")),
        ("AUTH (reserved in 3.1.1)", vec![0xF0, 0x00]),
    ];
    for (i, (case, bytes)) in cases.iter().enumerate() {
        let seen = after_connect(a, V311, &format!("bad3-{i}"), bytes).await;
        assert_plain_close(case, &seen);
        refused += 1;
    }

    // Bytes after DISCONNECT are not read: the PUBLISH behind it is not routed.
    let (mut watcher, _) =
        RawClient::connect(a, RawClient::connect_packet(V5, "after-watch", true)).await;
    watcher
        .send(&Packet::Subscribe(Subscribe {
            packet_id: 1.try_into().unwrap(),
            subscriptions: vec![Subscription {
                filter: "after/#".into(),
                options: SubscriptionOptions::with_qos(QoS::AtMostOnce),
            }],
            properties: Default::default(),
        }))
        .await;
    assert!(matches!(watcher.expect().await, Packet::SubAck(_)));
    let mut bytes = vec![0xE0, 0x00];
    bytes.extend(raw_publish(V5, b"after/disconnect", b"ignored"));
    let seen = after_connect(a, V5, "leaver", &bytes).await;
    assert_plain_close("bytes after DISCONNECT", &seen);
    watcher.expect_silence(Duration::from_millis(300)).await;

    // No CONNECT at all, or only half of one: closed after the connect timeout.
    for (case, bytes) in [
        ("silent", Vec::new()),
        (
            "half a CONNECT",
            connect_bytes(V5, "slowloris")[..8].to_vec(),
        ),
    ] {
        let start = Instant::now();
        let mut c = RawClient::open(a, V5).await;
        c.send_bytes(&bytes).await;
        let seen = c.expect_closed().await;
        let took = start.elapsed();
        assert_plain_close(case, &seen);
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "{case}: closed after {took:?}"
        );
    }
    assert_eq!(b.metric("connect_timeouts"), 2);
    assert_eq!(b.metric("protocol_errors"), refused);

    // The broker still serves: the steady clients lost nothing and saw no disconnect.
    let r5 = steady5.finish().await;
    let r3 = steady3.finish().await;
    for r in [&r5, &r3] {
        assert!(r["sent"].as_u64().unwrap() > 10, "{r}");
        assert_eq!(r["sent"], r["received"], "{r}");
    }
    // And a fresh client is still welcome.
    let (mut c, ack) = RawClient::connect(a, RawClient::connect_packet(V5, "late", true)).await;
    assert!(ack.reason_code.is_success());
    c.send(&Packet::PingReq).await;
    assert!(matches!(
        c.recv(common::TIMEOUT).await,
        Recv::Packet(Packet::PingResp)
    ));
}
