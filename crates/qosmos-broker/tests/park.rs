//! Idle connections parked without a task (their socket in the broker's shared poller, see
//! `src/park.rs`) must come back for everything that concerns them: a packet from the client,
//! a message routed to them, a takeover, their keep alive expiring, the broker shutting down,
//! and their socket closing. Real TCP against the real broker; the `connections_parked` gauge
//! says when a connection is parked.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{RawClient, Recv, TestBroker, expect_disconnect, limits, subscribe, wait_until};
use qosmos_broker::Limits;
use qosmos_mqtt::{LastWill, Packet, ProtocolVersion, PubAck, Publish, QoS, ReasonCode};
use std::time::Duration;

const V: ProtocolVersion = ProtocolVersion::V5;

fn publish(topic: &str, qos: QoS, id: u16, payload: &str) -> Packet {
    let mut p = Publish::new(topic, payload.as_bytes().to_vec());
    p.qos = qos;
    p.packet_id = (qos != QoS::AtMostOnce).then(|| id.try_into().unwrap());
    Packet::Publish(p)
}

/// A clean-start CONNECT for `id` whose will is "gone" on `topic`.
fn with_will(id: &str, topic: &str, qos: QoS) -> qosmos_mqtt::Connect {
    let mut connect = RawClient::connect_packet(V, id, true);
    connect.will = Some(LastWill {
        topic: topic.into(),
        payload: "gone".into(),
        qos,
        retain: false,
        properties: Default::default(),
    });
    connect
}

/// Waits until exactly `n` connections are parked.
async fn wait_parked(b: &TestBroker, n: u64) {
    let h = b.handle.clone();
    wait_until(&format!("{n} connections parked"), || {
        common::metric(&h, "connections_parked") == n
    })
    .await;
}

/// Connects `id` (clean start, keep alive 60) and waits until it is parked, with `parked`
/// connections parked in all then.
async fn connect_parked(b: &TestBroker, id: &str, parked: u64) -> RawClient {
    let (c, ack) = RawClient::connect(b.addr, RawClient::connect_packet(V, id, true)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    wait_parked(b, parked).await;
    c
}

/// (a) A packet from the client resumes it; once idle for a sweep period it parks again, and
/// comes back again.
#[tokio::test]
async fn a_parked_connection_is_resumed_by_its_client() {
    let b = TestBroker::start(limits()).await;
    let mut c = connect_parked(&b, "p-read", 1).await;
    c.send(&Packet::PingReq).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    c.send(&subscribe("p/read", QoS::AtLeastOnce)).await;
    assert!(matches!(c.expect().await, Packet::SubAck(_)));
    // Idle again: parked again by the keep-alive sweep, then resumed again.
    wait_parked(&b, 1).await;
    c.send(&Packet::PingReq).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    assert_eq!(b.metric("clients_connected"), 1);
    b.stop().await;
}

/// (b) A message routed to a parked subscriber resumes it and is delivered; so are the
/// messages routed while the subscribers go back and forth between parked and running.
#[tokio::test]
async fn a_parked_connection_is_resumed_by_a_message_routed_to_it() {
    const SUBS: u64 = 10;
    let b = TestBroker::start(limits()).await;
    let mut subs = Vec::new();
    for i in 0..SUBS {
        let mut sub = connect_parked(&b, &format!("p-sub-{i}"), i + 1).await;
        sub.send(&subscribe("p/routed", QoS::AtLeastOnce)).await;
        assert!(matches!(sub.expect().await, Packet::SubAck(_)));
        subs.push(sub);
    }
    wait_parked(&b, SUBS).await;
    let mut publisher = connect_parked(&b, "p-pub", SUBS + 1).await;
    // Pauses around the sweep period, so that some messages come while the subscriber is
    // parking or parked and others while it runs.
    let pauses = [0, 450, 700, 950, 1100, 300, 600, 1000];
    for (i, pause) in pauses.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(*pause)).await;
        let id = u16::try_from(i + 1).unwrap();
        let payload = format!("m{id}");
        publisher
            .send(&publish("p/routed", QoS::AtLeastOnce, id, &payload))
            .await;
        match publisher.expect().await {
            Packet::PubAck(a) => assert_eq!(a.packet_id, id.try_into().unwrap()),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        for sub in &mut subs {
            match sub.expect().await {
                Packet::Publish(p) => {
                    assert_eq!(&p.payload[..], payload.as_bytes());
                    sub.send(&Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
                        .await;
                }
                other => panic!("expected PUBLISH {payload}, got {other:?}"),
            }
        }
    }
    for sub in &mut subs {
        sub.expect_silence(Duration::from_millis(100)).await;
    }
    b.stop().await;
}

/// (c) A takeover resumes the parked old connection, which is told (DISCONNECT 0x8E) and
/// closed.
#[tokio::test]
async fn a_parked_connection_is_resumed_by_a_takeover() {
    let b = TestBroker::start(limits()).await;
    let mut old = connect_parked(&b, "p-same", 1).await;
    let (mut new, ack) =
        RawClient::connect(b.addr, RawClient::connect_packet(V, "p-same", false)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert_eq!(
        expect_disconnect(&mut old).await,
        ReasonCode::SESSION_TAKEN_OVER
    );
    assert_eq!(b.metric("session_takeovers"), 1);
    new.send(&Packet::PingReq).await;
    assert_eq!(new.expect().await, Packet::PingResp);
    wait_until("one client connected", || {
        b.metric("clients_connected") == 1
    })
    .await;
    b.stop().await;
}

/// (d) The keep-alive sweep closes a silent parked client (DISCONNECT 0x8D) between 1.5 times
/// its keep alive and a sweep period later.
#[tokio::test]
async fn a_silent_parked_connection_is_closed_by_its_keep_alive() {
    let b = TestBroker::start(Limits {
        max_keep_alive: Some(1),
        ..limits()
    })
    .await;
    let start = std::time::Instant::now();
    let mut c = connect_parked(&b, "p-silent", 1).await;
    assert_eq!(
        expect_disconnect(&mut c).await,
        ReasonCode::KEEP_ALIVE_TIMEOUT
    );
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
    assert_eq!(b.metric("keep_alive_timeouts"), 1);
    wait_parked(&b, 0).await;
    wait_until("no client connected", || b.metric("clients_connected") == 0).await;
    b.stop().await;
}

/// (e) Shutdown resumes every parked connection: each is told (DISCONNECT 0x8B) and closed,
/// and the broker's `run` returns.
#[tokio::test]
async fn parked_connections_are_closed_at_shutdown() {
    let b = TestBroker::start(limits()).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(connect_parked(&b, &format!("p-shut-{i}"), i + 1).await);
    }
    b.stop().await;
    for c in &mut clients {
        assert_eq!(expect_disconnect(c).await, ReasonCode::SERVER_SHUTTING_DOWN);
    }
}

/// A parked client whose socket closes without DISCONNECT is noticed at once (the poller
/// reports the hang-up): its will is published.
#[tokio::test]
async fn a_parked_connection_lost_publishes_its_will() {
    let b = TestBroker::start(limits()).await;
    let mut watcher = connect_parked(&b, "p-watch", 1).await;
    watcher.send(&subscribe("p/will", QoS::AtLeastOnce)).await;
    assert!(matches!(watcher.expect().await, Packet::SubAck(_)));
    let connect = with_will("p-lost", "p/will", QoS::AtLeastOnce);
    let (lost, _) = RawClient::connect(b.addr, connect).await;
    wait_parked(&b, 2).await;
    drop(lost);
    match watcher.expect().await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"gone"),
        other => panic!("expected the will, got {other:?}"),
    }
    wait_until("one client connected", || {
        b.metric("clients_connected") == 1
    })
    .await;
    assert!(matches!(
        watcher.recv(Duration::from_millis(100)).await,
        Recv::Silent
    ));
    b.stop().await;
}

/// Past 256 connections a new one is parked right after its CONNACK when nothing came with
/// its CONNECT: clients that send at once (while it parks) are answered all the same.
#[tokio::test]
async fn connections_parked_at_connect_answer_what_comes_at_once() {
    let b = TestBroker::start(limits()).await;
    let (mut publisher, _) =
        RawClient::connect(b.addr, RawClient::connect_packet(V, "p-pub", true)).await;
    let mut idle = Vec::new();
    for i in 0..255 {
        let (c, _) = RawClient::connect(
            b.addr,
            RawClient::connect_packet(V, &format!("p-many-{i}"), true),
        )
        .await;
        idle.push(c);
    }
    for i in 0..40 {
        let (mut c, ack) = RawClient::connect(
            b.addr,
            RawClient::connect_packet(V, &format!("p-now-{i}"), true),
        )
        .await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
        c.send(&subscribe(&format!("p/now/{i}"), QoS::AtLeastOnce))
            .await;
        assert!(matches!(c.expect().await, Packet::SubAck(_)));
        c.send(&Packet::PingReq).await;
        assert_eq!(c.expect().await, Packet::PingResp);
        // A message routed right away reaches it: the connection was parked at its CONNACK
        // and resumed by its SUBSCRIBE, maybe before the parking task had finished parking
        // (a wake-up recorded too late would be lost).
        publisher
            .send(&publish(&format!("p/now/{i}"), QoS::AtLeastOnce, 1, "now"))
            .await;
        assert!(matches!(publisher.expect().await, Packet::PubAck(_)));
        match c.expect().await {
            Packet::Publish(p) => assert_eq!(&p.payload[..], b"now"),
            other => panic!("expected the routed PUBLISH, got {other:?}"),
        }
        idle.push(c);
    }
    // Every one of them parks (the last ones at once, the others at the sweep).
    wait_parked(&b, 296).await;
    assert_eq!(b.metric("clients_connected"), 296);
    b.stop().await;
}

/// Hundreds of parked clients lost at once are resumed a few at a time (the poller keeps at
/// most 64 resumed connections waiting for the runtime, the rest parked in order): every one
/// is handled all the same, its will published, none left behind.
#[tokio::test]
async fn many_parked_connections_lost_at_once_all_publish_their_wills() {
    const N: usize = 300;
    let b = TestBroker::start(limits()).await;
    let mut watcher = connect_parked(&b, "p-watch-many", 1).await;
    watcher
        .send(&subscribe("p/wills/#", QoS::AtLeastOnce))
        .await;
    assert!(matches!(watcher.expect().await, Packet::SubAck(_)));
    let mut lost = Vec::new();
    for i in 0..N {
        let connect = with_will(
            &format!("p-lost-{i}"),
            &format!("p/wills/{i}"),
            QoS::AtMostOnce,
        );
        let (c, ack) = RawClient::connect(b.addr, connect).await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
        lost.push(c);
    }
    wait_parked(&b, N as u64 + 1).await;
    drop(lost);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < N {
        match watcher.expect().await {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"gone");
                assert!(seen.insert(p.topic.to_string()), "will twice: {}", p.topic);
            }
            other => panic!("expected a will, got {other:?}"),
        }
    }
    wait_until("only the watcher connected", || {
        b.metric("clients_connected") == 1
    })
    .await;
    wait_parked(&b, 1).await;
    b.stop().await;
}
